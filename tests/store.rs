//! The controller's store, the same checks on both backends: SQLite in a temporary directory
//! and PostgreSQL in a throwaway cluster (tests/common/postgres.rs; Debian's `postgresql`).
//! Insert-once, the queries the pages use, migrations, the import of a JSON-file store, and
//! exactly-once under concurrent posts from many nodes through the controller's HTTP API.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use acpimon::controller::store::{Backend, FleetFilter, Inserted, NewEvent, Store, StoreError};
use acpimon::controller::{self, ControllerOptions};
use acpimon::event::RawEvent;
use common::postgres::Postgres;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 2026-11-30T00:00:00Z in ms.
const T0: i64 = 1_796_083_200_000;

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// An event of `kind` with `fields`, at `T0 + at_s` seconds.
fn raw(key: &str, node: &str, vm: Option<&str>, at_s: i64, kind: &str, fields: Value) -> RawEvent {
    let mut v = json!({ "key": key, "time": rfc3339(T0 + at_s * 1000), "node": node, "kind": kind });
    if let Some(vm) = vm {
        v["vm"] = vm.into();
    }
    v.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    serde_json::from_value(v).unwrap()
}

fn transition(to: &str, latency_ms: Option<f64>) -> Value {
    json!({
        "from": "healthy", "to": to, "reason": "r",
        "evidence": {
            "cause": "acpi-heartbeat", "paused": false, "panic": null, "app": null,
            "scenarios": [
                { "scenario": "tcp", "kind": "tcp", "consecutive_misses": 0, "threshold": 3,
                  "last": { "ok": true, "detail": "d", "latency_ms": 99.0 }, "unavailable": null },
                { "scenario": "hb", "kind": "acpi-heartbeat", "consecutive_misses": 0, "threshold": 3,
                  "last": latency_ms.map(|l| json!({ "ok": true, "detail": "d", "latency_ms": l })), "unavailable": null },
            ],
        },
    })
}

fn bundle(incident: &str, class: &str, headline: &str) -> Value {
    let trigger = json!({ "kind": "unresponsive", "time": "t", "reason": "r", "evidence": {} });
    json!({
        "trigger": { "kind": "unresponsive", "time": "t", "reason": "r", "evidence": {}, "event": incident, "bundle": "/b" },
        "bundle": "/b",
        "manifest": {
            "schema": "acpimon.bundle/1", "vm": "vm1", "trigger": trigger, "created": "c", "finished": "f",
            "timeline": [], "steps": [],
            "verdict": { "class": class, "headline": headline, "evidence": [] },
        },
        "outcome": "ok",
    })
}

fn row(ev: &RawEvent) -> NewEvent {
    NewEvent::from_raw(ev, serde_json::to_string(ev).unwrap(), T0 + 3_600_000)
}

async fn insert(store: &Store, ev: &RawEvent) -> Inserted {
    store.insert(row(ev), true).await.unwrap()
}

/// A SQLite store in `dir`.
async fn sqlite(dir: &Path) -> Store {
    Store::open(&Backend::Sqlite(dir.into())).await.unwrap()
}

