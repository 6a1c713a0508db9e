//! The VM's devices as QEMU sees them: drives (`query-block`, `query-blockstats`, and the
//! `BLOCK_IO_ERROR` events the monitor records), network links (HMP `info network`) and
//! `query-stats`. Every reply is bounded by the QMP client and read leniently.
//!
//! Replies are read into the small structs below, of only the fields used, each optional:
//! qapi 0.15's own reply types require fields older QEMUs lack (`BlockDeviceStats`'s
//! zone-append counters are QEMU 8's), so one QEMU 7.2 drive would fail the whole reply.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use super::{Devices, Drive, DriveDelta, DriveStats, IoError, IoErrors, NetLink};
use crate::event::BlockIoError;
use crate::trigger::qmp::{Qmp, QmpError};
use crate::util::lock;

/// Drives (and network devices) read from one reply, and drives whose errors and statistics
/// are remembered.
pub const MAX_DRIVES: usize = 64;
/// Names (drive, node, qdev path, net client) are cut to this many bytes.
pub const MAX_NAME: usize = 128;
/// A drive's image file name is cut to this many bytes.
pub const MAX_FILE: usize = 1024;
/// Error texts (QEMU's `reason`) are cut to this many bytes.
pub const MAX_REASON: usize = 256;
/// `query-stats`'s reply is kept when it serialises to at most this many bytes.
pub const MAX_STATS: usize = 64 << 10;
/// Of HMP `info network`'s text, this many bytes are read.
pub const MAX_NETWORK_TEXT: usize = 64 << 10;
/// `block-io-error` events of one (drive, operation, action, reason) come at most once per
/// this window; the errors in between are counted into the next one.
pub const COALESCE_WINDOW: Duration = Duration::from_secs(10);

/// A VM's device history: each drive's I/O errors and its last statistics, shared between the
/// monitor (which sees QMP's events) and the `host` step.
#[derive(Clone, Debug, Default)]
pub struct DeviceHistory {
    pub errors: BTreeMap<String, IoErrors>,
    /// Each drive's last `query-blockstats` counters and when they were read, for the next
    /// reading's delta.
    pub last_stats: BTreeMap<String, (Instant, DriveStats)>,
    /// Errors of drives beyond [`MAX_DRIVES`], not kept.
    pub errors_dropped: u64,
}

impl DeviceHistory {
    /// Records a `BLOCK_IO_ERROR` of `device`.
    pub fn io_error(&mut self, device: &str, e: IoError) {
        let e = IoError {
            time: cap(&e.time, 64),
            operation: cap(&e.operation, 32),
            action: cap(&e.action, 32),
            nospace: e.nospace,
            reason: cap(&e.reason, MAX_REASON),
        };
        let device = cap(device, MAX_NAME);
        let full = self.errors.len() >= MAX_DRIVES;
        match self.errors.get_mut(&device) {
            Some(seen) => {
                seen.count += 1;
                seen.last = e;
            }
            None if full => self.errors_dropped += 1,
            None => {
                self.errors.insert(device, IoErrors { count: 1, first: e.clone(), last: e });
            }
        }
    }

    /// Forgets everything: a new QEMU process (a relaunch) has drives of its own.
    pub fn clear(&mut self) {
        *self = DeviceHistory::default();
    }

    /// Fills `stats.delta` against `drive`'s previous reading (none on the first, or when a
    /// counter went back: QEMU restarted its counting), and keeps this one for the next.
    pub fn stats_reading(&mut self, drive: &str, now: Instant, stats: &mut DriveStats) {
        let drive = cap(drive, MAX_NAME);
        stats.delta = self.last_stats.get(&drive).and_then(|(then, prev)| delta(prev, stats, now - *then));
        let mut kept = stats.clone();
        kept.delta = None;
        if self.last_stats.len() >= MAX_DRIVES && !self.last_stats.contains_key(&drive) {
            // A new drive in a full table: the drive read longest ago makes room.
            if let Some(oldest) = self.last_stats.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| k.clone())
            {
                self.last_stats.remove(&oldest);
            }
        }
        self.last_stats.insert(drive, (now, kept));
    }

    /// The errors recorded for a drive: by its name, else its node's.
    fn errors_of(&self, drive: &Drive) -> Option<IoErrors> {
        let by_name = (!drive.device.is_empty()).then(|| self.errors.get(&drive.device)).flatten();
        by_name.or_else(|| drive.node.as_ref().and_then(|n| self.errors.get(n))).cloned()
    }
}

