//! Reading `/proc`, `/sys/fs/cgroup` and `statvfs`: one small reader per file, each with a size
//! cap, lenient (a field that does not parse is absent). Blocking (procfs reads are quick, but
//! they are syscalls): call from the sampler thread or a blocking task.

use super::{CgroupCpu, DiskSpace, Memory, Pressure};
use std::path::Path;

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
    pub busy: u64,
    pub steal: u64,
    pub total: u64,
}

pub fn thread(_pid: u32, _tid: u32) -> Option<ThreadSample> {
    None
}

pub fn process(_pid: u32) -> Option<ProcessSample> {
    None
}

pub fn cgroup_cpu(_pid: u32) -> Option<CgroupCpu> {
    None
}

pub fn loadavg() -> Option<[f64; 3]> {
    None
}

pub fn pressure() -> Option<Pressure> {
    None
}

pub fn memory() -> Option<Memory> {
    None
}

pub fn cpu_times() -> Option<CpuTimes> {
    None
}

pub fn online_cpus() -> u32 {
    1
}

pub fn disk_space(_path: &Path) -> Option<DiskSpace> {
    None
}
