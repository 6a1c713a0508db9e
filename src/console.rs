//! The guest's serial console over a Unix socket: everything the guest prints is kept in a
//! bounded ring (the last N bytes), so what was printed before a failure is there when
//! diagnostics need it. The guest's bytes are untrusted: bounded here, and control characters
//! are neutralised before anything is shown.
//!
//! QEMU serves one client per socket chardev. When the console is the launcher's own (EVE's
//! `cons`, see [`crate::launch::console`]), acpimon is that client and [`Console::share`]
//! re-exports it: every client of the shared socket gets the guest's output as it arrives and
//! can type into the serial port. A client that does not keep up loses bytes (it is never
//! waited for), so no client can stall the guest or acpimon; nothing is written to disk.
//!
//! A guest may print without end, as fast as QEMU lets it (a few hundred KB/s under TCG). What
//! that costs the service is bounded twice (see [`Budget`]): the socket is read in large
//! chunks, at most about `1 / gather` times a second whatever the guest does, and each console
//! keeps at most `rate` bytes a second (with a `burst` after a quiet spell). Output beyond that
//! is discarded by whole lines and counted ([`Console::counts`], the `/metrics` counter
//! `acpimon_console_bytes_total{what="dropped"}`); where bytes went missing, the ring and the
//! shared socket show a line `[acpimon: N bytes of console output dropped ...]` and consumers
//! of [`Console::on_kept`] and [`Console::kept_chunks`] get the count in
//! [`ConsoleChunk::dropped_before`].

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::util::lock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, Notify};

/// Default ring size.
pub const DEFAULT_KEEP: usize = 256 << 10;

#[derive(Default)]
struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes received since connecting.
    total: u64,
    closed: bool,
}

struct Shared {
    ring: Mutex<Ring>,
    notify: Notify,
    /// The output, for the clients of the shared socket.
    /// Made when the first shared-socket client connects: a broadcast channel allocates every
    /// slot up front (10 KiB per VM), and most consoles never have such a client.
    out: Mutex<Option<broadcast::Sender<Arc<[u8]>>>>,
    /// The budget, the counters and the subscribers: taken by the reading task for each read
    /// (before the ring), and by [`Console::on_kept`], so a subscriber misses nothing.
    gate: Mutex<Gate>,
}

/// What one guest's console may cost the service. The defaults ([`Budget::default`]) keep a
/// kernel's whole boot log, an oops or a SysRq dump after a quiet spell, and bound a guest
/// that prints without end to about 50 reads and `rate` kept bytes a second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Bytes a second kept, sustained.
    pub rate: u64,
    /// Bytes kept at once after a quiet spell (the head of a burst); the budget refills at
    /// `rate` up to this.
    pub burst: u64,
    /// A line that began within the budget is kept whole up to this many bytes even past the
    /// budget, so consumers see complete lines; the rest of a longer line is dropped.
    pub line_cap: usize,
    /// After a read that did not fill the buffer, the reader waits this long so the output
    /// gathers in the socket: one read per `gather` instead of one per piece QEMU writes.
    /// It delays output by at most this much.
    pub gather: Duration,
    /// Bytes a second read from the socket, sustained (after `burst`): beyond, acpimon stops
    /// reading for a while, QEMU's socket fills and the guest's serial port waits, as a real
    /// UART's line would make it (115200 baud carry 11.5 KB/s). This is what bounds the CPU:
    /// QEMU writes a guest's output to the socket a byte or a few at a time, and the kernel's
    /// cost of each such write (measured ~1.7 µs per byte of a flood) is paid by whoever reads.
    pub read_rate: u64,
}

impl Default for Budget {
    fn default() -> Self {
        // Measured (README, Benchmark): 20 ms keeps a flooding guest to ~50 reads/s; a whole
        // Linux boot log is < 100 KiB; SysRq t of a small guest < 256 KiB; 12 KiB/s read keeps
        // four flooding guests under 10 % of a core.
        Budget {
            rate: 8 << 10,
            burst: 256 << 10,
            line_cap: 4 << 10,
            gather: Duration::from_millis(20),
            read_rate: 12 << 10,
        }
    }
}

