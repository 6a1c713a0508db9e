//! The generated table executed by ACPICA's `acpiexec` (the interpreter Linux runs), against a
//! simulated ivshmem config space and region; the bytes it writes are decoded by the Rust
//! reader. One ABI, proven from both sides.

mod common;

use std::path::{Path, PathBuf};

use acpimon::abi::{Source, Status};
use acpimon::generate::{build, paths, SsdtConfig};
use acpimon::read::{decode, sim::SimulatedAml, Access, GuestRecord, Region};
use common::acpica::{disassemble, Machine};

const REGION: u32 = 4096;
const BAR_LOW: u32 = 0xfebf_f000;
/// 64-bit prefetchable memory BAR: type bits 0b1100.
const BAR_TYPE: u32 = 0x0c;
const IVSHMEM: u32 = 0x1110_1af4;

struct Case {
    _dir: tempfile::TempDir,
    machine: Machine,
    ssdt: PathBuf,
}

fn case(cfg: &SsdtConfig) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let machine = Machine::new(dir.path());
    let ssdt = dir.path().join("acpimon.aml");
    common::write(&ssdt, &build(cfg).unwrap());
    Case { _dir: dir, machine, ssdt }
}

fn thermal() -> SsdtConfig {
    SsdtConfig { thermal_period_ds: Some(10), ..SsdtConfig::default() }
}

fn cmd(s: &str) -> String {
    s.to_string()
}

fn pci(vendor_device: u32, bar2: u32, bar3: u32) -> String {
    format!("execute \\TPCI {vendor_device:#x} {bar2:#x} {bar3:#x}")
}

fn host(base: u32, request_no: u32, nonce: u32) -> String {
    format!("execute \\THST {base:#x} {REGION:#x} {request_no:#x} {nonce:#x}")
}

fn dump(base: u32) -> String {
    format!("execute \\TDMP {base:#x}")
}

fn run(m: &str) -> String {
    format!("execute {m}")
}

fn record(bytes: &[u8]) -> Option<GuestRecord> {
    let snap = decode(bytes, u64::from(REGION)).expect("the AML wrote a region the reader accepts");
    assert!(snap.anomalies.is_empty(), "{:?}", snap.anomalies);
    snap.record
}

#[test]
fn ini_evt_and_tmp_write_records_the_reader_decodes() {
    let c = case(&thermal());
    let evt = format!("{}._EVT 7", paths::EVENT_DEVICE);
    let r = c.machine.exec(
        &c.ssdt,
        &[
            pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0),
            host(BAR_LOW, 7, 0x1234),
            run(&format!("{}._INI", paths::SHARED_DEVICE)),
            dump(BAR_LOW),
            run(&evt),
            dump(BAR_LOW),
            host(BAR_LOW, 8, 0xfeed_f00d),
            run(&evt),
            run(&format!("{}._TMP", paths::THERMAL_ZONE)),
            dump(BAR_LOW),
            cmd("execute \\TSTA"),
        ],
    );
    assert_eq!(r.buffers.len(), 3, "{}", r.log);

    let boot = record(&r.buffers[0]).expect("_INI wrote a record");
    assert_eq!((boot.seq, boot.source, boot.status), (2, Source::Boot, Status::Ok));
    assert_eq!((boot.boot_count, boot.ged_count, boot.thermal_count), (1, 0, 0));
    assert_eq!((boot.echo_request_no, boot.echo_nonce), (7, 0x1234));
    assert!(!boot.answers(7, 0x1234), "a boot record answers no trigger");
    assert_eq!(boot.bar, BAR_LOW, "the BAR without its type bits");

    let ged = record(&r.buffers[1]).unwrap();
    assert_eq!((ged.seq, ged.source, ged.ged_count), (4, Source::Ged, 1));

    let last = record(&r.buffers[2]).unwrap();
    assert_eq!((last.seq, last.source), (8, Source::Thermal));
    assert_eq!((last.boot_count, last.ged_count, last.thermal_count), (1, 2, 1));
    assert_eq!((last.echo_request_no, last.echo_nonce), (8, 0xfeed_f00d));
    assert!(ged.answers(7, 0x1234));
    // _TMP returned 25.0 C (2982 dK), then TSTA: Ok.
    assert_eq!(r.integers, [2982, u64::from(Status::Ok.code())], "{}", r.log);
    // acpiexec's Timer is its host clock: it moves.
    assert_ne!(boot.timer_ticks, last.timer_ticks);
}

