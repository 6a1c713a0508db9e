//! The host sampler: one thread for the whole service that reads, every period, each watched
//! VM's vCPU threads and QEMU process (and its cgroup's throttling) and the node's CPU times,
//! into a small ring per VM, so that the seconds before an incident are there when it starts.
//!
//! A VM's ring keeps [`RING`] readings (31 s at the service's 1 s period). One reading is the
//! process's CPU time, each distinct vCPU thread's CPU, run and wait times (32 bytes), and the
//! cgroup's throttling counters: 160 bytes with 2 vCPUs, so about 5 KiB per VM (a test holds
//! it under 6 KiB), plus 32 × 48 bytes for the node's ring. A sample costs per VM one read of `/proc/PID/stat`, two per vCPU
//! thread (`stat`, `schedstat`), each a `pread` of a file the thread keeps open
//! ([`proc::Kept`], within a quarter of the open-file limit), and its cgroup's `cpu.stat`, read
//! once per period for all the VMs that share it. `/proc/PID/cgroup` is kept open and read
//! every period too (the cgroup's directory is looked up again only when it changed), so a
//! QEMU moved to another cgroup is followed at the next period: a VM throttled by a new cgroup
//! shows it in the seconds before its incident (README "Metrics, status and liveness" and
//! "Scale" have the measured cost).
//!
//! The ratios are computed by pure functions over readings ([`activity`]), tested on synthetic
//! samples. Where both readings of an interval have `schedstat`, a thread's CPU time is its
//! run time there (ns; the same time as utime + stime, without the 10 ms tick granularity),
//! else utime + stime. A counter that goes backwards (another process or thread under a reused
//! id) restarts the ring: nothing before it is used, no ratio is ever negative.
//!
//! vCPUs sharing one host thread (TCG without multi-threading: one thread runs every vCPU) are
//! read once; each of them reports that thread's activity (the same figures), and
//! [`Sampler::vcpu_metrics`] exports the thread once, under the lowest cpu index, so sums over
//! vCPUs do not count it twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::proc::{self, CpuTimes, ProcessSample, ThreadSample};
use super::{CgroupCpu, Node, QemuProcess, VcpuActivity, WINDOW_S};
use crate::util::lock;

/// Readings kept per VM (and for the node).
pub const RING: usize = 32;
/// A reading this much older than the window's end still counts as inside it (sampling jitter).
const WINDOW_SLACK: Duration = Duration::from_millis(500);
/// How often the sampler re-reads `/proc/self/mountinfo` (where the cgroup hierarchies are).
const MOUNTS_EVERY: Duration = Duration::from_secs(30);
/// A thread spinning: it ran or waited to run this share of an interval.
const SPIN: f64 = 0.9;
/// A thread idle: it ran at most this share of an interval.
const IDLE: f64 = 0.05;

/// A vCPU: QEMU's cpu index and its host thread id (`query-cpus-fast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuThread {
    pub cpu: u32,
    pub thread: u32,
}

/// vCPUs read at most from one `query-cpus-fast` reply.
const MAX_VCPUS: usize = 4096;

/// The vCPUs of a `query-cpus-fast` reply (`cpu-index`, `thread-id`), read from the raw JSON
/// so that a target or field newer than the bundled QAPI schema cannot cost them. Entries
/// without a valid thread id (0, negative, beyond u32) are left out.
pub fn vcpu_threads(reply: &serde_json::Value) -> Vec<VcpuThread> {
    let id = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    reply
        .as_array()
        .into_iter()
        .flatten()
        .take(MAX_VCPUS)
        .filter_map(|c| {
            Some(VcpuThread { cpu: id(&c["cpu-index"])?, thread: id(&c["thread-id"]).filter(|&t| t > 0)? })
        })
        .collect()
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

/// One thread in one reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ThreadPoint {
    /// utime + stime (ns).
    pub cpu_ns: u64,
    /// `schedstat`'s run and wait times (ns), when the kernel has them.
    pub sched: Option<(u64, u64)>,
}

