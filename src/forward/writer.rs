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
//! **A full (or failing) disk.** A log append that fails is cut back to the log's length
//! before it (`ftruncate`), so the log never holds a torn line, and its events are *held*:
//! kept in memory, in order, and written again with backoff (from [`RETRY_MIN`] doubling to
//! [`RETRY_MAX`], which is also the period of the retries while the disk stays full). The same
//! for a spool entry or a state file the disk has no room for. State files wait behind held
//! events, so a VM's remembered sequence never runs ahead of its events on disk. What is held
//! is bounded ([`HoldLimits`]): beyond the bound new events are dropped, each one counted
//! ([`ForwardStats::events_lost`]), the first of an episode logged at error level, and the
//! whole loss reported once the disk is writable again ([`Loss`], which the service turns into
//! an `events-lost` event). While anything is held, [`ForwardStats::disk_problem`] says why:
//! the service's "disk full" health condition.
//!
//! Other failures (a state file in a place that cannot be written) are reported at error
//! level and counted ([`ForwardStats::write_failures`]); the writer goes on with the next batch.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use super::spool::Spool;
use super::ForwardStats;
use crate::util::fs as ufs;
use crate::util::lock;

/// The most jobs handled as one batch (bounds the memory a batch holds).
const MAX_BATCH: usize = 1024;
/// State files written at most this long before the writer looks for new events again.
const SAVE_SLICE: Duration = Duration::from_millis(50);
/// The first retry after a failed write, doubling up to [`RETRY_MAX`].
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);
/// The longest wait between retries: while the disk stays full, a retry this often.
pub(super) const RETRY_MAX: Duration = Duration::from_secs(5);

pub(super) enum Job {
    /// An event's JSON (without the newline), its reserved spool slot and its time (for the
    /// record of a loss).
    /// `logged`: the event is in the log already (re-spooled at start, see
    /// [`super::Forwarder::respool`]).
    Event { json: Arc<[u8]>, spool_seq: Option<u64>, time: String, logged: bool },
    /// Replace a state file with these bytes, or (`None`) remove it.
    Save { path: PathBuf, bytes: Option<Vec<u8>> },
    /// Answered once everything queued before it is written (held events included).
    Flush(oneshot::Sender<()>),
}

/// How much the writer holds in memory while the disk cannot take events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldLimits {
    pub max_bytes: u64,
    pub max_events: usize,
}

impl Default for HoldLimits {
    /// 16 MiB and 50,000 events: minutes of a busy node's events, a bounded cost in memory.
    fn default() -> HoldLimits {
        HoldLimits { max_bytes: 16 << 20, max_events: 50_000 }
    }
}

/// Events dropped because the disk was full and the hold was too: how many, and the times of
/// the first and last (the events' own times, RFC 3339).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    pub count: u64,
    pub first: String,
    pub last: String,
}

/// What the writer thread owns.
pub(super) struct Writer {
    pub log: Option<(PathBuf, File)>,
    pub spool: Option<Arc<Spool>>,
    pub stats: Arc<Mutex<ForwardStats>>,
    /// Wakes the sender when entries are ready.
    pub wake: Arc<Notify>,
    pub limits: HoldLimits,
}

/// An accepted event on its way to the disk.
struct Held {
    json: Arc<[u8]>,
    spool_seq: Option<u64>,
    logged: bool,
    spooled: bool,
}

/// What waits for the disk, in order.
#[derive(Default)]
struct Pending {
    events: VecDeque<Held>,
    bytes: u64,
    /// The newest version of each state file (`None`: remove it).
    saves: BTreeMap<PathBuf, Option<Vec<u8>>>,
    flushes: Vec<oneshot::Sender<()>>,
    /// Set while the disk refuses writes: when to try again, and the delay after that.
    retry: Option<(Instant, Duration)>,
    /// The first failure of the current episode, for the health condition.
    problem: Option<String>,
    /// Events dropped and not yet reported by the service.
    loss: Option<Loss>,
}

