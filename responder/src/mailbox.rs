//! The app mailbox (`docs/app-protocol.md`, section 7): liveness written straight into the
//! acpimon region through the ivshmem device's BAR2, no serial port involved.
//!
//! The region is mapped from the device's sysfs `resource2` file with `MAP_SHARED`; every field
//! is a little-endian `u32` written with one aligned volatile 32-bit store. A beat follows the
//! sequence rule: `seq` becomes odd, a barrier, the fields, a barrier, `seq` becomes even
//! (`(seq + 1) | 1`, then `+ 1`, as the AML does for its record, so an interrupted writer's odd
//! value still leads to an even one).
//!
//! Before writing anything it checks that the mapped memory is an acpimon region (the header's
//! `"AMON"` magic at offset 0), so a foreign ivshmem device is never written to.
//!
//! This module holds the crate's memory `unsafe`: the mapping, its unmapping, and the volatile
//! accesses, all through [`Mailbox`], which keeps every offset in bounds and aligned.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use crate::json::truncate_utf8;
use crate::status::Report;
use crate::{log, sys};

/// Where acpimon puts the ivshmem device by default.
pub const DEFAULT_DEVICE: &str = "/sys/bus/pci/devices/0000:00:0f.0";
/// ivshmem's PCI vendor and device id.
pub const PCI_ID: (u16, u16) = (0x1af4, 0x1110);
/// The region header's magic (`"AMON"`), at offset 0.
pub const REGION_MAGIC: u32 = u32::from_le_bytes(*b"AMON");
/// `"APPM"`: the mailbox has been written.
pub const MAGIC: u32 = u32::from_le_bytes(*b"APPM");
/// The mailbox layout version.
pub const VERSION: u32 = 1;
/// Offset of the mailbox in the region, and of its fields (section 7's table).
pub const OFFSET: usize = 0x100;
const MAGIC_AT: usize = OFFSET;
const VERSION_AT: usize = OFFSET + 0x04;
const SEQ_AT: usize = OFFSET + 0x08;
const BEATS_AT: usize = OFFSET + 0x0c;
const STATUS_AT: usize = OFFSET + 0x10;
const PID_AT: usize = OFFSET + 0x14;
const UPTIME_AT: usize = OFFSET + 0x18;
const PERIOD_AT: usize = OFFSET + 0x1c;
const TEXT_AT: usize = OFFSET + 0x20;
/// Bytes of the `text` field.
pub const TEXT_LEN: usize = 96;
/// The end of the mailbox layout: the mapping must reach it.
pub const END: usize = TEXT_AT + TEXT_LEN;
/// How much of BAR2 is mapped (the header and the mailbox layout lie in its first page).
const MAP_LEN: usize = 4096;

/// The mapped region of one ivshmem device.
#[derive(Debug)]
pub struct Mailbox {
    base: NonNull<u8>,
    len: usize,
    source: PathBuf,
}

