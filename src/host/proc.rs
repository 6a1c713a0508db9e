//! Reading `/proc`, `/sys/fs/cgroup` and `statvfs`: one small reader per file, each with a size
//! cap, lenient (a field that does not parse is absent). Blocking (procfs reads are quick, but
//! they are syscalls): call from the sampler thread or a blocking task.
//!
//! Every reader is a thin shell around a pure parser (`parse_*`) over the file's text, so the
//! parsing is tested on fixed, hostile and truncated text; nothing here panics on what a file
//! holds.

use super::{CgroupCpu, DiskSpace, Memory, Pressure, Psi, PsiLine};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes read at most from one file: every file read here is far smaller.
const MAX_READ: u64 = 64 << 10;
/// Threads of one process looked at, at most.
const MAX_THREADS: usize = 4096;

/// One thread's counters from `/proc/PID/task/TID/stat` and `schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ThreadSample {
    /// The state letter (`R`, `S`, `D`, `T`, ...).
    pub state: char,
    /// utime + stime, in nanoseconds (from clock ticks).
    pub cpu_ns: u64,
    /// From `schedstat` when the kernel has it: time on a CPU and time waiting on a run queue.
    pub run_ns: Option<u64>,
    pub wait_ns: Option<u64>,
    /// The host CPU it last ran on.
    pub processor: Option<u32>,
}

/// A process's counters: its state, its threads by state, its total CPU time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub state: char,
    pub threads: u32,
    pub stopped_threads: u32,
    pub blocked_threads: u32,
    pub cpu_ns: u64,
}

/// `/proc/stat`'s first line: all CPUs' time, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// Everything but idle and iowait (so steal counts as busy: the node wanted the CPU).
    pub busy: u64,
    /// Taken by the node's own hypervisor (also in `busy`).
    pub steal: u64,
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is already in
    /// user and nice).
    pub total: u64,
}

/// The fields of a `stat` line acpimon uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatLine {
    pub state: char,
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// Field 39: the CPU it last ran on.
    pub processor: Option<u32>,
}

