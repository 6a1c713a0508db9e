//! `acpimon-bench kernel-log`: what reading a guest's kernel log from its memory costs
//! (`acpimon::memory`), beside a full `dump-guest-memory` of the same guest in the same run:
//! per RAM size, the test guest booted, then the log read live (VMCOREINFO from the
//! `vmcoreinfo` device each time, and from the cache), paused, VMCOREINFO found by a RAM scan,
//! and two full dumps (raw ELF, and the compressed kdump the `memory-dump` step writes).

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
    Ok(Figures {
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
        }
        Ok(())
    }
}
