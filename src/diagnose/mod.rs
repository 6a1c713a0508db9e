//! Diagnostics: when a VM becomes unresponsive or panics, an ordered list of steps gathers
//! evidence into a bundle directory with a `manifest.json`.
//!
//! Each [`Step`] runs in turn under its own timeout; a step that fails, times out or lacks the
//! channel it needs is recorded as such and the next one runs. With [`Options::deadline`] the
//! steps that wait on the guest share one deadline (the service's `[diagnostics] deadline`,
//! default 8 s). The manifest ends with a [`Verdict`] ([`crate::verdict::judge`]). Everything the guest produces
//! (console text, register values, the script's output) is untrusted: every file a step writes
//! is capped at [`MAX_FILE`] bytes, except the memory dump, which has its own cap.
//!
//! # Steps
//!
//! Configured as TOML tables, flat: `step` names the kind, `timeout` (optional, a duration such
//! as `"5s"`) bounds it, the other keys are the kind's own; unknown keys are refused.
//!
//! | `step` | needs | default timeout | what it writes |
//! |---|---|---|---|
//! | `console-tail` | console | 5 s | the console's kept output (its last 256 KiB), after waiting until the guest has been quiet for `settle` (default `"500ms"`), so the text printed just after the event is included |
//! | `sysrq` | console (and QMP for the break) | 30 s | for each of `keys` (default `"wtlm"`): a serial break, the key, and what the guest printed until quiet for `quiet` (default `"500ms"`) or `per_key` (default `"5s"`). The break is QMP `chardev-send-break` on `chardev` (default: the console's chardev, `"acpimon-console"` for acpimon's own serial port or vm.json's `console_chardev`, e.g. a mux chardev, whose break reaches its serial port); without QMP, or when that chardev does not exist, it is a telnet `IAC BRK` on the console (which only a `telnet=on` chardev turns into a break). Keys that crash, reboot, kill or change the guest (`b c e f g i j k n o r s u`) are refused unless `allow_destructive = true`. `ok` once the kernel answered a key (its "sysrq: ..." line); a key with no output within 2 s (or `per_key` if shorter) ends the step (`failed`, the keys not sent named); skipped on a `panicked` trigger and when QMP says the VM is not running |
//! | `qmp-status` | QMP | 5 s | `query-status` (JSON) |
//! | `qmp-cpus` | QMP | 5 s | `query-cpus-fast` (JSON) |
//! | `registers` | QMP | 10 s | HMP `info registers -a` (every vCPU), twice 300 ms apart (the second after a line `=== acpimon: registers sample 2, ...`); per vCPU through `human-monitor-command`'s `cpu-index` where `-a` is not understood (one sample) |
//! | `inject-nmi` | QMP (console to capture) | 10 s | QMP `inject-nmi`, then the console output until quiet for `quiet` (default `"500ms"`) or `capture` (default `"3s"`); skipped when the VM is not running |
//! | `memory-dump` | QMP | 120 s | `dump-guest-memory` in kdump-raw-zlib format (the kdump-compressed file `crash` reads; QEMU 8.2 and later), or on older QEMU the flattened kdump-zlib stream (`makedumpfile -R` converts it), detached, polled with `query-dump`; skipped when the guest's RAM exceeds `max_bytes` (default `"1GiB"`), deleted if the file grows past it; skipped for a VM reached through libvirt (libvirt owns its dumps: one started behind it crashed libvirtd 9.0; use `virsh dump`). QEMU writes the file itself, so the bundle directory must be writable by QEMU. QEMU stops the VM while it dumps (STOP/RESUME events) |
//! | `gdbstub` | QMP | 15 s | starts QEMU's gdbstub on `Target::gdb_socket` (HMP `gdbserver unix:PATH,server=on,wait=off`), reads every vCPU's registers over the GDB remote protocol (decoded with the target's own register description, and raw), then stops the gdbstub. The gdbstub stops the VM while connected (STOP/RESUME events); the VM is left running or stopped as it was |
//! | `guest-agent` | the guest agent's port | 10 s | QEMU guest agent `guest-get-osinfo`, `guest-get-host-name` and `guest-info`'s version (JSON); skipped without a guest agent port |
//! | `host` | — (QMP and QEMU's pid for parts) | 2 s | what the host saw of the VM, as JSON (schema `acpimon.host/1`, [`crate::host::HostReport`]): the QEMU process and each vCPU thread (state, share of a host CPU used and waited for over the last 10 s, how long busy or idle, per-second history, from the service's sampler), its cgroup's CPU throttling, the drives (`query-block`, `query-blockstats`, `BLOCK_IO_ERROR`s), network links, `query-stats`, and the node (load, pressure, memory, steal, the data directory's free space); within about 200 ms, each QMP query bounded, what could not be read a note. Never skipped: without QMP or a pid it reads the node |
//! | `kernel-log` | QMP (and the VM's directory, which QEMU writes its memory reads into) | 10 s | the guest kernel's log read from its memory ([`crate::memory::dmesg`]): VMCOREINFO (the `vmcoreinfo` device's note, else a bounded RAM scan; cached per boot), then the printk ring, one `[    1.234567] text` line per record line, as `dmesg` prints it (an oversized log keeps its newest 1 MiB). For a guest whose console is elsewhere, quiet, or lost characters. Not skipped on a panicked or paused guest: memory is read whatever the vCPUs do |
//! | `script` | — | 60 s | runs `argv` (no shell) in the bundle directory with `ACPIMON_VM`, `ACPIMON_BUNDLE` (the directory), `ACPIMON_TRIGGER` (the trigger's kind), `ACPIMON_TRIGGER_TIME`, `ACPIMON_TRIGGER_REASON`; stdout and stderr, interleaved, to the file; killed (its whole process group) at the timeout. A non-zero exit is `failed` |
//!
//! # The manifest (`manifest.json`, schema `acpimon.bundle/1`)
//!
//! Written last, atomically (a bundle without one is incomplete). Fields are only ever added.
//!
//! A bundle that cannot be written whole (a step's file or the manifest refused by a full
//! disk) is not a bundle: [`collect`] removes its directory and returns
//! [`DiagnoseError::NotWritten`] with what the steps found, and the service reports the bundle
//! `failed`.
//!
//! ```text
//! {
//!   "schema":   "acpimon.bundle/1",
//!   "vm":       VM name,
//!   "trigger":  { "kind": "unresponsive" | "panicked" | ..., "time": RFC 3339,
//!                 "reason": text, "evidence": any JSON },
//!   "created":  RFC 3339 UTC (ms): when collection started,
//!   "finished": RFC 3339 UTC (ms): when the last step ended,
//!   "timeline": [ any JSON, as the caller gave it: what led up to the trigger ],
//!   "steps": [ one per configured step, in order:
//!     { "name":        the step kind, e.g. "sysrq",
//!       "started":     RFC 3339 UTC (ms),
//!       "duration_ms": integer,
//!       "timeout_ms":  integer, the step's limit,
//!       "outcome":     "ok" | "failed" | "timeout" | "skipped",
//!       "file":        file name relative to the bundle directory ("03-sysrq.txt"), or null,
//!       "bytes":       the file's size (0 without a file),
//!       "reason":      why the outcome is not "ok" (null when ok),
//!       "summary":     step-specific JSON (below), or null } ],
//!   "verdict":  { "class": "panic" | "soft-lockup" | "hard-lockup" | "rcu-stall" | "hung-task" |
//!                 "oom" | "paused-by-host" | "paused-by-io-error" | "waiting-on-io" | "starved" |
//!                 "spinning" | "app-failed" | "userspace-stopped" | "unknown",
//!                 "headline": one line, "evidence": [ { "source": file or "trigger",
//!                 "kernel-report", "symbols", "line": text } ] (at most 16) }
//! }
//! ```
//!
//! Files are named `NN-<step>.<ext>` (NN = position in the list, from 01). A step that failed
//! or timed out may still have written a (partial) file. Summaries:
//! `console-tail` `{ "quiet": bool, "printed_while_settling": bytes }`;
//! `sysrq` `{ "break": "qmp" | "telnet", "keys": [ { "key", "bytes", "header", "disabled",
//! "quiet" } ], "notes": [text] }` (`bytes` printed after the key, `header` the kernel's
//! "sysrq: ..." line or null, `disabled` whether the kernel refused the key, `quiet` whether the
//! output ended before `per_key`);
//! `qmp-status` the `query-status` reply; `qmp-cpus` `{ "count" }`;
//! `registers` `{ "method": "info registers -a" | "per-cpu", "cpus": [ { "cpu", "rip", "cpl", "halted",
//! "symbol"? } ], "samples": 1 | 2 }` (`cpus` from the first sample; `symbol`, e.g.
//! `"native_safe_halt+0xb/0x10"`, from the guest's own kallsyms when the `kernel-log` step
//! before it read them);
//! `inject-nmi` `{ "console": bool, "printed": bytes }`;
//! `memory-dump` `{ "format": "kdump-raw-zlib" | "kdump-zlib", "ram_bytes", "max_bytes", "note"? }`;
//! `gdbstub` `{ "status_before", "status_after", "threads": [ { "thread", "rip", "rsp", "eflags", "symbol"? } ],
//! "notes": [text] }` (statuses as `query-status` names them; values as "0x..." hex);
//! `guest-agent` the same JSON as the file;
//! `kernel-log` `{ "records", "first_seq", "last_seq", "skipped", "dropped", "vmcoreinfo":
//! "device" | "scan" | "cache", "bytes_read", "elapsed_ms", "osrelease" }`;
//! `host` `{ "qemu_state", "qemu_stopped": bool, "vcpus_spinning": [cpu], "vcpus_idle": [cpu],
//! "drives_failed": [name], "throttled": share | null, "cpu_pressure": avg10 | null, "notes": n }`;
//! `script` `{ "exit": code | null, "signal": number | null, "dropped_bytes",
//! "killed_leftovers": bool }` (`killed_leftovers`: processes it left behind were killed).

