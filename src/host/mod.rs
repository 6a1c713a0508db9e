//! Host-side evidence: what the host saw of a VM while it hung. The CPU time of each vCPU
//! thread of its QEMU process (sampled into a small ring per VM, so the seconds before an
//! incident are there when it starts), its devices as QEMU reports them (drives' I/O status
//! and statistics, links, `query-stats`), and the node itself (load, pressure, memory, steal,
//! the data directory's free space, the QEMU process's cgroup throttling).
//!
//! The `host` diagnostic step writes a [`HostReport`] as `NN-host.json` (schema
//! [`SCHEMA`]); the verdict ([`crate::verdict::judge`]) reads it to tell a guest spinning from
//! one waiting on a failed disk, a VM starved by its node, or one the host paused.
//!
//! Nothing here trusts what it reads: `/proc` and cgroup files are read with a size cap and
//! parsed leniently (a field that does not parse is absent, never a panic); QMP replies are
//! bounded by the QMP client.

pub mod devices;
pub mod proc;
pub mod sampler;

use serde::{Deserialize, Serialize};

/// The `host` step file's schema name.
pub const SCHEMA: &str = "acpimon.host/1";

/// The window most ratios are computed over.
pub const WINDOW_S: u64 = 10;

/// What the `host` step writes: `NN-host.json`. Fields are only ever added.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// [`SCHEMA`].
    pub schema: String,
    /// RFC 3339 UTC (ms), when the step read the host.
    pub time: String,
    /// The QEMU process, when its pid is known and visible.
    pub qemu: Option<QemuProcess>,
    /// One per vCPU QEMU reports (`query-cpus-fast`), by cpu index.
    pub vcpus: Vec<VcpuActivity>,
    pub devices: Devices,
    pub node: Node,
    /// What could not be read, and why ("query-stats: not provided by accelerator tcg").
    pub notes: Vec<String>,
}

/// The QEMU process as the host's kernel sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QemuProcess {
    pub pid: u32,
    /// The process's state letter from `/proc/PID/stat` (`R`, `S`, `D`, `T`, `t`, `Z`, ...).
    pub state: String,
    /// Its threads, and how many of them are stopped (`T` by a signal, `t` by a tracer).
    pub threads: u32,
    pub stopped_threads: u32,
    /// Threads in uninterruptible sleep (`D`): QEMU itself blocked on the host's I/O.
    pub blocked_threads: u32,
    /// The whole process's CPU over the last [`WINDOW_S`] seconds, in host CPUs (1.0 = one
    /// core busy all the time), when the sampler has that much history.
    pub cpu_10s: Option<f64>,
    /// The CPU controller of its cgroup, when readable.
    pub cgroup: Option<CgroupCpu>,
}

impl QemuProcess {
    /// Every thread stopped: SIGSTOP, a freezer cgroup or a debugger paused the VM on the host.
    pub fn all_stopped(&self) -> bool {
        self.threads > 0 && self.stopped_threads == self.threads
    }
}

/// The CPU bandwidth limit of the QEMU process's cgroup and how much it bit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CgroupCpu {
    /// The cgroup's directory (`/sys/fs/cgroup/cpu/machine/vm1`).
    pub path: String,
    /// 1 (`cpu.cfs_quota_us`, `throttled_time` in ns) or 2 (`cpu.max`, `throttled_usec`).
    pub version: u8,
    /// The limit as "QUOTA/PERIOD" in µs (`"20000/100000"`: 20 % of one CPU), or None when
    /// unlimited.
    pub quota: Option<String>,
    /// Totals since the cgroup was made.
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_us: u64,
    /// Over the last [`WINDOW_S`] seconds: the share of enforcement periods in which the
    /// cgroup was throttled (0..1), and the share of wall time its threads spent throttled.
    pub throttled_periods_10s: Option<f64>,
    pub throttled_time_10s: Option<f64>,
}

