use serde_json::json;

use super::*;
use crate::diagnose::{Outcome, StepOutcome};

const QEMU10: &str = include_str!("testdata/info-registers-a-qemu10.txt");

fn trigger(kind: &str, evidence: serde_json::Value) -> Trigger {
    Trigger {
        kind: kind.into(),
        time: "2026-01-01T00:00:00Z".into(),
        reason: format!("test {kind}"),
        evidence,
    }
}

fn manifest(t: &Trigger, status: Option<&str>) -> Manifest {
    let step = |name: &str, file: &str, summary: Option<serde_json::Value>| StepOutcome {
        name: name.into(),
        started: "s".into(),
        duration_ms: 1,
        timeout_ms: 1000,
        outcome: Outcome::Ok,
        file: Some(file.into()),
        bytes: 1,
        reason: None,
        summary,
    };
    let mut steps =
        vec![step("console-tail", "01-console-tail.txt", None), step("registers", "05-registers.txt", None)];
    if let Some(s) = status {
        steps.push(step(
            "qmp-status",
            "03-qmp-status.json",
            Some(json!({ "status": s, "running": s == "running" })),
        ));
    }
    Manifest {
        schema: crate::diagnose::SCHEMA.into(),
        vm: "vm".into(),
        trigger: t.clone(),
        created: "c".into(),
        finished: "f".into(),
        timeline: vec![],
        steps,
        verdict: None,
    }
}

fn files(console: &str, regs: &str) -> Vec<StepFile> {
    vec![
        StepFile { step: "console-tail".into(), file: "01-console-tail.txt".into(), text: console.into() },
        StepFile { step: "registers".into(), file: "05-registers.txt".into(), text: regs.into() },
    ]
}

fn report(class: ReportClass, line: &str) -> KernelReport {
    KernelReport {
        class,
        cpu: Some(1),
        task: None,
        pid: None,
        stuck_s: Some(44),
        location: Some("spin_fn+0x1c/0x30 [faults]".into()),
        line: line.into(),
        trace: vec!["Call Trace:".into(), " <TASK>".into(), " faults_thread+0x40/0x60 [faults]".into()],
        stamp_us: None,
    }
}

fn probe(scenarios: serde_json::Value, paused: bool, app: Option<serde_json::Value>) -> serde_json::Value {
    json!({ "cause": "tick", "scenarios": scenarios, "paused": paused, "panic": null, "app": app })
}

fn scenario(name: &str, kind: &str, misses: u32, ok: bool) -> serde_json::Value {
    json!({ "scenario": name, "kind": kind, "consecutive_misses": misses, "threshold": 2,
            "last": { "ok": ok, "detail": if ok { "answered" } else { "no match within 5s" }, "latency_ms": null },
            "unavailable": null })
}

/// Two samples of one vCPU, in the kernel with interrupts off, RIP moving within 0x40 bytes.
fn spinning_irqs_off() -> String {
    let one = |rip: &str| {
        format!(
            "CPU#0\nRAX=0000000000000000\nRIP={rip} RFL=00000086 [--S--P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
             CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\nCR3=0000000004a0e000\n"
        )
    };
    format!(
        "{}\n{} 2, 300 ms after the first ===\n{}",
        one("ffffffffc023604c"),
        registers::SAMPLE_MARK,
        one("ffffffffc0236030")
    )
}

