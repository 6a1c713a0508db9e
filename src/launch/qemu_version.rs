//! Which QEMU acpimon adds its options for. QEMU 6.0 brought `-action`; 5.2 (Debian
//! bullseye) refuses it, and there pvpanic's built-in behaviour applies instead (measured on
//! 5.2 with `-no-shutdown`: `GUEST_PANICKED` with action `pause`, then `STOP`, and
//! `query-status` says `guest-panicked`; without `-no-shutdown` QEMU then powers off).
//! The supported range is 5.2 to 10.x.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

/// A QEMU version, major.minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
}

/// The oldest QEMU acpimon is tested with.
pub const OLDEST: QemuVersion = QemuVersion { major: 5, minor: 2 };
/// The first QEMU with `-action`.
pub const WITH_ACTION: QemuVersion = QemuVersion { major: 6, minor: 0 };

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    #[error("'{0}' is not a QEMU version; give MAJOR.MINOR, e.g. 5.2 or 10.0")]
    Bad(String),
    #[error("QEMU {0} is older than {OLDEST}, the oldest acpimon supports; use QEMU {OLDEST} or later")]
    TooOld(QemuVersion),
    #[error("cannot run `{program} --version`: {why}; give the QEMU binary with --qemu, or its version with --qemu-version")]
    Probe { program: String, why: String },
}

impl QemuVersion {
    /// Whether this QEMU takes `-action` (and the `[action]` config group).
    pub fn has_action(self) -> bool {
        self >= WITH_ACTION
    }

    /// Parses `qemu-system-x86_64 --version`'s first line:
    /// `QEMU emulator version 5.2.0 (Debian 1:5.2+dfsg-11+deb11u3)`.
    pub fn from_version_output(text: &str) -> Option<QemuVersion> {
        let line = text.lines().next()?;
        let rest = line.split("version ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for QemuVersion {
    type Err = VersionError;

    /// `MAJOR.MINOR` or `MAJOR.MINOR.MICRO`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VersionError::Bad(s.to_string());
        let mut parts = s.trim().split('.');
        let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        if parts.next().is_some_and(|p| p.parse::<u32>().is_err()) || parts.next().is_some() {
            return Err(bad());
        }
        Ok(QemuVersion { major, minor })
    }
}

/// Checks that acpimon supports `v`.
pub fn supported(v: QemuVersion) -> Result<QemuVersion, VersionError> {
    if v < OLDEST {
        return Err(VersionError::TooOld(v));
    }
    Ok(v)
}

/// Runs `program --version` once per program for the life of the process.
pub fn probe(program: &str) -> Result<QemuVersion, VersionError> {
    static CACHE: OnceLock<Mutex<HashMap<String, QemuVersion>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(program) {
        return Ok(*v);
    }
    let fail = |why: String| VersionError::Probe { program: program.to_string(), why };
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = QemuVersion::from_version_output(&text)
        .filter(|_| out.status.success())
        .ok_or_else(|| fail(format!("it printed {:?}", text.lines().next().unwrap_or(""))))?;
    cache.lock().unwrap_or_else(|e| e.into_inner()).insert(program.to_string(), v);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_compare() {
        let v = QemuVersion::from_version_output(
            "QEMU emulator version 5.2.0 (Debian 1:5.2+dfsg-11+deb11u3)\nCopyright (c) 2003-2020\n",
        )
        .unwrap();
        assert_eq!(v, QemuVersion { major: 5, minor: 2 });
        assert!(!v.has_action());
        assert!("6.0".parse::<QemuVersion>().unwrap().has_action());
        assert!("10.0.2".parse::<QemuVersion>().unwrap().has_action());
        assert_eq!("7.2".parse::<QemuVersion>().unwrap().to_string(), "7.2");
        for bad in ["", "7", "seven.2", "7.2.x", "7.2.0.1"] {
            assert_eq!(bad.parse::<QemuVersion>(), Err(VersionError::Bad(bad.into())), "{bad}");
        }
        assert!(supported("4.2".parse().unwrap()).unwrap_err().to_string().contains("older than 5.2"));
    }

    #[test]
    fn a_missing_program_says_how_to_tell_the_version() {
        let e = probe("/nonexistent/qemu").unwrap_err().to_string();
        assert!(e.contains("--qemu-version"), "{e}");
    }
}