/// Whether `e` means "no room" or a failing device: worth holding the data and trying again.
fn is_disk_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        || e.raw_os_error() == Some(5) // EIO
}

/// How a failure names the disk's state, for the health condition.
fn disk_label(e: &io::Error) -> &'static str {
    if matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) {
        "disk full"
    } else {
        "disk error"
    }
}

impl Writer {
    /// Runs until every sender of `jobs` is gone and the queue is empty; what is still held
    /// then gets one last try, and is reported lost if the disk still refuses it.
    pub fn run(mut self, jobs: Receiver<Job>) {
        let mut p = Pending::default();
        loop {
            let first = match p.retry {
                // State files left from the last slice: new events first, then more of them.
                None if !p.saves.is_empty() => match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                },
                None => match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                },
                Some((at, _)) => match jobs.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch: Vec<Job> = first.into_iter().collect();
            while !batch.is_empty() && batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.take(&mut p, batch);
            // While the disk refuses writes, new jobs only queue until the next retry.
            if p.retry.is_none_or(|(at, _)| Instant::now() >= at) {
                self.write_pending(&mut p);
            }
            self.publish(&mut p);
        }
        while !p.events.is_empty() || !p.saves.is_empty() {
            let before = (p.events.len(), p.saves.len());
            self.write_pending(&mut p);
            // The disk refused: what is left is reported below.
            if p.retry.is_some() || (p.events.len(), p.saves.len()) == before {
                break;
            }
        }
        if !p.events.is_empty() {
            let n = p.events.len();
            tracing::error!(
                "event writer: stopping with {n} accepted events the disk would not take; they are lost \
                 (free space on the data directory's file system)"
            );
            for h in p.events.drain(..) {
                if let (Some(spool), Some(seq), false) = (&self.spool, h.spool_seq, h.spooled) {
                    spool.finish(seq, false);
                }
            }
            lock(&self.stats).events_lost += n as u64;
        }
        if !p.saves.is_empty() {
            let names: Vec<String> = p.saves.keys().map(|k| k.display().to_string()).collect();
            tracing::error!(
                "event writer: stopping with state files the disk would not take: {}",
                names.join(", ")
            );
        }
        self.publish(&mut p);
    }

    /// Queues a batch's jobs; drops (and counts) events beyond the hold's bounds while the
    /// disk refuses writes.
    fn take(&mut self, p: &mut Pending, batch: Vec<Job>) {
        for job in batch {
            match job {
                Job::Event { json, spool_seq, time, logged } => {
                    let size = json.len() as u64 + 1;
                    let full = p.events.len() >= self.limits.max_events
                        || p.bytes.saturating_add(size) > self.limits.max_bytes;
                    if p.retry.is_some() && full {
                        self.drop_event(p, spool_seq, time);
                        continue;
                    }
                    p.bytes += size;
                    p.events.push_back(Held { json, spool_seq, logged, spooled: spool_seq.is_none() });
                }
                // A later version of the same file replaces an earlier one.
                Job::Save { path, bytes } => {
                    p.saves.insert(path, bytes);
                }
                Job::Flush(tx) => p.flushes.push(tx),
            }
        }
    }

    fn drop_event(&mut self, p: &mut Pending, spool_seq: Option<u64>, time: String) {
        if let (Some(spool), Some(seq)) = (&self.spool, spool_seq) {
            spool.finish(seq, false);
        }
        lock(&self.stats).events_lost += 1;
        match &mut p.loss {
            Some(l) if l.count > 0 => {
                l.count += 1;
                l.last = time;
            }
            _ => {
                tracing::error!(
                    held_events = p.events.len(),
                    held_bytes = p.bytes,
                    "event writer: the disk refuses writes ({}) and the events held in memory reached \
                     their bound (event_hold_max / event_hold_max_events): new events are DROPPED and \
                     counted (acpimon_forward_events_lost_total) until the disk takes writes again; free \
                     space on the data directory's file system",
                    p.problem.as_deref().unwrap_or("?")
                );
                p.loss = Some(Loss { count: 1, first: time.clone(), last: time });
            }
        }
    }

    /// Tries to write everything pending, in order: log lines, spool entries, then (once no
    /// event waits) state files. Sets or clears the retry.
    fn write_pending(&mut self, p: &mut Pending) {
        let mut failures: Vec<String> = Vec::new();
        // The first disk error of this attempt: the writer holds and retries.
        let mut refused: Option<String> = None;

        // 1. The log: the events not yet in it are a suffix of the queue, appended whole.
        let unlogged = p.events.iter().position(|h| !h.logged).unwrap_or(p.events.len());
        if unlogged < p.events.len() {
            match &mut self.log {
                None => p.events.iter_mut().for_each(|h| h.logged = true),
                Some((path, file)) => {
                    let mut lines = Vec::new();
                    for h in p.events.range(unlogged..).filter(|h| !h.logged) {
                        lines.extend_from_slice(&h.json);
                        lines.push(b'\n');
                    }
                    match append_whole(file, &lines) {
                        Ok(()) => p.events.range_mut(unlogged..).for_each(|h| h.logged = true),
                        Err(e) => {
                            let msg = format!(
                                "{}: cannot append to event log {}: {e}; free space on its file system",
                                disk_label(&e),
                                path.display()
                            );
                            refused.get_or_insert(msg.clone());
                            failures.push(msg);
                        }
                    }
                }
            }
        }

        // 2. The spool, for events already logged.
        if let Some(spool) = &self.spool {
            // Indices into the queue of the entries written, made ready once the directory is
            // synced.
            let mut written = Vec::new();
            for (i, h) in p.events.iter_mut().enumerate().filter(|(_, h)| h.logged && !h.spooled) {
                let Some(seq) = h.spool_seq else { continue };
                match spool.write(seq, &h.json) {
                    Ok(()) => written.push(i),
                    Err(e) if is_disk_error(&e) => {
                        let msg = format!(
                            "{}: cannot write spool entry {seq} in {}: {e}; free space on its file system",
                            disk_label(&e),
                            spool.dir().display()
                        );
                        refused.get_or_insert(msg.clone());
                        failures.push(msg);
                        break;
                    }
                    Err(e) => {
                        failures.push(format!(
                            "cannot write spool entry {seq} in {}: {e}; the event is only in the log",
                            spool.dir().display()
                        ));
                        spool.finish(seq, false);
                        h.spooled = true;
                    }
                }
            }
            if !written.is_empty() {
                match spool.sync() {
                    Ok(()) => {
                        for i in written {
                            let h = &mut p.events[i];
                            h.spooled = true;
                            if let Some(seq) = h.spool_seq {
                                spool.finish(seq, true);
                            }
                        }
                        self.wake.notify_one();
                    }
                    Err(e) => {
                        let msg = format!("cannot fsync spool {}: {e}", spool.dir().display());
                        refused.get_or_insert(msg.clone());
                        failures.push(msg);
                    }
                }
            }
        }

        // 3. Acknowledged: the front of the queue that is in the log and the spool.
        let mut acknowledged = 0u64;
        while p.events.front().is_some_and(|h| h.logged && h.spooled) {
            let h = p.events.pop_front().expect("front exists");
            p.bytes -= h.json.len() as u64 + 1;
            acknowledged += 1;
        }

        // 4. State files, once no event waits before them.
        if p.events.is_empty() && !p.saves.is_empty() {
            let mut dirs = Vec::new();
            // Each file costs an fsync: when thousands of VMs change state at once, they are
            // written a slice at a time, so that the events that come meanwhile (a VM's
            // `unresponsive` after its `late`) are not queued behind all of them.
            let started = Instant::now();
            let mut all = std::mem::take(&mut p.saves).into_iter();
            for (path, bytes) in all.by_ref() {
                if started.elapsed() >= SAVE_SLICE {
                    p.saves.insert(path, bytes);
                    break;
                }
                let dir = ufs::parent(&path).to_path_buf();
                let saved = match &bytes {
                    Some(bytes) => {
                        std::fs::create_dir_all(&dir).and_then(|()| ufs::replace(&path, bytes, 0o666))
                    }
                    None => match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                        _ => Ok(()),
                    },
                };
                match saved {
                    Ok(()) if !dirs.contains(&dir) => dirs.push(dir),
                    Ok(()) => {}
                    Err(e) if is_disk_error(&e) => {
                        let msg = format!("{}: cannot save {}: {e}", disk_label(&e), path.display());
                        refused.get_or_insert(msg.clone());
                        failures.push(msg);
                        p.saves.insert(path, bytes);
                    }
                    Err(e) => failures.push(format!("cannot save {}: {e}", path.display())),
                }
            }
            p.saves.extend(all);
            for dir in dirs {
                if let Err(e) = ufs::sync_dir(&dir) {
                    failures.push(format!("cannot fsync {}: {e}", dir.display()));
                }
            }
        }

        // Report: every failure while the disk is fine; only the first of a full-disk episode
        // (the retries are counted, not logged).
        let first_of_episode = p.retry.is_none();
        for f in &failures {
            if refused.as_ref() != Some(f) || first_of_episode {
                tracing::error!("event writer: {f}");
            }
        }
        if first_of_episode {
            if let Some(why) = &refused {
                tracing::error!(
                    held_events = p.events.len(),
                    "event writer: holding events in memory and retrying every {} at most: {why}",
                    crate::units::format_duration(RETRY_MAX)
                );
            }
        }
        p.retry = match (&refused, p.retry) {
            (None, prev) => {
                if prev.is_some() {
                    tracing::info!(
                        lost = p.loss.as_ref().map_or(0, |l| l.count),
                        "event writer: the disk takes writes again; every held event is written"
                    );
                }
                p.problem = None;
                None
            }
            (Some(why), prev) => {
                p.problem.get_or_insert_with(|| why.clone());
                let delay = prev.map_or(RETRY_MIN, |(_, d)| (d * 2).min(RETRY_MAX));
                Some((Instant::now() + delay, delay))
            }
        };
        let mut s = lock(&self.stats);
        s.events_logged += acknowledged;
        s.write_failures += failures.len() as u64;
        if let Some(last) = failures.pop() {
            s.last_write_error = Some(last);
        }
    }

    /// Updates the gauges, hands over a finished loss, and answers flushes once nothing waits.
    fn publish(&mut self, p: &mut Pending) {
        let mut s = lock(&self.stats);
        s.held_events = p.events.len();
        s.held_bytes = p.bytes;
        s.disk_problem = p.problem.clone();
        if p.retry.is_none() {
            if let Some(loss) = p.loss.take() {
                let merged = match s.unreported_loss.take() {
                    Some(mut old) => {
                        old.count += loss.count;
                        old.last = loss.last;
                        old
                    }
                    None => loss,
                };
                s.unreported_loss = Some(merged);
            }
        }
        drop(s);
        if p.events.is_empty() && p.saves.is_empty() {
            for tx in p.flushes.drain(..) {
                let _ = tx.send(());
            }
        }
    }
}

/// Appends `bytes` to the O_APPEND `file` and fsyncs it; on any failure cuts the file back to
/// its length before, so that a partial write (ENOSPC mid-line) never leaves a torn line.
fn append_whole(file: &mut File, bytes: &[u8]) -> io::Result<()> {
    let before = file.metadata()?.len();
    let written = file.write_all(bytes).and_then(|()| file.sync_data());
    if let Err(e) = written {
        if let Err(cut) = file.set_len(before).and_then(|()| file.sync_data()) {
            // Not a regular file (a test's /dev/full) or the device failed: say so; the start-up
            // check cuts a torn tail too.
            tracing::warn!(error = %cut, "event log: cannot cut a failed append back to {before} bytes");
        }
        return Err(e);
    }
    Ok(())
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
