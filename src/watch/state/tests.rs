use serde_json::json;

use super::*;
use crate::abi::AppStatus;

/// The evidence as it is sent.
fn sent(t: &Transition) -> Value {
    serde_json::to_value(&t.evidence).unwrap()
}

const HB: usize = 0;
const CON: usize = 1;

fn ok(ms: u64) -> Outcome {
    Outcome { ok: true, latency: Some(Duration::from_millis(ms)), detail: format!("answered in {ms} ms") }
}

fn miss(what: &str) -> Outcome {
    Outcome { ok: false, latency: None, detail: what.into() }
}

fn machine(pause: PausePolicy, restored: Option<(State, bool)>) -> (Machine, Instant) {
    let now = Instant::now();
    let tracks = vec![Track::new("acpi-heartbeat", "acpi-heartbeat", 3), Track::new("console", "console", 2)];
    (Machine::new(tracks, restored, pause, Duration::from_secs(30), now), now)
}

fn to(t: Option<Transition>) -> Option<State> {
    t.map(|t| t.to)
}

/// Feeds one round where both scenarios answer.
fn healthy_round(m: &mut Machine, now: Instant) -> Vec<State> {
    [m.probe(HB, ok(1), now), m.probe(CON, ok(20), now)].into_iter().filter_map(to).collect()
}

#[test]
fn starting_becomes_healthy_once_every_scenario_answered() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    assert_eq!(to(m.attached("running", false, t0)), None);
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "console has not answered yet");
    assert_eq!(to(m.probe(CON, ok(20), t0)), Some(State::Healthy));
}

#[test]
fn misses_make_late_then_unresponsive_at_the_threshold_then_recovered_then_healthy() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    assert_eq!(m.state, State::Healthy);
    let t = m.probe(HB, miss("no record echoed request 7 within 1s"), t0).unwrap();
    assert_eq!((t.from, t.to), (State::Healthy, State::Late));
    assert!(t.reason.contains("acpi-heartbeat missed 1 of 3 (no record echoed request 7"), "{}", t.reason);
    assert_eq!(to(m.probe(HB, miss("x"), t0)), None);
    let t = m.probe(HB, miss("no record echoed request 9 within 1s"), t0).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert_eq!(sent(&t)["scenarios"][0]["consecutive_misses"], 3);
    assert_eq!(sent(&t)["scenarios"][0]["last"]["detail"], "no record echoed request 9 within 1s");
    assert_eq!(
        (sent(&t)["cause"].as_str(), sent(&t)["paused"].as_bool()),
        (Some("acpi-heartbeat"), Some(false))
    );
    assert!(m.incident);
    assert_eq!(to(m.probe(HB, miss("x"), t0)), None, "no second alert while the incident lasts");
    assert_eq!(to(m.probe(HB, ok(2), t0)), Some(State::Recovered));
    assert_eq!(to(m.probe(HB, ok(2), t0)), None, "console has not answered since");
    assert_eq!(to(m.probe(CON, ok(2), t0)), Some(State::Healthy));
}

#[test]
fn startup_misses_wait_for_the_grace_period() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    for _ in 0..10 {
        assert_eq!(to(m.probe(HB, miss("booting"), t0)), None);
    }
    assert_eq!(m.state, State::Starting);
    let t = m.tick(t0 + Duration::from_secs(31)).unwrap();
    assert_eq!(t.to, State::Unresponsive);
}

#[test]
fn console_failing_while_the_heartbeat_answers_says_so() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.probe(CON, miss("no match for /load average/ within 5s"), t0);
    m.probe(HB, ok(1), t0);
    let t = m.probe(CON, miss("no match for /load average/ within 5s"), t0).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(t.reason.starts_with("console missed 2 of 2 (no match"), "{}", t.reason);
    assert!(t.reason.contains("while acpi-heartbeat answers"), "{}", t.reason);
    assert!(t.reason.contains("the guest kernel is alive"), "{}", t.reason);
}

