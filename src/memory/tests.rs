use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};

use super::translate::START_KERNEL_MAP;
use super::*;

/// Guest-physical memory in a vector; reads past it are zeros, as QEMU gives unassigned memory.
struct VecMemory {
    ram: Vec<u8>,
    budget: Budget,
}

impl VecMemory {
    fn new(ram: Vec<u8>, max_bytes: u64) -> VecMemory {
        VecMemory { ram, budget: Budget::new(max_bytes, Duration::from_secs(30)) }
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        self.ram[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

impl PhysRead for VecMemory {
    async fn read_phys(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, MemError> {
        {
            self.budget.check_call(len as u64)?;
            self.budget.charge(len as u64)?;
            let mut out = vec![0; len];
            for (i, b) in out.iter_mut().enumerate() {
                if let Some(&v) =
                    usize::try_from(addr.wrapping_add(i as u64)).ok().and_then(|a| self.ram.get(a))
                {
                    *b = v;
                }
            }
            Ok(out)
        }
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
}

const PHYS_BASE: u64 = 0x10_0000;

/// Kernel-image address of physical `p`.
fn image(p: u64) -> u64 {
    p - PHYS_BASE + START_KERNEL_MAP
}

/// A VMCOREINFO with 6.1's printk layout (its numbers, as the bookworm kernel prints them).
fn vmcoreinfo_text(prb: u64, pgt: u64) -> String {
    format!(
        "OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(init_top_pgt)={pgt:x}\nNUMBER(phys_base)={PHYS_BASE}\n\
         NUMBER(pgtable_l5_enabled)=0\nKERNELOFFSET=0\nSYMBOL(prb)={prb:x}\nSIZE(printk_ringbuffer)=80\n\
         OFFSET(printk_ringbuffer.desc_ring)=0\nOFFSET(printk_ringbuffer.text_data_ring)=48\n\
         OFFSET(printk_ringbuffer.fail)=72\nSIZE(prb_desc_ring)=48\nOFFSET(prb_desc_ring.count_bits)=0\n\
         OFFSET(prb_desc_ring.descs)=8\nOFFSET(prb_desc_ring.infos)=16\nOFFSET(prb_desc_ring.head_id)=24\n\
         OFFSET(prb_desc_ring.tail_id)=32\nSIZE(prb_desc)=24\nOFFSET(prb_desc.state_var)=0\n\
         OFFSET(prb_desc.text_blk_lpos)=8\nSIZE(prb_data_blk_lpos)=16\nOFFSET(prb_data_blk_lpos.begin)=0\n\
         OFFSET(prb_data_blk_lpos.next)=8\nSIZE(printk_info)=88\nOFFSET(printk_info.seq)=0\n\
         OFFSET(printk_info.ts_nsec)=8\nOFFSET(printk_info.text_len)=16\nOFFSET(printk_info.caller_id)=20\n\
         OFFSET(printk_info.dev_info)=24\nSIZE(prb_data_ring)=24\nOFFSET(prb_data_ring.size_bits)=0\n\
         OFFSET(prb_data_ring.data)=8\nOFFSET(prb_data_ring.head_lpos)=16\nOFFSET(prb_data_ring.tail_lpos)=24\n\
         SIZE(atomic_long_t)=8\nOFFSET(atomic_long_t.counter)=0\n"
    )
}

/// A guest whose ring holds `texts` (16 descriptors, a 512-byte text ring, wrapped once), laid
/// out in the kernel image; returns the memory and its VMCOREINFO.
fn guest(texts: &[&str]) -> (VecMemory, Vmcoreinfo) {
    let mut m = VecMemory::new(vec![0; 4 << 20], 1 << 30);
    let (prb_ptr, rb, descs, infos, data) =
        (0x20_0000u64, 0x20_0100u64, 0x20_1000u64, 0x20_2000u64, 0x20_4000u64);
    let (count_bits, size_bits) = (4u32, 9u32);
    m.put(prb_ptr, &image(rb).to_le_bytes());
    let mut ring = vec![0u8; 80];
    ring[0..4].copy_from_slice(&count_bits.to_le_bytes());
    ring[8..16].copy_from_slice(&image(descs).to_le_bytes());
    ring[16..24].copy_from_slice(&image(infos).to_le_bytes());
    ring[48..52].copy_from_slice(&size_bits.to_le_bytes());
    ring[56..64].copy_from_slice(&image(data).to_le_bytes());
    // Ids start past one wrap of the descriptors, and the text position past one of the ring.
    let first_id = 16u64 + 3;
    let mut lpos = 512u64 + 440;
    for (i, t) in texts.iter().enumerate() {
        let id = first_id + i as u64;
        let idx = id & 15;
        let len = (8 + t.len() as u64 + 7) & !7;
        // A block that would reach the ring's end starts at the next wrap's beginning.
        let begin = lpos;
        let (start, next) =
            if (lpos & 511) + len >= 512 { (0, (lpos | 511) + 1 + len) } else { (lpos & 511, lpos + len) };
        let d = descs + idx * 24;
        m.put(d, &(id | (2 << 62)).to_le_bytes());
        m.put(d + 8, &begin.to_le_bytes());
        m.put(d + 16, &next.to_le_bytes());
        let inf = infos + idx * 88;
        m.put(inf, &(100 + i as u64).to_le_bytes());
        m.put(inf + 8, &(1_234_567_890 * (i as u64 + 1)).to_le_bytes());
        m.put(inf + 16, &(t.len() as u16).to_le_bytes());
        m.put(inf + 18, &[0, 6 << 5]);
        m.put(inf + 20, &7u32.to_le_bytes());
        m.put(data + start, &id.to_le_bytes());
        m.put(data + start + 8, t.as_bytes());
        lpos = next;
    }
    ring[24..32].copy_from_slice(&(first_id + texts.len() as u64 - 1).to_le_bytes());
    ring[32..40].copy_from_slice(&first_id.to_le_bytes());
    m.put(rb, &ring);
    let info = Vmcoreinfo::parse(vmcoreinfo_text(image(prb_ptr), image(0x30_0000)).as_bytes());
    (m, info)
}

#[test]
fn a_ring_decodes_in_order_with_wrapped_blocks() {
    let texts =
        ["Linux version 6.1.0", "second line\nand its continuation", "", "x".repeat(200).leak(), "last"];
    let (mut m, info) = guest(&texts);
    let map = KernelMap::from_vmcoreinfo(&info).unwrap();
    assert_eq!(map.pgd, 0x30_0000);
    let log = block_on(read_kernel_log(&mut m, &info, &map, 1000)).unwrap();
    assert_eq!(log.skipped, 0);
    let got: Vec<&str> = log.records.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(got, texts);
    let r = &log.records[1];
    assert_eq!((r.seq, r.ts_nsec, r.level, r.facility, r.caller_id), (101, 2_469_135_780, 6, 0, 7));
    assert_eq!(r.console_lines(), ["[    2.469135] second line", "[    2.469135] and its continuation"]);
    // The newest N only.
    let log = block_on(read_kernel_log(&mut m, &info, &map, 2)).unwrap();
    assert_eq!((log.records.len(), log.dropped, log.records[1].text.as_str()), (2, 3, "last"));
}

#[test]
fn a_descriptor_being_written_or_overwritten_is_skipped() {
    let (mut m, info) = guest(&["one", "two", "three"]);
    // "two" (id 20, index 4): reserved, not committed.
    m.put(0x20_1000 + 4 * 24, &20u64.to_le_bytes());
    // "three" (text at 472): its text block now carries another id.
    m.put(0x20_4000 + 472, &99u64.to_le_bytes());
    let map = KernelMap::from_vmcoreinfo(&info).unwrap();
    let log = block_on(read_kernel_log(&mut m, &info, &map, 100)).unwrap();
    assert_eq!(log.records.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["one"]);
    assert_eq!(log.skipped, 2);
}

#[test]
fn page_walks_follow_4k_2m_and_1g_pages_and_stop_at_holes() {
    let mut m = VecMemory::new(vec![0; 1 << 20], 1 << 30);
    let pgd = 0x1000u64;
    let map = KernelMap { phys_base: 0, pgd, five_level: false, kernel_offset: 0 };
    let v4k = 0xffff_8880_0012_3456u64;
    let idx = |v: u64, s: u32| (v >> s) & 0x1ff;
    m.put(pgd + idx(v4k, 39) * 8, &(0x2000u64 | 0x63).to_le_bytes());
    m.put(0x2000 + idx(v4k, 30) * 8, &(0x3000u64 | 0x63).to_le_bytes());
    m.put(0x3000 + idx(v4k, 21) * 8, &(0x4000u64 | 0x63).to_le_bytes());
    m.put(0x4000 + idx(v4k, 12) * 8, &(0x8000_0000_0007_7000u64 | 0x63).to_le_bytes());
    assert_eq!(block_on(map.walk(&mut m, v4k)).unwrap(), 0x7_7456);
    // A 2 MiB page (PAT bit 12 set, which is not address).
    let v2m = 0xffff_8880_4012_3456u64;
    m.put(0x2000 + idx(v2m, 30) * 8, &(0x5000u64 | 0x63).to_le_bytes());
    m.put(0x5000 + idx(v2m, 21) * 8, &(0x4020_1000u64 | 0xe3).to_le_bytes());
    assert_eq!(block_on(map.walk(&mut m, v2m)).unwrap(), 0x4032_3456);
    // A 1 GiB page.
    let v1g = 0xffff_8881_0012_3456u64;
    m.put(0x2000 + idx(v1g, 30) * 8, &(0x1_4000_0000u64 | 0xe3).to_le_bytes());
    assert_eq!(block_on(map.walk(&mut m, v1g)).unwrap(), 0x1_4012_3456);
    // Not present.
    assert!(matches!(block_on(map.walk(&mut m, 0xffff_c900_0000_0000)), Err(MemError::NotMapped(_))));
    // Reading across pages maps each one.
    m.put(0x4000 + (idx(v4k, 12) + 1) * 8, &(0x9000u64 | 0x63).to_le_bytes());
    m.put(0x7_7ffe, b"ab");
    m.put(0x9000, b"cd");
    let page_end = (v4k | 0xfff) - 1;
    assert_eq!(block_on(map.read_virt(&mut m, page_end, 4)).unwrap(), b"abcd");
}

#[test]
fn vmcoreinfo_parses_and_survives_hostile_text() {
    let v = Vmcoreinfo::parse(b"OSRELEASE=6.1.0-28-amd64\nPAGESIZE=4096\nSYMBOL(prb)=ffffffff82a1b2c0\nNUMBER(phys_base)=-2\n\0junk=1");
    assert_eq!(v.osrelease(), Some("6.1.0-28-amd64"));
    assert_eq!(v.page_size(), Some(4096));
    assert_eq!(v.symbol("prb"), Some(0xffffffff82a1b2c0));
    assert_eq!(v.number("phys_base"), Some(-2));
    assert_eq!(v.get("junk"), None, "text after the NUL is not the note's");
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for _ in 0..500 {
        let n = rng.random_range(0..40_000);
        let mut b = vec![0u8; n];
        rng.fill_bytes(&mut b);
        for x in b.iter_mut() {
            // mostly printable, with the separators
            if *x % 5 == 0 {
                *x = b"=\n()"[usize::from(*x) % 4];
            }
        }
        let v = Vmcoreinfo::parse(&b);
        assert!(v.len() <= 4096);
        let _ = (v.symbol("prb"), v.offset("x.y"), v.number("phys_base"), v.kernel_offset());
        let _ = vmcoreinfo::from_elf(&b);
    }
}

#[test]
fn elf_notes_yield_the_vmcoreinfo_note() {
    // An ELF64 header, one PT_NOTE program header, a CORE note then VMCOREINFO.
    let mut f = vec![0u8; 64 + 56];
    f[..5].copy_from_slice(b"\x7fELF\x02");
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let note = |name: &[u8], desc: &[u8]| {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend((desc.len() as u32).to_le_bytes());
        n.extend(0u32.to_le_bytes());
        n.extend(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    };
    let mut notes = note(b"CORE\0", &[1; 7]);
    notes.extend(note(b"VMCOREINFO\0", b"OSRELEASE=6.12.9\nPAGESIZE=4096\n"));
    f[64..68].copy_from_slice(&4u32.to_le_bytes());
    f[64 + 8..64 + 16].copy_from_slice(&(120u64).to_le_bytes());
    f[64 + 0x20..64 + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
    f.extend(&notes);
    assert_eq!(vmcoreinfo::from_elf(&f).unwrap().osrelease(), Some("6.12.9"));
    // Truncated anywhere: no note, no panic.
    for cut in 0..f.len() - 1 {
        let _ = vmcoreinfo::from_elf(&f[..cut]);
    }
}

/// Random bytes over the ring's arrays (and, half the time, over its header): the reader ends,
/// never panics, and stays within its budget.
#[test]
fn corrupt_rings_never_panic_loop_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..300 {
        let (mut m, info) = guest(&["a", "bb", "ccc", "dddd"]);
        let from = if round % 2 == 0 { 0x20_0100 } else { 0x20_1000 };
        for _ in 0..rng.random_range(1..200) {
            let at = rng.random_range(from..0x20_4200u64);
            let len = rng.random_range(1..16);
            let mut b = vec![0u8; len];
            rng.fill_bytes(&mut b);
            m.put(at, &b);
        }
        let max = rng.random_range(64..(1u64 << 22));
        m.budget = Budget::new(max, Duration::from_secs(30));
        let map = KernelMap::from_vmcoreinfo(&info).unwrap();
        let r = block_on(read_kernel_log(&mut m, &info, &map, 100));
        assert!(m.budget.used() <= max, "round {round}: read {} of {max}", m.budget.used());
        if let Ok(log) = r {
            assert!(log.records.len() as u64 + log.skipped <= log.ring_records);
        }
    }
}

#[test]
fn the_budget_refuses_big_reads_and_overspending() {
    let mut b = Budget::new(100, Duration::from_secs(5));
    b.charge(60).unwrap();
    assert!(matches!(b.charge(41), Err(MemError::BudgetSpent { used: 60, max: 100 })));
    b.charge(40).unwrap();
    assert!(matches!(b.check_call(64 << 20), Err(MemError::TooLarge { .. })));
    let mut late = Budget::new(100, Duration::ZERO);
    assert!(matches!(late.charge(1), Err(MemError::Deadline(_))));
}

#[test]
fn the_image_range_is_a_gib_under_kaslr_and_512_mib_without() {
    let v = START_KERNEL_MAP + (900 << 20);
    let kaslr = KernelMap { phys_base: 0x100_0000, pgd: 0, five_level: false, kernel_offset: 0x3900_0000 };
    assert_eq!(kaslr.image_phys(v), Some((900 << 20) + 0x100_0000));
    assert_eq!(kaslr.image_phys(START_KERNEL_MAP + (1 << 30)), None, "modules are walked");
    let fixed = KernelMap { kernel_offset: 0, ..kaslr };
    assert_eq!(fixed.image_phys(v), None);
    assert_eq!(fixed.image_phys(START_KERNEL_MAP + 0x1000), Some(0x100_1000));
    assert_eq!(fixed.image_phys(0xffff_8880_0000_0000), None);
}

#[test]
fn ram_ranges_come_from_the_system_flat_view_only() {
    let mtree = "FlatView #0\n AS \"memory\", root: system\n AS \"cpu-memory-0\", root: system\n Root memory region: system\n\
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram\n\
  00000000000c3000-00000000000e3fff (prio 0, rom): pc.ram @00000000000c3000\n\
  0000000000100000-000000007fffffff (prio 0, ram): pc.ram @0000000000100000\n\
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio\n\
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @0000000080000000\n\
\nFlatView #1\n AS \"I/O\", root: io\n  0000000000000000-0000000000000007 (prio 0, ram): not-memory\n";
    assert_eq!(
        vmcoreinfo::ram_ranges(mtree),
        [(0, 0xc3000), (0x10_0000, 0x8000_0000), (0x1_0000_0000, 0x1_4000_0000)]
    );
    assert!(vmcoreinfo::ram_ranges("garbage\n  x-y (prio 0, ram): z").is_empty());
}

#[test]
fn a_ram_file_reads_as_memory_from_address_zero_and_zeros_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ram");
    std::fs::write(&path, b"0123456789").unwrap();
    let mut m = FileMemory::open(&path, Budget::new(100, Duration::from_secs(5))).unwrap();
    assert_eq!(block_on(m.read_phys(2, 4)).unwrap(), b"2345");
    assert_eq!(block_on(m.read_phys(8, 4)).unwrap(), b"89\0\0");
    assert_eq!(block_on(m.read_phys(u64::MAX - 1, 1)).unwrap(), b"\0");
    assert!(matches!(block_on(m.read_phys(0, 200)), Err(MemError::BudgetSpent { .. })));
    // A guest whose RAM is split around the PCI hole is refused.
    std::fs::File::options().write(true).open(&path).unwrap().set_len(MAX_IDENTITY + 4096).unwrap();
    let e = FileMemory::open(&path, Budget::new(100, Duration::from_secs(5))).err().unwrap().to_string();
    assert!(e.contains("read this guest through QMP"), "{e}");
}

/// Hostile VMCOREINFO: every number of the printk layout replaced by a random one (small,
/// huge, or at the edges); the reader fails or decodes, never panics or overspends.
#[test]
fn hostile_layouts_never_panic_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xbad);
    let (base_mem, _) = guest(&["one", "two"]);
    let text = vmcoreinfo_text(image(0x20_0000), image(0x30_0000));
    for round in 0..400 {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for _ in 0..rng.random_range(1..6) {
            let i = rng.random_range(0..lines.len());
            let Some((k, _)) = lines[i].split_once('=') else { continue };
            let v: u64 = match rng.random_range(0..4) {
                0 => rng.random_range(0..64),
                1 => rng.random_range(0..1 << 20),
                2 => u64::MAX - rng.random_range(0..16),
                _ => rng.random(),
            };
            let v =
                if k.starts_with("SYMBOL") || k == "KERNELOFFSET" { format!("{v:x}") } else { v.to_string() };
            lines[i] = format!("{k}={v}");
        }
        let info = Vmcoreinfo::parse(lines.join("\n").as_bytes());
        let mut m =
            VecMemory { ram: base_mem.ram.clone(), budget: Budget::new(1 << 22, Duration::from_secs(30)) };
        let Ok(map) = KernelMap::from_vmcoreinfo(&info) else { continue };
        let _ = block_on(read_kernel_log(&mut m, &info, &map, 100));
        assert!(m.budget.used() <= 1 << 22, "round {round}");
    }
}

// --- kallsyms -------------------------------------------------------------------------------

/// Where the kernel's text starts in the kallsyms tests.
const TEXT: u64 = 0xffff_ffff_8100_0000;
/// Where the tables are, in physical memory.
const KS_NUM: u64 = 0x20_0000;
const KS_NAMES: u64 = 0x20_0100;
const KS_TOKENS: u64 = 0x24_0000;
const KS_INDEX: u64 = 0x24_8000;
const KS_OFFSETS: u64 = 0x25_0000;
const KS_BASE: u64 = 0x28_0000;

/// The multi-character tokens of the test tables (the rest are single ASCII characters).
const KS_TOKENS_MULTI: &[&str] = &["sched", "ule", "do_", "_sys_", "native_", "halt"];

/// `(address, type, name)` of the test kernel: with `percpu`, two absolute per-CPU symbols first.
fn ks_symbols(percpu: bool) -> Vec<(u64, char, String)> {
    let mut s = Vec::new();
    if percpu {
        s.push((0, 'A', "fixed_percpu_data".to_string()));
        s.push((0x8000, 'A', "irq_stack_backing_store".to_string()));
    }
    s.push((TEXT, 'T', "_text".to_string()));
    s.push((TEXT, 'T', "_stext".to_string()));
    for (i, n) in ["schedule", "do_sys_open", "native_safe_halt"].iter().enumerate() {
        s.push((TEXT + 0x100 + 0x40 * i as u64, 't', n.to_string()));
    }
    // Past the 256 of one marker, and one name longer than 127 tokens (a two-byte length).
    for i in 0..300u64 {
        s.push((TEXT + 0x1000 + 0x10 * i, 'T', format!("f_{i}")));
    }
    s.push((TEXT + 0x4000, 'T', format!("long_{}", "x".repeat(200))));
    s.push((TEXT + 0x4100, 'D', "some_data".to_string()));
    s
}

/// Token number of every token: ASCII characters are their own, multi ones from 0x80.
fn ks_encode(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = name;
    'outer: while !rest.is_empty() {
        for (i, t) in KS_TOKENS_MULTI.iter().enumerate() {
            if let Some(r) = rest.strip_prefix(t) {
                out.push(0x80 + i as u8);
                rest = r;
                continue 'outer;
            }
        }
        out.push(rest.as_bytes()[0]);
        rest = &rest[1..];
    }
    out
}

/// A guest whose kernel image holds kallsyms tables of `syms` (relative offsets, with the
/// absolute per-CPU rule when `percpu`), and its VMCOREINFO.
fn ks_guest(syms: &[(u64, char, String)], percpu: bool) -> (VecMemory, String) {
    let mut m = VecMemory::new(vec![0; 4 << 20], 1 << 30);
    m.put(KS_NUM, &(syms.len() as u32).to_le_bytes());
    let mut names = Vec::new();
    for (_, kind, name) in syms {
        let codes = ks_encode(&format!("{kind}{name}"));
        if codes.len() > 127 {
            names.push(0x80 | (codes.len() & 0x7f) as u8);
            names.push((codes.len() >> 7) as u8);
        } else {
            names.push(codes.len() as u8);
        }
        names.extend(codes);
    }
    m.put(KS_NAMES, &names);
    let (mut table, mut index) = (Vec::new(), vec![0u8; 512]);
    for i in 0..256usize {
        let token = match i {
            0x20..=0x7e => Some(vec![i as u8]),
            0x80.. => KS_TOKENS_MULTI.get(i - 0x80).map(|t| t.as_bytes().to_vec()),
            _ => None,
        };
        if let Some(t) = token {
            index[i * 2..i * 2 + 2].copy_from_slice(&(table.len() as u16).to_le_bytes());
            table.extend(t);
            table.push(0);
        }
    }
    m.put(KS_TOKENS, &table);
    m.put(KS_INDEX, &index);
    let base = syms.iter().find(|s| s.1 != 'A').unwrap().0;
    let offsets: Vec<u8> = syms
        .iter()
        .flat_map(|&(addr, kind, _)| {
            let o = if percpu && kind == 'A' {
                addr as i32
            } else if percpu {
                -1 - (addr - base) as i32
            } else {
                (addr - base) as u32 as i32
            };
            o.to_le_bytes()
        })
        .collect();
    m.put(KS_OFFSETS, &offsets);
    m.put(KS_BASE, &base.to_le_bytes());
    let info = format!(
        "OSRELEASE=6.12.0-test\nPAGESIZE=4096\nSYMBOL(init_top_pgt)={:x}\nNUMBER(phys_base)={PHYS_BASE}\n\
         KERNELOFFSET=0\nSYMBOL(_stext)={TEXT:x}\nSYMBOL(kallsyms_names)={:x}\nSYMBOL(kallsyms_num_syms)={:x}\n\
         SYMBOL(kallsyms_token_table)={:x}\nSYMBOL(kallsyms_token_index)={:x}\nSYMBOL(kallsyms_offsets)={:x}\n\
         SYMBOL(kallsyms_relative_base)={:x}\n",
        image(0x30_0000),
        image(KS_NAMES),
        image(KS_NUM),
        image(KS_TOKENS),
        image(KS_INDEX),
        image(KS_OFFSETS),
        image(KS_BASE)
    );
    (m, info)
}

fn ks_read(m: &mut VecMemory, info: &str) -> Result<Vec<kallsyms::KernelSymbol>, MemError> {
    let info = Vmcoreinfo::parse(info.as_bytes());
    let map = KernelMap::from_vmcoreinfo(&info)?;
    block_on(kallsyms::read_kallsyms(m, &info, &map, kallsyms::MAX_SYMBOLS))
}

#[test]
fn kallsyms_decode_with_both_address_rules() {
    for percpu in [false, true] {
        let syms = ks_symbols(percpu);
        let (mut m, info) = ks_guest(&syms, percpu);
        let got = ks_read(&mut m, &info).unwrap_or_else(|e| panic!("percpu {percpu}: {e}"));
        let got: Vec<_> = got.into_iter().map(|s| (s.addr, s.kind, s.name)).collect();
        assert_eq!(got, syms, "percpu {percpu}");
        // The tables, names up to the next table: not the 32 MiB cap.
        assert!(m.budget.used() < 256 << 10, "read {}", m.budget.used());
        let s = kallsyms::into_symbols(
            ks_read(&mut ks_guest(&syms, percpu).0, &info).unwrap(),
            Vec::new(),
            &Vmcoreinfo::parse(info.as_bytes()),
        );
        assert_eq!(s.source, "the guest's kallsyms (6.12.0-test)");
        assert_eq!(s.lookup(TEXT + 0x184).unwrap().to_string(), "native_safe_halt+0x4/0xe80");
        assert_eq!(s.lookup(TEXT + 0x100).unwrap().to_string(), "schedule+0x0/0x40");
        assert_eq!(s.lookup(TEXT + 0x1054).unwrap().to_string(), "f_5+0x4/0x10");
        // Data symbols are not functions.
        assert_eq!(s.lookup(0x8004), None);
    }
}

#[test]
fn kallsyms_of_an_older_kernel_name_what_is_missing() {
    let (mut m, info) = ks_guest(&ks_symbols(true), true);
    let info =
        info.replace("SYMBOL(kallsyms_names)", "SYMBOL(other)").replace("6.12.0-test", "6.1.0-57-amd64");
    let e = ks_read(&mut m, &info).unwrap_err().to_string();
    for want in ["6.1.0-57-amd64", "SYMBOL(kallsyms_names)", "Linux 6.0", "[diagnostics] symbols"] {
        assert!(e.contains(want), "{want} not in {e}");
    }
    // Tables of another boot (a stale VMCOREINFO, another KASLR offset): _stext disagrees.
    let (mut m, info) = ks_guest(&ks_symbols(true), true);
    let info =
        info.replace(&format!("SYMBOL(_stext)={TEXT:x}"), &format!("SYMBOL(_stext)={:x}", TEXT + 0x20_0000));
    let e = ks_read(&mut m, &info).unwrap_err().to_string();
    assert!(e.contains("_stext decodes to 0xffffffff81000000"), "{e}");
}

/// Random bytes over the tables (names, tokens, index, offsets, count): the decoder ends,
/// never panics, never reads past its budget, and its names stay within the kernel's limit.
#[test]
fn corrupt_kallsyms_never_panic_loop_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a11);
    let syms = ks_symbols(true);
    let (base, info) = ks_guest(&syms, true);
    let spans = [(KS_NUM, 4u64), (KS_NAMES, 4096), (KS_TOKENS, 512), (KS_INDEX, 512), (KS_OFFSETS, 1300)];
    let mut decoded = 0;
    for round in 0..400 {
        let mut m =
            VecMemory { ram: base.ram.clone(), budget: Budget::new(1 << 30, Duration::from_secs(30)) };
        for _ in 0..rng.random_range(1..40) {
            let (from, len) = spans[rng.random_range(0..spans.len())];
            let at = from + rng.random_range(0..len);
            let mut b = vec![0u8; rng.random_range(1..8)];
            rng.fill_bytes(&mut b);
            m.put(at, &b);
        }
        let max = rng.random_range(64..(1u64 << 26));
        m.budget = Budget::new(max, Duration::from_secs(30));
        if let Ok(got) = ks_read(&mut m, &info) {
            decoded += 1;
            assert!(got.len() as u32 <= kallsyms::MAX_SYMBOLS);
            assert!(got.iter().all(|s| s.name.len() < 512), "round {round}");
        }
        assert!(m.budget.used() <= max, "round {round}: read {} of {max}", m.budget.used());
    }
    // Some rounds hit only bytes the decode does not check (a name's letters): they decode.
    assert!(decoded > 0);
}

