//! `acpimon-bench guest-cost`: what a heartbeat costs the guest, in the guest kernel's own
//! words. A 1-vCPU test guest runs a CPU-bound task (a shell busy loop) while the host beats
//! at each rate in turn, after a window without beats (the baseline of the same run). The
//! figures come from the guest's scheduler accounting (`/proc/PID/sched` with
//! `kernel.sched_schedstats=1`, read over the console), not from a clock of ours:
//!
//! - the GED's IRQ thread (`irq/N-ACPI:Ged`, which runs the AML): CPU time per beat
//!   (`sum_exec_runtime`) and its longest single run (`exec_max`);
//! - the busy task: its longest wait while runnable (`wait_max`, the worst interruption an app
//!   sees: the IRQ thread is SCHED_FIFO and preempts it) and its total wait per second.
//!
//! Under TCG every guest instruction is emulated: the figures are upper bounds for KVM.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use acpimon::console::Console;
use acpimon::generate::SsdtConfig;
use acpimon::launch::{self, Vm, VmSpec};
use acpimon::trigger::{Beat, Heartbeat};

/// One window: the host beating at `rate_hz` (0: the baseline) for the window's length.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    pub rate_hz: f64,
    pub seconds: f64,
    pub beats: u64,
    pub acked: u64,
    /// The GED IRQ thread's CPU time per acknowledged beat, µs.
    pub ged_us_per_beat: Option<f64>,
    /// Its longest single run, µs.
    pub ged_exec_max_us: f64,
    /// The busy task's longest wait while runnable, µs.
    pub busy_wait_max_us: f64,
    /// Its total wait while runnable per second of the window, µs.
    pub busy_wait_us_per_s: f64,
}

