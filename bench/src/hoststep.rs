//! `acpimon-bench host-step`: how long the `host` diagnostic step takes on a real guest, with
//! the service's sampler watching it as in `acpimon watch`, beside the floor measured in the
//! same run: one QMP `query-status` round trip. The step's budget is 200 ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use acpimon::host::{self, sampler::Sampler, HostContext};
use acpimon::launch::Vm;
use acpimon::run::Summary;

/// The step's budget (issue 16): a p99 above it fails the benchmark.
pub const BOUND: Duration = host::BUDGET;

#[derive(Clone, Debug, Serialize)]
pub struct HostStepResult {
    /// One `query-status` round trip.
    pub qmp_round_trip: Summary,
    /// One whole `host::collect`: devices over QMP, the QEMU process and its vCPU threads
    /// from the sampler, the node.
    pub host_step: Summary,
    /// The same with QEMU stopped (SIGSTOP): every QMP query runs into its timeout.
    pub host_step_qemu_stopped: Summary,
    /// vCPUs the reports named, and notes of the last report.
    pub vcpus: usize,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostStepError {
    #[error("QEMU's pid is not visible through its QMP socket: the host step has no process to read")]
    NoPid,
    #[error(transparent)]
    Qmp(#[from] acpimon::trigger::qmp::QmpError),
}

/// Measures `count` host steps on a booted `vm`, running, then stopped.
pub async fn run(vm: &Vm, count: usize, data_dir: &std::path::Path) -> Result<HostStepResult, HostStepError> {
    let pid = vm.qmp.pid.ok_or(HostStepError::NoPid)?;
    let sampler = Sampler::start(Duration::from_secs(1));
    let vcpus = host::vcpu_threads(&vm.qmp, Duration::from_secs(5)).await?;
    sampler.watch("bench", pid, &vcpus);
    // A few samples of history, as a watched VM has.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ctx = HostContext {
        pid: Some(pid),
        sampler: Some(Arc::clone(&sampler)),
        devices: Default::default(),
        data_dir: Some(data_dir.to_path_buf()),
    };
    let mut rtt = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        vm.qmp.status(Duration::from_secs(5)).await?;
        rtt.push(t.elapsed());
    }
    let mut steps = Vec::with_capacity(count);
    let mut last = None;
    for _ in 0..count {
        let t = Instant::now();
        let r = host::collect("bench", Some(&vm.qmp), &ctx).await;
        steps.push(t.elapsed());
        last = Some(r);
    }
    let signal = |sig| {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, sig);
        }
    };
    signal(rustix::process::Signal::STOP);
    let mut stopped = Vec::new();
    for _ in 0..count.min(10) {
        let t = Instant::now();
        host::collect("bench", Some(&vm.qmp), &ctx).await;
        stopped.push(t.elapsed());
    }
    signal(rustix::process::Signal::CONT);
    let last = last.unwrap_or_default();
    Ok(HostStepResult {
        qmp_round_trip: summary(&rtt),
        host_step: summary(&steps),
        host_step_qemu_stopped: summary(&stopped),
        vcpus: last.vcpus.len(),
        notes: last.notes,
    })
}

fn summary(times: &[Duration]) -> Summary {
    let ms = times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    Summary::from_latencies(ms, times.len() as u64, 0, 0)
}

/// The figures as the README shows them.
pub fn table(r: &HostStepResult) -> String {
    let ms = |d: f64| format!("{d:.2} ms");
    let row = |name: &str, s: &Summary| {
        format!(
            "| {name} | {} | {} | {} | {:.1}× |\n",
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
            s.p50_ms / r.qmp_round_trip.p50_ms.max(1e-6)
        )
    };
    let mut out =
        String::from("| figure | p50 | p99 | max | p50 / QMP round trip |\n|---|---|---|---|---|\n");
    out.push_str(&row("QMP query-status round trip (baseline)", &r.qmp_round_trip));
    out.push_str(&row("host step", &r.host_step));
    out.push_str(&row("host step, QEMU stopped (SIGSTOP)", &r.host_step_qemu_stopped));
    out
}
