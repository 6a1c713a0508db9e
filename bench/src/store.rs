//! `acpimon-bench store`: the controller store's page queries against a filled store. Fills a
//! fresh store (SQLite in a scratch directory, or the PostgreSQL database given) with N events
//! of a fleet (nodes × VMs, a day of transitions carrying heartbeat latencies, an incident
//! with a kernel report and a bundle every 50 events of a VM), then times each query the web
//! pages make, several rounds, and reports the median and the slowest. A page must load in
//! under 200 ms with 100,000 events: a query whose median is over [`BUDGET_MS`] is a problem.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use acpimon::controller::store::{Backend, FleetFilter, NewEvent, Store};
use acpimon::event::RawEvent;
use serde::Serialize;
use serde_json::json;

/// A page's budget, in ms.
pub const BUDGET_MS: f64 = 200.0;
/// Events per insert transaction while filling.
const BATCH: usize = 1000;

pub struct Options {
    pub events: usize,
    pub nodes: usize,
    pub vms_per_node: usize,
    pub rounds: usize,
    /// A PostgreSQL URL (an empty database); SQLite in `work` otherwise.
    pub database: Option<String>,
    pub work: PathBuf,
}

#[derive(Serialize)]
pub struct Timing {
    pub query: String,
    /// Rows it returned.
    pub rows: usize,
    pub median_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub backend: String,
    pub events: u64,
    pub vms: usize,
    /// Filling: events per second (batches of 1000 per transaction).
    pub fill_events_per_s: f64,
    /// The SQLite file's size (with its WAL), when SQLite.
    pub sqlite_bytes: Option<u64>,
    pub queries: Vec<Timing>,
}

impl Report {
    pub fn problems(&self) -> Vec<String> {
        self.queries
            .iter()
            .filter(|t| t.median_ms > BUDGET_MS)
            .map(|t| {
                format!(
                    "{} took {:.1} ms (median), over the {BUDGET_MS} ms page budget",
                    t.query, t.median_ms
                )
            })
            .collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "store {}: {} events of {} VMs, filled at {:.0} events/s{}",
            self.backend,
            self.events,
            self.vms,
            self.fill_events_per_s,
            self.sqlite_bytes.map_or(String::new(), |b| format!(", {:.1} MiB on disk", b as f64 / 1048576.0))
        )?;
        for t in &self.queries {
            writeln!(
                f,
                "  {:<44} {:>6} rows  median {:>8.2} ms  max {:>8.2} ms",
                t.query, t.rows, t.median_ms, t.max_ms
            )?;
        }
        Ok(())
    }
}

/// 2026-11-30T00:00:00Z, in ms: the end of the filled day.
const END_MS: i64 = 1_796_083_200_000;

fn event(key: String, node: &str, vm: &str, time_ms: i64, kind: &str, fields: serde_json::Value) -> NewEvent {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(time_ms as u64));
    let mut v = json!({ "key": key, "time": time.to_string(), "node": node, "vm": vm, "kind": kind });
    v.as_object_mut().expect("an object").extend(fields.as_object().expect("an object").clone());
    let raw: RawEvent = serde_json::from_value(v).expect("a valid event");
    let body = serde_json::to_string(&raw).expect("serialises");
    NewEvent::from_raw(&raw, body, time_ms)
}

fn transition(to: &str, latency_ms: f64) -> serde_json::Value {
    json!({
        "from": "healthy", "to": to, "reason": "acpi-heartbeat missed 3 of 3",
        "evidence": { "cause": "acpi-heartbeat", "paused": false, "panic": null, "app": null,
            "scenarios": [{ "scenario": "hb", "kind": "acpi-heartbeat", "consecutive_misses": 0, "threshold": 3,
                "last": { "ok": true, "detail": "ok", "latency_ms": latency_ms }, "unavailable": null }] },
    })
}

fn bundle(incident: &str, vm: &str) -> serde_json::Value {
    let trigger = json!({ "kind": "unresponsive", "time": "t", "reason": "r", "evidence": {} });
    json!({
        "trigger": { "kind": "unresponsive", "time": "t", "reason": "r", "evidence": {}, "event": incident, "bundle": "/b" },
        "bundle": "/b", "outcome": "ok",
        "manifest": { "schema": "acpimon.bundle/1", "vm": vm, "trigger": trigger, "created": "c", "finished": "f",
            "timeline": [], "steps": [],
            "verdict": { "class": "soft-lockup", "headline": "the guest kernel reports a soft lockup on CPU#1", "evidence": [] } },
    })
}

/// The i-th event of a VM (`n` per VM over the day): mostly healthy transitions; every 50th an
/// incident (an unresponsive transition, a kernel report and a bundle).
fn vm_events(node: &str, vm: &str, n: usize) -> Vec<NewEvent> {
    let step = 86_400_000 / n.max(1) as i64;
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        let t = END_MS - 86_400_000 + i as i64 * step;
        let key = |s: &str| format!("{node}-{vm}-{i}{s}");
        if i % 50 == 49 && n - out.len() >= 3 {
            let inc = key("");
            out.push(event(inc.clone(), node, vm, t, "transition", transition("unresponsive", 3000.0)));
            out.push(event(
                key("k"),
                node,
                vm,
                t + 1,
                "kernel-report",
                json!({ "class": "soft-lockup", "line": "watchdog: BUG", "incident": inc }),
            ));
            out.push(event(key("b"), node, vm, t + 2, "bundle", bundle(&inc, vm)));
        } else {
            let latency = 0.5 + (i % 17) as f64 * 0.1;
            out.push(event(key(""), node, vm, t, "transition", transition("healthy", latency)));
        }
        i += 1;
    }
    out
}

