//! The doorbell: the host's end of the byte the table's `_EVT` writes to the doorbell I/O port
//! (an `isa-debugcon` whose chardev QEMU serves on a Unix socket) once a record is complete.
//!
//! One tokio task per VM reads the socket; each read holding [`crate::abi::DOORBELL_BYTE`] wakes the
//! heartbeat in flight, which then reads the region once. The byte is untrusted: it only says
//! "look now". A ring with no beat in flight wakes nobody; a stale ring costs one region read;
//! a flood costs at most one wake per read of up to [`READ_CHUNK`] bytes, and a beat stops
//! listening after [`MAX_WAKES_PER_BEAT`] of them (see [`super::Heartbeat`]).
//!
//! The doorbell byte is a SLIP END, and the same port carries the port channel's frames (the
//! whole record, when the AML cannot write the region): the reader decodes the stream with
//! [`FrameDecoder`]. Every END wakes the beat in flight; a valid frame is kept (the latest of
//! any source, and the latest GED frame, which answers a beat); a bad one is counted, its
//! reason kept, and dropped. Bytes outside a valid frame count as other bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::abi::{PortFrame, Source};
use crate::read::frame::{FrameDecoder, FrameError, FrameEvent};

/// The most bytes one read takes; one read is one wake at most.
pub const READ_CHUNK: usize = 256;
/// A beat reads the region at most this many times on rings; past that it waits for its
/// timers only (a guest ringing without answering cannot keep the host busy).
pub const MAX_WAKES_PER_BEAT: u32 = 64;

/// A connected doorbell. Dropping it stops its reader.
pub struct Doorbell {
    path: PathBuf,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    notify: Notify,
    rings: AtomicU64,
    other_bytes: AtomicU64,
    frames: AtomicU64,
    bad_frames: AtomicU64,
    latest: Mutex<Latest>,
    /// Why the reader stopped, once it has.
    closed: Mutex<Option<String>>,
}

impl Doorbell {
    /// Connects to the doorbell socket QEMU serves and starts its reader.
    pub async fn connect(path: &Path) -> std::io::Result<Doorbell> {
        let stream = UnixStream::connect(path).await?;
        Ok(Doorbell::from_stream(path, stream))
    }

    /// A doorbell reading `stream` (QEMU's, or a simulated VM's).
    pub fn from_stream(path: &Path, stream: UnixStream) -> Doorbell {
        let shared = Arc::new(Shared::default());
        let reader = tokio::spawn(read(stream, shared.clone(), path.to_path_buf()));
        Doorbell { path: path.to_path_buf(), shared, reader }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A wake-up for the next ring. Call `enable()` on it before reading the region, so a
    /// ring between the read and the wait is not lost.
    pub fn notified(&self) -> Notified<'_> {
        self.shared.notify.notified()
    }