#[test]
fn a_bar_above_4gib_writes_nothing() {
    let c = case(&SsdtConfig::default());
    // BAR2 low half 0 with BAR3 = 0x80: 0x80_0000_0000. Truncated AML would write at 0.
    let r = c.machine.exec(
        &c.ssdt,
        &[
            pci(IVSHMEM, BAR_TYPE, 0x80),
            host(0, 1, 2),
            run(&format!("{}._INI", paths::SHARED_DEVICE)),
            run(&format!("{}._EVT 7", paths::EVENT_DEVICE)),
            dump(0),
            cmd("execute \\TSTA"),
        ],
    );
    assert_eq!(record(&r.buffers[0]), None, "nothing written at the truncated address");
    assert_eq!(r.buffers[0][0x80..], [0u8; 0x80], "record area untouched");
    assert_eq!(r.integers, [u64::from(Status::BarAbove4Gib.code())]);
}

#[test]
fn guards_report_why_nothing_was_written() {
    let c = case(&SsdtConfig::default());
    let ini = run(&format!("{}._INI", paths::SHARED_DEVICE));
    let cases = [
        // Another device at the slot.
        (pci(0x1000_8086, BAR_LOW | BAR_TYPE, 0), Status::NotIvshmem),
        // ivshmem ids but an I/O BAR.
        (pci(IVSHMEM, 0xc001, 0), Status::NotIvshmem),
        // BAR not assigned by firmware.
        (pci(IVSHMEM, BAR_TYPE, 0), Status::BarUnassigned),
    ];
    for (setup, status) in cases {
        let r = c
            .machine
            .exec(&c.ssdt, &[setup, host(BAR_LOW, 1, 2), ini.clone(), dump(BAR_LOW), cmd("execute \\TSTA")]);
        assert_eq!(record(&r.buffers[0]), None, "{status:?}");
        assert_eq!(r.integers, [u64::from(status.code())]);
    }
    // A region without our header (host never initialised it): nothing written.
    let r = c
        .machine
        .exec(&c.ssdt, &[pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0), ini, dump(BAR_LOW), cmd("execute \\TSTA")]);
    assert_eq!(r.buffers[0], vec![0u8; 0x100]);
    assert_eq!(r.integers, [u64::from(Status::BadHeader.code())]);
}

#[test]
fn a_new_boot_counts_on_and_recovers_an_interrupted_record() {
    // The region saw 41 boots; the last record was interrupted mid-write (odd seq 9).
    let c = case(&SsdtConfig { irq: 5, ..SsdtConfig::default() });
    let r = c.machine.exec(
        &c.ssdt,
        &[
            pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0),
            host(BAR_LOW, 1, 1),
            format!("execute \\TOLD {BAR_LOW:#x} 9 41"),
            // No _INI: the first record of this boot comes from the GED, on IRQ 5's port.
            run(&format!("{}._EVT 5", paths::EVENT_DEVICE)),
            dump(BAR_LOW),
        ],
    );
    let rec = record(&r.buffers[0]).unwrap();
    assert_eq!((rec.source, rec.boot_count, rec.ged_count), (Source::Ged, 42, 1));
    assert_eq!(rec.seq, 12, "odd 9 -> writing 11 -> complete 12");
}

