//! The pages an operator opens: server-rendered HTML, readable without JavaScript, from what
//! the store's queries return. Three views:
//!
//! - `/` the fleet: every node and VM, its state, its last verdict, its heartbeat latency and
//!   the time since its last event; filtered by `?state=` and `?node=`;
//! - `/vm/NODE/VM` one VM: its heartbeat latency over the last hours (`?hours=`, an SVG drawn
//!   here), its incidents and its recent events;
//! - `/incident/KEY` one incident (KEY: the key of the transition that opened it, or of an
//!   event of it, such as its bundle): the
//!   verdict's headline and evidence, the transitions, each diagnostic step's outcome and
//!   duration, and the lines the verdict quotes from the bundle's files, the telling ones
//!   marked.
//!
//! Everything shown came from a node and is escaped; every list is bounded.

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use super::store::{FleetFilter, LatencyPoint, StoredEvent, VmRow};
use crate::diagnose::Manifest;
use crate::event::{Bundle, EventKind};

/// The states a VM can be in, in the order the filter offers them.
pub const STATES: [&str; 8] =
    ["starting", "healthy", "late", "unresponsive", "recovered", "paused", "panicked", "gone"];
/// States that mean trouble: shown first and marked.
const TROUBLE: [&str; 4] = ["late", "unresponsive", "paused", "panicked"];
/// The chart's default and largest span.
pub const DEFAULT_HOURS: u32 = 6;
pub const MAX_HOURS: u32 = 24 * 7;
/// Recent events listed on a VM's page.
pub const VM_EVENTS: usize = 200;
/// Events listed on an incident's page (a node could name one incident in any number).
pub const INCIDENT_EVENTS: usize = 500;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    crate::util::escape_markup(s)
}

