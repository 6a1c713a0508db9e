//! Steps through QMP: queries, registers, the memory dump.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Ctx, Done, Keep, StepResult};
use crate::trigger::qmp::{EventKind, Qmp, QmpError};
use crate::verdict::registers;
use qapi::qmp::DumpStatus;

/// Runs `command` and writes QEMU's reply as it came (every field, whether or not qapi's
/// schema knows it); `summarize` picks the summary.
pub(super) async fn query<C: qapi::Command>(
    ctx: &Ctx<'_>,
    qmp: &Qmp,
    command: C,
    summarize: impl Fn(&Value) -> Option<Value>,
) -> StepResult {
    let v = qmp.execute_json(command, ctx.remaining()).await.map_err(|e| Done::qmp(C::NAME, e))?;
    let mut text = serde_json::to_vec_pretty(&v).expect("JSON serialises");
    text.push(b'\n');
    let file = ctx.write("json", &text, Keep::Head).await?;
    Ok(Done::ok(Some(file), summarize(&v)))
}

/// An HMP command through `human-monitor-command`, optionally on one vCPU; its output with
/// control characters neutralised.
async fn hmp(qmp: &Qmp, line: &str, cpu: Option<i64>, timeout: Duration) -> Result<String, Done> {
    let out = qmp.hmp_within(line, cpu, timeout).await.map_err(|e| Done::qmp(&format!("HMP {line}"), e))?;
    Ok(crate::console::sanitize(out.as_bytes()))
}

/// The time between the two register samples.
const SAMPLE_GAP: Duration = Duration::from_millis(300);

/// Every vCPU's `info registers`: HMP `info registers -a`, or where QEMU does not know `-a`,
/// `info registers` on each vCPU that `query-cpus-fast` lists, each under its `CPU#N` line.
/// Returns the method and the text (control characters neutralised); on failure, what failed.
/// The `registers` step and the `vcpu-progress` scenario both read registers through it.
pub async fn all_registers(
    qmp: &Qmp,
    timeout: Duration,
) -> Result<(&'static str, String), (String, QmpError)> {
    let start = Instant::now();
    let left = || timeout.saturating_sub(start.elapsed());
    let hmp = |line: &'static str, cpu: Option<i64>, t: Duration| async move {
        let out = qmp.hmp_within(line, cpu, t).await.map_err(|e| (format!("HMP {line}"), e))?;
        Ok::<_, (String, QmpError)>(crate::console::sanitize(out.as_bytes()))
    };
    let all = hmp("info registers -a", None, left()).await?;
    if all.contains("CPU#") {
        return Ok(("info registers -a", all));
    }
    // Only the indexes are needed: read them from the raw reply, so a CpuInfoFast field newer
    // than the schema cannot cost the registers.
    let cpus = qmp
        .execute_json(qapi::qmp::query_cpus_fast {}, left())
        .await
        .map_err(|e| ("query-cpus-fast".to_string(), e))?;
    let mut text = format!("[acpimon: 'info registers -a' gave no CPU#: {}]\n", all.trim());
    let indexes = cpus.as_array().into_iter().flatten().filter_map(|c| c["cpu-index"].as_i64());
    for idx in indexes.take(registers::MAX_CPUS) {
        let one = hmp("info registers", Some(idx), left()).await?;
        if !one.contains("CPU#") {
            text.push_str(&format!("\nCPU#{idx}\n"));
        }
        text.push_str(&one);
    }
    Ok(("per-cpu", text))
}

/// `registers`: every vCPU's registers ([`all_registers`]) twice, [`SAMPLE_GAP`] apart.
pub(super) async fn registers(ctx: &Ctx<'_>, qmp: &Qmp) -> StepResult {
    let (method, text) =
        all_registers(qmp, ctx.remaining()).await.map_err(|(what, e)| Done::qmp(&what, e))?;
    let mut summary = json!({ "method": method, "cpus": summarize_registers(&text), "samples": 1 });
    // A second sample tells a vCPU spinning in one place from one making progress or stopped.
    let mut text = text;
    if ctx.remaining() > SAMPLE_GAP * 2 {
        tokio::time::sleep(SAMPLE_GAP).await;
        let again = if method == "info registers -a" {
            hmp(qmp, "info registers -a", None, ctx.remaining()).await.ok()
        } else {
            None
        };
        if let Some(again) = again.filter(|a| a.contains("CPU#")) {
            text.push_str(&format!(
                "\n{} 2, {} ms after the first ===\n{again}",
                crate::verdict::registers::SAMPLE_MARK,
                SAMPLE_GAP.as_millis()
            ));
            summary["samples"] = 2.into();
        }
    }
    let file = ctx.write("txt", text.as_bytes(), Keep::Head).await?;
    Ok(Done::ok(Some(file), Some(summary)))
}

/// Per `CPU#N` section of `info registers` output: RIP, CPL and whether it is halted.
pub(super) fn summarize_registers(text: &str) -> Vec<Value> {
    registers::parse(text)
        .iter()
        .filter(|r| r.rip.is_some() || r.cpl.is_some() || r.halted.is_some())
        .map(|r| {
            json!({
                "cpu": r.cpu,
                "rip": r.rip.map(|v| format!("{v:016x}")),
                "cpl": r.cpl,
                "halted": r.halted,
            })
        })
        .collect()
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
}

