//! Human-readable and JSON renderings of what was read, shared by every command that prints.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::judge::{ticks_to_duration, Observation};
use crate::read::Snapshot;
use crate::run::{RunEvent, Summary};
use crate::trigger::Beat;

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

/// One line of `acpimon run`'s live view.
pub fn run_event_line(ev: &RunEvent) -> String {
    match ev {
        RunEvent::Beat { beat: Beat::Acked { request_no, latency, record }, observation } => {
            let uptime = match observation.guest_uptime {
                Some(u) => format!("{:.1} s", u.as_secs_f64()),
                None => "?".into(),
            };
            let mut line = format!(
                "beat #{request_no:<5} ok {:>7.2} ms  seq {:<6} source {:<8} boot {} uptime {uptime}",
                latency.as_secs_f64() * 1e3,
                record.seq,
                format!("{:?}", record.source).to_lowercase(),
                record.boot_count,
            );
            if let Some(r) = &observation.reboot {
                write!(line, "  REBOOT ({r:?})").unwrap();
            }
            line
        }
        RunEvent::Beat { beat: Beat::Missed { request_no, waited, last }, .. } => format!(
            "beat #{request_no:<5} MISSED after {:.0} ms (last record seq {})",
            waited.as_secs_f64() * 1e3,
            last.map(|r| r.seq.to_string()).unwrap_or_else(|| "none".into())
        ),
        RunEvent::Booted { after, record } => format!(
            "guest booted: first record after {:.2} s (source {:?}, boot {}, BAR {:#010x}); heartbeats start",
            after.as_secs_f64(),
            record.source,
            record.boot_count,
            record.bar
        ),
        RunEvent::Channel { channel } => format!("channel: {channel}"),
        RunEvent::Qmp { name } => format!("qmp event {name}"),
        RunEvent::Error { message } => format!("error: {message}"),
    }
}

/// The closing line of `run --duration` and `demo`.
pub fn summary_line(s: &Summary) -> String {
    format!(
        "summary: sent {} acknowledged {} missed {} errors {} (and {} during start-up); latency p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms",
        s.sent, s.acked, s.missed, s.errors, s.startup, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
    )
}
