use super::*;

/// A real thread's stat line (kernel 6.x), 52 fields.
const STAT: &str = "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 \
                    12345 1000000 5000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 \
                    0 0 0 0 0 0 0 0 0";

#[test]
fn stat_fields_are_read_after_the_name() {
    let s = parse_stat(STAT).unwrap();
    assert_eq!(s, StatLine { state: 'S', ticks: 325, processor: Some(1) });
}

#[test]
fn a_hostile_command_name_does_not_shift_the_fields() {
    // A thread may name itself anything of 15 bytes: spaces, parentheses, digits.
    let hostile = STAT.replace("(qemu-system-x86)", "(a) R 9 9 (x) )");
    assert_eq!(parse_stat(&hostile).unwrap(), StatLine { state: 'S', ticks: 325, processor: Some(1) });
    let newline = STAT.replace("(qemu-system-x86)", "(x\n) 1 2\n)");
    assert_eq!(parse_stat(&newline).unwrap().ticks, 325);
}

#[test]
fn truncated_or_garbage_stat_is_absent_or_partial_never_a_panic() {
    assert_eq!(parse_stat(""), None);
    assert_eq!(parse_stat("4242 (qemu"), None);
    assert_eq!(parse_stat("4242 (qemu)"), None);
    assert_eq!(parse_stat("4242 (qemu) "), None);
    // Cut before utime: the state is there, the counters are 0, the CPU unknown.
    assert_eq!(parse_stat("4242 (q) R 1 2 3"), Some(StatLine { state: 'R', ticks: 0, processor: None }));
    // Cut before field 39.
    let cut: String = STAT.split(' ').take(30).collect::<Vec<_>>().join(" ");
    assert_eq!(parse_stat(&cut).unwrap().processor, None);
    assert_eq!(parse_stat(&cut).unwrap().ticks, 325);
    // Garbage numbers, huge numbers, multibyte text.
    let bad = STAT.replace(" 250 75 ", " x 18446744073709551615 ");
    assert_eq!(parse_stat(&bad).unwrap().ticks, u64::MAX);
    let _ = parse_stat("1 (é) ü");
    for i in 0..STAT.len() {
        let _ = parse_stat(&STAT[..i]);
    }
}

#[test]
fn schedstat_is_run_and_wait() {
    assert_eq!(parse_schedstat("785675789 224578684 362\n"), Some((785675789, 224578684)));
    assert_eq!(parse_schedstat("785675789"), None);
    assert_eq!(parse_schedstat("x 1 2"), None);
    assert_eq!(parse_schedstat(""), None);
}

#[test]
fn ticks_become_nanoseconds() {
    let hz = rustix::param::clock_ticks_per_second();
    assert_eq!(ticks_to_ns(hz), 1_000_000_000);
    assert_eq!(ticks_to_ns(0), 0);
    assert!(ticks_to_ns(u64::MAX) >= u64::MAX / 1000);
}

const PROC_CGROUP_HYBRID: &str = "9:name=systemd:/\n4:memory:/x\n2:cpuacct:/\n1:cpu:/machine/vm1\n0::/\n";

const MOUNTINFO_HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:5 - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

