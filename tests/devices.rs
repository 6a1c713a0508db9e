//! The VM's devices as QEMU sees them, on real QEMU: a drive whose writes fail on the host
//! (blkdebug, `werror=stop`) gives a `block-io-error` event naming it, a VM paused for that
//! error, `io-status` failed, and `host::devices::read` says so; `read` stays within its time
//! when QEMU answers nothing (SIGSTOP).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use acpimon::host::devices::{self, DeviceHistory};
use acpimon::host::IoError;
use acpimon::trigger::qmp::EventKind;
use acpimon::watch::state::State;
use common::guest::{failing_drive, next_qmp_event, Guest, GuestSpec};
use common::service::{http_get, is_transition, signal, watch_guest};

const BOOT: Duration = Duration::from_secs(120);

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-devices").tempdir_in("/tmp").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_failing_on_the_host_is_an_event_a_pause_that_names_it_and_a_failed_drive() {
    let work = work();
    let mut extra = vec!["-S".to_string(), "-no-shutdown".to_string()];
    extra.extend(failing_drive(work.path()));
    let spec = GuestSpec {
        watched: true,
        extra,
        append: vec!["acpimon.disk_write=vda".into()],
        delay: 2,
        ..GuestSpec::new("pc")
    };
    let g = Guest::boot(spec).await;
    // The test's own monitor sees QEMU's events too.
    let mut events = g.vm.qmp.events();
    let svc = watch_guest(&g, work.path(), "[defaults]\nstartup_grace = \"90s\"\n").await;

    let ev = next_qmp_event(&mut events, "BLOCK_IO_ERROR", BOOT).await;
    let EventKind::BlockIoError { device, node_name, operation, action, nospace, reason } = ev.kind.clone()
    else {
        panic!("not decoded: {:?}", ev.raw)
    };
    assert_eq!(
        (device.as_str(), operation.as_str(), action.as_str(), nospace, reason.as_str()),
        ("disk0", "write", "stop", false, "Input/output error")
    );
    let time = ev.time().expect("QEMU's timestamp");

    // The service: the event, at once, naming the drive.
    let e = svc.wait_event("block-io-error", Duration::from_secs(20), |e| e.kind == "block-io-error").await;
    assert_eq!(e.vm.as_deref(), Some("guest"));
    assert_eq!(e.detail["device"], "disk0");
    assert_eq!(e.detail["node_name"].as_str(), node_name.as_deref());
    assert_eq!(e.detail["operation"], "write");
    assert_eq!(e.detail["action"], "stop");
    assert_eq!(e.detail["nospace"], false);
    assert_eq!(e.detail["reason"], "Input/output error");
    assert_eq!(e.detail["count"], 1);
    assert_eq!(
        (e.detail["first"].as_str(), e.detail["last"].as_str()),
        (Some(time.as_str()), Some(time.as_str()))
    );
    // ... and the pause, for that error.
    let paused = svc
        .wait_event("transition to paused for the I/O error", Duration::from_secs(20), |e| {
            is_transition(e, State::Paused)
                && e.detail["reason"].as_str().is_some_and(|r| r.contains("disk0"))
        })
        .await;
    assert_eq!(
        paused.detail["reason"],
        "QEMU stopped the VM on a disk I/O error: drive disk0: write error (Input/output error) (QMP STOP)"
    );
    assert_eq!(paused.detail["evidence"]["qmp_event"]["event"], "STOP");
    let status = g.vm.qmp.status(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.status, "io-error");
    let log = svc.log_text();
    assert!(log.contains("drive disk0: write error (Input/output error), QEMU action stop"), "{log}");

    // QEMU holds the drive failed.
    let block = g.vm.qmp.execute_json(qapi::qmp::query_block {}, Duration::from_secs(5)).await.unwrap();
    let disk0 = block.as_array().unwrap().iter().find(|b| b["device"] == "disk0").expect("disk0");
    assert_eq!(disk0["io-status"], "failed", "{disk0:#}");

    // `read`, with the errors this test's monitor saw recorded as the monitor records them.
    let history = Mutex::new(DeviceHistory::default());
    history.lock().unwrap().io_error(
        &devices::drive_name(&device, node_name.as_deref()),
        IoError { time: time.clone(), operation, action, nospace, reason },
    );
    let start = Instant::now();
    let (devs, notes) = devices::read(&g.vm.qmp, &history, Duration::from_millis(150)).await;
    let took = start.elapsed();
    let drive = devs.block.iter().find(|d| d.device == "disk0").unwrap_or_else(|| panic!("{devs:#?}"));
    assert!(drive.failed(), "{drive:#?}");
    assert_eq!(drive.qdev.as_deref(), Some("/machine/peripheral/vdisk0/virtio-backend"));
    assert_eq!(drive.node, node_name);
    let stats = drive.stats.as_ref().expect("query-blockstats matched");
    // The guest's reads (its partition scan) went through; the failed write is held for a
    // retry (werror=stop), not counted as failed.
    assert!(stats.rd_operations >= 1 && stats.wr_operations == 0, "{stats:#?}");
    assert_eq!(stats.delta, None, "the first reading");
    let errors = drive.errors.as_ref().expect("its BLOCK_IO_ERROR");
    assert_eq!((errors.count, errors.first.time.as_str()), (1, time.as_str()));
    // Only query-stats may be missing (TCG has none; QEMU 5.2 has no such command).
    assert!(notes.iter().all(|n| n.starts_with("query-stats: not provided")), "{notes:?}");
    assert!(took < Duration::from_millis(1000), "{took:?}");
    eprintln!("read of a paused QEMU: {took:?}");
    // A second reading has the delta.
    let (devs, _) = devices::read(&g.vm.qmp, &history, Duration::from_millis(150)).await;
    let drive = devs.block.iter().find(|d| d.device == "disk0").unwrap();
    let delta = drive.stats.as_ref().and_then(|s| s.delta.clone()).expect("a delta");
    assert!(delta.seconds > 0.0 && delta.failed_operations == 0, "{delta:?}");

    // The guest retries: each `cont` fails the write again. Those errors are counted into
    // events when their 10 s window ends: fewer events than errors, the counts adding up.
    let mut more = 0u64;
    let mut count = |ev: &acpimon::trigger::qmp::QmpEvent| more += u64::from(ev.name == "BLOCK_IO_ERROR");
    for _ in 0..3 {
        g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
        // The run from its RESUME to its STOP (QEMU may send the STOP of a retry before its
        // BLOCK_IO_ERROR; the previous STOP may still be queued).
        let mut resumed = false;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("an event")
                .unwrap();
            count(&ev);
            match ev.name.as_str() {
                "RESUME" => resumed = true,
                "STOP" if resumed => {
                    // Its BLOCK_IO_ERROR, when it comes after, and a pause a person might make.
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                    break;
                }
                _ => {}
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    while let Ok(ev) = events.try_recv() {
        count(&ev);
    }
    assert!(more >= 3, "{more}");
    let start = Instant::now();
    let counted = loop {
        let counted: Vec<u64> = svc
            .events()
            .iter()
            .filter(|e| e.kind == "block-io-error")
            .map(|e| e.detail["count"].as_u64().unwrap())
            .collect();
        if counted.iter().sum::<u64>() == 1 + more || start.elapsed() > Duration::from_secs(25) {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(counted.iter().sum::<u64>(), 1 + more, "{counted:?}");
    assert!(counted.len() < 1 + more as usize, "coalesced: {counted:?}");
    let last = svc.events().into_iter().rfind(|e| e.kind == "block-io-error").unwrap();
    assert!(last.detail["first"].as_str() <= last.detail["last"].as_str(), "{:?}", last.detail);
    let metrics = http_get(svc.addr, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "acpimon_block_io_errors_total{{vm=\"guest\",device=\"disk0\"}} {}\n",
            1 + more
        )),
        "{metrics}"
    );
    // The dashboard's per-drive panel groups by labels this metric has.
    let body = metrics.split_once("\r\n\r\n").expect("an HTTP response").1;
    common::metrics::promtool_check(body);
    let dash = common::metrics::check_dashboard(body);
    assert!(dash.unchecked.is_empty(), "{:?}", dash.unchecked);

    // The incident (paused, the heartbeat unanswered): its bundle's host step has the failed
    // drive and its errors, and the verdict names the host-side cause.
    let b = svc.wait_event("bundle", Duration::from_secs(120), |e| e.kind == "bundle").await;
    let host: acpimon::host::HostReport =
        serde_json::from_str(&common::service::step_file(&b, "host")).expect("a host report");
    let disk0 =
        host.devices.block.iter().find(|d| d.device == "disk0").unwrap_or_else(|| panic!("{host:#?}"));
    assert!(disk0.errors.as_ref().is_some_and(|e| e.last.action == "stop"), "{disk0:#?}");
    let v = &b.detail["manifest"]["verdict"];
    assert_eq!(v["class"], "paused-by-io-error", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(
        headline.starts_with("paused by the host after an I/O error on drive `disk0`")
            && headline.contains("(BLOCK_IO_ERROR: write, Input/output error, action stop;"),
        "{headline}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_devices_of_a_qemu_that_answers_nothing_ends_in_time_with_notes() {
    let work = work();
    let mut extra = vec!["-S".to_string()];
    extra.extend(failing_drive(work.path()));
    let g = Guest::boot(GuestSpec { wait_ready: false, extra, ..GuestSpec::new("pc") }).await;
    let history = Mutex::new(DeviceHistory::default());
    let (devs, _) = devices::read(&g.vm.qmp, &history, Duration::from_millis(150)).await;
    assert_eq!(
        devs.block.iter().find(|d| d.device == "disk0").and_then(|d| d.io_status.as_deref()),
        Some("ok")
    );

    let pid = g.vm.qmp.pid.expect("QEMU's pid");
    signal(pid, rustix::process::Signal::STOP);
    let start = Instant::now();
    let (devs, notes) = devices::read(&g.vm.qmp, &history, Duration::from_millis(150)).await;
    let took = start.elapsed();
    signal(pid, rustix::process::Signal::CONT);
    assert!(took < Duration::from_millis(300), "took {took:?}");
    assert!(devs.block.is_empty() && devs.net.is_empty() && devs.stats.is_none(), "{devs:#?}");
    for query in ["query-block", "query-blockstats", "info network", "query-stats"] {
        assert!(
            notes.iter().any(|n| n.starts_with(&format!("{query}: no reply within 150 ms"))),
            "{query}: {notes:?}"
        );
    }
    // Running again, it answers again (the late replies went nowhere).
    let status = g.vm.qmp.status(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.status, "prelaunch");
    eprintln!("read of a stopped QEMU: {took:?}");
}
