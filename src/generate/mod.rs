//! Stage 1 of the data path: the SSDT that the guest kernel executes.
//!
//! The table declares three things, each written by its own builder below (the way Cloud
//! Hypervisor's devices each write their own AML and the table only concatenates them):
//!
//! - [`SharedRegionDevice`]: a Device under `\_SB.PCI0` at the ivshmem slot's `_ADR`. Its
//!   `PCI_Config` region finds BAR2; `WREC` guards (ivshmem 1af4:1110, memory BAR2 assigned and
//!   below 4 GiB, region magic and ABI version) and then writes one record under the sequence
//!   rule of [`crate::abi`]. `_INI` writes the boot record.
//!   With a doorbell port, a `WREC` that cannot write the region (any guard failing) sends
//!   the record as a SLIP frame on that port instead (`FRAM`; the port channel of
//!   [`crate::abi`]), with the host's nonce read from pc-testdev's register at
//!   [`abi::TOKEN_PORT`]. Without a port the table has no such path.
//! - [`EventDevice`]: a Generic Event Device (`ACPI0013`) on a level, active-high ISA IRQ.
//!   The host raises the IRQ with pc-testdev (I/O port `0x2000 + irq`); `_EVT` drops the line
//!   itself (so one host command makes one event) and writes a record.
//!   With a doorbell port (the default, [`DEFAULT_DOORBELL_PORT`]), `_EVT` then writes
//!   [`abi::DOORBELL_BYTE`] to that I/O port (an `isa-debugcon` whose chardev the host reads),
//!   so the host wakes when the record is complete instead of polling the region.
//! - [`ThermalPoll`] (optional): a ThermalZone whose `_TZP` makes Linux call `_TMP`
//!   periodically; `_TMP` writes a record and returns a constant far below `_CRT`.
//!
//! `asl/acpimon.asl` is the same table in ASL, for people; a test keeps the two equivalent.

pub mod aml;

use std::fmt;
use std::str::FromStr;

