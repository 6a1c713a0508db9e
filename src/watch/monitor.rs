//! One VM's monitor: attaches to its QEMU (QMP, console, region), runs its scenarios, feeds
//! the [`Machine`], emits every transition as an event, runs diagnostics and recovery on
//! failures, and re-attaches when QEMU comes back. Each VM has its own task; nothing here
//! waits on another VM or on the controller.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::config::{BundleBudget, Config, RecoveryAction, VmSettings};
use super::kernel::Action;
use super::metrics::{Registry, ScenarioView, VmView};
use super::persist::{self, Memory};
use super::probe::{self, Channels, Report};
use super::state::{Evidence, Machine, State, Track, Transition};
use super::Liveness;
use crate::abi::AppStatus;
use crate::app::{self, AppChannel};
use crate::console::Console;
use crate::diagnose;
use crate::event::{self, AppSource, Event, EventKind, Incident, RebootEvidence, ReportSource};
use crate::forward::Forwarder;
use crate::host::devices::{self, Coalescer, DeviceHistory};
use crate::host::IoError;
use crate::judge::{Reboot, Tracker};
use crate::launch::channel::{self, Channel};
use crate::launch::Descriptor;
use crate::read::{Access, Region};
use crate::sentinel::{KernelReport, ReportClass, Scanner};
use crate::trigger::qmp::{EventKind as QmpEventKind, Qmp, QmpEvent};
use crate::trigger::Completion;
use crate::units::now_rfc3339;
use crate::util::lock;

/// How long attaching to a socket may take before the VM counts as not running.
const ATTACH_WAIT: Duration = Duration::from_secs(3);
/// Recent events kept for a bundle's timeline.
const TIMELINE: usize = 64;
/// How often QEMU's run state is polled while the VM runs; while it does not (gone after a
/// power-off, paused) and after a reset, it is polled every second. Events say the same, but a
/// reset of a stopped VM (QEMU goes to prelaunch) has no event of its own.
const STATUS_EVERY: u32 = 10;
/// For this long after QEMU went away, its socket is tried every [`RELAUNCH_RETRY`] (or every
/// `discover_interval` if shorter), so that a QEMU relaunched and killed again within a second
/// is still attached to, and counted as a relaunch.
const RELAUNCH_WATCH: Duration = Duration::from_secs(10);
const RELAUNCH_RETRY: Duration = Duration::from_millis(100);
/// The kernel reports kept for the VM's verdicts (newest last).
const RECENT_REPORTS: usize = 16;
/// A report still being printed ends when the console has been quiet this long.
const REPORT_QUIET: Duration = Duration::from_millis(500);
/// How long QMP's `GUEST_PANICKED` waits for the console's panic report (they come by
/// different sockets; the kernel prints its report before it tells pvpanic).
const PANIC_WAIT: Duration = Duration::from_millis(750);
/// How long after its bundle an incident still takes the kernel's reports as its own.
const INCIDENT_RECENT: Duration = Duration::from_secs(600);
/// `kernel-report` events per class and minute; more are counted and left out.
const REPORTS_PER_MINUTE: u32 = 10;

/// Why a monitor is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Run,
    /// The service is stopping: remember everything, say nothing.
    Shutdown,
    /// The VM's directory is gone: say so, forget the VM.
    Removed,
}

/// What every monitor shares.
pub struct Shared {
    pub config: Arc<Config>,
    /// The service's one host sampler: each attached VM's QEMU process and vCPU threads.
    pub sampler: Arc<crate::host::sampler::Sampler>,
    pub forward: Forwarder,
    pub registry: Arc<Registry>,
    pub liveness: Arc<Liveness>,
    /// The highest sequence per VM epoch in the event log when the service started
    /// ([`persist::logged_sequences`]).
    pub logged: std::collections::HashMap<u64, u64>,
    /// The incidents whose `bundle` event the log holds ([`persist::bundled_incidents`]).
    pub bundled: std::collections::HashSet<String>,
    /// The node-wide limit on bundles collected at once (`[bundles] concurrent`).
    pub bundle_slots: Arc<super::bundles::BundleSlots>,
}

/// A VM's channels while attached.
struct Attached {
    qmp: Arc<Qmp>,
    console: Option<Arc<Console>>,
    channels: Channels,
    console_why: String,
    status: String,
    /// Which QEMU process this is (pid and start time), when its pid is visible.
    qemu_id: Option<String>,
    /// What the app says on its own (health, info).
    app_reports: mpsc::Receiver<app::Report>,
}

/// The outcome of a diagnostics task.
struct DiagDone {
    trigger: Incident,
    bundle: PathBuf,
    /// The manifest, or why there is no bundle (with what the steps found, when they ran).
    manifest: Result<diagnose::Manifest, (String, Option<Box<diagnose::Manifest>>)>,
    recovery: Option<RecoveryOutcome>,
}

struct RecoveryOutcome {
    action: &'static str,
    acted: bool,
    outcome: event::RecoveryOutcome,
    detail: String,
}

pub struct Monitor {
    name: String,
    dir: PathBuf,
    settings: VmSettings,
    shared: Arc<Shared>,
    memory: Memory,
    memory_path: PathBuf,
    machine: Machine,
    view: Arc<Mutex<VmView>>,
    timeline: VecDeque<Value>,
    tracker: Tracker,
    reset_seen: bool,
    /// Poll QEMU's run state at the next tick (after a reset).
    poll_status: bool,
    state_tx: watch::Sender<State>,
    loop_name: String,
    /// The guest kernel's reports, read from the console ([`Monitor::console_bytes`]).
    sentinel: Sentinel,
    /// A panic that came while another incident's bundle was being collected: its own bundle,
    /// with the panic as its trigger, follows that one.
    queued_panic: Option<Incident>,
    /// The console counts of the VM's earlier QEMU lives (each attach has a new console).
    console_before: crate::console::ConsoleCounts,
    /// The VM's drives' I/O errors and statistics, for the `host` step.
    pub(crate) devices: Arc<Mutex<DeviceHistory>>,
    /// `BLOCK_IO_ERROR` into `block-io-error` events.
    io_errors: Coalescer,
    /// The guest's VMCOREINFO, found once per boot, for the `kernel-log` step and the log's
    /// following.
    vmcoreinfo: Arc<Mutex<crate::memory::VmcoreinfoCache>>,
    /// The kernel log followed in guest memory for the sentinel (`kernel_log_follow`).
    kfollow: super::kfollow::KernelFollow,
}

/// What the monitor keeps of the guest kernel's reports.
#[derive(Default)]
struct Sentinel {
    scanner: Scanner,
    /// When console bytes last came.
    fed: Option<Instant>,
    /// The VM's recent reports, newest last.
    recent: VecDeque<(SystemTime, KernelReport)>,
    /// Per class: the current minute's start, events sent in it, reports left out.
    rate: BTreeMap<ReportClass, (Instant, u32, u64)>,
    /// The last incident whose bundle is done: its transition's key, bundle, and when.
    last_incident: Option<(String, PathBuf, Instant)>,
    /// QMP's `GUEST_PANICKED`, waiting for the console's panic report until the deadline.
    pending_panic: Option<(Value, Instant)>,
}

