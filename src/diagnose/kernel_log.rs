//! `kernel-log`: the guest kernel's log read from its memory ([`crate::memory::dmesg`]), for
//! guests whose console is elsewhere, quiet or lost characters: the printk ring as `dmesg`
//! prints it, whatever the guest's state (running, hung, panicked, paused). Once per boot it
//! also reads the kernel's symbols from its kallsyms ([`crate::memory::kallsyms`]) for the
//! verdict.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::{Ctx, Done, Keep, StepResult};
use crate::memory::dmesg::{read_log, LogLimits};
use crate::memory::kallsyms;
use crate::memory::vmcoreinfo::GuestSymbols;
use crate::memory::{MemError, Vmcoreinfo, VmcoreinfoCache};
use crate::trigger::qmp::Qmp;

/// What the step needs beyond QMP: where QEMU may write its read files (the VM's directory),
/// and the VM's VMCOREINFO from earlier bundles of the same boot.
#[derive(Clone, Debug)]
pub struct KernelLogContext {
    pub dir: PathBuf,
    pub cache: Arc<Mutex<VmcoreinfoCache>>,
    /// The caller's key for the guest's current boot: VMCOREINFO cached under another key is
    /// found anew.
    pub boot: u64,
    /// Also read the kernel's symbols from its kallsyms, once per boot, for the verdict (when
    /// the user gave no `[diagnostics] symbols`).
    pub guest_symbols: bool,
}

impl KernelLogContext {
    /// The guest's symbols read for this boot, if any were (or why there are none).
    pub fn symbols(&self) -> Option<GuestSymbols> {
        crate::util::lock(&self.cache).symbols(self.boot)
    }
}

/// Reads the log within the step's time, once from the cached VMCOREINFO and, when that fails
/// (a reboot the key did not see moves KASLR's offsets), once more from a fresh discovery.
pub(super) async fn step(ctx: &Ctx<'_>, qmp: &Qmp, k: &KernelLogContext) -> StepResult {
    let mut cache = crate::util::lock(&k.cache).clone();
    let limits = |ctx: &Ctx<'_>| LogLimits { time: ctx.remaining(), ..LogLimits::default() };
    let mut read = read_log(qmp, &k.dir, &mut cache, k.boot, &limits(ctx)).await;
    if read.is_err() && cache.get(k.boot).is_some() {
        cache = VmcoreinfoCache::default();
        read = read_log(qmp, &k.dir, &mut cache, k.boot, &limits(ctx)).await;
    }
    *crate::util::lock(&k.cache) = cache.clone();
    let (log, stats) =
        read.map_err(|e| Done::failed(format!("reading the kernel log from guest memory: {e}")))?;
    let mut text = String::new();
    for r in &log.records {
        for line in r.console_lines() {
            // Guest text: control characters neutralised, as the console's.
            text.push_str(&crate::console::sanitize(line.as_bytes()));
            text.push('\n');
        }
    }
    // The newest records matter most: an oversized log keeps its tail.
    let file = ctx.write("txt", text.as_bytes(), Keep::Tail).await?;
    let symbols = match cache.get(k.boot) {
        Some(info) if k.guest_symbols && cache.symbols(k.boot).is_none() => {
            Some(read_symbols(ctx, qmp, k, &info, &mut cache).await)
        }
        _ => None,
    };
    *crate::util::lock(&k.cache) = cache;
    let summary = json!({
        "records": log.records.len(),
        "first_seq": log.records.first().map(|r| r.seq),
        "last_seq": log.records.last().map(|r| r.seq),
        "skipped": log.skipped,
        "dropped": log.dropped,
        "vmcoreinfo": stats.vmcoreinfo,
        "bytes_read": stats.bytes,
        "elapsed_ms": stats.elapsed_ms,
        "osrelease": stats.osrelease,
        // Read in this bundle (the first of the boot): how many, at what cost, or why not.
        "symbols": symbols,
    });
    Ok(Done::ok(Some(file), Some(summary)))
}

/// Reads the guest's symbols into `cache` with at most half the step's time left (the log is
/// written already), and says how it went for the step's summary.
async fn read_symbols(
    ctx: &Ctx<'_>,
    qmp: &Qmp,
    k: &KernelLogContext,
    info: &Vmcoreinfo,
    cache: &mut VmcoreinfoCache,
) -> serde_json::Value {
    let time = ctx.remaining() / 2;
    match kallsyms::read_symbols(qmp, &k.dir, info, kallsyms::DEFAULT_MAX_BYTES, time).await {
        Ok((s, stats)) => {
            let summary = json!({
                "count": s.len(),
                "modules": stats.modules,
                "module_symbols": stats.module_symbols,
                "modules_error": stats.modules_error,
                "bytes_read": stats.bytes,
                "pmemsave_calls": stats.pmemsave_calls,
                "elapsed_ms": stats.elapsed_ms,
            });
            cache.insert_symbols(k.boot, Ok(Arc::new(s)));
            summary
        }
        Err(e) => {
            // An older kernel stays one for this boot; anything else is tried again next bundle.
            if matches!(e, MemError::NoKallsyms { .. }) {
                cache.insert_symbols(k.boot, Err(e.to_string()));
            }
            json!({ "error": e.to_string() })
        }
    }
}
