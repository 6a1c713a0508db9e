//! The verdict: why an incident happened, in one line, with the evidence beside it. Every
//! bundle manifest, `bundle` event and `acpimon status` carries one.

use serde::{Deserialize, Serialize};

/// The class of an incident's cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Panic,
    SoftLockup,
    HardLockup,
    RcuStall,
    HungTask,
    Oom,
    PausedByHost,
    /// QEMU stopped the VM on a drive's I/O error (`werror=stop`, `rerror=stop`).
    PausedByIoError,
    /// The guest waits on a drive the host failed.
    WaitingOnIo,
    /// The node did not give the VM's vCPUs the CPU they wanted (throttled, overloaded).
    Starved,
    /// A vCPU the host saw busy all the time, with no kernel report to name it.
    Spinning,
    AppFailed,
    UserspaceStopped,
    Unknown,
}

/// One line of evidence and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceLine {
    /// The bundle file (relative to the bundle directory) or source (`console`, `event`) the
    /// line came from.
    pub source: String,
    pub line: String,
}

/// Why it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub class: Class,
    /// One line for people: "the guest kernel reports a soft lockup on CPU#1 for 44 s in
    /// `spin_fn [faults]`".
    pub headline: String,
    /// The lines it rests on, most telling first (bounded).
    pub evidence: Vec<EvidenceLine>,
}

pub mod host;
pub mod registers;
pub mod symbols;

use crate::diagnose::{Manifest, Trigger};
use crate::sentinel::{KernelReport, ReportClass};
use crate::watch::state::ProbeEvidence;
use registers::{CpuRegs, Space};
use symbols::Symbols;

/// At most this many evidence lines, each at most [`MAX_LINE`] characters.
pub const MAX_EVIDENCE: usize = 16;
const MAX_LINE: usize = 300;
/// The headline's limit: it may join a register reading, the kernel's report and the host's.
const MAX_HEADLINE: usize = 500;
/// Trace lines of a kernel report quoted as evidence.
const FRAMES: usize = 6;
/// Two RIPs this close count as one small window ("spinning") without a symbol source.
const WINDOW: u64 = 4096;

impl Class {
    /// As written in the manifest: `soft-lockup`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Panic => "panic",
            Class::SoftLockup => "soft-lockup",
            Class::HardLockup => "hard-lockup",
            Class::RcuStall => "rcu-stall",
            Class::HungTask => "hung-task",
            Class::Oom => "oom",
            Class::PausedByHost => "paused-by-host",
            Class::PausedByIoError => "paused-by-io-error",
            Class::WaitingOnIo => "waiting-on-io",
            Class::Starved => "starved",
            Class::Spinning => "spinning",
            Class::AppFailed => "app-failed",
            Class::UserspaceStopped => "userspace-stopped",
            Class::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One step's file as [`judge`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepFile {
    /// The step's kind (`registers`).
    pub step: String,
    /// Relative to the bundle (`05-registers.txt`).
    pub file: String,
    pub text: String,
}

/// The text files of a bundle's steps that [`judge`] reads (console tail, SysRq, NMI output,
/// registers, QMP replies), each at most [`crate::diagnose::MAX_FILE`] bytes. Blocking.
pub fn read_files(dir: &std::path::Path, manifest: &Manifest) -> Vec<StepFile> {
    const READ: &[&str] =
        &["console-tail", "sysrq", "inject-nmi", "kernel-log", "registers", "qmp-status", "host"];
    let mut out = Vec::new();
    for s in &manifest.steps {
        let Some(file) = &s.file else { continue };
        if !READ.contains(&s.name.as_str()) || s.bytes > crate::diagnose::MAX_FILE as u64 {
            continue;
        }
        if let Ok(bytes) = std::fs::read(dir.join(file)) {
            let text =
                String::from_utf8_lossy(&bytes[..bytes.len().min(crate::diagnose::MAX_FILE)]).into_owned();
            out.push(StepFile { step: s.name.clone(), file: file.clone(), text });
        }
    }
    out
}

/// What one vCPU was doing across the register samples.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuReading {
    pub cpu: u32,
    /// "vCPU 0 spinning with interrupts disabled at RIP 0xffffffffc023604c (module space)
    /// spin_fn+0x4c/0x80 [faults]".
    pub text: String,
    /// In the kernel, not halted, interrupts off in every sample (and more than one sample).
    pub stuck_irqs_off: bool,
    /// In the kernel, not halted, interrupts on in every sample, the RIP within one small window
    /// (or one function) across more than one sample: busy in one place, as a soft-locked CPU
    /// is (the timer interrupt still comes, the task never yields).
    pub spinning_irqs_on: bool,
    /// Halted in every sample.
    pub idle: bool,
}

