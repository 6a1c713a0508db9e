//! Guest-physical reads through QMP: `pmemsave` into a file in the VM's directory (which QEMU
//! can write: it holds its sockets), read back and removed, in [`CHUNK`]-aligned pieces cached
//! for the operation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;

use super::{Budget, MemError, PhysRead};
use crate::trigger::qmp::Qmp;

/// The unit of fetching and caching. One `pmemsave` round trip costs about the same for 4 KiB
/// and for 64 KiB under TCG (measured in tests/memory.rs; the QMP round trip and the file's
/// open/close dominate), so reads are rounded out to 64 KiB: the ring buffer's arrays and the
/// page-table entries near each other come in with one call.
pub const CHUNK: u64 = 64 << 10;
/// The largest single `pmemsave`: runs of missing chunks are fetched together up to this.
const MAX_FETCH: u64 = 4 << 20;

/// Guest-physical memory through a QMP monitor. One per operation: its cache and budget end with it.
pub struct QmpMemory<'q> {
    qmp: &'q Qmp,
    dir: PathBuf,
    budget: Budget,
    cache: BTreeMap<u64, Vec<u8>>,
    calls: u64,
}

impl<'q> QmpMemory<'q> {
    /// Reads through `qmp`; QEMU writes its temporary files into `dir` (the VM's directory).
    pub fn new(qmp: &'q Qmp, dir: &Path, budget: Budget) -> QmpMemory<'q> {
        QmpMemory { qmp, dir: dir.to_path_buf(), budget, cache: BTreeMap::new(), calls: 0 }
    }

    /// `pmemsave` round trips so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// One `pmemsave` of exactly `len` bytes at `addr`, uncached.
    pub async fn fetch(&mut self, addr: u64, len: u64) -> Result<Vec<u8>, MemError> {
        self.budget.check_call(len)?;
        self.budget.charge(len)?;
        self.calls += 1;
        // Unique in the process: two readers (the log's follower and a bundle's step) may
        // read the same VM at once.
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.join(format!(".pmem-{}-{n}", std::process::id()));
        let Some(name) = path.to_str() else { return Err(MemError::NotUtf8(self.dir.clone())) };
        // Whatever has the name (a stale file, a planted link) goes: QEMU follows links.
        let _ = tokio::fs::remove_file(&path).await;
        let cmd = qapi::qmp::pmemsave { val: addr, size: len, filename: name.to_string() };
        let saved = self.qmp.execute_within(cmd, self.budget.remaining()).await;
        let read = match saved {
            Ok(_) => read_at_most(&path, len).await,
            Err(error) => Err(MemError::Qmp { command: "pmemsave", error }),
        };
        let _ = tokio::fs::remove_file(&path).await;
        let data = read?;
        if data.len() as u64 != len {
            return Err(MemError::ShortRead { got: data.len() as u64, want: len });
        }
        Ok(data)
    }
}

/// Reads `path`, refusing more than `len` bytes (the file is QEMU's, but in a directory others
/// may write).
async fn read_at_most(path: &Path, len: u64) -> Result<Vec<u8>, MemError> {
    let io = |source| MemError::Io { what: "cannot read QEMU's pmemsave file", path: path.into(), source };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut data = Vec::with_capacity(len as usize);
    file.take(len + 1).read_to_end(&mut data).await.map_err(io)?;
    Ok(data)
}

impl PhysRead for QmpMemory<'_> {
    async fn read_phys(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, MemError> {
        {
            let len64 = len as u64;
            self.budget.check_call(len64)?;
            if len == 0 {
                return Ok(Vec::new());
            }
            let end = addr.checked_add(len64).ok_or(MemError::Overflow(addr))?;
            let (first, last) = (addr / CHUNK, (end - 1) / CHUNK);
            // Runs of chunks not yet cached, each fetched with one pmemsave.
            let mut i = first;
            while i <= last {
                if self.cache.contains_key(&i) {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < last && !self.cache.contains_key(&(j + 1)) && (j + 2 - i) * CHUNK <= MAX_FETCH {
                    j += 1;
                }
                let data = self.fetch(i * CHUNK, (j + 1 - i) * CHUNK).await?;
                for (k, piece) in data.chunks(CHUNK as usize).enumerate() {
                    self.cache.insert(i + k as u64, piece.to_vec());
                }
                i = j + 1;
            }
            let mut out = Vec::with_capacity(len);
            for c in first..=last {
                let piece = &self.cache[&c];
                let from = if c == first { (addr % CHUNK) as usize } else { 0 };
                let to = if c == last { ((end - 1) % CHUNK) as usize + 1 } else { CHUNK as usize };
                out.extend_from_slice(&piece[from..to]);
            }
            Ok(out)
        }
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }

    async fn read_once(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, MemError> {
        self.fetch(addr, len as u64).await
    }
}
