//! A QMP client on tokio. Commands are qapi's typed definitions (`qapi::qmp::*`), sent over
//! our own line transport: one reader task classifies each line with [`parse_message`], routes
//! replies by `id` and broadcasts events.
//!
//! QEMU is newer or older than qapi's bundled schema (QEMU 7.2 and 10 are both supported), so
//! nothing the schema does not know is fatal: an event it lacks arrives as [`EventKind::Other`]
//! with its raw JSON, an event it knows but cannot decode (a new enum value, say) is read
//! leniently, [`Qmp::execute_json`] sends a typed command and keeps QEMU's reply as JSON (the
//! diagnostic bundle stores what QEMU said, every field of it), and [`Qmp::execute_raw`] sends a
//! command the schema lacks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::lock;
use qapi::Enum as _;
use serde::Deserialize as _;
use serde_json::{json, Value};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// The longest line accepted from QEMU; a longer one ends the connection.
pub const MAX_LINE: usize = 16 << 20;
/// How long a command waits for its reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path} within {waited:?}: {source}; is QEMU running with -qmp unix:{path},server=on,wait=off?")]
    Connect { path: PathBuf, waited: Duration, source: std::io::Error },
    #[error("QMP greeting from {0} is not QMP; the socket is not a QEMU monitor")]
    Greeting(PathBuf),
    #[error("QMP connection lost (QEMU exited or closed the monitor)")]
    Closed,
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP command {command} got no reply within {timeout:?}; QEMU is stuck or overloaded")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP command {command} was not sent: its arguments do not serialise: {source}")]
    Arguments { command: String, source: serde_json::Error },
    #[error("QMP reply to {command} does not match the schema: {source}")]
    Reply { command: String, source: serde_json::Error },
    #[error("QMP message is {0}; QEMU never sends one, so the peer is not a QEMU monitor")]
    Malformed(String),
}

/// One line from QEMU's monitor, classified.
#[derive(Clone, Debug)]
pub enum Message {
    /// The greeting QEMU sends first: its version, e.g. (10, 0, 2).
    Greeting { version: (u64, u64, u64) },
    /// A command's success: its `return` value. `id` is `None` when QEMU echoed no numeric id.
    Reply { id: Option<u64>, ret: Value },
    /// A command's failure.
    Error { id: Option<u64>, class: String, desc: String },
    /// An asynchronous event.
    Event(QmpEvent),
    /// A JSON object that is none of the above.
    Other(Value),
}

/// An asynchronous event from QEMU.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// `event` field, e.g. `STOP`, `GUEST_PANICKED`.
    pub name: String,
    /// What it means, for the events acpimon reacts to.
    pub kind: EventKind,
    /// The whole event as QEMU sent it (evidence in events and bundles keeps every field).
    pub raw: Value,
    /// A `STOP` or `RESUME` of acpimon's own command on this connection (a
    /// `dump-guest-memory` stops the vCPUs while it copies): not the VM's news.
    pub own: bool,
}

impl QmpEvent {
    /// When QEMU sent it: its `timestamp` as RFC 3339 UTC with milliseconds; `None` without a
    /// timestamp or with one out of range (QEMU sends -1 when its clock failed).
    pub fn time(&self) -> Option<String> {
        let ts = &self.raw["timestamp"];
        let seconds = ts["seconds"].as_u64()?;
        let micros = ts["microseconds"].as_u64().filter(|&us| us < 1_000_000)?;
        // Past year 9999 humantime cannot format it; QEMU never sends one.
        let t = std::time::UNIX_EPOCH
            .checked_add(Duration::from_secs(seconds.min(253_402_300_799)) + Duration::from_micros(micros))?;
        Some(crate::units::rfc3339(t))
    }
}