/// Reads the register samples into one line per vCPU. `running`: whether QEMU ran the vCPUs
/// between the samples (`query-status`), when known: a RIP that did not move is then a
/// one-instruction loop, else a stopped vCPU.
pub fn read_cpus(
    samples: &[Vec<CpuRegs>],
    running: Option<bool>,
    symbols: Option<&Symbols>,
) -> Vec<CpuReading> {
    let Some(first) = samples.first() else { return Vec::new() };
    first
        .iter()
        .map(|c| {
            let seen: Vec<&CpuRegs> =
                samples.iter().filter_map(|s| s.iter().find(|o| o.cpu == c.cpu)).collect();
            describe_cpu(c.cpu, &seen, running, symbols)
        })
        .collect()
}

fn describe_cpu(cpu: u32, seen: &[&CpuRegs], running: Option<bool>, symbols: Option<&Symbols>) -> CpuReading {
    let rips: Vec<u64> = seen.iter().filter_map(|c| c.rip).collect();
    let idle = !seen.is_empty() && seen.iter().all(|c| c.halted == Some(true));
    let irqs_off = !seen.is_empty() && seen.iter().all(|c| c.interrupts_enabled() == Some(false));
    let irqs_on = !seen.is_empty() && seen.iter().all(|c| c.interrupts_enabled() == Some(true));
    let kernel = seen.iter().all(|c| c.cpl == Some(0));
    let sym = |a: u64| symbols.and_then(|s| s.lookup(a));
    let motion = if idle {
        "halted"
    } else if rips.len() < 2 {
        "running"
    } else if rips.iter().all(|&r| r == rips[0]) {
        if running == Some(false) {
            "stopped"
        } else {
            "spinning"
        }
    } else {
        let (lo, hi) = (*rips.iter().min().unwrap(), *rips.iter().max().unwrap());
        let same_fn = {
            let names: Vec<Option<String>> = rips.iter().map(|&r| sym(r).map(|s| s.name)).collect();
            names[0].is_some() && names.iter().all(|n| n == &names[0])
        };
        if same_fn || hi - lo < WINDOW {
            "spinning"
        } else {
            "running"
        }
    };
    let mut text = format!("vCPU {cpu} {motion}");
    if irqs_off {
        text.push_str(" with interrupts disabled");
    }
    match rips.last() {
        Some(&rip) => {
            let space = if seen.iter().any(|c| c.cpl == Some(3)) && Space::of(rip) == Space::User {
                Space::User
            } else {
                Space::of(rip)
            };
            text.push_str(&format!(" at RIP {rip:#018x} ({})", space.name()));
            if let Some(s) = sym(rip) {
                text.push_str(&format!(" {s}"));
            }
            if rips.len() > 1 && motion != "stopped" {
                let distinct: std::collections::BTreeSet<u64> = rips.iter().copied().collect();
                if distinct.len() == 1 && !idle {
                    text.push_str(&format!(", the same in all {} samples", rips.len()));
                } else if distinct.len() > 1 {
                    let shown: Vec<String> = distinct.iter().take(4).map(|r| format!("{r:#x}")).collect();
                    text.push_str(&format!(" (RIPs sampled: {})", shown.join(", ")));
                }
            }
        }
        None => text.push_str(" (no RIP read)"),
    }
    let stuck_irqs_off = irqs_off && kernel && !idle && seen.len() > 1 && motion != "running";
    let spinning_irqs_on = irqs_on && kernel && !idle && seen.len() > 1 && motion == "spinning";
    CpuReading { cpu, text, stuck_irqs_off, spinning_irqs_on, idle }
}

