//! The host readers and the sampler against this machine, checked by oracles acpimon did not
//! write: the kernel's thread CPU clock, `df`, `free`, the kernel's own cgroup throttling of a
//! spinner, a SIGSTOPped process. Needs root (the cgroup test makes a cgroup; CI runs as root).
//! Then the `host` diagnostic step and its verdicts on watched real guests: a QEMU process
//! stopped on the host, and a VM starved by its cgroup beside CPU hogs.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use acpimon::event::RawEvent as Event;
use acpimon::host::sampler::{Sampler, VcpuThread};
use acpimon::host::{proc, HostReport};
use acpimon::watch::state::State;
use common::cgroup::CpuCgroup;
use common::guest::{Guest, GuestSpec};
use common::service::{signal, step, step_file, watch_guest, Service};

/// This thread's id, from `/proc/thread-self` (a link to `PID/task/TID`).
fn current_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// The calling thread's CPU time, from the kernel's clock (not from `/proc`).
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A thread that spins (or sleeps) until dropped; its id.
struct Worker {
    tid: u32,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(spin: bool) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            tx.send(current_tid()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                if !spin {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        Worker { tid: rx.recv().unwrap(), stop, handle: Some(handle) }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.take().map(|h| h.join());
    }
}

/// A child process, killed when dropped (stopped or not).
struct Proc(Child);

impl Proc {
    fn spawn(script: &str) -> Proc {
        Proc(Command::new("sh").args(["-c", script]).stdin(Stdio::null()).spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SPIN: &str = "while :; do :; done";

/// The state letter of `/proc/PID/stat`, read with the shell's tools.
fn state_of(pid: u32) -> String {
    let out = common::run(Command::new("ps").args(["-o", "stat=", "-p", &pid.to_string()]));
    common::text(&out.stdout).trim().chars().take(1).collect()
}

#[test]
fn a_threads_cpu_time_rises_as_the_kernels_thread_clock_does() {
    let (tx, rx) = mpsc::channel();
    let spinner = std::thread::spawn(move || {
        let tid = current_tid();
        let before = (proc::thread(std::process::id(), tid).unwrap(), thread_cpu());
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {}
        let after = (proc::thread(std::process::id(), tid).unwrap(), thread_cpu());
        tx.send((before, after)).unwrap();
    });
    spinner.join().unwrap();
    let ((t0, c0), (t1, c1)) = rx.recv().unwrap();
    let read = Duration::from_nanos(t1.cpu_ns - t0.cpu_ns).as_secs_f64();
    let clock = (c1 - c0).as_secs_f64();
    // utime + stime count clock ticks: within a few ticks (and 10 %) of the kernel's clock.
    let tick = 1.0 / rustix::param::clock_ticks_per_second() as f64;
    assert!(
        (read - clock).abs() <= 3.0 * tick + 0.1 * clock,
        "/proc says {read} s, the thread clock {clock} s"
    );
    assert!(clock > 0.3, "the spinner got only {clock} s of CPU in 1.5 s");
    // schedstat's run time is that clock (both are the scheduler's sum_exec_runtime).
    let run = Duration::from_nanos(t1.run_ns.unwrap() - t0.run_ns.unwrap()).as_secs_f64();
    assert!((run - clock).abs() <= 0.02 + 0.05 * clock, "schedstat says {run} s, the thread clock {clock} s");
    assert_eq!(t1.state, 'R');
}

#[test]
fn a_process_counts_its_threads_as_proc_self_task_lists_them() {
    let _workers: Vec<Worker> = (0..3).map(|_| Worker::start(false)).collect();
    let tasks = || std::fs::read_dir("/proc/self/task").unwrap().count() as u32;
    // Other tests of this binary start and end threads meanwhile: the count is between the two
    // listings around it.
    for _ in 0..20 {
        let before = tasks();
        let p = proc::process(std::process::id()).unwrap();
        let after = tasks();
        if before == after {
            assert_eq!(p.threads, before, "{p:?}");
            assert!(p.threads >= 4);
            // (A thread of another test may be in D, waiting on a disk, for a moment.)
            assert_eq!(p.stopped_threads, 0, "{p:?}");
            assert!(p.blocked_threads < p.threads, "{p:?}");
            return;
        }
    }
    panic!("the thread count of this process never held still for a reading");
}

#[test]
fn disk_space_is_what_df_says() {
    common::require("df");
    let dir = tempfile::tempdir_in(common::repo()).unwrap();
    let ours = proc::disk_space(dir.path()).unwrap();
    let out = common::run(Command::new("df").args(["-B1", "--output=size,avail"]).arg(dir.path()));
    assert!(out.status.success(), "df: {}", common::text(&out.stderr));
    let text = common::text(&out.stdout);
    let nums: Vec<u64> =
        text.lines().nth(1).unwrap().split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(ours.total_bytes, nums[0], "df:\n{text}");
    // Other processes write meanwhile: within 64 MiB.
    assert!(ours.available_bytes.abs_diff(nums[1]) <= 64 << 20, "{ours:?}, df:\n{text}");
}

#[test]
fn total_memory_is_what_free_says() {
    common::require("free");
    let out = common::run(Command::new("free").arg("-b"));
    let text = common::text(&out.stdout);
    let total: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Mem:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total in free -b:\n{text}"));
    assert_eq!(proc::memory().unwrap().total_bytes, total);
}

#[test]
fn a_throttled_cgroup_shows_its_quota_and_throttling() {
    let cg = CpuCgroup::create("acpimon-test-host", 10_000, 100_000);
    let child = Proc::spawn(SPIN);
    cg.add(child.pid());
    let sampler = Sampler::start(Duration::from_millis(200));
    sampler.watch("throttled", child.pid(), &[VcpuThread { cpu: 0, thread: child.pid() }]);
    std::thread::sleep(Duration::from_millis(1500));
    let c = proc::cgroup_cpu(child.pid()).expect("the child's cgroup is readable");
    assert_eq!(std::path::PathBuf::from(&c.path), cg.dir, "{c:?}");
    assert_eq!((c.version, c.quota.as_deref()), (cg.version, Some("10000/100000")), "{c:?}");
    assert!(c.nr_throttled > 0 && c.nr_periods >= c.nr_throttled, "{c:?}");
    // The kernel's own counters say the same.
    assert!(cg.stat("nr_throttled") >= c.nr_throttled);
    // The sampler: throttled in most periods, a tenth of a CPU used.
    let (p, v) = sampler.vm_report("throttled").unwrap();
    let c = p.cgroup.expect("a cgroup in the report");
    assert!(c.throttled_periods_10s.is_some_and(|t| t >= 0.5), "{c:?}");
    assert!(c.throttled_time_10s.is_some_and(|t| t > 0.3), "{c:?}");
    assert!(v[0].busy_10s.is_some_and(|b| b <= 0.3), "{v:?}");
}

#[test]
fn the_sampler_tells_a_spinning_thread_from_a_sleeping_one() {
    let spinner = Worker::start(true);
    let sleeper = Worker::start(false);
    let sampler = Sampler::start(Duration::from_millis(200));
    let vcpus = [VcpuThread { cpu: 0, thread: spinner.tid }, VcpuThread { cpu: 1, thread: sleeper.tid }];
    sampler.watch("vm", std::process::id(), &vcpus);
    std::thread::sleep(Duration::from_millis(2500));
    let (p, v) = sampler.vm_report("vm").unwrap();
    // A loaded 2-core machine may give the spinner a fifth of a CPU (seen in CI with spinning
    // guests beside it); it still wants all of it.
    assert!(v[0].busy_10s.is_some_and(|b| b >= 0.1), "{v:?}");
    assert!(v[0].spinning(), "run + wait under 90 %: {v:?}");
    assert!(v[0].busy_for_s >= 2, "{v:?}");
    assert!(v[1].idle() && v[1].idle_for_s >= 2, "{v:?}");
    assert_eq!(v[1].state, "S");
    assert!(v[0].history.len() >= 10, "{v:?}");
    assert!(p.cpu_10s.is_some_and(|c| c >= 0.1), "{p:?}");
    let m = sampler.vcpu_metrics();
    assert_eq!(m.len(), 2);
    assert!(m[0].busy.is_some_and(|b| b >= 0.1) && m[0].cpu_seconds > 0.2, "{m:?}");
    let node = sampler.node(None);
    assert!(node.cpu_busy_10s.is_some_and(|b| b >= 0.5 / f64::from(node.cpus)), "{node:?}");
}

#[test]
fn a_sigstopped_process_has_all_its_threads_stopped() {
    let child = Proc::spawn("exec sleep 60");
    let pid = child.pid();
    let sampler = Sampler::start(Duration::from_millis(200));
    sampler.watch("stopped", pid, &[VcpuThread { cpu: 0, thread: pid }]);
    let (p, _) = sampler.vm_report("stopped").unwrap();
    assert!(!p.all_stopped(), "{p:?}");
    common::run(Command::new("kill").args(["-STOP", &pid.to_string()]));
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(pid) != "T" {
        assert!(Instant::now() < deadline, "ps never showed the child stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (p, v) = sampler.vm_report("stopped").unwrap();
    assert!(p.all_stopped(), "{p:?}");
    assert_eq!((p.state.as_str(), p.threads, v[0].state.as_str()), ("T", 1, "T"));
    // And without a sampler.
    let (p, v) = acpimon::host::sampler::snapshot(
        pid,
        &[VcpuThread { cpu: 0, thread: pid }],
        Duration::from_millis(300),
    );
    assert!(p.all_stopped() && v[0].idle(), "{p:?} {v:?}");
}

// --- The host step and its verdicts on watched real guests.

const WATCH_CONFIG: &str = "[defaults]\nstartup_grace = \"90s\"\n";

fn work() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("acpimon-host").tempdir_in("/tmp").unwrap()
}

/// A watched 2-vCPU fixture guest, healthy.
async fn healthy_guest(work: &std::path::Path) -> (Guest, Service) {
    let spec = GuestSpec { watched: true, extra: vec!["-S".into()], smp: 2, ..GuestSpec::new("pc") };
    let g = Guest::boot(spec).await;
    let svc = watch_guest(&g, work, WATCH_CONFIG).await;
    svc.wait_state("guest", State::Healthy, Duration::from_secs(120)).await;
    (g, svc)
}

/// The bundle's `host` step: ok, quick, and its report.
fn host_report(bundle: &Event) -> HostReport {
    let s = step(&bundle.detail["manifest"], "host");
    assert_eq!(s["outcome"], "ok", "{s:#}");
    // Its budget is about 200 ms, even when QEMU answers nothing; the margin is for a loaded
    // CI machine (acpimon-bench host-step measures it).
    assert!(s["duration_ms"].as_u64().unwrap() < 1500, "{s:#}");
    serde_json::from_str(&step_file(bundle, "host")).expect("the host step's file is a host report")
}

/// QEMU stopped on the host (SIGSTOP, as a freezer or a debugger would): nothing answers, not
/// even QMP; the host step sees every thread stopped, and the verdict says the host did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_process_stopped_on_the_host_is_the_hosts_doing() {
    let work = work();
    let (g, svc) = healthy_guest(work.path()).await;
    let pid = g.vm.qmp.pid.expect("QEMU's pid through its QMP socket");
    signal(pid, rustix::process::Signal::STOP);
    let b = svc.wait_event("bundle", Duration::from_secs(120), |e| e.kind == "bundle").await;
    signal(pid, rustix::process::Signal::CONT);
    let r = host_report(&b);
    let q = r.qemu.as_ref().expect("the QEMU process was read");
    assert!(q.pid == pid && q.all_stopped() && q.state == "T", "{q:?}");
    assert_eq!(r.vcpus.len(), 2, "{r:#?}");
    assert!(r.notes.iter().any(|n| n.starts_with("query-block")), "QMP did not answer: {:?}", r.notes);
    let v = &b.detail["manifest"]["verdict"];
    assert_eq!(v["class"], "paused-by-host", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(
        headline.starts_with(&format!("the QEMU process (pid {pid}) is stopped on the host: all ")),
        "{v:#}"
    );
    // It answers again once the host lets it run.
    svc.wait_state("guest", State::Healthy, Duration::from_secs(60)).await;
}

/// Processes that keep host CPUs busy until dropped: a neighbour hogging the node.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        let spin =
            || Command::new("sh").args(["-c", "while :; do :; done"]).stdin(Stdio::null()).spawn().unwrap();
        Hogs((0..n).map(|_| spin()).collect())
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A VM starved on its node: QEMU moved into a cgroup allowed 0.1 % of a CPU while two CPU hogs
/// run beside it. The guest stops answering; the bundle's host step shows the cgroup's
/// throttling and the node's CPU pressure, and the verdict says the VM was starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_throttled_by_its_cgroup_beside_cpu_hogs_is_starved() {
    let work = work();
    let (g, svc) = healthy_guest(work.path()).await;
    let pid = g.vm.qmp.pid.expect("QEMU's pid through its QMP socket");
    let hogs = Hogs::start(2);
    // 1 ms of CPU a second: the longest period, so the gaps outlast the heartbeat's 1 s.
    let cg = CpuCgroup::create("acpimon-starved", 1000, 1_000_000);
    cg.add(pid);
    let b = svc.wait_event("bundle", Duration::from_secs(120), |e| e.kind == "bundle").await;
    drop(cg);
    drop(hogs);
    let r = host_report(&b);
    let c =
        r.qemu.as_ref().and_then(|q| q.cgroup.as_ref()).unwrap_or_else(|| panic!("no cgroup read: {r:#?}"));
    assert_eq!(c.quota.as_deref(), Some("1000/1000000"), "{c:?}");
    assert!(c.throttled_periods_10s.is_some_and(|t| t >= 0.25), "{c:?}");
    let cpu = r.node.pressure.as_ref().and_then(|p| p.cpu.as_ref()).expect("this kernel has PSI");
    assert!(cpu.some.avg10 > 0.0 && cpu.some.total_us > 0, "the hogs' pressure: {cpu:?}");
    let v = &b.detail["manifest"]["verdict"];
    assert_eq!(v["class"], "starved", "{v:#}");
    let headline = v["headline"].as_str().unwrap();
    assert!(headline.starts_with("VM starved: QEMU's cgroup throttled in "), "{v:#}");
    assert!(headline.contains("(quota 1000/1000000 µs)") && headline.contains("node CPU pressure"), "{v:#}");
    // Let go, the guest answers again (its watchdog may then report the soft lockup the
    // starvation looked like from inside, which keeps the VM unresponsive a while: the kernel's
    // word, judged by its own policy).
    let answered = |v: &acpimon::watch::metrics::VmView| {
        v.scenarios.iter().any(|s| s.kind == "acpi-heartbeat" && s.consecutive_misses == 0)
    };
    let start = Instant::now();
    while !svc.vm("guest").await.is_some_and(|v| answered(&v)) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no heartbeat answered after the cgroup went\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
