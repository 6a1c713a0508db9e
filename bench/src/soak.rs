//! `acpimon-bench soak`: a heartbeat profile soaked against a real guest under load. One test
//! guest (2 vCPUs, a scratch virtio disk) is loaded from its console before the service takes
//! that console over: a busy loop per vCPU (userspace CPU load) and a loop writing its disk
//! with `fsync` (I/O load, served by QEMU's main loop, where the heartbeat's HMP command is
//! served too). The real service (`acpimon watch`, a child) watches it with the profile. Every
//! `spacing` (with a random offset) the benchmark stops the vCPUs through its own QMP monitor
//! (a staged hang), times how long the service takes to call the VM `unresponsive` (from the
//! event log), lets the VM go and waits until it is healthy again. Any `late` or `unresponsive`
//! outside a staged hang is a false alarm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::flood::{self, FloodError};
use crate::scale::Service;
use acpimon::event::RawEvent;
use acpimon::launch::{Vm, VmSpec};
use acpimon::units::format_duration;

/// The heartbeat profile soaked.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Profile {
    #[serde(with = "ms")]
    pub interval: Duration,
    #[serde(with = "ms")]
    pub timeout: Duration,
    pub threshold: u32,
}

impl Profile {
    /// The longest a hang may take to be called. Beats do not overlap: the next starts an
    /// interval after the last (at once after a miss longer than that). A hang just after an
    /// answer waits up to an interval for the next beat, then `threshold` misses, each an
    /// interval apart or back to back when the timeout is longer, the last one its timeout.
    pub fn bound(&self) -> Duration {
        self.interval + self.interval.max(self.timeout) * (self.threshold - 1) + self.timeout
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub service: PathBuf,
    pub guest: PathBuf,
    pub profile: Profile,
    pub duration: Duration,
    /// Between staged hangs (each lands at a random point of its slot).
    pub spacing: Duration,
    pub work: PathBuf,
}

/// One staged hang.
#[derive(Clone, Debug, Serialize)]
pub struct Hang {
    /// From QMP `stop` to the service's `unresponsive`, seconds; `None`: not called within 30 s.
    pub detected_s: Option<f64>,
    /// From `cont` to `healthy` again, seconds.
    pub recovered_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub qemu: String,
    pub profile: Profile,
    pub bound_s: f64,
    pub duration_s: f64,
    pub hangs: Vec<Hang>,
    pub detection_p50_s: Option<f64>,
    pub detection_max_s: Option<f64>,
    /// `late` or `unresponsive` outside the staged hangs, each as "TIME from -> to: reason".
    pub false_alarms: Vec<String>,
    /// Heartbeat answers and misses over the run.
    pub answers: u64,
    pub misses: u64,
    pub work: PathBuf,
}

impl SoakReport {
    /// What makes the run fail: a false alarm, a hang not called, or one called after its bound.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self.false_alarms.iter().map(|a| format!("false alarm: {a}")).collect();
        let missed = self.hangs.iter().filter(|h| h.detected_s.is_none()).count();
        if missed > 0 {
            p.push(format!("{missed} staged hangs were not called unresponsive within 30 s"));
        }
        if let Some(max) = self.detection_max_s.filter(|m| *m > self.bound_s + SLACK.as_secs_f64()) {
            p.push(format!(
                "a hang took {max:.2} s to be called, above the bound {:.2} s (+{} s of polling)",
                self.bound_s,
                SLACK.as_secs_f64()
            ));
        }
        p
    }
}

/// What the measurement adds to a detection: the service's event time is its own clock's,
/// the `stop` time the benchmark's (the same machine), and QMP `stop` takes a round trip.
const SLACK: Duration = Duration::from_millis(100);
const DETECT_WAIT: Duration = Duration::from_secs(30);
const RECOVER_WAIT: Duration = Duration::from_secs(60);