#[test]
fn a_panic_is_the_verdict_whatever_else() {
    let t = trigger("panicked", json!({ "event": "GUEST_PANICKED" }));
    // As 6.1 prints it: the line, the panic's own trace, the end marker.
    let console = "[    5.2] Kernel panic - not syncing: sysrq triggered crash\n[    5.2] CPU: 0 PID: 1 Comm: sh\n\
                   [    5.2] Call Trace:\n[    5.2]  <TASK>\n[    5.2]  dump_stack_lvl+0x44/0x5c\n\
                   [    5.2]  panic+0x118/0x2f4\n[    5.2]  ? _printk+0x68/0x83\n[    5.2]  sysrq_handle_crash+0x16/0x20\n\
                   [    5.2]  __handle_sysrq.cold+0x44/0x11c\n[    5.2]  </TASK>\n[    5.3] Kernel Offset: disabled\n\
                   [    5.3] ---[ end Kernel panic - not syncing: sysrq triggered crash ]---\n";
    let v = judge(
        &t,
        &manifest(&t, Some("running")),
        &files(console, QEMU10),
        &[report(ReportClass::SoftLockup, "x")],
        None,
    );
    assert_eq!(v.class, Class::Panic);
    assert_eq!(v.headline, "the guest kernel panicked: not syncing: sysrq triggered crash");
    assert!(
        v.evidence.iter().any(|e| e.source == "01-console-tail.txt" && e.line.starts_with("Kernel panic")),
        "{v:?}"
    );
    let frames: Vec<&str> = v
        .evidence
        .iter()
        .filter(|e| e.source == "01-console-tail.txt")
        .skip(1)
        .map(|e| e.line.as_str())
        .collect();
    assert_eq!(frames, ["sysrq_handle_crash+0x16/0x20", "__handle_sysrq.cold+0x44/0x11c"], "{v:?}");
    // An earlier boot's panic, still in the console, is not this incident's.
    let t = trigger("unresponsive", json!({}));
    let rebooted = format!(
        "{console}[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)\nready\n"
    );
    let v = judge(&t, &manifest(&t, Some("running")), &files(&rebooted, QEMU10), &[], None);
    assert_eq!(v.class, Class::Unknown, "{v:?}");
    // An unresponsive trigger with the kernel's panic report is a panic too.
    let t = trigger("unresponsive", json!({}));
    let r = KernelReport {
        trace: vec![],
        stamp_us: None,
        location: None,
        ..report(ReportClass::Panic, "Kernel panic - not syncing: hung")
    };
    let v = judge(&t, &manifest(&t, None), &files("", ""), &[r], None);
    assert_eq!(
        (v.class, v.headline.as_str()),
        (Class::Panic, "the guest kernel panicked: not syncing: hung")
    );
}

#[test]
fn a_paused_vm_is_the_hosts_doing() {
    let t = trigger(
        "unresponsive",
        probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 3, false)]), true, None),
    );
    let v = judge(&t, &manifest(&t, Some("paused")), &files("", QEMU10), &[], None);
    assert_eq!(v.class, Class::PausedByHost);
    assert!(v.headline.contains("status 'paused'"), "{}", v.headline);
    assert!(
        v.evidence.iter().any(|e| e.line == "QMP status: paused" && e.source == "03-qmp-status.json"),
        "{v:?}"
    );
    // The status alone says it too.
    let t = trigger("unresponsive", json!({}));
    assert_eq!(judge(&t, &manifest(&t, Some("paused")), &[], &[], None).class, Class::PausedByHost);
}

#[test]
fn kernel_reports_name_the_class() {
    let t = trigger("unresponsive", json!({}));
    let m = manifest(&t, Some("running"));
    for (rc, class) in [
        (ReportClass::HardLockup, Class::HardLockup),
        (ReportClass::SoftLockup, Class::SoftLockup),
        (ReportClass::RcuStall, Class::RcuStall),
        (ReportClass::HungTask, Class::HungTask),
        (ReportClass::Oom, Class::Oom),
    ] {
        let v = judge(
            &t,
            &m,
            &files("", QEMU10),
            &[report(ReportClass::Nmi, "NMI"), report(rc, "the line")],
            None,
        );
        assert_eq!(v.class, class, "{v:?}");
        assert!(v.headline.contains("on CPU#1 for 44 s in `spin_fn+0x1c/0x30 [faults]`"), "{}", v.headline);
        assert_eq!(v.evidence[1], EvidenceLine { source: "kernel-report".into(), line: "the line".into() });
        assert!(v.evidence.iter().any(|e| e.line == " faults_thread+0x40/0x60 [faults]"));
    }
    // The most severe wins, whatever the order.
    let v =
        judge(&t, &m, &[], &[report(ReportClass::HungTask, "a"), report(ReportClass::SoftLockup, "b")], None);
    assert_eq!(v.class, Class::SoftLockup);
    let v = judge(&t, &m, &[], &[report(ReportClass::SoftLockup, "b")], None);
    assert_eq!(
        v.headline,
        "the guest kernel reports a soft lockup on CPU#1 for 44 s in `spin_fn+0x1c/0x30 [faults]`"
    );
}