/// Reads at most [`MAX_READ`] bytes of `path` as text (invalid UTF-8 replaced).
pub fn read_capped(path: &Path) -> Option<String> {
    let buf = crate::util::fs::read_capped(path, MAX_READ as usize).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Files the sampler keeps open, at most (set from the open-file limit by
/// [`set_kept_limit`]); beyond, a file is opened, read and closed each time as before.
static KEPT_MAX: AtomicUsize = AtomicUsize::new(4096);
/// Files kept open now.
static KEPT: AtomicUsize = AtomicUsize::new(0);

/// How many files [`Kept`] may hold open across the service: a quarter of the open-file limit
/// leaves the rest to the VMs' sockets.
pub fn set_kept_limit(max: usize) {
    KEPT_MAX.store(max, Ordering::Relaxed);
}

/// A `/proc` or cgroup file the sampler reads every period, kept open and read again from
/// offset 0 (`pread`): one syscall per reading instead of open, read, read, close. A read that
/// fails (the thread or process ended) closes it; the next reading opens the path again,
/// exactly as a file opened each time would.
#[derive(Debug, Default)]
pub struct Kept {
    file: Option<std::fs::File>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            KEPT.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The bytes a kept file is read into: every file read this way is under 1 KiB.
pub type KeptBuf = [u8; 4096];

impl Kept {
    /// The file's text now (`path` opened when it is not open yet), or None when it cannot be
    /// read.
    pub fn read<'b>(&mut self, path: impl FnOnce() -> PathBuf, buf: &'b mut KeptBuf) -> Option<&'b str> {
        use std::os::unix::fs::FileExt;
        if let Some(f) = &self.file {
            match f.read_at(buf, 0) {
                Ok(n) => return std::str::from_utf8(&buf[..n]).ok(),
                Err(_) => {
                    self.file = None;
                    KEPT.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        let f = std::fs::File::open(path()).ok()?;
        let n = f.read_at(buf, 0).ok()?;
        if KEPT.fetch_add(1, Ordering::Relaxed) < KEPT_MAX.load(Ordering::Relaxed) {
            self.file = Some(f);
        } else {
            KEPT.fetch_sub(1, Ordering::Relaxed);
        }
        std::str::from_utf8(&buf[..n]).ok()
    }
}

/// One thread's `stat` and `schedstat`, kept open.
#[derive(Debug, Default)]
pub struct KeptThread {
    pub stat: Kept,
    pub schedstat: Kept,
}

/// [`thread`] through files kept open.
pub fn thread_kept(pid: u32, tid: u32, files: &mut KeptThread, buf: &mut KeptBuf) -> Option<ThreadSample> {
    let stat = parse_stat(files.stat.read(|| PathBuf::from(format!("/proc/{pid}/task/{tid}/stat")), buf)?)?;
    let sched = files
        .schedstat
        .read(|| PathBuf::from(format!("/proc/{pid}/task/{tid}/schedstat")), buf)
        .and_then(parse_schedstat);
    Some(thread_sample(&stat, sched))
}

/// A thread's sample from its `stat` line and its `schedstat` (run, wait), if read.
fn thread_sample(stat: &StatLine, sched: Option<(u64, u64)>) -> ThreadSample {
    ThreadSample {
        state: stat.state,
        cpu_ns: ticks_to_ns(stat.ticks),
        run_ns: sched.map(|s| s.0),
        wait_ns: sched.map(|s| s.1),
        processor: stat.processor,
    }
}

/// [`stat`] through a file kept open.
pub fn stat_kept(pid: u32, file: &mut Kept, buf: &mut KeptBuf) -> Option<StatLine> {
    parse_stat(file.read(|| PathBuf::from(format!("/proc/{pid}/stat")), buf)?)
}

/// `/proc/PID/stat` or `/proc/PID/task/TID/stat`. The command name (field 2) is in
/// parentheses and may hold anything, spaces and `)` included: the fields are read after the
/// line's LAST `)`.
pub fn parse_stat(text: &str) -> Option<StatLine> {
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: field N is at index N - 3.
    let f: Vec<&str> = rest.split_whitespace().take(37).collect();
    let state = f.first()?.chars().next()?;
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    let ticks = num(11).unwrap_or(0).saturating_add(num(12).unwrap_or(0));
    let processor = f.get(36).and_then(|s| s.parse::<u32>().ok());
    Some(StatLine { state, ticks, processor })
}

/// `schedstat`: time on a CPU and time waiting on a run queue, in ns.
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut it = text.split_whitespace().map(|s| s.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Clock ticks to ns, at the kernel's `USER_HZ`.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = u128::from(rustix::param::clock_ticks_per_second().max(1));
    u64::try_from(u128::from(ticks) * 1_000_000_000 / hz).unwrap_or(u64::MAX)
}

pub fn thread(pid: u32, tid: u32) -> Option<ThreadSample> {
    let dir = PathBuf::from(format!("/proc/{pid}/task/{tid}"));
    let stat = parse_stat(&read_capped(&dir.join("stat"))?)?;
    let sched = read_capped(&dir.join("schedstat")).as_deref().and_then(parse_schedstat);
    Some(thread_sample(&stat, sched))
}

/// `/proc/PID/stat` alone: the process's state and CPU time, without its threads.
pub fn stat(pid: u32) -> Option<StatLine> {
    parse_stat(&read_capped(Path::new(&format!("/proc/{pid}/stat")))?)
}

pub fn process(pid: u32) -> Option<ProcessSample> {
    let stat = stat(pid)?;
    let mut p = ProcessSample { state: stat.state, cpu_ns: ticks_to_ns(stat.ticks), ..Default::default() };
    // A thread that ends between the listing and its stat is not counted.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for e in tasks.flatten().take(MAX_THREADS) {
        let Some(t) = read_capped(&e.path().join("stat")).as_deref().and_then(parse_stat) else { continue };
        p.threads += 1;
        match t.state {
            'T' | 't' => p.stopped_threads += 1,
            'D' => p.blocked_threads += 1,
            _ => {}
        }
    }
    Some(p)
}

/// One line of `/proc/PID/cgroup`: `ID:CONTROLLERS:PATH` (v2: `0::PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLine {
    pub id: String,
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?.to_string();
            let controllers = it.next()?.split(',').filter(|c| !c.is_empty()).map(String::from).collect();
            let path = it.next()?.to_string();
            Some(CgroupLine { id, controllers, path })
        })
        .collect()
}