/// Why the incident happened, from what is at hand: the trigger (the transition and its
/// evidence), the bundle's manifest and step files, the VM's recent kernel reports (the
/// sentinel's) and, when the user gave one, the guest kernel's symbols. Pure: reads nothing.
pub fn judge(
    trigger: &Trigger,
    manifest: &Manifest,
    files: &[StepFile],
    reports: &[KernelReport],
    symbols: Option<&Symbols>,
) -> Verdict {
    let mut ev = Evidence::default();
    let file = |step: &str| files.iter().find(|f| f.step == step);
    let console = file("console-tail");
    // A link-time map needs the KASLR offset the console printed, if it did.
    let relocated = symbols.map(|s| {
        let off = files.iter().find_map(|f| symbols::kaslr_offset(this_boot(&f.text)));
        s.clone().relocated(off)
    });
    let symbols = relocated.as_ref();
    let samples = file("registers").map(|f| registers::samples(&f.text)).unwrap_or_default();
    let running =
        manifest.step("qmp-status").and_then(|s| s.summary.as_ref()).and_then(|s| s["running"].as_bool());
    let cpus = read_cpus(&samples, running, symbols);
    let reg_file = file("registers").map_or("registers".to_string(), |f| f.file.clone());
    let status = manifest
        .step("qmp-status")
        .and_then(|s| s.summary.as_ref())
        .and_then(|s| s["status"].as_str())
        .map(str::to_string);
    let probe: Option<ProbeEvidence> = serde_json::from_value(trigger.evidence.clone()).ok();
    let panic_report = reports.iter().rev().find(|r| r.class == ReportClass::Panic);
    // The kernel's own text: the console's, or, when the console has no panic (elsewhere,
    // quiet, characters lost), the log read from guest memory.
    let panic_text = console.and_then(panic_in).or_else(|| file("kernel-log").and_then(panic_in));
    let panic_console = panic_text.map(|(f, l)| (f.file.as_str(), l));
    let push_cpus = |ev: &mut Evidence, only_busy: bool| {
        for c in &cpus {
            if !only_busy || !c.idle {
                ev.push(&reg_file, &c.text);
            }
        }
    };
    let host = file("host").and_then(|f| host::HostReading::parse(&f.file, &f.text));
    let push_host = |ev: &mut Evidence| {
        if let Some(h) = &host {
            for l in h.lines() {
                ev.push(h.file, &l);
            }
        }
    };
    ev.push("trigger", &format!("{}: {}", trigger.kind, trigger.reason));

    // A panic settles it: nothing after it is the cause.
    if trigger.kind == "panicked"
        || panic_report.is_some()
        || panic_console.is_some()
        || status.as_deref() == Some("guest-panicked")
    {
        let line = panic_report
            .map(|r| ("kernel-report", r.line.as_str()))
            .or(panic_console)
            .map(|(src, l)| (src, strip_stamp(l)));
        let headline = match &line {
            Some((_, l)) => format!(
                "the guest kernel panicked: {}",
                after(l, "Kernel panic - ").trim_end_matches(" ]---")
            ),
            None => "the guest kernel panicked (QMP GUEST_PANICKED)".to_string(),
        };
        if let Some((src, l)) = &line {
            ev.push(src, l);
        }
        if let Some(r) = panic_report {
            for t in r.trace.iter().take(FRAMES) {
                ev.push("kernel-report", t);
            }
        } else if let Some((f, _)) = panic_text.or_else(|| console.map(|f| (f, ""))) {
            for l in panic_frames(this_boot(&f.text)) {
                ev.push(&f.file, &l);
            }
        }
        push_cpus(&mut ev, false);
        return ev.verdict(Class::Panic, headline);
    }

    // The host stopped the whole QEMU process: nothing in the guest ran, nothing answered.
    if let Some(text) = host.as_ref().and_then(|h| h.stopped()) {
        push_host(&mut ev);
        return ev.verdict(Class::PausedByHost, format!("{text}: the guest did not hang"));
    }
    // QEMU stopped the VM on a drive's error (werror=stop): status io-error, or paused with
    // the last BLOCK_IO_ERROR's action `stop`.
    let paused = probe.as_ref().is_some_and(|p| p.paused) || trigger.kind == "paused";
    let io_stop = host.as_ref().filter(|h| h.stopped_by_io_error()).and_then(|h| h.failing_drive());
    if status.as_deref() == Some("io-error")
        || ((paused || status.as_deref() == Some("paused")) && io_stop.is_some())
    {
        if let Some(s) = &status {
            ev.push(
                manifest.step("qmp-status").and_then(|s| s.file.as_deref()).unwrap_or("qmp-status"),
                &format!("QMP status: {s}"),
            );
        }
        push_host(&mut ev);
        let drive = match &io_stop {
            Some((_, text)) => format!(" on {text}"),
            None => String::new(),
        };
        return ev.verdict(
            Class::PausedByIoError,
            format!("paused by the host after an I/O error{drive}: QEMU stopped the VM (werror/rerror=stop), the guest did not hang"),
        );
    }
    if paused || status.as_deref() == Some("paused") {
        let shown = status.as_deref().unwrap_or("paused");
        if let Some(s) = &status {
            ev.push(
                manifest.step("qmp-status").and_then(|s| s.file.as_deref()).unwrap_or("qmp-status"),
                &format!("QMP status: {s}"),
            );
        }
        push_cpus(&mut ev, false);
        push_host(&mut ev);
        return ev.verdict(
            Class::PausedByHost,
            format!("QEMU has the VM paused (status '{shown}'): the host stopped its vCPUs, the guest did not hang"),
        );
    }

    // The kernel's own word, most severe first.
    let order = [
        (ReportClass::HardLockup, Class::HardLockup, "a hard lockup"),
        (ReportClass::SoftLockup, Class::SoftLockup, "a soft lockup"),
        (ReportClass::RcuStall, Class::RcuStall, "an RCU stall"),
        (ReportClass::HungTask, Class::HungTask, "a hung task"),
        (ReportClass::Oom, Class::Oom, "an OOM kill"),
    ];
    for (rc, class, what) in order {
        if let Some(r) = reports.iter().rev().find(|r| r.class == rc) {
            let mut headline = format!("the guest kernel reports {what}");
            if let Some(cpu) = r.cpu {
                headline.push_str(&format!(" on CPU#{cpu}"));
            }
            if let Some(t) = &r.task {
                headline.push_str(&format!(" ({t}{})", r.pid.map(|p| format!(":{p}")).unwrap_or_default()));
            }
            if let Some(s) = r.stuck_s {
                headline.push_str(&format!(" for {s} s"));
            }
            if let Some(l) = &r.location {
                headline.push_str(&format!(" in `{l}`"));
            }
            ev.push("kernel-report", &r.line);
            if let Some(l) = &r.location {
                ev.push("kernel-report", l);
            }
            for t in r.trace.iter().take(FRAMES) {
                ev.push("kernel-report", t);
            }
            push_cpus(&mut ev, true);
            push_host(&mut ev);
            // A hung task while a drive fails on the host: the guest waits on that drive.
            if let (ReportClass::HungTask, Some((_, drive))) =
                (rc, host.as_ref().and_then(|h| h.failing_drive()))
            {
                return ev.verdict(Class::WaitingOnIo, format!("guest waiting on I/O: {drive}; {headline}"));
            }
            // A stall of a VM the node starves is the node's doing: the kernel's report is its
            // symptom.
            if let (ReportClass::SoftLockup | ReportClass::RcuStall, Some(why)) =
                (rc, host.as_ref().and_then(|h| h.starved()))
            {
                return ev.verdict(Class::Starved, format!("VM starved: {why}; {headline}"));
            }
            // The host saw the reported CPU's thread busy all along: say so.
            if let Some((_, spin)) = host.as_ref().and_then(|h| h.spinning(r.cpu)) {
                headline.push_str(&format!("; on the host, {spin}"));
            }
            // An RCU stall whose CPU the registers show spinning with interrupts off is a hard
            // lockup the kernel could not name (no NMI watchdog, as under TCG): say so first.
            let irqs_off =
                cpus.iter().find(|c| c.stuck_irqs_off && (r.cpu.is_none() || r.cpu == Some(c.cpu)));
            if let (ReportClass::RcuStall, Some(c)) = (rc, irqs_off) {
                return ev.verdict(Class::HardLockup, format!("{}; {headline}", c.text));
            }
            // An RCU stall of a CPU the registers show busy in one place in the kernel with
            // interrupts on: that CPU does not schedule, a soft lockup (the kernel's own
            // soft-lockup report comes later, after 2 x watchdog_thresh, and is linked to the
            // incident). Only with the stalled CPU named: another busy CPU proves nothing.
            let spinning = cpus.iter().find(|c| c.spinning_irqs_on && r.cpu == Some(c.cpu));
            if let (ReportClass::RcuStall, Some(c)) = (rc, spinning) {
                return ev.verdict(
                    Class::SoftLockup,
                    format!(
                        "a soft lockup of CPU#{}: {headline}, and the registers show it in the kernel with interrupts on: {}",
                        c.cpu, c.text
                    ),
                );
            }
            return ev.verdict(class, headline);
        }
    }

    if let Some(p) = &probe {
        if let Some(app) = p.app.as_ref().filter(|a| a.status == crate::abi::AppStatus::Failed) {
            ev.push("trigger", &format!("the app: {}", app.details));
            return ev.verdict(Class::AppFailed, format!("the app reports it failed: {}", app.details));
        }
        let kernel_ok = p.scenarios.iter().any(|s| {
            matches!(s.kind.as_str(), "acpi-heartbeat" | "thermal")
                && s.unavailable.is_none()
                && s.consecutive_misses == 0
                && s.last.as_ref().is_some_and(|l| l.ok)
        });
        // What failed while the kernel answers: the app's own channels say the app stopped;
        // the others (console, TCP, guest agent) that userspace did.
        // (vcpu-progress watches the kernel's own CPUs, not userspace: judged below.)
        let failed: Vec<_> = p
            .scenarios
            .iter()
            .filter(|s| {
                !matches!(s.kind.as_str(), "acpi-heartbeat" | "thermal" | "vcpu-progress")
                    && s.consecutive_misses >= s.threshold
            })
            .collect();
        let app = failed.iter().find(|s| matches!(s.kind.as_str(), "app-heartbeat" | "app-mailbox"));
        if let (true, Some(&s)) = (kernel_ok, app.or(failed.first())) {
            let detail = s.last.as_ref().map_or("no answer", |l| l.detail.as_str());
            ev.push(
                "trigger",
                &format!(
                    "{} ({}) missed {} of {}: {detail}",
                    s.scenario, s.kind, s.consecutive_misses, s.threshold
                ),
            );
            push_cpus(&mut ev, true);
            let (class, who) = if app.is_some() {
                (Class::AppFailed, "the app")
            } else {
                (Class::UserspaceStopped, "userspace")
            };
            return ev.verdict(
                class,
                format!(
                    "{who} stopped answering: the {} scenario '{}' missed {} of {} while the kernel heartbeat answers",
                    s.kind, s.scenario, s.consecutive_misses, s.threshold
                ),
            );
        }
    }

    // No report: what the registers show, and what the host saw. A vCPU whose thread the host
    // barely ran (throttled, starved) shows the same registers in both samples because it did
    // not run between them, not because it spins: that reading is not a lockup.
    let ran = |cpu: u32| host.as_ref().and_then(|h| h.ran(cpu)).unwrap_or(true);
    if let Some(c) = cpus.iter().find(|c| c.stuck_irqs_off && ran(c.cpu)) {
        push_cpus(&mut ev, false);
        push_host(&mut ev);
        return match host.as_ref().and_then(|h| h.spinning(Some(c.cpu))) {
            Some((_, spin)) => ev.verdict(Class::HardLockup, format!("guest spinning: {spin}; {}", c.text)),
            None => ev.verdict(Class::HardLockup, c.text.clone()),
        };
    }
    let halted = !cpus.is_empty() && cpus.iter().all(|c| c.idle);
    if let Some(h) = &host {
        if let Some((_, drive)) = h.failing_drive().filter(|_| h.all_idle() || halted) {
            push_host(&mut ev);
            push_cpus(&mut ev, false);
            return ev.verdict(Class::WaitingOnIo, format!("guest waiting: all vCPUs idle; {drive}"));
        }
        if let Some(why) = h.starved() {
            push_host(&mut ev);
            push_cpus(&mut ev, true);
            return ev.verdict(Class::Starved, format!("VM starved: {why}"));
        }
    }
    // The vcpu-progress scenario fails only on a vCPU it saw in the kernel with interrupts
    // disabled in several samples in a row: the same reading over seconds, before the bundle.
    let vcpu = probe.as_ref().and_then(|p| {
        p.scenarios.iter().find(|s| s.kind == "vcpu-progress" && s.consecutive_misses >= s.threshold)
    });
    if let Some(detail) = vcpu.and_then(|s| s.last.as_ref()).filter(|l| !l.ok).map(|l| l.detail.as_str()) {
        ev.push("trigger", &format!("vcpu-progress: {detail}"));
        push_cpus(&mut ev, false);
        return ev.verdict(Class::HardLockup, format!("the vcpu-progress scenario: {detail}"));
    }
    if let Some((cpu, spin)) = host.as_ref().and_then(|h| h.spinning(None)) {
        push_cpus(&mut ev, false);
        push_host(&mut ev);
        let regs = cpus.iter().find(|c| c.cpu == cpu).map(|c| format!("; {}", c.text)).unwrap_or_default();
        return ev.verdict(
            Class::Spinning,
            format!("guest spinning: {spin}, and the kernel reported nothing{regs}"),
        );
    }
    push_cpus(&mut ev, false);
    push_host(&mut ev);
    let busy: Vec<&CpuReading> = cpus.iter().filter(|c| !c.idle).collect();
    let headline = match (busy.first(), cpus.is_empty()) {
        (_, true) => "no cause found: no kernel report, and no registers were read".to_string(),
        (None, false) => {
            "no cause found: every vCPU is halted (idle), and the kernel reported nothing".to_string()
        }
        (Some(c), false) if busy.len() == 1 => format!("no kernel report; {}", c.text),
        (Some(c), false) if busy.len() == 2 => format!("no kernel report; {} (and 1 more vCPU busy)", c.text),
        (Some(c), false) => format!("no kernel report; {} (and {} more vCPUs busy)", c.text, busy.len() - 1),
    };
    ev.verdict(Class::Unknown, headline)
}