/// What one vCPU thread did, from the host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuActivity {
    /// QEMU's cpu index.
    pub cpu: u32,
    /// The host thread id (`query-cpus-fast`'s `thread-id`).
    pub thread: u32,
    /// The thread's state letter now (`R` running or runnable, `S` sleeping (a halted vCPU
    /// waits there), `D`, `T` stopped, ...).
    pub state: String,
    /// The host CPU it last ran on.
    pub host_cpu: Option<u32>,
    /// Share of one host CPU it used over the last [`WINDOW_S`] seconds (0..1).
    pub busy_10s: Option<f64>,
    /// Share of wall time it waited on a host run queue over the last [`WINDOW_S`] seconds
    /// (0..1; from `/proc/PID/task/TID/schedstat`, absent without schedstats): it wanted a
    /// CPU and did not get one.
    pub wait_10s: Option<f64>,
    /// How many seconds, up to now, it has wanted a CPU (ran or waited) at least 90 % of the
    /// time: the length of a spin, as far as the ring reaches.
    pub busy_for_s: u64,
    /// How many seconds, up to now, it has used at most 5 % of a CPU.
    pub idle_for_s: u64,
    /// Per-second share of a CPU used, oldest first: the ring as far as it reaches.
    pub history: Vec<f64>,
}

impl VcpuActivity {
    /// Ran or waited to run at least 90 % of the last window: the guest keeps this vCPU busy
    /// (a spin), whatever the host gave it.
    pub fn spinning(&self) -> bool {
        self.busy_10s.is_some_and(|b| b + self.wait_10s.unwrap_or(0.0) >= 0.9)
    }

    /// Used at most 5 % of a CPU over the last window: halted or waiting in the guest.
    pub fn idle(&self) -> bool {
        self.busy_10s.is_some_and(|b| b <= 0.05)
    }
}

/// The VM's devices as QEMU sees them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    /// `query-block` with `query-blockstats` and the drive's I/O errors (QMP `BLOCK_IO_ERROR`).
    pub block: Vec<Drive>,
    /// Network devices and their links (HMP `info network`).
    pub net: Vec<NetLink>,
    /// `query-stats` as QEMU returned it (bounded), where QEMU and the accelerator provide it.
    pub stats: Option<serde_json::Value>,
}

/// One drive.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Drive {
    /// The drive's name (`-drive id=`, or the qdev path when it has none).
    pub device: String,
    /// The device model's qdev id or path, when it has one.
    pub qdev: Option<String>,
    /// The top block node's name and image file.
    pub node: Option<String>,
    pub file: Option<String>,
    /// `ok`, `failed` or `nospace`: QEMU's `io-status` (present when the device model reports
    /// it, i.e. with an error policy other than `report`... or always on virtio/IDE/SCSI).
    pub io_status: Option<String>,
    pub read_only: bool,
    /// Counters from `query-blockstats`, and how they moved since the previous reading.
    pub stats: Option<DriveStats>,
    /// The drive's I/O errors QEMU reported (`BLOCK_IO_ERROR`) since the VM was attached: the
    /// first and the last, and how many.
    pub errors: Option<IoErrors>,
}

impl Drive {
    /// QEMU holds the drive failed: an I/O error it did not hide from the guest, or a full
    /// host disk.
    pub fn failed(&self) -> bool {
        matches!(self.io_status.as_deref(), Some("failed" | "nospace"))
    }
}

/// A drive's `query-blockstats` counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DriveStats {
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    /// Time since the last I/O completed, when QEMU says (`idle_time_ns`).
    pub idle_ms: Option<u64>,
    /// Operations completed and failed since the previous reading, and over how long: absent
    /// on the first reading.
    pub delta: Option<DriveDelta>,
}

/// How a drive's counters moved between two readings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DriveDelta {
    pub seconds: f64,
    pub operations: u64,
    pub failed_operations: u64,
    pub bytes: u64,
}

