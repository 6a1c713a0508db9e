//! The kernel log followed: [`LogFollower`] reads only the records written since its last
//! poll. Per poll it reads the ring's header (one small read: its head and tail ids), and when
//! the head moved, only the new descriptors and infos and the stretch of text they point to
//! (each a single exact read), translated through page translations kept for the boot. An idle
//! guest costs one `pmemsave` of a few dozen bytes a poll; the whole ring (~700 KiB for a
//! Debian kernel) is read only on the first poll, after a reboot, or when more records came
//! than the ring holds.
//!
//! The same rules as the full read ([`super::printk`]): every descriptor is checked against
//! the id expected and its text block against its id; what fails is skipped. A record that was
//! overwritten between two polls is never misread as a new one: it is counted as lost from the
//! gap in sequence numbers. A descriptor still being written (reserved, or committed but not
//! finalized) stops the poll before it, so that it is read whole at the next one; one that
//! stays so for [`STALL_POLLS`] polls (a CPU that hung inside printk) is passed over.
//!
//! The VMCOREINFO comes from the caller's [`VmcoreinfoCache`] (shared with the `kernel-log`
//! diagnostic step, so a boot's note is found once); a read that fails on a layout that no
//! longer holds, or sequence numbers that went back (a reboot the caller's boot key did not
//! see), drops it and finds it anew. Discovery that fails is retried with a backoff, so a guest
//! without VMCOREINFO (an old kernel, early boot) is not scanned every poll.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::printk::{record, Header, Layout, ID_MASK, STATE_COMMITTED, STATE_FINALIZED};
use super::vmcoreinfo::{self, Found};
use super::{
    le_u64, Budget, FileMemory, KernelMap, LogRecord, MemError, PhysRead, QmpMemory, Vmcoreinfo,
    VmcoreinfoCache,
};
use crate::trigger::qmp::Qmp;
use crate::util::lock;

/// Polls a descriptor may stay reserved (or committed, not finalized) before it is passed over.
pub const STALL_POLLS: u32 = 3;
/// Ids further ahead of the last one read than this are a head that went back (a reboot).
const BACKWARDS: u64 = 1 << 40;

/// What one poll may cost, and how discovery is retried.
#[derive(Clone, Debug)]
pub struct FollowLimits {
    /// One poll, VMCOREINFO's discovery included.
    pub time: Duration,
    /// Bytes read from guest memory in one poll.
    pub max_bytes: u64,
    /// The most RAM scanned for VMCOREINFO when the guest did not publish it.
    pub scan_max: u64,
    /// After a failed discovery, the first wait before the next; it doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Only this long after following a boot began is RAM scanned for VMCOREINFO; before, only
    /// the vmcoreinfo device's one-page dump is tried. A booting guest publishes it through the
    /// device within seconds, and a scan reads up to `scan_max` of RAM: the service must not
    /// scan every VM it attaches to while their guests boot.
    pub scan_after: Duration,
}

impl Default for FollowLimits {
    fn default() -> Self {
        FollowLimits {
            time: Duration::from_secs(10),
            max_bytes: 64 << 20,
            scan_max: vmcoreinfo::SCAN_MAX,
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            scan_after: Duration::ZERO,
        }
    }
}

/// What one poll brought.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NewRecords {
    /// The records written since the last poll, oldest first.
    pub records: Vec<LogRecord>,
    /// Records that were written and overwritten between two polls (a gap in sequence
    /// numbers), or whose descriptor was unreadable.
    pub lost: u64,
    /// Descriptors in the new range that were not a readable record.
    pub skipped: u64,
    /// The whole live ring was read: the first poll, after a reboot, or more new records than
    /// the ring holds.
    pub full: bool,
    /// The log started over (sequence numbers went back: the guest rebooted); `records` are
    /// the new boot's.
    pub restarted: bool,
    /// `device`, `scan` or `cache`: how VMCOREINFO was had for this poll.
    pub vmcoreinfo: &'static str,
    /// Bytes read from guest memory (page-table walks included) and `pmemsave` round trips.
    pub bytes: u64,
    pub pmemsave_calls: u64,
    pub elapsed_us: u64,
}