#[test]
fn a_stuck_vcpu_while_the_heartbeat_answers_is_not_called_a_live_kernel() {
    let now = Instant::now();
    let tracks = vec![
        Track::new("acpi-heartbeat", "acpi-heartbeat", 3),
        Track::new("vcpu-progress", "vcpu-progress", 2),
    ];
    let mut m = Machine::new(tracks, None, PausePolicy::Counts, Duration::from_secs(30), now);
    m.probe(HB, ok(1), now);
    m.probe(1, ok(1), now);
    m.probe(1, miss("vCPU 1 has run kernel code with interrupts disabled ...: a hard lockup"), now);
    let t = m
        .probe(1, miss("vCPU 1 has run kernel code with interrupts disabled ...: a hard lockup"), now)
        .unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(t.reason.contains("while acpi-heartbeat answers"), "{}", t.reason);
    assert!(t.reason.ends_with(": the vCPU that takes its interrupt runs, another is stuck"), "{}", t.reason);
    assert!(!t.reason.contains("alive"), "{}", t.reason);
}

#[test]
fn a_pause_that_lasts_past_the_threshold_is_unresponsive_by_default() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    assert_eq!(to(m.stopped(json!({"event": "STOP"}), t0)), Some(State::Paused));
    m.probe(HB, miss("x"), t0);
    m.probe(HB, miss("x"), t0);
    let t = m.probe(HB, miss("x"), t0).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(t.reason.starts_with("the VM is paused (QMP STOP) and acpi-heartbeat missed 3"), "{}", t.reason);
    assert_eq!(to(m.resumed(json!({"event": "RESUME"}), t0)), None, "still unresponsive until probes answer");
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "the console has not answered since the resume");
    assert_eq!(to(m.probe(CON, ok(1), t0)), Some(State::Recovered));
}

#[test]
fn an_answer_before_the_resume_event_ends_the_pause_without_a_second_alert() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.stopped(json!({"event": "STOP"}), t0);
    for _ in 0..3 {
        m.probe(HB, miss("x"), t0);
    }
    assert_eq!(m.state, State::Unresponsive);
    // `cont`: the guest serves the pending beat before the service reads QMP's RESUME.
    assert_eq!(to(m.probe(HB, ok(1), t0)), Some(State::Recovered));
    assert_eq!(to(m.resumed(json!({"event": "RESUME"}), t0)), None);
    assert_eq!(to(m.status("running", t0)), None);
}

#[test]
fn exempt_pauses_do_not_count() {
    let (mut m, t0) = machine(PausePolicy::Exempt, None);
    healthy_round(&mut m, t0);
    assert_eq!(to(m.stopped(json!({}), t0)), Some(State::Paused));
    for _ in 0..10 {
        assert_eq!(to(m.probe(HB, miss("x"), t0)), None);
    }
    assert_eq!(to(m.resumed(json!({}), t0)), Some(State::Starting), "probes decide after a resume");
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "the console has not answered since the resume");
    assert_eq!(to(m.probe(CON, ok(1), t0)), Some(State::Healthy));
}

#[test]
fn a_panic_is_sticky_until_the_guest_reboots() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let t = m.panicked(json!({"event": "GUEST_PANICKED"}), t0).unwrap();
    assert_eq!(t.to, State::Panicked);
    assert_eq!(sent(&t), json!({"event": "GUEST_PANICKED"}), "the QMP event as QEMU sent it");
    for _ in 0..5 {
        assert_eq!(to(m.probe(HB, miss("x"), t0)), None);
    }
    let reset = Evidence::QmpEvent { qmp_event: json!({"event": "RESET"}) };
    assert_eq!(to(m.rebooted(reset, t0)), Some(State::Starting));
    assert_eq!(to(m.probe(HB, ok(1), t0)), None);
    assert_eq!(
        to(m.probe(CON, ok(1), t0)),
        Some(State::Recovered),
        "the incident ends with the reboot's recovery"
    );
}

#[test]
fn a_reboot_is_not_a_failure() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let region = Evidence::Region { region: Reboot::BootCountChanged { from: 1, to: 2 } };
    assert_eq!(to(m.rebooted(region, t0)), Some(State::Starting));
    for _ in 0..5 {
        assert_eq!(to(m.probe(HB, miss("rebooting"), t0)), None);
    }
    assert_eq!(healthy_round(&mut m, t0), vec![State::Healthy]);
    assert!(!m.incident);
}

#[test]
fn gone_then_attached_again_starts_over() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let t = m.gone("QEMU exited".into(), Evidence::Closed(Nothing {}), t0).unwrap();
    assert_eq!((t.to, sent(&t)), (State::Gone, json!({})));
    assert_eq!(to(m.probe(HB, miss("x"), t0)), None, "nothing counts while gone");
    assert_eq!(to(m.attached("running", false, t0)), Some(State::Starting));
    assert_eq!(healthy_round(&mut m, t0), vec![State::Healthy]);
}

