//! The kernel-report sentinel: the guest kernel's own fault reports (soft lockup, hard
//! LOCKUP, RCU stall, hung task, Oops, panic, OOM kill, I/O errors, NMI reports), read from
//! the console stream line by line. The console is untrusted input: lines and traces are
//! bounded, and a report is only ever evidence, never a command.
//!
//! The patterns are data (a table, one row per class) tested on real kernel output from the
//! kernels acpimon supports (5.10 to 6.12).

use serde::{Deserialize, Serialize};

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
}
