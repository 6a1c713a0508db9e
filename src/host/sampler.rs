//! The host sampler: one thread for the whole service that reads, every period, each watched
//! VM's vCPU threads and QEMU process (and its cgroup's throttling) and the node's CPU times,
//! into a small ring per VM, so that the seconds before an incident are there when it starts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{Node, QemuProcess, VcpuActivity};

/// A vCPU: QEMU's cpu index and its host thread id (`query-cpus-fast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuThread {
    pub cpu: u32,
    pub thread: u32,
}

/// What the sampler says of one vCPU thread for `/metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuMetric {
    pub vm: String,
    pub cpu: u32,
    /// The thread's CPU time since it started.
    pub cpu_seconds: f64,
    /// Share of one CPU over the last window, when known.
    pub busy: Option<f64>,
}

pub struct Sampler {}

impl Sampler {
    /// Starts the sampling thread; it ends when the last `Arc` is dropped.
    pub fn start(_period: Duration) -> Arc<Sampler> {
        Arc::new(Sampler {})
    }

    /// Samples VM `vm`'s QEMU process `pid` and vCPU threads from now on (replacing what was
    /// watched under that name: a relaunch starts a new ring).
    pub fn watch(&self, _vm: &str, _pid: u32, _vcpus: &[VcpuThread]) {}

    /// Stops sampling `vm` and drops its ring.
    pub fn forget(&self, _vm: &str) {}

    /// The VM's QEMU process and vCPU activity: the ring's history plus a reading taken now.
    /// Blocking (reads `/proc`). None when `vm` is not watched.
    pub fn vm_report(&self, _vm: &str) -> Option<(QemuProcess, Vec<VcpuActivity>)> {
        None
    }

    /// The node now, with the ratios over the ring's window. Blocking.
    pub fn node(&self, _data_dir: Option<&Path>) -> Node {
        Node::default()
    }

    /// Every watched vCPU, for `/metrics`.
    pub fn vcpu_metrics(&self) -> Vec<VcpuMetric> {
        Vec::new()
    }
}

/// Without a running sampler (`acpimon diagnose`): two readings `window` apart. Blocking.
pub fn snapshot(_pid: u32, _vcpus: &[VcpuThread], _window: Duration) -> (QemuProcess, Vec<VcpuActivity>) {
    (QemuProcess::default(), Vec::new())
}
