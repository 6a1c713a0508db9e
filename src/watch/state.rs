//! One VM's state, as a pure machine: probe outcomes and QMP events go in, transitions (with
//! the reason and evidence that caused them) come out. No I/O and no clock of its own, so
//! every transition is unit-tested.
//!
//! ```text
//!  starting ──► healthy ◄──► late ──► unresponsive ──► recovered ──► healthy
//!      any ──► paused (QMP STOP, or any QEMU run state but running) ──► (RESUME: back to what the probes say)
//!      any ──► panicked (GUEST_PANICKED) ── until the guest answers again or reboots
//!      any ──► gone (QEMU exited / powered off) ──► starting or paused (attached again, whatever
//!              QEMU's run state: prelaunch and the other stopped states are paused)
//! ```
//! A reboot is an event, not a failure: it restarts the start-up grace (state starting).
//! The grace is per scenario: it covers a scenario until its first answer, so one slow
//! scenario cannot hide another that answered and then failed.
//! Every QEMU run state maps to a state that a later event or status leaves ([`RunState`]);
//! a new QEMU process (relaunched in the same directory) starts over: what the previous one's
//! guest answered counts for nothing.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::abi::AppStatus;
use crate::judge::Reboot;
use crate::sentinel::KernelReport;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Starting,
    Healthy,
    Late,
    Unresponsive,
    Recovered,
    Paused,
    Panicked,
    Gone,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Starting,
        State::Healthy,
        State::Late,
        State::Unresponsive,
        State::Recovered,
        State::Paused,
        State::Panicked,
        State::Gone,
    ];

    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Healthy => "healthy",
            State::Late => "late",
            State::Unresponsive => "unresponsive",
            State::Recovered => "recovered",
            State::Paused => "paused",
            State::Panicked => "panicked",
            State::Gone => "gone",
        }
    }

    /// States that start an incident: diagnostics run on entering them.
    pub fn is_failure(self) -> bool {
        matches!(self, State::Unresponsive | State::Panicked)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a paused VM (QMP `STOP`) means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PausePolicy {
    /// Shown as paused, but the VM is not running: missed probes still count, and a pause
    /// longer than a scenario's threshold makes it unresponsive (the default).
    Counts,
    /// Pauses are deliberate: probes do not count until the VM resumes.
    Exempt,
}

impl PausePolicy {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            PausePolicy::Counts => "counts",
            PausePolicy::Exempt => "exempt",
        }
    }
}

impl std::fmt::Display for PausePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// QEMU's run state (`query-status`), as the machine reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// The vCPUs do not run. `held`: the guest has not run in this QEMU yet (`prelaunch`
    /// after `-S` or a reset of a stopped VM, `inmigrate`), so its probes never count and it
    /// boots when it runs.
    Stopped { held: bool },
    /// `guest-panicked`.
    Panicked,
    /// `shutdown`: the guest powered off and QEMU stays (`-no-shutdown`).
    Off,
}

impl RunState {
    /// Every status QEMU 5.2 to 10 reports, and any newer one, maps to one of these: only
    /// `running` runs the vCPUs.
    pub fn of(status: &str) -> RunState {
        match status {
            "running" => RunState::Running,
            "prelaunch" | "inmigrate" => RunState::Stopped { held: true },
            "guest-panicked" => RunState::Panicked,
            "shutdown" => RunState::Off,
            // paused, suspended, postmigrate, finish-migrate, save-vm, restore-vm, debug, colo,
            // io-error, internal-error, watchdog, and states newer than this code.
            _ => RunState::Stopped { held: false },
        }
    }

    /// Why a VM in `status` is not running, for people.
    pub fn describe(status: &str) -> String {
        let why = match status {
            "prelaunch" => "QEMU waits for `cont` to start the VM (started with -S, or reset while stopped)",
            "inmigrate" => "QEMU waits for an incoming migration",
            "paused" => "the VM is paused",
            "suspended" => "the guest suspended itself (ACPI S3)",
            "postmigrate" => "the VM migrated away",
            "finish-migrate" | "save-vm" => "the VM is paused while QEMU saves it",
            "restore-vm" => "the VM is paused while QEMU restores it",
            "debug" => "the VM is stopped in the debugger",
            "io-error" => "QEMU stopped the VM on a disk I/O error",
            "internal-error" => "QEMU stopped the VM on an internal (accelerator) error",
            "watchdog" => "QEMU stopped the VM when its watchdog fired",
            _ => "the VM is not running",
        };
        format!("{why} (QEMU status {status})")
    }
}