/// Percent-encodes a path segment (node and VM names are plain, but nothing here trusts that).
pub fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes a percent-encoded path segment or query value; `None` if malformed or not UTF-8.
pub fn unseg(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in a query string.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| unseg(v)).flatten().filter(|v| !v.is_empty())
    })
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// "12 s ago", "3 min ago" ...
fn ago(ms: i64, now_ms: i64) -> String {
    let secs = (now_ms - ms).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn state_badge(state: Option<&str>) -> String {
    match state {
        Some(s) => {
            let class = if TROUBLE.contains(&s) {
                "bad"
            } else if s == "healthy" {
                "ok"
            } else {
                "other"
            };
            format!("<span class=\"state {class}\">{}</span>", esc(s))
        }
        None => "<span class=\"muted\">-</span>".into(),
    }
}

fn vm_link(node: &str, vm: &str) -> String {
    format!("/vm/{}/{}", seg(node), seg(if vm.is_empty() { "-" } else { vm }))
}

/// The page around a view.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{} - acpimon</title>\
         <style>{CSS}</style></head>\n<body><header><a href=\"/\">acpimon controller</a> <span>{}</span></header>\n\
         <main>\n{body}</main></body></html>\n",
        esc(title),
        esc(title)
    )
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{background:#233;color:#fff;padding:8px 16px}header a{color:#fff;font-weight:bold;text-decoration:none}\
header span{margin-left:1em;color:#cdd}main{padding:8px 16px}\
table{border-collapse:collapse;margin:8px 0}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#f4f6f6}.state{padding:1px 6px;border-radius:3px;font-weight:bold}\
.ok{background:#d7f2dd;color:#155724}.bad{background:#f8d7da;color:#721c24}.other{background:#eee}\
tr.trouble{background:#fff7f7}pre{background:#f7f7f7;padding:8px;overflow-x:auto;white-space:pre-wrap}\
mark{background:#ffe58a}.headline{font-size:1.2em;font-weight:bold}.muted{color:#777}\
svg{border:1px solid #ddd;background:#fff}form{margin:8px 0}";

/// `/`: the fleet.
pub fn fleet(rows: &[VmRow], filter: &FleetFilter, nodes: &[String], now_ms: i64) -> String {
    let mut b = String::new();
    let mut counts: Vec<(&str, usize)> = STATES.iter().map(|s| (*s, 0)).collect();
    for r in rows {
        if let Some(c) = counts.iter_mut().find(|(s, _)| Some(*s) == r.state.as_deref()) {
            c.1 += 1;
        }
    }
    let vms = rows.iter().filter(|r| !r.vm.is_empty()).count();
    let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let _ =
        write!(b, "<h1>Fleet</h1><p id=\"summary\">{} on {}", plural(vms, "VM"), plural(nodes.len(), "node"));
    for (s, n) in counts.iter().filter(|(_, n)| *n > 0) {
        let _ = write!(b, " &middot; {n} {}", esc(s));
    }
    b.push_str("</p>\n<form method=\"get\" action=\"/\">State <select name=\"state\"><option value=\"\">any</option>");
    for s in STATES {
        let sel = if filter.state.as_deref() == Some(s) { " selected" } else { "" };
        let _ = write!(b, "<option{sel}>{s}</option>");
    }
    b.push_str("</select> Node <select name=\"node\"><option value=\"\">any</option>");
    for n in nodes {
        let sel = if filter.node.as_deref() == Some(n.as_str()) { " selected" } else { "" };
        let _ = write!(b, "<option{sel}>{}</option>", esc(n));
    }
    b.push_str("</select> <button type=\"submit\">Show</button></form>\n");
    if rows.is_empty() {
        b.push_str("<p class=\"muted\">No VM matches.</p>");
        return page("Fleet", &b);
    }
    b.push_str(
        "<table id=\"fleet\"><tr><th>Node</th><th>VM</th><th>State</th><th>Last verdict</th>\
         <th>Heartbeat</th><th>Last event</th><th>Events</th></tr>\n",
    );
    // Trouble first, then by node and VM as the store ordered them.
    let mut ordered: Vec<&VmRow> = rows.iter().collect();
    ordered.sort_by_key(|r| !r.state.as_deref().is_some_and(|s| TROUBLE.contains(&s)));
    for r in ordered {
        let trouble = r.state.as_deref().is_some_and(|s| TROUBLE.contains(&s));
        let vm = if r.vm.is_empty() {
            "<span class=\"muted\">(the node itself)</span>".into()
        } else {
            esc(&r.vm)
        };
        let since =
            r.state_ms.map_or(String::new(), |t| format!(" <span class=\"muted\">{}</span>", ago(t, now_ms)));
        let verdict = match (&r.verdict, &r.headline) {
            (Some(class), headline) => {
                let target =
                    r.verdict_key.as_deref().map_or(String::new(), |k| format!("/incident/{}", seg(k)));
                format!(
                    "<a class=\"verdict\" href=\"{}\"><b>{}</b></a> {}",
                    esc(&target),
                    esc(class),
                    esc(headline.as_deref().unwrap_or(""))
                )
            }
            _ => "<span class=\"muted\">none</span>".into(),
        };
        let latency = r.latency_ms.map_or("<span class=\"muted\">-</span>".into(), |l| format!("{l:.2} ms"));
        let _ = writeln!(
            b,
            "<tr class=\"{}\"><td>{}</td><td><a class=\"vm\" href=\"{}\">{vm}</a></td><td>{}{since}</td><td>{verdict}</td>\
             <td>{latency}</td><td>{} <span class=\"muted\">({})</span></td><td>{}</td></tr>",
            if trouble { "trouble" } else { "" },
            esc(&r.node),
            vm_link(&r.node, &r.vm),
            state_badge(r.state.as_deref()),
            ago(r.last_ms, now_ms),
            esc(&r.last_kind),
            r.events
        );
    }
    b.push_str("</table>\n");
    page("Fleet", &b)
}

/// A table of events (time, kind, what), its `id` for tests and styles.
fn event_table<'a>(b: &mut String, id: &str, events: impl Iterator<Item = &'a StoredEvent>) {
    let _ = writeln!(b, "<table id=\"{id}\"><tr><th>Time</th><th>Kind</th><th>What</th></tr>");
    for e in events {
        let _ = writeln!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.time),
            esc(&e.kind),
            esc(&summary(e))
        );
    }
    b.push_str("</table>\n");
}

/// One line's summary of an event, for timelines.
fn summary(e: &StoredEvent) -> String {
    let v = e.json();
    let get = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    match e.kind.as_str() {
        "transition" => format!("{} → {}: {}", get("from"), get("to"), get("reason")),
        "bundle" => match (&e.verdict, &e.headline) {
            (Some(c), Some(h)) => format!("bundle: {c}: {h}"),
            _ => format!("bundle ({})", get("outcome")),
        },
        "kernel-report" => {
            let source = v.get("source").and_then(Value::as_str).unwrap_or("console");
            format!("{} (from the {source}): {}", get("class"), get("summary"))
        }
        _ => String::new(),
    }
}

/// `/vm/NODE/VM`: one VM.
pub fn vm(
    node: &str,
    vm: &str,
    events: &[StoredEvent],
    latency: &[LatencyPoint],
    hours: u32,
    now_ms: i64,
) -> String {
    let title = format!("{node} / {}", if vm.is_empty() { "(the node)" } else { vm });
    let mut b = String::new();
    let state = events.iter().rev().find_map(|e| e.state.clone());
    let _ = writeln!(b, "<h1>{}</h1><p>State {}</p>", esc(&title), state_badge(state.as_deref()));
    let from = now_ms - i64::from(hours) * 3_600_000;
    let _ = writeln!(
        b,
        "<h2>Heartbeat latency, last {hours} h</h2>\n{}\n<p class=\"muted\">{} samples (each state change carries the \
         last heartbeat's trigger-to-record time). <a href=\"?hours=1\">1 h</a> <a href=\"?hours=6\">6 h</a> \
         <a href=\"?hours=24\">24 h</a> <a href=\"?hours=168\">7 days</a></p>",
        latency_svg(latency, from, now_ms),
        latency.len()
    );
    let incidents: Vec<&StoredEvent> = events.iter().filter(|e| e.kind == "bundle").collect();
    b.push_str("<h2>Incidents</h2>\n");
    if incidents.is_empty() {
        b.push_str("<p class=\"muted\">None in this span.</p>\n");
    } else {
        b.push_str("<table id=\"incidents\"><tr><th>Time</th><th>Verdict</th></tr>\n");
        for e in incidents.iter().rev() {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td><a class=\"incident\" href=\"/incident/{}\"><b>{}</b></a> {}</td></tr>",
                esc(&e.time),
                seg(&e.key),
                esc(e.verdict.as_deref().unwrap_or("no verdict")),
                esc(e.headline.as_deref().unwrap_or(""))
            );
        }
        b.push_str("</table>\n");
    }
    b.push_str("<h2>Events</h2>\n");
    event_table(&mut b, "events", events.iter().rev().take(VM_EVENTS));
    page(&title, &b)
}

/// The chart: latency (ms, linear from 0 to the largest sample) against time over
/// `[from_ms, to_ms]`, one dot per sample joined by a line.
pub fn latency_svg(points: &[LatencyPoint], from_ms: i64, to_ms: i64) -> String {
    const W: f64 = 720.0;
    const H: f64 = 180.0;
    const PAD: f64 = 40.0;
    let span = (to_ms - from_ms).max(1) as f64;
    let top = points.iter().map(|p| p.latency_ms).filter(|l| l.is_finite()).fold(0.0f64, f64::max).max(1.0);
    let x = |t: i64| PAD + (t - from_ms) as f64 / span * (W - 2.0 * PAD);
    let y = |l: f64| H - PAD / 2.0 - l.clamp(0.0, top) / top * (H - PAD);
    let mut s = format!(
        "<svg class=\"latency\" role=\"img\" aria-label=\"heartbeat latency\" width=\"{W}\" height=\"{H}\" \
         viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    let _ = write!(
        s,
        "<line x1=\"{PAD}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#999\"/><line x1=\"{PAD}\" y1=\"{2}\" x2=\"{PAD}\" y2=\"{0}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"{3}\" font-size=\"10\">{top:.1} ms</text><text x=\"2\" y=\"{0}\" font-size=\"10\">0</text>\
         <text x=\"{PAD}\" y=\"{H}\" font-size=\"10\">{4}</text><text x=\"{5}\" y=\"{H}\" font-size=\"10\" text-anchor=\"end\">{6}</text>",
        H - PAD / 2.0,
        W - PAD,
        PAD / 2.0,
        PAD / 2.0 + 4.0,
        esc(&rfc3339(from_ms)),
        W - PAD,
        esc(&rfc3339(to_ms)),
    );
    let inside: Vec<&LatencyPoint> = points
        .iter()
        .filter(|p| p.time_ms >= from_ms && p.time_ms <= to_ms && p.latency_ms.is_finite())
        .collect();
    if inside.len() > 1 {
        s.push_str("<polyline fill=\"none\" stroke=\"#2a6f97\" stroke-width=\"1\" points=\"");
        for p in &inside {
            let _ = write!(s, "{:.1},{:.1} ", x(p.time_ms), y(p.latency_ms));
        }
        s.push_str("\"/>");
    }
    for p in &inside {
        let _ = write!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"#2a6f97\"><title>{} {:.3} ms</title></circle>",
            x(p.time_ms),
            y(p.latency_ms),
            esc(&rfc3339(p.time_ms)),
            p.latency_ms
        );
    }
    if inside.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">no samples</text>",
            W / 2.0,
            H / 2.0
        );
    }
    s.push_str("</svg>");
    s
}

