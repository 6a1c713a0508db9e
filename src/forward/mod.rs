//! Forwarding: every event the service emits goes to a JSON-lines log, a durable on-disk spool
//! that an HTTP sender drains to the controller (at-least-once, idempotency key per event), and
//! an optional `exec` analyzer hook. [`controller`] is the small reference controller.
//!
//! Why this shape:
//!
//! - The **log** is written first and always: whatever happens downstream, the node keeps its
//!   own record.
//! - The **spool** decouples monitoring from the network. [`Forwarder::submit`] only writes a
//!   file (tmp, fsync, rename, fsync the directory), so a slow or absent controller never stalls
//!   the watch loop, and an event that `submit` accepted survives `kill -9` and power loss. The
//!   sender ([`ForwardTask`]) drains it oldest-first and deletes an entry only once the
//!   controller answered 2xx. A crash between "controller stored it" and "entry deleted" means
//!   the event is sent again: delivery is at-least-once, and the event's `key`, sent as
//!   `Idempotency-Key`, lets the controller drop the copy. The spool is bounded: when it is
//!   full `submit` says so (the event stays in the log) rather than filling the disk.
//! - The **hook** is best-effort, not durable: it runs one event at a time from a bounded
//!   in-memory queue, and events queued when the service stops, or dropped because the queue
//!   was full, are not run again. The spool and the controller are the durable path; the hook
//!   is for quick local reactions.
//!
//! One spool directory belongs to one running service: two processes sharing it would send
//! every event twice (harmless, deduplicated) and could race on names (not harmless).

pub mod controller;
mod hook;
mod http;
mod spool;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

pub use http::{parse_url, Endpoint};

pub use crate::event::{new_key, valid_key, Event, RawEvent, MAX_KEY_LEN};

/// Where events go. Built by the CLI from `watch`'s configuration.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// JSON-lines event log (appended; one [`Event`] per line).
    pub log: Option<PathBuf>,
    /// The durable spool of events not yet acknowledged by the controller. Only used (and
    /// created) when a controller is configured.
    pub spool_dir: PathBuf,
    pub controller: Option<ControllerConfig>,
    pub hook: Option<HookConfig>,
}

/// The controller events are POSTed to.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// `http://HOST[:PORT][/PREFIX]`; events go to `{url}/v1/events`. No https: put a local
    /// TLS proxy in front.
    pub url: String,
    /// Per request, connection included.
    pub timeout: Duration,
    /// Bounds of the spool; `submit` refuses events beyond either.
    pub spool_max_bytes: u64,
    pub spool_max_events: usize,
    /// Retry delays after a failure: doubling from `backoff_min` up to `backoff_max`, jittered.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// A program run for each event, best-effort (see the module docs).
#[derive(Clone, Debug)]
pub struct HookConfig {
    /// Program and arguments, run directly (never through a shell). The event's JSON is on its
    /// stdin; its stdout is discarded, its stderr is the service's.
    pub argv: Vec<String>,
    /// A run still going after this is killed and counted as a failure.
    pub timeout: Duration,
    /// Events waiting for the hook; beyond this they are dropped and counted.
    pub queue: usize,
}