/// Where the reader is in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    /// The last descriptor id read (or passed over).
    id: u64,
    /// The highest sequence number delivered.
    seq: Option<u64>,
}

/// One boot's ring: its layout, where it is, and the page translations of its arrays.
struct Ring {
    layout: Layout,
    map: KernelMap,
    /// The ring's header of the first poll: its addresses and sizes do not change in a boot.
    first: Header,
    pages: HashMap<u64, u64>,
}

/// The kernel log, followed from guest memory (see the module's documentation).
pub struct LogFollower {
    cache: Arc<Mutex<VmcoreinfoCache>>,
    boot: u64,
    limits: FollowLimits,
    ring: Option<Ring>,
    at: Option<Position>,
    /// A descriptor still being written where the last poll stopped, and for how many polls.
    stalled: Option<(u64, u32)>,
    /// After a failed discovery: when to try again, and the wait after that.
    retry: Option<(Instant, Duration)>,
    /// When following this boot began (for [`FollowLimits::scan_after`]).
    since: Instant,
}

impl LogFollower {
    /// Follows the guest of `boot` (the caller's key for one boot), its VMCOREINFO kept in `cache`.
    pub fn new(cache: Arc<Mutex<VmcoreinfoCache>>, boot: u64, limits: FollowLimits) -> LogFollower {
        LogFollower {
            cache,
            boot,
            limits,
            ring: None,
            at: None,
            stalled: None,
            retry: None,
            since: Instant::now(),
        }
    }

    /// The guest booted again (the caller's key moved on): the next poll finds the new boot's
    /// VMCOREINFO. Where it was in the log stays: a follower that already read the new boot's
    /// records (it saw the sequence numbers go back before the caller saw the reboot) does not
    /// read them again, and one that did not sees them go back.
    pub fn set_boot(&mut self, boot: u64) {
        if boot != self.boot {
            self.boot = boot;
            self.ring = None;
            self.stalled = None;
            self.retry = None;
            self.since = Instant::now();
        }
    }

    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// Forgets where it was: the next poll reads the whole live ring.
    pub fn reset(&mut self) {
        self.ring = None;
        self.at = None;
        self.stalled = None;
        self.retry = None;
    }

    /// The sequence number of the last record delivered.
    pub fn last_seq(&self) -> Option<u64> {
        self.at.and_then(|p| p.seq)
    }

    /// What a discovery may scan now: nothing until `scan_after` has passed.
    fn scan_max(&self, now: Instant) -> u64 {
        if now.saturating_duration_since(self.since) >= self.limits.scan_after {
            self.limits.scan_max
        } else {
            0
        }
    }

    /// Whether a failed discovery is still waiting for its retry (a poll now would read nothing).
    pub fn backing_off(&self) -> bool {
        self.ring.is_none() && self.retry.is_some_and(|(at, _)| Instant::now() < at)
    }

    /// The records written since the last poll, read through `qmp` (QEMU's temporary files go
    /// to `dir`, the VM's directory).
    pub async fn poll(&mut self, qmp: &Qmp, dir: &Path) -> Result<NewRecords, MemError> {
        let start = Instant::now();
        let how = match self.ring {
            Some(_) => "cache",
            None => {
                self.wait_retry()?;
                let time = self.limits.time;
                let cached = lock(&self.cache).get(self.boot);
                let (info, how) = match cached {
                    Some(info) => (info, "cache"),
                    None => match vmcoreinfo::discover(qmp, dir, time, self.scan_max(start)).await {
                        Ok((info, found)) => {
                            let how = if matches!(found, Found::Device) { "device" } else { "scan" };
                            (lock(&self.cache).insert(self.boot, info), how)
                        }
                        Err(e) => return Err(self.discovery_failed(e)),
                    },
                };
                self.set_ring(&info)?;
                how
            }
        };
        let left = self.limits.time.saturating_sub(start.elapsed());
        let mut mem = QmpMemory::new(qmp, dir, Budget::new(self.limits.max_bytes, left));
        let r = self.read_new(&mut mem).await;
        let calls = mem.calls();
        let mut new = self.settle(r)?;
        new.vmcoreinfo = how;
        new.bytes = mem.budget().used();
        new.pmemsave_calls = calls;
        new.elapsed_us = start.elapsed().as_micros() as u64;
        Ok(new)
    }