use acpi_tables::aml::{
    Add, And, Arg, Device, Else, Equal, Field, FieldAccessType, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Method, MethodCall, Name, NotEqual, OpRegion, OpRegionSpace, Or, Path,
    ResourceTemplate, Return, Scope, ShiftRight, Store, While, ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use self::aml::{field_list, Decrement, External, Increment, LAnd, LOr, ThermalZone, Timer, DEVICE_OBJ};
use crate::abi::{self, offsets, Source, Status};

/// OEM ID in the table header.
pub const OEM_ID: [u8; 6] = *b"ACPIMN";
/// Default OEM table ID.
pub const DEFAULT_OEM_TABLE_ID: &str = "ACPIMON";
/// Default GED IRQ: free on pc and q35 with `-nodefaults`. (6 is not: QEMU's pc board keeps
/// its floppy controller on IRQ 6 even with `-nodefaults`, measured on QEMU 10.0.)
pub const DEFAULT_IRQ: u8 = 7;
/// Default ivshmem slot: device 0x0f, function 0, unused by QEMU's pc and q35 boards.
pub const DEFAULT_SLOT: PciSlot = PciSlot { device: 0x0f, function: 0 };
/// Default region size.
pub const DEFAULT_REGION_SIZE: u32 = 4096;
/// pc-testdev's ISA IRQ ports start here: a write of `v` to `0x2000 + n` sets IRQ `n` to `v`.
pub const TESTDEV_IRQ_PORT_BASE: u16 = 0x2000;
/// Default doorbell I/O port. Free on QEMU's pc and q35 boards (`info mtree`: unassigned from
/// 0x3f8's serial port to the ELCR at 0x4d0), and not 0x402, where SeaBIOS and OVMF write their
/// debug logs.
pub const DEFAULT_DOORBELL_PORT: u16 = 0x403;
/// The doorbell's OperationRegion and field.
const DOORBELL_REGION: &str = "DBEL";
const DOORBELL_FIELD: &str = "DBEB";
/// The constant temperature `_TMP` returns: 25.0 °C in tenths of a kelvin.
pub const THERMAL_TMP_DK: u16 = 2982;
/// The critical trip point: 120.0 °C, far above `_TMP`, so Linux never acts on it.
pub const THERMAL_CRT_DK: u16 = 3932;
/// Accepted thermal poll periods, in tenths of a second.
pub const THERMAL_PERIOD_RANGE: std::ops::RangeInclusive<u16> = 1..=36000;

/// Namespace paths of the objects the table declares.
pub mod paths {
    /// The shared-region device.
    pub const SHARED_DEVICE: &str = "\\_SB_.PCI0.AMSH";
    /// The method that writes one record; `Arg0` is the [`crate::abi::Source`] code.
    pub const WRITE_RECORD: &str = "\\_SB_.PCI0.AMSH.WREC";
    /// The last [`crate::abi::Status`] of `WREC`.
    pub const LAST_STATUS: &str = "\\_SB_.PCI0.AMSH.LSTA";
    /// The Generic Event Device.
    pub const EVENT_DEVICE: &str = "\\_SB_.AMGE";
    /// The thermal zone.
    pub const THERMAL_ZONE: &str = "\\_TZ_.AMTZ";
}

/// Errors in the generator's parameters. Each message names the problem and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("IRQ {0} is out of range: pc-testdev raises ISA IRQs 0-15 only; pick a free one below 16 (7 with -nodefaults)")]
    IrqOutOfRange(u32),
    #[error("IRQ {0} is taken by the platform (0 timer, 1 keyboard, 2 cascade, 8 RTC, 9 ACPI SCI); pick a free one, e.g. 7 with -nodefaults")]
    IrqReserved(u8),
    #[error("region size {0} is not a power of two; ivshmem needs one, e.g. 4096 or 64K")]
    RegionSizeNotPowerOfTwo(u64),
    #[error("region size {0} is smaller than the {min} bytes the region ABI needs; use at least {min}", min = abi::MIN_REGION_SIZE)]
    RegionSizeTooSmall(u64),
    #[error("region size {0} is larger than {max} bytes; firmware maps large BARs above 4 GiB where AML cannot reach them; use {max} or less", max = abi::MAX_REGION_SIZE)]
    RegionSizeTooLarge(u64),
    #[error("region size '{0}' is not a number of bytes; write e.g. 4096, 0x1000, 4K or 1M")]
    RegionSizeSyntax(String),
    #[error(
        "PCI slot '{0}' is malformed: {1}; write DEV[.FN] in hex as QEMU's addr= does, e.g. 0f or 0x0f.0"
    )]
    BadSlot(String, &'static str),
    #[error("OEM table ID '{0}' is not 1-8 printable ASCII characters; choose a shorter plain name")]
    BadOemTableId(String),
    #[error("thermal period {0} ds is out of range; use 1-36000 tenths of a second (0.1 s to 1 h)")]
    ThermalPeriod(u32),
    #[error("doorbell port {0:#x} is taken by the platform or pc-testdev (0, 0x402, 0xcf8-0xcff; pc-testdev's 0xe0-0xeb and 0x2000-0x2017); use the default 0x403 or another free I/O port")]
    DoorbellPort(u16),
}

/// A PCI device and function on bus 0, as QEMU's `addr=` property writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciSlot {
    pub device: u8,
    pub function: u8,
}

impl PciSlot {
    /// `_ADR` of the function: device in the high word, function in the low word.
    pub fn adr(self) -> u32 {
        (u32::from(self.device) << 16) | u32::from(self.function)
    }
}

impl fmt::Display for PciSlot {
    /// QEMU's `addr=` syntax: `0f.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}.{}", self.device, self.function)
    }
}

impl FromStr for PciSlot {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ConfigError::BadSlot(s.to_string(), why);
        let t = s.trim();
        let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
        let (dev, func) = match t.split_once('.') {
            Some((d, f)) => (d, Some(f)),
            None => (t, None),
        };
        let hex = |x: &str| {
            if x.is_empty() || x.len() > 2 || !x.bytes().all(|b| b.is_ascii_hexdigit()) {
                None
            } else {
                u8::from_str_radix(x, 16).ok()
            }
        };
        let device = hex(dev).ok_or_else(|| bad("the device is not a 1-2 digit hex number"))?;
        if device > 0x1f {
            return Err(bad("the device must be 0x00-0x1f"));
        }
        if device == 0 {
            return Err(bad("device 0 is the host bridge"));
        }
        let function = match func {
            Some(f) => hex(f).ok_or_else(|| bad("the function is not a hex digit"))?,
            None => 0,
        };
        if function > 7 {
            return Err(bad("the function must be 0-7"));
        }
        Ok(PciSlot { device, function })
    }
}

