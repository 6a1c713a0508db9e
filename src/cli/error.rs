//! Every failure an `acpimon` command can end with, and its exit status.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::generate::ConfigError;
use crate::launch::{PrepareError, VmError};
use crate::read::RegionError;
use crate::run::RunError;

/// acpimon's own runtime failure (region unreadable, I/O, a service not answering).
pub const RUNTIME: u8 = 1;
/// Bad input: options or files; the message names the problem and the fix.
pub const BAD_INPUT: u8 = 2;
/// `acpimon run` reports QEMU's exit status N as `QEMU_BASE + N`, clear of acpimon's own.
const QEMU_BASE: u8 = 64;
/// The highest status a QEMU exit status maps to (127: shells keep 128 and up for signals).
const QEMU_MAX: u8 = 127;

/// The exit status `acpimon run` ends with when QEMU ended with `status`: exit status N
/// (1..) as 64 + N, N above 63 as 127; killed by signal S as 128 + S, as a shell reports it.
/// `None` when QEMU exited 0.
pub fn qemu_exit_code(status: ExitStatus) -> Option<u8> {
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(n), _) => Some(u8::try_from(n).map_or(QEMU_MAX, |n| QEMU_BASE.saturating_add(n).min(QEMU_MAX))),
        (None, Some(s)) => Some(u8::try_from(s).map_or(u8::MAX, |s| 128u8.saturating_add(s))),
        (None, None) => Some(QEMU_MAX),
    }
}

/// Every failure a command can end with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot write {path}: {source}; check that its directory exists and is writable")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("no QEMU command given: put it after `--`, e.g. `acpimon run -- qemu-system-x86_64 ...`")]
    NoQemu,
    #[cfg(feature = "controller")]
    #[error(transparent)]
    Demo(#[from] crate::demo::DemoError),
    #[error(
        "no test guest given: pass --guest DIR or set ACPIMON_GUEST to the directory \
         qemu-fixtures/build-guest prints (tools/demo does both)"
    )]
    NoGuest,
    #[error(transparent)]
    WatchConfig(#[from] crate::watch::config::ConfigErrors),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[cfg(feature = "controller")]
    #[error(transparent)]
    Controller(#[from] crate::controller::ControllerError),
    #[error("{0}")]
    Status(String),
    #[error("the guest's console: {0}")]
    Console(#[from] crate::launch::console::ConsoleError),
    #[error(transparent)]
    QemuConfig(#[from] crate::launch::qemu_config::QemuConfigError),
    #[error(transparent)]
    QemuVersion(#[from] crate::launch::qemu_version::VersionError),
    #[error("the VM's QEMU configuration collides with acpimon's additions: {}", .0.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; "))]
    Conflicts(Vec<crate::launch::conflicts::Conflict>),
    #[error("--slot auto found no free PCI slot on the root bus; move a device behind a PCIe root port or bridge, or give --slot")]
    NoFreeSlot,
    #[error("--console libvirt is for a libvirt domain: add --format libvirt")]
    ConsoleNeedsLibvirt,
    #[error(transparent)]
    Dmesg(#[from] crate::memory::dmesg::DmesgError),
    #[cfg(feature = "controller")]
    #[error(transparent)]
    Token(#[from] crate::controller::auth::AuthError),
}

impl Error {
    /// The process's exit status for this failure (see `acpimon --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Launch(_) | Error::Prepare(_) | Error::WatchConfig(_) => BAD_INPUT,
            Error::Console(_)
            | Error::QemuConfig(_)
            | Error::QemuVersion(_)
            | Error::Conflicts(_)
            | Error::NoFreeSlot
            | Error::ConsoleNeedsLibvirt => BAD_INPUT,
            Error::NoQemu | Error::NoGuest => BAD_INPUT,
            #[cfg(feature = "controller")]
            Error::Demo(crate::demo::DemoError::Fixture(_)) => BAD_INPUT,
            Error::Region(e) if is_bad_input(e) => BAD_INPUT,
            Error::Dmesg(crate::memory::dmesg::DmesgError::Descriptor(_)) => BAD_INPUT,
            #[cfg(feature = "controller")]
            Error::Token(e) => match e {
                crate::controller::auth::AuthError::Write { .. } => RUNTIME,
                _ => BAD_INPUT,
            },
            #[cfg(feature = "controller")]
            Error::Controller(
                crate::controller::ControllerError::PlainBeyondLoopback(_)
                | crate::controller::ControllerError::OpenBeyondLoopback(_)
                | crate::controller::ControllerError::Tls(_)
                | crate::controller::ControllerError::Tokens(_)
                | crate::controller::ControllerError::EmptyAnalyzer,
            ) => BAD_INPUT,
            Error::Run(e) => match e {
                RunError::Prepare(_)
                | RunError::Vm(
                    VmError::Conflicts(_)
                    | VmError::Console(_)
                    | VmError::QemuConfig(_)
                    | VmError::Version(_),
                ) => BAD_INPUT,
                RunError::Vm(VmError::Exited { status, .. }) | RunError::Qemu(status) => {
                    qemu_exit_code(*status).unwrap_or(RUNTIME)
                }
                _ => RUNTIME,
            },
            _ => RUNTIME,
        }
    }
}

fn is_bad_input(e: &RegionError) -> bool {
    matches!(
        e,
        RegionError::Missing(_)
            | RegionError::TooSmall { .. }
            | RegionError::TooLarge { .. }
            | RegionError::SizeConflict { .. }
            | RegionError::Decode { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_statuses_stay_clear_of_acpimons_own() {
        // A wait(2) status: exit code in the second byte, a terminating signal in the first.
        let exited = |n: i32| ExitStatus::from_raw(n << 8);
        assert_eq!(qemu_exit_code(exited(0)), None);
        assert_eq!(qemu_exit_code(exited(1)), Some(65));
        assert_eq!(qemu_exit_code(exited(2)), Some(66));
        assert_eq!(qemu_exit_code(exited(63)), Some(127));
        assert_eq!(qemu_exit_code(exited(255)), Some(127));
        assert_eq!(qemu_exit_code(ExitStatus::from_raw(9)), Some(137), "SIGKILL");
        assert_eq!(qemu_exit_code(ExitStatus::from_raw(15)), Some(143), "SIGTERM");
        for n in 1..=255 {
            let code = qemu_exit_code(exited(n)).unwrap();
            assert!(code > BAD_INPUT && code < 128, "{n} -> {code}");
        }
    }
}
