//! The fixture's faults really happen: each 2-vCPU guest gets one fault from /init
//! (`acpimon.fault=`, qemu-fixtures/faults/faults.c for the lockups and the hung task) and the
//! test waits for the guest kernel's own report of it on the console. These are the faults the
//! kernel-report sentinel and the verdicts are tested with; their real output is kept in
//! tests/data/kernel-reports (see its README for the timings).
//!
//! Under TCG there is no perf NMI watchdog (no PMU), so a hard lockup is reported by RCU's
//! stall detector from the other CPU (with an NMI backtrace of the locked one), not as
//! `hard LOCKUP`; the test asserts that this is why.

mod common;

use std::time::Duration;

use acpimon::watch::state::State;
use common::guest::{manifest_value, Fault, FaultKind, Guest, GuestSpec};
use common::service::watch_guest;

/// Long enough for the slowest report (a soft lockup: the watchdog's threshold is 2 x
/// watchdog_thresh = 20 s of the guest's clock, seen here after about 48 s under TCG) on a
/// loaded host.
const REPORT_TIMEOUT: Duration = Duration::from_secs(240);

/// Boots a 2-vCPU guest of `kernel` (None: the default) with `kind` on CPU 1; returns it and
/// the console mark of the fault's marker.
async fn boot_with(kind: FaultKind, kernel: Option<&'static str>) -> (Guest, u64) {
    let g = Guest::boot(GuestSpec { smp: 2, kernel, fault: Some(Fault::new(kind)), ..GuestSpec::new("q35") })
        .await;
    let module = manifest_value(g.fixture, "faults_module");
    assert!(
        module.starts_with('/'),
        "the fixture {} has no fault module ({module}): see qemu-fixtures/build-guest's output",
        g.fixture.display()
    );
    let console = g.vm.console().expect("console connected");
    let mark = console.position();
    g.wait_console(&format!("{}{} cpu=1 now", Fault::MARKER, kind.word()), 0, Duration::from_secs(60)).await;
    (g, mark)
}

/// A soft lockup of CPU 1 (kernel `kernel`): RCU's self-detected stall, then the watchdog's
/// report naming the CPU and the module's function; the heartbeat (served by CPU 0) still
/// answers, which is why acpimon needs the kernel's own words for this case.
async fn soft_lockup(kernel: Option<&'static str>) {
    let (g, mark) = boot_with(FaultKind::SoftLockup, kernel).await;
    // (The module's own line is not waited for: under load the 8250 console driver gives up
    // waiting for the UART now and then and characters are lost; the reports repeat.)
    let seen = g.wait_console("watchdog: BUG: soft lockup - CPU#1 stuck for ", mark, REPORT_TIMEOUT).await;
    assert!(seen.contains("acpimon_soft_lockup"), "the report names the spinning function:\n{seen}");
    // rcu_preempt, or rcu_sched on 5.10 (its Debian kernel is not preemptible)
    assert!(seen.contains("self-detected stall on CPU"), "RCU reported first:\n{seen}");
    let mut hb = g.heartbeat();
    g.beats_acked(&mut hb, 3).await;
}

#[tokio::test]
async fn soft_lockup_on_cpu_1_is_reported_while_the_heartbeat_answers() {
    soft_lockup(None).await;
}

#[tokio::test]
async fn soft_lockup_on_5_10() {
    soft_lockup(Some("bullseye")).await;
}

#[tokio::test]
async fn soft_lockup_on_6_12() {
    soft_lockup(Some("trixie")).await;
}

#[tokio::test]
async fn hard_lockup_on_cpu_1_is_reported_as_an_rcu_stall_with_its_backtrace() {
    let (g, mark) = boot_with(FaultKind::HardLockup, None).await;
    let seen =
        g.wait_console("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks", mark, REPORT_TIMEOUT).await;
    // CPU 0 detects it and has CPU 1 print its backtrace by NMI (which interrupts-off spinning
    // does not block).
    let seen = if seen.contains("acpimon_hard_lockup") {
        seen
    } else {
        g.wait_console("acpimon_hard_lockup", mark, Duration::from_secs(30)).await
    };
    assert!(seen.contains("NMI backtrace for cpu 1"), "CPU 1's backtrace by NMI:\n{seen}");
    // No hard LOCKUP report: TCG has no perf counters for the NMI watchdog, as the boot said.
    let all = g.vm.console().unwrap().tail();
    assert!(
        all.contains("hard LOCKUP") || all.contains("NMI watchdog: Perf NMI watchdog permanently disabled"),
        "neither a hard LOCKUP report nor the NMI watchdog's absence on the console"
    );
}

#[tokio::test]
async fn hung_task_is_reported() {
    let (g, mark) = boot_with(FaultKind::Hung, None).await;
    g.wait_console("INFO: task acpimon-hung:", mark, Duration::from_secs(120)).await;
    g.wait_console("blocked for more than 10 seconds", mark, Duration::from_secs(30)).await;
    let seen = g.wait_console("acpimon_hung_task", mark, Duration::from_secs(30)).await;
    assert!(seen.contains("state:D"), "the task's state in the report:\n{seen}");
    // The guest is otherwise fine: the heartbeat answers.
    let mut hb = g.heartbeat();
    g.beats_acked(&mut hb, 3).await;
}