/// Hostile VMCOREINFO: the tables' addresses moved anywhere; never a panic or an overspend.
#[test]
fn hostile_kallsyms_addresses_never_panic_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a12);
    let (base, info) = ks_guest(&ks_symbols(false), false);
    for round in 0..300 {
        let mut lines: Vec<String> = info.lines().map(str::to_string).collect();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(5..lines.len());
            let k = lines[i].split_once('=').unwrap().0.to_string();
            let v: u64 = match rng.random_range(0..3) {
                0 => image(rng.random_range(PHYS_BASE..4 << 20)),
                1 => u64::MAX - rng.random_range(0..16),
                _ => rng.random(),
            };
            lines[i] = format!("{k}={v:x}");
        }
        let mut m =
            VecMemory { ram: base.ram.clone(), budget: Budget::new(1 << 24, Duration::from_secs(30)) };
        let _ = ks_read(&mut m, &lines.join("\n"));
        assert!(m.budget.used() <= 1 << 24, "round {round}");
    }
}

// --- modules' symbols ------------------------------------------------------------------------

/// A BTF blob with an int, `struct module { ... list@8, name@24, kallsyms@888 }` and
/// `struct mod_kallsyms { symtab@0, num_symtab@8, strtab@16 }` (its offsets as bitfield-style
/// members, kind_flag set).
fn btf_blob() -> Vec<u8> {
    let mut strs = vec![0u8];
    let mut name = |n: &str| {
        let at = strs.len() as u32;
        strs.extend(n.as_bytes());
        strs.push(0);
        at
    };
    let (int, module, list, mname, kallsyms) =
        (name("int"), name("module"), name("list"), name("name"), name("kallsyms"));
    let (mk, symtab, num, strtab) =
        (name("mod_kallsyms"), name("symtab"), name("num_symtab"), name("strtab"));
    let mut types = Vec::new();
    let mut put = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
    put(&[int, 1 << 24, 4, 32]);
    put(&[module, (4 << 24) | 3, 1024, list, 1, 64, mname, 1, 192, kallsyms, 1, 888 * 8]);
    put(&[mk, (1 << 31) | (4 << 24) | 3, 32, symtab, 1, 0, num, 1, 64, strtab, 1, 128]);
    let mut b = Vec::new();
    for w in [0xeb9f_u16 as u32 | (1 << 16), 24, 0, types.len() as u32, types.len() as u32, strs.len() as u32]
    {
        b.extend(w.to_le_bytes());
    }
    b.extend(types);
    b.extend(strs);
    b
}

