//! `acpimon-bench` as a user runs it: what it needs, and `latency --json` on the real test
//! guest (a short run: the figures' shape, not their values).

use std::path::PathBuf;
use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_acpimon-bench"))
        .args(args)
        .env_remove("ACPIMON_GUEST")
        .output()
        .expect("acpimon-bench runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The test guest's directory, as tools/bench finds it.
fn guest() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../qemu-fixtures/build-guest");
    let out =
        Command::new(&script).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed (run tools/setup):\n{}", script.display(), text(&out.stderr));
    PathBuf::from(text(&out.stdout).lines().last().expect("build-guest prints its directory").trim())
}

#[test]
fn latency_needs_a_guest_and_says_how_to_get_one() {
    let out = bench(&["latency"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("pass --guest DIR or set ACPIMON_GUEST"), "{err}");
    assert!(err.contains("qemu-fixtures/build-guest"), "{err}");
}

#[test]
fn latency_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest();
    let out = bench(&[
        "latency",
        "--guest",
        guest.to_str().unwrap(),
        "--count",
        "20",
        "--seconds",
        "0.5",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["machine"], "pc");
    assert_eq!(v["count"], 20);
    assert!(v["qemu"].as_str().is_some_and(|q| q.split('.').count() == 3), "{v}");
    assert_eq!(v["heartbeat"]["sent"], 20, "{v}");
    assert!(v["heartbeat"]["acked"].as_u64().unwrap() >= 18, "a healthy guest answers: {v}");
    let (p50, p99) = (v["heartbeat"]["p50_ms"].as_f64().unwrap(), v["heartbeat"]["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 < 1000.0, "{v}");
    assert!(v["bare"]["p50_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["heartbeats_per_sec"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn kernel_log_reports_json_beside_a_full_dump() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest();
    let out = bench(&[
        "kernel-log",
        "--guest",
        guest.to_str().unwrap(),
        "--memory",
        "256",
        "--reads",
        "1",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let g = &v["guests"][0];
    assert_eq!(g["ram_mib"], 256, "{v}");
    for read in ["live", "live_cached", "paused"] {
        assert!(g[read]["records"].as_u64().unwrap() > 100, "{read}: {v}");
        // The ring and its descriptors, not the guest's RAM.
        assert!(g[read]["bytes"].as_u64().unwrap() < 4 << 20, "{read}: {v}");
    }
    assert!(g["scan_bytes"].as_u64().unwrap() > 0, "{v}");
    let dumps = g["dumps"].as_array().unwrap();
    assert_eq!(dumps[0]["format"], "elf");
    assert!(dumps[0]["bytes"].as_u64().unwrap() >= 256 << 20, "{v}");
}

#[test]
fn guest_cost_reports_the_ged_threads_time_per_beat_beside_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest();
    let out = bench(&[
        "guest-cost",
        "--guest",
        guest.to_str().unwrap(),
        "--rates",
        "10",
        "--window",
        "2s",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let w = v["windows"].as_array().unwrap();
    assert_eq!((w[0]["rate_hz"].as_f64(), w[0]["beats"].as_u64()), (Some(0.0), Some(0)), "the baseline: {v}");
    assert_eq!(w[1]["rate_hz"], 10.0);
    assert!(w[1]["acked"].as_u64().unwrap() >= 15, "{v}");
    // The guest kernel accounted the GED thread's runs: some CPU per beat, less than a beat's period.
    let per_beat = w[1]["ged_us_per_beat"].as_f64().unwrap();
    assert!(0.0 < per_beat && per_beat < 100_000.0, "{v}");
    assert!(w[1]["ged_exec_max_us"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["kernel"].as_str().unwrap().contains('.'), "{v}");
}

#[test]
fn guest_cost_refuses_a_rate_it_cannot_keep() {
    let out = bench(&["guest-cost", "--guest", "/nonexistent", "--rates", "0"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--rates 0"), "{err}");
}

#[test]
fn soak_refuses_a_spacing_too_short_for_a_hang_and_its_recovery() {
    let out = bench(&["soak", "--guest", "/nonexistent", "--spacing", "2s"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--spacing 2s") && err.contains("at least 10s"), "{err}");
}

/// `store --json` on a small SQLite store: every page query ran and returned what the fill
/// put there (the figures' shape, not their values; the README's come from 100,000 events).
#[test]
fn store_times_every_page_query() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(&[
        "store",
        "--events",
        "3000",
        "--nodes",
        "3",
        "--vms-per-node",
        "4",
        "--rounds",
        "3",
        "--json",
        "--work",
        dir.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["backend"].as_str(), report["events"].as_u64(), report["vms"].as_u64()),
        (Some("sqlite"), Some(3000), Some(12))
    );
    let rows: std::collections::BTreeMap<String, u64> = report["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| (q["query"].as_str().unwrap().to_string(), q["rows"].as_u64().unwrap()))
        .collect();
    assert_eq!(rows.len(), 12, "{rows:?}");
    for page in [
        "page / (the fleet: query + HTML)",
        "page /vm/NODE/VM (6 h: query + chart + HTML)",
        "page /incident/KEY (query + HTML)",
    ] {
        assert_eq!(rows[page], 1, "{page} rendered once a round: {rows:?}");
    }
    assert_eq!(rows["fleet (every node and VM)"], 12);
    assert_eq!(rows["fleet, one node"], 4);
    assert_eq!(rows["an incident (transition, report, bundle)"], 3);
    assert_eq!(rows["one event by key"], 1);
    assert!(rows["latest 50 bundles"] > 0 && rows["a VM's latency, last 24 h"] > 0, "{rows:?}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "the scratch store is removed");
}
