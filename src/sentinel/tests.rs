//! One test per class on real kernel output: the fixture kernels' own console (captured from
//! acpimon's guests into tests/data/kernel-reports/) where a fixture can produce the report,
//! else a few lines from a public report, whose source each test names.

use super::*;

fn data(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kernel-reports").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn only(reports: &[KernelReport], class: ReportClass) -> Vec<&KernelReport> {
    reports.iter().filter(|r| r.class == class).collect()
}

#[test]
fn the_table_compiles_and_every_class_has_a_row() {
    assert_eq!(TABLE.rows.len(), ROWS.len());
    for class in ReportClass::ALL {
        assert!(ROWS.iter().any(|r| r.class == class), "{class} has no row");
        let json = serde_json::to_value(class).unwrap();
        assert_eq!(json, class.name(), "the name is the serialised form");
    }
}

/// The fixture's `panic` scenario (SysRq c) on each fixture kernel: the console of a whole
/// boot, where the panic is the only report.
#[test]
fn panic_on_every_fixture_kernel() {
    for kernel in ["5.10", "6.1", "6.12"] {
        let reports = scan_text(&data(&format!("panic-sysrq-{kernel}.log")));
        assert_eq!(reports.len(), 1, "{kernel}: {reports:#?}");
        let r = &reports[0];
        assert_eq!(r.class, ReportClass::Panic, "{kernel}");
        assert_eq!(r.line, "Kernel panic - not syncing: sysrq triggered crash", "{kernel}");
        assert_eq!(r.task.as_deref(), Some("init"), "{kernel}");
        assert_eq!(r.pid, Some(1), "{kernel}");
        assert!(r.cpu.is_some(), "{kernel}");
        // dump_stack and panic are how it was printed; the crash is SysRq's.
        assert!(
            r.location.as_deref().is_some_and(|l| l.starts_with("sysrq_handle_crash+0x")),
            "{kernel}: {r:#?}"
        );
        assert!(r.trace.iter().any(|l| l.starts_with("---[ end Kernel panic")), "{kernel}: {:#?}", r.trace);
        // The guest's own line interleaved with the kernel's is not part of the report.
        assert!(!r.trace.iter().any(|l| l.contains("ACPIMON-GUEST")), "{kernel}: {:#?}", r.trace);
    }
}

/// SysRq f (a manual OOM kill), SysRq l (NMI backtraces) and QMP inject-nmi, on the fixture's
/// healthy guest, 2 vCPUs.
#[test]
fn oom_kill_and_nmi_on_the_fixture_kernels() {
    for kernel in ["5.10", "6.1", "6.12"] {
        let reports = scan_text(&data(&format!("sysrq-oom-nmi-{kernel}.log")));
        let oom = only(&reports, ReportClass::Oom);
        assert_eq!(oom.len(), 1, "{kernel}: {reports:#?}");
        let oom = oom[0];
        assert!(oom.line.starts_with("Out of memory: Killed process "), "{kernel}: {}", oom.line);
        assert_eq!(oom.task.as_deref(), Some("sh"), "{kernel}: the victim");
        assert!(oom.trace.iter().any(|l| l.contains("invoked oom-killer")), "{kernel}");
        let nmi = only(&reports, ReportClass::Nmi);
        assert!(
            nmi.iter()
                .any(|r| r.line.starts_with("Uhhuh. NMI received for unknown reason") && r.cpu == Some(0)),
            "{kernel}: {nmi:#?}"
        );
        assert!(nmi.iter().any(|r| r.line.starts_with("NMI backtrace for cpu")), "{kernel}: {nmi:#?}");
        assert!(
            reports.iter().all(|r| matches!(r.class, ReportClass::Oom | ReportClass::Nmi)),
            "{kernel}: {reports:#?}"
        );
    }
}

// Source: github.com/Open-CAS/ocf issue 408 (an x86 soft lockup, as printed by 4.15; the
// format is the same in 5.10 to 6.12: kernel/watchdog.c).
const SOFT_LOCKUP: &str = "\
watchdog: BUG: soft lockup - CPU#51 stuck for 22s! [pacd:140354]
Modules linked in: macvlan cfg80211 ceph libceph
CPU: 51 PID: 140354 Comm: pacd Tainted: G           OE    4.15.0-29-generic #31-Ubuntu
Hardware name: Supermicro PIO-848B-TRF4T-ST031/X10QBI, BIOS 3.2a 08/08/2019
RIP: 0010:_raw_spin_unlock_irqrestore+0x15/0x20
";