    /// [`LogFollower::poll`] from the file backing guest RAM (VMCOREINFO by a scan of it).
    pub async fn poll_file(&mut self, ram: &Path) -> Result<NewRecords, MemError> {
        let start = Instant::now();
        let how = match self.ring {
            Some(_) => "cache",
            None => {
                self.wait_retry()?;
                let cached = lock(&self.cache).get(self.boot);
                let (info, how) = match cached {
                    Some(info) => (info, "cache"),
                    None => {
                        let budget =
                            Budget::new(self.limits.scan_max.saturating_add(1 << 20), self.limits.time);
                        let found = match FileMemory::open(ram, budget) {
                            Ok(mut mem) => {
                                let ranges = mem.ranges();
                                vmcoreinfo::scan_ranges(&mut mem, &ranges, self.limits.scan_max).await
                            }
                            Err(e) => Err(e),
                        };
                        match found {
                            Ok((info, _)) => (lock(&self.cache).insert(self.boot, info), "scan"),
                            Err(e) => return Err(self.discovery_failed(e)),
                        }
                    }
                };
                self.set_ring(&info)?;
                how
            }
        };
        let left = self.limits.time.saturating_sub(start.elapsed());
        let mut mem = FileMemory::open(ram, Budget::new(self.limits.max_bytes, left))?;
        let r = self.read_new(&mut mem).await;
        let mut new = self.settle(r)?;
        new.vmcoreinfo = how;
        new.bytes = mem.budget().used();
        new.elapsed_us = start.elapsed().as_micros() as u64;
        Ok(new)
    }

    /// Reads from any guest memory, with VMCOREINFO given (the unit tests' entry).
    pub async fn poll_with<M: PhysRead>(
        &mut self,
        mem: &mut M,
        info: &Vmcoreinfo,
    ) -> Result<NewRecords, MemError> {
        if self.ring.is_none() {
            self.set_ring(info)?;
        }
        let r = self.read_new(mem).await;
        let mut new = self.settle(r)?;
        new.bytes = mem.budget().used();
        Ok(new)
    }

    fn wait_retry(&self) -> Result<(), MemError> {
        match self.retry {
            Some((at, _)) if Instant::now() < at => Err(MemError::Corrupt(format!(
                "VMCOREINFO not found yet; the next try is in {} s",
                at.saturating_duration_since(Instant::now()).as_secs()
            ))),
            _ => Ok(()),
        }
    }

    fn discovery_failed(&mut self, e: MemError) -> MemError {
        let wait = match self.retry {
            Some((_, wait)) => (wait * 2).min(self.limits.retry_max),
            None => self.limits.retry_min,
        };
        self.retry = Some((Instant::now() + wait, wait));
        e
    }

    fn set_ring(&mut self, info: &Vmcoreinfo) -> Result<(), MemError> {
        let layout = Layout::from(info)?;
        let map = KernelMap::from_vmcoreinfo(info)?;
        self.retry = None;
        // `first` is filled by the first read.
        let first = Header {
            rb_addr: 0,
            descs_addr: 0,
            infos_addr: 0,
            data_addr: 0,
            count: 0,
            size: 0,
            head: 0,
            tail: 0,
        };
        self.ring = Some(Ring { layout, map, first, pages: HashMap::new() });
        Ok(())
    }

    /// After a read: a layout that no longer holds (corrupt reads, unmapped addresses: a
    /// reboot with other offsets) is dropped with its VMCOREINFO, to be found anew; a slow or
    /// failing QMP leaves everything as it was.
    fn settle(&mut self, r: Result<NewRecords, MemError>) -> Result<NewRecords, MemError> {
        match r {
            Ok(new) => Ok(new),
            Err(e) => {
                if matches!(
                    e,
                    MemError::Corrupt(_)
                        | MemError::NotMapped(_)
                        | MemError::Overflow(_)
                        | MemError::TooLarge { .. }
                ) {
                    self.forget_layout();
                    // Found anew after the backoff: a guest whose ring stays unreadable is not
                    // searched for every poll.
                    return Err(self.discovery_failed(e));
                }
                Err(e)
            }
        }
    }