impl Mailbox {
    /// Maps `path` (a `resource2` file, or any file holding a region) and checks the magic.
    pub fn map(path: &Path) -> Result<Mailbox, String> {
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let size = file.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?.len();
        if size < END as u64 {
            return Err(format!("{} is {size} bytes, too small for the mailbox", path.display()));
        }
        let len = (size as usize).min(MAP_LEN);
        // SAFETY: mapping a new shared read/write view of `len` bytes (checked not to exceed
        // the file) of an open file at offset 0; the kernel picks the address, so no existing
        // memory is affected. The result is checked against MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("cannot map {}: {}", path.display(), std::io::Error::last_os_error()));
        }
        // The mapping stays valid after the file is closed.
        let base = NonNull::new(p.cast::<u8>()).ok_or("mmap returned a null mapping")?;
        let mb = Mailbox { base, len, source: path.to_path_buf() };
        let magic = mb.load(0);
        if magic != REGION_MAGIC {
            return Err(format!(
                "{} holds no acpimon region (magic {magic:#010x}, want {REGION_MAGIC:#010x} \"AMON\")",
                path.display()
            ));
        }
        Ok(mb)
    }

    /// The file mapped.
    pub fn source(&self) -> &Path {
        &self.source
    }

    fn slot(&self, off: usize) -> *mut u32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len, "mailbox offset {off:#x} out of bounds");
        // SAFETY: `off + 4 <= len` (asserted), so the result stays inside the mapping that
        // `base` starts; `base` is page-aligned and `off` a multiple of 4, so it is aligned.
        unsafe { self.base.as_ptr().add(off).cast::<u32>() }
    }

    /// Reads the little-endian `u32` at `off`.
    pub fn load(&self, off: usize) -> u32 {
        // SAFETY: `slot` returns an aligned pointer inside our live mapping; the memory is
        // shared with the host, so it is only ever accessed volatilely, never through a
        // reference.
        u32::from_le(unsafe { self.slot(off).read_volatile() })
    }

    /// Writes `v` as a little-endian `u32` at `off` (one aligned 32-bit store).
    pub fn store(&self, off: usize, v: u32) {
        // SAFETY: as in `load`; the mapping is writable (PROT_WRITE).
        unsafe { self.slot(off).write_volatile(v.to_le()) }
    }

    /// One beat: the whole layout under the sequence lock.
    pub fn beat(&self, report: &Report, period_ms: u32, pid: u32, uptime_ms: u64) {
        let odd = self.load(SEQ_AT).wrapping_add(1) | 1;
        self.store(SEQ_AT, odd);
        fence(Ordering::SeqCst);
        self.store(MAGIC_AT, MAGIC);
        self.store(VERSION_AT, VERSION);
        self.store(BEATS_AT, self.load(BEATS_AT).wrapping_add(1));
        self.store(STATUS_AT, report.status.mailbox_code());
        self.store(PID_AT, pid);
        self.store(UPTIME_AT, uptime_ms as u32);
        self.store(PERIOD_AT, period_ms);
        let mut text = [0u8; TEXT_LEN];
        let details = truncate_utf8(report.details.as_deref().unwrap_or(""), TEXT_LEN);
        text[..details.len()].copy_from_slice(details.as_bytes());
        for (i, w) in text.chunks_exact(4).enumerate() {
            self.store(TEXT_AT + 4 * i, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        fence(Ordering::SeqCst);
        self.store(SEQ_AT, odd.wrapping_add(1));
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `map`, unmapped only here; no
        // reference into it exists (all access is through raw volatile pointers).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn read_id(dir: &Path, name: &str) -> Option<u16> {
    let t = std::fs::read_to_string(dir.join(name)).ok()?;
    u16::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok()
}

/// Whether the PCI function in `dir` is an ivshmem device.
pub fn is_ivshmem(dir: &Path) -> bool {
    (read_id(dir, "vendor"), read_id(dir, "device")) == (Some(PCI_ID.0), Some(PCI_ID.1))
}

/// The devices to try: the one given (whatever it is: the map's magic check decides), else
/// the default slot if it is ivshmem, then every other ivshmem device in sysfs.
pub fn candidates(given: Option<&Path>, sysfs_devices: &Path) -> Vec<PathBuf> {
    if let Some(dir) = given {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    let default = Path::new(DEFAULT_DEVICE);
    if is_ivshmem(default) {
        out.push(default.to_path_buf());
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(sysfs_devices)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    all.sort();
    for d in all {
        let same = d.file_name() == default.file_name() && sysfs_devices == Path::new("/sys/bus/pci/devices");
        if !same && is_ivshmem(&d) {
            out.push(d);
        }
    }
    out
}

/// Makes sure the device decodes its memory BAR (PCI command register bit 1): firmware
/// normally enables it; if not, asks the kernel to (`enable`).
fn ensure_memory_decode(dir: &Path) {
    let Ok(cfg) = std::fs::read(dir.join("config")) else { return };
    if cfg.len() >= 6 && cfg[4] & 0x2 == 0 {
        log!("mailbox: {} does not decode memory; enabling the device", dir.display());
        if let Err(e) =
            OpenOptions::new().write(true).open(dir.join("enable")).and_then(|mut f| f.write_all(b"1"))
        {
            log!("mailbox: cannot enable {}: {e}", dir.display());
        }
    }
}

/// Finds and maps the mailbox: the first candidate whose `resource2` maps and holds a region.
pub fn open(given: Option<&Path>) -> Result<Mailbox, String> {
    let cands = candidates(given, Path::new("/sys/bus/pci/devices"));
    if cands.is_empty() {
        return Err(format!(
            "no ivshmem device ({:04x}:{:04x}) in /sys/bus/pci/devices; name one with --mailbox DIR",
            PCI_ID.0, PCI_ID.1
        ));
    }
    let mut errors = Vec::new();
    for dir in cands {
        ensure_memory_decode(&dir);
        match Mailbox::map(&dir.join("resource2")) {
            Ok(mb) => return Ok(mb),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

/// The mailbox thread: beats every `period` with the status file's report, for ever; retries
/// (backing off to 30 s) while the device cannot be found or mapped.
pub fn run(device: Option<PathBuf>, status_file: Option<PathBuf>, period: Duration) -> ! {
    let period_ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    let pid = std::process::id();
    let mut backoff = Duration::from_secs(1);
    let mut last_error = String::new();
    loop {
        let mb = match open(device.as_deref()) {
            Ok(mb) => mb,
            Err(e) => {
                if e != last_error {
                    log!("mailbox: {e} (retrying)");
                    last_error = e;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        log!("mailbox: beating every {period_ms} ms into {}", mb.source().display());
        let mut next = Instant::now();
        loop {
            let report = Report::read(status_file.as_deref());
            mb.beat(&report, period_ms, pid, sys::monotonic_ms());
            next += period;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now; // fell behind (a stopped VM): don't burst
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn region_file(name: &str, size: usize, magic: u32) -> PathBuf {
        let p = std::env::temp_dir().join(format!("acpimon-responder-{name}-{}", std::process::id()));
        let mut bytes = vec![0u8; size];
        bytes[..4].copy_from_slice(&magic.to_le_bytes());
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_beat_writes_the_documented_layout() {
        let p = region_file("beat", 4096, REGION_MAGIC);
        let mb = Mailbox::map(&p).unwrap();
        mb.beat(&Report::new(Status::Degraded, "disk nearly full"), 1000, 4242, 0x1_0000_0005);
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[0x100..0x104], b"APPM");
        assert_eq!(u32_at(&b, 0x104), 1);
        assert_eq!(u32_at(&b, 0x108), 2, "seq: odd while writing, even when done");
        assert_eq!(u32_at(&b, 0x10c), 1);
        assert_eq!(u32_at(&b, 0x110), 2);
        assert_eq!(u32_at(&b, 0x114), 4242);
        assert_eq!(u32_at(&b, 0x118), 5, "uptime: low 32 bits");
        assert_eq!(u32_at(&b, 0x11c), 1000);
        assert_eq!(&b[0x120..0x130], b"disk nearly full");
        assert!(b[0x130..0x180].iter().all(|&x| x == 0), "text is NUL-padded");
        assert!(b[0x180..].iter().all(|&x| x == 0), "nothing past the layout");
        assert!(b[4..0x100].iter().all(|&x| x == 0), "nothing before the mailbox");

        mb.beat(&Report::new(Status::Ok, &"é".repeat(100)), 1000, 4242, 6);
        let b = std::fs::read(&p).unwrap();
        assert_eq!((u32_at(&b, 0x108), u32_at(&b, 0x10c), u32_at(&b, 0x110)), (4, 2, 1));
        assert_eq!(std::str::from_utf8(&b[0x120..0x180]).unwrap(), "é".repeat(48), "cut at a character");
        drop(mb);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn an_interrupted_writer_leaves_seq_odd_and_the_next_beat_even() {
        let p = region_file("odd", 4096, REGION_MAGIC);
        let mb = Mailbox::map(&p).unwrap();
        mb.store(SEQ_AT, 7);
        mb.store(BEATS_AT, 41);
        mb.beat(&Report::ok(), 50, 1, 0);
        assert_eq!((mb.load(SEQ_AT), mb.load(BEATS_AT)), (10, 42), "beats continue across restarts");
        drop(mb);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn refuses_foreign_or_small_regions() {
        let p = region_file("foreign", 4096, 0x1234_5678);
        let e = Mailbox::map(&p).unwrap_err();
        assert!(e.contains("no acpimon region"), "{e}");
        assert!(std::fs::read(&p).unwrap()[4..].iter().all(|&x| x == 0), "nothing written");
        std::fs::remove_file(&p).unwrap();
        let p = region_file("small", 0x17c, REGION_MAGIC);
        assert!(Mailbox::map(&p).unwrap_err().contains("too small"));
        std::fs::remove_file(&p).unwrap();
        assert!(Mailbox::map(Path::new("/no/such/resource2")).is_err());
    }

    #[test]
    fn finds_ivshmem_devices_in_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("acpimon-responder-pci-{}", std::process::id()));
        for (slot, vendor, device) in [
            ("0000:00:03.0", "0x1af4", "0x1110"),
            ("0000:00:02.0", "0x1234", "0x1111"),
            ("0000:00:05.0", "0x1af4", "0x1110"),
        ] {
            let d = root.join(slot);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{device}\n")).unwrap();
        }
        let got = candidates(None, &root);
        let want: Vec<PathBuf> =
            [DEFAULT_DEVICE].iter().map(PathBuf::from).filter(|d| is_ivshmem(d)).collect();
        let mut want = want;
        want.extend([root.join("0000:00:03.0"), root.join("0000:00:05.0")]);
        assert_eq!(got, want);
        assert_eq!(candidates(Some(&root.join("x")), &root), vec![root.join("x")]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
