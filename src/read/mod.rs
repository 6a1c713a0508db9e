//! Stage 4 of the data path: reading the shared region.
//!
//! Rules, as in rust-vmm's `vm-memory`:
//!
//! - No Rust reference (`&T`, `&[u8]`, `&mut`) is ever formed over the mapping: the guest
//!   writes it concurrently, which would make such a reference undefined behaviour. Every
//!   access is a volatile 4-byte load or store through a raw pointer at a constant, aligned
//!   offset inside the fixed areas, which [`Region::open`] proved are mapped.
//! - A snapshot is a seqlock copy: read `seq`, copy the fixed areas, read `seq` again; keep the
//!   copy only if both reads are equal and even, otherwise retry, a bounded number of times.
//! - Everything copied out is then decoded as untrusted input ([`decode`]).
//!
//! This module holds the crate's only `unsafe` blocks.

pub mod decode;
pub mod frame;
pub mod sim;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use zerocopy::IntoBytes;

pub use self::decode::{
    decode, decode_mailbox, Anomaly, DecodeError, GuestRecord, Mailbox, MailboxView, RequestView, Snapshot,
};
use crate::abi::{self, offsets};

/// Errors of the region file and of reading it. Messages name the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region file {0} does not exist; create it with `acpimon qemu-args --region-path {0}` before starting QEMU")]
    Missing(PathBuf),
    #[error("cannot open region file {path}: {source}; check the path and its permissions")]
    Open { path: PathBuf, source: io::Error },
    #[error("region file {path} is {len} bytes, smaller than the {min} the ABI needs; recreate it with `acpimon qemu-args --region-path {path}`", min = abi::MIN_REGION_SIZE)]
    TooSmall { path: PathBuf, len: u64 },
    #[error("region file {path} is {len} bytes, larger than the {max} acpimon maps; it is not a region acpimon made", max = abi::MAX_REGION_SIZE)]
    TooLarge { path: PathBuf, len: u64 },
    #[error("region file {path} is {len} bytes but {wanted} were asked for; delete it (while no VM uses it) or ask for {len}")]
    SizeConflict { path: PathBuf, len: u64, wanted: u32 },
    #[error("cannot map region file {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("cannot write region file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("region {path} was opened read-only; open it with Access::ReadWrite to send requests")]
    ReadOnly { path: PathBuf },
    #[error("region {path}: {source}")]
    Decode { path: PathBuf, source: DecodeError },
    #[error("the guest has been writing record {seq} of {path} for {}: it stopped mid-write (paused, hung or reset inside the AML); read again later", crate::units::format_duration(*waited))]
    StuckOdd { path: PathBuf, seq: u32, waited: Duration },
    #[error("the record in {path} changed during each of {attempts} copies: the guest writes faster than it can be read; read again")]
    Unstable { path: PathBuf, attempts: u32 },
}

/// How a region is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Snapshots only.
    ReadOnly,
    /// Snapshots and requests.
    ReadWrite,
}

/// How long a snapshot waits for the guest to finish a record.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Give up after this long with an odd (in-progress) sequence number.
    pub max_wait: Duration,
    /// Give up after this many copies torn by a concurrent write.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // The AML writes a record in well under a millisecond, even under TCG.
        RetryPolicy { max_wait: Duration::from_millis(50), max_attempts: 1000 }
    }
}

/// A mapped region file.
pub struct Region {
    map: MmapRaw,
    len: u64,
    path: PathBuf,
    access: Access,
}

