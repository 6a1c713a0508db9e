//! One service per data directory. Two services on one data directory would each recover the
//! spool and send every event, and interleave their writes to the event log. The service holds
//! an exclusive `flock` on `DATA_DIR/watch.lock` for its whole life; the kernel releases it when
//! the process ends, however it ends, so a crash leaves no stale lock to clean up. The file holds
//! the holder's pid, for the message that refuses a second service.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "watch.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another acpimon watch ({holder}) already uses the data directory {dir}: two services on one data \
         directory would both send every event; stop the other service, or give this one its own data_dir \
         in its configuration"
    )]
    Held { dir: PathBuf, holder: String },
    #[error(
        "cannot lock the data directory through {path}: {source}; check that it is writable by this user"
    )]
    Io { path: PathBuf, source: std::io::Error },
}

/// The held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock on `dir` (which must exist) without waiting, and records this pid in it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source: std::io::Error| LockError::Io { path: path.clone(), source };
        // Not truncated on open: the file holds the current holder's pid until we hold the lock.
        let mut file =
            File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("pid {pid}"),
                    Err(_) => "pid unknown".to_string(),
                };
                return Err(LockError::Held { dir: dir.into(), holder });
            }
            Err(e) => return Err(io(e.into())),
        }
        // Only a help for the refusal message, so not synced.
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap().trim(), pid);
        // flock locks belong to the open file, so a second open in this process conflicts too.
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(text.contains(&format!("pid {pid}")), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("data_dir"), "{text}");
        drop(first);
        let _again = DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = DataDirLock::acquire(&missing).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }));
        assert!(err.to_string().contains(&missing.join(LOCK_FILE).display().to_string()));
    }
}