/// Bytes read from one console, by what became of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleCounts {
    /// Bytes the guest printed (read from the socket).
    pub received: u64,
    /// Bytes kept (ring, shared socket, subscribers).
    pub kept: u64,
    /// Bytes discarded over the budget.
    pub dropped: u64,
    /// Reads of the socket.
    pub reads: u64,
}

impl std::ops::Add for ConsoleCounts {
    type Output = ConsoleCounts;
    fn add(self, o: ConsoleCounts) -> ConsoleCounts {
        ConsoleCounts {
            received: self.received + o.received,
            kept: self.kept + o.kept,
            dropped: self.dropped + o.dropped,
            reads: self.reads + o.reads,
        }
    }
}

/// One piece of a console's kept output, as [`Console::on_kept`] delivers it.
#[derive(Clone, Debug)]
pub struct ConsoleChunk {
    /// Bytes the budget discarded just before these (0 when the output is continuous). After
    /// a drop the chunk starts at the beginning of a line; the line before the drop may have
    /// been cut (no newline before the gap).
    pub dropped_before: u64,
    /// The guest's bytes, raw (not sanitised), without acpimon's drop marker.
    pub bytes: Arc<[u8]>,
}

type Sink = Box<dyn FnMut(&ConsoleChunk) + Send>;

/// The budget's state: a token bucket over whole lines.
struct Gate {
    budget: Budget,
    /// Bytes that may still be kept; negative after a line kept past the budget.
    tokens: f64,
    refilled: Option<std::time::Instant>,
    /// Bytes of the current line kept so far; `None` while its bytes are being dropped.
    line: Option<usize>,
    /// Whether the last byte seen (kept or not) ended a line.
    at_line_start: bool,
    /// Dropped since the last kept byte: reported with the next kept one.
    pending_drop: u64,
    counts: ConsoleCounts,
    sinks: Vec<Sink>,
}

/// A run of kept bytes in a read's buffer.
#[derive(Debug, PartialEq)]
struct Kept {
    dropped_before: u64,
    range: std::ops::Range<usize>,
}

impl Gate {
    fn new(budget: Budget) -> Gate {
        Gate {
            budget,
            tokens: budget.burst as f64,
            refilled: None,
            line: Some(0),
            at_line_start: true,
            pending_drop: 0,
            counts: ConsoleCounts::default(),
            sinks: Vec::new(),
        }
    }

    /// Which bytes of `data` (one read, at `now`) are kept: whole lines while the budget has
    /// room, a line begun within it finished up to `line_cap`, nothing else until the next
    /// line starts with room again.
    fn admit(&mut self, data: &[u8], now: std::time::Instant) -> Vec<Kept> {
        let b = self.budget;
        if let Some(then) = self.refilled {
            let earned = now.saturating_duration_since(then).as_secs_f64() * b.rate as f64;
            self.tokens = (self.tokens + earned).min(b.burst as f64);
        }
        self.refilled = Some(now);
        self.counts.received += data.len() as u64;
        self.counts.reads += 1;
        let mut kept: Vec<Kept> = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let end = data[i..].iter().position(|&c| c == b'\n').map_or(data.len(), |p| i + p + 1);
            let len = end - i;
            if self.at_line_start {
                self.line = (self.tokens > 0.0).then_some(0);
            }
            let keep = match self.line {
                // Within the budget, or finishing a line begun within it up to the cap.
                Some(k) => len.min((self.tokens.max(0.0) as usize).max(b.line_cap.saturating_sub(k))),
                None => 0,
            };
            if keep > 0 {
                match kept.last_mut() {
                    Some(last) if last.range.end == i && self.pending_drop == 0 => last.range.end = i + keep,
                    _ => kept.push(Kept {
                        dropped_before: std::mem::take(&mut self.pending_drop),
                        range: i..i + keep,
                    }),
                }
                self.tokens -= keep as f64;
                self.line = self.line.map(|k| k + keep);
            }
            if keep < len {
                self.pending_drop += (len - keep) as u64;
                self.counts.dropped += (len - keep) as u64;
                self.line = None;
            }
            self.counts.kept += keep as u64;
            self.at_line_start = data[end - 1] == b'\n';
            i = end;
        }
        kept
    }
}