mod gdb;
mod kernel_log;
pub use kernel_log::KernelLogContext;
mod qemu;
pub use qemu::all_registers;
mod script;
mod serial;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::console::Console;
use crate::sentinel::KernelReport;
use crate::trigger::qmp::{Qmp, QmpError};
use crate::units;
use crate::verdict::{symbols::Symbols, Verdict};

/// The manifest's schema name.
pub const SCHEMA: &str = "acpimon.bundle/1";
/// The largest file a step writes (the memory dump excepted).
pub const MAX_FILE: usize = 1 << 20;
/// How long a step may run past its timeout to undo what it did (stop the gdbstub, resume
/// the VM, kill a script) before it is abandoned.
const CLEANUP_GRACE: Duration = Duration::from_secs(8);

/// Every SysRq key Linux documents on x86, with what it does and whether it changes the
/// guest (crash, reboot, kill, remount, ...) rather than only printing.
pub const SYSRQ_KEYS: &[(char, &str, bool)] = &[
    ('b', "reboot at once", true),
    ('c', "crash (panic)", true),
    ('d', "show all locks held", false),
    ('e', "SIGTERM every process but init", true),
    ('f', "run the OOM killer", true),
    ('g', "enter kgdb", true),
    ('h', "help", false),
    ('i', "SIGKILL every process but init", true),
    ('j', "thaw frozen filesystems", true),
    ('k', "secure attention key: kill every process on the console", true),
    ('l', "backtrace of every active CPU", false),
    ('m', "memory information", false),
    ('n', "make real-time tasks nice-able", true),
    ('o', "power off", true),
    ('p', "registers of the current CPU", false),
    ('q', "armed hrtimers and clock event devices", false),
    ('r', "keyboard out of raw mode", true),
    ('s', "sync filesystems", true),
    ('t', "list every task", false),
    ('u', "remount filesystems read-only", true),
    ('v', "restore the framebuffer console", false),
    ('w', "tasks in uninterruptible (blocked) state", false),
    ('z', "dump the ftrace buffer", false),
    ('R', "replay the kernel log on consoles", false),
    ('0', "console log level 0", false),
    ('1', "console log level 1", false),
    ('2', "console log level 2", false),
    ('3', "console log level 3", false),
    ('4', "console log level 4", false),
    ('5', "console log level 5", false),
    ('6', "console log level 6", false),
    ('7', "console log level 7", false),
    ('8', "console log level 8", false),
    ('9', "console log level 9", false),
];

