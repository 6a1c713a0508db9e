//! `acpimon demo`: the whole path on the built-in test guest. A reference controller, the
//! guest launched as EVE launches (paused, its QMP and console left to the service), and
//! `acpimon watch` over it, all in this process; the service's own log lines show every
//! transition live. With `--hang-at`, the demo stops the guest's vCPUs to show a hang being
//! detected, diagnosed, delivered, and recovered from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::controller::{self, ControllerOptions};
use crate::forward::ControllerConfig;
use crate::generate::SsdtConfig;
use crate::launch::{prepare, Vm, VmError, VmSpec};
use crate::run::Summary;
use crate::watch::config::Config;
use crate::watch::metrics::{fetch_status, ScenarioView, StatusView, VmView};
use crate::watch::state::State;

const NAME: &str = "demo";
/// Where the demo's controller serves its pages, when the port is free.
const CONTROLLER_PORT: u16 = 8080;
/// The scenario whose latencies the summary reports.
const HEARTBEAT: &str = "acpi-heartbeat";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Fixture(String),
    #[error(transparent)]
    Prepare(#[from] crate::launch::PrepareError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error(transparent)]
    Controller(#[from] controller::ControllerError),
    #[error("{0}")]
    Expectation(String),
}

pub struct DemoOptions {
    /// The test guest's directory (kernel and initrd).
    pub guest: PathBuf,
    pub state_dir: PathBuf,
    pub machine: String,
    pub ovmf: bool,
    /// Stop after this long; otherwise run until `shutdown`.
    pub duration: Option<Duration>,
    /// Stop the guest's vCPUs this long after it is healthy, then resume it once the bundle
    /// is written.
    pub hang_at: Option<Duration>,
}

/// The test guest's QEMU arguments: its kernel and initrd from `guest`, the directory
/// `qemu-fixtures/build-guest` prints (found at run time, so an installed binary works too).
pub fn guest_args(guest: &Path, machine: &str, ovmf: bool) -> Vec<String> {
    let mut args: Vec<String> =
        ["-M", machine, "-m", "256", "-nodefaults", "-display", "none"].map(String::from).to_vec();
    let kernel = if ovmf {
        // Debian's OVMF 2022.11 needs a distrusted phys-bits to honour the low-BAR knob.
        args.extend(["-bios", "/usr/share/ovmf/OVMF.fd", "-cpu", "qemu64,phys-bits=37"].map(String::from));
        "vmlinuz"
    } else {
        "vmlinux"
    };
    let file = |name: &str| guest.join(name).to_string_lossy().into_owned();
    args.extend([
        "-kernel".into(),
        file(kernel),
        "-initrd".into(),
        file("initrd.img"),
        "-append".into(),
        "console=ttyS0 acpimon.scenario=healthy".into(),
    ]);
    args
}

fn say(msg: &str) {
    println!("{} demo: {msg}", crate::units::now_rfc3339());
}

/// Runs the demo; with `duration`, fails unless everything it showed happened.
pub async fn run(opts: DemoOptions, mut shutdown: watch::Receiver<bool>) -> Result<(), DemoError> {
    for file in [if opts.ovmf { "vmlinuz" } else { "vmlinux" }, "initrd.img"] {
        if !opts.guest.join(file).is_file() {
            return Err(DemoError::Fixture(format!(
                "{} has no {file}; pass the directory qemu-fixtures/build-guest prints",
                opts.guest.display()
            )));
        }
    }
    let mut args = guest_args(&opts.guest, &opts.machine, opts.ovmf);
    // Created paused, as EVE does, so the service sees the console from the first line.
    args.push("-S".into());
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(|e| DemoError::Expectation(format!("cannot create {}: {e}", opts.state_dir.display())))?;
    let prepared = prepare(&opts.state_dir, NAME, &SsdtConfig::default())?;

    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let store = opts.state_dir.join(".controller");
    // The pages at a port a person can type (8080), else at any free one.
    let mut ctl = None;
    let mut ready_tx = Some(ready_tx);
    let mut ready = Some(ready);
    for listen in [CONTROLLER_PORT, 0] {
        let (tx, rx) = match (ready_tx.take(), ready.take()) {
            (Some(tx), Some(rx)) => (tx, rx),
            _ => tokio::sync::oneshot::channel(),
        };
        let ctl_opts = ControllerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            store: store.clone(),
            database: None,
            analyzer: None,
            analyzer_timeout: Duration::from_secs(10),
            tls: None,
            tokens: None,
        };
        let task = tokio::spawn(controller::serve(ctl_opts, stop.clone(), Some(tx)));
        match rx.await {
            Ok(addr) => {
                ctl = Some((task, addr));
                break;
            }
            Err(_) => {
                let why = task.await.map(|r| r.err().map(|e| e.to_string())).ok().flatten();
                say(&format!(
                    "the controller cannot use port {listen} ({}); trying another",
                    why.unwrap_or_default()
                ));
            }
        }
    }
    let (ctl, ctl_addr) = ctl.ok_or_else(|| DemoError::Expectation("the controller did not start".into()))?;
    say(&format!(
        "reference controller on http://{ctl_addr}, storing into {}; open http://{ctl_addr}/ in a browser: the fleet, the VM, its incidents",
        store.display()
    ));

    let spec = VmSpec {
        program: "qemu-system-x86_64".into(),
        args,
        prepared,
        readconfig: false,
        leave_to_watch: true,
        console_chardev: None,
    };
    let mut vm = Vm::launch(spec).await?;
    say(&format!(
        "QEMU {}.{}.{} started paused; its QMP and console are left to the service",
        vm.qmp.version.0, vm.qmp.version.1, vm.qmp.version.2
    ));

    let mut config = Config::builtin(opts.state_dir.clone());
    config.metrics = Some("127.0.0.1:0".parse().expect("valid address"));
    config.controller = Some(ControllerConfig {
        url: format!("http://{ctl_addr}"),
        timeout: Duration::from_secs(5),
        spool_max_bytes: 64 << 20,
        spool_max_events: 100_000,
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        ca_file: None,
        client_cert: None,
        client_key: None,
        token_file: None,
    });
    let (svc_ready_tx, svc_ready) = tokio::sync::oneshot::channel();
    let service = tokio::spawn(crate::watch::serve(config, stop.clone(), Some(svc_ready_tx)));
    let addr = svc_ready
        .await
        .ok()
        .flatten()
        .ok_or_else(|| DemoError::Expectation("the service did not start".into()))?;
    say(&format!("acpimon watch is up; in another terminal: acpimon status --addr {addr}"));

    let sampler = tokio::spawn(sample_latencies(addr, stop.clone()));
    let outcome = drive(&opts, &vm, addr, ctl_addr, &mut shutdown).await;
    let status = fetch_status(addr, Duration::from_secs(5)).await.ok();
    let _ = stop_tx.send(true);
    let latencies = sampler.await.unwrap_or_default();
    let _ = service.await;
    let _ = ctl.await;
    let _ = vm.shutdown().await;
    // The controller has stopped: its store is ours to read.
    let stored =
        match controller::store::Store::open(&controller::store::Backend::Sqlite(store.clone())).await {
            Ok(st) => st.counts().await.map(|c| c.stored).unwrap_or(0),
            Err(_) => 0,
        };
    if let Some(s) = &status {
        summary(s, stored, &latencies);
    }
    outcome
}

