//! A QMP client on tokio. Commands are qapi's typed definitions (`qapi::qmp::*`), sent over
//! our own line transport: one reader task routes replies by `id` and broadcasts events.
//! An event or reply the bundled schema does not know is kept as raw JSON and logged, never
//! fatal (qapi 0.15's own decoder rejects events it does not know).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::lock;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
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
    #[error("QMP reply to {command} does not match the schema: {source}")]
    Reply { command: String, source: serde_json::Error },
}

/// An asynchronous event from QEMU.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// `event` field, e.g. `STOP`, `GUEST_PANICKED`.
    pub name: String,
    /// The whole event as QEMU sent it.
    pub raw: Value,
    /// The event decoded with qapi's schema, when it knows it.
    pub typed: Option<qapi::qmp::Event>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A connected QMP monitor. Cheap to share behind an `Arc`; commands may run concurrently.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    closed: tokio::sync::watch::Receiver<bool>,
    /// QEMU's version from the greeting, e.g. (10, 0, 2).
    pub version: (u64, u64, u64),
}

impl Qmp {
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
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = read_json_line(&mut reader).await?.ok_or(QmpError::Closed)?;
        let v = &greeting["QMP"]["version"]["qemu"];
        let version = match (v["major"].as_u64(), v["minor"].as_u64(), v["micro"].as_u64()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(QmpError::Greeting(path.into())),
        };
        // QEMU sends events one at a time; a broadcast channel allocates every slot up front
        // (a QmpEvent is ~264 bytes), so 256 slots cost ~70 KiB per VM for nothing.
        let (events, _) = broadcast::channel(32);
        let pending: Pending = Arc::default();
        let (pending_for_route, events_for_route) = (pending.clone(), events.clone());
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            route(reader, pending_for_route, events_for_route).await;
            let _ = closed_tx.send(true);
        });
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            closed,
            version,
        };
        qmp.execute_raw("qmp_capabilities", json!({}), DEFAULT_TIMEOUT).await?;
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

    /// Runs a typed command.
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd).expect("qapi commands serialise");
        let ret = self.execute_raw(C::NAME, args, DEFAULT_TIMEOUT).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Reply { command: C::NAME.into(), source })
    }

    /// Runs an HMP command line through `human-monitor-command`, returning its output.
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        self.execute(qapi::qmp::human_monitor_command { command_line: command_line.into(), cpu_index: None })
            .await
    }

    /// Runs any command by name; the reply's `return` value.
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
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(QmpError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Timeout { command: name.into(), timeout });
            }
        };
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Command {
                command: name.into(),
                class: err["class"].as_str().unwrap_or("?").into(),
                desc: err["desc"].as_str().unwrap_or("?").into(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// Reads QEMU's lines until the connection closes: replies to their waiters by `id`, events to
/// subscribers. Anything else is logged and dropped.
async fn route<R: AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let msg = match read_json_line(&mut reader).await {
            Ok(Some(v)) => v,
            Ok(None) | Err(_) => break,
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let typed = serde_json::from_value::<qapi::qmp::Event>(msg.clone()).ok();
            if typed.is_none() {
                log_raw("event not in qapi's schema, kept raw", &msg);
            }
            let _ = events.send(QmpEvent { name: name.to_string(), raw: msg, typed });
        } else if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            if let Some(tx) = lock(&pending).remove(&id) {
                let _ = tx.send(msg);
            }
        } else {
            log_raw("unrouted QMP message", &msg);
        }
    }
    // Dropping the senders wakes every waiter with `Closed`.
    lock(&pending).clear();
}

fn log_raw(what: &str, msg: &Value) {
    if std::env::var_os("ACPIMON_DEBUG_QMP").is_some() {
        eprintln!("acpimon: {what}: {msg}");
    }
}

/// One JSON line, bounded by [`MAX_LINE`]; `None` at end of stream. A line that is not JSON is
/// skipped (QEMU never sends one; a bug should not end monitoring).
async fn read_json_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::Io(std::io::Error::other("QMP line longer than 16 MiB")));
        }
        match serde_json::from_slice(&buf) {
            Ok(v) => return Ok(Some(v)),
            Err(_) => log_raw("non-JSON QMP line", &Value::String(String::from_utf8_lossy(&buf).into())),
        }
    }
}
