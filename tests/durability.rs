//! Durability of the event log: the real service, killed with SIGKILL in the middle of a burst
//! of events, keeps every event it acknowledged. No QEMU: the burst is hundreds of VM
//! directories appearing at once (each gives `vm-added`, then `transition` to gone, as no QEMU
//! runs), which the service picks up at its next discovery.
//!
//! What "acknowledged" means (src/forward/mod.rs): written and fsynced to the log and the spool
//! by the writer thread. Two observers see it from outside the process: `/status`'s
//! `forward.events_logged` (a count: the first N events the run accepted, and the log keeps
//! them in that order) and the controller (an event is sent only once acknowledged).
//!
//! A full disk, for real: a small tmpfs ([`common::tmpfs`], root) under the writer, a bundle,
//! the service and a real guest. Accepted events are held in memory and written, in order and
//! once, when space returns; beyond the hold they are lost only with a count, an error and an
//! `events-lost` event; no torn line, no half bundle.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
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

// ---- A full disk (a real one: a small tmpfs) ----

mod full_disk {
    use super::*;
    use acpimon::event::{new_key, EventKind, VmRemoved};
    use acpimon::forward::{ControllerConfig, ForwardConfig, Forwarder, HoldLimits};
    use common::tmpfs::Tmpfs;

    /// The `i`-th test event; its directory names it, padded to about 1 KiB so a few hundred
    /// fill a small file system.
    fn event(i: usize) -> Event {
        let dir = format!("/run/acpimon/vm{i:05}/{}", "p".repeat(900)).into();
        Event::new(new_key(), "n", None, EventKind::VmRemoved(VmRemoved { dir }))
    }

    fn config(fs: &Tmpfs, hold: HoldLimits) -> ForwardConfig {
        ForwardConfig {
            log: Some(fs.join("events.jsonl")),
            spool_dir: fs.join("spool"),
            // Nothing listens, and the sender is not run: entries stay in the spool.
            controller: Some(ControllerConfig {
                url: "http://127.0.0.1:9".into(),
                timeout: Duration::from_secs(1),
                spool_max_bytes: 64 << 20,
                spool_max_events: 100_000,
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(1),
                ca_file: None,
                client_cert: None,
                client_key: None,
                token_file: None,
            }),
            hook: None,
            hold,
        }
    }