fn delta(prev: &DriveStats, now: &DriveStats, elapsed: Duration) -> Option<DriveDelta> {
    let ops = |s: &DriveStats| [s.rd_operations, s.wr_operations, s.flush_operations];
    let failed = |s: &DriveStats| [s.failed_rd_operations, s.failed_wr_operations, s.failed_flush_operations];
    let bytes = |s: &DriveStats| [s.rd_bytes, s.wr_bytes];
    let diff = |a: &[u64], b: &[u64]| -> Option<u64> {
        a.iter().zip(b).try_fold(0u64, |sum, (old, new)| Some(sum.saturating_add(new.checked_sub(*old)?)))
    };
    Some(DriveDelta {
        seconds: elapsed.as_secs_f64(),
        operations: diff(&ops(prev), &ops(now))?,
        failed_operations: diff(&failed(prev), &failed(now))?,
        bytes: diff(&bytes(prev), &bytes(now))?,
    })
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The name a `BLOCK_IO_ERROR` gives its drive: the BlockBackend's name, or for a `-blockdev`
/// node attached without one, the node's name.
pub fn drive_name(device: &str, node_name: Option<&str>) -> String {
    let name = match node_name {
        Some(node) if device.is_empty() && !node.is_empty() => node,
        _ => device,
    };
    cap(name, MAX_NAME)
}

// --- the coalescing of BLOCK_IO_ERROR into events --------------------------------------------

/// What one stream of errors is: a drive, an operation, what QEMU did, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BurstKey {
    device: String,
    operation: String,
    action: String,
    reason: String,
}

#[derive(Clone, Debug)]
struct Burst {
    /// When the current window started: the last event of this key was emitted then.
    since: Instant,
    /// Errors since the last event, the first's and last's times, and the last's node and
    /// `nospace`.
    count: u64,
    first: String,
    last: String,
    node: Option<String>,
    nospace: bool,
}

/// Turns a storm of `BLOCK_IO_ERROR` (a failing disk gives thousands a second) into few
/// `block-io-error` events: the first error of a (drive, operation, action, reason) is an event
/// at once; the ones after it within [`COALESCE_WINDOW`] are counted and become one event when
/// the window ends ([`Coalescer::flush`], every second), and so on while they go on. Pure: the
/// caller passes the time.
#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    bursts: BTreeMap<BurstKey, Burst>,
    /// Errors of keys beyond [`MAX_DRIVES`] streams, not reported.
    pub dropped: u64,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new(COALESCE_WINDOW)
    }
}

impl Coalescer {
    pub fn new(window: Duration) -> Coalescer {
        Coalescer { window, bursts: BTreeMap::new(), dropped: 0 }
    }

    /// An error of drive `device` (its node `node`), at `now`: the events due, oldest first
    /// (a window that ended unflushed, then this error's own when it starts a stream).
    pub fn error(
        &mut self,
        device: &str,
        node: Option<&str>,
        e: &IoError,
        now: Instant,
    ) -> Vec<BlockIoError> {
        let key = BurstKey {
            device: cap(device, MAX_NAME),
            operation: cap(&e.operation, 32),
            action: cap(&e.action, 32),
            reason: cap(&e.reason, MAX_REASON),
        };
        let node = node.map(|n| cap(n, MAX_NAME));
        let time = cap(&e.time, 64);
        let mut due = Vec::new();
        if let Some(b) = self.bursts.get_mut(&key) {
            if now.saturating_duration_since(b.since) < self.window {
                if b.count == 0 {
                    b.first = time.clone();
                }
                b.count += 1;
                b.last = time;
                b.node = node;
                b.nospace = e.nospace;
                return due;
            }
            // Its window ended without a flush: what it counted goes first.
            let b = self.bursts.remove(&key).expect("present");
            due.extend(event(&key, b));
        } else if self.bursts.len() >= MAX_DRIVES {
            self.dropped += 1;
            return due;
        }
        let b = Burst { since: now, count: 1, first: time.clone(), last: time, node, nospace: e.nospace };
        due.push(event(&key, b.clone()).expect("count 1"));
        self.bursts.insert(key, Burst { count: 0, ..b });
        due
    }

