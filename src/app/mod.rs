//! App-level health: the host side of the app protocol (`docs/app-protocol.md`), line-delimited
//! JSON over the VM's virtio-serial app port, and the QEMU guest agent ([`qga`]).
//!
//! Everything the app sends is untrusted: lines are bounded, rate-limited and validated; what
//! does not pass is counted and dropped, never fatal, and the reader never waits on anything
//! but the socket.

pub mod qga;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::lock;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

pub use crate::abi::AppStatus;

/// Protocol version.
pub const VERSION: u64 = 1;
/// Longest line accepted, `\n` included.
pub const MAX_LINE: usize = 4096;
/// Sustained lines per second accepted, and the burst above it.
pub const RATE: f64 = 20.0;
pub const BURST: f64 = 100.0;
/// Longest text kept from any string field.
pub const MAX_TEXT: usize = 1024;

/// Lines the host received, by what became of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineCounts {
    pub accepted: u64,
    pub oversized: u64,
    pub rate_limited: u64,
    pub malformed: u64,
    pub unsupported: u64,
    pub unknown_type: u64,
}

impl LineCounts {
    pub fn dropped(&self) -> u64 {
        self.oversized + self.rate_limited + self.malformed + self.unsupported + self.unknown_type
    }
}

/// An audit's result, as the app reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub name: String,
    pub exit: Option<i64>,
    pub output: String,
}

/// The app's word on its health.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The request it answers; `None` when the app reported on its own.
    pub id: Option<String>,
    pub status: AppStatus,
    pub details: Option<String>,
    pub audit: Option<Audit>,
}

/// A message from the app.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Ack { nonce: String },
    Health(Health),
    Info(Value),
    Hello(Value),
}

/// Why a line was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Malformed,
    Unsupported,
    UnknownType,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(|s| clip(&crate::console::sanitize(s.as_bytes())))
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_string();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Parses one line (without its `\n`).
pub fn parse(line: &[u8]) -> Result<Message, Drop> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let v: Value = serde_json::from_slice(line).map_err(|_| Drop::Malformed)?;
    let obj = v.as_object().ok_or(Drop::Malformed)?;
    match obj.get("v").map(Value::as_u64) {
        Some(Some(VERSION)) => {}
        Some(Some(_)) => return Err(Drop::Unsupported),
        _ => return Err(Drop::Malformed),
    }
    let kind = obj.get("type").and_then(Value::as_str).ok_or(Drop::Malformed)?;
    match kind {
        "ack" => Ok(Message::Ack { nonce: obj.get("nonce").and_then(text).ok_or(Drop::Malformed)? }),
        "health" => {
            let status = match obj.get("status").and_then(Value::as_str) {
                Some("ok") => AppStatus::Ok,
                Some("degraded") => AppStatus::Degraded,
                Some("failed") => AppStatus::Failed,
                _ => return Err(Drop::Malformed),
            };
            let audit = match obj.get("audit") {
                None | Some(Value::Null) => None,
                Some(a) => Some(Audit {
                    name: a.get("name").and_then(text).ok_or(Drop::Malformed)?,
                    exit: a.get("exit").and_then(Value::as_i64),
                    output: a.get("output").and_then(text).unwrap_or_default(),
                }),
            };
            Ok(Message::Health(Health {
                id: obj.get("id").and_then(text),
                status,
                details: obj.get("details").and_then(text),
                audit,
            }))
        }
        "info" => Ok(Message::Info(bounded(v.clone()))),
        "hello" => Ok(Message::Hello(bounded(v.clone()))),
        _ => Err(Drop::UnknownType),
    }
}

/// The value, re-serialised within [`MAX_TEXT`]: kept whole if small, else as clipped text.
fn bounded(v: Value) -> Value {
    let s = v.to_string();
    if s.len() <= MAX_TEXT {
        v
    } else {
        json!({ "truncated": clip(&s) })
    }
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * RATE).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the app said on its own, for the VM's monitor.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Health(Health),
    Info(Value),
}

#[derive(Default)]
struct Inner {
    counts: LineCounts,
    acks: HashMap<String, oneshot::Sender<()>>,
    answers: HashMap<String, oneshot::Sender<Health>>,
    last_info: Option<Value>,
    closed: bool,
}

/// A connection to one VM's app port.
pub struct AppChannel {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    inner: Arc<Mutex<Inner>>,
    next: std::sync::atomic::AtomicU64,
}

