//! `acpimon watch` on libvirt domains: the fixture guest defined through a real `libvirtd`
//! with the XML `acpimon prepare NAME --format libvirt` prints, merged into a plain domain.
//! libvirt owns its own QMP monitor; the service uses the second one (and the console) that the
//! fragment's `<qemu:commandline>` adds. Each domain is destroyed and undefined on drop.

mod common;

use std::time::Duration;

use acpimon::watch::state::State;
use common::libvirt::Domain;
use common::service::{is_transition, step_file, Service};

const BOOT: Duration = Duration::from_secs(120);
const CONFIG: &str = "[defaults]\nstartup_grace = \"90s\"\n";

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-libvirt-watch").tempdir_in("/tmp").unwrap()
}

/// Starts the service on `d` (created paused, so it has the console from the first line) and
/// lets libvirt resume the domain.
async fn watch(d: &Domain, work: &std::path::Path) -> Service {
    let svc = Service::start(d.state_dir(), work, CONFIG).await;
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(30)).await;
    d.virsh(&["resume"]);
    svc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_is_healthy_and_virsh_suspend_is_paused_then_unresponsive() {
    let work = work();
    let d = Domain::start_paused("healthy", 3);
    let log = d.qemu_log();
    assert!(
        log.contains("-no-shutdown") && log.contains("acpimon-qmp"),
        "libvirt's QEMU command line: {log}"
    );
    let svc = watch(&d, work.path()).await;
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    // The heartbeat answers before userspace starts: give the guest time to reach its shell.
    tokio::time::sleep(Duration::from_secs(5)).await;

    d.virsh(&["suspend"]);
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(10)).await;
    let (view, _) = svc.wait_state(&d.name, State::Unresponsive, Duration::from_secs(30)).await;
    assert!(
        view.reason.starts_with("the VM is paused (QMP STOP) and acpi-heartbeat missed 3 of 3"),
        "{}",
        view.reason
    );
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    assert_eq!(bundle.detail["manifest"]["trigger"]["kind"], "unresponsive");
    let tail = step_file(&bundle, "console-tail");
    assert!(tail.contains("Linux version") && tail.contains(common::guest::READY), "from boot on: {tail}");
    assert!(step_file(&bundle, "qmp-status").contains("paused"));
    // The host step reads libvirt's QEMU: its pid from libvirt's pid file, and its vCPU threads.
    let host: acpimon::host::HostReport = serde_json::from_str(&step_file(&bundle, "host")).unwrap();
    let pid: u32 =
        std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", d.name)).unwrap().trim().parse().unwrap();
    assert_eq!(host.qemu.as_ref().map(|q| q.pid), Some(pid), "{host:#?}");
    // The kernel's log from memory: its VMCOREINFO found by a scan, not by a one-page dump,
    // whose DUMP_COMPLETED libvirtd (9.0) crashes on; libvirtd is still there.
    let klog = common::service::step(&bundle.detail["manifest"], "kernel-log");
    assert_eq!(
        (klog["outcome"].as_str(), klog["summary"]["vmcoreinfo"].as_str()),
        (Some("ok"), Some("scan")),
        "{klog:#}"
    );
    assert!(step_file(&bundle, "kernel-log").contains("] Linux version "));

    d.virsh(&["resume"]);
    svc.wait_state(&d.name, State::Healthy, Duration::from_secs(40)).await;
    assert_eq!(d.state(), "running (unpaused)");

    // libvirt stops the domain: gone, not a failure.
    d.virsh(&["destroy"]);
    svc.wait_state(&d.name, State::Gone, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_libvirt_domain_is_reported_and_libvirt_keeps_the_guest() {
    let work = work();
    let d = Domain::start_paused("panic", 10);
    let svc = watch(&d, work.path()).await;
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    let t = svc.wait_event("panicked", Duration::from_secs(90), |e| is_transition(e, State::Panicked)).await;
    assert_panic_reason(&t.detail);
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    assert_eq!(bundle.detail["manifest"]["trigger"]["kind"], "panicked");
    let tail = step_file(&bundle, "console-tail");
    assert!(tail.contains("Kernel panic - not syncing: sysrq triggered crash"), "{tail}");
    // <on_crash>preserve</on_crash>: libvirt marks it crashed and leaves it for diagnostics.
    assert_eq!(d.state(), "crashed (panicked)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysrq_reaches_a_libvirt_guest_that_stops_answering() {
    let work = work();
    let d = Domain::start_paused("starve", 12);
    let svc = watch(&d, work.path()).await;
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    let (view, _) = svc.wait_state(&d.name, State::Unresponsive, Duration::from_secs(90)).await;
    assert!(view.reason.starts_with("acpi-heartbeat missed 3 of 3"), "{}", view.reason);
    let bundle = svc.wait_event("bundle", Duration::from_secs(90), |e| e.kind == "bundle").await;
    assert!(step_file(&bundle, "console-tail").contains("ACPIMON-GUEST: starving"));
    let sysrq = step_file(&bundle, "sysrq");
    assert!(sysrq.contains("sysrq: Show Blocked State"), "{sysrq}");
}

/// `[libvirt]`: QMP commands (the heartbeat's HMP, query-status) through libvirt's monitor
/// passthrough and QMP events as libvirt relays them. acpimon's own QMP socket is unlinked
/// first, so nothing can reach QEMU but through libvirt.
#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_libvirt_api_by_uuid_a_suspend_and_a_panic_are_seen() {
    let work = work();
    let d = Domain::start_paused("panic", 40);
    std::fs::remove_file(&d.prepared.descriptor.qmp).unwrap();
    let uuid = d.virsh(&["domuuid"]).trim().to_string();
    let config = format!("{CONFIG}[libvirt]\nuri = \"{}\"\ndomains = [\"{uuid}\"]\n", common::libvirt::uri());
    let svc = Service::start(d.state_dir(), work.path(), &config).await;
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(30)).await;
    d.virsh(&["resume"]);
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    d.virsh(&["suspend"]);
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(10)).await;
    let (view, _) = svc.wait_state(&d.name, State::Unresponsive, Duration::from_secs(30)).await;
    assert!(view.reason.starts_with("the VM is paused (QMP STOP)"), "{}", view.reason);
    d.virsh(&["resume"]);
    svc.wait_state(&d.name, State::Healthy, Duration::from_secs(40)).await;
    let t = svc.wait_event("panicked", BOOT, |e| is_transition(e, State::Panicked)).await;
    assert_panic_reason(&t.detail);
    d.virsh(&["destroy"]);
    svc.wait_state(&d.name, State::Gone, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_started_after_the_service_becomes_healthy() {
    let work = work();
    let d = Domain::define("healthy", 3);
    let svc = Service::start(d.state_dir(), work.path(), CONFIG).await;
    svc.wait_state(&d.name, State::Gone, Duration::from_secs(10)).await;
    d.virsh(&["start"]);
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
}

#[test]
fn the_fragment_merges_as_the_readme_says() {
    let dir = work();
    let state = dir.path().to_str().unwrap();
    let frag = common::acpimon(&["prepare", "x", "--state-dir", state, "--format", "libvirt"]);
    assert!(frag.status.success());
    let base = "<domain type='qemu'>\n  <features>\n    <acpi/>\n  </features>\n  <devices>\n  </devices>\n</domain>\n";
    let xml = common::libvirt::merge(base, &common::text(&frag.stdout));
    assert!(xml.contains("<acpi/>\n  \n    <vmcoreinfo state='on'/>\n  </features>"), "{xml}");
    assert_eq!(xml.matches("<features>").count(), 1, "{xml}");
    assert!(xml.starts_with("<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"));
    assert!(xml.contains("<panic model='isa'/>\n  </devices>"), "{xml}");
    assert!(xml.contains("</qemu:commandline>\n</domain>"), "{xml}");
}

/// `[libvirt]` naming the domain, for a domain prepared with `--console libvirt`.
#[cfg(feature = "libvirt")]
async fn watch_libvirt_console(d: &Domain, work: &std::path::Path) -> Service {
    let config =
        format!("{CONFIG}[libvirt]\nuri = \"{}\"\ndomains = [\"{}\"]\n", common::libvirt::uri(), d.name);
    let svc = Service::start(d.state_dir(), work, &config).await;
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(30)).await;
    d.virsh(&["resume"]);
    svc
}