#[test]
fn btf_gives_struct_modules_layout_and_survives_garbage() {
    let b = btf_blob();
    let want =
        modules::ModuleLayout { list: 8, name: 24, kallsyms: 888, symtab: 0, num_symtab: 8, strtab: 16 };
    assert_eq!(modules::btf_layout(&b), Ok(want));
    for cut in 0..b.len() {
        assert!(modules::btf_layout(&b[..cut]).is_err(), "cut {cut}");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xb7f);
    for _ in 0..2000 {
        let mut c = b.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..c.len());
            c[at] = rng.random();
        }
        let _ = modules::btf_layout(&c);
    }
}

/// Physical places of the module test: the BTF, the list head, two modules with their
/// mod_kallsyms, symbol and string tables.
const MOD_BTF: u64 = 0x21_0000;
const MOD_HEAD: u64 = 0x22_0000;
const MOD_A: u64 = 0x23_0000;
const MOD_B: u64 = 0x24_0000;

/// A guest with modules `a` (functions a_probe, a_exit; a data symbol) and `b` (b_fn) on its
/// list; returns it and the kernel symbols the walk starts from.
fn mod_guest() -> (VecMemory, Vec<kallsyms::KernelSymbol>) {
    let mut m = VecMemory::new(vec![0; 4 << 20], 1 << 30);
    let btf = btf_blob();
    m.put(MOD_BTF, &btf);
    let sym = |name: &str, addr: u64| kallsyms::KernelSymbol { addr, kind: 'd', name: name.into() };
    let kernel = vec![
        sym("__start_BTF", image(MOD_BTF)),
        sym("__stop_BTF", image(MOD_BTF) + btf.len() as u64),
        sym("modules", image(MOD_HEAD)),
    ];
    m.put(MOD_HEAD, &image(MOD_A + 8).to_le_bytes());
    for (at, next, name, funcs) in [
        (
            MOD_A,
            MOD_B + 8,
            "a",
            &[
                ("a_probe", 0x12u8, 0xffff_ffff_c000_0000u64, 0x40u64),
                ("a_exit", 0x02, 0xffff_ffff_c000_0040, 0x10),
                ("a_data", 0x11, 0xffff_ffff_c000_2000, 8),
            ][..],
        ),
        (MOD_B, MOD_HEAD, "b", &[("b_fn", 0x12, 0xffff_ffff_c001_0000, 0x80)][..]),
    ] {
        m.put(at + 8, &image(next).to_le_bytes());
        m.put(at + 24, name.as_bytes());
        let (ks, symtab, strtab) = (at + 0x1000, at + 0x2000, at + 0x3000);
        m.put(at + 888, &image(ks).to_le_bytes());
        m.put(ks, &image(symtab).to_le_bytes());
        m.put(ks + 8, &(funcs.len() as u32 + 1).to_le_bytes());
        m.put(ks + 16, &image(strtab).to_le_bytes());
        // Symbol 0 is ELF's null symbol.
        let mut strs = vec![0u8];
        for (i, (n, info, value, size)) in funcs.iter().enumerate() {
            let s = symtab + 24 * (i as u64 + 1);
            m.put(s, &(strs.len() as u32).to_le_bytes());
            m.put(s + 4, &[*info, 0]);
            m.put(s + 6, &1u16.to_le_bytes());
            m.put(s + 8, &value.to_le_bytes());
            m.put(s + 16, &size.to_le_bytes());
            strs.extend(n.as_bytes());
            strs.push(0);
        }
        m.put(strtab, &strs);
    }
    (m, kernel)
}

