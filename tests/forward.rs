//! The forwarding stage end to end, without QEMU: a Forwarder in this process sends to the
//! reference controller, also in this process, over real TCP on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acpimon::controller::{self, ControllerOptions};
use acpimon::event::{self, EventKind};
use acpimon::forward::{
    ControllerConfig, Event, ForwardConfig, ForwardError, ForwardStats, ForwardTask, Forwarder, HookConfig,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// Waits for `cond`, polling; fails the test after [`DEADLINE`] saying what it waited for.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The in-process reference controller, with what these tests ask of it.
type Controller = common::inproc::Running;

async fn start(listen: SocketAddr, store: &Path, analyzer: Option<Vec<String>>) -> Controller {
    Controller::start(ControllerOptions { analyzer, ..common::inproc::options(listen, store) })
        .await
        .expect("the controller starts")
}

trait Stored {
    async fn events(&self) -> Vec<Event>;
    async fn stats(&self) -> (u64, u64);
}

impl Stored for Controller {
    async fn events(&self) -> Vec<Event> {
        let (status, body) = get(self.addr, "/v1/events").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn stats(&self) -> (u64, u64) {
        let (status, body) = get(self.addr, "/v1/stats").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (v["stored"].as_u64().unwrap(), v["duplicates"].as_u64().unwrap())
    }
}

/// Sends raw bytes, reads until the server closes; (status, body). Status 0: no HTTP answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may answer and close before reading everything: ignore write errors.
        let _ = s.write_all(request).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    };
    let buf = tokio::time::timeout(DEADLINE, exchange).await.expect("the controller answers or closes");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (status, body)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw(addr, format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes()).await
}

async fn post(addr: SocketAddr, key: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = format!(
        "POST /v1/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Idempotency-Key: {k}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    raw(addr, &bytes).await
}

/// An address nothing listens on (bound, read, released).
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn controller_cfg(addr: SocketAddr) -> ControllerConfig {
    ControllerConfig {
        url: format!("http://{addr}"),
        timeout: Duration::from_secs(2),
        spool_max_bytes: 64 << 20,
        spool_max_events: 1000,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ca_file: None,
        client_cert: None,
        client_key: None,
        token_file: None,
    }
}

fn config(dir: &Path, controller: Option<ControllerConfig>, hook: Option<HookConfig>) -> ForwardConfig {
    ForwardConfig {
        log: Some(dir.join("events.jsonl")),
        spool_dir: dir.join("spool"),
        controller,
        hook,
        hold: Default::default(),
    }
}

/// A running ForwardTask.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn run(task: ForwardTask) -> Running {
    let (stop, rx) = watch::channel(false);
    Running { stop, task: tokio::spawn(task.run(rx)) }
}

impl Running {
    /// Stops the task; fails if it takes more than about a second.
    async fn stop(self) {
        let start = Instant::now();
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_millis(1500), self.task)
            .await
            .expect("the sender stops promptly")
            .unwrap();
        assert!(start.elapsed() < Duration::from_millis(1500));
    }
}

/// A typed event of `kind` (a few kinds are enough here) whose fields carry `i`.
fn event(vm: Option<&str>, kind: &str, i: usize) -> Event {
    let kind = match kind {
        "reboot" => EventKind::Reboot(event::RebootEvent {
            evidence: event::RebootEvidence::QmpEvent(serde_json::json!({ "event": "RESET", "i": i })),
        }),
        "service-started" => EventKind::ServiceStarted(event::ServiceStarted {
            version: format!("0.{i}"),
            state_dir: "/run/acpimon".into(),
            metrics: None,
        }),
        // Any app-info payload: big ones for the size limits.
        "app-info" => EventKind::AppInfo(event::AppInfo { info: serde_json::json!({ "i": i }) }),
        _ => EventKind::VmRemoved(event::VmRemoved { dir: format!("/run/acpimon/vm{i}").into() }),
    };
    Event::new(event::new_key(), "node1", vm, kind)
}