impl Monitor {
    pub fn new(name: String, dir: PathBuf, settings: VmSettings, shared: Arc<Shared>) -> Monitor {
        let memory_path = persist::path(&shared.config.data_dir, &name);
        let (mut memory, problem) = persist::load(&memory_path);
        if let Some(&logged) = shared.logged.get(&memory.epoch).filter(|&&l| l >= memory.next_seq) {
            // The state file lags behind the log (a crash or a full disk between them): never
            // give a logged key to another event.
            tracing::warn!(
                "{}: the event log has used keys up to sequence {logged}, beyond the state file's {}; \
                 going on from {}",
                name,
                memory.next_seq,
                logged + 1
            );
            memory.next_seq = logged + 1;
        }
        let tracks =
            settings.scenarios.iter().map(|s| Track::new(&s.name, s.probe.kind(), s.threshold)).collect();
        let restored = (memory.next_seq > 0).then_some((memory.state, memory.incident));
        let machine = Machine::new(tracks, restored, settings.pause, settings.startup_grace, Instant::now());
        let view = shared.registry.vm(&name);
        let loop_name = format!("vm {name}");
        let (state_tx, _) = watch::channel(machine.state);
        let kfollow =
            super::kfollow::KernelFollow::new(settings.kernel_log_follow, settings.kernel_log_every);
        let m = Monitor {
            kfollow,
            name,
            dir,
            settings,
            shared,
            memory,
            memory_path,
            machine,
            view,
            timeline: VecDeque::new(),
            tracker: Tracker::new(),
            reset_seen: false,
            poll_status: false,
            state_tx,
            loop_name,
            sentinel: Sentinel::default(),
            queued_panic: None,
            console_before: Default::default(),
            devices: Default::default(),
            vmcoreinfo: Default::default(),
            io_errors: Coalescer::default(),
        };
        if let Some(p) = problem {
            tracing::warn!("{p}");
        }
        m.refresh_view("watching");
        m
    }

