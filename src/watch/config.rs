//! The service's configuration file (TOML), validated in one stage with no I/O: every problem
//! is reported at once, each with the file, line and fix. The README ("Configuration") shows
//! every key; this module is the reference.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use super::state::PausePolicy;
use crate::diagnose;
use crate::forward::{ControllerConfig, ForwardError, HookConfig};
use crate::units::{Dur, Size};

/// The configuration file `acpimon watch` reads when none is given, if it exists.
pub const SYSTEM_CONFIG: &str = "/etc/acpimon/watch.toml";

/// Where the metrics and status endpoint listens unless configured.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where `acpimon prepare` writes VM directories; watched for VMs coming and going.
    pub state_dir: PathBuf,
    /// The service's own files: spool, bundles, per-VM state, event log.
    pub data_dir: PathBuf,
    pub node: String,
    pub discover_interval: Duration,
    pub console_keep: usize,
    /// What each VM's console may cost (`console_rate`, `console_burst`).
    pub console_budget: crate::console::Budget,
    pub event_log: Option<PathBuf>,
    /// `event_hold_max` / `event_hold_max_events`: what the event writer holds in memory
    /// while the disk refuses writes; beyond it events are dropped, counted and reported.
    pub event_hold: crate::forward::HoldLimits,
    pub touch_file: Option<PathBuf>,
    /// `None`: no metrics or status endpoint.
    pub metrics: Option<SocketAddr>,
    pub controller: Option<ControllerConfig>,
    pub hook: Option<HookConfig>,
    pub bundles_keep: usize,
    /// `[bundles] max_bytes_per_vm` / `max_bytes`: the size budgets of one VM's bundles and
    /// of every VM's together; the oldest bundles are removed to keep within them.
    pub bundles_budget: BundleBudget,
    /// `[bundles] concurrent`: bundles collected at once on the node; more wait their turn.
    pub bundles_concurrent: usize,
    /// `[libvirt]`: VMs whose QMP goes through libvirt (cargo feature `libvirt`).
    pub libvirt: Option<LibvirtConfig>,
    pub defaults: VmSettings,
    /// Per-VM settings, already merged over the defaults.
    pub vms: BTreeMap<String, VmSettings>,
}

/// The size budgets of bundles (`[bundles]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BundleBudget {
    pub per_vm: u64,
    pub total: u64,
}

impl Default for BundleBudget {
    /// 2 GiB per VM (a default memory dump is at most 1 GiB), 8 GiB for the service.
    fn default() -> BundleBudget {
        BundleBudget { per_vm: 2 << 30, total: 8 << 30 }
    }
}

/// `[libvirt]`: domains whose QMP commands and events go through libvirt's monitor
/// passthrough instead of the VM's own QMP socket. A domain is the acpimon VM of its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// libvirt's connection URI, e.g. `qemu:///system`.
    pub uri: String,
    /// Domain names or UUIDs; empty: every VM is a libvirt domain of its name.
    pub domains: Vec<String>,
}

/// How one VM is watched. Serialised (for `watch --check --json`) with the file's key names.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmSettings {
    pub enabled: bool,
    /// A scenario's misses do not count as failures for this long after the VM is attached or
    /// reboots, unless it has answered since (the grace is per scenario).
    #[serde(serialize_with = "crate::units::duration::serialize")]
    pub startup_grace: Duration,
    pub pause: PausePolicy,
    #[serde(rename = "scenario")]
    pub scenarios: Vec<Scenario>,
    #[serde(rename = "diagnostic")]
    pub diagnostics: Vec<diagnose::Step>,
    /// `[diagnostics]`: how bundles are collected and judged beyond their steps.
    #[serde(rename = "diagnostics")]
    pub bundle: BundleSettings,
    pub recovery: Recovery,
    /// What the guest kernel's own reports do to the VM's state.
    pub kernel_reports: super::kernel::KernelPolicy,
    /// Whether the guest kernel's log is followed in its memory for the kernel-report
    /// sentinel (README "Kernel reports"), and how often it is read.
    pub kernel_log_follow: FollowMode,
    #[serde(serialize_with = "crate::units::duration::serialize")]
    pub kernel_log_every: Duration,
}

