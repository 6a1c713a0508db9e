//! A small tmpfs mounted for a test, to make a disk full for real (ENOSPC, short writes), and
//! unmounted when dropped. Mounting needs root (CI runs as root; otherwise password-less
//! `sudo`); when it fails the test fails with the reason: a full-disk test that did not run
//! must not pass.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a fixed size at `path`.
pub struct Tmpfs {
    pub path: PathBuf,
    /// The mount point's parent when the helper made it, removed after the unmount.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: "2m", "512k") on a fresh
    /// temporary directory.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = Tmpfs::mount_on(&dir.path().join("fs"), size);
        fs._dir = Some(dir);
        fs
    }

    /// Mounts a tmpfs of `size` on `path` (created if needed), e.g. a service's data directory.
    pub fn mount_on(path: &Path, size: &str) -> Tmpfs {
        let path = path.to_path_buf();
        std::fs::create_dir_all(&path).unwrap();
        // Owned by whoever runs the tests, so a non-root run (through sudo) can write to it.
        let (uid, gid) = (id("-u"), id("-g"));
        let out = super::run(
            as_root("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755,uid={uid},gid={gid}")])
                .arg("tmpfs")
                .arg(&path),
        );
        assert!(
            out.status.success(),
            "cannot mount a {size} tmpfs on {} (full-disk tests need root, as CI runs them, or \
             password-less sudo): {}",
            path.display(),
            super::text(&out.stderr).trim()
        );
        Tmpfs { path, _dir: None }
    }

    /// Fills the file system with `filler` until a write fails with ENOSPC; returns its path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        // The last bytes a page could not take.
        let _ = f.write_all(b"x");
        let _ = f.sync_all();
        assert!(
            self.free_bytes() < 4096,
            "{} is not full: {} bytes free",
            self.path.display(),
            self.free_bytes()
        );
        filler
    }

    /// Removes what [`Tmpfs::fill`] wrote: space is back.
    pub fn unfill(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }

    /// Free bytes, as statvfs sees them.
    pub fn free_bytes(&self) -> u64 {
        let out = super::run(Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&self.path));
        let text = super::text(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        it.next().unwrap() * it.next().unwrap()
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a child (a service under test) may still hold a file open for a moment.
        let out = as_root("umount").arg("-l").arg(&self.path).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("cannot unmount the test tmpfs {}: {out:?}", self.path.display());
        }
    }
}

/// `id FLAG`'s answer (`-u`: the user id, `-g`: the group id).
fn id(flag: &str) -> String {
    super::text(&super::run(Command::new("id").arg(flag)).stdout).trim().to_string()
}

/// `program` run as root: directly when the tests run as root (CI), else through `sudo -n`
/// (which fails at once, with its reason, rather than asking for a password).
fn as_root(program: &str) -> Command {
    if id("-u") == "0" {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}
