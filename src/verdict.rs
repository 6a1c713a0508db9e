//! The verdict: why an incident happened, in one line, with the evidence beside it. Every
//! bundle manifest, `bundle` event and `acpimon status` carries one.

use serde::{Deserialize, Serialize};

/// The class of an incident's cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    Panic,
    SoftLockup,
    HardLockup,
    RcuStall,
    HungTask,
    Oom,
    PausedByHost,
    AppFailed,
    UserspaceStopped,
    Unknown,
}

/// One line of evidence and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvidenceLine {
    /// The bundle file (relative to the bundle directory) or source (`console`, `event`) the
    /// line came from.
    pub source: String,
    pub line: String,
}

/// Why it happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub class: Class,
    /// One line for people: "the guest kernel reports a soft lockup on CPU#1 for 44 s in
    /// `spin_fn [faults]`".
    pub headline: String,
    /// The lines it rests on, most telling first (bounded).
    pub evidence: Vec<EvidenceLine>,
}
