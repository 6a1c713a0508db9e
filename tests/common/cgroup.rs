//! A CPU cgroup with a bandwidth limit, made for a test and removed when dropped: to throttle a
//! process (a spinner, a QEMU) for real. Found the way an administrator would, independently
//! of acpimon's own reader: the cgroup v1 hierarchy mounted with the `cpu` controller when the
//! host has one (a hybrid host), else the cgroup2 mount, whose root then delegates `cpu` to
//! its children (`+cpu` in `cgroup.subtree_control`). Needs root (CI runs the tests as root);
//! when it cannot, the test fails with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct CpuCgroup {
    pub dir: PathBuf,
    /// 1 or 2.
    pub version: u8,
}

impl CpuCgroup {
    /// A cgroup named `name` (with this process's pid appended) at the top of the hierarchy,
    /// limited to `quota_us` of CPU every `period_us`.
    pub fn create(name: &str, quota_us: u64, period_us: u64) -> CpuCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounts: Vec<(String, String, String)> = mountinfo
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let point = left.split(' ').nth(4)?.replace("\\040", " ");
                let mut r = right.split(' ');
                let fstype = r.next()?.to_string();
                let options = r.nth(1).unwrap_or("").to_string();
                Some((fstype, point, options))
            })
            .collect();
        let v1 = mounts.iter().find(|(t, _, o)| t == "cgroup" && o.split(',').any(|o| o == "cpu"));
        let v2 = mounts.iter().find(|(t, _, _)| t == "cgroup2");
        let name = format!("{name}-{}", std::process::id());
        let cg = match (v1, v2) {
            (Some((_, point, _)), _) => CpuCgroup { dir: Path::new(point).join(name), version: 1 },
            (None, Some((_, point, _))) => {
                let root = Path::new(point);
                let controllers =
                    std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                assert!(
                    controllers.split_whitespace().any(|c| c == "cpu"),
                    "the cgroup2 hierarchy at {point} has no cpu controller ({controllers:?}): this test \
                     needs a host whose kernel has CFS bandwidth control"
                );
                write(&root.join("cgroup.subtree_control"), "+cpu");
                CpuCgroup { dir: root.join(name), version: 2 }
            }
            (None, None) => {
                panic!("no cgroup hierarchy with the cpu controller is mounted (mountinfo:\n{mountinfo})")
            }
        };
        // Left over by an earlier run that was killed.
        let _ = std::fs::remove_dir(&cg.dir);
        std::fs::create_dir(&cg.dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} (tests that throttle need root, as CI runs them): {e}",
                cg.dir.display()
            )
        });
        if cg.version == 1 {
            write(&cg.dir.join("cpu.cfs_period_us"), &period_us.to_string());
            write(&cg.dir.join("cpu.cfs_quota_us"), &quota_us.to_string());
        } else {
            write(&cg.dir.join("cpu.max"), &format!("{quota_us} {period_us}"));
        }
        cg
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: u32) {
        write(&self.dir.join("cgroup.procs"), &pid.to_string());
    }

    /// `cpu.stat`'s `key`.
    pub fn stat(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {}/cpu.stat:\n{text}", self.dir.display()))
    }
}

impl Drop for CpuCgroup {
    /// Moves what is left in the cgroup to its parent and removes it (a process that just
    /// died may hold it for a moment).
    fn drop(&mut self) {
        let parent = self.dir.parent().unwrap().join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(&parent, pid);
            }
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cannot remove the test cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {text:?} to {}: {e}", path.display()));
}