#[test]
fn the_app_and_userspace() {
    let app = Some(json!({ "status": "failed", "details": "db down" }));
    let t = trigger(
        "unresponsive",
        probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 0, true)]), false, app),
    );
    let v = judge(&t, &manifest(&t, Some("running")), &[], &[], None);
    assert_eq!((v.class, v.headline.as_str()), (Class::AppFailed, "the app reports it failed: db down"));

    let sc = json!([
        scenario("acpi-heartbeat", "acpi-heartbeat", 0, true),
        scenario("shell", "console", 2, false)
    ]);
    let t = trigger("unresponsive", probe(sc, false, None));
    let v = judge(&t, &manifest(&t, Some("running")), &files("", QEMU10), &[], None);
    assert_eq!(v.class, Class::UserspaceStopped, "{v:?}");
    assert!(v.headline.contains("console scenario 'shell' missed 2 of 2"), "{}", v.headline);
    // The app's own heartbeat failing while the kernel answers: the app.
    let sc = json!([
        scenario("acpi-heartbeat", "acpi-heartbeat", 0, true),
        scenario("app", "app-heartbeat", 2, false)
    ]);
    let t = trigger("unresponsive", probe(sc, false, None));
    let v = judge(&t, &manifest(&t, Some("running")), &[], &[], None);
    assert_eq!(v.class, Class::AppFailed, "{v:?}");
    assert!(
        v.headline.starts_with("the app stopped answering: the app-heartbeat scenario 'app' missed 2 of 2"),
        "{}",
        v.headline
    );
    // With the heartbeat failing too it is not userspace alone.
    let sc = json!([
        scenario("acpi-heartbeat", "acpi-heartbeat", 3, false),
        scenario("shell", "console", 2, false)
    ]);
    let t = trigger("unresponsive", probe(sc, false, None));
    assert_eq!(
        judge(&t, &manifest(&t, Some("running")), &files("", QEMU10), &[], None).class,
        Class::Unknown
    );
}

#[test]
fn registers_alone_show_interrupts_off_and_symbols_name_the_function() {
    let t = trigger(
        "unresponsive",
        probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 3, false)]), false, None),
    );
    let m = manifest(&t, Some("running"));
    let v = judge(&t, &m, &files("", &spinning_irqs_off()), &[], None);
    assert_eq!(v.class, Class::HardLockup, "{v:?}");
    assert!(
        v.headline
            .starts_with("vCPU 0 spinning with interrupts disabled at RIP 0xffffffffc0236030 (module space)"),
        "{}",
        v.headline
    );
    let syms = Symbols::from_map(
        "ffffffffc0236000 t spin_fn\t[faults]\nffffffffc0236080 t other\t[faults]\n",
        "map",
    );
    let v = judge(&t, &m, &files("", &spinning_irqs_off()), &[], Some(&syms));
    assert!(v.headline.contains("spin_fn+0x30/0x80 [faults]"), "{}", v.headline);
    assert_eq!(v.evidence[1].source, "05-registers.txt");

    // An RCU stall on that CPU with interrupts off in the registers: a hard lockup.
    let mut rcu = report(ReportClass::RcuStall, "rcu: INFO: rcu_preempt self-detected stall on CPU");
    rcu.cpu = Some(0);
    let v = judge(&t, &m, &files("", &spinning_irqs_off()), &[rcu.clone()], None);
    assert_eq!(v.class, Class::HardLockup, "{v:?}");
    assert!(v.headline.starts_with("vCPU 0 spinning with interrupts disabled at RIP"), "{}", v.headline);
    assert!(v.headline.contains("; the guest kernel reports an RCU stall on CPU#0"), "{}", v.headline);
    // On another CPU, or with interrupts on, it stays an RCU stall.
    rcu.cpu = Some(1);
    assert_eq!(
        judge(&t, &m, &files("", &spinning_irqs_off()), std::slice::from_ref(&rcu), None).class,
        Class::RcuStall
    );
    assert_eq!(judge(&t, &m, &files("", QEMU10), &[rcu], None).class, Class::RcuStall);

    // The idle guest of QEMU 10's dump: halted, nothing found.
    let v = judge(&t, &m, &files("", QEMU10), &[], None);
    assert_eq!(v.class, Class::Unknown);
    assert!(v.headline.starts_with("no cause found: every vCPU is halted"), "{}", v.headline);
    let v = judge(&t, &m, &[], &[], None);
    assert_eq!(v.headline, "no cause found: no kernel report, and no registers were read");
}