#[test]
fn the_v1_cpu_hierarchy_is_preferred_on_a_hybrid_host() {
    let (dir, v) = cgroup_cpu_dir(PROC_CGROUP_HYBRID, MOUNTINFO_HYBRID).unwrap();
    assert_eq!((dir, v), (PathBuf::from("/sys/fs/cgroup/cpu/machine/vm1"), 1));
    // Joined with cpuacct, as most distributions mount it.
    let joined = "1:cpu,cpuacct:/a b\n0::/\n";
    let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
    assert_eq!(cgroup_cpu_dir(joined, mi).unwrap().0, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/a b"));
}

#[test]
fn a_bind_mounted_hierarchy_is_resolved_under_its_root() {
    let mi = "32 31 0:29 /kubepods /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu\n";
    let (dir, _) = cgroup_cpu_dir("3:cpu:/kubepods/pod1\n", mi).unwrap();
    assert_eq!(dir, PathBuf::from("/sys/fs/cgroup/cpu x/pod1"));
}

#[test]
fn no_cpu_controller_means_no_directory() {
    // cpuacct alone is not cpu; no v2 mount.
    let mi = "33 31 0:30 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n";
    assert_eq!(cgroup_cpu_dir("2:cpuacct:/\n", mi), None);
    assert_eq!(cgroup_cpu_dir("", ""), None);
    assert_eq!(cgroup_cpu_dir("garbage\n::\n:::\n", "x - \n - cgroup2\n"), None);
}

#[test]
fn proc_cgroup_and_mountinfo_lines_parse_leniently() {
    let l = parse_proc_cgroup("0::/a:b\nbroken\n1:cpu,cpuacct:/\n");
    assert_eq!(l.len(), 2);
    assert_eq!(l[0], CgroupLine { id: "0".into(), controllers: vec![], path: "/a:b".into() });
    assert_eq!(l[1].controllers, ["cpu", "cpuacct"]);
    let m = parse_mountinfo_cgroups(MOUNTINFO_HYBRID);
    assert_eq!(m.len(), 3);
    assert_eq!(m[2].version, 2);
    assert_eq!(m[2].mount_point, "/sys/fs/cgroup/unified");
    assert_eq!(unescape_mount("a\\040b\\134\\"), "a b\\\\");
    assert_eq!(unescape_mount("\\777\\04"), "?\\04");
}

#[test]
fn cpu_max_is_quota_over_period_or_unlimited() {
    assert_eq!(parse_cpu_max("10000 100000\n").as_deref(), Some("10000/100000"));
    assert_eq!(parse_cpu_max("max 100000\n"), None);
    assert_eq!(parse_cpu_max(""), None);
}

#[test]
fn cgroup_files_are_read_by_version() {
    let d = tempfile::tempdir().unwrap();
    let w = |f: &str, t: &str| std::fs::write(d.path().join(f), t).unwrap();
    w("cpu.stat", "nr_periods 15\nnr_throttled 14\nthrottled_time 1350000000\nnr_bursts 0\n");
    w("cpu.cfs_quota_us", "10000\n");
    w("cpu.cfs_period_us", "100000\n");
    let c = read_cgroup_cpu(d.path(), 1).unwrap();
    assert_eq!(
        (c.quota.as_deref(), c.nr_periods, c.nr_throttled, c.throttled_us),
        (Some("10000/100000"), 15, 14, 1_350_000)
    );
    w("cpu.cfs_quota_us", "-1\n");
    assert_eq!(read_cgroup_cpu(d.path(), 1).unwrap().quota, None);
    w("cpu.stat", "usage_usec 5\nnr_periods 3\nnr_throttled 2\nthrottled_usec 700\n");
    w("cpu.max", "20000 100000\n");
    let c = read_cgroup_cpu(d.path(), 2).unwrap();
    assert_eq!(
        (c.quota.as_deref(), c.nr_periods, c.nr_throttled, c.throttled_us),
        (Some("20000/100000"), 3, 2, 700)
    );
    // Nothing there: no reading.
    assert_eq!(read_cgroup_cpu(&d.path().join("none"), 2), None);
}

#[test]
fn loadavg_and_meminfo() {
    assert_eq!(parse_loadavg("0.52 1.10 2.00 3/456 7890\n"), Some([0.52, 1.10, 2.0]));
    assert_eq!(parse_loadavg("0.52 nan 2.00"), None);
    assert_eq!(parse_loadavg("0.52"), None);
    let m =
        parse_meminfo("MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable: 2000 kB\nSwapTotal: 0 kB\n")
            .unwrap();
    assert_eq!(
        m,
        Memory {
            total_bytes: 16000 * 1024,
            available_bytes: 2000 * 1024,
            free_bytes: 100 * 1024,
            swap_total_bytes: 0,
            swap_free_bytes: 0
        }
    );
    assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    assert_eq!(parse_meminfo("MemTotal: 18446744073709551615 kB").unwrap().total_bytes, u64::MAX);
}

#[test]
fn pressure_with_and_without_a_full_line() {
    let cpu = parse_psi("some avg10=47.62 avg60=16.46 avg300=8.83 total=7599537216\n").unwrap();
    assert_eq!(cpu.some, PsiLine { avg10: 47.62, avg60: 16.46, avg300: 8.83, total_us: 7599537216 });
    assert_eq!(cpu.full, None);
    let io = parse_psi(
        "some avg10=1.00 avg60=2.00 avg300=3.00 total=4\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=2\n",
    )
    .unwrap();
    assert_eq!(io.full.unwrap().avg10, 0.5);
    assert_eq!(parse_psi("some avg10=1.00 avg60=2.00\n"), None);
    assert_eq!(parse_psi(""), None);
}

#[test]
fn cpu_times_busy_is_all_but_idle_and_iowait() {
    let t = parse_cpu_times("cpu  100 10 50 1000 20 5 5 7 30 0\ncpu0 1 2 3 4\n").unwrap();
    assert_eq!(t, CpuTimes { busy: 177, steal: 7, total: 1197 });
    // An old kernel with four fields.
    assert_eq!(parse_cpu_times("cpu 1 2 3 4\n").unwrap(), CpuTimes { busy: 6, steal: 0, total: 10 });
    assert_eq!(parse_cpu_times("cpu 1 2\n"), None);
    assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5\n"), None);
}

#[test]
fn cpu_lists_are_counted() {
    assert_eq!(parse_cpu_list("0-1\n"), Some(2));
    assert_eq!(parse_cpu_list("0-3,5,7-8\n"), Some(7));
    assert_eq!(parse_cpu_list("0"), Some(1));
    assert_eq!(parse_cpu_list("3-1"), None);
    assert_eq!(parse_cpu_list(""), None);
    assert_eq!(parse_cpu_list("a-b"), None);
}

#[test]
fn the_readers_read_this_machine() {
    // The test process itself: running, one thread at least, some CPU.
    let me = process(std::process::id()).unwrap();
    assert!(me.threads >= 1, "{me:?}");
    let tid = current_tid();
    let t = thread(std::process::id(), tid).unwrap();
    assert_eq!(t.state, 'R');
    assert!(t.processor.is_some_and(|p| p < online_cpus()), "{t:?}");
    assert!(online_cpus() >= 1);
    assert!(memory().unwrap().total_bytes > 0);
    let times = cpu_times().unwrap();
    assert!(times.total > times.busy && times.busy > 0, "{times:?}");
    assert!(loadavg().is_some());
    assert!(disk_space(Path::new("/")).unwrap().total_bytes > 0);
    assert_eq!(thread(u32::MAX, 1), None);
    assert_eq!(process(u32::MAX), None);
    assert_eq!(cgroup_cpu(u32::MAX), None);
}

/// This thread's id, from `/proc/thread-self` (a link to `PID/task/TID`).
fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

proptest::proptest! {
    /// No text makes a parser panic.
    #[test]
    fn parsers_never_panic(text in "(?s).{0,400}", stat_tail in "[ 0-9a-zA-Z()\\-]{0,300}") {
        let stat = format!("1 (x{text}) {stat_tail}");
        let _ = parse_stat(&stat);
        let _ = parse_stat(&text);
        let _ = parse_schedstat(&text);
        let _ = parse_proc_cgroup(&text);
        let _ = parse_mountinfo_cgroups(&text);
        let _ = cgroup_cpu_dir(&text, &text);
        let _ = parse_cpu_max(&text);
        let _ = parse_cpu_stat(&text, 1);
        let _ = parse_loadavg(&text);
        let _ = parse_psi(&text);
        let _ = parse_meminfo(&text);
        let _ = parse_cpu_times(&text);
        let _ = parse_cpu_list(&text);
        let _ = unescape_mount(&text);
    }
}

#[test]
fn a_pure_v2_host_has_its_cpu_controller_in_the_unified_hierarchy() {
    let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    let mut mounts = CgroupMounts { mounts: parse_mountinfo_cgroups(mi), v2_cpu: true };
    let own = "0::/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator\n";
    assert_eq!(
        mounts.cpu_dir(own),
        Some((
            PathBuf::from("/sys/fs/cgroup/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator"),
            2
        ))
    );
    // Its controllers do not list cpu: no directory.
    mounts.v2_cpu = false;
    assert_eq!(mounts.cpu_dir(own), None);
    // A v1 line for another controller does not count.
    mounts.v2_cpu = true;
    assert_eq!(mounts.cpu_dir("4:memory:/x\n0::/y\n").unwrap().0, PathBuf::from("/sys/fs/cgroup/y"));
}

#[test]
fn a_kept_file_is_read_anew_each_time_and_reopened_after_a_failure() {
    let me = std::process::id();
    let tid = own_tid();
    let mut files = KeptThread::default();
    let mut buf: KeptBuf = [0; 4096];
    let first = thread_kept(me, tid, &mut files, &mut buf).expect("this thread's stat");
    assert!(files.stat.file.is_some() && files.schedstat.file.is_some(), "both files stay open");
    // Burn some CPU: the kept file shows the new counters (read from offset 0, not its end).
    let start = std::time::Instant::now();
    let mut run = first.run_ns;
    while run == first.run_ns && start.elapsed() < std::time::Duration::from_secs(5) {
        std::hint::black_box((0..100_000u64).sum::<u64>());
        run = thread_kept(me, tid, &mut files, &mut buf).unwrap().run_ns;
    }
    assert!(run > first.run_ns, "{run:?} after {:?}", first.run_ns);

    // A thread that ended: the read fails, the file is closed, and nothing is read.
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || tx.send(own_tid()).unwrap());
    let gone = rx.recv().unwrap();
    let mut dead = KeptThread::default();
    let mut stat = Kept::default();
    let _ = stat_kept(me, &mut stat, &mut buf).unwrap();
    let opened = thread_kept(me, gone, &mut dead, &mut buf);
    t.join().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    if opened.is_some() {
        assert!(thread_kept(me, gone, &mut dead, &mut buf).is_none(), "an ended thread still read");
    }
    assert!(dead.stat.file.is_none(), "the ended thread's file is closed");
}

#[test]
fn beyond_the_limit_files_are_read_and_closed() {
    let me = std::process::id();
    set_kept_limit(0);
    let mut k = Kept::default();
    let mut buf: KeptBuf = [0; 4096];
    let read = stat_kept(me, &mut k, &mut buf);
    set_kept_limit(4096);
    assert!(read.is_some());
    assert!(k.file.is_none(), "kept beyond the limit");
}

fn own_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}
