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
    assert_eq!(to(m.attached("running", t0)), None);
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
    assert_eq!(to(m.attached("running", t0)), Some(State::Starting));
    assert_eq!(healthy_round(&mut m, t0), vec![State::Healthy]);
}

#[test]
fn a_restored_incident_is_not_alerted_twice() {
    let (mut m, t0) = machine(PausePolicy::Counts, Some((State::Unresponsive, true)));
    assert_eq!(to(m.attached("running", t0)), None);
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
    assert_eq!(to(m.attached("guest-panicked", t0)), Some(State::Panicked));
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