/// Why the vCPUs are not running.
#[derive(Clone, Debug)]
struct Stopped {
    held: bool,
    why: String,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    pub latency: Option<Duration>,
    /// What happened, for people: "answered in 1.2 ms", "no record echoed request 41 within 1s".
    pub detail: String,
}

/// A state change and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
    pub evidence: Evidence,
}

/// What caused a transition, as sent in its event. One shape per cause, told apart by their
/// field names (so the JSON is the same as when it was built by hand); QMP events are kept as
/// QEMU sent them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Evidence {
    /// What the probes say: the machine settled on a new state.
    Probes(ProbeEvidence),
    /// QMP `query-status` on attaching.
    QmpStatus { qmp_status: String },
    /// A QMP event: `STOP`, `RESUME`, `RESET`, `SHUTDOWN`.
    QmpEvent { qmp_event: Value },
    /// The region showed a reboot.
    Region { region: Reboot },
    /// Why attaching to QEMU failed.
    Attach { attach: String },
    /// QEMU's QMP connection closed: `{}`.
    Closed(Nothing),
    /// The guest kernel's own report (the sentinel's), which moved the VM.
    Kernel { kernel_report: Box<KernelReport> },
    /// The panic, as QMP reported it (`GUEST_PANICKED`, `GUEST_CRASHLOADED`).
    Panic(Value),
}

/// `{}`, and only that (an untagged empty struct would match any object).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nothing {}

/// The machine's view when probes moved it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeEvidence {
    /// The scenario whose report moved it, or `tick`, `attached`, `unavailable`, `app-health`.
    pub cause: String,
    pub scenarios: Vec<ScenarioEvidence>,
    pub paused: bool,
    /// The panic still in force, if any.
    pub panic: Option<Value>,
    /// What the app says of its health, when it is not ok.
    pub app: Option<AppEvidence>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioEvidence {
    pub scenario: String,
    pub kind: String,
    pub consecutive_misses: u32,
    pub threshold: u32,
    pub last: Option<LastOutcome>,
    pub unavailable: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppEvidence {
    pub status: AppStatus,
    pub details: String,
}

/// A scenario as the machine sees it.
#[derive(Clone, Debug)]
pub struct Track {
    pub name: String,
    pub kind: &'static str,
    pub threshold: u32,
    /// Consecutive misses.
    pub misses: u32,
    pub total_misses: u64,
    pub total_ok: u64,
    pub ever_ok: bool,
    /// Answered since the VM was declared recovered.
    ok_since_recovery: bool,
    pub last: Option<Outcome>,
    pub last_ok: Option<Instant>,
    /// Why the scenario cannot run for this VM, if it cannot.
    pub unavailable: Option<String>,
}

impl Track {
    pub fn new(name: &str, kind: &'static str, threshold: u32) -> Track {
        Track {
            name: name.into(),
            kind,
            threshold,
            misses: 0,
            total_misses: 0,
            total_ok: 0,
            ever_ok: false,
            ok_since_recovery: false,
            last: None,
            last_ok: None,
            unavailable: None,
        }
    }

    fn active(&self) -> bool {
        self.unavailable.is_none()
    }

    fn evidence(&self) -> ScenarioEvidence {
        ScenarioEvidence {
            scenario: self.name.clone(),
            kind: self.kind.into(),
            consecutive_misses: self.misses,
            threshold: self.threshold,
            last: self.last.as_ref().map(|o| LastOutcome {
                ok: o.ok,
                detail: o.detail.clone(),
                latency_ms: o.latency.map(|l| l.as_secs_f64() * 1e3),
            }),
            unavailable: self.unavailable.clone(),
        }
    }
}

/// One VM's state machine.
#[derive(Clone, Debug)]
pub struct Machine {
    pub state: State,
    pub since: Instant,
    pub tracks: Vec<Track>,
    grace: Duration,
    grace_until: Instant,
    pause: PausePolicy,
    /// Why the vCPUs are not running, while they are not.
    stopped: Option<Stopped>,
    panicked: Option<Value>,
    /// What the app last said of its own health (app protocol or mailbox), if not ok.
    app: Option<(AppStatus, String)>,
    /// Between entering a failure state and recovering from it.
    pub incident: bool,
    /// The guest kernel's last report of each effect (unresponsive, late), while in force.
    kernel: Vec<KernelFault>,
    /// A drive's I/O error that makes QEMU stop the VM, and when: the `STOP` that follows is
    /// its doing.
    io_stop: Option<(String, Instant)>,
}

/// How long after a `BLOCK_IO_ERROR` with action `stop` its `STOP` is expected (QEMU sends it
/// at once, from its main loop).
const IO_STOP_WAIT: Duration = Duration::from_secs(2);
/// The start of the reason of a pause by an I/O error.
const IO_STOP: &str = "QEMU stopped the VM on a disk I/O error";

/// What the guest kernel reported, to the machine: the state it asks for and until when.
#[derive(Clone, Debug)]
pub struct KernelFault {
    /// [`State::Unresponsive`] or [`State::Late`].
    pub to: State,
    pub report: KernelReport,
    pub last: Instant,
    /// In force until this long after `last` without another report.
    pub clear_after: Duration,
}

impl KernelFault {
    fn in_force(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) < self.clear_after
    }
}