/// Everything the table is parameterised by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsdtConfig {
    /// Where `ivshmem-plain` sits (`addr=`).
    pub slot: PciSlot,
    /// The GED's ISA IRQ, raised through pc-testdev.
    pub irq: u8,
    /// Size of the shared region in bytes.
    pub region_size: u32,
    /// OEM table ID in the header (1-8 ASCII characters).
    pub oem_table_id: String,
    /// Thermal fallback poll period in tenths of a second; `None` leaves the zone out.
    pub thermal_period_ds: Option<u16>,
    /// The I/O port `_EVT` rings when its record is complete; `None` leaves the doorbell out
    /// (the host then polls the region).
    pub doorbell_port: Option<u16>,
}

impl Default for SsdtConfig {
    fn default() -> Self {
        SsdtConfig {
            slot: DEFAULT_SLOT,
            irq: DEFAULT_IRQ,
            region_size: DEFAULT_REGION_SIZE,
            oem_table_id: DEFAULT_OEM_TABLE_ID.to_string(),
            thermal_period_ds: None,
            doorbell_port: Some(DEFAULT_DOORBELL_PORT),
        }
    }
}

/// Checks an IRQ for the GED.
pub fn validate_irq(irq: u32) -> Result<u8, ConfigError> {
    if irq >= 16 {
        return Err(ConfigError::IrqOutOfRange(irq));
    }
    let irq = irq as u8;
    if matches!(irq, 0 | 1 | 2 | 8 | 9) {
        return Err(ConfigError::IrqReserved(irq));
    }
    Ok(irq)
}

/// Checks a doorbell port: not one the board, its firmware's debug log or pc-testdev uses.
pub fn validate_doorbell_port(port: u16) -> Result<u16, ConfigError> {
    let taken =
        port == 0 || port == 0x402 || (0xe0..=0xeb).contains(&port) || (0xcf8..=0xcff).contains(&port);
    let testdev_irq = (TESTDEV_IRQ_PORT_BASE..TESTDEV_IRQ_PORT_BASE + 0x18).contains(&port);
    if taken || testdev_irq {
        return Err(ConfigError::DoorbellPort(port));
    }
    Ok(port)
}

/// Checks a region size against the ABI.
pub fn validate_region_size(size: u64) -> Result<u32, ConfigError> {
    if size < abi::MIN_REGION_SIZE {
        return Err(ConfigError::RegionSizeTooSmall(size));
    }
    if !size.is_power_of_two() {
        return Err(ConfigError::RegionSizeNotPowerOfTwo(size));
    }
    if size > abi::MAX_REGION_SIZE {
        return Err(ConfigError::RegionSizeTooLarge(size));
    }
    Ok(size as u32)
}

/// Parses a region size ([`crate::units::parse_size`]: decimal, `0x` hex, or with a
/// `K`/`M`/`G` (or `KiB`, ...) suffix) and checks it against the ABI.
pub fn parse_region_size(s: &str) -> Result<u32, ConfigError> {
    let size = crate::units::parse_size(s).map_err(|_| ConfigError::RegionSizeSyntax(s.to_string()))?;
    validate_region_size(size)
}

impl SsdtConfig {
    /// Checks every parameter; [`build`] calls it too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_irq(u32::from(self.irq))?;
        validate_region_size(u64::from(self.region_size))?;
        let id = &self.oem_table_id;
        if id.is_empty() || id.len() > 8 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::BadOemTableId(id.clone()));
        }
        if let Some(p) = self.thermal_period_ds {
            if !THERMAL_PERIOD_RANGE.contains(&p) {
                return Err(ConfigError::ThermalPeriod(u32::from(p)));
            }
        }
        if let Some(port) = self.doorbell_port {
            validate_doorbell_port(port)?;
        }
        Ok(())
    }

    fn oem_table_id_bytes(&self) -> [u8; 8] {
        let mut id = [0u8; 8];
        id[..self.oem_table_id.len()].copy_from_slice(self.oem_table_id.as_bytes());
        id
    }
}