impl From<ThreadSample> for ThreadPoint {
    fn from(t: ThreadSample) -> ThreadPoint {
        ThreadPoint { cpu_ns: t.cpu_ns, sched: t.run_ns.zip(t.wait_ns) }
    }
}

/// A cgroup's throttling counters in one reading, and which cgroup (a hash of its directory:
/// an interval across a move to another cgroup is not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CgroupPoint {
    pub dir: u64,
    pub stat: proc::CpuStat,
}

/// One reading of a VM.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Reading {
    pub at: Instant,
    /// The process's utime + stime (ns).
    pub process_ns: Option<u64>,
    /// One per distinct vCPU thread ([`Target::tids`]).
    pub threads: Vec<Option<ThreadPoint>>,
    pub cgroup: Option<CgroupPoint>,
}

impl Reading {
    /// A counter went backwards since `prev`: another process (or thread) under the same id.
    fn restarts_after(&self, prev: &Reading) -> bool {
        let back = |a: Option<u64>, b: Option<u64>| matches!((a, b), (Some(a), Some(b)) if b < a);
        back(prev.process_ns, self.process_ns)
            || prev
                .threads
                .iter()
                .zip(&self.threads)
                .any(|(a, b)| back(a.map(|t| t.cpu_ns), b.map(|t| t.cpu_ns)))
    }
}

/// A reading taken for a report: the ring's numbers and what only a report shows (states,
/// thread counts, the cgroup's limit).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Fresh {
    pub reading: Reading,
    pub process: Option<ProcessSample>,
    pub threads: Vec<Option<ThreadSample>>,
    pub cgroup: Option<CgroupCpu>,
}

/// What is sampled of one VM.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub pid: u32,
    pub vcpus: Vec<VcpuThread>,
    /// The distinct thread ids of `vcpus`, in order of first appearance.
    pub tids: Vec<u32>,
}

impl Target {
    pub fn new(pid: u32, vcpus: &[VcpuThread]) -> Target {
        let mut tids: Vec<u32> = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            if !tids.contains(&v.thread) {
                tids.push(v.thread);
            }
        }
        Target { pid, vcpus: vcpus.to_vec(), tids }
    }

    fn slot(&self, tid: u32) -> usize {
        self.tids.iter().position(|&t| t == tid).unwrap_or(0)
    }

    /// What the sampler thread reads every period (`mounts`: the cgroup hierarchies, read
    /// now and then).
    fn read(&self, mounts: Option<&proc::CgroupMounts>) -> Reading {
        let cgroup = mounts.and_then(|m| {
            let own = proc::read_capped(Path::new(&format!("/proc/{}/cgroup", self.pid)))?;
            let (dir, version) = m.cpu_dir(&own)?;
            Some(CgroupPoint { dir: hash_path(&dir), stat: proc::read_cpu_stat(&dir, version)? })
        });
        Reading {
            at: Instant::now(),
            process_ns: proc::stat(self.pid).map(|s| proc::ticks_to_ns(s.ticks)),
            threads: self.tids.iter().map(|&t| proc::thread(self.pid, t).map(ThreadPoint::from)).collect(),
            cgroup,
        }
    }

    /// [`Target::read`] through the sampler thread's open files: the process's and threads'
    /// files and `/proc/PID/cgroup` are kept open (`pread`), the cgroup's directory is looked
    /// up again only when `/proc/PID/cgroup` changed, and a `cpu.stat` several VMs share is read
    /// once per period (`memo`).
    fn read_kept(
        &self,
        files: &mut VmFiles,
        cpu_stat: &mut HashMap<PathBuf, proc::Kept>,
        memo: &mut HashMap<PathBuf, Option<proc::CpuStat>>,
        mounts: Option<&proc::CgroupMounts>,
        buf: &mut proc::KeptBuf,
    ) -> Reading {
        if let Some(m) = mounts {
            let own = files.cgroup_file.read(|| PathBuf::from(format!("/proc/{}/cgroup", self.pid)), buf);
            match own {
                Some(own) if files.cgroup.as_ref().is_some_and(|(text, _)| text == own) => {}
                Some(own) => files.cgroup = Some((own.to_string(), m.cpu_dir(own))),
                None => files.cgroup = None,
            }
        } else {
            files.cgroup = None;
        }
        let cgroup = files.cgroup.as_ref().and_then(|(_, d)| d.as_ref()).and_then(|(dir, version)| {
            let stat = match memo.get(dir) {
                Some(s) => *s,
                None => {
                    let kept = cpu_stat.entry(dir.clone()).or_default();
                    let s =
                        kept.read(|| dir.join("cpu.stat"), buf).map(|t| proc::parse_cpu_stat(t, *version));
                    memo.insert(dir.clone(), s);
                    s
                }
            };
            Some(CgroupPoint { dir: hash_path(dir), stat: stat? })
        });
        Reading {
            at: Instant::now(),
            process_ns: proc::stat_kept(self.pid, &mut files.stat, buf).map(|s| proc::ticks_to_ns(s.ticks)),
            threads: self
                .tids
                .iter()
                .zip(files.threads.iter_mut())
                .map(|(&t, f)| proc::thread_kept(self.pid, t, f, buf).map(ThreadPoint::from))
                .collect(),
            cgroup,
        }
    }

    /// Everything a report shows.
    fn read_full(&self) -> Fresh {
        let process = proc::process(self.pid);
        let threads: Vec<Option<ThreadSample>> =
            self.tids.iter().map(|&t| proc::thread(self.pid, t)).collect();
        let cgroup = proc::cgroup_cpu(self.pid);
        let reading = Reading {
            at: Instant::now(),
            process_ns: process.as_ref().map(|p| p.cpu_ns),
            threads: threads.iter().map(|t| t.map(ThreadPoint::from)).collect(),
            cgroup: cgroup.as_ref().map(|c| CgroupPoint {
                dir: hash_path(Path::new(&c.path)),
                stat: proc::CpuStat {
                    nr_periods: c.nr_periods,
                    nr_throttled: c.nr_throttled,
                    throttled_us: c.throttled_us,
                },
            }),
        };
        Fresh { reading, process, threads, cgroup }
    }
}