/// What one configured step does (the `step` key and the kind's own keys).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "step", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StepSpec {
    /// The console's kept output, once the guest has been quiet for `settle`.
    ConsoleTail {
        #[serde(default = "ms500", with = "units::duration")]
        settle: Duration,
    },
    /// SysRq over the serial console, one key after another.
    Sysrq {
        #[serde(default = "default_keys")]
        keys: String,
        /// Allows keys that crash, reboot, kill or otherwise change the guest.
        #[serde(default)]
        allow_destructive: bool,
        /// The longest wait for one key's output.
        #[serde(default = "s5", with = "units::duration")]
        per_key: Duration,
        /// A key's output is complete once the console has been quiet this long.
        #[serde(default = "ms500", with = "units::duration")]
        quiet: Duration,
        /// The QEMU chardev of the serial console, for QMP `chardev-send-break`.
        #[serde(default = "default_chardev")]
        chardev: String,
    },
    /// QMP `query-status`.
    QmpStatus {},
    /// QMP `query-cpus-fast`.
    QmpCpus {},
    /// Every vCPU's registers through HMP `info registers`.
    Registers {},
    /// QMP `inject-nmi`, then the console's output.
    InjectNmi {
        #[serde(default = "s3", with = "units::duration")]
        capture: Duration,
        #[serde(default = "ms500", with = "units::duration")]
        quiet: Duration,
    },
    /// `dump-guest-memory` (kdump-raw-zlib, or kdump-zlib before QEMU 8.2) into the bundle.
    MemoryDump {
        #[serde(default = "default_dump_cap", with = "units::size")]
        max_bytes: u64,
    },
    /// Every vCPU's registers over QEMU's gdbstub, started for the occasion.
    Gdbstub {},
    /// What the QEMU guest agent says of the guest: `guest-get-osinfo`, host name, agent
    /// version (needs `prepare --guest-agent` and qemu-ga in the guest).
    GuestAgent {},
    /// An external program, run without a shell.
    Script { argv: Vec<String> },
    /// What the host saw of the VM: its vCPU threads, devices and the node (`host.json`).
    Host {},
    /// The guest kernel's log, read from its memory (the printk ring, as `dmesg` prints it).
    KernelLog {},
}

fn ms500() -> Duration {
    Duration::from_millis(500)
}
fn s3() -> Duration {
    Duration::from_secs(3)
}
fn s5() -> Duration {
    Duration::from_secs(5)
}
fn default_keys() -> String {
    "wtlm".into()
}
fn default_chardev() -> String {
    crate::launch::CONSOLE_ID.into()
}
fn default_dump_cap() -> u64 {
    1 << 30
}

