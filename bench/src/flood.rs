//! The console-flood benchmark (`acpimon-bench flood`, tools/bench-flood): what guests that
//! write their serial console as fast as QEMU lets them cost the service, and whether a
//! healthy VM watched by the same service notices.
//!
//! 1. One healthy test guest (`flood-healthy`) is launched under acpimon (its sockets left to
//!    the service) and the real service runs as a child process (`acpimon watch --config
//!    FILE`; the healthy VM's heartbeat every [`INTERVAL`], the others' every second);
//! 2. **baseline**: once it is healthy, the service's CPU time (`/proc/PID/stat`) and memory
//!    are taken over the window while `/status` is polled every [`POLL`] for the healthy VM's
//!    heartbeat latencies (each poll where its answers grew by one gives one latency);
//! 3. **flood**: `floods` guests booted with `acpimon.scenario=flood` are added to the same
//!    directory; once the service has them healthy and they have flooded for [`SETTLE`], the
//!    same figures are taken over a second window.
//!
//! The flood's cost is the difference of the two windows' CPU: it includes the ordinary
//! monitoring of the flooding VMs (a few tenths of a percent each), so it overstates the flood
//! slightly. The guests, QEMU and the benchmark share the machine with the service.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::scale::{clock_ticks, proc_cpu, read_proc, status_kib, ScaleError, Service};
use acpimon::generate::SsdtConfig;
use acpimon::launch::{self, Vm, VmSpec};
use acpimon::watch::metrics::StatusView;
use acpimon::watch::state::State;

/// The healthy VM's heartbeat period.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// How often `/status` is read for the healthy VM's latest latency.
const POLL: Duration = Duration::from_millis(50);
/// Between the VMs being healthy (and flooding) and a window.
const SETTLE: Duration = Duration::from_secs(5);
/// How long the guests may take to boot and answer.
const BOOT_WAIT: Duration = Duration::from_secs(120);
/// The healthy VM's name.
pub const HEALTHY: &str = "flood-healthy";
/// The bounds the README states: the flood costs at most this share of a core in total ...
pub const MAX_COST_PCT: f64 = 10.0;
/// ... and the healthy VM's heartbeat p99 grows by at most this factor.
pub const MAX_P99_RATIO: f64 = 1.10;

/// What to run.
#[derive(Clone, Debug)]
pub struct FloodOptions {
    /// The acpimon binary run as the service.
    pub service: PathBuf,
    /// The test guest's directory (qemu-fixtures/build-guest).
    pub guest: PathBuf,
    /// Flooding guests.
    pub floods: usize,
    /// Each measurement window.
    pub window: Duration,
    pub machine: String,
    /// Scratch directory; the run's files are kept there.
    pub work: PathBuf,
}

/// One window's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Window {
    /// The service's CPU time over the window, in % of one core.
    pub cpu_pct: f64,
    /// Its resident memory at the window's end, and its peak so far (MiB).
    pub rss_mib: f64,
    pub hwm_mib: f64,
    /// The healthy VM's heartbeat latencies seen (ms) and their percentiles.
    pub heartbeats: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Misses of the healthy VM's heartbeat over the window.
    pub misses: u64,
    /// The flooding VMs' console over the window, bytes/s (from `/status`; 0 for a service
    /// without console counters).
    pub console_received_per_s: f64,
    pub console_kept_per_s: f64,
    pub console_dropped_per_s: f64,
    /// Reads of the flooding consoles a second.
    pub console_reads_per_s: f64,
}

/// A whole run.
#[derive(Clone, Debug, Serialize)]
pub struct FloodReport {
    pub qemu: String,
    pub machine: String,
    pub floods: usize,
    pub window_s: f64,
    pub interval_ms: f64,
    pub baseline: Window,
    pub flood: Window,
    /// `flood.cpu_pct - baseline.cpu_pct`.
    pub cost_pct: f64,
    /// `flood.p99_ms / baseline.p99_ms`.
    pub p99_ratio: f64,
    pub work: PathBuf,
}

