use super::*;

fn vcpus(threads: &[u32]) -> Vec<VcpuThread> {
    threads.iter().enumerate().map(|(i, &t)| VcpuThread { cpu: i as u32, thread: t }).collect()
}

/// A reading at `t` seconds after `base`, with per-thread (cpu, run, wait) in seconds.
fn reading(base: Instant, t: f64, process_s: f64, threads: &[(f64, f64, f64)]) -> Reading {
    let ns = |s: f64| (s * 1e9) as u64;
    Reading {
        at: base + Duration::from_secs_f64(t),
        process_ns: Some(ns(process_s)),
        threads: threads
            .iter()
            .map(|&(c, r, w)| Some(ThreadPoint { cpu_ns: ns(c), sched: Some((ns(r), ns(w))) }))
            .collect(),
        cgroup: None,
    }
}

fn fresh(r: Reading, states: &[char]) -> Fresh {
    let threads = r
        .threads
        .iter()
        .zip(states)
        .map(|(p, &state)| {
            p.map(|p| ThreadSample {
                state,
                cpu_ns: p.cpu_ns,
                run_ns: p.sched.map(|s| s.0),
                wait_ns: p.sched.map(|s| s.1),
                processor: Some(1),
            })
        })
        .collect();
    let process = Some(ProcessSample {
        state: 'S',
        threads: 5,
        cpu_ns: r.process_ns.unwrap_or(0),
        ..Default::default()
    });
    Fresh { reading: r, process, threads, cgroup: None }
}

/// 21 readings a second apart: thread 0 spins (0.7 s run + 0.25 s wait per second), thread 1
/// sleeps after 5 busy seconds.
fn ring(base: Instant) -> Vec<Reading> {
    (0..=20)
        .map(|i| {
            let t = f64::from(i);
            let idle_after = t.min(5.0);
            reading(
                base,
                t,
                0.75 * t + idle_after,
                &[(0.7 * t, 0.7 * t, 0.25 * t), (idle_after, idle_after, 0.0)],
            )
        })
        .collect()
}

#[test]
fn busy_wait_and_spells_come_from_the_last_window() {
    let base = Instant::now();
    let mut all = ring(base);
    let now = fresh(all.pop().unwrap(), &['R', 'S']);
    let target = Target::new(4242, &vcpus(&[10, 11]));
    let (p, v) = activity(&target, &all, &now, 2, Duration::from_millis(500));
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].busy_10s, Some(0.7));
    assert_eq!(v[0].wait_10s, Some(0.25));
    assert!(v[0].spinning() && !v[0].idle());
    // Wanted the CPU (run + wait = 95 %) for the whole ring: 20 s.
    assert_eq!((v[0].busy_for_s, v[0].idle_for_s), (20, 0));
    assert_eq!(v[0].history.len(), 20);
    assert!(v[0].history.iter().all(|&h| h == 0.7), "{:?}", v[0].history);
    assert_eq!((v[0].state.as_str(), v[0].host_cpu, v[0].thread), ("R", Some(1), 10));
    // Thread 1: busy for 5 s, idle for the 15 since.
    assert_eq!(v[1].busy_10s, Some(0.0));
    assert!(v[1].idle());
    assert_eq!((v[1].busy_for_s, v[1].idle_for_s), (0, 15));
    assert_eq!(&v[1].history[..6], &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    // The process: 0.75 CPUs over the last 10 s.
    assert_eq!(p.cpu_10s, Some(0.75));
    assert_eq!((p.pid, p.state.as_str(), p.threads), (4242, "S", 5));
}

#[test]
fn fewer_than_two_readings_give_no_ratio() {
    let base = Instant::now();
    let now = fresh(reading(base, 0.0, 1.0, &[(1.0, 1.0, 0.0)]), &['R']);
    let (p, v) = activity(&Target::new(1, &vcpus(&[2])), &[], &now, 2, Duration::ZERO);
    assert_eq!((p.cpu_10s, v[0].busy_10s, v[0].wait_10s), (None, None, None));
    assert_eq!((v[0].busy_for_s, v[0].idle_for_s, v[0].history.len()), (0, 0, 0));
    assert!(!v[0].spinning() && !v[0].idle());
}

#[test]
fn a_ring_shorter_than_the_window_is_used_whole_and_a_fresh_reading_too_close_replaces_the_last() {
    let base = Instant::now();
    let ring = vec![reading(base, 0.0, 0.0, &[(0.0, 0.0, 0.0)]), reading(base, 1.0, 0.5, &[(0.5, 0.5, 0.0)])];
    // 10 ms after the last reading: that one is left out; the interval is the whole 1.01 s.
    let now = fresh(reading(base, 1.01, 0.5, &[(0.5, 0.5, 0.0)]), &['S']);
    let (_, v) = activity(&Target::new(1, &vcpus(&[2])), &ring, &now, 1, Duration::from_millis(500));
    assert_eq!(v[0].busy_10s, Some(0.495));
    assert_eq!(v[0].history, [0.5]);
}