#[test]
fn soft_lockup() {
    let r = scan_text(SOFT_LOCKUP);
    assert_eq!(r.len(), 1, "{r:#?}");
    let r = &r[0];
    assert_eq!(r.class, ReportClass::SoftLockup);
    assert_eq!((r.cpu, r.stuck_s, r.pid), (Some(51), Some(22), Some(140354)));
    assert_eq!(r.task.as_deref(), Some("pacd"));
    assert_eq!(r.location.as_deref(), Some("_raw_spin_unlock_irqrestore+0x15/0x20"));
    assert_eq!(r.trace.len(), 4);
    assert_eq!(
        r.summary(),
        "the guest kernel reports a soft lockup on CPU#51 (task pacd:140354) for 22 s in \
         `_raw_spin_unlock_irqrestore+0x15/0x20`: watchdog: BUG: soft lockup - CPU#51 stuck for 22s! [pacd:140354]"
    );
}

// Source: github.com/sonic-net/sonic-buildimage issue 17363 (Debian's 5.10.0-18 kernel).
const HARD_LOCKUP: &str = "\
[ 5300.443503] NMI watchdog: Watchdog detected hard LOCKUP on cpu 1
[ 5300.443571] CPU: 1 PID: 0 Comm: swapper/1 Tainted: G OE 5.10.0-18-2-amd64 #1 Debian 5.10.140-1
[ 5300.443584]  qi_flush_iotlb+0x83/0xb0
[ 5300.443586]  ? fq_ring_free+0x100/0x100
";

#[test]
fn hard_lockup() {
    let r = scan_text(HARD_LOCKUP);
    assert_eq!(r.len(), 1, "{r:#?}");
    let r = &r[0];
    assert_eq!(r.class, ReportClass::HardLockup);
    assert_eq!((r.cpu, r.pid), (Some(1), Some(0)));
    assert_eq!(r.task.as_deref(), Some("swapper/1"));
    assert_eq!(r.location.as_deref(), Some("qi_flush_iotlb+0x83/0xb0"));
    // 6.7+ (kernel/watchdog.c) names the CPU that noticed, for the buddy detector.
    let r = scan_text("[  40.1] x\n[   41.000000] watchdog: CPU0: Watchdog detected hard LOCKUP on cpu 1\n");
    assert_eq!((r[0].class, r[0].cpu), (ReportClass::HardLockup, Some(1)));
}

// Source: github.com/oxidecomputer/propolis issue 1153 (a 6.18 guest; journal lines, whose
// `host kernel: ` prefix the scanner strips).
const RCU_SELF: &str = "\
Jun 11 14:12:22 oxcolo kernel: rcu: INFO: rcu_preempt self-detected stall on CPU
Jun 11 14:12:22 oxcolo kernel: rcu:         0-....: (1 GPs behind) idle=3514/0/0x3 softirq=671080/671080 fqs=3762
Jun 11 14:12:22 oxcolo kernel: rcu:         (t=21002 jiffies g=1292137 q=85 ncpus=2)
Jun 11 14:12:22 oxcolo kernel: CPU: 0 UID: 0 PID: 0 Comm: swapper/0 Not tainted 6.18.33 #1-NixOS PREEMPT(lazy)
Jun 11 14:12:22 oxcolo kernel: RIP: 0010:handle_softirqs+0x8b/0x2a0
";

// Source: github.com/cilium/tetragon issue 328 (stalls detected by another CPU).
const RCU_OTHER: &str = "\
[  103.087243] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:
[  103.087558] rcu: \t1-...!: (0 ticks this GP) idle=cf8/0/0x0 softirq=20/20 fqs=0
[  103.087821] \t(detected by 0, t=38227 jiffies, g=-1127, q=10)
[  103.088024] Sending NMI from CPU 0 to CPUs 1:
[  103.088684] NMI backtrace for cpu 1 skipped: idling at default_idle+0x1e/0x130
";