    /// Why the doorbell no longer rings (QEMU closed the socket, a read failed), if so.
    pub fn closed(&self) -> Option<String> {
        self.shared.closed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Doorbell bytes received so far.
    pub fn rings(&self) -> u64 {
        self.shared.rings.load(Ordering::Relaxed)
    }

    /// Other bytes received (and dropped) so far: everything but ENDs and valid frames.
    pub fn other_bytes(&self) -> u64 {
        self.shared.other_bytes.load(Ordering::Relaxed)
    }

    /// Valid frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// Frames dropped so far, and why the last one was.
    pub fn bad_frames(&self) -> (u64, Option<FrameError>) {
        (self.shared.bad_frames.load(Ordering::Relaxed), lock(&self.shared.latest).error)
    }

    /// The latest valid frame of any source.
    pub fn latest_frame(&self) -> Option<PortFrame> {
        lock(&self.shared.latest).any
    }

    /// The latest valid frame a GED event sent (a beat's answer, if it carries its nonce).
    pub fn latest_ged_frame(&self) -> Option<PortFrame> {
        lock(&self.shared.latest).ged
    }
}

/// The frames the reader keeps.
#[derive(Default)]
struct Latest {
    any: Option<PortFrame>,
    ged: Option<PortFrame>,
    error: Option<FrameError>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A healthy guest rings once a beat; past this many bytes in a second the reader pauses
/// [`FLOOD_PAUSE`] after each read, so a guest writing the port in a loop costs the host a few
/// reads a second (each read of a socket QEMU writes byte by byte costs about as much as the
/// bytes in it) and waits on its own port beyond that, as with the console's budget.
/// Valid frames (the port channel's records) do not count against it: a healthy guest sends one
/// a beat, up to 97 bytes each, and a benchmark beats back to back. They have their own budget,
/// [`FLOOD_FRAMES_PER_S`], so a guest sending valid frames in a loop is paused likewise.
pub const FLOOD_BYTES_PER_S: u64 = 1024;
pub const FLOOD_FRAMES_PER_S: u64 = 200;
pub const FLOOD_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

async fn read(mut stream: UnixStream, shared: Arc<Shared>, path: PathBuf) {
    let mut buf = [0u8; READ_CHUNK];
    // (start of this second, bytes outside valid frames, valid frames)
    let mut second = (tokio::time::Instant::now(), 0u64, 0u64);
    let mut decoder = FrameDecoder::new();
    let why = loop {
        if second.0.elapsed() >= std::time::Duration::from_secs(1) {
            second = (tokio::time::Instant::now(), 0, 0);
        }
        if second.1 > FLOOD_BYTES_PER_S || second.2 > FLOOD_FRAMES_PER_S {
            tokio::time::sleep(FLOOD_PAUSE).await;
        }
        match stream.read(&mut buf).await {
            Ok(0) => break format!("QEMU closed the doorbell socket {}", path.display()),
            Ok(n) => {
                let (mut rings, mut framed, mut ends) = (0usize, 0usize, 0usize);
                for b in &buf[..n] {
                    match decoder.push(*b) {
                        None => {}
                        Some(FrameEvent::Ring) => {
                            rings += 1;
                            ends += 1;
                        }
                        Some(FrameEvent::Frame(f)) => {
                            rings += 1;
                            // Its bytes on the wire, END included (some may have come in an
                            // earlier read: the counts below saturate).
                            framed += decoder.closed_len() + 1;
                            second.2 += 1;
                            shared.frames.fetch_add(1, Ordering::Relaxed);
                            let mut latest = lock(&shared.latest);
                            latest.any = Some(f);
                            if f.source.get() == Source::Ged.code() {
                                latest.ged = Some(f);
                            }
                        }
                        Some(FrameEvent::Bad(e)) => {
                            rings += 1;
                            ends += 1;
                            shared.bad_frames.fetch_add(1, Ordering::Relaxed);
                            lock(&shared.latest).error = Some(e);
                        }
                    }
                }
                // A valid frame's bytes came over several reads and were counted as they came:
                // its end refunds them, so only bytes outside valid frames (and at most one
                // frame in progress) count against the byte budget.
                second.1 = (second.1 + n as u64).saturating_sub(framed as u64);
                shared.other_bytes.fetch_add(n.saturating_sub(ends) as u64, Ordering::Relaxed);
                if framed > 0 {
                    let refund = |b: u64| Some(b.saturating_sub(framed as u64));
                    let _ = shared.other_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, refund);
                }
                if rings > 0 {
                    shared.rings.fetch_add(rings as u64, Ordering::Relaxed);
                    shared.notify.notify_waiters();
                }
            }
            Err(e) => break format!("cannot read the doorbell socket {}: {e}", path.display()),
        }
    };
    tracing::debug!(%why, "doorbell reader stopped");
    *shared.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    // Beats waiting on it fall back to their timers.
    shared.notify.notify_waiters();
}

/// How a VM's heartbeats learn that the record is written.
#[derive(Clone)]
pub enum Completion {
    /// Woken by the doorbell.
    Doorbell(Arc<Doorbell>),
    /// Polling the region on timers, and why there is no doorbell.
    Polling(String),
}

impl Completion {
    /// The doorbell of the VM descriptor `socket` names: connected, or why not.
    pub async fn connect(socket: Option<&Path>) -> Completion {
        match socket {
            None => Completion::Polling(
                "no doorbell in vm.json (prepared before it existed, or with --no-doorbell)".into(),
            ),
            Some(path) => match Doorbell::connect(path).await {
                Ok(d) => Completion::Doorbell(Arc::new(d)),
                Err(e) => Completion::Polling(format!(
                    "cannot connect to the doorbell {}: {e}; is QEMU running with acpimon's isa-debugcon?",
                    path.display()
                )),
            },
        }
    }

    /// The doorbell, when there is one.
    pub fn doorbell(&self) -> Option<&Doorbell> {
        match self {
            Completion::Doorbell(d) => Some(d),
            Completion::Polling(_) => None,
        }
    }