/// A drive's `BLOCK_IO_ERROR` events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoErrors {
    pub count: u64,
    pub first: IoError,
    pub last: IoError,
}

/// One `BLOCK_IO_ERROR`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IoError {
    /// RFC 3339 UTC (ms), from QEMU's timestamp.
    pub time: String,
    /// `read` or `write` (QEMU's `IoOperationType`).
    pub operation: String,
    /// What QEMU did: `ignore`, `report` (to the guest) or `stop` (the VM: `werror=stop`).
    pub action: String,
    /// The host disk is full (ENOSPC).
    pub nospace: bool,
    /// The host's error text ("Input/output error").
    pub reason: String,
}

/// A network device's link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetLink {
    /// The net client's name (`net0`, or the NIC's id).
    pub name: String,
    /// What it is (`user`, `tap`, `virtio-net-pci`...), from QEMU's description.
    pub kind: String,
    /// Connected: a NIC with a backend (or a legacy hub), a backend with a NIC. QEMU's
    /// `info network` does not show a link set down with `set_link` (5.2 to 10.0), so such a
    /// link still reads as up.
    pub link_up: bool,
    /// What it is connected to: a NIC's backend, `NAME (TYPE)`, or `hub N`.
    #[serde(default)]
    pub peer: Option<String>,
}

/// The node at incident time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Online host CPUs.
    pub cpus: u32,
    /// `/proc/loadavg`: 1, 5 and 15 minutes.
    pub load: Option<[f64; 3]>,
    /// `/proc/pressure/*`, on kernels with PSI.
    pub pressure: Option<Pressure>,
    pub memory: Option<Memory>,
    /// Over the last [`WINDOW_S`] seconds, from `/proc/stat`: the share of all CPUs' time
    /// that was busy, and that was stolen by the node's own hypervisor.
    pub cpu_busy_10s: Option<f64>,
    pub steal_10s: Option<f64>,
    /// The data directory's file system.
    pub data_dir: Option<DiskSpace>,
}

/// Pressure stall information.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub cpu: Option<Psi>,
    pub memory: Option<Psi>,
    pub io: Option<Psi>,
}

/// One `/proc/pressure/*` file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// One line of a pressure file: per cent of wall time some (or all) tasks stalled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    pub total_us: u64,
}

/// `/proc/meminfo`, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub free_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

/// A file system's space (`statvfs`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskSpace {
    pub path: String,
    pub total_bytes: u64,
    /// For unprivileged users (what the service may write).
    pub available_bytes: u64,
}

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::trigger::qmp::Qmp;
use devices::DeviceHistory;
use sampler::{Sampler, VcpuThread};

/// The `host` step's budget: it reads the host while the incident is on, so it is fast, and
/// it never waits on a stuck QEMU or device longer than this.
pub const BUDGET: Duration = Duration::from_millis(200);
/// Each QMP query of the step.
const QMP_TIMEOUT: Duration = Duration::from_millis(150);
/// Without the service's sampler (a one-shot `acpimon diagnose`): two readings this far apart.
const SNAPSHOT_WINDOW: Duration = Duration::from_millis(100);

/// What the `host` step needs beyond QMP.
#[derive(Clone, Default)]
pub struct HostContext {
    /// QEMU's pid, when visible from here (QMP's socket peer; not through libvirt).
    pub pid: Option<u32>,
    /// The service's sampler, which has the seconds before the incident.
    pub sampler: Option<Arc<Sampler>>,
    /// The VM's drives' I/O errors and last statistics.
    pub devices: Arc<Mutex<DeviceHistory>>,
    /// The data directory, whose free space the node section reports.
    pub data_dir: Option<PathBuf>,
}

