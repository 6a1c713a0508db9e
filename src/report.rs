//! Human-readable and JSON renderings of what was read, shared by every command that prints,
//! and the printers of `acpimon snapshot` (with its live view) and `acpimon status`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::judge::{ticks_to_duration, Observation, Tracker};
use crate::read::{Region, Snapshot};
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

/// How a value is written for people: its serde name (`ged`, `degraded`), or its JSON when it
/// has fields; never Rust's `Debug` form.
fn shown<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
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
                format!(
                    "#{} (seq {}) from {}, status {}",
                    r.seq / 2,
                    r.seq,
                    shown(&r.source),
                    shown(&r.status)
                ),
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
    let mut notes: Vec<String> = snap.anomalies.iter().map(shown).collect();
    if let Some(o) = obs {
        notes.extend(o.reboot.iter().map(|r| format!("reboot: {}", shown(r))));
        notes.extend(o.anomalies.iter().map(shown));
    }
    row("anomalies", if notes.is_empty() { "none".into() } else { notes.join("; ") });
    out
}

/// One line of `acpimon run`'s live view.
pub fn run_event_line(ev: &RunEvent) -> String {
    match ev {
        RunEvent::Beat { beat: Beat::Acked { request_no, latency, record, .. }, observation } => {
            let uptime = match observation.guest_uptime {
                Some(u) => format!("{:.1} s", u.as_secs_f64()),
                None => "?".into(),
            };
            let mut line = format!(
                "beat #{request_no:<5} ok {:>7.2} ms  seq {:<6} source {:<8} boot {} uptime {uptime}",
                latency.as_secs_f64() * 1e3,
                record.seq,
                shown(&record.source),
                record.boot_count,
            );
            if let Some(r) = &observation.reboot {
                write!(line, "  REBOOT ({})", shown(r)).unwrap();
            }
            line
        }
        RunEvent::Beat { beat: Beat::Missed { request_no, waited, last }, .. } => format!(
            "beat #{request_no:<5} MISSED after {:.0} ms (last record seq {})",
            waited.as_secs_f64() * 1e3,
            last.map(|r| r.seq.to_string()).unwrap_or_else(|| "none".into())
        ),
        RunEvent::Booted { after, record } => format!(
            "guest booted: first record after {:.2} s (source {}, boot {}, BAR {:#010x}); heartbeats start",
            after.as_secs_f64(),
            shown(&record.source),
            record.boot_count,
            record.bar
        ),
        RunEvent::Channel { channel } => format!("channel: {channel}"),
        RunEvent::Qmp { name } => format!("qmp event {name}"),
        RunEvent::Error { message } => format!("error: {message}"),
        RunEvent::Notice { message } => format!("acpimon: {message}"),
    }
}

/// The closing line of `run --duration` and `demo`.
pub fn summary_line(s: &Summary) -> String {
    format!(
        "summary: sent {} acknowledged {} missed {} errors {} (and {} during start-up); latency p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms",
        s.sent, s.acked, s.missed, s.errors, s.startup, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
    )
}

/// `acpimon watch --check --json`: what a configuration resolves to, with the file's key names
/// and every default filled in.
pub fn config_json(c: &crate::watch::Config) -> serde_json::Value {
    use crate::units::format_duration as d;
    let mut v = serde_json::json!({
        "state_dir": c.state_dir,
        "data_dir": c.data_dir,
        "node": c.node,
        "discover_interval": d(c.discover_interval),
        "console_keep": c.console_keep,
        "console_rate": c.console_budget.rate,
        "console_burst": c.console_budget.burst,
        "event_log": c.event_log,
        "event_hold_max": c.event_hold.max_bytes,
        "event_hold_max_events": c.event_hold.max_events,
        "touch_file": c.touch_file,
        "metrics": c.metrics,
        "controller": c.controller.as_ref().map(|k| serde_json::json!({
            "url": k.url,
            "timeout": d(k.timeout),
            "spool_max": k.spool_max_bytes,
            "spool_max_events": k.spool_max_events,
            "backoff_min": d(k.backoff_min),
            "backoff_max": d(k.backoff_max),
        })),
        "hook": c.hook.as_ref().map(|h| serde_json::json!({ "argv": h.argv, "timeout": d(h.timeout) })),
        "bundles": {
            "keep_per_vm": c.bundles_keep,
            "max_bytes_per_vm": c.bundles_budget.per_vm,
            "max_bytes": c.bundles_budget.total,
            "concurrent": c.bundles_concurrent,
        },
        "defaults": c.defaults,
        "vm": c.vms,
    });
    if let Some(l) = &c.libvirt {
        v["libvirt"] = serde_json::json!({ "uri": l.uri, "domains": l.domains });
    }
    v
}

