//! One VM under acpimon: heartbeats at an interval, judged as they arrive, QMP events
//! reported, until QEMU exits or the time is up. [`command`] is `acpimon run`.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::generate::SsdtConfig;
use crate::judge::{Observation, Tracker};
use crate::launch::channel::Channel;
use crate::launch::{Extras, PrepareError, Vm, VmError, VmSpec};
use crate::read::GuestRecord;
use crate::trigger::qmp::QmpError;
use crate::trigger::{Beat, Heartbeat, TriggerError};

#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Time between heartbeats.
    pub interval: Duration,
    /// How long a heartbeat waits for its echo.
    pub timeout: Duration,
    /// Stop (and quit QEMU) after this long; `None` runs until QEMU exits.
    pub duration: Option<Duration>,
    /// How long the VM may run without the guest's first record before heartbeats start
    /// anyway (time it spends paused does not count).
    pub boot_timeout: Duration,
    /// Resume a VM that QEMU started paused (`-S`) with `cont`; `false` waits for the
    /// user's own `cont` (`--wait-cont`).
    pub cont: bool,
}

/// How long a guest's kernel may run (its banner on the console) with BAR2 still unassigned
/// before that is reported: Linux assigns what the firmware left during its PCI scan.
const KERNEL_UNASSIGNED_WAIT: Duration = Duration::from_secs(10);
/// How long a guest's kernel may run without the boot record: the table's `_INI` runs when
/// the kernel loads its ACPI tables, seconds after its banner even under TCG.
const KERNEL_NO_RECORD_WAIT: Duration = Duration::from_secs(20);
/// What shows the guest's kernel runs, on its console (printed first when it boots).
const KERNEL_BANNER: &str = "Linux version";

/// What the loop reports as it goes.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum RunEvent {
    /// The guest's first record since launch (normally `_INI`'s): heartbeats start now.
    Booted {
        #[serde(with = "crate::trigger::secs")]
        after: Duration,
        record: GuestRecord,
    },
    Beat {
        beat: Beat,
        observation: Observation,
    },
    /// The channel the records use, or why there is none.
    Channel {
        channel: crate::launch::channel::Channel,
    },
    /// A QMP event (STOP, RESUME, GUEST_PANICKED, SHUTDOWN, ...).
    Qmp {
        name: String,
    },
    /// A heartbeat could not be sent, or no channel appeared (with why).
    Error {
        message: String,
    },
    /// What acpimon did or waits for: resuming a VM started with `-S`, a VM not running.
    Notice {
        message: String,
    },
}