#[test]
fn a_restored_incident_is_not_alerted_twice() {
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Unresponsive, true)));
    assert_eq!(to(m.attached("running", false, t0)), None);
    for _ in 0..5 {
        assert_eq!(to(m.probe(HB, miss("x"), t0)), None);
    }
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "the console still counts as failing");
    assert_eq!(to(m.probe(CON, ok(1), t0)), Some(State::Recovered));
}

#[test]
fn an_unavailable_scenario_stops_counting() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    m.probe(HB, ok(1), t0);
    let t = m.unavailable(CON, "no console socket".into(), t0).unwrap();
    assert_eq!(t.to, State::Healthy);
    assert_eq!(sent(&t)["scenarios"][1]["unavailable"], "no console socket");
}

#[test]
fn qemu_reporting_a_panic_at_attach_is_panicked() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    assert_eq!(to(m.attached("guest-panicked", false, t0)), Some(State::Panicked));
    assert!(m.incident);
}

#[test]
fn the_apps_own_word_counts() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let t = m.app_health(AppStatus::Degraded, "disk 93% full".into(), t0).unwrap();
    assert_eq!((t.to, t.reason.as_str()), (State::Late, "the app reports it is degraded: disk 93% full"));
    let t = m.app_health(AppStatus::Failed, "database down".into(), t0).unwrap();
    assert_eq!((t.to, t.reason.as_str()), (State::Unresponsive, "the app reports it failed: database down"));
    assert!(m.incident, "a failed app runs diagnostics like a hang");
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "still failed while the app says so");
    assert_eq!(to(m.app_health(AppStatus::Ok, String::new(), t0)), Some(State::Recovered));
}

fn stop_event() -> Value {
    json!({"event": "STOP"})
}

/// Healthy, then a hang (QMP STOP and misses) is unresponsive at the threshold.
fn assert_healthy_then_hang_detected(m: &mut Machine, now: Instant) {
    assert_eq!(healthy_round(m, now), vec![State::Healthy]);
    assert_eq!(to(m.stopped(stop_event(), now)), Some(State::Paused));
    m.probe(HB, miss("x"), now);
    m.probe(HB, miss("x"), now);
    assert_eq!(to(m.probe(HB, miss("x"), now)), Some(State::Unresponsive));
}

#[test]
fn eves_order_service_first_then_qemu_with_dash_s_then_cont() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    let why = "QEMU is not running: cannot connect to QMP socket".to_string();
    assert_eq!(to(m.gone(why.clone(), Evidence::Attach { attach: why }, t0)), Some(State::Gone));
    let t = m.attached("prelaunch", true, t0).unwrap();
    assert_eq!((t.from, t.to), (State::Gone, State::Paused));
    assert!(t.reason.starts_with("QEMU waits for `cont`"), "{}", t.reason);
    assert_eq!(sent(&t), json!({"qmp_status": "prelaunch"}));
    // A guest that never ran cannot hang: its misses do not count, past the grace too.
    let later = t0 + Duration::from_secs(600);
    for _ in 0..10 {
        assert_eq!(to(m.probe(HB, miss("x"), later)), None);
    }
    assert_eq!(to(m.tick(later)), None);
    let t = m.resumed(json!({"event": "RESUME"}), later).unwrap();
    assert_eq!(t.to, State::Starting);
    // It boots now: the grace starts at the resume.
    for _ in 0..5 {
        assert_eq!(to(m.probe(HB, miss("booting"), later)), None);
    }
    assert_healthy_then_hang_detected(&mut m, later);
}

