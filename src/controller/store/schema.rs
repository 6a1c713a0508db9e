//! The schema both backends hold and the SQL both run. Statements use `$N` placeholders
//! (PostgreSQL's); the SQLite backend turns them into `?N`, which SQLite reads the same way.
//!
//! Migrations: [`MIGRATIONS`] in order, version `i + 1` for entry `i`; the store records each
//! applied version in `schema_version`. A migration is only ever appended, never edited: a
//! store at version N has run exactly the first N entries. `{ID}` in a migration is the
//! backend's auto-increment primary key type.

/// The migrations, oldest first.
pub const MIGRATIONS: &[&str] = &[
    // 1: events, the fleet table, counters, imports.
    r#"
CREATE TABLE events (
    id {ID},
    key TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    node TEXT NOT NULL,
    vm TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT,
    latency_ms DOUBLE PRECISION,
    verdict TEXT,
    headline TEXT,
    incident TEXT,
    body TEXT NOT NULL
);
CREATE INDEX events_vm_time ON events (node, vm, time_ms);
CREATE INDEX events_kind_time ON events (kind, time_ms);
CREATE INDEX events_time ON events (time_ms);
CREATE INDEX events_incident ON events (incident) WHERE incident IS NOT NULL;
CREATE INDEX events_latency ON events (node, vm, time_ms) WHERE latency_ms IS NOT NULL;
CREATE TABLE vms (
    node TEXT NOT NULL,
    vm TEXT NOT NULL,
    events BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    last_key TEXT NOT NULL,
    last_kind TEXT NOT NULL,
    state TEXT,
    state_ms BIGINT,
    state_key TEXT,
    latency_ms DOUBLE PRECISION,
    latency_at_ms BIGINT,
    verdict TEXT,
    headline TEXT,
    verdict_key TEXT,
    verdict_ms BIGINT,
    PRIMARY KEY (node, vm)
);
CREATE INDEX vms_state ON vms (state);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters (name, value) VALUES ('stored', 0), ('duplicates', 0);
CREATE TABLE imports (
    source TEXT PRIMARY KEY,
    done_ms BIGINT NOT NULL,
    events BIGINT NOT NULL,
    duplicates BIGINT NOT NULL
);
"#,
];

/// The version this build brings a store to.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

pub const CREATE_VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)";
pub const CURRENT_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM schema_version";
pub const RECORD_VERSION: &str = "INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)";

/// Inserts the event unless its key is stored (then no row changes).
pub const INSERT_EVENT: &str = "INSERT INTO events \
    (key, time, time_ms, received_ms, node, vm, kind, state, latency_ms, verdict, headline, incident, body) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT (key) DO NOTHING";

/// Brings a VM's fleet row up to a new event: each part (latest event, state, latency,
/// verdict) moves only to a newer event that has it, so late deliveries of old events (a
/// spool drained after an outage) do not roll it back.
pub const UPSERT_VM: &str = "INSERT INTO vms \
    (node, vm, events, last_ms, last_key, last_kind, state, state_ms, state_key, \
     latency_ms, latency_at_ms, verdict, headline, verdict_key, verdict_ms) \
    VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
    ON CONFLICT (node, vm) DO UPDATE SET \
    events = vms.events + 1, \
    last_key = CASE WHEN excluded.last_ms >= vms.last_ms THEN excluded.last_key ELSE vms.last_key END, \
    last_kind = CASE WHEN excluded.last_ms >= vms.last_ms THEN excluded.last_kind ELSE vms.last_kind END, \
    last_ms = CASE WHEN excluded.last_ms >= vms.last_ms THEN excluded.last_ms ELSE vms.last_ms END, \
    state_key = CASE WHEN excluded.state IS NOT NULL AND (vms.state_ms IS NULL OR excluded.state_ms >= vms.state_ms) \
        THEN excluded.state_key ELSE vms.state_key END, \
    state = CASE WHEN excluded.state IS NOT NULL AND (vms.state_ms IS NULL OR excluded.state_ms >= vms.state_ms) \
        THEN excluded.state ELSE vms.state END, \
    state_ms = CASE WHEN excluded.state IS NOT NULL AND (vms.state_ms IS NULL OR excluded.state_ms >= vms.state_ms) \
        THEN excluded.state_ms ELSE vms.state_ms END, \
    latency_ms = CASE WHEN excluded.latency_ms IS NOT NULL AND (vms.latency_at_ms IS NULL OR excluded.latency_at_ms >= vms.latency_at_ms) \
        THEN excluded.latency_ms ELSE vms.latency_ms END, \
    latency_at_ms = CASE WHEN excluded.latency_ms IS NOT NULL AND (vms.latency_at_ms IS NULL OR excluded.latency_at_ms >= vms.latency_at_ms) \
        THEN excluded.latency_at_ms ELSE vms.latency_at_ms END, \
    verdict_key = CASE WHEN excluded.verdict IS NOT NULL AND (vms.verdict_ms IS NULL OR excluded.verdict_ms >= vms.verdict_ms) \
        THEN excluded.verdict_key ELSE vms.verdict_key END, \
    headline = CASE WHEN excluded.verdict IS NOT NULL AND (vms.verdict_ms IS NULL OR excluded.verdict_ms >= vms.verdict_ms) \
        THEN excluded.headline ELSE vms.headline END, \
    verdict = CASE WHEN excluded.verdict IS NOT NULL AND (vms.verdict_ms IS NULL OR excluded.verdict_ms >= vms.verdict_ms) \
        THEN excluded.verdict ELSE vms.verdict END, \
    verdict_ms = CASE WHEN excluded.verdict IS NOT NULL AND (vms.verdict_ms IS NULL OR excluded.verdict_ms >= vms.verdict_ms) \
        THEN excluded.verdict_ms ELSE vms.verdict_ms END";