/// With the doorbell (the default table), `_EVT` writes the doorbell byte to port 0x403 once
/// the record is complete: the I/O access comes after the write of the even sequence number.
#[test]
fn the_doorbell_rings_after_the_record_is_complete() {
    let c = case(&SsdtConfig::default());
    let evt = run(&format!("{}._EVT 7", paths::EVENT_DEVICE));
    let setup = [pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0), host(BAR_LOW, 3, 0xabcd), cmd("execute \\TDBC")];
    let mut commands = setup.to_vec();
    commands.extend([cmd("execute \\TDBL"), evt.clone(), dump(BAR_LOW), cmd("execute \\TDBL")]);
    let r = c.machine.exec_with(&["-vr"], &c.ssdt, &commands);
    assert_eq!(r.integers, [0, u64::from(acpimon::abi::DOORBELL_BYTE)], "{}", r.log);
    let rec = record(&r.buffers[0]).expect("_EVT wrote a record");
    assert!(rec.answers(3, 0xabcd));
    // acpiexec -vr logs every access in order; the last of _EVT is the doorbell's (SystemIO,
    // space 1), and the write before it completes the record (the even seq at 0x80).
    let evt_log =
        r.log.split(&format!("Evaluating {}._EVT", paths::EVENT_DEVICE)).nth(1).expect("_EVT's log");
    let evt_log = evt_log.split("Evaluating").next().unwrap();
    let accesses: Vec<&str> = evt_log.lines().filter(|l| l.starts_with("AcpiExec:")).collect();
    let last = accesses.len() - 1;
    assert!(accesses[last].contains("SpaceId 01"), "{accesses:#?}");
    let seq_write = format!("SystemMemory Write: Val {:08X} Addr {:08X}", rec.seq, BAR_LOW + 0x80);
    assert!(rec.seq % 2 == 0 && accesses[last - 1].contains(&seq_write), "{accesses:#?}");

    // Without a doorbell port nothing is written there.
    let c = case(&SsdtConfig { doorbell_port: None, ..SsdtConfig::default() });
    let mut commands = setup.to_vec();
    commands.extend([evt, cmd("execute \\TDBL")]);
    let r = c.machine.exec(&c.ssdt, &commands);
    assert_eq!(r.integers, [0], "{}", r.log);
}

/// The simulated guest used by benchmarks writes the same record as the real AML.
#[test]
fn the_simulated_aml_matches_acpica() {
    let c = case(&SsdtConfig::default());
    let r = c.machine.exec(
        &c.ssdt,
        &[
            pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0),
            host(BAR_LOW, 3, 0xabcd),
            run(&format!("{}._INI", paths::SHARED_DEVICE)),
            run(&format!("{}._EVT 7", paths::EVENT_DEVICE)),
            dump(BAR_LOW),
        ],
    );
    let acpica = &r.buffers[0];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let region = Region::create(&path, REGION).unwrap();
    region.write_request(3, 0xabcd).unwrap();
    let mut guest = SimulatedAml::boot(BAR_LOW);
    guest.write_record(&region, Source::Boot, 0);
    let timer = u32::from_le_bytes(acpica[0x94..0x98].try_into().unwrap());
    guest.write_record(&region, Source::Ged, timer);
    drop(region);
    let sim = std::fs::read(&path).unwrap();
    assert_eq!(&sim[..0x100], &acpica[..], "simulated and ACPICA-executed regions differ");
    let _ = Region::open(&path, Access::ReadOnly).unwrap().snapshot().unwrap();
}

#[test]
fn generated_tables_disassemble_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for (i, cfg) in [
        SsdtConfig::default(),
        thermal(),
        SsdtConfig { irq: 15, slot: "1f.7".parse().unwrap(), region_size: 1 << 20, ..thermal() },
    ]
    .iter()
    .enumerate()
    {
        let aml = dir.path().join(format!("t{i}.aml"));
        common::write(&aml, &build(cfg).unwrap());
        let asl = disassemble(Path::new(&aml));
        assert!(asl.contains("Device (AMSH)") && asl.contains("\"ACPI0013\""), "{asl}");
        assert_eq!(asl.contains("ThermalZone (AMTZ)"), cfg.thermal_period_ds.is_some());
    }
}

/// The bytes the AML wrote to I/O `port`, in order, from acpiexec's field-I/O trace (`-x
/// 0x1800`: each write's merged value, then the region access naming the port).
fn port_writes(log: &str, port: u16) -> Vec<u8> {
    let at = format!("[WRITE] Region [SystemIO:1], Width 1, ByteBase 0, Offset 0 at {:016X}", port);
    let mut value = None;
    let mut out = Vec::new();
    for line in log.lines() {
        if let Some(v) = line.split("MergedValue ").nth(1) {
            value = u64::from_str_radix(v.trim(), 16).ok();
        } else if line.contains(&at) {
            out.push(value.take().expect("a value before each write") as u8);
        }
    }
    out
}