#[test]
fn every_qemu_run_state_leads_to_a_state_that_can_be_left() {
    let statuses = [
        "prelaunch",
        "inmigrate",
        "paused",
        "suspended",
        "postmigrate",
        "finish-migrate",
        "save-vm",
        "restore-vm",
        "debug",
        "colo",
        "io-error",
        "internal-error",
        "watchdog",
        "guest-panicked",
        "shutdown",
        "running",
        "some-future-state",
    ];
    for status in statuses {
        for from in ["gone", "starting", "healthy", "unresponsive"] {
            let (mut m, t0) = machine(PausePolicy::Counts, None);
            match from {
                "gone" => {
                    m.gone("QEMU exited".into(), Evidence::Closed(Nothing {}), t0);
                }
                "healthy" => {
                    healthy_round(&mut m, t0);
                }
                "unresponsive" => {
                    healthy_round(&mut m, t0);
                    for _ in 0..3 {
                        m.probe(HB, miss("x"), t0);
                    }
                    assert_eq!(m.state, State::Unresponsive);
                }
                _ => {}
            }
            let ctx = format!("{status} from {from}");
            m.attached(status, from == "gone", t0);
            let expected = match RunState::of(status) {
                RunState::Running if from == "gone" => State::Starting,
                RunState::Running => m.state,
                RunState::Panicked => State::Panicked,
                RunState::Off => State::Gone,
                RunState::Stopped { held: false } if from == "unresponsive" => State::Unresponsive,
                RunState::Stopped { .. } => State::Paused,
            };
            assert_eq!(m.state, expected, "{ctx}");
            // And out again, by what QEMU does next.
            match RunState::of(status) {
                RunState::Off => {
                    // system_reset of a powered-off VM: RESET, then prelaunch until `cont`.
                    assert_eq!(to(m.status("prelaunch", t0)), Some(State::Paused), "{ctx}");
                    assert_eq!(to(m.resumed(json!({}), t0)), Some(State::Starting), "{ctx}");
                }
                RunState::Panicked => {
                    let reset = Evidence::QmpEvent { qmp_event: json!({"event": "RESET"}) };
                    assert_eq!(to(m.rebooted(reset, t0)), Some(State::Starting), "{ctx}");
                }
                RunState::Stopped { .. } => {
                    // `cont` whose RESUME was missed: the status poll says running.
                    m.status("running", t0);
                    assert_ne!(m.state, State::Paused, "{ctx}");
                }
                RunState::Running => {}
            }
            healthy_round(&mut m, t0);
            assert!(matches!(m.state, State::Healthy | State::Recovered), "{ctx}: {:?}", m.state);
            healthy_round(&mut m, t0);
            assert_healthy_or_recovered_then_hang(&mut m, t0, &ctx);
        }
    }
}

fn assert_healthy_or_recovered_then_hang(m: &mut Machine, now: Instant, ctx: &str) {
    assert_eq!(m.state, State::Healthy, "{ctx}");
    assert_eq!(to(m.stopped(stop_event(), now)), Some(State::Paused), "{ctx}");
    m.probe(HB, miss("x"), now);
    m.probe(HB, miss("x"), now);
    assert_eq!(to(m.probe(HB, miss("x"), now)), Some(State::Unresponsive), "{ctx}");
}

#[test]
fn a_relaunched_qemu_needs_fresh_answers_from_its_own_guest() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.gone("QEMU exited (its QMP connection closed)".into(), Evidence::Closed(Nothing {}), t0);
    assert_eq!(to(m.attached("running", true, t0)), Some(State::Starting));
    assert_eq!(to(m.tick(t0)), None, "the previous life's answers count for nothing");
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "the console has not answered this QEMU yet");
    for _ in 0..5 {
        assert_eq!(to(m.probe(CON, miss("booting"), t0)), None, "its guest boots: start-up grace");
    }
    assert_eq!(to(m.probe(CON, ok(1), t0)), Some(State::Healthy));
}

#[test]
fn a_qemu_relaunched_while_the_service_was_down_starts_over() {
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Healthy, false)));
    let t = m.attached("running", true, t0).unwrap();
    assert_eq!((t.from, t.to), (State::Healthy, State::Starting));
    assert!(t.reason.contains("relaunched"), "{}", t.reason);
    for _ in 0..5 {
        assert_eq!(to(m.probe(HB, miss("booting"), t0)), None, "not a hang: its guest boots");
    }
    assert_healthy_then_hang_detected(&mut m, t0);

    // The same QEMU, the service restarted: misses count at once (no grace), but healthy
    // needs a fresh answer from every scenario.
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Healthy, false)));
    assert_eq!(to(m.attached("running", false, t0)), None);
    assert_eq!(to(m.probe(HB, miss("x"), t0)), None, "the console has not reported yet");
    assert_eq!(to(m.probe(CON, ok(1), t0)), Some(State::Late), "no start-up grace");
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Healthy, false)));
    m.attached("running", false, t0);
    assert_eq!(to(m.probe(HB, ok(1), t0)), None, "the console has not answered since the attach");
    assert_eq!(to(m.probe(CON, ok(1), t0)), None, "healthy, as before");
    assert_eq!(m.state, State::Healthy);

    // Relaunched with -S while the service was down, after an incident.
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Unresponsive, true)));
    assert_eq!(to(m.attached("prelaunch", true, t0)), Some(State::Paused));
    assert_eq!(to(m.resumed(json!({}), t0)), Some(State::Starting));
    assert_eq!(healthy_round(&mut m, t0), vec![State::Recovered], "the incident ends");
}