/// Builds the SSDT: header, checksum and AML body.
pub fn build(cfg: &SsdtConfig) -> Result<Vec<u8>, ConfigError> {
    cfg.validate()?;
    let mut body = Vec::new();
    // Inside `If (Zero)`, as iasl emits it: interpreters that predate ExternalOp skip it.
    let pci0 = External { path: "\\_SB_.PCI0".into(), object_type: DEVICE_OBJ };
    If::new(&ZERO, vec![&pci0]).to_aml_bytes(&mut body);
    let shared = SharedRegionDevice { slot: cfg.slot, doorbell_port: cfg.doorbell_port };
    Scope::new("\\_SB_.PCI0".into(), vec![&shared]).to_aml_bytes(&mut body);
    Scope::new("\\_SB_".into(), vec![&EventDevice { irq: cfg.irq, doorbell_port: cfg.doorbell_port }])
        .to_aml_bytes(&mut body);
    if let Some(period_ds) = cfg.thermal_period_ds {
        Scope::new("\\_TZ_".into(), vec![&ThermalPoll { period_ds }]).to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"SSDT", 36, 1, OEM_ID, cfg.oem_table_id_bytes(), 1);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}

/// A named integer constant in the table.
fn name_int(name: &str, value: u32) -> Name {
    Name::new(name.into(), &value)
}

/// `LSTA = status; Return (ret)`: the guard's way out.
fn fail(status: Status, ret: &dyn Aml, sink: &mut dyn AmlSink) {
    Store::new(&Path::new("LSTA"), &status.code()).to_aml_bytes(sink);
    Return::new(ret).to_aml_bytes(sink);
}

/// AML that runs `f` into a byte vector; lets statement lists be built by plain Rust code.
struct Block<F: Fn(&mut dyn AmlSink)>(F);

impl<F: Fn(&mut dyn AmlSink)> Aml for Block<F> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        (self.0)(sink)
    }
}

/// The Device over the ivshmem function: finds BAR2 and writes records.
pub struct SharedRegionDevice {
    pub slot: PciSlot,
    /// The doorbell port, which also carries the record when the region cannot be written.
    pub doorbell_port: Option<u16>,
}

impl SharedRegionDevice {
    /// `FIND`: returns the BAR2 address, or 0 with `LSTA` saying why there is none.
    fn find_method(sink: &mut dyn AmlSink) {
        let (local0, vdid, bar3) = (Local(0), Path::new("VDID"), Path::new("BAR3"));
        let not_ivshmem = Block(|s: &mut dyn AmlSink| fail(Status::NotIvshmem, &ZERO, s));
        let above_4g = Block(|s: &mut dyn AmlSink| fail(Status::BarAbove4Gib, &ZERO, s));
        let unassigned = Block(|s: &mut dyn AmlSink| fail(Status::BarUnassigned, &ZERO, s));
        Method::new(
            "FIND".into(),
            0,
            false,
            vec![
                &If::new(&NotEqual::new(&vdid, &abi::IVSHMEM_VENDOR_DEVICE), vec![&not_ivshmem]),
                &Store::new(&local0, &Path::new("BAR2")),
                // Bit 0 set: an I/O BAR, not ivshmem's memory BAR.
                &If::new(&And::new(&ZERO, &local0, &ONE), vec![&not_ivshmem]),
                // A 64-bit BAR (type bits 10b) whose upper half is set is out of 32-bit reach.
                &If::new(
                    &LAnd(&And::new(&ZERO, &local0, &0x04u8), &NotEqual::new(&bar3, &ZERO)),
                    vec![&above_4g],
                ),
                &And::new(&local0, &local0, &0xffff_fff0u32),
                &If::new(&Equal::new(&local0, &ZERO), vec![&unassigned]),
                &Return::new(&local0),
            ],
        )
        .to_aml_bytes(sink);
    }