fn hash_path(p: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

/// How a counter moved over one interval.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    /// One side lacks the counter (the thread was gone, the file unreadable).
    Gap,
    /// It went backwards: what came before is another process's.
    Restart,
    /// Its increase, and the interval's seconds.
    Delta(u64, f64),
}

/// The steps of a counter over consecutive items. `get` gives a key with the value: the two
/// sides of an interval must have the same key (the same cgroup) to count.
fn steps<T>(items: &[T], at: impl Fn(&T) -> Instant, get: impl Fn(&T) -> Option<(u64, u64)>) -> Vec<Step> {
    items
        .windows(2)
        .map(|w| match (get(&w[0]), get(&w[1])) {
            (Some((ka, a)), Some((kb, b))) if ka == kb => {
                if b < a {
                    Step::Restart
                } else {
                    Step::Delta(b - a, at(&w[1]).saturating_duration_since(at(&w[0])).as_secs_f64())
                }
            }
            _ => Step::Gap,
        })
        .collect()
}

/// The sum of the deltas and seconds since the last restart; None without one whole interval.
fn total(steps: &[Step]) -> Option<(u64, f64)> {
    let mut sum: Option<(u64, f64)> = None;
    for s in steps {
        match *s {
            Step::Restart => sum = None,
            Step::Delta(d, secs) => {
                let (a, b) = sum.unwrap_or((0, 0.0));
                sum = Some((a.saturating_add(d), b + secs));
            }
            Step::Gap => {}
        }
    }
    sum.filter(|&(_, secs)| secs > 0.0)
}

/// The first item inside the last [`WINDOW_S`] seconds (with slack), leaving at least one
/// interval when there are two items.
fn window_start<T>(items: &[T], at: impl Fn(&T) -> Instant) -> usize {
    let Some(last) = items.last().map(&at) else { return 0 };
    let span = Duration::from_secs(WINDOW_S) + WINDOW_SLACK;
    let first = items.iter().position(|r| last.saturating_duration_since(at(r)) <= span).unwrap_or(0);
    first.min(items.len().saturating_sub(2))
}