#[test]
fn a_reset_of_a_stopped_vm_stays_paused_until_cont() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    assert_eq!(to(m.stopped(stop_event(), t0)), Some(State::Paused));
    let reset = Evidence::QmpEvent { qmp_event: json!({"event": "RESET"}) };
    assert_eq!(to(m.rebooted(reset, t0)), None, "a reset does not resume the vCPUs");
    assert_eq!(to(m.status("prelaunch", t0)), None);
    for _ in 0..10 {
        assert_eq!(to(m.probe(HB, miss("x"), t0 + Duration::from_secs(600))), None, "held: never ran");
    }
    assert_eq!(to(m.resumed(json!({}), t0)), Some(State::Starting));
    assert_healthy_then_hang_detected(&mut m, t0);
}

#[test]
fn a_missed_resume_is_caught_by_the_status_poll() {
    let (mut m, t0) = machine(PausePolicy::Exempt, None);
    healthy_round(&mut m, t0);
    assert_eq!(to(m.stopped(stop_event(), t0)), Some(State::Paused));
    assert_eq!(to(m.status("paused", t0)), None, "the poll agrees");
    assert_eq!(m.evaluate(t0).1, "the VM is paused (QMP STOP) (pauses are exempt)", "and says no more");
    assert_eq!(to(m.status("running", t0)), Some(State::Starting));
    assert_eq!(healthy_round(&mut m, t0), vec![State::Healthy]);
}

#[test]
fn an_error_stop_says_why_and_counts() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let t = m.status("io-error", t0).unwrap();
    assert_eq!(t.to, State::Paused);
    assert_eq!(t.reason, "QEMU stopped the VM on a disk I/O error (QEMU status io-error)");
    m.probe(HB, miss("x"), t0);
    m.probe(HB, miss("x"), t0);
    let t = m.probe(HB, miss("x"), t0).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(
        t.reason.starts_with(
            "QEMU stopped the VM on a disk I/O error (QEMU status io-error) and acpi-heartbeat missed 3"
        ),
        "{}",
        t.reason
    );
}

/// QEMU's order with `werror=stop`: `BLOCK_IO_ERROR` (action stop), `STOP`, then polls saying
/// `io-error`: the pause names the drive and its error, and keeps naming it.
#[test]
fn a_stop_after_a_block_io_error_names_the_drive() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.io_error_stop("drive disk0: write error (Input/output error)", t0);
    let t = m.stopped(stop_event(), t0 + Duration::from_millis(5)).unwrap();
    assert_eq!(t.to, State::Paused);
    assert_eq!(
        t.reason,
        "QEMU stopped the VM on a disk I/O error: drive disk0: write error (Input/output error) (QMP STOP)"
    );
    assert_eq!(to(m.status("io-error", t0)), None, "already paused");
    m.probe(HB, miss("x"), t0);
    m.probe(HB, miss("x"), t0);
    let t = m.probe(HB, miss("x"), t0).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(
        t.reason.starts_with(
            "QEMU stopped the VM on a disk I/O error: drive disk0: write error (Input/output error) and acpi-heartbeat missed 3"
        ),
        "{}",
        t.reason
    );
    // Resumed, then paused by hand much later: not the old error's doing.
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.io_error_stop("drive disk0: write error (Input/output error)", t0);
    m.stopped(stop_event(), t0);
    m.resumed(json!({"event": "RESUME"}), t0);
    let t = m.stopped(stop_event(), t0 + Duration::from_secs(60)).unwrap();
    assert_eq!(t.reason, "QEMU stopped the VM's vCPUs (QMP STOP)");
    // A retry's STOP comes before its BLOCK_IO_ERROR: the pause in force becomes the error's.
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    assert_eq!(m.stopped(stop_event(), t0).unwrap().reason, "QEMU stopped the VM's vCPUs (QMP STOP)");
    assert_eq!(
        m.io_error_stop("drive disk0: write error (Input/output error)", t0).as_deref(),
        Some("QEMU stopped the VM on a disk I/O error: drive disk0: write error (Input/output error)")
    );
    // An error whose STOP never came (another request's, while running on): stale later.
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    m.io_error_stop("drive disk0: write error (Input/output error)", t0);
    let t = m.stopped(stop_event(), t0 + Duration::from_secs(30)).unwrap();
    assert_eq!(t.reason, "QEMU stopped the VM's vCPUs (QMP STOP)");
}