    /// The port channel's objects: the port and token regions, `FWRD` (one little-endian
    /// word, SLIP-escaped byte by byte, added to the checksum) and `FRAM (source)` (the record
    /// as an [`abi::PortFrame`], then END).
    fn frame_methods(port: u16, sink: &mut dyn AmlSink) {
        let (arg0, local0) = (Arg(0), Local(0));
        let p = |n: &str| Path::new(n);
        for (name, value) in [("FCNT", 0), ("FCKA", 0), ("FCKB", 0)] {
            name_int(name, value).to_aml_bytes(sink);
        }
        let byte_field = |region: &str, field: &str, access, bits| {
            Field::new(
                region.into(),
                access,
                FieldLockRule::NoLock,
                FieldUpdateRule::Preserve,
                field_list(&[(field, 0, bits)]),
            )
        };
        OpRegion::new("FPRT".into(), OpRegionSpace::SystemIO, &port, &ONE).to_aml_bytes(sink);
        byte_field("FPRT", "FPRB", FieldAccessType::Byte, 8).to_aml_bytes(sink);
        OpRegion::new("FTOK".into(), OpRegionSpace::SystemIO, &abi::TOKEN_PORT, &4u8).to_aml_bytes(sink);
        byte_field("FTOK", "FTKN", FieldAccessType::DWord, 32).to_aml_bytes(sink);

        // FWRD (word): one little-endian word, each byte SLIP-escaped, in a loop rather than a
        // method call per byte (a call costs the interpreter far more than an iteration).
        let fwrd_body = Block(|s: &mut dyn AmlSink| {
            // Only the sums' low 32 bits are sent, and those are the same with 64-bit integers.
            let (a, b, fprb) = (p("FCKA"), p("FCKB"), p("FPRB"));
            let (local0, local1, local2) = (Local(0), Local(1), Local(2));
            Add::new(&a, &a, &arg0).to_aml_bytes(s);
            Add::new(&b, &b, &a).to_aml_bytes(s);
            Store::new(&local0, &arg0).to_aml_bytes(s);
            Store::new(&local1, &4u8).to_aml_bytes(s);
            let out = |v: u8, s: &mut dyn AmlSink| Store::new(&fprb, &v).to_aml_bytes(s);
            let end = Block(|s: &mut dyn AmlSink| {
                out(abi::SLIP_ESC, s);
                out(abi::SLIP_ESC_END, s);
            });
            let esc = Block(|s: &mut dyn AmlSink| {
                out(abi::SLIP_ESC, s);
                out(abi::SLIP_ESC_ESC, s);
            });
            let plain = Store::new(&fprb, &local2);
            let byte = And::new(&local2, &local0, &0xffu8);
            let is_end = Equal::new(&local2, &abi::SLIP_END);
            let is_esc = Equal::new(&local2, &abi::SLIP_ESC);
            let if_end = If::new(&is_end, vec![&end]);
            let if_esc = If::new(&is_esc, vec![&esc]);
            let else_plain = Else::new(vec![&plain]);
            let else_esc = Else::new(vec![&if_esc, &else_plain]);
            let shift = ShiftRight::new(&local0, &local0, &8u8);
            let count = Decrement(&local1);
            While::new(&local1, vec![&byte, &if_end, &else_esc, &shift, &count]).to_aml_bytes(s);
        });
        Method::new("FWRD".into(), 1, false, vec![&fwrd_body]).to_aml_bytes(sink);

        let word = |v: &dyn Aml| {
            let mut b = Vec::new();
            MethodCall::new("FWRD".into(), vec![v]).to_aml_bytes(&mut b);
            b
        };
        let words: Vec<Vec<u8>> = vec![
            word(&abi::FRAME_TAG),
            word(&p("FCNT")),
            word(&p("LSTA")),
            word(&arg0),
            word(&p("FTKN")),
            word(&Timer),
            word(&p("VDID")),
            word(&p("BAR2")),
            word(&p("BAR3")),
            word(&p("CNTG")),
            word(&p("CNTT")),
        ];
        let send_words = Block(|s: &mut dyn AmlSink| {
            for w in &words {
                s.vec(w);
            }
        });
        Method::new(
            "FRAM".into(),
            1,
            false,
            vec![
                &Increment(&p("FCNT")),
                &If::new(&Equal::new(&arg0, &Source::Ged.code()), vec![&Increment(&p("CNTG"))]),
                &Else::new(vec![&If::new(
                    &Equal::new(&arg0, &Source::Thermal.code()),
                    vec![&Increment(&p("CNTT"))],
                )]),
                &Store::new(&p("FCKA"), &ZERO),
                &Store::new(&p("FCKB"), &ZERO),
                &send_words,
                // The checksum goes out through a copy: FWRD adds its argument to the sums.
                &Store::new(&local0, &p("FCKB")),
                &MethodCall::new("FWRD".into(), vec![&local0]),
                &Store::new(&p("FPRB"), &abi::SLIP_END),
            ],
        )
        .to_aml_bytes(sink);
    }