#[tokio::test]
async fn oom_kills_the_hog_and_the_guest_lives_on() {
    let (g, mark) = boot_with(FaultKind::Oom, None).await;
    // The hog invoked it, and was killed (the kill line names it; under load the console may
    // lose the end of that long line, so only its start is asked for).
    g.wait_console("tail invoked oom-killer", mark, Duration::from_secs(120)).await;
    g.wait_console("oom_score_adj=1000", mark, Duration::from_secs(30)).await;
    g.wait_console("Out of memory: Killed process", mark, Duration::from_secs(30)).await;
    g.wait_console(" (tail)", mark, Duration::from_secs(30)).await;
    let mut hb = g.heartbeat();
    g.beats_acked(&mut hb, 3).await;
}

#[tokio::test]
async fn panic_prints_the_kernels_panic_line() {
    let (g, mark) = boot_with(FaultKind::Panic, None).await;
    g.wait_console("Kernel panic - not syncing: sysrq triggered crash", mark, Duration::from_secs(60)).await;
    let seen = g.wait_console("sysrq_handle_crash", mark, Duration::from_secs(30)).await;
    assert!(seen.contains("Call Trace:"), "the panic's trace:\n{seen}");
}

// --- per-vCPU liveness: the vcpu-progress scenario (src/watch/vcpus.rs) ---------------------

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-faults").tempdir_in("/tmp").unwrap()
}

/// A watched 2-vCPU guest (created paused, left to the service), with `fault` and `append`.
async fn watched(fault: Option<Fault>, append: &[&str]) -> Guest {
    Guest::boot(GuestSpec {
        watched: true,
        smp: 2,
        fault,
        append: append.iter().map(|s| s.to_string()).collect(),
        extra: vec!["-S".into(), "-no-shutdown".into()],
        ..GuestSpec::new("q35")
    })
    .await
}

const VCPU_CONFIG: &str = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "vcpu-progress"
"#;

/// CPU 1 hard-locked, CPU 0 (which takes the heartbeat's interrupt) fine: the heartbeat keeps
/// answering, the vcpu-progress scenario names the vCPU within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_progress_finds_the_hard_locked_cpu_the_heartbeat_does_not() {
    let work = work();
    let g = watched(Some(Fault { kind: FaultKind::HardLockup, cpu: 1, delay: 15 }), &[]).await;
    let svc = watch_guest(&g, work.path(), VCPU_CONFIG).await;
    let (_, to_healthy) = svc.wait_state("guest", State::Healthy, Duration::from_secs(120)).await;
    let (view, took) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(120)).await;
    eprintln!("healthy after {to_healthy:?}, then unresponsive after {took:?}: {}", view.reason);
    assert!(
        view.reason.contains("vCPU 1 has run kernel code with interrupts disabled in "),
        "{}",
        view.reason
    );
    assert!(view.reason.contains("a hard lockup"), "{}", view.reason);
}

/// No false alarm on a guest whose CPUs are busy: one spinning in userspace per CPU, or one
/// `dd if=/dev/zero of=/dev/null bs=1M` per CPU (mostly in the kernel, interrupts on).
async fn no_miss_under(load: &str) {
    let work = work();
    let g = watched(None, &[&format!("acpimon.load={load}")]).await;
    let svc = watch_guest(&g, work.path(), VCPU_CONFIG).await;
    svc.wait_state("guest", State::Healthy, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(45)).await;
    let v = svc.vm("guest").await.unwrap();
    let s = v.scenarios.iter().find(|s| s.kind == "vcpu-progress").unwrap();
    assert!(s.answers_total >= 30, "{s:?}");
    assert_eq!(s.misses_total, 0, "{s:?}");
    assert_eq!(v.state, State::Healthy, "{}", v.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_progress_does_not_miss_on_a_userspace_busy_guest() {
    no_miss_under("user").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_progress_does_not_miss_on_a_kernel_busy_guest() {
    no_miss_under("kernel").await;
}

/// What sampling costs: the time of one sample of 2 vCPUs, and the heartbeat's latency without
/// and with a sampler running at once (1 Hz, and back to back). Figures go to stderr (README
/// "Per-vCPU liveness"); the assertions are loose bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_sampling_costs_little_heartbeat_latency() {
    let g = Guest::boot(GuestSpec { smp: 2, ..GuestSpec::new("q35") }).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(60)).await;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() * 9 / 10])
    };
    let alone = median(g.beats_acked(&mut hb, 40).await);
    let qmp = g.vm.qmp.clone();
    let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut with = Vec::new();
    for pause in [Duration::from_secs(1), Duration::ZERO] {
        let (qmp, times) = (qmp.clone(), times.clone());
        let sampler = tokio::spawn(async move {
            loop {
                let start = std::time::Instant::now();
                let s = acpimon::watch::vcpus::sample(&qmp, Duration::from_secs(2)).await.unwrap();
                assert_eq!(s.len(), 2, "{s:?}");
                times.lock().unwrap().push(start.elapsed());
                tokio::time::sleep(pause).await;
            }
        });
        with.push(median(g.beats_acked(&mut hb, 40).await));
        sampler.abort();
    }
    let sample = median(times.lock().unwrap().clone());
    eprintln!(
        "one sample (median, p90): {sample:?}; heartbeat latency (median, p90) alone {alone:?}, with 1 Hz sampling {:?}, with back-to-back sampling {:?}",
        with[0], with[1]
    );
    assert!(sample.0 < Duration::from_millis(200), "a sample takes {sample:?}");
}
