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
}
