//! The SQLite backend: one file, WAL mode (readers do not wait for the writer), `synchronous =
//! FULL` (a committed event survives a power cut, as the 201 promises), a busy timeout. One
//! writer connection serialises inserts; reads take a connection from a small pool. Every call
//! runs on a blocking thread.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OpenFlags, Row};

use super::schema::{self, Param, Query};
use super::{now_ms, Counts, FleetFilter, Inserted, LatencyPoint, NewEvent, StoreError, StoredEvent, VmRow};
use crate::util::lock;

/// How long a statement waits for a lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle read connections kept.
const MAX_IDLE_READERS: usize = 4;

#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

/// `$N` placeholders as SQLite's `?N`.
fn q(sql: &str) -> String {
    sql.replace('$', "?")
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

impl SqliteStore {
    pub async fn open(path: PathBuf) -> Result<SqliteStore, StoreError> {
        tokio::task::spawn_blocking(move || {
            let fail = |e: &dyn std::fmt::Display| StoreError::OpenSqlite {
                path: path.clone(),
                reason: e.to_string(),
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
            }
            let mut conn = Connection::open(&path).map_err(|e| fail(&e))?;
            configure(&conn).map_err(|e| fail(&e))?;
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
                .map_err(|e| fail(&e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(fail(&format!(
                    "journal_mode is {mode}, not wal (a file system without shared memory?)"
                )));
            }
            migrate(&mut conn)?;
            Ok(SqliteStore {
                shared: Arc::new(Shared { path, writer: Mutex::new(conn), readers: Mutex::new(Vec::new()) }),
            })
        })
        .await?
    }

    /// Runs `f` on the writer connection, on a blocking thread.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&shared.writer))).await?
    }

    /// Runs `f` on a read connection, on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let conn = lock(&shared.readers).pop();
            let conn = match conn {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &shared.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    c.busy_timeout(BUSY_TIMEOUT)?;
                    c
                }
            };
            let out = f(&conn);
            let mut idle = lock(&shared.readers);
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await?
    }

    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.read(|c| Ok(c.query_row(schema::CURRENT_VERSION, [], |r| r.get(0))?)).await
    }

    /// Stores each event once, all in one transaction (one fsync).
    pub async fn insert_batch(
        &self,
        events: Vec<NewEvent>,
        count_duplicate: bool,
    ) -> Result<Vec<Inserted>, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let out =
                events.iter().map(|ev| insert_one(&tx, ev, count_duplicate)).collect::<Result<_, _>>()?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(|c| {
            let (stored, duplicates): (i64, i64) =
                c.query_row(schema::COUNTS, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(Counts { stored: stored.max(0) as u64, duplicates: duplicates.max(0) as u64 })
        })
        .await
    }

    pub async fn all_json(&self) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(schema::ALL_JSON)?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn events(&self, query: Query) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |c| {
            let (sql, params) = query.sql();
            let params: Vec<SqlValue> = params
                .into_iter()
                .map(|p| match p {
                    Param::Text(s) => SqlValue::Text(s),
                    Param::Int(i) => SqlValue::Integer(i),
                })
                .collect();
            let mut st = c.prepare(&q(&sql))?;
            let rows = st.query_map(rusqlite::params_from_iter(params), event_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn fleet(&self, filter: FleetFilter) -> Result<Vec<VmRow>, StoreError> {
        self.read(move |c| {
            let (sql, params) = schema::fleet_sql(&filter);
            let mut st = c.prepare(&q(&sql))?;
            let rows = st.query_map(rusqlite::params_from_iter(params), vm_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn latency(
        &self,
        node: String,
        vm: String,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LatencyPoint>, StoreError> {
        self.read(move |c| {
            let mut st = c.prepare(&q(schema::LATENCY))?;
            let rows = st.query_map(params![node, vm, from_ms, to_ms], |r| {
                Ok(LatencyPoint { time_ms: r.get(0)?, latency_ms: r.get(1)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn import_done(&self, source: String) -> Result<bool, StoreError> {
        self.read(move |c| Ok(c.query_row(&q(schema::IMPORT_DONE), [source], |r| r.get::<_, i64>(0))? > 0))
            .await
    }

    pub async fn finish_import(
        &self,
        source: String,
        events: i64,
        duplicates: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction()?;
            let first = tx.execute(&q(schema::RECORD_IMPORT), params![source, now, events, duplicates])? == 1;
            if first {
                tx.execute(&q(schema::BUMP_COUNTER), params![duplicates, "duplicates"])?;
            }
            tx.commit()?;
            Ok(first)
        })
        .await
    }
}

/// Inserts `ev` unless its key is stored, and brings its fleet row and the counters along.
fn insert_one(
    tx: &rusqlite::Transaction<'_>,
    ev: &NewEvent,
    count_duplicate: bool,
) -> Result<Inserted, StoreError> {
    let added = tx.execute(
        &q(schema::INSERT_EVENT),
        params![
            ev.key,
            ev.time,
            ev.time_ms,
            ev.received_ms,
            ev.node,
            ev.vm,
            ev.kind,
            ev.state,
            ev.latency_ms,
            ev.verdict,
            ev.headline,
            ev.incident,
            ev.body
        ],
    )?;
    if added == 1 {
        let state_ms = ev.state.as_ref().map(|_| ev.time_ms);
        let latency_at = ev.latency_ms.map(|_| ev.time_ms);
        let verdict_ms = ev.verdict.as_ref().map(|_| ev.time_ms);
        tx.execute(
            &q(schema::UPSERT_VM),
            params![
                ev.node,
                ev.vm,
                ev.time_ms,
                ev.key,
                ev.kind,
                ev.state,
                state_ms,
                ev.state.as_ref().map(|_| &ev.key),
                ev.latency_ms,
                latency_at,
                ev.verdict,
                ev.headline,
                ev.verdict.as_ref().map(|_| &ev.key),
                verdict_ms
            ],
        )?;
        tx.execute(&q(schema::BUMP_COUNTER), params![1, "stored"])?;
        Ok(Inserted::New)
    } else {
        if count_duplicate {
            tx.execute(&q(schema::BUMP_COUNTER), params![1, "duplicates"])?;
        }
        Ok(Inserted::Duplicate)
    }
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        id: r.get(0)?,
        key: r.get(1)?,
        time: r.get(2)?,
        time_ms: r.get(3)?,
        received_ms: r.get(4)?,
        node: r.get(5)?,
        vm: r.get(6)?,
        kind: r.get(7)?,
        state: r.get(8)?,
        latency_ms: r.get(9)?,
        verdict: r.get(10)?,
        headline: r.get(11)?,
        incident: r.get(12)?,
        body: r.get(13)?,
    })
}

fn vm_row(r: &Row<'_>) -> rusqlite::Result<VmRow> {
    Ok(VmRow {
        node: r.get(0)?,
        vm: r.get(1)?,
        events: r.get(2)?,
        last_ms: r.get(3)?,
        last_key: r.get(4)?,
        last_kind: r.get(5)?,
        state: r.get(6)?,
        state_ms: r.get(7)?,
        state_key: r.get(8)?,
        latency_ms: r.get(9)?,
        latency_at_ms: r.get(10)?,
        verdict: r.get(11)?,
        headline: r.get(12)?,
        verdict_key: r.get(13)?,
        verdict_ms: r.get(14)?,
    })
}

/// Applies the pending migrations, each in its own transaction (an immediate one, so two
/// controllers opening the same file do not both apply it), or refuses a newer schema.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(schema::CREATE_VERSION_TABLE, [])?;
        let current: i64 = tx.query_row(schema::CURRENT_VERSION, [], |r| r.get(0))?;
        let known = schema::latest();
        if current > known {
            return Err(StoreError::NewerSchema { found: current, known });
        }
        let Some(sql) = usize::try_from(current).ok().and_then(|i| schema::MIGRATIONS.get(i)) else {
            return Ok(());
        };
        tx.execute_batch(&sql.replace("{ID}", "INTEGER PRIMARY KEY AUTOINCREMENT"))?;
        tx.execute(&q(schema::RECORD_VERSION), params![current + 1, now_ms()])?;
        tx.commit()?;
        tracing::info!(version = current + 1, "controller store: SQLite schema migrated");
    }
}
