//! Guest memory, read from the host without anything in the guest: guest-physical reads
//! ([`PhysRead`]; through QMP's `pmemsave` in [`QmpMemory`]), kernel virtual addresses
//! translated by walking the kernel's own page tables ([`KernelMap`]), the kernel's
//! VMCOREINFO note ([`vmcoreinfo`]), its printk ring buffer ([`printk`]) and its symbol
//! table ([`kallsyms`]).
//!
//! Rules: everything read is untrusted input written by a guest that may be corrupt or
//! hostile. Every read goes through a [`Budget`] (bytes per call, bytes and time per whole
//! operation), every size and pointer read from the guest is range-checked before use, every
//! loop over guest data has a bound fixed before it starts, and nothing here panics on any
//! byte pattern (the unit tests feed random bytes). No reference into guest memory is ever
//! held: reads copy bytes out.

pub mod dmesg;
mod file;
pub mod follow;
pub mod kallsyms;
pub mod modules;
pub mod printk;
mod qmp;
mod translate;
pub mod vmcoreinfo;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

pub use self::file::{FileMemory, MAX_IDENTITY};
pub use self::follow::{FollowLimits, LogFollower, NewRecords};
pub use self::printk::{read_kernel_log, KernelLog, LogRecord};
pub use self::qmp::{QmpMemory, CHUNK};
pub use self::translate::KernelMap;
pub use self::vmcoreinfo::{Vmcoreinfo, VmcoreinfoCache};

/// Why a read of guest memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("reading {len} bytes at once exceeds the per-call limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("the read budget of {max} bytes is spent ({used} read); raise the budget or read less")]
    BudgetSpent { used: u64, max: u64 },
    #[error("the time budget of {0:?} is spent; the guest memory read did not finish in time")]
    Deadline(Duration),
    #[error("guest physical address {0:#x} + length overflows")]
    Overflow(u64),
    #[error("QMP {command}: {error}")]
    Qmp { command: &'static str, error: crate::trigger::qmp::QmpError },
    #[error("{what} {path}: {source}; check that QEMU may write the VM's directory")]
    Io { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("the VM directory {0} is not UTF-8; QEMU cannot be given a path in it")]
    NotUtf8(std::path::PathBuf),
    #[error("QEMU wrote {got} bytes for a {want}-byte read")]
    ShortRead { got: u64, want: u64 },
    #[error("virtual address {0:#x} is not mapped in the kernel's page tables")]
    NotMapped(u64),
    #[error("the guest's data is inconsistent: {0}")]
    Corrupt(String),
    #[error(
        "no VMCOREINFO: the guest did not publish it (launch with `-device vmcoreinfo`, as `acpimon prepare` \
         does, and load the guest's qemu_fw_cfg module) and none was found in the {scanned_mib} MiB of RAM scanned"
    )]
    NoVmcoreinfo { scanned_mib: u64 },
    #[error("VMCOREINFO lacks {0}; this kernel does not describe it (a kernel before 5.10, or without crash support)")]
    Missing(String),
    #[error(
        "the guest's kernel ({osrelease}) does not publish its symbol table: VMCOREINFO lacks {missing}, which \
         kallsyms needs (Linux 6.0 and later publish it); give the kernel's System.map, a copy of its \
         /proc/kallsyms or its vmlinux as `[diagnostics] symbols`"
    )]
    NoKallsyms { osrelease: String, missing: String },
}

/// What one operation (e.g. fetching the kernel log once) may cost: bytes read from the guest
/// (after the page cache: bytes QEMU was asked for) and wall-clock time, plus the largest single read.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Total bytes this operation may read from the guest.
    pub max_bytes: u64,
    /// Largest single read a caller may ask for.
    pub max_call: u64,
    /// When the operation must give up.
    pub deadline: Instant,
    /// The time it was given, for messages.
    pub time: Duration,
    used: u64,
}

impl Budget {
    /// `max_bytes` in total within `time` from now; single reads up to 32 MiB.
    pub fn new(max_bytes: u64, time: Duration) -> Budget {
        Budget { max_bytes, max_call: 32 << 20, deadline: Instant::now() + time, time, used: 0 }
    }

    /// Bytes read so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Checks one call's length against the per-call limit.
    pub fn check_call(&self, len: u64) -> Result<(), MemError> {
        if len > self.max_call {
            return Err(MemError::TooLarge { len, max: self.max_call });
        }
        Ok(())
    }

    /// Accounts `len` more bytes, failing (without accounting them) past the budget or the deadline.
    pub fn charge(&mut self, len: u64) -> Result<(), MemError> {
        if Instant::now() >= self.deadline {
            return Err(MemError::Deadline(self.time));
        }
        let used = self.used.saturating_add(len);
        if used > self.max_bytes {
            return Err(MemError::BudgetSpent { used: self.used, max: self.max_bytes });
        }
        self.used = used;
        Ok(())
    }
}

/// Guest-physical memory, read in copies. Implementations charge their [`Budget`] for what
/// they fetch and may cache within one operation (guest memory changes under a live guest:
/// a cache lives no longer than one operation).
pub trait PhysRead: Send {
    /// `len` bytes at guest-physical `addr`. Addresses beyond RAM read as QEMU gives them
    /// (zeros or 0xff); it is the caller's decoding that must not trust them.
    fn read_phys(&mut self, addr: u64, len: usize) -> impl Future<Output = Result<Vec<u8>, MemError>> + Send;

    /// The budget this reader charges.
    fn budget(&self) -> &Budget;

    /// [`PhysRead::read_phys`] for data read once (a scan), which need not be cached.
    fn read_once(&mut self, addr: u64, len: usize) -> impl Future<Output = Result<Vec<u8>, MemError>> + Send {
        self.read_phys(addr, len)
    }
}

/// Little-endian integers out of a byte slice, `None` past its end.
pub(crate) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(s.try_into().ok()?))
}