/// Counters of the forwarding stage, for `watch`'s status output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardStats {
    /// Events the controller acknowledged as new (2xx other than 200).
    pub delivered: u64,
    /// Events the controller said it already had (200): resent after a crash or a lost reply.
    pub duplicates_acknowledged: u64,
    /// Delivery attempts that failed and will be retried (network, timeout, 5xx, 408, 429).
    pub attempts_failed: u64,
    /// Events the controller refused (other 4xx), moved to `spool_dir/rejected/`.
    pub rejected_by_controller: u64,
    /// Spool entries found damaged and moved to `spool_dir/corrupt/`.
    pub spool_corrupt: u64,
    /// Events in the spool, not yet acknowledged.
    pub pending_events: usize,
    pub pending_bytes: u64,
    /// Events `submit` could not spool because the spool was full.
    pub rejected_full: u64,
    /// Hook runs finished (successful or not), runs that failed (non-zero exit, killed after
    /// the timeout, could not start), and events dropped because the hook queue was full.
    pub hook_runs: u64,
    pub hook_failures: u64,
    pub hook_dropped: u64,
    /// How the last hook run ended.
    pub hook_last: Option<String>,
    /// The last delivery problem.
    pub last_error: Option<String>,
    /// When the controller last acknowledged an event (RFC 3339).
    pub last_delivery: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("controller URL '{url}' is not http://HOST[:PORT][/PATH]: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("controller URL '{0}' is https, which acpimon does not speak; use http:// to a local TLS proxy (e.g. stunnel) in front of the controller")]
    Https(String),
    #[error("invalid forwarding setting: {0}")]
    Config(String),
    #[error("cannot create directory {path}: {source}; check that its parent exists and is writable")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open event log {path}: {source}; check that its directory is writable")]
    OpenLog { path: PathBuf, source: std::io::Error },
    #[error("cannot append to event log {path}: {source}; is the disk full?")]
    WriteLog { path: PathBuf, source: std::io::Error },
    #[error("cannot read spool {path}: {source}; check its permissions")]
    ReadSpool { path: PathBuf, source: std::io::Error },
    #[error("cannot write spool entry {path}: {source}; is the disk full? The event is only in the log")]
    WriteSpool { path: PathBuf, source: std::io::Error },
    #[error("spool full ({pending_events} events, {pending_bytes} bytes pending; limit {limit}): the event is only in the log; bring the controller back or raise controller.spool_max_bytes / controller.spool_max_events")]
    SpoolFull { limit: String, pending_events: usize, pending_bytes: u64 },
    #[error("bad event: {0}")]
    BadEvent(String),
}

/// What the hook worker gets: the event and its JSON, serialised once.
struct HookJob {
    event: Event,
    json: Arc<[u8]>,
}

struct Shared {
    log: Option<(PathBuf, Mutex<File>)>,
    spool: Option<Arc<spool::Spool>>,
    hook: Option<mpsc::Sender<HookJob>>,
    stats: Arc<Mutex<ForwardStats>>,
    wake: Arc<Notify>,
}

/// The submitting side of the forwarding stage: a cheap handle, shared by every VM's watcher.
#[derive(Clone)]
pub struct Forwarder {
    shared: Arc<Shared>,
}

/// The sending side: drains the spool to the controller and runs the hook. Spawn
/// [`ForwardTask::run`] once.
pub struct ForwardTask {
    spool: Option<Arc<spool::Spool>>,
    controller: Option<(Endpoint, ControllerConfig)>,
    hook: Option<(HookConfig, mpsc::Receiver<HookJob>)>,
    stats: Arc<Mutex<ForwardStats>>,
    wake: Arc<Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters or a file handle behind,
    // both still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn create_dir(path: &Path) -> Result<(), ForwardError> {
    std::fs::create_dir_all(path).map_err(|source| ForwardError::CreateDir { path: path.into(), source })
}

fn validate(cfg: &ForwardConfig) -> Result<Option<Endpoint>, ForwardError> {
    let endpoint = match &cfg.controller {
        None => None,
        Some(c) => {
            let ep = parse_url(&c.url)?;
            if c.timeout.is_zero() {
                return Err(ForwardError::Config(
                    "controller.timeout must be more than 0; try \"10s\"".into(),
                ));
            }
            if c.spool_max_events == 0 || c.spool_max_bytes == 0 {
                return Err(ForwardError::Config(
                    "controller.spool_max_events and spool_max_bytes must be more than 0".into(),
                ));
            }
            if c.backoff_min.is_zero() || c.backoff_min > c.backoff_max {
                return Err(ForwardError::Config(format!(
                    "controller.backoff_min ({}) must be more than 0 and at most backoff_max ({}); try \"1s\" and \"1m\"",
                    crate::units::format_duration(c.backoff_min),
                    crate::units::format_duration(c.backoff_max)
                )));
            }
            Some(ep)
        }
    };
    if let Some(h) = &cfg.hook {
        if h.argv.is_empty() || h.argv[0].is_empty() {
            return Err(ForwardError::Config(
                "hook.argv is empty; give the program and its arguments".into(),
            ));
        }
        if h.timeout.is_zero() || h.queue == 0 {
            return Err(ForwardError::Config("hook.timeout and hook.queue must be more than 0".into()));
        }
    }
    Ok(endpoint)
}