impl Machine {
    /// A machine for `tracks`, resuming `restored` (the state a previous run of the service
    /// left) so that a restart neither repeats nor loses an alert.
    pub fn new(
        tracks: Vec<Track>,
        restored: Option<(State, bool)>,
        pause: PausePolicy,
        grace: Duration,
        now: Instant,
    ) -> Machine {
        let (state, incident) = restored.unwrap_or((State::Starting, false));
        let mut m = Machine {
            state,
            since: now,
            tracks,
            grace,
            grace_until: now + grace,
            pause,
            stopped: None,
            panicked: None,
            app: None,
            incident,
            kernel: Vec::new(),
            io_stop: None,
        };
        if state == State::Panicked {
            m.panicked = Some(serde_json::json!({ "restored": true }));
        }
        if matches!(state, State::Healthy | State::Late | State::Recovered | State::Unresponsive) {
            // The VM was known to be up: its scenarios have answered before. A restored
            // failure counts as still failing until the probes show otherwise.
            for t in &mut m.tracks {
                t.ever_ok = true;
                if state == State::Unresponsive {
                    t.misses = t.threshold;
                }
            }
            m.grace_until = now;
        }
        m
    }

    /// QEMU's monitor answered on a new connection; `status` is QMP `query-status`'s status.
    /// Whatever the probes said before counts for nothing: every scenario must answer this
    /// QEMU afresh. `new_life`: this is not the QEMU process the machine saw last (relaunched in
    /// the same directory, possibly while the service was down): its guest starts over, with
    /// the start-up grace.
    pub fn attached(&mut self, status: &str, new_life: bool, now: Instant) -> Option<Transition> {
        self.stopped = None;
        self.io_stop = None;
        for t in &mut self.tracks {
            t.last = None;
        }
        if new_life || self.state == State::Gone {
            self.start_over(now);
            if self.state != State::Gone
                && self.state != State::Starting
                && RunState::of(status) == RunState::Running
            {
                let evidence = Evidence::QmpStatus { qmp_status: status.into() };
                return self.go(
                    State::Starting,
                    "QEMU was relaunched: its guest starts over".into(),
                    evidence,
                    now,
                );
            }
        }
        self.status(status, now)
    }

