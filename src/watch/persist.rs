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

/// How much of the event log's end [`logged_sequences`] reads: more than the writer holds in
/// memory on a full disk (`event_hold_max`, 16 MiB by default), the most the state files can
/// lag behind the log.
pub const LOG_SCAN: u64 = 32 << 20;

/// A VM's event as the end of the event log holds it.
pub struct Logged {
    pub epoch: u64,
    pub seq: u64,
    pub key: String,
    pub time: String,
    /// The whole line, without its newline.
    pub line: Vec<u8>,
}

/// The VMs' events at the end of the event log (the last [`LOG_SCAN`] bytes), oldest first;
/// the service's own events and lines that are not events are left out.
pub fn log_tail(log: &Path) -> std::io::Result<Vec<Logged>> {
    use std::io::{Read, Seek, SeekFrom};
    #[derive(Deserialize)]
    struct Keyed {
        key: String,
        #[serde(default)]
        time: String,
    }
    let mut f = match std::fs::File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let start = f.metadata()?.len().saturating_sub(LOG_SCAN);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(LOG_SCAN).read_to_end(&mut buf)?;
    // From the middle of the file, the first line is a fragment.
    let lines = buf.split(|&b| b == b'\n').skip(usize::from(start > 0));
    Ok(lines
        .filter_map(|line| {
            let k = serde_json::from_slice::<Keyed>(line).ok()?;
            let (epoch, seq) = split_key(&k.key)?;
            Some(Logged { epoch, seq, key: k.key, time: k.time, line: line.to_vec() })
        })
        .collect())
}

/// The incidents (their transition events' keys) whose `bundle` event `tail` holds: a state
/// file written before the bundle event but killed before its own update still names the
/// incident pending, and its bundle must not be taken twice.
pub fn bundled_incidents(tail: &[Logged]) -> std::collections::HashSet<String> {
    #[derive(Deserialize)]
    struct Line {
        kind: String,
        #[serde(default)]
        detail: serde_json::Value,
    }
    tail.iter()
        .filter_map(|l| serde_json::from_slice::<Line>(&l.line).ok())
        .filter(|l| l.kind == "bundle")
        .filter_map(|l| l.detail["trigger"]["event"].as_str().map(str::to_string))
        .collect()
}

/// The highest event sequence per VM epoch in `tail`. A VM's state file is written after its
/// events, so after a crash (or while a full disk refused the state file but not the log) it
/// can name a `next_seq` the log has already used; a key must never be reused for a different
/// event, or the controller, which keeps the first, would drop the second.
pub fn logged_sequences(tail: &[Logged]) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    for l in tail {
        let max = out.entry(l.epoch).or_insert(l.seq);
        *max = (*max).max(l.seq);
    }
    out
}

/// The events of `tail` that may be in the log without having reached the spool: those of a
/// VM (known by its state file in `vms_dir`) at or past the sequence its state file names.
/// The state file is written only once every event before it is in the log and the spool, so
/// events before that sequence were spooled (and delivered, or still in the spool).
pub fn unacknowledged<'a>(tail: &'a [Logged], vms_dir: &Path) -> Vec<&'a Logged> {
    let mut acked: std::collections::HashMap<u64, u64> = Default::default();
    for entry in std::fs::read_dir(vms_dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "json") {
            if let Ok(m) = serde_json::from_slice::<Memory>(&std::fs::read(entry.path()).unwrap_or_default())
            {
                acked.insert(m.epoch, m.next_seq);
            }
        }
    }
    tail.iter().filter(|l| acked.get(&l.epoch).is_some_and(|&next| l.seq >= next)).collect()
}

/// A VM event key's epoch and sequence (see [`Memory::take_key`]).
fn split_key(key: &str) -> Option<(u64, u64)> {
    if key.len() != 32 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((u64::from_str_radix(&key[..16], 16).ok()?, u64::from_str_radix(&key[16..], 16).ok()?))
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
    fn bundled_incidents_are_those_with_a_bundle_event() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        let mut m = Memory::fresh();
        m.epoch = 0xcd;
        let (a, b, c) = (m.take_key(), m.take_key(), m.take_key());
        let text = format!(
            "{{\"key\":\"{a}\",\"kind\":\"transition\",\"detail\":{{}}}}\n\
             {{\"key\":\"{b}\",\"kind\":\"bundle\",\"detail\":{{\"trigger\":{{\"event\":\"{a}\"}}}}}}\n\
             {{\"key\":\"{c}\",\"kind\":\"reboot\",\"detail\":{{\"trigger\":{{\"event\":\"x\"}}}}}}\n"
        );
        std::fs::write(&log, text).unwrap();
        let got = bundled_incidents(&log_tail(&log).unwrap());
        assert_eq!(got.into_iter().collect::<Vec<_>>(), [a]);
    }

    #[test]
    fn the_logs_sequences_are_read_from_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        assert!(log_tail(&log).unwrap().is_empty(), "no log yet");
        let mut m = Memory::fresh();
        m.epoch = 0xab;
        let mut text = String::from("{\"key\": \"torn\"\n");
        for _ in 0..3 {
            text.push_str(&format!("{{\"key\":\"{}\",\"kind\":\"reboot\"}}\n", m.take_key()));
        }
        text.push_str("{\"key\":\"service-key-not-hex-zz000000000000\"}\nnot json\n");
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log).unwrap();
        let seen = logged_sequences(&tail);
        assert_eq!(seen.get(&0xab), Some(&2));
        assert_eq!(seen.len(), 1);
        // The state file says sequence 1 is next: events 1 and 2 may not be in the spool.
        let vms = dir.path().join("vms");
        m.next_seq = 1;
        save(&vms.join("web.json"), &m).unwrap();
        let seqs: Vec<u64> = unacknowledged(&tail, &vms).iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

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
