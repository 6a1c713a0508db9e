//! What the verdict reads in the `host` step's report ([`HostReport`]): a QEMU process the host
//! stopped, a drive that failed, a VM starved of host CPU, a vCPU thread spinning. Each reading
//! is one sentence for the headline and lines of evidence.

use crate::host::{Drive, HostReport, VcpuActivity};

/// A `BLOCK_IO_ERROR` this long before the host step still explains a guest waiting on I/O.
const RECENT_IO_ERROR_S: u64 = 300;
/// A cgroup throttled in at least this share of its periods starves the VM.
const THROTTLED: f64 = 0.25;
/// A vCPU thread that waited for a host CPU at least this share of the window, and at least
/// twice as long as it ran, was starved (it got under a third of what it wanted).
const WAITED: f64 = 0.5;

/// The host report of a bundle, with the file it came from.
pub struct HostReading<'a> {
    pub file: &'a str,
    pub report: HostReport,
}

impl<'a> HostReading<'a> {
    /// Parses the `host` step's file; None when it is not a host report.
    pub fn parse(file: &'a str, text: &str) -> Option<HostReading<'a>> {
        let report: HostReport = serde_json::from_str(text).ok()?;
        (report.schema == crate::host::SCHEMA).then_some(HostReading { file, report })
    }

    /// The QEMU process stopped on the host (every thread `T`/`t`): "the QEMU process (pid 123)
    /// is stopped on the host: all 9 threads in state T (SIGSTOP, a freezer or a debugger)".
    pub fn stopped(&self) -> Option<String> {
        let q = self.report.qemu.as_ref().filter(|q| q.all_stopped())?;
        Some(format!(
            "the QEMU process (pid {}) is stopped on the host: all {} threads in state {} (SIGSTOP, a freezer cgroup or a debugger)",
            q.pid, q.threads, q.state
        ))
    }

    /// The drive whose failure explains the incident: one QEMU holds failed (`io-status`), or
    /// one with a `BLOCK_IO_ERROR` in the last few minutes. "drive `disk0` io-status failed
    /// since 12:03:07 (BLOCK_IO_ERROR: write, Input/output error, action stop; 37 errors)".
    pub fn failing_drive(&self) -> Option<(&Drive, String)> {
        let now = humantime::parse_rfc3339(&self.report.time).ok();
        let recent = |d: &&Drive| {
            d.errors.as_ref().is_some_and(|e| match (now, humantime::parse_rfc3339(&e.last.time).ok()) {
                (Some(now), Some(last)) => {
                    now.duration_since(last).map_or(true, |ago| ago.as_secs() <= RECENT_IO_ERROR_S)
                }
                _ => false,
            })
        };
        let d = self
            .report
            .devices
            .block
            .iter()
            .find(|d| d.failed())
            .or_else(|| self.report.devices.block.iter().find(|d| recent(d)))?;
        let mut text = format!("drive `{}`", d.device);
        if let Some(s) = d.io_status.as_deref().filter(|_| d.failed()) {
            text.push_str(&format!(" io-status {s}"));
        } else {
            text.push_str(" failing");
        }
        if let Some(e) = &d.errors {
            let since = e.first.time.get(11..19).unwrap_or(&e.first.time);
            let what = if e.last.nospace { "no space left on the host" } else { e.last.reason.as_str() };
            text.push_str(&format!(
                " since {since} (BLOCK_IO_ERROR: {}, {what}, action {}; {} error{})",
                e.last.operation,
                e.last.action,
                e.count,
                if e.count == 1 { "" } else { "s" }
            ));
        }
        Some((d, text))
    }

    /// Whether the last I/O error QEMU acted on stopped the VM (`werror=stop`/`rerror=stop`).
    pub fn stopped_by_io_error(&self) -> bool {
        self.report.devices.block.iter().any(|d| d.errors.as_ref().is_some_and(|e| e.last.action == "stop"))
    }

    /// The VM starved of host CPU: its cgroup throttled, or its vCPU threads waiting for a host
    /// CPU far longer than they ran. "QEMU's cgroup throttled in 40 % of the last 10 s's
    /// periods (quota 20000/100000 µs); node CPU pressure 80 %".
    pub fn starved(&self) -> Option<String> {
        let q = self.report.qemu.as_ref();
        let throttled = q.and_then(|q| q.cgroup.as_ref()).and_then(|c| {
            let r = c.throttled_periods_10s.filter(|&r| r >= THROTTLED)?;
            let quota = c.quota.as_deref().map(|q| format!(" (quota {q} µs)")).unwrap_or_default();
            Some(format!("QEMU's cgroup throttled in {} of the last 10 s's periods{quota}", pct(r)))
        });
        let waited = self.report.vcpus.iter().find_map(|v| {
            let (busy, wait) = (v.busy_10s?, v.wait_10s?);
            (wait >= WAITED && wait >= 2.0 * busy).then(|| {
                format!(
                    "vCPU {}'s thread waited for a host CPU {} of the last 10 s and ran {}",
                    v.cpu,
                    pct(wait),
                    pct(busy)
                )
            })
        });
        let causes: Vec<String> = throttled.into_iter().chain(waited).collect();
        if causes.is_empty() {
            return None;
        }
        let mut text = causes.join("; ");
        if let Some(p) = self.report.node.pressure.as_ref().and_then(|p| p.cpu.as_ref()) {
            text.push_str(&format!("; node CPU pressure {:.0} % (some, avg10)", p.some.avg10));
        }
        Some(text)
    }

    /// The vCPU the host saw spinning, preferring `cpu`: "vCPU 1 at 100 % of a host CPU for
    /// 12 s".
    pub fn spinning(&self, cpu: Option<u32>) -> Option<(u32, String)> {
        let spinning = |v: &&VcpuActivity| v.spinning();
        let v = cpu
            .and_then(|c| self.report.vcpus.iter().filter(spinning).find(|v| v.cpu == c))
            .or_else(|| self.report.vcpus.iter().find(spinning))?;
        let busy = v.busy_10s.unwrap_or(0.0) + v.wait_10s.unwrap_or(0.0);
        let mut text = format!("vCPU {} at {} of a host CPU", v.cpu, pct(busy.min(1.0)));
        if v.busy_for_s > 1 {
            text.push_str(&format!(" for {} s", v.busy_for_s));
        }
        Some((v.cpu, text))
    }

    /// Whether vCPU `cpu`'s thread ran at least 10 % of a CPU over the last window; None when
    /// the host step does not know.
    pub fn ran(&self, cpu: u32) -> Option<bool> {
        let v = self.report.vcpus.iter().find(|v| v.cpu == cpu)?;
        Some(v.busy_10s? >= 0.1)
    }

    /// Every vCPU thread idle on the host (at most 5 % of a CPU), with at least one known.
    pub fn all_idle(&self) -> bool {
        !self.report.vcpus.is_empty() && self.report.vcpus.iter().all(VcpuActivity::idle)
    }

    /// Evidence lines: the QEMU process, each vCPU thread, failing drives, the node.
    pub fn lines(&self) -> Vec<String> {
        let r = &self.report;
        let mut out = Vec::new();
        if let Some(q) = &r.qemu {
            let mut l = format!(
                "QEMU pid {}: state {}, {} threads ({} stopped, {} in D)",
                q.pid, q.state, q.threads, q.stopped_threads, q.blocked_threads
            );
            if let Some(c) = &q.cgroup {
                if let Some(t) = c.throttled_periods_10s {
                    l.push_str(&format!("; cgroup throttled in {} of periods", pct(t)));
                }
            }
            out.push(l);
        }
        for v in &r.vcpus {
            let mut l = format!("vCPU {} thread {}: state {}", v.cpu, v.thread, v.state);
            if let Some(b) = v.busy_10s {
                l.push_str(&format!(", ran {} of the last 10 s", pct(b)));
            }
            if let Some(w) = v.wait_10s {
                l.push_str(&format!(", waited {} for a host CPU", pct(w)));
            }
            if v.busy_for_s > 1 {
                l.push_str(&format!(", busy for {} s", v.busy_for_s));
            } else if v.idle_for_s > 1 {
                l.push_str(&format!(", idle for {} s", v.idle_for_s));
            }
            out.push(l);
        }
        for d in &r.devices.block {
            if let Some(e) = &d.errors {
                out.push(format!(
                    "drive `{}`: io-status {}, {} BLOCK_IO_ERROR from {} to {} (last: {}, {}, action {})",
                    d.device,
                    d.io_status.as_deref().unwrap_or("unknown"),
                    e.count,
                    e.first.time,
                    e.last.time,
                    e.last.operation,
                    e.last.reason,
                    e.last.action
                ));
            } else if d.failed() {
                out.push(format!("drive `{}`: io-status {}", d.device, d.io_status.as_deref().unwrap_or("")));
            }
        }
        let n = &r.node;
        let mut l = format!("node: {} CPUs", n.cpus);
        if let Some([a, b, c]) = n.load {
            l.push_str(&format!(", load {a:.2} {b:.2} {c:.2}"));
        }
        if let Some(p) = n.pressure.as_ref().and_then(|p| p.cpu.as_ref()) {
            l.push_str(&format!(", CPU pressure {:.0} %", p.some.avg10));
        }
        if let Some(s) = n.steal_10s.filter(|&s| s > 0.0) {
            l.push_str(&format!(", steal {}", pct(s)));
        }
        out.push(l);
        out
    }
}

/// A share as a whole per cent: "98 %".
fn pct(r: f64) -> String {
    format!("{:.0} %", (r * 100.0).clamp(0.0, 10_000.0))
}