/// The heartbeat latencies the service measured, read from `/status` as they come.
#[derive(Debug, Default)]
struct Latencies {
    /// Each answer's latency (ms), as the service measured it.
    ms: Vec<f64>,
    /// Answers whose latency was overwritten by the next before it was read.
    unseen: u64,
}

/// Polls the demo VM's heartbeat several times per interval until `stop`, keeping the
/// latency of every new answer (`/status` shows the last one).
async fn sample_latencies(addr: SocketAddr, mut stop: watch::Receiver<bool>) -> Latencies {
    let mut out = Latencies::default();
    let mut answers = 0u64;
    loop {
        if let Some(hb) = view(addr).await.and_then(|v| v.scenarios.into_iter().find(|s| s.kind == HEARTBEAT))
        {
            if hb.answers_total > answers {
                if let Some(ms) = hb.last_latency_ms {
                    out.ms.push(ms);
                    out.unseen += hb.answers_total - answers - 1;
                }
                answers = hb.answers_total;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = crate::watch::until_true(&mut stop) => return out,
        }
    }
}

async fn view(addr: SocketAddr) -> Option<VmView> {
    fetch_status(addr, Duration::from_secs(5)).await.ok()?.vms.into_iter().find(|v| v.name == NAME)
}

/// Waits until the demo VM satisfies `pred`, or `timeout`, or shutdown.
async fn until(
    addr: SocketAddr,
    timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
    pred: impl Fn(&VmView) -> bool,
) -> Option<VmView> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = view(addr).await {
            if pred(&v) {
                return Some(v);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = crate::watch::until_true(shutdown) => return None,
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

async fn drive(
    opts: &DemoOptions,
    vm: &Vm,
    addr: SocketAddr,
    ctl_addr: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), DemoError> {
    let fail = |what: &str| Err(DemoError::Expectation(format!("the demo VM {what}")));
    let start = Instant::now();
    if until(addr, Duration::from_secs(30), shutdown, |v| v.state == State::Paused).await.is_none() {
        return fail("was not attached within 30 s");
    }
    let cont = || vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5));
    cont().await.map_err(VmError::from)?;
    say("resumed the VM (QMP cont): it boots now");
    if until(addr, Duration::from_secs(120), shutdown, |v| v.state == State::Healthy).await.is_none() {
        return fail("did not become healthy within 120 s");
    }
    let healthy_at = Instant::now();
    let end = opts.duration.map(|d| start + d);
    let mut hang = opts.hang_at.map(|h| healthy_at + h);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = crate::watch::until_true(shutdown) => return Ok(()),
        }
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            return Ok(());
        }
        if let Some(v) = view(addr).await {
            let hb = v.scenarios.iter().find(|s| s.kind == HEARTBEAT);
            say(&format!(
                "{} · heartbeat {} · {} answered, {} missed",
                v.state,
                hb.and_then(|h| h.last_latency_ms).map_or("-".into(), |l| format!("{l:.2} ms")),
                hb.map_or(0, |h| h.answers_total),
                hb.map_or(0, |h| h.misses_total)
            ));
        }
        if hang.is_some_and(|h| now >= h) {
            hang = None;
            say("stopping the VM's vCPUs (QMP stop) to show a hang being caught");
            vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.map_err(VmError::from)?;
            let Some(v) = until(addr, Duration::from_secs(90), shutdown, |v| v.last_bundle.is_some()).await
            else {
                return fail("hang was not diagnosed within 90 s");
            };
            say(&format!("bundle: {}", v.last_bundle.clone().unwrap_or_default()));
            if let Some(verdict) = &v.last_verdict {
                say(&format!("verdict {}: {}", verdict.class, verdict.headline));
                // What the host saw beside it: the QEMU process, its vCPU threads, the node.
                for e in verdict.evidence.iter().filter(|e| e.source.ends_with("-host.json")).take(5) {
                    say(&format!("  evidence ({}): {}", e.source, e.line));
                }
            }
            if let Ok(status) = fetch_status(addr, Duration::from_secs(5)).await {
                say(&format!(
                    "the incident in the controller's pages: http://{ctl_addr}/vm/{}/{NAME} (its verdict, evidence, timeline and steps one click further)",
                    crate::controller::web::seg(&status.node)
                ));
            }
            cont().await.map_err(VmError::from)?;
            say("resumed the VM (QMP cont)");
            if until(addr, Duration::from_secs(30), shutdown, |v| v.state == State::Healthy).await.is_none() {
                return fail("did not recover within 30 s");
            }
        }
    }
}