impl StepSpec {
    /// The kind, as written in `step = "..."` and in the manifest.
    pub fn name(&self) -> &'static str {
        match self {
            StepSpec::ConsoleTail { .. } => "console-tail",
            StepSpec::Sysrq { .. } => "sysrq",
            StepSpec::QmpStatus {} => "qmp-status",
            StepSpec::QmpCpus {} => "qmp-cpus",
            StepSpec::Registers {} => "registers",
            StepSpec::InjectNmi { .. } => "inject-nmi",
            StepSpec::MemoryDump { .. } => "memory-dump",
            StepSpec::Gdbstub {} => "gdbstub",
            StepSpec::GuestAgent {} => "guest-agent",
            StepSpec::Script { .. } => "script",
            StepSpec::Host {} => "host",
            StepSpec::KernelLog {} => "kernel-log",
        }
    }

    /// The timeout when the configuration gives none.
    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(match self {
            StepSpec::ConsoleTail { .. } | StepSpec::QmpStatus {} | StepSpec::QmpCpus {} => 5,
            StepSpec::Sysrq { .. } => 30,
            StepSpec::Registers {} | StepSpec::InjectNmi { .. } => 10,
            StepSpec::MemoryDump { .. } => 120,
            StepSpec::Gdbstub {} => 15,
            StepSpec::GuestAgent {} => 10,
            StepSpec::Script { .. } => 60,
            StepSpec::Host {} => 2,
            StepSpec::KernelLog {} => 10,
        })
    }

    /// Checks the values serde cannot: SysRq keys, a script's argv, caps.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            StepSpec::Sysrq { keys, allow_destructive, per_key, chardev, .. } => {
                if keys.is_empty() || keys.len() > 32 {
                    return Err(format!("sysrq keys '{keys}': give 1 to 32 keys, e.g. \"wtlm\""));
                }
                for c in keys.chars() {
                    match SYSRQ_KEYS.iter().find(|(k, ..)| *k == c) {
                        None => {
                            return Err(format!(
                            "sysrq key {c:?} is not a SysRq key Linux defines on x86; use keys from \"{}\"",
                            SYSRQ_KEYS.iter().map(|(k, ..)| *k).collect::<String>()
                        ))
                        }
                        Some((_, what, true)) if !allow_destructive => {
                            return Err(format!(
                                "sysrq key '{c}' ({what}) changes the guest; set allow_destructive = true to \
                                 allow it"
                            ))
                        }
                        Some(_) => {}
                    }
                }
                if per_key.is_zero() {
                    return Err("sysrq per_key must be more than zero".into());
                }
                if chardev.is_empty() {
                    return Err("sysrq chardev must not be empty".into());
                }
            }
            StepSpec::Script { argv } if argv.first().is_none_or(|a| a.is_empty()) => {
                return Err("script argv must name a program, e.g. [\"/usr/bin/collect\", \"--all\"]".into());
            }
            StepSpec::MemoryDump { max_bytes } if *max_bytes == 0 => {
                return Err("memory-dump max_bytes must be more than zero".into());
            }
            _ => {}
        }
        Ok(())
    }
}

/// One configured step: what it does and how long it may take.
///
/// In TOML: `{ step = "sysrq", keys = "wtlm", timeout = "10s" }`; `timeout` defaults per kind
/// ([`StepSpec::default_timeout`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub spec: StepSpec,
    pub timeout: Duration,
}

impl Step {
    /// A step with its kind's default timeout.
    pub fn new(spec: StepSpec) -> Step {
        let timeout = spec.default_timeout();
        Step { spec, timeout }
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut map = Map::<String, Value>::deserialize(d)?;
        let timeout = match map.remove("timeout") {
            None => None,
            Some(Value::String(s)) => Some(units::parse_duration(&s).map_err(de::Error::custom)?),
            Some(other) => {
                return Err(de::Error::custom(format!(
                    "timeout = {other} is not a duration; write e.g. timeout = \"5s\""
                )))
            }
        };
        let spec = StepSpec::deserialize(Value::Object(map)).map_err(de::Error::custom)?;
        spec.validate().map_err(de::Error::custom)?;
        let timeout = timeout.unwrap_or_else(|| spec.default_timeout());
        if timeout.is_zero() {
            return Err(de::Error::custom(format!("{} timeout must be more than zero", spec.name())));
        }
        Ok(Step { spec, timeout })
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.spec).map_err(serde::ser::Error::custom)?;
        if let Value::Object(m) = &mut v {
            m.insert("timeout".into(), Value::String(units::format_duration(self.timeout)));
        }
        v.serialize(s)
    }
}

/// The steps used when the configuration names none: host (first: it reads the host as the
/// incident found it, in about 200 ms), console-tail, sysrq `wtlm`, kernel-log (after SysRq:
/// its output is in the log too, for a guest whose console is elsewhere), qmp-status,
/// qmp-cpus, registers, guest-agent (skipped without an agent port). None changes the guest or stops the VM.
pub fn default_steps() -> Vec<Step> {
    vec![
        Step::new(StepSpec::Host {}),
        Step::new(StepSpec::ConsoleTail { settle: ms500() }),
        Step::new(StepSpec::Sysrq {
            keys: default_keys(),
            allow_destructive: false,
            per_key: s5(),
            quiet: ms500(),
            chardev: default_chardev(),
        }),
        Step::new(StepSpec::KernelLog {}),
        Step::new(StepSpec::QmpStatus {}),
        Step::new(StepSpec::QmpCpus {}),
        Step::new(StepSpec::Registers {}),
        Step::new(StepSpec::GuestAgent {}),
    ]
}

/// The VM diagnostics run against, and its channels; a missing channel skips the steps that
/// need it.
pub struct Target<'a> {
    pub vm: &'a str,
    pub qmp: Option<&'a Qmp>,
    pub console: Option<&'a Console>,
    /// Where the `gdbstub` step has QEMU listen: a path without commas, at most 107 bytes.
    pub gdb_socket: PathBuf,
    /// The guest agent's socket, when the VM has one.
    pub guest_agent: Option<PathBuf>,
    /// What the `host` step reads beyond QMP: QEMU's pid, the service's sampler, the VM's
    /// device history.
    pub host: crate::host::HostContext,
    /// What the `kernel-log` step needs beyond QMP; without it the step is skipped.
    pub kernel_log: Option<KernelLogContext>,
}

