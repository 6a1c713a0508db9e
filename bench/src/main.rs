//! `acpimon-bench`: the benchmarks whose figures the README shows. Exit status: 0 success,
//! 1 a failure or a figure outside its bound, 2 bad input (options), each with a one-line
//! message naming the problem and the fix.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use acpimon::generate::SsdtConfig;
use acpimon::launch::{self, Vm, VmSpec};
use acpimon::watch::config::default_state_dir;
use acpimon_bench::{faults, flood, guestcost, hoststep, kernel_log, latency, scale, soak};

#[derive(Parser)]
#[command(
    name = "acpimon-bench",
    version,
    about = "acpimon's benchmarks: trigger-to-record latency, scale and console floods"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure trigger-to-record latency and sustained events/s on the built-in test guest,
    /// beside the bare QMP human-monitor-command round trip measured in the same run.
    Latency {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// Heartbeats for the latency figures (and bare round trips for the baseline).
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Seconds of back-to-back heartbeats for the events/s figure.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value = "pc", value_parser = ["pc", "q35"])]
        machine: String,
        /// The guest firmware: SeaBIOS, or Debian bookworm's OVMF (/usr/share/ovmf/OVMF.fd).
        #[arg(long, default_value = "seabios", value_parser = ["seabios", "ovmf"])]
        firmware: String,
        /// OVMF keeping its 64-bit PCI window (implies `--firmware ovmf`): BAR2 above 4 GiB, so
        /// the records come on the port channel (frames on the doorbell port), not the region.
        #[arg(long)]
        high_bar: bool,
        /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Scale benchmark: one `acpimon watch` child watching N simulated VMs (no QEMU) at 1 s
    /// heartbeats, beside a 0-VM baseline of the same run: CPU per VM-heartbeat, memory per
    /// VM, detection latency, false alarms. Needs ~256 + 6×N open files (tools/bench-scale
    /// raises the limit).
    Scale {
        /// VM counts to measure.
        #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 500])]
        vms: Vec<usize>,
        /// Measurement window per size.
        #[arg(long, default_value = "20s", value_parser = acpimon::units::parse_duration)]
        window: Duration,
        /// VMs hung per size to measure detection latency (at most N).
        #[arg(long, default_value_t = 10)]
        hangs: usize,
        /// Then, once those answer again, hang every VM at once (spread over one interval) and
        /// time their detection too: the node-wide bundle limit's case.
        #[arg(long)]
        all_hung: bool,
        /// Simulated guest delay from the raised IRQ to its record, in ms (real guest p50 ≈ 1).
        #[arg(long, default_value_t = 1.0)]
        sim_latency_ms: f64,
        /// Prepare the VMs without the doorbell: the service polls each region for its record
        /// (the path before issue 13, and that of VMs prepared before it).
        #[arg(long)]
        no_doorbell: bool,
        /// The acpimon binary to run as the service [default: `acpimon` beside this program].
        #[arg(long, value_name = "PATH")]
        acpimon: Option<PathBuf>,
        /// Scratch directory; each run keeps a fresh subdirectory there.
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Console flood: guests writing their serial console as fast as QEMU lets them
    /// (`acpimon.scenario=flood`) beside one healthy VM, all watched by one `acpimon watch`
    /// child; the service's CPU and memory and the healthy VM's heartbeat p50/p99, without and
    /// then with the flood in the same run. Fails when the flood costs more than 10 % of a core
    /// or the p99 grows by more than 10 %.
    Flood {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// Flooding guests.
        #[arg(long, default_value_t = 4)]
        floods: usize,
        /// Each measurement window (baseline, then flood).
        #[arg(long, default_value = "30s", value_parser = acpimon::units::parse_duration)]
        window: Duration,
        #[arg(long, default_value = "pc", value_parser = ["pc", "q35"])]
        machine: String,
        /// The acpimon binary to run as the service [default: `acpimon` beside this program].
        #[arg(long, value_name = "PATH")]
        acpimon: Option<PathBuf>,
        /// Scratch directory; each run keeps a fresh subdirectory there.
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The `host` diagnostic step on the built-in test guest (2 vCPUs), with the service's
    /// sampler watching it: p50/p99/max of `count` steps, running and with QEMU stopped,
    /// beside one QMP round trip of the same run. Fails when the p99 exceeds its 200 ms budget.
    HostStep {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The guest's kernel log read from its memory (`acpimon dmesg`'s path): time, bytes and
    /// pmemsave round trips, live, cached and paused, and VMCOREINFO by a RAM scan, beside full
    /// `dump-guest-memory` dumps (raw ELF, kdump-zlib) of the same guest in the same run.
    KernelLog {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// Guest RAM sizes, MiB; one guest each.
        #[arg(long, value_delimiter = ',', default_values_t = [256, 2048])]
        memory: Vec<u64>,
        /// Reads per figure (the median is shown).
        #[arg(long, default_value_t = 5)]
        reads: usize,
        /// Where the VMs' directories go [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a heartbeat costs the guest: a 1-vCPU test guest running a CPU-bound task while
    /// the host beats at each rate, after a window without beats in the same run; figures from
    /// the guest kernel's scheduler accounting (the GED IRQ thread's CPU time per beat and
    /// longest run, the busy task's longest and total wait).
    GuestCost {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// Heartbeat rates, Hz.
        #[arg(long, value_delimiter = ',', default_values_t = [1.0, 10.0, 100.0])]
        rates: Vec<f64>,
        /// Each window (the baseline and each rate).
        #[arg(long, default_value = "20s", value_parser = acpimon::units::parse_duration)]
        window: Duration,
        /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A heartbeat profile soaked against a real guest whose vCPUs are saturated by userspace
    /// load and whose disk is rewritten with fsync, watched by one `acpimon watch` child:
    /// staged hangs (QMP stop) every `spacing`, each one's detection time against the profile's
    /// bound, and false alarms (late or unresponsive outside a staged hang). Fails on a false
    /// alarm, a hang not called, or one called after its bound.
    Soak {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        #[arg(long, default_value = "30m", value_parser = acpimon::units::parse_duration)]
        duration: Duration,
        /// Between staged hangs.
        #[arg(long, default_value = "60s", value_parser = acpimon::units::parse_duration)]
        spacing: Duration,
        /// The profile: heartbeat interval, timeout and threshold (the fast profile's by default).
        #[arg(long, default_value = "250ms", value_parser = acpimon::units::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "250ms", value_parser = acpimon::units::parse_duration)]
        timeout: Duration,
        #[arg(long, default_value_t = 4)]
        threshold: u32,
        /// The acpimon binary to run as the service [default: `acpimon` beside this program].
        #[arg(long, value_name = "PATH")]
        acpimon: Option<PathBuf>,
        /// Scratch directory; each run keeps a fresh subdirectory there.
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The fault suite: faults injected into a running service watching real test guests
    /// (console floods, the service SIGKILLed during diagnostics and on a full disk, QEMU
    /// SIGKILLed and relaunched, a full data disk with the controller down), each a named check
    /// with a PASS or FAIL line, then a summary table. Needs root (the full-disk checks mount
    /// a tmpfs). Exit status 1 when a check failed.
    Faults {
        /// The test guest's directory (`qemu-fixtures/build-guest` prints it as its last line).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// The CI form: shorter windows and fewer repetitions (a few minutes in all).
        #[arg(long)]
        reduced: bool,
        /// Run only these checks (comma-separated): flood, sigkill-diagnostics, qemu-kill-loop,
        /// full-disk, sigkill-full-disk.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// The acpimon binary to run as the service and controller [default: `acpimon` beside
        /// this program].
        #[arg(long, value_name = "PATH")]
        acpimon: Option<PathBuf>,
        /// Scratch directory; each check keeps a fresh subdirectory there.
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Print the results as JSON after the table.
        #[arg(long)]
        json: bool,
    },
    /// The controller store's pages with N stored events: fills a fresh store (SQLite, or the
    /// empty PostgreSQL database given), times each query the web pages make and each whole
    /// page (its queries and its HTML). Fails when a median is over the 200 ms page budget.
    Store {
        /// Events to store.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 20)]
        nodes: usize,
        #[arg(long, default_value_t = 25)]
        vms_per_node: usize,
        /// Timed rounds per query (the median and the slowest are shown).
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// An empty PostgreSQL database (postgres://...) instead of SQLite.
        #[arg(long, value_name = "URL")]
        database: Option<String>,
        /// Scratch directory for the SQLite store (a fresh subdirectory, removed after).
        #[arg(long, value_name = "DIR")]
        work: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The host sampler's cost per VM per sample (this process with idle threads as its
    /// vCPUs), beside one read of `/proc/self/stat` measured in the same run.
    HostSampler {
        /// Stand-in vCPU threads.
        #[arg(long, default_value_t = 2)]
        vcpus: usize,
        /// Timed rounds of each figure (the median is shown).
        #[arg(long, default_value_t = 10_000)]
        rounds: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Prepare(#[from] acpimon::launch::PrepareError),
    #[error(transparent)]
    Vm(#[from] acpimon::launch::VmError),
    #[error(transparent)]
    Latency(#[from] latency::BenchError),
    #[error(transparent)]
    Scale(#[from] scale::ScaleError),
    #[error(transparent)]
    Flood(#[from] flood::FloodError),
    #[error(transparent)]
    HostStep(#[from] hoststep::HostStepError),
    #[error(transparent)]
    KernelLog(#[from] kernel_log::KernelLogError),
    #[error(transparent)]
    GuestCost(#[from] guestcost::GuestCostError),
    #[error("{0}")]
    Problems(String),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Input(_) | Error::Prepare(_) => 2,
            _ => 1,
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acpimon-bench: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Latency { guest, count, seconds, machine, firmware, high_bar, state_dir, json } => {
            let guest = need_guest(guest, " (tools/bench does both)")?;
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            let fw = Firmware { ovmf: firmware == "ovmf" || high_bar, high_bar };
            runtime().block_on(bench_latency(&guest, count.max(1), seconds, &machine, fw, &state_dir, json))
        }
        Command::Scale { vms, window, hangs, all_hung, sim_latency_ms, no_doorbell, acpimon, work, json } => {
            let service = match acpimon {
                Some(p) => p,
                None => beside_this_program("acpimon")?,
            };
            let work = work.unwrap_or_else(|| std::env::temp_dir().join("acpimon-scale"));
            let mut opts = scale::ScaleOptions::new(service, work);
            opts.vms = vms;
            opts.window = window;
            opts.hangs = hangs;
            opts.all_hung = all_hung;
            opts.latency = Duration::from_secs_f64(sim_latency_ms.max(0.0) / 1e3);
            opts.doorbell = !no_doorbell;
            let report = runtime().block_on(scale::run(&opts, |m| eprintln!("bench-scale: {m}")))?;
            show(&report, json, report.problems())
        }
        Command::Flood { guest, floods, window, machine, acpimon, work, json } => {
            let guest = need_guest(guest, " (tools/bench-flood does both)")?;
            let service = match acpimon {
                Some(p) => p,
                None => beside_this_program("acpimon")?,
            };
            let work = work.unwrap_or_else(|| std::env::temp_dir().join("acpimon-flood"));
            let opts = flood::FloodOptions { service, guest, floods, window, machine, work };
            let report = runtime().block_on(flood::run(&opts, |m| eprintln!("bench-flood: {m}")))?;
            show(&report, json, report.problems())
        }
        Command::HostStep { guest, count, state_dir, json } => {
            let guest = need_guest(guest, " (tools/bench does both)")?;
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            runtime().block_on(bench_host_step(&guest, count.max(1), &state_dir, json))
        }
        Command::KernelLog { guest, memory, reads, state_dir, json } => {
            let guest = need_guest(guest, "")?;
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            let report = runtime().block_on(kernel_log::run(&guest, &memory, reads, &state_dir, |m| {
                eprintln!("bench-kernel-log: {m}")
            }))?;
            show(&report, json, Vec::new())
        }
        Command::GuestCost { guest, rates, window, state_dir, json } => {
            let guest = need_guest(guest, "")?;
            if let Some(bad) = rates.iter().find(|r| !(r.is_finite() && **r > 0.0 && **r <= 1000.0)) {
                return Err(Error::Input(format!(
                    "--rates {bad}: give rates in Hz, above 0 and at most 1000"
                )));
            }
            let state_dir = state_dir.unwrap_or_else(default_state_dir);
            let report = runtime().block_on(guestcost::run(&guest, &rates, window, &state_dir, |m| {
                eprintln!("bench-guest-cost: {m}")
            }))?;
            show(&report, json, Vec::new())
        }
        Command::Soak { guest, duration, spacing, interval, timeout, threshold, acpimon, work, json } => {
            let guest = need_guest(guest, "")?;
            if spacing < Duration::from_secs(10) || duration < spacing || threshold == 0 {
                return Err(Error::Input(format!(
                    "--spacing {} --duration {} --threshold {threshold}: give a spacing of at least 10s                      (a hang and its recovery), a duration of at least one spacing and a threshold above 0",
                    acpimon::units::format_duration(spacing),
                    acpimon::units::format_duration(duration)
                )));
            }
            let service = match acpimon {
                Some(p) => p,
                None => beside_this_program("acpimon")?,
            };
            let opts = soak::SoakOptions {
                service,
                guest,
                profile: soak::Profile { interval, timeout, threshold },
                duration,
                spacing,
                work: work.unwrap_or_else(|| std::env::temp_dir().join("acpimon-soak")),
            };
            let report = runtime().block_on(soak::run(&opts, |m| eprintln!("bench-soak: {m}")))?;
            show(&report, json, report.problems())
        }
        Command::Faults { guest, reduced, only, acpimon, work, json } => {
            let guest = need_guest(guest, " (tools/faults does both)")?;
            if let Some(bad) = only.iter().find(|o| !faults::CHECKS.contains(&o.as_str())) {
                return Err(Error::Input(format!(
                    "no check '{bad}': pick from {}",
                    faults::CHECKS.join(", ")
                )));
            }
            let service = match acpimon {
                Some(p) => p,
                None => beside_this_program("acpimon")?,
            };
            let work = work.unwrap_or_else(|| std::env::temp_dir().join("acpimon-faults"));
            let opts = faults::FaultOptions { service, guest, reduced, only, work };
            let results = runtime().block_on(faults::run(&opts, |m| eprintln!("faults: {m}")));
            print!("{}", faults::table(&results));
            if json {
                println!("{}", serde_json::to_string_pretty(&results).expect("results serialise"));
            }
            let failed: Vec<&str> = results.iter().filter(|r| !r.pass).map(|r| r.name.as_str()).collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Error::Problems(format!("checks failed: {}", failed.join(", "))))
            }
        }
        Command::Store { events, nodes, vms_per_node, rounds, database, work, json } => {
            let base = work.unwrap_or_else(std::env::temp_dir);
            let dir = base.join(format!("acpimon-bench-store-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::Input(format!("cannot create {}: {e}; pass --work DIR", dir.display()))
            })?;
            let opts = acpimon_bench::store::Options {
                events,
                nodes: nodes.max(1),
                vms_per_node: vms_per_node.max(1),
                rounds,
                database,
                work: dir.clone(),
            };
            let report = runtime().block_on(acpimon_bench::store::run(&opts));
            let _ = std::fs::remove_dir_all(&dir);
            let report = report.map_err(Error::Problems)?;
            show(&report, json, report.problems())
        }
        Command::HostSampler { vcpus, rounds, json } => {
            let report = acpimon_bench::sampler::run(vcpus, rounds).map_err(Error::Problems)?;
            show(&report, json, Vec::new())
        }
    }
}

/// The test guest's directory, or the error naming how to give it (`hint`: which tool does it).
fn need_guest(guest: Option<PathBuf>, hint: &str) -> Result<PathBuf, Error> {
    guest.ok_or_else(|| {
        Error::Input(format!(
            "no test guest given: pass --guest DIR or set ACPIMON_GUEST to the directory \
             qemu-fixtures/build-guest prints{hint}"
        ))
    })
}

/// `name` in the directory of this executable, where cargo and installers put both binaries.
fn beside_this_program(name: &str) -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Input(format!("cannot find this program's path ({e}); pass --acpimon PATH")))?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Input(format!(
            "no {name} binary beside {}: build both (`cargo build --release -p acpimon -p acpimon-bench`) \
             or pass --acpimon PATH",
            exe.display()
        )))
    }
}

/// Prints `report` (JSON or text); fails with `problems` when there are any.
fn show<R: serde::Serialize + std::fmt::Display>(
    report: &R,
    json: bool,
    problems: Vec<String>,
) -> Result<(), Error> {
    if json {
        println!("{}", serde_json::to_string_pretty(report).expect("report serialises"));
    } else {
        print!("{report}");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Problems(problems.join("; ")))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// The latency benchmark's firmware.
#[derive(Clone, Copy)]
struct Firmware {
    ovmf: bool,
    /// OVMF keeping its 64-bit window: BAR2 above 4 GiB, the port channel.
    high_bar: bool,
}

/// `acpimon-bench latency`: boots the test guest, measures, shuts it down.
async fn bench_latency(
    guest: &std::path::Path,
    count: usize,
    seconds: f64,
    machine: &str,
    fw: Firmware,
    state_dir: &std::path::Path,
    json: bool,
) -> Result<(), Error> {
    let prepared = launch::prepare(state_dir, "bench", &SsdtConfig::default())?;
    let mut args = acpimon::demo::guest_args(guest, machine, fw.ovmf);
    if fw.ovmf && fw.high_bar {
        // The user's own window size, which acpimon keeps, and the CPU left alone: BAR2 goes
        // above 4 GiB (with phys-bits=37 a 32 GiB window does not fit and BAR2 stays unassigned).
        if let Some(i) = args.iter().position(|a| a == "-cpu") {
            args.drain(i..i + 2);
        }
        args.extend(["-fw_cfg".into(), "name=opt/ovmf/X-PciMmio64Mb,string=32768".into()]);
    }
    let firmware = if fw.ovmf { "ovmf" } else { "seabios" };
    let spec = VmSpec {
        program: "qemu-system-x86_64".into(),
        args,
        prepared,
        readconfig: false,
        leave_to_watch: false,
        console_chardev: None,
    };
    let mut vm = Vm::launch(spec).await?;
    let result = latency::run(&vm, count, Duration::from_secs_f64(seconds)).await;
    let _ = vm.shutdown().await;
    let r = result?;
    let v = vm.qmp.version;
    if json {
        let report = latency::Report {
            qemu: format!("{}.{}.{}", v.0, v.1, v.2),
            machine: machine.into(),
            firmware: firmware.into(),
            count,
            seconds,
            result: r,
        };
        println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
    } else {
        println!(
            "bench: QEMU {}.{}.{} {machine} {firmware} TCG, {count} heartbeats, {seconds} s sustained",
            v.0, v.1, v.2
        );
        print!("{}", latency::table(&r));
    }
    Ok(())
}

/// `acpimon-bench host-step`: boots the test guest with 2 vCPUs, measures, shuts it down.
async fn bench_host_step(
    guest: &std::path::Path,
    count: usize,
    state_dir: &std::path::Path,
    json: bool,
) -> Result<(), Error> {
    let prepared = launch::prepare(state_dir, "bench-host", &SsdtConfig::default())?;
    let mut args = acpimon::demo::guest_args(guest, "pc", false);
    args.extend(["-smp".to_string(), "2".to_string()]);
    let spec = VmSpec {
        program: "qemu-system-x86_64".into(),
        args,
        prepared,
        readconfig: false,
        leave_to_watch: false,
        console_chardev: None,
    };
    let mut vm = Vm::launch(spec).await?;
    let result = hoststep::run(&vm, count, state_dir).await;
    let _ = vm.shutdown().await;
    let r = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("report serialises"));
    } else {
        let v = vm.qmp.version;
        println!(
            "bench: QEMU {}.{}.{} pc TCG, 2 vCPUs, {count} host steps ({} vCPUs read)",
            v.0, v.1, v.2, r.vcpus
        );
        print!("{}", hoststep::table(&r));
        for n in &r.notes {
            println!("note: {n}");
        }
    }
    if r.host_step.p99_ms > hoststep::BOUND.as_secs_f64() * 1e3 {
        return Err(Error::Problems(format!(
            "the host step's p99 {:.1} ms exceeds its budget of {} ms",
            r.host_step.p99_ms,
            hoststep::BOUND.as_millis()
        )));
    }
    Ok(())
}
