/*
 * Test-only SSDT, loaded after the generated one. It plays the host and the hardware:
 * its own PCI_Config field over the same device shares acpiexec's simulated config space
 * with the generated table, and its SystemMemory regions share the simulated region.
 */
DefinitionBlock ("", "SSDT", 1, "ACPIMN", "HARNESS", 1)
{
    External (\_SB.PCI0.AMSH, DeviceObj)
    External (\_SB.PCI0.AMSH.LSTA, IntObj)

    Scope (\_SB.PCI0.AMSH)
    {
        OperationRegion (TPCI, PCI_Config, Zero, 0x20)
        Field (TPCI, DWordAcc, NoLock, Preserve)
        {
            TVID,   32,
            Offset (0x18),
            TBR2,   32,
            TBR3,   32
        }
    }

    /* Config space: vendor|device, BAR2, BAR3. */
    Method (\TPCI, 3, NotSerialized)
    {
        \_SB.PCI0.AMSH.TVID = Arg0
        \_SB.PCI0.AMSH.TBR2 = Arg1
        \_SB.PCI0.AMSH.TBR3 = Arg2
    }

    /* The host's part at address Arg0: the ABI 1 header of an Arg1-byte region, and a
     * request (number Arg2, nonce Arg3), with the values documented in src/abi.rs. */
    Method (\THST, 4, Serialized)
    {
        OperationRegion (TSHM, SystemMemory, Arg0, 0x100)
        Field (TSHM, DWordAcc, NoLock, Preserve)
        {
            HMAG, 32, HABI, 32, HSIZ, 32, HHSZ, 32, HRQO, 32, HRQS, 32, HRCO, 32, HRCS, 32,
            HMBO, 32, HMBS, 32,
            Offset (0x40),
            TRQN, 32, TNON, 32
        }
        HMAG = 0x4E4F4D41
        HABI = One
        HSIZ = Arg1
        HHSZ = 0x40
        HRQO = 0x40
        HRQS = 0x40
        HRCO = 0x80
        HRCS = 0x40
        HMBO = 0x100
        HMBS = (Arg1 - 0x100)
        TRQN = Arg2
        TNON = Arg3
    }

    /* A previous boot's leftovers at Arg0: sequence number Arg1, boot count Arg2. */
    Method (\TOLD, 3, Serialized)
    {
        OperationRegion (TSHM, SystemMemory, Arg0, 0x100)
        Field (TSHM, DWordAcc, NoLock, Preserve)
        {
            Offset (0x80),
            OSEQ,   32,
            Offset (0x9C),
            OBOT,   32
        }
        OSEQ = Arg1
        OBOT = Arg2
    }

    /* The region's fixed areas at Arg0, as a Buffer for the Rust decoder. */
    Method (\TDMP, 1, Serialized)
    {
        OperationRegion (TSHM, SystemMemory, Arg0, 0x100)
        Field (TSHM, ByteAcc, NoLock, Preserve)
        {
            TALL,   2048
        }
        Return (TALL)
    }

    /* The doorbell port (0x403): acpiexec simulates I/O ports as it does memory, so this
     * region shares the byte the generated table writes. TDBC clears it, TDBL reads it. */
    OperationRegion (TDBR, SystemIO, 0x0403, One)
    Field (TDBR, ByteAcc, NoLock, Preserve)
    {
        TDBB,   8
    }

    Method (\TDBC, 0, NotSerialized)
    {
        TDBB = Zero
    }

    Method (\TDBL, 0, NotSerialized)
    {
        Return (TDBB)
    }

    /* pc-testdev's 32-bit register at 0xE0, where the host leaves its nonce for the port
     * channel: TTOK writes it. */
    OperationRegion (TTKR, SystemIO, 0xE0, 0x04)
    Field (TTKR, DWordAcc, NoLock, Preserve)
    {
        TTKN,   32
    }

    Method (\TTOK, 1, NotSerialized)
    {
        TTKN = Arg0
    }

    /* The generated table's last status. */
    Method (\TSTA, 0, NotSerialized)
    {
        Return (\_SB.PCI0.AMSH.LSTA)
    }
}
