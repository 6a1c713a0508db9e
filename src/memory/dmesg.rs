//! The kernel log of a running, hung or panicked guest, read from its memory: [`read_log`]
//! (for a caller holding the VM's QMP, e.g. a diagnostic step, with its deadline) and
//! `acpimon dmesg` ([`command`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::vmcoreinfo::{self, Found};
use super::{
    read_kernel_log, Budget, FileMemory, KernelLog, KernelMap, MemError, QmpMemory, Vmcoreinfo,
    VmcoreinfoCache,
};
use crate::launch::prepare::Descriptor;
use crate::trigger::qmp::{Qmp, QmpError};

/// What one read of the kernel log may cost.
#[derive(Clone, Debug)]
pub struct LogLimits {
    /// The whole read, VMCOREINFO's discovery included.
    pub time: Duration,
    /// Bytes read from guest memory for the ring (its arrays and page tables).
    pub max_bytes: u64,
    /// The newest records kept.
    pub max_records: usize,
    /// The most RAM scanned for VMCOREINFO when the guest did not publish it.
    pub scan_max: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        // A Debian kernel's ring (128 KiB of text, 4096 records) is about 600 KiB with its
        // descriptors; 64 MiB allows a log_buf_len of 32 MiB.
        LogLimits {
            time: Duration::from_secs(30),
            max_bytes: 64 << 20,
            max_records: 1 << 20,
            scan_max: vmcoreinfo::SCAN_MAX,
        }
    }
}

/// What a read cost.
#[derive(Clone, Debug, Serialize)]
pub struct LogStats {
    /// `device` (the vmcoreinfo device's note), `scan` (a RAM scan) or `cache`.
    pub vmcoreinfo: &'static str,
    /// RAM scanned for VMCOREINFO.
    pub scanned_bytes: u64,
    /// Bytes read for the ring.
    pub bytes: u64,
    /// `pmemsave` round trips for the ring.
    pub pmemsave_calls: u64,
    pub elapsed_ms: u64,
    pub osrelease: Option<String>,
}

impl LogStats {
    fn of(
        vmcoreinfo: &'static str,
        scanned: u64,
        bytes: u64,
        calls: u64,
        start: Instant,
        info: &Vmcoreinfo,
    ) -> LogStats {
        LogStats {
            vmcoreinfo,
            scanned_bytes: scanned,
            bytes,
            pmemsave_calls: calls,
            elapsed_ms: start.elapsed().as_millis() as u64,
            osrelease: info.osrelease().map(str::to_string),
        }
    }
}

/// Reads the kernel log through `qmp`; QEMU's temporary files go to `dir` (the VM's directory).
/// VMCOREINFO comes from `cache` when it holds this `boot`'s (the caller's key for one boot of
/// the guest), else is discovered and stored there.
pub async fn read_log(
    qmp: &Qmp,
    dir: &Path,
    cache: &mut VmcoreinfoCache,
    boot: u64,
    limits: &LogLimits,
) -> Result<(KernelLog, LogStats), MemError> {
    let start = Instant::now();
    let (info, how, scanned) = match cache.get(boot) {
        Some(info) => (info, "cache", 0),
        None => {
            let (info, found) = vmcoreinfo::discover(qmp, dir, limits.time, limits.scan_max).await?;
            let (how, scanned) = match found {
                Found::Device => ("device", 0),
                Found::Scan { scanned } => ("scan", scanned),
            };
            (cache.insert(boot, info), how, scanned)
        }
    };
    let map = KernelMap::from_vmcoreinfo(&info)?;
    let left = limits.time.saturating_sub(start.elapsed());
    let mut mem = QmpMemory::new(qmp, dir, Budget::new(limits.max_bytes, left));
    let log = read_kernel_log(&mut mem, &info, &map, limits.max_records).await?;
    let stats = LogStats::of(how, scanned, super::PhysRead::budget(&mem).used(), mem.calls(), start, &info);
    Ok((log, stats))
}

/// [`read_log`] from the file backing guest RAM ([`FileMemory`]), without QMP: VMCOREINFO by a
/// scan of the file (the device's note needs QMP).
pub async fn read_log_file(
    ram: &Path,
    cache: &mut VmcoreinfoCache,
    boot: u64,
    limits: &LogLimits,
) -> Result<(KernelLog, LogStats), MemError> {
    let start = Instant::now();
    let (info, how, scanned) = match cache.get(boot) {
        Some(info) => (info, "cache", 0),
        None => {
            let mut mem =
                FileMemory::open(ram, Budget::new(limits.scan_max.saturating_add(1 << 20), limits.time))?;
            let ranges = mem.ranges();
            let (info, found) = vmcoreinfo::scan_ranges(&mut mem, &ranges, limits.scan_max).await?;
            let scanned = match found {
                Found::Scan { scanned } => scanned,
                Found::Device => 0,
            };
            (cache.insert(boot, info), "scan", scanned)
        }
    };
    let map = KernelMap::from_vmcoreinfo(&info)?;
    let left = limits.time.saturating_sub(start.elapsed());
    let mut mem = FileMemory::open(ram, Budget::new(limits.max_bytes, left))?;
    let log = read_kernel_log(&mut mem, &info, &map, limits.max_records).await?;
    let stats = LogStats::of(how, scanned, super::PhysRead::budget(&mem).used(), 0, start, &info);
    Ok((log, stats))
}

