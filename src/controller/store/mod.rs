//! The controller's store, behind one interface ([`Store`]) over two backends: SQLite, embedded
//! (one file `controller.db` under `--store`, the default), and PostgreSQL for fleets
//! (`--database postgres://...`). Both hold the same schema ([`schema`]) and answer the same
//! queries, so the same tests run against both.
//!
//! Rules both keep:
//! - [`Store::insert`] stores an event once by its key: the row and what it changes in the
//!   fleet table commit together, *before* the controller answers 201; the same key again is a
//!   [`Inserted::Duplicate`] (counted), however many posts race for it.
//! - Nothing blocks a tokio worker: SQLite runs on blocking threads (`spawn_blocking`), one
//!   writer connection and a few readers (WAL lets them read while it writes); PostgreSQL is
//!   async (tokio-postgres) over a small pool of connections.
//! - The schema is versioned: migrations apply in order at open, in one transaction each;
//!   a store whose version is newer than this build knows is refused ([`StoreError::NewerSchema`]).
//!
//! The pages read the fleet from the `vms` table (one row per node and VM, kept current on
//! each new event, so the fleet view never scans events) and the rest from `events` through
//! indexes on `(node, vm, time_ms)`, `(kind, time_ms)`, `incident` and the latency samples.

mod import;
mod postgres;
pub mod schema;
mod sqlite;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::event::{EventKind, RawEvent};
use crate::watch::state::Evidence;

pub use import::ImportReport;

/// Where the store lives.
#[derive(Clone, Debug)]
pub enum Backend {
    /// `controller.db` in this directory.
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
}

impl Backend {
    /// The backend for `--store DIR` and an optional `--database URL`.
    pub fn from_options(store: &Path, database: Option<&str>) -> Result<Backend, StoreError> {
        match database {
            None => Ok(Backend::Sqlite(store.into())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Backend::Postgres(url.into()))
            }
            Some(url) => Err(StoreError::BadUrl(redact(url))),
        }
    }
}

/// The file the SQLite backend keeps in the store directory.
pub const SQLITE_FILE: &str = "controller.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("--database '{0}' is not a PostgreSQL URL; give postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or ?host=/socket/dir), or leave it out for SQLite under --store")]
    BadUrl(String),
    #[error("cannot open the SQLite store {path}: {reason}; check that the directory is writable and the file is an acpimon store")]
    OpenSqlite { path: PathBuf, reason: String },
    #[error("cannot connect to PostgreSQL at {url}: {reason}; check that the server runs, the URL, and that the user may create tables in the database")]
    Connect { url: String, reason: String },
    #[error("the store's schema is version {found}, newer than this acpimon knows ({known}); run the acpimon that wrote it (or a newer one), or use another --store/--database")]
    NewerSchema { found: i64, known: i64 },
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("cannot import the JSON-file store {path}: {reason}")]
    Import { path: PathBuf, reason: String },
    #[error("a store task failed: {0}")]
    Task(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(postgres::describe(&e))
    }
}

impl From<tokio::task::JoinError> for StoreError {
    fn from(e: tokio::task::JoinError) -> StoreError {
        StoreError::Task(e.to_string())
    }
}

/// The URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.into() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or("");
            format!("{scheme}://{name}:***@{host}{tail}")
        }
        _ => url.into(),
    }
}

/// Whether an insert stored the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    New,
    Duplicate,
}

/// An event ready to store: the JSON as received plus the columns the pages query by, taken
/// from it once at insert ([`NewEvent::from_raw`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub key: String,
    /// As sent (RFC 3339).
    pub time: String,
    /// `time` in ms since the epoch; the arrival time when `time` does not parse.
    pub time_ms: i64,
    pub received_ms: i64,
    pub node: String,
    /// Empty for the service's own events (no VM).
    pub vm: String,
    pub kind: String,
    /// A transition's new state.
    pub state: Option<String>,
    /// The heartbeat latency the event carries (a transition's evidence: the ACPI heartbeat's
    /// last outcome, else the app heartbeat's).
    pub latency_ms: Option<f64>,
    /// A bundle's verdict class and headline.
    pub verdict: Option<String>,
    pub headline: Option<String>,
    /// The key of the transition event of the incident the event belongs to (a transition's
    /// own key; a bundle's `trigger.event`; a kernel report's `incident`).
    pub incident: Option<String>,
    /// The event's JSON, as served back.
    pub body: String,
}

