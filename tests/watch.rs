//! `acpimon watch` against real QEMU guests: hangs, a kernel that stops answering, a panic,
//! stopped userspace, and delivery to the reference controller across its outage and the
//! service's own crash. The service and the controller are the real binary (child processes);
//! the guests are the fixture guests, launched with a second monitor for the test's own use.

mod common;

use std::time::{Duration, Instant, SystemTime};

use acpimon::event::RawEvent as Event;
use acpimon::watch::state::State;
use common::guest::{Guest, GuestSpec};
use common::service::{
    free_port, http_get, is_transition, step, step_file, watch_guest, Controller, Service,
};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(120);

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-watch").tempdir_in("/tmp").unwrap()
}

/// A fixture guest created paused (`-S`, as EVE launches, with `-no-shutdown`: on QEMU 5.2,
/// which has no `-action`, it keeps a panicked guest paused rather than powered off), left to
/// the service under test.
async fn guest(scenario: &'static str, delay: u32) -> Guest {
    let extra = vec!["-S".to_string(), "-no-shutdown".to_string()];
    Guest::boot(GuestSpec { watched: true, scenario, delay, extra, ..GuestSpec::new("pc") }).await
}

fn controller_section(ctl_port: u16) -> String {
    format!("[controller]\nurl = \"http://127.0.0.1:{ctl_port}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n")
}

