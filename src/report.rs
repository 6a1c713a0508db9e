//! Human-readable and JSON renderings of what was read, shared by every command that prints.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::judge::{ticks_to_duration, Observation};
use crate::read::Snapshot;

/// A snapshot with where it came from, as `acpimon snapshot --json` prints it.
#[derive(Serialize)]
pub struct SnapshotReport<'a> {
    pub region: &'a Path,
    #[serde(flatten)]
    pub snapshot: &'a Snapshot,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observation: Option<&'a Observation>,
}

/// The human table of a snapshot.
pub fn snapshot_table(region: &Path, snap: &Snapshot, obs: Option<&Observation>) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| writeln!(out, "{k:<12} {v}").unwrap();
    row("region", format!("{} ({} bytes, ABI {})", region.display(), snap.region_size, snap.abi_version));
    let req = &snap.request;
    row("request", format!("#{} nonce {:#010x}", req.request_no, req.nonce));
    match &snap.record {
        None => row(
            "record",
            "none yet: the guest's AML has not written (not booted, or it cannot reach the region)".into(),
        ),
        Some(r) => {
            row(
                "record",
                format!("#{} (seq {}) from {:?}, status {:?}", r.seq / 2, r.seq, r.source, r.status),
            );
            let answered = if r.answers(req.request_no, req.nonce) {
                "answers the current request"
            } else {
                "not yet answered"
            };
            row("echo", format!("#{} nonce {:#010x}: {answered}", r.echo_request_no, r.echo_nonce));
            let timer = ticks_to_duration(u64::from(r.timer_ticks)).as_secs_f64();
            let uptime = match obs.and_then(|o| o.guest_uptime) {
                Some(u) => format!("uptime {:.3} s", u.as_secs_f64()),
                None => "uptime unknown past 429.5 s wraps".into(),
            };
            row("guest timer", format!("{timer:.4} s mod 429.4967 s ({uptime})"));
            row("bar", format!("{:#010x}", r.bar));
            row(
                "counters",
                format!("boot {}  ged {}  thermal {}", r.boot_count, r.ged_count, r.thermal_count),
            );
        }
    }
    let mut notes: Vec<String> = snap.anomalies.iter().map(|a| format!("{a:?}")).collect();
    if let Some(o) = obs {
        notes.extend(o.reboot.iter().map(|r| format!("reboot: {r:?}")));
        notes.extend(o.anomalies.iter().map(|a| format!("{a:?}")));
    }
    row("anomalies", if notes.is_empty() { "none".into() } else { notes.join("; ") });
    out
}
