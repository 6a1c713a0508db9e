//! The events the service emits: one [`Event`] envelope (key, time, node, VM) around one
//! [`EventKind`], a variant per kind with its own fields. They are logged, spooled, POSTed and
//! run through the hook as JSON; the README's event table ("States and events") lists the same
//! kinds and fields, and a test holds the two together.
//!
//! Adding a kind: a variant (its struct holds the fields), an arm in [`EventKind::name`], an
//! example in the tests and a row in the README. Fields are only ever added; a renamed field
//! keeps its old name as a serde alias so logs and spools written before still read.
//!
//! [`RawEvent`] is any event as received, kind unchecked: the reference controller stores
//! those, so a newer node's kinds are stored rather than refused.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::abi::AppStatus;
use crate::app::Audit;
use crate::diagnose::{Manifest, Trigger};
use crate::judge::Reboot;
use crate::watch::state::{Evidence, State};

/// The longest idempotency key the controller accepts.
pub const MAX_KEY_LEN: usize = 64;

/// The field names of the envelope; no kind may use one (it would be serialised twice).
pub const ENVELOPE_FIELDS: [&str; 5] = ["key", "time", "node", "vm", "kind"];

/// One event, as logged, spooled and POSTed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Idempotency key: unique per event, fixed when the event is created and kept across
    /// retries and service restarts. For a VM's events: its random epoch and event sequence,
    /// 32 lowercase hex digits.
    pub key: String,
    /// When it happened: RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The node (host name) the service runs on.
    pub node: String,
    /// The VM it concerns; `None` for events of the service itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// What happened, serialised as the `kind` field beside the kind's own fields.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Every kind of event, with its fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    /// The app's own word on its health changed, or it answered an audit.
    AppHealth(AppHealth),
    /// The app's `info` (or `hello`) message changed.
    AppInfo(AppInfo),
    /// The VM changed state.
    Transition(Transition),
    /// The guest rebooted (not a failure).
    Reboot(RebootEvent),
    /// Diagnostics of an incident finished (or failed).
    Bundle(Bundle),
    /// The recovery action after a bundle.
    Recovery(Recovery),
    /// A VM is watched for the first time.
    VmAdded(VmAdded),
    /// A VM's directory went away; it is no longer watched.
    VmRemoved(VmRemoved),
    /// A VM's directory cannot be watched (bad descriptor).
    VmInvalid(VmInvalid),
    /// The service started.
    ServiceStarted(ServiceStarted),
    /// Accepted events were dropped because the disk refused writes and the memory that holds
    /// them was full; emitted once the disk takes writes again.
    EventsLost(EventsLost),
    /// The guest kernel reported a fault on the console (the sentinel read it).
    KernelReport(KernelReportEvent),
    /// A drive's I/O failed on the host (QMP `BLOCK_IO_ERROR`), coalesced: the first error of
    /// a stream at once, the ones after it counted into one event every 10 s.
    BlockIoError(BlockIoError),
}

impl EventKind {
    /// The `kind` string, as serialised.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::AppHealth(_) => "app-health",
            EventKind::AppInfo(_) => "app-info",
            EventKind::Transition(_) => "transition",
            EventKind::Reboot(_) => "reboot",
            EventKind::Bundle(_) => "bundle",
            EventKind::Recovery(_) => "recovery",
            EventKind::VmAdded(_) => "vm-added",
            EventKind::VmRemoved(_) => "vm-removed",
            EventKind::VmInvalid(_) => "vm-invalid",
            EventKind::ServiceStarted(_) => "service-started",
            EventKind::EventsLost(_) => "events-lost",
            EventKind::KernelReport(_) => "kernel-report",
            EventKind::BlockIoError(_) => "block-io-error",
        }
    }
}

/// Where the app said it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppSource {
    /// The app protocol over the app channel.
    AppChannel,
    /// The app mailbox in the region.
    Mailbox,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppHealth {
    pub status: AppStatus,
    pub details: String,
    pub source: AppSource,
    /// The request answered, when the app answered one; always sent (`null` otherwise), as
    /// readers have relied on.
    #[serde(default)]
    pub id: Option<String>,
    /// The audit's result, when the request named one; always sent, like `id`.
    #[serde(default)]
    pub audit: Option<Audit>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    /// What the app sent, as it sent it (bounded by the app channel).
    pub info: Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// For people: which scenarios missed or answered, and how.
    pub reason: String,
    /// What the state machine saw: `cause`, every scenario's misses, threshold and last
    /// outcome, `paused`, `panic`, `app`; or the QMP event or status that caused it.
    pub evidence: Evidence,
    /// Set when the transition came from attaching to QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<Attached>,
    /// The guest kernel's own report behind it, when the sentinel has one (a panic's line and
    /// first frames beside QMP's `GUEST_PANICKED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_report: Option<Box<crate::sentinel::KernelReport>>,
}

