//! The guest's own console in an EVE-style launch: q35, `-nodefaults -no-shutdown -S`, the
//! machine and a mux console socket (`cons`, serial port and readline monitor) in a
//! `-readconfig` file. acpimon finds `cons` there, reads it and re-exports it; another client
//! (this test's thread) stays on the re-export the whole time and must see everything too.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acpimon::launch::prepare::CONSOLE_SHARE;
use acpimon::watch::state::State;
use common::guest::{eve_console_socket, Edk2, Firmware, Guest, GuestSpec};
use common::service::{step_file, Service};

const BOOT: Duration = Duration::from_secs(120);

/// Another client of the guest's console: a thread that reads it into a buffer until it closes.
struct Client {
    seen: Arc<Mutex<Vec<u8>>>,
    stream: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut read, buf) = (stream.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = read.read(&mut chunk) {
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Client { seen, stream }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    async fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            assert!(start.elapsed() < timeout, "'{needle}' not in the other client's stream:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eve_mux_console_is_read_shared_and_answers_sysrq_while_another_client_stays_on_it() {
    let spec = GuestSpec {
        watched: true,
        eve_console: true,
        scenario: "starve",
        delay: 30,
        extra: vec!["-S".into()],
        ..GuestSpec::new("q35")
    };
    eve_launch_watched(spec).await;
}

/// EVE's whole launch: q35, `-nodefaults -no-shutdown -S`, the machine, OVMF's pflash drives
/// (trixie's edk2 2025.02) and the mux console in the launcher's `-readconfig` file, acpimon's
/// additions in a second one; the service attaches first, then the VM is resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eves_whole_launch_with_ovmf_is_healthy_and_a_hang_gives_the_console_from_boot() {
    let spec = GuestSpec {
        watched: true,
        eve_console: true,
        eve_config: true,
        readconfig: true,
        firmware: Firmware::Pflash(Edk2::Trixie),
        scenario: "starve",
        delay: 30,
        ..GuestSpec::new("q35")
    };
    eve_launch_watched(spec).await;
}

/// The same with Debian bookworm's OVMF (edk2 2022.11), which needs the CPU's phys-bits changed
/// beside the knob (`-cpu qemu64,phys-bits=37`, as the channel report advises).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eves_whole_launch_with_bookworms_ovmf_is_healthy_and_a_hang_gives_the_console_from_boot() {
    let spec = GuestSpec {
        watched: true,
        eve_console: true,
        eve_config: true,
        readconfig: true,
        firmware: Firmware::Pflash(Edk2::Bookworm),
        extra: vec!["-cpu".into(), "qemu64,phys-bits=37".into()],
        scenario: "starve",
        delay: 30,
        ..GuestSpec::new("q35")
    };
    eve_launch_watched(spec).await;
}

