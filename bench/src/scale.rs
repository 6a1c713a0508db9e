//! `acpimon-bench scale`: how one `acpimon watch` scales with the number of VMs it watches
//! (issue 4), on simulated VMs ([`crate::simvm`]) so that 500 of them fit on the 2 cores that
//! also run the service.
//!
//! For a baseline of 0 VMs and then each requested size N, in a fresh directory:
//!
//! 1. N simulated VMs (`sim-0000`, ...) are prepared and started **in this process**;
//! 2. the real service runs as a **child process** (`acpimon watch --config FILE`, the default
//!    acpi-heartbeat scenario: every [`INTERVAL`], timeout [`TIMEOUT`], threshold
//!    [`THRESHOLD`]), its metrics and status endpoint on a free loopback port;
//! 3. once `/status` shows all N `healthy` (the time this took is reported) and a short
//!    settling pause, the child's CPU time (`/proc/PID/stat`), resident memory
//!    (`/proc/PID/status`) and the heartbeats it got answered (`answers_total` in `/status`)
//!    are measured over the window;
//! 4. `hangs` VMs then stop answering ([`SimState::Hung`]) one after another, spread over one
//!    interval; each one's detection latency is the time from the hang to the service's
//!    `transition` event to `unresponsive` in its event log.
//!
//! Every transition of a VM away from healthy that is not the consequence of a hang, from the
//! moment all were healthy until the end of the detection phase, is a false alarm.
//!
//! Per-VM figures are differences against the baseline measured in the same run: CPU per
//! VM-heartbeat is (CPU rate at N − CPU rate at 0) / heartbeats answered per second; memory
//! per VM is (RSS at N − RSS at 0) / N. Detection latencies are compared with the bound the
//! scenario settings imply ([`detection_bound`]).
//!
//! Caveats the report states: the simulated VMs and the service share the machine (the
//! simulator's CPU and the machine's load are reported beside the service's); a simulated
//! guest writes its record [`ScaleOptions::latency`] after the IRQ (the real guest's p50 in
//! `acpimon-bench latency` is about 1 ms), with no QEMU in the path.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::simvm::{spawn_fleet_with, SimError, SimState, SimVm, SimVmOptions};
use acpimon::event::{Event, EventKind};
use acpimon::generate::{SsdtConfig, DEFAULT_DOORBELL_PORT};
use acpimon::watch::metrics::{fetch_status, StatusView};
use acpimon::watch::state::State;

/// The heartbeat scenario every simulated VM gets (the service's defaults): a probe every
/// `INTERVAL`, ...
pub const INTERVAL: Duration = Duration::from_secs(1);
/// ... each missed after `TIMEOUT` without its record, ...
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// ... and this many misses in a row make the VM unresponsive.
pub const THRESHOLD: u32 = 3;
/// Start-up grace: misses before a VM's first answer do not count for this long.
pub const STARTUP_GRACE: Duration = Duration::from_secs(20);
/// Between all VMs healthy and the window: start-up work (events, per-VM files) settles.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the service may take to answer on its endpoint after it started.
const SERVICE_START_WAIT: Duration = Duration::from_secs(15);
/// How long the service may take to stop after SIGTERM before it is killed.
const SERVICE_STOP_WAIT: Duration = Duration::from_secs(10);
/// Detection later than the bound by more than this is reported as a problem: the probes'
/// polling and the event's millisecond timestamp add a few milliseconds.
const DETECTION_SLACK: Duration = Duration::from_millis(250);
/// Descriptors this process and the service need besides those per VM.
const FD_BASE: u64 = 256;
/// Descriptors this process holds per simulated VM once the service is attached (three
/// listeners, a QMP, a console and a doorbell connection; see [`crate::simvm`]). The service
/// holds three, plus the host sampler's open `/proc` files within a quarter of its limit.
const FDS_PER_VM: u64 = 6;

/// The worst-case time from a hang to `unresponsive`: the next probe starts within an
/// interval, and each of the `threshold` probes that miss takes its timeout, the next one
/// starting an interval after the previous one started (or at once, when the timeout is
/// longer). 4 s for the defaults (1 s, 1 s, 3).
pub fn detection_bound() -> Duration {
    INTERVAL + INTERVAL.max(TIMEOUT) * (THRESHOLD - 1) + TIMEOUT
}

/// The open-file limit a run with at most `n` VMs needs (this process, which the service
/// inherits its limit from, holds the most).
pub fn fds_needed(n: usize) -> u64 {
    FD_BASE + FDS_PER_VM * n as u64
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ScaleOptions {
    /// VM counts to measure, each beside the 0-VM baseline measured first (a 0 here is
    /// ignored).
    pub vms: Vec<usize>,
    /// The measurement window per size.
    pub window: Duration,
    /// VMs hung per size to measure detection (at most N).
    pub hangs: usize,
    /// Then every VM hung at once, and its detection timed.
    pub all_hung: bool,
    /// The acpimon binary to run as the service (`std::env::current_exe()`).
    pub service: PathBuf,
    /// Scratch directory; each run makes a fresh subdirectory there and keeps it (the
    /// service's configuration, output and event log per size).
    pub work: PathBuf,
    /// The simulated guest's delay between the raised IRQ and its record.
    pub latency: Duration,
    /// The VMs have the doorbell (the default); without it the service polls their regions.
    pub doorbell: bool,
}

impl ScaleOptions {
    /// The benchmark: 10, 100 and 500 VMs, 20 s windows, 10 hangs, 1 ms guests.
    pub fn new(service: impl Into<PathBuf>, work: impl Into<PathBuf>) -> ScaleOptions {
        ScaleOptions {
            vms: vec![10, 100, 500],
            window: Duration::from_secs(20),
            hangs: 10,
            all_hung: false,
            service: service.into(),
            work: work.into(),
            latency: Duration::from_millis(1),
            doorbell: true,
        }
    }
}

/// A transition of a VM that was not hung (or not yet): it should not have happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FalseAlarm {
    pub vm: String,
    pub time: String,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// The figures of one size.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub vms: usize,
    /// From starting the service to `/status` showing every VM healthy.
    pub healthy_after_s: f64,
    /// The CPU and memory window actually measured.
    pub window_s: f64,
    /// The service's CPU time over the window, in % of one core.
    pub cpu_pct: f64,
    /// `cpu_pct` ÷ the baseline's.
    pub cpu_vs_baseline: f64,
    /// (CPU rate − the baseline's) ÷ heartbeats answered per second. `None` for the baseline.
    pub cpu_us_per_heartbeat: Option<f64>,
    /// VmRSS at the end of the window, and VmHWM (the peak).
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub rss_vs_baseline: f64,
    /// (RSS − the baseline's) ÷ N. `None` for the baseline.
    pub rss_kib_per_vm: Option<f64>,
    /// acpi-heartbeat answers during the window, and N × window ÷ interval.
    pub heartbeats: u64,
    pub heartbeats_expected: f64,
    /// VMs hung, and each one's detection latency (sorted; undetected ones are left out).
    pub hung: usize,
    pub detection_s: Vec<f64>,
    pub detection_p50_s: Option<f64>,
    pub detection_max_s: Option<f64>,
    /// Hung VMs the service did not declare unresponsive within three bounds.
    pub undetected: usize,
    /// With `all_hung`: every VM hung at once (after the first hangs answered again), and the
    /// same figures.
    pub all_hung: usize,
    pub all_detection_p50_s: Option<f64>,
    pub all_detection_max_s: Option<f64>,
    pub all_undetected: usize,
    pub false_alarms: usize,
    /// The first few, for investigation.
    pub false_alarm_samples: Vec<FalseAlarm>,
    /// This process (the simulated VMs and the benchmark's own polling) over the window, in %
    /// of one core.
    pub sim_cpu_pct: f64,
    /// The whole machine's busy time over the window, in % of all its cores.
    pub machine_busy_pct: f64,
    /// The service's threads and open descriptors at the end of the window, and this
    /// process's descriptors.
    pub service_threads: u64,
    pub service_fds: usize,
    pub sim_fds: usize,
    #[serde(skip)]
    heartbeats_per_s: f64,
}

