//! The kernel-report sentinel: the guest kernel's own fault reports (soft lockup, hard
//! LOCKUP, RCU stall, hung task, Oops, panic, OOM kill, I/O errors, NMI reports), read from
//! the console stream line by line. The console is untrusted input: lines and traces are
//! bounded, and a report is only ever evidence, never a command.
//!
//! The patterns are data (a table, one row per class) tested on real kernel output from the
//! kernels acpimon supports (5.10 to 6.12).

use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

use crate::console::sanitize;

/// What the kernel reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportClass {
    /// `watchdog: BUG: soft lockup - CPU#1 stuck for 44s!`
    SoftLockup,
    /// `NMI watchdog: Watchdog detected hard LOCKUP on cpu 1`
    HardLockup,
    /// `rcu: INFO: rcu_preempt self-detected stall on CPU` / `detected stalls on CPUs/tasks`
    RcuStall,
    /// `INFO: task NAME:PID blocked for more than N seconds.`
    HungTask,
    /// `Oops:`, `BUG: unable to handle ...`, `general protection fault`, `kernel BUG at`
    Oops,
    /// `Kernel panic - not syncing: ...`
    Panic,
    /// `Out of memory: Killed process ...`, `... invoked oom-killer`
    Oom,
    /// Block-layer I/O errors (`I/O error, dev vda, sector ...`, `Buffer I/O error`)
    IoError,
    /// A filesystem remounted read-only after an error.
    ReadOnly,
    /// `Uhhuh. NMI received ...`, `NMI backtrace for cpu N`
    Nmi,
}

/// One report, as the kernel printed it (bounded).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelReport {
    pub class: ReportClass,
    /// The CPU the report names, when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    /// The task (`comm`) the report names, when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The PID the report names, when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How long the kernel says the CPU or task was stuck, in seconds, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck_s: Option<u64>,
    /// Where it was stuck: the first meaningful frame (`RIP: 0010:func+0x1c/0x30 [module]`,
    /// or the first call-trace entry), when the report has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The report's first line, without the console timestamp.
    pub line: String,
    /// The lines that followed it (registers, call trace), bounded.
    #[serde(default)]
    pub trace: Vec<String>,
    /// The kernel's timestamp of the first line (`[   40.123456]`), in microseconds since
    /// boot, when it had one: with `line`, what identifies the report when the console and the
    /// memory log both carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp_us: Option<u64>,
}

impl ReportClass {
    pub const ALL: [ReportClass; 10] = [
        ReportClass::SoftLockup,
        ReportClass::HardLockup,
        ReportClass::RcuStall,
        ReportClass::HungTask,
        ReportClass::Oops,
        ReportClass::Panic,
        ReportClass::Oom,
        ReportClass::IoError,
        ReportClass::ReadOnly,
        ReportClass::Nmi,
    ];

    /// As serialised and written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ReportClass::SoftLockup => "soft-lockup",
            ReportClass::HardLockup => "hard-lockup",
            ReportClass::RcuStall => "rcu-stall",
            ReportClass::HungTask => "hung-task",
            ReportClass::Oops => "oops",
            ReportClass::Panic => "panic",
            ReportClass::Oom => "oom",
            ReportClass::IoError => "io-error",
            ReportClass::ReadOnly => "read-only",
            ReportClass::Nmi => "nmi",
        }
    }

    /// For people: "a soft lockup".
    pub fn describe(self) -> &'static str {
        match self {
            ReportClass::SoftLockup => "a soft lockup",
            ReportClass::HardLockup => "a hard lockup",
            ReportClass::RcuStall => "an RCU stall",
            ReportClass::HungTask => "a hung task",
            ReportClass::Oops => "an Oops",
            ReportClass::Panic => "a panic",
            ReportClass::Oom => "an OOM kill",
            ReportClass::IoError => "an I/O error",
            ReportClass::ReadOnly => "a filesystem remounted read-only",
            ReportClass::Nmi => "an NMI",
        }
    }
}

