//! The scenarios' probes. Each scenario of a VM runs as its own task: probe, report, sleep
//! the interval. A probe never outlives its timeout, so a stuck guest or QEMU delays only its
//! own scenario.

use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;
use tokio::sync::mpsc;

use super::config::{Scenario, ScenarioSpec};
use super::state::Outcome;
use super::vcpus;
use crate::abi::AppStatus;
use crate::app::{qga, AppChannel};
use crate::console::Console;
use crate::read::Mailbox;
use crate::read::{GuestRecord, Region};
use crate::trigger::qmp::Qmp;
use crate::trigger::{Beat, Completion, Heartbeat, Via};

/// What a probe task sends its VM's monitor.
#[derive(Debug)]
pub struct Report {
    pub index: usize,
    pub outcome: Outcome,
    /// The record the probe read, for the reboot tracker.
    pub record: Option<GuestRecord>,
    /// The app's own status, when the probe read one (the mailbox's).
    pub app_status: Option<(AppStatus, String)>,
}

/// The channels a VM's probes use.
#[derive(Clone)]
pub struct Channels {
    pub qmp: Arc<Qmp>,
    /// `None` when the region cannot be used (the reason is in `region_why`).
    pub region: Option<Arc<Region>>,
    pub region_why: String,
    pub console: Option<Arc<Console>>,
    pub irq: u8,
    /// The thermal zone's poll period, when the table has one.
    pub thermal_period: Option<Duration>,
    /// The app channel, or why there is none.
    pub app: Result<Arc<AppChannel>, String>,
    /// The guest agent's socket, when the VM has one.
    pub guest_agent: Option<std::path::PathBuf>,
    /// How heartbeats learn of their records (the doorbell, or polling and why).
    pub completion: Completion,
    /// On the port channel (the region out of the AML's reach), the channel report.
    pub port: Option<String>,
    /// Which channel carries the records and why, when QMP said where BAR2 is.
    pub channel: Option<String>,
}

/// Why `scenario` cannot run with these channels, if it cannot.
pub fn unavailable(scenario: &Scenario, ch: &Channels, console_why: &str) -> Option<String> {
    match &scenario.probe {
        ScenarioSpec::AcpiHeartbeat {} | ScenarioSpec::Thermal {} if ch.region.is_none() => {
            Some(ch.region_why.clone())
        }
        ScenarioSpec::Console { .. } if ch.console.is_none() => {
            Some(format!("no serial console: {console_why}"))
        }
        ScenarioSpec::AppMailbox {} if ch.region.is_none() => Some(ch.region_why.clone()),
        // Thermal counts and the mailbox are read from the region, which the guest cannot reach.
        ScenarioSpec::Thermal {} | ScenarioSpec::AppMailbox {} if ch.port.is_some() => {
            ch.port.as_ref().map(|c| format!("the guest cannot reach the region: {c}"))
        }
        ScenarioSpec::AppHeartbeat { .. } => ch.app.as_ref().err().cloned(),
        ScenarioSpec::GuestAgent {} if ch.guest_agent.is_none() => {
            Some("the VM has no guest agent port; prepare it with --guest-agent to use this scenario".into())
        }
        ScenarioSpec::Thermal {} if ch.thermal_period.is_none() => Some(
            "the VM's table has no thermal zone; prepare it with --thermal-period-ds to use this scenario"
                .into(),
        ),
        _ => None,
    }
}

