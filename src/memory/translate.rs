//! Kernel virtual → guest physical on x86-64: the kernel image's addresses directly (offset by
//! `phys_base`), every other one by walking the kernel's page table (`init_top_pgt`), 4- or
//! 5-level, with 1 GiB and 2 MiB pages. A walk reads at most five entries, one per level, so a
//! hostile table cannot make it loop.

use super::vmcoreinfo::Vmcoreinfo;
use super::{le_u64, MemError, PhysRead};
use std::collections::HashMap;

/// The most page translations a caller's cache keeps (a 32 MiB ring's three arrays need about
/// 16 000).
pub const MAX_CACHED_PAGES: usize = 1 << 16;

async fn read_run<M: PhysRead>(mem: &mut M, start: u64, len: u64, once: bool) -> Result<Vec<u8>, MemError> {
    if once {
        mem.read_once(start, len as usize).await
    } else {
        mem.read_phys(start, len as usize).await
    }
}

/// `__START_KERNEL_map`: where the kernel image is mapped, at physical `phys_base`.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// How far past [`START_KERNEL_MAP`] addresses are the image's (`KERNEL_IMAGE_SIZE`; modules
/// live above it and are walked): 1 GiB in a kernel built for KASLR, which may put the image
/// anywhere in it, else 512 MiB. A nonzero `KERNELOFFSET` says KASLR is built and on; with it
/// off the image sits at the start, inside the smaller size either way.
const KERNEL_IMAGE_SIZE: u64 = 512 << 20;
const KERNEL_IMAGE_SIZE_KASLR: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Bits 12..51 of a table entry: the next table's (or the page's) physical address.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
/// Page size bit: a 1 GiB (level 3) or 2 MiB (level 2) page.
const HUGE: u64 = 1 << 7;

/// How to translate one booted kernel's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelMap {
    /// Where the kernel image is in physical memory, minus its link address's offset.
    pub phys_base: u64,
    /// Physical address of the top-level page table (`init_top_pgt`).
    pub pgd: u64,
    /// 5-level paging (LA57).
    pub five_level: bool,
    /// KASLR's offset of the image (`KERNELOFFSET`), for reports.
    pub kernel_offset: u64,
}

impl KernelMap {
    /// From VMCOREINFO's `NUMBER(phys_base)`, `SYMBOL(init_top_pgt)`,
    /// `NUMBER(pgtable_l5_enabled)` and `KERNELOFFSET`.
    pub fn from_vmcoreinfo(v: &Vmcoreinfo) -> Result<KernelMap, MemError> {
        let missing = |what: &str| MemError::Missing(what.into());
        let phys_base = v.number("phys_base").ok_or_else(|| missing("NUMBER(phys_base)"))? as u64;
        let top = v.symbol("init_top_pgt").ok_or_else(|| missing("SYMBOL(init_top_pgt)"))?;
        let mut map =
            KernelMap { phys_base, pgd: 0, five_level: false, kernel_offset: v.kernel_offset().unwrap_or(0) };
        map.pgd = map
            .image_phys(top)
            .ok_or_else(|| MemError::Corrupt(format!("init_top_pgt {top:#x} is outside the kernel image")))?;
        map.five_level = v.number("pgtable_l5_enabled").unwrap_or(0) == 1;
        Ok(map)
    }

    /// The physical address of a kernel-image address, `None` outside the image.
    pub fn image_phys(&self, v: u64) -> Option<u64> {
        let off = v.checked_sub(START_KERNEL_MAP)?;
        let size = if self.kernel_offset != 0 { KERNEL_IMAGE_SIZE_KASLR } else { KERNEL_IMAGE_SIZE };
        (off < size).then(|| off.wrapping_add(self.phys_base))
    }

    /// The physical address of kernel virtual address `v`.
    pub async fn translate<M: PhysRead>(&self, mem: &mut M, v: u64) -> Result<u64, MemError> {
        match self.image_phys(v) {
            Some(p) => Ok(p),
            None => self.walk(mem, v).await,
        }
    }