/// Evidence lines, bounded.
#[derive(Default)]
struct Evidence(Vec<EvidenceLine>);

impl Evidence {
    fn push(&mut self, source: &str, line: &str) {
        if self.0.len() >= MAX_EVIDENCE || line.trim().is_empty() {
            return;
        }
        let line: String = line.trim_end().chars().take(MAX_LINE).collect();
        if self.0.iter().any(|e| e.line == line) {
            return;
        }
        self.0.push(EvidenceLine { source: source.chars().take(100).collect(), line });
    }

    fn verdict(self, class: Class, headline: String) -> Verdict {
        Verdict { class, headline: headline.chars().take(MAX_HEADLINE).collect(), evidence: self.0 }
    }
}

/// A console line without its `[   12.345678] ` timestamp.
fn strip_stamp(line: &str) -> &str {
    let t = line.trim_start();
    match t.strip_prefix('[').and_then(|r| r.split_once("] ")) {
        Some((stamp, rest)) if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => t,
    }
}

/// The text from `marker` on, or all of it.
fn after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.find(marker).map_or(line, |i| &line[i + marker.len()..])
}

/// The console text since the guest kernel last booted (its `Linux version` banner): the
/// console keeps output across reboots, and an earlier boot's panic is not this incident's.
fn this_boot(text: &str) -> &str {
    match text.rfind("Linux version ") {
        Some(i) => &text[text[..i].rfind('\n').map_or(0, |n| n + 1)..],
        None => text,
    }
}