impl std::fmt::Display for ReportClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl KernelReport {
    /// One line for people, as a transition's reason puts it: "the guest kernel reports a soft
    /// lockup on CPU#1 for 44 s in `spin_fn+0x10/0x20 [faults]`".
    pub fn summary(&self) -> String {
        let mut s = format!("the guest kernel reports {}", self.class.describe());
        if let Some(cpu) = self.cpu {
            s.push_str(&format!(" on CPU#{cpu}"));
        }
        match (&self.task, self.pid) {
            (Some(t), Some(p)) => s.push_str(&format!(" (task {t}:{p})")),
            (Some(t), None) => s.push_str(&format!(" (task {t})")),
            _ => {}
        }
        if let Some(secs) = self.stuck_s {
            s.push_str(&format!(" for {secs} s"));
        }
        if let Some(loc) = &self.location {
            s.push_str(&format!(" in `{loc}`"));
        }
        s.push_str(&format!(": {}", self.line));
        s
    }
}

// ---- the table ----

/// The longest line kept (characters); the rest of a longer line is dropped.
pub const LINE_MAX: usize = 512;
/// The most trace lines a report keeps.
pub const TRACE_LINES: usize = 48;
/// The most trace bytes a report keeps.
pub const TRACE_BYTES: usize = 8 << 10;
/// Lines after which a report is closed whatever follows (a guest printing forever under one
/// timestamp cannot hold a report open).
const REPORT_LINES_MAX: usize = 4096;
/// A line logged this much later than the report's last line belongs to something else.
const REPORT_GAP_S: f64 = 2.0;

/// One row of the table: a line that starts a report of `class` (or, when a report of one of
/// the `within` classes is open, continues it). Named groups fill the report's fields: `cpu`,
/// `task`, `pid`, `secs` (stuck for), `dev` (the device, as the location of an I/O or
/// filesystem report). `headline`: a continuing line that says more than the first (the OOM
/// victim) becomes the report's line and its task/pid.
struct Row {
    class: ReportClass,
    pattern: &'static str,
    within: &'static [ReportClass],
    headline: bool,
}

const fn row(class: ReportClass, pattern: &'static str) -> Row {
    Row { class, pattern, within: &[], headline: false }
}

use ReportClass as C;

/// The kernel's own words, from the printk formats of Linux 5.10 to 6.12 (each after the
/// console timestamp; `pr_fmt` prefixes such as `watchdog: ` are part of the line). First
/// match wins, so the soft lockup's `BUG:` is taken before the Oops rows see it.
const ROWS: &[Row] = &[
    // kernel/watchdog.c
    row(
        C::SoftLockup,
        r"^(?:NMI )?watchdog: BUG: soft lockup - CPU#(?P<cpu>\d+) stuck for (?P<secs>\d+)s! \[(?P<task>.+):(?P<pid>\d+)\]",
    ),
    // kernel/watchdog_hld.c (to 6.6: "NMI watchdog: "), kernel/watchdog.c (6.7+, "CPU0: " names
    // the CPU that noticed, the buddy detector's case)
    row(
        C::HardLockup,
        r"^(?:(?:NMI )?watchdog: )?(?:CPU\d+: )?Watchdog detected hard LOCKUP on cpu (?P<cpu>\d+)",
    ),
    // kernel/rcu/tree_stall.h
    row(
        C::RcuStall,
        r"^(?:rcu: )?INFO: \w+ (?:self-detected stall on CPU|detected (?:expedited )?stalls on CPUs/tasks)",
    ),
    // kernel/hung_task.c
    row(C::HungTask, r"^INFO: task (?P<task>.+):(?P<pid>\d+) blocked for more than (?P<secs>\d+) seconds"),
    // arch/x86/mm/fault.c, arch/x86/kernel/dumpstack.c and traps.c: one Oops prints several
    // of these (the fault, then `Oops:`), so each continues an open Oops.
    Row {
        class: C::Oops,
        pattern: r"^BUG: (?:kernel NULL pointer dereference|unable to handle)",
        within: &[C::Oops],
        headline: false,
    },
    Row { class: C::Oops, pattern: r"^kernel BUG at \S+", within: &[C::Oops], headline: false },
    Row {
        class: C::Oops,
        pattern: r"^(?:Oops: |general protection fault|invalid opcode: )",
        within: &[C::Oops],
        headline: false,
    },
    // kernel/panic.c
    row(C::Panic, r"^Kernel panic - not syncing: "),
    // mm/oom_kill.c: the report starts with the invoker and names the victim at its end.
    row(C::Oom, r"^(?P<task>.+?) invoked oom-killer: "),
    Row {
        class: C::Oom,
        pattern: r"^(?:Memory cgroup )?[Oo]ut of memory(?: \([^)]*\))?: Killed process (?P<pid>\d+) \((?P<task>[^)]*)\)",
        within: &[C::Oom],
        headline: true,
    },
    // block/blk-core.c (5.10-5.15 prefixed `blk_update_request: `), fs/buffer.c
    row(
        C::IoError,
        r"^(?:blk_update_request: )?(?:I/O|critical \w+(?: \w+)?) error, dev (?P<dev>[^,\s]+), sector \d+",
    ),
    row(C::IoError, r"^Buffer I/O error on dev(?:ice)? (?P<dev>[^,\s]+)"),
    // fs/ext4/super.c (also ext2/ext3 through ext4), fs/btrfs, fs/xfs
    row(C::ReadOnly, r"^EXT[234]-fs \((?P<dev>[^)]+)\): Remounting filesystem read-only"),
    row(C::ReadOnly, r"^BTRFS \w+ \(device (?P<dev>[^)]+)\).*forced readonly"),
    row(C::ReadOnly, r"^XFS \((?P<dev>[^)]+)\): .*Shutting down filesystem"),
    // arch/x86/kernel/nmi.c
    row(C::Nmi, r"^Uhhuh\. NMI received for unknown reason \w+ on CPU (?P<cpu>\d+)"),
    row(C::Nmi, r"^NMI: .* for reason \w+ on CPU (?P<cpu>\d+)"),
    // lib/nmi_backtrace.c: on its own (SysRq l), or the backtrace an RCU stall or a lockup
    // asked for, which belongs to that report.
    Row {
        class: C::Nmi,
        pattern: r"^NMI backtrace for cpu (?P<cpu>\d+)",
        within: &[C::RcuStall, C::HardLockup, C::SoftLockup, C::Panic],
        headline: false,
    },
];