/// `kernel_log_follow`: when the kernel log is read from guest memory for the sentinel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FollowMode {
    /// When the VM has no usable console: none connected, or one that showed no kernel line
    /// while the memory log gained records the kernel prints even on a quiet console.
    Auto,
    /// Always, beside the console (a report both carry is sent once, the console's).
    Always,
    Off,
}

impl FollowMode {
    pub fn name(self) -> &'static str {
        match self {
            FollowMode::Auto => "auto",
            FollowMode::Always => "always",
            FollowMode::Off => "off",
        }
    }
}

/// How often the kernel log is followed by default: an idle poll costs about a millisecond
/// of host time and one small `pmemsave` (README's figures).
pub const KERNEL_LOG_EVERY: Duration = Duration::from_secs(5);

/// `[diagnostics]` of a VM (or `[defaults]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BundleSettings {
    /// The time the steps that wait on the guest's answer share (default 8 s).
    #[serde(serialize_with = "crate::units::duration::serialize")]
    pub deadline: Duration,
    /// The guest kernel's symbols for verdicts: a System.map, a copy of /proc/kallsyms, or a
    /// vmlinux with its symbol table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbols: Option<PathBuf>,
}

impl Default for BundleSettings {
    fn default() -> Self {
        BundleSettings { deadline: diagnose::DEFAULT_DEADLINE, symbols: None }
    }
}

/// One monitoring scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    /// Unique within the VM; defaults to the kind.
    pub name: String,
    #[serde(flatten)]
    pub probe: ScenarioSpec,
    #[serde(serialize_with = "crate::units::duration::serialize")]
    pub interval: Duration,
    #[serde(serialize_with = "crate::units::duration::serialize")]
    pub timeout: Duration,
    /// Consecutive misses that make the VM unresponsive.
    pub threshold: u32,
}

/// What one scenario probes: the `kind` key and the kind's own keys (`name`, `interval`,
/// `timeout` and `threshold` are every kind's, in [`Scenario`]). A new kind is a variant here,
/// its defaults in [`ScenarioSpec::defaults`] and its probe in `probe.rs`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ScenarioSpec {
    /// The QMP-triggered ACPI record.
    AcpiHeartbeat {},
    /// The guest's own thermal-zone polls: records expected at the table's period.
    Thermal {},
    /// A command on the serial console whose output must match a pattern.
    Console {
        #[serde(default = "default_command")]
        command: String,
        #[serde(default = "default_expect")]
        expect: Pattern,
    },
    /// A TCP connect to `address` (HOST:PORT; required, [`ScenarioSpec::validate`] says so).
    Tcp {
        #[serde(default)]
        address: String,
    },
    /// The app protocol's challenge over the app channel, and health requests every
    /// `health_interval` ("0s": none), naming `audit`, if set.
    AppHeartbeat {
        #[serde(default = "default_health_interval", with = "interval_or_off")]
        health_interval: Option<Duration>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        audit: Option<String>,
    },
    /// QEMU guest agent `guest-ping`.
    GuestAgent {},
    /// The app mailbox's beat counter in the region.
    AppMailbox {},
    /// Every vCPU's registers through QMP: one running kernel code with interrupts disabled
    /// across samples is hard-locked (src/watch/vcpus.rs).
    VcpuProgress {},
}

fn default_command() -> String {
    "uptime".into()
}
fn default_expect() -> Pattern {
    Pattern(Regex::new("load average").expect("a valid pattern"))
}
fn default_health_interval() -> Option<Duration> {
    Some(Duration::from_secs(30))
}

/// A duration where "0s" means off.
mod interval_or_off {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        crate::units::duration::deserialize(d).map(|d| Some(d).filter(|d| !d.is_zero()))
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        crate::units::duration::serialize(&d.unwrap_or_default(), s)
    }
}

