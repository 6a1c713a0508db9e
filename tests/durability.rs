//! Durability of the event log: the real service, killed with SIGKILL in the middle of a burst
//! of events, keeps every event it acknowledged. No QEMU: the burst is hundreds of VM
//! directories appearing at once (each gives `vm-added`, then `transition` to gone, as no QEMU
//! runs), which the service picks up at its next discovery.
//!
//! What "acknowledged" means (src/forward/mod.rs): written and fsynced to the log and the spool
//! by the writer thread. Two observers see it from outside the process: `/status`'s
//! `forward.events_logged` (a count: the first N events the run accepted, and the log keeps
//! them in that order) and the controller (an event is sent only once acknowledged).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use acpimon::forward::Event;
use acpimon::generate::SsdtConfig;
use common::service::{free_port, Controller, Service};

/// VMs per burst: two events each.
const BURST_VMS: usize = 300;

fn log_events(path: &Path) -> Vec<Event> {
    let text = std::fs::read(path).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with(b"\n"), "the log ends in a torn line");
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .unwrap_or_else(|e| panic!("bad log line {:?}: {e}", String::from_utf8_lossy(l)))
        })
        .collect()
}

/// Prepares `n` VM directories in `staging`, named `{prefix}NNN`.
fn prepare_vms(staging: &Path, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i:03}");
            acpimon::launch::prepare::prepare(staging, &name, &SsdtConfig::default()).unwrap();
            name
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_keeps_every_acknowledged_event() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let staging = tmp.path().join("staging");
    std::fs::create_dir_all(&state).unwrap();
    let ctl = Controller::start(free_port(), &tmp.path().join("store")).await;
    let config = format!(
        "[controller]\nurl = \"http://{}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n",
        ctl.addr
    );
    let mut svc = Service::start(&state, tmp.path(), &config).await;
    let log = svc.data_dir.join("events.jsonl");

    let mut cut_mid_burst = false;
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..3 {
        if round > 0 {
            svc.restart().await;
        }
        let before = log_events(&log).len();
        let names = prepare_vms(&staging, &format!("r{round}-vm"), BURST_VMS);
        // Wait for the service's own start event, then let the burst in.
        let start = Instant::now();
        let base = loop {
            let n = svc.status().await.forward.events_logged;
            if n >= 1 {
                break n;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "service-started never acknowledged");
        };
        for name in &names {
            std::fs::rename(staging.join(name), state.join(name)).unwrap();
        }
        // Kill as soon as some of the burst is acknowledged.
        let start = Instant::now();
        let seen = loop {
            let n = svc.status().await.forward.events_logged;
            if n >= base + 40 {
                break n;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "the burst did not start: {}", svc.log_text());
        };
        svc.kill();

        let logged = log_events(&log);
        let run = &logged[before..];
        assert!(
            run.len() as u64 >= seen,
            "round {round}: /status acknowledged {seen} events, the log holds {} of this run",
            run.len()
        );
        let expected = 1 + 2 * BURST_VMS;
        eprintln!(
            "round {round}: acknowledged {seen} at the kill; the log holds {} of {expected}",
            run.len()
        );
        if run.len() < expected {
            cut_mid_burst = true;
        }
        // The first `seen` events of the run are the acknowledged ones (the log keeps the
        // order of acceptance).
        acknowledged.extend(run[..seen as usize].iter().map(|e| e.key.clone()));
        // Everything the controller has came through the log.
        let in_log: BTreeSet<String> = logged.iter().map(|e| e.key.clone()).collect();
        for e in ctl.events() {
            assert!(
                in_log.contains(&e.key),
                "round {round}: the controller has {} but the log does not",
                e.key
            );
        }
        if cut_mid_burst {
            break;
        }
    }
    assert!(cut_mid_burst, "every kill came after its burst ended: the test proved nothing; raise BURST_VMS");

    // Restarted, the service sends what was acknowledged and not yet delivered (its spool
    // survived the kill): the controller ends up with every acknowledged event.
    svc.restart().await;
    ctl.wait_keys(&acknowledged, Duration::from_secs(60)).await;
    let logged: BTreeSet<String> = log_events(&log).into_iter().map(|e| e.key).collect();
    assert!(ctl.events().iter().all(|e| logged.contains(&e.key)));
}