#[test]
fn a_counter_going_backwards_restarts_instead_of_going_negative() {
    let base = Instant::now();
    let mut rs: Vec<Reading> =
        (0..5).map(|i| reading(base, f64::from(i), 100.0, &[(100.0 + f64::from(i), 0.0, 0.0)])).collect();
    // A new process under the same pid and thread id: its counters start near 0.
    for i in 5..8 {
        rs.push(reading(base, f64::from(i), 0.1, &[(0.5 * f64::from(i - 5), 0.0, 0.0)]));
    }
    let now = fresh(rs.pop().unwrap(), &['R']);
    let (p, v) = activity(&Target::new(1, &vcpus(&[2])), &rs, &now, 4, Duration::ZERO);
    // Only the new process's two intervals count (schedstat run times are all 0 here, so
    // they are the run time: 0).
    assert_eq!(v[0].history.len(), 2);
    assert!(v[0].busy_10s.is_some_and(|b| (0.0..=1.0).contains(&b)));
    assert_eq!(p.cpu_10s, Some(0.0));
    // Without schedstat, utime + stime says 0.5.
    let strip = |mut r: Reading| {
        r.threads.iter_mut().flatten().for_each(|t| t.sched = None);
        r
    };
    let rs: Vec<Reading> = rs.into_iter().map(strip).collect();
    let now = fresh(strip(now.reading), &['R']);
    let (_, v) = activity(&Target::new(1, &vcpus(&[2])), &rs, &now, 4, Duration::ZERO);
    assert_eq!((v[0].busy_10s, v[0].wait_10s), (Some(0.5), None));
    assert_eq!(v[0].history, [0.5, 0.5]);
    // And the sampler's ring restarts too.
    let mut vm = Vm { gen: 0, target: Target::new(1, &vcpus(&[2])), ring: VecDeque::new() };
    vm.push(reading(base, 0.0, 9.0, &[(9.0, 0.0, 0.0)]));
    vm.push(reading(base, 1.0, 9.5, &[(9.5, 0.0, 0.0)]));
    vm.push(reading(base, 2.0, 0.1, &[(0.1, 0.0, 0.0)]));
    assert_eq!(vm.ring.len(), 1);
}

#[test]
fn ratios_are_clamped() {
    let base = Instant::now();
    // utime + stime ticks can say a little more than the wall time of a short interval.
    let ring = vec![reading(base, 0.0, 0.0, &[(0.0, 0.0, 0.0)])];
    let now = fresh(reading(base, 0.1, 10.0, &[(0.2, 0.3, 5.0)]), &['R']);
    let (p, v) = activity(&Target::new(1, &vcpus(&[2])), &ring, &now, 2, Duration::ZERO);
    assert_eq!((v[0].busy_10s, v[0].wait_10s, p.cpu_10s), (Some(1.0), Some(1.0), Some(2.0)));
    assert_eq!(v[0].history, [1.0]);
}

#[test]
fn vcpus_sharing_a_thread_report_it_each_and_are_exported_once() {
    let base = Instant::now();
    let target = Target::new(1, &vcpus(&[7, 7, 7]));
    assert_eq!(target.tids, [7]);
    let ring = vec![reading(base, 0.0, 0.0, &[(0.0, 0.0, 0.0)]), reading(base, 1.0, 0.9, &[(0.9, 0.9, 0.0)])];
    let now = fresh(reading(base, 2.0, 1.8, &[(1.8, 1.8, 0.0)]), &['R']);
    let (p, v) = activity(&target, &ring, &now, 2, Duration::ZERO);
    assert_eq!(
        v.iter().map(|v| (v.cpu, v.busy_10s)).collect::<Vec<_>>(),
        [(0, Some(0.9)), (1, Some(0.9)), (2, Some(0.9))]
    );
    // The process's own time is not the sum of its vCPUs'.
    assert_eq!(p.cpu_10s, Some(0.9));
    let sampler = Sampler { inner: Arc::new(Inner::default()), period: Duration::from_secs(1) };
    sampler.watch("tcg", 1, &[VcpuThread { cpu: 2, thread: 7 }, VcpuThread { cpu: 1, thread: 7 }]);
    {
        let mut vms = lock(&sampler.inner.vms);
        let vm = vms.get_mut("tcg").unwrap();
        vm.push(ring[0].clone());
        vm.push(ring[1].clone());
    }
    let m = sampler.vcpu_metrics();
    assert_eq!(m, [VcpuMetric { vm: "tcg".into(), cpu: 1, cpu_seconds: 0.9, busy: Some(0.9) }]);
    sampler.forget("tcg");
    assert!(sampler.vcpu_metrics().is_empty() && sampler.vm_report("tcg").is_none());
}

#[test]
fn a_missing_thread_leaves_a_gap_not_a_number() {
    let base = Instant::now();
    let mut gone = reading(base, 1.0, 1.0, &[(1.0, 1.0, 0.0)]);
    gone.threads[0] = None;
    let ring = vec![reading(base, 0.0, 0.0, &[(0.0, 0.0, 0.0)]), gone];
    let mut now = fresh(reading(base, 2.0, 2.0, &[(2.0, 2.0, 0.0)]), &['R']);
    now.threads[0] = None;
    now.reading.threads[0] = None;
    let (_, v) = activity(&Target::new(1, &vcpus(&[2])), &ring, &now, 1, Duration::ZERO);
    assert_eq!((v[0].busy_10s, v[0].state.as_str(), v[0].history.len()), (None, "", 0));
}

