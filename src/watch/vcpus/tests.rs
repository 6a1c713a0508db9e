use std::time::{Duration, Instant};

use super::*;

/// A real `info registers -a` reply (QEMU 10.0, TCG, Debian 6.1, two vCPUs): CPU 0 idle at
/// `hlt`, CPU 1 hard-locked by qemu-fixtures/faults (`acpimon_hard_lockup`, interrupts off).
const HARD_LOCKUP: &str = include_str!("info-registers-hard-lockup.txt");

#[test]
fn a_real_reply_gives_every_vcpu() {
    let s = parse_registers(HARD_LOCKUP, None);
    assert_eq!(
        s,
        vec![
            VcpuSample { cpu: 0, rip: 0xffffffff81a592eb, rflags: 0x246, cpl: 0, halted: true },
            VcpuSample { cpu: 1, rip: 0xffffffffc022e02a, rflags: 0x46, cpl: 0, halted: false },
        ]
    );
    assert!(s[0].interrupts_on() && !s[0].stuck());
    assert!(!s[1].interrupts_on() && s[1].stuck());
}

#[test]
fn one_vcpus_reply_and_other_modes_parse() {
    // `info registers` on one vCPU has no CPU# header; outside long mode it says EIP/EFL.
    let one = "EAX=00000000 EBX=00000000\nEIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n";
    assert_eq!(
        parse_registers(one, Some(3)),
        vec![VcpuSample { cpu: 3, rip: 0xfff0, rflags: 2, cpl: 0, halted: false }]
    );
    // Low addresses (firmware, a boot loader) are not the kernel: never stuck.
    assert!(!parse_registers(one, Some(3))[0].stuck());
    // Garbage and truncation: no sample, no panic.
    assert!(parse_registers("CPU#x\nRIP=zz", None).is_empty());
    assert!(parse_registers(&HARD_LOCKUP[..HARD_LOCKUP.len() / 3], None).len() == 1);
    assert!(parse_registers("", None).is_empty());
}

fn at(cpu: u32, rip: u64, rflags: u64) -> VcpuSample {
    VcpuSample { cpu, rip, rflags, cpl: 0, halted: false }
}

#[test]
fn a_vcpu_stuck_in_two_samples_in_a_row_at_one_place_misses() {
    let mut t = Tracker::default();
    let t0 = Instant::now();
    let lat = Duration::from_millis(1);
    let idle = VcpuSample { halted: true, ..at(0, 0xffffffff81a592eb, 0x246) };
    let hard = at(1, 0xffffffffc022e02a, 0x46);
    let first = t.observe(&[idle, hard], t0, lat);
    assert!(first.ok, "one sample is not enough: {}", first.detail);
    assert_eq!(first.detail, "2 vCPUs sampled in 1.0 ms: 1 idle, 1 kernel");
    let second = t.observe(&[idle, hard], t0 + Duration::from_secs(1), lat);
    assert!(!second.ok);
    assert_eq!(
        second.detail,
        "vCPU 1 has run kernel code with interrupts disabled in 2 samples in a row (1 s) at RIP 0xffffffffc022e02a: a hard lockup"
    );
    // Interrupts back on: the run ends.
    assert!(t.observe(&[idle, at(1, 0xffffffffc022e02a, 0x246)], t0 + Duration::from_secs(2), lat).ok);
}

#[test]
fn scattered_interrupts_off_samples_do_not_miss() {
    // What a busy healthy guest shows: interrupts off now and then, each time elsewhere.
    let mut t = Tracker::default();
    let t0 = Instant::now();
    let lat = Duration::from_millis(1);
    let rips = [0xffffffff8107c467u64, 0xffffffff810e18f5, 0xffffffff816b7c4d, 0xffffffff819f6a71];
    for (i, rip) in rips.iter().enumerate() {
        let o = t.observe(&[at(0, *rip, 0x46)], t0 + Duration::from_secs(i as u64), lat);
        assert!(o.ok, "sample {i}: {}", o.detail);
    }
    // User mode with interrupts off cannot happen; a halted vCPU with them off is parked.
    let user = VcpuSample { cpl: 3, ..at(0, 0x4566f8, 0x46) };
    let parked = VcpuSample { halted: true, ..at(1, 0xffffffff81a592eb, 0x46) };
    for i in 0..3 {
        assert!(t.observe(&[user, parked], t0 + Duration::from_secs(10 + i), lat).ok);
    }
}
