//! `acpimon demo --duration`: the README's main job, unattended, as a user runs it.

mod common;

use common::{acpimon, text};

#[test]
fn the_demo_catches_a_hang_delivers_every_event_and_recovers() {
    let guest = common::guest::fixture().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = acpimon(&["demo", "--guest", guest, "--duration", "40", "--hang-at", "3", "--state-dir", d]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", text(&out.stderr));
    let order = [
        "demo: starting -> healthy: acpi-heartbeat answers",
        "demo: healthy -> paused: QEMU stopped the VM's vCPUs (QMP STOP)",
        "demo: paused -> unresponsive: the VM is paused (QMP STOP) and acpi-heartbeat missed 3 of 3",
        "demo: bundle written: ",
        "demo: unresponsive -> recovered: acpi-heartbeat answers",
        "demo: recovered -> healthy",
    ];
    let mut at = 0;
    for line in order {
        let found =
            stdout[at..].find(line).unwrap_or_else(|| panic!("{line:?} missing or out of order:\n{stdout}"));
        at += found + line.len();
    }
    let summary = stdout.lines().find(|l| l.starts_with("summary: events delivered")).expect("a summary");
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(numbers[0] >= 8, "{summary}");
    assert_eq!(numbers[0], numbers[1], "every event stored by the controller: {summary}");
    assert_eq!(numbers[2], 0, "nothing pending: {summary}");

    // The heartbeat's counts and the percentiles of the latencies the service measured.
    let hb = stdout
        .lines()
        .find_map(|l| l.strip_prefix("summary: demo acpi-heartbeat: "))
        .unwrap_or_else(|| panic!("no heartbeat summary:\n{stdout}"));
    let number = |after: &str| -> f64 {
        let at = hb.find(after).unwrap_or_else(|| panic!("{after:?} missing: {hb}")) + after.len();
        hb[at..].split(|c: char| !(c.is_ascii_digit() || c == '.')).next().unwrap().parse().unwrap()
    };
    let answered = hb.split(' ').next().unwrap().parse::<f64>().unwrap();
    let (missed, p50, p99, measured) =
        (number("answered, "), number("latency p50 "), number("ms, p99 "), number("ms ("));
    assert!(answered >= 10.0, "a healthy guest answers every second: {hb}");
    assert!(missed >= 3.0, "the hang missed at least the threshold's 3: {hb}");
    assert!(0.0 < p50 && p50 <= p99 && p99 < 1000.0, "latencies within the 1 s timeout: {hb}");
    assert!(measured >= answered * 0.8 && measured <= answered + 1.0, "most answers measured: {hb}");
}
