//! The kernel log from the lockless printk ring buffer (Linux 5.10 and later): `prb` points to a
//! `printk_ringbuffer` holding a descriptor ring (`descs`, one `printk_info` per descriptor in
//! `infos`) and a text data ring. Every offset and size comes from VMCOREINFO, which
//! `log_buf_vmcoreinfo_setup` fills for dump tools; only `printk_info`'s facility and level,
//! which it does not describe, are taken from their fixed place after `text_len`.
//!
//! A descriptor's `state_var` holds its id (low bits) and its state (top two bits: reserved,
//! committed, finalized, reusable); a record is read only from a committed or finalized
//! descriptor whose id is the one expected, and only if its text block carries the same id.
//! Anything else is skipped and counted: a live guest may be writing while it is read, and a
//! corrupt one may say anything. The walk visits each descriptor at most once.

use serde::Serialize;

use super::translate::KernelMap;
use super::vmcoreinfo::Vmcoreinfo;
use super::{le_u16, le_u32, le_u64, MemError, PhysRead};

/// The largest descriptor ring read (2^20 records: a 32 MiB log buffer).
const MAX_COUNT_BITS: u32 = 20;
/// The largest text ring read (`log_buf_len` up to 32 MiB).
const MAX_SIZE_BITS: u32 = 25;
/// The id part of a descriptor's `state_var`; the top two bits are its state.
pub(super) const ID_MASK: u64 = (1 << 62) - 1;
pub(super) const STATE_COMMITTED: u64 = 1;
pub(super) const STATE_FINALIZED: u64 = 2;

/// One record of the kernel log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogRecord {
    pub seq: u64,
    /// Since boot, nanoseconds (the kernel's local clock).
    pub ts_nsec: u64,
    /// Syslog level (0 emergency ... 7 debug).
    pub level: u8,
    /// Syslog facility (0 kernel).
    pub facility: u8,
    /// The kernel's record flags (`LOG_NEWLINE` 2, `LOG_CONT` 8).
    pub flags: u8,
    /// The writing task's pid, or `0x80000000 | cpu` in interrupt context.
    pub caller_id: u32,
    /// The text as the kernel stored it (no trailing newline; a multi-line record holds `\n`).
    pub text: String,
}

impl LogRecord {
    /// `[    1.234567] ` as the kernel's console prints it.
    pub fn prefix(&self) -> String {
        format!("[{:>5}.{:06}] ", self.ts_nsec / 1_000_000_000, self.ts_nsec % 1_000_000_000 / 1000)
    }

    /// The record as the console shows it: each of its lines behind the prefix.
    pub fn console_lines(&self) -> Vec<String> {
        let prefix = self.prefix();
        self.text.split('\n').map(|l| format!("{prefix}{l}")).collect()
    }
}

/// The kernel log read once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KernelLog {
    /// By sequence number, oldest first.
    pub records: Vec<LogRecord>,
    /// Descriptors in the ring's live range that were not a readable record (being written,
    /// overwritten while read, or corrupt).
    pub skipped: u64,
    /// Records older than the `max_records` kept.
    pub dropped: u64,
    /// The ring's sizes: descriptors and text bytes.
    pub ring_records: u64,
    pub ring_text_bytes: u64,
}

/// Where the ring's fields are, from VMCOREINFO.
#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    prb: u64,
    rb_size: u64,
    desc_ring: u64,
    text_ring: u64,
    count_bits: u64,
    descs: u64,
    infos: u64,
    head_id: u64,
    tail_id: u64,
    pub(super) desc_size: u64,
    pub(super) state_var: u64,
    pub(super) text_blk_lpos: u64,
    pub(super) lpos_begin: u64,
    pub(super) lpos_next: u64,
    pub(super) info_size: u64,
    info_seq: u64,
    info_ts: u64,
    info_text_len: u64,
    info_caller_id: u64,
    size_bits: u64,
    data: u64,
    counter: u64,
}