pub async fn run(opts: &SoakOptions, progress: impl Fn(&str)) -> Result<SoakReport, FloodError> {
    let dir = opts.work.join(format!("run-{}", std::process::id()));
    let state_dir = dir.join("state");
    let data_dir = dir.join("data");
    for d in [&state_dir, &data_dir] {
        std::fs::create_dir_all(d).map_err(|source| FloodError::Work { path: d.clone(), source })?;
    }
    let disk = dir.join("scratch.img");
    let file =
        std::fs::File::create(&disk).map_err(|source| FloodError::Work { path: disk.clone(), source })?;
    file.set_len(64 << 20).map_err(|source| FloodError::Work { path: disk.clone(), source })?;
    let mut spec = flood::guest_spec(&opts.guest, "pc", &state_dir, "soak", "healthy")?;
    spec.args.extend(
        ["-smp", "2", "-drive", &format!("file={},format=raw,if=virtio", disk.display())].map(String::from),
    );
    let mut vm = Vm::launch(VmSpec { leave_to_watch: true, ..spec }).await?;
    let result = soak(opts, &dir, &state_dir, &data_dir, &vm, &progress).await;
    let _ = vm.shutdown().await;
    result
}

async fn soak(
    opts: &SoakOptions,
    dir: &Path,
    state_dir: &Path,
    data_dir: &Path,
    vm: &Vm,
    progress: &impl Fn(&str),
) -> Result<SoakReport, FloodError> {
    progress("loading the guest from its console");
    load(&vm.prepared.descriptor).await?;
    let config = dir.join("acpimon.toml");
    std::fs::write(&config, config_text(state_dir, data_dir, &opts.profile))
        .map_err(|source| FloodError::Work { path: config.clone(), source })?;
    let mut service = Service::start(&opts.service, &config, &dir.join("service.log")).await?;
    flood::wait_healthy(&mut service, 1).await?;
    let events = data_dir.join("events.jsonl");
    let start = Instant::now();
    let mut hangs = Vec::new();
    // The staged hangs' spans in the event log's time: what falls outside is a false alarm.
    let mut spans: Vec<(SystemTime, SystemTime)> = Vec::new();
    let mut slot = 0u32;
    while start.elapsed() + opts.spacing <= opts.duration {
        slot += 1;
        let offset = opts.spacing.mul_f64(0.25 + 0.5 * rand_unit());
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + opts.spacing * (slot - 1) + offset))
            .await;
        let stopped_at = SystemTime::now();
        vm.qmp.execute(qapi::qmp::stop {}).await.map_err(|e| FloodError::Wait(format!("QMP stop: {e}")))?;
        let detected = wait_transition(&events, stopped_at, "unresponsive", DETECT_WAIT).await;
        let cont_at = SystemTime::now();
        vm.qmp.execute(qapi::qmp::cont {}).await.map_err(|e| FloodError::Wait(format!("QMP cont: {e}")))?;
        let recovered = wait_transition(&events, cont_at, "healthy", RECOVER_WAIT).await;
        spans.push((stopped_at, recovered.unwrap_or_else(SystemTime::now)));
        let secs = |t: Option<SystemTime>, from: SystemTime| {
            t.map(|t| t.duration_since(from).unwrap_or_default().as_secs_f64())
        };
        let hang = Hang { detected_s: secs(detected, stopped_at), recovered_s: secs(recovered, cont_at) };
        progress(&format!(
            "hang {slot}: called after {} s, healthy {} s after cont",
            hang.detected_s.map_or("(not)".into(), |s| format!("{s:.2}")),
            hang.recovered_s.map_or("(not)".into(), |s| format!("{s:.2}"))
        ));
        hangs.push(hang);
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(start + opts.duration)).await;
    let status = service.status().await?;
    let hb = status.vms.iter().flat_map(|v| &v.scenarios).find(|s| s.kind == "acpi-heartbeat");
    let (answers, misses) = hb.map_or((0, 0), |s| (s.answers_total, s.misses_total));
    service.stop().await?;
    let healthy_since = start_time(&events);
    let false_alarms = transitions(&events)
        .into_iter()
        .filter(|(t, to, _)| (to == "late" || to == "unresponsive") && healthy_since.is_some_and(|h| *t >= h))
        .filter(|(t, _, _)| !spans.iter().any(|(a, b)| t >= a && t <= b))
        .map(|(_, _, line)| line)
        .collect();
    let mut detections: Vec<f64> = hangs.iter().filter_map(|h| h.detected_s).collect();
    detections.sort_by(f64::total_cmp);
    let v = vm.qmp.version;
    Ok(SoakReport {
        qemu: format!("{}.{}.{}", v.0, v.1, v.2),
        profile: opts.profile,
        bound_s: opts.profile.bound().as_secs_f64(),
        duration_s: start.elapsed().as_secs_f64(),
        detection_p50_s: detections.get(detections.len() / 2).copied(),
        detection_max_s: detections.last().copied(),
        hangs,
        false_alarms,
        answers,
        misses,
        work: dir.into(),
    })
}

