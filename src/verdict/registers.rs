//! QEMU's `info registers` text (x86_64, QEMU 5.2 to 10), read into per-vCPU values. The text
//! is the guest's state printed by QEMU: bounded here (sections, lines, digits) and parsed
//! strictly, field by field; anything unexpected is left out rather than guessed.

use std::sync::LazyLock;

use regex::Regex;

/// At most this many vCPUs are read from one dump.
pub const MAX_CPUS: usize = 1024;
/// Lines longer than this are not read (QEMU's longest is about 90 characters).
const MAX_LINE: usize = 512;

/// What one vCPU's registers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuRegs {
    /// QEMU's vCPU index (`CPU#N`).
    pub cpu: u32,
    /// `RIP` (64-bit mode) or `EIP`.
    pub rip: Option<u64>,
    pub rsp: Option<u64>,
    /// `RFL` / `EFL`: interrupts are enabled when bit 9 (IF) is set.
    pub rflags: Option<u64>,
    /// The privilege level: `CPL=`, else the low bits of the `CS` selector.
    pub cpl: Option<u8>,
    pub cr3: Option<u64>,
    /// `HLT=1`: the vCPU is halted (idle, waiting for an interrupt).
    pub halted: Option<bool>,
}

impl CpuRegs {
    /// Whether the interrupt flag is set, when RFLAGS was read.
    pub fn interrupts_enabled(&self) -> Option<bool> {
        self.rflags.map(|f| f & (1 << 9) != 0)
    }
}

/// `NAME=HEX` as QEMU prints it (`R8 =...`, `GDT=     ...` pad before or after the `=`).
static FIELD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b([A-Z][A-Z0-9]{0,5}) ?=\s{0,8}([0-9a-fA-F]{1,16})\b").unwrap());
static CPU: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^CPU#(\d{1,6})\s*$").unwrap());

/// Every `CPU#N` section of `info registers` output, in order; at most [`MAX_CPUS`]. Text before
/// the first `CPU#` line (a single vCPU's `info registers` has none) is vCPU 0's.
pub fn parse(text: &str) -> Vec<CpuRegs> {
    let mut out: Vec<CpuRegs> = Vec::new();
    let mut cur: Option<CpuRegs> = None;
    for line in text.lines() {
        if line.len() > MAX_LINE {
            continue;
        }
        if let Some(c) = CPU.captures(line.trim_end()) {
            if let Some(done) = cur.take() {
                out.push(done);
            }
            if out.len() >= MAX_CPUS {
                return out;
            }
            cur = c[1].parse().ok().map(empty);
            continue;
        }
        for f in FIELD.captures_iter(line) {
            let Ok(v) = u64::from_str_radix(&f[2], 16) else { continue };
            let regs = cur.get_or_insert_with(|| empty(0));
            match &f[1] {
                "RIP" | "EIP" => regs.rip = regs.rip.or(Some(v)),
                "RSP" | "ESP" => regs.rsp = regs.rsp.or(Some(v)),
                "RFL" | "EFL" => regs.rflags = regs.rflags.or(Some(v)),
                // CPL= is decimal, one digit.
                "CPL" if v <= 3 => regs.cpl = Some(v as u8),
                // The selector's requested privilege level is the CPL for CS.
                "CS" if regs.cpl.is_none() && f[2].len() == 4 => regs.cpl = Some((v & 3) as u8),
                "CR3" => regs.cr3 = regs.cr3.or(Some(v)),
                "HLT" if v <= 1 => regs.halted = Some(v == 1),
                _ => {}
            }
        }
    }
    if let Some(done) = cur {
        if done.rip.is_some() || !out.is_empty() || done.cpu != 0 || done.rflags.is_some() {
            out.push(done);
        }
    }
    out.truncate(MAX_CPUS);
    out
}

fn empty(cpu: u32) -> CpuRegs {
    CpuRegs { cpu, rip: None, rsp: None, rflags: None, cpl: None, cr3: None, halted: None }
}

/// Where an address lies in an x86_64 Linux guest's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// The kernel image: `0xffffffff80000000` to `0xffffffffbfffffff`, the 1 GiB a kernel built
    /// with `CONFIG_RANDOMIZE_BASE` (every major distribution's) may place it in.
    KernelText,
    /// Loadable modules: `0xffffffffc0000000` to `0xfffffffffeffffff`, above that 1 GiB (a
    /// kernel without `RANDOMIZE_BASE` starts them at `0xffffffffa0000000`, shown as kernel text
    /// here; a symbol source then names the module).
    Modules,
    /// User space (canonical lower half).
    User,
    /// Other kernel addresses: the direct map, vmalloc, the fixmap, the vsyscall page.
    OtherKernel,
    /// Not a canonical address.
    NonCanonical,
}

impl Space {
    pub fn of(addr: u64) -> Space {
        match addr {
            0..=0x0000_7fff_ffff_ffff => Space::User,
            0x0000_8000_0000_0000..=0xffff_7fff_ffff_ffff => Space::NonCanonical,
            0xffff_ffff_8000_0000..=0xffff_ffff_bfff_ffff => Space::KernelText,
            0xffff_ffff_c000_0000..=0xffff_ffff_feff_ffff => Space::Modules,
            _ => Space::OtherKernel,
        }
    }

