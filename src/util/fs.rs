//! Durable file writes. A file that must survive `kill -9` and power loss whole or not at all
//! is written with [`atomic_write`]: a temporary file in the same directory (so the rename
//! cannot cross file systems), written, fsynced, renamed over the target, then the directory
//! fsynced (so the rename itself is durable). A reader sees the old contents or the new,
//! never a mix. After a crash a `.NAME.tmp` may be left behind; writers overwrite it.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary file [`atomic_write`] uses for `path`: `.NAME.tmp` beside it.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably (see the module docs). A new file gets
/// the process's umask (the service runs with 0077).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, 0o666)?;
    sync_dir(parent(path))
}

/// [`atomic_write`] without the directory fsync, for a writer that fsyncs the directory once
/// for a batch of files: until then the new name may be lost in a power cut (never torn).
/// `mode` is for a newly created file, before the umask.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path);
    // On any failure (a full disk mid-write) the partial temporary goes; `path` is untouched.
    write_synced(&tmp, bytes, mode).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes `bytes` to `path` (created with `mode` before the umask, or truncated) and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fsyncs directory `dir`, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// At most `max` bytes of the file at `path`: for files whose size nothing bounds (`/proc`,
/// pid files, what another program wrote).
pub fn read_capped(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max as u64).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        replace(&p, b"one", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        // A leftover temporary from a crash is overwritten, not an error.
        std::fs::write(tmp_path(&p), b"torn").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert_eq!(tmp_path(Path::new("a/b.json")), Path::new("a/.b.json.tmp"));
        assert_eq!(parent(Path::new("b.json")), Path::new("."));
        // A missing directory is an error, not a panic.
        assert!(atomic_write(&dir.path().join("no/such"), b"x").is_err());
    }
}