impl NewEvent {
    /// The columns of `event` (whose JSON is `body`), received at `received_ms`. Kinds this
    /// build does not know, or whose fields do not fit, keep only the envelope's columns.
    pub fn from_raw(event: &RawEvent, body: String, received_ms: i64) -> NewEvent {
        let time_ms = humantime::parse_rfc3339_weak(&event.time)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .unwrap_or(received_ms);
        let mut ev = NewEvent {
            key: event.key.clone(),
            time: event.time.clone(),
            time_ms,
            received_ms,
            node: event.node.clone(),
            vm: event.vm.clone().unwrap_or_default(),
            kind: event.kind.clone(),
            state: None,
            latency_ms: None,
            verdict: None,
            headline: None,
            incident: None,
            body,
        };
        let Ok(typed) = event.typed() else { return ev };
        match typed.kind {
            EventKind::Transition(t) => {
                ev.state = Some(t.to.name().into());
                ev.incident = Some(event.key.clone());
                if let Evidence::Probes(p) = &t.evidence {
                    // A heartbeat's latency: the ACPI heartbeat's, else the app's. Other
                    // probes (tcp, guest agent) measure something else.
                    ev.latency_ms = ["acpi-heartbeat", "app-heartbeat"].iter().find_map(|kind| {
                        p.scenarios
                            .iter()
                            .filter(|s| s.kind == *kind)
                            .find_map(|s| s.last.as_ref()?.latency_ms.filter(|l| l.is_finite()))
                    });
                }
            }
            EventKind::Bundle(b) => {
                ev.incident = Some(b.trigger.event.clone());
                if let Some(v) = b.manifest.as_ref().and_then(|m| m.verdict.as_ref()) {
                    ev.verdict = Some(v.class.name().into());
                    ev.headline = Some(v.headline.clone());
                }
            }
            EventKind::KernelReport(k) => ev.incident = k.incident,
            _ => {}
        }
        ev
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Arrival order.
    pub id: i64,
    pub key: String,
    pub time: String,
    pub time_ms: i64,
    pub received_ms: i64,
    pub node: String,
    pub vm: String,
    pub kind: String,
    pub state: Option<String>,
    pub latency_ms: Option<f64>,
    pub verdict: Option<String>,
    pub headline: Option<String>,
    pub incident: Option<String>,
    pub body: String,
}

impl StoredEvent {
    /// The event's JSON as it was stored.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One row of the fleet view: a node's VM (or, with `vm` empty, the node's own events) with
/// what its latest events say.
#[derive(Clone, Debug, PartialEq)]
pub struct VmRow {
    pub node: String,
    pub vm: String,
    /// Events stored for it.
    pub events: i64,
    /// The latest event (by event time).
    pub last_ms: i64,
    pub last_key: String,
    pub last_kind: String,
    /// The state of its latest transition, and when.
    pub state: Option<String>,
    pub state_ms: Option<i64>,
    pub state_key: Option<String>,
    /// The latest heartbeat latency, and when.
    pub latency_ms: Option<f64>,
    pub latency_at_ms: Option<i64>,
    /// The latest bundle's verdict.
    pub verdict: Option<String>,
    pub headline: Option<String>,
    pub verdict_key: Option<String>,
    pub verdict_ms: Option<i64>,
}

/// The fleet view's filters; `None` shows all.
#[derive(Clone, Debug, Default)]
pub struct FleetFilter {
    pub state: Option<String>,
    pub node: Option<String>,
}

/// One latency sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyPoint {
    pub time_ms: i64,
    pub latency_ms: f64,
}

/// Events stored and duplicates answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub stored: u64,
    pub duplicates: u64,
}