impl Forwarder {
    /// Validates the configuration, creates the directories, opens the log and recovers the
    /// spool: entries left by a previous run are sent again (at-least-once); damaged ones are
    /// moved to `spool_dir/corrupt/` with a warning.
    pub fn open(cfg: ForwardConfig) -> Result<(Forwarder, ForwardTask), ForwardError> {
        let endpoint = validate(&cfg)?;
        let log = match &cfg.log {
            None => None,
            Some(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    create_dir(parent)?;
                }
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ForwardError::OpenLog { path: path.clone(), source })?;
                Some((path.clone(), Mutex::new(file)))
            }
        };
        let spool = match &cfg.controller {
            None => {
                let left = spool::count_entries(&cfg.spool_dir);
                if left > 0 {
                    eprintln!(
                        "acpimon: warning: spool {} holds {left} unsent events and no controller is configured; they stay there until one is",
                        cfg.spool_dir.display()
                    );
                }
                None
            }
            Some(c) => {
                let (spool, recovery) =
                    spool::Spool::open(&cfg.spool_dir, c.spool_max_bytes, c.spool_max_events)?;
                if recovery.entries > 0 {
                    eprintln!(
                        "acpimon: spool {}: {} events from a previous run will be sent again",
                        cfg.spool_dir.display(),
                        recovery.entries
                    );
                }
                Some(Arc::new(spool))
            }
        };
        let (hook_tx, hook) = match cfg.hook {
            None => (None, None),
            Some(h) => {
                let (tx, rx) = mpsc::channel(h.queue);
                (Some(tx), Some((h, rx)))
            }
        };
        let stats = Arc::new(Mutex::new(ForwardStats::default()));
        let wake = Arc::new(Notify::new());
        let shared =
            Shared { log, spool: spool.clone(), hook: hook_tx, stats: stats.clone(), wake: wake.clone() };
        let task = ForwardTask { spool, controller: endpoint.zip(cfg.controller), hook, stats, wake };
        Ok((Forwarder { shared: Arc::new(shared) }, task))
    }

    /// Hands one event on: appends it to the log, writes it durably to the spool (when a
    /// controller is configured), queues it for the hook and wakes the sender. Synchronous and
    /// quick (a write and two fsyncs); never waits for the network or the hook.
    ///
    /// Every destination is tried; the first failure is returned. [`ForwardError::SpoolFull`]
    /// means the event is in the log (and the hook queue) but will not reach the controller.
    pub fn submit(&self, ev: &Event) -> Result<(), ForwardError> {
        ev.validate().map_err(|e| ForwardError::BadEvent(e.to_string()))?;
        let json = serde_json::to_vec(ev).map_err(|e| ForwardError::BadEvent(e.to_string()))?;
        let mut first_error = None;
        if let Some((path, file)) = &self.shared.log {
            let mut line = Vec::with_capacity(json.len() + 1);
            line.extend_from_slice(&json);
            line.push(b'\n');
            // One write of the whole line to an O_APPEND file: lines of concurrent submitters
            // never interleave.
            if let Err(source) = lock(file).write_all(&line) {
                first_error = Some(ForwardError::WriteLog { path: path.clone(), source });
            }
        }
        if let Some(spool) = &self.shared.spool {
            let pushed = spool.push(&json);
            // Also after a failed write: the sender may be waiting for that entry.
            self.shared.wake.notify_one();
            if let Err(e) = pushed {
                if matches!(e, ForwardError::SpoolFull { .. }) {
                    lock(&self.shared.stats).rejected_full += 1;
                }
                first_error.get_or_insert(e);
            }
        }
        if let Some(hook) = &self.shared.hook {
            let job = HookJob { event: ev.clone(), json: json.into() };
            if hook.try_send(job).is_err() {
                lock(&self.shared.stats).hook_dropped += 1;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ForwardStats {
        let mut s = lock(&self.shared.stats).clone();
        if let Some(spool) = &self.shared.spool {
            (s.pending_events, s.pending_bytes) = spool.pending();
            s.spool_corrupt = spool.corrupt_count();
        }
        s
    }
}

/// Resolves when `shutdown` says true or its sender is gone.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

impl ForwardTask {
    /// Sends spooled events until `shutdown` turns true (or its sender is dropped), and runs the
    /// hook on its own task meanwhile. Returns within about a second of shutdown: a request in
    /// flight is abandoned (its entry stays in the spool and is sent again next time) and a
    /// running hook is killed.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let ForwardTask { spool, controller, hook, stats, wake } = self;
        let hook_task = hook.map(|(cfg, rx)| tokio::spawn(hook::run_hooks(cfg, rx, stats.clone())));
        match (spool, controller) {
            (Some(spool), Some((endpoint, cfg))) => {
                let sender = Sender { spool, endpoint, cfg, stats, wake };
                tokio::select! {
                    _ = sender.run() => {}
                    _ = stopped(&mut shutdown) => {}
                }
            }
            _ => stopped(&mut shutdown).await,
        }
        if let Some(task) = hook_task {
            task.abort();
            let _ = task.await;
        }
    }
}

/// The spool drainer.
struct Sender {
    spool: Arc<spool::Spool>,
    endpoint: Endpoint,
    cfg: ControllerConfig,
    stats: Arc<Mutex<ForwardStats>>,
    wake: Arc<Notify>,
}

impl Sender {
    async fn run(self) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut failing = false;
        loop {
            let entry = match self.spool.next() {
                spool::Next::Empty | spool::Next::Writing => {
                    self.wake.notified().await;
                    continue;
                }
                spool::Next::Ready(seq) => match self.spool.load(seq) {
                    Some(entry) => entry,
                    // Gone, or damaged (then moved aside, reported and counted by the spool).
                    None => continue,
                },
            };
            let outcome = http::post_event(&self.endpoint, &entry.key, entry.body, self.cfg.timeout).await;
            match outcome {
                http::Delivery::Stored | http::Delivery::Duplicate => {
                    self.spool.remove(entry.seq);
                    backoff.reset();
                    let mut s = lock(&self.stats);
                    if matches!(outcome, http::Delivery::Duplicate) {
                        s.duplicates_acknowledged += 1;
                    } else {
                        s.delivered += 1;
                    }
                    s.last_delivery = Some(crate::units::now_rfc3339());
                    if failing {
                        failing = false;
                        eprintln!("acpimon: controller {} reachable again; delivering", self.cfg.url);
                    }
                }
                http::Delivery::Rejected { status, body } => {
                    let message = format!(
                        "controller refused event {} with {status}: {}; kept in {}/rejected/ (if every event is refused, check controller.url)",
                        entry.key,
                        body.trim(),
                        self.spool.dir().display()
                    );
                    eprintln!("acpimon: {message}");
                    let response = format!("HTTP {status}\n{body}\n");
                    if let Err(e) = self.spool.reject(entry.seq, &response) {
                        // Cannot move it aside: retry later rather than lose it.
                        lock(&self.stats).last_error = Some(format!("{message}; moving it failed: {e}"));
                        self.pause(&mut backoff).await;
                        continue;
                    }
                    let mut s = lock(&self.stats);
                    s.rejected_by_controller += 1;
                    s.last_error = Some(message);
                }
                http::Delivery::Retry(reason) => {
                    let message = format!("cannot deliver to {}: {reason}; retrying", self.cfg.url);
                    if !failing {
                        failing = true;
                        eprintln!("acpimon: {message}");
                    }
                    {
                        let mut s = lock(&self.stats);
                        s.attempts_failed += 1;
                        s.last_error = Some(message);
                    }
                    self.pause(&mut backoff).await;
                }
            }
        }
    }

    /// Sleeps the next backoff delay; new submissions do not shorten it.
    async fn pause(&self, backoff: &mut Backoff) {
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Exponential backoff with jitter: the n-th consecutive failure waits a random time between
/// half and all of `min * 2^(n-1)` (capped at `max`), never less than `min`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let hi = base.as_nanos().min(u64::MAX as u128) as u64;
        let lo = (hi / 2).max(self.min.as_nanos().min(hi as u128) as u64);
        Duration::from_nanos(rand::random_range(lo..=hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn controller(url: &str) -> ControllerConfig {
        ControllerConfig {
            url: url.into(),
            timeout: Duration::from_secs(1),
            spool_max_bytes: 1 << 20,
            spool_max_events: 1000,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
        }
    }

    /// The `i`-th test event (its directory names it).
    fn event(i: usize) -> Event {
        let dir = format!("/run/acpimon/vm{i}").into();
        Event::new(new_key(), "n", None, EventKind::VmRemoved(crate::event::VmRemoved { dir }))
    }

    fn config(dir: &Path, controller: Option<ControllerConfig>) -> ForwardConfig {
        ForwardConfig {
            log: Some(dir.join("log/events.jsonl")),
            spool_dir: dir.join("spool"),
            controller,
            hook: None,
        }
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(min, max);
        let bases = [100, 200, 400, 800, 1000, 1000];
        for base in bases {
            let d = b.next_delay();
            let base = Duration::from_millis(base);
            assert!(d >= min && d <= base && d >= base / 2, "{d:?} not within [{:?}, {base:?}]", base / 2);
        }
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn open_validates_settings() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            |c: ControllerConfig| Forwarder::open(config(dir.path(), Some(c))).err().unwrap().to_string();
        assert!(err(controller("https://h/")).contains("TLS proxy"));
        assert!(err(controller("ftp://h/")).contains("http://HOST"));
        assert!(err(ControllerConfig { backoff_min: Duration::ZERO, ..controller("http://h") })
            .contains("backoff_min"));
        assert!(err(ControllerConfig { spool_max_events: 0, ..controller("http://h") }).contains("spool_max"));
        let mut cfg = config(dir.path(), None);
        cfg.hook = Some(HookConfig { argv: vec![], timeout: Duration::from_secs(1), queue: 1 });
        assert!(Forwarder::open(cfg.clone()).err().unwrap().to_string().contains("hook.argv"));
        cfg.hook = Some(HookConfig { argv: vec!["true".into()], timeout: Duration::from_secs(1), queue: 0 });
        assert!(Forwarder::open(cfg).err().unwrap().to_string().contains("hook.queue"));
    }

    #[test]
    fn submit_logs_and_spools() {
        let dir = tempfile::tempdir().unwrap();
        let (fw, _task) =
            Forwarder::open(config(dir.path(), Some(controller("http://127.0.0.1:9")))).unwrap();
        let events: Vec<Event> = (0..3).map(event).collect();
        for ev in &events {
            fw.submit(ev).unwrap();
        }
        let log = std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap();
        let logged: Vec<Event> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(logged, events);
        let s = fw.stats();
        assert_eq!((s.pending_events, s.pending_bytes), (3, log.len() as u64 - 3));
        // A bad event goes nowhere.
        let mut bad = events[0].clone();
        bad.key = String::new();
        assert!(matches!(fw.submit(&bad), Err(ForwardError::BadEvent(_))));
        assert_eq!(std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap(), log);
    }

    #[test]
    fn spool_full_keeps_the_log_line_and_the_spooled_entries() {
        let dir = tempfile::tempdir().unwrap();
        let c = ControllerConfig { spool_max_events: 2, ..controller("http://127.0.0.1:9") };
        let (fw, _task) = Forwarder::open(config(dir.path(), Some(c))).unwrap();
        let events: Vec<Event> = (0..3).map(event).collect();
        fw.submit(&events[0]).unwrap();
        fw.submit(&events[1]).unwrap();
        let spooled = spool::tests::entries(&dir.path().join("spool"));
        let err = fw.submit(&events[2]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ForwardError::SpoolFull { pending_events: 2, .. }), "{msg}");
        assert!(
            msg.contains("controller.spool_max_events (2)") && msg.contains("bring the controller back"),
            "{msg}"
        );
        assert_eq!(spool::tests::entries(&dir.path().join("spool")), spooled);
        let log = std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 3);
        assert!(log.contains(&events[2].key));
        let s = fw.stats();
        assert_eq!((s.rejected_full, s.pending_events), (1, 2));

        let dir = tempfile::tempdir().unwrap();
        let c = ControllerConfig { spool_max_bytes: 500, ..controller("http://127.0.0.1:9") };
        let (fw, _task) = Forwarder::open(config(dir.path(), Some(c))).unwrap();
        let big = |pad: usize| {
            let dir = format!("/{}", "x".repeat(pad)).into();
            Event::new(new_key(), "n", None, EventKind::VmRemoved(crate::event::VmRemoved { dir }))
        };
        fw.submit(&big(250)).unwrap();
        let msg = fw.submit(&big(251)).unwrap_err().to_string();
        assert!(msg.contains("controller.spool_max_bytes (500)"), "{msg}");
    }
}