/// The buffer of one read: the most a flooding guest gets per wake-up.
const READ_CHUNK: usize = 64 << 10;
/// The console's first read buffer, grown to [`READ_CHUNK`] by the first read that fills it.
const FIRST_READ_CHUNK: usize = 4 << 10;

/// The text put in the ring and on the shared socket where output was dropped.
fn drop_marker(n: u64, after_newline: bool) -> String {
    format!(
        "{}[acpimon: {n} bytes of console output dropped (over the console budget)]\n",
        if after_newline { "" } else { "\n" }
    )
}

impl Shared {
    /// One read's bytes: through the budget into the ring, the subscribers and the shared
    /// socket.
    fn accept(&self, data: &[u8], now: std::time::Instant) {
        let mut gate = lock(&self.gate);
        let kept = gate.admit(data, now);
        if kept.is_empty() {
            return;
        }
        let mut shown: Vec<u8> = Vec::with_capacity(data.len() + 96);
        {
            let mut ring = lock(&self.ring);
            for k in &kept {
                if k.dropped_before > 0 {
                    let after_newline = match shown.last() {
                        Some(&c) => c == b'\n',
                        None => ring.buf.back().is_none_or(|&c| c == b'\n'),
                    };
                    shown.extend_from_slice(drop_marker(k.dropped_before, after_newline).as_bytes());
                }
                shown.extend_from_slice(&data[k.range.clone()]);
            }
            ring.total += shown.len() as u64;
            let cap = ring.cap;
            ring.buf.extend(&shown);
            let excess = ring.buf.len().saturating_sub(cap);
            ring.buf.drain(..excess);
        }
        for k in &kept {
            let chunk =
                ConsoleChunk { dropped_before: k.dropped_before, bytes: Arc::from(&data[k.range.clone()]) };
            for sink in gate.sinks.iter_mut() {
                sink(&chunk);
            }
        }
        drop(gate);
        // No receiver (nobody on the shared socket) is fine.
        if let Some(out) = lock(&self.out).as_ref().filter(|o| o.receiver_count() > 0) {
            let _ = out.send(Arc::from(shown));
        }
        self.notify.notify_waiters();
    }
}

/// The socket [`Console::share`] listens on.
struct Share {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    /// Its inode: a later console (QEMU relaunched) may have bound the same path since, and
    /// its socket is not this one's to remove.
    ino: u64,
}