fn mod_read(
    m: &mut VecMemory,
    kernel: &[kallsyms::KernelSymbol],
) -> Result<(Vec<SymbolEntry>, usize), String> {
    let info = Vmcoreinfo::parse(
        format!(
            "SYMBOL(init_top_pgt)={:x}\nNUMBER(phys_base)={PHYS_BASE}\nKERNELOFFSET=0\n",
            image(0x30_0000)
        )
        .as_bytes(),
    );
    let map = KernelMap::from_vmcoreinfo(&info).unwrap();
    block_on(modules::read_module_symbols(m, &map, kernel))
}

use crate::verdict::symbols::SymbolEntry;

#[test]
fn modules_symbols_come_from_their_symbol_tables() {
    let (mut m, kernel) = mod_guest();
    let (syms, n) = mod_read(&mut m, &kernel).unwrap();
    assert_eq!(n, 2);
    let got: Vec<_> = syms.iter().map(|s| (s.name.as_str(), s.kind, s.size, s.module.as_deref())).collect();
    assert_eq!(
        got,
        [("a_probe", 'T', 0x40, Some("a")), ("a_exit", 't', 0x10, Some("a")), ("b_fn", 'T', 0x80, Some("b"))]
    );
    let s = crate::verdict::symbols::Symbols::from_entries(syms, "t");
    assert_eq!(s.lookup(0xffff_ffff_c000_0044).unwrap().to_string(), "a_exit+0x4/0x10 [a]");
    // A list that loops without coming back to its head (b -> a) ends too.
    m.put(MOD_B + 8, &image(MOD_A + 8).to_le_bytes());
    assert_eq!(mod_read(&mut m, &kernel).unwrap().1, 2);
    // No BTF: a message, not a guess.
    let e = mod_read(&mut m, &kernel[2..]).unwrap_err();
    assert!(e.contains("BTF"), "{e}");
}