/// A report of the guest kernel's: its fields (`class`, `cpu`, `task`, `pid`, `stuck_s`,
/// `location`, `line`, `trace`), where it was read (`source`), and the incident it belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelReportEvent {
    #[serde(flatten)]
    pub report: crate::sentinel::KernelReport,
    /// The incident open (or closed within the last minutes) when it arrived: the key of its
    /// transition event, and its bundle's directory (a report after the bundle belongs to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<PathBuf>,
    /// Reports of this class left out since the last event of the class (rate limit).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
    /// Where it was read: the console, or the kernel log followed in guest memory.
    #[serde(default)]
    pub source: ReportSource,
}

/// Where a kernel report was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportSource {
    /// The VM's console (its serial port, as acpimon reads it).
    #[default]
    Console,
    /// The kernel's log read from guest memory (`kernel_log_follow`).
    Memory,
}

impl ReportSource {
    pub fn name(self) -> &'static str {
        match self {
            ReportSource::Console => "console",
            ReportSource::Memory => "memory",
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// QEMU's version, `MAJOR.MINOR.MICRO`.
    pub qemu: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RebootEvent {
    pub evidence: RebootEvidence,
}

/// How the reboot was seen: `{"qmp_event": ...}`, `{"region": ...}` or `{"relaunch": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootEvidence {
    /// QMP `RESET`, as QEMU sent it.
    QmpEvent(Value),
    /// The region's boot count changed or its guest timer went backwards.
    Region(Reboot),
    /// Another QEMU process runs the VM (relaunched in the same directory): its guest is a new
    /// life, whatever the region still holds of the previous one.
    Relaunch(Relaunch),
}

/// Which QEMU process ran the VM before and which runs it now: `PID@START` (the process's
/// start time in clock ticks since the host booted, so a reused pid is still another process).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Relaunch {
    pub qemu: String,
    pub previous: String,
}

/// An incident that needs a bundle: why diagnostics run, the transition event that started
/// it and where its bundle goes. Persisted while the bundle is unfinished and sent in the
/// `bundle` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    #[serde(flatten)]
    pub trigger: Trigger,
    /// The key of the transition event.
    pub event: String,
    /// The bundle's directory.
    pub bundle: PathBuf,
    /// When diagnostics started (RFC 3339); `None` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub trigger: Incident,
    /// The bundle's directory.
    pub bundle: PathBuf,
    /// Its `manifest.json`, when it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Box<Manifest>>,
    /// Why there is no bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ok`: the bundle is complete; `failed`: it could not be written (then `error` says
    /// why, and `manifest`, when present, is what the steps found, not what is on disk).
    /// Absent from events written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<BundleOutcome>,
}

/// Whether a bundle was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleOutcome {
    Ok,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// `reset`, `poweroff` or `command`.
    pub action: String,
    pub outcome: RecoveryOutcome,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryOutcome {
    /// The action ran and succeeded.
    Done,
    /// The action ran and failed.
    Failed,
    /// The VM recovered during diagnostics; nothing done.
    Skipped,
    /// The rate limit (`recovery.max_per_hour`) was reached; nothing done.
    Refused,
}

impl RecoveryOutcome {
    pub fn name(self) -> &'static str {
        match self {
            RecoveryOutcome::Done => "done",
            RecoveryOutcome::Failed => "failed",
            RecoveryOutcome::Skipped => "skipped",
            RecoveryOutcome::Refused => "refused",
        }
    }
}

