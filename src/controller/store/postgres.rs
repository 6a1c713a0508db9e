//! The PostgreSQL backend: tokio-postgres (pure Rust, async), a small pool of connections,
//! each insert one transaction. Exactly-once under concurrent posts rests on the unique key:
//! of two transactions inserting the same key, the second waits for the first and then
//! inserts nothing (`ON CONFLICT DO NOTHING`), so it answers "duplicate".
//! No TLS to the database yet: use a Unix socket (`?host=/run/postgresql`) or a trusted link.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Transaction};

use super::schema::{self, Param, Query};
use super::{
    now_ms, redact, Counts, FleetFilter, Inserted, LatencyPoint, NewEvent, StoreError, StoredEvent, VmRow,
};
use crate::util::lock;

/// Connections open at once, at most (more requests wait their turn): a fleet of nodes
/// posting at once must not exhaust the server's `max_connections` (100 by default).
const MAX_CONNECTIONS: usize = 16;
/// Idle connections kept.
const MAX_IDLE: usize = 8;
/// The advisory lock migrations take, so controllers starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6163_7069_6d6f_6e01;

#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A tokio-postgres error with the server's message and code when it has one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

/// A pooled connection, returned to the pool when dropped unless it broke.
struct Conn {
    client: Option<Client>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take().filter(|c| !c.is_closed()) {
            let mut idle = lock(&self.shared.idle);
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
    }
}

impl Conn {
    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("a pooled connection holds its client until dropped")
    }
}

async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| StoreError::Connect { url: redact(url), reason: describe(&e) })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "controller store: a PostgreSQL connection closed");
        }
    });
    Ok(client)
}

impl PgStore {
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let shared = Shared {
            url: url.into(),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        };
        let store = PgStore { shared: Arc::new(shared) };
        let mut conn = store.conn().await?;
        migrate(conn.client()).await?;
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, StoreError> {
        let permit =
            self.shared.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        loop {
            let pooled = lock(&self.shared.idle).pop();
            match pooled {
                Some(c) if c.is_closed() => continue,
                Some(c) => return Ok(Conn { client: Some(c), shared: self.shared.clone(), _permit: permit }),
                None => break,
            }
        }
        let client = connect(&self.shared.url).await?;
        Ok(Conn { client: Some(client), shared: self.shared.clone(), _permit: permit })
    }

    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let mut c = self.conn().await?;
        Ok(c.client().query_one(schema::CURRENT_VERSION, &[]).await?.get(0))
    }

    /// Stores each event once, all in one transaction.
    pub async fn insert_batch(
        &self,
        events: Vec<NewEvent>,
        count_duplicate: bool,
    ) -> Result<Vec<Inserted>, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.client().transaction().await?;
        let mut out = Vec::with_capacity(events.len());
        for ev in &events {
            out.push(insert_one(&tx, ev, count_duplicate).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let mut c = self.conn().await?;
        let row = c.client().query_one(schema::COUNTS, &[]).await?;
        let (stored, duplicates): (i64, i64) = (row.get(0), row.get(1));
        Ok(Counts { stored: stored.max(0) as u64, duplicates: duplicates.max(0) as u64 })
    }

    pub async fn all_json(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn().await?;
        Ok(c.client().query(schema::ALL_JSON, &[]).await?.iter().map(|r| r.get(0)).collect())
    }

    pub async fn events(&self, query: Query) -> Result<Vec<StoredEvent>, StoreError> {
        let (sql, params) = query.sql();
        let params: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(s) => Box::new(s),
                    Param::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let mut c = self.conn().await?;
        Ok(c.client().query(&sql, &refs).await?.iter().map(event_row).collect())
    }

    pub async fn fleet(&self, filter: &FleetFilter) -> Result<Vec<VmRow>, StoreError> {
        let (sql, params) = schema::fleet_sql(filter);
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let mut c = self.conn().await?;
        Ok(c.client().query(&sql, &refs).await?.iter().map(vm_row).collect())
    }

    pub async fn latency(
        &self,
        node: &str,
        vm: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<LatencyPoint>, StoreError> {
        let mut c = self.conn().await?;
        let rows = c.client().query(schema::LATENCY, &[&node, &vm, &from_ms, &to_ms]).await?;
        Ok(rows.iter().map(|r| LatencyPoint { time_ms: r.get(0), latency_ms: r.get(1) }).collect())
    }

    pub async fn import_done(&self, source: &str) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let n: i64 = c.client().query_one(schema::IMPORT_DONE, &[&source]).await?.get(0);
        Ok(n > 0)
    }

    pub async fn finish_import(
        &self,
        source: &str,
        events: i64,
        duplicates: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.client().transaction().await?;
        let first = tx.execute(schema::RECORD_IMPORT, &[&source, &now, &events, &duplicates]).await? == 1;
        if first {
            tx.execute(schema::BUMP_COUNTER, &[&duplicates, &"duplicates"]).await?;
        }
        tx.commit().await?;
        Ok(first)
    }
}

