//! `acpimon watch`: the node-side service. It discovers the VMs `acpimon prepare` set up,
//! runs each VM's monitoring scenarios ([`probe`]), moves each VM through its
//! [`state::State`]s, runs diagnostics on failures, and forwards events to the controller.
//!
//! Stages, as the service starts: configuration (validated before anything else), the
//! forwarder (its spool recovered), the metrics/status endpoint, then discovery, which starts
//! one [`monitor::Monitor`] task per VM. Every task is supervised: one that ends unexpectedly
//! (a panic) is reported and restarted; none can hold up another.

pub mod bundles;
pub mod config;
pub mod kernel;
pub mod kfollow;
pub mod liveness;
pub mod lock;
pub mod metrics;
pub mod monitor;
pub mod persist;
pub mod probe;
pub mod state;
pub mod vcpus;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use self::config::Config;
pub use self::liveness::Liveness;
use self::metrics::Registry;
use self::monitor::{Monitor, Shared, Stop};
use crate::event::{self, Event, EventKind};
use crate::forward::{self, ForwardConfig, Forwarder};
use crate::launch::prepare::DESCRIPTOR;

/// How often the host sampler reads every VM's vCPU threads ([`crate::host::sampler`]).
const HOST_SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// How long stopping may take before the service says what it is still waiting for.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot create {path}: {source}; check the permissions of data_dir in the configuration")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot read the state directory {path}: {source}; create it, or run `acpimon prepare` first")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Forward(#[from] forward::ForwardError),
    #[error("{0}")]
    Metrics(String),
}

struct Running {
    stop: watch::Sender<Stop>,
    task: JoinHandle<()>,
    dir: PathBuf,
}

/// What the end of the event log says that the state files may not.
#[derive(Default)]
struct Recovered {
    logged: std::collections::HashMap<u64, u64>,
    bundled: std::collections::HashSet<String>,
}

/// Reads the end of the event log before any VM is watched: the highest key sequence per VM
/// epoch (so no logged key is given to another event), and puts back in the spool the events
/// the log holds but the spool may not (the service died, or a full disk refused the spool
/// entry, in between).
async fn recover_log(config: &Config, forwarder: &Forwarder) -> Recovered {
    let Some(log) = config.event_log.clone() else { return Default::default() };
    let vms = config.data_dir.join("vms");
    let fw = forwarder.clone();
    let scan = tokio::task::spawn_blocking(move || {
        let tail = persist::log_tail(&log)?;
        let spooled = fw.spooled_keys();
        let mut respooled = 0;
        for l in persist::unacknowledged(&tail, &vms).into_iter().filter(|l| !spooled.contains(&l.key)) {
            match fw.respool(l.line.clone(), l.time.clone()) {
                Ok(()) => respooled += 1,
                Err(e) => {
                    tracing::error!("event {} is in the log but cannot be put in the spool: {e}", l.key)
                }
            }
        }
        if respooled > 0 {
            tracing::warn!("{respooled} events of the log were not in the spool (the service stopped between the two); spooled again");
        }
        Ok::<_, std::io::Error>(Recovered {
            logged: persist::logged_sequences(&tail),
            bundled: persist::bundled_incidents(&tail),
        })
    });
    scan.await.expect("the log scan does not panic").unwrap_or_else(|e| {
        tracing::warn!(
            "cannot read the event log's end ({e}): a VM whose state file lags behind it may reuse a key"
        );
        Default::default()
    })
}