#[test]
fn readings_tell_spinning_stopped_and_running() {
    let regs = |rip: u64, flags: u64, cpl: u8| CpuRegs {
        cpu: 2,
        rip: Some(rip),
        rsp: None,
        rflags: Some(flags),
        cpl: Some(cpl),
        cr3: None,
        halted: Some(false),
    };
    let read = |a: CpuRegs, b: CpuRegs| read_cpus(&[vec![a], vec![b]], Some(true), None).remove(0);
    let r = read(regs(0x400099, 0x246, 3), regs(0x400099, 0x246, 3));
    assert_eq!(r.text, "vCPU 2 spinning at RIP 0x0000000000400099 (user space), the same in all 2 samples");
    assert!(!r.stuck_irqs_off);
    // Paused by the host: the same RIP is a stopped vCPU.
    let r = read_cpus(&[vec![regs(0x400099, 0x246, 3)], vec![regs(0x400099, 0x246, 3)]], Some(false), None)
        .remove(0);
    assert_eq!(r.text, "vCPU 2 stopped at RIP 0x0000000000400099 (user space)");
    let r = read(regs(0xffffffff81000010, 0x86, 0), regs(0xffffffff81000020, 0x86, 0));
    assert!(
        r.text
            .starts_with("vCPU 2 spinning with interrupts disabled at RIP 0xffffffff81000020 (kernel text)"),
        "{}",
        r.text
    );
    assert!(r.stuck_irqs_off);
    let r = read(regs(0xffffffff81000010, 0x246, 0), regs(0xffffffff81900000, 0x246, 0));
    assert!(r.text.starts_with("vCPU 2 running at RIP"), "{}", r.text);
}

#[test]
fn a_starved_guest_reads_as_both_vcpus_spinning_in_user_space() {
    // QEMU 10's two samples of the starve fixture: rt-spin's one-instruction loop on each vCPU.
    let one = include_str!("testdata/info-registers-a-qemu10-starve.txt");
    let regs = format!("{one}\n{} 2, 300 ms after the first ===\n{one}", registers::SAMPLE_MARK);
    let t = trigger(
        "unresponsive",
        probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 3, false)]), false, None),
    );
    let v = judge(&t, &manifest(&t, Some("running")), &files("", &regs), &[], None);
    assert_eq!(v.class, Class::Unknown);
    assert_eq!(
        v.headline,
        "no kernel report; vCPU 0 spinning at RIP 0x0000000000400099 (user space), the same in all 2 samples (and 1 more \
         vCPU busy)"
    );
    assert_eq!(v.evidence.iter().filter(|e| e.source == "05-registers.txt").count(), 2);
}