/// Lines worth the eye: what the kernel and acpimon say when something is wrong.
fn telling(line: &str) -> bool {
    const MARKS: [&str; 16] = [
        "BUG:",
        "watchdog:",
        "rcu:",
        "Kernel panic",
        "Oops",
        "Call Trace",
        "RIP:",
        "hung_task",
        "INFO: task",
        "blocked for more than",
        "stuck",
        "Out of memory",
        "I/O error",
        "paused",
        "NMI",
        "lockup",
    ];
    MARKS.iter().any(|m| line.contains(m))
}

/// `/incident/KEY`: `events` are the incident's (its transition, bundle, kernel reports).
pub fn incident(key: &str, events: &[StoredEvent]) -> String {
    let mut b = String::new();
    let opening = events.iter().find(|e| e.key == key);
    let (node, vm) = opening.or(events.first()).map_or(("", ""), |e| (e.node.as_str(), e.vm.as_str()));
    let title = format!("Incident on {node} / {vm}");
    let _ = writeln!(
        b,
        "<h1>{}</h1><p><a href=\"{}\">the VM</a> &middot; opened {}</p>",
        esc(&title),
        vm_link(node, vm),
        esc(opening.map_or("?", |e| e.time.as_str()))
    );
    let bundle = events.iter().rev().find(|e| e.kind == "bundle");
    let typed: Option<Bundle> = bundle
        .and_then(|e| serde_json::from_str::<crate::event::RawEvent>(&e.body).ok()?.typed().ok())
        .and_then(|e| match e.kind {
            EventKind::Bundle(b) => Some(b),
            _ => None,
        });
    let manifest: Option<&Manifest> = typed.as_ref().and_then(|b| b.manifest.as_deref());
    match manifest.and_then(|m| m.verdict.as_ref()) {
        Some(v) => {
            let _ = writeln!(
                b,
                "<p class=\"headline\" id=\"verdict\"><span class=\"state bad\">{}</span> {}</p>",
                esc(v.class.name()),
                esc(&v.headline)
            );
            b.push_str("<h2>Evidence</h2>\n<pre id=\"evidence\">");
            for line in &v.evidence {
                let text = format!("{}: {}", line.source, line.line);
                if telling(&line.line) {
                    let _ = writeln!(b, "<mark>{}</mark>", esc(&text));
                } else {
                    let _ = writeln!(b, "{}", esc(&text));
                }
            }
            b.push_str("</pre>\n");
        }
        None => {
            let why = typed
                .as_ref()
                .and_then(|b| b.error.clone())
                .unwrap_or_else(|| "no bundle has arrived yet".into());
            let _ = writeln!(b, "<p class=\"headline\" id=\"verdict\">No verdict: {}</p>", esc(&why));
        }
    }
    b.push_str("<h2>Timeline</h2>\n");
    event_table(&mut b, "timeline", events.iter().take(INCIDENT_EVENTS));
    if events.len() > INCIDENT_EVENTS {
        let _ =
            writeln!(b, "<p class=\"muted\">{} more events not shown.</p>", events.len() - INCIDENT_EVENTS);
    }
    if let Some(m) = manifest {
        b.push_str(
            "<h2>Diagnostic steps</h2>\n<table id=\"steps\"><tr><th>Step</th><th>Outcome</th><th>Took</th><th>File</th>\
             <th>Why</th></tr>\n",
        );
        for s in &m.steps {
            let outcome = serde_json::to_value(s.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{} ms <span class=\"muted\">of {}</span></td><td>{}</td><td>{}</td></tr>",
                esc(&s.name),
                esc(&outcome),
                s.duration_ms,
                s.timeout_ms,
                s.file.as_deref().map_or(String::new(), |f| format!("{} ({} bytes)", esc(f), s.bytes)),
                esc(s.reason.as_deref().unwrap_or(""))
            );
        }
        b.push_str("</table>\n");
        let _ = writeln!(
            b,
            "<p class=\"muted\">The bundle's files are on the node, in {}.</p>",
            esc(&typed.as_ref().map_or(String::new(), |t| t.bundle.display().to_string()))
        );
    }
    page(&title, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_encodes_what_nodes_send() {
        assert_eq!(esc("<b a=\"x\">&'"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(esc("a\u{1b}[31m"), "a\u{fffd}[31m");
        assert_eq!(seg("web 1/../x"), "web%201%2F..%2Fx");
        assert_eq!(unseg("web%201%2F..%2Fx").unwrap(), "web 1/../x");
        assert_eq!(unseg("%zz"), None);
        assert_eq!(unseg("%ff"), None, "not UTF-8");
        assert_eq!(query_param(Some("state=unresponsive&node=edge%2D1"), "node").as_deref(), Some("edge-1"));
        assert_eq!(query_param(Some("state="), "state"), None);
    }

    #[test]
    fn the_chart_places_samples_in_its_span() {
        let pts = [
            LatencyPoint { time_ms: 1000, latency_ms: 2.0 },
            LatencyPoint { time_ms: 2000, latency_ms: 4.0 },
        ];
        let svg = latency_svg(&pts, 0, 4000);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("4.0 ms") && svg.contains("polyline"), "{svg}");
        assert!(latency_svg(&pts, 5000, 6000).contains("no samples"));
        let nan = [LatencyPoint { time_ms: 1, latency_ms: f64::NAN }];
        assert!(latency_svg(&nan, 0, 10).contains("no samples"));
    }
}