    /// Runs until `stop` says otherwise.
    pub async fn run(mut self, mut stop: watch::Receiver<Stop>) {
        self.shared.liveness.register(&self.loop_name, Duration::from_secs(10));
        if self.memory.next_seq == 0 {
            let scenarios = self.scenario_names();
            self.emit(EventKind::VmAdded(event::VmAdded { dir: self.dir.clone(), scenarios }));
        }
        let retry = self.shared.config.discover_interval;
        // When QEMU last went away: a relaunch usually follows at once, and every QEMU process
        // is a life of its own (with its own event), so the socket is tried often for a while.
        let mut lost: Option<Instant> = None;
        loop {
            if *stop.borrow() != Stop::Run {
                break;
            }
            match self.attach().await {
                Ok(att) => {
                    self.attached(att, &mut stop).await;
                    lost = Some(Instant::now());
                }
                Err(why) => {
                    if let Some(t) =
                        self.machine.gone(why.clone(), Evidence::Attach { attach: why }, Instant::now())
                    {
                        self.transition(t, None);
                    }
                    self.shared.liveness.beat(&self.loop_name);
                    let wait = match lost {
                        Some(at) if at.elapsed() < RELAUNCH_WATCH => retry.min(RELAUNCH_RETRY),
                        _ => retry,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        self.shared.liveness.unregister(&self.loop_name);
        if *stop.borrow() == Stop::Removed {
            self.shared.sampler.forget(&self.name);
            self.emit(EventKind::VmRemoved(event::VmRemoved { dir: self.dir.clone() }));
            // Through the writer, after the save the event above queued.
            self.shared.forward.remove_state(self.memory_path.clone());
            self.shared.registry.remove(&self.name);
        }
    }

    async fn attach(&mut self) -> Result<Attached, String> {
        let d = Descriptor::load(&self.dir).map_err(|e| e.to_string())?;
        let qmp = match tokio::time::timeout(ATTACH_WAIT, self.connect_qmp(&d)).await {
            Ok(Ok(q)) => Arc::new(q),
            Ok(Err(e)) => return Err(format!("QEMU is not running: {e}")),
            Err(_) => {
                return Err(format!(
                    "QMP socket {} accepted but sent no greeting within {}; another client may hold \
                     the monitor (QEMU serves one client per socket)",
                    d.qmp.display(),
                    crate::units::format_duration(ATTACH_WAIT)
                ))
            }
        };
        let status = qmp
            .status(Duration::from_secs(5))
            .await
            .map(|s| s.status)
            .map_err(|e| format!("QMP query-status failed: {e}"))?;
        let qemu_id = qmp.pid.map(process_identity);
        let keep = self.shared.config.console_keep;
        // The launcher's console (vm.json's console_chardev) is re-exported for its tools.
        let (console, console_why) = match self.connect_console(&d, keep).await {
            Ok(c) => {
                c.set_budget(self.shared.config.console_budget);
                (Some(Arc::new(c)), String::new())
            }
            Err(e) => (None, format!("cannot connect: {e}")),
        };
        let doorbell_port = d.doorbell.as_ref().map(|b| b.port);
        let mut located = None;
        let (region, region_why) = match Region::open(&d.region, Access::ReadWrite) {
            Ok(r) => match d.ssdt_config().ok().map(|c| c.slot) {
                Some(slot) => match channel::locate(&qmp, slot).await.map(|c| c.with_port(doorbell_port)) {
                    Ok(c @ (Channel::AboveFourGib { .. } | Channel::NoDevice)) => {
                        let why = format!("no region: {c}");
                        located = Some(c);
                        (None, why)
                    }
                    // Not assigned yet (the firmware has not run: an EVE launch is paused at
                    // first): the region as before; the heartbeat turns to the port on its own
                    // once the doorbell decodes a frame.
                    Ok(Channel::Port { region, .. }) if *region == Channel::Unassigned => {
                        (Some(Arc::new(r)), String::new())
                    }
                    // The region file still carries each beat's request; on the port channel the
                    // record comes back on the port.
                    Ok(c) => {
                        located = Some(c);
                        (Some(Arc::new(r)), String::new())
                    }
                    Err(_) => (Some(Arc::new(r)), String::new()),
                },
                None => (Some(Arc::new(r)), String::new()),
            },
            Err(e) => (None, format!("cannot open the region: {e}")),
        };
        let port = located.as_ref().filter(|c| matches!(c, Channel::Port { .. })).map(|c| c.to_string());
        let (app_tx, app_reports) = mpsc::channel(16);
        let app = match &d.app {
            Some(path) => AppChannel::connect(path, app_tx)
                .await
                .map(Arc::new)
                .map_err(|e| format!("cannot connect to the app channel {}: {e}", path.display())),
            None => {
                Err("the VM has no app channel; prepare it with --app-channel to use this scenario".into())
            }
        };
        let completion = Completion::connect(d.doorbell.as_ref().map(|b| b.socket.as_path())).await;
        let channels = Channels {
            completion,
            qmp: qmp.clone(),
            region,
            region_why,
            console: console.clone(),
            irq: d.irq,
            thermal_period: d.thermal_period_ds.map(|ds| Duration::from_millis(u64::from(ds) * 100)),
            app,
            guest_agent: d.guest_agent.clone(),
            port,
            channel: located.map(|c| c.to_string()),
        };
        Ok(Attached { qmp, console, channels, console_why, status, qemu_id, app_reports })
    }

    /// The backend seam: QMP through libvirt for a domain `[libvirt]` names, else the VM's own
    /// socket. Both give the same [`Qmp`] (commands, events, closing).
    async fn connect_qmp(&self, d: &Descriptor) -> Result<Qmp, crate::trigger::qmp::QmpError> {
        #[cfg(feature = "libvirt")]
        if let Some(cfg) = &self.shared.config.libvirt {
            if let Some(qmp) = crate::trigger::libvirt::connect_vm(cfg, &self.name).await {
                return qmp;
            }
        }
        Qmp::connect(&d.qmp, Duration::ZERO).await
    }

    /// The VM's console: libvirt's console stream for a domain prepared with `--console
    /// libvirt`, else its socket. Either is re-exported when the descriptor says so.
    async fn connect_console(&self, d: &Descriptor, keep: usize) -> Result<Console, String> {
        if !d.console_libvirt {
            return crate::launch::vm::connect_console_with(d, keep, Duration::ZERO).await;
        }
        let chardev = d.console_chardev.as_deref().unwrap_or(crate::launch::prepare::LIBVIRT_CONSOLE);
        #[cfg(feature = "libvirt")]
        if let Some(cfg) = &self.shared.config.libvirt {
            if let Some(console) = crate::trigger::libvirt::console_vm(cfg, &self.name, chardev, keep).await {
                let console = console?;
                if let Some(share) = &d.console_share {
                    console
                        .share(share)
                        .map_err(|e| format!("cannot re-export the console on {}: {e}", share.display()))?;
                }
                return Ok(console);
            }
        }
        Err(format!(
            "the console is libvirt's (chardev {chardev}, prepare --console libvirt): name the domain \
             in [libvirt] of the service's configuration (acpimon built with --features libvirt)"
        ))
    }

    /// Watches an attached VM until QEMU goes away or the monitor is stopped.
    async fn attached(&mut self, mut att: Attached, stop: &mut watch::Receiver<Stop>) {
        let now = Instant::now();
        let qemu = format!("{}.{}.{}", att.qmp.version.0, att.qmp.version.1, att.qmp.version.2);
        let mut degraded = Vec::new();
        // Another QEMU process than the one last attached (even before a restart of the
        // service): its guest starts over. Unknown (pid not visible): the state decides.
        let relaunch = match (&self.memory.qemu, &att.qemu_id) {
            (Some(old), Some(new)) if old != new => {
                Some(event::Relaunch { qemu: new.clone(), previous: old.clone() })
            }
            _ => None,
        };
        let new_life = match (&self.memory.qemu, &att.qemu_id) {
            (Some(_), Some(_)) => relaunch.is_some(),
            _ => self.machine.state == State::Gone,
        };
        // A QEMU life no earlier watch saw: its kernel log is all new.
        let unseen = self.memory.qemu.is_none() || relaunch.is_some();
        if att.qemu_id.is_some() && self.memory.qemu != att.qemu_id {
            self.memory.qemu = att.qemu_id.clone();
            self.save();
        }
        if new_life {
            self.new_life(relaunch);
        }
        if let Some(t) = self.machine.attached(&att.status, new_life, now) {
            self.transition(t, Some(event::Attached { qemu }));
        }
        self.watch_host(&att.qmp);
        // Boxed: the channel allocates its slots 32 at a time, a Report is over 100 bytes.
        let (tx, mut rx) = mpsc::channel::<Box<Report>>(64);
        let mut probes: Vec<JoinHandle<()>> = Vec::new();
        let scenarios = self.settings.scenarios.clone();
        for (i, sc) in scenarios.iter().enumerate() {
            if let Some(why) = probe::unavailable(sc, &att.channels, &att.console_why) {
                degraded.push(format!("{}: {why}", sc.name));
                if let Some(t) = self.machine.unavailable(i, why, now) {
                    self.transition(t, None);
                }
                continue;
            }
            probes.push(tokio::spawn(
                probe::run(i, sc.clone(), att.channels.clone(), tx.clone()).in_current_span(),
            ));
        }
        if att.console.is_none() {
            degraded.push(format!("console: {}", att.console_why));
        }
        self.kfollow.attach(Arc::clone(&self.vmcoreinfo), self.boot_key(), att.console.is_some(), unseen);
        let mut follow: Option<JoinHandle<super::kfollow::PollDone>> = None;
        {
            let mut view = lock(&self.view);
            view.degraded = degraded;
            view.completion = Some(att.channels.completion.describe());
            view.channel = att.channels.channel.clone();
        }
        self.kernel_log_view();
        self.refresh_view("");
        let mut events = att.qmp.events();
        // The sentinel reads every chunk the console keeps, in order (none lost between here
        // and the console; what the console's budget dropped is marked, and the scanner
        // resyncs on the next line).
        let mut console_out = att.console.as_ref().map(|c| c.kept_chunks());
        self.sentinel.scanner = Scanner::new();
        self.sentinel.pending_panic = None;
        let mut diag: Option<JoinHandle<DiagDone>> = None;
        if let Some(trigger) = self.memory.pending_diagnostics.clone() {
            if self.shared.bundled.contains(&trigger.event) {
                // Its bundle event was logged; the service died before the state file said so.
                self.memory.pending_diagnostics = None;
                self.save();
            } else {
                // The service stopped before this incident's bundle was finished.
                diag = Some(self.start_diagnostics(trigger, &att));
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        loop {
            let panic_wait =
                self.sentinel.pending_panic.as_ref().map(|p| tokio::time::Instant::from_std(p.1));
            tokio::select! {
                Some(report) = rx.recv() => self.report(*report),
                out = async { console_out.as_mut().expect("guarded").recv().await }, if console_out.is_some() => {
                    match out {
                        Some(chunk) => {
                            if chunk.dropped_before > 0 {
                                self.sentinel.scanner.resync();
                            }
                            self.console_bytes(&chunk.bytes);
                        }
                        None => console_out = None,
                    }
                }
                _ = async { tokio::time::sleep_until(panic_wait.expect("guarded")).await }, if panic_wait.is_some() => {
                    self.panic_wait_over();
                }
                Some(r) = att.app_reports.recv() => self.app_report(r),
                ev = events.recv() => match ev {
                    Ok(ev) => self.qmp_event(ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("missed {n} QMP events (too many at once)");
                    }
                    Err(_) => {}
                },
                _ = att.qmp.closed() => {
                    let t = self.machine.gone("QEMU exited (its QMP connection closed)".into(), Evidence::Closed(Default::default()), Instant::now());
                    if let Some(t) = t {
                        self.transition(t, None);
                    }
                    break;
                }
                done = async { follow.as_mut().expect("guarded").await }, if follow.is_some() => {
                    follow = None;
                    match done {
                        Ok(done) => {
                            self.kfollow.polled(done, Instant::now());
                            self.kernel_log_view();
                        }
                        Err(e) => tracing::error!(error = %e, "the kernel log's poll failed"),
                    }
                }
                done = async { diag.as_mut().expect("guarded").await }, if diag.is_some() => {
                    diag = None;
                    match done {
                        Ok(done) => self.diagnostics_done(done),
                        Err(e) => {
                            lock(&self.view).diagnosing = None;
                            tracing::error!(error = %e, "the diagnostics task failed");
                        }
                    }
                }
                _ = tick.tick() => {
                    self.shared.liveness.beat(&self.loop_name);
                    if self.sentinel.fed.is_some_and(|t| t.elapsed() >= REPORT_QUIET) {
                        if let Some(r) = self.sentinel.scanner.flush() {
                            self.kernel_reports(vec![r], ReportSource::Console);
                        }
                    }
                    if let Ok(app) = &att.channels.app {
                        lock(&self.view).app_lines = Some(app.counts());
                    }
                    if let Some(c) = &att.console {
                        lock(&self.view).console = Some(self.console_before + c.counts());
                    }
                    if let Some(t) = self.machine.tick(Instant::now()) {
                        self.transition(t, None);
                    }
                    for e in self.io_errors.flush(Instant::now()) {
                        self.emit_block_io_error(e);
                    }
                    if follow.is_none() {
                        if let Some((f, bound)) = self.kfollow.due(Instant::now(), self.boot_key()) {
                            let task = super::kfollow::poll(f, att.qmp.clone(), self.dir.clone(), bound);
                            follow = Some(tokio::spawn(task.in_current_span()));
                        }
                    }
                    let released = self.kfollow.release(Instant::now(), false);
                    if !released.is_empty() {
                        self.kernel_reports(released, ReportSource::Memory);
                    }
                    self.kernel_log_view();
                    ticks = ticks.wrapping_add(1);
                    let not_running = matches!(self.machine.state, State::Gone | State::Paused);
                    if std::mem::take(&mut self.poll_status) || not_running || ticks % STATUS_EVERY == 0 {
                        self.poll_status(&att.qmp).await;
                    }
                }
                _ = stop.changed() => break,
            }
            if diag.is_none() {
                if let Some(trigger) = self.take_new_incident() {
                    diag = Some(self.start_diagnostics(trigger, &att));
                }
            }
        }
        // A report the console's end cut short is still the kernel's word.
        if let Some(r) = self.sentinel.scanner.flush() {
            self.kernel_reports(vec![r], ReportSource::Console);
        }
        // The memory log's too (QEMU went away: no poll is waited for).
        if let Some(f) = follow {
            f.abort();
        }
        self.kfollow.finish();
        let released = self.kfollow.release(Instant::now(), true);
        if !released.is_empty() {
            self.kernel_reports(released, ReportSource::Memory);
        }
        for e in self.io_errors.drain() {
            self.emit_block_io_error(e);
        }
        for p in probes {
            p.abort();
        }
        if let Some(d) = diag {
            d.abort();
            // Taken up again from the pending incident when the VM is attached next.
            lock(&self.view).diagnosing = None;
        }
        if let Some(c) = &att.console {
            self.console_before = self.console_before + c.counts();
            lock(&self.view).console = Some(self.console_before);
        }
    }

    /// Has the host sampler read this QEMU's process and vCPU threads from now on (a new ring
    /// per QEMU life), from a task of its own so that a slow monitor holds nothing up. Only
    /// when its pid is visible (not through libvirt's monitor passthrough); without, the host
    /// step has no history, nothing else changes.
    fn watch_host(&self, qmp: &Arc<Qmp>) {
        let Some(pid) = qmp.pid else { return };
        let (qmp, sampler, name) = (qmp.clone(), self.shared.sampler.clone(), self.name.clone());
        let ask = async move {
            match crate::host::vcpu_threads(&qmp, Duration::from_secs(2)).await {
                Ok(vcpus) => sampler.watch(&name, pid, &vcpus),
                Err(e) => {
                    tracing::debug!(error = %e, "query-cpus-fast failed: the host sampler does not watch the VM")
                }
            }
        };
        tokio::spawn(ask.in_current_span());
    }

    /// Feeds QEMU's run state to the machine. A monitor that does not answer in time is left
    /// to the probes (which time out too) and the next poll.
    async fn poll_status(&mut self, qmp: &Qmp) {
        match qmp.status(Duration::from_secs(2)).await {
            Ok(s) => {
                if let Some(t) = self.machine.status(&s.status, Instant::now()) {
                    self.transition(t, None);
                    self.refresh_view("");
                }
            }
            Err(e) => tracing::debug!(error = %e, "query-status failed"),
        }
    }

    /// A failure transition marks its incident pending; this picks it up to start diagnostics.
    fn take_new_incident(&mut self) -> Option<Incident> {
        let trigger = self.memory.pending_diagnostics.as_ref()?;
        if trigger.started.is_some() {
            return None;
        }
        let mut trigger = trigger.clone();
        trigger.started = Some(now_rfc3339());
        self.memory.pending_diagnostics = Some(trigger.clone());
        self.save();
        Some(trigger)
    }

    fn report(&mut self, r: Report) {
        let now = Instant::now();
        if let Some(lat) = r.outcome.latency.filter(|_| r.outcome.ok && r.record.is_some()) {
            lock(&self.view).observe_latency(lat);
        }
        if let Some(record) = r.record {
            // Only a frame on the port carries a status other than ok: the channel is the port,
            // whatever the report at attach said (BAR2 unassigned before the firmware ran).
            if record.status != crate::abi::Status::Ok {
                let mut view = lock(&self.view);
                if !view.channel.as_deref().is_some_and(|c| c.starts_with("I/O port")) {
                    view.channel = Some(format!(
                        "I/O port frames on the doorbell port: {} (the AML's own word)",
                        record.status.describe()
                    ));
                }
            }
            let obs = self.tracker.observe(Some(&record), now);
            if obs.fresh {
                lock(&self.view).last_record_at = Some(now);
            }
            let known = self.memory.boot_count;
            if known != Some(record.boot_count) {
                self.memory.boot_count = Some(record.boot_count);
                lock(&self.view).boot_count = Some(record.boot_count);
                self.save();
            }
            let unseen = match (obs.reboot, known) {
                (Some(reboot), _) => Some(reboot),
                // The boot count moved while nobody watched (the service was down).
                (None, Some(k)) if k != record.boot_count => {
                    Some(Reboot::BootCountChanged { from: k, to: record.boot_count })
                }
                _ => None,
            };
            if let Some(evidence) = unseen {
                if std::mem::take(&mut self.reset_seen) {
                    // Already reported from QMP's RESET.
                } else {
                    self.reboot(RebootEvidence::Region(evidence));
                }
            }
        }
        if let Some(t) = self.machine.probe(r.index, r.outcome, now) {
            self.transition(t, None);
        }
        if let Some((status, details)) = r.app_status {
            self.app_health(status, details, AppSource::Mailbox, None, None);
        }
        self.refresh_view("");
    }

    /// What the app said on its own over the app channel.
    fn app_report(&mut self, r: app::Report) {
        match r {
            app::Report::Health(h) => {
                let details = h.details.unwrap_or_default();
                self.app_health(h.status, details, AppSource::AppChannel, h.id, h.audit);
            }
            app::Report::Info(info) => {
                let changed = lock(&self.view).app_info.as_ref() != Some(&info);
                if changed {
                    lock(&self.view).app_info = Some(info.clone());
                    self.emit(EventKind::AppInfo(event::AppInfo { info }));
                }
            }
        }
        self.refresh_view("");
    }

    /// The app's status: an `app-health` event when it changes, and into the state machine.
    fn app_health(
        &mut self,
        status: AppStatus,
        details: String,
        source: AppSource,
        id: Option<String>,
        audit: Option<app::Audit>,
    ) {
        let changed = {
            let mut v = lock(&self.view);
            let changed = v.app_status != Some(status) || v.app_details.as_deref() != Some(details.as_str());
            v.app_status = Some(status);
            v.app_details = Some(details.clone());
            changed
        };
        // An audit result is news even when the status is not.
        if changed || audit.is_some() {
            self.log(&format!("the app reports {}: {details}", status_name(status)));
            let details = details.clone();
            self.emit(EventKind::AppHealth(event::AppHealth { status, details, source, id, audit }));
        }
        if let Some(t) = self.machine.app_health(status, details, Instant::now()) {
            self.transition(t, None);
        }
    }

    fn qmp_event(&mut self, ev: QmpEvent) {
        if ev.own {
            // acpimon's own dump of a page (VMCOREINFO) stopped the vCPUs for a moment.
            tracing::debug!(event = %ev.name, "a pause of acpimon's own command");
            return;
        }
        let now = Instant::now();
        let t = match ev.kind {
            QmpEventKind::Stop => self.machine.stopped(ev.raw, now),
            QmpEventKind::Resume => self.machine.resumed(ev.raw, now),
            QmpEventKind::Panicked { .. } => {
                if self.machine.state != State::Panicked && self.panic_report().is_none() {
                    // The console's report may be a moment behind: wait for it, briefly.
                    self.sentinel.pending_panic = Some((ev.raw, now + PANIC_WAIT));
                    return;
                }
                let report = self.panic_report();
                if let Some(t) = self.machine.panicked(ev.raw, now) {
                    self.transition_with(t, None, report);
                }
                None
            }
            QmpEventKind::Reset { .. } => {
                // A reset of a powered-off or stopped VM leaves QEMU in prelaunch, of a running
                // one running: the next tick asks which.
                self.poll_status = true;
                if self.machine.state != State::Gone {
                    self.reset_seen = true;
                    self.reboot(RebootEvidence::QmpEvent(ev.raw));
                }
                None
            }
            QmpEventKind::Shutdown { ref reason, .. } => {
                let why = match reason.as_str() {
                    "host-qmp-quit" => "QEMU is quitting (QMP quit)".to_string(),
                    "host-signal" => "QEMU is quitting (signal)".to_string(),
                    "guest-shutdown" => "the guest powered off".to_string(),
                    other => format!("the VM shut down ({other})"),
                };
                self.machine.gone(why, Evidence::QmpEvent { qmp_event: ev.raw }, now)
            }
            QmpEventKind::BlockIoError {
                ref device,
                ref node_name,
                ref operation,
                ref action,
                nospace,
                ref reason,
            } => {
                let drive = devices::drive_name(device, node_name.as_deref());
                let time = ev.time().unwrap_or_else(now_rfc3339);
                let (operation, action, reason) = (operation.clone(), action.clone(), reason.clone());
                let e = IoError { time, operation, action, nospace, reason };
                self.block_io_error(&drive, node_name.as_deref(), e, now);
                None
            }
            QmpEventKind::DumpCompleted { .. } | QmpEventKind::Other => None,
        };
        if let Some(t) = t {
            self.transition(t, None);
        }
        self.refresh_view("");
    }

    /// A `BLOCK_IO_ERROR` of `drive`: into the VM's device history and the metric, a
    /// `block-io-error` event when it starts a stream (the rest are counted), and the machine
    /// told when QEMU stops the VM for it.
    fn block_io_error(&mut self, drive: &str, node: Option<&str>, e: IoError, now: Instant) {
        lock(&self.devices).io_error(drive, e.clone());
        {
            let mut v = lock(&self.view);
            let n = v.block_io_errors.len();
            if let Some(c) = v.block_io_errors.get_mut(drive) {
                *c += 1;
            } else if n < devices::MAX_DRIVES {
                v.block_io_errors.insert(drive.into(), 1);
            }
        }
        if e.action == "stop" {
            let what = format!("drive {drive}: {} error ({})", e.operation, e.reason);
            let why = self.machine.io_error_stop(&what, now);
            if let Some(why) = why.filter(|_| self.machine.state == State::Paused) {
                // Its STOP came first (a retry's does): the pause is this error's.
                lock(&self.view).reason = why;
            }
        }
        for ev in self.io_errors.error(drive, node, &e, now) {
            self.emit_block_io_error(ev);
        }
    }

    fn emit_block_io_error(&mut self, e: event::BlockIoError) {
        let more =
            if e.count > 1 { format!(" ({} errors since {})", e.count, e.first) } else { String::new() };
        self.log(&format!(
            "drive {}: {} error ({}), QEMU action {}{more}",
            e.device, e.operation, e.reason, e.action
        ));
        self.emit(EventKind::BlockIoError(e));
    }

    /// Another QEMU process runs the VM (or, its pid unknown, QEMU came back): nothing of the
    /// previous one's guest counts for the new one. A known relaunch is a `reboot` event of its
    /// own, however fast relaunches come.
    fn new_life(&mut self, relaunch: Option<event::Relaunch>) {
        // The previous guest's kernel reports and queued panic are not the new guest's, nor
        // its drives' errors.
        self.sentinel.recent.clear();
        lock(&self.devices).clear();
        self.queued_panic = None;
        {
            // The new guest's app has said nothing yet: its first word is news.
            let mut v = lock(&self.view);
            v.app_status = None;
            v.app_details = None;
        }
        if let Some(trigger) = self.memory.pending_diagnostics.take() {
            // The incident's guest went with its QEMU: a bundle taken now would show the new one.
            lock(&self.view).diagnostics_failed += 1;
            let error = concat!(
                "QEMU was relaunched before the incident's bundle was finished: the guest it ",
                "concerns is gone, and the new guest's state is not its evidence"
            )
            .to_string();
            tracing::warn!("no bundle: {error}");
            let bundle = trigger.bundle.clone();
            self.emit(EventKind::Bundle(event::Bundle {
                trigger,
                bundle,
                manifest: None,
                error: Some(error),
                outcome: Some(event::BundleOutcome::Failed),
            }));
        }
        let Some(relaunch) = relaunch else { return };
        // The region's boot count moves when the new guest boots: that is this relaunch, not a
        // reboot of its own.
        self.reset_seen = true;
        self.reboot(RebootEvidence::Relaunch(relaunch));
    }

    /// One key per boot of the guest: its QEMU process and how many reboots were seen.
    fn boot_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.memory.qemu, lock(&self.view).reboots).hash(&mut h);
        h.finish()
    }

    fn reboot(&mut self, evidence: RebootEvidence) {
        lock(&self.view).reboots += 1;
        let seen = match &evidence {
            RebootEvidence::QmpEvent(e) => Some(Evidence::QmpEvent { qmp_event: e.clone() }),
            RebootEvidence::Region(r) => Some(Evidence::Region { region: r.clone() }),
            // The machine starts over when it attaches to the new QEMU (Machine::attached).
            RebootEvidence::Relaunch(_) => None,
        };
        let shown = serde_json::to_string(&evidence).expect("evidence serialises");
        self.log(&format!("the guest rebooted: {shown}"));
        // A verdict takes the reports of the boot it judges.
        self.sentinel.recent.clear();
        self.emit(EventKind::Reboot(event::RebootEvent { evidence }));
        if let Some(t) = seen.and_then(|seen| self.machine.rebooted(seen, Instant::now())) {
            self.transition(t, None);
        }
    }

    fn transition(&mut self, t: Transition, attached: Option<event::Attached>) {
        self.transition_with(t, attached, None);
    }

    /// A transition, with the guest kernel's report that explains it (its line and location
    /// join the reason).
    fn transition_with(
        &mut self,
        mut t: Transition,
        attached: Option<event::Attached>,
        kernel_report: Option<KernelReport>,
    ) {
        if let Some(r) = kernel_report.as_ref().filter(|r| !t.reason.contains(&r.line)) {
            t.reason = format!("{}: {}", t.reason, r.line);
        }
        if let Some(loc) = kernel_report
            .as_ref()
            .and_then(|r| r.location.as_ref())
            .filter(|l| !t.reason.contains(l.as_str()))
        {
            t.reason.push_str(&format!(", in `{loc}`"));
        }
        self.memory.state = t.to;
        self.memory.incident = self.machine.incident;
        self.log(&format!("{} -> {}: {}", t.from, t.to, t.reason));
        let key = self.emit(EventKind::Transition(event::Transition {
            from: t.from,
            to: t.to,
            reason: t.reason.clone(),
            evidence: t.evidence.clone(),
            attached,
            kernel_report: kernel_report.map(Box::new),
        }));
        if t.to.is_failure() && !self.settings.diagnostics.is_empty() {
            let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
            let bundle = self
                .shared
                .config
                .data_dir
                .join("bundles")
                .join(&self.name)
                .join(format!("{stamp}-{}", t.to));
            let incident = Incident {
                trigger: diagnose::Trigger {
                    kind: t.to.name().into(),
                    time: now_rfc3339(),
                    reason: t.reason.clone(),
                    evidence: serde_json::to_value(&t.evidence).expect("evidence serialises"),
                },
                event: key,
                bundle,
                started: None,
            };
            match &self.memory.pending_diagnostics {
                None => {
                    self.memory.pending_diagnostics = Some(incident);
                    self.save();
                }
                // An incident that became a panic: the panic gets its own bundle once the
                // running one is done (a panicked guest's evidence is another).
                Some(p) if t.to == State::Panicked && p.trigger.kind != State::Panicked.name() => {
                    self.queued_panic = Some(incident);
                }
                Some(_) => {}
            }
        }
        // send_replace: the value must change even when no diagnostics task is listening.
        self.state_tx.send_replace(t.to);
        let mut v = lock(&self.view);
        v.state = t.to;
        v.since = now_rfc3339();
        v.reason = t.reason;
    }

    fn start_diagnostics(&mut self, trigger: Incident, att: &Attached) -> JoinHandle<DiagDone> {
        let steps = self.settings.diagnostics.clone();
        let name = self.name.clone();
        let qmp = att.qmp.clone();
        let console = att.console.clone();
        let timeline: Vec<Value> = self.timeline.iter().cloned().collect();
        let bundle = trigger.bundle.clone();
        let opts = diagnose::Options {
            deadline: Some(self.settings.bundle.deadline),
            symbols: self.settings.bundle.symbols.clone(),
            reports: self.recent_kernel_reports(),
        };
        let recovery = self.recovery_plan();
        let state = self.state_tx.subscribe();
        // Beside QMP's socket, whose path length `prepare` checked.
        let gdb_socket = self.dir.join("gdb.sock");
        let guest_agent = att.channels.guest_agent.clone();
        let host = crate::host::HostContext {
            pid: att.qmp.pid,
            sampler: Some(Arc::clone(&self.shared.sampler)),
            devices: Arc::clone(&self.devices),
            data_dir: Some(self.shared.config.data_dir.clone()),
        };
        let kernel_log = diagnose::KernelLogContext {
            dir: self.dir.clone(),
            cache: Arc::clone(&self.vmcoreinfo),
            boot: self.boot_key(),
            guest_symbols: self.settings.bundle.symbols.is_none(),
        };
        let (keep, budget) = (self.shared.config.bundles_keep, self.shared.config.bundles_budget);
        let slots = Arc::clone(&self.shared.bundle_slots);
        let view = Arc::clone(&self.view);
        if slots.running() >= slots.limit() {
            self.log(&format!(
                "diagnostics queued: {} bundles being collected on the node, {} waiting ([bundles] concurrent = {})",
                slots.running(),
                slots.queued(),
                slots.limit()
            ));
        }
        lock(&view).diagnosing = Some("queued".into());
        let task = async move {
            // Behind the bundles queued before on the node; the incident's transition and event
            // are already out. The slot is held while the bundle is collected, not for recovery.
            let slot = slots.acquire().await;
            lock(&view).diagnosing = Some("collecting".into());
            tracing::info!("collecting diagnostics into {}", bundle.display());
            // Room for the new bundle within the size budgets, before it is written: the oldest
            // bundles go first.
            let b = bundle.clone();
            let _ = tokio::task::spawn_blocking(move || prune_bundles(&b, keep, budget, true)).await;
            let target = diagnose::Target {
                vm: &name,
                qmp: Some(&qmp),
                console: console.as_deref(),
                gdb_socket: gdb_socket.clone(),
                guest_agent: guest_agent.clone(),
                host,
                kernel_log: Some(kernel_log),
            };
            let manifest =
                diagnose::collect_with(&steps, &target, &trigger.trigger, timeline, &bundle, &opts)
                    .await
                    .map_err(|e| {
                        let text = e.to_string();
                        match e {
                            diagnose::DiagnoseError::NotWritten { manifest, .. } => (text, Some(manifest)),
                            _ => (text, None),
                        }
                    });
            drop(slot);
            let recovery = match recovery {
                Ok(RecoveryAction::None) => None,
                Ok(action) => Some(recover(&action, &qmp, &name, &bundle, &state).await),
                Err(refused) => Some(refused),
            };
            DiagDone { trigger, bundle, manifest, recovery }
        };
        tokio::spawn(task.in_current_span())
    }

    /// The recovery action to take after diagnostics, or why it is refused (rate limit).
    fn recovery_plan(&mut self) -> Result<RecoveryAction, RecoveryOutcome> {
        let action = self.settings.recovery.action.clone();
        if action == RecoveryAction::None {
            return Ok(action);
        }
        let now = unix_now();
        self.memory.recoveries.retain(|&t| now.saturating_sub(t) < 3600);
        let max = self.settings.recovery.max_per_hour;
        if self.memory.recoveries.len() as u32 >= max {
            return Err(RecoveryOutcome {
                action: action.name(),
                acted: false,
                outcome: event::RecoveryOutcome::Refused,
                detail: format!(
                    "rate limit: {} action(s) in the last hour, at most {max} allowed (recovery.max_per_hour)",
                    self.memory.recoveries.len()
                ),
            });
        }
        Ok(action)
    }

    fn diagnostics_done(&mut self, done: DiagDone) {
        lock(&self.view).diagnosing = None;
        let mut detail = event::Bundle {
            trigger: done.trigger,
            bundle: done.bundle.clone(),
            manifest: None,
            error: None,
            outcome: Some(event::BundleOutcome::Ok),
        };
        match done.manifest {
            Ok(m) => {
                lock(&self.view).diagnostics_ok += 1;
                lock(&self.view).last_bundle = Some(done.bundle.display().to_string());
                lock(&self.view).last_verdict = m.verdict.clone();
                if let Some(v) = &m.verdict {
                    self.log(&format!("verdict {}: {}", v.class, v.headline));
                }
                detail.manifest = Some(Box::new(m));
                self.log(&format!("bundle written: {}", done.bundle.display()));
            }
            Err((e, found)) => {
                // Not counted as a bundle: a failed write is a failed bundle.
                lock(&self.view).diagnostics_failed += 1;
                tracing::error!("bundle failed: {e}");
                detail.error = Some(e);
                detail.manifest = found;
                detail.outcome = Some(event::BundleOutcome::Failed);
            }
        }
        self.sentinel.last_incident =
            Some((detail.trigger.event.clone(), done.bundle.clone(), Instant::now()));
        // Saved with the bundle's event (emit saves): a crash can no longer leave a delivered
        // bundle's incident pending, to be diagnosed again on restart.
        self.memory.pending_diagnostics = None;
        self.emit(EventKind::Bundle(detail));
        // The panic that came meanwhile, unless the guest has left it (a recovery reset it).
        if let Some(panic) = self.queued_panic.take().filter(|_| self.machine.state == State::Panicked) {
            self.memory.pending_diagnostics = Some(panic);
            self.save();
        }
        let (bundle, keep) = (done.bundle.clone(), self.shared.config.bundles_keep);
        let budget = self.shared.config.bundles_budget;
        // Removing old bundles is disk work: off the VM's loop.
        drop(tokio::task::spawn_blocking(move || prune_bundles(&bundle, keep, budget, false)));
        if let Some(r) = done.recovery {
            if r.acted {
                self.memory.recoveries.push(unix_now());
                lock(&self.view).recoveries += 1;
            } else if r.outcome == event::RecoveryOutcome::Refused {
                lock(&self.view).recoveries_refused += 1;
            }
            self.log(&format!("recovery {}: {}: {}", r.action, r.outcome, r.detail));
            let (action, outcome, detail) = (r.action.to_string(), r.outcome, r.detail);
            self.emit(EventKind::Recovery(event::Recovery { action, outcome, detail }));
        }
    }

    /// Console output, for the sentinel.
    fn console_bytes(&mut self, bytes: &[u8]) {
        self.sentinel.fed = Some(Instant::now());
        self.kfollow.console_bytes(bytes);
        let reports = self.sentinel.scanner.feed(bytes);
        if !reports.is_empty() {
            self.kernel_reports(reports, ReportSource::Console);
        }
        if self.sentinel.pending_panic.is_some() && self.panic_report().is_some() {
            self.panic_wait_over();
        }
    }

    /// The VM's recent kernel reports, oldest first (bounded), for its verdicts.
    pub fn recent_kernel_reports(&self) -> Vec<KernelReport> {
        self.sentinel.recent.iter().map(|(_, r)| r.clone()).collect()
    }

    /// The panic report of the last minute, or the one the kernel is still printing.
    fn panic_report(&self) -> Option<KernelReport> {
        if let Some(r) = self.sentinel.scanner.pending().filter(|r| r.class == ReportClass::Panic) {
            return Some(r.clone());
        }
        let recent = |t: &SystemTime| t.elapsed().is_ok_and(|e| e < Duration::from_secs(60));
        self.sentinel
            .recent
            .iter()
            .rev()
            .find(|(t, r)| r.class == ReportClass::Panic && recent(t))
            .map(|(_, r)| r.clone())
    }

    /// QMP's `GUEST_PANICKED` waited for the console's report: it is here, or the wait is over.
    fn panic_wait_over(&mut self) {
        let Some((raw, _)) = self.sentinel.pending_panic.take() else { return };
        let report = self.panic_report();
        if let Some(t) = self.machine.panicked(raw, Instant::now()) {
            self.transition_with(t, None, report);
        }
        self.refresh_view("");
    }

    /// The transition key and bundle of the incident a report arriving now belongs to.
    fn incident_link(&self) -> (Option<String>, Option<PathBuf>) {
        if let Some(p) = &self.memory.pending_diagnostics {
            return (Some(p.event.clone()), Some(p.bundle.clone()));
        }
        match &self.sentinel.last_incident {
            Some((key, bundle, done)) if self.machine.incident || done.elapsed() < INCIDENT_RECENT => {
                (Some(key.clone()), Some(bundle.clone()))
            }
            _ => None.unzip(),
        }
    }

    /// Where the VM's kernel reports come from, and why the log in memory cannot be read.
    fn kernel_log_view(&self) {
        let mut v = lock(&self.view);
        v.kernel_log = Some(self.kfollow.describe());
        v.degraded.retain(|d| !d.starts_with("kernel log: "));
        if let Some(e) = &self.kfollow.error {
            v.degraded.push(format!("kernel log: {e}"));
        }
    }

    /// Reports the sentinel read (on the console or in the memory log): counted, kept, sent as
    /// `kernel-report` events (at most [`REPORTS_PER_MINUTE`] a class), and into the state
    /// machine by the VM's policy.
    fn kernel_reports(&mut self, reports: Vec<KernelReport>, source: ReportSource) {
        for r in reports {
            if source == ReportSource::Console {
                self.kfollow.console_report(&r);
            }
            let now = Instant::now();
            {
                let mut view = lock(&self.view);
                *view.kernel_reports.entry(r.class).or_default() += 1;
                if source == ReportSource::Memory {
                    *view.kernel_reports_from_memory.entry(r.class).or_default() += 1;
                }
            }
            if self.sentinel.recent.len() == RECENT_REPORTS {
                self.sentinel.recent.pop_front();
            }
            self.sentinel.recent.push_back((SystemTime::now(), r.clone()));
            let policy = self.settings.kernel_reports.get(r.class);
            let diagnose = policy.action == Action::LateDiagnose
                && self.memory.pending_diagnostics.is_none()
                && !self.machine.incident
                && !self.settings.diagnostics.is_empty();
            let rate = self.sentinel.rate.entry(r.class).or_insert((now, 0, 0));
            if now.duration_since(rate.0) >= Duration::from_secs(60) {
                *rate = (now, 0, rate.2);
            }
            let key = if rate.1 < REPORTS_PER_MINUTE || diagnose {
                rate.1 += 1;
                let suppressed = std::mem::take(&mut rate.2);
                let (incident, bundle) = self.incident_link();
                self.log(&r.summary());
                let report = r.clone();
                Some(self.emit(EventKind::KernelReport(event::KernelReportEvent {
                    report,
                    incident,
                    bundle,
                    suppressed,
                    source,
                })))
            } else {
                rate.2 += 1;
                None
            };
            let t = match policy.action {
                Action::Unresponsive => {
                    self.machine.kernel_report(&r, State::Unresponsive, policy.clear_after, now)
                }
                Action::Late | Action::LateDiagnose => {
                    self.machine.kernel_report(&r, State::Late, policy.clear_after, now)
                }
                Action::Panicked => {
                    let t = match self.sentinel.pending_panic.take() {
                        // QMP said so first (and waited for this): its event is the evidence.
                        Some((raw, _)) => self.machine.panicked(raw, now),
                        None => self.machine.kernel_panic(&r, now),
                    };
                    if let Some(t) = t {
                        self.transition_with(t, None, Some(r.clone()));
                    }
                    None
                }
                Action::Report => None,
            };
            if let Some(t) = t {
                // The report itself rides on the transition it caused (its own event, just
                // before, has no incident to link to yet).
                self.transition_with(t, None, Some(r.clone()));
            }
            if let (true, Some(key)) = (diagnose, key) {
                self.kernel_incident(&r, key);
            }
        }
        self.refresh_view("");
    }

    /// Diagnostics for a report whose policy asks for them without a failure state (an Oops):
    /// an incident of its own, whose trigger is the report.
    fn kernel_incident(&mut self, r: &KernelReport, key: String) {
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
        let kind = format!("kernel-{}", r.class);
        let bundle =
            self.shared.config.data_dir.join("bundles").join(&self.name).join(format!("{stamp}-{kind}"));
        self.memory.pending_diagnostics = Some(Incident {
            trigger: diagnose::Trigger {
                kind,
                time: now_rfc3339(),
                reason: r.summary(),
                evidence: serde_json::json!({ "kernel_report": r }),
            },
            event: key,
            bundle,
            started: None,
        });
        self.save();
    }

    /// Emits an event for this VM; returns its key.
    fn emit(&mut self, kind: EventKind) -> String {
        let key = self.memory.take_key();
        let ev = Event::new(key.clone(), &self.shared.config.node, Some(&self.name), kind);
        let spooled = self.shared.forward.submit(&ev);
        {
            let mut v = lock(&self.view);
            v.events += 1;
            if let Err(e) = &spooled {
                v.events_not_spooled += 1;
                drop(v);
                tracing::error!(key = %key, error = %e, "event not forwarded");
            }
        }
        if self.timeline.len() == TIMELINE {
            self.timeline.pop_front();
        }
        self.timeline.push_back(ev.timeline_entry());
        // The key is used before the sequence is saved: a crash in between re-emits the same
        // event with the same key, which the controller deduplicates.
        self.save();
        key
    }

    /// Queues the memory for the writer thread: the loop never waits on the disk.
    fn save(&mut self) {
        self.shared.forward.save_state(self.memory_path.clone(), persist::encode(&self.memory));
    }

    fn refresh_view(&self, reason: &str) {
        let mut v = lock(&self.view);
        v.state = self.machine.state;
        if !reason.is_empty() {
            v.reason = reason.into();
        }
        v.boot_count = self.memory.boot_count;
        v.scenarios = self
            .machine
            .tracks
            .iter()
            .map(|t| ScenarioView {
                name: t.name.clone(),
                kind: t.kind.into(),
                consecutive_misses: t.misses,
                threshold: t.threshold,
                misses_total: t.total_misses,
                answers_total: t.total_ok,
                last_latency_ms: t.last.as_ref().and_then(|o| o.latency).map(|l| l.as_secs_f64() * 1e3),
                last_detail: t.last.as_ref().map(|o| o.detail.clone()),
                unavailable: t.unavailable.clone(),
            })
            .collect();
    }

    fn scenario_names(&self) -> Vec<String> {
        self.settings.scenarios.iter().map(|s| s.name.clone()).collect()
    }

    /// The VM's narrative (transitions, bundles, recoveries); the `vm` span names the VM.
    fn log(&self, msg: &str) {
        tracing::info!("{msg}");
    }
}

async fn recover(
    action: &RecoveryAction,
    qmp: &Qmp,
    vm: &str,
    bundle: &std::path::Path,
    state: &watch::Receiver<State>,
) -> RecoveryOutcome {
    let name = action.name();
    let now = *state.borrow();
    if !now.is_failure() {
        return RecoveryOutcome {
            action: name,
            acted: false,
            outcome: event::RecoveryOutcome::Skipped,
            detail: format!("the VM is {now} again"),
        };
    }
    let result: Result<String, String> = match action {
        RecoveryAction::None => Ok(String::new()),
        RecoveryAction::Reset => qmp
            .execute_within(qapi::qmp::system_reset {}, Duration::from_secs(10))
            .await
            .map(|_| "QMP system_reset".into())
            .map_err(|e| e.to_string()),
        RecoveryAction::Poweroff => {
            match qmp.execute_within(qapi::qmp::quit {}, Duration::from_secs(10)).await {
                Ok(_) | Err(crate::trigger::qmp::QmpError::Closed) => Ok("QMP quit".into()),
                Err(e) => Err(e.to_string()),
            }
        }
        RecoveryAction::Command { argv, timeout } => run_command(argv, *timeout, vm, bundle).await,
    };
    match result {
        Ok(detail) => {
            RecoveryOutcome { action: name, acted: true, outcome: event::RecoveryOutcome::Done, detail }
        }
        Err(e) => {
            RecoveryOutcome { action: name, acted: true, outcome: event::RecoveryOutcome::Failed, detail: e }
        }
    }
}

async fn run_command(
    argv: &[String],
    timeout: Duration,
    vm: &str,
    bundle: &std::path::Path,
) -> Result<String, String> {
    use crate::util::process::{Outcome, Program};
    let env = [("ACPIMON_VM", std::ffi::OsStr::new(vm)), ("ACPIMON_BUNDLE", bundle.as_os_str())];
    match Program::new(argv, timeout).env(env).run().await.outcome {
        Outcome::Exited(s) if s.success() => Ok(format!("{} exited 0", argv[0])),
        Outcome::Exited(s) => Err(format!("{} {s}", argv[0])),
        Outcome::TimedOut(_) => {
            Err(format!("{} still running after {}; killed", argv[0], crate::units::format_duration(timeout)))
        }
        Outcome::CannotStart(e) | Outcome::Failed(e) => Err(e),
    }
}

/// How an app status is written in events and logs.
fn status_name(status: AppStatus) -> String {
    serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Keeps the newest `keep` bundles beside `bundle` (`DATA_DIR/bundles/VM/STAMP-STATE`), and
/// removes the oldest, of this VM and then of every VM, until they fit their size budgets.
/// `before`: `bundle` is about to be written; room is also made for a bundle the size of the
/// VM's newest (the best guess of the next one's size). After, `bundle` itself is never
/// removed, even if it alone exceeds a budget.
pub(crate) fn prune_bundles(bundle: &Path, keep: usize, budget: BundleBudget, before: bool) {
    let Some(vm_dir) = bundle.parent() else { return };
    let mut mine = bundle_dirs(vm_dir);
    mine.retain(|(p, _)| p != bundle);
    // Newest last: the names start with the time.
    let estimate = if before { mine.last().map_or(0, |(_, size)| *size) } else { 0 };
    // Room for the new one (before), or the new one beside them (after).
    let limit = keep.saturating_sub(1);
    let remove = |(path, size): &(PathBuf, u64), why: &str| {
        tracing::info!(bundle = %path.display(), bytes = size, "removed an old bundle ({why})");
        let _ = std::fs::remove_dir_all(path);
    };
    while mine.len() > limit {
        let old = mine.remove(0);
        remove(&old, "bundles.keep_per_vm");
    }
    let total = |v: &[(PathBuf, u64)]| v.iter().map(|(_, s)| s).sum::<u64>();
    let newest = if before { 0 } else { dir_size(bundle) };
    while !mine.is_empty() && total(&mine) + newest + estimate > budget.per_vm {
        let old = mine.remove(0);
        remove(&old, "bundles.max_bytes_per_vm");
    }
    // Every VM's bundles, oldest first by their names' time.
    let Some(root) = vm_dir.parent() else { return };
    let mut all: Vec<(PathBuf, u64)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .flat_map(|e| bundle_dirs(&e.path()))
        .filter(|(p, _)| p != bundle)
        .collect();
    all.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
    while !all.is_empty() && total(&all) + newest + estimate > budget.total {
        let old = all.remove(0);
        remove(&old, "bundles.max_bytes");
    }
}

/// The bundle directories in `dir`, sorted by name (oldest first), with their sizes.
fn bundle_dirs(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut dirs: Vec<(PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.path(), dir_size(&e.path())))
        .collect();
    dirs.sort();
    dirs
}

/// The bytes of the files under `path` (symbolic links not followed).
fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| dir_size(&e.path())).sum()
}

/// A process's identity: its pid and start time (clock ticks since boot), so that a pid
/// reused by a later QEMU is still another process.
fn process_identity(pid: u32) -> String {
    let start = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| {
        // The fields after the command name (which may hold spaces) in parentheses; the start
        // time is field 22 of the line, the 20th after the name.
        let rest = &stat[stat.rfind(')')? + 1..];
        rest.split_whitespace().nth(19).map(str::to_string)
    });
    match start {
        Some(start) => format!("{pid}@{start}"),
        None => pid.to_string(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod bundle_budget_tests {
    use super::*;

    /// A bundle directory of `bytes` bytes under `root/vm/name`.
    fn bundle(root: &Path, vm: &str, name: &str, bytes: usize) -> PathBuf {
        let dir = root.join(vm).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("01-console-tail.txt"), vec![b'x'; bytes]).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    const MB: usize = 1 << 20;

    #[test]
    fn the_size_budgets_remove_the_oldest_bundles_first() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (i, vm) in ["a", "b"].iter().enumerate() {
            for t in 0..3 {
                bundle(root, vm, &format!("2026-01-01T0{t}000{i}Z-unresponsive"), MB);
            }
        }
        let budget = BundleBudget { per_vm: 10 * MB as u64, total: 100 * MB as u64 };
        // Within every budget: nothing goes.
        let next = root.join("a/2026-01-01T050000Z-panicked");
        prune_bundles(&next, 10, budget, true);
        assert_eq!(names(&root.join("a")).len(), 3);

        // Per VM, before writing: 3 MiB kept plus room for one like the newest (1 MiB) within
        // 3 MiB: the oldest goes.
        let tight = BundleBudget { per_vm: 3 * MB as u64 + 4096, ..budget };
        prune_bundles(&next, 10, tight, true);
        assert_eq!(
            names(&root.join("a")),
            ["2026-01-01T010000Z-unresponsive", "2026-01-01T020000Z-unresponsive"]
        );
        assert_eq!(names(&root.join("b")).len(), 3, "another VM's bundles are not this VM's budget");

        // Per service, after writing: the new bundle (2 MiB) stays; the oldest of every VM go
        // until the total fits 5 MiB.
        let new = bundle(root, "a", "2026-01-01T050000Z-panicked", 2 * MB);
        let service = BundleBudget { per_vm: 100 * MB as u64, total: 5 * MB as u64 + 8192 };
        prune_bundles(&new, 10, service, false);
        assert_eq!(
            names(&root.join("a")),
            ["2026-01-01T020000Z-unresponsive", "2026-01-01T050000Z-panicked"]
        );
        assert_eq!(
            names(&root.join("b")),
            ["2026-01-01T010001Z-unresponsive", "2026-01-01T020001Z-unresponsive"]
        );

        // A new bundle larger than the whole budget is kept; every older one goes.
        let huge = bundle(root, "b", "2026-01-01T060001Z-panicked", 3 * MB);
        prune_bundles(&huge, 10, BundleBudget { per_vm: 2 * MB as u64, total: 100 * MB as u64 }, false);
        assert_eq!(names(&root.join("b")), ["2026-01-01T060001Z-panicked"]);

        // keep_per_vm still counts.
        prune_bundles(&root.join("a/2026-01-01T070000Z-panicked"), 1, budget, true);
        assert!(names(&root.join("a")).is_empty());
    }
}