/// The events acpimon reacts to, decoded with qapi's schema ([`qapi::qmp::Event`]); every
/// other event is [`EventKind::Other`] (its name and JSON are in the [`QmpEvent`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The vCPUs stopped (`stop`, a debugger, an I/O error, a dump...).
    Stop,
    /// The vCPUs run again.
    Resume,
    /// The machine reset; `reason` is QEMU's `ShutdownCause`, e.g. `guest-reset`.
    Reset { guest: bool, reason: String },
    /// QEMU is shutting the machine down; `reason` as for `Reset`, e.g. `host-qmp-quit`.
    Shutdown { guest: bool, reason: String },
    /// The guest reported a panic (`GUEST_PANICKED`), or loaded its crash kernel after one
    /// (`GUEST_CRASHLOADED`); `action` is QEMU's `GuestPanicAction`, e.g. `pause`.
    Panicked { action: String, crashloaded: bool },
    /// A detached `dump-guest-memory` ended, with QEMU's error if it failed.
    DumpCompleted { error: Option<String> },
    /// A drive's request failed on the host (`BLOCK_IO_ERROR`). `device` is the drive's
    /// BlockBackend name, empty for a `-blockdev` node attached without one (then
    /// `node_name` names it); `operation` is `read` or `write`; `action` what QEMU did
    /// (`ignore`, `report` to the guest, `stop` the VM); `nospace`: the host disk is full;
    /// `reason`: the host's error text. Its time is the event's `timestamp`
    /// ([`QmpEvent::time`]).
    BlockIoError {
        device: String,
        node_name: Option<String>,
        operation: String,
        action: String,
        nospace: bool,
        reason: String,
    },
    /// Any other event, or one of the above whose fields are missing.
    Other,
}

impl EventKind {
    /// Classifies an event object: qapi's typed decoding first; where it fails (QEMU sent a
    /// value newer than the bundled schema), the same fields read leniently.
    fn of(raw: &Value) -> EventKind {
        use qapi::qmp::Event as Q;
        let panicked = |action: qapi::qmp::GuestPanicAction, crashloaded| EventKind::Panicked {
            action: action.name().into(),
            crashloaded,
        };
        match Q::deserialize(raw) {
            Ok(Q::STOP { .. }) => EventKind::Stop,
            Ok(Q::RESUME { .. }) => EventKind::Resume,
            Ok(Q::RESET { data, .. }) => {
                EventKind::Reset { guest: data.guest, reason: data.reason.name().into() }
            }
            Ok(Q::SHUTDOWN { data, .. }) => {
                EventKind::Shutdown { guest: data.guest, reason: data.reason.name().into() }
            }
            Ok(Q::GUEST_PANICKED { data, .. }) => panicked(data.action, false),
            Ok(Q::GUEST_CRASHLOADED { data, .. }) => panicked(data.action, true),
            Ok(Q::DUMP_COMPLETED { data, .. }) => EventKind::DumpCompleted { error: data.error },
            Ok(Q::BLOCK_IO_ERROR { data, .. }) => EventKind::BlockIoError {
                device: data.device,
                node_name: data.node_name,
                operation: data.operation.name().into(),
                action: data.action.name().into(),
                nospace: data.nospace.unwrap_or(false),
                reason: data.reason,
            },
            Ok(_) => EventKind::Other,
            Err(_) => EventKind::lenient(raw),
        }
    }

    /// The fallback of [`EventKind::of`]: the fields acpimon uses, as plain JSON.
    fn lenient(raw: &Value) -> EventKind {
        let data = &raw["data"];
        let text = |key: &str| data[key].as_str().map(str::to_string);
        let guest = data["guest"].as_bool();
        match raw["event"].as_str().unwrap_or_default() {
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "RESET" => match (guest, text("reason")) {
                (Some(guest), Some(reason)) => EventKind::Reset { guest, reason },
                _ => EventKind::Other,
            },
            "SHUTDOWN" => match (guest, text("reason")) {
                (Some(guest), Some(reason)) => EventKind::Shutdown { guest, reason },
                _ => EventKind::Other,
            },
            name @ ("GUEST_PANICKED" | "GUEST_CRASHLOADED") => match text("action") {
                Some(action) => EventKind::Panicked { action, crashloaded: name == "GUEST_CRASHLOADED" },
                None => EventKind::Other,
            },
            "DUMP_COMPLETED" => EventKind::DumpCompleted { error: text("error") },
            "BLOCK_IO_ERROR" => match (text("device"), text("operation"), text("action")) {
                (Some(device), Some(operation), Some(action)) => EventKind::BlockIoError {
                    device,
                    node_name: text("node-name"),
                    operation,
                    action,
                    nospace: data["nospace"].as_bool().unwrap_or(false),
                    reason: text("reason").unwrap_or_default(),
                },
                _ => EventKind::Other,
            },
            _ => EventKind::Other,
        }
    }
}

