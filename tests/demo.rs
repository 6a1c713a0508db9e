//! `acpimon demo --duration`: the README's main job, unattended, as a user runs it.

mod common;

use common::{acpimon, text};

#[test]
fn demo_for_20_s_acknowledges_every_trigger() {
    common::guest::fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = acpimon(&["demo", "--duration", "20", "--state-dir", dir.path().to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("guest booted: first record after"), "{stdout}");
    assert!(stdout.contains("channel: shared region through ivshmem BAR2"), "{stdout}");
    let summary = stdout.lines().find(|l| l.starts_with("summary: ")).expect("a summary line");
    let field = |name: &str| -> u64 {
        let rest = summary.split(&format!("{name} ")).nth(1).unwrap();
        rest.split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    assert!(field("sent") >= 15, "{summary}");
    assert_eq!(field("sent"), field("acknowledged"), "{summary}");
    assert_eq!(field("missed"), 0, "{summary}");
}