/// Lines inside any report that fill its fields when the first line did not.
struct Fields {
    /// `CPU: 1 PID: 42 Comm: insmod Tainted: ...` (6.10+: `CPU: 1 UID: 0 PID: ...`).
    cpu_line: Regex,
    /// `rcu: \t1-....: (5249 ticks this GP) ...`: the stalled CPU.
    rcu_cpu: Regex,
    /// `RIP: 0010:spin_fn+0x10/0x20 [faults]`: where a kernel CPU was.
    rip: Regex,
    /// A call-trace frame: ` spin_fn+0x10/0x20 [faults]`, `? foo+0x1/0x2` (unreliable).
    frame: Regex,
    /// `[  123.456789] ` (and `[    T1] ` of CONFIG_PRINTK_CALLER after it).
    timestamp: Regex,
    /// `<4>` (console_msg_format=syslog) and `Jun 11 14:12:22 host kernel: ` (a journal).
    prefix: Regex,
}

struct Table {
    set: RegexSet,
    rows: Vec<Regex>,
    fields: Fields,
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let pattern = |p: &str| Regex::new(p).expect("the sentinel's patterns compile");
    Table {
        set: RegexSet::new(ROWS.iter().map(|r| r.pattern)).expect("the sentinel's patterns compile"),
        rows: ROWS.iter().map(|r| pattern(r.pattern)).collect(),
        fields: Fields {
            cpu_line: pattern(r"^CPU: (?P<cpu>\d+) (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: (?P<task>\S+)"),
            rcu_cpu: pattern(r"^rcu:\s+(?P<cpu>\d+)-\S*: \("),
            rip: pattern(r"^RIP: 0010:(?P<loc>[\w.$]+\+0x[0-9a-f]+/0x[0-9a-f]+(?: \[[\w-]+\])?)"),
            frame: pattern(
                r"^\s*(?:\[<[0-9a-f]+>\] )?(?P<q>\? )?(?P<loc>(?P<func>[\w.$]+)\+0x[0-9a-f]+/0x[0-9a-f]+(?: \[[\w-]+\])?)\s*$",
            ),
            timestamp: pattern(r"\[\s*\d{1,10}\.\d{6}\](?:\[\s*[TC]\d+\])? ?"),
            prefix: pattern(r"^(?:<\d>|\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: )"),
        },
    }
});