/// QEMU's run state from `query-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Whether the vCPUs run.
    pub running: bool,
    /// QEMU's `RunState`, e.g. `running`, `paused`, `guest-panicked`.
    pub status: String,
}

/// Classifies one line QEMU sent (with or without its newline). Pure and total: any input gives
/// a `Message` or an error, never a panic. Errors: the line is not JSON, not a JSON object, or
/// a greeting without a readable version.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| QmpError::Malformed(format!("a line that is not JSON ({e})")))?;
    let Value::Object(mut obj) = value else {
        return Err(QmpError::Malformed(format!("JSON that is not an object ({})", json_type(&value))));
    };
    if let Some(greeting) = obj.get("QMP") {
        let version = qapi::qmp::QMP::deserialize(greeting).ok().and_then(|g| {
            let v = g.version.qemu;
            Some((u64::try_from(v.major).ok()?, u64::try_from(v.minor).ok()?, u64::try_from(v.micro).ok()?))
        });
        return match version {
            Some(version) => Ok(Message::Greeting { version }),
            None => Err(QmpError::Malformed("a greeting without QEMU's version".into())),
        };
    }
    if let Some(name) = obj.get("event").and_then(Value::as_str) {
        let name = name.to_string();
        let raw = Value::Object(obj);
        let kind = EventKind::of(&raw);
        return Ok(Message::Event(QmpEvent { name, kind, raw, own: false }));
    }
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(err) = obj.get("error") {
        let field = |key: &str| err[key].as_str().unwrap_or("?").to_string();
        return Ok(Message::Error { id, class: field("class"), desc: field("desc") });
    }
    if let Some(ret) = obj.remove("return") {
        return Ok(Message::Reply { id, ret });
    }
    Ok(Message::Other(Value::Object(obj)))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a waiting command receives: its reply or QEMU's error.
type Outcome = Result<Value, (String, String)>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// A connected QMP monitor. Cheap to share behind an `Arc`; commands may run concurrently.
pub struct Qmp {
    /// A Unix socket's write half, or another transport's (libvirt's monitor passthrough).
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    closed: tokio::sync::watch::Receiver<bool>,
    /// QEMU's version from the greeting, e.g. (10, 0, 2).
    pub version: (u64, u64, u64),
    /// QEMU's process id (the socket's peer), when visible from this pid namespace.
    pub pid: Option<u32>,
    /// libvirt manages this QEMU (it has libvirt's own monitor, chardev `charmonitor`, or this
    /// session runs through libvirt's passthrough): libvirt owns the VM's jobs, and a
    /// `dump-guest-memory` it did not start crashed libvirtd (Debian bookworm's 9.0, a segfault
    /// on the `DUMP_COMPLETED` event, which QEMU sends to every monitor, that it had no job
    /// for): never send one.
    pub libvirt_managed: bool,
    /// acpimon's own commands in flight that stop and resume the vCPUs ([`Qmp::own_pause`]).
    own_pauses: Arc<AtomicU64>,
}

/// Held around a command of acpimon's that stops the vCPUs and resumes them before it returns:
/// the `STOP` and `RESUME` received meanwhile are marked [`QmpEvent::own`]. The reader marks them
/// as they arrive, in the order QEMU sent them, so the reply that ends the command is after them.
pub struct OwnPause(Arc<AtomicU64>);

