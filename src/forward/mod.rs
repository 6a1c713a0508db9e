//! Forwarding: every event the service emits goes to a JSON-lines log, a durable on-disk spool
//! that an HTTP sender drains to the controller (at-least-once, idempotency key per event), and
//! an optional `exec` analyzer hook. [`controller`] is the small reference controller.
//!
//! Why this shape:
//!
//! - **Nothing here waits on the disk or the network in the caller.** [`Forwarder::submit`]
//!   checks the event, reserves its spool slot and hands it to the writer thread
//!   (`writer.rs`), which appends it to the log, writes its spool entry and fsyncs both, in
//!   batches. A VM's loop never waits for a write, an fsync, the controller or the hook.
//! - **Accepted and acknowledged.** An event `submit` returned from is *accepted*: it will be
//!   written to the log (and spooled) in order, unless the service dies first. It is
//!   *acknowledged* once the writer has fsynced it in the log and the spool: only then does the
//!   sender see its spool entry and does [`ForwardStats::events_logged`] count it. An
//!   acknowledged event survives `kill -9` and power loss; an accepted one that was not yet
//!   acknowledged may be lost with the process (a burst is typically acknowledged within
//!   milliseconds). [`Forwarder::flushed`] waits until everything accepted is acknowledged; the
//!   service does that when it stops.
//! - **A full disk** does not lose accepted events: the writer holds them in memory, bounded
//!   ([`HoldLimits`]), and writes them in order when the disk takes writes again; beyond the
//!   bound, events are dropped with a count and a [`Loss`] report ([`Forwarder::take_loss`]),
//!   and [`ForwardStats::disk_condition`] is the service's "disk full" health condition. A
//!   failed append is cut back, so the log never holds a torn line (see `writer.rs`).
//! - The **log** is written first and always: whatever happens downstream, the node keeps its
//!   own record. A torn last line (a power cut mid-append, never acknowledged) is cut off when
//!   the log is opened.
//! - The **spool** decouples monitoring from the network. The sender ([`ForwardTask`]) drains
//!   it oldest-first and deletes an entry only once the controller answered 2xx. A crash
//!   between "controller stored it" and "entry deleted" means the event is sent again: delivery
//!   is at-least-once, and the event's `key`, sent as `Idempotency-Key`, lets the controller
//!   drop the copy. The spool is bounded: when it is full `submit` says so at once (the event
//!   still goes to the log) rather than filling the disk.
//! - The **hook** is best-effort, not durable: it runs one event at a time from a bounded
//!   in-memory queue, and events queued when the service stops, or dropped because the queue
//!   was full, are not run again. The spool and the controller are the durable path; the hook
//!   is for quick local reactions.
//! - The writer also replaces the service's **state files** ([`Forwarder::save_state`]), in
//!   order with the events, so a VM's remembered sequence never runs ahead of its events on
//!   disk.
//!
//! One spool directory belongs to one running service: two processes sharing it would send
//! every event twice (harmless, deduplicated) and could race on names (not harmless).

/// The reference controller moved to [`crate::controller`]; this path stays for callers.
#[cfg(feature = "controller")]
pub use crate::controller;
mod hook;
mod http;
mod spool;
mod writer;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::util::{lock, until_true};
use writer::Job;

pub use http::{parse_url, Endpoint, Link};
pub use writer::{HoldLimits, Loss};

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
    /// What the writer holds in memory while the disk refuses writes (see `writer.rs`).
    pub hold: HoldLimits,
}

