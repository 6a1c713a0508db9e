//! Forwarding: every event the service emits goes to a JSON-lines log, a durable on-disk spool
//! that an HTTP sender drains to the controller (at-least-once, idempotency key per event), and
//! an optional `exec` analyzer hook. [`controller`] is the small reference controller.

pub mod controller;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One event, as logged, spooled and POSTed. The schema is documented in the README
/// ("Events"); fields are only ever added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Idempotency key: unique per event, fixed when the event is created and kept across
    /// retries and service restarts. 32 lowercase hex digits.
    pub key: String,
    /// When it happened: RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The node (host name) the service runs on.
    pub node: String,
    /// The VM it concerns; `None` for events of the service itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// What happened: "transition", "reboot", "bundle", "recovery", "vm-added", "vm-removed",
    /// "service-started", ...
    pub kind: String,
    /// The kind's own fields.
    #[serde(flatten)]
    pub detail: Map<String, Value>,
}

/// A fresh idempotency key.
pub fn new_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}