impl AppChannel {
    /// Connects to the app socket QEMU listens on and says hello. Unsolicited health and
    /// info go to `reports` (dropped, not awaited, if the receiver lags).
    pub async fn connect(path: &Path, reports: mpsc::Sender<Report>) -> std::io::Result<AppChannel> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        let inner = Arc::new(Mutex::new(Inner::default()));
        // The reader logs as the VM whose channel this is.
        tokio::spawn(tracing::Instrument::in_current_span(read_lines(read, inner.clone(), reports)));
        let ch = AppChannel {
            writer: tokio::sync::Mutex::new(write),
            inner,
            next: std::sync::atomic::AtomicU64::new(1),
        };
        let hello =
            json!({ "v": VERSION, "type": "hello", "host": "acpimon", "version": env!("CARGO_PKG_VERSION") });
        let _ = tokio::time::timeout(Duration::from_secs(1), ch.send(&hello)).await;
        Ok(ch)
    }

    async fn send(&self, msg: &Value) -> std::io::Result<()> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.lock().await.write_all(line.as_bytes()).await
    }

    fn next_seq(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// One challenge: the round trip to an ack echoing its nonce, or why there was none.
    pub async fn challenge(&self, timeout: Duration) -> Result<Duration, String> {
        let seq = self.next_seq();
        let nonce = format!("{:016x}", rand::random::<u64>());
        let (tx, rx) = oneshot::channel();
        lock(&self.inner).acks.insert(nonce.clone(), tx);
        let start = Instant::now();
        let msg = json!({ "v": VERSION, "type": "challenge", "seq": seq, "nonce": nonce });
        let outcome = tokio::time::timeout(timeout, async {
            self.send(&msg).await.map_err(|e| format!("cannot write to the app port: {e}"))?;
            rx.await.map_err(|_| "the app port closed".to_string())
        })
        .await;
        lock(&self.inner).acks.remove(&nonce);
        match outcome {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no ack to challenge {seq} within {} ms", timeout.as_millis())),
        }
    }

    /// A health request (naming `audit`, if any) and its answer.
    pub async fn health(&self, audit: Option<&str>, timeout: Duration) -> Result<Health, String> {
        let id = format!("{:08x}", self.next_seq());
        let (tx, rx) = oneshot::channel();
        lock(&self.inner).answers.insert(id.clone(), tx);
        let msg = json!({ "v": VERSION, "type": "health", "id": id, "audit": audit });
        let outcome = tokio::time::timeout(timeout, async {
            self.send(&msg).await.map_err(|e| format!("cannot write to the app port: {e}"))?;
            rx.await.map_err(|_| "the app port closed".to_string())
        })
        .await;
        lock(&self.inner).answers.remove(&id);
        outcome.unwrap_or_else(|_| {
            Err(format!("no answer to health request {id} within {} ms", timeout.as_millis()))
        })
    }

    pub fn counts(&self) -> LineCounts {
        lock(&self.inner).counts.clone()
    }

    pub fn last_info(&self) -> Option<Value> {
        lock(&self.inner).last_info.clone()
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.inner).closed
    }
}

/// Reads the app's bytes until the socket closes: splits lines, bounds and rate-limits them,
/// routes acks and answers to their waiters and the rest to `reports`.
async fn read_lines(
    mut read: tokio::net::unix::OwnedReadHalf,
    inner: Arc<Mutex<Inner>>,
    reports: mpsc::Sender<Report>,
) {
    let mut buf = vec![0u8; 16 << 10];
    let mut line: Vec<u8> = Vec::with_capacity(MAX_LINE);
    let mut oversized = false;
    let mut bucket = Bucket { tokens: BURST, at: Instant::now() };
    loop {
        let n = match read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for chunk in buf[..n].split_inclusive(|&b| b == b'\n') {
            let complete = chunk.ends_with(b"\n");
            let body = chunk.strip_suffix(b"\n").unwrap_or(chunk);
            if !oversized {
                if line.len() + chunk.len() > MAX_LINE {
                    oversized = true;
                    line.clear();
                } else {
                    line.extend_from_slice(body);
                }
            }
            if !complete {
                continue;
            }
            if std::mem::take(&mut oversized) {
                lock(&inner).counts.oversized += 1;
            } else if !bucket.take(Instant::now()) {
                lock(&inner).counts.rate_limited += 1;
            } else if !line.is_empty() {
                route(parse(&line), &inner, &reports);
            }
            line.clear();
        }
    }
    let mut i = lock(&inner);
    i.closed = true;
    // Waiters see their senders dropped: "the app port closed".
    i.acks.clear();
    i.answers.clear();
}

fn route(msg: Result<Message, Drop>, inner: &Mutex<Inner>, reports: &mpsc::Sender<Report>) {
    let mut i = lock(inner);
    let msg = match msg {
        Ok(m) => m,
        Err(d) => {
            match d {
                Drop::Malformed => i.counts.malformed += 1,
                Drop::Unsupported => i.counts.unsupported += 1,
                Drop::UnknownType => i.counts.unknown_type += 1,
            }
            return;
        }
    };
    i.counts.accepted += 1;
    match msg {
        Message::Ack { nonce } => {
            if let Some(tx) = i.acks.remove(&nonce) {
                let _ = tx.send(());
            }
        }
        Message::Health(h) => {
            if let Some(tx) = h.id.as_ref().and_then(|id| i.answers.remove(id)) {
                let _ = tx.send(h.clone());
            }
            let _ = reports.try_send(Report::Health(h));
        }
        Message::Info(v) | Message::Hello(v) => {
            i.last_info = Some(v.clone());
            let _ = reports.try_send(Report::Info(v));
        }
    }
}

#[cfg(test)]
mod tests;