impl Region {
    /// Creates the region file of `size` bytes with a fresh header, or, when it exists with the
    /// same size, keeps it (its boot count carries on) after re-writing an invalid header.
    /// A file of another size is refused rather than truncated.
    pub fn create(path: &Path, size: u32) -> Result<Region, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|source| RegionError::Open { path: path.into(), source })?;
        let len = file_len(&file, path)?;
        if len != 0 && len != u64::from(size) {
            return Err(RegionError::SizeConflict { path: path.into(), len, wanted: size });
        }
        let write_err = |source| RegionError::Write { path: path.into(), source };
        if len == 0 {
            file.set_len(u64::from(size)).map_err(write_err)?;
        }
        let mut fixed = [0u8; abi::FIXED_SIZE];
        file.read_exact_at(&mut fixed, 0).map_err(write_err)?;
        let valid = matches!(decode(&fixed, u64::from(size)), Ok(_) | Err(DecodeError::WriteInProgress(_)));
        if !valid {
            // Host-owned areas from scratch; the mailbox is the guest's and stays.
            let mut fresh = [0u8; abi::FIXED_SIZE];
            fresh[..size_of::<abi::Header>()].copy_from_slice(abi::header_for(size).as_bytes());
            file.write_all_at(&fresh, 0).map_err(write_err)?;
            file.sync_data().map_err(write_err)?;
        }
        Self::map(file, path, Access::ReadWrite)
    }

    /// Opens an existing region file. Its header is checked by the first [`Region::snapshot`].
    pub fn open(path: &Path, access: Access) -> Result<Region, RegionError> {
        let file = OpenOptions::new().read(true).write(access == Access::ReadWrite).open(path).map_err(
            |source| match source.kind() {
                io::ErrorKind::NotFound => RegionError::Missing(path.into()),
                _ => RegionError::Open { path: path.into(), source },
            },
        )?;
        Self::map(file, path, access)
    }

    fn map(file: File, path: &Path, access: Access) -> Result<Region, RegionError> {
        let len = file_len(&file, path)?;
        if len < abi::MIN_REGION_SIZE {
            return Err(RegionError::TooSmall { path: path.into(), len });
        }
        if len > abi::MAX_REGION_SIZE {
            return Err(RegionError::TooLarge { path: path.into(), len });
        }
        let opts = MmapOptions::new();
        let map = match access {
            Access::ReadOnly => opts.map_raw_read_only(&file),
            Access::ReadWrite => opts.map_raw(&file),
        }
        .map_err(|source| RegionError::Map { path: path.into(), source })?;
        Ok(Region { map, len, path: path.into(), access })
    }

    /// The region file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The region's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a mapped region is at least [`abi::MIN_REGION_SIZE`] bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// A consistent, decoded snapshot, with the default [`RetryPolicy`].
    pub fn snapshot(&self) -> Result<Snapshot, RegionError> {
        self.snapshot_with(RetryPolicy::default())
    }

    /// A consistent, decoded snapshot.
    pub fn snapshot_with(&self, policy: RetryPolicy) -> Result<Snapshot, RegionError> {
        let fixed = self.copy_fixed(policy)?;
        decode(&fixed, self.len).map_err(|source| RegionError::Decode { path: self.path.clone(), source })
    }

    /// A seqlock-consistent copy of the fixed areas (header, request, record).
    pub fn copy_fixed(&self, policy: RetryPolicy) -> Result<[u8; abi::FIXED_SIZE], RegionError> {
        self.seqlock_copy(0, offsets::SEQ, policy)
    }

    /// The app mailbox, decoded.
    pub fn mailbox(&self) -> Result<Mailbox, RegionError> {
        Ok(decode_mailbox(&self.copy_mailbox(RetryPolicy::default())?))
    }

    /// A copy of the app mailbox's layout, consistent under the mailbox's own sequence lock.
    pub fn copy_mailbox(&self, policy: RetryPolicy) -> Result<[u8; abi::MAILBOX_LAYOUT_SIZE], RegionError> {
        self.seqlock_copy(abi::MAILBOX_OFFSET, offsets::MAILBOX_SEQ, policy)
    }

    /// `N` bytes from `start`, copied while the sequence word at `seq` stayed even and
    /// unchanged (the writer makes it odd while it writes).
    fn seqlock_copy<const N: usize>(
        &self,
        start: usize,
        seq: usize,
        policy: RetryPolicy,
    ) -> Result<[u8; N], RegionError> {
        let begin = Instant::now();
        let mut attempts = 0u32;
        loop {
            let before = self.load(seq);
            if before & 1 == 0 {
                // Acquire: the copy below is not hoisted above the first seq load.
                fence(Ordering::Acquire);
                let mut copy = [0u8; N];
                for (i, word) in copy.chunks_exact_mut(4).enumerate() {
                    word.copy_from_slice(&self.load(start + i * 4).to_ne_bytes());
                }
                fence(Ordering::Acquire);
                let after = self.load(seq);
                if before == after {
                    return Ok(copy);
                }
                attempts += 1;
                if attempts >= policy.max_attempts {
                    return Err(RegionError::Unstable { path: self.path.clone(), attempts });
                }
            } else if begin.elapsed() >= policy.max_wait {
                return Err(RegionError::StuckOdd {
                    path: self.path.clone(),
                    seq: before,
                    waited: begin.elapsed(),
                });
            }
            // Short spins first (a record takes microseconds), then give the CPU back.
            if begin.elapsed() < Duration::from_micros(200) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Publishes a request: the nonce first, the request number last, so an AML that sees the
    /// new number also sees its nonce (x86 keeps stores in order; the fence keeps the
    /// compiler from reordering them).
    pub fn write_request(&self, request_no: u32, nonce: u32) -> Result<(), RegionError> {
        if self.access != Access::ReadWrite {
            return Err(RegionError::ReadOnly { path: self.path.clone() });
        }
        self.store(offsets::NONCE, nonce);
        fence(Ordering::Release);
        self.store(offsets::REQUEST_NO, request_no);
        Ok(())
    }

    /// Volatile little-endian load of the word at `offset` of the fixed areas or the mailbox
    /// layout.
    fn load(&self, offset: usize) -> u32 {
        assert!(offset % 4 == 0 && offset + 4 <= READABLE);
        // SAFETY: the mapping is at least MIN_REGION_SIZE (>= READABLE) bytes long (checked
        // in `map`) and page-aligned, and `offset` is a 4-aligned offset inside READABLE, so
        // the pointer is valid and aligned for a u32 for as long as `self.map` lives. The load
        // is volatile and forms no reference, so concurrent guest writes cannot make it UB; a
        // torn or stale value is caught by the seqlock and by `decode`. (Truncating the file
        // while mapped would SIGBUS, as for any mmap reader; region files are private, 0600.)
        let raw = unsafe { std::ptr::read_volatile(self.map.as_ptr().add(offset).cast::<u32>()) };
        u32::from_le(raw)
    }

    /// Volatile little-endian store of `value` at `offset` of the fixed areas.
    fn store(&self, offset: usize, value: u32) {
        assert!(offset % 4 == 0 && offset + 4 <= abi::FIXED_SIZE);
        assert_eq!(self.access, Access::ReadWrite);
        // SAFETY: as for `load`; in addition the mapping is writable because it was made with
        // `map_raw` from a file opened read-write (`access == ReadWrite`, asserted above).
        unsafe { std::ptr::write_volatile(self.map.as_mut_ptr().add(offset).cast::<u32>(), value.to_le()) };
    }
}

/// The part of the region the host reads: the fixed areas and the mailbox layout.
const READABLE: usize = abi::MAILBOX_OFFSET + abi::MAILBOX_LAYOUT_SIZE;
const _: () = assert!(READABLE as u64 <= abi::MIN_REGION_SIZE);

fn file_len(file: &File, path: &Path) -> Result<u64, RegionError> {
    file.metadata().map(|m| m.len()).map_err(|source| RegionError::Open { path: path.into(), source })
}

#[cfg(test)]
mod tests;
