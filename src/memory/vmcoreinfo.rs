//! VMCOREINFO: the text note a Linux kernel keeps for dump tools (`OSRELEASE=`,
//! `SYMBOL(prb)=`, `OFFSET(printk_info.seq)=`, ...; Linux's
//! `Documentation/admin-guide/kdump/vmcoreinfo.rst`).
//!
//! Found two ways ([`discover`]):
//! 1. QEMU's `-device vmcoreinfo` (which `prepare` adds): the guest's `qemu_fw_cfg` driver
//!    tells QEMU the note's physical address, and `dump-guest-memory` puts the note into the
//!    ELF notes of any dump. QMP does not expose the address itself, so acpimon asks for an ELF
//!    dump of one page (`begin`=0, `length`=4096), a few KiB written in milliseconds, and reads
//!    the note from it.
//! 2. Without the device or the driver: a scan of guest RAM (only RAM, as QEMU's `info mtree -f`
//!    lists it: never a device's MMIO) for the note, which the kernel keeps page-aligned
//!    (`alloc_pages_exact`): each page's first bytes are checked for the note header. It reads RAM in 4 MiB `pmemsave` pieces up to [`SCAN_MAX`] and costs about what a
//!    raw dump of the scanned RAM costs (figures in tests/memory.rs's output). A candidate is
//!    kept only if its page table maps the kernel image where its `phys_base` says (a stale note
//!    of an earlier boot fails that).
//!
//! Everything here parses guest-written bytes: sizes are capped, and malformed text is ignored
//! line by line, never a panic.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::translate::KernelMap;
use super::{le_u32, le_u64, Budget, MemError, PhysRead, QmpMemory};
use crate::trigger::qmp::Qmp;
use crate::verdict::symbols::Symbols;

/// The most VMCOREINFO text read (the kernel's is at most a page, `VMCOREINFO_BYTES`).
pub const MAX_TEXT: usize = 16 << 10;
/// The most entries kept (a kernel has a few hundred).
const MAX_ENTRIES: usize = 4096;
/// The most guest RAM a scan reads.
pub const SCAN_MAX: u64 = 4 << 30;
/// One piece of a scan.
const SCAN_PIECE: u64 = 4 << 20;
/// The note's name, with its NUL.
const NOTE_NAME: &[u8] = b"VMCOREINFO\0";

/// A parsed VMCOREINFO: its `key=value` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vmcoreinfo {
    entries: BTreeMap<String, String>,
}