/// Latency percentiles and counts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Beats sent before the first acknowledged one, while the guest's GED driver was not yet
    /// bound; not counted below.
    pub startup: u64,
    pub sent: u64,
    pub acked: u64,
    pub missed: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Why no heartbeat could be acknowledged, when that is known (no channel, the VM never
    /// ran, no boot record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Summary {
    pub fn from_latencies(mut ms: Vec<f64>, sent: u64, errors: u64, startup: u64) -> Summary {
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| if ms.is_empty() { 0.0 } else { ms[((ms.len() - 1) as f64 * p).round() as usize] };
        Summary {
            startup,
            sent,
            acked: ms.len() as u64,
            missed: sent - ms.len() as u64 - errors,
            errors,
            p50_ms: pct(0.5),
            p90_ms: pct(0.9),
            p99_ms: pct(0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
            problem: None,
        }
    }
}

/// How waiting for the guest's first record ended.
enum BootWait {
    /// The first record, after this long.
    Booted(Duration, GuestRecord),
    /// QEMU exited.
    Exited,
    /// No record, and why: heartbeats start anyway.
    NoRecord(String),
    /// The VM was not running when `--duration` ran out, and no record came: nothing to
    /// heartbeat.
    NeverRan(String),
}

/// Waits for a record newer than the one the region held at launch, saying why there is none
/// as soon as that is known: QEMU's run state (a paused VM is waited for, never blamed on the
/// firmware), BAR2 where no AML can reach it, or a kernel that runs without the record.
async fn wait_for_boot(vm: &mut Vm, opts: &RunOptions, report: &mut impl FnMut(&RunEvent)) -> BootWait {
    let seq_at_launch = vm.region.snapshot().ok().and_then(|s| s.record).map(|r| r.seq);
    let start = Instant::now();
    // Time the vCPUs ran, and when (in that time) the kernel's banner appeared.
    let (mut ran, mut kernel_at) = (Duration::ZERO, None::<Duration>);
    let (mut status, mut checked, mut last) = (String::new(), None::<Instant>, Instant::now());
    loop {
        if vm.try_wait().ok().flatten().is_some() {
            return BootWait::Exited;
        }
        if let Some(r) = vm.region.snapshot().ok().and_then(|s| s.record) {
            if Some(r.seq) != seq_at_launch {
                return BootWait::Booted(start.elapsed(), r);
            }
        }
        // On the port channel the boot record comes as a frame.
        if let Some(f) = vm.completion.doorbell().and_then(|b| b.latest_frame()) {
            return BootWait::Booted(start.elapsed(), crate::read::frame::frame_record(&f, 0));
        }
        let now = Instant::now();
        if status == "running" {
            ran += now - last;
        }
        last = now;
        if checked.is_none_or(|c| c.elapsed() >= Duration::from_millis(500)) {
            checked = Some(now);
            let s = match vm.qmp.status(Duration::from_secs(2)).await {
                Ok(s) => s.status,
                Err(QmpError::Closed) => return BootWait::Exited,
                Err(_) => status.clone(),
            };
            if s != status {
                if s == "prelaunch" && opts.cont {
                    report(&RunEvent::Notice {
                        message: "QEMU was started paused (-S): acpimon resumes it with `cont` (--wait-cont leaves that to you)".into(),
                    });
                    if let Err(e) = vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await {
                        report(&RunEvent::Error { message: format!("cannot resume the VM (QMP cont): {e}") });
                    }
                } else if s == "prelaunch" {
                    report(&RunEvent::Notice {
                        message: "QEMU was started paused (-S) and waits for your `cont` (--wait-cont): heartbeats start once the guest has booted".into(),
                    });
                } else if s != "running" {
                    let why = crate::watch::state::RunState::describe(&s);
                    report(&RunEvent::Notice { message: format!("{why}: waiting for it to run") });
                }
                status = s;
            }
            if status != "running" {
                if opts.duration.is_some_and(|d| start.elapsed() >= d) {
                    let why = crate::watch::state::RunState::describe(&status);
                    let what = if ran.is_zero() {
                        "the VM never ran"
                    } else {
                        "the VM stopped before its guest booted"
                    };
                    return BootWait::NeverRan(format!("{what}: {why}"));
                }
            } else {
                if kernel_at.is_none() && vm.console().is_ok_and(|c| c.tail().contains(KERNEL_BANNER)) {
                    kernel_at = Some(ran);
                }
                let kernel_for = kernel_at.map(|k| ran - k);
                match vm.channel().await {
                    Ok(c @ (Channel::AboveFourGib { .. } | Channel::NoDevice)) => {
                        let why = format!("no channel: {c}");
                        report(&RunEvent::Channel { channel: c });
                        return BootWait::NoRecord(why);
                    }
                    Ok(c @ Channel::Unassigned)
                        if kernel_for.is_some_and(|k| k >= KERNEL_UNASSIGNED_WAIT) =>
                    {
                        let why = format!(
                            "no channel: the guest's kernel has run for {} and ivshmem BAR2 is still unassigned",
                            crate::units::format_duration(KERNEL_UNASSIGNED_WAIT)
                        );
                        report(&RunEvent::Channel { channel: c });
                        return BootWait::NoRecord(why);
                    }
                    Ok(Channel::Region { bar }) if kernel_for.is_some_and(|k| k >= KERNEL_NO_RECORD_WAIT) => {
                        return BootWait::NoRecord(format!(
                            "no boot record {} after the guest's kernel started, though ivshmem BAR2 is at {bar:#x}: \
                             the kernel did not load acpimon's table or its _INI cannot reach the region \
                             (ACPI disabled, e.g. acpi=off? the table not passed to QEMU?)",
                            crate::units::format_duration(KERNEL_NO_RECORD_WAIT)
                        ));
                    }
                    _ => {}
                }
                if ran >= opts.boot_timeout {
                    return BootWait::NoRecord(format!(
                        "no record from the guest within {} of running: its AML cannot reach the region, or it has not booted",
                        crate::units::format_duration(opts.boot_timeout)
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs heartbeats until QEMU exits or `opts.duration` passes (then QEMU is asked to quit).
pub async fn run(
    vm: &mut Vm,
    opts: RunOptions,
    mut report: impl FnMut(&RunEvent),
) -> Result<Summary, TriggerError> {
    let mut hb =
        Heartbeat::new(vm.region.clone(), vm.prepared.descriptor.irq)?.with_completion(vm.completion.clone());
    let mut events = vm.qmp.events();
    let mut tracker = Tracker::new();
    // Beats before the guest's GED driver is bound would only count as misses.
    let mut problem = None;
    match wait_for_boot(vm, &opts, &mut report).await {
        BootWait::Booted(after, record) => {
            tracker.observe(Some(&record), Instant::now());
            report(&RunEvent::Booted { after, record });
            if let Ok(channel) = vm.channel().await {
                hb = hb.with_port_channel(matches!(channel, Channel::Port { .. }));
                report(&RunEvent::Channel { channel });
            }
        }
        BootWait::NoRecord(why) => {
            report(&RunEvent::Error { message: format!("{why}; heartbeats start anyway") });
            problem = Some(why);
        }
        BootWait::NeverRan(why) => {
            report(&RunEvent::Error { message: why.clone() });
            let _ = vm.shutdown().await;
            return Ok(Summary { problem: Some(why), ..Summary::default() });
        }
        BootWait::Exited => return Ok(Summary::default()),
    }
    let (mut latencies, mut sent, mut errors, mut startup) = (Vec::new(), 0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut tick = tokio::time::interval(opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            let _ = vm.shutdown().await;
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            ev = events.recv() => {
                if let Ok(ev) = ev {
                    report(&RunEvent::Qmp { name: ev.name });
                }
                continue;
            }
        }
        if vm.try_wait().ok().flatten().is_some() {
            break;
        }
        let beat = match hb.beat(&vm.qmp, opts.timeout).await {
            Ok(beat) => beat,
            Err(TriggerError::Qmp(QmpError::Closed)) => break,
            Err(e) => {
                sent += 1;
                errors += 1;
                report(&RunEvent::Error { message: e.to_string() });
                continue;
            }
        };
        let record = match &beat {
            Beat::Acked { latency, record, .. } => {
                latencies.push(latency.as_secs_f64() * 1e3);
                Some(*record)
            }
            Beat::Missed { last, .. } => *last,
        };
        // Misses before the first acknowledgement are the GED driver not yet bound.
        match (&beat, latencies.is_empty()) {
            (Beat::Missed { .. }, true) => startup += 1,
            _ => sent += 1,
        }
        let observation = tracker.observe(record.as_ref(), Instant::now());
        report(&RunEvent::Beat { beat, observation });
    }
    let mut summary = Summary::from_latencies(latencies, sent, errors, startup);
    if summary.acked == 0 {
        summary.problem = problem;
    }
    Ok(summary)
}

/// `acpimon run`, validated: the VM to prepare and launch, and how to watch it.
#[derive(Clone, Debug)]
pub struct RunCommand {
    pub state_dir: PathBuf,
    pub name: String,
    pub ssdt: SsdtConfig,
    pub extras: Extras,
    /// Pass acpimon's QEMU options as a -readconfig file, as EVE does.
    pub readconfig: bool,
    /// JSON lines instead of text.
    pub json: bool,
    pub options: RunOptions,
    /// The chardev of the guest's console (`--console-chardev`), else found in `args`.
    pub console_chardev: Option<String>,
    /// The QEMU program and the user's arguments.
    pub program: String,
    pub args: Vec<String>,
}

/// How `acpimon run` can end other than with QEMU exiting 0.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    #[error("{missed} of {sent} heartbeats were not acknowledged")]
    Unacknowledged { missed: u64, sent: u64 },
    /// Not one heartbeat acknowledged: `why` is what is known of the cause.
    #[error("no heartbeat was acknowledged: {why}")]
    NoAnswer { why: String },
    /// QEMU ended unsuccessfully; the binary reports its status apart from its own.
    #[error("QEMU exited unsuccessfully ({0})")]
    Qemu(ExitStatus),
    #[error("lost track of the QEMU process: {0}")]
    Wait(std::io::Error),
}

/// `acpimon run`: prepare, launch, heartbeat until QEMU exits or the duration passes,
/// printing each event and the summary on stdout.
pub async fn command(cmd: RunCommand) -> Result<(), RunError> {
    let prepared = crate::launch::prepare_with(&cmd.state_dir, &cmd.name, &cmd.ssdt, cmd.extras)?;
    let spec = VmSpec {
        program: cmd.program,
        args: cmd.args,
        prepared,
        readconfig: cmd.readconfig,
        leave_to_watch: false,
        console_chardev: cmd.console_chardev,
    };
    let mut vm = Vm::launch(spec).await?;
    let json = cmd.json;
    if !json {
        let d = &vm.prepared.descriptor;
        println!(
            "acpimon: {} launched (QEMU {}.{}.{}); state in {}; heartbeat IRQ {} every {} ms",
            d.name,
            vm.qmp.version.0,
            vm.qmp.version.1,
            vm.qmp.version.2,
            vm.prepared.dir.display(),
            d.irq,
            cmd.options.interval.as_millis()
        );
        for note in &vm.notes {
            println!("acpimon: {note}");
        }
        if let Err(why) = vm.console() {
            println!("acpimon: console unavailable ({why}); monitoring without it");
        }
    }
    let summary = run(&mut vm, cmd.options, |ev: &RunEvent| {
        if json {
            println!("{}", serde_json::to_string(ev).expect("events serialise"));
        } else {
            println!("{}", crate::report::run_event_line(ev));
        }
    })
    .await?;
    if json {
        println!("{}", serde_json::json!({ "type": "summary", "summary": summary }));
    } else {
        println!("{}", crate::report::summary_line(&summary));
    }
    if cmd.options.duration.is_some() {
        if summary.acked == 0 {
            let why = summary.problem.unwrap_or_else(|| {
                format!(
                    "{} sent while the guest's GED driver was not bound yet; run longer (--duration) or see the beats above",
                    summary.startup
                )
            });
            return Err(RunError::NoAnswer { why });
        }
        return match summary.sent - summary.acked {
            0 => Ok(()),
            missed => Err(RunError::Unacknowledged { missed, sent: summary.sent }),
        };
    }
    let status = vm.wait().await.map_err(RunError::Wait)?;
    if status.success() {
        Ok(())
    } else {
        Err(RunError::Qemu(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = Summary::from_latencies((1..=100).map(f64::from).collect(), 102, 1, 3);
        assert_eq!((s.acked, s.missed, s.errors), (100, 1, 1));
        assert_eq!((s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms), (51.0, 90.0, 99.0, 100.0));
        assert_eq!(s.startup, 3);
        assert_eq!(Summary::from_latencies(vec![], 0, 0, 0).p99_ms, 0.0);
    }
}