impl Drop for OwnPause {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Qmp {
    /// Marks the vCPUs' `STOP`/`RESUME` as acpimon's own until the guard is dropped.
    pub fn own_pause(&self) -> OwnPause {
        self.own_pauses.fetch_add(1, Ordering::SeqCst);
        OwnPause(self.own_pauses.clone())
    }

    /// Connects to `path`, retrying until `wait` has passed (QEMU creates the socket shortly
    /// after it starts), and negotiates capabilities.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Qmp, QmpError> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(QmpError::Connect { path: path.into(), waited: wait, source: e })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|&p| p > 0);
        let (read, write) = stream.into_split();
        let mut qmp = Qmp::over(read, write, path).await?;
        qmp.pid = pid;
        qmp.libvirt_managed = qmp.has_libvirt_monitor().await;
        Ok(qmp)
    }

    /// A QMP session over any byte stream that speaks QMP's lines (greeting first); `peer` names
    /// it in errors. QEMU's pid is not known over such a stream.
    pub async fn over(
        read: impl AsyncRead + Send + Unpin + 'static,
        write: impl AsyncWrite + Send + Unpin + 'static,
        peer: &Path,
    ) -> Result<Qmp, QmpError> {
        // QMP's replies and events are mostly under 1 KiB; a longer line is gathered across
        // reads. The default 8 KiB would be 8 KiB more per VM.
        let mut reader = BufReader::with_capacity(2048, read);
        let greeting = read_line(&mut reader).await?.ok_or(QmpError::Closed)?;
        let version = match parse_message(&greeting) {
            Ok(Message::Greeting { version }) => version,
            _ => return Err(QmpError::Greeting(peer.into())),
        };
        // QEMU sends events one at a time; a broadcast channel allocates every slot up front
        // (one QmpEvent each), so a few dozen are plenty and hundreds would cost memory per VM.
        let (events, _) = broadcast::channel(32);
        let pending: Pending = Arc::default();
        let (pending_for_route, events_for_route) = (pending.clone(), events.clone());
        let own_pauses = Arc::new(AtomicU64::new(0));
        let own_for_route = own_pauses.clone();
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            route(reader, pending_for_route, events_for_route, own_for_route).await;
            let _ = closed_tx.send(true);
        });
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(Box::new(write)),
            pending,
            events,
            next_id: AtomicU64::new(1),
            closed,
            version,
            pid: None,
            libvirt_managed: false,
            own_pauses,
        };
        qmp.execute(qapi::qmp::qmp_capabilities { enable: None }).await?;
        Ok(qmp)
    }

    /// Resolves when the connection is gone (QEMU exited or closed the monitor).
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        let _ = rx.wait_for(|&c| c).await;
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs a typed command, waiting [`DEFAULT_TIMEOUT`] for its reply.
    /// Whether QEMU has libvirt's own monitor (chardev `charmonitor`, libvirt's name for it).
    /// A QEMU that does not answer in time is taken as not managed.
    async fn has_libvirt_monitor(&self) -> bool {
        let reply = self.execute_json(qapi::qmp::query_chardev {}, Duration::from_secs(2)).await;
        reply.is_ok_and(|v| v.as_array().is_some_and(|a| a.iter().any(|c| c["label"] == "charmonitor")))
    }

    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_within(cmd, DEFAULT_TIMEOUT).await
    }

    /// Runs a typed command, waiting `timeout` for its reply.
    pub async fn execute_within<C: qapi::Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let ret = self.execute_json(cmd, timeout).await?;
        C::Ok::deserialize(&ret).map_err(|source| QmpError::Reply { command: C::NAME.into(), source })
    }

    /// Runs a typed command and returns QEMU's reply as JSON, undecoded: for replies stored as
    /// QEMU sent them, or read where the schema may lag the running QEMU.
    pub async fn execute_json<C: qapi::Command>(&self, cmd: C, timeout: Duration) -> Result<Value, QmpError> {
        let args = serde_json::to_value(&cmd)
            .map_err(|source| QmpError::Arguments { command: C::NAME.into(), source })?;
        self.execute_raw(C::NAME, args, timeout).await
    }

    /// `query-status`: whether the vCPUs run and QEMU's run state. A state newer than the
    /// bundled schema is read from the raw reply.
    pub async fn status(&self, timeout: Duration) -> Result<Status, QmpError> {
        let ret = self.execute_json(qapi::qmp::query_status {}, timeout).await?;
        match qapi::qmp::StatusInfo::deserialize(&ret) {
            Ok(s) => Ok(Status { running: s.running, status: s.status.name().into() }),
            Err(source) => match (ret["running"].as_bool(), ret["status"].as_str()) {
                (Some(running), Some(status)) => Ok(Status { running, status: status.into() }),
                _ => Err(QmpError::Reply { command: "query-status".into(), source }),
            },
        }
    }

    /// Runs an HMP command line through `human-monitor-command`, returning its output.
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        self.hmp_within(command_line, None, DEFAULT_TIMEOUT).await
    }

    /// [`Qmp::hmp`] on vCPU `cpu_index` (QEMU's current one if `None`), waiting `timeout`.
    pub async fn hmp_within(
        &self,
        command_line: &str,
        cpu_index: Option<i64>,
        timeout: Duration,
    ) -> Result<String, QmpError> {
        let cmd = qapi::qmp::human_monitor_command { command_line: command_line.into(), cpu_index };
        self.execute_within(cmd, timeout).await
    }

    /// Runs any command by name; the reply's `return` value. Only for commands qapi's schema
    /// lacks: a typed command is [`Qmp::execute`] or [`Qmp::execute_json`].
    pub async fn execute_raw(&self, name: &str, args: Value, timeout: Duration) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = json!({ "execute": name, "arguments": args, "id": id }).to_string();
        line.push('\n');
        let sent = self.writer.lock().await.write_all(line.as_bytes()).await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(e.into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(ret))) => Ok(ret),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command { command: name.into(), class, desc }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout { command: name.into(), timeout })
            }
        }
    }
}

