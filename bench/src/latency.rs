//! `acpimon-bench latency`: trigger-to-record latency and sustained heartbeats per second on a real
//! guest, each beside the floor measured in the same run: the bare QMP `human-monitor-command`
//! round trip (`o /b PORT 0`, the same HMP path with nothing for the guest to do). The
//! heartbeats complete the way the VM's launch gives them (the doorbell by default); the same
//! run then measures the polling path on the same VM (the host ignoring the doorbell), as the
//! baseline of the doorbell.
//!
//! `--firmware ovmf` boots Debian bookworm's OVMF (with the phys-bits its low-BAR knob needs);
//! `--high-bar` keeps its 64-bit PCI window, so BAR2 lands above 4 GiB and the records come on
//! the port channel (frames on the doorbell port, the nonce through pc-testdev). There the region
//! is never written, so the polling and spinning paths are not measured.

use std::time::{Duration, Instant};

use serde::Serialize;

use acpimon::launch::Vm;
use acpimon::run::Summary;
use acpimon::trigger::{Beat, Heartbeat, TriggerError};

/// Figures of one benchmark run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Which channel carried the records, as the channel report says.
    pub channel: String,
    pub bare: Summary,
    pub heartbeat: Summary,
    /// How `heartbeat` completed: `doorbell (SOCKET)` or `polling: WHY`.
    pub completion: String,
    /// The same heartbeats completed by polling the region.
    pub polled: Summary,
    /// Trigger to record seen by spinning on the region (no sleep): when the guest completed
    /// the record, the floor of any completion path.
    pub spun: Summary,
    pub bare_per_sec: f64,
    pub heartbeats_per_sec: f64,
    /// Beats not acknowledged during the sustained phase.
    pub sustained_missed: u64,
}

/// What `--json` prints: the run's setting beside its figures.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// QEMU's version, e.g. "10.0.2".
    pub qemu: String,
    pub machine: String,
    /// `seabios` or `ovmf`.
    pub firmware: String,
    /// Heartbeats (and bare round trips) for the latency figures.
    pub count: usize,
    /// Seconds of each sustained phase.
    pub seconds: f64,
    #[serde(flatten)]
    pub result: BenchResult,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the guest acknowledged no heartbeat within 120 s; check that it boots with `acpimon demo --guest DIR`")]
    NotReady,
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    #[error(transparent)]
    Qmp(#[from] acpimon::trigger::qmp::QmpError),
    #[error(transparent)]
    Region(#[from] acpimon::read::RegionError),
}

/// Runs the benchmark on a booted `vm`.
pub async fn run(vm: &Vm, count: usize, sustained: Duration) -> Result<BenchResult, BenchError> {
    let irq = vm.prepared.descriptor.irq;
    // The heartbeat turns to the port channel on its own once the doorbell decodes a frame.
    let mut hb = Heartbeat::new(vm.region.clone(), irq)?.with_completion(vm.completion.clone());
    // Wait for the guest's GED driver: the first acknowledged beat.
    let start = Instant::now();
    loop {
        if let Beat::Acked { .. } = hb.beat(&vm.qmp, Duration::from_millis(500)).await? {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::NotReady);
        }
    }
    // Where BAR2 is, now that the firmware and the kernel have placed it.
    let channel = vm.channel().await?;
    let port = hb.port_channel();
    let lower = acpimon::trigger::irq_line_command(irq, 0);
    let mut bare = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        vm.qmp.hmp(&lower).await?;
        bare.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        if let Beat::Acked { latency, .. } = hb.beat(&vm.qmp, Duration::from_secs(1)).await? {
            lat.push(latency.as_secs_f64() * 1e3);
        }
    }
    let heartbeat = Summary::from_latencies(lat, count as u64, 0, 0);
    let completion = hb.completion();
    let mut polling = Heartbeat::new(vm.region.clone(), irq)?;
    let mut lat = Vec::with_capacity(count);
    // On the port channel the region is never written: nothing to poll.
    for _ in 0..if port { 0 } else { count } {
        if let Beat::Acked { latency, .. } = polling.beat(&vm.qmp, Duration::from_secs(1)).await? {
            lat.push(latency.as_secs_f64() * 1e3);
        }
    }
    let polled = Summary::from_latencies(lat, if port { 0 } else { count as u64 }, 0, 0);
    let spun = if port { Summary::from_latencies(Vec::new(), 0, 0, 0) } else { spin(vm, count).await? };
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < sustained {
        vm.qmp.hmp(&lower).await?;
        n += 1;
    }
    let bare_per_sec = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut acked, mut sustained_missed) = (0u64, 0u64);
    while t.elapsed() < sustained {
        match hb.beat(&vm.qmp, Duration::from_secs(1)).await? {
            Beat::Acked { .. } => acked += 1,
            Beat::Missed { .. } => sustained_missed += 1,
        }
    }
    Ok(BenchResult {
        channel: channel.to_string(),
        bare: Summary::from_latencies(bare, count as u64, 0, 0),
        heartbeat,
        completion,
        polled,
        spun,
        bare_per_sec,
        heartbeats_per_sec: acked as f64 / t.elapsed().as_secs_f64(),
        sustained_missed,
    })
}