fn transitions(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.kind == "transition")
        .map(|e| {
            (e.detail["from"].as_str().unwrap().to_string(), e.detail["to"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_is_unresponsive_in_time_and_its_bundle_reaches_the_controller() {
    let work = work();
    let ctl = Controller::start(free_port(), &work.path().join("store")).await;
    let g = guest("healthy", 3).await;
    let config = format!("{}[defaults]\nstartup_grace = \"90s\"\n", controller_section(ctl.addr.port()));
    let svc = watch_guest(&g, work.path(), &config).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    // The heartbeat answers before userspace starts: give the guest time to reach its shell.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The default launch has the doorbell: the service's beats complete on it (the view says
    // so, and their latency is recorded).
    let view = svc.vm("guest").await.unwrap();
    let completion = view.completion.clone().unwrap_or_default();
    assert!(completion.starts_with("doorbell (") && completion.ends_with("doorbell.sock)"), "{completion}");
    let hb = view.scenarios.iter().find(|s| s.kind == "acpi-heartbeat").unwrap();
    let detail = hb.last_detail.clone().unwrap_or_default();
    assert!(detail.contains("answered in") && detail.contains("doorbell"), "{detail}");
    assert!(hb.last_latency_ms.is_some_and(|ms| ms > 0.0 && ms < 1000.0), "{:?}", hb.last_latency_ms);
    let table = acpimon::report::status_table(&svc.status().await);
    assert!(!table.contains("heartbeat completion: polling"), "{table}");

    assert_a_hang_is_detected_in_time(&g, &svc).await;
    let t = transitions(&svc.events());
    let i = t.iter().rposition(|(_, to)| to == "paused").expect("paused first");
    assert_eq!(t[i + 1], ("paused".into(), "unresponsive".into()), "{t:?}");

    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    let manifest = &bundle.detail["manifest"];
    assert_eq!(manifest["vm"], "guest");
    assert_eq!(manifest["trigger"]["kind"], "unresponsive");
    let tail = step_file(&bundle, "console-tail");
    assert!(
        tail.contains("Linux version") && tail.contains("ACPIMON-GUEST: ready"),
        "the output from boot on: {tail}"
    );
    let regs = step_file(&bundle, "registers");
    assert!(regs.contains("RIP="), "{regs}");
    assert_eq!(step(manifest, "qmp-status")["outcome"], "ok");
    assert!(step_file(&bundle, "qmp-status").contains("paused"));
    // SysRq is sent; a guest whose vCPUs are stopped cannot answer it.
    assert!(step(manifest, "sysrq")["outcome"].is_string());
    // Why: the host paused it, in the manifest and in the status.
    assert_eq!(manifest["verdict"]["class"], "paused-by-host", "{:#}", manifest["verdict"]);
    let view = svc.vm("guest").await.unwrap();
    assert_eq!(view.last_verdict.as_ref().map(|v| v.class), Some(acpimon::verdict::Class::PausedByHost));
    let table = acpimon::report::status_table(&svc.status().await);
    assert!(table.contains("verdict paused-by-host: QEMU has the VM paused"), "{table}");

    let keys: Vec<String> = svc.events().into_iter().map(|e| e.key).collect();
    ctl.wait_keys(&keys, Duration::from_secs(30)).await;
    let stored = ctl.events().into_iter().find(|e| e.key == bundle.key).unwrap();
    assert_eq!(stored.detail["manifest"], bundle.detail["manifest"]);
    // An operator finds it in a real browser: the fleet, the VM, the incident and its verdict.
    let addr = ctl.addr;
    tokio::task::spawn_blocking(move || {
        common::browser::walk_to_the_incident(addr, "guest", "paused-by-host", "watch")
    })
    .await
    .unwrap();

    let metrics = http_get(svc.addr, "/metrics").await;
    assert!(metrics.contains("acpimon_vm_state{vm=\"guest\",state=\"unresponsive\"} 1"), "{metrics}");
    assert!(metrics.contains("acpimon_diagnostics_total{vm=\"guest\"} 1"), "{metrics}");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("acpimon_heartbeat_latency_seconds_count{vm=\"guest\"} "))
        .expect("latency histogram")
        .parse()
        .unwrap();
    assert!(count >= 1, "{metrics}");
    // The host sampler watches the VM's vCPU threads (its QMP pid is visible).
    let busy: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("acpimon_vcpu_busy_ratio{vm=\"guest\",vcpu=\"0\"} "))
        .expect("vCPU 0's busy ratio")
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&busy), "{metrics}");
    assert!(metrics.contains("acpimon_vcpu_cpu_seconds_total{vm=\"guest\",vcpu=\"0\"} "), "{metrics}");
    // Prometheus's linter accepts the output, and the shipped Grafana dashboard asks only for
    // metrics and labels it has.
    let body = metrics.split_once("\r\n\r\n").expect("an HTTP response").1;
    common::metrics::promtool_check(body);
    let dash = common::metrics::check_dashboard(body);
    // Only a failing drive (tests/devices.rs checks the dashboard on one) has no sample here.
    assert_eq!(dash.unchecked, ["acpimon_block_io_errors_total".to_string()].into(), "{body}");
    for family in [
        "acpimon_vm_state",
        "acpimon_heartbeat_latency_seconds",
        "acpimon_scenario_misses_total",
        "acpimon_diagnostics_total",
        "acpimon_kernel_reports_total",
        "acpimon_forward_delivered_total",
    ] {
        assert!(dash.used.contains(family), "the dashboard shows no {family}: {:?}", dash.used);
    }

    let seen = svc.transitions_to("guest", State::Recovered);
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_transition("guest", State::Recovered, seen, Duration::from_secs(20)).await;
    svc.wait_state("guest", State::Healthy, Duration::from_secs(20)).await;

    // QEMU exits: gone, and not a failure.
    let _ = g.vm.qmp.execute_within(qapi::qmp::quit {}, Duration::from_secs(5)).await;
    let (v, _) = svc.wait_state("guest", State::Gone, Duration::from_secs(20)).await;
    assert_eq!(v.reason, "QEMU is quitting (QMP quit)");
    assert_eq!(svc.events().iter().filter(|e| e.kind == "bundle").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thermal_and_tcp_scenarios_judge_what_they_watch() {
    let work = work();
    let mut spec = GuestSpec { watched: true, extra: vec!["-S".into()], ..GuestSpec::new("pc") };
    spec.ssdt.thermal_period_ds = Some(10);
    let g = Guest::boot(spec).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = format!(
        r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "thermal"
[[defaults.scenario]]
kind = "tcp"
address = "{}"
interval = "1s"
timeout = "1s"
threshold = 2
"#,
        listener.local_addr().unwrap()
    );
    let svc = watch_guest(&g, work.path(), &config).await;
    let (v, _) = svc.wait_state("guest", State::Healthy, BOOT).await;
    assert!(v.scenarios.iter().all(|s| s.unavailable.is_none()), "{v:#?}");
    let thermal = v.scenarios.iter().find(|s| s.kind == "thermal").unwrap();
    assert!(thermal.last_detail.as_ref().unwrap().starts_with("thermal poll "), "{thermal:?}");

    // The service goes away: tcp fails while the guest's own thermal polls go on.
    drop(listener);
    let (v, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    assert!(v.reason.starts_with("tcp missed 2 of 2"), "{}", v.reason);
    assert!(v.reason.contains("while thermal answers (thermal poll"), "{}", v.reason);
    assert!(
        v.reason.ends_with("the guest kernel is alive but what the failing probes need is not"),
        "{}",
        v.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_that_stops_answering_is_unresponsive_sysrq_shows_why_and_recovery_is_rate_limited() {
    let work = work();
    let g = guest("starve", 12).await;
    let config = "[defaults]\nstartup_grace = \"90s\"\nrecovery = { action = \"reset\", max_per_hour = 1 }\n";
    let svc = watch_guest(&g, work.path(), config).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let (view, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(60)).await;
    assert!(
        view.reason.starts_with("acpi-heartbeat missed 3 of 3 (no record echoed request"),
        "{}",
        view.reason
    );
    let bundle = svc.wait_event("bundle", Duration::from_secs(90), |e| e.kind == "bundle").await;
    assert!(step_file(&bundle, "console-tail").contains("ACPIMON-GUEST: starving"));
    // Within the deadline (8 s for the steps that wait on the guest), and the verdict says
    // what the registers show: no report, vCPUs spinning in rt-spin's user-mode loop.
    let m = &bundle.detail["manifest"];
    let took = humantime::parse_rfc3339(m["finished"].as_str().unwrap())
        .unwrap()
        .duration_since(humantime::parse_rfc3339(m["created"].as_str().unwrap()).unwrap())
        .unwrap();
    assert!(took < Duration::from_secs(10), "the bundle took {took:?}");
    assert_eq!(m["verdict"]["class"], "unknown", "{:#}", m["verdict"]);
    let headline = m["verdict"]["headline"].as_str().unwrap();
    assert!(headline.starts_with("no kernel report; vCPU ") && headline.contains(" at RIP 0x"), "{headline}");
    let sysrq = step_file(&bundle, "sysrq");
    assert!(sysrq.contains("sysrq: Show Blocked State"), "{sysrq}");
    assert!(sysrq.contains("rt-spin"), "the backtraces name the task that starves the kernel: {sysrq}");
    assert!(step_file(&bundle, "registers").contains("RIP="));

    // Recovery: a reset, which is a reboot (an event, not a failure), after which the guest
    // answers again; the same guest starves again and the rate limit refuses a second reset.
    let r = svc.wait_event("recovery", Duration::from_secs(30), |e| e.kind == "recovery").await;
    assert_eq!(
        (r.detail["action"].as_str(), r.detail["outcome"].as_str()),
        (Some("reset"), Some("done")),
        "{r:?} {:#?}",
        svc.events()
    );
    let reboot = svc.wait_event("reboot", Duration::from_secs(30), |e| e.kind == "reboot").await;
    assert_eq!(reboot.detail["evidence"]["qmp_event"]["event"], "RESET");
    // The first recovery of this guest's life.
    svc.wait_transition("guest", State::Recovered, 0, BOOT).await;
    let refused = svc
        .wait_event("refused recovery", Duration::from_secs(120), |e| {
            e.kind == "recovery" && e.detail["outcome"] == "refused"
        })
        .await;
    assert!(refused.detail["detail"].as_str().unwrap().contains("at most 1 allowed"), "{refused:?}");
    let t = transitions(&svc.events());
    let alerts = t.iter().filter(|(_, to)| to == "unresponsive").count();
    assert_eq!(alerts, 2, "one alert per incident: {t:?}");
    assert!(
        !t.iter().any(|(from, to)| from == "starting" && to == "unresponsive"),
        "a reboot is not a failure: {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_reported_within_a_second_with_its_text_in_the_bundle() {
    let work = work();
    let g = guest("panic", 10).await;
    let mut qmp_events = g.vm.qmp.events();
    let svc = watch_guest(&g, work.path(), "[defaults]\nstartup_grace = \"90s\"\n").await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let panicked_at = loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), qmp_events.recv()).await.unwrap().unwrap();
        if ev.name == "GUEST_PANICKED" {
            break SystemTime::now();
        }
    };
    let t = svc.wait_event("panicked", Duration::from_secs(10), |e| is_transition(e, State::Panicked)).await;
    let reported = humantime::parse_rfc3339(&t.time).unwrap();
    let delay = reported.duration_since(panicked_at).unwrap_or_default();
    assert!(delay <= Duration::from_secs(1), "panicked {delay:?} after QEMU's GUEST_PANICKED");
    // The kernel's own words: the panic line and where (the sentinel read them on the console).
    let reason = t.detail["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the guest kernel panicked")
            && reason
                .contains("Kernel panic - not syncing: sysrq triggered crash, in `sysrq_handle_crash+0x"),
        "{reason}"
    );
    let report = &t.detail["kernel_report"];
    assert_eq!(report["class"], "panic", "{:?}", t.detail);
    assert!(report["trace"]
        .as_array()
        .is_some_and(|t| t.iter().any(|l| l.as_str().unwrap().contains("panic+0x"))));
    // The whole report, as its own event, belongs to the incident.
    let k = svc
        .wait_event("kernel-report", Duration::from_secs(10), |e| {
            e.kind == "kernel-report" && e.detail["class"] == "panic"
        })
        .await;
    assert_eq!(k.detail["incident"], t.key.as_str(), "{:?}", k.detail);
    let trace: Vec<&str> =
        k.detail["trace"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(trace.iter().any(|l| l.contains("panic+0x")), "{trace:#?}");
    // Without `-action` (QEMU 5.2) QEMU pauses the guest on pvpanic's notifier, which the
    // kernel calls before it prints its end line: that line may never come.
    let qemu = acpimon::launch::qemu_version::probe(&common::guest::qemu()).unwrap();
    if qemu.has_action() {
        assert!(trace.iter().any(|l| l.starts_with("---[ end Kernel panic")), "{trace:#?}");
    }
    let view = svc.vm("guest").await.unwrap();
    assert_eq!(view.kernel_reports.get(&acpimon::sentinel::ReportClass::Panic), Some(&1));
    // The panicked bundle (under load, a heartbeat missed before the panic may have taken one
    // for an unresponsive incident first: the panic then gets its own after it).
    let bundle = svc
        .wait_event("panicked bundle", Duration::from_secs(60), |e| {
            e.kind == "bundle" && e.detail["manifest"]["trigger"]["kind"] == "panicked"
        })
        .await;
    let tail = step_file(&bundle, "console-tail");
    assert!(tail.contains("Kernel panic - not syncing: sysrq triggered crash"), "{tail}");
    let m = &bundle.detail["manifest"];
    assert_eq!(step(m, "sysrq")["outcome"], "skipped", "a panicked kernel answers no SysRq");
    assert_eq!(m["verdict"]["class"], "panic", "{:#}", m["verdict"]);
    assert_eq!(m["verdict"]["headline"], "the guest kernel panicked: not syncing: sysrq triggered crash");
}

/// An unresponsive incident that becomes a panic while its bundle is collected (an NMI with
/// `unknown_nmi_panic=1` on a starved kernel): the panic gets its own bundle, with the panic
/// as its trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_that_becomes_a_panic_gets_a_panicked_bundle() {
    let work = work();
    let g = Guest::boot(GuestSpec {
        watched: true,
        scenario: "starve",
        delay: 12,
        extra: vec!["-S".into(), "-no-shutdown".into()],
        append: vec!["unknown_nmi_panic=1".into()],
        ..GuestSpec::new("pc")
    })
    .await;
    let svc = watch_guest(&g, work.path(), "[defaults]\nstartup_grace = \"90s\"\n").await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    svc.wait_state("guest", State::Unresponsive, Duration::from_secs(60)).await;
    // Its bundle is being collected (console tail, then SysRq): panic the kernel now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    g.vm.qmp.execute_within(qapi::qmp::inject_nmi {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Panicked, Duration::from_secs(20)).await;
    let first = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    assert_eq!(first.detail["manifest"]["trigger"]["kind"], "unresponsive");
    let second = svc
        .wait_event("panicked bundle", Duration::from_secs(60), |e| {
            e.kind == "bundle" && e.detail["manifest"]["trigger"]["kind"] == "panicked"
        })
        .await;
    let m = &second.detail["manifest"];
    assert_eq!(m["verdict"]["class"], "panic", "{:#}", m["verdict"]);
    assert!(m["verdict"]["headline"].as_str().unwrap().contains("NMI"), "{:#}", m["verdict"]);
    assert_eq!(step(m, "sysrq")["outcome"], "skipped");
    assert_ne!(first.detail["bundle"], second.detail["bundle"]);
    assert_eq!(svc.events().iter().filter(|e| e.kind == "bundle").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_userspace_fails_the_console_scenario_while_the_heartbeat_stays_healthy() {
    let work = work();
    let g = guest("userspace-stop", 15).await;
    let config = r#"
[defaults]
startup_grace = "90s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "console"
command = "uptime"
expect = "load average"
interval = "2s"
timeout = "2s"
threshold = 2
"#;
    let svc = watch_guest(&g, work.path(), config).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let (view, _) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(60)).await;
    assert!(
        view.reason.starts_with("console missed 2 of 2 ('uptime' got no output matching /load average/"),
        "{}",
        view.reason
    );
    assert!(view.reason.contains("while acpi-heartbeat answers (request"), "{}", view.reason);
    assert!(
        view.reason.ends_with("the guest kernel is alive but what the failing probes need is not"),
        "{}",
        view.reason
    );
    let hb = view.scenarios.iter().find(|s| s.name == "acpi-heartbeat").unwrap();
    assert_eq!(hb.consecutive_misses, 0);
    let before = hb.answers_total;
    // Two more answers (one a second; allow for a loaded host), and no miss meanwhile.
    let start = Instant::now();
    let (later, hb) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = svc.vm("guest").await.unwrap();
        let hb = later.scenarios.iter().find(|s| s.name == "acpi-heartbeat").unwrap().clone();
        if hb.answers_total >= before + 2 || start.elapsed() > Duration::from_secs(10) {
            break (later, hb);
        }
    };
    assert!(
        hb.answers_total >= before + 2,
        "the heartbeat keeps answering: {before} then {}",
        hb.answers_total
    );
    assert_eq!(hb.consecutive_misses, 0, "{hb:?}");
    assert_eq!(later.state, State::Unresponsive);
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    let v = &bundle.detail["manifest"]["verdict"];
    assert_eq!(v["class"], "userspace-stopped", "{v:#}");
    assert!(
        v["headline"].as_str().unwrap().contains("the console scenario 'console' missed 2 of 2"),
        "{v:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_a_controller_outage_and_a_service_crash_exactly_once() {
    let work = work();
    let port = free_port();
    let g = guest("healthy", 3).await;
    let config = format!("{}[defaults]\nstartup_grace = \"90s\"\n", controller_section(port));
    let mut svc = watch_guest(&g, work.path(), &config).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;

    // The controller is down while the VM hangs.
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    let pending = svc.status().await.forward.pending_events;
    assert!(pending >= 4, "events wait in the spool: {pending}");

    // The service crashes mid-incident and comes back: no second alert, nothing lost.
    svc.kill();
    svc.restart().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.vm("guest").await.unwrap().state, State::Unresponsive);
    let alerts = svc.events().into_iter().filter(|e| is_transition(e, State::Unresponsive)).count();
    assert_eq!(alerts, 1, "one alert for one incident: {:#?}", transitions(&svc.events()));
    assert_eq!(svc.events().iter().filter(|e| e.kind == "bundle").count(), 1);

    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Healthy, Duration::from_secs(30)).await;

    // The controller comes up: everything arrives, each event once.
    let ctl = Controller::start(port, &work.path().join("store")).await;
    let logged = svc.events();
    let mut keys: Vec<String> = logged.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    ctl.wait_keys(&keys, Duration::from_secs(30)).await;
    let stored = ctl.events();
    assert_eq!(stored.len(), keys.len(), "one stored event per key");
    let to: Vec<String> = stored
        .iter()
        .filter(|e| e.kind == "transition" && e.vm.as_deref() == Some("guest"))
        .map(|e| e.detail["to"].as_str().unwrap().to_string())
        .collect();
    let history: Vec<String> = svc
        .events()
        .iter()
        .filter(|e| e.kind == "transition")
        .map(|e| format!("{} {} -> {}: {}", e.time, e.detail["from"], e.detail["to"], e.detail["reason"]))
        .collect();
    assert_eq!(to.iter().filter(|t| *t == "unresponsive").count(), 1, "{history:#?}\n{}", svc.log_text());
    assert!(to.contains(&"recovered".to_string()), "{to:?}");
    assert_eq!(svc.status().await.forward.pending_events, 0);
    assert_eq!(svc.stop().code(), Some(0), "SIGTERM stops the service cleanly");
}

/// QMP `stop` on a healthy guest is unresponsive within interval × threshold + timeout.
async fn assert_a_hang_is_detected_in_time(g: &Guest, svc: &Service) {
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    let (view, took) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    // interval × threshold + timeout = 1 s × 3 + 1 s; the status is polled every 100 ms.
    assert!(took <= Duration::from_millis(4000 + 1500), "unresponsive after {took:?}");
    assert!(
        view.reason.starts_with("the VM is paused (QMP STOP) and acpi-heartbeat missed 3 of 3"),
        "{}",
        view.reason
    );
}

/// The transitions logged since event `from` (an index into the events).
fn transitions_since(svc: &Service, from: usize) -> Vec<(String, String)> {
    transitions(&svc.events()[from..])
}

/// One guest walked through every start order: the service before QEMU (EVE's order:
/// prepare, QEMU with -S, `cont` seconds later); QEMU killed and relaunched in the same
/// directory without -S; the service killed and restarted with the same QEMU; QEMU killed and
/// relaunched with and without -S while the service is down (the service after QEMU). Each
/// reaches healthy on the new guest's own answers, and a hang after that is detected in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_order_reaches_healthy_and_a_hang_is_detected_after_it() {
    let work = work();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = "[defaults]\nstartup_grace = \"90s\"\n";
    let mut svc = Service::start(&state, work.path(), config).await;

    // The service first, then prepare and QEMU with -S: paused (waiting for `cont`), not gone.
    let extra = vec!["-S".to_string()];
    let spec = GuestSpec { watched: true, extra, state_dir: Some(state.clone()), ..GuestSpec::new("pc") };
    let mut g = Guest::boot(spec).await;
    let (v, _) = svc.wait_state("guest", State::Paused, Duration::from_secs(30)).await;
    assert!(v.reason.starts_with("QEMU waits for `cont`"), "{}", v.reason);
    // `cont` seconds later: the misses while it waited never counted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(svc.vm("guest").await.unwrap().state, State::Paused);
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let t = transitions(&svc.events());
    let i = t.iter().position(|(_, to)| to == "paused").unwrap_or_else(|| panic!("{t:?}"));
    assert_eq!(t[i + 1], ("paused".into(), "starting".into()), "{t:?}");
    assert_eq!(t[i + 2], ("starting".into(), "healthy".into()), "{t:?}");
    // The service had the console before the guest ran: the bundle has it from boot.
    hang_detected_and_recovered(&g, &svc, true).await;

    // QEMU killed and relaunched in the same directory, without -S: gone, then healthy on the
    // new guest's own answers (not on the previous one's, and no false alarm while it boots).
    let mark = svc.events().len();
    g.kill().await;
    svc.wait_state("guest", State::Gone, Duration::from_secs(10)).await;
    g.relaunch(false).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let t = transitions_since(&svc, mark);
    let i = t.iter().position(|(_, to)| to == "starting").unwrap_or_else(|| panic!("{t:?}"));
    assert_eq!(t[i - 1].1, "gone", "{t:?}");
    assert_eq!(t[i + 1], ("starting".into(), "healthy".into()), "{t:?}");
    hang_detected_and_recovered(&g, &svc, false).await;

    // The service killed and restarted, the same QEMU: still healthy, on fresh answers, and
    // not started over (the same QEMU process).
    svc.kill();
    let mark = svc.events().len();
    svc.restart().await;
    svc.wait_state("guest", State::Healthy, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(svc.vm("guest").await.unwrap().state, State::Healthy);
    // (A first heartbeat crossing the killed service's last one may be late: not an alert.)
    let t = transitions_since(&svc, mark);
    assert!(!t.iter().any(|(_, to)| to == "unresponsive" || to == "starting" || to == "gone"), "{t:?}");
    hang_detected_and_recovered(&g, &svc, false).await;

    // While the service is down, QEMU is killed and relaunched, with -S and then without:
    // the service (after QEMU) sees another QEMU process, whose guest starts over.
    for paused in [true, false] {
        svc.kill();
        g.kill().await;
        g.relaunch(paused).await;
        let mark = svc.events().len();
        let before: Vec<String> = svc.events().into_iter().map(|e| e.key).collect();
        svc.restart().await;
        // Until it attaches, the restarted service shows the state it remembered (healthy):
        // the relaunch it finds on attaching is an event of its own.
        svc.wait_event("reboot (relaunch)", Duration::from_secs(30), |e| {
            e.kind == "reboot" && e.detail["evidence"].get("relaunch").is_some() && !before.contains(&e.key)
        })
        .await;
        if paused {
            svc.wait_state("guest", State::Paused, Duration::from_secs(30)).await;
            g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
        }
        svc.wait_state("guest", State::Healthy, BOOT).await;
        let t = transitions_since(&svc, mark);
        let i =
            t.iter().position(|(_, to)| to == "starting").unwrap_or_else(|| panic!("started over: {t:?}"));
        assert_eq!(t[i + 1], ("starting".into(), "healthy".into()), "{t:?}");
        assert!(!t.iter().any(|(_, to)| to == "unresponsive"), "{t:?}");
        // Created paused, the guest ran only once the restarted service had its console.
        hang_detected_and_recovered(&g, &svc, paused).await;
    }
}

/// After a start order reached healthy: a QMP `stop` is unresponsive within the bound, a new
/// bundle is taken (with the console from the kernel's banner on when `from_boot`), and `cont`
/// brings the VM back to healthy for the next order.
async fn hang_detected_and_recovered(g: &Guest, svc: &Service, from_boot: bool) {
    let before: Vec<String> =
        svc.events().into_iter().filter(|e| e.kind == "bundle").map(|e| e.key).collect();
    // The heartbeat answers before userspace starts: give the guest time to reach its shell.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_a_hang_is_detected_in_time(g, svc).await;
    let bundle = svc
        .wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle" && !before.contains(&e.key))
        .await;
    if from_boot {
        let tail = step_file(&bundle, "console-tail");
        assert!(tail.contains("Linux version"), "the console from boot: {tail}");
    }
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Healthy, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_picked_up_and_dropped_as_their_directories_come_and_go() {
    let work = work();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let notify_path = work.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let touch = work.path().join("alive");
    let config = format!("touch_file = {:?}\n", touch.display().to_string());
    let svc = Service::start_with_env(
        &state,
        work.path(),
        &config,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap()), ("WATCHDOG_USEC", "1000000")],
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = notify.recv(&mut buf).expect("systemd notifications");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].starts_with("READY=1"), "{got:?}");
    let touched = std::fs::metadata(&touch).expect("the touch file exists").modified().unwrap();
    assert!(touched.elapsed().unwrap() < Duration::from_secs(5));

    // A VM prepared while the service runs is picked up; its QEMU is not running yet.
    acpimon::launch::prepare(&state, "late-vm", &acpimon::generate::SsdtConfig::default()).unwrap();
    let (v, _) = svc.wait_state("late-vm", State::Gone, Duration::from_secs(10)).await;
    assert!(v.reason.starts_with("QEMU is not running: cannot connect to QMP socket"), "{}", v.reason);
    svc.wait_event("vm-added", Duration::from_secs(5), |e| e.kind == "vm-added").await;
    let out = common::acpimon(&["status", "--addr", &svc.addr.to_string()]);
    let table = common::text(&out.stdout);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let row = table.lines().find(|l| l.starts_with("late-vm ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" gone ") && row.contains("QEMU is not running"), "{table}");

    // Its directory goes away: it is dropped.
    std::fs::remove_dir_all(state.join("late-vm")).unwrap();
    let start = Instant::now();
    while svc.vm("late-vm").await.is_some() {
        assert!(start.elapsed() < Duration::from_secs(10), "still watched after its directory went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.wait_event("vm-removed", Duration::from_secs(5), |e| e.kind == "vm-removed").await;

    // A directory with a broken descriptor is reported once, not watched.
    std::fs::create_dir_all(state.join("broken")).unwrap();
    std::fs::write(state.join("broken/vm.json"), b"{").unwrap();
    let e = svc.wait_event("vm-invalid", Duration::from_secs(10), |e| e.kind == "vm-invalid").await;
    assert!(e.detail["error"].as_str().unwrap().contains("prepare the VM again"), "{e:?}");
    assert_eq!(e.detail["dir"], state.join("broken").to_str().unwrap(), "the documented field name");
    assert!(svc.vm("broken").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_service_on_the_same_data_directory_is_refused_and_the_first_goes_on() {
    let work = work();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let svc = Service::start(&state, work.path(), "").await;
    svc.wait_event("service-started", Duration::from_secs(10), |e| e.kind == "service-started").await;
    let started = svc.events().len();

    // Its own state directory and metrics port: only the data directory is shared.
    let other_state = work.path().join("other-state");
    std::fs::create_dir_all(&other_state).unwrap();
    let config = work.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\ndata_dir = {:?}\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            other_state.display().to_string(),
            svc.data_dir.display().to_string(),
            free_port()
        ),
    )
    .unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_acpimon"))
        .args(["watch", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while second.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            second.kill().unwrap();
            let out = second.wait_with_output().unwrap();
            panic!("the second service was not refused: {}", common::text(&out.stdout));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = second.wait_with_output().unwrap();
    let err = common::text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let pid = svc.pid().unwrap();
    for needle in [
        "already uses the data directory".to_string(),
        svc.data_dir.display().to_string(),
        format!("pid {pid}"),
        "data_dir".to_string(),
    ] {
        assert!(err.contains(&needle), "{err:?} lacks {needle:?}");
    }
    assert!(common::text(&out.stdout).is_empty(), "the refused service reported itself started");

    // The first is unaffected: it answers and nobody else wrote to its event log.
    svc.status().await;
    assert_eq!(svc.events().len(), started, "{:#?}", svc.events());
    assert_eq!(std::fs::read_to_string(svc.data_dir.join("watch.lock")).unwrap().trim(), pid.to_string());
}

/// The request number a heartbeat's detail quotes ("request 41 answered in 1.2 ms").
fn quoted_request(scenario: &Value) -> Option<u32> {
    let detail = scenario["last"]["detail"].as_str()?;
    detail.strip_prefix("request ")?.split(' ').next()?.parse().ok()
}

/// QEMU killed with SIGKILL and relaunched in the same directory five times, a second apart:
/// every new QEMU process is a life of its own. Each relaunch is a `reboot` event whose
/// evidence names the new and the previous process, the VM starts over at each, and it is
/// `healthy` only on an answer to a request of its current life (never on what the region
/// still holds of a previous one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_relaunches_a_second_apart_are_five_lives() {
    let work = work();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let svc = Service::start(&state, work.path(), "").await;
    let spec = GuestSpec { watched: true, state_dir: Some(state.clone()), ..GuestSpec::new("pc") };
    let mut g = Guest::boot(spec).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let boots_before = g.record().map(|r| r.boot_count).unwrap();

    let mark = svc.events().len();
    // Per life: the last request the previous QEMU's guest was asked; no answer in this life
    // can quote it or an earlier one.
    let mut asked_before = Vec::new();
    let mut relaunched = Instant::now();
    for _ in 0..5 {
        g.kill().await;
        asked_before.push(g.snapshot().request.request_no);
        g.relaunch(false).await;
        relaunched = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (view, _) = svc.wait_state("guest", State::Healthy, BOOT).await;
    eprintln!("healthy {:?} after the last relaunch: {}", relaunched.elapsed(), view.reason);
    let events = &svc.events()[mark..];
    for e in events {
        eprintln!("{} {} {}", e.time, e.kind, serde_json::to_string(&e.detail).unwrap());
    }
    let is_relaunch = |e: &Event| e.kind == "reboot" && e.detail["evidence"].get("relaunch").is_some();
    let relaunches: Vec<&Event> = events.iter().filter(|e| is_relaunch(e)).collect();
    assert_eq!(relaunches.len(), 5, "one reboot event per relaunch");
    // Each names its own QEMU process, and the one before it.
    for pair in relaunches.windows(2) {
        let (a, b) = (&pair[0].detail["evidence"]["relaunch"], &pair[1].detail["evidence"]["relaunch"]);
        assert_eq!(b["previous"], a["qemu"]);
        assert_ne!(b["qemu"], a["qemu"]);
    }
    // The boot count the new guests wrote is no reboot of its own.
    assert!(!events.iter().any(|e| e.kind == "reboot" && e.detail["evidence"].get("region").is_some()));
    let mut life = 0;
    let mut healthy = 0;
    for (i, e) in events.iter().enumerate() {
        if is_relaunch(e) {
            life += 1;
            // The VM starts over at once: the next transition leaves `gone` for `starting`.
            let next = events[i..].iter().find(|e| e.kind == "transition").expect("a transition follows");
            assert_eq!((&next.detail["from"], &next.detail["to"]), (&json!("gone"), &json!("starting")));
        }
        if is_transition(e, State::Healthy) {
            healthy += 1;
            assert!(life > 0, "healthy before the first relaunch was seen");
            assert_eq!(e.detail["from"], "starting", "healthy only from starting");
            let scenarios = e.detail["evidence"]["scenarios"].as_array().unwrap();
            let answered = quoted_request(&scenarios[0]).unwrap_or_else(|| panic!("{scenarios:#?}"));
            let before = asked_before[life - 1];
            assert!(
                answered > before,
                "healthy on request {answered}, asked of a previous life (≤ {before})"
            );
        }
        // No false alarm while the new guests boot.
        assert!(!is_transition(e, State::Unresponsive), "{e:?}");
    }
    assert!(healthy >= 1);
    assert_eq!(events.iter().filter(|e| is_transition(e, State::Gone)).count(), 5);
    assert!(g.record().unwrap().boot_count > boots_before);
    assert_eq!(svc.vm("guest").await.unwrap().reboots, 5);
}

/// Issue 11's start-up hang: the console scenario never answers (its expected output never
/// comes), the heartbeat answers and then stops (the kernel starves) well within a two-minute
/// start-up grace. The heartbeat, having answered, is judged: `unresponsive` after its
/// threshold, not `starting` until the grace ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_during_the_start_up_grace_is_not_hidden_by_a_scenario_that_never_answered() {
    let work = work();
    let g = guest("starve", 5).await;
    let config = r#"
[defaults]
startup_grace = "120s"
[[defaults.scenario]]
kind = "acpi-heartbeat"
[[defaults.scenario]]
kind = "console"
command = "uptime"
expect = "no such output"
interval = "2s"
timeout = "1s"
threshold = 2
"#;
    let svc = watch_guest(&g, work.path(), config).await;
    let resumed = Instant::now();
    let (view, took) = svc.wait_state("guest", State::Unresponsive, Duration::from_secs(100)).await;
    eprintln!("unresponsive {took:?} after the guest was resumed: {}", view.reason);
    assert!(view.reason.starts_with("acpi-heartbeat missed 3 of 3"), "{}", view.reason);
    assert!(resumed.elapsed() < Duration::from_secs(100), "within the grace");
    let events = svc.events();
    let t = events.iter().find(|e| is_transition(e, State::Unresponsive)).unwrap();
    // Straight from `starting` (the console never answered): the grace hid nothing.
    assert_eq!(t.detail["from"], "starting");
    let scenarios = t.detail["evidence"]["scenarios"].as_array().unwrap();
    assert_eq!(scenarios[0]["consecutive_misses"], 3, "{scenarios:#?}");
    assert_eq!(scenarios[1]["last"]["ok"], false, "{scenarios:#?}");
    assert!(view.scenarios[0].answers_total > 0, "the heartbeat answered first");
    assert_eq!(view.scenarios[1].answers_total, 0, "the console never answered");
}

/// QEMU killed while an incident's bundle is being taken, and relaunched: the bundle is
/// reported failed (it concerned the previous guest), not taken from the new guest, and the
/// new guest's first answers end the incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_unfinished_at_a_relaunch_is_failed_not_taken_from_the_new_guest() {
    let work = work();
    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let svc = Service::start(&state, work.path(), "").await;
    let spec = GuestSpec { watched: true, state_dir: Some(state.clone()), ..GuestSpec::new("pc") };
    let mut g = Guest::boot(spec).await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    // A paused VM: SysRq waits for output that never comes, so the bundle takes seconds.
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    svc.wait_state("guest", State::Unresponsive, Duration::from_secs(30)).await;
    g.kill().await;
    g.relaunch(false).await;
    let bundle = svc.wait_event("bundle", Duration::from_secs(60), |e| e.kind == "bundle").await;
    let error = bundle.detail["error"].as_str().unwrap_or_else(|| panic!("{bundle:?}"));
    assert!(error.starts_with("QEMU was relaunched before the incident's bundle was finished"), "{error}");
    assert!(bundle.detail.get("manifest").is_none_or(Value::is_null), "{bundle:?}");
    assert_eq!(bundle.detail["trigger"]["kind"], "unresponsive");
    // The incident ends on the new guest's own answers.
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let t = transitions(&svc.events());
    let i = t.iter().rposition(|(_, to)| to == "starting").unwrap();
    assert_eq!(
        &t[i..],
        [
            ("gone".into(), "starting".into()),
            ("starting".into(), "recovered".into()),
            ("recovered".into(), "healthy".into())
        ],
        "{t:?}"
    );
    assert_eq!(svc.events().iter().filter(|e| e.kind == "bundle").count(), 1);
}

/// OVMF keeping its 64-bit window (BAR2 above 4 GiB) under the service: healthy on the port
/// channel, and the view, the beat's detail and `acpimon status` say so and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ovmf_vm_with_a_high_bar_is_watched_through_the_port() {
    let work = work();
    let extra = ["-S", "-no-shutdown", "-fw_cfg", "name=opt/ovmf/X-PciMmio64Mb,string=32768"]
        .map(String::from)
        .to_vec();
    let spec =
        GuestSpec { watched: true, firmware: common::guest::Firmware::Ovmf, extra, ..GuestSpec::new("q35") };
    let g = Guest::boot(spec).await;
    let svc = watch_guest(&g, work.path(), "").await;
    svc.wait_state("guest", State::Healthy, BOOT).await;
    let start = Instant::now();
    let (detail, channel) = loop {
        let view = svc.vm("guest").await.unwrap();
        let hb = view.scenarios.iter().find(|s| s.kind == "acpi-heartbeat").unwrap();
        let detail = hb.last_detail.clone().unwrap_or_default();
        if detail.contains("a frame on the doorbell port") || start.elapsed() > Duration::from_secs(30) {
            break (detail, view.channel.clone().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(detail.contains("answered in") && detail.contains("BarAbove4Gib"), "{detail}");
    assert!(channel.starts_with("I/O port") && channel.contains("above 4 GiB"), "{channel}");
    let table = acpimon::report::status_table(&svc.status().await);
    assert!(table.contains("channel: I/O port"), "{table}");
    assert!(
        svc.events().iter().all(|e| e.kind != "transition" || e.detail["to"] != "unresponsive"),
        "no miss"
    );
}