impl Layout {
    pub(super) fn from(v: &Vmcoreinfo) -> Result<Layout, MemError> {
        let need = |key: &str, got: Option<u64>| got.ok_or_else(|| MemError::Missing(key.into()));
        let off = |name: &str| need(&format!("OFFSET({name})"), v.offset(name));
        let size = |name: &str| need(&format!("SIZE({name})"), v.size(name));
        let l = Layout {
            prb: need("SYMBOL(prb)", v.symbol("prb"))?,
            rb_size: size("printk_ringbuffer")?,
            desc_ring: off("printk_ringbuffer.desc_ring")?,
            text_ring: off("printk_ringbuffer.text_data_ring")?,
            count_bits: off("prb_desc_ring.count_bits")?,
            descs: off("prb_desc_ring.descs")?,
            infos: off("prb_desc_ring.infos")?,
            head_id: off("prb_desc_ring.head_id")?,
            tail_id: off("prb_desc_ring.tail_id")?,
            desc_size: size("prb_desc")?,
            state_var: off("prb_desc.state_var")?,
            text_blk_lpos: off("prb_desc.text_blk_lpos")?,
            lpos_begin: off("prb_data_blk_lpos.begin")?,
            lpos_next: off("prb_data_blk_lpos.next")?,
            info_size: size("printk_info")?,
            info_seq: off("printk_info.seq")?,
            info_ts: off("printk_info.ts_nsec")?,
            info_text_len: off("printk_info.text_len")?,
            info_caller_id: off("printk_info.caller_id")?,
            size_bits: off("prb_data_ring.size_bits")?,
            data: off("prb_data_ring.data")?,
            counter: v.offset("atomic_long_t.counter").unwrap_or(0),
        };
        let bad = |what: &str| Err(MemError::Corrupt(format!("VMCOREINFO's {what} is implausible")));
        if !(16..=4096).contains(&l.rb_size) {
            return bad("SIZE(printk_ringbuffer)");
        }
        if !(8..=256).contains(&l.desc_size) || !(16..=1024).contains(&l.info_size) {
            return bad("SIZE(prb_desc) or SIZE(printk_info)");
        }
        Ok(l)
    }
}

/// The ring's header: where its arrays are, how big, and its newest and oldest descriptor ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    /// Kernel virtual address of the `printk_ringbuffer`.
    pub rb_addr: u64,
    pub descs_addr: u64,
    pub infos_addr: u64,
    pub data_addr: u64,
    /// Descriptors, and text bytes (both powers of two, within the maxima).
    pub count: u64,
    pub size: u64,
    pub head: u64,
    pub tail: u64,
}

impl Header {
    /// Reads the `printk_ringbuffer` at `rb_addr` (the value of `prb`), `rb_size` bytes.
    pub(super) async fn read<M: PhysRead>(
        mem: &mut M,
        l: &Layout,
        map: &KernelMap,
        rb_addr: u64,
    ) -> Result<Header, MemError> {
        let rb = map.read_virt(mem, rb_addr, l.rb_size as usize).await?;
        Header::parse(l, rb_addr, &rb)
    }

    /// Where `prb` points.
    pub(super) async fn rb_addr<M: PhysRead>(
        mem: &mut M,
        l: &Layout,
        map: &KernelMap,
    ) -> Result<u64, MemError> {
        map.read_u64(mem, l.prb).await
    }

    /// How many bytes of header [`Header::parse`] wants.
    pub(super) fn len(l: &Layout) -> usize {
        l.rb_size as usize
    }

    pub(super) fn parse(l: &Layout, rb_addr: u64, rb: &[u8]) -> Result<Header, MemError> {
        let corrupt = |what: &str| MemError::Corrupt(format!("the printk ring buffer's {what}"));
        let field64 = |base: u64, off: u64| {
            usize::try_from(base.saturating_add(off))
                .ok()
                .and_then(|at| le_u64(rb, at))
                .ok_or_else(|| corrupt("layout"))
        };
        let field32 = |base: u64, off: u64| {
            usize::try_from(base.saturating_add(off))
                .ok()
                .and_then(|at| le_u32(rb, at))
                .ok_or_else(|| corrupt("layout"))
        };
        let count_bits = field32(l.desc_ring, l.count_bits)?;
        let size_bits = field32(l.text_ring, l.size_bits)?;
        if count_bits > MAX_COUNT_BITS || !(3..=MAX_SIZE_BITS).contains(&size_bits) {
            return Err(corrupt(&format!("sizes (2^{count_bits} records, 2^{size_bits} text bytes)")));
        }
        Ok(Header {
            rb_addr,
            descs_addr: field64(l.desc_ring, l.descs)?,
            infos_addr: field64(l.desc_ring, l.infos)?,
            head: field64(l.desc_ring, l.head_id.saturating_add(l.counter))? & ID_MASK,
            tail: field64(l.desc_ring, l.tail_id.saturating_add(l.counter))? & ID_MASK,
            data_addr: field64(l.text_ring, l.data)?,
            count: 1u64 << count_bits,
            size: 1u64 << size_bits,
        })
    }
}