/// Runs the service until `shutdown` turns true. `ready` receives the metrics address once
/// the service is up (tests bind port 0).
pub async fn serve(
    config: Config,
    mut shutdown: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<Option<std::net::SocketAddr>>>,
) -> Result<(), WatchError> {
    let config = Arc::new(config);
    for dir in [&config.data_dir, &config.data_dir.join("vms")] {
        std::fs::create_dir_all(dir).map_err(|source| WatchError::DataDir { path: dir.clone(), source })?;
    }
    // Before anything reads or writes the data directory (the spool's recovery first); held
    // until `serve` returns.
    let _lock = lock::DataDirLock::acquire(&config.data_dir)?;
    std::fs::read_dir(&config.state_dir)
        .map_err(|source| WatchError::StateDir { path: config.state_dir.clone(), source })?;
    let (forwarder, forward_task) = Forwarder::open(forward_config(&config))?;
    let (stop_all_tx, stop_all) = watch::channel(false);
    let forward_join = tokio::spawn(forward_task.run(stop_all.clone()));

    let liveness = Arc::new(Liveness::default());
    let open_files = raise_open_files();
    // The sampler keeps its /proc files open within a quarter of the limit; the VMs' sockets
    // (about 3 per VM: QMP, console, doorbell) need the rest.
    crate::host::proc::set_kept_limit(usize::try_from(open_files / 4).unwrap_or(usize::MAX));
    let sampler = crate::host::sampler::Sampler::start(HOST_SAMPLE_PERIOD);
    let registry = Arc::new(
        Registry::new(
            config.node.clone(),
            config.state_dir.display().to_string(),
            forwarder.clone(),
            liveness.clone(),
        )
        .with_sampler(sampler.clone()),
    );
    let metrics_addr = match config.metrics {
        Some(addr) => {
            let listener = metrics::bind(addr).await.map_err(WatchError::Metrics)?;
            let local = listener.local_addr().ok();
            tokio::spawn(metrics::serve(listener, registry.clone(), stop_all.clone()));
            local
        }
        None => None,
    };
    let Recovered { logged, bundled } = recover_log(&config, &forwarder).await;
    let shared = Arc::new(Shared {
        config: config.clone(),
        sampler,
        forward: forwarder.clone(),
        registry,
        liveness,
        logged,
        bundled,
        bundle_slots: bundles::BundleSlots::new(config.bundles_concurrent),
    });
    service_event(
        &shared,
        EventKind::ServiceStarted(event::ServiceStarted {
            version: env!("CARGO_PKG_VERSION").into(),
            state_dir: config.state_dir.clone(),
            metrics: metrics_addr,
        }),
    );
    let notifier = liveness::Notifier::from_env();
    notifier.notify(&format!("READY=1\nSTATUS=watching {}", config.state_dir.display()));
    tracing::info!(
        "acpimon watch: watching {}{}",
        config.state_dir.display(),
        metrics_addr.map(|a| format!(", metrics and status on http://{a}")).unwrap_or_default()
    );
    if let Some(r) = ready {
        let _ = r.send(metrics_addr);
    }

    shared.liveness.register("discovery", config.discover_interval * 3 + Duration::from_secs(5));
    let mut vms: BTreeMap<String, Running> = BTreeMap::new();
    let mut invalid: BTreeMap<String, String> = BTreeMap::new();
    let mut discover = tokio::time::interval(config.discover_interval);
    let mut pulse = tokio::time::interval(
        notifier.watchdog_every.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1)),
    );
    loop {
        tokio::select! {
            _ = discover.tick() => {
                discover_once(&shared, &mut vms, &mut invalid);
                shared.liveness.beat("discovery");
            }
            _ = pulse.tick() => {
                let stalled = shared.liveness.stalled();
                // Events lost to a full disk are reported once it takes writes again.
                if let Some(loss) = shared.forward.take_loss() {
                    service_event(
                        &shared,
                        EventKind::EventsLost(event::EventsLost {
                            count: loss.count,
                            first: loss.first,
                            last: loss.last,
                            reason: "the disk refused writes and the events held in memory reached \
                                     event_hold_max / event_hold_max_events"
                                .into(),
                        }),
                    );
                }
                if stalled.is_empty() {
                    // A full disk is its own condition: the service still works (the watchdog is
                    // fed: a restart would only lose what is held) but holds or loses events.
                    let status = shared
                        .forward
                        .stats()
                        .disk_condition()
                        .unwrap_or_else(|| format!("watching {} VMs", vms.len()));
                    notifier.notify(&format!("WATCHDOG=1\nSTATUS={status}"));
                    if let Some(p) = &config.touch_file {
                        if let Err(e) = liveness::touch(p) {
                            tracing::warn!(path = %p.display(), error = %e, "cannot touch the liveness file");
                        }
                    }
                } else {
                    notifier.notify(&format!("STATUS=stalled: {}", stalled.join(", ")));
                }
            }
            _ = until_true(&mut shutdown) => break,
        }
    }

    notifier.notify("STOPPING=1");
    for r in vms.values() {
        let _ = r.stop.send(Stop::Shutdown);
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    for (name, r) in vms {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, r.task).await.is_err() {
            tracing::warn!(vm = %name, "stopping: the monitor did not stop within {}; leaving it", crate::units::format_duration(STOP_DEADLINE));
        }
    }
    // The monitors' last events and state files are queued: wait until they are on disk.
    if tokio::time::timeout(STOP_DEADLINE, forwarder.flushed()).await.is_err() {
        tracing::warn!(
            "stopping: the event writer did not finish within {}; the last events may be lost",
            crate::units::format_duration(STOP_DEADLINE)
        );
    }
    let _ = stop_all_tx.send(true);
    if tokio::time::timeout(STOP_DEADLINE, forward_join).await.is_err() {
        tracing::warn!("stopping: the forwarder did not stop in time; its spool is kept for the next start");
    }
    tracing::info!("acpimon watch: stopped");
    Ok(())
}

