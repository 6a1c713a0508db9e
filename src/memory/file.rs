//! Guest-physical reads from the file backing guest RAM, for a launch that shares it
//! (`-object memory-backend-file,id=ram,mem-path=FILE,share=on,size=... -machine
//! memory-backend=ram`): no QMP at all, so it also works while another client (such as
//! `acpimon watch`) holds the VM's monitor.
//!
//! The file holds RAM in guest-physical order from address 0 as long as all of it sits below
//! the PCI hole: pc keeps up to 3.5 GiB there, q35 up to 2.75 GiB, so a file of at most
//! [`MAX_IDENTITY`] maps address = offset on both. Larger guests split RAM around the hole in a
//! machine-specific way: read them through QMP.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Budget, MemError, PhysRead};

/// The largest RAM file read as address = offset (q35's limit for RAM wholly below 4 GiB).
pub const MAX_IDENTITY: u64 = 0xb000_0000;

/// Guest RAM in a shared file.
pub struct FileMemory {
    file: Arc<std::fs::File>,
    path: PathBuf,
    size: u64,
    budget: Budget,
}

impl FileMemory {
    pub fn open(path: &Path, budget: Budget) -> Result<FileMemory, MemError> {
        let io = |source| MemError::Io { what: "cannot open the guest RAM file", path: path.into(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if size > MAX_IDENTITY {
            return Err(MemError::Corrupt(format!(
                "the RAM file {} holds {} MiB, more than the {} MiB whose addresses are its offsets on pc \
                 and q35; read this guest through QMP",
                path.display(),
                size >> 20,
                MAX_IDENTITY >> 20
            )));
        }
        Ok(FileMemory { file: Arc::new(file), path: path.into(), size, budget })
    }

    /// Guest RAM's range: `[0, file size)`.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(0, self.size)]
    }
}

impl PhysRead for FileMemory {
    async fn read_phys(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, MemError> {
        self.budget.check_call(len as u64)?;
        self.budget.charge(len as u64)?;
        let end = addr.checked_add(len as u64).ok_or(MemError::Overflow(addr))?;
        // Past the file is no RAM: zeros, as QEMU reads unassigned memory.
        let mut buf = vec![0u8; len];
        if addr >= self.size {
            return Ok(buf);
        }
        let n = (end.min(self.size) - addr) as usize;
        let (file, path) = (self.file.clone(), self.path.clone());
        let read = tokio::task::spawn_blocking(move || {
            let r = file.read_exact_at(&mut buf[..n], addr);
            r.map(|()| buf)
        })
        .await
        .map_err(|e| MemError::Corrupt(format!("the RAM file reader stopped: {e}")))?;
        read.map_err(|source| MemError::Io { what: "cannot read the guest RAM file", path, source })
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }
}
