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
    read_kernel_log, Budget, FileMemory, FollowLimits, KernelLog, KernelMap, LogFollower, LogRecord,
    MemError, QmpMemory, Vmcoreinfo, VmcoreinfoCache,
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

/// How often `--follow` reads the new records (an idle poll is one small `pmemsave`; see the
/// README's figures).
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
    if c.follow {
        return follow(&c, qmp.as_ref()).await;
    }
    let mut cache = VmcoreinfoCache::default();
    let (log, stats) = match (&qmp, &c.ram_file) {
        (Some(qmp), _) => read_log(qmp, &c.dir, &mut cache, 0, &c.limits).await?,
        (None, Some(ram)) => read_log_file(ram, &mut cache, 0, &c.limits).await?,
        (None, None) => unreachable!("QMP is connected unless a RAM file is given"),
    };
    tracing::debug!(?stats, skipped = log.skipped, "kernel log read");
    print(&log.records, c.json).map_err(DmesgError::Stdout)
}

/// `--follow`: the whole log once, then every [`FOLLOW_EVERY`] only the records written since
/// ([`LogFollower`]), until the VM goes away. A guest still booting or rebooting is read again
/// (its VMCOREINFO anew, after a backoff).
async fn follow(c: &DmesgCommand, qmp: Option<&Qmp>) -> Result<(), DmesgError> {
    let gone = || qmp.is_some_and(Qmp::is_closed);
    let limits = FollowLimits {
        time: c.limits.time,
        max_bytes: c.limits.max_bytes,
        scan_max: c.limits.scan_max,
        retry_min: FOLLOW_EVERY,
        retry_max: Duration::from_secs(30),
        // One VM, asked for by a person: scan at once when the device has no note.
        scan_after: Duration::ZERO,
    };
    let mut f = LogFollower::new(Default::default(), 0, limits);
    let mut failed: Option<String> = None;
    loop {
        let read = match (qmp, &c.ram_file) {
            _ if f.backing_off() => None,
            (Some(qmp), _) => Some(f.poll(qmp, &c.dir).await),
            (None, Some(ram)) => Some(f.poll_file(ram).await),
            (None, None) => unreachable!("QMP is connected unless a RAM file is given"),
        };
        match read {
            Some(Ok(mut new)) => {
                failed = None;
                tracing::debug!(
                    records = new.records.len(),
                    lost = new.lost,
                    bytes = new.bytes,
                    calls = new.pmemsave_calls,
                    elapsed_us = new.elapsed_us,
                    "kernel log polled"
                );
                if new.restarted {
                    tracing::info!("the guest's kernel log started over (a reboot)");
                }
                if new.lost > 0 && !new.full {
                    tracing::warn!("{} records were overwritten before they could be read", new.lost);
                }
                if new.records.len() > c.limits.max_records {
                    new.records.drain(..new.records.len() - c.limits.max_records);
                }
                print(&new.records, c.json).map_err(DmesgError::Stdout)?;
            }
            Some(Err(e)) if !gone() => {
                let text = e.to_string();
                if failed.as_ref() != Some(&text) {
                    tracing::warn!("cannot read the kernel log yet, trying again: {text}");
                    failed = Some(text);
                }
            }
            Some(Err(_)) => return Ok(()),
            None => {}
        }
        match qmp {
            Some(qmp) => tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = qmp.closed() => return Ok(()),
            },
            None => tokio::time::sleep(FOLLOW_EVERY).await,
        }
    }
}

/// Prints `records`.
fn print(records: &[LogRecord], json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in records {
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