/// Reads the kernel log: at most the ring's size, the last `max_records` records, within the
/// budget of `mem`.
pub async fn read_kernel_log<M: PhysRead>(
    mem: &mut M,
    info: &Vmcoreinfo,
    map: &KernelMap,
    max_records: usize,
) -> Result<KernelLog, MemError> {
    let l = Layout::from(info)?;
    let rb_addr = Header::rb_addr(mem, &l, map).await?;
    let h = Header::read(mem, &l, map, rb_addr).await?;
    let (count, size, head, tail) = (h.count, h.size, h.head, h.tail);

    // The three arrays, whole (the budget refuses them if they are too big for it).
    let descs = map.read_virt(mem, h.descs_addr, (count * l.desc_size) as usize).await?;
    let infos = map.read_virt(mem, h.infos_addr, (count * l.info_size) as usize).await?;
    let data = map.read_virt(mem, h.data_addr, size as usize).await?;

    let mut log = KernelLog { ring_records: count, ring_text_bytes: size, ..KernelLog::default() };
    // From the oldest live id to the newest, at most `count` of them.
    let live = (head.wrapping_sub(tail) & ID_MASK).min(count - 1);
    let first = head.wrapping_sub(live) & ID_MASK;
    for i in 0..=live {
        let id = first.wrapping_add(i) & ID_MASK;
        match record(&l, id, count, size, &descs, &infos, &data) {
            Some(r) => log.records.push(r),
            None => log.skipped += 1,
        }
    }
    log.records.sort_by_key(|r| r.seq);
    if log.records.len() > max_records {
        let extra = log.records.len() - max_records;
        log.dropped = extra as u64;
        log.records.drain(..extra);
    }
    Ok(log)
}

/// The record of descriptor `id`, `None` if it is not a complete record with its text.
pub(super) fn record(
    l: &Layout,
    id: u64,
    count: u64,
    size: u64,
    descs: &[u8],
    infos: &[u8],
    data: &[u8],
) -> Option<LogRecord> {
    let index = id & (count - 1);
    let desc = usize::try_from(index * l.desc_size).ok()?;
    let at = |base: usize, off: u64| base.checked_add(usize::try_from(off).ok()?);
    let state_var = le_u64(descs, at(desc, l.state_var)?)?;
    if state_var & ID_MASK != id {
        return None;
    }
    let state = state_var >> 62;
    if state != STATE_COMMITTED && state != STATE_FINALIZED {
        return None;
    }
    let lpos = at(desc, l.text_blk_lpos)?;
    let begin = le_u64(descs, at(lpos, l.lpos_begin)?)?;
    let next = le_u64(descs, at(lpos, l.lpos_next)?)?;

    let info = usize::try_from(index * l.info_size).ok()?;
    let text_len_at = at(info, l.info_text_len)?;
    let text_len = usize::from(le_u16(infos, text_len_at)?);
    let facility = *infos.get(text_len_at + 2)?;
    let flags_level = *infos.get(text_len_at + 3)?;
    let mut r = LogRecord {
        seq: le_u64(infos, at(info, l.info_seq)?)?,
        ts_nsec: le_u64(infos, at(info, l.info_ts)?)?,
        level: flags_level >> 5,
        facility,
        flags: flags_level & 0x1f,
        caller_id: le_u32(infos, at(info, l.info_caller_id)?)?,
        text: String::new(),
    };
    // Data-less records (lpos with bit 0 set: an empty line, or text that did not fit).
    if begin & 1 == 1 || next & 1 == 1 {
        return Some(r);
    }
    let wraps = |lpos: u64| lpos >> size.trailing_zeros();
    let (start, len) = if wraps(begin) == wraps(next) && begin < next {
        (begin & (size - 1), next - begin)
    } else if wraps(begin.wrapping_add(size)) == wraps(next) {
        // A block that would cross the end is stored from the ring's start.
        (0, next & (size - 1))
    } else {
        return None;
    };
    if len < 8 || start.checked_add(len)? > size {
        return None;
    }
    let start = usize::try_from(start).ok()?;
    // The block starts with its descriptor's id: another id means it was overwritten.
    if le_u64(data, start)? != id {
        return None;
    }
    let n = text_len.min(usize::try_from(len - 8).ok()?);
    r.text = String::from_utf8_lossy(data.get(start + 8..start + 8 + n)?).into_owned();
    Some(r)
}
