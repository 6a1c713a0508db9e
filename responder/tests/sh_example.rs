//! `docs/examples/responder.sh` with `PORT=-`, under every POSIX shell found here: `sh`,
//! `dash`, `busybox sh` (the guest's ash) and `bash`. A shell that is not installed is
//! skipped with a note; at least one must be.

mod common;

use std::process::Command;
use std::time::Duration;

use acpimon_responder::json::Value;
use common::{audit_field, junk, kind, repo, scratch, str_field, Responder};

const T: Duration = Duration::from_secs(20);

/// The shells to test with, as argv prefixes.
fn shells() -> Vec<Vec<&'static str>> {
    let candidates: [&[&str]; 4] = [&["sh"], &["dash"], &["busybox", "sh"], &["bash", "--posix"]];
    let mut found = Vec::new();
    for c in candidates {
        let ok = Command::new(c[0]).args(&c[1..]).args(["-c", "exit 0"]).status().is_ok_and(|s| s.success());
        if ok {
            found.push(c.to_vec());
        } else {
            eprintln!("note: {} not found; not tested with it", c.join(" "));
        }
    }
    assert!(!found.is_empty(), "no POSIX shell found");
    found
}

fn start(shell: &[&str], envs: &[(&str, &str)]) -> Responder {
    let mut cmd = Command::new(shell[0]);
    cmd.args(&shell[1..]).arg(repo().join("docs/examples/responder.sh")).env("PORT", "-");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Responder::start(cmd)
}