/// Two samples of vCPU 1 in the kernel with interrupts on (IF set in RFLAGS 0x246), at `a` and
/// `b`; vCPU 0 halted.
fn kernel_irqs_on(a: &str, b: &str) -> String {
    let one = |rip: &str| {
        format!(
            "CPU#0\nRIP=ffffffff81a3c2e4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n\
             CPU#1\nRIP={rip} RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
             CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\n"
        )
    };
    format!("{}\n{} 2, 300 ms after the first ===\n{}", one(a), registers::SAMPLE_MARK, one(b))
}

#[test]
fn an_rcu_stall_of_a_cpu_spinning_with_interrupts_on_is_a_soft_lockup() {
    let t = trigger("unresponsive", json!({ "kernel_report": "rcu-stall" }));
    let m = manifest(&t, Some("running"));
    let rcu = report(ReportClass::RcuStall, "rcu: INFO: rcu_preempt self-detected stall on CPU");
    let spin = kernel_irqs_on("ffffffffc02a6012", "ffffffffc02a6010");
    let v = judge(&t, &m, &files("", &spin), std::slice::from_ref(&rcu), None);
    assert_eq!(v.class, Class::SoftLockup, "{v:?}");
    assert!(
        v.headline.starts_with(
            "a soft lockup of CPU#1: the guest kernel reports an RCU stall on CPU#1 for 44 s in `spin_fn+0x1c/0x30 [faults]`, \
             and the registers show it in the kernel with interrupts on: vCPU 1 spinning at RIP 0xffffffffc02a6010 (module space)"
        ),
        "{}",
        v.headline
    );
    // The RCU report and the registers are the evidence.
    assert!(v.evidence.iter().any(|e| e.source == "kernel-report" && e.line.contains("self-detected stall")));
    assert!(v
        .evidence
        .iter()
        .any(|e| e.source == "05-registers.txt" && e.line.starts_with("vCPU 1 spinning")));
    // Honest otherwise: running all over the kernel, the stall on another CPU, one sample only,
    // or no CPU named: an RCU stall.
    let running = kernel_irqs_on("ffffffff81000010", "ffffffff81900000");
    assert_eq!(judge(&t, &m, &files("", &running), std::slice::from_ref(&rcu), None).class, Class::RcuStall);
    let mut other = rcu.clone();
    other.cpu = Some(0);
    assert_eq!(judge(&t, &m, &files("", &spin), &[other], None).class, Class::RcuStall);
    let one = spin.split(registers::SAMPLE_MARK).next().unwrap().to_string();
    assert_eq!(judge(&t, &m, &files("", &one), std::slice::from_ref(&rcu), None).class, Class::RcuStall);
    let mut unnamed = rcu;
    unnamed.cpu = None;
    assert_eq!(judge(&t, &m, &files("", &spin), &[unnamed], None).class, Class::RcuStall);
}

#[test]
fn a_failing_vcpu_progress_scenario_is_a_hard_lockup_not_userspace() {
    let sc = json!([
        scenario("acpi-heartbeat", "acpi-heartbeat", 0, true),
        scenario("vcpu-progress", "vcpu-progress", 3, false)
    ]);
    let t = trigger("unresponsive", probe(sc, false, None));
    let m = manifest(&t, Some("running"));
    // The bundle's registers show it too: they are the headline.
    let v = judge(&t, &m, &files("", &spinning_irqs_off()), &[], None);
    assert_eq!(v.class, Class::HardLockup, "{v:?}");
    assert!(v.headline.starts_with("vCPU 0 spinning with interrupts disabled"), "{}", v.headline);
    // They do not (idle by then, or not read): the scenario's own samples are.
    let v = judge(&t, &m, &files("", QEMU10), &[], None);
    assert_eq!(v.class, Class::HardLockup, "{v:?}");
    assert_eq!(v.headline, "the vcpu-progress scenario: no match within 5s");
    // Not failing (below its threshold): nothing from it.
    let sc = json!([
        scenario("acpi-heartbeat", "acpi-heartbeat", 0, true),
        scenario("vcpu-progress", "vcpu-progress", 1, false)
    ]);
    let t = trigger("unresponsive", probe(sc, false, None));
    assert_eq!(
        judge(&t, &manifest(&t, Some("running")), &files("", QEMU10), &[], None).class,
        Class::Unknown
    );
}