/// Random bytes over the list, the modules, their tables and the BTF: the walk ends, never
/// panics and stays within its budget.
#[test]
fn corrupt_modules_never_panic_loop_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x40d);
    let (base, kernel) = mod_guest();
    let spans = [
        (MOD_BTF, 300u64),
        (MOD_HEAD, 8),
        (MOD_A, 1024),
        (MOD_A + 0x1000, 24),
        (MOD_A + 0x2000, 96),
        (MOD_B, 1024),
        (MOD_B + 0x3000, 16),
    ];
    for round in 0..400 {
        let mut m =
            VecMemory { ram: base.ram.clone(), budget: Budget::new(1 << 30, Duration::from_secs(30)) };
        for _ in 0..rng.random_range(1..12) {
            let (from, len) = spans[rng.random_range(0..spans.len())];
            let at = from + rng.random_range(0..len);
            let mut b = vec![0u8; rng.random_range(1..9)];
            rng.fill_bytes(&mut b);
            m.put(at, &b);
        }
        let max = rng.random_range(64..(1u64 << 24));
        m.budget = Budget::new(max, Duration::from_secs(30));
        if let Ok((syms, n)) = mod_read(&mut m, &kernel) {
            assert!(n <= modules::MAX_MODULES);
            assert!(syms.iter().all(|s| s.name.len() <= 512), "round {round}");
        }
        assert!(m.budget.used() <= max, "round {round}: read {} of {max}", m.budget.used());
    }
}