/// `Kernel panic - not syncing: ...`, not its `---[ end Kernel panic ...` echo.
/// The last panic line of `f`'s text since the kernel last booted.
fn panic_in(f: &StepFile) -> Option<(&StepFile, &str)> {
    this_boot(&f.text).lines().rev().find(|l| is_panic_line(l)).map(|l| (f, l))
}

fn is_panic_line(l: &str) -> bool {
    l.contains("Kernel panic - not syncing") && !l.contains("---[ end Kernel panic")
}

/// The first telling frames of the panic's call trace in console text: the one the panic
/// printed after its line, else the last one before it; the frames of the panic itself
/// (`dump_stack`, `panic`) and unreliable ones (`? `) left out.
fn panic_frames(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(p) = lines.iter().rposition(|l| is_panic_line(l)) else { return Vec::new() };
    let end = lines[p..]
        .iter()
        .take(200)
        .position(|l| l.contains("---[ end Kernel panic"))
        .map_or(lines.len().min(p + 200), |e| p + e);
    let trace = match lines[p..end].iter().position(|l| l.contains("Call Trace:")) {
        Some(t) => &lines[p + t + 1..end],
        None => {
            let start = p.saturating_sub(200);
            match lines[start..p].iter().rposition(|l| l.contains("Call Trace:")) {
                Some(t) => &lines[start + t + 1..p],
                None => return Vec::new(),
            }
        }
    };
    trace
        .iter()
        .map(|l| strip_stamp(l).trim())
        .take_while(|l| {
            !l.starts_with("</TASK>") && !l.starts_with("Kernel Offset") && !l.starts_with("RIP:")
        })
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('<')
                && !l.starts_with("? ")
                && !l.starts_with("dump_stack")
                && !l.starts_with("panic+")
        })
        .take(FRAMES)
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests;