/// Why diagnostics were started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    /// "unresponsive", "panicked", ...
    pub kind: String,
    /// RFC 3339.
    pub time: String,
    pub reason: String,
    pub evidence: Value,
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Failed,
    Timeout,
    Skipped,
}

/// One step in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub name: String,
    pub started: String,
    pub duration_ms: u64,
    pub timeout_ms: u64,
    pub outcome: Outcome,
    /// Relative to the bundle directory.
    pub file: Option<String>,
    pub bytes: u64,
    pub reason: Option<String>,
    pub summary: Option<Value>,
}

/// `manifest.json`: see the module documentation for the schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub vm: String,
    pub trigger: Trigger,
    pub created: String,
    pub finished: String,
    pub timeline: Vec<Value>,
    pub steps: Vec<StepOutcome>,
    /// Why it happened ([`crate::verdict::judge`]); absent only in bundles of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

impl Manifest {
    /// The first step of that kind.
    pub fn step(&self, name: &str) -> Option<&StepOutcome> {
        self.steps.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiagnoseError {
    #[error("cannot create the bundle directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// A step's file or the manifest could not be written (a full disk): the partial bundle
    /// was removed; `manifest` is what the steps found.
    #[error("bundle {dir} not written: {reason}; its partial files were removed (free space on the data directory's file system)")]
    NotWritten { dir: PathBuf, reason: String, manifest: Box<Manifest> },
}

/// The bundle deadline the service uses unless `[diagnostics] deadline` says otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(8);
/// A step that waits on the guest is not started with less than this left of the deadline.
const MIN_SLICE: Duration = Duration::from_millis(300);

/// How a bundle is collected beyond its steps.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The time the steps that wait on the guest's answer (`console-tail`, `sysrq`,
    /// `inject-nmi`, `guest-agent`) share, from the start of collection: each gets at most
    /// what is left, and one with nothing left is skipped. The host-side steps (QMP,
    /// registers, memory dump, gdbstub, script) keep their own timeouts. `None`: no deadline.
    pub deadline: Option<Duration>,
    /// The guest kernel's symbols (a System.map, kallsyms copy or vmlinux) for the verdict.
    pub symbols: Option<PathBuf>,
    /// The VM's recent kernel reports (the sentinel's), for the verdict.
    pub reports: Vec<KernelReport>,
}

/// Whether a step's time is spent waiting for the guest to answer.
fn waits_on_guest(spec: &StepSpec) -> bool {
    matches!(
        spec,
        StepSpec::ConsoleTail { .. }
            | StepSpec::Sysrq { .. }
            | StepSpec::InjectNmi { .. }
            | StepSpec::GuestAgent {}
    )
}

/// Runs `steps` in order against `target`, each under its timeout, writing their files and
/// finally `manifest.json` into `dir` (created if needed). A step's failure is recorded in the
/// manifest and never stops the others; only a directory that cannot be created or written
/// is an error: a step's file or the manifest that cannot be written (a full disk) makes the
/// bundle [`DiagnoseError::NotWritten`], and its directory is removed. No bundle deadline, no
/// symbols, no kernel reports: [`collect_with`] takes them.
pub async fn collect(
    steps: &[Step],
    target: &Target<'_>,
    trigger: &Trigger,
    timeline: Vec<Value>,
    dir: &Path,
) -> Result<Manifest, DiagnoseError> {
    collect_with(steps, target, trigger, timeline, dir, &Options::default()).await
}

/// [`collect`] with a deadline shared by the steps that wait on the guest, and a verdict
/// judged with the given symbols and kernel reports.
pub async fn collect_with(
    steps: &[Step],
    target: &Target<'_>,
    trigger: &Trigger,
    timeline: Vec<Value>,
    dir: &Path,
    opts: &Options,
) -> Result<Manifest, DiagnoseError> {
    let t0 = Instant::now();
    let created = units::now_rfc3339();
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|source| DiagnoseError::CreateDir { path: dir.into(), source })?;
    // Absolute: QEMU writes the memory dump by path, and scripts get it in their environment.
    let dir = tokio::fs::canonicalize(dir)
        .await
        .map_err(|source| DiagnoseError::CreateDir { path: dir.into(), source })?;
    let mut outcomes = Vec::with_capacity(steps.len());
    let write_failure = std::sync::Mutex::new(None);
    for (i, step) in steps.iter().enumerate() {
        let left = opts.deadline.map(|d| d.saturating_sub(t0.elapsed()));
        match left.filter(|_| waits_on_guest(&step.spec)) {
            Some(left) if left < MIN_SLICE => {
                outcomes.push(past_deadline(step, opts.deadline.unwrap_or_default()));
            }
            Some(left) if left < step.timeout => {
                let cut = Step { spec: step.spec.clone(), timeout: left };
                outcomes.push(run_step(i, &cut, target, trigger, &dir, &write_failure).await);
            }
            _ => outcomes.push(run_step(i, step, target, trigger, &dir, &write_failure).await),
        }
    }
    let mut manifest = Manifest {
        schema: SCHEMA.into(),
        vm: target.vm.into(),
        trigger: trigger.clone(),
        created,
        finished: units::now_rfc3339(),
        timeline,
        steps: outcomes,
        verdict: None,
    };
    // Without a symbol file: the guest's own, if the kernel-log step read them.
    let guest_symbols = match (&opts.symbols, &target.kernel_log) {
        (None, Some(k)) => k.symbols(),
        _ => None,
    };
    manifest.verdict = Some(judge(&manifest, &dir, opts, guest_symbols).await);
    let step_failure = crate::util::lock(&write_failure).take();
    let failure = match step_failure {
        Some(reason) => Some(reason),
        None => write_manifest(&dir, &manifest).await.err().map(|e| e.to_string()),
    };
    if let Some(reason) = failure {
        // Half a bundle is not one: remove it (and free the space it held).
        let gone = dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(gone)).await;
        return Err(DiagnoseError::NotWritten { dir, reason, manifest: Box::new(manifest) });
    }
    Ok(manifest)
}