pub use crate::util::until_true;

/// Raises the open-file soft limit to the hard limit (each watched VM holds about 3
/// descriptors: its QMP, console and doorbell connections) and returns the soft limit in force.
/// The hard limit is the administrator's: `LimitNOFILE=` in the systemd unit, `ulimit -Hn` as
/// root.
fn raise_open_files() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(u64::MAX);
    match now.maximum {
        Some(hard) if hard > soft => {
            let raised = rustix::process::Rlimit { current: Some(hard), maximum: Some(hard) };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::info!(
                        "open-file limit raised from {soft} to the hard limit {hard} (about {} VMs)",
                        hard / 4
                    );
                    hard
                }
                Err(e) => {
                    tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}; about {} VMs can be watched", soft / 4);
                    soft
                }
            }
        }
        None => u64::MAX,
        Some(_) => soft,
    }
}

fn forward_config(c: &Config) -> ForwardConfig {
    ForwardConfig {
        log: c.event_log.clone(),
        spool_dir: c.data_dir.join("spool"),
        controller: c.controller.clone(),
        hook: c.hook.clone(),
        hold: c.event_hold,
    }
}

/// An event of the service itself (not of one VM).
fn service_event(shared: &Shared, kind: EventKind) {
    let ev = Event::new(event::new_key(), &shared.config.node, None, kind);
    if let Err(e) = shared.forward.submit(&ev) {
        tracing::error!(kind = ev.kind.name(), error = %e, "event not forwarded");
    }
}

/// The VM directories under `state_dir`: NAME → DIR for every NAME/vm.json.
pub fn scan(state_dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(state_dir) else { return found };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        if crate::launch::prepare::valid_name(&name) && dir.join(DESCRIPTOR).is_file() {
            found.insert(name, dir);
        }
    }
    found
}

/// Starts monitors for new VMs, stops those whose directory went away, restarts any that
/// ended on their own.
fn discover_once(
    shared: &Arc<Shared>,
    vms: &mut BTreeMap<String, Running>,
    invalid: &mut BTreeMap<String, String>,
) {
    let found = scan(&shared.config.state_dir);
    vms.retain(|name, r| {
        if found.get(name) == Some(&r.dir) {
            return true;
        }
        let _ = r.stop.send(Stop::Removed);
        tracing::info!(vm = %name, "its directory is gone; no longer watched");
        false
    });
    invalid.retain(|name, _| found.contains_key(name));
    for (name, dir) in found {
        if let Some(r) = vms.get(&name) {
            if !r.task.is_finished() {
                continue;
            }
            tracing::error!(vm = %name, "the monitor stopped unexpectedly; restarting it");
        }
        let settings = shared.config.settings_for(&name).clone();
        if !settings.enabled {
            continue;
        }
        if let Err(e) = crate::launch::Descriptor::load(&dir) {
            let why = e.to_string();
            if invalid.get(&name) != Some(&why) {
                tracing::warn!(vm = %name, "not watched: {why}");
                let detail = event::VmInvalid { dir: dir.clone(), error: why.clone() };
                service_event(shared, EventKind::VmInvalid(detail));
                invalid.insert(name.clone(), why);
            }
            continue;
        }
        invalid.remove(&name);
        let (stop, stop_rx) = watch::channel(Stop::Run);
        // Every line of this VM's monitor, and of the tasks it starts, carries vm=NAME.
        let span = tracing::info_span!("vm", vm = %name);
        let monitor = span.in_scope(|| Monitor::new(name.clone(), dir.clone(), settings, shared.clone()));
        let task = tokio::spawn(monitor.run(stop_rx).instrument(span));
        tracing::info!(vm = %name, "watching {}", dir.display());
        vms.insert(name, Running { stop, task, dir });
    }
}