/// A regular expression in the configuration (`expect`), checked when read.
#[derive(Clone, Debug)]
pub struct Pattern(pub Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Regex::new(&text).map(Pattern).map_err(|e| {
            let e = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            serde::de::Error::custom(format!("expect is not a regular expression: {e}"))
        })
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl ScenarioSpec {
    /// The kind, as written in `kind = "..."`.
    pub fn kind(&self) -> &'static str {
        match self {
            ScenarioSpec::AcpiHeartbeat {} => "acpi-heartbeat",
            ScenarioSpec::Thermal {} => "thermal",
            ScenarioSpec::Console { .. } => "console",
            ScenarioSpec::Tcp { .. } => "tcp",
            ScenarioSpec::AppHeartbeat { .. } => "app-heartbeat",
            ScenarioSpec::GuestAgent {} => "guest-agent",
            ScenarioSpec::AppMailbox {} => "app-mailbox",
            ScenarioSpec::VcpuProgress {} => "vcpu-progress",
        }
    }

    /// (interval, timeout, threshold) when the configuration gives none.
    pub fn defaults(&self) -> (Duration, Duration, u32) {
        let s = Duration::from_secs;
        match self {
            ScenarioSpec::AcpiHeartbeat {} => (s(1), s(1), 3),
            ScenarioSpec::Thermal {} => (s(2), s(2), 2),
            ScenarioSpec::Console { .. } => (s(10), s(5), 2),
            ScenarioSpec::Tcp { .. } => (s(5), s(2), 3),
            ScenarioSpec::AppHeartbeat { .. } => (s(5), s(2), 3),
            ScenarioSpec::GuestAgent {} => (s(10), s(3), 3),
            ScenarioSpec::AppMailbox {} => (s(2), s(2), 3),
            ScenarioSpec::VcpuProgress {} => (s(1), s(2), 3),
        }
    }

    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            ScenarioSpec::Console { command, .. }
                if command.contains(['\n', '\r']) || command.len() > 256 =>
            {
                Err("command must be one line of at most 256 bytes".into())
            }
            ScenarioSpec::Tcp { address } if address.is_empty() => {
                Err("needs `address = \"HOST:PORT\"`".into())
            }
            ScenarioSpec::Tcp { address } if !valid_host_port(address) => {
                Err(format!("address '{address}' is not HOST:PORT"))
            }
            _ => Ok(()),
        }
    }
}

/// What to do after diagnostics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recovery {
    #[serde(flatten)]
    pub action: RecoveryAction,
    /// At most this many actions per VM in any hour (0: never act).
    pub max_per_hour: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum RecoveryAction {
    None,
    /// QMP `system_reset`.
    Reset,
    /// QMP `quit`: QEMU exits; whatever launched it decides what comes next.
    Poweroff,
    /// A command (argv), with `ACPIMON_VM` and `ACPIMON_BUNDLE` set.
    Command {
        argv: Vec<String>,
        #[serde(serialize_with = "crate::units::duration::serialize")]
        timeout: Duration,
    },
}

