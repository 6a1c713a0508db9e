//! One VM's monitor: attaches to its QEMU (QMP, console, region), runs its scenarios, feeds
//! the [`Machine`], emits every transition as an event, runs diagnostics and recovery on
//! failures, and re-attaches when QEMU comes back. Each VM has its own task; nothing here
//! waits on another VM or on the controller.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::config::{Config, RecoveryAction, VmSettings};
use super::metrics::{Registry, ScenarioView, VmView};
use super::persist::{self, Memory};
use super::probe::{self, Channels, Report};
use super::state::{Evidence, Machine, State, Track, Transition};
use super::Liveness;
use crate::abi::AppStatus;
use crate::app::{self, AppChannel};
use crate::console::Console;
use crate::diagnose;
use crate::event::{self, AppSource, Event, EventKind, Incident, RebootEvidence};
use crate::forward::Forwarder;
use crate::judge::{Reboot, Tracker};
use crate::launch::channel::{self, Channel};
use crate::launch::Descriptor;
use crate::read::{Access, Region};
use crate::trigger::qmp::{EventKind as QmpEventKind, Qmp, QmpEvent};
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
    pub forward: Forwarder,
    pub registry: Arc<Registry>,
    pub liveness: Arc<Liveness>,
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
    manifest: Result<diagnose::Manifest, String>,
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
    /// The console counts of the VM's earlier QEMU lives (each attach has a new console).
    console_before: crate::console::ConsoleCounts,
}