/// Frames that say how the report was printed or how a task sleeps, not where it was stuck.
const PLUMBING: &[&str] = &[
    "dump_stack",
    "dump_stack_lvl",
    "__dump_stack",
    "show_stack",
    "show_regs",
    "panic",
    "vpanic",
    "nmi_panic",
    "dump_header",
    "oom_kill_process",
    "out_of_memory",
    "__schedule",
    "schedule",
    "schedule_timeout",
    "schedule_preempt_disabled",
    "io_schedule",
    "nmi_cpu_backtrace",
    "nmi_trigger_cpumask_backtrace",
    "arch_trigger_cpumask_backtrace",
    "watchdog_timer_fn",
    "watchdog_overflow_callback",
    "warn_slowpath_fmt",
];

// ---- the scanner ----

/// A report being read.
#[derive(Debug)]
struct Open {
    report: KernelReport,
    /// The latest kernel timestamp of its lines, when the console has them. Not the last
    /// line's: an NMI backtrace of a stuck CPU carries that CPU's stale clock.
    last_ts: Option<f64>,
    trace_bytes: usize,
    lines: usize,
    /// The location came from a `RIP:` line (a frame does not replace it).
    from_rip: bool,
}

/// A streaming, bounded line scanner over the console's bytes: feed it what arrives; it
/// returns each report when the report ends (an end marker, the next report, a line logged
/// later, or [`Scanner::flush`] when the console goes quiet).
#[derive(Debug, Default)]
pub struct Scanner {
    line: Vec<u8>,
    /// The current line passed [`LINE_MAX`]: the rest of it is dropped.
    overlong: bool,
    open: Option<Open>,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// Reads `bytes`; returns the reports they finished.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<KernelReport> {
        let mut done = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.overlong = false;
                self.take_line(&line, &mut done);
            } else if self.line.len() < LINE_MAX * 4 {
                // Bytes, not characters: room for UTF-8; the line is cut to LINE_MAX below.
                self.line.push(b);
            } else {
                self.overlong = true;
            }
        }
        done
    }

    /// The report being read, if any (a panic's, while the kernel is still printing it).
    pub fn pending(&self) -> Option<&KernelReport> {
        self.open.as_ref().map(|o| &o.report)
    }

    /// Ends the report being read (the console went quiet, or closed).
    pub fn flush(&mut self) -> Option<KernelReport> {
        self.open.take().map(|o| o.report)
    }

    /// Forgets the partial line (bytes were lost in between).
    pub fn resync(&mut self) {
        self.line.clear();
        self.overlong = false;
    }

    fn take_line(&mut self, raw: &[u8], done: &mut Vec<KernelReport>) {
        let t = &*TABLE;
        let text = sanitize(raw);
        let (body, ts) = match t.fields.timestamp.find(&text) {
            Some(m) => {
                let stamp = m.as_str().trim_start_matches('[');
                let secs = stamp.split(']').next().and_then(|s| s.trim().parse::<f64>().ok());
                (&text[m.end()..], secs)
            }
            None => (t.fields.prefix.find(&text).map_or(text.as_str(), |m| &text[m.end()..]), None),
        };
        let mut body: String = body.trim_end().to_string();
        if body.chars().count() > LINE_MAX {
            body = body.chars().take(LINE_MAX).collect::<String>() + "…";
        } else if self.overlong {
            body.push('…');
        }
        if let Some(open) = &self.open {
            let ended = match (open.last_ts, ts) {
                (Some(last), Some(now)) => now > last + REPORT_GAP_S,
                _ => false,
            };
            if ended || open.lines >= REPORT_LINES_MAX {
                done.extend(self.flush());
            }
        }
        let matched = t.set.matches(&body).into_iter().next();
        if let Some(i) = matched {
            let row = &ROWS[i];
            let caps = t.rows[i].captures(&body).expect("the set matched");
            let continues = self.open.as_ref().is_some_and(|o| row.within.contains(&o.report.class));
            if !continues {
                done.extend(self.flush());
                let mut report = KernelReport {
                    class: row.class,
                    cpu: None,
                    task: None,
                    pid: None,
                    stuck_s: None,
                    location: None,
                    line: body.clone(),
                    trace: Vec::new(),
                    stamp_us: ts.map(|t| (t * 1e6).round() as u64),
                };
                fill(&mut report, &caps, false);
                self.open = Some(Open { report, last_ts: ts, trace_bytes: 0, lines: 1, from_rip: false });
                return;
            }
            let open = self.open.as_mut().expect("continues an open report");
            fill(&mut open.report, &caps, row.headline);
            if row.headline {
                // The line that says more leads; the first stays, first in the trace.
                let first = std::mem::replace(&mut open.report.line, body.clone());
                open.trace_bytes += first.len();
                open.report.trace.insert(0, first);
                open.report.trace.truncate(TRACE_LINES);
            }
        }
        let Some(open) = self.open.as_mut() else { return };
        if ts.is_none() && open.last_ts.is_some() {
            // Not the kernel's (no timestamp, where the report's lines have one): the guest's
            // own output interleaved with the report.
            return;
        }
        if body.is_empty() {
            return;
        }
        open.lines += 1;
        if let Some(t) = ts {
            open.last_ts = Some(open.last_ts.map_or(t, |last| last.max(t)));
        }
        self.scan_fields(&body);
        let open = self.open.as_mut().expect("still open");
        let ends = body.starts_with("---[ end ");
        if open.report.trace.len() < TRACE_LINES && open.trace_bytes + body.len() <= TRACE_BYTES {
            open.trace_bytes += body.len();
            open.report.trace.push(body);
        }
        if ends {
            done.extend(self.flush());
        }
    }

    /// Fills the open report's missing fields from one of its lines.
    fn scan_fields(&mut self, body: &str) {
        let f = &TABLE.fields;
        let Some(open) = self.open.as_mut() else { return };
        let r = &mut open.report;
        if let Some(c) = f.cpu_line.captures(body) {
            fill(r, &c, false);
        } else if let Some(c) = f.rcu_cpu.captures(body) {
            if r.class == ReportClass::RcuStall {
                fill(r, &c, false);
            }
        } else if let Some(c) = f.rip.captures(body) {
            if !open.from_rip {
                r.location = Some(c["loc"].to_string());
                open.from_rip = true;
            }
        } else if let Some(c) = f.frame.captures(body) {
            let func = c["func"].split('.').next().unwrap_or_default();
            if r.location.is_none() && c.name("q").is_none() && !PLUMBING.contains(&func) {
                r.location = Some(c["loc"].to_string());
            }
        }
    }
}