/// A cgroup file system mounted on this host, from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// 1 (`cgroup`) or 2 (`cgroup2`).
    pub version: u8,
    /// The hierarchy's directory that is mounted (`/` unless a namespace or bind mount).
    pub root: String,
    pub mount_point: String,
    /// v1: the controllers in the super options (`cpu`, `cpuacct`, ...).
    pub options: Vec<String>,
}

/// mountinfo escapes blanks, tabs, newlines and backslashes as `\NNN` (octal).
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = b[i + 1..i + 4].iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo_cgroups(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|l| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            let version = match r.next()? {
                "cgroup" => 1,
                "cgroup2" => 2,
                _ => return None,
            };
            let _source = r.next();
            let options = r.next().unwrap_or("").split(',').map(String::from).collect();
            Some(CgroupMount {
                version,
                root: unescape_mount(f.get(3)?),
                mount_point: unescape_mount(f.get(4)?),
                options,
            })
        })
        .collect()
}

/// The directory of a cgroup `path` (as `/proc/PID/cgroup` names it) under `mount`.
fn cgroup_dir_under(mount: &CgroupMount, path: &str) -> PathBuf {
    let rel = match mount.root.as_str() {
        "/" => path,
        root => path.strip_prefix(root).unwrap_or(path),
    };
    Path::new(&mount.mount_point).join(rel.trim_start_matches('/'))
}

/// The host's cgroup hierarchies, as the sampler keeps them between re-reads of
/// `/proc/self/mountinfo`: the mounts, and whether the v2 one has the CPU controller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    pub mounts: Vec<CgroupMount>,
    /// The cgroup2 root's `cgroup.controllers` lists `cpu`.
    pub v2_cpu: bool,
}

impl CgroupMounts {
    /// From `mountinfo`'s text (and the cgroup2 root's `cgroup.controllers`).
    pub fn parse(mountinfo: &str) -> CgroupMounts {
        let mounts = parse_mountinfo_cgroups(mountinfo);
        let v2_cpu = mounts.iter().find(|m| m.version == 2).is_some_and(|m| {
            read_capped(&Path::new(&m.mount_point).join("cgroup.controllers"))
                .is_some_and(|c| c.split_whitespace().any(|c| c == "cpu"))
        });
        CgroupMounts { mounts, v2_cpu }
    }

    /// This process's view: `/proc/self/mountinfo`.
    pub fn read() -> Option<CgroupMounts> {
        Some(CgroupMounts::parse(&read_capped(Path::new("/proc/self/mountinfo"))?))
    }

    /// Where the CPU controller of the cgroup `proc_cgroup` (a `/proc/PID/cgroup`) names lives,
    /// and in which version: the v1 hierarchy whose mount options include `cpu` when there is
    /// one (a hybrid host has its CPU controller there), else the v2 hierarchy when its root's
    /// `cgroup.controllers` lists `cpu`.
    pub fn cpu_dir(&self, proc_cgroup: &str) -> Option<(PathBuf, u8)> {
        let lines = parse_proc_cgroup(proc_cgroup);
        let v1 = self.mounts.iter().find(|m| m.version == 1 && m.options.iter().any(|o| o == "cpu"));
        if let Some(m) = v1 {
            if let Some(l) = lines.iter().find(|l| l.id != "0" && l.controllers.iter().any(|c| c == "cpu")) {
                return Some((cgroup_dir_under(m, &l.path), 1));
            }
        }
        if !self.v2_cpu {
            return None;
        }
        let m = self.mounts.iter().find(|m| m.version == 2)?;
        let l = lines.iter().find(|l| l.id == "0" && l.controllers.is_empty())?;
        Some((cgroup_dir_under(m, &l.path), 2))
    }
}