    /// QEMU's run state, as QMP `query-status` reports it (on attaching, and polled while the
    /// VM is not running or after a reset). Every run state leads to a state that can be left.
    pub fn status(&mut self, status: &str, now: Instant) -> Option<Transition> {
        let evidence = Evidence::QmpStatus { qmp_status: status.into() };
        match RunState::of(status) {
            RunState::Running => {
                if self.stopped.is_some() || self.state == State::Gone {
                    return self.resume("QEMU is running".into(), evidence, now);
                }
                self.settle(now, "status")
            }
            RunState::Panicked => {
                if self.state == State::Panicked && self.panicked.is_some() {
                    // Already known (from GUEST_PANICKED, whose evidence stays).
                    return None;
                }
                self.panicked = Some(serde_json::to_value(&evidence).expect("evidence serialises"));
                self.incident = true;
                self.go(State::Panicked, "QEMU reports the guest panicked".into(), evidence, now)
            }
            RunState::Off => {
                self.stopped = None;
                self.go(State::Gone, "the guest powered off; QEMU is still running".into(), evidence, now)
            }
            RunState::Stopped { held } => {
                let why = RunState::describe(status);
                match &mut self.stopped {
                    // Already known to be stopped: a poll saying `paused` adds nothing to QMP
                    // STOP; any other state is the newer word on why.
                    Some(s) => {
                        s.held |= held;
                        // `io-error` says less than the BLOCK_IO_ERROR that named the drive.
                        if status != "paused" && !(status == "io-error" && s.why.starts_with(IO_STOP)) {
                            s.why = why.clone();
                        }
                    }
                    None => self.stopped = Some(Stopped { held, why: why.clone() }),
                }
                if self.state == State::Gone
                    || held
                    || (self.state != State::Paused && !self.state.is_failure())
                {
                    if self.state == State::Gone {
                        self.start_over(now);
                    }
                    return self.go(State::Paused, why, evidence, now);
                }
                self.settle(now, "status")
            }
        }
    }

    /// A probe of scenario `index` finished.
    pub fn probe(&mut self, index: usize, outcome: Outcome, now: Instant) -> Option<Transition> {
        let exempt = self.stopped.as_ref().is_some_and(|s| s.held || self.pause == PausePolicy::Exempt);
        let t = self.tracks.get_mut(index)?;
        t.unavailable = None;
        if outcome.ok {
            t.misses = 0;
            t.total_ok += 1;
            t.ever_ok = true;
            t.ok_since_recovery = true;
            t.last_ok = Some(now);
        } else if !exempt {
            t.misses = t.misses.saturating_add(1);
            t.total_misses += 1;
        }
        let runs = outcome.ok && t.kind != "tcp";
        t.last = Some(outcome);
        if runs && self.stopped.as_ref().is_some_and(|s| !s.held) {
            // Only a running guest answers (a TCP connect may be QEMU's user-mode network
            // accepting it): the RESUME that `cont` sends is on its way. Judging the answer as a
            // paused VM's would leave the incident for `paused`, and the RESUME would open it
            // again as a second alert.
            self.stopped = None;
        }
        if self.panicked.is_some() && self.all_answering() {
            // A panicked kernel answers nothing: answering again means it was reset.
            self.panicked = None;
        }
        let name = self.tracks[index].name.clone();
        self.settle(now, &name)
    }

    /// Scenario `index` cannot run (no console, no thermal zone, ...): it stops counting.
    pub fn unavailable(&mut self, index: usize, why: String, now: Instant) -> Option<Transition> {
        let t = self.tracks.get_mut(index)?;
        t.unavailable = Some(why);
        t.misses = 0;
        self.settle(now, "unavailable")
    }

    /// QMP `STOP`.
    pub fn stopped(&mut self, event: Value, now: Instant) -> Option<Transition> {
        if self.stopped.is_some() {
            return None;
        }
        let io = self.io_stop.take().filter(|(_, at)| now.saturating_duration_since(*at) < IO_STOP_WAIT);
        let (why, reason) = match io {
            Some((why, _)) => (why.clone(), format!("{why} (QMP STOP)")),
            None => {
                ("the VM is paused (QMP STOP)".to_string(), "QEMU stopped the VM's vCPUs (QMP STOP)".into())
            }
        };
        self.stopped = Some(Stopped { held: false, why });
        if self.state.is_failure() || self.state == State::Gone {
            return None;
        }
        self.go(State::Paused, reason, Evidence::QmpEvent { qmp_event: event }, now)
    }