impl Vmcoreinfo {
    /// Parses the note's text (at most [`MAX_TEXT`] bytes of it; lines without `=`, and
    /// anything after a NUL, are ignored).
    pub fn parse(text: &[u8]) -> Vmcoreinfo {
        let text = &text[..text.len().min(MAX_TEXT)];
        let text = text.split(|&b| b == 0).next().unwrap_or_default();
        let mut entries = BTreeMap::new();
        for line in text.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            if let Some((k, v)) = line.split_once('=') {
                if entries.len() < MAX_ENTRIES && !k.is_empty() {
                    entries.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        }
        Vmcoreinfo { entries }
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `OSRELEASE`: the kernel's release (`uname -r`).
    pub fn osrelease(&self) -> Option<&str> {
        self.get("OSRELEASE")
    }

    /// `PAGESIZE`.
    pub fn page_size(&self) -> Option<u64> {
        self.get("PAGESIZE")?.parse().ok()
    }

    /// `SYMBOL(name)`: an address, in hex.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        hex(self.get(&format!("SYMBOL({name})"))?)
    }

    /// `OFFSET(struct.field)`: decimal.
    pub fn offset(&self, name: &str) -> Option<u64> {
        self.get(&format!("OFFSET({name})"))?.parse().ok()
    }

    /// `SIZE(struct)`: decimal.
    pub fn size(&self, name: &str) -> Option<u64> {
        self.get(&format!("SIZE({name})"))?.parse().ok()
    }

    /// `NUMBER(name)`: decimal, signed.
    pub fn number(&self, name: &str) -> Option<i64> {
        self.get(&format!("NUMBER({name})"))?.parse().ok()
    }

    /// `KERNELOFFSET`: KASLR's offset, in hex.
    pub fn kernel_offset(&self) -> Option<u64> {
        hex(self.get("KERNELOFFSET")?)
    }
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The VMCOREINFO of one boot, kept by the caller: [`VmcoreinfoCache::get`] answers only for
/// the same boot key (e.g. QEMU's pid with the region's boot count), so a reboot, whose KASLR
/// offsets differ, reads it again. Beside it, the kernel's symbols read from its kallsyms
/// ([`super::kallsyms`]) for the same boot, or why they cannot be.
#[derive(Clone, Debug, Default)]
pub struct VmcoreinfoCache {
    entry: Option<(u64, Arc<Vmcoreinfo>)>,
    symbols: Option<(u64, GuestSymbols)>,
}

/// The guest kernel's symbols, or why there are none (an older kernel: the message says what to do).
pub type GuestSymbols = Result<Arc<Symbols>, String>;

impl VmcoreinfoCache {
    pub fn get(&self, boot: u64) -> Option<Arc<Vmcoreinfo>> {
        self.entry.as_ref().filter(|(k, _)| *k == boot).map(|(_, v)| v.clone())
    }

    pub fn insert(&mut self, boot: u64, info: Vmcoreinfo) -> Arc<Vmcoreinfo> {
        let info = Arc::new(info);
        self.entry = Some((boot, info.clone()));
        // Symbols of another boot, or of a VMCOREINFO found again, are not this one's.
        self.symbols = None;
        info
    }

    /// The symbols of `boot`, when read.
    pub fn symbols(&self, boot: u64) -> Option<GuestSymbols> {
        self.symbols.as_ref().filter(|(k, _)| *k == boot).map(|(_, s)| s.clone())
    }

    pub fn insert_symbols(&mut self, boot: u64, symbols: GuestSymbols) {
        self.symbols = Some((boot, symbols));
    }
}

/// One ELF note `namesz, descsz, type, name, desc` at the start of `b`: its name, its desc and
/// its padded total length, `None` if it does not fit in `b`.
pub(crate) fn elf_note(b: &[u8]) -> Option<(&[u8], &[u8], usize)> {
    let namesz = le_u32(b, 0)? as usize;
    let descsz = le_u32(b, 4)? as usize;
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    let name_at = 12usize;
    let desc_at = name_at.checked_add(pad(namesz)?)?;
    let end = desc_at.checked_add(pad(descsz)?)?;
    let name = b.get(name_at..name_at + namesz)?;
    let desc = b.get(desc_at..desc_at.checked_add(descsz)?)?;
    Some((name, desc, end.min(b.len())))
}

/// The VMCOREINFO note's text in an ELF core file's PT_NOTE segments, `None` if absent or the
/// file is malformed.
pub fn from_elf(file: &[u8]) -> Option<Vmcoreinfo> {
    if file.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let phoff = le_u64(file, 0x20)? as usize;
    let phentsize = usize::from(super::le_u16(file, 0x36)?);
    let phnum = usize::from(super::le_u16(file, 0x38)?);
    if phentsize < 0x38 {
        return None;
    }
    for i in 0..phnum.min(256) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if le_u32(file, ph)? != 4 {
            continue; // not PT_NOTE
        }
        let off = le_u64(file, ph.checked_add(8)?)? as usize;
        let size = le_u64(file, ph.checked_add(0x20)?)? as usize;
        let Some(mut notes) = file.get(off..off.saturating_add(size).min(file.len())) else { continue };
        // Each note is at least 12 bytes, so this ends.
        while let Some((name, desc, len)) = elf_note(notes) {
            if name == NOTE_NAME {
                return Some(Vmcoreinfo::parse(desc));
            }
            notes = &notes[len.max(12).min(notes.len())..];
        }
    }
    None
}

/// How VMCOREINFO was found, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The `vmcoreinfo` device's note, in a one-page ELF dump.
    Device,
    /// A scan of guest RAM.
    Scan { scanned: u64 },
}

/// Finds the running kernel's VMCOREINFO: the device's note if the guest published it, else a
/// scan of at most `scan_max` bytes of RAM. `dir` is the VM's directory (QEMU writes its
/// temporary files there); `time` bounds the whole search.
pub async fn discover(
    qmp: &Qmp,
    dir: &Path,
    time: Duration,
    scan_max: u64,
) -> Result<(Vmcoreinfo, Found), MemError> {
    let budget = Budget::new(scan_max.saturating_add(1 << 20), time);
    // Through libvirt no dump may be sent (Qmp::libvirt_managed): the scan finds the note.
    if !qmp.libvirt_managed {
        match from_device(qmp, dir, &budget).await {
            Ok(Some(v)) => return Ok((v, Found::Device)),
            Ok(None) => {}
            // E.g. another dump in progress: the scan does not need the dump.
            Err(e) => tracing::debug!("no VMCOREINFO from a one-page dump, scanning RAM: {e}"),
        }
    }
    let mut mem = QmpMemory::new(qmp, dir, budget);
    scan(qmp, &mut mem, scan_max).await
}

/// Only the scan of [`discover`] (what a guest without the device or the driver costs).
pub async fn scan_ram(
    qmp: &Qmp,
    dir: &Path,
    time: Duration,
    scan_max: u64,
) -> Result<(Vmcoreinfo, Found), MemError> {
    let mut mem = QmpMemory::new(qmp, dir, Budget::new(scan_max.saturating_add(1 << 20), time));
    scan(qmp, &mut mem, scan_max).await
}