mod host_side {
    use super::*;
    use crate::host::{CgroupCpu, Drive, HostReport, IoError, IoErrors, QemuProcess, VcpuActivity};

    fn vcpu(cpu: u32, busy: f64, wait: f64, busy_for_s: u64) -> VcpuActivity {
        VcpuActivity {
            cpu,
            thread: 100 + cpu,
            state: if busy > 0.5 { "R".into() } else { "S".into() },
            busy_10s: Some(busy),
            wait_10s: Some(wait),
            busy_for_s,
            ..Default::default()
        }
    }

    fn host(f: impl FnOnce(&mut HostReport)) -> StepFile {
        let mut r = HostReport {
            schema: crate::host::SCHEMA.into(),
            time: "2026-01-01T00:00:30.000Z".into(),
            qemu: Some(QemuProcess { pid: 42, state: "S".into(), threads: 6, ..Default::default() }),
            vcpus: vec![vcpu(0, 0.01, 0.0, 0), vcpu(1, 0.02, 0.0, 0)],
            ..Default::default()
        };
        r.node.cpus = 2;
        f(&mut r);
        StepFile {
            step: "host".into(),
            file: "01-host.json".into(),
            text: serde_json::to_string(&r).unwrap(),
        }
    }

    fn failing_disk(action: &str, io_status: Option<&str>) -> Drive {
        let e = |time: &str| IoError {
            time: time.into(),
            operation: "write".into(),
            action: action.into(),
            nospace: false,
            reason: "Input/output error".into(),
        };
        Drive {
            device: "disk0".into(),
            io_status: io_status.map(str::to_string),
            errors: Some(IoErrors {
                count: 37,
                first: e("2026-01-01T00:00:07.000Z"),
                last: e("2026-01-01T00:00:20.000Z"),
            }),
            ..Default::default()
        }
    }

