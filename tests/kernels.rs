//! The kernels people run: each of Debian's kernels of the matrix (5.10 bullseye, 6.1 bookworm,
//! 6.12 trixie; generic, cloud and rt flavours), built by `qemu-fixtures/build-guest --kernel`,
//! boots once under acpimon's launch and goes through the guest side of acpimon in that one
//! boot: the boot record, heartbeats, the app channel's responder, then a kernel panic reported
//! by pvpanic with its text on the console. Generic flavours run on `pc`, the others on `q35`,
//! with SeaBIOS (the PVH vmlinux); two cloud kernels also under OVMF (the bzImage).
//!
//! Where a kernel differs, the test asserts the difference: 5.10 has no pvpanic-pci or
//! pvpanic-mmio module (acpimon adds the ISA pvpanic, which its plain pvpanic module drives),
//! 6.12 builds virtio_pci and virtio_console in.

mod common;

use std::time::{Duration, Instant};

use acpimon::app::{AppChannel, AppStatus};
use acpimon::launch::Extras;
use acpimon::trigger::Beat;
use common::guest::{manifest_value, Firmware, Guest, GuestSpec};
use tokio::sync::mpsc;

/// Seconds from the ready marker to the panic: room for the checks before it (they end under
/// 1 s after the marker here; the test fails, saying so, if they have not ended by then).
const PANIC_DELAY: u32 = 8;

struct Kernel {
    /// `build-guest --kernel` spec.
    spec: &'static str,
    machine: &'static str,
    /// OVMF boots the bzImage (with bookworm's OVMF, as tests/qemu.rs does: the phys-bits its
    /// 2022.11 build needs to honour acpimon's low-BAR knob).
    firmware: Firmware,
}

impl Kernel {
    /// What `uname -r` starts with, and /init's module line (what it loaded, and what the
    /// kernel has built in), by the spec's suite.
    fn expected(&self) -> (&'static str, &'static str) {
        match self.spec.split('-').next().unwrap() {
            "bullseye" => ("5.10.", MODULES_5_10),
            "bookworm" => ("6.1.", MODULES_6_1),
            "trixie" => ("6.12.", MODULES_6_12),
            other => panic!("no expectations for {other}'s kernels: add them to Kernel::expected"),
        }
    }
}

const MODULES_5_10: &str =
    "modules loaded: pvpanic virtio_pci virtio_console virtio_blk qemu_fw_cfg failed: none builtin: thermal";
const MODULES_6_1: &str =
    "modules loaded: pvpanic pvpanic-mmio pvpanic-pci virtio_pci virtio_console virtio_blk qemu_fw_cfg \
                           failed: none builtin: thermal";
const MODULES_6_12: &str =
    "modules loaded: pvpanic pvpanic-mmio pvpanic-pci virtio_blk qemu_fw_cfg failed: none builtin: virtio_pci virtio_console thermal";

