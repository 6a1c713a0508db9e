use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::*;
use crate::judge::Reboot;

fn trigger() -> Trigger {
    Trigger {
        kind: "unresponsive".into(),
        time: "2026-01-01T00:00:00.000Z".into(),
        reason: "acpi-heartbeat missed 3 of 3".into(),
        evidence: json!({ "cause": "tick" }),
    }
}

/// One event of every kind, every optional field set: what the README's table must list.
fn examples() -> Vec<EventKind> {
    let incident = Incident {
        trigger: trigger(),
        event: "00".repeat(16),
        bundle: "/b/web/x-unresponsive".into(),
        started: Some("2026-01-01T00:00:01.000Z".into()),
    };
    let manifest = Manifest {
        schema: "acpimon.bundle/1".into(),
        vm: "web".into(),
        trigger: trigger(),
        created: "c".into(),
        finished: "f".into(),
        timeline: vec![],
        steps: vec![],
        verdict: Some(crate::verdict::Verdict {
            class: crate::verdict::Class::HardLockup,
            headline: "vCPU 1 spinning with interrupts disabled at RIP 0xffffffffc023604c (module space)"
                .into(),
            evidence: vec![crate::verdict::EvidenceLine {
                source: "05-registers.txt".into(),
                line: "vCPU 1 spinning with interrupts disabled at RIP 0xffffffffc023604c (module space)"
                    .into(),
            }],
        }),
    };
    vec![
        EventKind::AppHealth(AppHealth {
            status: AppStatus::Degraded,
            details: "disk 91% full".into(),
            source: AppSource::AppChannel,
            id: Some("h7".into()),
            audit: Some(Audit { name: "disk".into(), exit: Some(0), output: "ok".into() }),
        }),
        EventKind::AppInfo(AppInfo { info: json!({ "version": "1.2" }) }),
        EventKind::Transition(Transition {
            from: State::Healthy,
            to: State::Unresponsive,
            reason: "acpi-heartbeat missed 3 of 3".into(),
            evidence: crate::watch::state::Evidence::QmpStatus { qmp_status: "running".into() },
            attached: Some(Attached { qemu: "10.0.0".into() }),
            kernel_report: Some(Box::new(kernel_report())),
        }),
        EventKind::Reboot(RebootEvent {
            evidence: RebootEvidence::Region(Reboot::BootCountChanged { from: 1, to: 2 }),
        }),
        EventKind::Reboot(RebootEvent {
            evidence: RebootEvidence::Relaunch(Relaunch {
                qemu: "4242@90210".into(),
                previous: "4100@88000".into(),
            }),
        }),
        EventKind::Bundle(Bundle {
            trigger: incident,
            bundle: "/b/web/x-unresponsive".into(),
            manifest: Some(Box::new(manifest)),
            error: Some("no".into()),
            outcome: Some(BundleOutcome::Failed),
        }),
        EventKind::Recovery(Recovery {
            action: "reset".into(),
            outcome: RecoveryOutcome::Done,
            detail: "QMP system_reset".into(),
        }),
        EventKind::VmAdded(VmAdded {
            dir: "/run/acpimon/web".into(),
            scenarios: vec!["acpi-heartbeat".into()],
        }),
        EventKind::VmRemoved(VmRemoved { dir: "/run/acpimon/web".into() }),
        EventKind::VmInvalid(VmInvalid { dir: "/run/acpimon/web".into(), error: "bad".into() }),
        EventKind::ServiceStarted(ServiceStarted {
            version: "0.1.0".into(),
            state_dir: "/run/acpimon".into(),
            metrics: Some("127.0.0.1:9464".parse().unwrap()),
        }),
        EventKind::EventsLost(EventsLost {
            count: 35,
            first: "2026-01-01T00:00:00.000Z".into(),
            last: "2026-01-01T00:01:00.000Z".into(),
            reason: "disk full".into(),
        }),
        EventKind::KernelReport(KernelReportEvent {
            report: kernel_report(),
            incident: Some("00".repeat(16)),
            bundle: Some("/b/web/x-unresponsive".into()),
            suppressed: 2,
            source: crate::event::ReportSource::Memory,
        }),
        EventKind::BlockIoError(BlockIoError {
            device: "disk0".into(),
            node_name: Some("#block143".into()),
            operation: "write".into(),
            action: "stop".into(),
            nospace: false,
            reason: "Input/output error".into(),
            count: 1,
            first: "2026-01-01T00:00:00.000Z".into(),
            last: "2026-01-01T00:00:00.000Z".into(),
        }),
    ]
}

