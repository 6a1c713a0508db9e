//! The app's own health: `ok`, `degraded` or `failed`, with optional details, read from the
//! status file (`--status-file`).
//!
//! The file's first line is `STATUS [DETAILS]`: a status word (`ok`, `degraded` or `failed`,
//! any case) and, after whitespace, free text for people. Examples: `ok`,
//! `degraded disk nearly full`. Anything else is reported rather than guessed at:
//!
//! | file | status | details |
//! |---|---|---|
//! | no `--status-file` | ok | — |
//! | file does not exist, or is empty | ok | — |
//! | first word not a status | degraded | `status file: unknown status "…"` |
//! | cannot be read (permissions, a directory, …) | degraded | `status file: <error>` |

use std::fmt;
use std::io::{ErrorKind, Read};
use std::path::Path;

use crate::json::truncate_utf8;

/// Bytes of the status file that are read (its first line should be far shorter).
pub const MAX_FILE: usize = 4096;
/// Bytes of details kept (the host keeps 1024).
pub const MAX_DETAILS: usize = 1024;

/// The app's status as the protocol names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Healthy.
    Ok,
    /// Working, with a problem (the host marks the VM `late`).
    Degraded,
    /// Not working (the host marks the VM `unresponsive` and collects diagnostics).
    Failed,
}

impl Status {
    /// The protocol's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::Failed => "failed",
        }
    }

    /// The mailbox's code for it (section 7: 1 ok, 2 degraded, 3 failed; 0 is "unknown").
    pub fn mailbox_code(self) -> u32 {
        match self {
            Status::Ok => 1,
            Status::Degraded => 2,
            Status::Failed => 3,
        }
    }

    /// Parses a status word, ignoring case.
    pub fn parse(word: &str) -> Option<Status> {
        [Status::Ok, Status::Degraded, Status::Failed]
            .into_iter()
            .find(|s| word.eq_ignore_ascii_case(s.as_str()))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status with its details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The status.
    pub status: Status,
    /// Text for people, at most [`MAX_DETAILS`] bytes; `None` when there is nothing to say.
    pub details: Option<String>,
}

impl Report {
    /// `ok` without details.
    pub fn ok() -> Report {
        Report { status: Status::Ok, details: None }
    }

    /// A report with details (cut to [`MAX_DETAILS`] bytes).
    pub fn new(status: Status, details: &str) -> Report {
        let d = truncate_utf8(details.trim(), MAX_DETAILS);
        Report { status, details: (!d.is_empty()).then(|| d.to_string()) }
    }

    /// Parses the status file's contents (see the module documentation).
    pub fn parse(contents: &[u8]) -> Report {
        let text = String::from_utf8_lossy(contents);
        let line = text.lines().next().unwrap_or("").trim();
        if line.is_empty() {
            return Report::ok();
        }
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match Status::parse(word) {
            Some(status) => Report::new(status, rest),
            None => {
                let shown = truncate_utf8(word, 64);
                Report::new(Status::Degraded, &format!("status file: unknown status \"{shown}\""))
            }
        }
    }

    /// Reads the status file; `None` (no `--status-file`) is `ok`.
    pub fn read(path: Option<&Path>) -> Report {
        let Some(path) = path else { return Report::ok() };
        let mut buf = Vec::new();
        let res = std::fs::File::open(path).and_then(|f| f.take(MAX_FILE as u64).read_to_end(&mut buf));
        match res {
            Ok(_) => Report::parse(&buf),
            Err(e) if e.kind() == ErrorKind::NotFound => Report::ok(),
            Err(e) => Report::new(Status::Degraded, &format!("status file: {e}")),
        }
    }

    /// The worse of two reports (the first one on a tie).
    pub fn worst(self, other: Report) -> Report {
        if other.status > self.status {
            other
        } else {
            self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(Report::parse(b""), Report::ok());
        assert_eq!(Report::parse(b"\n\n"), Report::ok());
        assert_eq!(Report::parse(b"ok\n"), Report::ok());
        assert_eq!(Report::parse(b"  OK  \r\n"), Report::ok());
        assert_eq!(
            Report::parse(b"degraded disk nearly full\nsecond line ignored"),
            Report::new(Status::Degraded, "disk nearly full")
        );
        assert_eq!(Report::parse(b"failed\tdb down "), Report::new(Status::Failed, "db down"));
        assert_eq!(
            Report::parse(b"sick of it"),
            Report::new(Status::Degraded, "status file: unknown status \"sick\"")
        );
        assert_eq!(Report::parse(b"\xffok").status, Status::Degraded);
    }

    #[test]
    fn details_are_bounded() {
        let long = format!("degraded {}", "é".repeat(2000));
        let r = Report::parse(long.as_bytes());
        assert!(r.details.unwrap().len() <= MAX_DETAILS);
    }

    #[test]
    fn reads_the_file() {
        let dir = std::env::temp_dir().join(format!("acpimon-responder-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("status");
        assert_eq!(Report::read(None), Report::ok());
        assert_eq!(Report::read(Some(&f)), Report::ok(), "a missing file is ok");
        std::fs::write(&f, "failed out of memory\n").unwrap();
        assert_eq!(Report::read(Some(&f)), Report::new(Status::Failed, "out of memory"));
        let r = Report::read(Some(&dir));
        assert_eq!(r.status, Status::Degraded, "a directory cannot be read: {r:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worst_wins() {
        let ok = Report::ok();
        let bad = Report::new(Status::Failed, "x");
        assert_eq!(ok.clone().worst(bad.clone()), bad);
        assert_eq!(bad.clone().worst(ok), bad);
    }
}