/// Inserts `ev` unless its key is stored, and brings its fleet row and the counters along.
async fn insert_one(
    tx: &Transaction<'_>,
    ev: &NewEvent,
    count_duplicate: bool,
) -> Result<Inserted, StoreError> {
    let added = tx
        .execute(
            schema::INSERT_EVENT,
            &[
                &ev.key,
                &ev.time,
                &ev.time_ms,
                &ev.received_ms,
                &ev.node,
                &ev.vm,
                &ev.kind,
                &ev.state,
                &ev.latency_ms,
                &ev.verdict,
                &ev.headline,
                &ev.incident,
                &ev.body,
            ],
        )
        .await?;
    if added == 1 {
        let state_ms = ev.state.as_ref().map(|_| ev.time_ms);
        let state_key = ev.state.as_ref().map(|_| &ev.key);
        let latency_at = ev.latency_ms.map(|_| ev.time_ms);
        let verdict_ms = ev.verdict.as_ref().map(|_| ev.time_ms);
        let verdict_key = ev.verdict.as_ref().map(|_| &ev.key);
        tx.execute(
            schema::UPSERT_VM,
            &[
                &ev.node,
                &ev.vm,
                &ev.time_ms,
                &ev.key,
                &ev.kind,
                &ev.state,
                &state_ms,
                &state_key,
                &ev.latency_ms,
                &latency_at,
                &ev.verdict,
                &ev.headline,
                &verdict_key,
                &verdict_ms,
            ],
        )
        .await?;
        tx.execute(schema::BUMP_COUNTER, &[&1i64, &"stored"]).await?;
        Ok(Inserted::New)
    } else {
        if count_duplicate {
            tx.execute(schema::BUMP_COUNTER, &[&1i64, &"duplicates"]).await?;
        }
        Ok(Inserted::Duplicate)
    }
}

fn event_row(r: &Row) -> StoredEvent {
    StoredEvent {
        id: r.get(0),
        key: r.get(1),
        time: r.get(2),
        time_ms: r.get(3),
        received_ms: r.get(4),
        node: r.get(5),
        vm: r.get(6),
        kind: r.get(7),
        state: r.get(8),
        latency_ms: r.get(9),
        verdict: r.get(10),
        headline: r.get(11),
        incident: r.get(12),
        body: r.get(13),
    }
}

fn vm_row(r: &Row) -> VmRow {
    VmRow {
        node: r.get(0),
        vm: r.get(1),
        events: r.get(2),
        last_ms: r.get(3),
        last_key: r.get(4),
        last_kind: r.get(5),
        state: r.get(6),
        state_ms: r.get(7),
        state_key: r.get(8),
        latency_ms: r.get(9),
        latency_at_ms: r.get(10),
        verdict: r.get(11),
        headline: r.get(12),
        verdict_key: r.get(13),
        verdict_ms: r.get(14),
    }
}

/// Applies the pending migrations in order, each in its own transaction under an advisory
/// lock (controllers starting together migrate once), or refuses a newer schema.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    loop {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(schema::CREATE_VERSION_TABLE).await?;
        let current: i64 = tx.query_one(schema::CURRENT_VERSION, &[]).await?.get(0);
        let known = schema::latest();
        if current > known {
            return Err(StoreError::NewerSchema { found: current, known });
        }
        let Some(sql) = usize::try_from(current).ok().and_then(|i| schema::MIGRATIONS.get(i)) else {
            return Ok(());
        };
        tx.batch_execute(&sql.replace("{ID}", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")).await?;
        tx.execute(schema::RECORD_VERSION, &[&(current + 1), &now_ms()]).await?;
        tx.commit().await?;
        tracing::info!(version = current + 1, "controller store: PostgreSQL schema migrated");
    }
}