// --- following the log ----------------------------------------------------------------------

/// A ring the tests write into as the kernel does (16 descriptors, a 512-byte text ring, laid
/// out as [`guest`]'s), polled by a [`LogFollower`] in between.
struct LiveRing {
    m: VecMemory,
    info: Vmcoreinfo,
    next_id: u64,
    lpos: u64,
    /// The sequence number of the next record.
    seq: u64,
}

const LR_RB: u64 = 0x20_0100;
const LR_DESCS: u64 = 0x20_1000;
const LR_INFOS: u64 = 0x20_2000;
const LR_DATA: u64 = 0x20_4000;

impl LiveRing {
    fn new(first_seq: u64) -> LiveRing {
        let (mut m, info) = guest(&[]);
        // An empty ring, as the kernel starts it: head and tail at one reusable descriptor.
        m.put(LR_RB + 24, &18u64.to_le_bytes());
        m.put(LR_RB + 32, &18u64.to_le_bytes());
        m.put(LR_DESCS + 2 * 24, &(18u64 | (3 << 62)).to_le_bytes());
        LiveRing { m, info, next_id: 19, lpos: 512 + 440, seq: first_seq }
    }

    /// The text the test writes as record `seq`.
    fn text(seq: u64) -> String {
        format!("record {seq}")
    }