/// `acpimon watch --check`: what a configuration resolves to.
pub fn config_summary(c: &crate::watch::Config) -> String {
    use crate::units::format_duration as d;
    let mut o = String::new();
    let _ = writeln!(o, "state_dir   {}", c.state_dir.display());
    let _ = writeln!(o, "data_dir    {}", c.data_dir.display());
    let _ = writeln!(o, "node        {}", c.node);
    let _ =
        writeln!(o, "event log   {}", c.event_log.as_ref().map_or("off".into(), |p| p.display().to_string()));
    let _ = writeln!(o, "metrics     {}", c.metrics.map_or("off".into(), |a| format!("http://{a}/metrics")));
    let _ = writeln!(o, "controller  {}", c.controller.as_ref().map_or("none", |c| c.url.as_str()));
    let _ = writeln!(o, "hook        {}", c.hook.as_ref().map_or("none".into(), |h| h.argv.join(" ")));
    if let Some(l) = &c.libvirt {
        let which = if l.domains.is_empty() { "every VM".into() } else { l.domains.join(", ") };
        let _ = writeln!(o, "libvirt     {} (QMP through libvirt for {which})", l.uri);
    }
    let vms = std::iter::once(("(defaults)", &c.defaults)).chain(c.vms.iter().map(|(n, s)| (n.as_str(), s)));
    for (name, s) in vms {
        let _ = writeln!(
            o,
            "{name}: {}grace {}, pauses {}, recovery {} (at most {}/h), kernel log {} every {}",
            if s.enabled { "" } else { "DISABLED, " },
            d(s.startup_grace),
            s.pause,
            s.recovery.action.name(),
            s.recovery.max_per_hour,
            s.kernel_log_follow.name(),
            d(s.kernel_log_every)
        );
        for sc in &s.scenarios {
            let _ = writeln!(
                o,
                "  scenario {:<16} {:<14} every {:<6} timeout {:<6} threshold {}",
                sc.name,
                sc.probe.kind(),
                d(sc.interval),
                d(sc.timeout),
                sc.threshold
            );
        }
        let steps: Vec<String> = s
            .diagnostics
            .iter()
            .map(|st| serde_json::to_value(st).map_or("?".into(), |v| v["step"].to_string()))
            .collect();
        let _ = writeln!(o, "  diagnostics {}", steps.join(", "));
    }
    o
}