/// The controller events are POSTed to.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// `http[s]://HOST[:PORT][/PREFIX]`; events go to `{url}/v1/events`.
    pub url: String,
    /// CA certificates (PEM) to trust for an https controller instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM chain) and its key, for a controller that requires one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// A file holding this node's bearer token (`acpimon token add` prints it).
    pub token_file: Option<PathBuf>,
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
    /// Events `submit` accepted (handed to the writer).
    #[serde(default)]
    pub events_accepted: u64,
    /// Events acknowledged: appended to the log and fsynced (and spooled, when a controller
    /// is configured). Counts every accepted event when there is no log.
    #[serde(default)]
    pub events_logged: u64,
    /// Writes that failed (log, spool entry, state file), and the last such failure.
    #[serde(default)]
    pub write_failures: u64,
    #[serde(default)]
    pub last_write_error: Option<String>,
    /// Accepted events held in memory because the disk refuses writes (full or failing),
    /// waiting to be written in order.
    #[serde(default)]
    pub held_events: usize,
    #[serde(default)]
    pub held_bytes: u64,
    /// Accepted events dropped because the disk refused writes and the hold was full (or the
    /// service stopped with events held): lost, counted and reported.
    #[serde(default)]
    pub events_lost: u64,
    /// Set while the disk refuses writes: the first failure ("disk full: cannot append ...").
    /// The service's "disk full" health condition.
    #[serde(default)]
    pub disk_problem: Option<String>,
    /// A loss not yet reported as an `events-lost` event ([`Forwarder::take_loss`]).
    #[serde(skip)]
    pub unreported_loss: Option<Loss>,
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

impl ForwardStats {
    /// The "disk full" health condition: why the service is not healthy on the disk's
    /// account, or `None`. Set while events are held in memory (and maybe lost).
    pub fn disk_condition(&self) -> Option<String> {
        let problem = self.disk_problem.as_ref()?;
        let lost =
            if self.events_lost > 0 { format!(", {} lost so far", self.events_lost) } else { String::new() };
        Some(format!(
            "{problem}; {} events ({} bytes) held in memory{lost}",
            self.held_events, self.held_bytes
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("controller URL '{url}' is not http[s]://HOST[:PORT][/PATH]: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("controller TLS: {0}")]
    Tls(#[from] crate::util::tls::TlsError),
    #[error("cannot read controller.token_file {path}: {source}; give the file holding the token `acpimon token add` printed for this node")]
    TokenFile { path: PathBuf, source: std::io::Error },
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
    #[error("cannot start the event writer thread: {0}")]
    StartWriter(std::io::Error),
    #[error(
        "the event writer thread is gone (see the messages above); the event is lost; restart the service"
    )]
    WriterGone,
}

/// What the hook worker gets: the event and its JSON, serialised once.
struct HookJob {
    event: Event,
    json: Arc<[u8]>,
}

struct Shared {
    writer: WriterHandle,
    spool: Option<Arc<spool::Spool>>,
    hook: Option<mpsc::Sender<HookJob>>,
    stats: Arc<Mutex<ForwardStats>>,
}

/// The writer thread's queue and thread; dropping it lets the thread write what is queued and
/// waits for it.
struct WriterHandle {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriterHandle {
    fn send(&self, job: Job) -> Result<(), ForwardError> {
        self.jobs.as_ref().and_then(|j| j.send(job).ok()).ok_or(ForwardError::WriterGone)
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The submitting side of the forwarding stage: a cheap handle, shared by every VM's watcher.
/// When the last one is dropped, everything accepted is written before the drop returns.
#[derive(Clone)]
pub struct Forwarder {
    shared: Arc<Shared>,
}

/// The sending side: drains the spool to the controller and runs the hook. Spawn
/// [`ForwardTask::run`] once.
pub struct ForwardTask {
    spool: Option<Arc<spool::Spool>>,
    controller: Option<(Link, ControllerConfig)>,
    hook: Option<(HookConfig, mpsc::Receiver<HookJob>)>,
    stats: Arc<Mutex<ForwardStats>>,
    wake: Arc<Notify>,
}

fn create_dir(path: &Path) -> Result<(), ForwardError> {
    std::fs::create_dir_all(path).map_err(|source| ForwardError::CreateDir { path: path.into(), source })
}

impl ControllerConfig {
    /// Checks the settings, parses the URL, loads the TLS files and the token. The one rule
    /// set for these settings: the configuration file reports what this says at the
    /// `[controller]` section.
    pub fn validate(&self) -> Result<Link, ForwardError> {
        let endpoint = parse_url(&self.url)?;
        if !endpoint.tls && (self.ca_file.is_some() || self.client_cert.is_some()) {
            return Err(ForwardError::Config(
                "controller.ca_file and client_cert are for an https:// controller; use https:// in controller.url or remove them".into(),
            ));
        }
        let client_cert = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ForwardError::Config(
                    "controller.client_cert and client_key go together; give both or neither".into(),
                ))
            }
        };
        let tls = if endpoint.tls {
            let tls = crate::util::tls::ClientTls { ca_file: self.ca_file.clone(), client_cert };
            Some(tokio_rustls::TlsConnector::from(tls.config()?))
        } else {
            None
        };
        let token = match &self.token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ForwardError::TokenFile { path: path.clone(), source })?;
                let token = text.trim();
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ForwardError::Config(format!(
                        "controller.token_file {} holds no token (one line of printable characters); put the token `acpimon token add` printed in it",
                        path.display()
                    )));
                }
                Some(token.to_string())
            }
        };
        if self.timeout.is_zero() {
            return Err(ForwardError::Config("controller.timeout must be more than 0; try \"10s\"".into()));
        }
        if self.spool_max_events == 0 || self.spool_max_bytes == 0 {
            return Err(ForwardError::Config(
                "controller.spool_max_events and spool_max must be more than 0".into(),
            ));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(ForwardError::Config(format!(
                "controller.backoff_min ({}) must be more than 0 and at most backoff_max ({}); try \"1s\" and \"1m\"",
                crate::units::format_duration(self.backoff_min),
                crate::units::format_duration(self.backoff_max)
            )));
        }
        Ok(Link { endpoint, tls, token })
    }
}

