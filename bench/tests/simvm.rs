//! The simulated VM against acpimon's own client side: the QMP client (`trigger::qmp`), the
//! heartbeat, the channel report, the console and the region reader, as the watch service
//! uses them. Fast: no QEMU.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acpimon::abi::Source;
use acpimon::console::Console;
use acpimon::generate::SsdtConfig;
use acpimon::launch::channel::{self, Channel};
use acpimon::launch::prepare;
use acpimon::read::{Access, GuestRecord, Region};
use acpimon::trigger::qmp::{EventKind, Qmp, QmpError, QmpEvent};
use acpimon::trigger::{Beat, Completion, Heartbeat, Via};
use acpimon_bench::simvm::{spawn_fleet, PanicAction, SimState, SimVm, SimVmOptions};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(2);
/// Long enough for a simulated guest answering at once; short enough for a fast miss.
const BEAT_TIMEOUT: Duration = Duration::from_millis(150);

struct Sim {
    _dir: tempfile::TempDir,
    vm: SimVm,
    qmp: Qmp,
    region: Arc<Region>,
    hb: Heartbeat,
}

async fn sim() -> Sim {
    let dir = tempfile::tempdir().unwrap();
    let p = prepare(dir.path(), "vm", &SsdtConfig::default()).unwrap();
    let vm = SimVm::start(SimVmOptions::new(&p.dir)).await.unwrap();
    let qmp = Qmp::connect(&p.descriptor.qmp, WAIT).await.unwrap();
    let region = Arc::new(Region::open(&p.descriptor.region, Access::ReadWrite).unwrap());
    let hb = Heartbeat::new(region.clone(), p.descriptor.irq).unwrap();
    Sim { _dir: dir, vm, qmp, region, hb }
}

impl Sim {
    async fn beat(&mut self) -> Beat {
        self.hb.beat(&self.qmp, BEAT_TIMEOUT).await.unwrap()
    }

    fn record(&self) -> GuestRecord {
        self.region.snapshot().unwrap().record.expect("a record")
    }

    async fn status(&self) -> (String, bool) {
        let s = self.qmp.execute(qapi::qmp::query_status {}).await.unwrap();
        (serde_json::to_value(s.status).unwrap().as_str().unwrap().to_string(), s.running)
    }
}

/// The next event named `name`, skipping others.
async fn event(rx: &mut broadcast::Receiver<QmpEvent>, name: &str) -> QmpEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.name == name {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event within {WAIT:?}"))
}

fn acked(beat: &Beat) -> GuestRecord {
    match beat {
        Beat::Acked { record, .. } => *record,
        Beat::Missed { .. } => panic!("expected an acknowledged beat, got {beat:?}"),
    }
}