#[test]
fn rcu_stall() {
    let r = scan_text(RCU_SELF);
    assert_eq!(r.len(), 1, "{r:#?}");
    assert_eq!(r[0].class, ReportClass::RcuStall);
    assert_eq!(r[0].cpu, Some(0));
    assert_eq!(r[0].location.as_deref(), Some("handle_softirqs+0x8b/0x2a0"));
    assert_eq!(r[0].line, "rcu: INFO: rcu_preempt self-detected stall on CPU");
    let r = scan_text(RCU_OTHER);
    assert_eq!(r.len(), 1, "the NMI backtrace belongs to the stall: {r:#?}");
    assert_eq!((r[0].class, r[0].cpu), (ReportClass::RcuStall, Some(1)));
    assert_eq!(r[0].trace.len(), 4);
}

// Source: github.com/thesofproject/linux issue 3387 (5.18; a task name with a colon).
const HUNG_TASK: &str = "\
May 31 22:34:22 sh-tglh-0a70-hda-01 kernel: INFO: task kworker/u32:2:113 blocked for more than 122 seconds.
May 31 22:34:22 sh-tglh-0a70-hda-01 kernel:       Not tainted 5.18.0-rc2-daily-default-20220531-0-g46f61a08b40c #dev
May 31 22:34:22 sh-tglh-0a70-hda-01 kernel: \"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.
May 31 22:34:22 sh-tglh-0a70-hda-01 kernel: task:kworker/u32:2   state:D stack:13032 pid:  113 ppid:     2 flags:0x00004000
";

#[test]
fn hung_task() {
    let r = scan_text(HUNG_TASK);
    assert_eq!(r.len(), 1, "{r:#?}");
    let r = &r[0];
    assert_eq!(r.class, ReportClass::HungTask);
    assert_eq!(r.task.as_deref(), Some("kworker/u32:2"));
    assert_eq!((r.pid, r.stuck_s), (Some(113), Some(122)));
    assert_eq!(r.trace.len(), 3);
}

