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

use common::guest::{manifest_value, Fault, FaultKind, Guest, GuestSpec};

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
    g.wait_console("acpimon_faults: soft-locking CPU 1", mark, Duration::from_secs(30)).await;
    let seen = g.wait_console("watchdog: BUG: soft lockup - CPU#1 stuck for ", mark, REPORT_TIMEOUT).await;
    assert!(seen.contains("acpimon_soft_lockup"), "the report names the spinning function:\n{seen}");
    assert!(seen.contains("rcu_preempt self-detected stall on CPU"), "RCU reported first:\n{seen}");
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
    g.wait_console("acpimon_faults: hard-locking CPU 1 (interrupts off)", mark, Duration::from_secs(30))
        .await;
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
    let seen = g.wait_console("INFO: task acpimon-hung:", mark, Duration::from_secs(120)).await;
    let seen = if seen.contains("blocked for more than 10 seconds") {
        seen
    } else {
        g.wait_console("blocked for more than 10 seconds", mark, Duration::from_secs(30)).await
    };
    assert!(seen.contains("acpimon_faults: task acpimon-hung:"), "the module's own line:\n{seen}");
    // The guest is otherwise fine: the heartbeat answers.
    let mut hb = g.heartbeat();
    g.beats_acked(&mut hb, 3).await;
}

#[tokio::test]
async fn oom_kills_the_hog_and_the_guest_lives_on() {
    let (g, mark) = boot_with(FaultKind::Oom, None).await;
    g.wait_console("tail invoked oom-killer", mark, Duration::from_secs(120)).await;
    g.wait_console("Out of memory: Killed process", mark, Duration::from_secs(30)).await;
    let seen = g.wait_console("(tail)", mark, Duration::from_secs(30)).await;
    assert!(seen.contains("oom_score_adj:1000"), "the hog was the victim:\n{seen}");
    let mut hb = g.heartbeat();
    g.beats_acked(&mut hb, 3).await;
}

#[tokio::test]
async fn panic_prints_the_kernels_panic_line() {
    let (g, mark) = boot_with(FaultKind::Panic, None).await;
    let seen = g
        .wait_console("Kernel panic - not syncing: sysrq triggered crash", mark, Duration::from_secs(60))
        .await;
    assert!(seen.contains("sysrq: Trigger a crash"), "SysRq c's line first:\n{seen}");
}