/// [`CgroupMounts::cpu_dir`] from the texts of `/proc/PID/cgroup` and `/proc/self/mountinfo`.
pub fn cgroup_cpu_dir(proc_cgroup: &str, mountinfo: &str) -> Option<(PathBuf, u8)> {
    CgroupMounts::parse(mountinfo).cpu_dir(proc_cgroup)
}

/// `key value` lines (`cpu.stat`, `/proc/meminfo` with a `:`): the value of `key`.
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let k = it.next()?.trim_end_matches(':');
        (k == key).then(|| it.next()?.parse().ok())?
    })
}

/// v2 `cpu.max`: `QUOTA PERIOD`, `max PERIOD` when unlimited.
pub fn parse_cpu_max(text: &str) -> Option<String> {
    let mut it = text.split_whitespace();
    let quota: u64 = it.next()?.parse().ok()?;
    let period: u64 = it.next()?.parse().ok()?;
    Some(format!("{quota}/{period}"))
}

/// A cgroup's `cpu.stat` throttling counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStat {
    pub nr_periods: u64,
    pub nr_throttled: u64,
    /// v1's `throttled_time` (ns) in µs, or v2's `throttled_usec`.
    pub throttled_us: u64,
}

pub fn parse_cpu_stat(text: &str, version: u8) -> CpuStat {
    let throttled_us = if version == 1 {
        field(text, "throttled_time").unwrap_or(0) / 1000
    } else {
        field(text, "throttled_usec").unwrap_or(0)
    };
    CpuStat {
        nr_periods: field(text, "nr_periods").unwrap_or(0),
        nr_throttled: field(text, "nr_throttled").unwrap_or(0),
        throttled_us,
    }
}

/// A cgroup's `cpu.stat` alone (what the sampler reads every period).
pub fn read_cpu_stat(dir: &Path, version: u8) -> Option<CpuStat> {
    Some(parse_cpu_stat(&read_capped(&dir.join("cpu.stat"))?, version))
}

/// A cgroup's CPU controller files (`dir` and `version` from [`cgroup_cpu_dir`]).
pub fn read_cgroup_cpu(dir: &Path, version: u8) -> Option<CgroupCpu> {
    let stat = read_cpu_stat(dir, version)?;
    let quota = if version == 1 {
        let q = read_capped(&dir.join("cpu.cfs_quota_us")).and_then(|t| t.trim().parse::<i64>().ok());
        let p = read_capped(&dir.join("cpu.cfs_period_us")).and_then(|t| t.trim().parse::<u64>().ok());
        match (q, p) {
            (Some(q), Some(p)) if q >= 0 => Some(format!("{q}/{p}")),
            _ => None,
        }
    } else {
        read_capped(&dir.join("cpu.max")).as_deref().and_then(parse_cpu_max)
    };
    Some(CgroupCpu {
        path: dir.display().to_string(),
        version,
        quota,
        nr_periods: stat.nr_periods,
        nr_throttled: stat.nr_throttled,
        throttled_us: stat.throttled_us,
        throttled_periods_10s: None,
        throttled_time_10s: None,
    })
}

/// The CPU controller's directory of `pid`'s cgroup (see [`cgroup_cpu_dir`]).
pub fn cgroup_dir(pid: u32) -> Option<(PathBuf, u8)> {
    let own = read_capped(Path::new(&format!("/proc/{pid}/cgroup")))?;
    let mountinfo = read_capped(Path::new("/proc/self/mountinfo"))?;
    cgroup_cpu_dir(&own, &mountinfo)
}

pub fn cgroup_cpu(pid: u32) -> Option<CgroupCpu> {
    let (dir, version) = cgroup_dir(pid)?;
    read_cgroup_cpu(&dir, version)
}

pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok().filter(|v| v.is_finite()));
    Some([it.next()??, it.next()??, it.next()??])
}

pub fn loadavg() -> Option<[f64; 3]> {
    parse_loadavg(&read_capped(Path::new("/proc/loadavg"))?)
}