/// Reads QEMU's lines until the connection closes: replies to their waiters by `id`, events to
/// subscribers. Anything else is logged and dropped.
async fn route<R: AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    own_pauses: Arc<AtomicU64>,
) {
    let reply = |id: Option<u64>, outcome: Outcome| match id.and_then(|id| lock(&pending).remove(&id)) {
        Some(tx) => {
            let _ = tx.send(outcome);
        }
        None => log_raw("reply nobody waits for (timed out, or no id)", &json!({ "id": id })),
    };
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) => break,
        };
        match parse_message(&line) {
            Ok(Message::Event(mut ev)) => {
                ev.own = matches!(ev.kind, EventKind::Stop | EventKind::Resume)
                    && own_pauses.load(Ordering::SeqCst) > 0;
                if ev.kind == EventKind::Other {
                    log_raw("event acpimon does not react to, kept raw", &ev.raw);
                }
                let _ = events.send(ev);
            }
            Ok(Message::Reply { id, ret }) => reply(id, Ok(ret)),
            Ok(Message::Error { id, class, desc }) => reply(id, Err((class, desc))),
            Ok(Message::Greeting { .. }) => log_raw("second QMP greeting", &Value::Null),
            Ok(Message::Other(msg)) => log_raw("unrouted QMP message", &msg),
            // QEMU never sends one; a bug should not end monitoring.
            Err(e) => log_raw(&e.to_string(), &Value::String(String::from_utf8_lossy(&line).into())),
        }
    }
    // Dropping the senders wakes every waiter with `Closed`.
    lock(&pending).clear();
}

fn log_raw(what: &str, msg: &Value) {
    tracing::debug!(target: "acpimon::qmp", "{what}: {msg}");
}