impl std::fmt::Display for RecoveryOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmAdded {
    /// The VM's directory.
    pub dir: PathBuf,
    /// The names of its scenarios.
    pub scenarios: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRemoved {
    pub dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInvalid {
    /// Sent as `vm_dir` before the field took the documented name.
    #[serde(alias = "vm_dir")]
    pub dir: PathBuf,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStarted {
    pub version: String,
    pub state_dir: PathBuf,
    /// The metrics and status endpoint; `null` when it is off.
    pub metrics: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsLost {
    /// How many events were dropped.
    pub count: u64,
    /// The times of the first and last dropped event (RFC 3339).
    pub first: String,
    pub last: String,
    /// Why: the disk refused writes and the in-memory hold was full.
    pub reason: String,
}

/// A drive's I/O errors as QEMU reported them (`BLOCK_IO_ERROR`), of one stream: a drive, an
/// operation, what QEMU did, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockIoError {
    /// The drive: its `-drive id=` (BlockBackend) name, or its node's name for a `-blockdev`
    /// attached without one.
    pub device: String,
    /// Its block node (`node-name`), when QEMU said.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU did: `ignore`, `report` (the error to the guest) or `stop` (the VM:
    /// `werror=stop`/`rerror=stop`).
    pub action: String,
    /// The host disk is full (ENOSPC).
    pub nospace: bool,
    /// The host's error text ("Input/output error").
    pub reason: String,
    /// Errors since the previous event of this stream (1 for the first).
    pub count: u64,
    /// QEMU's times (RFC 3339) of the first and last of them.
    pub first: String,
    pub last: String,
}

/// A fresh random idempotency key.
pub fn new_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether `key` is an idempotency key the controller accepts: 1-64 characters of
/// `[0-9A-Za-z_-]` (so it is also a safe file name).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why an event cannot be sent.
#[derive(Debug, thiserror::Error)]
#[error("key '{key}' is not 1-{MAX_KEY_LEN} characters of [0-9A-Za-z_-]; make it with event::new_key()")]
pub struct BadKey {
    pub key: String,
}

impl Event {
    /// The one constructor: an event of `kind` happening now. `key` is the VM's next key
    /// (see `watch::persist`) or [`new_key`] for the service's own events.
    pub fn new(key: String, node: &str, vm: Option<&str>, kind: EventKind) -> Event {
        Event { key, time: crate::units::now_rfc3339(), node: node.into(), vm: vm.map(Into::into), kind }
    }

    /// Checks what the controller would refuse: the key's syntax.
    pub fn validate(&self) -> Result<(), BadKey> {
        if valid_key(&self.key) {
            Ok(())
        } else {
            Err(BadKey { key: self.key.escape_debug().to_string() })
        }
    }

    /// The environment a hook or analyzer gets: `ACPIMON_EVENT_KEY`, `ACPIMON_EVENT_KIND` and,
    /// when the event concerns a VM, `ACPIMON_VM`.
    pub fn hook_env(&self) -> Vec<(&'static str, String)> {
        hook_env(&self.key, self.kind.name(), self.vm.as_deref())
    }

    /// The event as a bundle's timeline holds it, at most [`TIMELINE_ENTRY_MAX`] bytes of JSON.
    /// A bundle event leaves out its manifest (it is in the bundle's directory): a manifest
    /// holds a timeline, which would hold the previous bundle's manifest, each bundle doubling
    /// the next. Anything still larger keeps only what names it.
    pub fn timeline_entry(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("events serialise");
        if let (EventKind::Bundle(_), Some(map)) = (&self.kind, v.as_object_mut()) {
            map.remove("manifest");
        }
        let size = serde_json::to_vec(&v).map_or(0, |b| b.len());
        if size <= TIMELINE_ENTRY_MAX {
            return v;
        }
        serde_json::json!({
            "key": self.key,
            "time": self.time,
            "node": self.node,
            "vm": self.vm,
            "kind": self.kind.name(),
            "omitted": format!("{size} bytes of JSON; the event log holds the event"),
        })
    }
}

/// The largest event a bundle's timeline holds whole.
pub const TIMELINE_ENTRY_MAX: usize = 16 << 10;

/// Any event as received, its kind not checked against [`EventKind`]: what the reference
/// controller stores, so events of kinds this build does not know are kept as sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawEvent {
    pub key: String,
    pub time: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub kind: String,
    /// The kind's own fields.
    #[serde(flatten)]
    pub detail: Map<String, Value>,
}

impl RawEvent {
    /// See [`Event::hook_env`].
    pub fn hook_env(&self) -> Vec<(&'static str, String)> {
        hook_env(&self.key, &self.kind, self.vm.as_deref())
    }

    /// The typed event, if this build knows its kind and its fields fit.
    pub fn typed(&self) -> Result<Event, serde_json::Error> {
        serde_json::from_value(serde_json::to_value(self)?)
    }
}

fn hook_env(key: &str, kind: &str, vm: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![("ACPIMON_EVENT_KEY", key.to_string()), ("ACPIMON_EVENT_KIND", kind.to_string())];
    if let Some(vm) = vm {
        env.push(("ACPIMON_VM", vm.to_string()));
    }
    env
}

#[cfg(test)]
mod tests;