/// `count` triggers, each awaited by spinning on the region from a blocking thread: the time
/// the guest's record became visible, without any wake-up path's delay.
async fn spin(vm: &Vm, count: usize) -> Result<Summary, BenchError> {
    let irq = vm.prepared.descriptor.irq;
    let mut next = vm.region.snapshot()?.request.request_no.wrapping_add(1);
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        // Any changing value will do: the bench is its own guest's only client.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let (request_no, nonce) = (next, nanos.subsec_nanos() ^ 0x5a5a_5a5a);
        next = next.wrapping_add(1).max(1);
        vm.region.write_request(request_no, nonce)?;
        let start = Instant::now();
        vm.qmp.hmp(&acpimon::trigger::irq_line_command(irq, 1)).await?;
        let region = vm.region.clone();
        let seen = tokio::task::spawn_blocking(move || {
            while start.elapsed() < Duration::from_secs(1) {
                let policy = acpimon::read::RetryPolicy { max_wait: Duration::ZERO, max_attempts: 4 };
                if let Ok(snap) = region.snapshot_with(policy) {
                    if snap.record.is_some_and(|r| r.answers(request_no, nonce)) {
                        return Some(start.elapsed());
                    }
                }
                std::hint::spin_loop();
            }
            None
        })
        .await
        .expect("the spin does not panic");
        if let Some(d) = seen {
            lat.push(d.as_secs_f64() * 1e3);
        }
    }
    Ok(Summary::from_latencies(lat, count as u64, 0, 0))
}

/// The printed table, with ratios against the bare round trip.
pub fn table(r: &BenchResult) -> String {
    let b = &r.bare;
    let mut out = heartbeat_table(r);
    let region_paths = [("trigger-to-record, polling", &r.polled), ("record visible (spinning)", &r.spun)];
    for (name, p) in region_paths.into_iter().filter(|(_, p)| p.sent > 0) {
        out.push_str(&format!(
            "  {:<30} {:>6.3} ms {:>6.3} ms {:>6.3} ms   ({} of {} acknowledged)\n\
             \x20 {:<30} {:>8.1}x {:>8.1}x {:>8.1}x\n",
            name,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.acked,
            p.sent,
            "ratio to the bare round trip",
            p.p50_ms / b.p50_ms,
            p.p90_ms / b.p90_ms,
            p.p99_ms / b.p99_ms,
        ));
    }
    out.push_str(&format!("  heartbeats completed by: {}\n", r.completion));
    out.push_str(&format!("  channel: {}\n", r.channel));
    out
}

fn heartbeat_table(r: &BenchResult) -> String {
    let (b, h) = (&r.bare, &r.heartbeat);
    format!(
        "  {:<30} {:>9} {:>9} {:>9}\n\
         \x20 {:<30} {:>6.3} ms {:>6.3} ms {:>6.3} ms\n\
         \x20 {:<30} {:>6.3} ms {:>6.3} ms {:>6.3} ms   ({} of {} acknowledged)\n\
         \x20 {:<30} {:>8.1}x {:>8.1}x {:>8.1}x\n\
         \x20 sustained: {:.0} heartbeats/s acknowledged ({} missed), bare HMP {:.0} commands/s: ratio {:.2}\n",
        "",
        "p50",
        "p90",
        "p99",
        "bare HMP round trip",
        b.p50_ms,
        b.p90_ms,
        b.p99_ms,
        "trigger-to-record",
        h.p50_ms,
        h.p90_ms,
        h.p99_ms,
        h.acked,
        h.sent,
        "ratio to the bare round trip",
        h.p50_ms / b.p50_ms,
        h.p90_ms / b.p90_ms,
        h.p99_ms / b.p99_ms,
        r.heartbeats_per_sec,
        r.sustained_missed,
        r.bare_per_sec,
        r.heartbeats_per_sec / r.bare_per_sec,
    )
}