impl Share {
    fn close(self) {
        self.task.abort();
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Chunks a shared-socket client may fall behind by before it loses output.
const SHARE_BACKLOG: usize = 256;

/// A connected console.
pub struct Console {
    shared: Arc<Shared>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// The QEMU chardev this console is (for `chardev-send-break`), when known.
    chardev: Option<String>,
    /// The shared socket's task, path and inode, removed with the console.
    share: Mutex<Option<Share>>,
}

impl Console {
    /// Connects to QEMU's listening console socket, retrying for up to `wait`, and keeps the
    /// last `keep` bytes.
    pub async fn connect(path: &Path, keep: usize, wait: Duration) -> std::io::Result<Console> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Ok(Console::over(stream, keep))
    }

    /// A console on an already connected stream (the other end carries the guest's serial
    /// port: QEMU's socket, or a bridge such as libvirt's console stream).
    pub fn over(stream: UnixStream, keep: usize) -> Console {
        Console::over_with(stream, keep, Budget::default())
    }

    /// [`Console::over`] with another budget than the default.
    pub fn over_with(stream: UnixStream, keep: usize, budget: Budget) -> Console {
        let (mut read, write) = stream.into_split();
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring { cap: keep.max(1), ..Ring::default() }),
            notify: Notify::new(),
            out: Mutex::new(None),
            gate: Mutex::new(Gate::new(budget)),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            // Small until a read fills it (a flood): most consoles print little, and 64 KiB
            // per VM would be most of a watched VM's memory.
            let mut chunk = vec![0u8; FIRST_READ_CHUNK];
            // The read budget (bytes; negative: owed), refilled at `read_rate` up to `burst`.
            let mut can_read = lock(&s.gate).budget.burst as f64;
            let mut refilled = std::time::Instant::now();
            loop {
                let n = read.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    lock(&s.ring).closed = true;
                    s.notify.notify_waiters();
                    return;
                }
                let now = std::time::Instant::now();
                s.accept(&chunk[..n], now);
                let b = lock(&s.gate).budget;
                let earned = now.saturating_duration_since(refilled).as_secs_f64() * b.read_rate as f64;
                can_read = (can_read + earned).min(b.burst as f64) - n as f64;
                refilled = now;
                // Let the output gather: a guest writing in small pieces would otherwise cost a
                // wake-up and a read per piece (QEMU writes ~30 bytes at a time); past the read
                // budget, wait until it is earned back (the guest waits meanwhile).
                let owed = Duration::from_secs_f64((-can_read).max(0.0) / b.read_rate.max(1) as f64);
                let pause = if n < chunk.len() { b.gather.max(owed) } else { owed };
                if n == chunk.len() && chunk.len() < READ_CHUNK {
                    chunk.resize(READ_CHUNK, 0);
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause.min(Duration::from_secs(5))).await;
                }
            }
        });
        Console {
            shared,
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            chardev: None,
            share: Mutex::new(None),
        }
    }

    /// Replaces the console's budget (from the next read on).
    pub fn set_budget(&self, budget: Budget) {
        let mut gate = lock(&self.shared.gate);
        gate.budget = budget;
        gate.tokens = gate.tokens.min(budget.burst as f64);
    }

    /// Bytes read so far, by what became of them.
    pub fn counts(&self) -> ConsoleCounts {
        lock(&self.shared.gate).counts
    }

    /// Calls `sink` with every chunk of the kept output, in order, from now on; the first call
    /// (at once, from this function) gives what the ring holds already (with acpimon's drop
    /// markers as text, `dropped_before` 0), so nothing is missed between the two.
    ///
    /// This is the hook for consumers that must see every kept line, such as the kernel-report
    /// sentinel: unlike the shared socket's clients, a subscriber never loses a kept chunk. It
    /// sees what the budget keeps ([`Budget`]): whole lines (a line cut at `line_cap`, or by a
    /// drop, is followed by a chunk with `dropped_before > 0` that starts a new line), at most
    /// `rate` bytes a second sustained, and the head of every burst after a quiet spell (up to
    /// `burst` bytes), so a report printed by a quiet guest arrives whole, while one printed
    /// in the middle of a sustained flood may be partly dropped (the gap is counted). Chunks
    /// are not split at line boundaries: a line may span chunks, so the consumer keeps its own
    /// partial line (bounded by `line_cap`, for example).
    ///
    /// `sink` runs on the console's reading task, holding its lock: it must be quick and never
    /// block (scan, then hand anything slow to a channel; [`Console::kept_chunks`] does that).
    /// Subscriptions last as long as the console (a relaunched QEMU gets a new console, to
    /// subscribe to again). A consumer that sees `dropped_before > 0` should forget its partial
    /// line (the sentinel's `Scanner::resync`).
    pub fn on_kept(&self, mut sink: impl FnMut(&ConsoleChunk) + Send + 'static) {
        let mut gate = lock(&self.shared.gate);
        let held: Vec<u8> = lock(&self.shared.ring).buf.iter().copied().collect();
        if !held.is_empty() {
            sink(&ConsoleChunk { dropped_before: 0, bytes: Arc::from(held) });
        }
        gate.sinks.push(Box::new(sink));
    }

    /// [`Console::on_kept`] as a channel, for a consumer in an async loop (`select!`): every
    /// kept chunk in order, none lost. Unbounded, but fed at most at the budget's `rate` (plus
    /// a `burst`), and the sending stops when the receiver is dropped.
    pub fn kept_chunks(&self) -> tokio::sync::mpsc::UnboundedReceiver<ConsoleChunk> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.on_kept(move |c| {
            let _ = tx.send(c.clone());
        });
        rx
    }

    /// Names the QEMU chardev this console is.
    pub fn with_chardev(mut self, chardev: impl Into<String>) -> Self {
        self.chardev = Some(chardev.into());
        self
    }

    /// The QEMU chardev this console is, when known.
    pub fn chardev(&self) -> Option<&str> {
        self.chardev.as_deref()
    }

    /// Re-exports the console on a Unix socket at `path` (replacing a stale one; created
    /// readable by the owner only): clients get the output from the time they connect and their
    /// input goes to the serial port. The socket goes away with the console.
    pub fn share(&self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)?;
        // The console takes input: the owner's only (the service's umask is 0077 anyway).
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let shared = self.shared.clone();
        let writer = self.writer.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (mut read, mut write) = stream.into_split();
                let mut rx =
                    lock(&shared.out).get_or_insert_with(|| broadcast::channel(SHARE_BACKLOG).0).subscribe();
                let writer = writer.clone();
                tokio::spawn(async move {
                    let mut chunk = vec![0u8; 4096];
                    loop {
                        tokio::select! {
                            out = rx.recv() => match out {
                                Ok(bytes) => {
                                    if write.write_all(&bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Err(broadcast::error::RecvError::Lagged(_)) => {}
                                Err(broadcast::error::RecvError::Closed) => return,
                            },
                            n = read.read(&mut chunk) => match n {
                                Ok(n) if n > 0 => {
                                    if writer.lock().await.write_all(&chunk[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                _ => return,
                            },
                        }
                    }
                });
            }
        });
        let ino = std::fs::symlink_metadata(path)?.ino();
        if let Some(old) = lock(&self.share).replace(Share { task, path: path.into(), ino }) {
            old.close();
        }
        Ok(())
    }

    /// Bytes kept so far (with the drop markers); a mark for [`Console::wait_for`].
    pub fn position(&self) -> u64 {
        lock(&self.shared.ring).total
    }

    /// The kept output, with control characters neutralised.
    pub fn tail(&self) -> String {
        let ring = lock(&self.shared.ring);
        sanitize(&ring.buf.iter().copied().collect::<Vec<u8>>())
    }

    /// The kept output received after `mark`, neutralised.
    pub fn since(&self, mark: u64) -> String {
        let ring = lock(&self.shared.ring);
        let start = ring.total - ring.buf.len() as u64;
        let skip = mark.saturating_sub(start).min(ring.buf.len() as u64) as usize;
        sanitize(&ring.buf.iter().skip(skip).copied().collect::<Vec<u8>>())
    }

    /// Waits until `needle` appears in the output after `mark`; on timeout or when the console
    /// closes, returns the output seen, for the error message.
    pub async fn wait_for(&self, needle: &str, mark: u64, timeout: Duration) -> Result<String, String> {
        self.wait_until(mark, timeout, |seen| seen.contains(needle)).await
    }

    /// Waits until the output after `mark` satisfies `found`; on timeout or when the console
    /// closes, returns the output seen.
    pub async fn wait_until(
        &self,
        mark: u64,
        timeout: Duration,
        found: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            let seen = self.since(mark);
            if found(&seen) {
                return Ok(seen);
            }
            if self.is_closed() {
                return Err(seen);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.since(mark));
            }
        }
    }

    /// Whether QEMU closed the console (it exited).
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.ring).closed
    }

    /// Sends bytes to the guest's serial port.
    pub async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.lock().await.write_all(bytes).await
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(share) = lock(&self.share).take() {
            share.close();
        }
    }
}