impl Row {
    /// What makes this row not a clean result; `bound_s` is [`detection_bound`].
    pub fn problems(&self, bound_s: f64) -> Vec<String> {
        let mut out = Vec::new();
        if self.false_alarms > 0 {
            out.push(format!("{} VMs: {} false alarm(s)", self.vms, self.false_alarms));
        }
        if self.undetected > 0 {
            out.push(format!("{} VMs: {} of {} hung VMs not detected", self.vms, self.undetected, self.hung));
        }
        if self.all_undetected > 0 {
            out.push(format!(
                "{} VMs: {} of {} VMs hung at once not detected",
                self.vms, self.all_undetected, self.all_hung
            ));
        }
        if let Some(max) = self.all_detection_max_s.filter(|&m| m > bound_s + DETECTION_SLACK.as_secs_f64()) {
            out.push(format!(
                "{} VMs: with every VM hung, a hang took {max:.2} s to detect, beyond the {bound_s} s bound",
                self.vms
            ));
        }
        if let Some(max) = self.detection_max_s.filter(|&m| m > bound_s + DETECTION_SLACK.as_secs_f64()) {
            out.push(format!(
                "{} VMs: a hang took {max:.2} s to detect, beyond the {bound_s} s bound",
                self.vms
            ));
        }
        if self.vms > 0 && (self.heartbeats as f64) < 0.98 * self.heartbeats_expected {
            out.push(format!(
                "{} VMs: {} heartbeats answered of {:.0} expected",
                self.vms, self.heartbeats, self.heartbeats_expected
            ));
        }
        out
    }
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    /// The service watching 0 VMs.
    pub baseline: Row,
    pub rows: Vec<Row>,
    /// Always true: the VMs are simulated, no QEMU ran.
    pub qemu_free: bool,
    pub cores: usize,
    /// `getconf CLK_TCK`: the unit of `/proc/PID/stat`'s CPU times.
    pub clock_ticks_per_s: u64,
    pub interval_s: f64,
    pub timeout_s: f64,
    pub threshold: u32,
    pub bound_s: f64,
    pub window_s: f64,
    pub sim_latency_ms: f64,
    /// Where each size's configuration, service output and event log are kept.
    pub work: PathBuf,
}

impl ScaleReport {
    /// Every false alarm, missed detection or missing heartbeat; empty for a clean run.
    pub fn problems(&self) -> Vec<String> {
        std::iter::once(&self.baseline).chain(&self.rows).flat_map(|r| r.problems(self.bound_s)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("{0}")]
    Options(String),
    #[error(
        "the open-file limit is {soft} but {vms} simulated VMs and the service need about {need}; {fix}"
    )]
    FdLimit { vms: usize, need: u64, soft: u64, fix: String },
    #[error("cannot write {path}: {source}; check that the scratch directory is writable")]
    Work { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error("cannot start the service {program}: {source}; pass the acpimon binary")]
    Spawn { program: PathBuf, source: std::io::Error },
    #[error("the service exited ({status}) {when}; its output is in {log}")]
    ServiceExited { status: String, when: String, log: PathBuf },
    #[error(
        "the service did not start within {}; its output is in {log}",
        acpimon::units::format_duration(SERVICE_START_WAIT)
    )]
    NoEndpoint { log: PathBuf },
    #[error("{0}")]
    Status(String),
    #[error("after {waited:.0} s only {healthy} of {vms} VMs are healthy ({states}); the service's output is in {log}")]
    NotHealthy { vms: usize, healthy: usize, waited: f64, states: String, log: PathBuf },
    #[error("cannot read {path}: {source}")]
    Proc { path: PathBuf, source: std::io::Error },
}

/// Runs the benchmark; `progress` gets one line per step.
pub async fn run(opts: &ScaleOptions, progress: impl Fn(&str)) -> Result<ScaleReport, ScaleError> {
    if opts.window < Duration::from_secs(1) {
        return Err(ScaleError::Options(format!(
            "the window ({}) must be at least 1 s; the service heartbeats once a second",
            acpimon::units::format_duration(opts.window)
        )));
    }
    let mut sizes: Vec<usize> = opts.vms.iter().copied().filter(|&n| n > 0).collect();
    sizes.sort_unstable();
    sizes.dedup();
    check_fd_limit(sizes.last().copied().unwrap_or(0))?;
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace([':', '-'], "");
    let work = opts.work.join(format!("scale-{stamp}"));
    let ticks = clock_ticks();
    let mut baseline = None;
    let mut rows = Vec::new();
    for n in std::iter::once(0).chain(sizes) {
        progress(&format!("{n} VMs: starting"));
        let row = measure(opts, &work.join(format!("n{n}")), n, ticks, &progress).await?;
        progress(&format!(
            "{n} VMs: service {:.2} % of a core, RSS {:.1} MiB, {} heartbeats, {} false alarm(s)",
            row.cpu_pct, row.rss_mib, row.heartbeats, row.false_alarms
        ));
        match &baseline {
            None => baseline = Some(row),
            Some(_) => rows.push(row),
        }
    }
    let mut baseline = baseline.expect("the baseline is measured first");
    derive(&mut baseline, None);
    for r in &mut rows {
        derive(r, Some(&baseline));
    }
    Ok(ScaleReport {
        baseline,
        rows,
        qemu_free: true,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        clock_ticks_per_s: ticks,
        interval_s: INTERVAL.as_secs_f64(),
        timeout_s: TIMEOUT.as_secs_f64(),
        threshold: THRESHOLD,
        bound_s: detection_bound().as_secs_f64(),
        window_s: opts.window.as_secs_f64(),
        sim_latency_ms: opts.latency.as_secs_f64() * 1e3,
        work,
    })
}