    /// `v` translated through the page table, whatever its range.
    pub async fn walk<M: PhysRead>(&self, mem: &mut M, v: u64) -> Result<u64, MemError> {
        let shifts: &[u32] = if self.five_level { &[48, 39, 30, 21, 12] } else { &[39, 30, 21, 12] };
        let mut table = self.pgd;
        for &shift in shifts {
            let index = (v >> shift) & 0x1ff;
            let raw = mem.read_phys(table + index * 8, 8).await?;
            let entry = le_u64(&raw, 0).ok_or(MemError::ShortRead { got: raw.len() as u64, want: 8 })?;
            if entry & PRESENT == 0 {
                return Err(MemError::NotMapped(v));
            }
            let size = 1u64 << shift;
            if shift == 12 || ((shift == 21 || shift == 30) && entry & HUGE != 0) {
                // A huge page's address bits below its size are flags (PAT), not address.
                return Ok((entry & ADDR_MASK & !(size - 1)) | (v & (size - 1)));
            }
            table = entry & ADDR_MASK;
        }
        unreachable!("the last level returns")
    }

    /// `len` bytes at kernel virtual address `v`, page by page, physically contiguous pages
    /// read together.
    pub async fn read_virt<M: PhysRead>(&self, mem: &mut M, v: u64, len: usize) -> Result<Vec<u8>, MemError> {
        self.read_virt_with(mem, v, len, None).await
    }

    /// [`KernelMap::read_virt`], with translations looked up in (and added to) `pages` (a
    /// virtual page's physical page, at most [`MAX_CACHED_PAGES`] kept) and each run read once
    /// ([`PhysRead::read_once`]): for a reader that comes back to the same pages, such as the
    /// log's follower.
    pub async fn read_virt_with<M: PhysRead>(
        &self,
        mem: &mut M,
        v: u64,
        len: usize,
        mut pages: Option<&mut HashMap<u64, u64>>,
    ) -> Result<Vec<u8>, MemError> {
        mem.budget().check_call(len as u64)?;
        let end = v.checked_add(len as u64).ok_or(MemError::Overflow(v))?;
        let once = pages.is_some();
        let mut out = Vec::with_capacity(len);
        // (physical start, length) of the run not yet read
        let mut run: Option<(u64, u64)> = None;
        let mut at = v;
        while at < end {
            let page = at & !(PAGE - 1);
            let page_end = page.saturating_add(PAGE).min(end);
            let n = page_end - at;
            let phys_page = match pages.as_deref_mut() {
                Some(cache) => match cache.get(&page) {
                    Some(&p) => p,
                    None => {
                        let p = self.translate(mem, page).await?;
                        if cache.len() >= MAX_CACHED_PAGES {
                            cache.clear();
                        }
                        cache.insert(page, p);
                        p
                    }
                },
                None => self.translate(mem, page).await?,
            };
            let p = phys_page.checked_add(at - page).ok_or(MemError::Overflow(phys_page))?;
            run = match run {
                Some((start, l)) if start.checked_add(l) == Some(p) => Some((start, l + n)),
                Some((start, l)) => {
                    out.extend(read_run(mem, start, l, once).await?);
                    Some((p, n))
                }
                None => Some((p, n)),
            };
            at = page_end;
        }
        if let Some((start, l)) = run {
            out.extend(read_run(mem, start, l, once).await?);
        }
        Ok(out)
    }

    /// A little-endian u64 at kernel virtual address `v`.
    pub async fn read_u64<M: PhysRead>(&self, mem: &mut M, v: u64) -> Result<u64, MemError> {
        let b = self.read_virt(mem, v, 8).await?;
        le_u64(&b, 0).ok_or(MemError::ShortRead { got: b.len() as u64, want: 8 })
    }
}