/// `acpimon status`: one line per VM.
pub fn status_table(s: &crate::watch::metrics::StatusView) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node {} · watching {} · since {}", s.node, s.state_dir, s.started);
    let f = &s.forward;
    let _ = writeln!(
        o,
        "forwarding: {} delivered, {} pending{}",
        f.delivered,
        f.pending_events,
        f.last_error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
    );
    if !s.stalled.is_empty() {
        let _ = writeln!(o, "STALLED: {}", s.stalled.join(", "));
    }
    if let Some(disk) = f.disk_condition() {
        let _ = writeln!(o, "DISK FULL: {disk}");
    } else if f.events_lost > 0 {
        let _ = writeln!(o, "EVENTS LOST: {} accepted events were dropped on a full disk", f.events_lost);
    }
    let _ = writeln!(
        o,
        "{:<20} {:<13} {:>10} {:>9} {:>7}  SINCE / REASON",
        "VM", "STATE", "LATENCY", "AGE", "MISSES"
    );
    for v in &s.vms {
        let hb = v.scenarios.iter().find(|sc| sc.kind == "acpi-heartbeat");
        let latency = hb.and_then(|h| h.last_latency_ms).map_or("-".into(), |l| format!("{l:.2} ms"));
        let age = v.last_record_age_s.map_or("-".into(), |a| format!("{a:.1} s"));
        let misses: u32 = v.scenarios.iter().map(|sc| sc.consecutive_misses).max().unwrap_or(0);
        let _ = writeln!(
            o,
            "{:<20} {:<13} {:>10} {:>9} {:>7}  {} {}",
            v.name,
            v.state.name(),
            latency,
            age,
            misses,
            v.since,
            crate::console::sanitize(v.reason.as_bytes())
        );
        // Why the incident in force happened (the verdict of its last bundle).
        if let Some(verdict) =
            v.last_verdict.as_ref().filter(|_| !matches!(v.state.name(), "healthy" | "starting"))
        {
            let headline = crate::console::sanitize(verdict.headline.as_bytes());
            let _ = writeln!(o, "{:<20}   verdict {}: {headline}", "", verdict.class);
        }
        // A bundle under way; `queued` waits for a slot of the node's `[bundles] concurrent`.
        if let Some(d) = v.diagnosing.as_deref() {
            let _ = writeln!(o, "{:<20}   diagnostics: {d}", "");
        }
        // The slower path, and why, is worth a line; the doorbell is the norm.
        if let Some(polling) = v.completion.as_deref().filter(|c| c.starts_with("polling")) {
            let _ = writeln!(
                o,
                "{:<20}   heartbeat completion: {}",
                "",
                crate::console::sanitize(polling.as_bytes())
            );
        }
        // The port channel is the exception too: say why the region is not used.
        if let Some(channel) = v.channel.as_deref().filter(|c| c.starts_with("I/O port")) {
            let _ = writeln!(o, "{:<20}   channel: {}", "", crate::console::sanitize(channel.as_bytes()));
        }
        for sc in v.scenarios.iter().filter(|sc| sc.unavailable.is_some() || sc.consecutive_misses > 0) {
            let why = sc.unavailable.as_deref().or(sc.last_detail.as_deref()).unwrap_or("");
            let _ = writeln!(o, "{:<20}   {}: {}", "", sc.name, crate::console::sanitize(why.as_bytes()));
        }
        if let Some(c) = v.console.filter(|c| c.dropped > 0) {
            let _ = writeln!(
                o,
                "{:<20}   console: {} of {} bytes dropped (over the console budget)",
                "", c.dropped, c.received
            );
        }
        // Where the kernel's reports come from, when its log in memory is part of it.
        if let Some(k) = v.kernel_log.as_deref().filter(|k| k.contains("memory")) {
            let _ = writeln!(o, "{:<20}   kernel log: {k}", "");
        }
        for d in v.degraded.iter().filter(|d| d.starts_with("kernel log: ")) {
            let _ = writeln!(o, "{:<20}   {}", "", crate::console::sanitize(d.as_bytes()));
        }
    }
    o
}

/// `acpimon snapshot`: one snapshot as a table, or as one JSON line.
pub fn print_snapshot(region: &Region, snap: &Snapshot, obs: Option<&Observation>, json: bool) {
    if json {
        let report = SnapshotReport { region: region.path(), snapshot: snap, observation: obs };
        println!("{}", serde_json::to_string(&report).expect("snapshot serialises"));
    } else {
        print!("{}", snapshot_table(region.path(), snap, obs));
    }
}

/// `acpimon snapshot --watch`: a live view, redrawn in place on a terminal, otherwise one
/// snapshot per new record. Errors while watching (a VM paused mid-write, a corrupt header)
/// are shown and the watch goes on.
pub fn watch_region(region: &Region, json: bool, interval: Duration, count: Option<u64>) {
    // Cursor home, then clear the screen: the table is redrawn where it was.
    const REDRAW: &str = "\x1b[H\x1b[2J";
    let tty = std::io::stdout().is_terminal() && !json;
    let mut tracker = Tracker::new();
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        n += 1;
        let started = Instant::now();
        match region.snapshot() {
            Ok(snap) => {
                let obs = tracker.observe(snap.record.as_ref(), started);
                if tty {
                    print!("{REDRAW}{}", snapshot_table(region.path(), &snap, Some(&obs)));
                } else if obs.fresh || n == 1 {
                    print_snapshot(region, &snap, Some(&obs), json);
                }
            }
            Err(e) => eprintln!("acpimon: {e}"),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

/// `acpimon status`: the table, or the service's JSON.
pub fn print_status(status: &crate::watch::metrics::StatusView, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(status).expect("status serialises"));
    } else {
        print!("{}", status_table(status));
    }
}