    /// Appends the next record (its text [`LiveRing::text`]), in `state` (2 finalized, 0
    /// reserved); returns its id.
    fn push(&mut self, state: u64) -> u64 {
        let (id, seq) = (self.next_id, self.seq);
        let t = LiveRing::text(seq);
        let idx = id & 15;
        let len = (8 + t.len() as u64 + 7) & !7;
        let begin = self.lpos;
        let (start, next) = if (begin & 511) + len >= 512 {
            (0, (begin | 511) + 1 + len)
        } else {
            (begin & 511, begin + len)
        };
        let d = LR_DESCS + idx * 24;
        self.m.put(d, &(id | (state << 62)).to_le_bytes());
        self.m.put(d + 8, &begin.to_le_bytes());
        self.m.put(d + 16, &next.to_le_bytes());
        let inf = LR_INFOS + idx * 88;
        self.m.put(inf, &seq.to_le_bytes());
        self.m.put(inf + 8, &(seq * 1_000_000).to_le_bytes());
        self.m.put(inf + 16, &(t.len() as u16).to_le_bytes());
        self.m.put(inf + 18, &[0, (if seq % 7 == 0 { 3 } else { 6 }) << 5]);
        self.m.put(LR_DATA + start, &id.to_le_bytes());
        self.m.put(LR_DATA + start + 8, t.as_bytes());
        self.lpos = next;
        self.next_id += 1;
        self.seq += 1;
        // The head is this id; the tail at most 15 behind (the ring's other descriptors).
        self.m.put(LR_RB + 24, &id.to_le_bytes());
        let tail =
            u64::from_le_bytes(self.m.ram[(LR_RB + 32) as usize..(LR_RB + 40) as usize].try_into().unwrap());
        self.m.put(LR_RB + 32, &tail.max(id.saturating_sub(15)).to_le_bytes());
        id
    }

    fn finalize(&mut self, id: u64) {
        self.m.put(LR_DESCS + (id & 15) * 24, &(id | (2 << 62)).to_le_bytes());
    }

    fn poll(&mut self, f: &mut LogFollower) -> NewRecords {
        self.m.budget = Budget::new(1 << 22, Duration::from_secs(30));
        block_on(f.poll_with(&mut self.m, &self.info)).unwrap()
    }
}

fn follower() -> LogFollower {
    LogFollower::new(Default::default(), 1, FollowLimits::default())
}

fn seqs(n: &NewRecords) -> Vec<u64> {
    n.records.iter().map(|r| r.seq).collect()
}

#[test]
fn a_follower_reads_only_what_is_new() {
    let mut ring = LiveRing::new(100);
    for _ in 0..5 {
        ring.push(2);
    }
    let mut f = follower();
    let first = ring.poll(&mut f);
    assert!(first.full);
    assert_eq!(seqs(&first), [100, 101, 102, 103, 104]);
    assert!(first.records.iter().all(|r| r.text == LiveRing::text(r.seq)));
    // Idle: the header alone (80 bytes).
    let idle = ring.poll(&mut f);
    assert_eq!((idle.records.len(), idle.full, idle.lost, idle.bytes), (0, false, 0, 80));
    for _ in 0..3 {
        ring.push(2);
    }
    let busy = ring.poll(&mut f);
    assert_eq!((seqs(&busy), busy.full, busy.lost), (vec![105, 106, 107], false, 0));
    // The header, three descriptors, three infos and their text: far less than the arrays.
    assert!(busy.bytes < 80 + 3 * 24 + 3 * 88 + 3 * 24 + 64, "read {} bytes", busy.bytes);
    assert_eq!(f.last_seq(), Some(107));
}