impl Monitor {
    pub fn new(name: String, dir: PathBuf, settings: VmSettings, shared: Arc<Shared>) -> Monitor {
        let memory_path = persist::path(&shared.config.data_dir, &name);
        let (memory, problem) = persist::load(&memory_path);
        let tracks =
            settings.scenarios.iter().map(|s| Track::new(&s.name, s.probe.kind(), s.threshold)).collect();
        let restored = (memory.next_seq > 0).then_some((memory.state, memory.incident));
        let machine = Machine::new(tracks, restored, settings.pause, settings.startup_grace, Instant::now());
        let view = shared.registry.vm(&name);
        let loop_name = format!("vm {name}");
        let (state_tx, _) = watch::channel(machine.state);
        let m = Monitor {
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
            console_before: Default::default(),
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
        loop {
            if *stop.borrow() != Stop::Run {
                break;
            }
            match self.attach().await {
                Ok(att) => self.attached(att, &mut stop).await,
                Err(why) => {
                    if let Some(t) =
                        self.machine.gone(why.clone(), Evidence::Attach { attach: why }, Instant::now())
                    {
                        self.transition(t, None);
                    }
                    self.shared.liveness.beat(&self.loop_name);
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
        self.shared.liveness.unregister(&self.loop_name);
        if *stop.borrow() == Stop::Removed {
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
        let (region, region_why) = match Region::open(&d.region, Access::ReadWrite) {
            Ok(r) => match d.ssdt_config().ok().map(|c| c.slot) {
                Some(slot) => match channel::locate(&qmp, slot).await {
                    Ok(c @ (Channel::AboveFourGib { .. } | Channel::NoDevice)) => {
                        (None, format!("no region: {c}"))
                    }
                    _ => (Some(Arc::new(r)), String::new()),
                },
                None => (Some(Arc::new(r)), String::new()),
            },
            Err(e) => (None, format!("cannot open the region: {e}")),
        };
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
        let channels = Channels {
            qmp: qmp.clone(),
            region,
            region_why,
            console: console.clone(),
            irq: d.irq,
            thermal_period: d.thermal_period_ds.map(|ds| Duration::from_millis(u64::from(ds) * 100)),
            app,
            guest_agent: d.guest_agent.clone(),
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
        let new_life = match (&self.memory.qemu, &att.qemu_id) {
            (Some(old), Some(new)) => old != new,
            _ => self.machine.state == State::Gone,
        };
        if att.qemu_id.is_some() && self.memory.qemu != att.qemu_id {
            self.memory.qemu = att.qemu_id.clone();
            self.save();
        }
        if let Some(t) = self.machine.attached(&att.status, new_life, now) {
            self.transition(t, Some(event::Attached { qemu }));
        }
        let (tx, mut rx) = mpsc::channel::<Report>(64);
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
        lock(&self.view).degraded = degraded;
        self.refresh_view("");
        let mut events = att.qmp.events();
        let mut diag: Option<JoinHandle<DiagDone>> = None;
        if let Some(trigger) = self.memory.pending_diagnostics.clone() {
            // The service stopped before this incident's bundle was finished.
            diag = Some(self.start_diagnostics(trigger, &att));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                Some(report) = rx.recv() => self.report(report),
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
                done = async { diag.as_mut().expect("guarded").await }, if diag.is_some() => {
                    diag = None;
                    match done {
                        Ok(done) => self.diagnostics_done(done),
                        Err(e) => tracing::error!(error = %e, "the diagnostics task failed"),
                    }
                }
                _ = tick.tick() => {
                    self.shared.liveness.beat(&self.loop_name);
                    if let Ok(app) = &att.channels.app {
                        lock(&self.view).app_lines = Some(app.counts());
                    }
                    if let Some(c) = &att.console {
                        lock(&self.view).console = Some(self.console_before + c.counts());
                    }
                    if let Some(t) = self.machine.tick(Instant::now()) {
                        self.transition(t, None);
                    }
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
        for p in probes {
            p.abort();
        }
        if let Some(d) = diag {
            d.abort();
        }
        if let Some(c) = &att.console {
            self.console_before = self.console_before + c.counts();
            lock(&self.view).console = Some(self.console_before);
        }
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
        let now = Instant::now();
        let t = match ev.kind {
            QmpEventKind::Stop => self.machine.stopped(ev.raw, now),
            QmpEventKind::Resume => self.machine.resumed(ev.raw, now),
            QmpEventKind::Panicked { .. } => self.machine.panicked(ev.raw, now),
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
            QmpEventKind::DumpCompleted { .. } | QmpEventKind::Other => None,
        };
        if let Some(t) = t {
            self.transition(t, None);
        }
        self.refresh_view("");
    }

    fn reboot(&mut self, evidence: RebootEvidence) {
        lock(&self.view).reboots += 1;
        let seen = match &evidence {
            RebootEvidence::QmpEvent(e) => Evidence::QmpEvent { qmp_event: e.clone() },
            RebootEvidence::Region(r) => Evidence::Region { region: r.clone() },
        };
        let shown = serde_json::to_string(&evidence).expect("evidence serialises");
        self.log(&format!("the guest rebooted: {shown}"));
        self.emit(EventKind::Reboot(event::RebootEvent { evidence }));
        if let Some(t) = self.machine.rebooted(seen, Instant::now()) {
            self.transition(t, None);
        }
    }

    fn transition(&mut self, t: Transition, attached: Option<event::Attached>) {
        self.memory.state = t.to;
        self.memory.incident = self.machine.incident;
        self.log(&format!("{} -> {}: {}", t.from, t.to, t.reason));
        let key = self.emit(EventKind::Transition(event::Transition {
            from: t.from,
            to: t.to,
            reason: t.reason.clone(),
            evidence: t.evidence.clone(),
            attached,
        }));
        if t.to.is_failure()
            && self.memory.pending_diagnostics.is_none()
            && !self.settings.diagnostics.is_empty()
        {
            let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
            let bundle = self
                .shared
                .config
                .data_dir
                .join("bundles")
                .join(&self.name)
                .join(format!("{stamp}-{}", t.to));
            self.memory.pending_diagnostics = Some(Incident {
                trigger: diagnose::Trigger {
                    kind: t.to.name().into(),
                    time: now_rfc3339(),
                    reason: t.reason.clone(),
                    evidence: serde_json::to_value(&t.evidence).expect("evidence serialises"),
                },
                event: key,
                bundle,
                started: None,
            });
            self.save();
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
        let recovery = self.recovery_plan();
        let state = self.state_tx.subscribe();
        // Beside QMP's socket, whose path length `prepare` checked.
        let gdb_socket = self.dir.join("gdb.sock");
        let guest_agent = att.channels.guest_agent.clone();
        self.log(&format!("collecting diagnostics into {}", bundle.display()));
        let task = async move {
            let target = diagnose::Target {
                vm: &name,
                qmp: Some(&qmp),
                console: console.as_deref(),
                gdb_socket: gdb_socket.clone(),
                guest_agent: guest_agent.clone(),
            };
            let manifest = diagnose::collect(&steps, &target, &trigger.trigger, timeline, &bundle)
                .await
                .map_err(|e| e.to_string());
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
        let mut detail =
            event::Bundle { trigger: done.trigger, bundle: done.bundle.clone(), manifest: None, error: None };
        match done.manifest {
            Ok(m) => {
                lock(&self.view).diagnostics_ok += 1;
                lock(&self.view).last_bundle = Some(done.bundle.display().to_string());
                detail.manifest = Some(Box::new(m));
                self.log(&format!("bundle written: {}", done.bundle.display()));
            }
            Err(e) => {
                lock(&self.view).diagnostics_failed += 1;
                tracing::warn!("no bundle: {e}");
                detail.error = Some(e);
            }
        }
        // Saved with the bundle's event (emit saves): a crash can no longer leave a delivered
        // bundle's incident pending, to be diagnosed again on restart.
        self.memory.pending_diagnostics = None;
        self.emit(EventKind::Bundle(detail));
        let (bundle, keep) = (done.bundle.clone(), self.shared.config.bundles_keep);
        // Removing old bundles is disk work: off the VM's loop.
        drop(tokio::task::spawn_blocking(move || prune_bundles(&bundle, keep)));
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
        self.timeline.push_back(serde_json::to_value(&ev).expect("events serialise"));
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

/// Keeps the newest `keep` bundles beside `bundle`.
fn prune_bundles(bundle: &std::path::Path, keep: usize) {
    let Some(dir) = bundle.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for old in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(old);
    }
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