/// Fills the figures that need the baseline.
fn derive(row: &mut Row, baseline: Option<&Row>) {
    let Some(b) = baseline else {
        row.cpu_vs_baseline = 1.0;
        row.rss_vs_baseline = 1.0;
        return;
    };
    row.cpu_vs_baseline = ratio(row.cpu_pct, b.cpu_pct);
    row.rss_vs_baseline = ratio(row.rss_mib, b.rss_mib);
    if row.vms > 0 {
        row.rss_kib_per_vm = Some((row.rss_mib - b.rss_mib) * 1024.0 / row.vms as f64);
    }
    if row.heartbeats_per_s > 0.0 {
        // CPU seconds per second beyond the baseline's, per heartbeat answered per second.
        let extra = (row.cpu_pct - b.cpu_pct) / 100.0;
        row.cpu_us_per_heartbeat = Some(extra / row.heartbeats_per_s * 1e6);
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

/// One size: fleet, service, healthy, window, hangs, teardown.
async fn measure(
    opts: &ScaleOptions,
    dir: &Path,
    n: usize,
    ticks: u64,
    progress: &impl Fn(&str),
) -> Result<Row, ScaleError> {
    let state_dir = dir.join("state");
    let data_dir = dir.join("data");
    for d in [&state_dir, &data_dir] {
        std::fs::create_dir_all(d).map_err(|source| ScaleError::Work { path: d.clone(), source })?;
    }
    let config = dir.join("watch.toml");
    std::fs::write(&config, config_text(&state_dir, &data_dir))
        .map_err(|source| ScaleError::Work { path: config.clone(), source })?;
    let fleet = spawn_fleet_with(
        &state_dir,
        n,
        SimVmOptions { dir: PathBuf::new(), latency: opts.latency },
        &SsdtConfig {
            doorbell_port: opts.doorbell.then_some(DEFAULT_DOORBELL_PORT),
            ..SsdtConfig::default()
        },
    )
    .await?;
    if n > 0 {
        progress(&format!("{n} VMs: simulated VMs started"));
    }
    let mut service = Service::start(&opts.service, &config, &dir.join("service.log")).await?;
    let result = measure_with(opts, &mut service, &fleet, &data_dir, n, ticks, progress).await;
    let stopped = service.stop().await;
    for vm in fleet {
        vm.stop().await;
    }
    let row = result?;
    stopped?;
    Ok(row)
}

async fn measure_with(
    opts: &ScaleOptions,
    service: &mut Service,
    fleet: &[SimVm],
    data_dir: &Path,
    n: usize,
    ticks: u64,
    progress: &impl Fn(&str),
) -> Result<Row, ScaleError> {
    let mut row = Row { vms: n, ..Row::default() };
    // All healthy.
    let deadline = STARTUP_GRACE + Duration::from_secs(40);
    loop {
        let status = service.status().await?;
        let healthy = status.vms.iter().filter(|v| v.state == State::Healthy).count();
        if healthy == n && status.vms.len() == n {
            break;
        }
        let waited = service.started.elapsed();
        if waited > deadline {
            return Err(ScaleError::NotHealthy {
                vms: n,
                healthy,
                waited: waited.as_secs_f64(),
                states: state_counts(&status),
                log: service.log.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    row.healthy_after_s = service.started.elapsed().as_secs_f64();
    let healthy_at = SystemTime::now();
    let status = service.status().await?;
    let rung = status
        .vms
        .iter()
        .filter(|v| v.completion.as_deref().is_some_and(|c| c.starts_with("doorbell")))
        .count();
    progress(&format!(
        "{n} VMs: all healthy after {:.2} s ({rung} completing on the doorbell, {} polling); measuring {}",
        row.healthy_after_s,
        n - rung.min(n),
        acpimon::units::format_duration(opts.window)
    ));
    tokio::time::sleep(SETTLE).await;
    // Start-up work (each VM's first state file and events, written and synced one by one) can
    // last seconds beyond all healthy at 2,000 VMs: the window starts once it is done.
    settle_writes(data_dir).await;

    // The window: status, then CPU, ..., CPU, then status, so that serving /status stays
    // (almost) outside the CPU window.
    let pid = service.child.id();
    let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
    let s0 = (service.status().await?, Instant::now());
    let (c0, self0, m0, t0) =
        (proc_cpu(&stat_path)?, proc_cpu(Path::new("/proc/self/stat"))?, machine_cpu()?, Instant::now());
    tokio::time::sleep(opts.window).await;
    let (c1, self1, m1, t1) =
        (proc_cpu(&stat_path)?, proc_cpu(Path::new("/proc/self/stat"))?, machine_cpu()?, Instant::now());
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let status_text = read_proc(&status_path)?;
    let s1 = (service.status().await?, Instant::now());
    let secs = t1.duration_since(t0).as_secs_f64();
    row.window_s = secs;
    row.cpu_pct = c1.saturating_sub(c0) as f64 / secs / ticks as f64 * 100.0;
    row.sim_cpu_pct = self1.saturating_sub(self0) as f64 / secs / ticks as f64 * 100.0;
    row.machine_busy_pct = machine_busy_pct(m0, m1);
    row.rss_mib = status_kib(&status_text, "VmRSS").unwrap_or(0) as f64 / 1024.0;
    row.hwm_mib = status_kib(&status_text, "VmHWM").unwrap_or(0) as f64 / 1024.0;
    row.service_threads = status_kib(&status_text, "Threads").unwrap_or(0);
    row.service_fds = count_dir(&format!("/proc/{pid}/fd"));
    row.sim_fds = count_dir("/proc/self/fd");
    let status_secs = s1.1.duration_since(s0.1).as_secs_f64();
    row.heartbeats = heartbeat_answers(&s1.0).saturating_sub(heartbeat_answers(&s0.0));
    row.heartbeats_expected = n as f64 * status_secs / INTERVAL.as_secs_f64();
    row.heartbeats_per_s = row.heartbeats as f64 / status_secs;

    // Hangs, spread over one interval so that they fall at every phase of the probes.
    let h = opts.hangs.min(n);
    let mut hung: BTreeMap<String, SystemTime> = BTreeMap::new();
    if h > 0 {
        progress(&format!("{n} VMs: hanging {h} VMs"));
    }
    let first: Vec<usize> = (0..h).map(|k| k * n / h).collect();
    hang(fleet, &first, &mut hung).await;
    let log = data_dir.join("events.jsonl");
    let mut tail = EventTail::new(log.clone());
    let mut events = Vec::new();
    wait_detected(&mut tail, &mut events, healthy_at, &hung).await?;
    // One more interval for alarms that the hangs may have caused elsewhere.
    tokio::time::sleep(INTERVAL).await;
    events.extend(tail.read_new().map_err(|source| ScaleError::Proc { path: log.clone(), source })?);
    let found = analyze(&events, healthy_at, &hung);
    row.hung = h;
    row.undetected = found.detections.iter().filter(|d| d.is_none()).count();
    row.detection_s = found.detections.iter().flatten().copied().collect();
    row.detection_s.sort_by(f64::total_cmp);
    row.detection_p50_s = percentile(&row.detection_s, 0.5);
    row.detection_max_s = row.detection_s.last().copied();
    row.false_alarms = found.false_alarms.len();
    row.false_alarm_samples = found.false_alarms.into_iter().take(20).collect();
    if h > 0 {
        progress(&format!(
            "{n} VMs: {} of {h} hangs detected, p50 {}",
            h - row.undetected,
            row.detection_p50_s.map_or("-".into(), |s| format!("{s:.2} s"))
        ));
    }
    if opts.all_hung && n > 0 {
        // The first hangs answer again; once every VM is healthy, all hang at once.
        for &i in &first {
            fleet[i].set_state(SimState::Running);
        }
        let deadline = Instant::now() + detection_bound() * 5;
        loop {
            let status = service.status().await?;
            if status.vms.iter().all(|v| v.state == State::Healthy) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ScaleError::Status(format!(
                    "{n} VMs: the hung VMs did not answer again in time ({})",
                    state_counts(&status)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        progress(&format!("{n} VMs: hanging all {n} VMs"));
        let since = SystemTime::now();
        let mut all = BTreeMap::new();
        hang(fleet, &(0..n).collect::<Vec<_>>(), &mut all).await;
        let mut events = Vec::new();
        let found = wait_detected(&mut tail, &mut events, since, &all).await?;
        let mut d: Vec<f64> = found.detections.iter().flatten().copied().collect();
        d.sort_by(f64::total_cmp);
        row.all_hung = n;
        row.all_undetected = n - d.len();
        row.all_detection_p50_s = percentile(&d, 0.5);
        row.all_detection_max_s = d.last().copied();
        progress(&format!(
            "{n} VMs: all hung: {} of {n} detected, p50 {} max {}",
            d.len(),
            row.all_detection_p50_s.map_or("-".into(), |s| format!("{s:.2} s")),
            row.all_detection_max_s.map_or("-".into(), |s| format!("{s:.2} s"))
        ));
    }
    Ok(row)
}

/// Hangs the VMs `which` of `fleet`, spread evenly over one interval so that they fall at
/// every phase of the probes; records when each hung.
async fn hang(fleet: &[SimVm], which: &[usize], hung: &mut BTreeMap<String, SystemTime>) {
    let start = tokio::time::Instant::now();
    let h = which.len().max(1) as u32;
    for (k, &i) in which.iter().enumerate() {
        tokio::time::sleep_until(start + INTERVAL * k as u32 / h).await;
        let vm = &fleet[i];
        hung.insert(vm.descriptor().name.clone(), SystemTime::now());
        vm.set_state(SimState::Hung);
    }
}

/// Reads the event log until every hung VM's detection is in it, or three bounds passed.
async fn wait_detected(
    tail: &mut EventTail,
    events: &mut Vec<Event>,
    since: SystemTime,
    hung: &BTreeMap<String, SystemTime>,
) -> Result<Findings, ScaleError> {
    // Detection is the transition's own time; the service's writer may put it in the log
    // later (thousands of state files after a mass hang), so the log is read until it stops
    // growing, and a detection later than three bounds counts as none.
    let bound3 = (detection_bound() * 3).as_secs_f64();
    let give_up = Instant::now() + detection_bound() * 3;
    let hard_stop = give_up + Duration::from_secs(60);
    let mut grew = Instant::now();
    loop {
        let new = tail.read_new().map_err(|source| ScaleError::Proc { path: tail.path.clone(), source })?;
        if !new.is_empty() {
            grew = Instant::now();
        }
        events.extend(new);
        let mut found = analyze(events, since, hung);
        let now = Instant::now();
        let writer_idle = grew.elapsed() >= Duration::from_secs(2);
        if found.detections.iter().all(Option::is_some) || (now >= give_up && writer_idle) || now >= hard_stop
        {
            for d in &mut found.detections {
                if d.is_some_and(|s| s > bound3) {
                    *d = None;
                }
            }
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most a minute) until the service's event log and per-VM state files have not
/// changed for a second.
async fn settle_writes(data_dir: &Path) {
    let stamp = || {
        let m = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.len(), m.modified().ok()));
        (m(&data_dir.join("events.jsonl")), m(&data_dir.join("vms")))
    };
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut last = stamp();
    let mut quiet_since = Instant::now();
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = stamp();
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            return;
        }
    }
}

/// The service's configuration for one size.
fn config_text(state_dir: &Path, data_dir: &Path) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let dur = |d: Duration| format!("\"{}ms\"", d.as_millis());
    format!(
        "# Written by acpimon-bench scale.\n\
         state_dir = {}\n\
         data_dir = {}\n\
         node = \"bench-scale\"\n\
         \n\
         [metrics]\n\
         listen = \"127.0.0.1:0\"\n\
         \n\
         [defaults]\n\
         startup_grace = {}\n\
         \n\
         [[defaults.scenario]]\n\
         kind = \"acpi-heartbeat\"\n\
         interval = {}\n\
         timeout = {}\n\
         threshold = {THRESHOLD}\n\
         \n\
         # One cheap step: a list cannot be empty in TOML's arrays of tables.\n\
         [[defaults.diagnostic]]\n\
         step = \"qmp-status\"\n",
        quote(state_dir),
        quote(data_dir),
        dur(STARTUP_GRACE),
        dur(INTERVAL),
        dur(TIMEOUT),
    )
}

/// The service as a child process.
pub(crate) struct Service {
    pub(crate) child: Child,
    log: PathBuf,
    pub(crate) addr: SocketAddr,
    started: Instant,
}

impl Service {
    pub(crate) async fn start(program: &Path, config: &Path, log: &Path) -> Result<Service, ScaleError> {
        let out =
            std::fs::File::create(log).map_err(|source| ScaleError::Work { path: log.into(), source })?;
        let err = out.try_clone().map_err(|source| ScaleError::Work { path: log.into(), source })?;
        let started = Instant::now();
        let child = Command::new(program)
            .arg("watch")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Not the caller's service manager's child: no sd_notify from the benchmark.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .spawn()
            .map_err(|source| ScaleError::Spawn { program: program.into(), source })?;
        let mut service =
            Service { child, log: log.into(), addr: SocketAddr::from(([127, 0, 0, 1], 0)), started };
        let deadline = Instant::now() + SERVICE_START_WAIT;
        loop {
            service.exited("while starting")?;
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(addr) = endpoint_in(&text) {
                service.addr = addr;
                return Ok(service);
            }
            if Instant::now() >= deadline {
                return Err(ScaleError::NoEndpoint { log: log.into() });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An error if the service is no longer running.
    fn exited(&mut self, when: &str) -> Result<(), ScaleError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ScaleError::ServiceExited {
                status: status.to_string(),
                when: when.into(),
                log: self.log.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) async fn status(&mut self) -> Result<StatusView, ScaleError> {
        self.exited("while being measured")?;
        fetch_status(self.addr, Duration::from_secs(10)).await.map_err(ScaleError::Status)
    }

    /// SIGTERM, then SIGKILL if it does not stop in time.
    pub(crate) async fn stop(mut self) -> Result<(), ScaleError> {
        self.exited("before the end of the measurement")?;
        acpimon::util::process::terminate(self.child.id());
        let deadline = Instant::now() + SERVICE_STOP_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(()) // Drop kills it.
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address in the service's "metrics and status on http://ADDR" line.
fn endpoint_in(log: &str) -> Option<SocketAddr> {
    let (_, rest) = log.split_once("metrics and status on http://")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn heartbeat_answers(s: &StatusView) -> u64 {
    s.vms
        .iter()
        .flat_map(|v| &v.scenarios)
        .filter(|sc| sc.kind == "acpi-heartbeat")
        .map(|sc| sc.answers_total)
        .sum()
}

/// "healthy 98, late 2".
fn state_counts(s: &StatusView) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &s.vms {
        *counts.entry(v.state.name()).or_default() += 1;
    }
    if counts.is_empty() {
        return "none seen yet".into();
    }
    counts.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", ")
}

// ---- events ----

/// New complete lines of a JSON-lines file.
struct EventTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl EventTail {
    fn new(path: PathBuf) -> EventTail {
        EventTail { path, offset: 0, partial: Vec::new() }
    }

    fn read_new(&mut self) -> std::io::Result<Vec<Event>> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let complete = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(i) => self.partial.drain(..=i).collect::<Vec<u8>>(),
            None => return Ok(Vec::new()),
        };
        Ok(complete.split(|&b| b == b'\n').filter_map(|l| serde_json::from_slice(l).ok()).collect())
    }
}

/// What the event log says about the hangs and everything else.
#[derive(Debug, PartialEq)]
struct Findings {
    /// Per hung VM (in name order): seconds from the hang to its transition to unresponsive.
    detections: Vec<Option<f64>>,
    false_alarms: Vec<FalseAlarm>,
}

/// Reads transitions after `healthy_at`: a hung VM's first transition to unresponsive after
/// its hang is its detection; a transition away from healthy of a VM not hung (yet) is a false
/// alarm.
fn analyze(events: &[Event], healthy_at: SystemTime, hung: &BTreeMap<String, SystemTime>) -> Findings {
    let mut detections: BTreeMap<&str, Option<f64>> = hung.keys().map(|k| (k.as_str(), None)).collect();
    let mut false_alarms = Vec::new();
    for ev in events {
        let EventKind::Transition(t) = &ev.kind else { continue };
        let (Some(vm), Ok(time)) = (ev.vm.as_deref(), humantime::parse_rfc3339(&ev.time)) else { continue };
        if time < healthy_at {
            continue;
        }
        match hung.get(vm) {
            Some(&hung_at) if time >= hung_at => {
                let d = detections.get_mut(vm).expect("every hung VM has an entry");
                if t.to == State::Unresponsive && d.is_none() {
                    *d = Some(time.duration_since(hung_at).unwrap_or_default().as_secs_f64());
                }
            }
            _ if t.to == State::Healthy || t.to == State::Recovered => {}
            _ => false_alarms.push(FalseAlarm {
                vm: vm.into(),
                time: ev.time.clone(),
                from: t.from.name().into(),
                to: t.to.name().into(),
                reason: t.reason.clone(),
            }),
        }
    }
    Findings { detections: detections.into_values().collect(), false_alarms }
}

/// The value at fraction `p` of `sorted`, as `run::Summary` picks it (index round((n−1)·p)).
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

// ---- /proc ----

pub(crate) fn read_proc(path: &Path) -> Result<String, ScaleError> {
    std::fs::read_to_string(path).map_err(|source| ScaleError::Proc { path: path.into(), source })
}

/// utime + stime of `/proc/PID/stat`, in clock ticks.
pub(crate) fn proc_cpu(path: &Path) -> Result<u64, ScaleError> {
    let text = read_proc(path)?;
    stat_cpu_ticks(&text).ok_or_else(|| ScaleError::Proc {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no utime/stime fields"),
    })
}

/// utime (field 14) + stime (field 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses, so fields are counted after the
/// last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A number from `/proc/PID/status`: "VmRSS: 1234 kB" gives 1234 (kB for the Vm* keys).
pub(crate) fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// The whole machine's (busy, total) jiffies from the first line of `/proc/stat`.
fn machine_cpu() -> Result<(u64, u64), ScaleError> {
    let path = Path::new("/proc/stat");
    let text = read_proc(path)?;
    proc_stat_busy(&text).ok_or_else(|| ScaleError::Proc {
        path: path.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no cpu line"),
    })
}

/// (busy, total) of the `cpu` line: total is user..steal; busy leaves out idle and iowait.
/// guest and guest_nice are already counted in user and nice.
fn proc_stat_busy(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> =
        line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

fn machine_busy_pct(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1);
    if total == 0 {
        return 0.0;
    }
    b.0.saturating_sub(a.0) as f64 / total as f64 * 100.0
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

/// `getconf CLK_TCK` (from the kernel's auxiliary vector), else Linux's usual 100.
pub(crate) fn clock_ticks() -> u64 {
    Some(rustix::param::clock_ticks_per_second()).filter(|&t| t > 0).unwrap_or(100)
}

/// Fails, naming the fix, when the open-file limit is too low for `n` VMs.
fn check_fd_limit(n: usize) -> Result<(), ScaleError> {
    match std::fs::read_to_string("/proc/self/limits").ok().as_deref().and_then(nofile_limits) {
        Some((soft, hard)) => fd_limit(n, soft, hard),
        None => Ok(()),
    }
}

/// `n` VMs against the soft and hard open-file limits (`None`: unlimited).
fn fd_limit(n: usize, soft: Option<u64>, hard: Option<u64>) -> Result<(), ScaleError> {
    let need = fds_needed(n);
    match (soft, hard) {
        (Some(soft), hard) if soft < need => {
            let fix = match hard {
                Some(hard) if hard < need => format!(
                    "the hard limit is {hard}: raise it as root (`ulimit -Hn {need}`, LimitNOFILE={need} in a \
                     systemd unit, or a nofile line in /etc/security/limits.conf), or measure fewer VMs"
                ),
                _ => format!("run `ulimit -n {need}` first, or use tools/bench-scale, which raises it"),
            };
            Err(ScaleError::FdLimit { vms: n, need, soft, fix })
        }
        _ => Ok(()),
    }
}

/// The soft and hard "Max open files" of `/proc/PID/limits` (`None`: unlimited).
fn nofile_limits(limits: &str) -> Option<(Option<u64>, Option<u64>)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    let mut value = || -> Option<Option<u64>> {
        match f.next()? {
            "unlimited" => Some(None),
            v => v.parse().ok().map(Some),
        }
    };
    Some((value()?, value()?))
}

// ---- the report ----

impl fmt::Display for ScaleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench-scale: one `acpimon watch` process, simulated VMs (no QEMU; guest latency {} ms), \
             acpi-heartbeat every {} s (timeout {} s, threshold {}), {} s window per size. The simulated \
             VMs and the service share this machine's {} cores. CPU times come from /proc/PID/stat in \
             1/{} s ticks: ±{:.2} % of a core over a window.",
            num(self.sim_latency_ms),
            num(self.interval_s),
            num(self.timeout_s),
            self.threshold,
            num(self.window_s),
            self.cores,
            self.clock_ticks_per_s,
            100.0 / (self.clock_ticks_per_s as f64 * self.window_s),
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| VMs | all healthy after | service CPU, % of a core (× baseline) | CPU per VM-heartbeat | RSS MiB \
             (× baseline) | RSS per VM | heartbeats answered / expected | detection p50 / max (÷ bound {} s) \
             | false alarms |",
            num(self.bound_s)
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for r in std::iter::once(&self.baseline).chain(&self.rows) {
            let vms = if r.vms == 0 { "0 (baseline)".to_string() } else { r.vms.to_string() };
            let heartbeats = if r.vms == 0 {
                "—".to_string()
            } else {
                format!(
                    "{} / {:.0} ({:.3})",
                    r.heartbeats,
                    r.heartbeats_expected,
                    ratio(r.heartbeats as f64, r.heartbeats_expected)
                )
            };
            let detection = match (r.detection_p50_s, r.detection_max_s) {
                (Some(p50), Some(max)) => format!(
                    "{p50:.2} / {max:.2} s ({:.2} / {:.2}){}",
                    p50 / self.bound_s,
                    max / self.bound_s,
                    if r.undetected > 0 { format!(", {} undetected", r.undetected) } else { String::new() }
                ),
                _ if r.hung > 0 => format!("none of {} detected", r.hung),
                _ => "—".into(),
            };
            writeln!(
                f,
                "| {vms} | {:.2} s | {:.2} % ({}) | {} | {:.1} ({}) | {} | {heartbeats} | {detection} | {} |",
                r.healthy_after_s,
                r.cpu_pct,
                times(r.cpu_vs_baseline),
                r.cpu_us_per_heartbeat.map_or("—".into(), |u| format!("{u:.1} µs")),
                r.rss_mib,
                times(r.rss_vs_baseline),
                r.rss_kib_per_vm.map_or("—".into(), |k| format!("{k:.1} KiB")),
                r.false_alarms
            )?;
        }
        if self.baseline.cpu_pct == 0.0 {
            writeln!(f)?;
            writeln!(
                f,
                "The idle service used less than one clock tick in its window, so its CPU ratio is left out; \
                 \"CPU per VM-heartbeat\" is the CPU above the baseline divided by the heartbeats answered."
            )?;
        }
        writeln!(f)?;
        writeln!(f, "The machine during each window:")?;
        writeln!(f)?;
        writeln!(
            f,
            "| VMs | simulated VMs' CPU, % of a core | machine busy, % of {} cores | service peak RSS MiB | service \
             threads | open files: service / simulator |",
            self.cores
        )?;
        writeln!(f, "|---:|---:|---:|---:|---:|---:|")?;
        for r in std::iter::once(&self.baseline).chain(&self.rows) {
            writeln!(
                f,
                "| {} | {:.1} % | {:.1} % | {:.1} | {} | {} / {} |",
                r.vms,
                r.sim_cpu_pct,
                r.machine_busy_pct,
                r.hwm_mib,
                r.service_threads,
                r.service_fds,
                r.sim_fds
            )?;
        }
        if self.rows.iter().any(|r| r.all_hung > 0) {
            writeln!(f)?;
            writeln!(f, "Every VM hung at once (after the hangs above answered again):")?;
            writeln!(f)?;
            writeln!(f, "| VMs | hung at once | detection p50 / max (÷ bound {} s) |", num(self.bound_s))?;
            writeln!(f, "|---:|---:|---:|")?;
            for r in self.rows.iter().filter(|r| r.all_hung > 0) {
                let detection = match (r.all_detection_p50_s, r.all_detection_max_s) {
                    (Some(p50), Some(max)) => format!(
                        "{p50:.2} / {max:.2} s ({:.2} / {:.2}){}",
                        p50 / self.bound_s,
                        max / self.bound_s,
                        if r.all_undetected > 0 {
                            format!(", {} undetected", r.all_undetected)
                        } else {
                            String::new()
                        }
                    ),
                    _ => format!("none of {} detected", r.all_hung),
                };
                writeln!(f, "| {} | {} | {detection} |", r.vms, r.all_hung)?;
            }
        }
        let problems = self.problems();
        if !problems.is_empty() {
            writeln!(f)?;
            writeln!(f, "Problems: {}.", problems.join("; "))?;
            for r in std::iter::once(&self.baseline).chain(&self.rows) {
                for a in &r.false_alarm_samples {
                    writeln!(f, "- {} VMs: {} {} {} -> {}: {}", r.vms, a.time, a.vm, a.from, a.to, a.reason)?;
                }
            }
        }
        writeln!(f)?;
        writeln!(f, "Each size's configuration, service output and event log: {}", self.work.display())
    }
}

/// 1 → "1", 0.5 → "0.5".
fn num(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A ratio as "1.0×", "42×", or "—" when the baseline was zero.
fn times(x: f64) -> String {
    if !x.is_finite() {
        "—".into()
    } else if x >= 100.0 {
        format!("{x:.0}×")
    } else {
        format!("{x:.1}×")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as a thread may have.
        let stat = "4242 (acpimon (w) x) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 6 0 \
                    123456 98765432 2345 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_and_limits() {
        let status = "Name:\tacpimon\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t7\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(status_kib(status, "Threads"), Some(7));
        assert_eq!(status_kib(status, "VmSwap"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(nofile_limits(limits), Some((Some(1024), Some(524288))));
        let unlimited = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(nofile_limits(unlimited), Some((None, None)));
        assert_eq!(fds_needed(500), 3256);
        assert!(fd_limit(500, Some(3256), Some(3256)).is_ok());
        assert!(fd_limit(500, None, None).is_ok());
        let low_soft = fd_limit(500, Some(1024), Some(524288)).unwrap_err().to_string();
        assert!(low_soft.ends_with(
            "need about 3256; run `ulimit -n 3256` first, or use tools/bench-scale, which raises it"
        ));
        let low_hard = fd_limit(500, Some(1024), Some(1024)).unwrap_err().to_string();
        assert!(
            low_hard.contains("; the hard limit is 1024: raise it as root (`ulimit -Hn 3256`"),
            "{low_hard}"
        );
    }

    #[test]
    fn machine_busy_time() {
        let a = proc_stat_busy("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5\n").unwrap();
        assert_eq!(a, (150, 1000));
        let b = proc_stat_busy("cpu  200 0 100 1500 100 0 0 0 0 0\n").unwrap();
        assert_eq!(machine_busy_pct(a, b), 150.0 / 900.0 * 100.0);
        assert_eq!(machine_busy_pct(a, a), 0.0);
        assert_eq!(proc_stat_busy("intr 1 2 3\n"), None);
    }

    #[test]
    fn percentiles_pick_like_the_run_summary() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(6.0)); // round(9 × 0.5) = 5 (0-based): 6
        assert_eq!(percentile(&v, 1.0), Some(10.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.5], 0.5), Some(3.5));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(detection_bound(), Duration::from_secs(4));
    }

    fn transition(vm: &str, time: SystemTime, from: State, to: State) -> Event {
        let kind = EventKind::Transition(acpimon::event::Transition {
            from,
            to,
            reason: format!("{from} to {to}"),
            evidence: acpimon::watch::state::Evidence::Closed(Default::default()),
            attached: None,
            kernel_report: None,
        });
        let mut ev = Event::new(acpimon::event::new_key(), "node", Some(vm), kind);
        ev.time = acpimon::units::rfc3339(time);
        ev
    }

    #[test]
    fn hangs_are_detections_and_other_transitions_false_alarms() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hung = BTreeMap::from([("sim-0000".to_string(), at(10_000)), ("sim-0005".into(), at(10_100))]);
        let events = vec![
            // Before everything was healthy: start-up, not counted.
            transition("sim-0003", at(500), State::Starting, State::Healthy),
            transition("sim-0003", at(900), State::Starting, State::Late),
            // A VM not hung going late and back: one false alarm.
            transition("sim-0007", at(5_000), State::Healthy, State::Late),
            transition("sim-0007", at(6_000), State::Late, State::Healthy),
            // A hung VM before its hang: a false alarm too.
            transition("sim-0005", at(8_000), State::Healthy, State::Late),
            transition("sim-0005", at(9_000), State::Late, State::Healthy),
            // The hangs.
            transition("sim-0000", at(11_000), State::Healthy, State::Late),
            transition("sim-0000", at(13_450), State::Late, State::Unresponsive),
            transition("sim-0005", at(11_100), State::Healthy, State::Late),
        ];
        let evidence = acpimon::event::RebootEvidence::QmpEvent(serde_json::Value::Null);
        let reboot = EventKind::Reboot(acpimon::event::RebootEvent { evidence });
        let mut other = Event::new(acpimon::event::new_key(), "node", Some("sim-0001"), reboot);
        other.time = acpimon::units::rfc3339(at(7_000));
        let mut all = events.clone();
        all.push(other);
        let f = analyze(&all, at(1_000), &hung);
        assert_eq!(f.detections, vec![Some(3.45), None]);
        let who: Vec<(&str, &str)> = f.false_alarms.iter().map(|a| (a.vm.as_str(), a.to.as_str())).collect();
        assert_eq!(who, vec![("sim-0007", "late"), ("sim-0005", "late")]);
        assert_eq!(f.false_alarms[0].reason, "healthy to late");
    }

    #[test]
    fn event_tail_reads_complete_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut tail = EventTail::new(path.clone());
        assert!(tail.read_new().unwrap().is_empty());
        let line = |vm: &str| {
            serde_json::to_string(&transition(vm, SystemTime::UNIX_EPOCH, State::Starting, State::Healthy))
                .unwrap()
        };
        let (a, b) = (line("a"), line("b"));
        std::fs::write(&path, format!("{a}\n{}", &b[..10])).unwrap();
        let got = tail.read_new().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].vm.as_deref(), Some("a"));
        std::fs::write(&path, format!("{a}\n{b}\n")).unwrap();
        let got = tail.read_new().unwrap();
        assert_eq!(got.iter().map(|e| e.vm.as_deref()).collect::<Vec<_>>(), vec![Some("b")]);
    }

    #[test]
    fn the_service_configuration_is_valid() {
        let text = config_text(Path::new("/tmp/x \"y\"/state"), Path::new("/tmp/data"));
        let c = acpimon::watch::Config::parse(&text, Path::new("watch.toml")).unwrap();
        assert_eq!(c.state_dir, Path::new("/tmp/x \"y\"/state"));
        assert_eq!(c.metrics, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.defaults.startup_grace, STARTUP_GRACE);
        let s = &c.defaults.scenarios[0];
        assert_eq!((s.interval, s.timeout, s.threshold), (INTERVAL, TIMEOUT, THRESHOLD));
        assert_eq!(c.defaults.diagnostics.len(), 1);
        let line = "2026-01-01T00:00:00.000Z acpimon watch: watching /s, metrics and status on http://127.0.0.1:4321\n";
        assert_eq!(endpoint_in(line), Some("127.0.0.1:4321".parse().unwrap()));
        assert_eq!(endpoint_in("acpimon watch: watching /s\n"), None);
    }

    fn row(vms: usize, cpu_pct: f64, rss_mib: f64, heartbeats: u64) -> Row {
        Row {
            vms,
            healthy_after_s: 1.2,
            window_s: 20.0,
            cpu_pct,
            rss_mib,
            hwm_mib: rss_mib + 1.0,
            heartbeats,
            heartbeats_expected: vms as f64 * 20.0,
            heartbeats_per_s: heartbeats as f64 / 20.0,
            hung: vms.min(10),
            ..Row::default()
        }
    }

    #[test]
    fn per_vm_figures_are_differences_against_the_baseline() {
        let mut base = row(0, 0.5, 10.0, 0);
        let mut r = row(100, 10.5, 20.0, 2000);
        derive(&mut base, None);
        derive(&mut r, Some(&base));
        assert_eq!(base.cpu_us_per_heartbeat, None);
        assert_eq!(base.rss_kib_per_vm, None);
        assert_eq!(r.cpu_vs_baseline, 21.0);
        assert_eq!(r.rss_vs_baseline, 2.0);
        // 10 % of a core more = 0.1 s/s, over 100 heartbeats/s: 1000 µs each.
        assert!((r.cpu_us_per_heartbeat.unwrap() - 1000.0).abs() < 1e-9);
        assert!((r.rss_kib_per_vm.unwrap() - 102.4).abs() < 1e-9);
    }

    fn report_of(baseline: Row, rows: Vec<Row>) -> ScaleReport {
        ScaleReport {
            baseline,
            rows,
            qemu_free: true,
            cores: 2,
            clock_ticks_per_s: 100,
            interval_s: 1.0,
            timeout_s: 1.0,
            threshold: 3,
            bound_s: 4.0,
            window_s: 20.0,
            sim_latency_ms: 1.0,
            work: PathBuf::from("/tmp/scale"),
        }
    }

    #[test]
    fn the_table_renders_for_the_readme() {
        let mut zero = row(0, 0.0, 9.0, 0);
        derive(&mut zero, None);
        let idle = report_of(zero, vec![]);
        assert!(idle.to_string().contains("The idle service used less than one clock tick"));
        let mut base = row(0, 0.02, 9.0, 0);
        let mut r = row(10, 0.52, 9.5, 200);
        r.detection_s = vec![3.1, 3.6, 3.8];
        r.detection_p50_s = Some(3.6);
        r.detection_max_s = Some(3.8);
        r.hung = 3;
        let mut bad = row(500, 20.02, 30.0, 9000);
        bad.hung = 10;
        bad.undetected = 9;
        bad.detection_s = vec![4.6];
        bad.detection_p50_s = Some(4.6);
        bad.detection_max_s = Some(4.6);
        bad.false_alarms = 1;
        bad.false_alarm_samples = vec![FalseAlarm {
            vm: "sim-0042".into(),
            time: "2026-01-01T00:00:05.000Z".into(),
            from: "healthy".into(),
            to: "late".into(),
            reason: "acpi-heartbeat missed 1 of 3".into(),
        }];
        derive(&mut base, None);
        derive(&mut r, Some(&base));
        derive(&mut bad, Some(&base));
        let report = report_of(base, vec![r, bad]);
        assert!(!report.to_string().contains("The idle service"));
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(
            "bench-scale: one `acpimon watch` process, simulated VMs (no QEMU; guest latency 1 ms)"
        ));
        assert!(lines[0].ends_with("share this machine's 2 cores. CPU times come from /proc/PID/stat in 1/100 s ticks: ±0.05 % of a core over a window."), "{}", lines[0]);
        assert_eq!(lines[4], "| 0 (baseline) | 1.20 s | 0.02 % (1.0×) | — | 9.0 (1.0×) | — | — | — | 0 |");
        assert_eq!(
            lines[5],
            "| 10 | 1.20 s | 0.52 % (26.0×) | 500.0 µs | 9.5 (1.1×) | 51.2 KiB | 200 / 200 (1.000) | 3.60 / 3.80 s \
             (0.90 / 0.95) | 0 |"
        );
        assert!(lines[6].starts_with("| 500 | 1.20 s | 20.02 % (1001×) |"), "{}", lines[6]);
        assert!(
            lines[6].contains("| 9000 / 10000 (0.900) | 4.60 / 4.60 s (1.15 / 1.15), 9 undetected | 1 |"),
            "{}",
            lines[6]
        );
        assert!(text.contains("| 10 | 0.0 % | 0.0 % | 10.5 | 0 | 0 / 0 |"));
        assert!(text.contains("Problems: 500 VMs: 1 false alarm(s); 500 VMs: 9 of 10 hung VMs not detected; 500 VMs: a hang took 4.60 s to \
             detect, beyond the 4 s bound; 500 VMs: 9000 heartbeats answered of 10000 expected."));
        assert!(text.contains(
            "- 500 VMs: 2026-01-01T00:00:05.000Z sim-0042 healthy -> late: acpi-heartbeat missed 1 of 3"
        ));
        assert!(text.ends_with("event log: /tmp/scale\n"));
        // Every table row has as many cells as its header.
        for l in lines.iter().filter(|l| l.starts_with('|')) {
            let header = if l.matches('|').count() == 10 { 10 } else { 7 };
            assert_eq!(l.matches('|').count(), header, "{l}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["qemu_free"], true);
        assert_eq!(json["rows"][0]["detection_s"], serde_json::json!([3.1, 3.6, 3.8]));
    }
}