/// One line, bounded by [`MAX_LINE`]; `None` at end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, QmpError> {
    let mut buf = Vec::new();
    let n = (&mut *reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_LINE {
        return Err(QmpError::Io(std::io::Error::other("QMP line longer than 16 MiB")));
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Message {
        parse_message(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn event(line: &str) -> QmpEvent {
        match parse(line) {
            Message::Event(ev) => ev,
            other => panic!("{line}: not an event: {other:?}"),
        }
    }

    fn malformed(line: &[u8]) -> String {
        match parse_message(line) {
            Err(QmpError::Malformed(why)) => why,
            other => panic!("{:?}: not malformed: {other:?}", String::from_utf8_lossy(line)),
        }
    }

    #[test]
    fn greetings_of_qemu_7_2_and_10() {
        let qemu_10 = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse(qemu_10), Message::Greeting { version: (10, 0, 2) }));
        let qemu_7_2 = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";
        assert!(matches!(parse(qemu_7_2), Message::Greeting { version: (7, 2, 0) }));
        assert!(malformed(br#"{"QMP": {"capabilities": []}}"#).contains("greeting"));
        let negative = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": -1}, "package": ""}, "capabilities": []}}"#;
        assert!(malformed(negative.as_bytes()).contains("greeting"));
    }

    #[test]
    fn replies_and_errors_carry_their_id() {
        match parse(r#"{"return": {"running": true, "status": "running"}, "id": 7}"#) {
            Message::Reply { id: Some(7), ret } => assert_eq!(ret["status"], "running"),
            other => panic!("{other:?}"),
        }
        // An id acpimon did not send (a string) routes nowhere, but is still a reply.
        assert!(matches!(parse(r#"{"return": {}, "id": "a"}"#), Message::Reply { id: None, .. }));
        match parse(
            r#"{"id": 8, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
        ) {
            Message::Error { id: Some(8), class, desc } => {
                assert_eq!(
                    (class.as_str(), desc.as_str()),
                    ("CommandNotFound", "The command nope has not been found")
                )
            }
            other => panic!("{other:?}"),
        }
        // QEMU answers a line it cannot parse with an error and no id.
        match parse(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#) {
            Message::Error { id: None, class, .. } => assert_eq!(class, "GenericError"),
            other => panic!("{other:?}"),
        }
        match parse(r#"{"error": "not an object", "id": 1}"#) {
            Message::Error { id: Some(1), class, desc } => {
                assert_eq!((class.as_str(), desc.as_str()), ("?", "?"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(r#"{"id": 3}"#), Message::Other(_)));
    }

    #[test]
    fn known_events_are_typed() {
        let ts = r#""timestamp": {"seconds": 1700000000, "microseconds": 12}"#;
        let ev = event(&format!(r#"{{"event": "STOP", {ts}}}"#));
        assert_eq!((ev.name.as_str(), &ev.kind), ("STOP", &EventKind::Stop));
        assert_eq!(ev.raw["timestamp"]["microseconds"], 12, "the raw event is kept whole");
        assert_eq!(event(&format!(r#"{{"event": "RESUME", {ts}}}"#)).kind, EventKind::Resume);
        assert_eq!(
            event(&format!(
                r#"{{"event": "SHUTDOWN", "data": {{"guest": false, "reason": "host-qmp-quit"}}, {ts}}}"#
            ))
            .kind,
            EventKind::Shutdown { guest: false, reason: "host-qmp-quit".into() }
        );
        assert_eq!(
            event(&format!(
                r#"{{"event": "RESET", "data": {{"guest": true, "reason": "guest-reset"}}, {ts}}}"#
            ))
            .kind,
            EventKind::Reset { guest: true, reason: "guest-reset".into() }
        );
        let panic = format!(
            r#"{{"event": "GUEST_PANICKED", "data": {{"action": "pause", "info": {{"type": "hyper-v", "arg1": 1, "arg2": 2, "arg3": 3, "arg4": 4, "arg5": 5}}}}, {ts}}}"#
        );
        assert_eq!(event(&panic).kind, EventKind::Panicked { action: "pause".into(), crashloaded: false });
        assert_eq!(
            event(&format!(r#"{{"event": "GUEST_CRASHLOADED", "data": {{"action": "run"}}, {ts}}}"#)).kind,
            EventKind::Panicked { action: "run".into(), crashloaded: true }
        );
        assert_eq!(
            event(&format!(
                r#"{{"event": "DUMP_COMPLETED", "data": {{"result": {{"status": "failed", "completed": 0, "total": 9}}, "error": "disk full"}}, {ts}}}"#
            ))
            .kind,
            EventKind::DumpCompleted { error: Some("disk full".into()) }
        );
    }

    #[test]
    fn block_io_errors_are_typed_with_their_time() {
        // As QEMU 10 sends it for a -drive id=disk0 whose write failed, with werror=stop.
        let line = r##"{"timestamp": {"seconds": 1764443000, "microseconds": 123456}, "event": "BLOCK_IO_ERROR", "data": {"device": "disk0", "nospace": false, "node-name": "#block143", "reason": "Input/output error", "operation": "write", "action": "stop"}}"##;
        let ev = event(line);
        assert_eq!(
            ev.kind,
            EventKind::BlockIoError {
                device: "disk0".into(),
                node_name: Some("#block143".into()),
                operation: "write".into(),
                action: "stop".into(),
                nospace: false,
                reason: "Input/output error".into(),
            }
        );
        assert_eq!(ev.time().as_deref(), Some("2025-11-29T19:03:20.123Z"));
        // A -blockdev node without a BlockBackend name: device is empty, node-name names it;
        // QEMU before 5.2's nospace-less events read as nospace false; an action newer than
        // the schema is read leniently.
        let ev = event(
            r#"{"event": "BLOCK_IO_ERROR", "data": {"device": "", "node-name": "n1", "operation": "read", "action": "retry-later", "reason": "No space left on device", "nospace": true}}"#,
        );
        assert_eq!(
            ev.kind,
            EventKind::BlockIoError {
                device: "".into(),
                node_name: Some("n1".into()),
                operation: "read".into(),
                action: "retry-later".into(),
                nospace: true,
                reason: "No space left on device".into(),
            }
        );
        assert_eq!(ev.time(), None, "no timestamp");
        let ev = event(
            r#"{"event": "BLOCK_IO_ERROR", "data": {"device": "d", "operation": "write", "action": "report", "reason": "x"}, "timestamp": {"seconds": -1, "microseconds": -1}}"#,
        );
        assert!(matches!(&ev.kind, EventKind::BlockIoError { nospace: false, node_name: None, .. }));
        assert_eq!(ev.time(), None, "QEMU's -1 when its clock failed");
        // Fields missing: not guessed at.
        assert_eq!(event(r#"{"event": "BLOCK_IO_ERROR", "data": {"device": "d"}}"#).kind, EventKind::Other);
    }

    #[test]
    fn events_beyond_the_schema_are_kept_raw_or_read_leniently() {
        let ts = r#""timestamp": {"seconds": 1, "microseconds": 2}"#;
        // An event qapi's schema does not know: kept with its name and JSON.
        let ev = event(&format!(r#"{{"event": "SOMETHING_NEW", "data": {{"x": [1, 2]}}, {ts}}}"#));
        assert_eq!((ev.name.as_str(), &ev.kind), ("SOMETHING_NEW", &EventKind::Other));
        assert_eq!(ev.raw["data"]["x"][1], 2);
        // A known event with a value newer than the schema, or without a timestamp.
        assert_eq!(
            event(&format!(
                r#"{{"event": "SHUTDOWN", "data": {{"guest": true, "reason": "cosmic-ray"}}, {ts}}}"#
            ))
            .kind,
            EventKind::Shutdown { guest: true, reason: "cosmic-ray".into() }
        );
        assert_eq!(event(r#"{"event": "STOP"}"#).kind, EventKind::Stop);
        assert_eq!(
            event(r#"{"event": "GUEST_PANICKED", "data": {"action": "explode"}}"#).kind,
            EventKind::Panicked { action: "explode".into(), crashloaded: false }
        );
        // Known names whose fields are missing or of the wrong type are not guessed at.
        assert_eq!(event(r#"{"event": "SHUTDOWN", "data": {"reason": 5}}"#).kind, EventKind::Other);
        assert_eq!(event(r#"{"event": "RESET", "data": null}"#).kind, EventKind::Other);
        assert_eq!(event(r#"{"event": "GUEST_PANICKED"}"#).kind, EventKind::Other);
        // An `event` that is not a string is no event.
        assert!(matches!(parse(r#"{"event": 3}"#), Message::Other(_)));
    }

    #[tokio::test]
    async fn the_pause_of_an_own_command_is_marked_and_others_are_not() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(4096);
        let (server_read, mut server_write) = tokio::io::split(server);
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#;
        server_write.write_all(format!("{greeting}\n").as_bytes()).await.unwrap();
        // QEMU's side: answers each command, and for "stop" sends its STOP first.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(server_read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let cmd: Value = serde_json::from_str(&line).unwrap();
                if cmd["execute"] == "stop" {
                    server_write.write_all(b"{\"event\": \"STOP\"}\n").await.unwrap();
                }
                let reply = json!({ "return": {}, "id": cmd["id"] });
                server_write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        });
        let (read, write) = tokio::io::split(client);
        let qmp = Qmp::over(read, write, Path::new("/test")).await.unwrap();
        let mut events = qmp.events();
        {
            let _own = qmp.own_pause();
            qmp.execute(qapi::qmp::stop {}).await.unwrap();
        }
        assert!(events.recv().await.unwrap().own, "during acpimon's own command");
        qmp.execute(qapi::qmp::stop {}).await.unwrap();
        let ev = events.recv().await.unwrap();
        assert_eq!((ev.kind, ev.own), (EventKind::Stop, false), "anyone else's");
    }

    #[test]
    fn garbage_and_non_objects_are_errors() {
        for line in [&b""[..], b"\n", b"   ", b"{", b"\xff\xfe\x00", b"QMP", b"{\"QMP\"}", b"{} {}"] {
            assert!(malformed(line).contains("not JSON"), "{:?}", String::from_utf8_lossy(line));
        }
        assert!(malformed(b"[1, 2]").contains("an array"));
        assert!(malformed(b"\"return\"").contains("a string"));
        assert!(malformed(b"42").contains("a number"));
        assert!(malformed(b"null").contains("null"));
        assert!(malformed(b"true").contains("a boolean"));
        // Nesting deeper than serde_json's recursion limit is refused, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(malformed(deep.as_bytes()).contains("not JSON"));
        let deep_object = format!("{}{}", r#"{"return": "#.repeat(10_000), "}".repeat(10_000));
        assert!(parse_message(deep_object.as_bytes()).is_err());
    }

    #[test]
    fn huge_numbers_do_not_panic() {
        // Past u64: an id that cannot be ours.
        assert!(matches!(
            parse(r#"{"return": {}, "id": 18446744073709551616}"#),
            Message::Reply { id: None, .. }
        ));
        assert!(matches!(parse(r#"{"return": 1e308, "id": 1}"#), Message::Reply { id: Some(1), .. }));
        assert!(malformed(br#"{"return": 1e999, "id": 1}"#).contains("not JSON"));
        assert!(matches!(parse(r#"{"return": {}, "id": -1}"#), Message::Reply { id: None, .. }));
        let huge = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99999999999999999999}, "package": ""}, "capabilities": []}}"#;
        assert!(malformed(huge.as_bytes()).contains("greeting"));
        let ev = event(r#"{"event": "STOP", "timestamp": {"seconds": -1e300, "microseconds": 1}}"#);
        assert_eq!(ev.kind, EventKind::Stop);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn any_bytes_parse_or_fail_cleanly(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_message(&line);
        }

        #[test]
        fn any_event_object_parses(name in "[A-Z_]{1,20}", reason in "[a-z-]{0,12}", guest in proptest::prelude::any::<bool>()) {
            let line = json!({"event": name, "data": {"guest": guest, "reason": reason, "action": reason}}).to_string();
            let is_event = matches!(parse_message(line.as_bytes()), Ok(Message::Event(_)));
            proptest::prop_assert!(is_event);
        }
    }
}