/// Issue 11's case: the heartbeat answered during start-up, then missed 93 times while the
/// console scenario never answered; the VM stayed `starting` for the whole grace. A scenario
/// that answered once is judged from then on.
#[test]
fn a_hang_during_start_up_is_not_hidden_by_a_scenario_that_never_answered() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(to(m.attached("running", false, t0)), None);
    assert_eq!(to(m.probe(HB, ok(1), at(1))), None);
    assert_eq!(to(m.probe(CON, miss("'uptime' got no output"), at(1))), None, "the console boots: grace");
    let mut failed = None;
    for i in 0..93 {
        let now = at(2 + i);
        if let Some(t) = m.probe(HB, miss(&format!("no record echoed request {i} within 1s")), now) {
            failed.get_or_insert((i + 1, t));
        }
        m.probe(CON, miss("'uptime' got no output"), now);
    }
    let (misses, t) = failed.expect("the heartbeat's misses count during the grace");
    assert_eq!((misses, t.from, t.to), (3, State::Starting, State::Unresponsive));
    assert!(t.reason.starts_with("acpi-heartbeat missed 3 of 3 (no record echoed request 2"), "{}", t.reason);
    assert_eq!(sent(&t)["scenarios"][0]["consecutive_misses"], 3);
    assert_eq!(sent(&t)["scenarios"][1]["last"]["ok"], false, "the console never answered");
    assert!(m.incident, "diagnostics run");
    // The console, still in its grace, is not part of the verdict.
    assert!(!t.reason.contains("console missed"), "{}", t.reason);
    assert_eq!(m.state, State::Unresponsive);
}

/// A heartbeat that never answers fails once the grace is over, even while another scenario
/// is slow (has not reported at all).
#[test]
fn a_heartbeat_that_never_answers_fails_after_the_grace_even_if_another_scenario_is_slow() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    for i in 0..10 {
        assert_eq!(to(m.probe(HB, miss("no record"), t0 + Duration::from_secs(i))), None, "grace");
    }
    assert_eq!(m.state, State::Starting);
    let t = m.tick(t0 + Duration::from_secs(31)).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(t.reason.starts_with("acpi-heartbeat missed 10 of 3"), "{}", t.reason);
    assert_eq!(sent(&t)["scenarios"][1]["last"], Value::Null, "the console had not reported");
}

/// A slow scenario is covered by the grace only until its first answer: the other one,
/// answering, makes the VM late or unresponsive by its own misses, not `starting`.
#[test]
fn the_grace_is_per_scenario() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    m.probe(HB, ok(1), t0);
    m.probe(CON, ok(1), t0);
    assert_eq!(m.state, State::Healthy);
    // Within the grace still: the console, which answered, is judged.
    m.probe(CON, miss("x"), t0);
    assert_eq!(to(m.probe(CON, miss("x"), t0)), Some(State::Unresponsive));

    // Past the grace, a scenario that never answered counts like any other.
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    m.probe(HB, ok(1), t0);
    m.probe(CON, miss("x"), t0);
    assert_eq!(to(m.probe(CON, miss("x"), t0)), None, "in its grace");
    let t = m.tick(t0 + Duration::from_secs(31)).unwrap();
    assert_eq!(t.to, State::Unresponsive);
    assert!(t.reason.starts_with("console missed 2 of 2"), "{}", t.reason);
    assert!(t.reason.contains("while acpi-heartbeat answers"), "{}", t.reason);
}

/// What the app said in a previous QEMU's guest does not count for the new one.
#[test]
fn a_relaunch_forgets_the_previous_apps_word() {
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    assert_eq!(to(m.app_health(AppStatus::Failed, "database down".into(), t0)), Some(State::Unresponsive));
    m.gone("QEMU exited (its QMP connection closed)".into(), Evidence::Closed(Nothing {}), t0);
    assert_eq!(to(m.attached("running", true, t0)), Some(State::Starting));
    assert_eq!(healthy_round(&mut m, t0), vec![State::Recovered], "not failed on the old app's word");
}