/// A ratio over `secs` of wall time, clamped to `0..=max` and rounded to 3 decimals.
fn ratio(ns: u64, secs: f64, max: f64) -> f64 {
    round(((ns as f64 / 1e9) / secs).clamp(0.0, max), 1000.0)
}

fn round(v: f64, scale: f64) -> f64 {
    (v * scale).round() / scale
}

/// Seconds of the latest intervals (newest first, since the last restart) whose ratio passes
/// `keep`: how long a spin or an idle spell has lasted.
fn trailing(steps: &[Step], keep: impl Fn(f64) -> bool) -> u64 {
    // The longest run of recent steps whose average passes, not the steps one by one: a
    // thread's run-queue wait is only accounted when it next runs, so on a loaded host one
    // interval may show little of a wait that the next shows twice.
    let (mut d_sum, mut t_sum, mut best) = (0.0, 0.0, 0.0);
    for s in steps.iter().rev() {
        match *s {
            Step::Delta(d, t) if t > 0.0 => {
                d_sum += d as f64 / 1e9;
                t_sum += t;
                if keep(d_sum / t_sum) {
                    best = t_sum;
                }
            }
            _ => break,
        }
    }
    best.round() as u64
}

/// The ring's readings (the last dropped when `fresh` came less than `min_gap` after it: a
/// very short interval says little) followed by `fresh`.
fn series<'a>(ring: &'a [Reading], fresh: &'a Reading, min_gap: Duration) -> Vec<&'a Reading> {
    let mut rs: Vec<&Reading> = ring.iter().collect();
    if rs.last().is_some_and(|r| fresh.at.saturating_duration_since(r.at) < min_gap) {
        rs.pop();
    }
    rs.push(fresh);
    rs
}

/// How thread `i`'s CPU time moved: its run time (ns precision) where every reading has
/// schedstat, else utime + stime.
fn used_steps(rs: &[&Reading], i: usize) -> Vec<Step> {
    let point = |r: &&Reading| r.threads.get(i).copied().flatten();
    let sched = rs.iter().all(|r| point(r).is_none_or(|p| p.sched.is_some()));
    steps(
        rs,
        |r| r.at,
        |r| {
            let p = point(r)?;
            Some((0, if sched { p.sched?.0 } else { p.cpu_ns }))
        },
    )
}