/// The port channel: with BAR2 above 4 GiB (and the other guards failing), `_EVT` sends the
/// record as a SLIP frame on the doorbell port, escaped, with the host's nonce read from
/// pc-testdev's register, and the host's decoder accepts it; a region record sends none.
#[test]
fn an_unreachable_region_sends_the_record_as_a_frame() {
    use acpimon::abi::{PortFrame, DOORBELL_BYTE, SLIP_END, SLIP_ESC};
    use acpimon::read::frame::{FrameDecoder, FrameEvent};
    let c = case(&SsdtConfig::default());
    let port = acpimon::generate::DEFAULT_DOORBELL_PORT;
    let evt = run(&format!("{}._EVT 7", paths::EVENT_DEVICE));
    let frames_of = |setup: String, token: u32| {
        let r = c.machine.exec_with(
            &["-x", "0x1800"],
            &c.ssdt,
            &[setup, host(BAR_LOW, 5, token), format!("execute \\TTOK {token:#x}"), evt.clone(), evt.clone()],
        );
        let bytes = port_writes(&r.log, port);
        let mut d = FrameDecoder::new();
        let mut events: Vec<FrameEvent> = bytes.iter().filter_map(|b| d.push(*b)).collect();
        // acpiexec runs _INI at load, before the harness sets up config space: the boot
        // record, framed (nothing at the slot yet).
        match events.first() {
            Some(FrameEvent::Frame(f)) if f.source.get() == Source::Boot.code() => {
                assert_eq!(Status::from_code(f.status.get()), Status::NotIvshmem);
                let boot = bytes.iter().position(|b| *b == SLIP_END).unwrap();
                events.remove(0);
                (bytes[boot + 1..].to_vec(), events)
            }
            _ => panic!("the boot record comes first, framed: {events:?}"),
        }
    };
    // A token whose bytes are END and ESC: both escaped on the wire.
    let token = 0x11c0_db22;
    let (bytes, events) = frames_of(pci(IVSHMEM, BAR_TYPE, 0x80), token);
    assert!(bytes.windows(3).any(|w| w == [0x22, SLIP_ESC, 0xdd]), "ESC escaped: {bytes:02x?}");
    assert!(bytes.windows(2).any(|w| w == [SLIP_ESC, 0xdc]), "END escaped: {bytes:02x?}");
    // Each _EVT: its frame, then the plain ring (an empty frame).
    let frames: Vec<PortFrame> = events
        .iter()
        .filter_map(|e| match e {
            FrameEvent::Frame(f) => Some(*f),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!((events[1], events[3]), (FrameEvent::Ring, FrameEvent::Ring));
    assert_eq!(frames.len(), 2, "{events:?}");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.frame_no.get(), i as u32 + 2, "the boot record was frame 1");
        assert_eq!(Status::from_code(f.status.get()), Status::BarAbove4Gib);
        assert_eq!(Source::from_code(f.source.get()), Source::Ged);
        assert_eq!((f.token.get(), f.ged_count.get()), (token, i as u32 + 1));
        assert_eq!((f.vendor_device.get(), f.bar2.get(), f.bar3.get()), (IVSHMEM, BAR_TYPE, 0x80));
        let rec = acpimon::read::frame::frame_record(f, 5);
        assert!(rec.answers(5, token));
    }
    assert_eq!(bytes.last(), Some(&DOORBELL_BYTE));
    assert_eq!(bytes.iter().filter(|b| **b == SLIP_END).count(), 4);

    // The other guards fall back too, each frame saying why.
    for (setup, status) in [
        (pci(0x1000_8086, BAR_LOW | BAR_TYPE, 0), Status::NotIvshmem),
        (pci(IVSHMEM, BAR_TYPE, 0), Status::BarUnassigned),
    ] {
        let (_, events) = frames_of(setup, 7);
        let FrameEvent::Frame(f) = events[0] else { panic!("{status:?}: {events:?}") };
        assert_eq!(Status::from_code(f.status.get()), status);
    }

    // A reachable region: the record goes there, and the port gets only the rings.
    let (bytes, _) = frames_of(pci(IVSHMEM, BAR_LOW | BAR_TYPE, 0), 9);
    assert_eq!(bytes, [DOORBELL_BYTE, DOORBELL_BYTE]);
}
