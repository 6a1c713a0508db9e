/*
 * The SSDT that `acpimon ssdt --thermal-period-ds 10` generates (default slot 0f.0, IRQ 7,
 * doorbell port 0x403, which also carries the record as a frame when the region is out of reach),
 * written as ASL for people to read. `tests/asl_equivalence.rs` compiles this file with iasl
 * and checks that its AML is byte-identical to the generator's (src/generate/), so edit both.
 *
 * Region offsets are those of src/abi.rs; status codes are abi::Status, sources abi::Source.
 */
DefinitionBlock ("", "SSDT", 1, "ACPIMN", "ACPIMON", 0x00000001)
{
    External (\_SB.PCI0, DeviceObj)

    Scope (\_SB.PCI0)
    {
        /* The ivshmem function: finds BAR2 and writes records into the shared region. */
        Device (AMSH)
        {
            Name (_ADR, 0x000F0000)     /* slot 0f.0 */
            Name (LSTA, 0xFF)           /* last status: not run yet */
            Name (CNTB, Zero)           /* boot count, once this boot has written a record */
            Name (CNTG, Zero)           /* GED events this boot */
            Name (CNTT, Zero)           /* thermal polls this boot */
            OperationRegion (PCIC, PCI_Config, Zero, 0x20)
            Field (PCIC, DWordAcc, NoLock, Preserve)
            {
                VDID,   32,             /* vendor | device << 16 */
                Offset (0x18),
                BAR2,   32,             /* low half of the 64-bit memory BAR2 */
                BAR3,   32              /* its high half */
            }

            /* The port channel (only with a doorbell port): when WREC cannot write the region,
             * FRAM sends the record as a SLIP frame on the port (abi::PortFrame). */
            Name (FCNT, Zero)           /* frames sent this boot */
            Name (FCKA, Zero)           /* the frame's checksum: the sum of its words */
            Name (FCKB, Zero)           /* and the sum of those sums */
            OperationRegion (FPRT, SystemIO, 0x0403, One)
            Field (FPRT, ByteAcc, NoLock, Preserve)
            {
                FPRB,   8
            }

            OperationRegion (FTOK, SystemIO, 0xE0, 0x04)
            Field (FTOK, DWordAcc, NoLock, Preserve)
            {
                FTKN,   32              /* pc-testdev's register: the host's nonce */
            }

            /* One word, little-endian, each byte SLIP-escaped (END 0xC0 as 0xDB 0xDC, ESC 0xDB
             * as 0xDB 0xDD), added to the checksum (only its low 32 bits are sent, so 64-bit
             * integers give the same frame). A loop: a method call per byte costs far more. */
            Method (FWRD, 1, NotSerialized)
            {
                FCKA += Arg0
                FCKB += FCKA
                Local0 = Arg0
                Local1 = 0x04
                While (Local1)
                {
                    Local2 = (Local0 & 0xFF)
                    If ((Local2 == 0xC0))
                    {
                        FPRB = 0xDB
                        FPRB = 0xDC
                    }
                    Else
                    {
                        If ((Local2 == 0xDB))
                        {
                            FPRB = 0xDB
                            FPRB = 0xDD
                        }
                        Else
                        {
                            FPRB = Local2
                        }
                    }

                    Local0 >>= 0x08
                    Local1--
                }
            }

            /* The record from source Arg0 as a frame; LSTA says why the region was not used. */
            Method (FRAM, 1, NotSerialized)
            {
                FCNT++
                If ((Arg0 == 0x02))
                {
                    CNTG++
                }
                Else
                {
                    If ((Arg0 == 0x03))
                    {
                        CNTT++
                    }
                }

                FCKA = Zero
                FCKB = Zero
                FWRD (0x01464D41)       /* "AMF", version 1 */
                FWRD (FCNT)
                FWRD (LSTA)
                FWRD (Arg0)
                FWRD (FTKN)
                FWRD (Timer)
                FWRD (VDID)
                FWRD (BAR2)
                FWRD (BAR3)
                FWRD (CNTG)
                FWRD (CNTT)
                Local0 = FCKB           /* a copy: FWRD adds its argument to the sums */
                FWRD (Local0)
                FPRB = 0xC0             /* END: also the doorbell's ring */
            }

            /* BAR2's address, or 0 with LSTA saying why there is none. */
            Method (FIND, 0, NotSerialized)
            {
                If ((VDID != 0x11101AF4))
                {
                    LSTA = One          /* not ivshmem */
                    Return (Zero)
                }

                Local0 = BAR2
                If ((Local0 & One))
                {
                    LSTA = One          /* an I/O BAR: not ivshmem */
                    Return (Zero)
                }

                If (((Local0 & 0x04) && (BAR3 != Zero)))
                {
                    LSTA = 0x02         /* above 4 GiB: out of 32-bit AML's reach */
                    Return (Zero)
                }

                Local0 &= 0xFFFFFFF0
                If ((Local0 == Zero))
                {
                    LSTA = 0x03         /* unassigned */
                    Return (Zero)
                }

                Return (Local0)
            }

            /* One record from source Arg0 (1 boot, 2 GED, 3 thermal), under the seqlock. */
            Method (WREC, 1, Serialized)
            {
                Local0 = FIND ()
                If ((Local0 == Zero))
                {
                    FRAM (Arg0)         /* no region: the record goes on the port */
                    Return (LSTA)
                }

                OperationRegion (SHMR, SystemMemory, Local0, 0xA8)
                Field (SHMR, DWordAcc, NoLock, Preserve)
                {
                    MAGC,   32,         /* header */
                    ABIV,   32,
                    Offset (0x40),
                    RQNO,   32,         /* request */
                    RQNC,   32,
                    Offset (0x80),
                    RSEQ,   32,         /* record */
                    RSTA,   32,
                    RSRC,   32,
                    ERQN,   32,
                    ENON,   32,
                    RTMR,   32,
                    RBAR,   32,
                    RCNB,   32,
                    RCNG,   32,
                    RCNT,   32
                }

                If (((MAGC != 0x4E4F4D41) || (ABIV != One)))
                {
                    LSTA = 0x04         /* not our region */
                    FRAM (Arg0)
                    Return (LSTA)
                }

                If ((CNTB == Zero))
                {
                    CNTB = (RCNB + One) /* the first record of a boot counts the boot */
                }

                If ((Arg0 == 0x02))
                {
                    CNTG++
                }
                Else
                {
                    If ((Arg0 == 0x03))
                    {
                        CNTT++
                    }
                }

                Local1 = ((RSEQ + One) | One)
                RSEQ = Local1           /* odd: writing */
                RSTA = Zero
                RSRC = Arg0
                ERQN = RQNO
                ENON = RQNC
                RTMR = Timer
                RBAR = Local0
                RCNB = CNTB
                RCNG = CNTG
                RCNT = CNTT
                RSEQ = (Local1 + One)   /* even: complete */
                LSTA = Zero
                Return (Zero)
            }

            Method (_INI, 0, NotSerialized)
            {
                WREC (One)
            }
        }
    }

    Scope (\_SB)
    {
        /* Generic Event Device, raised by the host through pc-testdev (port 0x2000 + IRQ). */
        Device (AMGE)
        {
            Name (_HID, "ACPI0013")
            Name (_UID, Zero)
            Name (_CRS, ResourceTemplate ()
            {
                Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )
                {
                    0x00000007,
                }
            })
            OperationRegion (TDEV, SystemIO, 0x2007, One)
            Field (TDEV, ByteAcc, NoLock, Preserve)
            {
                TIRQ,   8
            }

            /* The doorbell: an isa-debugcon whose chardev the host reads (0x403 by default). */
            OperationRegion (DBEL, SystemIO, 0x0403, One)
            Field (DBEL, ByteAcc, NoLock, Preserve)
            {
                DBEB,   8
            }

            Method (_EVT, 1, NotSerialized)
            {
                TIRQ = Zero             /* level-triggered: drop the line first */
                \_SB.PCI0.AMSH.WREC (0x02)
                DBEB = 0xC0             /* the record is complete: ring (a SLIP END byte) */
            }
        }
    }

    Scope (\_TZ)
    {
        /* The guest-driven fallback: Linux calls _TMP every _TZP tenths of a second. */
        ThermalZone (AMTZ)
        {
            Name (_TZP, 0x0A)
            Name (_CRT, 0x0F5C)         /* 120.0 C: never reached */
            Method (_TMP, 0, NotSerialized)
            {
                \_SB.PCI0.AMSH.WREC (0x03)
                Return (0x0BA6)         /* 25.0 C */
            }
        }
    }
}
