//! The durable spool: one file per event not yet acknowledged by the controller.
//!
//! An entry is the event's JSON in `NNNNNNNNNNNNNNNNNNNN.json`, NNN its 20-digit sequence
//! number; sending goes in sequence order. `submit` reserves the entry's slot (and its room
//! within the bounds) at once; the writer thread ([`super::writer`]) then writes it as
//! `.NNN.json.tmp`, fsyncs it, renames it into place and fsyncs the directory (once per
//! batch), and only then marks it ready for the sender. So after `kill -9` or power loss an
//! entry is either absent (never acknowledged) or complete. Sequence numbers start above both every
//! name found on disk and the current time in microseconds, so they keep increasing across
//! restarts and roughly follow the clock.
//!
//! Recovery at start-up: entries are re-queued; a complete leftover `.tmp` (the crash came
//! between fsync and rename) is promoted; anything that does not decode as an event is moved to
//! `corrupt/` with a warning. Entries the controller refuses go to `rejected/` beside a
//! `.response.txt` recording its answer.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{create_dir, valid_key, ForwardError, RawEvent};
use crate::util::fs::{replace, sync_dir};
use crate::util::lock;

const SUFFIX: &str = ".json";
const TMP_SUFFIX: &str = ".json.tmp";
const REJECTED: &str = "rejected";
const CORRUPT: &str = "corrupt";

fn entry_name(seq: u64) -> String {
    format!("{seq:020}{SUFFIX}")
}

/// The temporary name [`crate::util::fs::replace`] writes an entry under.
#[cfg(test)]
fn tmp_name(seq: u64) -> String {
    format!(".{seq:020}{TMP_SUFFIX}")
}

/// What a file name in the spool is.
#[derive(Debug, PartialEq, Eq)]
enum Name {
    Entry(u64),
    Tmp(u64),
    Other,
}

fn classify(name: &str) -> Name {
    let seq = |digits: &str| {
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())?
    };
    if let Some(digits) = name.strip_prefix('.').and_then(|n| n.strip_suffix(TMP_SUFFIX)) {
        return seq(digits).map_or(Name::Other, Name::Tmp);
    }
    name.strip_suffix(SUFFIX).and_then(seq).map_or(Name::Other, Name::Entry)
}

/// How many entries `dir` holds (0 if it does not exist); for a warning when nothing will send
/// them.
pub(crate) fn count_entries(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| matches!(classify(n), Name::Entry(_))))
        .count()
}

/// The idempotency keys of the entries `dir` holds (unreadable entries are left out).
pub(crate) fn entry_keys(dir: &Path) -> std::collections::HashSet<String> {
    let Ok(rd) = fs::read_dir(dir) else { return Default::default() };
    rd.flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| matches!(classify(n), Name::Entry(_))))
        .filter_map(|e| decode(&fs::read(e.path()).ok()?).ok())
        .collect()
}

/// The leading sequence number of a name in `rejected/` or `corrupt/`, which keep the entry's.
fn leading_seq(name: &str) -> Option<u64> {
    let name = name.strip_prefix('.').unwrap_or(name);
    name.get(..20).filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

/// Decodes an entry's contents; the event's key, or why it is not an entry.
fn decode(bytes: &[u8]) -> Result<String, String> {
    // Any kind: an entry is sent as it was spooled.
    let ev: RawEvent = serde_json::from_slice(bytes).map_err(|e| format!("not an event ({e})"))?;
    if !valid_key(&ev.key) {
        return Err(format!("invalid key '{}'", ev.key.escape_debug()));
    }
    Ok(ev.key)
}

/// `dir/name`, or `dir/name.N` for the first N free: never overwrite what is kept aside.
fn free_path(dir: &Path, name: &str) -> PathBuf {
    let mut path = dir.join(name);
    let mut n = 1;
    while path.symlink_metadata().is_ok() {
        path = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    path
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    bytes: u64,
    /// False until the writer has written it durably.
    ready: bool,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    entries: BTreeMap<u64, Slot>,
    /// Sum of the entries' sizes.
    bytes: u64,
    corrupt: u64,
}

impl State {
    fn insert(&mut self, seq: u64, slot: Slot) {
        self.bytes += slot.bytes;
        if let Some(old) = self.entries.insert(seq, slot) {
            self.bytes -= old.bytes;
        }
    }

    fn remove(&mut self, seq: u64) {
        if let Some(old) = self.entries.remove(&seq) {
            self.bytes -= old.bytes;
        }
    }
}

/// What [`Spool::open`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Entries from a previous run, queued again.
    pub entries: usize,
    /// Damaged files moved to `corrupt/`.
    pub corrupt: usize,
}

/// What the sender should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Empty,
    /// The oldest entry is not written yet: wait for the wake-up.
    Writing,
    Ready(u64),
}

