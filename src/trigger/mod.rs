//! Stage 3 of the data path: raising the guest's ACPI event from the host.
//!
//! A heartbeat writes a request (number, random nonce) into the region, raises the GED's ISA
//! IRQ with the HMP command `o /b 0x20NN 1` (pc-testdev), and waits until a record echoes
//! both. The time between the HMP command and the echo is the round trip.
//!
//! The beat learns of the echo from the VM's [`doorbell`] when it has one (the table rings it
//! once the record is complete), else by polling the region on tokio timers. Either way a beat
//! in flight is a future waiting on the runtime's shared timer wheel or on a `Notify`: it holds
//! no thread.
//!
//! On the port channel (the AML cannot write the region and sends the record as a frame on the
//! doorbell port, [`crate::abi`]), the beat first leaves its nonce in pc-testdev's register
//! with `o /w 0xe0 NONCE` (one more HMP round trip, so only for VMs on that channel) and the
//! frame that carries it back answers the beat.

pub mod doorbell;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qmp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use self::doorbell::{Completion, Doorbell};
use self::qmp::{Qmp, QmpError};
use crate::generate::TESTDEV_IRQ_PORT_BASE;
use crate::read::{GuestRecord, Region, RegionError, RetryPolicy};

/// The HMP command that leaves `token` in pc-testdev's 32-bit register for the AML (the port
/// channel's request data). HMP's sizes are b, h (16 bits), w (32 bits): `o /w` then `i /w`
/// round-trips all 32 bits on QEMU 10.0, 7.2 and 5.2 (measured; `/l` is refused).
pub fn token_command(token: u32) -> String {
    format!("o /w {:#x} {token:#x}", crate::abi::TOKEN_PORT)
}

/// The HMP command that sets ISA IRQ `irq` to `level` (1 raises, 0 lowers) through pc-testdev.
pub fn irq_line_command(irq: u8, level: u8) -> String {
    format!("o /b {:#x} {level}", TESTDEV_IRQ_PORT_BASE + u16::from(irq))
}

/// What one heartbeat came to.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Beat {
    /// A record echoed the request.
    Acked {
        request_no: u32,
        #[serde(with = "secs")]
        latency: Duration,
        record: GuestRecord,
        /// How the beat learnt of the record.
        via: Via,
    },
    /// No record echoed the request within the timeout.
    Missed {
        request_no: u32,
        #[serde(with = "secs")]
        waited: Duration,
        /// The last record seen, if any.
        last: Option<GuestRecord>,
    },
}

/// How an answered beat learnt of its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Woken by the doorbell.
    Doorbell,
    /// Found by a poll of the region (no doorbell, or it did not ring).
    Poll,
    /// Carried by a frame on the doorbell port (the port channel: no reachable region).
    Port,
}