#[test]
fn answers_challenges_health_and_audits() {
    for sh in shells() {
        let dir = scratch(&format!("sh-{}", sh.join("-")));
        let status = dir.join("status");
        let mut r = start(&sh, &[("STATUS_FILE", status.to_str().unwrap()), ("APP", "web")]);
        let ctx = sh.join(" ");

        r.send_line(r#"{"v":1,"type":"hello","host":"acpimon","version":"0.1.0"}"#);
        let hello = r.recv(T);
        assert_eq!((kind(&hello), str_field(&hello, "app")), ("hello", Some("web")), "{ctx}");

        r.send_line(r#"{"v":1,"type":"challenge","seq":42,"nonce":"9f1c2a7e5b3d8c01"}"#);
        let ack = r.recv(T);
        assert_eq!(kind(&ack), "ack", "{ctx}");
        assert_eq!(ack.get("seq").and_then(Value::as_u64), Some(42), "{ctx}");
        assert_eq!(str_field(&ack, "nonce"), Some("9f1c2a7e5b3d8c01"), "{ctx}");

        // Spaces after the colons, CR LF.
        r.send(b"{\"v\": 1, \"type\": \"challenge\", \"nonce\": \"ab12\"}\r\n");
        let ack = r.recv(T);
        assert_eq!(
            (kind(&ack), str_field(&ack, "nonce"), ack.get("seq")),
            ("ack", Some("ab12"), None),
            "{ctx}"
        );

        r.send_line(r#"{"v":1,"type":"health","id":"00000001","audit":null}"#);
        let h = r.recv(T);
        assert_eq!((str_field(&h, "id"), str_field(&h, "status")), (Some("00000001"), Some("ok")), "{ctx}");
        assert_eq!(h.get("details"), None, "{ctx}");

        std::fs::write(&status, "degraded disk \"93%\" full\\\n").unwrap();
        r.send_line(r#"{"v":1,"type":"health","id":7}"#);
        let h = r.recv(T);
        assert_eq!(h.get("id").and_then(Value::as_u64), Some(7), "{ctx}");
        assert_eq!(str_field(&h, "status"), Some("degraded"), "{ctx}");
        assert_eq!(str_field(&h, "details"), Some("disk \"93%\" full\\"), "{ctx}");
        std::fs::write(&status, "ok\n").unwrap();

        r.send_line(r#"{"v":1,"type":"health","id":"c0ffee01","audit":"uptime"}"#);
        let h = r.recv(T);
        assert_eq!((str_field(&h, "id"), str_field(&h, "status")), (Some("c0ffee01"), Some("ok")), "{ctx}");
        assert_eq!(audit_field(&h, "exit"), Some(&Value::Number("0".into())), "{ctx}");
        assert!(!audit_field(&h, "output").and_then(Value::as_str).unwrap().is_empty(), "{ctx}");

        r.send_line(r#"{"v":1,"type":"health","id":"c0ffee02","audit":"fail"}"#);
        let h = r.recv(T);
        assert_eq!(str_field(&h, "status"), Some("degraded"), "{ctx}");
        assert_eq!(str_field(&h, "details"), Some("audit fail failed (exit 1)"), "{ctx}");
        assert_eq!(
            audit_field(&h, "output").and_then(Value::as_str),
            Some("this audit always fails"),
            "{ctx}"
        );

        r.send_line(r#"{"v":1,"type":"health","id":"c0ffee03","audit":"nope"}"#);
        let h = r.recv(T);
        assert_eq!(
            (str_field(&h, "status"), str_field(&h, "details")),
            (Some("degraded"), Some("unknown audit"))
        );
        assert_eq!(audit_field(&h, "exit"), Some(&Value::Number("127".into())), "{ctx}");

        assert!(r.finish().is_empty(), "{ctx}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn ignores_junk() {
    for sh in shells() {
        let ctx = sh.join(" ");
        let mut r = start(&sh, &[]);
        for line in junk() {
            r.send(&line);
        }
        // Values it cannot echo safely: no answer rather than a wrong one.
        r.send_line(r#"{"v":1,"type":"challenge","nonce":"a\"b"}"#);
        r.send_line(r#"{"v":1,"type":"health","id":"x y"}"#);
        r.send_line(r#"{"v":1,"type":"challenge","seq":3,"nonce":"0123456789abcdef"}"#);
        let ack = r.recv(T);
        assert_eq!(
            (kind(&ack), str_field(&ack, "nonce")),
            ("ack", Some("0123456789abcdef")),
            "{ctx}: {ack:?}"
        );
        let rest = r.finish();
        assert!(rest.is_empty(), "{ctx}: {rest:?}");
    }
}

#[test]
fn a_long_audit_output_is_bounded_and_escaped() {
    // The audit table is the script's own; a copy with a noisy audit tests the escaping.
    let dir = scratch("sh-noisy");
    let script = std::fs::read_to_string(repo().join("docs/examples/responder.sh")).unwrap();
    let noisy = script.replacen(
        "    uptime) cat /proc/uptime ;;",
        "    uptime) cat /proc/uptime ;;\n    noisy) i=0; while [ $i -lt 300 ]; do printf 'l\"i\\\\ne\\t\\001%s\\n' $i; i=$((i+1)); done; printf '\\303\\251' ;;",
        1,
    );
    assert_ne!(noisy, script, "the audit table moved; update this test");
    let noisy = noisy.replacen("AUDITS=\"disk uptime fail\"", "AUDITS=\"disk uptime fail noisy\"", 1);
    let path = dir.join("responder.sh");
    std::fs::write(&path, noisy).unwrap();
    for sh in shells() {
        let mut cmd = Command::new(sh[0]);
        cmd.args(&sh[1..]).arg(&path).env("PORT", "-");
        let mut r = Responder::start(cmd);
        r.send_line(r#"{"v":1,"type":"health","id":"n","audit":"noisy"}"#);
        let h = r.recv(T);
        let out = audit_field(&h, "output").and_then(Value::as_str).unwrap();
        assert!(out.starts_with("l\"i\\ne 0\nl\"i\\ne 1\n"), "{}: {out:?}", sh.join(" "));
        assert!(out.len() <= 1024, "{}", out.len());
        assert!(out.is_ascii());
        r.finish();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