/// Insert-once and every query the pages use.
async fn contract(store: Store) {
    assert_eq!(store.schema_version().await.unwrap(), acpimon::controller::store::schema::latest());
    let inc = "inc1";
    let events = [
        raw(
            "s1",
            "a",
            None,
            0,
            "service-started",
            json!({ "version": "0", "state_dir": "/s", "metrics": null }),
        ),
        raw("v1", "a", Some("vm1"), 1, "vm-added", json!({ "dir": "/d", "scenarios": ["hb"] })),
        raw("h1", "a", Some("vm1"), 2, "transition", transition("healthy", Some(1.5))),
        raw(inc, "a", Some("vm1"), 10, "transition", transition("unresponsive", None)),
        raw(
            "k1",
            "a",
            Some("vm1"),
            11,
            "kernel-report",
            json!({ "class": "soft-lockup", "line": "watchdog: BUG", "incident": inc }),
        ),
        raw("b1", "a", Some("vm1"), 12, "bundle", bundle(inc, "soft-lockup", "stuck on CPU#1")),
        raw("h2", "b", Some("vm2"), 5, "transition", transition("healthy", Some(2.5))),
        raw("x1", "b", Some("vm2"), 6, "from-the-future", json!({ "n": 1 })),
        // Delivered late (a spool drained after an outage): older than vm1's latest state.
        raw("old", "a", Some("vm1"), 3, "transition", transition("late", Some(7.0))),
    ];
    for ev in &events {
        assert_eq!(insert(&store, ev).await, Inserted::New, "{}", ev.key);
    }
    assert_eq!(insert(&store, &events[2]).await, Inserted::Duplicate);
    assert_eq!(insert(&store, &events[7]).await, Inserted::Duplicate);
    let c = store.counts().await.unwrap();
    assert_eq!((c.stored, c.duplicates), (9, 2));

    // Arrival order, as sent.
    let all: Vec<RawEvent> =
        store.all_json().await.unwrap().iter().map(|j| serde_json::from_str(j).unwrap()).collect();
    assert_eq!(all, events.to_vec());

    let one = store.event("b1").await.unwrap().unwrap();
    assert_eq!(serde_json::from_value::<RawEvent>(one.json()).unwrap(), events[5]);
    assert_eq!(
        (one.verdict.as_deref(), one.headline.as_deref(), one.incident.as_deref()),
        (Some("soft-lockup"), Some("stuck on CPU#1"), Some(inc))
    );
    assert_eq!(one.time_ms, T0 + 12_000);
    assert!(store.event("nope").await.unwrap().is_none());

    // The fleet: one row per node and VM (the node's own events under vm ""), latest of each.
    let fleet = store.fleet(&FleetFilter::default()).await.unwrap();
    let rows: Vec<(&str, &str)> = fleet.iter().map(|r| (r.node.as_str(), r.vm.as_str())).collect();
    assert_eq!(rows, [("a", ""), ("a", "vm1"), ("b", "vm2")]);
    let vm1 = &fleet[1];
    assert_eq!(vm1.events, 6);
    assert_eq!(
        (vm1.state.as_deref(), vm1.state_key.as_deref()),
        (Some("unresponsive"), Some(inc)),
        "not rolled back by the late event"
    );
    assert_eq!((vm1.last_key.as_str(), vm1.last_kind.as_str(), vm1.last_ms), ("b1", "bundle", T0 + 12_000));
    // The latest heartbeat sample by event time: the late event's (3 s, after 2 s; the
    // unresponsive transition at 10 s has none, and the tcp probe's 99 ms is no heartbeat).
    assert_eq!((vm1.latency_ms, vm1.latency_at_ms), (Some(7.0), Some(T0 + 3_000)));
    assert_eq!((vm1.verdict.as_deref(), vm1.verdict_key.as_deref()), (Some("soft-lockup"), Some("b1")));
    assert_eq!(fleet[2].state.as_deref(), Some("healthy"));
    assert_eq!(fleet[2].last_kind, "from-the-future");
    let by_state =
        store.fleet(&FleetFilter { state: Some("unresponsive".into()), node: None }).await.unwrap();
    assert_eq!(by_state.len(), 1);
    assert_eq!(by_state[0].vm, "vm1");
    let by_node = store.fleet(&FleetFilter { state: None, node: Some("b".into()) }).await.unwrap();
    assert_eq!(by_node.iter().map(|r| r.vm.as_str()).collect::<Vec<_>>(), ["vm2"]);
    let both = FleetFilter { state: Some("healthy".into()), node: Some("a".into()) };
    assert!(store.fleet(&both).await.unwrap().is_empty());

    // A VM's events in a time range, by event time; the limit.
    let keys =
        |v: Vec<acpimon::controller::store::StoredEvent>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
    let range = store.vm_events("a", "vm1", T0 + 2_000, T0 + 11_000, 100).await.unwrap();
    assert_eq!(keys(range), ["h1", "old", inc]);
    assert_eq!(keys(store.vm_events("a", "vm1", T0, T0 + 60_000, 2).await.unwrap()), ["v1", "h1"]);
    assert_eq!(keys(store.vm_events("a", "", T0, T0 + 60_000, 10).await.unwrap()), ["s1"]);

    // The incident: its transition, the kernel report and the bundle.
    assert_eq!(keys(store.incident(inc).await.unwrap()), [inc, "k1", "b1"]);
    assert_eq!(keys(store.latest_bundles(10).await.unwrap()), ["b1"]);

    // Latency over time.
    let lat = store.latency("a", "vm1", T0, T0 + 3_600_000).await.unwrap();
    assert_eq!(
        lat.iter().map(|p| (p.time_ms, p.latency_ms)).collect::<Vec<_>>(),
        [(T0 + 2_000, 1.5), (T0 + 3_000, 7.0)]
    );
    assert!(store.latency("a", "vm1", T0 + 4_000, T0 + 3_600_000).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).await;
    assert_eq!(store.backend_name(), "sqlite");
    contract(store).await;
    // Reopened: the same data, no migration again.
    let store = sqlite(dir.path()).await;
    assert_eq!(store.counts().await.unwrap().stored, 9);
    let mode: String = rusqlite::Connection::open(dir.path().join("controller.db"))
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_contract() {
    let pg = Postgres::start();
    let url = pg.database("contract").await;
    let store = Store::open(&Backend::Postgres(url.clone())).await.unwrap();
    assert_eq!(store.backend_name(), "postgres");
    contract(store).await;
    let store = Store::open(&Backend::Postgres(url)).await.unwrap();
    assert_eq!(store.counts().await.unwrap().stored, 9);
}

/// A store written by a newer acpimon is refused, saying so.
fn assert_newer(e: StoreError) {
    let msg = e.to_string();
    assert!(matches!(e, StoreError::NewerSchema { found: 99, .. }), "{msg}");
    assert!(msg.contains("version 99, newer than this acpimon knows"), "{msg}");
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    drop(sqlite(dir.path()).await);
    rusqlite::Connection::open(dir.path().join("controller.db"))
        .unwrap()
        .execute("INSERT INTO schema_version (version, applied_ms) VALUES (99, 0)", [])
        .unwrap();
    assert_newer(Store::open(&Backend::Sqlite(dir.path().into())).await.err().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_newer_schema_and_a_dead_server() {
    let pg = Postgres::start();
    let url = pg.database("newer").await;
    drop(Store::open(&Backend::Postgres(url.clone())).await.unwrap());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("INSERT INTO schema_version (version, applied_ms) VALUES (99, 0)").await.unwrap();
    assert_newer(Store::open(&Backend::Postgres(url)).await.err().unwrap());

    let nowhere = format!("postgres://u:secret@/x?host={}", pg.path().join("none").display());
    let msg = Store::open(&Backend::Postgres(nowhere)).await.err().unwrap().to_string();
    assert!(
        msg.contains("cannot connect to PostgreSQL") && msg.contains("u:***@") && !msg.contains("secret"),
        "{msg}"
    );
}

/// A JSON-file store as the controller kept it before: `events/`, `events.jsonl` (arrival
/// order; "c" missing from it, as after a crash between the two writes), `duplicates`, and a
/// temporary file of a write never acknowledged.
fn old_store(dir: &Path) -> Vec<RawEvent> {
    let events: Vec<RawEvent> = ["b", "a", "c"]
        .iter()
        .enumerate()
        .map(|(i, k)| raw(k, "n", Some("vm1"), i as i64, "transition", transition("healthy", Some(i as f64))))
        .collect();
    std::fs::create_dir_all(dir.join("events")).unwrap();
    for ev in &events {
        std::fs::write(dir.join(format!("events/{}.json", ev.key)), serde_json::to_vec(ev).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // distinct file times: "c" is newest
    }
    std::fs::write(dir.join("events/.d.json.tmp"), b"{").unwrap();
    let list: String = events[..2].iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect();
    std::fs::write(dir.join("events.jsonl"), list).unwrap();
    std::fs::write(dir.join("duplicates"), "5\n").unwrap();
    events
}

async fn import_once(store: Store, dir: &Path, expected: &[RawEvent]) {
    // An event posted before the import: the import keeps it and does not count it twice.
    assert_eq!(insert(&store, &expected[1]).await, Inserted::New);
    let report = store.import_json_store(dir).await.unwrap().expect("imported");
    assert_eq!((report.events, report.new, report.skipped, report.duplicates), (3, 2, 0, 5));
    assert!(store.import_json_store(dir).await.unwrap().is_none(), "imported once");
    let c = store.counts().await.unwrap();
    assert_eq!((c.stored, c.duplicates), (3, 5));
    let keys: Vec<String> = store
        .all_json()
        .await
        .unwrap()
        .iter()
        .map(|j| serde_json::from_str::<RawEvent>(j).unwrap().key)
        .collect();
    assert_eq!(keys, ["a", "b", "c"], "the earlier post, then the old store's arrival order");
    let fleet = store.fleet(&FleetFilter::default()).await.unwrap();
    assert_eq!((fleet.len(), fleet[0].latency_ms), (1, Some(2.0)));
    assert!(dir.join("events/a.json").exists(), "the old files stay");
}

#[tokio::test]
async fn sqlite_imports_a_json_file_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = old_store(dir.path());
    import_once(sqlite(dir.path()).await, dir.path(), &events).await;
    // Reopened, as the controller does at each start: nothing imported again.
    assert!(sqlite(dir.path()).await.import_json_store(dir.path()).await.unwrap().is_none());
    assert_eq!(sqlite(dir.path()).await.counts().await.unwrap().stored, 3);

    // The controller imports at start.
    let fresh = tempfile::tempdir().unwrap();
    old_store(fresh.path());
    let ctl = Ctl::start(fresh.path(), None, None).await;
    assert_eq!(stats(ctl.addr).await, (3, 5));
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_imports_a_json_file_store_once() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let events = old_store(dir.path());
    let url = pg.database("import").await;
    import_once(Store::open(&Backend::Postgres(url.clone())).await.unwrap(), dir.path(), &events).await;
    let again = Store::open(&Backend::Postgres(url)).await.unwrap();
    assert!(again.import_json_store(dir.path()).await.unwrap().is_none());
}

/// The controller serving in this process.
struct Ctl {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), controller::ControllerError>>,
}

impl Ctl {
    async fn start(store: &Path, database: Option<String>, analyzer: Option<Vec<String>>) -> Ctl {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let (tx, ready) = tokio::sync::oneshot::channel();
        let opts = ControllerOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: store.into(),
            database,
            analyzer,
            analyzer_timeout: Duration::from_secs(10),
            tls: None,
            tokens: None,
        };
        let task = tokio::spawn(controller::serve(opts, rx, Some(tx)));
        let addr = match ready.await {
            Ok(a) => a,
            Err(_) => panic!("the controller did not start: {:?}", task.await),
        };
        Ctl { addr, stop, task }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.unwrap().unwrap().unwrap();
    }
}

/// One HTTP exchange on a new connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Idempotency-Key: {k}\r\nContent-Type: application/json\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

async fn stats(addr: SocketAddr) -> (u64, u64) {
    let (status, body) = http(addr, "GET", "/v1/stats", None, b"").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (v["stored"].as_u64().unwrap(), v["duplicates"].as_u64().unwrap())
}

const NODES: usize = 8;
const PER_NODE: usize = 25;

/// 8 nodes post 25 events each at once; every event is posted twice at the same moment (a
/// retry racing the first attempt) and some a third time later (a resend after a restart).
/// Exactly one post per key is answered 201, the rest 200; the store holds each once; the
/// analyzer ran once per event.
async fn exactly_once_under_concurrent_posts(store_dir: &Path, database: Option<String>) {
    let analyzer = vec!["sh".into(), "-c".into(), "cat >/dev/null".into()];
    let ctl = Ctl::start(store_dir, database, Some(analyzer)).await;
    let addr = ctl.addr;
    let mut nodes = Vec::new();
    for n in 0..NODES {
        nodes.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..PER_NODE {
                let node = format!("node{n}");
                let vm = format!("vm{}", i % 3);
                let ev = raw(
                    &format!("n{n}-e{i}"),
                    &node,
                    Some(&vm),
                    i as i64,
                    "transition",
                    transition("healthy", Some(i as f64)),
                );
                let body = serde_json::to_vec(&ev).unwrap();
                let key = ev.key.clone();
                let (a, b) = tokio::join!(
                    http(addr, "POST", "/v1/events", Some(&key), &body),
                    http(addr, "POST", "/v1/events", Some(&key), &body)
                );
                answers.push((key.clone(), a.0));
                answers.push((key.clone(), b.0));
                if i % 5 == 0 {
                    answers.push((key.clone(), http(addr, "POST", "/v1/events", Some(&key), &body).await.0));
                }
            }
            answers
        }));
    }
    let mut by_key: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    let mut posts = 0;
    for n in nodes {
        for (key, status) in n.await.unwrap() {
            by_key.entry(key).or_default().push(status);
            posts += 1;
        }
    }
    assert_eq!(by_key.len(), NODES * PER_NODE);
    for (key, statuses) in &by_key {
        let mut s = statuses.clone();
        s.sort();
        assert_eq!(s[0], 200, "{key}: {statuses:?}");
        assert_eq!(s.iter().filter(|&&x| x == 201).count(), 1, "{key}: one 201 only, {statuses:?}");
        assert!(s.iter().all(|&x| x == 200 || x == 201), "{key}: {statuses:?}");
    }
    let total = (NODES * PER_NODE) as u64;
    assert_eq!(stats(addr).await, (total, posts - total));
    let (status, list) = http(addr, "GET", "/v1/events", None, b"").await;
    assert_eq!(status, 200);
    let stored: Vec<RawEvent> = serde_json::from_str(&list).unwrap();
    let keys: BTreeSet<&String> = stored.iter().map(|e| &e.key).collect();
    assert_eq!((stored.len(), keys.len()), (by_key.len(), by_key.len()), "each key stored once");
    // The analyzer ran on each new event, and only on those.
    let analyses = store_dir.join("analysis");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let count = || {
        std::fs::read_dir(&analyses)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".txt"))
            .count()
    };
    while count() < by_key.len() {
        assert!(tokio::time::Instant::now() < deadline, "{} analyses of {}", count(), by_key.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count(), by_key.len());
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_exactly_once_under_concurrent_posts() {
    let dir = tempfile::tempdir().unwrap();
    exactly_once_under_concurrent_posts(dir.path(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_exactly_once_under_concurrent_posts() {
    let pg = Postgres::start();
    let url = pg.database("concurrent").await;
    let dir = tempfile::tempdir().unwrap();
    exactly_once_under_concurrent_posts(dir.path(), Some(url.clone())).await;
    // The events are in PostgreSQL, not in a SQLite file beside the analyses.
    assert!(!dir.path().join("controller.db").exists());
    let store = Store::open(&Backend::Postgres(url)).await.unwrap();
    assert_eq!(store.counts().await.unwrap().stored, (NODES * PER_NODE) as u64);
}

/// The command line: a database URL that is not PostgreSQL's, and a server that is not there,
/// are refused at start with what to do.
#[test]
fn the_controller_command_names_a_bad_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().to_str().unwrap();
    for (url, says) in [
        ("mysql://u:pw@h/db", "is not a PostgreSQL URL"),
        ("postgres://u:pw@/db?host=/nonexistent-acpimon-socket-dir", "cannot connect to PostgreSQL"),
    ] {
        let out =
            common::acpimon(&["controller", "--listen", "127.0.0.1:0", "--store", store, "--database", url]);
        let err = common::text(&out.stderr);
        assert!(!out.status.success(), "{url}: {err}");
        assert!(err.contains(says) && err.contains("u:***@") && !err.contains("pw@"), "{url}: {err}");
    }
}