impl HookConfig {
    /// Checks the settings; the one rule set, as for [`ControllerConfig::validate`].
    pub fn validate(&self) -> Result<(), ForwardError> {
        if self.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(ForwardError::Config(
                "hook.argv is empty; give the program and its arguments as a list".into(),
            ));
        }
        if self.timeout.is_zero() || self.queue == 0 {
            return Err(ForwardError::Config("hook.timeout and hook.queue must be more than 0".into()));
        }
        Ok(())
    }
}

fn validate(cfg: &ForwardConfig) -> Result<Option<Link>, ForwardError> {
    let endpoint = cfg.controller.as_ref().map(ControllerConfig::validate).transpose()?;
    if let Some(h) = &cfg.hook {
        h.validate()?;
    }
    if cfg.hold.max_bytes == 0 || cfg.hold.max_events == 0 {
        return Err(ForwardError::Config(
            "event_hold_max and event_hold_max_events must be more than 0; try \"16MiB\" and 50000".into(),
        ));
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
                let parent = crate::util::fs::parent(path);
                create_dir(parent)?;
                let open_err = |source| ForwardError::OpenLog { path: path.clone(), source };
                let mut file =
                    OpenOptions::new().create(true).read(true).append(true).open(path).map_err(open_err)?;
                let cut = writer::cut_torn_tail(&mut file).map_err(open_err)?;
                if cut > 0 {
                    tracing::warn!(
                        log = %path.display(),
                        bytes = cut,
                        "event log: cut off a torn last line (never acknowledged)"
                    );
                }
                // The log's own name must survive a power cut too.
                crate::util::fs::sync_dir(parent).map_err(open_err)?;
                Some((path.clone(), file))
            }
        };
        let spool = match &cfg.controller {
            None => {
                let left = spool::count_entries(&cfg.spool_dir);
                if left > 0 {
                    tracing::warn!(
                        spool = %cfg.spool_dir.display(),
                        "the spool holds {left} unsent events and no controller is configured; they stay there until one is"
                    );
                }
                None
            }
            Some(c) => {
                let (spool, recovery) =
                    spool::Spool::open(&cfg.spool_dir, c.spool_max_bytes, c.spool_max_events)?;
                if recovery.entries > 0 {
                    tracing::info!(
                        spool = %cfg.spool_dir.display(),
                        "{} events from a previous run will be sent again",
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
        let (jobs, queue) = std::sync::mpsc::channel();
        let w = writer::Writer {
            log,
            spool: spool.clone(),
            stats: stats.clone(),
            wake: wake.clone(),
            limits: cfg.hold,
        };
        let thread = std::thread::Builder::new()
            .name("acpimon-writer".into())
            .spawn(move || w.run(queue))
            .map_err(ForwardError::StartWriter)?;
        let writer = WriterHandle { jobs: Some(jobs), thread: Some(thread) };
        let shared = Shared { writer, spool: spool.clone(), hook: hook_tx, stats: stats.clone() };
        let task = ForwardTask { spool, controller: endpoint.zip(cfg.controller), hook, stats, wake };
        Ok((Forwarder { shared: Arc::new(shared) }, task))
    }

    /// Hands one event on: reserves its spool slot (when a controller is configured), queues
    /// it for the writer (log, then spool) and for the hook. Never waits: not for the disk, the
    /// network or the hook. Returning `Ok` means *accepted*, not yet *acknowledged* (see the
    /// module docs).
    ///
    /// Every destination is tried; the first failure is returned. [`ForwardError::SpoolFull`]
    /// means the event goes to the log (and the hook queue) but will not reach the controller.
    /// Write failures come later, from the writer: reported on stderr and counted.
    pub fn submit(&self, ev: &Event) -> Result<(), ForwardError> {
        ev.validate().map_err(|e| ForwardError::BadEvent(e.to_string()))?;
        let json: Arc<[u8]> =
            serde_json::to_vec(ev).map_err(|e| ForwardError::BadEvent(e.to_string()))?.into();
        let mut first_error = None;
        let spool_seq = match &self.shared.spool {
            None => None,
            Some(spool) => match spool.reserve(json.len() as u64) {
                Ok(seq) => Some(seq),
                Err(e) => {
                    if matches!(e, ForwardError::SpoolFull { .. }) {
                        lock(&self.shared.stats).rejected_full += 1;
                    }
                    first_error = Some(e);
                    None
                }
            },
        };
        if let Err(e) = self.shared.writer.send(Job::Event {
            json: json.clone(),
            spool_seq,
            time: ev.time.clone(),
            logged: false,
        }) {
            if let (Some(spool), Some(seq)) = (&self.shared.spool, spool_seq) {
                spool.finish(seq, false);
            }
            return Err(e);
        }
        lock(&self.shared.stats).events_accepted += 1;
        if let Some(hook) = &self.shared.hook {
            let job = HookJob { event: ev.clone(), json };
            if hook.try_send(job).is_err() {
                lock(&self.shared.stats).hook_dropped += 1;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The keys of the events waiting in the spool (none without a controller). Reads the
    /// spool directory: for the start, before events flow.
    pub fn spooled_keys(&self) -> std::collections::HashSet<String> {
        self.shared.spool.as_ref().map(|s| spool::entry_keys(s.dir())).unwrap_or_default()
    }

    /// Puts an event that is in the log but may never have reached the spool (the service
    /// died, or the disk refused the spool entry, between the two) back in the spool, so it is
    /// delivered; the controller keeps each key once, so one delivered before is not doubled.
    /// For the start, before any new event: the writer keeps it ahead of them.
    pub fn respool(&self, json: Vec<u8>, time: String) -> Result<(), ForwardError> {
        let Some(spool) = &self.shared.spool else { return Ok(()) };
        let seq = spool.reserve(json.len() as u64)?;
        let job = Job::Event { json: json.into(), spool_seq: Some(seq), time, logged: true };
        if let Err(e) = self.shared.writer.send(job) {
            spool.finish(seq, false);
            return Err(e);
        }
        lock(&self.shared.stats).events_accepted += 1;
        Ok(())
    }

    /// Queues `bytes` to replace the state file `path` (atomically and durably, see
    /// [`crate::util::fs`]), after every event accepted before. Never waits; a failure is
    /// reported on stderr and counted.
    pub fn save_state(&self, path: PathBuf, bytes: Vec<u8>) {
        self.queue_state(path, Some(bytes));
    }

    /// Queues the removal of state file `path`, after every save queued before (which would
    /// otherwise bring it back).
    pub fn remove_state(&self, path: PathBuf) {
        self.queue_state(path, None);
    }

    fn queue_state(&self, path: PathBuf, bytes: Option<Vec<u8>>) {
        if self.shared.writer.send(Job::Save { path: path.clone(), bytes }).is_err() {
            tracing::error!(path = %path.display(), "cannot update a state file: the event writer thread is gone");
        }
    }

    /// Resolves once everything accepted before the call is written and fsynced (or the
    /// writer is gone).
    pub async fn flushed(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.writer.send(Job::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// [`Forwarder::flushed`] for synchronous code; must not be called on an async worker.
    pub fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.writer.send(Job::Flush(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// Events lost to a full disk, once the disk takes writes again: the service reports them
    /// as an `events-lost` event. Each loss is handed out once.
    pub fn take_loss(&self) -> Option<Loss> {
        let mut s = lock(&self.shared.stats);
        if s.disk_problem.is_some() {
            return None;
        }
        s.unreported_loss.take()
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
                    _ = until_true(&mut shutdown) => {}
                }
            }
            _ => until_true(&mut shutdown).await,
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
    endpoint: Link,
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
                        tracing::info!(url = %self.cfg.url, "the controller is reachable again; delivering");
                    }
                }
                http::Delivery::Rejected { status, body } => {
                    let message = format!(
                        "controller refused event {} with {status}: {}; kept in {}/rejected/ (if every event is refused, check controller.url)",
                        entry.key,
                        body.trim(),
                        self.spool.dir().display()
                    );
                    tracing::warn!("{message}");
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
                        tracing::warn!("{message}");
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
            ca_file: None,
            client_cert: None,
            client_key: None,
            token_file: None,
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
            hold: HoldLimits::default(),
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
        assert!(err(ControllerConfig { ca_file: Some("/ca.pem".into()), ..controller("http://h/") })
            .contains("https://"));
        assert!(err(ControllerConfig { client_key: Some("/k.pem".into()), ..controller("https://h/") })
            .contains("go together"));
        assert!(err(controller("ftp://h/")).contains("http[s]://HOST"));
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
        fw.flush();
        let log = std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap();
        let logged: Vec<Event> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(logged, events);
        let s = fw.stats();
        assert_eq!((s.pending_events, s.pending_bytes), (3, log.len() as u64 - 3));
        assert_eq!((s.events_accepted, s.events_logged, s.write_failures), (3, 3, 0));
        assert_eq!(spool::tests::entries(&dir.path().join("spool")).len(), 3);
        // A bad event goes nowhere.
        let mut bad = events[0].clone();
        bad.key = String::new();
        assert!(matches!(fw.submit(&bad), Err(ForwardError::BadEvent(_))));
        fw.flush();
        assert_eq!(std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap(), log);
    }

    #[test]
    fn state_files_follow_events_and_drop_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (fw, _task) = Forwarder::open(config(dir.path(), None)).unwrap();
        let state = dir.path().join("vms/web.json");
        let ev = event(1);
        fw.submit(&ev).unwrap();
        fw.save_state(state.clone(), b"1".to_vec());
        fw.save_state(state.clone(), b"2".to_vec());
        let gone = dir.path().join("vms/gone.json");
        fw.save_state(gone.clone(), b"1".to_vec());
        fw.remove_state(gone.clone());
        fw.remove_state(dir.path().join("vms/never-saved.json"));
        // The last handle going waits for the writer: nothing accepted is left behind.
        drop(fw);
        assert_eq!(std::fs::read(&state).unwrap(), b"2");
        assert!(!gone.exists(), "a removal follows the saves queued before it");
        let log = std::fs::read_to_string(dir.path().join("log/events.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 1);
        assert!(!dir.path().join("spool").exists(), "no controller, no spool");

        // A torn last line left by a crash is cut off when the log is opened again.
        let path = dir.path().join("log/events.jsonl");
        let mut torn = log.clone().into_bytes();
        torn.extend_from_slice(br#"{"key":"0123"#);
        std::fs::write(&path, &torn).unwrap();
        let (fw, _task) = Forwarder::open(config(dir.path(), None)).unwrap();
        fw.submit(&event(2)).unwrap();
        fw.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let dirs: Vec<PathBuf> = text
            .lines()
            .map(|l| match serde_json::from_str::<Event>(l).unwrap().kind {
                EventKind::VmRemoved(r) => r.dir,
                other => panic!("not a test event: {other:?}"),
            })
            .collect();
        assert_eq!(
            dirs,
            [event(1), event(2)].map(|e| match e.kind {
                EventKind::VmRemoved(r) => r.dir,
                _ => unreachable!(),
            })
        );
        let s = fw.stats();
        assert_eq!((s.events_logged, s.write_failures), (1, 0), "{s:?}");
    }

    #[test]
    fn failed_writes_are_counted_and_a_full_log_acknowledges_nothing() {
        // A full disk: the event is accepted and held in memory (its spool slot reserved),
        // never acknowledged while the log refuses it. (tests/durability.rs: a real full disk.)
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), Some(controller("http://127.0.0.1:9")));
        cfg.log = Some("/dev/full".into());
        let (fw, _task) = Forwarder::open(cfg).unwrap();
        fw.submit(&event(1)).unwrap();
        let start = std::time::Instant::now();
        while fw.stats().write_failures == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "the write never failed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let s = fw.stats();
        assert_eq!((s.events_accepted, s.events_logged, s.held_events), (1, 0, 1), "{s:?}");
        assert!(s.last_write_error.as_ref().unwrap().contains("disk full: cannot append to event log"));
        assert!(s.disk_condition().unwrap().contains("1 events"), "{:?}", s.disk_problem);
        assert_eq!(s.pending_events, 1, "its spool slot is kept for when the disk takes it");
        drop(_task);

        // A state file in a place that cannot be a directory fails through the same counter;
        // the event beside it is still acknowledged.
        let dir = tempfile::tempdir().unwrap();
        let (fw, _task) = Forwarder::open(config(dir.path(), None)).unwrap();
        std::fs::write(dir.path().join("file"), b"").unwrap();
        fw.save_state(dir.path().join("file/x.json"), b"{}".to_vec());
        fw.submit(&event(1)).unwrap();
        fw.flush();
        let s = fw.stats();
        assert_eq!((s.events_accepted, s.events_logged, s.write_failures), (1, 1, 1), "{s:?}");
        assert!(s.last_write_error.unwrap().contains("cannot save"));
    }

    #[test]
    fn spool_full_keeps_the_log_line_and_the_spooled_entries() {
        let dir = tempfile::tempdir().unwrap();
        let c = ControllerConfig { spool_max_events: 2, ..controller("http://127.0.0.1:9") };
        let (fw, _task) = Forwarder::open(config(dir.path(), Some(c))).unwrap();
        let events: Vec<Event> = (0..3).map(event).collect();
        fw.submit(&events[0]).unwrap();
        fw.submit(&events[1]).unwrap();
        fw.flush();
        let spooled = spool::tests::entries(&dir.path().join("spool"));
        let err = fw.submit(&events[2]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ForwardError::SpoolFull { pending_events: 2, .. }), "{msg}");
        assert!(
            msg.contains("controller.spool_max_events (2)") && msg.contains("bring the controller back"),
            "{msg}"
        );
        fw.flush();
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
