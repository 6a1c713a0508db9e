use super::*;

#[test]
fn redacts_the_password_only() {
    assert_eq!(redact("postgres://u:secret@h:5/db?x=1"), "postgres://u:***@h:5/db?x=1");
    assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    assert_eq!(redact("postgres:///db?host=/run/x"), "postgres:///db?host=/run/x");
}

#[test]
fn backend_from_options() {
    let dir = Path::new("/s");
    assert!(matches!(Backend::from_options(dir, None), Ok(Backend::Sqlite(p)) if p == dir));
    assert!(matches!(Backend::from_options(dir, Some("postgresql://h/db")), Ok(Backend::Postgres(_))));
    let e = Backend::from_options(dir, Some("mysql://u:pw@h/db")).unwrap_err().to_string();
    assert!(e.contains("mysql://u:***@h/db") && e.contains("postgres://"), "{e}");
}

#[test]
fn columns_from_events() {
    let raw: RawEvent = serde_json::from_value(serde_json::json!({
        "key": "k1", "time": "2026-11-30T01:02:03.456Z", "node": "n", "kind": "newer-kind", "x": 1
    }))
    .unwrap();
    let ev = NewEvent::from_raw(&raw, "{}".into(), 7);
    assert_eq!((ev.time_ms, ev.vm.as_str(), ev.state.as_ref()), (1_796_000_523_456, "", None));
    let bad_time = RawEvent { time: "yesterday".into(), ..raw };
    assert_eq!(NewEvent::from_raw(&bad_time, "{}".into(), 7).time_ms, 7);
}