    /// `WREC (source)`: one record, under the sequence rule. Serialized, so `_INI`, `_EVT`
    /// and `_TMP` never interleave their writes. With a port, a guard that fails sends the
    /// record as a frame (`FRAM`) before `WREC` returns its status.
    fn write_method(port: Option<u16>, sink: &mut dyn AmlSink) {
        let (arg0, local0, local1) = (Arg(0), Local(0), Local(1));
        let p = |n: &str| Path::new(n);
        let region_fields = field_list(&[
            ("MAGC", offsets::MAGIC, 32),
            ("ABIV", offsets::ABI_VERSION, 32),
            ("RQNO", offsets::REQUEST_NO, 32),
            ("RQNC", offsets::NONCE, 32),
            ("RSEQ", offsets::SEQ, 32),
            ("RSTA", offsets::STATUS, 32),
            ("RSRC", offsets::SOURCE, 32),
            ("ERQN", offsets::ECHO_REQUEST_NO, 32),
            ("ENON", offsets::ECHO_NONCE, 32),
            ("RTMR", offsets::TIMER, 32),
            ("RBAR", offsets::BAR, 32),
            ("RCNB", offsets::BOOT_COUNT, 32),
            ("RCNG", offsets::GED_COUNT, 32),
            ("RCNT", offsets::THERMAL_COUNT, 32),
        ]);
        let frame = Block(|s: &mut dyn AmlSink| {
            if port.is_some() {
                MethodCall::new("FRAM".into(), vec![&arg0]).to_aml_bytes(s);
            }
        });
        let bad_header = Block(|s: &mut dyn AmlSink| {
            Store::new(&Path::new("LSTA"), &Status::BadHeader.code()).to_aml_bytes(s);
            frame.to_aml_bytes(s);
            Return::new(&p("LSTA")).to_aml_bytes(s);
        });
        let stores: [(&str, &dyn Aml); 9] = [
            ("RSTA", &ZERO),
            ("RSRC", &arg0),
            ("ERQN", &p("RQNO")),
            ("ENON", &p("RQNC")),
            ("RTMR", &Timer),
            ("RBAR", &local0),
            ("RCNB", &p("CNTB")),
            ("RCNG", &p("CNTG")),
            ("RCNT", &p("CNTT")),
        ];
        let fill = Block(|s: &mut dyn AmlSink| {
            for (field, value) in &stores {
                Store::new(&p(field), *value).to_aml_bytes(s);
            }
        });
        Method::new(
            "WREC".into(),
            1,
            true,
            vec![
                &Store::new(&local0, &MethodCall::new("FIND".into(), vec![])),
                &If::new(&Equal::new(&local0, &ZERO), vec![&frame, &Return::new(&p("LSTA"))]),
                &OpRegion::new(
                    "SHMR".into(),
                    OpRegionSpace::SystemMemory,
                    &local0,
                    &(offsets::RECORD_END as u32),
                ),
                &Field::new(
                    "SHMR".into(),
                    FieldAccessType::DWord,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::Preserve,
                    region_fields,
                ),
                &If::new(
                    &LOr(
                        &NotEqual::new(&p("MAGC"), &abi::MAGIC),
                        &NotEqual::new(&p("ABIV"), &abi::ABI_VERSION),
                    ),
                    vec![&bad_header],
                ),
                // The first record of a boot, whatever its source, counts the boot.
                &If::new(&Equal::new(&p("CNTB"), &ZERO), vec![&Add::new(&p("CNTB"), &p("RCNB"), &ONE)]),
                &If::new(&Equal::new(&arg0, &Source::Ged.code()), vec![&Increment(&p("CNTG"))]),
                &Else::new(vec![&If::new(
                    &Equal::new(&arg0, &Source::Thermal.code()),
                    vec![&Increment(&p("CNTT"))],
                )]),
                // Odd while writing.
                &Or::new(&local1, &Add::new(&ZERO, &p("RSEQ"), &ONE), &ONE),
                &Store::new(&p("RSEQ"), &local1),
                &fill,
                // Even when complete; the host copies only between two equal even values.
                &Add::new(&p("RSEQ"), &local1, &ONE),
                &Store::new(&p("LSTA"), &ZERO),
                &Return::new(&ZERO),
            ],
        )
        .to_aml_bytes(sink);
    }
}