    /// For people: `doorbell (PATH)` or `polling: WHY`.
    pub fn describe(&self) -> String {
        match self {
            Completion::Doorbell(d) => match d.closed() {
                None => format!("doorbell ({})", d.path().display()),
                Some(why) => format!("polling: {why}"),
            },
            Completion::Polling(why) => format!("polling: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_ring_wakes_a_waiter_and_other_bytes_do_not() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let bell = Doorbell::from_stream(Path::new("/test"), host);
        {
            let notified = bell.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            guest.write_all(b"xyz").await.unwrap();
            let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), notified.as_mut()).await;
            assert!(quiet.is_err(), "bytes other than the doorbell's wake nobody");
            guest.write_all(&[abi::DOORBELL_BYTE]).await.unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(5), notified).await.expect("the ring wakes");
        }
        assert_eq!((bell.rings(), bell.other_bytes()), (1, 3));
        assert_eq!(bell.closed(), None);
        drop(guest);
        for _ in 0..500 {
            if bell.closed().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(bell.closed().unwrap().contains("closed the doorbell socket"), "{:?}", bell.closed());
        assert!(Completion::Doorbell(Arc::new(bell)).describe().starts_with("polling: QEMU closed"));
    }

    #[tokio::test]
    async fn a_guest_flooding_the_port_is_read_a_few_times_a_second() {
        let (guest, host) = UnixStream::pair().unwrap();
        let bell = Doorbell::from_stream(Path::new("/test"), host);
        let writer = tokio::spawn(async move {
            let mut guest = guest;
            // Byte by byte, as QEMU's debugcon writes the guest's port writes.
            for _ in 0..200_000 {
                if guest.write_all(&[abi::DOORBELL_BYTE]).await.is_err() {
                    break;
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let read = bell.rings() + bell.other_bytes();
        // Two seconds: a second's allowance, then a read of at most READ_CHUNK per pause.
        let most = 2 * (FLOOD_BYTES_PER_S + READ_CHUNK as u64)
            + 2 * 1000 / FLOOD_PAUSE.as_millis() as u64 * READ_CHUNK as u64;
        assert!(read > 0 && read <= most, "read {read} bytes in 2 s, at most {most}");
        writer.abort();
    }

    #[tokio::test]
    async fn frames_on_the_port_are_decoded_counted_and_kept() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let bell = Doorbell::from_stream(Path::new("/test"), host);
        let frame = |source: Source, token: u32| {
            PortFrame {
                tag: abi::FRAME_TAG.into(),
                frame_no: 1.into(),
                source: source.code().into(),
                token: token.into(),
                ..PortFrame::default()
            }
            .sealed()
        };
        let mut stream = b"mid-frame junk".to_vec();
        stream.push(abi::SLIP_END);
        stream.extend(frame(Source::Ged, 0xc0db).encode());
        stream.extend(frame(Source::Thermal, 7).encode());
        let mut bad = frame(Source::Ged, 8).encode();
        bad[21] ^= 0x10;
        stream.extend(bad);
        stream.push(abi::DOORBELL_BYTE);
        let notified = bell.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        guest.write_all(&stream).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), notified).await.expect("the frames ring");
        for _ in 0..500 {
            if bell.rings() == 5 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!((bell.rings(), bell.frames()), (5, 2));
        let (dropped, why) = bell.bad_frames();
        assert_eq!(dropped, 2, "the junk and the flipped frame");
        assert!(matches!(why, Some(FrameError::BadChecksum { .. })), "{why:?}");
        assert_eq!(bell.latest_ged_frame().map(|f| f.token.get()), Some(0xc0db));
        assert_eq!(bell.latest_frame().map(|f| f.token.get()), Some(7));
        // The junk and the dropped frame's bytes (not their ENDs) are the other bytes.
        assert_eq!(
            bell.other_bytes(),
            (b"mid-frame junk".len() + frame(Source::Ged, 8).encode().len() - 1) as u64
        );
    }

    #[tokio::test]
    async fn no_socket_or_none_listening_is_polling_with_the_reason() {
        assert!(Completion::connect(None).await.describe().contains("no doorbell in vm.json"));
        let c = Completion::connect(Some(Path::new("/nonexistent/doorbell.sock"))).await;
        assert!(c.describe().contains("cannot connect to the doorbell /nonexistent"), "{}", c.describe());
    }
}
