//! Diagnostic bundles against real QEMU and the real Linux fixture guest (TCG): a healthy
//! guest, a panicked one, one whose kernel is starved (no heartbeat, SysRq still answers), and
//! the script step.

mod common;

use std::path::Path;
use std::time::Duration;

use acpimon::diagnose::{
    collect, collect_with, default_steps, Manifest, Options, Outcome, Step, StepSpec, Target, Trigger,
    DEFAULT_DEADLINE, MAX_FILE,
};
use acpimon::trigger::Beat;
use acpimon::verdict::Class;
use common::guest::{Guest, GuestSpec};
use serde_json::json;

fn target(g: &Guest) -> Target<'_> {
    Target {
        vm: "guest",
        qmp: Some(&g.vm.qmp),
        console: Some(g.vm.console().expect("console connected")),
        gdb_socket: g.vm.prepared.dir.join("gdb.sock"),
        guest_agent: None,
        host: acpimon::host::HostContext { pid: g.vm.qmp.pid, ..Default::default() },
        kernel_log: Some(acpimon::diagnose::KernelLogContext {
            dir: g.vm.prepared.dir.clone(),
            cache: Default::default(),
            boot: 0,
            guest_symbols: true,
        }),
    }
}

fn trigger(kind: &str) -> Trigger {
    Trigger {
        kind: kind.into(),
        time: acpimon::units::now_rfc3339(),
        reason: format!("test: {kind}"),
        evidence: json!({ "test": true }),
    }
}

fn sysrq(keys: &str) -> Step {
    Step::new(StepSpec::Sysrq {
        keys: keys.into(),
        allow_destructive: false,
        per_key: Duration::from_secs(5),
        quiet: Duration::from_millis(500),
        chardev: acpimon::launch::CONSOLE_ID.into(),
    })
}

/// The file of the `i`th step, which must have one within the cap.
fn file(bundle: &Path, m: &Manifest, i: usize) -> String {
    let s = &m.steps[i];
    let name = s.file.as_deref().unwrap_or_else(|| panic!("step {i} has no file: {s:?}"));
    let bytes = std::fs::read(bundle.join(name)).unwrap();
    assert_eq!(bytes.len() as u64, s.bytes, "{s:?}");
    assert!(bytes.len() <= MAX_FILE, "{s:?}");
    String::from_utf8_lossy(&bytes).into_owned()
}