impl Aml for SharedRegionDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let pci_fields = field_list(&[("VDID", 0x00, 32), ("BAR2", 0x18, 32), ("BAR3", 0x1c, 32)]);
        Device::new(
            "AMSH".into(),
            vec![
                &name_int("_ADR", self.slot.adr()),
                &name_int("LSTA", Status::NotRun.code()),
                &name_int("CNTB", 0),
                &name_int("CNTG", 0),
                &name_int("CNTT", 0),
                &OpRegion::new("PCIC".into(), OpRegionSpace::PCIConfig, &ZERO, &0x20u8),
                &Field::new(
                    "PCIC".into(),
                    FieldAccessType::DWord,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::Preserve,
                    pci_fields,
                ),
                &Block(|s: &mut dyn AmlSink| {
                    if let Some(port) = self.doorbell_port {
                        Self::frame_methods(port, s);
                    }
                }),
                &Block(Self::find_method),
                &Block(|s: &mut dyn AmlSink| Self::write_method(self.doorbell_port, s)),
                &Method::new(
                    "_INI".into(),
                    0,
                    false,
                    vec![&MethodCall::new("WREC".into(), vec![&Source::Boot.code()])],
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// The Generic Event Device the host raises through pc-testdev.
pub struct EventDevice {
    pub irq: u8,
    /// The I/O port `_EVT` rings once its record is complete.
    pub doorbell_port: Option<u16>,
}

impl Aml for EventDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let port = TESTDEV_IRQ_PORT_BASE + u16::from(self.irq);
        let doorbell = Block(|s: &mut dyn AmlSink| {
            if let Some(port) = self.doorbell_port {
                OpRegion::new(DOORBELL_REGION.into(), OpRegionSpace::SystemIO, &port, &ONE).to_aml_bytes(s);
                Field::new(
                    DOORBELL_REGION.into(),
                    FieldAccessType::Byte,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::Preserve,
                    field_list(&[(DOORBELL_FIELD, 0, 8)]),
                )
                .to_aml_bytes(s);
            }
        });
        // After WREC returns, whatever it wrote: the host only takes the ring as "look now".
        let ring = Block(|s: &mut dyn AmlSink| {
            if self.doorbell_port.is_some() {
                Store::new(&Path::new(DOORBELL_FIELD), &abi::DOORBELL_BYTE).to_aml_bytes(s);
            }
        });
        Device::new(
            "AMGE".into(),
            vec![
                &Name::new("_HID".into(), &"ACPI0013"),
                &name_int("_UID", 0),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![&Interrupt::new(
                        true,
                        false,
                        false,
                        false,
                        u32::from(self.irq),
                    )]),
                ),
                &OpRegion::new("TDEV".into(), OpRegionSpace::SystemIO, &port, &ONE),
                &Field::new(
                    "TDEV".into(),
                    FieldAccessType::Byte,
                    FieldLockRule::NoLock,
                    FieldUpdateRule::Preserve,
                    field_list(&[("TIRQ", 0, 8)]),
                ),
                &doorbell,
                &Method::new(
                    "_EVT".into(),
                    1,
                    false,
                    vec![
                        // Level-triggered: drop the line first, or the IRQ fires again.
                        &Store::new(&Path::new("TIRQ"), &ZERO),
                        &MethodCall::new(paths::WRITE_RECORD.into(), vec![&Source::Ged.code()]),
                        &ring,
                    ],
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// The guest-driven fallback: Linux polls `_TMP` every `_TZP` tenths of a second.
pub struct ThermalPoll {
    pub period_ds: u16,
}

impl Aml for ThermalPoll {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        ThermalZone {
            path: "AMTZ".into(),
            children: vec![
                &Name::new("_TZP".into(), &self.period_ds),
                &Name::new("_CRT".into(), &THERMAL_CRT_DK),
                &Method::new(
                    "_TMP".into(),
                    0,
                    false,
                    vec![
                        &MethodCall::new(paths::WRITE_RECORD.into(), vec![&Source::Thermal.code()]),
                        &Return::new(&THERMAL_TMP_DK),
                    ],
                ),
            ],
        }
        .to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests;