/// What `--json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub qemu: String,
    pub kernel: String,
    pub vcpus: u32,
    /// The baseline first.
    pub windows: Vec<Window>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestCostError {
    #[error(transparent)]
    Prepare(#[from] acpimon::launch::PrepareError),
    #[error(transparent)]
    Vm(#[from] acpimon::launch::VmError),
    #[error(transparent)]
    Trigger(#[from] acpimon::trigger::TriggerError),
    #[error(transparent)]
    Region(#[from] acpimon::read::RegionError),
    #[error("the guest's console is not connected: {0}")]
    Console(String),
    #[error("the guest acknowledged no heartbeat within 120 s; check that it boots with `acpimon demo --guest DIR`")]
    NotReady,
    #[error("the guest's shell did not answer `{0}` within 60 s on its console")]
    Shell(String),
    #[error("the guest kernel cannot say: {0} (it needs CONFIG_SCHED_DEBUG and CONFIG_SCHEDSTATS, as Debian's kernels have)")]
    Accounting(String),
}

/// Boots the guest of `fixture` in `state_dir` and measures a baseline window, then one window
/// per rate in `rates_hz`.
pub async fn run(
    fixture: &Path,
    rates_hz: &[f64],
    window: Duration,
    state_dir: &Path,
    say: impl Fn(&str),
) -> Result<Report, GuestCostError> {
    let prepared = launch::prepare(state_dir, "bench-guest-cost", &SsdtConfig::default())?;
    let spec = VmSpec {
        program: "qemu-system-x86_64".into(),
        args: acpimon::demo::guest_args(fixture, "pc", false),
        prepared,
        readconfig: false,
        leave_to_watch: false,
        console_chardev: None,
    };
    say("booting the guest (1 vCPU)");
    let mut vm = Vm::launch(spec).await?;
    let result = measure(&vm, rates_hz, window, &say).await;
    let _ = vm.shutdown().await;
    result
}

async fn measure(
    vm: &Vm,
    rates_hz: &[f64],
    window: Duration,
    say: &impl Fn(&str),
) -> Result<Report, GuestCostError> {
    let console = vm.console().map_err(|e| GuestCostError::Console(e.to_string()))?;
    let mut hb = Heartbeat::new(vm.region.clone(), vm.prepared.descriptor.irq)?;
    let start = Instant::now();
    while !matches!(hb.beat(&vm.qmp, Duration::from_millis(500)).await?, Beat::Acked { .. }) {
        if start.elapsed() > Duration::from_secs(120) {
            return Err(GuestCostError::NotReady);
        }
    }
    let mut shell = Shell { console, n: 0 };
    shell.ready().await?;
    let kernel = shell.run("uname -r").await?.trim().to_string();
    // The GED's IRQ thread, the busy task, and the accounting that gives maxima.
    let setup = "echo 1 >/proc/sys/kernel/sched_schedstats; \
                 for p in /proc/[0-9]*; do case \"$(cat $p/comm 2>/dev/null)\" in *ACPI:Ged*) G=${p#/proc/};; esac; done; \
                 (while :; do :; done) & B=$!; echo \"ged=$G busy=$B\"";
    let out = shell.run(setup).await?;
    let pid = |key: &str| {
        out.split_whitespace()
            .filter_map(|w| w.strip_prefix(key))
            .find(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string)
    };
    let (Some(ged), Some(busy)) = (pid("ged="), pid("busy=")) else {
        return Err(GuestCostError::Accounting(format!("no GED IRQ thread or busy task: {out:?}")));
    };
    let mut windows = Vec::new();
    for &rate in std::iter::once(&0.0).chain(rates_hz) {
        say(&format!(
            "{} for {window:?}",
            if rate == 0.0 { "no beats".into() } else { format!("{rate} Hz") }
        ));
        // Writing to /proc/PID/sched clears the task's statistics.
        shell.run(&format!("echo 0 >/proc/{ged}/sched; echo 0 >/proc/{busy}/sched")).await?;
        let before = sched(&mut shell, &ged).await?;
        let t = Instant::now();
        let (mut beats, mut acked) = (0u64, 0u64);
        if rate > 0.0 {
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut next = tokio::time::Instant::now();
            while t.elapsed() < window {
                beats += 1;
                if let Beat::Acked { .. } = hb.beat(&vm.qmp, Duration::from_secs(1)).await? {
                    acked += 1;
                }
                next += period;
                tokio::time::sleep_until(next).await;
            }
        } else {
            tokio::time::sleep(window).await;
        }
        let seconds = t.elapsed().as_secs_f64();
        let g = sched(&mut shell, &ged).await?;
        let b = sched(&mut shell, &busy).await?;
        windows.push(Window {
            rate_hz: rate,
            seconds,
            beats,
            acked,
            ged_us_per_beat: (acked > 0).then(|| (g.exec_ms - before.exec_ms) * 1e3 / acked as f64),
            ged_exec_max_us: g.exec_max_ms * 1e3,
            busy_wait_max_us: b.wait_max_ms * 1e3,
            busy_wait_us_per_s: b.wait_sum_ms * 1e3 / seconds,
        });
    }
    shell.run("kill %1 2>/dev/null; kill $B 2>/dev/null; true").await?;
    let v = vm.qmp.version;
    Ok(Report { qemu: format!("{}.{}.{}", v.0, v.1, v.2), kernel, vcpus: 1, windows })
}

/// Commands on the guest's console shell, each answered up to a marker the command line
/// itself does not contain (its echo shows `$((N+1))`, the output the number).
struct Shell<'a> {
    console: &'a Console,
    n: u64,
}

impl Shell<'_> {
    async fn run(&mut self, command: &str) -> Result<String, GuestCostError> {
        self.n += 1;
        let n = self.n;
        let mark = self.console.position();
        let line = format!("{command}; echo cost-done-$(({n}+1000000))\n");
        self.console.send(line.as_bytes()).await.map_err(|e| GuestCostError::Console(e.to_string()))?;
        let done = format!("cost-done-{}", n + 1_000_000);
        let text = self
            .console
            .wait_for(&done, mark, Duration::from_secs(60))
            .await
            .map_err(|_| GuestCostError::Shell(command.into()))?;
        // The output: the lines after the echoed command line, up to the marker.
        let out = text.split(&done).next().unwrap_or_default();
        let out = out.rsplit_once("+1000000))").map_or(out, |(_, o)| o);
        Ok(out.split_once('\n').map_or("", |(_, o)| o).to_string())
    }

    /// Waits until the shell answers (the guest's /init starts it after its own output).
    async fn ready(&mut self) -> Result<(), GuestCostError> {
        let start = Instant::now();
        loop {
            let mark = self.console.position();
            self.n += 1;
            let line = format!("\necho cost-ready-$(({}+1000000))\n", self.n);
            self.console.send(line.as_bytes()).await.map_err(|e| GuestCostError::Console(e.to_string()))?;
            let ready = format!("cost-ready-{}", self.n + 1_000_000);
            if self.console.wait_for(&ready, mark, Duration::from_secs(5)).await.is_ok() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(120) {
                return Err(GuestCostError::Shell("echo".into()));
            }
        }
    }
}

/// A task's accounting from `/proc/PID/sched` (milliseconds with nanosecond digits). Field
/// names changed across kernels (`se.statistics.wait_max` in 5.10, `wait_max` later): matched
/// by their last part.
#[derive(Clone, Copy, Debug, Default)]
struct Sched {
    exec_ms: f64,
    exec_max_ms: f64,
    wait_max_ms: f64,
    wait_sum_ms: f64,
}

async fn sched(shell: &mut Shell<'_>, pid: &str) -> Result<Sched, GuestCostError> {
    let text = shell.run(&format!("cat /proc/{pid}/sched")).await?;
    parse_sched(&text).ok_or_else(|| GuestCostError::Accounting(format!("/proc/{pid}/sched: {text:?}")))
}

fn parse_sched(text: &str) -> Option<Sched> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            let key = key.trim();
            (key == name || key.ends_with(&format!(".{name}"))).then(|| value.trim().parse::<f64>().ok())?
        })
    };
    Some(Sched {
        exec_ms: field("sum_exec_runtime")?,
        exec_max_ms: field("exec_max")?,
        wait_max_ms: field("wait_max")?,
        wait_sum_ms: field("wait_sum")?,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "guest cost of a heartbeat: QEMU {}, guest kernel {}, {} vCPU (TCG figures are upper bounds for KVM)", self.qemu, self.kernel, self.vcpus)?;
        writeln!(
            f,
            "{:>8}  {:>9}  {:>14}  {:>14}  {:>18}  {:>16}",
            "rate", "acked", "GED µs/beat", "GED max run µs", "app max wait µs", "app wait µs/s"
        )?;
        let base = self.windows.first();
        for w in &self.windows {
            let ratio = |v: f64, b: Option<f64>| match b {
                Some(b) if b > 0.0 && w.rate_hz > 0.0 => format!(" ({:.2}×)", v / b),
                _ => String::new(),
            };
            writeln!(
                f,
                "{:>8}  {:>9}  {:>14}  {:>14.1}  {:>18}  {:>16}",
                if w.rate_hz == 0.0 { "none".to_string() } else { format!("{} Hz", w.rate_hz) },
                format!("{}/{}", w.acked, w.beats),
                w.ged_us_per_beat.map_or("-".into(), |v| format!("{v:.1}")),
                w.ged_exec_max_us,
                format!(
                    "{:.0}{}",
                    w.busy_wait_max_us,
                    ratio(w.busy_wait_max_us, base.map(|b| b.busy_wait_max_us))
                ),
                format!(
                    "{:.0}{}",
                    w.busy_wait_us_per_s,
                    ratio(w.busy_wait_us_per_s, base.map(|b| b.busy_wait_us_per_s))
                ),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sched_fields_are_read_from_5_10_and_6_1_layouts() {
        let v6 = "irq/9-ACPI:Ged (87, #threads: 1)\n-----\nse.exec_start                                :           9912.532581\n\
                  se.sum_exec_runtime                          :             12.345678\n\
                  exec_max                                     :              0.250000\n\
                  wait_max                                     :              0.001000\n\
                  wait_sum                                     :              0.002000\n";
        let s = parse_sched(v6).unwrap();
        assert_eq!((s.exec_ms, s.exec_max_ms), (12.345678, 0.25));
        let v5 = "se.sum_exec_runtime : 1.5\nse.statistics.exec_max : 0.5\nse.statistics.wait_max : 2.0\nse.statistics.wait_sum : 3.0\n";
        let s = parse_sched(v5).unwrap();
        assert_eq!((s.exec_max_ms, s.wait_max_ms, s.wait_sum_ms), (0.5, 2.0, 3.0));
        assert!(parse_sched("se.sum_exec_runtime : 1.5\n").is_none(), "without schedstats: an error");
    }
}