fn kernel(class: crate::sentinel::ReportClass, line: &str) -> KernelReport {
    KernelReport {
        class,
        cpu: Some(1),
        task: Some("insmod".into()),
        pid: Some(93),
        stuck_s: Some(44),
        location: Some("spin_fn+0x10/0x20 [faults]".into()),
        line: line.into(),
        trace: vec![],
        stamp_us: None,
    }
}

/// A lockup on CPU 1 while CPU 0 serves the heartbeat: the kernel's report alone makes the
/// VM unresponsive, and it stays so while the report repeats; once the kernel has been quiet
/// for `clear_after` and the probes answer, it recovers.
#[test]
fn a_soft_lockup_report_is_unresponsive_though_the_probes_answer_until_it_lapses() {
    use crate::sentinel::ReportClass;
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let r = kernel(ReportClass::SoftLockup, "watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [insmod:93]");
    let clear = Duration::from_secs(90);
    let t = m.kernel_report(&r, State::Unresponsive, clear, t0).unwrap();
    assert_eq!((t.from, t.to), (State::Healthy, State::Unresponsive));
    assert!(
        t.reason.starts_with("the guest kernel reports a soft lockup on CPU#1 (task insmod:93) for 44 s in `spin_fn+0x10/0x20 [faults]`"),
        "{}",
        t.reason
    );
    assert_eq!(sent(&t)["kernel_report"]["class"], "soft-lockup");
    assert!(m.incident);
    // The heartbeat still answers: no change.
    let t28 = t0 + Duration::from_secs(28);
    assert_eq!(healthy_round(&mut m, t28), vec![]);
    // A repeat 28 s later keeps it (no new transition, so no new incident).
    assert_eq!(to(m.kernel_report(&r, State::Unresponsive, clear, t28)), None);
    assert_eq!(to(m.tick(t28 + Duration::from_secs(89))), None, "90 s after the repeat, not the first");
    // A hung task report (late) does not lower it.
    let hung = kernel(ReportClass::HungTask, "INFO: task a:1 blocked for more than 120 seconds.");
    let hung_clear = Duration::from_secs(120);
    assert_eq!(to(m.kernel_report(&hung, State::Late, hung_clear, t28 + Duration::from_secs(1))), None);
    assert_eq!(m.state, State::Unresponsive);
    // Quiet for 90 s and the probes answer: recovered, then healthy.
    let later = t28 + Duration::from_secs(91);
    let t = m.tick(later);
    assert_eq!(to(t), Some(State::Late), "the hung task's lower report is still in force");
    let quiet = t28 + Duration::from_secs(121);
    assert_eq!(to(m.tick(quiet)), Some(State::Recovered));
    healthy_round(&mut m, quiet);
    assert_eq!(m.state, State::Healthy);
}

#[test]
fn a_hung_task_or_oom_is_late_and_a_reboot_clears_it() {
    use crate::sentinel::ReportClass;
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let r = kernel(ReportClass::Oom, "Out of memory: Killed process 117 (sh)");
    let t = m.kernel_report(&r, State::Late, Duration::from_secs(120), t0).unwrap();
    assert_eq!((t.to, m.incident), (State::Late, false));
    assert!(t.reason.starts_with("the guest kernel reports an OOM kill"), "{}", t.reason);
    let t = m.rebooted(Evidence::QmpStatus { qmp_status: "running".into() }, t0).unwrap();
    assert_eq!(t.to, State::Starting);
    healthy_round(&mut m, t0 + Duration::from_secs(1));
    assert_eq!(m.state, State::Healthy, "the report went with the boot");
}

#[test]
fn a_console_panic_report_is_panicked_without_pvpanic() {
    use crate::sentinel::ReportClass;
    let (mut m, t0) = machine(PausePolicy::Counts, None);
    healthy_round(&mut m, t0);
    let r = kernel(ReportClass::Panic, "Kernel panic - not syncing: sysrq triggered crash");
    let t = m.kernel_panic(&r, t0).unwrap();
    assert_eq!(t.to, State::Panicked);
    assert_eq!(t.reason, "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash");
    assert_eq!(sent(&t)["kernel_report"]["line"], r.line);
    // QMP saying so too changes nothing.
    assert_eq!(to(m.panicked(json!({"event": "GUEST_PANICKED"}), t0)), None);
}