    /// As said in a verdict: "module space".
    pub fn name(self) -> &'static str {
        match self {
            Space::KernelText => "kernel text",
            Space::Modules => "module space",
            Space::User => "user space",
            Space::OtherKernel => "kernel, outside its text",
            Space::NonCanonical => "not a canonical address",
        }
    }
}

/// Splits the `registers` step's file into its samples: the first `info registers -a`, then
/// each later one after a line starting with [`SAMPLE_MARK`].
pub fn samples(text: &str) -> Vec<Vec<CpuRegs>> {
    let mut parts = vec![String::new()];
    for line in text.lines() {
        if line.starts_with(SAMPLE_MARK) {
            if parts.len() >= 8 {
                break;
            }
            parts.push(String::new());
        } else {
            let p = parts.last_mut().expect("one part at least");
            p.push_str(line);
            p.push('\n');
        }
    }
    parts.iter().map(|p| parse(p)).filter(|v| !v.is_empty()).collect()
}

/// The line the `registers` step writes before each sample after the first.
pub const SAMPLE_MARK: &str = "=== acpimon: registers sample";

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU10: &str = include_str!("testdata/info-registers-a-qemu10.txt");
    const QEMU72: &str = include_str!("testdata/info-registers-a-qemu7.2.txt");

    #[test]
    fn reads_qemu_10() {
        let cpus = parse(QEMU10);
        assert_eq!(cpus.len(), 2, "{cpus:?}");
        let c0 = &cpus[0];
        assert_eq!(c0.cpu, 0);
        assert_eq!(c0.rip, Some(0xffffffff81a592eb));
        assert_eq!(c0.rsp, Some(0xffffffff82a03e98));
        assert_eq!(c0.rflags, Some(0x246));
        assert_eq!(c0.interrupts_enabled(), Some(true));
        assert_eq!(c0.cpl, Some(0));
        assert_eq!(c0.cr3, Some(0x2a10000));
        assert_eq!(c0.halted, Some(true));
        assert_eq!(cpus[1].cpu, 1);
        assert!(cpus[1].rip.is_some());
    }

    #[test]
    fn reads_qemu_7_2_and_5_2() {
        // The starve scenario on both: each vCPU in rt-spin's user-mode loop, interrupts on.
        for text in [QEMU72, include_str!("testdata/info-registers-a-qemu5.2.txt")] {
            let cpus = parse(text);
            assert_eq!(cpus.len(), 2, "{cpus:?}");
            for (i, c) in cpus.iter().enumerate() {
                assert_eq!(c.cpu, i as u32);
                assert!(c.rsp.is_some() && c.cr3.is_some(), "{c:?}");
                assert_eq!(
                    (c.rip, c.rflags, c.cpl, c.halted),
                    (Some(0x400099), Some(0x246), Some(3), Some(false))
                );
                assert_eq!(Space::of(c.rip.unwrap()), Space::User);
            }
        }
    }

    #[test]
    fn interrupt_flag_and_cs_fallback() {
        let text =
            "RIP=ffffffffc023604c RFL=00000086 [--S--P-]\nCS =0010 0000000000000000 ffffffff 00af9b00\n";
        let c = &parse(text)[0];
        assert_eq!(
            (c.cpu, c.rip, c.interrupts_enabled(), c.cpl),
            (0, Some(0xffffffffc023604c), Some(false), Some(0))
        );
        assert_eq!(Space::of(0xffffffffc023604c), Space::Modules);
        assert_eq!(Space::of(0xffffffff81a592eb), Space::KernelText);
        // The fixture kernel's pvpanic module (its kallsyms), and a KASLR-placed image.
        assert_eq!(Space::of(0xffffffffc0201190), Space::Modules);
        assert_eq!(Space::of(0xffffffffab00002c), Space::KernelText);
        assert_eq!(Space::of(0x400099), Space::User);
        assert_eq!(Space::of(0xffff888004a6c8c0), Space::OtherKernel);
    }

    #[test]
    fn hostile_text_is_bounded() {
        assert!(parse("").is_empty());
        assert!(parse("no registers here\n").is_empty());
        // 20 hex digits is not a register value; a huge line is skipped.
        assert_eq!(parse("RIP=123456789012345678901\n"), vec![]);
        let long = format!("RIP={}\n", "f".repeat(10_000));
        assert!(parse(&long).is_empty());
        let many: String = (0..5000).map(|i| format!("CPU#{i}\nRIP=1\n")).collect();
        assert_eq!(parse(&many).len(), MAX_CPUS);
    }

    #[test]
    fn samples_split_at_the_mark() {
        let text = format!("{QEMU10}\n{SAMPLE_MARK} 2, 300 ms later ===\n{QEMU10}");
        let s = samples(&text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], s[1]);
    }
}