/// Guest output made safe to print: invalid UTF-8 replaced, control characters other than
/// newline and tab shown as `^X` (so escape sequences cannot drive the operator's terminal).
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push((b'@' + c as u8) as char);
            }
            '\u{7f}' => out.push_str("^?"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_neutralised() {
        assert_eq!(sanitize(b"ok\r\n\x1b[2J\x07\xff\x7f\tend"), "ok\n^[[2J^G\u{fffd}^?\tend");
        assert_eq!(sanitize("\u{9b}x".as_bytes()), "\u{fffd}x");
    }

    fn budget(rate: u64, burst: u64, line_cap: usize) -> Budget {
        Budget { rate, burst, line_cap, gather: Duration::ZERO, read_rate: u64::MAX >> 8 }
    }

    /// The kept bytes of `data` and the drops before them.
    fn admitted(gate: &mut Gate, data: &[u8], at: std::time::Instant) -> Vec<(u64, String)> {
        gate.admit(data, at)
            .into_iter()
            .map(|k| (k.dropped_before, String::from_utf8_lossy(&data[k.range]).into_owned()))
            .collect()
    }

    #[test]
    fn the_budget_keeps_whole_lines_and_the_head_of_each_burst() {
        let t0 = std::time::Instant::now();
        let mut gate = Gate::new(budget(10, 20, 8));
        // 20 bytes of burst: the first two lines whole, the third (begun within the budget)
        // finished, the fourth dropped whole.
        let kept = admitted(&mut gate, b"aaaaaaaaa\nbbbbbbbbb\n", t0);
        assert_eq!(kept, vec![(0, "aaaaaaaaa\nbbbbbbbbb\n".to_string())]);
        let kept = admitted(&mut gate, b"cc\ndd\n", t0);
        assert_eq!(kept, vec![], "no budget left at a line start");
        assert_eq!(gate.counts, ConsoleCounts { received: 26, kept: 20, dropped: 6, reads: 2 });
        // One second later: 10 bytes of budget; the next line starts with the drop's count.
        let t1 = t0 + Duration::from_secs(1);
        let kept = admitted(&mut gate, b"eeee\nffff\ngggg\n", t1);
        assert_eq!(kept, vec![(6, "eeee\nffff\n".to_string())]);
        assert_eq!(gate.pending_drop, 5);
        // A line begun within the budget is kept past it up to the cap (8), the rest dropped
        // until the next line.
        let t2 = t1 + Duration::from_secs(5);
        let kept = admitted(&mut gate, b"hhhhhhhhhhhhhhhhhhhhhhhh", t2);
        assert_eq!(kept, vec![(5, "hhhhhhhhhhhhhhhhhhhh".to_string())], "20 bytes of budget (the burst)");
        let kept = admitted(&mut gate, b"hhhh\nii\n", t2);
        assert_eq!(kept, vec![], "past the budget and the cap: dropped to the line's end, then no room");
        let t3 = t2 + Duration::from_secs(10);
        let kept = admitted(&mut gate, b"jj\n", t3);
        assert_eq!(kept, vec![(4 + 5 + 3, "jj\n".to_string())]);
        // A line that arrives in pieces across reads stays one line.
        let mut gate = Gate::new(budget(1, 4, 6));
        assert_eq!(admitted(&mut gate, b"abc", t0), vec![(0, "abc".to_string())]);
        assert_eq!(admitted(&mut gate, b"def", t0), vec![(0, "def".to_string())], "finished up to the cap");
        assert_eq!(admitted(&mut gate, b"gh\nxy\n", t0), vec![]);
        assert_eq!(gate.counts.dropped, 6);
    }

    #[tokio::test]
    async fn a_flood_is_read_in_large_chunks_budgeted_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (client, peer) = tokio::join!(UnixStream::connect(&path), listener.accept());
        let b = Budget {
            rate: 1000,
            burst: 4000,
            line_cap: 100,
            gather: Duration::from_millis(20),
            read_rate: 1 << 30,
        };
        let console = Console::over_with(client.unwrap(), 64 << 10, b);
        let (mut peer, _) = peer.unwrap();
        let got = Arc::new(Mutex::new(Vec::<ConsoleChunk>::new()));
        let g = got.clone();
        console.on_kept(move |c| lock(&g).push(c.clone()));
        let mut rx = console.kept_chunks();
        // 30-byte pieces as fast as they go, for half a second.
        let line = b"flood flood flood flood flood\n";
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_millis(500) {
            peer.write_all(line).await.unwrap();
            sent += line.len() as u64;
            if sent % 3000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        peer.write_all(b"last line\n").await.unwrap();
        sent += 10;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let c = console.counts();
        assert_eq!(c.received, sent, "{c:?}");
        assert_eq!(c.kept + c.dropped, c.received, "{c:?}");
        assert!(c.dropped > 0 && c.kept <= 4000 + 1000 + 100, "{c:?}");
        assert!(c.reads < 60, "one read per gather interval at most, not one per piece: {c:?}");
        let chunks = lock(&got).clone();
        let kept: u64 = chunks.iter().map(|c| c.bytes.len() as u64).sum();
        assert_eq!(kept, c.kept, "the subscriber gets every kept byte");
        let mut through_channel = 0;
        while let Ok(chunk) = rx.try_recv() {
            through_channel += chunk.bytes.len() as u64;
        }
        assert_eq!(through_channel, c.kept, "and so does the channel");
        assert!(chunks.iter().skip(1).all(|c| c.dropped_before == 0 || c.bytes.starts_with(b"flood")));
        let tail = console.tail();
        assert!(tail.contains("bytes of console output dropped (over the console budget)]"), "{tail}");
    }

    #[tokio::test]
    async fn past_the_read_budget_the_guest_is_made_to_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (client, peer) = tokio::join!(UnixStream::connect(&path), listener.accept());
        let b = Budget { rate: 1000, burst: 8000, line_cap: 100, gather: Duration::ZERO, read_rate: 8000 };
        let console = Console::over_with(client.unwrap(), 64 << 10, b);
        let (mut peer, _) = peer.unwrap();
        let writer = tokio::spawn(async move {
            let line = [b'x'; 1023].iter().chain(b"\n").copied().collect::<Vec<u8>>();
            loop {
                if peer.write_all(&line).await.is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let c = console.counts();
        writer.abort();
        // The burst, 1.5 s at the rate, and at most one read's buffer beyond: not what the
        // writer would push through unhindered (hundreds of MB/s).
        assert!(c.received > 8000 && c.received <= 8000 + 12000 + READ_CHUNK as u64, "{c:?}");
    }

    #[tokio::test]
    async fn the_ring_keeps_the_last_bytes_and_finds_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let console = Console::connect(&path, 64, Duration::from_secs(1)).await.unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let mark = console.position();
        peer.write_all(&vec![b'x'; 1000]).await.unwrap();
        peer.write_all(b"login: ").await.unwrap();
        let seen = console.wait_for("login:", mark, Duration::from_secs(5)).await.unwrap();
        assert!(seen.ends_with("login: ") && seen.len() <= 64, "{seen}");
        assert_eq!(console.position(), 1007);
        let e = console.wait_for("never", mark, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.len(), 64);
        console.send(b"uptime\n").await.unwrap();
        let mut got = [0u8; 7];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"uptime\n");
    }

    #[tokio::test]
    async fn a_shared_console_gives_output_to_its_clients_and_takes_their_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let share = dir.path().join("share.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let console = Console::connect(&path, 64, Duration::from_secs(1)).await.unwrap().with_chardev("cons");
        assert_eq!(console.chardev(), Some("cons"));
        let (mut qemu, _) = listener.accept().await.unwrap();
        console.share(&share).unwrap();
        let mut a = UnixStream::connect(&share).await.unwrap();
        let mut b = UnixStream::connect(&share).await.unwrap();
        // Let both be accepted and subscribed before the output.
        tokio::time::sleep(Duration::from_millis(100)).await;
        qemu.write_all(b"boot line\n").await.unwrap();
        for client in [&mut a, &mut b] {
            let mut got = [0u8; 10];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got)).await.unwrap().unwrap();
            assert_eq!(&got, b"boot line\n");
        }
        console.wait_for("boot line", 0, Duration::from_secs(5)).await.unwrap();
        b.write_all(b"ls\n").await.unwrap();
        let mut got = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), qemu.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"ls\n");
        // QEMU relaunched: a new console shares the same path; the old one going away leaves
        // the new socket alone, and the new one going away removes it.
        let (listener2, path2) =
            (tokio::net::UnixListener::bind(dir.path().join("c2.sock")).unwrap(), dir.path().join("c2.sock"));
        let console2 = Console::connect(&path2, 64, Duration::from_secs(1)).await.unwrap();
        let _qemu2 = listener2.accept().await.unwrap();
        console2.share(&share).unwrap();
        drop(console);
        assert!(share.exists(), "a later console's socket is not the earlier one's to remove");
        drop(console2);
        assert!(!share.exists(), "the shared socket goes with the console");
    }
}