/// A guest-waiting step not run: the deadline was used up.
fn past_deadline(step: &Step, deadline: Duration) -> StepOutcome {
    StepOutcome {
        name: step.spec.name().into(),
        started: units::now_rfc3339(),
        duration_ms: 0,
        timeout_ms: step.timeout.as_millis() as u64,
        outcome: Outcome::Skipped,
        file: None,
        bytes: 0,
        reason: Some(format!(
            "the bundle's deadline of {} was used up by the steps before ([diagnostics] deadline)",
            units::format_duration(deadline)
        )),
        summary: None,
    }
}

/// The verdict on the finished steps; reading files and symbols is disk work, off the async
/// workers.
async fn judge(
    manifest: &Manifest,
    dir: &Path,
    opts: &Options,
    guest_symbols: Option<crate::memory::vmcoreinfo::GuestSymbols>,
) -> Verdict {
    let (m, dir, path, reports) =
        (manifest.clone(), dir.to_path_buf(), opts.symbols.clone(), opts.reports.clone());
    let judged = tokio::task::spawn_blocking(move || {
        let files = crate::verdict::read_files(&dir, &m);
        // No report from the console (elsewhere, quiet): the kernel's reports in its own log.
        let text = |step: &str| files.iter().find(|f| f.step == step).map(|f| f.text.as_str());
        let console_quiet = || text("console-tail").is_none_or(|t| crate::sentinel::scan_text(t).is_empty());
        let reports = match text("kernel-log") {
            Some(log) if reports.is_empty() && console_quiet() => crate::sentinel::scan_text(log),
            _ => reports,
        };
        let symbols = match path.as_deref() {
            Some(p) => Some(Symbols::load(p).map(std::sync::Arc::new)),
            None => guest_symbols,
        };
        let mut v = crate::verdict::judge(
            &m.trigger,
            &m,
            &files,
            &reports,
            symbols.as_ref().and_then(|s| s.as_deref().ok()),
        );
        match symbols {
            Some(Ok(s)) => v.evidence.push(crate::verdict::EvidenceLine {
                source: "symbols".into(),
                line: format!("{} symbols from {}", s.len(), s.source),
            }),
            Some(Err(e)) => {
                v.evidence.push(crate::verdict::EvidenceLine { source: "symbols".into(), line: e })
            }
            None => {}
        }
        v
    })
    .await;
    judged.unwrap_or_else(|e| Verdict {
        class: crate::verdict::Class::Unknown,
        headline: format!("no verdict: judging the bundle failed ({e})"),
        evidence: Vec::new(),
    })
}

async fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), DiagnoseError> {
    let path = dir.join("manifest.json");
    let mut text = serde_json::to_vec_pretty(manifest).expect("the manifest serialises");
    text.push(b'\n');
    let target = path.clone();
    // A present manifest is a finished bundle: written whole, off the async workers.
    let written = tokio::task::spawn_blocking(move || crate::util::fs::atomic_write(&target, &text))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    written.map_err(|source| DiagnoseError::Write { path, source })
}

async fn run_step(
    i: usize,
    step: &Step,
    target: &Target<'_>,
    trigger: &Trigger,
    dir: &Path,
    write_failure: &std::sync::Mutex<Option<String>>,
) -> StepOutcome {
    let name = step.spec.name();
    let started = units::now_rfc3339();
    let t0 = Instant::now();
    let ctx = Ctx {
        dir,
        stem: format!("{:02}-{name}", i + 1),
        deadline: t0 + step.timeout,
        timeout: step.timeout,
        target,
        trigger,
        write_failure,
    };
    let done = match step.spec.validate() {
        Err(e) => Done::failed(e),
        Ok(()) => {
            match tokio::time::timeout(step.timeout + CLEANUP_GRACE, dispatch(&step.spec, &ctx)).await {
                Ok(done) => done,
                Err(_) => Done::timeout(format!(
                    "did not finish within its timeout of {} (and {} to clean up)",
                    units::format_duration(step.timeout),
                    units::format_duration(CLEANUP_GRACE)
                )),
            }
        }
    };
    // A file the step wrote before it was cut short is still reported.
    let (file, bytes) = match done.file {
        Some(f) => {
            let bytes = tokio::fs::metadata(dir.join(&f)).await.map(|m| m.len()).unwrap_or(0);
            (Some(f), bytes)
        }
        None => (None, 0),
    };
    StepOutcome {
        name: name.into(),
        started,
        duration_ms: t0.elapsed().as_millis() as u64,
        timeout_ms: step.timeout.as_millis() as u64,
        outcome: done.outcome,
        file,
        bytes,
        reason: done.reason,
        summary: done.summary,
    }
}