    fn wait(what: &str, fw: &Forwarder, done: impl Fn(&acpimon::forward::ForwardStats) -> bool) {
        let start = Instant::now();
        loop {
            let s = fw.stats();
            if done(&s) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{what}: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The spooled events' keys, in spool (sending) order.
    fn spool_keys(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| {
                assert!(n.ends_with(".json") && !n.starts_with('.'), "a leftover in the spool: {n}");
                serde_json::from_slice::<Event>(&std::fs::read(dir.join(n)).unwrap()).unwrap().key
            })
            .collect()
    }

    #[test]
    fn the_writer_holds_events_on_a_full_disk_and_writes_them_in_order_once_space_returns() {
        let fs = Tmpfs::mount("2m");
        let (fw, _task) = Forwarder::open(config(&fs, HoldLimits::default())).unwrap();
        let events: Vec<Event> = (0..60).map(event).collect();
        for ev in &events[..5] {
            fw.submit(ev).unwrap();
        }
        fw.flush();
        fs.fill();
        for ev in &events[5..] {
            fw.submit(ev).unwrap();
        }
        wait("the events after the disk filled up are held", &fw, |s| s.held_events == 55);
        let s = fw.stats();
        assert_eq!((s.events_accepted, s.events_logged, s.events_lost), (60, 5, 0), "{s:?}");
        let problem = s.disk_condition().expect("a full disk is a health condition");
        // The log's last page or the spool refused first, whichever had no room.
        assert!(problem.starts_with("disk full: cannot") && problem.contains("55 events"), "{problem}");
        // Whole lines only (`log_events` checks): a failed append was cut back.
        let logged = log_events(&fs.join("events.jsonl")).len();
        assert!((5..60).contains(&logged), "{logged} lines");
        // Still held after several retries, and nothing written meanwhile.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(fw.stats().held_events, 55);
        assert!(fw.stats().write_failures >= 2, "retried with backoff: {:?}", fw.stats());

        fs.unfill();
        wait("every held event is written once space returns", &fw, |s| {
            s.held_events == 0 && s.events_logged == 60
        });
        let s = fw.stats();
        assert_eq!((s.disk_problem.as_deref(), s.events_lost, s.pending_events), (None, 0, 60), "{s:?}");
        assert!(fw.take_loss().is_none(), "nothing was lost");
        let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
        let logged: Vec<String> = log_events(&fs.join("events.jsonl")).into_iter().map(|e| e.key).collect();
        assert_eq!(logged, keys, "the log holds every event once, in order");
        assert_eq!(spool_keys(&fs.join("spool")), keys, "the spool too");
        fw.flush();
    }

    #[test]
    fn beyond_the_hold_events_are_dropped_counted_and_reported_once_space_returns() {
        let fs = Tmpfs::mount("1m");
        let hold = HoldLimits { max_bytes: 1 << 20, max_events: 10 };
        let (fw, _task) = Forwarder::open(config(&fs, hold)).unwrap();
        fw.submit(&event(0)).unwrap();
        fw.flush();
        fs.fill();
        let events: Vec<Event> = (1..31).map(event).collect();
        fw.submit(&events[0]).unwrap();
        // The first failure starts the hold; from then on its bound applies.
        wait("the disk is seen full", &fw, |s| s.disk_problem.is_some());
        for ev in &events[1..] {
            fw.submit(ev).unwrap();
        }
        wait("ten held, the rest lost", &fw, |s| s.held_events == 10 && s.events_lost == 20);
        assert!(fw.stats().disk_condition().unwrap().contains("20 lost so far"));
        assert!(fw.take_loss().is_none(), "a loss is reported once the disk takes writes again");
        fs.unfill();
        wait("the held ones are written", &fw, |s| s.held_events == 0 && s.events_logged == 11);
        let loss = fw.take_loss().expect("the loss is handed over");
        assert_eq!((loss.count, &loss.first, &loss.last), (20, &events[10].time, &events[29].time));
        assert!(fw.take_loss().is_none(), "reported once");
        let logged: Vec<String> = log_events(&fs.join("events.jsonl")).into_iter().map(|e| e.key).collect();
        let expected: Vec<String> =
            std::iter::once(&logged[0]).chain(events[..10].iter().map(|e| &e.key)).cloned().collect();
        assert_eq!(logged, expected, "the held ten, in order, after the first");
        // The dropped events' spool slots are freed; the held ones are spooled.
        assert_eq!(spool_keys(&fs.join("spool")), expected);
        assert_eq!(fw.stats().pending_events, 11);
    }

    /// The resident memory of this process, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn memory_stays_bounded_while_the_disk_is_full() {
        let fs = Tmpfs::mount("1m");
        // The default hold: 16 MiB.
        let (fw, _task) = Forwarder::open(config(&fs, HoldLimits::default())).unwrap();
        fw.submit(&event(0)).unwrap();
        fw.flush();
        fs.fill();
        fw.submit(&event(1)).unwrap();
        wait("the disk is seen full", &fw, |s| s.disk_problem.is_some());
        let before = rss_kib();
        // 60 MB of events offered (nearly four times the hold), in chunks the writer keeps up
        // with.
        let n = 60_000;
        for i in 0..n {
            fw.submit(&event(i)).unwrap();
            if i % 5000 == 0 {
                wait("the writer takes what is offered", &fw, |s| {
                    s.held_events as u64 + s.events_lost > i as u64
                });
            }
        }
        wait("every event is held or lost", &fw, |s| s.held_events as u64 + s.events_lost == n as u64 + 1);
        let s = fw.stats();
        let after = rss_kib();
        eprintln!(
            "offered {n} events of ~1 KiB on a full disk: {} held ({} bytes), {} lost; RSS {before} -> {after} KiB",
            s.held_events, s.held_bytes, s.events_lost
        );
        assert!(s.held_bytes <= 16 << 20 && s.events_lost > 40_000, "{s:?}");
        // The hold's 16 MiB, and the allocator's slack around it (measured: about 2x).
        assert!(after < before + 64 * 1024, "RSS grew from {before} to {after} KiB");
    }

