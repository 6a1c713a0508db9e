//! App-level health against real QEMU guests: the reference responder over the app channel
//! (challenges, audits, a degraded status, being killed, a flood of garbage), the QEMU guest
//! agent, and the app mailbox. The service and the controller are the real binary.

mod common;

use std::time::{Duration, Instant};

use acpimon::diagnose::{collect, Outcome, Step, StepSpec, Target, Trigger};
use acpimon::launch::Extras;
use acpimon::watch::state::State;
use common::guest::{Guest, GuestSpec};
use common::service::{free_port, watch_guest, Controller};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(120);

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-app").tempdir_in("/tmp").unwrap()
}

/// A paused fixture guest with the app channel and the guest agent's port, its /init told
/// `append`, left to the service under test.
async fn guest(append: &[&str]) -> Guest {
    Guest::boot(GuestSpec {
        watched: true,
        extra: vec!["-S".into()],
        extras: Extras { app_channel: true, guest_agent: true },
        append: append.iter().map(|s| s.to_string()).collect(),
        ..GuestSpec::new("pc")
    })
    .await
}

const HEARTBEATS: &str = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "app-heartbeat"
interval = "1s"
timeout = "1s"
threshold = 3
health_interval = "2s"
audit = "disk"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responder_answers_runs_audits_and_its_degraded_status_reaches_the_controller() {
    let work = work();
    let ctl = Controller::start(free_port(), &work.path().join("store")).await;
    let g = guest(&["acpimon.app=responder", "acpimon.app_degrade_after=25"]).await;
    let config = format!("[controller]\nurl = \"http://{}\"\nbackoff_max = \"1s\"\n{HEARTBEATS}", ctl.addr);
    let svc = watch_guest(&g, work.path(), &config).await;
    let (v, _) = svc.wait_state("guest", State::Healthy, BOOT).await;
    let app = v.scenarios.iter().find(|s| s.kind == "app-heartbeat").unwrap();
    assert!(app.last_detail.as_ref().unwrap().starts_with("the app acked in"), "{app:?}");
    let audit = svc
        .wait_event("audit", Duration::from_secs(20), |e| {
            e.kind == "app-health" && !e.detail["audit"].is_null()
        })
        .await;
    assert_eq!(audit.detail["audit"]["name"], "disk");
    assert_eq!(audit.detail["audit"]["exit"], 0, "{audit:?}");
    assert!(audit.detail["audit"]["output"].as_str().unwrap().contains('/'), "df's output: {audit:?}");
    let hello = svc.vm("guest").await.unwrap().app_info.expect("the responder said hello");
    assert_eq!(hello["type"], "hello", "{hello}");

    let (v, _) = svc.wait_state("guest", State::Late, Duration::from_secs(60)).await;
    assert!(v.reason.starts_with("the app reports it is degraded: "), "{}", v.reason);
    let degraded = svc
        .wait_event("degraded", Duration::from_secs(5), |e| {
            e.kind == "app-health" && e.detail["status"] == "degraded"
        })
        .await;
    ctl.wait_keys(std::slice::from_ref(&degraded.key), Duration::from_secs(30)).await;
    let acpi = v.scenarios.iter().find(|s| s.kind == "acpi-heartbeat").unwrap();
    assert_eq!(acpi.consecutive_misses, 0, "the kernel heartbeat is not what degraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_responder_fails_app_heartbeat_while_the_kernel_heartbeat_answers() {
    let work = work();
    let g = guest(&["acpimon.app=responder", "acpimon.app_stop_after=20"]).await;
    let svc = watch_guest(&g, work.path(), HEARTBEATS).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let (v, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(60)).await;
    assert!(v.reason.starts_with("app-heartbeat missed 3 of 3 (no ack to challenge"), "{}", v.reason);
    assert!(v.reason.contains("while acpi-heartbeat answers"), "{}", v.reason);
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    assert_eq!(bundle.detail["manifest"]["trigger"]["kind"], "unresponsive");
    let verdict = &bundle.detail["manifest"]["verdict"];
    assert_eq!(verdict["class"], "app-failed", "{verdict:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_is_dropped_and_counted_while_the_host_stays_responsive() {
    let work = work();
    let g = guest(&["acpimon.app=responder", "acpimon.app_garbage=20000"]).await;
    let svc = watch_guest(&g, work.path(), HEARTBEATS).await;
    let (_, took) = svc.wait_state("guest", State::Healthy, BOOT).await;
    // The status endpoint answers promptly throughout.
    let start = Instant::now();
    let v = svc.vm("guest").await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(1), "status took {:?}", start.elapsed());
    let lines = v.app_lines.clone().expect("app line counts");
    assert!(lines.oversized > 0 && lines.malformed > 0, "{lines:?}");
    assert!(lines.rate_limited + lines.oversized + lines.malformed + lines.unsupported >= 1000, "{lines:?}");
    let acpi = v.scenarios.iter().find(|s| s.kind == "acpi-heartbeat").unwrap();
    assert!(acpi.answers_total > 0, "{v:?} after {took:?}");
    let metrics =
        common::text(&common::acpimon(&["status", "--addr", &svc.addr.to_string(), "--json"]).stdout);
    assert!(metrics.contains("\"oversized\""), "{metrics}");
    // Still answering after the flood.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.vm("guest").await.unwrap().state, State::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailbox_beats_and_stopping_its_writer_is_noticed() {
    let work = work();
    let g = guest(&["acpimon.app_mailbox=1", "acpimon.app_stop_after=20"]).await;
    let config = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "app-mailbox"
"#;
    let svc = watch_guest(&g, work.path(), config).await;
    let (v, _) = svc.wait_state("guest", State::Healthy, BOOT).await;
    let mb = v.scenarios.iter().find(|s| s.kind == "app-mailbox").unwrap();
    assert!(mb.last_detail.as_ref().unwrap().starts_with("beat "), "{mb:?}");
    let (v, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(60)).await;
    assert!(v.reason.starts_with("app-mailbox missed 3 of 3 (beat "), "{}", v.reason);
    assert!(v.reason.contains("has not moved"), "{}", v.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_agent_answers_pings_and_describes_the_guest_in_bundles() {
    // Not watched: the test uses the agent's socket itself.
    let g = Guest::boot(GuestSpec {
        extras: Extras { app_channel: false, guest_agent: true },
        append: vec!["acpimon.qga=1".into()],
        ..GuestSpec::new("pc")
    })
    .await;
    g.wait_console("qemu-ga started", 0, BOOT).await;
    let qga = g.vm.prepared.descriptor.guest_agent.clone().unwrap();
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(30) {
        match acpimon::app::qga::ping(&qga, Duration::from_secs(3)).await {
            Ok(_) => break,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(start.elapsed() < Duration::from_secs(30), "no guest-ping answer: {last}");
    let dir = tempfile::tempdir().unwrap();
    let target = Target {
        vm: "guest",
        qmp: Some(&g.vm.qmp),
        console: g.vm.console().ok(),
        gdb_socket: g.vm.prepared.dir.join("gdb.sock"),
        guest_agent: Some(qga),
        host: Default::default(),
        kernel_log: None,
    };
    let trigger = Trigger {
        kind: "test".into(),
        time: acpimon::units::now_rfc3339(),
        reason: "test".into(),
        evidence: json!({}),
    };
    let steps = [Step::new(StepSpec::GuestAgent {})];
    let m = collect(&steps, &target, &trigger, Vec::new(), dir.path()).await.unwrap();
    let s = &m.steps[0];
    assert_eq!(s.outcome, Outcome::Ok, "{s:?}");
    let info = s.summary.as_ref().unwrap();
    let release = common::guest::manifest_value(g.fixture, "kernel_release");
    assert_eq!(info["osinfo"]["kernel-release"].as_str(), Some(release.as_str()), "{info}");
    assert!(info["agent_version"].as_str().unwrap().starts_with("7.2"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_agent_scenario_is_healthy_with_qemu_ga() {
    let work = work();
    let g = guest(&["acpimon.qga=1"]).await;
    let config = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "guest-agent"
interval = "2s"
"#;
    let svc = watch_guest(&g, work.path(), config).await;
    let (v, _) = svc.wait_state("guest", State::Healthy, BOOT).await;
    let ga = v.scenarios.iter().find(|s| s.kind == "guest-agent").unwrap();
    assert!(ga.last_detail.as_ref().unwrap().starts_with("guest-ping answered in"), "{ga:?}");
}
