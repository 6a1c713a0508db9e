//! One VM under acpimon: heartbeats at an interval, judged as they arrive, QMP events
//! reported, until QEMU exits or the time is up. [`command`] is `acpimon run`.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::generate::SsdtConfig;
use crate::judge::{Observation, Tracker};
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
    /// How long to wait for the guest's first record before heartbeats start anyway.
    pub boot_timeout: Duration,
}

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
    /// A heartbeat could not be sent.
    Error {
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
        }
    }
}

/// Waits for a record newer than the one the region held at launch. `Err` when QEMU exits.
async fn wait_for_first_record(
    vm: &mut Vm,
    timeout: Duration,
) -> Result<Option<(Duration, GuestRecord)>, ()> {
    let seq_at_launch = vm.region.snapshot().ok().and_then(|s| s.record).map(|r| r.seq);
    let start = Instant::now();
    while start.elapsed() < timeout {
        if vm.try_wait().ok().flatten().is_some() {
            return Err(());
        }
        if let Some(r) = vm.region.snapshot().ok().and_then(|s| s.record) {
            if Some(r.seq) != seq_at_launch {
                return Ok(Some((start.elapsed(), r)));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// Runs heartbeats until QEMU exits or `opts.duration` passes (then QEMU is asked to quit).
pub async fn run(
    vm: &mut Vm,
    opts: RunOptions,
    mut report: impl FnMut(&RunEvent),
) -> Result<Summary, TriggerError> {
    let mut hb = Heartbeat::new(vm.region.clone(), vm.prepared.descriptor.irq)?;
    let mut events = vm.qmp.events();
    let mut tracker = Tracker::new();
    // Beats before the guest's GED driver is bound would only count as misses.
    match wait_for_first_record(vm, opts.boot_timeout).await {
        Ok(Some((after, record))) => {
            tracker.observe(Some(&record), Instant::now());
            report(&RunEvent::Booted { after, record });
        }
        Ok(None) => report(&RunEvent::Error {
            message: format!(
                "no record from the guest within {}: its AML cannot reach the region, or it has not booted; heartbeats start anyway",
                crate::units::format_duration(opts.boot_timeout)
            ),
        }),
        Err(()) => return Ok(Summary::default()),
    }
    if let Ok(channel) = vm.channel().await {
        report(&RunEvent::Channel { channel });
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
    Ok(Summary::from_latencies(latencies, sent, errors, startup))
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
            "acpimon: {} running (QEMU {}.{}.{}); state in {}; heartbeat IRQ {} every {} ms",
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
        return match summary.sent - summary.acked {
            0 if summary.sent > 0 => Ok(()),
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