async fn dispatch(spec: &StepSpec, ctx: &Ctx<'_>) -> Done {
    let t = ctx.target;
    let need_qmp = || t.qmp.ok_or_else(|| Done::skipped("no QMP connection to the VM".into()));
    let need_console = || t.console.ok_or_else(|| Done::skipped("no console connection to the VM".into()));
    let r = match spec {
        StepSpec::ConsoleTail { settle } => match need_console() {
            Ok(c) => serial::tail(ctx, c, *settle).await,
            Err(d) => return d,
        },
        StepSpec::Sysrq { keys, per_key, quiet, chardev, .. } => match need_console() {
            Ok(c) => {
                // The default names acpimon's own port; a launcher's console names its chardev.
                let chardev = match c.chardev() {
                    Some(own) if chardev == crate::launch::CONSOLE_ID => own,
                    _ => chardev.as_str(),
                };
                serial::sysrq(ctx, c, t.qmp, keys, *per_key, *quiet, chardev).await
            }
            Err(d) => return d,
        },
        StepSpec::InjectNmi { capture, quiet } => match need_qmp() {
            Ok(q) => serial::inject_nmi(ctx, q, t.console, *capture, *quiet).await,
            Err(d) => return d,
        },
        StepSpec::QmpStatus {} => match need_qmp() {
            Ok(q) => qemu::query(ctx, q, qapi::qmp::query_status {}, |v| Some(v.clone())).await,
            Err(d) => return d,
        },
        StepSpec::QmpCpus {} => match need_qmp() {
            Ok(q) => {
                qemu::query(ctx, q, qapi::qmp::query_cpus_fast {}, |v| {
                    Some(serde_json::json!({ "count": v.as_array().map_or(0, Vec::len) }))
                })
                .await
            }
            Err(d) => return d,
        },
        StepSpec::Registers {} => match need_qmp() {
            Ok(q) => qemu::registers(ctx, q).await.map(|d| symbolised(d, "cpus", t)),
            Err(d) => return d,
        },
        StepSpec::MemoryDump { max_bytes } => match need_qmp() {
            Ok(q) => qemu::memory_dump(ctx, q, *max_bytes).await,
            Err(d) => return d,
        },
        StepSpec::Gdbstub {} => match need_qmp() {
            Ok(q) => gdb::gdbstub(ctx, q).await.map(|d| symbolised(d, "threads", t)),
            Err(d) => return d,
        },
        StepSpec::GuestAgent {} => match &t.guest_agent {
            Some(path) => match crate::app::qga::describe(path, ctx.remaining()).await {
                Ok(v) => {
                    let mut text = serde_json::to_vec_pretty(&v).expect("JSON serialises");
                    text.push(b'\n');
                    ctx.write("json", &text, Keep::Head).await.map(|file| Done::ok(Some(file), Some(v)))
                }
                Err(e) => Err(Done::failed(e)),
            },
            None => {
                return Done::skipped("no guest agent port on the VM (prepare it with --guest-agent)".into())
            }
        },
        StepSpec::Script { argv } => script::run(ctx, argv).await,
        StepSpec::Host {} => host(ctx).await,
        StepSpec::KernelLog {} => match (need_qmp(), &t.kernel_log) {
            (Ok(q), Some(k)) => kernel_log::step(ctx, q, k).await,
            (Err(d), _) => return d,
            (_, None) => {
                return Done::skipped(
                    "no VM directory for QEMU's memory reads (a VM not under acpimon's state directory)"
                        .into(),
                )
            }
        },
    };
    r.unwrap_or_else(|e| e)
}

/// `host`: what the host saw of the VM ([`crate::host::collect`]), as JSON.
async fn host(ctx: &Ctx<'_>) -> StepResult {
    let t = ctx.target;
    let report = crate::host::collect(t.vm, t.qmp, &t.host).await;
    let mut text = serde_json::to_vec_pretty(&report).expect("the host report serialises");
    text.push(b'\n');
    let file = ctx.write("json", &text, Keep::Head).await?;
    Ok(Done::ok(Some(file), Some(host_summary(&report))))
}

/// The `host` step's summary: what the verdict and a reader look at first.
fn host_summary(r: &crate::host::HostReport) -> Value {
    let cpus = |pred: fn(&crate::host::VcpuActivity) -> bool| -> Vec<u32> {
        r.vcpus.iter().filter(|v| pred(v)).map(|v| v.cpu).collect()
    };
    serde_json::json!({
        "qemu_state": r.qemu.as_ref().map(|q| q.state.clone()),
        "qemu_stopped": r.qemu.as_ref().is_some_and(|q| q.all_stopped()),
        "vcpus_spinning": cpus(crate::host::VcpuActivity::spinning),
        "vcpus_idle": cpus(crate::host::VcpuActivity::idle),
        "drives_failed": r.devices.block.iter().filter(|d| d.failed()).map(|d| d.device.clone()).collect::<Vec<_>>(),
        "throttled": r.qemu.as_ref().and_then(|q| q.cgroup.as_ref()).and_then(|c| c.throttled_periods_10s),
        "cpu_pressure": r.node.pressure.as_ref().and_then(|p| p.cpu.as_ref()).map(|c| c.some.avg10),
        "notes": r.notes.len(),
    })
}