fn missed(beat: &Beat) -> bool {
    matches!(beat, Beat::Missed { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_heartbeats_are_acknowledged_with_their_records() {
    let mut s = sim().await;
    assert_eq!(s.qmp.version, (10, 0, 2));
    let boot = s.record();
    assert_eq!((boot.source, boot.boot_count, boot.ged_count, boot.bar), (Source::Boot, 1, 0, s.vm.bar()));
    for i in 1..=100u32 {
        let beat = s.beat().await;
        let r = acked(&beat);
        assert_eq!(r.echo_request_no, beat.request_no());
        assert_eq!((r.source, r.ged_count, r.boot_count, r.seq), (Source::Ged, i, 1, boot.seq + 2 * i));
        assert_eq!(r.bar, 0xfebf_f000);
        // The reader decodes exactly what the beat saw, with nothing odd in the region.
        let snap = s.region.snapshot().unwrap();
        assert_eq!(snap.record, Some(r));
        assert!(snap.anomalies.is_empty(), "{:?}", snap.anomalies);
    }
    assert_eq!(s.vm.triggers(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_complete_through_the_doorbell_and_without_it_by_polling() {
    let dir = tempfile::tempdir().unwrap();
    let latency = Duration::from_millis(5);
    for (name, doorbell_port) in [("rung", Some(0x403)), ("polled", None)] {
        let cfg = SsdtConfig { doorbell_port, ..SsdtConfig::default() };
        let p = prepare(dir.path(), name, &cfg).unwrap();
        let vm = SimVm::start(SimVmOptions { latency, ..SimVmOptions::new(&p.dir) }).await.unwrap();
        let qmp = Qmp::connect(&p.descriptor.qmp, WAIT).await.unwrap();
        let region = Arc::new(Region::open(&p.descriptor.region, Access::ReadWrite).unwrap());
        let socket = p.descriptor.doorbell.as_ref().map(|b| b.socket.as_path());
        let completion = Completion::connect(socket).await;
        let mut hb = Heartbeat::new(region, p.descriptor.irq).unwrap().with_completion(completion);
        let want = if doorbell_port.is_some() { Via::Doorbell } else { Via::Poll };
        assert_eq!(hb.completion().starts_with("doorbell ("), doorbell_port.is_some(), "{}", hb.completion());
        for _ in 0..20 {
            match hb.beat(&qmp, Duration::from_secs(1)).await.unwrap() {
                Beat::Acked { latency: l, via, .. } => {
                    assert_eq!(via, want, "{name}");
                    assert!(l >= latency && l < Duration::from_millis(500), "{name}: {l:?}");
                }
                beat => panic!("{name}: {beat:?}"),
            }
        }
        // A hung guest: the beat misses, doorbell or not.
        vm.set_state(SimState::Hung);
        assert!(missed(&hb.beat(&qmp, Duration::from_millis(100)).await.unwrap()));
        vm.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doorbell_that_never_rings_gives_way_to_polling() {
    // A table without the doorbell, and a doorbell connected to nothing that writes.
    let dir = tempfile::tempdir().unwrap();
    let cfg = SsdtConfig { doorbell_port: None, ..SsdtConfig::default() };
    let p = prepare(dir.path(), "vm", &cfg).unwrap();
    // Answering after the first look, as a real guest does.
    let latency = Duration::from_millis(5);
    let vm = SimVm::start(SimVmOptions { latency, ..SimVmOptions::new(&p.dir) }).await.unwrap();
    let qmp = Qmp::connect(&p.descriptor.qmp, WAIT).await.unwrap();
    let region = Arc::new(Region::open(&p.descriptor.region, Access::ReadWrite).unwrap());
    let (_quiet, host) = tokio::net::UnixStream::pair().unwrap();
    let bell = Arc::new(acpimon::trigger::Doorbell::from_stream(Path::new("/quiet"), host));
    let mut hb =
        Heartbeat::new(region, p.descriptor.irq).unwrap().with_completion(Completion::Doorbell(bell));
    for i in 0..acpimon::trigger::SILENT_DOORBELL_LIMIT {
        match hb.beat(&qmp, Duration::from_secs(2)).await.unwrap() {
            // Answered by the safety poll, late but not missed.
            Beat::Acked { latency, via: Via::Poll, .. } => {
                assert!(latency >= acpimon::trigger::DOORBELL_SAFETY_POLL, "{latency:?}")
            }
            beat => panic!("beat {i}: {beat:?}"),
        }
    }
    assert!(hb.completion().contains("did not ring for 3 answered heartbeats"), "{}", hb.completion());
    match hb.beat(&qmp, Duration::from_secs(2)).await.unwrap() {
        Beat::Acked { latency, via: Via::Poll, .. } => {
            assert!(latency < Duration::from_millis(100), "{latency:?}")
        }
        beat => panic!("{beat:?}"),
    }
    vm.stop().await;
}

#[tokio::test]
async fn the_typed_commands_the_repo_uses_decode() {
    let s = sim().await;
    assert_eq!(
        channel::locate(&s.qmp, "0f".parse().unwrap()).await.unwrap(),
        Channel::Region { bar: 0xfebf_f000 }
    );
    let pci = s.qmp.execute(qapi::qmp::query_pci {}).await.unwrap();
    let dev = pci[0].devices.iter().find(|d| d.slot == 15).expect("ivshmem at slot 0f");
    assert_eq!((dev.id.vendor, dev.id.device, dev.qdev_id.as_str()), (0x1af4, 0x1110, "acpimon-shm"));
    assert_eq!(s.status().await, ("running".into(), true));
    let v = s.qmp.execute(qapi::qmp::query_version {}).await.unwrap();
    assert_eq!((v.qemu.major, v.qemu.minor, v.qemu.micro), (10, 0, 2));
    let cpus = s.qmp.execute(qapi::qmp::query_cpus_fast {}).await.unwrap();
    assert_eq!(cpus.len(), 2);
    let regs = s.qmp.hmp("info registers").await.unwrap();
    assert!(
        regs.starts_with("CPU#0\r\n") && regs.contains("RIP=ffffffff") && regs.contains("HLT=1"),
        "{regs}"
    );
    let cpu1 = s
        .qmp
        .execute(qapi::qmp::human_monitor_command {
            command_line: "info registers".into(),
            cpu_index: Some(1),
        })
        .await
        .unwrap();
    assert!(cpu1.starts_with("CPU#1\r\n"), "{cpu1}");
    s.qmp.execute(qapi::qmp::inject_nmi {}).await.unwrap();
    match s.qmp.execute(qapi::qmp::query_kvm {}).await {
        Err(QmpError::Command { class, desc, .. }) => {
            assert_eq!(
                (class.as_str(), desc.as_str()),
                ("CommandNotFound", "The command query-kvm has not been found")
            )
        }
        other => panic!("query-kvm: {other:?}"),
    }
    let dump = s._dir.path().join("core.elf");
    let mut events = s.qmp.events();
    s.qmp
        .execute(qapi::qmp::dump_guest_memory {
            paging: false,
            protocol: format!("file:{}", dump.display()),
            detach: None,
            begin: None,
            length: None,
            format: None,
        })
        .await
        .unwrap();
    assert!(std::fs::read(&dump).unwrap().starts_with(b"\x7fELF"));
    assert_eq!(event(&mut events, "DUMP_COMPLETED").await.kind, EventKind::DumpCompleted { error: None });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_answers_after_its_latency() {
    let dir = tempfile::tempdir().unwrap();
    let p = prepare(dir.path(), "vm", &SsdtConfig::default()).unwrap();
    let latency = Duration::from_millis(20);
    let vm = SimVm::start(SimVmOptions { latency, ..SimVmOptions::new(&p.dir) }).await.unwrap();
    let qmp = Qmp::connect(&p.descriptor.qmp, WAIT).await.unwrap();
    let region = Arc::new(Region::open(&p.descriptor.region, Access::ReadWrite).unwrap());
    let mut hb = Heartbeat::new(region, p.descriptor.irq).unwrap();
    for _ in 0..3 {
        match hb.beat(&qmp, Duration::from_secs(1)).await.unwrap() {
            Beat::Acked { latency: l, .. } => assert!(l >= latency && l < latency * 10, "{l:?}"),
            beat => panic!("{beat:?}"),
        }
    }
    assert!(missed(&hb.beat(&qmp, latency / 2).await.unwrap()), "too early is a miss");
    vm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_guest_misses_while_qmp_answers() {
    let mut s = sim().await;
    acked(&s.beat().await);
    s.vm.set_state(SimState::Hung);
    assert_eq!(s.vm.state(), SimState::Hung);
    assert!(missed(&s.beat().await));
    assert_eq!(s.status().await, ("running".into(), true));
    let regs = s.qmp.hmp("info registers").await.unwrap();
    assert!(regs.contains("HLT=0"), "{regs}");
    s.vm.set_state(SimState::Running);
    acked(&s.beat().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_emit_stop_and_resume() {
    let mut s = sim().await;
    let mut events = s.qmp.events();
    s.vm.set_state(SimState::Paused);
    assert_eq!(event(&mut events, "STOP").await.kind, EventKind::Stop);
    assert_eq!(s.status().await, ("paused".into(), false));
    let beat = s.beat().await;
    assert!(missed(&beat));
    s.vm.set_state(SimState::Running);
    event(&mut events, "RESUME").await;
    assert_eq!(s.status().await, ("running".into(), true));
    // The line raised while paused is handled on resume: a late answer to the missed beat.
    assert!(s.record().answers(beat.request_no(), s.region.snapshot().unwrap().request.nonce));
    acked(&s.beat().await);
    // The same through QMP, as the repo's tests drive real QEMU.
    s.qmp.execute(qapi::qmp::stop {}).await.unwrap();
    event(&mut events, "STOP").await;
    assert!(missed(&s.beat().await));
    s.qmp.execute(qapi::qmp::cont {}).await.unwrap();
    event(&mut events, "RESUME").await;
    acked(&s.beat().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_reported_as_qemu_reports_it() {
    let mut s = sim().await;
    let mut events = s.qmp.events();
    s.vm.set_state(SimState::Panicked(PanicAction::Run));
    let e = event(&mut events, "GUEST_PANICKED").await;
    assert_eq!(e.raw["data"], serde_json::json!({ "action": "run" }));
    assert_eq!(e.kind, EventKind::Panicked { action: "run".into(), crashloaded: false });
    // panic=none: QEMU keeps running, the kernel answers nothing.
    assert_eq!(s.status().await, ("running".into(), true));
    assert!(missed(&s.beat().await));
    // A reset recovers it: a new boot.
    s.vm.reboot();
    assert_eq!(s.record().boot_count, 2);
    acked(&s.beat().await);

    // panic=pause: GUEST_PANICKED, then STOP; the VM stays stopped through a reset.
    s.vm.set_state(SimState::Panicked(PanicAction::Pause));
    assert_eq!(event(&mut events, "GUEST_PANICKED").await.raw["data"]["action"], "pause");
    event(&mut events, "STOP").await;
    assert_eq!(s.status().await, ("guest-panicked".into(), false));
    s.qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
    let reset = event(&mut events, "RESET").await;
    assert_eq!(reset.raw["data"], serde_json::json!({ "guest": false, "reason": "host-qmp-system-reset" }));
    assert_eq!(s.status().await, ("prelaunch".into(), false));
    assert_eq!(s.record().boot_count, 2, "no boot record before the VM runs");
    s.qmp.execute(qapi::qmp::cont {}).await.unwrap();
    let r = s.record();
    assert_eq!((r.source, r.boot_count, r.ged_count), (Source::Boot, 3, 0));
    acked(&s.beat().await);
}

#[tokio::test]
async fn a_reboot_writes_a_new_boot_record() {
    let mut s = sim().await;
    let mut events = s.qmp.events();
    acked(&s.beat().await);
    let before = s.record();
    s.vm.reboot();
    let reset = event(&mut events, "RESET").await;
    assert_eq!(reset.raw["data"], serde_json::json!({ "guest": true, "reason": "guest-reset" }));
    let r = s.record();
    assert_eq!(
        (r.source, r.boot_count, r.ged_count, r.seq),
        (Source::Boot, before.boot_count + 1, 0, before.seq + 2)
    );
    assert!(r.timer_ticks < before.timer_ticks, "the guest timer starts again");
    let r = acked(&s.beat().await);
    assert_eq!((r.boot_count, r.ged_count), (2, 1));
}

#[tokio::test]
async fn gone_closes_the_monitor() {
    let s = sim().await;
    let qmp_path = s.vm.descriptor().qmp.clone();
    s.vm.set_state(SimState::Gone);
    let t = Instant::now();
    match s.qmp.status(WAIT).await {
        Err(QmpError::Closed | QmpError::Io(_)) => {}
        other => panic!("expected the connection to be lost, got {other:?}"),
    }
    assert!(t.elapsed() < WAIT, "the client learnt of it by the connection closing, not a timeout");
    assert!(!qmp_path.exists());
    assert!(Qmp::connect(&qmp_path, Duration::from_millis(100)).await.is_err());
    // Gone is final.
    s.vm.set_state(SimState::Running);
    assert_eq!(s.vm.state(), SimState::Gone);
    s.vm.stop().await;
}

#[tokio::test]
async fn clients_reconnect_and_several_are_served() {
    let mut s = sim().await;
    let path = s.vm.descriptor().qmp.clone();
    drop(std::mem::replace(&mut s.qmp, Qmp::connect(&path, WAIT).await.unwrap()));
    acked(&s.beat().await);
    let second = Qmp::connect(&path, WAIT).await.unwrap();
    let (mut a, mut b) = (s.qmp.events(), second.events());
    s.vm.set_state(SimState::Paused);
    event(&mut a, "STOP").await;
    event(&mut b, "STOP").await;
    second.execute(qapi::qmp::cont {}).await.unwrap();
    event(&mut a, "RESUME").await;
    drop(second);
    // A restarted VM (the same directory) carries the boot count on.
    let dir = s.vm.descriptor().ssdt.parent().unwrap().to_path_buf();
    std::mem::replace(&mut s.vm, SimVm::start(SimVmOptions::new(&dir)).await.unwrap()).stop().await;
    assert!(path.exists(), "stopping the old VM leaves the new one's socket");
    s.qmp = Qmp::connect(&path, WAIT).await.unwrap();
    assert_eq!(acked(&s.beat().await).boot_count, 2);
}

#[tokio::test]
async fn the_console_answers_a_live_guest_only() {
    let s = sim().await;
    let path = &s.vm.descriptor().console;
    let console = Console::connect(path, 4096, WAIT).await.unwrap();
    let mark = console.position();
    console.send(b"uptime\n").await.unwrap();
    let seen = console.wait_for("load average", mark, WAIT).await.unwrap();
    assert!(seen.starts_with("uptime\n") && seen.contains(" up 0 min,"), "{seen}");
    s.vm.set_state(SimState::Hung);
    let mark = console.position();
    console.send(b"uptime\r\n").await.unwrap();
    assert!(console.wait_for("load average", mark, Duration::from_millis(200)).await.is_err());
    s.vm.reboot();
    console.wait_for("Linux version", mark, WAIT).await.unwrap();
    s.vm.set_state(SimState::Panicked(PanicAction::Run));
    console.wait_for("Kernel panic - not syncing", mark, WAIT).await.unwrap();
    // Gone: the console closes too.
    s.vm.set_state(SimState::Gone);
    assert!(console.wait_for("never printed", mark, WAIT).await.is_err());
    assert!(!path.exists());
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn fleet(root: &Path, n: usize) {
    let rss0 = rss_kib();
    let t = Instant::now();
    let vms = spawn_fleet(root, n, SimVmOptions::new("")).await.unwrap();
    let started = t.elapsed();
    let rss_sims = rss_kib();
    let t = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for vm in &vms {
        let d = vm.descriptor();
        assert_eq!(d.name, format!("sim-{:04}", clients.len()));
        let qmp = Qmp::connect(&d.qmp, WAIT).await.unwrap();
        let region = Arc::new(Region::open(&d.region, Access::ReadWrite).unwrap());
        let hb = Heartbeat::new(region, d.irq).unwrap();
        clients.push((qmp, hb));
    }
    let connected = t.elapsed();
    let t = Instant::now();
    for (qmp, hb) in &mut clients {
        acked(&hb.beat(qmp, Duration::from_secs(1)).await.unwrap());
    }
    let beaten = t.elapsed();
    let rss_all = rss_kib();
    assert!(vms.iter().all(|vm| vm.triggers() == 1));
    let per_sim = (rss_sims.saturating_sub(rss0)) as f64 / n as f64;
    eprintln!(
        "{n} simulated VMs: started in {started:.2?}, {n} QMP clients connected in {connected:.2?}, \
         {n} beats acknowledged in {beaten:.2?}; RSS {rss0} KiB -> {rss_sims} KiB with the VMs \
         ({per_sim:.1} KiB each) -> {rss_all} KiB with clients and beats"
    );
    assert!(per_sim < 256.0, "a simulated VM costs {per_sim:.1} KiB of RSS");
    let t = Instant::now();
    for vm in vms {
        vm.stop().await;
    }
    eprintln!("{n} simulated VMs stopped in {:.2?}", t.elapsed());
}

/// The process's threads, from /proc.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The guard of issue 13: a beat in flight is a future, not a thread. 1,000 simulated VMs,
/// all hung, a beat in flight to each (half woken by their doorbell, half polling): the
/// process has as many threads as before. (Waiting on a blocking thread per beat, as before,
/// took 512, the blocking pool's cap.) Not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_hung_beats_in_flight_hold_no_thread() {
    const N: usize = 1000;
    // This process holds both ends: 3 listeners, 2 x 2 connection ends and a region per VM.
    let need = 8 * N as u64 + 256;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(|v| v.parse::<u64>().unwrap_or(u64::MAX)));
    assert!(
        soft.is_some_and(|s| s >= need),
        "this test needs an open-file limit of {need} (ulimit -n {need}); it is {soft:?}"
    );
    let root = tempfile::tempdir().unwrap();
    let vms = spawn_fleet(root.path(), N, SimVmOptions::new("")).await.unwrap();
    let mut beats = Vec::with_capacity(N);
    for (i, vm) in vms.iter().enumerate() {
        let d = vm.descriptor();
        let qmp = Qmp::connect(&d.qmp, WAIT).await.unwrap();
        let region = Arc::new(Region::open(&d.region, Access::ReadWrite).unwrap());
        let socket = d.doorbell.as_ref().map(|b| b.socket.as_path()).filter(|_| i % 2 == 0);
        let completion = Completion::connect(socket).await;
        assert_eq!(matches!(completion, Completion::Doorbell(_)), i % 2 == 0, "{}", completion.describe());
        let hb = Heartbeat::new(region, d.irq).unwrap().with_completion(completion);
        vm.set_state(SimState::Hung);
        beats.push((qmp, hb));
    }
    // Idle threads of the blocking pool (spawn_fleet prepared the directories on one) are
    // part of the baseline.
    let before = threads();
    let tasks: Vec<_> = beats
        .into_iter()
        .map(|(qmp, mut hb)| {
            tokio::spawn(async move { hb.beat(&qmp, Duration::from_secs(3)).await.unwrap() })
        })
        .collect();
    // Every beat is in flight (triggered, waiting) well before its 3 s timeout.
    let t = Instant::now();
    while vms.iter().any(|vm| vm.triggers() == 0) {
        assert!(t.elapsed() < Duration::from_secs(3), "not every beat was triggered within 3 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = threads();
    let mut missed_all = true;
    for task in tasks {
        missed_all &= missed(&task.await.unwrap());
    }
    eprintln!("{N} hung beats in flight: {before} threads before, {during} during");
    assert!(missed_all, "a hung VM answered");
    assert!(during <= before + 2, "{N} beats in flight took {} threads", during.saturating_sub(before));
    for vm in vms {
        vm.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sims_each_answer_a_beat() {
    let root = tempfile::tempdir().unwrap();
    fleet(root.path(), 200).await;
}