impl Beat {
    pub fn request_no(&self) -> u32 {
        match self {
            Beat::Acked { request_no, .. } | Beat::Missed { request_no, .. } => *request_no,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// With a doorbell, the region is still read this often in case the ring is lost (another
/// client holds the socket, a table without the doorbell): a hung VM costs a few wake-ups per
/// missed beat, and a beat a silent doorbell would miss is answered late instead.
pub const DOORBELL_SAFETY_POLL: Duration = Duration::from_millis(250);
/// Answered beats in a row that the doorbell did not ring before the heartbeat gives up on it
/// and polls.
pub const SILENT_DOORBELL_LIMIT: u32 = 3;

/// Heartbeats for one VM.
pub struct Heartbeat {
    region: Arc<Region>,
    irq: u8,
    next: u32,
    completion: Completion,
    /// Answered beats in a row the doorbell did not ring.
    silent: u32,
    /// Whether beats leave their nonce at pc-testdev's register (the port channel).
    port: bool,
    /// Frames the doorbell had decoded at the last beat.
    frames_seen: u64,
}

impl Heartbeat {
    /// Starts numbering after whatever request the region holds, so a restarted host never
    /// reuses a number the guest already echoed. Polls the region until given a doorbell
    /// ([`Heartbeat::with_completion`]).
    pub fn new(region: Arc<Region>, irq: u8) -> Result<Self, RegionError> {
        let next = region.snapshot()?.request.request_no.wrapping_add(1);
        let completion = Completion::Polling("no doorbell given".into());
        Ok(Heartbeat { region, irq, next, completion, silent: 0, port: false, frames_seen: 0 })
    }

    /// Learns of records through `completion`.
    pub fn with_completion(mut self, completion: Completion) -> Self {
        self.completion = completion;
        self
    }

    /// Sends each beat's nonce for the port channel from the first beat on (the channel report
    /// said the region is out of the AML's reach). Without it the heartbeat starts to once
    /// its doorbell has decoded a frame; either way it stops once a beat is answered through
    /// the region.
    pub fn with_port_channel(mut self, port: bool) -> Self {
        self.port = port;
        self
    }

    /// Whether the beats send their nonce for the port channel.
    pub fn port_channel(&self) -> bool {
        self.port
    }

    /// How the beats learn of their records, and why (for the operator).
    pub fn completion(&self) -> String {
        self.completion.describe()
    }

    /// One heartbeat: request, raise, wait up to `timeout` for the echo.
    pub async fn beat(&mut self, qmp: &Qmp, timeout: Duration) -> Result<Beat, TriggerError> {
        let request_no = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        let nonce: u32 = rand::random();
        self.region.write_request(request_no, nonce)?;
        let start = Instant::now();
        if let Completion::Doorbell(bell) = &self.completion {
            // Frames come only when the AML cannot write the region: this VM is on the port
            // (until a beat is answered through the region again, e.g. a BAR the kernel
            // assigned after the boot record).
            let frames = bell.frames();
            self.port |= frames > self.frames_seen;
            self.frames_seen = frames;
        }
        if self.port {
            qmp.hmp(&token_command(nonce)).await?;
        }
        qmp.hmp(&irq_line_command(self.irq, 1)).await?;
        let waited = match &self.completion {
            Completion::Doorbell(bell) if bell.closed().is_none() => {
                let bell = bell.clone();
                let rings = bell.rings();
                let waited = wait_for_ring(&self.region, &bell, request_no, nonce, start, timeout).await;
                let rang = bell.rings() > rings;
                let waited = waited.map(|(r, found)| match found {
                    Found::Frame => (r, Via::Port, false),
                    Found::Look { safety_poll } => {
                        (r, if rang { Via::Doorbell } else { Via::Poll }, safety_poll)
                    }
                });
                // Only an answer the safety poll found counts against the doorbell: one seen
                // at the first look may have its ring still on the way.
                if let Ok((_, Via::Poll, true)) = &waited {
                    self.silent += 1;
                    if self.silent >= SILENT_DOORBELL_LIMIT {
                        tracing::warn!(path = %bell.path().display(), "the doorbell does not ring; polling");
                        self.completion = Completion::Polling(format!(
                            "the doorbell {} did not ring for {SILENT_DOORBELL_LIMIT} answered heartbeats in a \
                             row (another client on its socket, or a table without the doorbell: prepare the \
                             VM again and restart it)",
                            bell.path().display()
                        ));
                    }
                } else if waited.is_ok() {
                    self.silent = 0;
                }
                waited.map(|(r, via, _)| (r, via))
            }
            _ => wait_polling(&self.region, request_no, nonce, start, timeout).await.map(|r| (r, Via::Poll)),
        };
        if let Ok((_, Via::Doorbell | Via::Poll)) = &waited {
            self.port = false;
        }
        Ok(match waited {
            Ok((record, via)) => Beat::Acked { request_no, latency: start.elapsed(), record, via },
            Err(last) => Beat::Missed { request_no, waited: start.elapsed(), last },
        })
    }
}

/// What one look at the region found.
enum Look {
    Answered(GuestRecord),
    /// Not (yet) the answer; `busy` when a record was being written or the copy was torn.
    No {
        busy: bool,
    },
}

/// One non-blocking look: no sleep inside (a record mid-write is "busy", looked at again
/// later), so it runs on an async worker.
fn look(region: &Region, request_no: u32, nonce: u32, last: &mut Option<GuestRecord>) -> Look {
    let policy = RetryPolicy { max_wait: Duration::ZERO, max_attempts: 4 };
    match region.snapshot_with(policy) {
        Ok(snap) => match snap.record {
            Some(r) if r.answers(request_no, nonce) => Look::Answered(r),
            Some(r) => {
                *last = Some(r);
                Look::No { busy: false }
            }
            None => Look::No { busy: false },
        },
        Err(_) => Look::No { busy: true },
    }
}

/// Where [`wait_for_ring`] found the answer.
enum Found {
    /// In the region; `safety_poll` when a safety poll found it.
    Look { safety_poll: bool },
    /// In a frame on the port.
    Frame,
}

/// The latest GED frame, if it carries this beat's nonce.
fn frame_answer(bell: &Doorbell, request_no: u32, nonce: u32) -> Option<GuestRecord> {
    let f = bell.latest_ged_frame().filter(|f| f.token.get() == nonce)?;
    Some(crate::read::frame::frame_record(&f, request_no))
}

/// Waits for the doorbell, reading the region (and the latest frame) on each ring (at most
/// [`doorbell::MAX_WAKES_PER_BEAT`] times) and every [`DOORBELL_SAFETY_POLL`].
async fn wait_for_ring(
    region: &Region,
    bell: &Doorbell,
    request_no: u32,
    nonce: u32,
    start: Instant,
    timeout: Duration,
) -> Result<(GuestRecord, Found), Option<GuestRecord>> {
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let mut last = None;
    let mut wakes = 0u32;
    let mut safety_poll = false;
    let mut rechecks = 0u32;
    let mut next_poll = tokio::time::Instant::now() + DOORBELL_SAFETY_POLL;
    loop {
        let notified = bell.notified();
        tokio::pin!(notified);
        // Registered before the look: a ring between the look and the wait still wakes us.
        notified.as_mut().enable();
        if let Some(r) = frame_answer(bell, request_no, nonce) {
            return Ok((r, Found::Frame));
        }
        match look(region, request_no, nonce, &mut last) {
            Look::Answered(r) => return Ok((r, Found::Look { safety_poll })),
            // Another record (a thermal poll) mid-write: look again shortly, a few times (a VM
            // paused mid-write stays odd).
            Look::No { busy: true } if rechecks < 8 => {
                rechecks += 1;
                next_poll = next_poll.min(tokio::time::Instant::now() + Duration::from_millis(1));
            }
            Look::No { .. } => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        let listening = wakes < doorbell::MAX_WAKES_PER_BEAT && bell.closed().is_none();
        tokio::select! {
            _ = notified, if listening => {
                wakes += 1;
                safety_poll = false;
            }
            _ = tokio::time::sleep_until(next_poll.min(deadline)) => {
                safety_poll = tokio::time::Instant::now() >= next_poll;
                next_poll = next_poll.max(tokio::time::Instant::now() + DOORBELL_SAFETY_POLL);
            }
        }
    }
}

/// Polls the region until a record answers the request, or `timeout` after `start`, on the
/// runtime's timers.
async fn wait_polling(
    region: &Region,
    request_no: u32,
    nonce: u32,
    start: Instant,
    timeout: Duration,
) -> Result<GuestRecord, Option<GuestRecord>> {
    let mut last = None;
    loop {
        if let Look::Answered(r) = look(region, request_no, nonce, &mut last) {
            return Ok(r);
        }
        if start.elapsed() >= timeout {
            return Err(last);
        }
        let pause = poll_pause(start.elapsed()).min(timeout.saturating_sub(start.elapsed()));
        tokio::time::sleep(pause).await;
    }
}

/// How long to sleep between polls: the timer's 1 ms granularity while an answer is likely (a
/// healthy guest answers in about a millisecond), longer once it is late, so that a hung VM
/// costs about a hundred wake-ups per missed second rather than a thousand.
fn poll_pause(elapsed: Duration) -> Duration {
    match elapsed.as_millis() {
        0..50 => Duration::from_millis(1),
        _ => Duration::from_millis(10),
    }
}

pub(crate) mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