fn summary(s: &StatusView, stored: u64, latencies: &Latencies) {
    let f = &s.forward;
    println!(
        "summary: events delivered {} (stored by the controller: {stored}), pending {}; the event log is {}",
        f.delivered,
        f.pending_events,
        Path::new(&s.state_dir).join(".watch/events.jsonl").display()
    );
    for v in &s.vms {
        for sc in &v.scenarios {
            if v.name == NAME && sc.kind == HEARTBEAT {
                println!("summary: {} {}: {}", v.name, sc.name, heartbeat_line(sc, latencies));
                continue;
            }
            println!(
                "summary: {} {}: {} answered, {} missed, last {}",
                v.name,
                sc.name,
                sc.answers_total,
                sc.misses_total,
                sc.last_latency_ms.map_or("-".into(), |l| format!("{l:.2} ms"))
            );
        }
        if let Some(b) = &v.last_bundle {
            println!("summary: {} last bundle {b}", v.name);
        }
    }
}

/// "N answered, M missed, latency p50 X ms, p99 Y ms (K measured)".
fn heartbeat_line(sc: &ScenarioView, latencies: &Latencies) -> String {
    let counts = format!("{} answered, {} missed", sc.answers_total, sc.misses_total);
    if latencies.ms.is_empty() {
        return format!("{counts}, latency -");
    }
    let n = latencies.ms.len() as u64;
    let p = Summary::from_latencies(latencies.ms.clone(), n, 0, 0);
    let unseen = match latencies.unseen {
        0 => String::new(),
        u => format!("; {u} answered between two reads"),
    };
    format!("{counts}, latency p50 {:.2} ms, p99 {:.2} ms ({n} measured{unseen})", p.p50_ms, p.p99_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_summary_has_counts_and_percentiles() {
        let sc = ScenarioView { answers_total: 102, misses_total: 3, ..Default::default() };
        let lat = Latencies { ms: (1..=100).map(f64::from).collect(), unseen: 2 };
        assert_eq!(
            heartbeat_line(&sc, &lat),
            "102 answered, 3 missed, latency p50 51.00 ms, p99 99.00 ms (100 measured; 2 answered between two reads)"
        );
        let none = Latencies::default();
        assert_eq!(heartbeat_line(&sc, &none), "102 answered, 3 missed, latency -");
    }
}