async fn time<T>(
    rounds: usize,
    mut f: impl AsyncFnMut() -> Result<Vec<T>, String>,
) -> Result<(usize, f64, f64), String> {
    let mut ms = Vec::with_capacity(rounds);
    let mut rows = 0;
    for _ in 0..rounds.max(1) {
        let start = Instant::now();
        rows = f().await?.len();
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((rows, ms[ms.len() / 2], ms[ms.len() - 1]))
}

pub async fn run(opts: &Options) -> Result<Report, String> {
    let backend = match &opts.database {
        Some(url) => Backend::Postgres(url.clone()),
        None => Backend::Sqlite(opts.work.clone()),
    };
    let store = Store::open(&backend).await.map_err(|e| e.to_string())?;
    if store.counts().await.map_err(|e| e.to_string())?.stored > 0 {
        return Err("the store is not empty; give an empty database or a fresh --work directory".into());
    }
    let vms: Vec<(String, String)> = (0..opts.nodes)
        .flat_map(|n| (0..opts.vms_per_node).map(move |v| (format!("node{n:03}"), format!("vm{v:03}"))))
        .collect();
    let per_vm = opts.events.div_ceil(vms.len().max(1));
    let start = Instant::now();
    let mut stored = 0usize;
    let mut batch = Vec::with_capacity(BATCH);
    for (node, vm) in &vms {
        for ev in vm_events(node, vm, per_vm) {
            if stored + batch.len() >= opts.events {
                break;
            }
            batch.push(ev);
            if batch.len() == BATCH {
                stored += batch.len();
                store.insert_batch(std::mem::take(&mut batch), false).await.map_err(|e| e.to_string())?;
            }
        }
    }
    stored += batch.len();
    store.insert_batch(batch, false).await.map_err(|e| e.to_string())?;
    let fill_events_per_s = stored as f64 / start.elapsed().as_secs_f64();

    let (node, vm) = vms[vms.len() / 2].clone();
    let incident = format!("{node}-{vm}-49");
    let six_hours = (END_MS - 6 * 3_600_000, END_MS + 1);
    let e = |e: acpimon::controller::store::StoreError| e.to_string();
    let r = opts.rounds;
    let mut queries = Vec::new();
    let mut add = |name: &str, t: (usize, f64, f64)| {
        queries.push(Timing { query: name.into(), rows: t.0, median_ms: t.1, max_ms: t.2 });
    };
    add(
        "fleet (every node and VM)",
        time(r, async || store.fleet(&FleetFilter::default()).await.map_err(e)).await?,
    );
    let unresponsive = FleetFilter { state: Some("unresponsive".into()), node: None };
    add("fleet, state = unresponsive", time(r, async || store.fleet(&unresponsive).await.map_err(e)).await?);
    let one_node = FleetFilter { state: None, node: Some(node.clone()) };
    add("fleet, one node", time(r, async || store.fleet(&one_node).await.map_err(e)).await?);
    add(
        "a VM's events, last 6 h (limit 500)",
        time(r, async || store.vm_events(&node, &vm, six_hours.0, six_hours.1, 500).await.map_err(e)).await?,
    );
    add(
        "a VM's latency, last 24 h",
        time(r, async || store.latency(&node, &vm, END_MS - 86_400_000, END_MS + 1).await.map_err(e)).await?,
    );
    add(
        "an incident (transition, report, bundle)",
        time(r, async || store.incident(&incident).await.map_err(e)).await?,
    );
    add("latest 50 bundles", time(r, async || store.latest_bundles(50).await.map_err(e)).await?);
    add(
        "one event by key",
        time(r, async || store.event(&incident).await.map(|o| o.into_iter().collect()).map_err(e)).await?,
    );
    add(
        "counts (stored, duplicates)",
        time(r, async || store.counts().await.map(|c| vec![c]).map_err(e)).await?,
    );
    // Whole pages: their queries and the HTML (what a browser waits for, less the network).
    use acpimon::controller::web;
    add(
        "page / (the fleet: query + HTML)",
        time(r, async || {
            let rows = store.fleet(&FleetFilter::default()).await.map_err(e)?;
            let mut nodes: Vec<String> = rows.iter().map(|r| r.node.clone()).collect();
            nodes.dedup();
            Ok(vec![web::fleet(&rows, &FleetFilter::default(), &nodes, END_MS)])
        })
        .await?,
    );
    add(
        "page /vm/NODE/VM (6 h: query + chart + HTML)",
        time(r, async || {
            let events = store.vm_events(&node, &vm, six_hours.0, six_hours.1, 2_000).await.map_err(e)?;
            let latency = store.latency(&node, &vm, six_hours.0, six_hours.1).await.map_err(e)?;
            Ok(vec![web::vm(&node, &vm, &events, &latency, 6, END_MS)])
        })
        .await?,
    );
    add(
        "page /incident/KEY (query + HTML)",
        time(r, async || {
            let events = store.incident(&incident).await.map_err(e)?;
            Ok(vec![web::incident(&incident, &events)])
        })
        .await?,
    );
    let sqlite_bytes = opts.database.is_none().then(|| {
        ["controller.db", "controller.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(opts.work.join(f)).ok())
            .map(|m| m.len())
            .sum()
    });
    Ok(Report {
        backend: store.backend_name().into(),
        events: store.counts().await.map_err(e)?.stored,
        vms: vms.len(),
        fill_events_per_s,
        sqlite_bytes,
        queries,
    })
}