/// `memory-dump`: `dump-guest-memory` in kdump-raw-zlib format (kdump-zlib before QEMU 8.2)
/// into the bundle, detached and polled; skipped when the guest's RAM exceeds `max_bytes`, deleted if the file grows past it.
pub(super) async fn memory_dump(ctx: &Ctx<'_>, qmp: &Qmp, max_bytes: u64) -> StepResult {
    if qmp.libvirt_managed {
        return Err(Done::skipped(
            "a VM reached through libvirt: libvirt owns its dumps (one started behind it crashed libvirtd 9.0); \
             take one with `virsh dump --memory-only --format kdump-zlib`"
                .into(),
        ));
    }
    let mem = qmp
        .execute_within(qapi::qmp::query_memory_size_summary {}, ctx.remaining())
        .await
        .map_err(|e| Done::qmp("query-memory-size-summary", e))?;
    let ram = mem.base_memory.saturating_add(mem.plugged_memory.unwrap_or(0));
    // QEMU 8.2 added kdump-raw-zlib, the kdump-compressed file `crash` reads; before, only the
    // "flattened" kdump-zlib stream (`makedumpfile -R` turns it into the former). The formats
    // are read from the raw reply: one newer than the schema must not fail the dump.
    let caps = qmp
        .execute_json(qapi::qmp::query_dump_guest_memory_capability {}, ctx.remaining())
        .await
        .map_err(|e| Done::qmp("query-dump-guest-memory-capability", e))?;
    use qapi::qmp::DumpGuestMemoryFormat as Format;
    let has = |f: Format| {
        caps["formats"].as_array().is_some_and(|v| v.iter().any(|x| x.as_str() == Some(qapi::Enum::name(&f))))
    };
    let format = if has(Format::kdump_raw_zlib) { Format::kdump_raw_zlib } else { Format::kdump_zlib };
    let mut summary =
        json!({ "format": qapi::Enum::name(&format), "ram_bytes": ram, "max_bytes": max_bytes });
    if format == Format::kdump_zlib {
        summary["note"] =
            "flattened kdump (this QEMU has no kdump-raw-zlib): run makedumpfile -R to read it with crash"
                .into();
    }
    if ram > max_bytes {
        return Err(Done::skipped(format!(
            "guest RAM ({}) exceeds the cap max_bytes ({}); raise it to dump this VM",
            mib(ram),
            mib(max_bytes)
        ))
        .with_summary(summary));
    }
    let name = ctx.file_name("kdump");
    let path = ctx.dir.join(&name);
    let Some(path_text) = path.to_str() else {
        return Err(Done::failed(format!(
            "the bundle path {} is not UTF-8; QEMU cannot be given it",
            path.display()
        )));
    };
    let _ = tokio::fs::remove_file(&path).await;
    let remove = || async { tokio::fs::remove_file(&path).await.is_ok() };
    let mut events = qmp.events();
    let dump = qapi::qmp::dump_guest_memory {
        paging: false,
        protocol: format!("file:{path_text}"),
        detach: Some(true),
        format: Some(format),
        begin: None,
        length: None,
    };
    qmp.execute_within(dump, ctx.remaining()).await.map_err(|e| Done::qmp("dump-guest-memory", e))?;
    let started = Instant::now();
    let mut over = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let size = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
        if size > max_bytes && over.is_none() {
            // QEMU keeps writing to the unlinked file until it is done; the space is freed then.
            remove().await;
            over = Some(size);
        }
        if Instant::now() >= ctx.deadline {
            let removed = remove().await;
            return Err(Done::timeout(format!(
                "the dump did not finish within {} ({} written{}); QEMU goes on and keeps the VM stopped until \
                 it is done",
                ctx.timeout_text(),
                mib(size),
                if removed { ", partial file deleted" } else { "" }
            ))
            .with_summary(summary));
        }
        let status = match qmp.execute_within(qapi::qmp::query_dump {}, ctx.remaining()).await {
            Ok(v) => v.status,
            Err(e) => {
                remove().await;
                return Err(Done::qmp("query-dump", e).with_summary(summary));
            }
        };
        match status {
            DumpStatus::completed => break,
            DumpStatus::failed => {
                remove().await;
                let mut why = "QEMU reports the dump failed".to_string();
                while let Ok(ev) = events.try_recv() {
                    if let EventKind::DumpCompleted { error: Some(e) } = ev.kind {
                        why = format!("QEMU reports the dump failed: {e}");
                    }
                }
                return Err(Done::failed(why).with_summary(summary));
            }
            DumpStatus::none if started.elapsed() > Duration::from_secs(5) => {
                remove().await;
                return Err(Done::failed("QEMU reports no dump in progress after it accepted one".into())
                    .with_summary(summary));
            }
            _ => {}
        }
    }
    let size = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or(0);
    if let Some(at) = over.or((size > max_bytes).then_some(size)) {
        remove().await;
        return Err(Done::failed(format!(
            "the dump grew past the cap max_bytes ({} > {}) and was deleted",
            mib(at),
            mib(max_bytes)
        ))
        .with_summary(summary));
    }
    if size == 0 {
        return Err(Done::failed(format!("QEMU reports the dump complete but {name} is missing or empty"))
            .with_summary(summary));
    }
    Ok(Done::ok(Some(name), Some(summary)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_summary_per_cpu() {
        let text = "\nCPU#0\nRAX=0000000000000000 RBX=0000000000000001\nRIP=ffffffff81a592eb RFL=00000246 \
                    [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\nCR0=80050033\n\nCPU#1\nRIP=0000000000400099 \
                    RFL=00000246 [---Z-P-] CPL=3 II=0 A20=1 SMM=0 HLT=0\n";
        let s = summarize_registers(text);
        assert_eq!(
            s,
            vec![
                json!({"cpu": 0, "rip": "ffffffff81a592eb", "cpl": 0, "halted": true}),
                json!({"cpu": 1, "rip": "0000000000400099", "cpl": 3, "halted": false}),
            ]
        );
        assert!(summarize_registers("no registers here").is_empty());
    }
}