// Source: github.com/openzfs/zfs issue 13687 (5.17, no console timestamps).
const OOPS: &str = "\
BUG: kernel NULL pointer dereference, address: 0000000000000020
#PF: supervisor read access in kernel mode
#PF: error_code(0x0000) - not-present page
PGD 0 P4D 0 
Oops: 0000 [#1] PREEMPT SMP PTI
CPU: 5 PID: 2962 Comm: z_wr_iss Tainted: P           O      5.17.0-1013-oem #14-Ubuntu
RIP: 0010:zap_leaf_lookup+0x4d/0x170 [zfs]
Call Trace:
 <TASK>
 fzap_length+0x85/0xf0 [zfs]
";

#[test]
fn oops() {
    let r = scan_text(OOPS);
    assert_eq!(r.len(), 1, "the Oops: line continues the fault's report: {r:#?}");
    let r = &r[0];
    assert_eq!(r.class, ReportClass::Oops);
    assert_eq!(r.line, "BUG: kernel NULL pointer dereference, address: 0000000000000020");
    assert_eq!((r.cpu, r.pid, r.task.as_deref()), (Some(5), Some(2962), Some("z_wr_iss")));
    assert_eq!(r.location.as_deref(), Some("zap_leaf_lookup+0x4d/0x170 [zfs]"), "RIP, not the first frame");
    // A user-space general protection fault is the kernel's line too, but no Oops.
    assert!(scan_text("traps: a.out[77] general protection fault ip:40 sp:7ff error:0 in a.out\n").is_empty());
    for line in [
        "kernel BUG at mm/slub.c:321!",
        "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP NOPTI",
        "Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
    ] {
        assert_eq!(scan_text(line)[0].class, ReportClass::Oops, "{line}");
    }
}

// Source: github.com/coolsnowwolf/lede issue 6147 (5.x, blk_update_request: prefix), and
// github.com/oxidecomputer/crucible issue 1844 (6.x, no prefix).
const IO_ERRORS: &str = "\
[21628.544418] blk_update_request: critical target error, dev sdb, sector 629659920 op 0x1:(WRITE) flags 0x800 phys_seg 8 prio class 0
[21628.545380] Aborting journal on device sdb1-8.
[23423.106966] EXT4-fs error (device sdb1): ext4_journal_check_start:61: Detected aborted journal
[23423.107180] EXT4-fs (sdb1): Remounting filesystem read-only
[23431.142359] Buffer I/O error on dev sdb1, logical block 0, lost sync page write
[ 4730.850358] I/O error, dev nvme0n1, sector 167431176 op 0x1:(WRITE) flags 0x4000 phys_seg 128 prio class 0
";

#[test]
fn io_errors_and_read_only() {
    let r = scan_text(IO_ERRORS);
    let classes: Vec<_> = r.iter().map(|r| (r.class, r.location.clone().unwrap_or_default())).collect();
    assert_eq!(
        classes,
        [
            (ReportClass::IoError, "dev sdb".to_string()),
            (ReportClass::ReadOnly, "dev sdb1".into()),
            (ReportClass::IoError, "dev sdb1".into()),
            (ReportClass::IoError, "dev nvme0n1".into()),
        ]
    );
}

#[test]
fn streaming_is_bounded_and_splits_anywhere() {
    let text = data("panic-sysrq-6.1.log");
    let whole = scan_text(&text);
    // Fed a byte at a time, the same report comes out.
    let mut s = Scanner::new();
    let mut got = Vec::new();
    for b in text.as_bytes() {
        got.extend(s.feed(std::slice::from_ref(b)));
    }
    got.extend(s.flush());
    assert_eq!(got, whole);
    // A long line is cut, a long trace is capped, control characters are neutralised.
    let mut s = Scanner::new();
    let mut input = b"[    1.000000] Kernel panic - not syncing: \x1b[2J".to_vec();
    input.extend(vec![b'x'; 100_000]);
    input.push(b'\n');
    for i in 0..10_000 {
        input.extend(format!("[    1.000001]  frame_{i}+0x1/0x2\n").as_bytes());
    }
    let mut out = s.feed(&input);
    out.extend(s.flush());
    assert_eq!(out.len(), 1);
    let r = &out[0];
    assert!(r.line.starts_with("Kernel panic - not syncing: ^[[2J"), "{}", r.line);
    assert!(r.line.chars().count() <= LINE_MAX + 1);
    assert_eq!(r.trace.len(), TRACE_LINES);
    assert_eq!(r.location.as_deref(), Some("frame_0+0x1/0x2"));
}

#[test]
fn a_line_logged_later_ends_the_report_and_repeats_are_separate() {
    let text = "\
[   47.100000] watchdog: BUG: soft lockup - CPU#1 stuck for 44s! [insmod:93]
[   47.100100] RIP: 0010:spin_fn+0x10/0x20 [faults]
[   49.900000] random: crng init done
[   75.100000] watchdog: BUG: soft lockup - CPU#1 stuck for 70s! [insmod:93]
";
    let r = scan_text(text);
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_eq!(r[0].trace, ["RIP: 0010:spin_fn+0x10/0x20 [faults]"]);
    assert_eq!(r[0].location.as_deref(), Some("spin_fn+0x10/0x20 [faults]"));
    assert_eq!((r[1].stuck_s, r[1].location.as_deref()), (Some(70), None));
    // A report stays open (pending) until something ends it.
    let mut s = Scanner::new();
    assert!(s.feed(text.lines().next().unwrap().as_bytes()).is_empty());
    assert!(s.pending().is_none(), "no line yet, only bytes");
    assert!(s.feed(b"\n").is_empty());
    assert_eq!(s.pending().map(|r| r.class), Some(ReportClass::SoftLockup));
    assert!(s.flush().is_some() && s.pending().is_none());
}

/// The fixture's fault module (branch faultmod's captures, tests/data/kernel-reports/README.md):
/// what a soft-locked CPU 1 of a 2-vCPU 6.1 guest prints.
#[test]
fn fault_module_soft_lockup_on_cpu_1() {
    let r = scan_text(&data("6.1-soft-lockup.txt"));
    let first = &r[0];
    assert_eq!((first.class, first.cpu), (ReportClass::RcuStall, Some(1)), "RCU notices first: {r:#?}");
    assert_eq!(first.location.as_deref(), Some("acpimon_soft_lockup+0x21/0x23 [acpimon_faults]"));
    let soft = only(&r, ReportClass::SoftLockup);
    assert!(soft.len() >= 2, "it repeats: {r:#?}");
    let s = soft[0];
    assert_eq!((s.cpu, s.stuck_s, s.pid), (Some(1), Some(48), Some(124)));
    assert_eq!(s.task.as_deref(), Some("acpimon-soft/1"));
    assert_eq!(s.location.as_deref(), Some("acpimon_soft_lockup+0x21/0x23 [acpimon_faults]"));
    assert!(s.trace.last().is_some_and(|l| l.trim() == "</TASK>"), "{:#?}", s.trace);
    assert!(r.iter().all(|r| matches!(r.class, ReportClass::RcuStall | ReportClass::SoftLockup)), "{r:#?}");
}

/// CPU 1 hard-locked (interrupts off) under TCG, which has no NMI watchdog: CPU 0 reports the
/// RCU stall with CPU 1's NMI backtrace, then its own soft lockup waiting for CPU 1.
#[test]
fn fault_module_hard_lockup_seen_as_an_rcu_stall() {
    let r = scan_text(&data("6.1-rcu-stall.txt"));
    let rcu = only(&r, ReportClass::RcuStall);
    assert!(!rcu.is_empty(), "{r:#?}");
    assert_eq!(rcu[0].cpu, Some(1), "{:#?}", rcu[0]);
    assert!(rcu[0].line.contains("detected stalls on CPUs/tasks"));
    assert!(
        rcu[0].location.as_deref().is_some_and(|l| l.contains("[acpimon_faults]")),
        "the NMI backtrace of CPU 1 names the culprit: {:#?}",
        rcu[0]
    );
    let soft = only(&r, ReportClass::SoftLockup);
    assert!(soft.iter().any(|s| s.cpu == Some(0)), "{r:#?}");
}

#[test]
fn fault_module_hung_task() {
    let r = scan_text(&data("6.1-hung-task.txt"));
    let hung = only(&r, ReportClass::HungTask);
    assert!(hung.len() >= 2, "every check: {r:#?}");
    let h = hung[0];
    assert_eq!((h.task.as_deref(), h.pid, h.stuck_s), (Some("acpimon-hung"), Some(125), Some(10)));
    assert!(h.location.is_some(), "{h:#?}");
}

#[test]
fn fault_module_oom_and_panic() {
    let r = scan_text(&data("6.1-oom.txt"));
    let oom = only(&r, ReportClass::Oom);
    assert_eq!(oom.len(), 1, "{r:#?}");
    assert_eq!((oom[0].task.as_deref(), oom[0].pid), (Some("tail"), Some(125)));
    assert!(oom[0].line.starts_with("Out of memory: Killed process 125 (tail)"));
    let r = scan_text(&data("6.1-panic.txt"));
    assert_eq!(r.len(), 1, "{r:#?}");
    assert_eq!(r[0].class, ReportClass::Panic);
    assert!(r[0].location.as_deref().is_some_and(|l| l.starts_with("sysrq_handle_crash+")), "{:#?}", r[0]);
}

/// The same faults on 5.10 (`rcu_sched`; its soft lockup count restarts at each report) and
/// 6.12 (a taint legend line of its own).
#[test]
fn fault_module_on_5_10_and_6_12() {
    for (kernel, first_stuck) in [("5.10", 22), ("6.12", 45)] {
        let r = scan_text(&data(&format!("{kernel}-soft-lockup.txt")));
        assert_eq!((r[0].class, r[0].cpu), (ReportClass::RcuStall, Some(1)), "{kernel}: {r:#?}");
        assert!(
            r[0].location.as_deref().is_some_and(|l| l.ends_with("[acpimon_faults]")),
            "{kernel}: {:#?}",
            r[0]
        );
        let soft = only(&r, ReportClass::SoftLockup);
        assert!(soft.len() >= 2, "{kernel}: {r:#?}");
        assert_eq!((soft[0].cpu, soft[0].stuck_s), (Some(1), Some(first_stuck)), "{kernel}");
        assert!(
            soft[0].location.as_deref().is_some_and(|l| l.starts_with("acpimon_soft_lockup+")),
            "{kernel}: {:#?}",
            soft[0]
        );
        let hung = scan_text(&data(&format!("{kernel}-hung-task.txt")));
        let hung = only(&hung, ReportClass::HungTask);
        assert!(!hung.is_empty(), "{kernel}");
        assert_eq!((hung[0].task.as_deref(), hung[0].stuck_s), (Some("acpimon-hung"), Some(10)), "{kernel}");
        // CPU 0 waiting for a hard-locked CPU 1 to answer an IPI.
        let ipi = scan_text(&data(&format!("{kernel}-soft-lockup-ipi-wait.txt")));
        let ipi = only(&ipi, ReportClass::SoftLockup);
        assert_eq!((ipi[0].cpu, ipi[0].task.as_deref()), (Some(0), Some("modprobe")), "{kernel}: {ipi:#?}");
    }
}
