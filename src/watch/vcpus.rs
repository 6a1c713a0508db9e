//! The `vcpu-progress` scenario: every vCPU's registers, sampled through QMP (HMP `info
//! registers -a`), so that a vCPU the heartbeat never reaches is judged too. The ACPI GED
//! interrupt is served by one CPU: a hard lockup of another one leaves the heartbeat answering.
//!
//! A vCPU is *stuck* in a sample when it runs kernel code (CPL 0, RIP in the upper half) with
//! interrupts disabled (RFLAGS.IF, bit 9, clear) and is not halted. A healthy guest shows that
//! in a few per cent of samples, scattered; a hard-locked CPU shows it in every sample, at the
//! same place. A probe misses when some vCPU has been stuck, within one [`WINDOW`] bytes of
//! code, in this sample and the previous one; the scenario's threshold of consecutive misses
//! then asks for that many more (default: 4 samples in a row, about 3 s). README "Per-vCPU
//! liveness" has the measurements, and why soft lockups (interrupts on) are left to the
//! kernel's own report: a vCPU busy in the kernel on behalf of a healthy task looks the same
//! to a sampler.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::state::Outcome;
use crate::trigger::qmp::Qmp;
use crate::verdict::registers;

/// The span of code a stuck vCPU's samples must stay within (a spin loop, a lock's slow path).
pub const WINDOW: u64 = 4096;
/// At most this many vCPUs are read from one reply (QEMU's own limit on x86 is lower).
const MAX_VCPUS: usize = 4096;
/// Bytes of `info registers -a` read at most (about 2 KiB per vCPU).
const MAX_REPLY: usize = 8 << 20;
/// The first kernel-space address of x86-64 (canonical upper half).
const KERNEL_SPACE: u64 = 0xffff_8000_0000_0000;

/// One vCPU's state in one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSample {
    pub cpu: u32,
    pub rip: u64,
    pub rflags: u64,
    pub cpl: u8,
    pub halted: bool,
}

impl VcpuSample {
    pub fn interrupts_on(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }

    /// Running kernel code with interrupts disabled, not halted: what a hard-locked CPU shows.
    pub fn stuck(&self) -> bool {
        self.cpl == 0 && self.rip >= KERNEL_SPACE && !self.interrupts_on() && !self.halted
    }

    fn kind(&self) -> &'static str {
        match (self.halted, self.cpl) {
            (true, _) => "idle",
            (false, 3) => "user",
            _ => "kernel",
        }
    }
}

/// The vCPUs of an `info registers` reply, read by the one register parser
/// ([`crate::verdict::registers::parse`]): each `CPU#N` section's RIP (EIP outside long mode),
/// RFLAGS (EFL), CPL and HLT. A section without them is left out; so is a reply with no `CPU#`
/// header unless `cpu` names it (one vCPU's `info registers`).
pub fn parse_registers(text: &str, cpu: Option<u32>) -> Vec<VcpuSample> {
    let mut end = text.len().min(MAX_REPLY);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    let headed = text.starts_with("CPU#") || text.contains("\nCPU#");
    if !headed && cpu.is_none() {
        return Vec::new();
    }
    registers::parse(text)
        .into_iter()
        .filter_map(|r| {
            let cpu = if headed { r.cpu } else { cpu? };
            Some(VcpuSample { cpu, rip: r.rip?, rflags: r.rflags?, cpl: r.cpl?.min(3), halted: r.halted? })
        })
        .take(MAX_VCPUS)
        .collect()
}

/// A vCPU's current run of stuck samples.
#[derive(Clone, Copy, Debug)]
struct Run {
    since: Instant,
    samples: u32,
    lo: u64,
    hi: u64,
}

/// The runs of stuck samples per vCPU, across probes.
#[derive(Debug, Default)]
pub struct Tracker {
    runs: BTreeMap<u32, Run>,
}

impl Tracker {
    /// Takes one sample of every vCPU; a miss names the vCPU stuck in this sample and the
    /// previous one (the longest run), else what the vCPUs were doing.
    pub fn observe(&mut self, samples: &[VcpuSample], now: Instant, latency: Duration) -> Outcome {
        let mut runs = BTreeMap::new();
        for s in samples.iter().filter(|s| s.stuck()) {
            let run = match self.runs.get(&s.cpu) {
                Some(r) if r.hi.max(s.rip) - r.lo.min(s.rip) < WINDOW => {
                    Run { samples: r.samples + 1, lo: r.lo.min(s.rip), hi: r.hi.max(s.rip), ..*r }
                }
                _ => Run { since: now, samples: 1, lo: s.rip, hi: s.rip },
            };
            runs.insert(s.cpu, run);
        }
        self.runs = runs;
        let worst = self.runs.iter().filter(|(_, r)| r.samples >= 2).max_by_key(|(_, r)| r.samples);
        if let Some((cpu, r)) = worst {
            return Outcome {
                ok: false,
                latency: Some(latency),
                detail: format!(
                    "vCPU {cpu} has run kernel code with interrupts disabled in {} samples in a row ({:.0} s) at RIP {:#x}{}: a hard lockup",
                    r.samples,
                    now.saturating_duration_since(r.since).as_secs_f64(),
                    r.lo,
                    if r.hi > r.lo { format!("..{:#x}", r.hi) } else { String::new() },
                ),
            };
        }
        let mut kinds: BTreeMap<&str, u32> = BTreeMap::new();
        for s in samples {
            *kinds.entry(s.kind()).or_default() += 1;
        }
        let shown: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        Outcome {
            ok: true,
            latency: Some(latency),
            detail: format!(
                "{} vCPUs sampled in {:.1} ms: {}",
                samples.len(),
                latency.as_secs_f64() * 1e3,
                shown.join(", ")
            ),
        }
    }
}

/// One sample of every vCPU: `info registers -a`, or where this QEMU does not know `-a`,
/// `info registers` on each vCPU `query-cpus-fast` lists.
pub async fn sample(qmp: &Qmp, timeout: Duration) -> Result<Vec<VcpuSample>, String> {
    let (_, text) =
        crate::diagnose::all_registers(qmp, timeout).await.map_err(|(what, e)| format!("{what}: {e}"))?;
    Ok(parse_registers(&text, None))
}

#[cfg(test)]
mod tests;
