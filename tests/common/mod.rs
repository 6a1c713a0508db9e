//! Test support shared by every integration test: tools, temp dirs, and ACPICA.
//! A missing tool fails the test with the command that installs it; nothing skips.

#![allow(dead_code)]

pub mod acpica;
pub mod browser;
pub mod cgroup;
pub mod guest;
pub mod inproc;
pub mod libvirt;
pub mod metrics;
pub mod postgres;
pub mod service;
pub mod tmpfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Panics, naming the fix, if `tool` is not on PATH.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run tools/setup (it installs every tool the tests use)");
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`, panicking with its output if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The acpimon binary under test.
pub fn acpimon(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_acpimon")).args(args))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