/// The report of one VM from its readings: the pure computation [`Sampler::vm_report`] and
/// [`snapshot`] share. `cpus` bounds the process's ratios.
pub(crate) fn activity(
    target: &Target,
    ring: &[Reading],
    fresh: &Fresh,
    cpus: u32,
    min_gap: Duration,
) -> (QemuProcess, Vec<VcpuActivity>) {
    let rs = series(ring, &fresh.reading, min_gap);
    // Readings before a counter went backwards are another process's.
    let restart = rs.windows(2).rposition(|w| w[1].restarts_after(w[0])).map_or(0, |p| p + 1);
    let rs = &rs[restart..];
    let from = window_start(rs, |r| r.at);
    let at = |r: &&Reading| r.at;
    let ncpus = f64::from(cpus.max(1));

    let mut vcpus = Vec::with_capacity(target.vcpus.len());
    for v in &target.vcpus {
        let i = target.slot(v.thread);
        let point = |r: &&Reading| r.threads.get(i).copied().flatten();
        let sched = rs.iter().all(|r| point(r).is_none_or(|p| p.sched.is_some()));
        let used = used_steps(rs, i);
        let waited = steps(rs, at, |r| Some((0, point(r)?.sched?.1)));
        let wanted = steps(rs, at, |r| {
            let p = point(r)?;
            Some((0, if sched { p.sched.map(|(r, w)| r.saturating_add(w))? } else { p.cpu_ns }))
        });
        let busy_10s = total(&used[from..]).map(|(d, s)| ratio(d, s, 1.0));
        let wait_10s = total(&waited[from..]).map(|(d, s)| ratio(d, s, 1.0));
        let since_restart = used.iter().rposition(|s| *s == Step::Restart).map_or(0, |p| p + 1);
        let history = used[since_restart..]
            .iter()
            .filter_map(|s| match *s {
                Step::Delta(d, t) if t > 0.0 => Some(round(((d as f64 / 1e9) / t).clamp(0.0, 1.0), 100.0)),
                _ => None,
            })
            .collect();
        let now = fresh.threads.get(i).copied().flatten();
        vcpus.push(VcpuActivity {
            cpu: v.cpu,
            thread: v.thread,
            state: now.map(|t| t.state.to_string()).unwrap_or_default(),
            host_cpu: now.and_then(|t| t.processor),
            busy_10s,
            wait_10s,
            busy_for_s: trailing(&wanted, |r| r >= SPIN),
            idle_for_s: trailing(&used, |r| r <= IDLE),
            history,
        });
    }

    let process_steps = steps(rs, at, |r| Some((0, r.process_ns?)));
    let cg = |f: fn(&proc::CpuStat) -> u64| {
        let s = steps(rs, at, |r| r.cgroup.map(|c| (c.dir, f(&c.stat))));
        total(&s[from..])
    };
    let cgroup = fresh.cgroup.clone().map(|mut c| {
        if let (Some((periods, _)), Some((throttled, _))) = (cg(|s| s.nr_periods), cg(|s| s.nr_throttled)) {
            let share = if periods == 0 { 0.0 } else { throttled as f64 / periods as f64 };
            c.throttled_periods_10s = Some(round(share.clamp(0.0, 1.0), 1000.0));
        }
        if let Some((us, secs)) = cg(|s| s.throttled_us) {
            c.throttled_time_10s = Some(ratio(us.saturating_mul(1000), secs, ncpus));
        }
        c
    });
    let p = fresh.process.clone().unwrap_or_default();
    let qemu = QemuProcess {
        pid: target.pid,
        state: fresh.process.as_ref().map(|p| p.state.to_string()).unwrap_or_default(),
        threads: p.threads,
        stopped_threads: p.stopped_threads,
        blocked_threads: p.blocked_threads,
        cpu_10s: total(&process_steps[from..]).map(|(d, s)| ratio(d, s, ncpus)),
        cgroup,
    };
    (qemu, vcpus)
}

/// The node's CPU ratios over the window: busy and stolen shares of all CPUs' time.
fn node_ratios(ring: &[(Instant, CpuTimes)]) -> (Option<f64>, Option<f64>) {
    let from = window_start(ring, |r| r.0);
    let at = |r: &(Instant, CpuTimes)| r.0;
    let sum = |f: fn(&CpuTimes) -> u64| total(&steps(&ring[from..], at, |r| Some((0, f(&r.1)))));
    let Some((all, _)) = sum(|t| t.total).filter(|&(all, _)| all > 0) else { return (None, None) };
    let share =
        |part: Option<(u64, f64)>| part.map(|(p, _)| round((p as f64 / all as f64).clamp(0.0, 1.0), 1000.0));
    (share(sum(|t| t.busy)), share(sum(|t| t.steal)))
}

struct Vm {
    /// Which `watch` this is: a reading taken for an earlier one is not kept.
    gen: u64,
    target: Target,
    ring: VecDeque<Reading>,
}

impl Vm {
    fn push(&mut self, r: Reading) {
        if self.ring.back().is_some_and(|prev| r.restarts_after(prev)) {
            self.ring.clear();
        }
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back(r);
    }
}

/// What the sampler thread keeps of one VM between readings.
#[derive(Default)]
struct VmFiles {
    /// The [`Vm::gen`] these files are for.
    gen: u64,
    stat: proc::Kept,
    /// One per [`Target::tids`].
    threads: Vec<proc::KeptThread>,
    /// `/proc/PID/cgroup`, kept open.
    cgroup_file: proc::Kept,
    /// Its text when last read, and the cgroup's CPU directory it names.
    cgroup: Option<(String, Option<(PathBuf, u8)>)>,
}