    /// The events of windows that ended by `now`: a stream that went on is one event with its
    /// count (and a new window); a quiet one is forgotten (its next error is an event at once).
    pub fn flush(&mut self, now: Instant) -> Vec<BlockIoError> {
        let mut due = Vec::new();
        let window = self.window;
        self.bursts.retain(|key, b| {
            if now.saturating_duration_since(b.since) < window {
                return true;
            }
            match event(key, b.clone()) {
                Some(ev) => {
                    due.push(ev);
                    b.since = now;
                    b.count = 0;
                    true
                }
                None => false,
            }
        });
        due
    }

    /// Every counted error as events, and forgets all (the monitor detaches).
    pub fn drain(&mut self) -> Vec<BlockIoError> {
        std::mem::take(&mut self.bursts).into_iter().filter_map(|(k, b)| event(&k, b)).collect()
    }
}

fn event(key: &BurstKey, b: Burst) -> Option<BlockIoError> {
    (b.count > 0).then(|| BlockIoError {
        device: key.device.clone(),
        node_name: b.node,
        operation: key.operation.clone(),
        action: key.action.clone(),
        nospace: b.nospace,
        reason: key.reason.clone(),
        count: b.count,
        first: b.first,
        last: b.last,
    })
}

// --- reading the devices -----------------------------------------------------------------------

#[derive(Deserialize)]
struct BlockInfoReply {
    #[serde(default)]
    device: String,
    qdev: Option<String>,
    #[serde(rename = "io-status")]
    io_status: Option<String>,
    inserted: Option<InsertedReply>,
}

#[derive(Deserialize)]
struct InsertedReply {
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    file: Option<String>,
    #[serde(default)]
    ro: bool,
}