/// An entry read back for sending.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub seq: u64,
    pub key: String,
    pub body: bytes::Bytes,
}

#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_events: usize,
    state: Mutex<State>,
}

impl Spool {
    /// Creates `dir` if needed and recovers what a previous run left in it.
    pub fn open(dir: &Path, max_bytes: u64, max_events: usize) -> Result<(Spool, Recovery), ForwardError> {
        create_dir(dir)?;
        let read_err = |source| ForwardError::ReadSpool { path: dir.into(), source };
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            if let Some(name) = entry.file_name().to_str() {
                if entry.file_type().map_err(read_err)?.is_file() {
                    names.push(name.to_string());
                }
            }
        }
        let mut max_seen = 0;
        for sub in [REJECTED, CORRUPT] {
            if let Ok(rd) = fs::read_dir(dir.join(sub)) {
                for e in rd.flatten() {
                    max_seen = max_seen.max(e.file_name().to_str().and_then(leading_seq).unwrap_or(0));
                }
            }
        }
        let spool = Spool {
            dir: dir.into(),
            max_bytes,
            max_events,
            state: Mutex::new(State { next_seq: 0, entries: BTreeMap::new(), bytes: 0, corrupt: 0 }),
        };
        let mut recovery = Recovery::default();
        let mut entries = BTreeMap::new();
        names.sort();
        for name in names {
            let (seq, tmp) = match classify(&name) {
                Name::Entry(seq) => (seq, false),
                Name::Tmp(seq) => (seq, true),
                Name::Other => continue,
            };
            max_seen = max_seen.max(seq);
            let path = dir.join(&name);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    spool.move_corrupt(&path, &name, &format!("unreadable ({e})"));
                    recovery.corrupt += 1;
                    continue;
                }
            };
            if let Err(why) = decode(&bytes) {
                spool.move_corrupt(&path, &name, &why);
                recovery.corrupt += 1;
                continue;
            }
            if tmp {
                // Complete (it decodes) but never renamed: the crash came just before. Keep it.
                let target = dir.join(entry_name(seq));
                if target.exists() || fs::rename(&path, &target).is_err() {
                    spool.move_corrupt(&path, &name, "a leftover temporary file that cannot be promoted");
                    recovery.corrupt += 1;
                    continue;
                }
            }
            entries.insert(seq, Slot { bytes: bytes.len() as u64, ready: true });
        }
        let _ = sync_dir(dir);
        recovery.entries = entries.len();
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros().min(u64::MAX as u128 / 2) as u64);
        {
            let mut st = lock(&spool.state);
            st.next_seq = max_seen.saturating_add(1).max(now_us);
            for (seq, slot) in entries {
                st.insert(seq, slot);
            }
            st.corrupt = recovery.corrupt as u64;
        }
        Ok((spool, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// (events, bytes) pending, including entries being written.
    pub fn pending(&self) -> (usize, u64) {
        let st = lock(&self.state);
        (st.entries.len(), st.bytes)
    }

    /// Damaged entries moved aside since start-up (including at start-up).
    pub fn corrupt_count(&self) -> u64 {
        lock(&self.state).corrupt
    }

    /// Reserves the slot of a new entry of `size` bytes, or refuses it when the spool is full
    /// (leaving everything already spooled as it is). The entry counts as pending at once; the
    /// sender waits until [`Spool::finish`] says it is written.
    pub fn reserve(&self, size: u64) -> Result<u64, ForwardError> {
        let mut st = lock(&self.state);
        let (events, bytes) = (st.entries.len(), st.bytes);
        let limit = if events >= self.max_events {
            Some(format!("controller.spool_max_events ({})", self.max_events))
        } else if bytes.saturating_add(size) > self.max_bytes {
            Some(format!("controller.spool_max_bytes ({})", self.max_bytes))
        } else {
            None
        };
        if let Some(limit) = limit {
            return Err(ForwardError::SpoolFull { limit, pending_events: events, pending_bytes: bytes });
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.insert(seq, Slot { bytes: size, ready: false });
        Ok(seq)
    }

    /// Writes reserved entry `seq` (temporary file, fsync, rename; private to the service).
    /// Durable once [`Spool::sync`] returned.
    pub fn write(&self, seq: u64, json: &[u8]) -> io::Result<()> {
        replace(&self.dir.join(entry_name(seq)), json, 0o600)
    }

    /// Makes the entries written so far durable (fsyncs the directory).
    pub fn sync(&self) -> io::Result<()> {
        sync_dir(&self.dir)
    }

    /// Entry `seq` is written (`ok`): ready for the sender; or it could not be (or will not
    /// be) written: forgotten, and whatever part of it reached the disk removed.
    pub fn finish(&self, seq: u64, ok: bool) {
        let mut st = lock(&self.state);
        if ok {
            if let Some(slot) = st.entries.get_mut(&seq) {
                slot.ready = true;
            }
            return;
        }
        st.remove(seq);
        drop(st);
        let path = self.dir.join(entry_name(seq));
        let _ = fs::remove_file(crate::util::fs::tmp_path(&path));
        let _ = fs::remove_file(path);
    }

    /// Reserves, writes and syncs one entry: what `submit` and the writer do together.
    #[cfg(test)]
    pub fn push(&self, json: &[u8]) -> Result<(), ForwardError> {
        let seq = self.reserve(json.len() as u64)?;
        let written = self.write(seq, json).and_then(|()| self.sync());
        self.finish(seq, written.is_ok());
        written.map_err(|source| ForwardError::WriteSpool { path: self.dir.join(entry_name(seq)), source })
    }

    /// The oldest entry.
    pub fn next(&self) -> Next {
        match lock(&self.state).entries.iter().next() {
            None => Next::Empty,
            Some((_, slot)) if !slot.ready => Next::Writing,
            Some((&seq, _)) => Next::Ready(seq),
        }
    }

    /// Reads entry `seq` back. `None` when it vanished or is damaged; a damaged one is moved to
    /// `corrupt/` and counted. Either way it is no longer pending.
    pub fn load(&self, seq: u64) -> Option<Loaded> {
        let name = entry_name(seq);
        let path = self.dir.join(&name);
        let outcome =
            fs::read(&path).map_err(|e| (e.kind() == io::ErrorKind::NotFound, format!("unreadable ({e})")));
        let outcome = outcome.and_then(|b| decode(&b).map(|key| (key, b)).map_err(|why| (false, why)));
        match outcome {
            Ok((key, body)) => Some(Loaded { seq, key, body: body.into() }),
            Err((missing, why)) => {
                let mut st = lock(&self.state);
                st.remove(seq);
                if !missing {
                    st.corrupt += 1;
                    drop(st);
                    self.move_corrupt(&path, &name, &why);
                }
                None
            }
        }
    }

    /// The controller acknowledged entry `seq`: forget it. Not fsynced: if the deletion is
    /// lost in a crash, the event is sent again and deduplicated.
    pub fn remove(&self, seq: u64) {
        let _ = fs::remove_file(self.dir.join(entry_name(seq)));
        lock(&self.state).remove(seq);
    }

    /// The controller refused entry `seq`: keep it in `rejected/` with the `response`.
    pub fn reject(&self, seq: u64, response: &str) -> io::Result<()> {
        let dir = self.dir.join(REJECTED);
        fs::create_dir_all(&dir)?;
        let name = entry_name(seq);
        let target = free_path(&dir, &name);
        let mut resp_name = target.file_name().unwrap_or_default().to_os_string();
        resp_name.push(".response.txt");
        fs::write(dir.join(resp_name), response)?;
        fs::rename(self.dir.join(&name), &target)?;
        lock(&self.state).remove(seq);
        Ok(())
    }

    fn move_corrupt(&self, path: &Path, name: &str, why: &str) {
        let dir = self.dir.join(CORRUPT);
        let target = free_path(&dir, name.strip_prefix('.').unwrap_or(name));
        let moved = fs::create_dir_all(&dir).and_then(|()| fs::rename(path, &target));
        match moved {
            Ok(()) => tracing::warn!(
                entry = %path.display(),
                moved_to = %target.display(),
                "a damaged spool entry ({why}) was moved aside"
            ),
            Err(e) => tracing::warn!(
                entry = %path.display(),
                error = %e,
                "a damaged spool entry ({why}) cannot be moved to {}; ignoring it",
                dir.display()
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The spool's file names and contents, sorted by name (sub-directories excluded).
    pub(crate) fn entries(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    }

    fn event_json(i: u32) -> Vec<u8> {
        let dir = format!("/run/acpimon/vm{i}").into();
        let kind = crate::event::EventKind::VmRemoved(crate::event::VmRemoved { dir });
        serde_json::to_vec(&crate::event::Event::new(super::super::new_key(), "n", None, kind)).unwrap()
    }

    fn key_of(bytes: &[u8]) -> String {
        decode(bytes).unwrap()
    }

    /// Sends everything in order, as the sender does.
    fn drain(spool: &Spool) -> Vec<String> {
        let mut keys = Vec::new();
        while let Next::Ready(seq) = spool.next() {
            if let Some(l) = spool.load(seq) {
                keys.push(l.key);
                spool.remove(seq);
            }
        }
        assert_eq!(spool.next(), Next::Empty);
        keys
    }

    #[test]
    fn names() {
        assert_eq!(classify(&entry_name(42)), Name::Entry(42));
        assert_eq!(classify(&tmp_name(u64::MAX)), Name::Tmp(u64::MAX));
        let tmp = crate::util::fs::tmp_path(Path::new(&entry_name(7)));
        assert_eq!(tmp.to_str(), Some(tmp_name(7).as_str()), "recovery knows the writer's temporary names");
        for other in ["42.json", "00000000000000000042.json.bak", "x0000000000000000042.json", "rejected", ""]
        {
            assert_eq!(classify(other), Name::Other, "{other}");
        }
        assert_eq!(leading_seq("00000000000000000042.json.response.txt"), Some(42));
        assert_eq!(leading_seq("junk"), None);
    }

    #[test]
    fn order_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(rec, Recovery::default());
        let sent: Vec<Vec<u8>> = (0..5).map(event_json).collect();
        for j in &sent[..3] {
            spool.push(j).unwrap();
        }
        drop(spool);
        // Restart: the three come back, and new ones sort after them.
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(rec, Recovery { entries: 3, corrupt: 0 });
        let total: u64 = sent[..3].iter().map(|j| j.len() as u64).sum();
        assert_eq!(spool.pending(), (3, total));
        for j in &sent[3..] {
            spool.push(j).unwrap();
        }
        let expected: Vec<String> = sent.iter().map(|j| key_of(j)).collect();
        assert_eq!(drain(&spool), expected);
        assert_eq!(spool.pending(), (0, 0));
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn sequence_keeps_increasing_past_names_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        // A name far in the future (a clock that went back since): new entries still sort after.
        let future = u64::MAX / 4;
        fs::write(dir.path().join(entry_name(future)), event_json(0)).unwrap();
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        spool.push(&event_json(1)).unwrap();
        let names: Vec<String> = entries(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![entry_name(future), entry_name(future + 1)]);
    }

    #[test]
    fn damaged_entries_move_aside_and_complete_tmp_is_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = event_json(1);
        let promoted = event_json(2);
        fs::write(d.join(entry_name(10)), &good).unwrap();
        fs::write(d.join(entry_name(11)), &good[..good.len() / 2]).unwrap(); // torn
        fs::write(d.join(entry_name(12)), b"").unwrap(); // empty
        fs::write(d.join(entry_name(13)), br#"{"key":"../x","time":"t","node":"n","kind":"k"}"#).unwrap();
        fs::write(d.join(tmp_name(14)), &promoted).unwrap(); // complete, not renamed
        fs::write(d.join(tmp_name(15)), &promoted[..10]).unwrap(); // partial tmp
        fs::write(d.join("README"), b"not ours").unwrap();
        let (spool, rec) = Spool::open(d, 1 << 20, 100).unwrap();
        assert_eq!(rec, Recovery { entries: 2, corrupt: 4 });
        assert_eq!(spool.corrupt_count(), 4);
        let mut corrupt: Vec<String> = fs::read_dir(d.join(CORRUPT))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        corrupt.sort();
        let mut expected =
            vec![entry_name(11), entry_name(12), entry_name(13), tmp_name(15)[1..].to_string()];
        expected.sort();
        assert_eq!(corrupt, expected);
        // The torn content is kept, not rewritten.
        assert_eq!(fs::read(d.join(CORRUPT).join(entry_name(11))).unwrap(), &good[..good.len() / 2]);
        assert_eq!(drain(&spool), vec![key_of(&good), key_of(&promoted)]);
        assert_eq!(entries(d), vec![("README".to_string(), b"not ours".to_vec())]);
    }

    #[test]
    fn entry_damaged_while_running_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        spool.push(&event_json(1)).unwrap();
        spool.push(&event_json(2)).unwrap();
        let Next::Ready(first) = spool.next() else { panic!("nothing ready") };
        fs::write(dir.path().join(entry_name(first)), b"{garbage").unwrap();
        assert!(spool.load(first).is_none());
        assert_eq!(spool.corrupt_count(), 1);
        assert_eq!(drain(&spool).len(), 1);
        assert!(dir.path().join(CORRUPT).join(entry_name(first)).exists());
    }

    #[test]
    fn full_spool_refuses_without_touching_entries() {
        let dir = tempfile::tempdir().unwrap();
        let one = event_json(1);
        let (spool, _) = Spool::open(dir.path(), 2 * one.len() as u64 + 5, 10).unwrap();
        spool.push(&one).unwrap();
        spool.push(&event_json(2)).unwrap();
        let before = entries(dir.path());
        let err = spool.push(&event_json(3)).unwrap_err();
        assert!(
            matches!(&err, ForwardError::SpoolFull { limit, pending_events: 2, .. } if limit.contains("spool_max_bytes")),
            "{err}"
        );
        assert_eq!(entries(dir.path()), before);
        // Room again once one is delivered.
        let Next::Ready(seq) = spool.next() else { panic!() };
        spool.remove(seq);
        spool.push(&event_json(3)).unwrap();
    }

    #[test]
    fn reject_keeps_entry_and_response() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        let json = event_json(1);
        spool.push(&json).unwrap();
        let Next::Ready(seq) = spool.next() else { panic!() };
        spool.reject(seq, "HTTP 400\nbad").unwrap();
        assert_eq!(spool.next(), Next::Empty);
        let rej = dir.path().join(REJECTED);
        assert_eq!(fs::read(rej.join(entry_name(seq))).unwrap(), json);
        let resp = fs::read_to_string(rej.join(format!("{}.response.txt", entry_name(seq)))).unwrap();
        assert_eq!(resp, "HTTP 400\nbad");
        // Rejected names count for the sequence after a restart.
        let (spool, rec) = Spool::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(rec.entries, 0);
        assert!(lock(&spool.state).next_seq > seq);
    }
}
