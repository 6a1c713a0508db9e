//! The writer: the one thread that touches the disk for events and state files, so that no
//! async worker (and no VM's loop) ever waits on a write or an fsync.
//!
//! It takes jobs from an unbounded channel, in order, and handles whatever has queued up as
//! one batch: the batch's log lines are appended with one write and made durable with one
//! `fdatasync`; then its spool entries are written (each: temporary file, fsync, rename), the
//! spool directory is fsynced once, and only then are the entries handed to the sender; then
//! its state files are replaced (the newest version of each, with
//! [`crate::util::fs::replace`]) or removed, each directory fsynced once; last, the batch's
//! events are counted as *acknowledged* ([`ForwardStats::events_logged`]). So an event the
//! controller received, or that the counter includes, is on disk in the log (and was in the
//! spool), and survives `kill -9` and power loss. A burst costs a few fsyncs per batch, not
//! three per event. If the disk stalls, accepted events wait in memory; no VM's loop waits.
//!
//! Failures are reported on stderr and counted ([`ForwardStats::write_failures`]); the writer
//! goes on with the next batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use super::spool::Spool;
use super::ForwardStats;
use crate::util::fs as ufs;
use crate::util::lock;

/// The most jobs handled as one batch (bounds the memory a batch holds).
const MAX_BATCH: usize = 1024;

pub(super) enum Job {
    /// An event's JSON (without the newline), and its reserved spool slot.
    Event { json: Arc<[u8]>, spool_seq: Option<u64> },
    /// Replace a state file with these bytes, or (`None`) remove it.
    Save { path: PathBuf, bytes: Option<Vec<u8>> },
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// What the writer thread owns.
pub(super) struct Writer {
    pub log: Option<(PathBuf, File)>,
    pub spool: Option<Arc<Spool>>,
    pub stats: Arc<Mutex<ForwardStats>>,
    /// Wakes the sender when entries are ready.
    pub wake: Arc<Notify>,
}

impl Writer {
    /// Runs until every sender of `jobs` is gone and the queue is empty.
    pub fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.write_batch(batch);
        }
    }

    fn write_batch(&mut self, batch: Vec<Job>) {
        let mut lines = Vec::new();
        let mut events = 0u64;
        let mut entries = Vec::new();
        let mut saves = BTreeMap::new();
        let mut flushes = Vec::new();
        for job in batch {
            match job {
                Job::Event { json, spool_seq } => {
                    events += 1;
                    lines.extend_from_slice(&json);
                    lines.push(b'\n');
                    if let Some(seq) = spool_seq {
                        entries.push((seq, json));
                    }
                }
                // A later version of the same file replaces an earlier one of the batch.
                Job::Save { path, bytes } => {
                    saves.insert(path, bytes);
                }
                Job::Flush(tx) => flushes.push(tx),
            }
        }
        let mut failures = Vec::new();
        let mut logged = true;
        if let Some((path, file)) = &mut self.log {
            if !lines.is_empty() {
                // One write of whole lines to an O_APPEND file, then one fsync for the batch.
                if let Err(e) = file.write_all(&lines).and_then(|()| file.sync_data()) {
                    logged = false;
                    failures.push(format!(
                        "cannot append to event log {}: {e}; is the disk full?",
                        path.display()
                    ));
                }
            }
        }
        if let Some(spool) = &self.spool {
            if !entries.is_empty() {
                let written: Vec<(u64, io::Result<()>)> =
                    entries.iter().map(|(seq, json)| (*seq, spool.write(*seq, json))).collect();
                if let Err(e) = spool.sync() {
                    failures.push(format!("cannot fsync spool {}: {e}", spool.dir().display()));
                }
                for (seq, result) in written {
                    if let Err(e) = &result {
                        failures.push(format!(
                            "cannot write spool entry {seq} in {}: {e}; is the disk full? The event is only in the log",
                            spool.dir().display()
                        ));
                    }
                    spool.finish(seq, result.is_ok());
                }
                self.wake.notify_one();
            }
        }
        let mut dirs = Vec::new();
        for (path, bytes) in saves {
            let dir = ufs::parent(&path).to_path_buf();
            let saved = match bytes {
                Some(bytes) => {
                    std::fs::create_dir_all(&dir).and_then(|()| ufs::replace(&path, &bytes, 0o666))
                }
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                },
            };
            match saved {
                Ok(()) if !dirs.contains(&dir) => dirs.push(dir),
                Ok(()) => {}
                Err(e) => failures.push(format!("cannot save {}: {e}", path.display())),
            }
        }
        for dir in dirs {
            if let Err(e) = ufs::sync_dir(&dir) {
                failures.push(format!("cannot fsync {}: {e}", dir.display()));
            }
        }
        for f in &failures {
            tracing::error!("event writer: {f}");
        }
        {
            let mut s = lock(&self.stats);
            if logged {
                s.events_logged += events;
            }
            s.write_failures += failures.len() as u64;
            if let Some(last) = failures.pop() {
                s.last_write_error = Some(last);
            }
        }
        for tx in flushes {
            let _ = tx.send(());
        }
    }
}

/// Cuts a torn last line (a crash in the middle of an append, never acknowledged) off the log
/// `file`, so that every line of it is a whole event; returns how many bytes were cut.
pub(super) fn cut_torn_tail(file: &mut File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end != len {
        file.set_len(end)?;
        file.sync_data()?;
    }
    Ok(len - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_is_cut_and_whole_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let open = || std::fs::OpenOptions::new().read(true).append(true).open(&p).unwrap();
        std::fs::write(&p, b"").unwrap();
        assert_eq!(cut_torn_tail(&mut open()).unwrap(), 0);
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}\n").unwrap();
        assert_eq!(cut_torn_tail(&mut open()).unwrap(), 0);
        std::fs::write(&p, b"{\"a\":1}\n{\"b\":2}\n{\"c\"").unwrap();
        assert_eq!(cut_torn_tail(&mut open()).unwrap(), 4);
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        // A torn line longer than the read block, and a file of one torn line.
        let mut long = b"{\"a\":1}\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        std::fs::write(&p, &long).unwrap();
        assert_eq!(cut_torn_tail(&mut open()).unwrap(), 200_000);
        std::fs::write(&p, b"torn").unwrap();
        assert_eq!(cut_torn_tail(&mut open()).unwrap(), 4);
        assert_eq!(std::fs::read(&p).unwrap(), b"");
    }
}