    fn forget_layout(&mut self) {
        let mut cache = lock(&self.cache);
        if cache.get(self.boot).is_some() {
            *cache = VmcoreinfoCache::default();
        }
        drop(cache);
        self.ring = None;
        self.at = None;
        self.stalled = None;
    }

    /// One poll's reads and decoding.
    async fn read_new<M: PhysRead>(&mut self, mem: &mut M) -> Result<NewRecords, MemError> {
        let Some(ring) = self.ring.as_mut() else {
            return Err(MemError::Corrupt("the follower has no ring layout".into()));
        };
        let l = ring.layout;
        let first_read = ring.first.count == 0;
        let rb_addr =
            if first_read { Header::rb_addr(mem, &l, &ring.map).await? } else { ring.first.rb_addr };
        let raw = read_virt(mem, ring, rb_addr, Header::len(&l)).await?;
        let h = Header::parse(&l, rb_addr, &raw)?;
        let mut new = NewRecords::default();
        let same_ring = |a: &Header, b: &Header| {
            (a.descs_addr, a.infos_addr, a.data_addr, a.count, a.size)
                == (b.descs_addr, b.infos_addr, b.data_addr, b.count, b.size)
        };
        if first_read {
            ring.first = h;
        } else if !same_ring(&ring.first, &h) {
            // Another ring where this one was: the guest rebooted (or its memory is corrupt).
            ring.first = h;
            ring.pages.clear();
            self.at = None;
            new.restarted = true;
        }
        let (count, size) = (h.count, h.size);
        let live = (h.head.wrapping_sub(h.tail) & ID_MASK).min(count - 1);
        let live_first = h.head.wrapping_sub(live) & ID_MASK;
        let from = match self.at {
            None => {
                new.full = true;
                live_first
            }
            Some(p) => {
                let ahead = h.head.wrapping_sub(p.id) & ID_MASK;
                if ahead == 0 {
                    return Ok(new);
                }
                if ahead > BACKWARDS {
                    // The head went back: a new boot's log.
                    self.at = None;
                    new.restarted = true;
                    new.full = true;
                    live_first
                } else if ahead > live + 1 {
                    // More came than the ring holds: the oldest live record is where to start;
                    // the sequence gap counts what was lost.
                    new.full = true;
                    live_first
                } else {
                    p.id.wrapping_add(1) & ID_MASK
                }
            }
        };
        // From `from` to the head: at most the whole ring.
        let n = (h.head.wrapping_sub(from) & ID_MASK).min(count - 1) + 1;
        let descs = read_slots(mem, ring, h.descs_addr, l.desc_size, count, from, n).await?;
        let infos = read_slots(mem, ring, h.infos_addr, l.info_size, count, from, n).await?;

        // The stretch of text the new descriptors point to.
        let state_of = |id: u64| -> Option<(u64, u64, u64)> {
            let desc = usize::try_from((id & (count - 1)) * l.desc_size).ok()?;
            let at = |off: u64| desc.checked_add(usize::try_from(off).ok()?);
            let state_var = le_u64(&descs, at(l.state_var)?)?;
            let lpos = at(l.text_blk_lpos)?;
            let begin = le_u64(&descs, lpos.checked_add(usize::try_from(l.lpos_begin).ok()?)?)?;
            let next = le_u64(&descs, lpos.checked_add(usize::try_from(l.lpos_next).ok()?)?)?;
            Some((state_var, begin, next))
        };
        let mut span: Option<(u64, u64)> = None;
        for i in 0..n {
            let id = from.wrapping_add(i) & ID_MASK;
            let Some((sv, begin, next)) = state_of(id) else { continue };
            if sv & ID_MASK != id || begin & 1 == 1 || next & 1 == 1 {
                continue;
            }
            match next.checked_sub(begin) {
                Some(len) if len > 0 && len <= size.saturating_mul(2) => {}
                _ => continue,
            }
            span = Some(match span {
                None => (begin, next),
                Some((b, e)) => (b.min(begin), e.max(next)),
            });
        }
        let data = match span {
            // A stretch longer than the ring (or corrupt positions): the whole ring.
            Some((b, e)) if e - b >= size => read_virt(mem, ring, h.data_addr, size as usize).await?,
            Some((b, e)) => {
                let mut data = vec![0u8; size as usize];
                let (start, len) = (b & (size - 1), e - b);
                let first = len.min(size - start);
                let piece = read_virt(mem, ring, h.data_addr + start, first as usize).await?;
                data[start as usize..(start + first) as usize].copy_from_slice(&piece);
                if first < len {
                    let piece = read_virt(mem, ring, h.data_addr, (len - first) as usize).await?;
                    data[..piece.len()].copy_from_slice(&piece);
                }
                data
            }
            None => Vec::new(),
        };

        let mut last_id = self.at.map(|p| p.id);
        let mut last_seq = self.at.and_then(|p| p.seq);
        for i in 0..n {
            let id = from.wrapping_add(i) & ID_MASK;
            let state = state_of(id).map(|(sv, _, _)| (sv & ID_MASK == id, sv >> 62));
            if let Some((true, s)) = state {
                if s != STATE_FINALIZED && s <= STATE_COMMITTED {
                    // Being written: read whole at the next poll, unless it has been so too long.
                    let polls = match self.stalled {
                        Some((sid, k)) if sid == id => k + 1,
                        _ => 1,
                    };
                    if polls < STALL_POLLS {
                        self.stalled = Some((id, polls));
                        break;
                    }
                    if s != STATE_COMMITTED {
                        new.skipped += 1;
                        last_id = Some(id);
                        continue;
                    }
                }
            }
            last_id = Some(id);
            let Some(r) = record(&l, id, count, size, &descs, &infos, &data) else {
                new.skipped += 1;
                continue;
            };
            match last_seq {
                // Sequence numbers grow with ids: one that does not is corrupt, or, first of a
                // poll that follows on, a log that started over.
                Some(s) if r.seq <= s => {
                    if new.records.is_empty() && self.at.is_some() {
                        self.at = None;
                        let mut again = Box::pin(self.read_new(mem)).await?;
                        again.restarted = true;
                        return Ok(again);
                    }
                    new.skipped += 1;
                    continue;
                }
                Some(s) => new.lost += r.seq - s - 1,
                None => {}
            }
            last_seq = Some(r.seq);
            new.records.push(r);
        }
        if self.stalled.is_some_and(|(sid, _)| last_id.is_some_and(|l| sid.wrapping_sub(l) & ID_MASK != 1)) {
            // Passed, or the stop moved: the count starts over at the next stop.
            self.stalled = None;
        }
        if let Some(id) = last_id {
            self.at = Some(Position { id, seq: last_seq });
        } else if self.at.is_none() {
            // Nothing read yet (the first descriptor is being written): start before it.
            self.at = Some(Position { id: from.wrapping_sub(1) & ID_MASK, seq: None });
        }
        Ok(new)
    }
}