/// libvirt's own pty serial console (the guest's ttyS0), read through libvirt's console
/// stream: acpimon adds no serial port, the console tail has the guest's output from boot, and
/// the console is re-exported on console-share.sock while libvirt refuses a second client.
#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirts_console_stream_is_the_console_from_boot() {
    use std::io::Read;
    let work = work();
    let d = Domain::start_paused_with_libvirt_console("healthy", 3);
    assert!(d.prepared.descriptor.console_libvirt);
    let log = d.qemu_log();
    assert!(log.contains("id=charserial0") && !log.contains("acpimon-console"), "{log}");
    // libvirt's chardev of the first <serial>: the one SysRq's chardev-send-break names.
    let chardevs = common::libvirt::virsh_ok(&["qemu-monitor-command", &d.name, "--hmp", "info chardev"]);
    assert!(chardevs.contains("charserial0: filename=pty:"), "{chardevs}");
    let svc = watch_libvirt_console(&d, work.path()).await;
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // acpimon holds libvirt's console: a second client (as `virsh console` would be) is
    // refused, and told to use the re-exported socket.
    let cfg = acpimon::watch::config::LibvirtConfig {
        uri: common::libvirt::uri().into(),
        domains: vec![d.name.clone()],
    };
    let second = acpimon::trigger::libvirt::console_vm(&cfg, &d.name, "charserial0", 4096).await;
    let why = second.expect("a libvirt domain").err().expect("libvirt serves one console client");
    assert!(why.contains("held by another client") && why.contains("console-share.sock"), "{why}");
    let share = d.prepared.dir.join(acpimon::launch::prepare::CONSOLE_SHARE);
    let mut client = std::os::unix::net::UnixStream::connect(&share).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();

    d.virsh(&["suspend"]);
    svc.wait_state(&d.name, State::Paused, Duration::from_secs(10)).await;
    svc.wait_state(&d.name, State::Unresponsive, Duration::from_secs(30)).await;
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    let tail = step_file(&bundle, "console-tail");
    assert!(tail.contains("Linux version") && tail.contains(common::guest::READY), "from boot on: {tail}");
    d.virsh(&["resume"]);
    svc.wait_state(&d.name, State::Healthy, Duration::from_secs(40)).await;
    // Input typed on the shared socket reaches the guest's shell through libvirt's stream, and
    // its output comes back.
    use std::io::Write;
    client.write_all(b"echo shared-$((6*7))\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("shared-42") {
        let n = client.read(&mut buf).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&seen)));
        assert!(n > 0, "the shared console closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    d.virsh(&["destroy"]);
    svc.wait_state(&d.name, State::Gone, Duration::from_secs(20)).await;
}