    fn unresponsive() -> Trigger {
        trigger(
            "unresponsive",
            probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 3, false)]), false, None),
        )
    }

    fn judged(status: &str, files: Vec<StepFile>, reports: &[KernelReport]) -> Verdict {
        let t = unresponsive();
        judge(&t, &manifest(&t, Some(status)), &files, reports, None)
    }

    #[test]
    fn a_stopped_qemu_process_is_the_hosts_doing() {
        let h = host(|r| {
            let q = r.qemu.as_mut().unwrap();
            (q.state, q.stopped_threads) = ("T".into(), 6);
        });
        let v = judged("running", vec![h], &[]);
        assert_eq!(v.class, Class::PausedByHost, "{v:?}");
        assert!(
            v.headline
                .starts_with("the QEMU process (pid 42) is stopped on the host: all 6 threads in state T"),
            "{}",
            v.headline
        );
        assert!(
            v.evidence.iter().any(|e| e.source == "01-host.json" && e.line.contains("6 stopped")),
            "{v:?}"
        );
    }

    #[test]
    fn an_io_error_stop_names_the_drive() {
        let h = host(|r| r.devices.block.push(failing_disk("stop", Some("failed"))));
        let v = judged("io-error", vec![h.clone()], &[]);
        assert_eq!(v.class, Class::PausedByIoError, "{v:?}");
        assert!(
            v.headline.starts_with("paused by the host after an I/O error on drive `disk0` io-status failed since 00:00:07 (BLOCK_IO_ERROR: write, Input/output error, action stop; 37 errors)"),
            "{}",
            v.headline
        );
        // Paused with the last error's action `stop`: the same, whatever QMP's status name.
        let t = trigger("paused", probe(json!([]), true, None));
        let v = judge(&t, &manifest(&t, Some("paused")), &[h], &[], None);
        assert_eq!(v.class, Class::PausedByIoError, "{v:?}");
        // A pause with no I/O error is still the host's plain pause.
        let v = judge(&t, &manifest(&t, Some("paused")), &[host(|_| {})], &[], None);
        assert_eq!(v.class, Class::PausedByHost, "{v:?}");
    }

    #[test]
    fn a_guest_waiting_on_a_failed_drive() {
        let h = host(|r| r.devices.block.push(failing_disk("report", None)));
        let v = judged("running", vec![h.clone()], &[]);
        assert_eq!(v.class, Class::WaitingOnIo, "{v:?}");
        assert!(
            v.headline.starts_with("guest waiting: all vCPUs idle; drive `disk0` failing since 00:00:07"),
            "{}",
            v.headline
        );
        let mut hung =
            report(ReportClass::HungTask, "INFO: task sync:123 blocked for more than 120 seconds.");
        hung.cpu = None;
        let v = judged("running", vec![h], &[hung]);
        assert_eq!(v.class, Class::WaitingOnIo, "{v:?}");
        assert!(
            v.headline.contains("guest waiting on I/O: drive `disk0`") && v.headline.contains("a hung task"),
            "{}",
            v.headline
        );
        // An error long before the report explains nothing.
        let old = host(|r| {
            r.time = "2026-01-01T01:00:00.000Z".into();
            r.devices.block.push(failing_disk("report", None));
        });
        assert_eq!(judged("running", vec![old], &[]).class, Class::Unknown);
    }

    #[test]
    fn a_throttled_or_outrun_vm_is_starved_and_a_merely_busy_one_is_not() {
        let throttled = host(|r| {
            r.qemu.as_mut().unwrap().cgroup = Some(CgroupCpu {
                version: 1,
                quota: Some("10000/100000".into()),
                throttled_periods_10s: Some(0.9),
                ..Default::default()
            });
        });
        let soft =
            report(ReportClass::SoftLockup, "watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [faults:99]");
        let v = judged("running", vec![throttled], std::slice::from_ref(&soft));
        assert_eq!(v.class, Class::Starved, "{v:?}");
        assert!(v.headline.starts_with("VM starved: QEMU's cgroup throttled in 90 % of the last 10 s's periods (quota 10000/100000 µs); the guest kernel reports a soft lockup"), "{}", v.headline);
        let outrun = host(|r| r.vcpus[1] = vcpu(1, 0.2, 0.7, 10));
        let v = judged("running", vec![outrun], &[]);
        assert_eq!(v.class, Class::Starved, "{v:?}");
        assert!(
            v.headline.contains("vCPU 1's thread waited for a host CPU 70 % of the last 10 s and ran 20 %"),
            "{}",
            v.headline
        );
        // Sharing a loaded host (waited as long as it ran) is not starvation.
        let shared = host(|r| r.vcpus[1] = vcpu(1, 0.45, 0.5, 10));
        let v = judged("running", vec![shared], &[soft]);
        assert_eq!(v.class, Class::SoftLockup, "{v:?}");
        assert!(
            v.headline.ends_with("; on the host, vCPU 1 at 95 % of a host CPU for 10 s"),
            "{}",
            v.headline
        );
    }

    #[test]
    fn a_vcpu_the_host_sees_busy_is_spinning() {
        let spin = host(|r| r.vcpus[1] = vcpu(1, 0.99, 0.0, 12));
        let v = judged("running", vec![spin.clone()], &[]);
        assert_eq!(v.class, Class::Spinning, "{v:?}");
        assert_eq!(
            v.headline,
            "guest spinning: vCPU 1 at 99 % of a host CPU for 12 s, and the kernel reported nothing"
        );
        // With the registers stuck with interrupts off on that vCPU: a hard lockup, spinning.
        let regs = spinning_irqs_off().replace("CPU#0", "CPU#1");
        let t = unresponsive();
        let files =
            vec![spin, StepFile { step: "registers".into(), file: "05-registers.txt".into(), text: regs }];
        let v = judge(&t, &manifest(&t, Some("running")), &files, &[], None);
        assert_eq!(v.class, Class::HardLockup, "{v:?}");
        assert!(
            v.headline.starts_with("guest spinning: vCPU 1 at 99 % of a host CPU for 12 s; vCPU 1 spinning with interrupts disabled"),
            "{}",
            v.headline
        );
        // Every vCPU idle on the host and no drive failing: no cause, as before.
        assert_eq!(judged("running", vec![host(|_| {})], &[]).class, Class::Unknown);
    }

    #[test]
    fn a_host_file_that_is_not_a_host_report_is_ignored() {
        let junk =
            StepFile { step: "host".into(), file: "01-host.json".into(), text: "{\"schema\": 3}".into() };
        assert_eq!(judged("running", vec![junk], &[]).class, Class::Unknown);
    }
}

