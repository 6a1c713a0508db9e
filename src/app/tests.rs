use super::*;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixListener;

#[test]
fn lines_parse_or_are_dropped_for_a_reason() {
    assert_eq!(
        parse(br#"{"v":1,"type":"ack","seq":3,"nonce":"ab"}"#),
        Ok(Message::Ack { nonce: "ab".into() })
    );
    let h = parse(br#"{"v":1,"type":"health","id":"7","status":"degraded","details":"disk","audit":{"name":"df","exit":1,"output":"93%"},"extra":1}"#);
    assert_eq!(
        h,
        Ok(Message::Health(Health {
            id: Some("7".into()),
            status: AppStatus::Degraded,
            details: Some("disk".into()),
            audit: Some(Audit { name: "df".into(), exit: Some(1), output: "93%".into() }),
        }))
    );
    assert_eq!(
        parse(b"{\"v\":1,\"type\":\"ack\",\"nonce\":\"x\"}\r"),
        Ok(Message::Ack { nonce: "x".into() })
    );
    assert_eq!(parse(b"not json"), Err(Drop::Malformed));
    assert_eq!(parse(b"[1,2]"), Err(Drop::Malformed));
    assert_eq!(parse(br#"{"type":"ack","nonce":"x"}"#), Err(Drop::Malformed));
    assert_eq!(parse(br#"{"v":2,"type":"ack","nonce":"x"}"#), Err(Drop::Unsupported));
    assert_eq!(parse(br#"{"v":1,"type":"dance"}"#), Err(Drop::UnknownType));
    assert_eq!(parse(br#"{"v":1,"type":"health","status":"fine"}"#), Err(Drop::Malformed));
    assert_eq!(parse(b"\xff\xfe"), Err(Drop::Malformed));
    let long = format!(r#"{{"v":1,"type":"health","status":"ok","details":"{}"}}"#, "é".repeat(2000));
    match parse(long.as_bytes()) {
        Ok(Message::Health(h)) => assert!(h.details.unwrap().len() <= MAX_TEXT),
        other => panic!("{other:?}"),
    }
    let esc = parse(br#"{"v":1,"type":"health","status":"ok","details":"a\u001b[2Jb"}"#);
    assert!(matches!(esc, Ok(Message::Health(Health { details: Some(d), .. })) if d == "a^[[2Jb"));
}

/// A fake app on the guest side of `path`: answers challenges and health requests (after
/// `garbage` junk lines).
async fn fake_app(listener: UnixListener, garbage: usize, answer: bool) {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut junk = Vec::new();
    for i in 0..garbage {
        match i % 4 {
            0 => junk.extend_from_slice(&vec![b'x'; 10 << 10]),
            1 => junk.extend_from_slice(b"\x00\x01\xff binary"),
            2 => junk.extend_from_slice(br#"{"v":9,"type":"ack","nonce":"0"}"#),
            _ => junk.extend_from_slice(b"{not json"),
        }
        junk.push(b'\n');
    }
    write.write_all(&junk).await.unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        if !answer {
            continue;
        }
        let v: Value = serde_json::from_str(&line).unwrap();
        let reply = match v["type"].as_str() {
            Some("challenge") => json!({"v":1,"type":"ack","seq":v["seq"],"nonce":v["nonce"]}),
            Some("health") => json!({"v":1,"type":"health","id":v["id"],"status":"ok",
                "audit":{"name":v["audit"],"exit":0,"output":"fine"}}),
            _ => continue,
        };
        write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
    }
}

#[tokio::test]
async fn challenges_and_health_requests_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(fake_app(listener, 0, true));
    let (tx, mut rx) = mpsc::channel(16);
    let ch = AppChannel::connect(&path, tx).await.unwrap();
    for _ in 0..5 {
        ch.challenge(Duration::from_secs(2)).await.unwrap();
    }
    let h = ch.health(Some("disk"), Duration::from_secs(2)).await.unwrap();
    assert_eq!(h.status, AppStatus::Ok);
    assert_eq!(h.audit.unwrap(), Audit { name: "disk".into(), exit: Some(0), output: "fine".into() });
    assert!(matches!(rx.recv().await, Some(Report::Health(_))));
    assert_eq!(ch.counts(), LineCounts { accepted: 6, ..LineCounts::default() });
}

#[tokio::test]
async fn a_flood_of_garbage_is_counted_and_the_channel_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(fake_app(listener, 400, true));
    let (tx, _rx) = mpsc::channel(16);
    let ch = AppChannel::connect(&path, tx).await.unwrap();
    // The burst allowance is spent on junk; answers come once the bucket refills.
    let mut answered = false;
    for _ in 0..10 {
        if ch.challenge(Duration::from_millis(500)).await.is_ok() {
            answered = true;
            break;
        }
    }
    assert!(answered, "{:?}", ch.counts());
    let c = ch.counts();
    assert_eq!(c.oversized, 100, "{c:?}");
    assert!(c.dropped() >= 400, "every junk line dropped: {c:?}");
    assert!(c.rate_limited > 0 && c.malformed > 0 && c.unsupported > 0, "{c:?}");
}

#[tokio::test]
async fn a_silent_app_is_a_timeout_and_a_closed_port_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let app = tokio::spawn(fake_app(listener, 0, false));
    let (tx, _rx) = mpsc::channel(16);
    let ch = AppChannel::connect(&path, tx).await.unwrap();
    let e = ch.challenge(Duration::from_millis(200)).await.unwrap_err();
    assert!(e.starts_with("no ack to challenge"), "{e}");
    app.abort();
    let _ = app.await;
    let e = ch.challenge(Duration::from_secs(2)).await.unwrap_err();
    assert!(e.contains("closed") || e.contains("cannot write"), "{e}");
}

/// A fake qemu-ga: stale output first, then answers sync (after 0xFF), ping and osinfo.
async fn fake_agent(listener: UnixListener) {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(b"{\"return\": \"stale\"}\n").await.unwrap();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let v: Value = serde_json::from_str(&line).unwrap();
        let reply = match v["execute"].as_str().unwrap() {
            "guest-sync-delimited" => {
                write.write_all(&[0xff]).await.unwrap();
                json!({"return": v["arguments"]["id"]})
            }
            "guest-ping" => json!({"return": {}}),
            "guest-get-osinfo" => json!({"return": {"id": "debian", "kernel-release": "6.1.0"}}),
            "guest-get-host-name" => json!({"return": {"host-name": "guest"}}),
            "guest-info" => json!({"return": {"version": "7.2.0", "supported_commands": []}}),
            _ => json!({"error": {"class": "CommandNotFound", "desc": "no"}}),
        };
        write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
    }
}

#[tokio::test]
async fn the_guest_agent_pings_and_describes_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent = tokio::spawn(async move {
        fake_agent(listener).await;
    });
    qga::ping(&path, Duration::from_secs(2)).await.unwrap();
    agent.await.unwrap();
    let listener = UnixListener::bind(dir.path().join("b.sock")).unwrap();
    tokio::spawn(fake_agent(listener));
    let d = qga::describe(&dir.path().join("b.sock"), Duration::from_secs(2)).await.unwrap();
    assert_eq!(d["osinfo"]["kernel-release"], "6.1.0");
    assert_eq!(d["host_name"], "guest");
    assert_eq!(d["agent_version"], "7.2.0");
    let e = qga::ping(&dir.path().join("none.sock"), Duration::from_secs(1)).await.unwrap_err();
    assert!(e.starts_with("cannot connect to the guest agent's socket"), "{e}");
}