/// SysRq through libvirt: QMP `chardev-send-break` on libvirt's chardev (through the monitor
/// passthrough) and the key through libvirt's console stream; its output in the bundle.
#[cfg(feature = "libvirt")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysrq_reaches_a_starving_guest_through_libvirts_console() {
    let work = work();
    let d = Domain::start_paused_with_libvirt_console("starve", 12);
    let svc = watch_libvirt_console(&d, work.path()).await;
    svc.wait_state(&d.name, State::Healthy, BOOT).await;
    let (view, _) = svc.wait_state(&d.name, State::Unresponsive, Duration::from_secs(90)).await;
    assert!(view.reason.starts_with("acpi-heartbeat missed 3 of 3"), "{}", view.reason);
    let bundle = svc.wait_event("bundle", Duration::from_secs(90), |e| e.kind == "bundle").await;
    let tail = step_file(&bundle, "console-tail");
    assert!(tail.contains("Linux version") && tail.contains("ACPIMON-GUEST: starving"), "{tail}");
    let sysrq = step_file(&bundle, "sysrq");
    assert!(sysrq.contains("sysrq: Show Blocked State"), "{sysrq}");
    // The break went to libvirt's chardev, not as a telnet fallback on the stream.
    assert!(!sysrq.contains("QMP has no chardev"), "{sysrq}");
}

#[test]
fn prepare_console_libvirt_leaves_out_acpimons_serial_port() {
    let dir = work();
    let state = dir.path().to_str().unwrap();
    let out = common::acpimon(&[
        "prepare",
        "x",
        "--state-dir",
        state,
        "--format",
        "libvirt",
        "--console",
        "libvirt",
    ]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let xml = common::text(&out.stdout);
    assert!(!xml.contains("isa-serial") && !xml.contains("acpimon-console"), "{xml}");
    assert!(xml.contains("acpimon-qmp"), "{xml}");
    assert!(
        common::text(&out.stderr).contains("libvirt's chardev 'charserial0'"),
        "{}",
        common::text(&out.stderr)
    );
    let d = acpimon::launch::Descriptor::load(&dir.path().join("x")).unwrap();
    assert!(d.console_libvirt);
    assert_eq!(d.console_chardev.as_deref(), Some("charserial0"));
    assert_eq!(d.console_share, Some(dir.path().join("x").join(acpimon::launch::prepare::CONSOLE_SHARE)));

    let out = common::acpimon(&["prepare", "y", "--state-dir", state, "--console", "libvirt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(common::text(&out.stderr).contains("add --format libvirt"), "{}", common::text(&out.stderr));
    assert!(!dir.path().join("y").exists(), "nothing written on bad input");
}

/// The panicked transition names pvpanic and carries the kernel's own panic line (the
/// kernel-report sentinel read it on the console, which libvirt's stream carries).
fn assert_panic_reason(detail: &serde_json::Map<String, serde_json::Value>) {
    let reason = detail["reason"].as_str().unwrap();
    assert!(reason.starts_with("the guest kernel panicked (pvpanic GUEST_PANICKED)"), "{reason}");
    assert!(reason.contains("Kernel panic - not syncing: sysrq triggered crash"), "{reason}");
    assert_eq!(detail["kernel_report"]["class"], "panic", "{detail:?}");
}
