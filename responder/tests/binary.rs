//! `acpimon-responder --port -`: the whole protocol loop over a pipe pair.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use acpimon_responder::json::Value;
use common::{audit_field, junk, kind, scratch, str_field, Responder};

const T: Duration = Duration::from_secs(10);

fn responder(args: &[&str]) -> Responder {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_acpimon-responder"));
    cmd.args(["--port", "-"]).args(args);
    Responder::start(cmd)
}

/// hello, then health: what the responder says when a host connects.
fn greeting(r: &Responder) -> Value {
    let hello = r.recv(T);
    assert_eq!(kind(&hello), "hello");
    assert_eq!(str_field(&hello, "app"), Some("acpimon-responder"));
    assert_eq!(str_field(&hello, "version"), Some(env!("CARGO_PKG_VERSION")));
    let health = r.recv(T);
    assert_eq!(kind(&health), "health");
    assert_eq!(health.get("id"), None);
    health
}

#[test]
fn answers_the_documented_session() {
    let dir = scratch("session");
    let status = dir.join("status");
    let mut r = responder(&[
        "--status-file",
        status.to_str().unwrap(),
        "--audit",
        "disk=df /",
        "--audit",
        "fail=false",
    ]);
    assert_eq!(str_field(&greeting(&r), "status"), Some("ok"));
    r.send_line(r#"{"v":1,"type":"hello","host":"acpimon","version":"0.1.0"}"#);
    r.send_line(r#"{"v":1,"type":"challenge","seq":1,"nonce":"5c0e6f29a1d7b843"}"#);
    let ack = r.recv(T);
    assert_eq!(kind(&ack), "ack");
    assert_eq!(ack.get("seq").and_then(Value::as_u64), Some(1));
    assert_eq!(str_field(&ack, "nonce"), Some("5c0e6f29a1d7b843"));

    r.send_line(r#"{"v":1,"type":"health","id":"00000001","audit":null}"#);
    let h = r.recv(T);
    assert_eq!(
        (kind(&h), str_field(&h, "id"), str_field(&h, "status")),
        ("health", Some("00000001"), Some("ok"))
    );
    assert_eq!(h.get("audit"), None);

    r.send_line(r#"{"v":1,"type":"health","id":"c0ffee01","audit":"disk"}"#);
    let h = r.recv(T);
    assert_eq!(str_field(&h, "id"), Some("c0ffee01"));
    assert_eq!(str_field(&h, "status"), Some("ok"));
    assert_eq!(audit_field(&h, "name").and_then(Value::as_str), Some("disk"));
    assert_eq!(audit_field(&h, "exit"), Some(&Value::Number("0".into())));
    assert!(audit_field(&h, "output").and_then(Value::as_str).unwrap().contains("Filesystem"), "{h:?}");

    r.send_line(r#"{"v":1,"type":"health","id":"c0ffee02","audit":"fail"}"#);
    let h = r.recv(T);
    assert_eq!(str_field(&h, "status"), Some("degraded"), "a failed audit degrades: {h:?}");
    assert_eq!(str_field(&h, "details"), Some("audit fail failed (exit 1)"));
    assert_eq!(audit_field(&h, "exit"), Some(&Value::Number("1".into())));

    r.send_line(r#"{"v":1,"type":"health","id":"c0ffee03","audit":"nope"}"#);
    let h = r.recv(T);
    assert_eq!(
        (str_field(&h, "status"), str_field(&h, "details")),
        (Some("degraded"), Some("unknown audit"))
    );
    assert_eq!(audit_field(&h, "exit"), Some(&Value::Number("127".into())));

    std::fs::write(&status, "failed db down\n").unwrap();
    r.send_line(r#"{"v":1,"type":"health","id":"c0ffee04"}"#);
    // The answer, and the status poll's own report of the change (no id), in either order.
    let (a, b) = (r.recv(T), r.recv(T));
    let (answer, own) = if a.get("id").is_some() { (a, b) } else { (b, a) };
    assert_eq!(str_field(&answer, "id"), Some("c0ffee04"));
    for h in [&answer, &own] {
        assert_eq!((str_field(h, "status"), str_field(h, "details")), (Some("failed"), Some("db down")));
    }
    assert_eq!((kind(&own), own.get("id")), ("health", None));
    assert!(r.finish().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reports_status_changes_on_its_own() {
    let dir = scratch("changes");
    let status = dir.join("status");
    let r = responder(&["--status-file", status.to_str().unwrap()]);
    greeting(&r);
    r.quiet(Duration::from_millis(1500));
    std::fs::write(&status, "degraded disk nearly full\n").unwrap();
    let t = Instant::now();
    let h = r.recv(Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_millis(2500), "{:?}", t.elapsed());
    assert_eq!(
        (str_field(&h, "status"), str_field(&h, "details")),
        (Some("degraded"), Some("disk nearly full"))
    );
    r.quiet(Duration::from_millis(1500));
    std::fs::remove_file(&status).unwrap();
    let h = r.recv(Duration::from_secs(5));
    assert_eq!((str_field(&h, "status"), h.get("details")), (Some("ok"), None));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ignores_junk_and_keeps_answering() {
    let mut r = responder(&[]);
    greeting(&r);
    for line in junk() {
        r.send(&line);
    }
    r.send_line(r#"{"v":1,"type":"challenge","seq":9,"nonce":"0123456789abcdef"}"#);
    let ack = r.recv(T);
    assert_eq!((kind(&ack), str_field(&ack, "nonce")), ("ack", Some("0123456789abcdef")), "{ack:?}");
    // A line split across writes, with CR LF.
    r.send(br#"{"v":1,"type":"chall"#);
    std::thread::sleep(Duration::from_millis(100));
    r.send(b"enge\",\"nonce\":\"ff\"}\r\n");
    assert_eq!(str_field(&r.recv(T), "nonce"), Some("ff"));
    assert!(r.finish().is_empty(), "nothing but the two acks");
}

#[test]
fn a_slow_audit_does_not_delay_acks() {
    let mut r =
        responder(&["--audit", "slow=sleep 30", "--audit-timeout", "1500ms", "--audit", "nap=sleep 0.5"]);
    greeting(&r);
    let t = Instant::now();
    r.send_line(r#"{"v":1,"type":"health","id":"a1","audit":"slow"}"#);
    r.send_line(r#"{"v":1,"type":"health","id":"a2","audit":"nap"}"#);
    r.send_line(r#"{"v":1,"type":"challenge","seq":2,"nonce":"aa"}"#);
    let ack = r.recv(T);
    assert_eq!(kind(&ack), "ack");
    assert!(t.elapsed() < Duration::from_millis(400), "ack after {:?}", t.elapsed());
    let first = r.recv(T);
    assert_eq!((str_field(&first, "id"), str_field(&first, "status")), (Some("a2"), Some("ok")));
    let second = r.recv(T);
    assert_eq!(str_field(&second, "id"), Some("a1"));
    assert_eq!(audit_field(&second, "exit"), Some(&Value::Number("124".into())));
    assert_eq!(str_field(&second, "details"), Some("audit slow timed out"));
    assert!(t.elapsed() < Duration::from_secs(5), "killed at the timeout: {:?}", t.elapsed());
    r.finish();
}

#[test]
fn waits_for_running_audits_at_eof() {
    let mut r = responder(&["--audit", "nap=sleep 1"]);
    greeting(&r);
    r.send_line(r#"{"v":1,"type":"health","id":"z","audit":"nap"}"#);
    let rest = r.finish();
    assert_eq!(rest.len(), 1);
    assert_eq!(str_field(&rest[0], "id"), Some("z"));
}

#[test]
fn garbage_mode_writes_garbage_first() {
    let mut r = responder(&["--garbage", "20"]);
    r.send_line(r#"{"v":1,"type":"challenge","seq":1,"nonce":"aa"}"#);
    let mut kinds = [0usize; 8];
    for i in 0..20 {
        let line = r.raw(T).unwrap();
        assert_eq!(line, acpimon_responder::proto::garbage(i), "line {i}");
        assert!(acpimon_responder::proto::parse_request(&line[..line.len() - 1]).is_err() || i % 8 == 7);
        kinds[(i % 8) as usize] += 1;
    }
    assert!(kinds.iter().all(|&k| k >= 2));
    greeting(&r);
    assert_eq!(str_field(&r.recv(T), "nonce"), Some("aa"), "then it answers");
    r.finish();
}

#[test]
fn usage_errors_exit_2() {
    for args in [&["--bogus"][..], &["--audit", "x"], &["--beat-ms", "1"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_acpimon-responder")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("acpimon-responder: "));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_acpimon-responder")).arg("--help").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--mailbox-only"));
}

#[test]
fn mailbox_only_beats_a_region_file() {
    // A region file stands in for the ivshmem BAR (the same mmap path as resource2).
    let dir = scratch("mailbox");
    let mut region = vec![0u8; 4096];
    region[..4].copy_from_slice(b"AMON");
    std::fs::write(dir.join("resource2"), &region).unwrap();
    std::fs::write(dir.join("status"), "degraded almost full").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_acpimon-responder"))
        .args(["--mailbox-only", "--mailbox", dir.to_str().unwrap(), "--beat-ms", "50"])
        .args(["--status-file", dir.join("status").to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let u32_at = |b: &[u8], off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
    let t = Instant::now();
    let mut beats = 0;
    while t.elapsed() < Duration::from_secs(10) && beats < 5 {
        std::thread::sleep(Duration::from_millis(100));
        beats = u32_at(&std::fs::read(dir.join("resource2")).unwrap(), 0x10c);
    }
    let _ = child.kill();
    let _ = child.wait();
    let b = std::fs::read(dir.join("resource2")).unwrap();
    assert!(beats >= 5, "beats {beats}");
    assert_eq!(&b[0x100..0x104], b"APPM");
    assert_eq!(u32_at(&b, 0x108) % 2, 0);
    assert_eq!(u32_at(&b, 0x110), 2, "degraded");
    assert_eq!(u32_at(&b, 0x114), child.id());
    assert_eq!(u32_at(&b, 0x11c), 50);
    assert_eq!(&b[0x120..0x12c], b"almost full\0");
    std::fs::remove_dir_all(&dir).unwrap();
}