/// Reads everything the `host` step writes, within about [`BUDGET`]: the device queries, the
/// QEMU process and its vCPU threads, and the node, at once. What could not be read is a note.
pub async fn collect(vm: &str, qmp: Option<&Qmp>, ctx: &HostContext) -> HostReport {
    let time = crate::units::now_rfc3339();
    let devices = async {
        match qmp {
            Some(q) => devices::read(q, &ctx.devices, QMP_TIMEOUT).await,
            None => (Devices::default(), vec!["devices: no QMP connection to the VM".to_string()]),
        }
    };
    let (activity, node, (devices, mut notes)) = tokio::join!(activity(vm, qmp, ctx), node(ctx), devices);
    let (qemu, vcpus, why) = activity;
    notes.extend(why);
    HostReport { schema: SCHEMA.into(), time, qemu, vcpus, devices, node, notes }
}

/// The QEMU process and its vCPU threads: from the sampler's ring when it watches the VM,
/// else two readings [`SNAPSHOT_WINDOW`] apart (thread ids from `query-cpus-fast`).
async fn activity(
    vm: &str,
    qmp: Option<&Qmp>,
    ctx: &HostContext,
) -> (Option<QemuProcess>, Vec<VcpuActivity>, Vec<String>) {
    let Some(pid) = ctx.pid else {
        return (
            None,
            Vec::new(),
            vec!["qemu: its pid is not visible from here (a VM reached through libvirt, or QEMU in \
                  another pid namespace): no vCPU thread or cgroup readings"
                .to_string()],
        );
    };
    if let Some(s) = ctx.sampler.clone() {
        let name = vm.to_string();
        if let Ok(Some((p, v))) = blocking(move || s.vm_report(&name)).await {
            if p.threads > 0 {
                return (Some(p), v, Vec::new());
            }
        }
    }
    let mut notes = Vec::new();
    let vcpus = match qmp {
        Some(q) => match vcpu_threads(q, QMP_TIMEOUT / 2).await {
            Ok(v) => v,
            Err(e) => {
                notes.push(format!("vcpus: query-cpus-fast: {e}: the QEMU process alone is read"));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    match blocking(move || sampler::snapshot(pid, &vcpus, SNAPSHOT_WINDOW)).await {
        Ok((p, _)) if p.threads == 0 => {
            notes.push(format!(
                "qemu: /proc/{pid} could not be read (the process is gone, or not visible here)"
            ));
            (None, Vec::new(), notes)
        }
        Ok((p, v)) => (Some(p), v, notes),
        Err(e) => {
            notes.push(format!("qemu: reading /proc/{pid}: {e}"));
            (None, Vec::new(), notes)
        }
    }
}

/// Each vCPU's cpu index and host thread id, from `query-cpus-fast`. Read from the raw reply,
/// so that a field newer than qapi's schema (a new target name) cannot cost them.
pub async fn vcpu_threads(
    qmp: &Qmp,
    timeout: Duration,
) -> Result<Vec<VcpuThread>, crate::trigger::qmp::QmpError> {
    Ok(sampler::vcpu_threads(&qmp.execute_json(qapi::qmp::query_cpus_fast {}, timeout).await?))
}

/// The node, from the sampler (with its ratios) or read now.
async fn node(ctx: &HostContext) -> Node {
    let (sampler, dir) = (ctx.sampler.clone(), ctx.data_dir.clone());
    let read = blocking(move || match sampler {
        Some(s) => s.node(dir.as_deref()),
        None => node_now(dir.as_deref()),
    });
    read.await.unwrap_or_default()
}

/// The node now, without ratios (they need a history). Blocking.
pub fn node_now(data_dir: Option<&std::path::Path>) -> Node {
    Node {
        cpus: proc::online_cpus(),
        load: proc::loadavg(),
        pressure: proc::pressure(),
        memory: proc::memory(),
        cpu_busy_10s: None,
        steal_10s: None,
        data_dir: data_dir.and_then(proc::disk_space),
    }
}

/// Runs a `/proc` read off the async workers, waiting for it at most [`BUDGET`].
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    match tokio::time::timeout(BUDGET, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("the reader failed ({e})")),
        Err(_) => Err(format!("no answer within {} ms", BUDGET.as_millis())),
    }
}