/// `n` consecutive slots (of `elem` bytes) of a ring of `count`, from index `from`'s: a buffer
/// of the whole array with those slots filled (one read, or two when they wrap).
async fn read_slots<M: PhysRead>(
    mem: &mut M,
    ring: &mut Ring,
    base: u64,
    elem: u64,
    count: u64,
    from: u64,
    n: u64,
) -> Result<Vec<u8>, MemError> {
    let total = count.checked_mul(elem).ok_or(MemError::Overflow(base))?;
    mem.budget().check_call(total)?;
    if n >= count {
        return read_virt(mem, ring, base, total as usize).await;
    }
    let mut out = vec![0u8; total as usize];
    let start = from & (count - 1);
    let first = n.min(count - start);
    let piece = read_virt(mem, ring, base + start * elem, (first * elem) as usize).await?;
    out[(start * elem) as usize..((start + first) * elem) as usize].copy_from_slice(&piece);
    if first < n {
        let piece = read_virt(mem, ring, base, ((n - first) * elem) as usize).await?;
        out[..piece.len()].copy_from_slice(&piece);
    }
    Ok(out)
}

/// `len` bytes at kernel virtual `v`, through the boot's page translations (walked once), each
/// physically contiguous run read exactly once.
async fn read_virt<M: PhysRead>(
    mem: &mut M,
    ring: &mut Ring,
    v: u64,
    len: usize,
) -> Result<Vec<u8>, MemError> {
    ring.map.read_virt_with(mem, v, len, Some(&mut ring.pages)).await
}