/// Sets the fields `caps` names; `overwrite`: even those already set.
fn fill(r: &mut KernelReport, caps: &regex::Captures<'_>, overwrite: bool) {
    let num = |name: &str| caps.name(name).and_then(|m| m.as_str().parse::<u64>().ok());
    if let Some(cpu) = num("cpu").and_then(|n| u32::try_from(n).ok()) {
        if overwrite || r.cpu.is_none() {
            r.cpu = Some(cpu);
        }
    }
    if let Some(pid) = num("pid").and_then(|n| u32::try_from(n).ok()) {
        if overwrite || r.pid.is_none() {
            r.pid = Some(pid);
        }
    }
    if let Some(task) = caps.name("task") {
        if overwrite || r.task.is_none() {
            r.task = Some(task.as_str().trim().to_string());
        }
    }
    if let Some(secs) = num("secs") {
        if overwrite || r.stuck_s.is_none() {
            r.stuck_s = Some(secs);
        }
    }
    if let Some(dev) = caps.name("dev") {
        if r.location.is_none() {
            r.location = Some(format!("dev {}", dev.as_str()));
        }
    }
}

/// Whether `bytes` (console output) hold a line stamped as the kernel stamps its log
/// (`[    1.234567] `): the console is the kernel's. The guest could print such a line from
/// user space too; it is a hint for choosing a source, never evidence of a fault.
pub fn has_kernel_line(bytes: &[u8]) -> bool {
    static STAMP: LazyLock<regex::bytes::Regex> = LazyLock::new(|| {
        regex::bytes::Regex::new(r"\[\s*\d{1,10}\.\d{6}\] ").expect("the stamp pattern compiles")
    });
    STAMP.is_match(bytes)
}

/// Every report in a whole text (a bundle's console file).
pub fn scan_text(text: &str) -> Vec<KernelReport> {
    let mut s = Scanner::new();
    let mut out = s.feed(text.as_bytes());
    out.extend(s.feed(b"\n"));
    out.extend(s.flush());
    out
}

#[cfg(test)]
mod tests;
