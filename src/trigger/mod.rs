//! Stage 3 of the data path: raising the guest's ACPI event from the host.
//!
//! A heartbeat writes a request (number, random nonce) into the region, raises the GED's ISA
//! IRQ with the HMP command `o /b 0x20NN 1` (pc-testdev), and waits until a record echoes
//! both. The time between the HMP command and the echo is the round trip.

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod qmp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use self::qmp::{Qmp, QmpError};
use crate::generate::TESTDEV_IRQ_PORT_BASE;
use crate::read::{GuestRecord, Region, RegionError, RetryPolicy};

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

/// Heartbeats for one VM.
pub struct Heartbeat {
    region: Arc<Region>,
    irq: u8,
    next: u32,
}

impl Heartbeat {
    /// Starts numbering after whatever request the region holds, so a restarted host never
    /// reuses a number the guest already echoed.
    pub fn new(region: Arc<Region>, irq: u8) -> Result<Self, RegionError> {
        let next = region.snapshot()?.request.request_no.wrapping_add(1);
        Ok(Heartbeat { region, irq, next })
    }

    /// One heartbeat: request, raise, wait up to `timeout` for the echo.
    pub async fn beat(&mut self, qmp: &Qmp, timeout: Duration) -> Result<Beat, TriggerError> {
        let request_no = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        let nonce: u32 = rand::random();
        self.region.write_request(request_no, nonce)?;
        let start = Instant::now();
        qmp.hmp(&irq_line_command(self.irq, 1)).await?;
        let region = self.region.clone();
        let waited =
            tokio::task::spawn_blocking(move || wait_for_echo(&region, request_no, nonce, start, timeout))
                .await
                .expect("the echo wait does not panic");
        Ok(match waited {
            Ok(record) => Beat::Acked { request_no, latency: start.elapsed(), record },
            Err(last) => Beat::Missed { request_no, waited: start.elapsed(), last },
        })
    }
}

/// Polls the region until a record answers the request, or `timeout` after `start`.
/// Polling (50 µs at first) rather than a tokio timer (1 ms granularity) keeps latency exact.
fn wait_for_echo(
    region: &Region,
    request_no: u32,
    nonce: u32,
    start: Instant,
    timeout: Duration,
) -> Result<GuestRecord, Option<GuestRecord>> {
    let policy = RetryPolicy { max_wait: Duration::from_millis(2), ..RetryPolicy::default() };
    let mut last = None;
    loop {
        // A record stuck mid-write (VM paused inside the AML) is "not yet", not an error.
        if let Ok(snap) = region.snapshot_with(policy) {
            if let Some(r) = snap.record {
                if r.answers(request_no, nonce) {
                    return Ok(r);
                }
                last = Some(r);
            }
        }
        if start.elapsed() >= timeout {
            return Err(last);
        }
        std::thread::sleep(poll_pause(start.elapsed()));
    }
}

/// How long to sleep between polls: short while an answer is likely (a healthy guest answers
/// in about a millisecond), longer once it is late, so that a hung VM costs a few hundred
/// wake-ups per missed beat rather than twenty thousand.
fn poll_pause(elapsed: Duration) -> Duration {
    match elapsed.as_millis() {
        0..5 => Duration::from_micros(50),
        5..50 => Duration::from_micros(500),
        _ => Duration::from_millis(2),
    }
}

pub(crate) mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}