fn events(n: usize, kind: &str) -> Vec<Event> {
    (0..n).map(|i| event(Some("vm1"), kind, i)).collect()
}

fn keys(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.key.clone()).collect()
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("spool"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.path())
        .collect()
}

fn sh(script: String) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_in_order_and_runs_the_analyzer() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let analyzer = sh("cat; echo; echo \"kind=$ACPIMON_EVENT_KIND vm=$ACPIMON_VM\"".into());
    let ctl = start("127.0.0.1:0".parse().unwrap(), &store, Some(analyzer)).await;
    let (fw, task) = Forwarder::open(config(dir.path(), Some(controller_cfg(ctl.addr)), None)).unwrap();
    let running = run(task);
    let sent = events(5, "reboot");
    for ev in &sent {
        fw.submit(ev).unwrap();
    }
    wait_for("5 deliveries", || fw.stats().delivered == 5).await;
    let s = fw.stats();
    assert_eq!(
        (s.pending_events, s.pending_bytes, s.attempts_failed, s.duplicates_acknowledged),
        (0, 0, 0, 0)
    );
    assert!(s.last_delivery.is_some() && s.last_error.is_none(), "{s:?}");
    assert_eq!(ctl.events().await, sent, "stored events, in order, as sent");
    for ev in &sent {
        let (status, body) = get(ctl.addr, &format!("/v1/events/{}", ev.key)).await;
        assert_eq!(status, 200, "{body}");
        let stored: Event = serde_json::from_str(&body).unwrap();
        assert_eq!(&stored, ev);
    }
    assert!(spool_files(dir.path()).is_empty());
    let log = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_eq!(log.lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Event>>(), sent);

    let analysis = store.join(format!("analysis/{}.txt", sent[0].key));
    wait_for("the analysis", || analysis.exists()).await;
    let text = std::fs::read_to_string(&analysis).unwrap();
    let first_line: Event = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first_line, sent[0]);
    assert!(text.contains("kind=reboot vm=vm1"), "{text}");
    assert!(text.contains("exit status: 0"), "{text}");
    running.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_down_then_up_gets_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let (fw, task) = Forwarder::open(config(dir.path(), Some(controller_cfg(addr)), None)).unwrap();
    let running = run(task);
    let sent = events(20, "transition");
    for ev in &sent {
        fw.submit(ev).unwrap();
    }
    fw.flushed().await;
    wait_for("a failed attempt", || fw.stats().attempts_failed >= 1).await;
    let s = fw.stats();
    assert_eq!((s.pending_events, s.delivered), (20, 0));
    assert!(s.last_error.as_deref().unwrap_or("").contains("cannot connect"), "{s:?}");
    assert_eq!(spool_files(dir.path()).len(), 20);

    let ctl = start(addr, &dir.path().join("store"), None).await;
    wait_for("20 deliveries", || fw.stats().delivered == 20).await;
    let stored = ctl.events().await;
    assert_eq!(keys(&stored), keys(&sent), "each key once, oldest first");
    assert_eq!(ctl.stats().await, (20, 0));
    assert_eq!(fw.stats().pending_events, 0);
    assert!(spool_files(dir.path()).is_empty());
    running.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resends_the_spool_and_the_controller_deduplicates() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = start("127.0.0.1:0".parse().unwrap(), &dir.path().join("store"), None).await;
    let sent = events(5, "bundle");
    {
        // The first run spools to an unreachable controller and dies without sending.
        let (fw, _task) =
            Forwarder::open(config(dir.path(), Some(controller_cfg(free_addr())), None)).unwrap();
        for ev in &sent {
            fw.submit(ev).unwrap();
        }
        assert_eq!(fw.stats().pending_events, 5);
    }
    let (fw, task) = Forwarder::open(config(dir.path(), Some(controller_cfg(ctl.addr)), None)).unwrap();
    assert_eq!(fw.stats().pending_events, 5, "recovered from the spool");
    let running = run(task);
    wait_for("5 deliveries", || fw.stats().delivered == 5).await;
    assert_eq!(keys(&ctl.events().await), keys(&sent));

    // Sent again (as after a crash between delivery and deletion): acknowledged, stored once.
    for ev in &sent {
        fw.submit(ev).unwrap();
    }
    wait_for("5 duplicates", || fw.stats().duplicates_acknowledged == 5).await;
    assert_eq!(fw.stats().delivered, 5);
    assert_eq!(ctl.stats().await, (5, 5));
    assert_eq!(ctl.events().await.len(), 5);
    running.stop().await;

    // The controller's own restart keeps both the events and the duplicate count.
    let store = dir.path().join("store");
    ctl.stop().await;
    let ctl = start("127.0.0.1:0".parse().unwrap(), &store, None).await;
    assert_eq!(ctl.stats().await, (5, 5));
    let body = serde_json::to_vec(&sent[0]).unwrap();
    assert_eq!(post(ctl.addr, Some(&sent[0].key), &body).await.0, 200);
    assert_eq!(keys(&ctl.events().await), keys(&sent));
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_refuses_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let cfg = ControllerConfig { spool_max_events: 3, ..controller_cfg(addr) };
    let (fw, task) = Forwarder::open(config(dir.path(), Some(cfg), None)).unwrap();
    let running = run(task);
    let sent = events(4, "transition");
    for ev in &sent[..3] {
        fw.submit(ev).unwrap();
    }
    fw.flushed().await;
    let spooled: Vec<Vec<u8>> = {
        let mut files = spool_files(dir.path());
        files.sort();
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    };
    let err = fw.submit(&sent[3]).unwrap_err();
    assert!(matches!(err, ForwardError::SpoolFull { pending_events: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("controller.spool_max_events (3)") && msg.contains("bring the controller back"),
        "{msg}"
    );
    fw.flushed().await;
    assert!(std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap().contains(&sent[3].key));
    let mut files = spool_files(dir.path());
    files.sort();
    assert_eq!(files.iter().map(|f| std::fs::read(f).unwrap()).collect::<Vec<_>>(), spooled);
    assert_eq!(fw.stats().rejected_full, 1);

    let ctl = start(addr, &dir.path().join("store"), None).await;
    wait_for("3 deliveries", || fw.stats().delivered == 3).await;
    fw.submit(&sent[3]).unwrap();
    wait_for("the 4th delivery", || fw.stats().delivered == 4).await;
    assert_eq!(keys(&ctl.events().await), keys(&sent));
    running.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_event_is_set_aside_and_does_not_block_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = start("127.0.0.1:0".parse().unwrap(), &dir.path().join("store"), None).await;
    let (fw, task) = Forwarder::open(config(dir.path(), Some(controller_cfg(ctl.addr)), None)).unwrap();
    let mut huge = event(None, "app-info", 0);
    huge.kind = EventKind::AppInfo(event::AppInfo { info: "x".repeat(controller::MAX_BODY).into() });
    let after = event(None, "vm-removed", 1);
    fw.submit(&huge).unwrap();
    fw.submit(&after).unwrap();
    let running = run(task);
    wait_for("the refusal and the delivery", || {
        let s = fw.stats();
        s.rejected_by_controller == 1 && s.delivered == 1
    })
    .await;
    assert!(fw.stats().last_error.unwrap().contains("413"));
    assert_eq!(keys(&ctl.events().await), vec![after.key.clone()]);
    let rejected: Vec<PathBuf> =
        std::fs::read_dir(dir.path().join("spool/rejected")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    let entry = rejected.iter().find(|p| p.extension().unwrap() == "json").unwrap();
    let kept: Event = serde_json::from_slice(&std::fs::read(entry).unwrap()).unwrap();
    assert_eq!(kept, huge);
    let response = rejected.iter().find(|p| p.to_string_lossy().ends_with(".response.txt")).unwrap();
    assert!(std::fs::read_to_string(response).unwrap().starts_with("HTTP 413"));
    running.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_gets_stdin_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hook");
    std::fs::create_dir(&out).unwrap();
    let script = format!(
        "cat > '{o}/'\"$ACPIMON_EVENT_KEY\".json; printf '%s|%s|%s' \"$ACPIMON_EVENT_KEY\" \"$ACPIMON_EVENT_KIND\" \"${{ACPIMON_VM-unset}}\" > '{o}/'\"$ACPIMON_EVENT_KEY\".env",
        o = out.display()
    );
    let hook = HookConfig { argv: sh(script), timeout: Duration::from_secs(5), queue: 8 };
    // No controller: the hook works on its own.
    let (fw, task) = Forwarder::open(config(dir.path(), None, Some(hook))).unwrap();
    let running = run(task);
    let with_vm = event(Some("vm7"), "reboot", 3);
    let without_vm = event(None, "service-started", 0);
    fw.submit(&with_vm).unwrap();
    fw.submit(&without_vm).unwrap();
    wait_for("2 hook runs", || fw.stats().hook_runs == 2).await;
    let s = fw.stats();
    assert_eq!((s.hook_failures, s.hook_dropped), (0, 0), "{s:?}");
    for (ev, env) in [(&with_vm, "reboot|vm7"), (&without_vm, "service-started|unset")] {
        let stdin: Event =
            serde_json::from_slice(&std::fs::read(out.join(format!("{}.json", ev.key))).unwrap()).unwrap();
        assert_eq!(&stdin, ev);
        let got = std::fs::read_to_string(out.join(format!("{}.env", ev.key))).unwrap();
        assert_eq!(got, format!("{}|{env}", ev.key));
    }
    assert!(!dir.path().join("spool").exists(), "no controller, no spool");
    running.stop().await;
}

/// Whether `pid` is gone or a zombie (killed, not yet reaped).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hook_is_killed_and_a_full_queue_drops() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let script = format!("echo $$ > '{}/'\"$ACPIMON_EVENT_KEY\"; exec sleep 30", pids.display());
    // Long enough for the submissions below to happen while the first run is still going.
    let hook = HookConfig { argv: sh(script), timeout: Duration::from_secs(1), queue: 1 };
    let (fw, task) = Forwarder::open(config(dir.path(), None, Some(hook))).unwrap();
    let running = run(task);
    let sent = events(4, "transition");
    fw.submit(&sent[0]).unwrap();
    wait_for("the first hook to start", || read_pid(&pids.join(&sent[0].key)).is_some()).await;
    // The worker is busy: one event fits in the queue, the next is dropped.
    fw.submit(&sent[1]).unwrap();
    fw.submit(&sent[2]).unwrap();
    assert_eq!(fw.stats().hook_dropped, 1);
    wait_for("two killed hooks", || fw.stats().hook_failures == 2).await;
    let s = fw.stats();
    assert_eq!((s.hook_runs, s.hook_dropped), (2, 1), "{s:?}");
    assert!(s.hook_last.as_deref().unwrap_or("").contains("killed"), "{s:?}");
    let first = read_pid(&pids.join(&sent[0].key)).unwrap();
    assert!(dead(first), "hook {first} still running");
    // The second may be killed before it records its pid on a loaded machine.
    if let Some(second) = read_pid(&pids.join(&sent[1].key)) {
        assert!(dead(second), "hook {second} still running");
    }
    assert!(!pids.join(&sent[2].key).exists(), "the dropped event never ran");

    // Shutdown kills a running hook too.
    fw.submit(&sent[3]).unwrap();
    wait_for("the last hook to start", || read_pid(&pids.join(&sent[3].key)).is_some()).await;
    running.stop().await;
    let pid = read_pid(&pids.join(&sent[3].key)).unwrap();
    wait_for("the hook to be killed at shutdown", || dead(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_prompt_while_backing_off_or_waiting_for_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    // Backing off for 20-30 s after a refused connection.
    let cfg = ControllerConfig {
        backoff_min: Duration::from_secs(20),
        backoff_max: Duration::from_secs(30),
        ..controller_cfg(free_addr())
    };
    let (fw, task) = Forwarder::open(config(&dir.path().join("a"), Some(cfg), None)).unwrap();
    let running = run(task);
    fw.submit(&event(None, "vm-removed", 0)).unwrap();
    wait_for("a failed attempt", || fw.stats().attempts_failed == 1).await;
    running.stop().await;
    assert_eq!(spool_files(&dir.path().join("a")).len(), 1, "the entry stays for next time");

    // A "controller" that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let connections = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    let cfg = ControllerConfig { timeout: Duration::from_millis(200), ..controller_cfg(silent_addr) };
    let (fw, task) = Forwarder::open(config(&dir.path().join("b"), Some(cfg), None)).unwrap();
    let running = run(task);
    fw.submit(&event(None, "vm-removed", 0)).unwrap();
    wait_for("a timed-out attempt", || fw.stats().attempts_failed >= 1).await;
    let s: ForwardStats = fw.stats();
    assert!(s.last_error.as_deref().unwrap_or("").contains("no answer within"), "{s:?}");
    running.stop().await;

    // Stop in the middle of an attempt that would wait 30 s for its answer.
    let cfg = ControllerConfig { timeout: Duration::from_secs(30), ..controller_cfg(silent_addr) };
    let (fw, task) = Forwarder::open(config(&dir.path().join("b"), Some(cfg), None)).unwrap();
    assert_eq!(fw.stats().pending_events, 1);
    let before = connections();
    let running = run(task);
    wait_for("the attempt to connect", || connections() > before).await;
    running.stop().await;
    assert_eq!(fw.stats().attempts_failed, 0, "abandoned, not failed");
    assert_eq!(spool_files(&dir.path().join("b")).len(), 1, "the entry stays for next time");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_refuses_bad_input_and_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = start("127.0.0.1:0".parse().unwrap(), &dir.path().join("store"), None).await;
    let a = ctl.addr;
    let ev = event(None, "vm-removed", 0);
    let body = serde_json::to_vec(&ev).unwrap();
    let mut bad_key = ev.clone();
    bad_key.key = "../../etc/passwd".into();

    assert_eq!(post(a, Some("other-key"), &body).await.0, 400, "header and body keys differ");
    assert_eq!(post(a, Some("bad key!"), &body).await.0, 400);
    assert_eq!(post(a, None, &serde_json::to_vec(&bad_key).unwrap()).await.0, 400);
    assert_eq!(post(a, None, b"{\"key\":").await.0, 400);
    assert_eq!(post(a, None, &[0xff, 0xfe, 0]).await.0, 400);
    let (status, text) = raw(
        a,
        b"POST /v1/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 2000000\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(get(a, "/v1/nothing").await.0, 404);
    assert_eq!(raw(a, b"DELETE /v1/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.0, 405);
    // Not HTTP at all, a header too large, a connection closed at once, an unfinished request.
    let (status, _) = raw(a, b"\x00\x01\x02 GARBAGE \xff\r\n\r\n").await;
    assert!(status == 0 || status == 400, "{status}");
    let mut big = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    let (status, _) = raw(a, &big).await;
    assert!(status == 0 || status == 431, "{status}");
    drop(TcpStream::connect(a).await.unwrap());
    let mut half = TcpStream::connect(a).await.unwrap();
    half.write_all(b"POST /v1/events HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"k").await.unwrap();
    drop(half);

    assert_eq!(get(a, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(post(a, Some(&ev.key), &body).await.0, 201);
    assert_eq!(post(a, Some(&ev.key), &body).await.0, 200);
    assert_eq!(ctl.stats().await, (1, 1));
    assert_eq!(ctl.events().await, vec![ev]);

    // A second controller on the same address says what is wrong.
    let msg = Controller::start(common::inproc::options(a, &dir.path().join("store2")))
        .await
        .err()
        .expect("a second controller on a taken address")
        .to_string();
    assert!(msg.contains(&a.to_string()) && msg.contains("--listen"), "{msg}");
    ctl.stop().await;
}