/// What the sampler thread keeps for every VM.
#[derive(Default)]
struct SharedFiles {
    vms: HashMap<String, VmFiles>,
    /// Each cgroup's `cpu.stat`, kept open.
    cpu_stat: HashMap<PathBuf, proc::Kept>,
    /// Each cgroup's `cpu.stat` read this period.
    memo: HashMap<PathBuf, Option<proc::CpuStat>>,
}

#[derive(Default)]
struct Inner {
    vms: Mutex<BTreeMap<String, Vm>>,
    node: Mutex<VecDeque<(Instant, CpuTimes)>>,
    stop: Mutex<bool>,
    wake: Condvar,
    gen: std::sync::atomic::AtomicU64,
}

impl Inner {
    fn sample(&self, mounts: Option<&proc::CgroupMounts>, files: &mut SharedFiles) {
        let targets: Vec<(String, u64, Target)> =
            lock(&self.vms).iter().map(|(n, vm)| (n.clone(), vm.gen, vm.target.clone())).collect();
        files.vms.retain(|name, f| targets.iter().any(|(n, gen, _)| n == name && *gen == f.gen));
        files.memo.clear();
        let mut buf: proc::KeptBuf = [0; 4096];
        for (name, gen, target) in targets {
            let f = files.vms.entry(name.clone()).or_default();
            if f.gen != gen || f.threads.len() != target.tids.len() {
                *f = VmFiles { gen, ..VmFiles::default() };
                f.threads.resize_with(target.tids.len(), Default::default);
            }
            let r = target.read_kept(f, &mut files.cpu_stat, &mut files.memo, mounts, &mut buf);
            if let Some(vm) = lock(&self.vms).get_mut(&name).filter(|vm| vm.gen == gen) {
                vm.push(r);
            }
        }
        let memo = &files.memo;
        files.cpu_stat.retain(|dir, _| memo.contains_key(dir));
        if let Some(t) = proc::cpu_times() {
            let mut node = lock(&self.node);
            if node.back().is_some_and(|(_, prev)| t.total < prev.total) {
                node.clear();
            }
            if node.len() == RING {
                node.pop_front();
            }
            node.push_back((Instant::now(), t));
        }
    }
}

/// The sampler: cheap to share behind an `Arc`; its thread (`acpimon-host`) ends when it is
/// dropped.
pub struct Sampler {
    inner: Arc<Inner>,
    period: Duration,
}