impl RecoveryAction {
    pub fn name(&self) -> &'static str {
        match self {
            RecoveryAction::None => "none",
            RecoveryAction::Reset => "reset",
            RecoveryAction::Poweroff => "poweroff",
            RecoveryAction::Command { .. } => "command",
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based; 0 when the problem has no place in the file.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        if let [p] = self.problems.as_slice() {
            return match p.line {
                0 => write!(f, "{}: {}", self.file.display(), p.message),
                l => write!(f, "{}:{l}: {}", self.file.display(), p.message),
            };
        }
        write!(f, "{} has {n} problem{}; fix {} and start again:", self.file.display(), plural(n), them(n))?;
        for p in &self.problems {
            match p.line {
                0 => write!(f, "\n  {}: {}", self.file.display(), p.message)?,
                l => write!(f, "\n  {}:{l}: {}", self.file.display(), p.message)?,
            }
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn them(n: usize) -> &'static str {
    if n == 1 {
        "it"
    } else {
        "them"
    }
}

// ---- the file as written ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    node: Option<String>,
    discover_interval: Option<Spanned<Dur>>,
    console_keep: Option<Spanned<Size>>,
    console_rate: Option<Spanned<Size>>,
    console_burst: Option<Spanned<Size>>,
    event_log: Option<PathBuf>,
    event_hold_max: Option<Spanned<Size>>,
    event_hold_max_events: Option<Spanned<usize>>,
    touch_file: Option<PathBuf>,
    metrics: Option<RawMetrics>,
    controller: Option<Spanned<RawController>>,
    hook: Option<Spanned<RawHook>>,
    bundles: Option<RawBundles>,
    libvirt: Option<Spanned<RawLibvirt>>,
    defaults: Option<RawVm>,
    #[serde(default)]
    vm: BTreeMap<String, Spanned<RawVm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// "" disables the endpoint.
    listen: Spanned<String>,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    url: Spanned<String>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    timeout: Option<Dur>,
    spool_max: Option<Size>,
    spool_max_events: Option<usize>,
    backoff_min: Option<Dur>,
    backoff_max: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    argv: Vec<String>,
    timeout: Option<Dur>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    uri: String,
    #[serde(default)]
    domains: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundles {
    #[serde(default = "default_keep")]
    keep_per_vm: usize,
    max_bytes_per_vm: Option<Spanned<Size>>,
    max_bytes: Option<Spanned<Size>>,
    concurrent: Option<Spanned<usize>>,
}

fn default_keep() -> usize {
    10
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawVm {
    enabled: Option<bool>,
    startup_grace: Option<Dur>,
    pause: Option<PausePolicy>,
    scenario: Option<Vec<Spanned<toml::Table>>>,
    diagnostic: Option<Vec<Spanned<toml::Table>>>,
    diagnostics: Option<RawDiagnostics>,
    recovery: Option<Spanned<RawRecovery>>,
    kernel_reports: Option<toml::Table>,
    kernel_log_follow: Option<FollowMode>,
    kernel_log_every: Option<Spanned<Dur>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawDiagnostics {
    deadline: Option<Spanned<Dur>>,
    symbols: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawRecovery {
    action: String,
    max_per_hour: Option<u32>,
    argv: Option<Vec<String>>,
    timeout: Option<Dur>,
}

/// The scenarios a VM gets when nothing is configured.
pub fn default_scenarios() -> Vec<Scenario> {
    let probe = ScenarioSpec::AcpiHeartbeat {};
    let (interval, timeout, threshold) = probe.defaults();
    vec![Scenario { name: probe.kind().into(), probe, interval, timeout, threshold }]
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            enabled: true,
            startup_grace: Duration::from_secs(120),
            pause: PausePolicy::Counts,
            scenarios: default_scenarios(),
            diagnostics: diagnose::default_steps(),
            bundle: BundleSettings::default(),
            recovery: Recovery { action: RecoveryAction::None, max_per_hour: 3 },
            kernel_reports: super::kernel::KernelPolicy::default(),
            kernel_log_follow: FollowMode::Auto,
            kernel_log_every: KERNEL_LOG_EVERY,
        }
    }
}

/// The state directory used when none is given: `$XDG_RUNTIME_DIR/acpimon`, else
/// `$TMPDIR/acpimon-UID`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("acpimon"),
        _ => std::env::temp_dir().join(format!("acpimon-{}", rustix::process::getuid().as_raw())),
    }
}

/// This machine's host name, for events.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.into(),
            problems: vec![Problem { line: 0, message: format!("cannot read it: {e}") }],
        })?;
        Config::parse(&text, path)
    }

    /// What `acpimon watch` runs with: `file`; else `system` ([`SYSTEM_CONFIG`]) when it
    /// exists; else the built-in configuration. `state_dir` overrides the file's.
    pub fn resolve(
        file: Option<&Path>,
        system: &Path,
        state_dir: Option<PathBuf>,
    ) -> Result<Config, ConfigErrors> {
        let file = file.or_else(|| system.exists().then_some(system));
        match file {
            Some(f) => {
                let mut config = Config::load(f)?;
                if let Some(dir) = state_dir {
                    config.state_dir = dir;
                }
                Ok(config)
            }
            None => Ok(Config::builtin(state_dir.unwrap_or_else(default_state_dir))),
        }
    }

    /// The built-in configuration: every VM in `state_dir` with the default scenarios.
    pub fn builtin(state_dir: PathBuf) -> Config {
        Config::parse("", Path::new("(built-in)"))
            .map(|mut c| {
                c.data_dir = state_dir.join(".watch");
                c.event_log = Some(c.data_dir.join("events.jsonl"));
                c.state_dir = state_dir;
                c
            })
            .expect("the empty configuration is valid")
    }

    /// Validates `text`; `file` names it in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
        let mut v = Validator { text, problems: Vec::new() };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let line = e.span().map(|s| v.line(s.start)).unwrap_or(0);
                let message = e.message().trim().replace('\n', " ");
                return Err(ConfigErrors { file: file.into(), problems: vec![Problem { line, message }] });
            }
        };
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors { file: file.into(), problems: v.problems })
        }
    }

    /// The settings of VM `name`.
    pub fn settings_for(&self, name: &str) -> &VmSettings {
        self.vms.get(name).unwrap_or(&self.defaults)
    }
}

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn problem(&mut self, span: std::ops::Range<usize>, message: String) {
        let line = self.line(span.start);
        self.problems.push(Problem { line, message });
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let state_dir = raw.state_dir.unwrap_or_else(default_state_dir);
        let data_dir = raw.data_dir.unwrap_or_else(|| state_dir.join(".watch"));
        let event_log = match raw.event_log {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(data_dir.join(p)),
            None => Some(data_dir.join("events.jsonl")),
        };
        let discover_interval = match raw.discover_interval {
            Some(d) if d.get_ref().0 < Duration::from_millis(100) => {
                self.problem(d.span(), "discover_interval must be at least 100ms".into());
                Duration::from_secs(2)
            }
            Some(d) => d.into_inner().0,
            None => Duration::from_secs(2),
        };
        let console_keep = match raw.console_keep {
            Some(s) if !(4096..=64 << 20).contains(&s.get_ref().0) => {
                self.problem(s.span(), "console_keep must be between 4KiB and 64MiB".into());
                0
            }
            Some(s) => s.into_inner().0 as usize,
            None => crate::console::DEFAULT_KEEP,
        };
        let mut console_budget = crate::console::Budget::default();
        for (raw, key, min, field) in [
            (raw.console_rate, "console_rate", 1u64 << 10, &mut console_budget.rate),
            (raw.console_burst, "console_burst", 4 << 10, &mut console_budget.burst),
        ] {
            match raw {
                Some(s) if !(min..=64 << 20).contains(&s.get_ref().0) => {
                    self.problem(s.span(), format!("{key} must be between {}KiB and 64MiB", min >> 10))
                }
                Some(s) => *field = s.into_inner().0,
                None => {}
            }
        }
        let metrics = match raw.metrics {
            None => Some(DEFAULT_METRICS.parse().expect("valid address")),
            Some(m) if m.listen.get_ref().is_empty() => None,
            Some(m) => match m.listen.get_ref().parse::<SocketAddr>() {
                Ok(a) if !a.ip().is_loopback() && !m.allow_remote => {
                    self.problem(
                        m.listen.span(),
                        format!(
                            "metrics.listen {a} is not a loopback address; the endpoint has no \
                             authentication, so set allow_remote = true to expose it anyway"
                        ),
                    );
                    None
                }
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(
                        m.listen.span(),
                        format!(
                            "metrics.listen '{}' is not IP:PORT; write e.g. \"{DEFAULT_METRICS}\", or \"\" to \
                             turn the endpoint off",
                            m.listen.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let controller = raw.controller.map(|c| self.controller(c));
        let hook = raw.hook.and_then(|h| {
            let span = h.span();
            let h = h.into_inner();
            let hook = HookConfig {
                argv: h.argv,
                timeout: h.timeout.map_or(Duration::from_secs(10), |d| d.0),
                queue: 1024,
            };
            match hook.validate() {
                Ok(()) => Some(hook),
                Err(e) => {
                    self.problem(span, e.to_string());
                    None
                }
            }
        });
        let bundles_keep = raw.bundles.as_ref().map_or(10, |b| b.keep_per_vm.max(1));
        let mut bundles_budget = BundleBudget::default();
        let mut bundles_concurrent = super::bundles::default_concurrent();
        if let Some(c) = raw.bundles.as_ref().and_then(|b| b.concurrent.as_ref()) {
            if *c.get_ref() == 0 {
                self.problem(c.span(), "[bundles] concurrent must be at least 1; try 4".to_string());
            } else {
                bundles_concurrent = *c.get_ref();
            }
        }
        if let Some(b) = raw.bundles {
            for (key, value, slot) in [
                ("max_bytes_per_vm", b.max_bytes_per_vm, &mut bundles_budget.per_vm),
                ("max_bytes", b.max_bytes, &mut bundles_budget.total),
            ] {
                match value {
                    Some(v) if v.get_ref().0 < 1 << 20 => {
                        self.problem(v.span(), format!("[bundles] {key} must be at least 1MiB; try \"2GiB\""))
                    }
                    Some(v) => *slot = v.into_inner().0,
                    None => {}
                }
            }
        }
        let mut event_hold = crate::forward::HoldLimits::default();
        match raw.event_hold_max {
            Some(v) if v.get_ref().0 < 64 << 10 => {
                self.problem(v.span(), "event_hold_max must be at least 64KiB; try \"16MiB\"".into())
            }
            Some(v) => event_hold.max_bytes = v.into_inner().0,
            None => {}
        }
        match raw.event_hold_max_events {
            Some(v) if *v.get_ref() == 0 => {
                self.problem(v.span(), "event_hold_max_events must be more than 0; try 50000".into())
            }
            Some(v) => event_hold.max_events = v.into_inner(),
            None => {}
        }
        let libvirt = raw.libvirt.and_then(|l| {
            let span = l.span();
            let l = l.into_inner();
            if !cfg!(feature = "libvirt") {
                self.problem(
                    span,
                    "[libvirt]: this acpimon was built without libvirt; build it with `cargo build \
                     --features libvirt` (it needs libvirt's client library), or watch the domain \
                     through its own QMP socket (remove [libvirt])"
                        .into(),
                );
                return None;
            }
            if l.uri.is_empty() {
                self.problem(span, "[libvirt]: uri is empty; write e.g. uri = \"qemu:///system\"".into());
                return None;
            }
            Some(LibvirtConfig { uri: l.uri, domains: l.domains })
        });
        let defaults = self.vm_settings(raw.defaults.unwrap_or_default(), &VmSettings::default(), "defaults");
        let mut vms = BTreeMap::new();
        for (name, vm) in raw.vm {
            if !crate::launch::prepare::valid_name(&name) {
                self.problem(
                    vm.span(),
                    format!(
                        "[vm.{name}]: not a VM name acpimon prepare accepts (1-64 of letters, digits, . _ -)"
                    ),
                );
                continue;
            }
            let settings = self.vm_settings(vm.into_inner(), &defaults, &format!("vm.{name}"));
            vms.insert(name, settings);
        }
        Config {
            state_dir,
            data_dir,
            node: raw.node.unwrap_or_else(host_name),
            discover_interval,
            console_keep,
            console_budget,
            event_log,
            event_hold,
            touch_file: raw.touch_file,
            metrics,
            controller,
            hook,
            bundles_keep,
            bundles_budget,
            bundles_concurrent,
            libvirt,
            defaults,
            vms,
        }
    }

    fn controller(&mut self, c: Spanned<RawController>) -> ControllerConfig {
        let span = c.span();
        let c = c.into_inner();
        let backoff_max = c.backoff_max.map_or(Duration::from_secs(60), |d| d.0);
        let controller = ControllerConfig {
            url: c.url.get_ref().trim_end_matches('/').to_string(),
            ca_file: c.ca_file,
            client_cert: c.client_cert,
            client_key: c.client_key,
            token_file: c.token_file,
            timeout: c.timeout.map_or(Duration::from_secs(5), |d| d.0),
            spool_max_bytes: c.spool_max.map_or(64 << 20, |s| s.0),
            spool_max_events: c.spool_max_events.unwrap_or(100_000),
            // Unset, the minimum follows a maximum set below its default.
            backoff_min: c.backoff_min.map_or(backoff_max.min(Duration::from_secs(1)), |d| d.0),
            backoff_max,
        };
        // The forwarder's own rules; a bad URL is reported at its line.
        if let Err(e) = controller.validate() {
            let at = if matches!(e, ForwardError::BadUrl { .. }) { c.url.span() } else { span };
            self.problem(at, e.to_string());
        }
        controller
    }

    fn vm_settings(&mut self, raw: RawVm, base: &VmSettings, section: &str) -> VmSettings {
        let scenarios = match raw.scenario {
            Some(list) => {
                let mut out: Vec<Scenario> = Vec::new();
                for s in list {
                    let span = s.span();
                    if let Some(sc) = self.scenario(s.into_inner(), span.clone(), section) {
                        if out.iter().any(|o| o.name == sc.name) {
                            self.problem(
                                span,
                                format!(
                                    "{section}: two scenarios are named '{}'; give one a distinct `name`",
                                    sc.name
                                ),
                            );
                        } else {
                            out.push(sc);
                        }
                    }
                }
                out
            }
            None => base.scenarios.clone(),
        };
        let diagnostics = match raw.diagnostic {
            Some(list) => list
                .into_iter()
                .filter_map(|t| {
                    let span = t.span();
                    match toml::Value::Table(t.into_inner()).try_into::<diagnose::Step>() {
                        Ok(step) => Some(step),
                        Err(e) => {
                            let msg = e.message().trim().replace('\n', " ");
                            self.problem(span, format!("{section}.diagnostic: {msg}"));
                            None
                        }
                    }
                })
                .collect(),
            None => base.diagnostics.clone(),
        };
        let bundle = match raw.diagnostics {
            Some(d) => {
                let deadline = match d.deadline {
                    Some(dl) => (Some(dl.span()), dl.into_inner().0),
                    None => (None, base.bundle.deadline),
                };
                if let (Some(span), true) = (deadline.0, deadline.1.is_zero()) {
                    self.problem(
                        span,
                        format!(
                            "{section}.diagnostics: deadline must be more than zero, e.g. deadline = \"8s\""
                        ),
                    );
                }
                // Absolute: the service's working directory is not the configuration's.
                let deadline = deadline.1;
                let symbols = match d.symbols.map(|p| (p.span(), p.into_inner())) {
                    Some((span, p)) if !p.is_absolute() => {
                        self.problem(
                            span,
                            format!(
                                "{section}.diagnostics: symbols = {:?} must be an absolute path (a System.map, a copy \
                                 of the guest's /proc/kallsyms, or a vmlinux)",
                                p.display().to_string()
                            ),
                        );
                        None
                    }
                    Some((_, p)) => Some(p),
                    None => base.bundle.symbols.clone(),
                };
                BundleSettings { deadline, symbols }
            }
            None => base.bundle.clone(),
        };
        let recovery = match raw.recovery {
            Some(r) => {
                let span = r.span();
                self.recovery(r.into_inner(), span, section, base)
            }
            None => base.recovery.clone(),
        };
        let kernel_reports = match raw.kernel_reports {
            // Not Spanned: toml's spans do not survive a table of tables here. The problems
            // name their keys; the line is the section's.
            Some(t) => super::kernel::KernelPolicy::parse(&t, &base.kernel_reports, section).unwrap_or_else(
                |problems| {
                    let at = self
                        .text
                        .find(&format!("{section}.kernel_reports"))
                        .or_else(|| self.text.find("kernel_reports"))
                        .unwrap_or(0);
                    for p in problems {
                        self.problem(at..at, p);
                    }
                    base.kernel_reports.clone()
                },
            ),
            None => base.kernel_reports.clone(),
        };
        let kernel_log_every = match raw.kernel_log_every {
            Some(e) if e.get_ref().0 < Duration::from_secs(1) => {
                self.problem(
                    e.span(),
                    format!(
                        "{section}: kernel_log_every must be at least 1s, e.g. kernel_log_every = \"5s\""
                    ),
                );
                base.kernel_log_every
            }
            Some(e) => e.into_inner().0,
            None => base.kernel_log_every,
        };
        VmSettings {
            enabled: raw.enabled.unwrap_or(base.enabled),
            startup_grace: raw.startup_grace.map_or(base.startup_grace, |d| d.0),
            pause: raw.pause.unwrap_or(base.pause),
            scenarios,
            diagnostics,
            bundle,
            recovery,
            kernel_reports,
            kernel_log_follow: raw.kernel_log_follow.unwrap_or(base.kernel_log_follow),
            kernel_log_every,
        }
    }

    fn scenario(
        &mut self,
        mut t: toml::Table,
        span: std::ops::Range<usize>,
        section: &str,
    ) -> Option<Scenario> {
        let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("?").to_string();
        // Every kind's keys first: name, interval, timeout, threshold.
        let name = match t.remove("name") {
            None => kind.clone(),
            Some(toml::Value::String(n)) => n,
            Some(other) => {
                self.problem(span, format!("{section}.scenario: name = {other} is not a string"));
                return None;
            }
        };
        let at = format!("{section}.scenario '{name}'");
        let mut ok = true;
        let mut take = |key: &str, this: &mut Self| -> Option<toml::Value> {
            let v = t.remove(key)?;
            let checked = match key {
                "threshold" => v.clone().try_into::<u32>().map(drop),
                _ => v.clone().try_into::<Dur>().map(drop),
            };
            if let Err(e) = checked {
                this.problem(span.clone(), format!("{at}: {key}: {}", e.message().trim()));
                ok = false;
                return None;
            }
            Some(v)
        };
        let interval = take("interval", self).and_then(|v| v.try_into::<Dur>().ok()).map(|d| d.0);
        let timeout = take("timeout", self).and_then(|v| v.try_into::<Dur>().ok()).map(|d| d.0);
        let threshold = take("threshold", self).and_then(|v| v.try_into::<u32>().ok());
        // The rest is the kind's own (ScenarioSpec). Keys the kind does not have are taken out
        // one by one as serde names them, so all are reported at once, as one problem.
        let mut unused = Vec::new();
        let spec = loop {
            match toml::Value::Table(t.clone()).try_into::<ScenarioSpec>() {
                Ok(spec) => break Some(spec),
                Err(e) => {
                    let msg = e.message().trim().replace('\n', " ");
                    if let Some(field) = unknown_field(&msg) {
                        if t.remove(&field).is_some() {
                            unused.push(field);
                            continue;
                        }
                    }
                    // serde lists the kinds it knows: a new variant needs no edit here.
                    let msg = match msg.strip_prefix("unknown variant ") {
                        Some(rest) => format!(
                            "{section}.scenario: kind '{kind}' is unknown; use {}",
                            rest.split_once("expected ").map_or(rest, |(_, kinds)| kinds)
                        ),
                        None => format!("{at}: {msg}"),
                    };
                    self.problem(span.clone(), msg);
                    break None;
                }
            }
        };
        let spec = spec?;
        let (d_interval, d_timeout, d_threshold) = spec.defaults();
        let interval = interval.unwrap_or(d_interval);
        let timeout = timeout.unwrap_or(d_timeout);
        let threshold = threshold.unwrap_or(d_threshold);
        if interval < Duration::from_millis(100) {
            self.problem(span.clone(), format!("{at}: interval must be at least 100ms"));
            ok = false;
        }
        if timeout.is_zero() {
            self.problem(span.clone(), format!("{at}: timeout must be more than 0"));
            ok = false;
        }
        if !(1..=1000).contains(&threshold) {
            self.problem(span.clone(), format!("{at}: threshold must be 1 to 1000 consecutive misses"));
            ok = false;
        }
        if let Err(why) = spec.validate() {
            self.problem(span.clone(), format!("{at}: {why}"));
            ok = false;
        }
        if !unused.is_empty() {
            self.problem(
                span,
                format!("{at}: {} do(es) not apply to kind {}; remove it", unused.join(", "), spec.kind()),
            );
            ok = false;
        }
        ok.then_some(Scenario { name, probe: spec, interval, timeout, threshold })
    }

    fn recovery(
        &mut self,
        r: RawRecovery,
        span: std::ops::Range<usize>,
        section: &str,
        base: &VmSettings,
    ) -> Recovery {
        let max_per_hour = r.max_per_hour.unwrap_or(base.recovery.max_per_hour);
        let action = match (r.action.as_str(), r.argv) {
            ("none", None) => RecoveryAction::None,
            ("reset", None) => RecoveryAction::Reset,
            ("poweroff", None) => RecoveryAction::Poweroff,
            ("command", Some(argv)) if !argv.is_empty() && !argv[0].is_empty() => {
                RecoveryAction::Command { argv, timeout: r.timeout.map_or(Duration::from_secs(60), |d| d.0) }
            }
            ("command", _) => {
                self.problem(
                    span,
                    format!("{section}.recovery: action \"command\" needs argv = [\"program\", ...]"),
                );
                RecoveryAction::None
            }
            ("none" | "reset" | "poweroff", Some(_)) => {
                self.problem(span, format!("{section}.recovery: argv only applies to action \"command\""));
                RecoveryAction::None
            }
            (other, _) => {
                self.problem(
                    span,
                    format!("{section}.recovery: action '{other}' is unknown; use none, reset, poweroff or command"),
                );
                RecoveryAction::None
            }
        };
        Recovery { action, max_per_hour }
    }
}

/// The field serde names in "unknown field `X`, ...".
fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn valid_host_port(a: &str) -> bool {
    match a.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests;