/// One `/proc/pressure/*` file; its `full` line may be absent (cpu on kernels before 5.13).
pub fn parse_psi(text: &str) -> Option<Psi> {
    let line = |kind: &str| {
        let l = text.lines().find(|l| l.split_whitespace().next() == Some(kind))?;
        let get = |k: &str| {
            l.split_whitespace().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<f64>().ok())
        };
        let total = l.split_whitespace().find_map(|kv| kv.strip_prefix("total=")?.parse::<u64>().ok());
        Some(PsiLine { avg10: get("avg10")?, avg60: get("avg60")?, avg300: get("avg300")?, total_us: total? })
    };
    Some(Psi { some: line("some")?, full: line("full") })
}

pub fn pressure() -> Option<Pressure> {
    let read = |f: &str| read_capped(&Path::new("/proc/pressure").join(f)).as_deref().and_then(parse_psi);
    let p = Pressure { cpu: read("cpu"), memory: read("memory"), io: read("io") };
    (p.cpu.is_some() || p.memory.is_some() || p.io.is_some()).then_some(p)
}

/// `/proc/meminfo` (kB) in bytes; None without `MemTotal`.
pub fn parse_meminfo(text: &str) -> Option<Memory> {
    let kb = |k: &str| field(text, k).map(|v| v.saturating_mul(1024));
    Some(Memory {
        total_bytes: kb("MemTotal")?,
        available_bytes: kb("MemAvailable").unwrap_or(0),
        free_bytes: kb("MemFree").unwrap_or(0),
        swap_total_bytes: kb("SwapTotal").unwrap_or(0),
        swap_free_bytes: kb("SwapFree").unwrap_or(0),
    })
}

pub fn memory() -> Option<Memory> {
    parse_meminfo(&read_capped(Path::new("/proc/meminfo"))?)
}

/// `/proc/stat`'s `cpu` line: user nice system idle iowait irq softirq steal (guest guest_nice,
/// already counted in user and nice, are left out of the total).
pub fn parse_cpu_times(text: &str) -> Option<CpuTimes> {
    let l = text.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let v: Vec<u64> = l.split_whitespace().skip(1).take(8).map(|s| s.parse().unwrap_or(0)).collect();
    if v.len() < 4 {
        return None;
    }
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let total = v.iter().fold(0u64, |a, &x| a.saturating_add(x));
    let steal = at(7);
    Some(CpuTimes { busy: total.saturating_sub(at(3)).saturating_sub(at(4)), steal, total })
}

pub fn cpu_times() -> Option<CpuTimes> {
    parse_cpu_times(&read_capped(Path::new("/proc/stat"))?)
}

/// A CPU list as `/sys/devices/system/cpu/online` writes it (`0-3,5,7-8`): how many.
pub fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let a = part.trim().parse::<u32>().ok()?;
                (a, a)
            }
        };
        n = n.saturating_add(b.checked_sub(a)?.saturating_add(1));
    }
    (n > 0).then_some(n)
}

/// The host's online CPUs: `/sys/devices/system/cpu/online`, else the `cpuN` lines of
/// `/proc/stat`, else 1. Not the process's affinity (`available_parallelism`): the node's CPUs
/// are what load and pressure are relative to.
pub fn online_cpus() -> u32 {
    if let Some(n) =
        read_capped(Path::new("/sys/devices/system/cpu/online")).as_deref().and_then(parse_cpu_list)
    {
        return n;
    }
    let per_cpu = read_capped(Path::new("/proc/stat")).map_or(0, |t| {
        t.lines()
            .filter(|l| l.strip_prefix("cpu").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())))
            .count()
    });
    u32::try_from(per_cpu).unwrap_or(u32::MAX).max(1)
}

pub fn disk_space(path: &Path) -> Option<DiskSpace> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(DiskSpace {
        path: path.display().to_string(),
        total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
        available_bytes: s.f_bavail.saturating_mul(s.f_frsize),
    })
}

#[cfg(test)]
mod tests;