#[derive(Deserialize)]
struct BlockStatsReply {
    device: Option<String>,
    qdev: Option<String>,
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    stats: CountersReply,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct CountersReply {
    rd_operations: Option<i64>,
    wr_operations: Option<i64>,
    flush_operations: Option<i64>,
    rd_bytes: Option<i64>,
    wr_bytes: Option<i64>,
    failed_rd_operations: Option<i64>,
    failed_wr_operations: Option<i64>,
    failed_flush_operations: Option<i64>,
    idle_time_ns: Option<i64>,
}

impl CountersReply {
    fn stats(&self) -> DriveStats {
        let n = |v: Option<i64>| v.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        DriveStats {
            rd_operations: n(self.rd_operations),
            wr_operations: n(self.wr_operations),
            flush_operations: n(self.flush_operations),
            rd_bytes: n(self.rd_bytes),
            wr_bytes: n(self.wr_bytes),
            failed_rd_operations: n(self.failed_rd_operations),
            failed_wr_operations: n(self.failed_wr_operations),
            failed_flush_operations: n(self.failed_flush_operations),
            idle_ms: self.idle_time_ns.and_then(|ns| u64::try_from(ns).ok()).map(|ns| ns / 1_000_000),
            delta: None,
        }
    }
}

/// The entries of a list reply, at most [`MAX_DRIVES`], each read on its own (one that does
/// not fit is left out, with a note); `what` names the query in notes.
fn entries<T: for<'de> Deserialize<'de>>(reply: &Value, what: &str, notes: &mut Vec<String>) -> Vec<T> {
    let Some(list) = reply.as_array() else {
        notes.push(format!("{what}: the reply is not a list"));
        return Vec::new();
    };
    if list.len() > MAX_DRIVES {
        notes.push(format!("{what}: {} entries, the first {MAX_DRIVES} kept", list.len()));
    }
    let mut bad = 0;
    let out =
        list.iter().take(MAX_DRIVES).filter_map(|v| T::deserialize(v).map_err(|_| bad += 1).ok()).collect();
    if bad > 0 {
        notes.push(format!("{what}: {bad} entries unreadable, left out"));
    }
    out
}

/// The drives of `query-block`'s reply.
fn drives(reply: &Value, notes: &mut Vec<String>) -> Vec<Drive> {
    entries::<BlockInfoReply>(reply, "query-block", notes)
        .into_iter()
        .map(|b| {
            let qdev = b.qdev.map(|q| cap(&q, MAX_NAME));
            // A -blockdev node attached without a BlockBackend name: its device's path names it.
            let device = match (&qdev, b.device.is_empty()) {
                (Some(q), true) => q.clone(),
                _ => cap(&b.device, MAX_NAME),
            };
            Drive {
                device,
                qdev,
                node: b.inserted.as_ref().and_then(|i| i.node_name.as_deref()).map(|n| cap(n, MAX_NAME)),
                file: b.inserted.as_ref().and_then(|i| i.file.as_deref()).map(|f| cap(f, MAX_FILE)),
                io_status: b.io_status.map(|s| cap(&s, 32)),
                read_only: b.inserted.as_ref().is_some_and(|i| i.ro),
                stats: None,
                errors: None,
            }
        })
        .collect()
}

/// Gives each drive its `query-blockstats` counters, matched by name, qdev path or node name.
fn attach_stats(drives: &mut [Drive], reply: &Value, notes: &mut Vec<String>) -> Vec<(usize, DriveStats)> {
    let mut found = Vec::new();
    for s in entries::<BlockStatsReply>(reply, "query-blockstats", notes) {
        let same = |a: &Option<String>, b: &Option<String>| matches!((a, b), (Some(a), Some(b)) if !a.is_empty() && cap(a, MAX_NAME) == *b);
        let device = s.device.as_ref().filter(|d| !d.is_empty()).map(|d| cap(d, MAX_NAME));
        let i = drives
            .iter()
            .position(|d| device.as_ref() == Some(&d.device))
            .or_else(|| drives.iter().position(|d| same(&s.qdev, &d.qdev) || same(&s.node_name, &d.node)));
        if let Some(i) = i {
            found.push((i, s.stats.stats()));
        }
    }
    found
}

/// HMP `info network`, as QEMU 5.2 to 10.0 print it (`net/net.c`): a line per net client,
/// `NAME: index=N,type=TYPE,INFO` (a NIC's INFO is `model=MODEL,macaddr=...`); under a NIC,
/// its backend as ` \ NAME: ...`; the legacy hubs as `hub N` with their ports as
/// ` \ hubNportM: NAME: ...`; a netdev's filters as `filters:` and `  - ID: ...`. A NIC is
/// listed with its backend (or hub); a backend without a NIC on its own.
///
/// QEMU does not print a link set down with `set_link` (no version up to 10.0 does), so
/// `link_up` says whether the device is connected at all: a NIC with a backend or a hub, a
/// backend with a NIC; a `link=down` in a client's INFO, should a QEMU print it, counts too.
/// Bounded: [`MAX_NETWORK_TEXT`] bytes, [`MAX_DRIVES`] devices, names cut to [`MAX_NAME`].
pub fn parse_info_network(text: &str) -> Vec<NetLink> {
    let text = cap(text, MAX_NETWORK_TEXT);
    let mut out: Vec<NetLink> = Vec::new();
    let mut hub: Option<String> = None;
    // The top-level NIC the next ` \ ` line belongs to (its index in `out`).
    let mut nic: Option<usize> = None;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(n) = line.strip_prefix("hub ").filter(|n| !n.contains(':')) {
            hub = Some(cap(&format!("hub {}", n.trim()), MAX_NAME));
            nic = None;
            continue;
        }
        let (peer_line, body) = match line.strip_prefix(" \\ ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some(c) = client(body) else { continue };
        let new_entry = !peer_line || (c.hub_port && c.kind == "nic");
        if new_entry && out.len() >= MAX_DRIVES {
            break;
        }
        if !peer_line {
            hub = None;
            nic = None;
            let is_nic = c.kind == "nic";
            out.push(NetLink {
                name: c.name,
                kind: if is_nic { c.model.unwrap_or_else(|| "nic".into()) } else { c.kind },
                link_up: false,
                peer: None,
            });
            if is_nic {
                nic = Some(out.len() - 1);
            }
            continue;
        }
        match (c.hub_port, &hub, nic) {
            // A NIC on a hub: connected through it.
            (true, Some(h), _) if c.kind == "nic" => out.push(NetLink {
                name: c.name,
                kind: c.model.unwrap_or_else(|| "nic".into()),
                link_up: !c.link_down,
                peer: Some(h.clone()),
            }),
            // A NIC's backend.
            (false, _, Some(i)) => {
                let l = &mut out[i];
                l.peer = Some(cap(&format!("{} ({})", c.name, c.kind), MAX_NAME));
                l.link_up = !c.link_down;
            }
            // A backend on a hub, or a line out of place: nothing of a device's link.
            _ => {}
        }
    }
    out
}

/// One net client of `info network`.
struct Client {
    name: String,
    kind: String,
    model: Option<String>,
    /// Printed as a hub's port (`hubNportM: NAME: ...`).
    hub_port: bool,
    link_down: bool,
}

fn client(line: &str) -> Option<Client> {
    let at = line.find(": index=")?;
    let names = &line[..at];
    let (hub_port, name) = match names.rsplit_once(": ") {
        Some((_, name)) => (true, name),
        None => (false, names),
    };
    let mut kind = String::new();
    let mut model = None;
    let mut link_down = false;
    for prop in line[at + 2..].split(',').take(64) {
        match prop.split_once('=') {
            Some(("type", v)) => kind = cap(v.trim(), 32),
            Some(("model", v)) => model = Some(cap(v.trim(), 64)),
            Some(("link", v)) => link_down = v.trim() == "down",
            _ => {}
        }
    }
    Some(Client { name: cap(name.trim(), MAX_NAME), kind, model, hub_port, link_down })
}

/// `query-stats`'s reply, kept when QEMU and its accelerator provide anything and it is at
/// most [`MAX_STATS`] bytes; otherwise why not, as a note.
fn stats_reply(reply: Value, notes: &mut Vec<String>) -> Option<Value> {
    if reply.as_array().is_some_and(Vec::is_empty) || reply.is_null() {
        notes.push(
            "query-stats: not provided by this QEMU/accelerator (an empty reply: TCG has no statistics)"
                .into(),
        );
        return None;
    }
    let size = serde_json::to_string(&reply).map_or(usize::MAX, |s| s.len());
    if size > MAX_STATS {
        notes.push(format!("query-stats: a reply of {size} bytes, over {MAX_STATS}; not kept"));
        return None;
    }
    Some(reply)
}

/// Reads the VM's devices over QMP, each query bounded by `timeout`; what failed is a note.
/// The four queries go out at once (QEMU answers them in turn), so the whole takes about
/// `timeout` at most, even from a QEMU that answers nothing (stopped by SIGSTOP).
pub async fn read(
    qmp: &Qmp,
    history: &std::sync::Mutex<DeviceHistory>,
    timeout: Duration,
) -> (Devices, Vec<String>) {
    // `query-stats` for the vCPUs (per-vCPU exits, halts): qapi 0.15's `vm` target does not
    // serialise (a list inside an internally tagged enum), and the vCPUs' are the telling ones.
    let stats_filter =
        qapi::qmp::StatsFilter::vcpu { providers: None, vcpu: qapi::qmp::StatsVCPUFilter { vcpus: None } };
    let (block, blockstats, network, stats) = tokio::join!(
        within("query-block", timeout, qmp.execute_json(qapi::qmp::query_block {}, timeout)),
        within(
            "query-blockstats",
            timeout,
            qmp.execute_json(qapi::qmp::query_blockstats { query_nodes: None }, timeout)
        ),
        within("info network", timeout, qmp.hmp_within("info network", None, timeout)),
        within("query-stats", timeout, qmp.execute_json(qapi::qmp::query_stats(stats_filter), timeout)),
    );
    let now = Instant::now();
    let mut notes = Vec::new();
    let mut devices = Devices::default();
    match block {
        Ok(reply) => devices.block = drives(&reply, &mut notes),
        Err(e) => notes.push(e),
    }
    let readings = match blockstats {
        Ok(reply) => attach_stats(&mut devices.block, &reply, &mut notes),
        Err(e) => {
            notes.push(e);
            Vec::new()
        }
    };
    {
        let mut h = lock(history);
        for (i, mut stats) in readings {
            let d = &mut devices.block[i];
            h.stats_reading(&d.device, now, &mut stats);
            d.stats = Some(stats);
        }
        for d in &mut devices.block {
            d.errors = h.errors_of(d);
        }
    }
    match network {
        Ok(text) => devices.net = parse_info_network(&text),
        Err(e) => notes.push(e),
    }
    match stats {
        Ok(reply) => devices.stats = stats_reply(reply, &mut notes),
        Err(e) => notes.push(match e.contains("CommandNotFound") {
            true => format!("query-stats: not provided by this QEMU/accelerator ({e})"),
            false => e,
        }),
    }
    (devices, notes)
}

/// `fut`'s outcome within `timeout` (bounded here too: a QEMU that reads nothing could block
/// the request's write), or a note naming `what` and why not.
async fn within<T>(
    what: &str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, QmpError>>,
) -> Result<T, String> {
    let late = || format!("{what}: no reply within {} ms; QEMU is stuck or stopped", timeout.as_millis());
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(QmpError::Timeout { .. })) | Err(_) => Err(late()),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests;
