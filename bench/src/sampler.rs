//! `acpimon-bench host-sampler`: what the host sampler costs per VM per sample, beside the
//! floor measured in the same run: one read of `/proc/self/stat` (the cheapest file a sample
//! reads). The "VM" is this process with idle threads as its vCPUs: the same files, the same
//! code path ([`acpimon::host::sampler::sample_once`]) as the service's sampler thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use acpimon::host::sampler::{self, VcpuThread};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub vcpus: usize,
    pub rounds: usize,
    /// One read of `/proc/self/stat`, in µs (median of the rounds).
    pub baseline_us: f64,
    /// One sample of one VM (process, each vCPU thread, cgroup), in µs (median).
    pub sample_us: f64,
    /// One `vm_report`: a full reading (thread states, the process's threads, the cgroup's
    /// limit) and the ratios over a full ring, in µs (median).
    pub report_us: f64,
    /// The share of one core the sampler thread takes per VM at the service's 1 s period.
    pub core_share_per_vm: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {:<44} {:>9.1} µs", "read /proc/self/stat (baseline)", self.baseline_us)?;
        writeln!(
            f,
            "  {:<44} {:>9.1} µs   ({:.1}x the baseline)",
            format!("one sample of one VM with {} vCPUs", self.vcpus),
            self.sample_us,
            self.sample_us / self.baseline_us
        )?;
        writeln!(
            f,
            "  {:<44} {:>9.1} µs   ({:.1}x the baseline)",
            "one vm_report (fresh reading + ratios)",
            self.report_us,
            self.report_us / self.baseline_us
        )?;
        writeln!(f, "  at 1 sample/s: {:.4} % of a core per VM", self.core_share_per_vm * 100.0)
    }
}

/// Idle threads standing in for vCPUs, stopped when dropped.
struct Idle {
    stop: Arc<AtomicBool>,
    tids: Vec<u32>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Idle {
    fn start(n: usize) -> Idle {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let handles = (0..n)
            .map(|_| {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::spawn(move || {
                    let tid = std::fs::read_link("/proc/thread-self")
                        .ok()
                        .and_then(|l| l.file_name()?.to_str()?.parse::<u32>().ok())
                        .unwrap_or(0);
                    let _ = tx.send(tid);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        let tids = (0..n).filter_map(|_| rx.recv().ok()).collect();
        Idle { stop, tids, handles }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The median of `rounds` timings of `f`, in µs.
fn median_us(rounds: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub fn run(vcpus: usize, rounds: usize) -> Result<Report, String> {
    let rounds = rounds.max(1);
    let idle = Idle::start(vcpus);
    if idle.tids.len() != vcpus || idle.tids.contains(&0) {
        return Err(
            "cannot read the stand-in vCPU threads' ids from /proc/thread-self; is /proc mounted?".into()
        );
    }
    let pid = std::process::id();
    let threads: Vec<VcpuThread> =
        idle.tids.iter().enumerate().map(|(i, &t)| VcpuThread { cpu: i as u32, thread: t }).collect();
    let mounts = acpimon::host::proc::CgroupMounts::read();
    if sampler::sample_once(pid, &threads, mounts.as_ref()) != vcpus {
        return Err("a sample did not read every stand-in vCPU thread".into());
    }
    // Warm the page cache and the dentries first, as a service running for a while has.
    for _ in 0..rounds.min(100) {
        let _ = std::fs::read("/proc/self/stat");
        sampler::sample_once(pid, &threads, mounts.as_ref());
    }
    let baseline_us = median_us(rounds, || {
        let _ = std::hint::black_box(std::fs::read("/proc/self/stat"));
    });
    let sample_us = median_us(rounds, || {
        std::hint::black_box(sampler::sample_once(pid, &threads, mounts.as_ref()));
    });
    // A sampler with a full ring.
    let s = sampler::Sampler::start(Duration::from_millis(5));
    s.watch("bench", pid, &threads);
    std::thread::sleep(Duration::from_millis(200));
    let report_us = median_us(rounds.min(1000), || {
        std::hint::black_box(s.vm_report("bench"));
    });
    Ok(Report { vcpus, rounds, baseline_us, sample_us, report_us, core_share_per_vm: sample_us / 1e6 })
}