/// The store. Cheap to clone (shared connections).
#[derive(Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens the store (creating it), applies pending migrations and refuses a newer schema.
    pub async fn open(backend: &Backend) -> Result<Store, StoreError> {
        let inner = match backend {
            Backend::Sqlite(dir) => Inner::Sqlite(sqlite::SqliteStore::open(dir.join(SQLITE_FILE)).await?),
            Backend::Postgres(url) => Inner::Postgres(postgres::PgStore::open(url).await?),
        };
        Ok(Store { inner })
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match &self.inner {
            Inner::Sqlite(_) => "sqlite",
            Inner::Postgres(_) => "postgres",
        }
    }

    /// The schema version the store is at.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.schema_version().await,
            Inner::Postgres(s) => s.schema_version().await,
        }
    }

    /// Stores `event` once by its key. A duplicate is counted in [`Counts::duplicates`] when
    /// `count_duplicate` (an import re-run passes false: its duplicates are not posts).
    pub async fn insert(&self, event: NewEvent, count_duplicate: bool) -> Result<Inserted, StoreError> {
        let mut out = self.insert_batch(vec![event], count_duplicate).await?;
        out.pop().ok_or_else(|| StoreError::Task("an insert returned no outcome".into()))
    }

    /// Stores each event once, in one transaction (an import, a benchmark's fill): the outcome
    /// of each, in order.
    pub async fn insert_batch(
        &self,
        events: Vec<NewEvent>,
        count_duplicate: bool,
    ) -> Result<Vec<Inserted>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.insert_batch(events, count_duplicate).await,
            Inner::Postgres(s) => s.insert_batch(events, count_duplicate).await,
        }
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.counts().await,
            Inner::Postgres(s) => s.counts().await,
        }
    }

    /// Every event's JSON in arrival order (`GET /v1/events`).
    pub async fn all_json(&self) -> Result<Vec<String>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.all_json().await,
            Inner::Postgres(s) => s.all_json().await,
        }
    }

    /// One event by its key.
    pub async fn event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        self.events(schema::Query::Key(key.into())).await.map(|mut v| v.pop())
    }

    /// A VM's events (`vm` empty: the node's own) with `from_ms <= time_ms < to_ms`, oldest
    /// first, at most `limit`.
    pub async fn vm_events(
        &self,
        node: &str,
        vm: &str,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.events(schema::Query::Vm { node: node.into(), vm: vm.into(), from_ms, to_ms, limit }).await
    }

    /// An incident: its transition event (key `incident`) and every event that names it
    /// (bundle, kernel reports), by time.
    pub async fn incident(&self, incident: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.events(schema::Query::Incident(incident.into())).await
    }

    /// The latest bundle events (newest first): the verdicts.
    pub async fn latest_bundles(&self, limit: i64) -> Result<Vec<StoredEvent>, StoreError> {
        self.events(schema::Query::Bundles { limit }).await
    }

    async fn events(&self, q: schema::Query) -> Result<Vec<StoredEvent>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.events(q).await,
            Inner::Postgres(s) => s.events(q).await,
        }
    }

    /// Every node and VM with its latest state, verdict and latency, by node and VM.
    pub async fn fleet(&self, filter: &FleetFilter) -> Result<Vec<VmRow>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.fleet(filter.clone()).await,
            Inner::Postgres(s) => s.fleet(filter).await,
        }
    }

    /// A VM's latency samples with `from_ms <= time_ms < to_ms`, oldest first.
    pub async fn latency(
        &self,
        node: &str,
        vm: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LatencyPoint>, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.latency(node.into(), vm.into(), from_ms, to_ms).await,
            Inner::Postgres(s) => s.latency(node, vm, from_ms, to_ms).await,
        }
    }

    /// Whether the import of `source` is recorded as done.
    async fn import_done(&self, source: &str) -> Result<bool, StoreError> {
        match &self.inner {
            Inner::Sqlite(s) => s.import_done(source.into()).await,
            Inner::Postgres(s) => s.import_done(source).await,
        }
    }

    /// Records the import of `source` as done, adding its `duplicates` counter; false if it
    /// already was (then nothing is added).
    async fn finish_import(&self, source: &str, events: i64, duplicates: i64) -> Result<bool, StoreError> {
        let now = now_ms();
        match &self.inner {
            Inner::Sqlite(s) => s.finish_import(source.into(), events, duplicates, now).await,
            Inner::Postgres(s) => s.finish_import(source, events, duplicates, now).await,
        }
    }

    /// Imports a JSON-file store (`events/`, `events.jsonl`, `duplicates` in `dir`) once;
    /// `None` when there is none or it was imported before.
    pub async fn import_json_store(&self, dir: &Path) -> Result<Option<ImportReport>, StoreError> {
        import::import_json_store(self, dir).await
    }
}

/// Now, in ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