    /// A drive's I/O error made QEMU stop the VM (`BLOCK_IO_ERROR` with action `stop`: QEMU
    /// sends it just before its `STOP`, or, when a resumed VM retries the request, just after);
    /// `what` names the drive and the error. The pause that follows, or the one in force, is
    /// said to be that error's; returns the pause's new reason when one is in force.
    pub fn io_error_stop(&mut self, what: &str, now: Instant) -> Option<String> {
        let why = format!("{IO_STOP}: {what}");
        match &mut self.stopped {
            Some(s) if !s.held => {
                s.why = why.clone();
                Some(why)
            }
            Some(_) => None,
            None => {
                self.io_stop = Some((why, now));
                None
            }
        }
    }

    /// QMP `RESUME`.
    pub fn resumed(&mut self, event: Value, now: Instant) -> Option<Transition> {
        if self.stopped.is_none() && self.state != State::Gone {
            return None;
        }
        self.resume("QEMU resumed the VM (QMP RESUME)".into(), Evidence::QmpEvent { qmp_event: event }, now)
    }

    /// The vCPUs run again (QMP `RESUME`, or a status poll says so).
    fn resume(&mut self, reason: String, evidence: Evidence, now: Instant) -> Option<Transition> {
        let stopped = self.stopped.take();
        self.io_stop = None;
        let held = stopped.as_ref().is_some_and(|s| s.held);
        if self.pause == PausePolicy::Exempt {
            for t in &mut self.tracks {
                t.misses = 0;
            }
        }
        // What the probes said before the pause no longer decides anything.
        for t in &mut self.tracks {
            t.last = None;
        }
        if held || self.state == State::Gone {
            // The guest runs for the first time in this QEMU (after -S, a reset or a relaunch):
            // it boots now.
            self.start_over(now);
            return self.go(State::Starting, reason, evidence, now);
        }
        if self.state != State::Paused {
            return None;
        }
        let to = if self.incident { State::Unresponsive } else { State::Starting };
        self.go(to, reason, evidence, now)
    }

    /// The guest boots afresh: misses and past answers are forgotten, the grace restarts.
    fn start_over(&mut self, now: Instant) {
        self.panicked = None;
        // The app's word was about the previous guest's app.
        self.app = None;
        self.kernel.clear();
        for t in &mut self.tracks {
            t.misses = 0;
            t.ever_ok = false;
            t.ok_since_recovery = false;
            t.last = None;
        }
        self.restart_grace(now);
    }

    /// QMP `GUEST_PANICKED` (pvpanic).
    pub fn panicked(&mut self, event: Value, now: Instant) -> Option<Transition> {
        self.panicked = Some(event.clone());
        if self.state == State::Panicked {
            return None;
        }
        self.incident = true;
        let evidence = Evidence::Panic(event);
        self.go(State::Panicked, "the guest kernel panicked (pvpanic GUEST_PANICKED)".into(), evidence, now)
    }

    /// The guest rebooted (QMP `RESET`, or the region's boot count or timer says so). Not a
    /// failure: the start-up grace begins again.
    pub fn rebooted(&mut self, evidence: Evidence, now: Instant) -> Option<Transition> {
        self.panicked = None;
        self.kernel.clear();
        for t in &mut self.tracks {
            t.misses = 0;
            t.ever_ok = false;
        }
        self.restart_grace(now);
        if self.state == State::Starting || self.state == State::Gone {
            return None;
        }
        // A reset does not resume stopped vCPUs (QEMU goes to prelaunch): still paused.
        let to = if self.stopped.is_some() { State::Paused } else { State::Starting };
        self.go(to, "the guest rebooted".into(), evidence, now)
    }

    /// QEMU went away (QMP closed) or powered the guest off.
    pub fn gone(&mut self, why: String, evidence: Evidence, now: Instant) -> Option<Transition> {
        self.stopped = None;
        self.panicked = None;
        self.kernel.clear();
        for t in &mut self.tracks {
            t.misses = 0;
        }
        self.go(State::Gone, why, evidence, now)
    }

    /// The app reported its own health: `failed` is a failure (diagnostics run), `degraded`
    /// makes the VM late, `ok` clears either.
    pub fn app_health(&mut self, status: AppStatus, details: String, now: Instant) -> Option<Transition> {
        self.app = match status {
            AppStatus::Degraded | AppStatus::Failed => Some((status, details)),
            AppStatus::Ok | AppStatus::Unknown => None,
        };
        self.settle(now, "app-health")
    }