/// `acpimon dmesg`'s failures.
#[derive(Debug, thiserror::Error)]
pub enum DmesgError {
    #[error(transparent)]
    Descriptor(#[from] crate::launch::PrepareError),
    #[error(
        "cannot talk to the VM's QMP socket {path}: {source}; is the VM running, and is no other client \
         (such as `acpimon watch`) holding that monitor? QEMU serves one client per monitor"
    )]
    Qmp { path: PathBuf, source: QmpError },
    #[error("no QMP greeting on {0} within 5 s: another client holds this monitor (e.g. `acpimon watch`); stop it or read the log from its bundles")]
    Busy(PathBuf),
    #[error("reading the guest's kernel log: {0}")]
    Memory(#[from] MemError),
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
}

/// `acpimon dmesg`'s request.
#[derive(Clone, Debug)]
pub struct DmesgCommand {
    /// The VM's directory (`STATE_DIR/NAME`).
    pub dir: PathBuf,
    pub json: bool,
    pub follow: bool,
    pub limits: LogLimits,
    /// Read guest RAM from this shared file instead of through QMP.
    pub ram_file: Option<PathBuf>,
}

/// How often `--follow` reads the ring again.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// Prints the VM's kernel log (`[    1.234567] text` per line, or one JSON object per record);
/// with `follow`, then the new records every [`FOLLOW_EVERY`] until the VM goes away.
pub async fn command(c: DmesgCommand) -> Result<(), DmesgError> {
    let d = Descriptor::load(&c.dir)?;
    let qmp = match &c.ram_file {
        Some(_) => None,
        None => {
            let connect = Qmp::connect(&d.qmp, Duration::ZERO);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(q)) => Some(q),
                Ok(Err(source)) => return Err(DmesgError::Qmp { path: d.qmp.clone(), source }),
                Err(_) => return Err(DmesgError::Busy(d.qmp.clone())),
            }
        }
    };
    let gone = || qmp.as_ref().is_some_and(Qmp::is_closed);
    let mut cache = VmcoreinfoCache::default();
    // A reboot changes the layout (KASLR): the boot key moves on when a read fails or the
    // sequence numbers go back.
    let mut boot = 0u64;
    let mut last: Option<u64> = None;
    let mut failed: Option<String> = None;
    loop {
        let read = match (&qmp, &c.ram_file) {
            (Some(qmp), _) => read_log(qmp, &c.dir, &mut cache, boot, &c.limits).await,
            (None, Some(ram)) => read_log_file(ram, &mut cache, boot, &c.limits).await,
            (None, None) => unreachable!("QMP is connected unless a RAM file is given"),
        };
        let (log, stats) = match read {
            Ok(r) => r,
            // Following, a guest still booting or rebooting is read again (its VMCOREINFO anew).
            Err(e) if c.follow && !gone() => {
                let text = e.to_string();
                if failed.as_ref() != Some(&text) {
                    tracing::warn!(
                        "cannot read the kernel log yet, trying again every {FOLLOW_EVERY:?}: {text}"
                    );
                    failed = Some(text);
                }
                boot += 1;
                tokio::time::sleep(FOLLOW_EVERY).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        failed = None;
        tracing::debug!(?stats, skipped = log.skipped, "kernel log read");
        if last.is_some_and(|l| log.records.last().is_some_and(|r| r.seq < l)) {
            boot += 1;
            last = None;
        }
        print(&log, last, c.json).map_err(DmesgError::Stdout)?;
        last = log.records.last().map(|r| r.seq).or(last);
        if !c.follow {
            return Ok(());
        }
        match &qmp {
            Some(qmp) => tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = qmp.closed() => return Ok(()),
            },
            None => tokio::time::sleep(FOLLOW_EVERY).await,
        }
    }
}

/// Prints the records after `after`.
fn print(log: &KernelLog, after: Option<u64>, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in log.records.iter().filter(|r| after.is_none_or(|a| r.seq > a)) {
        if json {
            serde_json::to_writer(&mut out, r)?;
            out.write_all(b"\n")?;
        } else {
            for line in r.console_lines() {
                // Guest text: control characters neutralised, as the console's.
                writeln!(out, "{}", crate::console::sanitize(line.as_bytes()))?;
            }
        }
    }
    out.flush()
}