fn kernel_report() -> crate::sentinel::KernelReport {
    crate::sentinel::KernelReport {
        class: crate::sentinel::ReportClass::SoftLockup,
        cpu: Some(1),
        task: Some("insmod".into()),
        pid: Some(93),
        stuck_s: Some(44),
        location: Some("spin_fn+0x10/0x20 [faults]".into()),
        line: "watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [insmod:93]".into(),
        trace: vec!["RIP: 0010:spin_fn+0x10/0x20 [faults]".into()],
        stamp_us: Some(40_123_456),
    }
}

/// Which variant, by an exhaustive match: a new kind fails to compile here until it has an
/// index, and `examples_cover_every_kind` then asks for its example.
fn ordinal(k: &EventKind) -> usize {
    match k {
        EventKind::AppHealth(_) => 0,
        EventKind::AppInfo(_) => 1,
        EventKind::Transition(_) => 2,
        EventKind::Reboot(_) => 3,
        EventKind::Bundle(_) => 4,
        EventKind::Recovery(_) => 5,
        EventKind::VmAdded(_) => 6,
        EventKind::VmRemoved(_) => 7,
        EventKind::VmInvalid(_) => 8,
        EventKind::ServiceStarted(_) => 9,
        EventKind::EventsLost(_) => 10,
        EventKind::KernelReport(_) => 11,
        EventKind::BlockIoError(_) => 12,
    }
}
const KINDS: usize = 13;

fn event(kind: EventKind) -> Event {
    Event::new(new_key(), "node1", Some("web"), kind)
}

/// The kind's own fields, as serialised.
fn fields(kind: &EventKind) -> BTreeSet<String> {
    let v = serde_json::to_value(event(kind.clone())).unwrap();
    v.as_object().unwrap().keys().filter(|k| !ENVELOPE_FIELDS.contains(&k.as_str())).cloned().collect()
}

/// The README's event table: kind → the field names in its "fields" column.
fn readme_table() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut lines = readme.lines().skip_while(|l| !l.starts_with("| kind | fields |"));
    assert!(lines.next().is_some(), "the README has no '| kind | fields |' table");
    let ticked =
        |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(str::to_string).collect() };
    let mut table = BTreeMap::new();
    for row in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = row.split('|').collect();
        assert!(cells.len() >= 4, "README event row '{row}' has too few cells");
        for kind in ticked(cells[1]) {
            table.insert(kind, ticked(cells[2]).into_iter().collect());
        }
    }
    table
}

#[test]
fn examples_cover_every_kind() {
    let seen: BTreeSet<usize> = examples().iter().map(ordinal).collect();
    assert_eq!(seen, (0..KINDS).collect(), "give every kind an example in examples()");
}

#[test]
fn the_readme_table_lists_every_kind_and_its_fields() {
    let documented = readme_table();
    let actual: BTreeMap<String, BTreeSet<String>> =
        examples().iter().map(|k| (k.name().to_string(), fields(k))).collect();
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>(),
        "README event table kinds differ from EventKind"
    );
    for (kind, fields) in &actual {
        assert_eq!(&documented[kind], fields, "README fields of `{kind}` differ from what it serialises");
    }
}

#[test]
fn names_match_the_tags_and_no_kind_shadows_the_envelope() {
    for k in examples() {
        let v = serde_json::to_value(event(k.clone())).unwrap();
        assert_eq!(v["kind"], k.name());
        for f in fields(&k) {
            assert!(!ENVELOPE_FIELDS.contains(&f.as_str()), "{} has field {f}", k.name());
        }
        // It reads back as it was.
        let e = event(k);
        assert_eq!(serde_json::from_str::<Event>(&serde_json::to_string(&e).unwrap()).unwrap(), e);
    }
}

