//! The shipped systemd unit (dist/acpimon-watch.service) stays hardened: systemd's own
//! security review scores it 4.0 or lower, and the settings the README promises are there.

mod common;

use std::process::Command;

use common::{repo, require, run, text};

/// The exposure `systemd-analyze security --offline=true` gives the unit (0 safe … 10 unsafe).
fn exposure(unit: &std::path::Path) -> f64 {
    require("systemd-analyze");
    let out = run(Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(unit));
    let report = text(&out.stdout) + &text(&out.stderr);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no overall exposure in systemd-analyze's report:\n{report}"));
    let score = line.rsplit(": ").next().and_then(|s| s.split_whitespace().next());
    score.and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("cannot read the score in {line:?}"))
}

#[test]
fn the_unit_scores_4_or_lower_in_systemd_analyze_security() {
    let unit = repo().join("dist/acpimon-watch.service");
    let score = exposure(&unit);
    assert!(score <= 4.0, "systemd-analyze security scores {} {score} (> 4.0)", unit.display());

    let text = std::fs::read_to_string(&unit).unwrap();
    for setting in ["UMask=0077", "Wants=network-online.target", "After=network-online.target", "Type=notify"]
    {
        assert!(text.lines().any(|l| l.trim() == setting), "{} lacks {setting}", unit.display());
    }
}

/// The review itself can fail: the unit without its sandbox scores UNSAFE.
#[test]
fn an_unsandboxed_unit_scores_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("acpimon-watch.service");
    std::fs::write(&unit, "[Service]\nType=notify\nExecStart=/usr/local/bin/acpimon watch\n").unwrap();
    let score = exposure(&unit);
    assert!(score > 4.0, "an unsandboxed unit scored {score}");
}
