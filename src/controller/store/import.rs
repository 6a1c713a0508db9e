//! The import of a JSON-file store (what the controller kept before it had a database:
//! `events/<key>.json`, `events.jsonl` in arrival order, the `duplicates` counter), once.
//!
//! Events go in through the same insert-once as posts, in their old arrival order (the list
//! first, then any file it lacks, oldest first), without running the analyzer (they were
//! analysed when they arrived) and without counting re-imported keys as duplicates; then the
//! import is recorded in `imports` with the old duplicate counter, in one transaction. A crash
//! mid-way is repaired by the next start: the import runs again and stores only what is
//! missing. The files are left as they were.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::event::{valid_key, RawEvent};

use super::{Inserted, NewEvent, Store, StoreError};

/// Events stored per transaction.
const IMPORT_BATCH: usize = 500;

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// The `events/` directory imported.
    pub source: PathBuf,
    /// Events read, and of those stored new (the rest were in the store already).
    pub events: u64,
    pub new: u64,
    /// Unreadable files skipped (named in the log).
    pub skipped: u64,
    /// The old store's duplicate counter, added to the store's.
    pub duplicates: u64,
}

/// One event read from the old store: the event, its JSON, when it arrived (file time).
type OldEvent = (RawEvent, String, i64);

pub async fn import_json_store(store: &Store, dir: &Path) -> Result<Option<ImportReport>, StoreError> {
    let events_dir = dir.join("events");
    // The file system is asked off the async workers.
    let probe = events_dir.clone();
    let source = tokio::task::spawn_blocking(move || {
        probe.is_dir().then(|| std::fs::canonicalize(&probe).unwrap_or(probe.clone()).display().to_string())
    })
    .await?;
    let Some(source) = source else { return Ok(None) };
    if store.import_done(&source).await? {
        return Ok(None);
    }
    let root = dir.to_path_buf();
    let (events, skipped, duplicates) = tokio::task::spawn_blocking(move || read_old_store(&root))
        .await?
        .map_err(|e| StoreError::Import { path: dir.into(), reason: e.to_string() })?;
    let mut report =
        ImportReport { source: events_dir.clone(), events: events.len() as u64, new: 0, skipped, duplicates };
    let rows: Vec<NewEvent> =
        events.iter().map(|(ev, json, at)| NewEvent::from_raw(ev, json.clone(), *at)).collect();
    for chunk in rows.chunks(IMPORT_BATCH) {
        let outcomes = store.insert_batch(chunk.to_vec(), false).await?;
        report.new += outcomes.iter().filter(|o| **o == Inserted::New).count() as u64;
    }
    let dups = i64::try_from(duplicates).unwrap_or(i64::MAX);
    if !store.finish_import(&source, report.events as i64, dups).await? {
        // Another controller finished the same import meanwhile: its counter stands.
        report.duplicates = 0;
    }
    tracing::info!(
        source = %events_dir.display(),
        events = report.events,
        new = report.new,
        skipped = report.skipped,
        "controller: imported the JSON-file store"
    );
    Ok(Some(report))
}

/// Reads the old store's events in arrival order, the unreadable ones counted.
fn read_old_store(root: &Path) -> std::io::Result<(Vec<OldEvent>, u64, u64)> {
    let events_dir = root.join("events");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&events_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")).filter(|k| valid_key(k)) else {
            continue; // temporary files of writes never acknowledged, and strangers
        };
        let mtime = entry.metadata()?.modified().unwrap_or(UNIX_EPOCH);
        files.push((mtime, key.to_string()));
    }
    files.sort();
    // The list's order first (arrival order), then files it lacks (a crash between the two
    // writes), oldest first.
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    if let Ok(f) = std::fs::File::open(root.join("events.jsonl")) {
        for line in std::io::BufReader::new(f).split(b'\n') {
            let Ok(ev) = serde_json::from_slice::<RawEvent>(&line?) else { continue };
            if valid_key(&ev.key) && seen.insert(ev.key.clone()) {
                order.push(ev.key);
            }
        }
    }
    let on_disk: HashSet<&String> = files.iter().map(|(_, k)| k).collect();
    order.retain(|k| on_disk.contains(k));
    let listed: HashSet<String> = order.iter().cloned().collect();
    order.extend(files.iter().filter(|(_, k)| !listed.contains(k)).map(|(_, k)| k.clone()));
    let mtimes: std::collections::HashMap<&String, std::time::SystemTime> =
        files.iter().map(|(t, k)| (k, *t)).collect();

    let mut events = Vec::new();
    let mut skipped = 0;
    for key in &order {
        let path = events_dir.join(format!("{key}.json"));
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<RawEvent>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(ev) if ev.key == *key => {
                let json = serde_json::to_string(&ev).map_err(std::io::Error::other)?;
                let at = mtimes.get(key).and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                events.push((ev, json, at.map_or(0, |d| d.as_millis() as i64)));
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "controller: import skips an event whose key is not its file's name");
                skipped += 1;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "controller: import skips an unreadable event");
                skipped += 1;
            }
        }
    }
    let duplicates = std::fs::read_to_string(root.join("duplicates"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Ok((events, skipped, duplicates))
}