/// Lines as the service wrote them before events were typed: they must still read.
#[test]
fn old_log_lines_still_read() {
    let env = r#""key":"0123456789abcdef0123456789abcdef","time":"2026-01-01T00:00:00.000Z","node":"n""#;
    let old = [
        r#""vm":"web","kind":"app-health","source":"app-channel","id":null,"audit":null,"status":"failed","details":"x""#,
        r#""vm":"web","kind":"app-health","source":"mailbox","status":"ok","details":"""#,
        r#""vm":"web","kind":"app-info","info":{"type":"info","name":"x"}"#,
        r#""vm":"web","kind":"transition","from":"starting","to":"healthy","reason":"r","evidence":{"cause":"tick","scenarios":[],"paused":false,"panic":null,"app":null}"#,
        r#""vm":"web","kind":"transition","from":"gone","to":"starting","reason":"QEMU is running","evidence":{"qmp_status":"running"},"attached":{"qemu":"10.0.0"}"#,
        r#""vm":"web","kind":"reboot","evidence":{"qmp_event":{"event":"RESET","data":{"guest":true,"reason":"guest-reset"},"timestamp":{"seconds":1,"microseconds":2}}}"#,
        r#""vm":"web","kind":"reboot","evidence":{"region":{"evidence":"timer-went-backwards","guest_ticks":5,"host_ticks":9}}"#,
        r#""vm":"web","kind":"bundle","trigger":{"kind":"panicked","time":"t","reason":"r","evidence":{"event":"GUEST_PANICKED"},"event":"k","bundle":"/b","started":"s"},"bundle":"/b","error":"disk full""#,
        r#""vm":"web","kind":"recovery","action":"reset","outcome":"refused","detail":"rate limit""#,
        r#""vm":"web","kind":"vm-added","dir":"/run/acpimon/web","scenarios":["acpi-heartbeat"]"#,
        r#""vm":"web","kind":"vm-removed","dir":"/run/acpimon/web""#,
        r#""kind":"vm-invalid","vm_dir":"/run/acpimon/web","error":"bad""#,
        r#""kind":"service-started","version":"0.1.0","state_dir":"/run/acpimon","metrics":null"#,
    ];
    for fields in old {
        let line = format!("{{{env},{fields}}}");
        let ev: Event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let raw: RawEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(ev.kind.name(), raw.kind);
        assert_eq!(raw.typed().unwrap(), ev);
    }
    let invalid: Event = serde_json::from_str(&format!("{{{env},{}}}", old[11])).unwrap();
    assert!(
        matches!(invalid.kind, EventKind::VmInvalid(VmInvalid { ref dir, .. }) if dir.to_str() == Some("/run/acpimon/web"))
    );
    // And it is written with the documented name now.
    assert!(serde_json::to_string(&invalid).unwrap().contains(r#""dir":"/run/acpimon/web""#));
}

/// Readers index these fields: they are sent even when empty, as before.
#[test]
fn app_health_always_sends_id_and_audit() {
    let kind = EventKind::AppHealth(AppHealth {
        status: AppStatus::Ok,
        details: String::new(),
        source: AppSource::Mailbox,
        id: None,
        audit: None,
    });
    let v = serde_json::to_value(event(kind)).unwrap();
    assert_eq!((&v["id"], &v["audit"]), (&Value::Null, &Value::Null));
    assert!(v.as_object().unwrap().contains_key("audit"));
}

#[test]
fn validate_refuses_bad_keys_and_hook_env_names_the_kind() {
    let ok = event(EventKind::VmRemoved(VmRemoved { dir: "/d".into() }));
    ok.validate().unwrap();
    let mut bad = ok.clone();
    bad.key = "a/b".into();
    assert!(bad.validate().unwrap_err().to_string().contains("new_key"));
    bad.key = "x".repeat(65);
    assert!(bad.validate().is_err());
    bad.key = String::new();
    assert!(bad.validate().is_err());
    assert_eq!(
        ok.hook_env(),
        vec![
            ("ACPIMON_EVENT_KEY", ok.key.clone()),
            ("ACPIMON_EVENT_KIND", "vm-removed".into()),
            ("ACPIMON_VM", "web".into())
        ]
    );
}

#[test]
fn unknown_kinds_read_as_raw_events_only() {
    let line = r#"{"key":"k1","time":"t","node":"n","kind":"kernel-report","oops":{"line":3}}"#;
    assert!(serde_json::from_str::<Event>(line).is_err());
    let raw: RawEvent = serde_json::from_str(line).unwrap();
    assert_eq!((raw.kind.as_str(), &raw.detail["oops"]), ("kernel-report", &json!({ "line": 3 })));
    assert_eq!(serde_json::to_value(&raw).unwrap(), serde_json::from_str::<Value>(line).unwrap());
}

/// Every shape of transition evidence the service wrote reads back as its own variant.
#[test]
fn old_transition_evidence_reads_as_its_variant() {
    use crate::watch::state::Evidence;
    let probes = r#"{"cause":"tick","scenarios":[{"scenario":"acpi-heartbeat","kind":"acpi-heartbeat","consecutive_misses":3,"threshold":3,"last":{"ok":false,"detail":"no record","latency_ms":null},"unavailable":null}],"paused":false,"panic":null,"app":{"status":"failed","details":"db"}}"#;
    let cases = [
        (probes, "probes"),
        (r#"{"qmp_status":"running"}"#, "qmp_status"),
        (r#"{"qmp_event":{"event":"STOP","timestamp":{"seconds":1,"microseconds":2}}}"#, "qmp_event"),
        (r#"{"region":{"evidence":"boot-count-changed","from":1,"to":2}}"#, "region"),
        (r#"{"attach":"QEMU is not running"}"#, "attach"),
        (r#"{}"#, "closed"),
        (
            r#"{"kernel_report":{"class":"soft-lockup","cpu":1,"line":"watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [x:1]","trace":[]}}"#,
            "kernel",
        ),
        (
            r#"{"event":"GUEST_PANICKED","data":{"action":"pause"},"timestamp":{"seconds":1,"microseconds":2}}"#,
            "panic",
        ),
    ];
    for (json, want) in cases {
        let line = format!(
            r#"{{"key":"k","time":"t","node":"n","vm":"web","kind":"transition","from":"healthy","to":"late","reason":"r","evidence":{json}}}"#
        );
        let ev: Event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let EventKind::Transition(t) = &ev.kind else { panic!("not a transition: {ev:?}") };
        let got = match &t.evidence {
            Evidence::Probes(p) => {
                assert_eq!(p.scenarios[0].consecutive_misses, 3);
                "probes"
            }
            Evidence::QmpStatus { .. } => "qmp_status",
            Evidence::QmpEvent { .. } => "qmp_event",
            Evidence::Region { .. } => "region",
            Evidence::Attach { .. } => "attach",
            Evidence::Closed(_) => "closed",
            Evidence::Kernel { .. } => "kernel",
            Evidence::Panic(_) => "panic",
        };
        assert_eq!(got, want, "{json}");
        // Written again, it is the same JSON.
        let again = serde_json::to_value(&ev).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(&line).unwrap());
    }
}

#[test]
fn a_timeline_entry_is_bounded_and_a_bundle_leaves_its_manifest_out() {
    for kind in examples() {
        let ev = Event::new("00".repeat(16), "n", Some("web"), kind);
        let entry = ev.timeline_entry();
        assert_eq!(entry["kind"], ev.kind.name());
        assert!(entry.get("manifest").is_none(), "{entry}");
        assert!(serde_json::to_vec(&entry).unwrap().len() <= TIMELINE_ENTRY_MAX);
    }
    // A bundle whose manifest's timeline holds earlier events: the next timeline does not
    // grow with it (it doubled with each bundle of a VM before).
    let mut kind = examples().into_iter().find(|k| k.name() == "bundle").unwrap();
    if let EventKind::Bundle(b) = &mut kind {
        let m = b.manifest.as_mut().unwrap();
        m.timeline = vec![json!({ "kind": "transition", "reason": "x".repeat(100_000) })];
    }
    let ev = Event::new("00".repeat(16), "n", Some("web"), kind);
    let entry = ev.timeline_entry();
    assert!(serde_json::to_vec(&entry).unwrap().len() < 4096, "{entry}");
    assert_eq!(entry["bundle"], "/b/web/x-unresponsive");
    // Any other event too large keeps what names it.
    let big = EventKind::AppInfo(AppInfo { info: json!({ "blob": "y".repeat(TIMELINE_ENTRY_MAX) }) });
    let entry = Event::new("00".repeat(16), "n", Some("web"), big).timeline_entry();
    assert_eq!(entry["kind"], "app-info");
    assert!(entry["omitted"].as_str().unwrap().contains("bytes of JSON"), "{entry}");
}
