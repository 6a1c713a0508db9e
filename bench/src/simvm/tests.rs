//! The wire protocol exactly as QEMU speaks it, over a raw socket (the repo's client always
//! negotiates first, so it cannot see these cases).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::machine::{bar_for, event_line};
use super::*;

struct Raw {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Raw {
    async fn connect(path: &Path) -> Raw {
        let (read, write) = UnixStream::connect(path).await.unwrap().into_split();
        Raw { lines: BufReader::new(read).lines(), write }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
            .await
            .expect("a line within 5 s")
            .unwrap()
            .expect("the connection is open")
    }

    async fn json(&mut self) -> Value {
        serde_json::from_str(&self.line().await).unwrap()
    }

    async fn send(&mut self, text: &str) -> Value {
        self.write.write_all(format!("{text}\n").as_bytes()).await.unwrap();
        self.json().await
    }
}

async fn started(latency: Duration) -> (tempfile::TempDir, SimVm) {
    let dir = tempfile::tempdir().unwrap();
    let p = prepare(dir.path(), "vm", &SsdtConfig::default()).unwrap();
    let vm = SimVm::start(SimVmOptions { dir: p.dir, latency }).await.unwrap();
    (dir, vm)
}

#[tokio::test]
async fn qmp_speaks_like_qemu() {
    let (_dir, vm) = started(Duration::ZERO).await;
    let mut c = Raw::connect(&vm.descriptor().qmp).await;
    assert_eq!(
        c.line().await,
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#
    );
    assert_eq!(
        c.send(r#"{"execute": "query-status", "id": "a"}"#).await,
        json!({"id": "a", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
    );
    // No events before negotiation.
    vm.set_state(SimState::Paused);
    vm.set_state(SimState::Running);
    assert_eq!(c.send(r#"{"execute": "qmp_capabilities"}"#).await, json!({"return": {}}));
    assert_eq!(
        c.send(r#"{"execute": "qmp_capabilities", "id": 1}"#).await["error"]["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );
    assert_eq!(
        c.send(r#"{"execute": "nope", "id": [7]}"#).await,
        json!({"id": [7], "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})
    );
    assert_eq!(c.send("not json").await["error"]["class"], "GenericError");
    assert_eq!(c.send("[1]").await["error"]["desc"], "QMP input must be a JSON object");
    assert_eq!(
        c.send(r#"{"execute": "human-monitor-command", "id": 2}"#).await["error"]["desc"],
        "Parameter 'command-line' is missing"
    );
    // `stop` emits STOP (no data member) before its reply; a second stop emits nothing.
    let stop = c.send(r#"{"execute": "stop", "id": 3}"#).await;
    assert_eq!(stop["event"], "STOP");
    assert!(stop.get("data").is_none() && stop["timestamp"]["seconds"].as_u64().unwrap() > 0, "{stop}");
    assert_eq!(c.json().await, json!({"return": {}, "id": 3}));
    assert_eq!(c.send(r#"{"execute": "stop", "id": 4}"#).await, json!({"return": {}, "id": 4}));
    assert_eq!(
        c.send(r#"{"execute": "query-status"}"#).await["return"],
        json!({"status": "paused", "running": false})
    );
    assert_eq!(c.send(r#"{"execute": "cont"}"#).await["event"], "RESUME");
    assert_eq!(c.json().await, json!({"return": {}}));
    // HMP output uses HMP's line ends; the testdev register round-trips.
    let hmp = |line: &str| {
        format!(r#"{{"execute": "human-monitor-command", "arguments": {{"command-line": "{line}"}}}}"#)
    };
    assert_eq!(c.send(&hmp("o /w 0xe0 0x2a")).await["return"], "");
    assert_eq!(c.send(&hmp("i /w 0xe0")).await["return"], "portl[0x00e0] = 0x0000002a\r\n");
    assert_eq!(c.send(&hmp("info status")).await["return"], "VM status: running\r\n");
    assert_eq!(c.send(&hmp("no such thing")).await["return"], "");
    // quit: the reply, SHUTDOWN, then the end of the stream.
    assert_eq!(c.send(r#"{"execute": "quit"}"#).await, json!({"return": {}}));
    let shutdown = c.json().await;
    assert_eq!(
        (shutdown["event"].as_str(), &shutdown["data"]["reason"]),
        (Some("SHUTDOWN"), &json!("host-qmp-quit"))
    );
    let end = tokio::time::timeout(Duration::from_secs(5), c.lines.next_line()).await.unwrap().unwrap();
    assert_eq!(end, None);
    assert_eq!(vm.state(), SimState::Gone);
    assert!(!vm.descriptor().qmp.exists() && !vm.descriptor().console.exists());
}

#[tokio::test]
async fn the_irq_is_level_triggered_and_waits_for_a_running_guest() {
    let (_dir, vm) = started(Duration::from_millis(30)).await;
    let region = Region::open(&vm.descriptor().region, Access::ReadWrite).unwrap();
    let seq = |r: &Region| r.snapshot().unwrap().record.unwrap();
    let boot = seq(&region);
    assert_eq!((boot.source, boot.boot_count, boot.bar), (acpimon::abi::Source::Boot, 1, 0xfebf_f000));
    let port = acpimon::trigger::irq_line_command(vm.descriptor().irq, 1);
    let mut c = Raw::connect(&vm.descriptor().qmp).await;
    c.line().await;
    c.send(r#"{"execute": "qmp_capabilities"}"#).await;
    c.send(r#"{"execute": "stop"}"#).await;
    c.json().await;
    let raise =
        format!(r#"{{"execute": "human-monitor-command", "arguments": {{"command-line": "{port}"}}}}"#);
    // Twice while paused: one line, one event, after `cont` and the latency.
    c.send(&raise).await;
    c.send(&raise).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(seq(&region).seq, boot.seq, "no record while paused");
    c.send(r#"{"execute": "cont"}"#).await;
    c.json().await;
    assert_eq!(seq(&region).seq, boot.seq, "the latency applies");
    tokio::time::sleep(Duration::from_millis(80)).await;
    let ged = seq(&region);
    assert_eq!((ged.seq, ged.ged_count, ged.source), (boot.seq + 2, 1, acpimon::abi::Source::Ged));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(seq(&region).seq, ged.seq, "one event for two raises");
    assert_eq!(vm.triggers(), 2);
    // Raised then lowered before the guest ran `_EVT`: no event.
    c.send(&raise).await;
    c.send(&raise.replace(" 1\"", " 0\"")).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(seq(&region).seq, ged.seq);
    vm.stop().await;
}

#[tokio::test]
async fn gone_removes_only_its_own_sockets() {
    let (_dir, vm) = started(Duration::ZERO).await;
    let qmp = vm.descriptor().qmp.clone();
    // Another process took the path over (as a restarted QEMU would).
    std::fs::remove_file(&qmp).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&qmp).unwrap();
    vm.stop().await;
    assert!(qmp.exists(), "the other listener's socket stays");
    drop(other);
}

#[test]
fn shapes() {
    assert_eq!(bar_for(4096), 0xfebf_f000);
    assert_eq!(bar_for(64 << 20), 0xf800_0000);
    assert_eq!(bar_for(1 << 20) % (1 << 20), 0);
    let t = UNIX_EPOCH + Duration::new(5, 6000);
    assert_eq!(
        serde_json::from_str::<Value>(&event_line("STOP", None, t)).unwrap(),
        json!({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}})
    );
    let e: Value =
        serde_json::from_str(&event_line("RESET", Some(json!({"guest": true})), SystemTime::now())).unwrap();
    assert_eq!(e["data"]["guest"], true);
    assert_eq!(fleet_name(7), "sim-0007");
}

#[tokio::test]
async fn the_thermal_zone_writes_records_while_the_guest_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SsdtConfig { thermal_period_ds: Some(1), ..SsdtConfig::default() };
    let p = prepare(dir.path(), "vm", &cfg).unwrap();
    let vm = SimVm::start(SimVmOptions::new(&p.dir)).await.unwrap();
    let region = Region::open(&p.descriptor.region, Access::ReadOnly).unwrap();
    let record = || region.snapshot().unwrap().record.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = record();
    assert_eq!(r.source, acpimon::abi::Source::Thermal);
    assert!((2..=4).contains(&r.thermal_count), "{} polls in 350 ms at 100 ms", r.thermal_count);
    vm.set_state(SimState::Hung);
    let hung = record();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(record().seq, hung.seq, "a hung guest does not poll");
    vm.stop().await;
}
