//! What the service remembers of each VM across its own restarts: the state (so an incident is
//! neither alerted twice nor lost), the event sequence (so a re-emitted event has the same
//! idempotency key), the boot count, recent recovery actions (for the rate limit), and an
//! incident whose diagnostics have not finished.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::State;
use crate::event::Incident;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Memory {
    /// Random, fixed when the VM is first seen: the first half of every event key.
    pub epoch: u64,
    /// The sequence number of the VM's next event: the second half of its key.
    pub next_seq: u64,
    pub state: State,
    pub incident: bool,
    #[serde(default)]
    pub boot_count: Option<u32>,
    /// Unix times (s) of recovery actions taken.
    #[serde(default)]
    pub recoveries: Vec<u64>,
    /// An incident whose bundle is not finished. Stored with the same fields before it was
    /// typed, so files of earlier versions load as they are.
    #[serde(default)]
    pub pending_diagnostics: Option<Incident>,
    /// The QEMU process last attached (pid and start time): another one is a relaunch, whose
    /// guest starts over even when the service was down meanwhile.
    #[serde(default)]
    pub qemu: Option<String>,
}

impl Memory {
    pub fn fresh() -> Memory {
        Memory {
            epoch: rand::random(),
            next_seq: 0,
            state: State::Starting,
            incident: false,
            boot_count: None,
            recoveries: Vec::new(),
            pending_diagnostics: None,
            qemu: None,
        }
    }

    /// The key of the next event, and advances the sequence.
    pub fn take_key(&mut self) -> String {
        let key = format!("{:016x}{:016x}", self.epoch, self.next_seq);
        self.next_seq += 1;
        key
    }
}

/// `DATA_DIR/vms/NAME.json`.
pub fn path(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join("vms").join(format!("{vm}.json"))
}

/// The remembered state, or a fresh one when there is none. A corrupt file is set aside
/// (`.corrupt`) and reported, never fatal.
pub fn load(path: &Path) -> (Memory, Option<String>) {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Memory::fresh(), None),
        Err(e) => return (Memory::fresh(), Some(format!("cannot read {}: {e}", path.display()))),
    };
    match serde_json::from_slice(&text) {
        Ok(m) => (m, None),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            let _ = std::fs::rename(path, &aside);
            (
                Memory::fresh(),
                Some(format!("{} is corrupt ({e}); moved to {}", path.display(), aside.display())),
            )
        }
    }
}

/// What [`save`] writes. The service hands it to the forwarder's writer thread
/// ([`crate::forward::Forwarder::save_state`]), which writes it the same way, in order with the
/// VM's events.
pub fn encode(m: &Memory) -> Vec<u8> {
    serde_json::to_vec_pretty(m).expect("memory serialises")
}

/// Writes `m` atomically and durably ([`crate::util::fs::atomic_write`]).
pub fn save(path: &Path, m: &Memory) -> std::io::Result<()> {
    std::fs::create_dir_all(crate::util::fs::parent(path))?;
    crate::util::fs::atomic_write(path, &encode(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        let (mut m, why) = load(&p);
        assert!(why.is_none());
        let k0 = m.take_key();
        let k1 = m.take_key();
        assert_eq!(k0.len(), 32);
        assert_ne!(k0, k1);
        m.state = State::Unresponsive;
        save(&p, &m).unwrap();
        let (back, _) = load(&p);
        assert_eq!(back, m);
        let mut again = back.clone();
        assert_eq!(again.take_key(), format!("{:016x}{:016x}", m.epoch, 2));
    }

    /// A file written before the pending incident was typed (by 0.1, with its magic keys).
    #[test]
    fn an_old_pending_incident_loads() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let old = r#"{
  "epoch": 7, "next_seq": 12, "state": "unresponsive", "incident": true, "boot_count": 2,
  "recoveries": [],
  "pending_diagnostics": {
    "kind": "unresponsive", "time": "2026-01-01T00:00:00.000Z",
    "reason": "acpi-heartbeat missed 3 of 3", "evidence": {"cause": "acpi-heartbeat"},
    "event": "00000000000000070000000000000009", "bundle": "/d/bundles/web/x-unresponsive",
    "started": "2026-01-01T00:00:01.000Z"
  }
}"#;
        std::fs::write(&p, old).unwrap();
        let (m, why) = load(&p);
        assert!(why.is_none(), "{why:?}");
        let pending = m.pending_diagnostics.clone().unwrap();
        assert_eq!(pending.trigger.kind, "unresponsive");
        assert_eq!(pending.trigger.evidence["cause"], "acpi-heartbeat");
        assert_eq!(pending.event, "00000000000000070000000000000009");
        assert_eq!(pending.bundle, PathBuf::from("/d/bundles/web/x-unresponsive"));
        assert_eq!(pending.started.as_deref(), Some("2026-01-01T00:00:01.000Z"));
        // Written back, it has the same fields.
        save(&p, &m).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let before: serde_json::Value = serde_json::from_str(old).unwrap();
        assert_eq!(again["pending_diagnostics"], before["pending_diagnostics"]);
    }

    #[test]
    fn a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "web");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        let (m, why) = load(&p);
        assert_eq!(m.state, State::Starting);
        assert!(why.unwrap().contains("corrupt"));
        assert!(p.with_extension("json.corrupt").exists());
    }
}