#[test]
fn registers_unmoved_on_a_vcpu_the_host_did_not_run_are_starvation_not_a_lockup() {
    use crate::host::{CgroupCpu, HostReport, QemuProcess, VcpuActivity};
    let t = trigger(
        "unresponsive",
        probe(json!([scenario("acpi-heartbeat", "acpi-heartbeat", 3, false)]), false, None),
    );
    let regs = spinning_irqs_off();
    let mut r = HostReport {
        schema: crate::host::SCHEMA.into(),
        time: "2026-01-01T00:00:30.000Z".into(),
        qemu: Some(QemuProcess {
            pid: 7,
            state: "S".into(),
            threads: 5,
            cgroup: Some(CgroupCpu { throttled_periods_10s: Some(0.98), ..Default::default() }),
            ..Default::default()
        }),
        vcpus: vec![VcpuActivity { cpu: 0, busy_10s: Some(0.0), wait_10s: Some(0.7), ..Default::default() }],
        ..Default::default()
    };
    let files = |r: &HostReport| {
        vec![
            StepFile { step: "registers".into(), file: "05-registers.txt".into(), text: regs.clone() },
            StepFile {
                step: "host".into(),
                file: "01-host.json".into(),
                text: serde_json::to_string(r).unwrap(),
            },
        ]
    };
    let v = judge(&t, &manifest(&t, Some("running")), &files(&r), &[], None);
    assert_eq!(v.class, Class::Starved, "{v:?}");
    // The same registers on a vCPU the host ran: a hard lockup.
    r.qemu.as_mut().unwrap().cgroup = None;
    r.vcpus[0].busy_10s = Some(0.95);
    r.vcpus[0].wait_10s = Some(0.0);
    let v = judge(&t, &manifest(&t, Some("running")), &files(&r), &[], None);
    assert_eq!(v.class, Class::HardLockup, "{v:?}");
}

#[test]
fn a_panic_the_console_missed_is_read_from_the_kernel_log() {
    let t = trigger("panicked", json!({ "event": "GUEST_PANICKED" }));
    let log = "[    0.000000] Linux version 6.1.0-57-amd64\n[    9.1] sysrq: Trigger a crash\n\
               [    9.1] Kernel panic - not syncing: sysrq triggered crash\n[    9.1] CPU: 0 PID: 1 Comm: sh\n\
               [    9.1] Call Trace:\n[    9.1]  <TASK>\n[    9.1]  dump_stack_lvl+0x44/0x5c\n\
               [    9.1]  panic+0x118/0x2f4\n[    9.1]  sysrq_handle_crash+0x16/0x20\n[    9.1]  </TASK>\n";
    let files = vec![
        StepFile { step: "console-tail".into(), file: "02-console-tail.txt".into(), text: "login: ".into() },
        StepFile { step: "kernel-log".into(), file: "04-kernel-log.txt".into(), text: log.into() },
    ];
    let v = judge(&t, &manifest(&t, Some("guest-panicked")), &files, &[], None);
    assert_eq!(v.class, Class::Panic, "{v:?}");
    assert_eq!(v.headline, "the guest kernel panicked: not syncing: sysrq triggered crash");
    assert!(
        v.evidence.iter().any(|e| e.source == "04-kernel-log.txt" && e.line.contains("sysrq_handle_crash")),
        "{v:?}"
    );
}