/// Runs scenario `index` until the receiver is gone: the first probe right away, then one
/// every interval (measured from the start of the previous probe).
pub async fn run(index: usize, scenario: Scenario, ch: Channels, tx: mpsc::Sender<Box<Report>>) {
    let mut prober = match Prober::new(&scenario, &ch) {
        Ok(p) => p,
        Err(why) => {
            let outcome = Outcome { ok: false, latency: None, detail: why };
            let _ = tx.send(Box::new(Report { index, outcome, record: None, app_status: None })).await;
            return;
        }
    };
    let mut next = tokio::time::Instant::now();
    loop {
        let (outcome, record, app_status) = prober.probe(&scenario, &ch).await;
        if tx.send(Box::new(Report { index, outcome, record, app_status })).await.is_err() {
            return;
        }
        next += scenario.interval;
        let now = tokio::time::Instant::now();
        if next < now {
            // A probe that took longer than the interval: start again from now, not in a burst.
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

enum Prober {
    Heartbeat(Heartbeat),
    Thermal(Counter),
    Console,
    Tcp,
    App { last_health: Option<Instant> },
    GuestAgent,
    Mailbox(Counter),
    Vcpus(vcpus::Tracker),
}

impl Prober {
    fn new(scenario: &Scenario, ch: &Channels) -> Result<Prober, String> {
        Ok(match scenario.probe {
            ScenarioSpec::AcpiHeartbeat {} => {
                let region = ch.region.clone().ok_or_else(|| ch.region_why.clone())?;
                Prober::Heartbeat(
                    Heartbeat::new(region, ch.irq)
                        .map_err(|e| format!("cannot use the region: {e}"))?
                        .with_completion(ch.completion.clone())
                        .with_port_channel(ch.port.is_some()),
                )
            }
            ScenarioSpec::Thermal {} => Prober::Thermal(Counter::default()),
            ScenarioSpec::Console { .. } => Prober::Console,
            ScenarioSpec::Tcp { .. } => Prober::Tcp,
            ScenarioSpec::AppHeartbeat { .. } => Prober::App { last_health: None },
            ScenarioSpec::GuestAgent {} => Prober::GuestAgent,
            ScenarioSpec::AppMailbox {} => Prober::Mailbox(Counter::default()),
            ScenarioSpec::VcpuProgress {} => Prober::Vcpus(vcpus::Tracker::default()),
        })
    }

    async fn probe(&mut self, scenario: &Scenario, ch: &Channels) -> ProbeResult {
        let timeout = scenario.timeout;
        let (outcome, record) = match (self, &scenario.probe) {
            (Prober::App { last_health }, ScenarioSpec::AppHeartbeat { health_interval, audit }) => match &ch
                .app
            {
                Ok(app) => {
                    (app_heartbeat(app, timeout, *health_interval, audit.as_deref(), last_health).await, None)
                }
                Err(why) => (miss(why.clone()), None),
            },
            (Prober::GuestAgent, _) => match &ch.guest_agent {
                Some(path) => (guest_agent(path, timeout).await, None),
                None => (miss("no guest agent port"), None),
            },
            (Prober::Mailbox(counter), _) => match &ch.region {
                Some(region) => {
                    let (outcome, status) = mailbox(region, scenario.interval, timeout, counter).await;
                    return (outcome, None, status);
                }
                None => (miss(ch.region_why.clone()), None),
            },
            (Prober::Heartbeat(hb), _) => heartbeat(hb, &ch.qmp, timeout).await,
            (Prober::Thermal(counter), _) => match &ch.region {
                Some(region) => {
                    let period = ch.thermal_period.unwrap_or(Duration::from_secs(1));
                    thermal(region, period, timeout, counter).await
                }
                None => (miss(ch.region_why.clone()), None),
            },
            (Prober::Console, ScenarioSpec::Console { command, expect }) => match &ch.console {
                Some(c) => (console(c, command, &expect.0, timeout).await, None),
                None => (miss("no serial console"), None),
            },
            (Prober::Tcp, ScenarioSpec::Tcp { address }) => (tcp(address, timeout).await, None),
            (Prober::Vcpus(tracker), _) => {
                let start = Instant::now();
                match vcpus::sample(&ch.qmp, timeout).await {
                    Ok(samples) if samples.is_empty() => {
                        (miss("QEMU's info registers named no vCPU with RIP, RFLAGS, CPL and HLT"), None)
                    }
                    Ok(samples) => (tracker.observe(&samples, Instant::now(), start.elapsed()), None),
                    Err(e) => (miss(e), None),
                }
            }
            _ => unreachable!("a prober is made for its own probe"),
        };
        (outcome, record, None)
    }
}

type ProbeResult = (Outcome, Option<GuestRecord>, Option<(AppStatus, String)>);

/// A challenge; and, every `health_interval`, a health request (its answer reaches the
/// monitor as a report, like the app's own).
async fn app_heartbeat(
    app: &AppChannel,
    timeout: Duration,
    health_interval: Option<Duration>,
    audit: Option<&str>,
    last_health: &mut Option<Instant>,
) -> Outcome {
    let outcome = match app.challenge(timeout).await {
        Ok(rtt) => answered(rtt, format!("the app acked in {}", ms(rtt))),
        Err(e) => miss(e),
    };
    if let Some(every) = health_interval {
        if outcome.ok && last_health.is_none_or(|t| t.elapsed() >= every) {
            *last_health = Some(Instant::now());
            let _ = app.health(audit, timeout).await;
        }
    }
    outcome
}

async fn guest_agent(path: &std::path::Path, timeout: Duration) -> Outcome {
    match qga::ping(path, timeout).await {
        Ok(rtt) => answered(rtt, format!("guest-ping answered in {}", ms(rtt))),
        Err(e) => miss(e),
    }
}

/// A counter the guest advances on its own (thermal polls, mailbox beats), and when the host
/// last saw it move.
#[derive(Default)]
struct Counter {
    last: Option<u32>,
    moved: Option<Instant>,
}

/// What a [`Counter`] did.
enum Progress {
    /// Moved this long ago, within what is allowed.
    Fresh(Duration),
    /// Has not moved for this long, more than is allowed.
    Stale(Duration),
    /// Never seen to move since the probe started, within what is allowed (given).
    Never(Duration),
}

impl Counter {
    /// Reads with `read` (the counter's value, how long it may stand still, and what else the
    /// probe wants from the read; or a miss) until the counter can be judged. Until one move
    /// has been seen it keeps reading, up to what is allowed, so a fresh start neither
    /// trusts a stale value nor reports a miss too early.
    async fn judge<T>(
        &mut self,
        mut read: impl FnMut() -> Result<(u32, Duration, T), Outcome>,
    ) -> Result<(Progress, u32, T), Outcome> {
        let start = Instant::now();
        loop {
            let (value, allowed, extra) = read()?;
            let now = Instant::now();
            if self.last.is_some_and(|v| v != value) {
                self.moved = Some(now);
            }
            self.last = Some(value);
            let progress = match self.moved {
                Some(at) if now.duration_since(at) <= allowed => Progress::Fresh(now.duration_since(at)),
                Some(at) => Progress::Stale(now.duration_since(at)),
                None if now.duration_since(start) > allowed => Progress::Never(allowed),
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            return Ok((progress, value, extra));
        }
    }
}

/// Whether the app's mailbox beats: `beats` must have advanced within interval + timeout
/// (or the app's own period + timeout, if longer). Also returns the status the app wrote.
async fn mailbox(
    region: &Region,
    interval: Duration,
    timeout: Duration,
    counter: &mut Counter,
) -> (Outcome, Option<(AppStatus, String)>) {
    let read = || match region.mailbox() {
        Ok(Mailbox::Written(v)) => {
            let allowed = (interval + timeout).max(Duration::from_millis(u64::from(v.period_ms)) + timeout);
            Ok((v.beats, allowed, v))
        }
        Ok(Mailbox::Empty) => Err(miss("the app has not written its mailbox")),
        Ok(Mailbox::Foreign { magic, version }) => Err(miss(format!(
            "the mailbox holds magic {magic:#010x} version {version}, not an ABI-1 mailbox"
        ))),
        Err(e) => Err(miss(format!("cannot read the mailbox: {e}"))),
    };
    let (progress, beats, view) = match counter.judge(read).await {
        Ok(judged) => judged,
        Err(miss) => return (miss, None),
    };
    let pid = view.pid;
    // A mailbox never seen to move may be what a previous guest's app (before a reboot or a
    // relaunch) left in the region: its status is nobody's word now.
    let status = match progress {
        Progress::Never(_) => None,
        Progress::Fresh(_) | Progress::Stale(_) => Some((view.status, view.text)),
    };
    let outcome = match progress {
        Progress::Fresh(age) => {
            answered(age, format!("beat {beats} (pid {pid}) {:.1}s ago", age.as_secs_f64()))
        }
        Progress::Stale(still) => {
            miss(format!("beat {beats} (pid {pid}) has not moved for {:.1}s", still.as_secs_f64()))
        }
        Progress::Never(waited) => {
            miss(format!("beat {beats} (pid {pid}) did not move in {:.1}s", waited.as_secs_f64()))
        }
    };
    (outcome, status)
}

fn miss(detail: impl Into<String>) -> Outcome {
    Outcome { ok: false, latency: None, detail: detail.into() }
}

fn answered(latency: Duration, detail: String) -> Outcome {
    Outcome { ok: true, latency: Some(latency), detail }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn heartbeat(hb: &mut Heartbeat, qmp: &Qmp, timeout: Duration) -> (Outcome, Option<GuestRecord>) {
    // The QMP command itself is bounded too: a wedged QEMU is a miss, not a stuck task.
    match tokio::time::timeout(timeout + Duration::from_secs(1), hb.beat(qmp, timeout)).await {
        Ok(Ok(Beat::Acked { request_no, latency, record, via })) => {
            let how = match via {
                Via::Doorbell => "the doorbell rang".to_string(),
                Via::Port => format!("a frame on the doorbell port: {:?}", record.status),
                Via::Poll => hb.completion(),
            };
            (
                answered(latency, format!("request {request_no} answered in {} ({how})", ms(latency))),
                Some(record),
            )
        }
        Ok(Ok(Beat::Missed { request_no, waited, last })) => {
            let last_seen = match &last {
                Some(r) => format!("; last record seq {} ({} events)", r.seq, r.ged_count),
                None => "; no record in the region".into(),
            };
            (miss(format!("no record echoed request {request_no} within {}{last_seen}", ms(waited))), last)
        }
        Ok(Err(e)) => (miss(format!("cannot trigger: {e}")), None),
        Err(_) => (miss("QMP did not accept the trigger in time; QEMU is stuck or overloaded"), None),
    }
}

/// Whether the guest's thermal polls go on: the count must have advanced within period +
/// timeout.
async fn thermal(
    region: &Region,
    period: Duration,
    timeout: Duration,
    counter: &mut Counter,
) -> (Outcome, Option<GuestRecord>) {
    // Before the first record the count is 0, as in the boot record.
    let read = || match region.snapshot() {
        Ok(s) => Ok((s.record.map_or(0, |r| r.thermal_count), period + timeout, s.record)),
        Err(e) => Err(miss(format!("cannot read the region: {e}"))),
    };
    let (progress, count, record) = match counter.judge(read).await {
        Ok(judged) => judged,
        Err(miss) => return (miss, None),
    };
    let shown = record.map_or("none".into(), |_| count.to_string());
    let period_s = period.as_secs_f64();
    let outcome = match progress {
        Progress::Fresh(age) => answered(
            age,
            format!("thermal poll {shown} seen {:.1}s ago (period {period_s:.1}s)", age.as_secs_f64()),
        ),
        Progress::Stale(age) => {
            miss(format!("thermal poll {shown} seen {:.1}s ago (period {period_s:.1}s)", age.as_secs_f64()))
        }
        Progress::Never(waited) => miss(format!(
            "no thermal poll within {:.1}s (count {shown}, period {period_s:.1}s)",
            waited.as_secs_f64()
        )),
    };
    (outcome, record)
}

async fn console(c: &Console, command: &str, expect: &Regex, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mark = c.position();
    let mut line = command.as_bytes().to_vec();
    line.push(b'\n');
    if let Err(e) = c.send(&line).await {
        return miss(format!("cannot write to the console: {e}"));
    }
    match c.wait_until(mark, timeout, |seen| expect.is_match(seen)).await {
        Ok(seen) => {
            let line = seen.lines().find(|l| expect.is_match(l)).unwrap_or("").trim();
            answered(
                start.elapsed(),
                format!("'{command}' answered in {}: {}", ms(start.elapsed()), clip(line, 120)),
            )
        }
        Err(seen) => {
            let tail: String =
                seen.trim().chars().rev().take(160).collect::<Vec<_>>().into_iter().rev().collect();
            miss(format!(
                "'{command}' got no output matching /{}/ within {}; the console showed: {:?}",
                expect.as_str(),
                ms(timeout),
                tail
            ))
        }
    }
}

async fn tcp(address: &str, timeout: Duration) -> Outcome {
    let start = Instant::now();
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => answered(start.elapsed(), format!("{address} accepted in {}", ms(start.elapsed()))),
        Ok(Err(e)) => miss(format!("{address}: {e}")),
        Err(_) => miss(format!("{address}: no connection within {}", ms(timeout))),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).chain("…".chars()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use zerocopy::IntoBytes;

    use super::*;
    use crate::abi::{self, AppMailbox};

    /// Writes an ABI-1 mailbox with `beats` and status code `status` (3: failed) into the
    /// region file at `path`, as a guest's app would.
    fn write_mailbox(path: &std::path::Path, beats: u32, status: u32) {
        let mut text = [0u8; abi::MAILBOX_TEXT];
        text[..13].copy_from_slice(b"database down");
        let m = AppMailbox {
            magic: abi::MAILBOX_MAGIC.into(),
            version: abi::MAILBOX_VERSION.into(),
            seq: 2.into(),
            beats: beats.into(),
            status: status.into(),
            pid: 42.into(),
            uptime_ms: 1000.into(),
            period_ms: 0.into(),
            text,
        };
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(m.as_bytes(), abi::MAILBOX_OFFSET as u64).unwrap();
    }

    /// A mailbox that never moves while it is watched (what a previous guest's app left in
    /// the region, before a reboot or a relaunch) is a miss, and its status is nobody's word.
    #[tokio::test]
    async fn a_mailbox_that_never_moved_gives_no_status() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let region = Region::create(&path, abi::MIN_REGION_SIZE as u32).unwrap();
        write_mailbox(&path, 7, 3);
        let step = Duration::from_millis(50);
        let (outcome, status) = mailbox(&region, step, step, &mut Counter::default()).await;
        assert!(!outcome.ok && outcome.detail.contains("did not move"), "{outcome:?}");
        assert_eq!(status, None);

        // A mailbox seen to move is the app's word now.
        let mut counter = Counter::default();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                write_mailbox(&path, 8, 3);
            })
        };
        let (outcome, status) = mailbox(&region, step, step, &mut counter).await;
        writer.join().unwrap();
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(status, Some((AppStatus::Failed, "database down".to_string())));
    }
}