/// Boots `spec` (created paused) under the watch service with another client on the console's
/// re-export, resumes it, and follows it to healthy, then to unresponsive when its kernel
/// starves: the bundle and the other client both have the console from boot and SysRq's output.
async fn eve_launch_watched(spec: GuestSpec) {
    let work = tempfile::Builder::new().prefix("acpimon-console").tempdir_in("/tmp").unwrap();
    let g = Guest::boot(spec).await;
    let dir = g.vm.prepared.dir.clone();
    let d = acpimon::launch::Descriptor::load(&dir).unwrap();
    assert_eq!(d.console_chardev.as_deref(), Some("cons"), "vm.json records the launcher's console");
    assert_eq!(d.console, eve_console_socket(dir.parent().unwrap()));
    let config = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "console"
command = "echo console-$((6*7))"
expect = "console-42"
interval = "2s"
timeout = "3s"
threshold = 2
"#;
    let svc = Service::start(dir.parent().unwrap(), work.path(), config).await;
    svc.wait_state("guest", State::Paused, Duration::from_secs(30)).await;
    // The service holds QEMU's socket now; the other client takes the re-export before the
    // guest runs, so both see the console from boot.
    let mut other = Client::connect(&dir.join(CONSOLE_SHARE));
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();

    svc.wait_state("guest", State::Healthy, BOOT).await;
    let text = other.wait_for("ACPIMON-GUEST: ready", Duration::from_secs(30)).await;
    assert!(text.contains("Linux version"), "the other client has the console from boot:\n{text}");
    // The console scenario runs on the real console: its command and answer pass by the other
    // client too, which can also type.
    other.wait_for("console-42", Duration::from_secs(30)).await;
    other.stream.write_all(b"echo other-$((5*5))\n").unwrap();
    other.wait_for("other-25", Duration::from_secs(30)).await;

    // The guest's kernel starves: unresponsive, and the bundle has its console from boot and
    // SysRq's answers, which the other client sees as well.
    let (view, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(90)).await;
    assert!(view.reason.contains("acpi-heartbeat missed"), "{}", view.reason);
    let bundle = svc.wait_event("bundle", Duration::from_secs(90), |e| e.kind == "bundle").await;
    let tail = step_file(&bundle, "console-tail");
    assert!(
        tail.contains("Linux version")
            && tail.contains("ACPIMON-GUEST: ready")
            && tail.contains("ACPIMON-GUEST: starving"),
        "the bundle has the guest's real console from boot:\n{tail}"
    );
    let sysrq = step_file(&bundle, "sysrq");
    assert!(sysrq.contains("sysrq: Show Memory"), "{sysrq}");
    assert!(sysrq.contains("sysrq: Show Blocked State"), "{sysrq}");
    assert!(!sysrq.contains("telnet"), "the break went through QMP on chardev 'cons': {sysrq}");
    let text = other.wait_for("sysrq: Show Memory", Duration::from_secs(10)).await;
    assert!(text.contains("sysrq: Show Blocked State"), "{text}");
}

/// A guest that writes its console as fast as QEMU lets it (`acpimon.scenario=flood`): the
/// service reads it in large chunks (a bounded number of reads a second), keeps what the budget
/// allows and counts the rest, the re-export and the ring (the bundle's console tail) still have
/// recent output with the drop marked, and the VM's heartbeat keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_guests_console_is_budgeted_and_its_heartbeat_still_answers() {
    let work = tempfile::Builder::new().prefix("acpimon-console").tempdir_in("/tmp").unwrap();
    let spec = GuestSpec {
        watched: true,
        eve_console: true,
        scenario: "flood",
        delay: 2,
        extra: vec!["-S".into(), "-no-shutdown".into()],
        ..GuestSpec::new("q35")
    };
    let g = Guest::boot(spec).await;
    let dir = g.vm.prepared.dir.clone();
    // A small budget, so that even a guest slowed by a loaded host floods past it.
    let config = "console_rate = \"4KiB\"\nconsole_burst = \"16KiB\"\n[defaults]\nstartup_grace = \"90s\"\n";
    let svc = Service::start(dir.parent().unwrap(), work.path(), config).await;
    svc.wait_state("guest", State::Paused, Duration::from_secs(30)).await;
    let other = Client::connect(&dir.join(CONSOLE_SHARE));
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Healthy, BOOT).await;
    other.wait_for("ACPIMON-GUEST: flooding the console now", Duration::from_secs(60)).await;

    // The budget runs out within seconds of the flood.
    let start = Instant::now();
    let first = loop {
        let v = svc.vm("guest").await.expect("the VM in /status");
        match v.console {
            Some(c) if c.dropped > 0 => break (c, Instant::now()),
            _ => {}
        }
        assert!(start.elapsed() < Duration::from_secs(60), "nothing dropped after 60 s of flood: {v:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let hb = |v: &acpimon::watch::metrics::VmView| {
        let s = v.scenarios.iter().find(|s| s.kind == "acpi-heartbeat").expect("heartbeat");
        (s.answers_total, s.misses_total)
    };
    let before = hb(&svc.vm("guest").await.unwrap());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let v = svc.vm("guest").await.unwrap();
    let (c, secs) = (v.console.expect("console counts"), first.1.elapsed().as_secs_f64());
    let after = hb(&v);
    assert_eq!(v.state, State::Healthy, "{v:#?}");
    assert!(after.0 >= before.0 + 5, "the heartbeat answers under the flood: {before:?} -> {after:?}");
    assert_eq!(after.1, before.1, "no heartbeat missed under the flood");
    let received = (c.received - first.0.received) as f64 / secs;
    let kept = (c.kept - first.0.kept) as f64 / secs;
    let reads = (c.reads - first.0.reads) as f64 / secs;
    assert!(received > 6e3, "the guest floods: {received:.0} B/s ({c:?})");
    assert!(kept < 5e3, "at most the budget's rate (4 KiB/s) and a line is kept: {kept:.0} B/s ({c:?})");
    assert!(reads < 60.0, "read in large chunks, about one read per 20 ms at most: {reads:.1}/s ({c:?})");
    assert_eq!(c.received, c.kept + c.dropped, "{c:?}");
    let metrics = metrics(&svc).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("acpimon_console_bytes_total{vm=\"guest\",what=\"dropped\"} ")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    let text = other.text();
    let marker =
        text.rfind("bytes of console output dropped (over the console budget)]").expect("the drop is marked");
    assert!(text[marker..].contains("ACPIMON-FLOOD"), "the re-export has recent output after the drop");

    // The ring has recent output too: the bundle of a hang (the VM stopped) shows it.
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    let bundle = svc.wait_event("bundle", Duration::from_secs(90), |e| e.kind == "bundle").await;
    let tail = step_file(&bundle, "console-tail");
    let marker =
        tail.rfind("bytes of console output dropped (over the console budget)]").expect("the drop is marked");
    // (The stop may come just after a drop: what was kept since may be the start of one line.)
    assert!(
        tail[marker..].contains("]\nACPIMON-"),
        "the ring has output kept after the last drop:\n{}",
        &tail[marker..]
    );
}