fn print_steps(what: &str, m: &Manifest) {
    for s in &m.steps {
        eprintln!(
            "{what}: {:<13} {:>6} ms {:?} {} bytes {}",
            s.name,
            s.duration_ms,
            s.outcome,
            s.bytes,
            s.reason.as_deref().unwrap_or("")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_guest_gives_every_step_and_keeps_running() {
    let spec = GuestSpec { extra: vec!["-smp".into(), "2".into()], ..GuestSpec::new("pc") };
    let g = Guest::boot(spec).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    // The guest-agent step has its own test (tests/app.rs): this guest has no agent port. The
    // host and kernel-log steps come last here, so the positions below stay those of the
    // steps this test was written for.
    let later = ["guest-agent", "host", "kernel-log"];
    let mut steps: Vec<Step> =
        default_steps().into_iter().filter(|s| !later.contains(&s.spec.name())).collect();
    steps.extend([
        Step::new(StepSpec::InjectNmi { capture: Duration::from_secs(3), quiet: Duration::from_millis(500) }),
        Step::new(StepSpec::Gdbstub {}),
        // The fixture guest has 256 MiB.
        Step::new(StepSpec::MemoryDump { max_bytes: 512 << 20 }),
        Step::new(StepSpec::MemoryDump { max_bytes: 64 << 20 }),
        // A chardev QEMU does not have: the break falls back to telnet IAC BRK, which this
        // (non-telnet) console passes to the guest as plain bytes: no SysRq.
        Step::new(StepSpec::Sysrq {
            keys: "h".into(),
            allow_destructive: false,
            per_key: Duration::from_secs(1),
            quiet: Duration::from_millis(300),
            chardev: "no-such-chardev".into(),
        }),
        Step::new(StepSpec::Host {}),
        Step::new(StepSpec::KernelLog {}),
    ]);
    let m =
        collect(&steps, &target(&g), &trigger("unresponsive"), vec![json!({"state": "healthy"})], &bundle)
            .await
            .unwrap();
    print_steps("healthy", &m);
    let names: Vec<_> = m.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "console-tail",
            "sysrq",
            "qmp-status",
            "qmp-cpus",
            "registers",
            "inject-nmi",
            "gdbstub",
            "memory-dump",
            "memory-dump",
            "sysrq",
            "host",
            "kernel-log"
        ]
    );
    for s in &m.steps[..8] {
        assert_eq!(s.outcome, Outcome::Ok, "{s:?}");
        assert!(s.file.is_some() && s.bytes > 0, "{s:?}");
    }
    assert!(file(&bundle, &m, 0).contains("ACPIMON-GUEST: ready"));
    let sysrq_text = file(&bundle, &m, 1);
    for header in [
        "sysrq: Show Blocked State",
        "sysrq: Show State",
        "sysrq: Show backtrace of all active CPUs",
        "sysrq: Show Memory",
    ] {
        assert!(sysrq_text.contains(header), "{header} missing:\n{sysrq_text}");
    }
    assert_eq!(m.steps[1].summary.as_ref().unwrap()["break"], "qmp");
    assert_eq!(m.steps[2].summary.as_ref().unwrap()["status"], "running");
    assert!(file(&bundle, &m, 2).contains("\"running\": true"));
    assert_eq!(m.steps[3].summary.as_ref().unwrap()["count"], 2);
    let regs = file(&bundle, &m, 4);
    // Two samples of both vCPUs, the second after its mark.
    let (first, second) = regs.split_once(acpimon::verdict::registers::SAMPLE_MARK).expect("a second sample");
    assert_eq!((first.matches("RIP=").count(), second.matches("RIP=").count()), (2, 2), "{regs}");
    assert!(first.contains("CPU#0") && first.contains("CPU#1"), "{regs}");
    assert_eq!(m.steps[4].summary.as_ref().unwrap()["samples"], 2);
    let nmi = file(&bundle, &m, 5);
    assert!(nmi.contains("NMI received for unknown reason"), "{nmi}");
    let gdb = file(&bundle, &m, 6);
    assert!(gdb.contains("thread 01 (vCPU 0)") && gdb.contains("thread 02 (vCPU 1)"), "{gdb}");
    assert_eq!(gdb.matches("\n  rip ").count(), 2, "{gdb}");
    let gs = m.steps[6].summary.as_ref().unwrap();
    assert_eq!(gs["threads"].as_array().unwrap().len(), 2, "{gs}");
    assert!(gs["threads"][0]["rip"].as_str().unwrap().starts_with("0xffffffff"), "kernel code: {gs}");
    assert_eq!(
        (gs["status_before"].as_str(), gs["status_after"].as_str()),
        (Some("running"), Some("running"))
    );
    assert!(!g.vm.prepared.dir.join("gdb.sock").exists(), "the gdb socket is removed");

    let dump = &m.steps[7];
    let path = bundle.join(dump.file.as_ref().unwrap());
    let head = std::fs::read(&path).unwrap()[..12].to_vec();
    match dump.summary.as_ref().unwrap()["format"].as_str().unwrap() {
        // QEMU 8.2 and later: the kdump-compressed file itself.
        "kdump-raw-zlib" => assert_eq!(&head[..8], b"KDUMP   ", "kdump-compressed signature"),
        // QEMU 7.2: the flattened stream.
        "kdump-zlib" => assert_eq!(&head, b"makedumpfile", "flattened kdump signature"),
        other => panic!("format {other}"),
    }
    assert!(dump.bytes > 1 << 20 && dump.bytes <= 512 << 20, "{dump:?}");
    let small = &m.steps[8];
    assert_eq!(small.outcome, Outcome::Skipped, "{small:?}");
    assert!(small.reason.as_deref().unwrap().contains("exceeds the cap max_bytes"), "{small:?}");
    assert_eq!((small.file.as_deref(), small.bytes), (None, 0));
    let fallback = &m.steps[9];
    assert_eq!(fallback.outcome, Outcome::Failed, "{fallback:?}");
    let fs = fallback.summary.as_ref().unwrap();
    assert_eq!(fs["break"], "telnet", "{fs}");
    assert!(fs["notes"][0].as_str().unwrap().contains("no chardev 'no-such-chardev'"), "{fs}");
    assert!(
        fallback.reason.as_deref().unwrap().contains("telnet break did not reach the kernel"),
        "{fallback:?}"
    );

    // What the host saw (two readings 100 ms apart: no sampler here): the QEMU process and both
    // vCPU threads.
    assert_eq!(m.steps[10].outcome, Outcome::Ok, "{:?}", m.steps[10]);
    let host: acpimon::host::HostReport = serde_json::from_str(&file(&bundle, &m, 10)).unwrap();
    assert_eq!(host.qemu.as_ref().map(|q| q.pid), g.vm.qmp.pid, "{host:#?}");
    assert_eq!(host.vcpus.iter().map(|v| v.cpu).collect::<Vec<_>>(), [0, 1], "{host:#?}");
    // The kernel's log from its memory, with what SysRq made it print.
    assert_eq!(m.steps[11].outcome, Outcome::Ok, "{:?}", m.steps[11]);
    let log = file(&bundle, &m, 11);
    assert!(log.contains("] Linux version ") && log.contains("sysrq: Show Blocked State"), "{log}");

    // The VM was left as it was: running, and its kernel still answers.
    let status = g.vm.qmp.status(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.status, "running");
    g.beats_acked(&mut hb, 5).await;

    let on_disk: Manifest =
        serde_json::from_slice(&std::fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(on_disk.vm, "guest");
    assert_eq!(on_disk.timeline, vec![json!({"state": "healthy"})]);

    // A paused VM: SysRq and the NMI are skipped (nothing could answer; they would act on
    // resume), the gdbstub leaves it paused.
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    let steps = vec![
        sysrq("w"),
        Step::new(StepSpec::InjectNmi { capture: Duration::from_secs(1), quiet: Duration::from_millis(300) }),
        Step::new(StepSpec::Gdbstub {}),
    ];
    let paused = dir.path().join("paused");
    let m = collect(&steps, &target(&g), &trigger("unresponsive"), vec![], &paused).await.unwrap();
    print_steps("paused", &m);
    for s in &m.steps[..2] {
        assert_eq!(s.outcome, Outcome::Skipped, "{s:?}");
        assert!(s.reason.as_deref().unwrap().starts_with("the VM is not running (status 'paused')"), "{s:?}");
    }
    assert_eq!(m.steps[2].outcome, Outcome::Ok, "{:?}", m.steps[2]);
    let gs = m.steps[2].summary.as_ref().unwrap();
    assert_eq!((gs["status_before"].as_str(), gs["status_after"].as_str()), (Some("paused"), Some("paused")));
    assert!(file(&paused, &m, 2).contains("  rip "));
    let status = g.vm.qmp.status(Duration::from_secs(5)).await.unwrap();
    assert_eq!(status.status, "paused");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicked_guest_gives_the_whole_panic_text() {
    let g = Guest::boot(GuestSpec { scenario: "panic", delay: 2, ..GuestSpec::new("pc") }).await;
    let mut events = g.vm.qmp.events();
    let ev = common::guest::next_qmp_event(&mut events, "GUEST_PANICKED", Duration::from_secs(60)).await;
    // Collect at once, as the service does: the console tail waits for the text printed after
    // the event.
    let dir = tempfile::tempdir().unwrap();
    let steps = vec![
        Step::new(StepSpec::ConsoleTail { settle: Duration::from_millis(500) }),
        Step::new(StepSpec::QmpStatus {}),
        Step::new(StepSpec::Registers {}),
        Step::new(StepSpec::Gdbstub {}),
    ];
    let t = Trigger { evidence: ev.raw.clone(), ..trigger("panicked") };
    let m = collect(&steps, &target(&g), &t, vec![], dir.path()).await.unwrap();
    print_steps("panicked", &m);
    for s in &m.steps {
        assert_eq!(s.outcome, Outcome::Ok, "{s:?}");
    }
    let tail = file(dir.path(), &m, 0);
    assert!(tail.contains("Kernel panic - not syncing"), "{tail}");
    assert!(tail.contains("---[ end Kernel panic"), "the text after the event is there too:\n{tail}");
    assert!(file(dir.path(), &m, 3).contains("  rip "));
    assert_eq!(m.trigger.evidence["event"], "GUEST_PANICKED");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_starved_kernel_misses_heartbeats_but_answers_sysrq() {
    // Two vCPUs: the scenario starves each.
    let spec = GuestSpec {
        scenario: "starve",
        delay: 2,
        extra: vec!["-smp".into(), "2".into()],
        ..GuestSpec::new("pc")
    };
    let g = Guest::boot(spec).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.beats_acked(&mut hb, 3).await;
    g.wait_console("ACPIMON-GUEST: starving", 0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        match hb.beat(&g.vm.qmp, Duration::from_millis(700)).await.unwrap() {
            Beat::Missed { .. } => {}
            acked => panic!("a starved kernel answered: {acked:?}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let steps = vec![sysrq("wl"), Step::new(StepSpec::Registers {}), Step::new(StepSpec::QmpStatus {})];
    let m = collect(&steps, &target(&g), &trigger("unresponsive"), vec![], dir.path()).await.unwrap();
    print_steps("starved", &m);
    for s in &m.steps {
        assert_eq!(s.outcome, Outcome::Ok, "{s:?}");
    }
    let out = file(dir.path(), &m, 0);
    assert!(out.contains("sysrq: Show Blocked State"), "{out}");
    assert!(out.contains("sysrq: Show backtrace of all active CPUs"), "{out}");
    assert_eq!(out.matches("Comm: rt-spin").count(), 2, "a spinner is what each CPU runs:\n{out}");
    // The vCPU spins in rt-spin's loop (user mode, at 0x400099), but a sample may also land in
    // an interrupt handler: only check that the registers are there.
    let cpus = &m.steps[1].summary.as_ref().unwrap()["cpus"];
    assert!(cpus[0]["rip"].is_string() && cpus[1]["rip"].is_string(), "{cpus}");
    assert_eq!(m.steps[2].summary.as_ref().unwrap()["status"], "running", "QEMU sees a running VM");
    // Still starved afterwards.
    assert!(matches!(hb.beat(&g.vm.qmp, Duration::from_millis(700)).await.unwrap(), Beat::Missed { .. }));
}

/// No VM: QMP and console steps are skipped; scripts run with the bundle's environment, are
/// bounded, and are killed (with their children) at the timeout.
#[tokio::test(flavor = "multi_thread")]
async fn scripts_get_the_environment_and_are_killed_at_their_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    let target = Target {
        vm: "vm-7",
        qmp: None,
        console: None,
        gdb_socket: dir.path().join("gdb.sock"),
        guest_agent: None,
        host: Default::default(),
        kernel_log: None,
    };
    let sh = |script: &str, timeout: Duration| Step {
        spec: StepSpec::Script { argv: vec!["/bin/sh".into(), "-c".into(), script.into()] },
        timeout,
    };
    let steps = vec![
        sh(
            "echo \"vm=$ACPIMON_VM bundle=$ACPIMON_BUNDLE trigger=$ACPIMON_TRIGGER reason=$ACPIMON_TRIGGER_REASON\"; \
             echo to-stderr >&2; echo \"cwd=$(pwd)\"",
            Duration::from_secs(10),
        ),
        sh("echo $$ >sh.pid; sleep 30 & echo $! >sleep.pid; wait", Duration::from_secs(1)),
        sh("head -c 3000000 /dev/zero | tr '\\0' x", Duration::from_secs(10)),
        sh("echo failing; exit 3", Duration::from_secs(10)),
        Step::new(StepSpec::Script { argv: vec!["/nonexistent/program".into()] }),
        Step::new(StepSpec::QmpStatus {}),
        sysrq("w"),
    ];
    let m = collect(&steps, &target, &trigger("unresponsive"), vec![], &bundle).await.unwrap();
    print_steps("scripts", &m);
    let bundle = bundle.canonicalize().unwrap();

    assert_eq!(m.steps[0].outcome, Outcome::Ok, "{:?}", m.steps[0]);
    let env = file(&bundle, &m, 0);
    let expect = format!(
        "vm=vm-7 bundle={} trigger=unresponsive reason=test: unresponsive\nto-stderr\ncwd={}\n",
        bundle.display(),
        bundle.display()
    );
    assert_eq!(env, expect);
    assert_eq!(m.steps[0].summary.as_ref().unwrap()["exit"], 0);

    let slow = &m.steps[1];
    assert_eq!(slow.outcome, Outcome::Timeout, "{slow:?}");
    assert!(slow.duration_ms < 3000, "killed at its 1 s timeout: {slow:?}");
    assert!(slow.reason.as_deref().unwrap().contains("killed its process group"), "{slow:?}");
    for pidfile in ["sh.pid", "sleep.pid"] {
        let pid = std::fs::read_to_string(bundle.join(pidfile)).unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        // Gone, or a zombie waiting for its (new) parent to reap it.
        assert!(stat.is_empty() || stat.contains(") Z "), "{pidfile} {pid} still runs: {stat}");
    }

    let noisy = &m.steps[2];
    assert_eq!(noisy.outcome, Outcome::Ok, "{noisy:?}");
    let text = file(&bundle, &m, 2);
    assert!(text.ends_with("more bytes of output dropped]\n"), "{}", &text[text.len() - 100..]);
    assert!(noisy.summary.as_ref().unwrap()["dropped_bytes"].as_u64().unwrap() > 1_900_000);

    let failing = &m.steps[3];
    assert_eq!(failing.outcome, Outcome::Failed, "{failing:?}");
    assert!(failing.reason.as_deref().unwrap().contains("exit status: 3"), "{failing:?}");
    assert_eq!(file(&bundle, &m, 3), "failing\n");

    let missing = &m.steps[4];
    assert_eq!(missing.outcome, Outcome::Failed, "{missing:?}");
    assert!(missing.reason.as_deref().unwrap().contains("cannot start /nonexistent/program"), "{missing:?}");

    for s in &m.steps[5..] {
        assert_eq!(s.outcome, Outcome::Skipped, "{s:?}");
    }
    assert_eq!(m.steps[5].reason.as_deref(), Some("no QMP connection to the VM"));
    assert_eq!(m.steps[6].reason.as_deref(), Some("no console connection to the VM"));
}

/// Collects the default steps (no guest agent port here) as the service does: under the
/// default deadline, with `symbols`.
async fn service_bundle(
    g: &Guest,
    t: &Trigger,
    symbols: Option<std::path::PathBuf>,
) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let steps: Vec<Step> = default_steps().into_iter().filter(|s| s.spec.name() != "guest-agent").collect();
    let opts = Options { deadline: Some(DEFAULT_DEADLINE), symbols, reports: vec![] };
    let t0 = std::time::Instant::now();
    let m = collect_with(&steps, &target(g), t, vec![], dir.path(), &opts).await.unwrap();
    print_steps(&t.kind, &m);
    eprintln!("{}: bundle in {} ms; verdict {:?}", t.kind, t0.elapsed().as_millis(), m.verdict);
    (dir, m)
}

/// The sum of the steps that wait on the guest: within the deadline.
fn guest_wait(m: &Manifest) -> Duration {
    let ms: u64 = m
        .steps
        .iter()
        .filter(|s| matches!(s.name.as_str(), "console-tail" | "sysrq" | "inject-nmi" | "guest-agent"))
        .map(|s| s.duration_ms)
        .sum();
    Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicked_guests_bundle_skips_sysrq_and_its_verdict_is_the_panic() {
    let g = Guest::boot(GuestSpec { scenario: "panic", delay: 2, ..GuestSpec::new("pc") }).await;
    let mut events = g.vm.qmp.events();
    let ev = common::guest::next_qmp_event(&mut events, "GUEST_PANICKED", Duration::from_secs(60)).await;
    let t = Trigger { evidence: ev.raw.clone(), ..trigger("panicked") };
    let t0 = std::time::Instant::now();
    let (_dir, m) = service_bundle(&g, &t, None).await;
    let sysrq = m.step("sysrq").unwrap();
    assert_eq!(sysrq.outcome, Outcome::Skipped, "{sysrq:?}");
    assert_eq!(sysrq.reason.as_deref(), Some("the guest kernel panicked: it no longer answers SysRq"));
    let v = m.verdict.as_ref().expect("a verdict");
    assert_eq!(v.class, Class::Panic, "{v:?}");
    assert!(v.headline.starts_with("the guest kernel panicked: not syncing: "), "{}", v.headline);
    assert!(v.evidence.iter().any(|e| e.source.ends_with("-console-tail.txt")), "{v:?}");
    // QEMU says "running" (-action panic=none): before, SysRq spent 20 s here.
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    // In the manifest as written.
    let on_disk: Manifest =
        serde_json::from_slice(&std::fs::read(_dir.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk.verdict, m.verdict);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_starved_guests_bundle_is_within_the_deadline_and_its_verdict_reads_the_registers() {
    let spec = GuestSpec {
        scenario: "starve",
        delay: 2,
        extra: vec!["-smp".into(), "2".into()],
        ..GuestSpec::new("pc")
    };
    let g = Guest::boot(spec).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    g.wait_console("ACPIMON-GUEST: starving", 0, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = std::time::Instant::now();
    let (_dir, m) = service_bundle(&g, &trigger("unresponsive"), None).await;
    let took = t0.elapsed();
    assert!(guest_wait(&m) <= DEFAULT_DEADLINE, "{:?}", guest_wait(&m));
    assert!(took < DEFAULT_DEADLINE + Duration::from_secs(3), "the bundle took {took:?}");
    let regs = m.step("registers").unwrap();
    assert_eq!(regs.summary.as_ref().unwrap()["samples"], 2, "{regs:?}");
    let v = m.verdict.as_ref().expect("a verdict");
    // The host saw a vCPU thread want a CPU all the time, and the kernel said nothing.
    assert_eq!(v.class, Class::Spinning, "{v:?}");
    // Both vCPUs run rt-spin's user-mode loop (a sample may land in an interrupt handler).
    assert!(v.headline.starts_with("guest spinning: vCPU "), "{}", v.headline);
    let cpu_lines: Vec<_> = v.evidence.iter().filter(|e| e.source.ends_with("-registers.txt")).collect();
    assert_eq!(cpu_lines.len(), 2, "{v:?}");
    assert!(cpu_lines.iter().any(|e| e.line.contains("at RIP 0x0000000000400099 (user space)")), "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_vms_verdict_is_paused_by_host_and_idle_vcpus_are_symbolised() {
    let g = Guest::boot(GuestSpec::new("pc")).await;
    let mut hb = g.heartbeat();
    g.until_first_ack(&mut hb, Duration::from_secs(30)).await;
    // The fixture kernel's own symbols (its /proc/kallsyms, no KASLR under a PVH boot), around
    // the idle loop.
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/verdict/testdata/kallsyms-6.1.0-57-amd64.txt");
    let (_dir, m) = service_bundle(&g, &trigger("unresponsive"), Some(map.clone())).await;
    let v = m.verdict.as_ref().expect("a verdict");
    assert_eq!(v.class, Class::Unknown, "{v:?}");
    if common::guest::default_kernel() == "bookworm" {
        assert!(
            v.evidence
                .iter()
                .any(|e| e.line.contains("halted at RIP")
                    && e.line.contains("(kernel text) native_safe_halt+0x")),
            "{v:?}"
        );
    }
    g.vm.qmp.execute_within(qapi::qmp::stop {}, Duration::from_secs(5)).await.unwrap();
    let t0 = std::time::Instant::now();
    let (_dir, m) = service_bundle(&g, &trigger("unresponsive"), Some(map)).await;
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    let v = m.verdict.as_ref().expect("a verdict");
    assert_eq!(v.class, Class::PausedByHost, "{v:?}");
    assert!(v.headline.contains("status 'paused'"), "{}", v.headline);
    assert!(v.evidence.iter().any(|e| e.source == "symbols" && e.line.contains("symbols from")), "{v:?}");
}