#[test]
fn a_follower_keeps_up_across_many_wraps() {
    let mut ring = LiveRing::new(0);
    let mut f = follower();
    let mut got = Vec::new();
    for round in 0..40u64 {
        for _ in 0..(round % 9) {
            ring.push(2);
        }
        let new = ring.poll(&mut f);
        // The first poll passes the empty ring's reusable descriptor.
        assert_eq!((new.lost, new.skipped), (0, u64::from(round == 0)), "round {round}");
        for r in &new.records {
            assert_eq!(r.text, LiveRing::text(r.seq));
        }
        got.extend(seqs(&new));
    }
    assert_eq!(got, (0..ring.seq).collect::<Vec<_>>(), "every record once, in order");
    assert!(ring.seq > 100, "the text ring wrapped many times");
}

#[test]
fn records_overwritten_between_polls_are_lost_not_misread() {
    let mut ring = LiveRing::new(0);
    ring.push(2);
    let mut f = follower();
    assert_eq!(seqs(&ring.poll(&mut f)), [0]);
    // 30 more than the 16 descriptors (and 512 text bytes) hold.
    for _ in 0..30 {
        ring.push(2);
    }
    let new = ring.poll(&mut f);
    assert!(new.full, "more than the ring holds: read whole");
    assert!(!new.records.is_empty());
    for r in &new.records {
        assert_eq!(r.text, LiveRing::text(r.seq), "a record is its own or absent");
    }
    assert_eq!(new.lost + new.records.len() as u64, 30, "{new:?}");
    assert_eq!(new.records.last().unwrap().seq, 30);
    // And on from there.
    ring.push(2);
    assert_eq!(seqs(&ring.poll(&mut f)), [31]);
}

#[test]
fn a_record_being_written_is_read_once_it_is_done_or_passed_after_a_while() {
    let mut ring = LiveRing::new(0);
    let mut f = follower();
    ring.push(2);
    ring.push(2);
    let writing = ring.push(0);
    ring.push(2);
    assert_eq!(seqs(&ring.poll(&mut f)), [0, 1]);
    ring.finalize(writing);
    assert_eq!(seqs(&ring.poll(&mut f)), [2, 3]);
    // One that never finishes (a CPU hung inside printk) holds the rest up only so long.
    ring.push(0);
    ring.push(2);
    for _ in 1..STALL_POLLS_FOR_TESTS {
        assert!(ring.poll(&mut f).records.is_empty());
    }
    let new = ring.poll(&mut f);
    assert_eq!((seqs(&new), new.skipped, new.lost), (vec![5], 1, 1));
}

const STALL_POLLS_FOR_TESTS: u32 = follow::STALL_POLLS;

#[test]
fn a_log_that_starts_over_is_read_from_its_start() {
    let mut ring = LiveRing::new(500);
    for _ in 0..6 {
        ring.push(2);
    }
    let mut f = follower();
    assert_eq!(ring.poll(&mut f).records.len(), 6);
    // A reboot: the same ring, written again from lower sequence numbers and ids.
    let mut again = LiveRing::new(0);
    for _ in 0..4 {
        again.push(2);
    }
    let new = again.poll(&mut f);
    assert!(new.restarted, "{new:?}");
    assert_eq!(seqs(&new), [0, 1, 2, 3]);
    // The caller sees the reboot later (a new boot key): nothing is read twice.
    f.set_boot(2);
    assert!(again.poll(&mut f).records.is_empty());
    again.push(2);
    assert_eq!(seqs(&again.poll(&mut f)), [4]);
    // A reboot whose ids land past the old ones (more than the ring ahead): still the new log.
    let mut later = LiveRing::new(0);
    later.next_id += 1000;
    later.m.put(LR_RB + 24, &(later.next_id - 1).to_le_bytes());
    later.m.put(LR_RB + 32, &(later.next_id - 1).to_le_bytes());
    for _ in 0..3 {
        later.push(2);
    }
    let new = later.poll(&mut f);
    assert!(new.restarted, "{new:?}");
    assert_eq!(seqs(&new), [0, 1, 2]);
}

/// Random bytes over the ring between polls: every poll ends, never panics, stays within its
/// budget, and what it delivers has growing sequence numbers.
#[test]
fn corrupt_rings_never_make_a_follower_panic_loop_or_overspend() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xf0110);
    for round in 0..200 {
        let mut ring = LiveRing::new(10);
        let mut f = follower();
        let mut last: Option<u64> = None;
        for step in 0..8 {
            for _ in 0..rng.random_range(0..6) {
                ring.push(if rng.random_range(0..8) == 0 { 0 } else { 2 });
            }
            let from = if round % 2 == 0 { LR_RB } else { LR_DESCS };
            for _ in 0..rng.random_range(0..40) {
                let at = rng.random_range(from..LR_DATA + 0x200);
                let mut b = vec![0u8; rng.random_range(1..16)];
                rng.fill_bytes(&mut b);
                ring.m.put(at, &b);
            }
            let max = rng.random_range(64..(1u64 << 20));
            ring.m.budget = Budget::new(max, Duration::from_secs(30));
            let r = block_on(f.poll_with(&mut ring.m, &ring.info));
            assert!(ring.m.budget.used() <= max, "round {round} step {step}");
            if let Ok(new) = r {
                if new.restarted || new.full {
                    last = None;
                }
                for s in seqs(&new) {
                    assert!(last.is_none_or(|l| s > l), "round {round} step {step}: {s} after {last:?}");
                    last = Some(s);
                }
                assert!(new.records.len() <= 16);
            } else {
                last = None;
            }
        }
    }
}