/// Starts the load in the guest through its console, then lets the console go (the service
/// takes it): a busy loop per vCPU and a loop rewriting the scratch disk with fsync.
async fn load(d: &acpimon::launch::prepare::Descriptor) -> Result<(), FloodError> {
    let console = acpimon::console::Console::connect(&d.console, 1 << 20, Duration::from_secs(10))
        .await
        .map_err(|e| FloodError::Wait(format!("console {}: {e}", d.console.display())))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let command = "for i in 1 2; do (while :; do :; done) & done; \
                   (while :; do dd if=/dev/zero of=/dev/vda bs=1M count=32 conv=fsync 2>/dev/null; done) & \
                   echo soak-load-$((40+2))\n";
    loop {
        let mark = console.position();
        console.send(command.as_bytes()).await.map_err(|e| FloodError::Wait(format!("console: {e}")))?;
        if console.wait_for("soak-load-42", mark, Duration::from_secs(5)).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(FloodError::Wait("the guest's shell did not start the load within 120 s".into()));
        }
    }
}

/// The log's transitions: (time, to, "TIME from -> to: reason").
fn transitions(events: &Path) -> Vec<(SystemTime, String, String)> {
    let text = std::fs::read_to_string(events).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<RawEvent>(l).ok())
        .filter(|e| e.kind == "transition")
        .filter_map(|e| {
            let t = humantime::parse_rfc3339(&e.time).ok()?;
            let field = |k: &str| e.detail.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let to = field("to");
            let line = format!("{} {} -> {to}: {}", e.time, field("from"), field("reason"));
            Some((t, to, line))
        })
        .collect()
}

/// When the VM was first healthy: alarms before (while it booted) are not the profile's.
fn start_time(events: &Path) -> Option<SystemTime> {
    transitions(events).into_iter().find(|(_, to, _)| to == "healthy").map(|(t, _, _)| t)
}

/// The time of the first transition to `to` at or after `since`, waiting up to `wait`.
async fn wait_transition(events: &Path, since: SystemTime, to: &str, wait: Duration) -> Option<SystemTime> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some((t, _, _)) = transitions(events).into_iter().find(|(t, s, _)| s == to && *t >= since) {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A number in [0, 1) from the clock: the hangs' offsets only need to avoid a fixed phase.
fn rand_unit() -> f64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    f64::from(nanos % 1000) / 1000.0
}

fn config_text(state_dir: &Path, data_dir: &Path, p: &Profile) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let dur = |d: Duration| format!("\"{}ms\"", d.as_millis());
    format!(
        "# Written by acpimon-bench soak.\n\
         state_dir = {}\n\
         data_dir = {}\n\
         node = \"bench-soak\"\n\
         \n\
         [metrics]\n\
         listen = \"127.0.0.1:0\"\n\
         \n\
         [defaults]\n\
         startup_grace = \"90s\"\n\
         \n\
         [[defaults.scenario]]\n\
         kind = \"acpi-heartbeat\"\n\
         interval = {}\n\
         timeout = {}\n\
         threshold = {}\n\
         \n\
         [[defaults.diagnostic]]\n\
         step = \"qmp-status\"\n",
        quote(state_dir),
        quote(data_dir),
        dur(p.interval),
        dur(p.timeout),
        p.threshold,
    )
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.profile;
        writeln!(
            f,
            "soak: QEMU {}, profile interval {} timeout {} threshold {} (bound {:.2} s), {:.0} s under CPU and disk load",
            self.qemu,
            format_duration(p.interval),
            format_duration(p.timeout),
            p.threshold,
            self.bound_s,
            self.duration_s
        )?;
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} s"));
        writeln!(
            f,
            "  staged hangs {}: detection p50 {}, max {} ({:.2}× the bound)",
            self.hangs.len(),
            opt(self.detection_p50_s),
            opt(self.detection_max_s),
            self.detection_max_s.unwrap_or(0.0) / self.bound_s
        )?;
        writeln!(
            f,
            "  heartbeats answered {}, missed {} (the staged hangs' misses included)",
            self.answers, self.misses
        )?;
        writeln!(f, "  false alarms: {}", self.false_alarms.len())?;
        for a in &self.false_alarms {
            writeln!(f, "    {a}")?;
        }
        Ok(())
    }
}

mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }
}