/// Adds `$1` to the counter named `$2`.
pub const BUMP_COUNTER: &str = "UPDATE counters SET value = value + $1 WHERE name = $2";
pub const COUNTS: &str =
    "SELECT (SELECT value FROM counters WHERE name = 'stored'), (SELECT value FROM counters WHERE name = 'duplicates')";
pub const ALL_JSON: &str = "SELECT body FROM events ORDER BY id";
pub const IMPORT_DONE: &str = "SELECT count(*) FROM imports WHERE source = $1";
pub const RECORD_IMPORT: &str =
    "INSERT INTO imports (source, done_ms, events, duplicates) VALUES ($1, $2, $3, $4) \
    ON CONFLICT (source) DO NOTHING";
pub const LATENCY: &str = "SELECT time_ms, latency_ms FROM events \
    WHERE node = $1 AND vm = $2 AND time_ms >= $3 AND time_ms < $4 AND latency_ms IS NOT NULL ORDER BY time_ms, id";

/// The columns of a [`super::StoredEvent`], in its field order.
pub const EVENT_COLUMNS: &str =
    "id, key, time, time_ms, received_ms, node, vm, kind, state, latency_ms, verdict, headline, incident, body";
/// The columns of a [`super::VmRow`], in its field order.
pub const VM_COLUMNS: &str = "node, vm, events, last_ms, last_key, last_kind, state, state_ms, state_key, \
    latency_ms, latency_at_ms, verdict, headline, verdict_key, verdict_ms";

/// A query for events.
#[derive(Clone, Debug)]
pub enum Query {
    Key(String),
    Vm { node: String, vm: String, from_ms: i64, to_ms: i64, limit: i64 },
    Incident(String),
    Bundles { limit: i64 },
}

/// The most events an incident query returns.
pub const INCIDENT_LIMIT: i64 = 1000;

/// A parameter of a [`Query`].
#[derive(Clone, Debug)]
pub enum Param {
    Text(String),
    Int(i64),
}

impl Query {
    /// The statement and its parameters.
    pub fn sql(&self) -> (String, Vec<Param>) {
        let select = format!("SELECT {EVENT_COLUMNS} FROM events");
        match self {
            Query::Key(k) => (format!("{select} WHERE key = $1"), vec![Param::Text(k.clone())]),
            Query::Vm { node, vm, from_ms, to_ms, limit } => (
                format!(
                    "{select} WHERE node = $1 AND vm = $2 AND time_ms >= $3 AND time_ms < $4 \
                     ORDER BY time_ms, id LIMIT $5"
                ),
                vec![
                    Param::Text(node.clone()),
                    Param::Text(vm.clone()),
                    Param::Int(*from_ms),
                    Param::Int(*to_ms),
                    Param::Int(*limit),
                ],
            ),
            Query::Incident(k) => (
                // Bounded: a node could name one incident in any number of events.
                format!(
                    "{select} WHERE key = $1 OR incident = $1 ORDER BY time_ms, id LIMIT {INCIDENT_LIMIT}"
                ),
                vec![Param::Text(k.clone())],
            ),
            Query::Bundles { limit } => (
                format!("{select} WHERE kind = 'bundle' ORDER BY time_ms DESC, id DESC LIMIT $1"),
                vec![Param::Int(*limit)],
            ),
        }
    }
}

/// The fleet query for `filter`, and its parameters.
pub fn fleet_sql(filter: &super::FleetFilter) -> (String, Vec<String>) {
    let mut cond = Vec::new();
    let mut params = Vec::new();
    for (column, value) in [("state", &filter.state), ("node", &filter.node)] {
        if let Some(v) = value {
            params.push(v.clone());
            cond.push(format!("{column} = ${}", params.len()));
        }
    }
    let filter = if cond.is_empty() { String::new() } else { format!(" WHERE {}", cond.join(" AND ")) };
    (format!("SELECT {VM_COLUMNS} FROM vms{filter} ORDER BY node, vm"), params)
}
