//! `acpimon-bench kernel-log`: what reading a guest's kernel log from its memory costs
//! (`acpimon::memory`), beside a full `dump-guest-memory` of the same guest in the same run:
//! per RAM size, the test guest booted, then the log read live (VMCOREINFO from the
//! `vmcoreinfo` device each time, and from the cache), paused, VMCOREINFO found by a RAM scan,
//! and two full dumps (raw ELF, and the compressed kdump the `memory-dump` step writes); then
//! the log followed ([`acpimon::memory::LogFollower`], what `acpimon dmesg --follow` and the
//! service's `kernel_log_follow` do): per poll, idle (no new records) and busy (the guest
//! printing: a SysRq key sent as keystrokes before each poll), the wall and host CPU time (this
//! process's, and QEMU's main thread's, which serves QMP and copies the memory while holding
//! QEMU's big lock, so it is also how long the vCPUs can be held), bytes and `pmemsave` calls.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use acpimon::generate::SsdtConfig;
use acpimon::launch::{self, Vm, VmSpec};
use acpimon::memory::dmesg::{read_log, LogLimits, LogStats};
use acpimon::memory::{vmcoreinfo, VmcoreinfoCache};

#[derive(Debug, thiserror::Error)]
pub enum KernelLogError {
    #[error(transparent)]
    Prepare(#[from] launch::PrepareError),
    #[error(transparent)]
    Vm(#[from] launch::VmError),
    #[error(transparent)]
    Qmp(#[from] acpimon::trigger::qmp::QmpError),
    #[error(transparent)]
    Memory(#[from] acpimon::memory::MemError),
    #[error("the {0} MiB guest's kernel log showed no /init start within 180 s: {1}")]
    NotReady(u64, String),
}

/// One read of the log.
#[derive(Clone, Debug, Serialize)]
pub struct Read {
    pub ms: f64,
    pub bytes: u64,
    pub pmemsave_calls: u64,
    pub records: usize,
}

impl Read {
    fn from(stats: &LogStats, took: Duration, records: usize) -> Read {
        Read {
            ms: took.as_secs_f64() * 1e3,
            bytes: stats.bytes,
            pmemsave_calls: stats.pmemsave_calls,
            records,
        }
    }
}

/// A full dump.
#[derive(Clone, Debug, Serialize)]
pub struct Dump {
    pub format: &'static str,
    pub ms: f64,
    pub bytes: u64,
}

/// The figures of one guest.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    pub ram_mib: u64,
    pub kernel: String,
    /// VMCOREINFO from the device's note, then the ring (the median of `reads`).
    pub live: Read,
    /// The ring only, VMCOREINFO from the cache (median).
    pub live_cached: Read,
    /// The guest stopped (`stop`), VMCOREINFO from the device.
    pub paused: Read,
    /// VMCOREINFO found by scanning RAM instead.
    pub scan_ms: f64,
    pub scan_bytes: u64,
    pub dumps: Vec<Dump>,
    /// The log followed: the first poll (the whole ring), then idle and busy polls.
    pub follow: Follow,
}

/// One kind of poll (medians, and the 99th percentile of the wall time).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Poll {
    pub polls: usize,
    pub wall_us: f64,
    pub wall_p99_us: f64,
    /// This process's CPU time (user + system) per poll.
    pub cpu_us: f64,
    /// QEMU's main thread's run time per poll (its QMP and the memory copies).
    pub qemu_main_us: f64,
    pub bytes: u64,
    pub pmemsave_calls: u64,
    pub records: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Follow {
    pub first: Poll,
    pub idle: Poll,
    pub busy: Poll,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub qemu: String,
    pub reads: usize,
    pub guests: Vec<Figures>,
}

/// Boots the guest of `fixture` once per size in `ram_mib` (in `state_dir`) and measures.
pub async fn run(
    fixture: &Path,
    ram_mib: &[u64],
    reads: usize,
    state_dir: &Path,
    say: impl Fn(&str),
) -> Result<Report, KernelLogError> {
    let mut report = Report { qemu: String::new(), reads, guests: Vec::new() };
    for &mib in ram_mib {
        let prepared = launch::prepare(state_dir, &format!("bench-log-{mib}"), &SsdtConfig::default())?;
        let mut args = acpimon::demo::guest_args(fixture, "pc", false);
        if let Some(i) = args.iter().position(|a| a == "-m") {
            args[i + 1] = mib.to_string();
        }
        let spec = VmSpec {
            program: "qemu-system-x86_64".into(),
            args,
            prepared,
            readconfig: false,
            leave_to_watch: false,
            console_chardev: None,
        };
        say(&format!("booting the {mib} MiB guest"));
        let mut vm = Vm::launch(spec).await?;
        let v = vm.qmp.version;
        report.qemu = format!("{}.{}.{}", v.0, v.1, v.2);
        let figures = measure(&vm, mib, reads.max(1), &say).await;
        let _ = vm.shutdown().await;
        report.guests.push(figures?);
    }
    Ok(report)
}

fn median(mut v: Vec<Read>) -> Read {
    v.sort_by(|a, b| a.ms.total_cmp(&b.ms));
    v[v.len() / 2].clone()
}

async fn measure(vm: &Vm, mib: u64, reads: usize, say: &impl Fn(&str)) -> Result<Figures, KernelLogError> {
    let (qmp, dir) = (&vm.qmp, vm.prepared.dir.clone());
    let limits = LogLimits::default();
    // Until the guest's /init has started and published VMCOREINFO (qemu_fw_cfg is loaded then).
    let start = Instant::now();
    loop {
        let r = read_log(qmp, &dir, &mut VmcoreinfoCache::default(), 0, &limits).await;
        let why = match r {
            Ok((log, s))
                if s.vmcoreinfo == "device" && log.records.iter().any(|r| r.text.contains("Run /init")) =>
            {
                break
            }
            Ok((_, s)) => format!("VMCOREINFO by {}", s.vmcoreinfo),
            Err(e) => e.to_string(),
        };
        if start.elapsed() > Duration::from_secs(180) {
            return Err(KernelLogError::NotReady(mib, why));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    say(&format!("{mib} MiB guest up; reading its log"));
    let mut live = Vec::new();
    let mut kernel = String::new();
    for _ in 0..reads {
        let (r, stats) = timed(qmp, &dir, &limits, &mut VmcoreinfoCache::default()).await?;
        kernel = stats.osrelease.unwrap_or_default();
        live.push(r);
    }
    let mut cache = VmcoreinfoCache::default();
    timed(qmp, &dir, &limits, &mut cache).await?;
    let mut cached = Vec::new();
    for _ in 0..reads {
        cached.push(timed(qmp, &dir, &limits, &mut cache).await?.0);
    }
    qmp.execute(qapi::qmp::stop {}).await?;
    let paused = timed(qmp, &dir, &limits, &mut VmcoreinfoCache::default()).await;
    qmp.execute(qapi::qmp::cont {}).await?;
    let paused = paused?.0;
    let t = Instant::now();
    let (_, found) = vmcoreinfo::scan_ram(qmp, &dir, Duration::from_secs(300), vmcoreinfo::SCAN_MAX).await?;
    let scan_ms = t.elapsed().as_secs_f64() * 1e3;
    let scan_bytes = match found {
        vmcoreinfo::Found::Scan { scanned } => scanned,
        vmcoreinfo::Found::Device => 0,
    };
    say(&format!("{mib} MiB guest: full dumps"));
    let mut dumps = Vec::new();
    use qapi::qmp::DumpGuestMemoryFormat as F;
    for (format, name) in [(F::elf, "elf"), (F::kdump_zlib, "kdump-zlib")] {
        dumps.push(full_dump(qmp, &dir.join("bench-full.dump"), format, name).await?);
    }
    say(&format!("{mib} MiB guest: following the log"));
    let follow = follow(vm, reads.max(5) * 4).await?;
    Ok(Figures {
        follow,
        ram_mib: mib,
        kernel,
        live: median(live),
        live_cached: median(cached),
        paused,
        scan_ms,
        scan_bytes,
        dumps,
    })
}

/// Run time of QEMU's main thread (its pid's thread), ns, from the scheduler's statistics.
fn qemu_main_ns(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// This process's CPU time, µs: the run time of all its threads (the scheduler's statistics).
fn own_cpu_us() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    ns / 1000
}

/// One poll of the follower, measured.
struct Sample {
    wall_us: f64,
    cpu_us: f64,
    qemu_us: f64,
    bytes: u64,
    calls: u64,
    records: usize,
}

async fn sample(
    f: &mut acpimon::memory::LogFollower,
    qmp: &acpimon::trigger::qmp::Qmp,
    dir: &Path,
) -> Result<Sample, KernelLogError> {
    let (q0, c0, t) = (qemu_main_ns(qmp.pid), own_cpu_us(), Instant::now());
    let new = f.poll(qmp, dir).await?;
    let wall = t.elapsed();
    let (c1, q1) = (own_cpu_us(), qemu_main_ns(qmp.pid));
    Ok(Sample {
        wall_us: wall.as_secs_f64() * 1e6,
        cpu_us: c1.saturating_sub(c0) as f64,
        qemu_us: q1.saturating_sub(q0) as f64 / 1e3,
        bytes: new.bytes,
        calls: new.pmemsave_calls,
        records: new.records.len(),
    })
}

fn summarise(v: &[Sample]) -> Poll {
    let pick = |mut x: Vec<f64>, q: f64| {
        x.sort_by(f64::total_cmp);
        x.get(((x.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0)
    };
    let med = |g: &dyn Fn(&Sample) -> f64| pick(v.iter().map(g).collect(), 0.5);
    Poll {
        polls: v.len(),
        wall_us: med(&|s| s.wall_us),
        wall_p99_us: pick(v.iter().map(|s| s.wall_us).collect(), 0.99),
        cpu_us: med(&|s| s.cpu_us),
        qemu_main_us: med(&|s| s.qemu_us),
        bytes: med(&|s| s.bytes as f64) as u64,
        pmemsave_calls: med(&|s| s.calls as f64) as u64,
        records: med(&|s| s.records as f64) as usize,
    }
}

/// Alt+SysRq+`key` as keystrokes (the guest's keyboard): the kernel prints its answer.
async fn sysrq(qmp: &acpimon::trigger::qmp::Qmp, key: qapi::qmp::QKeyCode) -> Result<(), KernelLogError> {
    use qapi::qmp::{KeyValue, QKeyCode, QKeyCodeWrapper};
    let keys =
        [QKeyCode::alt, QKeyCode::sysrq, key].map(|data| KeyValue::qcode(QKeyCodeWrapper { data })).to_vec();
    qmp.execute(qapi::qmp::send_key { keys, hold_time: None }).await?;
    Ok(())
}

/// The follower's polls: the first (the whole ring), `n` idle ones, and `n` after the guest
/// printed (SysRq h, its help: one long record, and `m`, memory: dozens).
async fn follow(vm: &Vm, n: usize) -> Result<Follow, KernelLogError> {
    let (qmp, dir) = (&vm.qmp, vm.prepared.dir.clone());
    let mut f = acpimon::memory::LogFollower::new(Default::default(), 0, Default::default());
    let first = summarise(&[sample(&mut f, qmp, &dir).await?]);
    let mut idle = Vec::new();
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle.push(sample(&mut f, qmp, &dir).await?);
    }
    let mut busy = Vec::new();
    for i in 0..n {
        let key = if i % 2 == 0 { qapi::qmp::QKeyCode::h } else { qapi::qmp::QKeyCode::m };
        sysrq(qmp, key).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.push(sample(&mut f, qmp, &dir).await?);
    }
    Ok(Follow { first, idle: summarise(&idle), busy: summarise(&busy) })
}

/// One read of the log, timed.
async fn timed(
    qmp: &acpimon::trigger::qmp::Qmp,
    dir: &Path,
    limits: &LogLimits,
    cache: &mut VmcoreinfoCache,
) -> Result<(Read, LogStats), KernelLogError> {
    let t = Instant::now();
    let (log, stats) = read_log(qmp, dir, cache, 0, limits).await?;
    Ok((Read::from(&stats, t.elapsed(), log.records.len()), stats))
}

async fn full_dump(
    qmp: &acpimon::trigger::qmp::Qmp,
    path: &Path,
    format: qapi::qmp::DumpGuestMemoryFormat,
    name: &'static str,
) -> Result<Dump, KernelLogError> {
    let _ = std::fs::remove_file(path);
    let cmd = qapi::qmp::dump_guest_memory {
        paging: false,
        protocol: format!("file:{}", path.display()),
        detach: Some(false),
        format: Some(format),
        begin: None,
        length: None,
    };
    let t = Instant::now();
    qmp.execute_within(cmd, Duration::from_secs(600)).await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(path);
    Ok(Dump { format: name, ms, bytes })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernel log from guest memory: QEMU {} pc TCG, median of {} reads",
            self.qemu, self.reads
        )?;
        let kib = |b: u64| format!("{} KiB", b >> 10);
        for g in &self.guests {
            writeln!(f, "  {} MiB guest, Linux {}:", g.ram_mib, g.kernel)?;
            let row = |f: &mut fmt::Formatter<'_>, what: &str, r: &Read| {
                writeln!(
                    f,
                    "    {what:<44} {:>8.1} ms  {:>9} read  {:>3} pmemsave  ({} records)",
                    r.ms,
                    kib(r.bytes),
                    r.pmemsave_calls,
                    r.records
                )
            };
            row(f, "log, live (VMCOREINFO from the device)", &g.live)?;
            row(f, "log, live (VMCOREINFO cached for the boot)", &g.live_cached)?;
            row(f, "log, paused guest", &g.paused)?;
            writeln!(
                f,
                "    {:<44} {:>8.1} ms  {:>9} read",
                "VMCOREINFO by RAM scan (no device)",
                g.scan_ms,
                kib(g.scan_bytes)
            )?;
            for d in &g.dumps {
                let what = format!("full dump-guest-memory, {}", d.format);
                writeln!(f, "    {what:<44} {:>8.1} ms  {:>9} written", d.ms, kib(d.bytes))?;
            }
            writeln!(
                f,
                "    following (per poll, median; wall p99; CPU: this process, QEMU's main thread):"
            )?;
            for (what, p) in [
                ("first poll (whole ring)", &g.follow.first),
                ("idle (no new record)", &g.follow.idle),
                ("busy (after a SysRq key)", &g.follow.busy),
            ] {
                writeln!(
                    f,
                    "    {what:<28} {:>8.2} ms (p99 {:>6.2})  cpu {:>6.2} ms  qemu {:>6.2} ms  {:>8} B  {:>2} pmemsave  {:>4} records  ({} polls)",
                    p.wall_us / 1e3,
                    p.wall_p99_us / 1e3,
                    p.cpu_us / 1e3,
                    p.qemu_main_us / 1e3,
                    p.bytes,
                    p.pmemsave_calls,
                    p.records,
                    p.polls
                )?;
            }
        }
        Ok(())
    }
}