/// The service's `/metrics` text (with the response's head).
async fn metrics(svc: &Service) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(svc.addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `acpimon run`'s path (`launch::Vm`, no service): the console found in the launcher's
/// `-readconfig` file is the handle's console, re-exported, and SysRq breaks on `cons`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_own_launch_reads_the_mux_console_and_sysrq_reaches_it() {
    use acpimon::diagnose::{self, Step, StepSpec, Target, Trigger};
    let g = Guest::boot(GuestSpec { eve_console: true, ..GuestSpec::new("q35") }).await;
    assert!(g.vm.notes.iter().any(|n| n.contains("chardev 'cons'")), "{:?}", g.vm.notes);
    let console = g.vm.console().expect("console connected");
    assert_eq!(console.chardev(), Some("cons"));
    assert!(console.tail().contains("Linux version"), "the launcher's console from boot");
    let other = Client::connect(&g.vm.prepared.dir.join(CONSOLE_SHARE));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let target = Target {
        vm: "guest",
        qmp: Some(&g.vm.qmp),
        console: Some(console),
        gdb_socket: g.vm.prepared.dir.join("gdb.sock"),
        guest_agent: None,
        host: Default::default(),
        kernel_log: None,
    };
    let trigger = Trigger {
        kind: "test".into(),
        time: acpimon::units::now_rfc3339(),
        reason: "test".into(),
        evidence: serde_json::json!({}),
    };
    // The step's default chardev: the console's own, `cons`.
    let step: Step = toml::from_str("step = \"sysrq\"\nkeys = \"m\"").unwrap();
    assert!(matches!(step.spec, StepSpec::Sysrq { .. }));
    let bundle = tempfile::tempdir().unwrap();
    let m = diagnose::collect(&[step], &target, &trigger, Vec::new(), bundle.path()).await.unwrap();
    let s = m.step("sysrq").unwrap();
    let summary = s.summary.as_ref().unwrap();
    assert_eq!(summary["break"], "qmp", "{summary}");
    let text = std::fs::read_to_string(bundle.path().join(s.file.as_ref().unwrap())).unwrap();
    assert!(text.contains("sysrq: Show Memory"), "{text}");
    other.wait_for("sysrq: Show Memory", Duration::from_secs(10)).await;
}