/// Boots `k` with the app responder and the panic scenario, and checks everything in that boot.
async fn boot_beat_answer_and_panic(k: Kernel) {
    let (want_release, want_modules) = k.expected();
    let start = Instant::now();
    let extra = match k.firmware {
        Firmware::SeaBios | Firmware::Pflash(_) => Vec::new(),
        // Bookworm's OVMF (edk2 2022.11) needs the phys-bits change beside the low-BAR knob.
        Firmware::Ovmf => vec!["-cpu".into(), "qemu64,phys-bits=37".into()],
    };
    let g = Guest::boot(GuestSpec {
        kernel: Some(k.spec),
        firmware: k.firmware,
        extra,
        scenario: "panic",
        delay: PANIC_DELAY,
        extras: Extras { app_channel: true, guest_agent: false },
        append: vec!["acpimon.app=responder".into()],
        ..GuestSpec::new(k.machine)
    })
    .await;
    let booted = start.elapsed();
    let mut events = g.vm.qmp.events();

    // The kernel is the one asked for, with its own modules.
    let release = manifest_value(g.fixture, "kernel_release");
    assert!(release.starts_with(want_release), "{}: the fixture holds {release}", k.spec);
    let boot = g.wait_console("ACPIMON-GUEST: boot ", 0, Duration::from_secs(1)).await;
    assert!(boot.contains(&format!("kernel={release}")), "{}: booted another kernel:\n{boot}", k.spec);
    let console = g.wait_console("ACPIMON-GUEST: ready", 0, Duration::from_secs(1)).await;
    assert!(console.contains(want_modules), "{}: want '{want_modules}' on the console:\n{console}", k.spec);
    assert!(console.contains("acpi pvpanic (QEMU0001): QEMU0001:00"), "{}:\n{console}", k.spec);
    assert!(console.contains("acpi ged (ACPI0013): ACPI0013:00"), "{}:\n{console}", k.spec);
    assert!(!console.contains("ACPI Error"), "{}: an ACPI error on the console:\n{console}", k.spec);

    // The boot record, then heartbeats, each one GED event.
    let record = g.record().expect("_INI wrote the boot record");
    assert!(record.boot_count >= 1 && record.bar != 0, "{}: {record:?}", k.spec);
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    let before = g.record().unwrap();
    let lat = g.beats_acked(&mut hb, 10).await;
    assert_eq!(g.record().unwrap().ged_count - before.ged_count, 10, "{}: one GED event per beat", k.spec);

    // The app channel: the responder acks a challenge and answers a health request with an audit.
    g.wait_console("ACPIMON-GUEST: app responder started", 0, Duration::from_secs(30)).await;
    let (reports, _reports_rx) = mpsc::channel(16);
    let app = AppChannel::connect(g.vm.prepared.descriptor.app.as_ref().unwrap(), reports).await.unwrap();
    let challenge = app.challenge(Duration::from_secs(5)).await;
    let acked = challenge.unwrap_or_else(|e| panic!("{}: the responder did not ack: {e}", k.spec));
    let health = app.health(Some("uptime"), Duration::from_secs(5)).await.unwrap();
    assert_eq!(health.status, AppStatus::Ok, "{}: {health:?}", k.spec);
    let audit = health.audit.expect("the uptime audit's result");
    assert_eq!((audit.name.as_str(), audit.exit), ("uptime", Some(0)), "{}: {audit:?}", k.spec);
    assert!(audit.output.trim().split(' ').count() == 2, "{}: /proc/uptime: {audit:?}", k.spec);

    let checked = start.elapsed();
    let console = g.vm.console().unwrap().since(0);
    assert!(
        !console.contains("ACPIMON-GUEST: panicking"),
        "{}: the guest panicked before the checks ended ({checked:?} after launch): raise PANIC_DELAY",
        k.spec
    );

    // The panic: QEMU's GUEST_PANICKED (pvpanic), the kernel's text on the console, no more beats.
    let limit = Duration::from_secs(u64::from(PANIC_DELAY) + 30);
    let ev = common::guest::next_qmp_event(&mut events, "GUEST_PANICKED", limit).await;
    assert_eq!(ev.raw["event"], "GUEST_PANICKED", "{}: {:?}", k.spec, ev.raw);
    let tail = g.wait_console("---[ end Kernel panic", 0, Duration::from_secs(30)).await;
    assert!(tail.contains("Kernel panic - not syncing: sysrq triggered crash"), "{}:\n{tail}", k.spec);
    assert!(matches!(hb.beat(&g.vm.qmp, Duration::from_secs(1)).await.unwrap(), Beat::Missed { .. }));
    eprintln!(
        "{}: {release} on {} {:?}: ready after {booted:?}, checks done after {checked:?}, heartbeat max {:?}, \
         app ack {acked:?}, total {:?}",
        k.spec,
        k.machine,
        k.firmware,
        lat.iter().max().unwrap(),
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bullseye_5_10() {
    boot_beat_answer_and_panic(Kernel { spec: "bullseye", machine: "pc", firmware: Firmware::SeaBios }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bullseye_5_10_cloud() {
    boot_beat_answer_and_panic(Kernel {
        spec: "bullseye-cloud",
        machine: "q35",
        firmware: Firmware::SeaBios,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bookworm_6_1() {
    boot_beat_answer_and_panic(Kernel { spec: "bookworm", machine: "pc", firmware: Firmware::SeaBios }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bookworm_6_1_cloud() {
    boot_beat_answer_and_panic(Kernel {
        spec: "bookworm-cloud",
        machine: "q35",
        firmware: Firmware::SeaBios,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bookworm_6_1_rt() {
    boot_beat_answer_and_panic(Kernel { spec: "bookworm-rt", machine: "q35", firmware: Firmware::SeaBios })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trixie_6_12() {
    boot_beat_answer_and_panic(Kernel { spec: "trixie", machine: "pc", firmware: Firmware::SeaBios }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trixie_6_12_cloud() {
    boot_beat_answer_and_panic(Kernel { spec: "trixie-cloud", machine: "q35", firmware: Firmware::SeaBios })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bullseye_5_10_cloud_ovmf() {
    boot_beat_answer_and_panic(Kernel { spec: "bullseye-cloud", machine: "q35", firmware: Firmware::Ovmf })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trixie_6_12_cloud_ovmf() {
    boot_beat_answer_and_panic(Kernel { spec: "trixie-cloud", machine: "q35", firmware: Firmware::Ovmf })
        .await;
}