#[test]
fn cgroup_throttling_over_the_window() {
    let base = Instant::now();
    let cg = |r: &mut Reading, dir: u64, periods: u64, throttled: u64, us: u64| {
        r.cgroup = Some(CgroupPoint {
            dir,
            stat: proc::CpuStat { nr_periods: periods, nr_throttled: throttled, throttled_us: us },
        });
    };
    let mut a = reading(base, 0.0, 0.0, &[]);
    cg(&mut a, 1, 100, 10, 0);
    let mut b = reading(base, 2.0, 0.2, &[]);
    cg(&mut b, 1, 120, 30, 1_600_000);
    let mut now = fresh(b, &[]);
    now.cgroup = Some(CgroupCpu {
        path: "/x".into(),
        version: 1,
        quota: Some("10000/100000".into()),
        ..Default::default()
    });
    let (p, _) = activity(&Target::new(1, &[]), &[a.clone()], &now, 2, Duration::ZERO);
    let c = p.cgroup.unwrap();
    assert_eq!((c.throttled_periods_10s, c.throttled_time_10s), (Some(1.0), Some(0.8)));
    // Moved to another cgroup between the readings: no ratio.
    now.reading.cgroup.as_mut().unwrap().dir = 2;
    let (p, _) = activity(&Target::new(1, &[]), &[a], &now, 2, Duration::ZERO);
    let c = p.cgroup.unwrap();
    assert_eq!(
        (c.throttled_periods_10s, c.throttled_time_10s, c.quota.as_deref()),
        (None, None, Some("10000/100000"))
    );
}

#[test]
fn node_ratios_are_shares_of_all_cpu_time() {
    let base = Instant::now();
    let t = |s: u64, busy, steal, total| (base + Duration::from_secs(s), CpuTimes { busy, steal, total });
    let ring = [t(0, 0, 0, 0), t(1, 50, 10, 200), t(30, 100, 10, 400), t(35, 300, 60, 800)];
    // The window starts at 30 s: 200 busy and 50 stolen of 400.
    assert_eq!(node_ratios(&ring), (Some(0.5), Some(0.125)));
    assert_eq!(node_ratios(&ring[..1]), (None, None));
    // A counter going backwards (a reboot of the node would do) restarts.
    assert_eq!(node_ratios(&[t(0, 500, 0, 1000), t(1, 10, 0, 20), t(2, 20, 0, 40)]), (Some(0.5), Some(0.0)));
}

#[test]
fn the_sampler_samples_this_process_and_stops_when_dropped() {
    let tid = {
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        link.file_name().unwrap().to_str().unwrap().parse::<u32>().unwrap()
    };
    let sampler = Sampler::start(Duration::from_millis(20));
    sampler.watch("me", std::process::id(), &[VcpuThread { cpu: 0, thread: tid }]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock(&sampler.inner.vms)["me"].ring.len() < 3 {
        assert!(Instant::now() < deadline, "the sampler did not sample");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (p, v) = sampler.vm_report("me").unwrap();
    assert_eq!(p.pid, std::process::id());
    assert!(p.threads >= 2, "{p:?}");
    assert_eq!(v[0].state, "R");
    assert!(v[0].busy_10s.is_some() && !v[0].history.is_empty(), "{v:?}");
    let node = sampler.node(Some(Path::new("/")));
    assert!(node.cpus >= 1 && node.cpu_busy_10s.is_some() && node.data_dir.is_some(), "{node:?}");
    let inner = Arc::downgrade(&sampler.inner);
    drop(sampler);
    // The thread lets go of its reference within a period.
    let deadline = Instant::now() + Duration::from_secs(5);
    while inner.strong_count() > 0 {
        assert!(Instant::now() < deadline, "the sampler thread did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn vcpu_threads_are_read_from_the_raw_reply() {
    let reply = serde_json::json!([
        {"cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": 4243, "target": "x86_64"},
        {"cpu-index": 1, "thread-id": 4244, "target": "a-target-from-the-future", "new-field": 1},
        {"cpu-index": 2, "thread-id": 0},
        {"cpu-index": 3, "thread-id": -5},
        {"cpu-index": 4, "thread-id": 99999999999u64},
        {"cpu-index": "x", "thread-id": 4},
        "garbage"
    ]);
    assert_eq!(
        vcpu_threads(&reply),
        [VcpuThread { cpu: 0, thread: 4243 }, VcpuThread { cpu: 1, thread: 4244 }]
    );
    assert!(vcpu_threads(&serde_json::json!({"error": 1})).is_empty());
}

#[test]
fn a_vms_ring_with_two_vcpus_stays_within_6_kib() {
    let per_reading = std::mem::size_of::<Reading>() + 2 * std::mem::size_of::<Option<ThreadPoint>>();
    let ring = RING * per_reading + std::mem::size_of::<Vm>();
    assert!(ring <= 6 * 1024, "{per_reading} bytes per reading, {ring} per VM");
}