impl Sampler {
    /// Starts the sampling thread; it ends when the last `Arc` is dropped.
    pub fn start(period: Duration) -> Arc<Sampler> {
        let inner = Arc::new(Inner::default());
        let weak = Arc::downgrade(&inner);
        let spawned =
            std::thread::Builder::new().name("acpimon-host".into()).spawn(move || run(weak, period));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the host sampler thread ({e}): host reports will have no history");
        }
        Arc::new(Sampler { inner, period })
    }

    /// Samples VM `vm`'s QEMU process `pid` and vCPU threads from now on (replacing what was
    /// watched under that name: a relaunch starts a new ring).
    pub fn watch(&self, vm: &str, pid: u32, vcpus: &[VcpuThread]) {
        let gen = self.inner.gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = Vm { gen, target: Target::new(pid, vcpus), ring: VecDeque::with_capacity(RING) };
        lock(&self.inner.vms).insert(vm.to_string(), entry);
    }

    /// Stops sampling `vm` and drops its ring.
    pub fn forget(&self, vm: &str) {
        lock(&self.inner.vms).remove(vm);
    }

    /// The VM's QEMU process and vCPU activity: the ring's history plus a reading taken now.
    /// Blocking (reads `/proc`). None when `vm` is not watched.
    pub fn vm_report(&self, vm: &str) -> Option<(QemuProcess, Vec<VcpuActivity>)> {
        let (target, ring) = {
            let vms = lock(&self.inner.vms);
            let v = vms.get(vm)?;
            (v.target.clone(), v.ring.iter().cloned().collect::<Vec<_>>())
        };
        let fresh = target.read_full();
        Some(activity(&target, &ring, &fresh, proc::online_cpus(), self.period / 2))
    }

    /// The node now, with the ratios over the ring's window. Blocking.
    pub fn node(&self, data_dir: Option<&Path>) -> Node {
        let mut ring: Vec<(Instant, CpuTimes)> = lock(&self.inner.node).iter().copied().collect();
        if let Some(t) = proc::cpu_times() {
            let now = Instant::now();
            if ring.last().is_some_and(|r| now.saturating_duration_since(r.0) < self.period / 2) {
                ring.pop();
            }
            ring.push((now, t));
        }
        let (cpu_busy_10s, steal_10s) = node_ratios(&ring);
        Node { cpu_busy_10s, steal_10s, ..super::node_now(data_dir) }
    }

    /// Every watched vCPU thread, for `/metrics`, from the ring (no reading of its own): a
    /// thread several vCPUs share once, under the lowest cpu index.
    pub fn vcpu_metrics(&self) -> Vec<VcpuMetric> {
        let vms = lock(&self.inner.vms);
        let mut out = Vec::new();
        for (name, vm) in vms.iter() {
            let Some(last) = vm.ring.back() else { continue };
            let ring: Vec<&Reading> = vm.ring.iter().collect();
            let from = window_start(&ring, |r| r.at);
            for (i, &tid) in vm.target.tids.iter().enumerate() {
                let Some(point) = last.threads.get(i).copied().flatten() else { continue };
                let Some(cpu) = vm.target.vcpus.iter().filter(|v| v.thread == tid).map(|v| v.cpu).min()
                else {
                    continue;
                };
                let used = used_steps(&ring[from..], i);
                out.push(VcpuMetric {
                    vm: name.clone(),
                    cpu,
                    cpu_seconds: point.cpu_ns as f64 / 1e9,
                    busy: total(&used).map(|(d, s)| ratio(d, s, 1.0)),
                });
            }
        }
        out
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        *lock(&self.inner.stop) = true;
        self.inner.wake.notify_all();
    }
}

/// The sampling thread: a reading every `period` (never catching up in a burst after a stall)
/// until the sampler is dropped.
fn run(inner: Weak<Inner>, period: Duration) {
    let mut mounts: Option<(Instant, Option<proc::CgroupMounts>)> = None;
    let mut files = SharedFiles::default();
    let mut next = Instant::now();
    loop {
        let Some(inner) = inner.upgrade() else { return };
        {
            let mut stopped = lock(&inner.stop);
            loop {
                if *stopped {
                    return;
                }
                let now = Instant::now();
                if now >= next {
                    break;
                }
                stopped = inner.wake.wait_timeout(stopped, next - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        next = (next + period).max(Instant::now());
        if mounts.as_ref().is_none_or(|(at, _)| at.elapsed() >= MOUNTS_EVERY) {
            mounts = Some((Instant::now(), proc::CgroupMounts::read()));
        }
        inner.sample(mounts.as_ref().and_then(|m| m.1.as_ref()), &mut files);
    }
}

/// Without a running sampler (`acpimon diagnose`): two readings `window` apart. Blocking.
pub fn snapshot(pid: u32, vcpus: &[VcpuThread], window: Duration) -> (QemuProcess, Vec<VcpuActivity>) {
    let target = Target::new(pid, vcpus);
    let first = target.read_full().reading;
    std::thread::sleep(window);
    let fresh = target.read_full();
    activity(&target, &[first], &fresh, proc::online_cpus(), Duration::ZERO)
}

/// The cost of one sample of a VM (what the sampler thread reads every period), for the
/// benchmark: `pid` with `vcpus`, with the cgroup hierarchies as the thread keeps them.
pub fn sample_once(pid: u32, vcpus: &[VcpuThread], mounts: Option<&proc::CgroupMounts>) -> usize {
    let r = Target::new(pid, vcpus).read(mounts);
    r.threads.iter().flatten().count()
}

#[cfg(test)]
mod tests;