    /// Time passed: the start-up grace may have ended, a kernel report's effect may have
    /// lapsed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        self.kernel.retain(|k| k.in_force(now));
        self.settle(now, "tick")
    }

    /// The guest kernel reported a fault that makes the VM `to` ([`State::Unresponsive`] or
    /// [`State::Late`]) until `clear_after` passes without another report of that effect; the
    /// more severe one in force decides.
    pub fn kernel_report(
        &mut self,
        report: &KernelReport,
        to: State,
        clear_after: Duration,
        now: Instant,
    ) -> Option<Transition> {
        self.kernel.retain(|k| k.to != to);
        self.kernel.push(KernelFault { to, report: report.clone(), last: now, clear_after });
        self.settle(now, "kernel-report")
    }

    /// The guest kernel's report of a panic (the console's word; QMP's `GUEST_PANICKED` may
    /// say the same or never come, without pvpanic).
    pub fn kernel_panic(&mut self, report: &KernelReport, now: Instant) -> Option<Transition> {
        self.panicked = Some(serde_json::to_value(report).expect("reports serialise"));
        if self.state == State::Panicked {
            return None;
        }
        self.incident = true;
        let evidence = Evidence::Kernel { kernel_report: Box::new(report.clone()) };
        self.go(State::Panicked, format!("the guest kernel panicked: {}", report.line), evidence, now)
    }

    /// The kernel report in force that makes the VM `to`, if any.
    pub fn kernel_fault(&self, to: State, now: Instant) -> Option<&KernelFault> {
        self.kernel.iter().find(|k| k.to == to && k.in_force(now))
    }

    fn restart_grace(&mut self, now: Instant) {
        self.grace_until = now + self.grace;
    }

    fn tracks_failing(&self) -> bool {
        self.tracks.iter().any(|t| t.active() && t.misses >= t.threshold)
    }

    fn all_answering(&self) -> bool {
        let mut active = self.tracks.iter().filter(|t| t.active()).peekable();
        active.peek().is_some() && active.all(|t| t.ever_ok && t.misses == 0)
    }

    /// Moves to what the probes say now.
    fn settle(&mut self, now: Instant, cause: &str) -> Option<Transition> {
        if self.state == State::Gone {
            // Left only by what QEMU says of itself (attach, status, RESUME, RESET).
            return None;
        }
        if self.tracks.iter().any(|t| t.active() && t.last.is_none()) && !self.tracks_failing() {
            // A scenario has not reported since the machine started or the VM resumed.
            return None;
        }
        let (to, reason) = self.evaluate(now);
        if to == self.state {
            return None;
        }
        if to == State::Recovered && self.incident {
            self.incident = false;
            for t in &mut self.tracks {
                t.ok_since_recovery = false;
            }
        }
        if let Some(k) = self.kernel_fault(to, now).filter(|k| reason == kernel_reason(&k.report)) {
            let evidence = Evidence::Kernel { kernel_report: Box::new(k.report.clone()) };
            return self.go(to, reason, evidence, now);
        }
        let evidence = Evidence::Probes(ProbeEvidence {
            cause: cause.into(),
            scenarios: self.tracks.iter().map(Track::evidence).collect(),
            paused: self.stopped.is_some(),
            panic: self.panicked.clone(),
            app: self
                .app
                .as_ref()
                .map(|(status, details)| AppEvidence { status: *status, details: details.clone() }),
        });
        self.go(to, reason, evidence, now)
    }

    fn evaluate(&self, now: Instant) -> (State, String) {
        if let Some(p) = &self.panicked {
            return (State::Panicked, format!("the guest kernel panicked: {p}"));
        }
        if let Some(s) = &self.stopped {
            if s.held {
                // The guest has not run in this QEMU yet: nothing can hang.
                return (State::Paused, s.why.clone());
            }
            if self.pause == PausePolicy::Exempt {
                return (State::Paused, format!("{} (pauses are exempt)", s.why));
            }
        }
        if let Some((AppStatus::Failed, details)) = &self.app {
            return (State::Unresponsive, format!("the app reports it failed: {details}"));
        }
        if let Some(k) = self.kernel_fault(State::Unresponsive, now) {
            // Whatever the probes say: a stuck CPU need not be the one that answers them.
            return (State::Unresponsive, kernel_reason(&k.report));
        }
        let active: Vec<&Track> = self.tracks.iter().filter(|t| t.active()).collect();
        // The start-up grace is per scenario: it covers a scenario only until its first answer
        // in this life. One that answered is judged from then on, and one still waiting for
        // its first answer is judged once the grace is over, whatever the others do.
        let in_grace = now < self.grace_until;
        let failing: Vec<&Track> =
            active.iter().copied().filter(|t| t.misses >= t.threshold && (t.ever_ok || !in_grace)).collect();
        if !failing.is_empty() {
            let mut reason = describe(&failing, "missed");
            let answering: Vec<&Track> =
                active.iter().copied().filter(|t| t.misses == 0 && t.ever_ok).collect();
            if !answering.is_empty() {
                reason.push_str(&format!(", while {}", describe(&answering, "answers")));
                if answering.iter().any(|t| t.kind == "acpi-heartbeat" || t.kind == "thermal")
                    && failing.iter().all(|t| t.kind != "acpi-heartbeat" && t.kind != "thermal")
                {
                    // A stuck vCPU is the kernel's own failure: "alive" would read wrong there.
                    if failing.iter().all(|t| t.kind == "vcpu-progress") {
                        reason.push_str(": the vCPU that takes its interrupt runs, another is stuck");
                    } else {
                        reason
                            .push_str(": the guest kernel is alive but what the failing probes need is not");
                    }
                }
            }
            if let Some(s) = &self.stopped {
                reason = format!("{} and {reason}", s.why);
            }
            return (State::Unresponsive, reason);
        }
        if let Some(s) = &self.stopped {
            return (State::Paused, s.why.clone());
        }
        if active.is_empty() {
            return (State::Starting, "no scenario can run for this VM".into());
        }
        let missing: Vec<&Track> = active.iter().copied().filter(|t| t.misses > 0).collect();
        let never: Vec<&Track> = active.iter().copied().filter(|t| !t.ever_ok).collect();
        if self.state == State::Starting && (!never.is_empty() || !missing.is_empty()) {
            return (State::Starting, "waiting for every scenario's first answer".into());
        }
        if let Some((AppStatus::Degraded, details)) = &self.app {
            return (State::Late, format!("the app reports it is degraded: {details}"));
        }
        if let Some(k) = self.kernel_fault(State::Late, now) {
            return (State::Late, kernel_reason(&k.report));
        }
        if !missing.is_empty() || !never.is_empty() {
            let mut late = missing.clone();
            late.extend(never.iter().copied().filter(|t| t.misses == 0));
            return (State::Late, describe(&late, "missed"));
        }
        if self.incident {
            return (State::Recovered, format!("{} again", describe(&active, "answers")));
        }
        if self.state == State::Recovered && active.iter().any(|t| !t.ok_since_recovery) {
            return (State::Recovered, String::new());
        }
        (State::Healthy, describe(&active, "answers"))
    }

    fn go(&mut self, to: State, reason: String, evidence: Evidence, now: Instant) -> Option<Transition> {
        if to == self.state {
            return None;
        }
        if to.is_failure() {
            self.incident = true;
        }
        let from = std::mem::replace(&mut self.state, to);
        self.since = now;
        Some(Transition { from, to, reason, evidence })
    }
}

/// A transition's reason when a kernel report decided it.
fn kernel_reason(r: &KernelReport) -> String {
    r.summary()
}

/// "acpi-heartbeat missed 3 of 3 (no record ...)", joined with "; ".
fn describe(tracks: &[&Track], verb: &str) -> String {
    tracks
        .iter()
        .map(|t| {
            let last = t.last.as_ref().map(|o| o.detail.as_str()).unwrap_or("no answer yet");
            match verb {
                "missed" => format!("{} missed {} of {} ({last})", t.name, t.misses, t.threshold),
                _ => format!("{} {verb} ({last})", t.name),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