    #[test]
    fn atomic_writes_keep_the_old_file_whole_on_a_full_disk() {
        let fs = Tmpfs::mount("512k");
        let state = fs.join("state.json");
        acpimon::util::fs::atomic_write(&state, b"{\"version\":1}\n").unwrap();
        fs.fill();
        let big = vec![b'x'; 64 << 10];
        let err = acpimon::util::fs::atomic_write(&state, &big).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "{err}");
        assert_eq!(std::fs::read(&state).unwrap(), b"{\"version\":1}\n", "the old contents stay whole");
        let names: Vec<String> = std::fs::read_dir(&fs.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "no partial temporary is left: {names:?}");
        fs.unfill();
        acpimon::util::fs::atomic_write(&state, &big).unwrap();
        assert_eq!(std::fs::read(&state).unwrap(), big);
    }
}

mod full_disk_bundles {
    use super::*;
    use acpimon::diagnose::{collect, DiagnoseError, Step, StepSpec, Target, Trigger};
    use common::tmpfs::Tmpfs;

    fn trigger() -> Trigger {
        Trigger {
            kind: "unresponsive".into(),
            time: "2026-01-01T00:00:00.000Z".into(),
            reason: "test".into(),
            evidence: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn a_bundle_written_to_a_full_disk_is_failed_and_removed() {
        let fs = Tmpfs::mount("512k");
        let target = Target {
            vm: "vm-1",
            qmp: None,
            console: None,
            gdb_socket: fs.join("gdb.sock"),
            guest_agent: None,
            host: Default::default(),
            kernel_log: None,
        };
        let script =
            Step::new(StepSpec::Script { argv: vec!["sh".into(), "-c".into(), "echo evidence".into()] });

        // With room: a bundle.
        let ok = fs.join("bundles/vm-1/ok");
        let m = collect(std::slice::from_ref(&script), &target, &trigger(), vec![], &ok).await.unwrap();
        assert_eq!(m.steps[0].bytes, 9);
        assert!(ok.join("manifest.json").is_file());

        fs.fill();
        // A step's file refused: the bundle fails, with what the steps found, and is removed.
        let dir = fs.join("bundles/vm-1/step");
        let err =
            collect(std::slice::from_ref(&script), &target, &trigger(), vec![], &dir).await.unwrap_err();
        let msg = err.to_string();
        let DiagnoseError::NotWritten { manifest, reason, .. } = err else { panic!("{msg}") };
        assert!(
            reason.contains("cannot write 01-script.log") && reason.contains("No space left"),
            "{reason}"
        );
        assert!(msg.contains("free space"), "{msg}");
        assert_eq!(manifest.steps.len(), 1, "what the steps found is still reported");
        assert!(!dir.exists(), "a partial bundle is removed");

        // The manifest refused (no step writes anything): the same.
        let dir = fs.join("bundles/vm-1/manifest");
        let err = collect(&[], &target, &trigger(), vec![], &dir).await.unwrap_err();
        assert!(
            matches!(&err, DiagnoseError::NotWritten { reason, .. } if reason.contains("manifest.json")),
            "{err}"
        );
        assert!(!dir.exists());
        assert!(ok.join("manifest.json").is_file(), "the complete bundle stays");
    }
}

mod full_disk_service {
    use super::*;
    use common::tmpfs::Tmpfs;

    /// The process's resident memory, in KiB.
    fn rss_kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    async fn wait_status(
        svc: &Service,
        what: &str,
        pred: impl Fn(&acpimon::watch::metrics::StatusView) -> bool,
    ) {
        let start = Instant::now();
        loop {
            let s = svc.status().await;
            if pred(&s) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}: {:?}\n{}", s.forward, svc.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The real service with its data directory on a full tmpfs and the controller down: it
    /// holds what it accepts (up to its bound), says "disk full" everywhere it reports health,
    /// loses beyond the bound only with a count and an `events-lost` event, and once space
    /// and the controller return, every event the log holds reaches the controller once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_service_on_a_full_disk_holds_reports_and_delivers_every_logged_event_once() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let staging = tmp.path().join("staging");
        std::fs::create_dir_all(&state).unwrap();
        let data = Tmpfs::mount_on(&tmp.path().join("data"), "4m");
        let port = free_port();
        let config = format!(
            "event_hold_max_events = 100\n[controller]\nurl = \"http://127.0.0.1:{port}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"500ms\"\n"
        );
        // systemd's notification socket, to read STATUS=.
        let notify_path = tmp.path().join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap())];
        let svc = Service::start_with_env(&state, tmp.path(), &config, &env).await;
        assert_eq!(svc.data_dir, data.path);
        let log = svc.data_dir.join("events.jsonl");
        wait_status(&svc, "service-started is written", |s| s.forward.events_logged >= 1).await;
        assert_eq!(get(svc.addr, "/healthz").await, (200, "ok\n".into()));
        let pid = svc.pid().unwrap();
        let rss_before = rss_kib(pid);

        data.fill();
        // Forty VMs: 80 events (vm-added, then gone), all held.
        for name in prepare_vms(&staging, "a", 40) {
            std::fs::rename(staging.join(&name), state.join(&name)).unwrap();
        }
        wait_status(&svc, "80 events held", |s| s.forward.held_events >= 80).await;
        let s = svc.status().await;
        assert_eq!(s.forward.events_lost, 0);
        let (code, body) = get(svc.addr, "/healthz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("disk full: cannot") && body.contains("held in memory"), "{body}");
        let table = common::text(&common::acpimon(&["status", "--addr", &svc.addr.to_string()]).stdout);
        assert!(table.contains("DISK FULL: disk full: cannot"), "{table}");
        let (_, metrics) = get(svc.addr, "/metrics").await;
        assert!(metrics.contains("\nacpimon_disk_full 1\n"), "{metrics}");
        let mut buf = [0u8; 1024];
        let status = loop {
            let n = notify.recv(&mut buf).expect("systemd notifications");
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if text.contains("STATUS=disk full") {
                break text;
            }
        };
        assert!(
            status.starts_with("WATCHDOG=1\nSTATUS=disk full: cannot"),
            "the service still works: {status}"
        );

        // Forty more: the hold (100 events) overflows; the rest is lost, counted.
        for name in prepare_vms(&staging, "b", 40) {
            std::fs::rename(staging.join(&name), state.join(&name)).unwrap();
        }
        wait_status(&svc, "the hold is full and events are lost", |s| {
            s.forward.held_events == 100 && s.forward.events_lost > 0
        })
        .await;
        let rss_full = rss_kib(pid);
        let table = common::text(&common::acpimon(&["status", "--addr", &svc.addr.to_string()]).stdout);
        assert!(table.contains("lost so far"), "{table}");
        assert!(svc.log_text().contains("new events are DROPPED"), "an error-level line says so");
        // Whole lines only on disk meanwhile.
        let logged_while_full = log_events(&log).len();

        data.unfill();
        let ctl = Controller::start(port, &tmp.path().join("store")).await;
        // The loss is reported at the service's next pulse once the disk takes writes.
        svc.wait_event("events-lost", Duration::from_secs(30), |e| e.kind == "events-lost").await;
        wait_status(&svc, "everything held is written and delivered", |s| {
            s.forward.held_events == 0
                && s.forward.disk_problem.is_none()
                && s.forward.pending_events == 0
                && s.forward.events_logged == s.forward.events_accepted - s.forward.events_lost
        })
        .await;
        let s = svc.status().await;
        let lost = s.forward.events_lost;
        let logged = log_events(&log);
        let lost_event =
            logged.iter().find(|e| e.kind.name() == "events-lost").expect("an events-lost event");
        let acpimon::event::EventKind::EventsLost(l) = &lost_event.kind else { unreachable!() };
        assert_eq!(l.count, lost, "the event counts every lost event");
        assert_eq!(s.forward.events_accepted, logged.len() as u64 + lost);
        assert!(logged.len() > logged_while_full);
        // Every event the log holds reaches the controller, once.
        let keys: Vec<String> = logged.iter().map(|e| e.key.clone()).collect();
        assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), keys.len(), "no event twice in the log");
        ctl.wait_keys(&keys, Duration::from_secs(60)).await;
        assert_eq!(ctl.events().len(), keys.len(), "the controller has nothing else");
        let s = svc.status().await;
        assert_eq!((s.forward.delivered, s.forward.duplicates_acknowledged), (keys.len() as u64, 0));
        assert_eq!(get(svc.addr, "/healthz").await, (200, "ok\n".into()));
        // The state files the disk refused were written after, atomically: no temporary left.
        let vms: Vec<String> = std::fs::read_dir(svc.data_dir.join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            vms.len() >= 40 && vms.iter().all(|n| n.ends_with(".json") && !n.starts_with('.')),
            "{vms:?}"
        );
        let (_, metrics) = get(svc.addr, "/metrics").await;
        assert!(metrics.contains(&format!("\nacpimon_forward_events_lost_total {lost}\n")), "{metrics}");
        assert!(metrics.contains("\nacpimon_disk_full 0\n"));
        let table = common::text(&common::acpimon(&["status", "--addr", &svc.addr.to_string()]).stdout);
        assert!(table.contains(&format!("EVENTS LOST: {lost} accepted events")), "{table}");
        eprintln!(
            "accepted {}, logged and delivered {}, lost with a count and an event {lost}; RSS {rss_before} KiB before, {rss_full} KiB with the disk full and the hold full",
            s.forward.events_accepted,
            keys.len()
        );
        assert!(rss_full < rss_before + 16 * 1024, "memory grew from {rss_before} to {rss_full} KiB");
    }
}