impl FloodReport {
    /// Figures outside the README's bounds; empty when the run met them.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.cost_pct > MAX_COST_PCT {
            p.push(format!("the flood cost {:.1} % of a core (bound {MAX_COST_PCT} %)", self.cost_pct));
        }
        if self.p99_ratio > MAX_P99_RATIO {
            p.push(format!(
                "the healthy VM's heartbeat p99 went from {:.2} to {:.2} ms (×{:.2}, bound ×{MAX_P99_RATIO})",
                self.baseline.p99_ms, self.flood.p99_ms, self.p99_ratio
            ));
        }
        if self.flood.misses > 0 {
            p.push(format!("the healthy VM missed {} heartbeats under the flood", self.flood.misses));
        }
        p
    }
}

impl std::fmt::Display for FloodReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "bench-flood: QEMU {} {} TCG, {} flooding guests + 1 healthy, windows of {:.0} s, heartbeat every {:.0} ms",
            self.qemu, self.machine, self.floods, self.window_s, self.interval_ms
        )?;
        writeln!(f, "{:<40} {:>10} {:>10}", "", "baseline", "flood")?;
        let (b, l) = (&self.baseline, &self.flood);
        let rows: [(&str, f64, f64, usize); 10] = [
            ("service CPU (% of a core)", b.cpu_pct, l.cpu_pct, 1),
            ("service RSS (MiB)", b.rss_mib, l.rss_mib, 1),
            ("service peak RSS (MiB)", b.hwm_mib, l.hwm_mib, 1),
            ("healthy VM heartbeats seen", b.heartbeats as f64, l.heartbeats as f64, 0),
            ("healthy VM heartbeat p50 (ms)", b.p50_ms, l.p50_ms, 2),
            ("healthy VM heartbeat p99 (ms)", b.p99_ms, l.p99_ms, 2),
            ("healthy VM heartbeat max (ms)", b.max_ms, l.max_ms, 2),
            ("healthy VM misses", b.misses as f64, l.misses as f64, 0),
            (
                "flooding consoles: received (KB/s)",
                b.console_received_per_s / 1e3,
                l.console_received_per_s / 1e3,
                1,
            ),
            (
                "flooding consoles: dropped (KB/s)",
                b.console_dropped_per_s / 1e3,
                l.console_dropped_per_s / 1e3,
                1,
            ),
        ];
        for (name, x, y, prec) in rows {
            writeln!(f, "{name:<40} {x:>10.prec$} {y:>10.prec$}")?;
        }
        writeln!(
            f,
            "{:<40} {:>10.1} {:>10.1}",
            "flooding consoles: reads/s", b.console_reads_per_s, l.console_reads_per_s
        )?;
        writeln!(
            f,
            "flood cost: {:+.1} % of a core (bound {MAX_COST_PCT} %); healthy p99 ×{:.2} (bound ×{MAX_P99_RATIO})",
            self.cost_pct, self.p99_ratio
        )?;
        writeln!(f, "files: {}", self.work.display())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FloodError {
    #[error(transparent)]
    Service(#[from] ScaleError),
    #[error(transparent)]
    Prepare(#[from] acpimon::launch::PrepareError),
    #[error(transparent)]
    Vm(#[from] acpimon::launch::VmError),
    #[error("cannot write {path}: {source}; check that the scratch directory is writable")]
    Work { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Wait(String),
}

/// Runs the benchmark; `progress` gets one line per step.
pub async fn run(opts: &FloodOptions, progress: impl Fn(&str)) -> Result<FloodReport, FloodError> {
    let dir = opts.work.join(format!("run-{}", std::process::id()));
    let state_dir = dir.join("state");
    let data_dir = dir.join("data");
    for d in [&state_dir, &data_dir] {
        std::fs::create_dir_all(d).map_err(|source| FloodError::Work { path: d.clone(), source })?;
    }
    let mut vms = Vec::new();
    let result = measure(opts, &dir, &state_dir, &data_dir, &mut vms, &progress).await;
    for vm in &mut vms {
        let _ = vm.shutdown().await;
    }
    result
}

/// acpimon's launch of the test guest `name` in `state_dir`, its sockets left to the service,
/// booted with `acpimon.scenario=scenario` (starting 1 s after it is ready).
pub(crate) fn guest_spec(
    guest: &Path,
    machine: &str,
    state_dir: &Path,
    name: &str,
    scenario: &str,
) -> Result<VmSpec, FloodError> {
    let prepared = launch::prepare(state_dir, name, &SsdtConfig::default())?;
    let mut args = acpimon::demo::guest_args(guest, machine, false);
    if let Some(a) = args.iter_mut().find(|a| a.starts_with("console=ttyS0")) {
        *a = format!("console=ttyS0 acpimon.scenario={scenario} acpimon.delay=1");
    }
    Ok(VmSpec {
        program: "qemu-system-x86_64".into(),
        args,
        prepared,
        readconfig: false,
        leave_to_watch: true,
        console_chardev: None,
    })
}

async fn launch_guest(
    opts: &FloodOptions,
    state_dir: &Path,
    name: &str,
    scenario: &str,
) -> Result<Vm, FloodError> {
    Ok(Vm::launch(guest_spec(&opts.guest, &opts.machine, state_dir, name, scenario)?).await?)
}

async fn measure(
    opts: &FloodOptions,
    dir: &Path,
    state_dir: &Path,
    data_dir: &Path,
    vms: &mut Vec<Vm>,
    progress: &impl Fn(&str),
) -> Result<FloodReport, FloodError> {
    let config = dir.join("acpimon.toml");
    std::fs::write(&config, config_text(state_dir, data_dir))
        .map_err(|source| FloodError::Work { path: config.clone(), source })?;
    progress("launching the healthy guest and the service");
    vms.push(launch_guest(opts, state_dir, HEALTHY, "healthy").await?);
    let v = vms[0].qmp.version;
    let qemu = format!("{}.{}.{}", v.0, v.1, v.2);
    let mut service = Service::start(&opts.service, &config, &dir.join("service.log")).await?;
    wait_healthy(&mut service, 1).await?;
    tokio::time::sleep(SETTLE).await;
    progress(&format!("baseline: {} s", opts.window.as_secs()));
    let baseline = window(&mut service, opts.window).await?;
    progress(&format!("launching {} flooding guests", opts.floods));
    for i in 0..opts.floods {
        vms.push(launch_guest(opts, state_dir, &format!("flood-{i}"), "flood").await?);
    }
    wait_healthy(&mut service, 1 + opts.floods).await?;
    tokio::time::sleep(SETTLE).await;
    progress(&format!("flood: {} s", opts.window.as_secs()));
    let flood = window(&mut service, opts.window).await?;
    service.stop().await?;
    let cost_pct = flood.cpu_pct - baseline.cpu_pct;
    let p99_ratio = if baseline.p99_ms > 0.0 { flood.p99_ms / baseline.p99_ms } else { f64::INFINITY };
    Ok(FloodReport {
        qemu,
        machine: opts.machine.clone(),
        floods: opts.floods,
        window_s: opts.window.as_secs_f64(),
        interval_ms: INTERVAL.as_secs_f64() * 1e3,
        baseline,
        flood,
        cost_pct,
        p99_ratio,
        work: dir.into(),
    })
}

pub(crate) async fn wait_healthy(service: &mut Service, n: usize) -> Result<(), FloodError> {
    let deadline = Instant::now() + BOOT_WAIT;
    loop {
        let s = service.status().await?;
        let healthy = s.vms.iter().filter(|v| v.state == State::Healthy).count();
        if healthy >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let states: Vec<String> =
                s.vms.iter().map(|v| format!("{} {}", v.name, v.state.name())).collect();
            return Err(FloodError::Wait(format!(
                "after {} s only {healthy} of {n} VMs are healthy ({}); see the service's output in the scratch directory",
                BOOT_WAIT.as_secs(),
                states.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The healthy VM's heartbeat scenario: (answers, misses, last latency).
fn healthy_heartbeat(s: &StatusView) -> Option<(u64, u64, Option<f64>)> {
    let v = s.vms.iter().find(|v| v.name == HEALTHY)?;
    let sc = v.scenarios.iter().find(|sc| sc.kind == "acpi-heartbeat")?;
    Some((sc.answers_total, sc.misses_total, sc.last_latency_ms))
}

/// The flooding VMs' console counts summed.
fn flood_console(s: &StatusView) -> acpimon::console::ConsoleCounts {
    s.vms
        .iter()
        .filter(|v| v.name != HEALTHY)
        .filter_map(|v| v.console)
        .fold(Default::default(), |a, c| a + c)
}

pub(crate) async fn window(service: &mut Service, length: Duration) -> Result<Window, FloodError> {
    let pid = service.child.id();
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    let s0 = service.status().await?;
    let c0 = flood_console(&s0);
    let (cpu0, t0) = (proc_cpu(&stat)?, Instant::now());
    let (mut answers, misses0, _) = healthy_heartbeat(&s0).unwrap_or_default();
    let mut lat = Vec::new();
    let mut last = s0;
    while t0.elapsed() < length {
        tokio::time::sleep(POLL).await;
        last = service.status().await?;
        if let Some((a, _, l)) = healthy_heartbeat(&last) {
            // One new answer since the last poll: its latency is the latest one.
            if a == answers + 1 {
                lat.extend(l);
            }
            answers = a;
        }
    }
    let (cpu1, t1) = (proc_cpu(&stat)?, Instant::now());
    let secs = t1.duration_since(t0).as_secs_f64();
    let status = read_proc(&PathBuf::from(format!("/proc/{pid}/status")))?;
    let c1 = flood_console(&last);
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    let misses1 = healthy_heartbeat(&last).map_or(0, |h| h.1);
    Ok(Window {
        cpu_pct: (cpu1 - cpu0) as f64 / clock_ticks() as f64 / secs * 100.0,
        rss_mib: status_kib(&status, "VmRSS").unwrap_or(0) as f64 / 1024.0,
        hwm_mib: status_kib(&status, "VmHWM").unwrap_or(0) as f64 / 1024.0,
        heartbeats: lat.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        misses: misses1.saturating_sub(misses0),
        console_received_per_s: c1.received.saturating_sub(c0.received) as f64 / secs,
        console_kept_per_s: c1.kept.saturating_sub(c0.kept) as f64 / secs,
        console_dropped_per_s: c1.dropped.saturating_sub(c0.dropped) as f64 / secs,
        console_reads_per_s: c1.reads.saturating_sub(c0.reads) as f64 / secs,
    })
}

/// The healthy VM's heartbeat every [`INTERVAL`] (enough latencies for a p99 in the window);
/// the flooding VMs' at the service's default (1 s): a flooding TCG guest answers late, and
/// each late answer costs the service more polls of the region, which is the heartbeat's cost
/// of a slow guest, not the console's.
fn config_text(state_dir: &Path, data_dir: &Path) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    format!(
        "# Written by acpimon-bench flood.\n\
         state_dir = {}\n\
         data_dir = {}\n\
         node = \"bench-flood\"\n\
         discover_interval = \"500ms\"\n\
         \n\
         [metrics]\n\
         listen = \"127.0.0.1:0\"\n\
         \n\
         [defaults]\n\
         startup_grace = \"60s\"\n\
         \n\
         [[defaults.scenario]]\n\
         kind = \"acpi-heartbeat\"\n\
         interval = \"1s\"\n\
         timeout = \"1s\"\n\
         threshold = 3\n\
         \n\
         [[defaults.diagnostic]]\n\
         step = \"qmp-status\"\n\
         \n\
         [vm.{HEALTHY}]\n\
         [[vm.{HEALTHY}.scenario]]\n\
         kind = \"acpi-heartbeat\"\n\
         interval = \"{}ms\"\n\
         timeout = \"1s\"\n\
         threshold = 3\n",
        quote(state_dir),
        quote(data_dir),
        INTERVAL.as_millis(),
    )
}
