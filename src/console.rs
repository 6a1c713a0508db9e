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
    out: broadcast::Sender<Arc<[u8]>>,
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
        let (mut read, write) = stream.into_split();
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring { cap: keep.max(1), ..Ring::default() }),
            notify: Notify::new(),
            out: broadcast::channel(SHARE_BACKLOG).0,
        });
        let s = shared.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 16 << 10];
            loop {
                let n = read.read(&mut chunk).await.unwrap_or(0);
                let mut ring = lock(&s.ring);
                if n == 0 {
                    ring.closed = true;
                    drop(ring);
                    s.notify.notify_waiters();
                    return;
                }
                ring.total += n as u64;
                let cap = ring.cap;
                ring.buf.extend(&chunk[..n]);
                let excess = ring.buf.len().saturating_sub(cap);
                ring.buf.drain(..excess);
                drop(ring);
                // No receiver (nobody on the shared socket) is fine.
                let _ = s.out.send(Arc::from(&chunk[..n]));
                s.notify.notify_waiters();
            }
        });
        Console {
            shared,
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            chardev: None,
            share: Mutex::new(None),
        }
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
                let mut rx = shared.out.subscribe();
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

    /// The output from now on, chunk by chunk, in order: what the shared socket's clients get.
    /// A receiver more than 256 chunks behind loses some (`Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<[u8]>> {
        self.shared.out.subscribe()
    }

    /// Bytes received so far; a mark for [`Console::wait_for`].
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