/// The guest's own symbols, when the `kernel-log` step read them for this boot.
fn guest_symbols(t: &Target<'_>) -> Option<std::sync::Arc<Symbols>> {
    let k = t.kernel_log.as_ref()?;
    crate::util::lock(&k.cache).symbols(k.boot)?.ok()
}

/// A step's summary with `"symbol": "native_safe_halt+0xb/0x10"` beside each RIP of its `list`
/// (`registers`' cpus, `gdbstub`'s threads), from the guest's own symbols when there are.
fn symbolised(mut done: Done, list: &str, t: &Target<'_>) -> Done {
    let Some(symbols) = guest_symbols(t) else { return done };
    let Some(items) = done.summary.as_mut().and_then(|s| s[list].as_array_mut()) else { return done };
    for item in items {
        let rip = item["rip"].as_str().map(|r| r.trim_start_matches("0x"));
        if let Some(r) = rip.and_then(|r| u64::from_str_radix(r, 16).ok()).and_then(|a| symbols.lookup(a)) {
            item["symbol"] = Value::String(r.to_string());
        }
    }
    done
}

/// What a step gives back; `Err(Done)` in a step is an early end (failed, timeout).
struct Done {
    outcome: Outcome,
    file: Option<String>,
    reason: Option<String>,
    summary: Option<Value>,
}

type StepResult = Result<Done, Done>;

impl Done {
    fn ok(file: Option<String>, summary: Option<Value>) -> Done {
        Done { outcome: Outcome::Ok, file, reason: None, summary }
    }
    fn failed(reason: String) -> Done {
        Done { outcome: Outcome::Failed, file: None, reason: Some(reason), summary: None }
    }
    fn timeout(reason: String) -> Done {
        Done { outcome: Outcome::Timeout, file: None, reason: Some(reason), summary: None }
    }
    fn skipped(reason: String) -> Done {
        Done { outcome: Outcome::Skipped, file: None, reason: Some(reason), summary: None }
    }
    fn with_file(mut self, file: Option<String>) -> Done {
        self.file = self.file.or(file);
        self
    }
    fn with_summary(mut self, summary: Value) -> Done {
        self.summary = Some(summary);
        self
    }
    /// A QMP error: a timeout is the step's timeout, anything else a failure.
    fn qmp(what: &str, e: QmpError) -> Done {
        match e {
            QmpError::Timeout { .. } => Done::timeout(format!("{what}: {e}")),
            _ => Done::failed(format!("{what}: {e}")),
        }
    }
}

/// Which end of an oversized output a file keeps.
#[derive(Clone, Copy)]
enum Keep {
    Head,
    Tail,
}

/// What a running step knows.
struct Ctx<'a> {
    dir: &'a Path,
    /// "03-sysrq": the step's files are named after it.
    stem: String,
    deadline: Instant,
    timeout: Duration,
    target: &'a Target<'a>,
    trigger: &'a Trigger,
    /// The first step file that could not be written: the bundle is then `failed`.
    write_failure: &'a std::sync::Mutex<Option<String>>,
}

impl Ctx<'_> {
    /// Time left before the step's deadline (zero once past it).
    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The step's file name with `ext`, relative to the bundle.
    fn file_name(&self, ext: &str) -> String {
        format!("{}.{ext}", self.stem)
    }

    /// Writes the step's file, at most [`MAX_FILE`] bytes (keeping `keep`'s end, with a note
    /// of what was dropped); returns its relative name.
    async fn write(&self, ext: &str, data: &[u8], keep: Keep) -> Result<String, Done> {
        let name = self.file_name(ext);
        let capped = cap(data, MAX_FILE, keep);
        let path = self.dir.join(&name);
        if let Err(e) = tokio::fs::write(&path, &capped).await {
            // No partial file stays behind, and the bundle as a whole failed.
            let _ = tokio::fs::remove_file(&path).await;
            let reason = format!("cannot write {name}: {e}");
            crate::util::lock(self.write_failure).get_or_insert_with(|| reason.clone());
            return Err(Done::failed(reason));
        }
        Ok(name)
    }

    /// The timeout as people write it, for messages.
    fn timeout_text(&self) -> String {
        units::format_duration(self.timeout)
    }
}

/// `data` cut to at most `max` bytes including a one-line note of how much was dropped.
fn cap(data: &[u8], max: usize, keep: Keep) -> Vec<u8> {
    if data.len() <= max {
        return data.to_vec();
    }
    let note_room = 100;
    let kept = max.saturating_sub(note_room);
    let dropped = data.len() - kept;
    match keep {
        Keep::Head => {
            let mut v = data[..kept].to_vec();
            v.extend_from_slice(format!("\n[acpimon: {dropped} more bytes dropped]\n").as_bytes());
            v
        }
        Keep::Tail => {
            let mut v = format!("[acpimon: {dropped} earlier bytes dropped]\n").into_bytes();
            v.extend_from_slice(&data[data.len() - kept..]);
            v
        }
    }
}

/// Wall-clock now, for step files.
fn now() -> String {
    units::rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests;