/// `dump-guest-memory` of one page as ELF, for the note QEMU adds when the guest published it.
async fn from_device(qmp: &Qmp, dir: &Path, budget: &Budget) -> Result<Option<Vmcoreinfo>, MemError> {
    // Unique in the process: the log's follower and a bundle's step may look at once.
    static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".vmcoreinfo-{}-{n}.elf", std::process::id()));
    let Some(name) = path.to_str() else { return Err(MemError::NotUtf8(dir.into())) };
    // Whatever has the name (a stale file, a planted link) goes: QEMU follows links.
    let _ = tokio::fs::remove_file(&path).await;
    let dump = qapi::qmp::dump_guest_memory {
        paging: false,
        protocol: format!("file:{name}"),
        detach: Some(false),
        format: Some(qapi::qmp::DumpGuestMemoryFormat::elf),
        begin: Some(0),
        length: Some(4096),
    };
    // QEMU stops the vCPUs for the dump and resumes them before it answers: not the VM's news.
    let own = qmp.own_pause();
    let done = qmp.execute_within(dump, budget.remaining()).await;
    drop(own);
    let file = match done {
        Ok(_) => crate::util::fs::read_capped(&path, 1 << 20).map_err(|source| MemError::Io {
            what: "cannot read QEMU's dump",
            path: path.clone(),
            source,
        }),
        Err(error) => Err(MemError::Qmp { command: "dump-guest-memory", error }),
    };
    let _ = tokio::fs::remove_file(&path).await;
    Ok(from_elf(&file?).filter(|v| v.osrelease().is_some()))
}

/// Whether `b` (a page's first bytes) starts the kernel's VMCOREINFO note.
fn note_at(b: &[u8]) -> bool {
    le_u32(b, 0) == Some(NOTE_NAME.len() as u32)
        && le_u32(b, 8) == Some(0)
        && b.get(12..12 + NOTE_NAME.len()) == Some(NOTE_NAME)
        && b.get(24..34) == Some(b"OSRELEASE=")
}

/// Guest RAM's ranges `[start, end)`, from QEMU's flat view of the system address space (HMP
/// `info mtree -f`: its `ram` regions). Only RAM is scanned: reading a device's MMIO could
/// disturb it. At most 256 ranges.
pub fn ram_ranges(mtree: &str) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut in_memory = false;
    for line in mtree.lines() {
        if line.starts_with("FlatView") {
            if !ranges.is_empty() {
                break;
            }
            in_memory = false;
        } else if line.trim_start().starts_with("AS \"memory\"") {
            in_memory = true;
        } else if in_memory {
            // "  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000"
            let Some((span, rest)) = line.trim_start().split_once(' ') else { continue };
            if !rest.starts_with("(prio ") || !rest.contains(", ram):") {
                continue;
            }
            let Some((a, b)) = span.split_once('-') else { continue };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
            if a <= b && ranges.len() < 256 {
                ranges.push((a, b.saturating_add(1)));
            }
        }
    }
    ranges
}

/// Scans guest RAM page by page, range by range, at most `scan_max` bytes.
async fn scan(qmp: &Qmp, mem: &mut QmpMemory<'_>, scan_max: u64) -> Result<(Vmcoreinfo, Found), MemError> {
    let remaining = PhysRead::budget(mem).remaining();
    let mtree = qmp
        .hmp_within("info mtree -f", None, remaining)
        .await
        .map_err(|error| MemError::Qmp { command: "human-monitor-command info mtree -f", error })?;
    scan_ranges(mem, &ram_ranges(&mtree), scan_max).await
}

/// Scans `ranges` of guest-physical memory for the note, page by page, at most `scan_max` bytes.
pub async fn scan_ranges<M: PhysRead>(
    mem: &mut M,
    ranges: &[(u64, u64)],
    scan_max: u64,
) -> Result<(Vmcoreinfo, Found), MemError> {
    let mut scanned = 0u64;
    for &(start, end) in ranges {
        // Page-aligned: the note starts a page.
        let mut at = start.next_multiple_of(4096);
        while at < end && scanned < scan_max {
            let n = SCAN_PIECE.min(end - at).min(scan_max - scanned);
            let piece = mem.read_once(at, n as usize).await?;
            scanned += n;
            for off in (0..piece.len()).step_by(4096) {
                if !note_at(&piece[off..]) {
                    continue;
                }
                let Some(descsz) = le_u32(&piece, off + 4) else { continue };
                let desc_len = (descsz as usize).min(MAX_TEXT);
                let desc_at = at + off as u64 + 24;
                let Ok(text) = mem.read_phys(desc_at, desc_len).await else { continue };
                let info = Vmcoreinfo::parse(&text);
                if verified(mem, &info).await {
                    return Ok((info, Found::Scan { scanned }));
                }
            }
            at += n;
        }
    }
    Err(MemError::NoVmcoreinfo { scanned_mib: scanned >> 20 })
}

/// A note of this boot maps the kernel image, through its own page table, where its
/// `phys_base` puts it.
async fn verified<M: PhysRead>(mem: &mut M, info: &Vmcoreinfo) -> bool {
    let Ok(map) = KernelMap::from_vmcoreinfo(info) else { return false };
    let Some(top) = info.symbol("init_top_pgt") else { return false };
    matches!(map.walk(mem, top).await, Ok(p) if Some(p) == map.image_phys(top))
}