/// A log whose last line was torn (a crash or a full disk mid-append, in an earlier version or
/// on a file system that does not honour the cut-back) is repaired when the service starts,
/// and the service says so; the whole lines before it stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_on_start_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let whole = format!(
        "{}\n",
        serde_json::to_string(&Event::new(
            acpimon::event::new_key(),
            "n",
            None,
            acpimon::event::EventKind::VmRemoved(acpimon::event::VmRemoved { dir: "/x".into() })
        ))
        .unwrap()
    );
    std::fs::write(data.join("events.jsonl"), format!("{whole}{{\"key\":\"0123")).unwrap();
    let svc = Service::start(&state, tmp.path(), "").await;
    let start = Instant::now();
    while svc.status().await.forward.events_logged < 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "service-started never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged = log_events(&data.join("events.jsonl"));
    assert_eq!(logged.len(), 2, "the whole line, then service-started");
    assert_eq!(logged[1].kind.name(), "service-started");
    let text = svc.log_text();
    assert!(text.contains("cut off a torn last line") && text.contains("bytes=12"), "{text}");
}

/// A real guest hangs while the service's data directory is full and the controller is down:
/// the bundle cannot be written, so it is `failed` (removed, not counted as a bundle), and
/// every event, the bundle's included, is held and then delivered once, in order, when space
/// and the controller return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_on_a_full_disk_gives_a_failed_bundle_and_every_event_once_space_returns() {
    use acpimon::watch::state::State;
    use common::guest::{Guest, GuestSpec};
    use common::tmpfs::Tmpfs;

    let tmp = tempfile::Builder::new().prefix("acpimon-full").tempdir_in("/tmp").unwrap();
    let data = Tmpfs::mount_on(&tmp.path().join("data"), "8m");
    let port = free_port();
    let extra = vec!["-S".to_string(), "-no-shutdown".to_string()];
    let g = Guest::boot(GuestSpec {
        watched: true,
        scenario: "healthy",
        delay: 3,
        extra,
        ..GuestSpec::new("pc")
    })
    .await;
    let config = format!(
        "[controller]\nurl = \"http://127.0.0.1:{port}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n[defaults]\nstartup_grace = \"90s\"\n"
    );
    let svc = common::service::watch_guest(&g, tmp.path(), &config).await;
    assert_eq!(svc.data_dir, data.path);
    svc.wait_state("guest", State::Healthy, Duration::from_secs(120)).await;
    let before = svc.events();

    data.fill();
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    let start = Instant::now();
    let view = loop {
        let v = svc.vm("guest").await.unwrap();
        if v.diagnostics_failed + v.diagnostics_ok > 0 {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "no bundle: {}", svc.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((view.diagnostics_ok, view.diagnostics_failed), (0, 1), "a bundle on a full disk is failed");
    let s = svc.status().await;
    assert!(s.forward.held_events >= 3, "the transitions and the bundle event are held: {:?}", s.forward);
    assert_eq!(s.forward.events_lost, 0);
    // What reached the log meanwhile (the last page's room) is whole lines: `log_events`
    // checks every line and the final newline.
    let logged_meanwhile = log_events(&svc.data_dir.join("events.jsonl")).len();
    assert!(logged_meanwhile < before.len() + s.forward.held_events, "{logged_meanwhile}");

    data.unfill();
    let ctl = Controller::start(port, &tmp.path().join("store")).await;
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Healthy, Duration::from_secs(30)).await;
    let bundle = svc.wait_event("bundle", Duration::from_secs(30), |e| e.kind == "bundle").await;
    assert_eq!(bundle.detail["outcome"], "failed", "{:#?}", bundle.detail);
    let error = bundle.detail["error"].as_str().unwrap();
    assert!(error.contains("No space left on device"), "{error}");
    let dir = PathBuf::from(bundle.detail["bundle"].as_str().unwrap());
    assert!(!dir.exists(), "the partial bundle {} is removed", dir.display());

    // Every event the log holds reaches the controller once; the log's order is the VM's.
    let logged = svc.events();
    let keys: Vec<String> = logged.iter().map(|e| e.key.clone()).collect();
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), keys.len(), "no event twice in the log");
    ctl.wait_keys(&keys, Duration::from_secs(60)).await;
    assert_eq!(ctl.events().len(), keys.len());
    let to: Vec<String> = logged
        .iter()
        .filter(|e| e.kind == "transition")
        .map(|e| e.detail["to"].as_str().unwrap().to_string())
        .collect();
    let hang = to.iter().position(|t| t == "unresponsive").expect("the hang is logged");
    assert!(to[hang..].contains(&"healthy".to_string()), "in order: {to:?}");
    let s = svc.status().await;
    assert_eq!((s.forward.duplicates_acknowledged, s.forward.events_lost, s.forward.held_events), (0, 0, 0));
    let (_, metrics) = get(svc.addr, "/metrics").await;
    assert!(metrics.contains("acpimon_diagnostics_total{vm=\"guest\"} 0"), "{metrics}");
    assert!(metrics.contains("acpimon_diagnostics_failed_total{vm=\"guest\"} 1"), "{metrics}");
}

/// `GET path` on the service: (status code, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (code, body)
}
