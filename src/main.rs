//! The `acpimon` command: parses arguments, turns them into library configuration, and
//! dispatches. Exit status: 0 success, 1 a runtime failure (region unreadable, I/O),
//! 2 bad input (options, files) with a one-line message naming the problem and the fix.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use acpimon::generate::{self, ConfigError, SsdtConfig};
use acpimon::judge::Tracker;
use acpimon::launch::{self, LaunchPlan, PrepareError, Vm, VmError, VmSpec};
use acpimon::read::{Access, Region, RegionError};
use acpimon::report::{run_event_line, snapshot_table, summary_line, SnapshotReport};
use acpimon::run::{RunEvent, RunOptions, Summary};
use acpimon::trigger::TriggerError;
use acpimon::watch::config::default_state_dir;

#[derive(Parser)]
#[command(name = "acpimon", version, about = "Agentless monitoring of QEMU VMs through a custom ACPI SSDT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the SSDT (AML) that the guest kernel executes.
    Ssdt {
        /// Where to write the table.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        table: TableArgs,
    },
    /// Create the region file and the table, and print the QEMU arguments that add them.
    QemuArgs {
        #[command(flatten)]
        table: TableArgs,
        /// The shared-memory region file; created with the ABI header if missing.
        #[arg(long, value_name = "PATH")]
        region_path: PathBuf,
        /// Where to write the table [default: REGION_PATH.ssdt.aml].
        #[arg(long, value_name = "FILE")]
        ssdt: Option<PathBuf>,
        /// argv: one argument per line; readconfig: a QEMU -readconfig file (as EVE uses),
        /// followed by the arguments it cannot hold.
        #[arg(long, value_enum, default_value_t = Format::Argv)]
        format: Format,
        #[command(flatten)]
        extras: ExtrasArgs,
    },
    /// Create a VM's state directory (table, region, vm.json) and print its QEMU arguments,
    /// with a QMP socket, a serial console socket and pvpanic.
    Prepare {
        /// The VM's name (its directory under --state-dir).
        name: String,
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        #[command(flatten)]
        table: TableArgs,
        #[arg(long, value_enum, default_value_t = Format::Argv)]
        format: Format,
        #[command(flatten)]
        extras: ExtrasArgs,
    },
    /// Launch QEMU with acpimon added, send heartbeats, show them live; exits with QEMU.
    Run {
        #[command(flatten)]
        run: RunArgs,
        /// The QEMU program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "QEMU ARGS")]
        qemu: Vec<String>,
    },
    /// The whole path on the built-in test guest, watched live: a reference controller, the
    /// guest, and `acpimon watch` over it. Runs until Ctrl-C or --duration.
    Demo {
        /// The test guest's directory: the last line `qemu-fixtures/build-guest` prints
        /// (tools/demo builds it and passes it).
        #[arg(long, env = "ACPIMON_GUEST", value_name = "DIR")]
        guest: Option<PathBuf>,
        /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Machine type for the demo guest.
        #[arg(long, default_value = "pc", value_parser = ["pc", "q35"])]
        machine: String,
        /// Boot through OVMF (UEFI) instead of SeaBIOS (PVH).
        #[arg(long)]
        ovmf: bool,
        /// Stop after this many seconds; exit 0 only if everything shown happened.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Stop the guest's vCPUs this many seconds after it is healthy, to show a hang being
        /// caught, diagnosed and delivered; it is resumed once the bundle is written.
        #[arg(long, value_name = "SECS")]
        hang_at: Option<f64>,
    },
    /// Watch every VM in the state directory: scenarios, state, diagnostics, forwarding,
    /// metrics. Runs until SIGTERM or SIGINT.
    Watch {
        /// The configuration file (TOML; see the README). Without it: every VM in
        /// --state-dir with the default scenarios.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The state directory (overrides the file's state_dir).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Only validate the configuration, print what it resolves to, and exit.
        #[arg(long)]
        check: bool,
    },
    /// Show every VM a running `acpimon watch` is watching.
    Status {
        /// The service's configuration, to find its status address.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The service's metrics/status address [default: from --config, else 127.0.0.1:9464].
        #[arg(long, value_name = "IP:PORT")]
        addr: Option<std::net::SocketAddr>,
        /// Print the service's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The reference controller: receives events over HTTP, stores each once by its key, and
    /// optionally runs an analyzer on each new one.
    Controller {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long, value_name = "IP:PORT")]
        listen: std::net::SocketAddr,
        /// Directory for the received events.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Seconds an analyzer run may take.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        analyzer_timeout: u64,
        /// The analyzer program and its arguments, after `--`: run once per new event, with the
        /// event's JSON on stdin.
        #[arg(last = true, value_name = "ANALYZER")]
        analyzer: Vec<String>,
    },
    /// Print the decoded contents of a region file.
    Snapshot {
        /// The region file.
        region: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep reading: redraw on a terminal, otherwise one line per new record.
        #[arg(long)]
        watch: bool,
        /// With --watch: milliseconds between reads.
        #[arg(long, default_value_t = 500, value_name = "MS")]
        interval_ms: u64,
        /// With --watch: stop after this many reads.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

/// Optional channels, shared by `qemu-args`, `prepare` and `run`.
#[derive(Args)]
struct ExtrasArgs {
    /// Add the app channel: a virtio-serial port named org.acpimon.app.0 on a socket
    /// (docs/app-protocol.md), for the app-heartbeat scenario.
    #[arg(long)]
    app_channel: bool,
    /// Add a virtio-serial port for the QEMU guest agent (org.qemu.guest_agent.0), for the
    /// guest-agent scenario.
    #[arg(long)]
    guest_agent: bool,
}

impl ExtrasArgs {
    fn extras(&self) -> launch::Extras {
        launch::Extras { app_channel: self.app_channel, guest_agent: self.guest_agent }
    }
}

/// Options of `run`.
#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    table: TableArgs,
    #[command(flatten)]
    extras: ExtrasArgs,
    /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or /tmp/acpimon-$UID].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The VM's name.
    #[arg(long, default_value = "vm", value_name = "NAME")]
    name: String,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    interval_ms: u64,
    /// Milliseconds a heartbeat waits for its echo before it counts as missed.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    timeout_ms: u64,
    /// Stop after this many seconds, quit QEMU and print a summary; exit 0 only if every
    /// heartbeat was acknowledged.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Pass acpimon's QEMU options as a -readconfig file, as EVE does.
    #[arg(long)]
    readconfig: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

/// The table's parameters, shared by `ssdt` and `qemu-args`.
#[derive(Args)]
struct TableArgs {
    /// ISA IRQ of the Generic Event Device (below 16), raised through pc-testdev.
    #[arg(long, default_value_t = u32::from(generate::DEFAULT_IRQ), value_name = "N")]
    irq: u32,
    /// PCI slot of ivshmem-plain, DEV[.FN] in hex as QEMU's addr= (e.g. 0f or 0x0f.0).
    #[arg(long, default_value = "0f.0", value_name = "DEV[.FN]")]
    slot: String,
    /// Size of the shared region: a power of two, at least 4096 (e.g. 4096, 64K).
    #[arg(long, default_value = "4096", value_name = "BYTES")]
    region_size: String,
    /// Add the thermal-zone fallback, polled by the guest every N tenths of a second.
    #[arg(long, value_name = "N")]
    thermal_period_ds: Option<u32>,
    /// OEM table ID written in the table header (1-8 characters).
    #[arg(long, default_value = generate::DEFAULT_OEM_TABLE_ID, value_name = "ID")]
    oem_table_id: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Argv,
    Readconfig,
}

impl TableArgs {
    /// Validation stage: no I/O, every problem as a library error.
    fn config(&self) -> Result<SsdtConfig, ConfigError> {
        let thermal_period_ds = match self.thermal_period_ds {
            Some(p) => Some(u16::try_from(p).map_err(|_| ConfigError::ThermalPeriod(p))?),
            None => None,
        };
        let cfg = SsdtConfig {
            slot: self.slot.parse()?,
            irq: generate::validate_irq(self.irq)?,
            region_size: generate::parse_region_size(&self.region_size)?,
            oem_table_id: self.oem_table_id.clone(),
            thermal_period_ds,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Every failure a command can end with.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Launch(#[from] acpimon::launch::LaunchError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot write {path}: {source}; check that its directory exists and is writable")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("lost track of the QEMU process: {0}")]
    Wait(std::io::Error),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Trigger(#[from] TriggerError),
    #[error(transparent)]
    Demo(#[from] acpimon::demo::DemoError),
    #[error(
        "no test guest given: pass --guest DIR or set ACPIMON_GUEST to the directory \
         qemu-fixtures/build-guest prints (tools/demo does both)"
    )]
    NoGuest,
    #[error("{missed} of {sent} heartbeats were not acknowledged")]
    Unacknowledged { missed: u64, sent: u64 },
    #[error("QEMU exited with status {0}")]
    QemuStatus(i32),
    #[error(transparent)]
    WatchConfig(#[from] acpimon::watch::config::ConfigErrors),
    #[error(transparent)]
    Watch(#[from] acpimon::watch::WatchError),
    #[error(transparent)]
    Controller(#[from] acpimon::forward::controller::ControllerError),
    #[error("{0}")]
    Status(String),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Launch(_) | Error::Prepare(_) | Error::WatchConfig(_) => 2,
            Error::NoGuest | Error::Demo(acpimon::demo::DemoError::Fixture(_)) => 2,
            Error::Vm(VmError::Conflicts(_)) => 2,
            Error::QemuStatus(code) => u8::try_from(*code).unwrap_or(1),
            Error::Region(e) if is_bad_input(e) => 2,
            _ => 1,
        }
    }
}

fn is_bad_input(e: &RegionError) -> bool {
    matches!(
        e,
        RegionError::Missing(_)
            | RegionError::TooSmall { .. }
            | RegionError::TooLarge { .. }
            | RegionError::SizeConflict { .. }
            | RegionError::Decode { .. }
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acpimon: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(command: Command) -> Result<(), Error> {
    match command {
        Command::Ssdt { out, table } => write_file(&out, &generate::build(&table.config()?)?),
        Command::QemuArgs { table, region_path, ssdt, format, extras } => {
            let cfg = table.config()?;
            let ssdt_path = ssdt.unwrap_or_else(|| suffixed(&region_path, ".ssdt.aml"));
            let mut plan = LaunchPlan::minimal(cfg, ssdt_path, region_path);
            plan.app_socket = extras.app_channel.then(|| suffixed(&plan.region_path, ".app.sock"));
            plan.guest_agent_socket = extras.guest_agent.then(|| suffixed(&plan.region_path, ".qga.sock"));
            // Render first, so a path QEMU cannot take leaves no files behind.
            let text = render(&plan, format)?;
            write_file(&plan.ssdt_path, &generate::build(&plan.ssdt)?)?;
            Region::create(&plan.region_path, plan.ssdt.region_size)?;
            print!("{text}");
            Ok(())
        }
        Command::Prepare { name, state_dir, table, format, extras } => {
            let prepared = launch::prepare_with(&state_dir, &name, &table.config()?, extras.extras())?;
            print!("{}", render(&prepared.descriptor.plan()?, format)?);
            Ok(())
        }
        Command::Run { run, qemu } => {
            let (program, args) = qemu.split_first().expect("clap requires the QEMU command");
            runtime().block_on(run_vm(&run, program.clone(), args.to_vec()))
        }
        Command::Demo { guest, state_dir, machine, ovmf, duration, hang_at } => {
            let guest = guest.ok_or(Error::NoGuest)?;
            let opts = acpimon::demo::DemoOptions {
                guest,
                state_dir: state_dir.unwrap_or_else(default_state_dir),
                machine,
                ovmf,
                duration: duration.map(Duration::from_secs_f64),
                hang_at: hang_at.map(Duration::from_secs_f64),
            };
            runtime().block_on(async { acpimon::demo::run(opts, shutdown_on_signal()).await })?;
            Ok(())
        }
        Command::Watch { config, state_dir, check } => {
            let config = watch_config(config.as_deref(), state_dir)?;
            if check {
                print!("{}", acpimon::report::config_summary(&config));
                return Ok(());
            }
            runtime().block_on(watch(config))
        }
        Command::Status { config, addr, json } => {
            let addr = match (addr, config) {
                (Some(a), _) => a,
                (None, Some(file)) => acpimon::watch::Config::load(&file)?.metrics.ok_or_else(|| {
                    Error::Status(format!(
                        "{} turns the status endpoint off ([metrics] listen = \"\")",
                        file.display()
                    ))
                })?,
                (None, None) => acpimon::watch::config::DEFAULT_METRICS.parse().expect("valid address"),
            };
            let status = runtime()
                .block_on(acpimon::watch::metrics::fetch_status(addr, Duration::from_secs(5)))
                .map_err(Error::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status).expect("status serialises"));
            } else {
                print!("{}", acpimon::report::status_table(&status));
            }
            Ok(())
        }
        Command::Controller { listen, store, analyzer_timeout, analyzer } => {
            let opts = acpimon::forward::controller::ControllerOptions {
                listen,
                store,
                analyzer: (!analyzer.is_empty()).then_some(analyzer),
                analyzer_timeout: Duration::from_secs(analyzer_timeout),
            };
            runtime().block_on(async {
                let shutdown = shutdown_on_signal();
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Ok(addr) = rx.await {
                        println!("acpimon controller: listening on http://{addr}");
                    }
                });
                acpimon::forward::controller::serve(opts, shutdown, Some(tx)).await
            })?;
            Ok(())
        }
        Command::Snapshot { region, json, watch, interval_ms, count } => {
            let region = Region::open(&region, Access::ReadOnly)?;
            if watch {
                watch_region(&region, json, Duration::from_millis(interval_ms.max(10)), count)
            } else {
                let snap = region.snapshot()?;
                print_snapshot(&region, &snap, None, json);
                Ok(())
            }
        }
    }
}

fn render(plan: &LaunchPlan, format: Format) -> Result<String, Error> {
    Ok(match format {
        Format::Argv => plan.argv()?.join("\n") + "\n",
        Format::Readconfig => {
            let (ini, rest) = plan.readconfig()?;
            format!(
                "# acpimon: a -readconfig file cannot carry these; pass them on the command line: {}\n{ini}",
                rest.join(" ")
            )
        }
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

/// The service's configuration: the file, or the built-in one; `--state-dir` overrides.
fn watch_config(file: Option<&Path>, state_dir: Option<PathBuf>) -> Result<acpimon::watch::Config, Error> {
    let mut config = match file {
        Some(f) => acpimon::watch::Config::load(f)?,
        None => acpimon::watch::Config::builtin(state_dir.clone().unwrap_or_else(default_state_dir)),
    };
    if let (Some(dir), Some(_)) = (state_dir, file) {
        config.state_dir = dir;
    }
    Ok(config)
}

/// `acpimon watch`: the service, until SIGTERM or SIGINT.
async fn watch(config: acpimon::watch::Config) -> Result<(), Error> {
    let shutdown = shutdown_on_signal();
    acpimon::watch::serve(config, shutdown, None).await?;
    Ok(())
}

/// A flag that turns true on SIGTERM or SIGINT: every OS signal becomes this one input.
fn shutdown_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// `acpimon run`: prepare, launch, heartbeat until QEMU exits or --duration passes.
async fn run_vm(args: &RunArgs, program: String, qemu_args: Vec<String>) -> Result<(), Error> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let prepared = launch::prepare_with(&state_dir, &args.name, &args.table.config()?, args.extras.extras())?;
    let spec =
        VmSpec { program, args: qemu_args, prepared, readconfig: args.readconfig, leave_to_watch: false };
    let mut vm = Vm::launch(spec).await?;
    let json = args.json;
    if !json {
        let d = &vm.prepared.descriptor;
        println!(
            "acpimon: {} running (QEMU {}.{}.{}); state in {}; heartbeat IRQ {} every {} ms",
            d.name,
            vm.qmp.version.0,
            vm.qmp.version.1,
            vm.qmp.version.2,
            vm.prepared.dir.display(),
            d.irq,
            args.interval_ms
        );
        for note in &vm.notes {
            println!("acpimon: {note}");
        }
        if let Err(why) = vm.console() {
            println!("acpimon: console unavailable ({why}); monitoring without it");
        }
    }
    let opts = RunOptions {
        interval: Duration::from_millis(args.interval_ms.max(1)),
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        duration: args.duration.map(Duration::from_secs_f64),
        boot_timeout: Duration::from_secs(120),
    };
    let summary = acpimon::run::run(&mut vm, opts, |ev: &RunEvent| {
        if json {
            println!("{}", serde_json::to_string(ev).expect("events serialise"));
        } else {
            println!("{}", run_event_line(ev));
        }
    })
    .await?;
    print_summary(&summary, json);
    if args.duration.is_some() {
        return match summary.sent - summary.acked {
            0 if summary.sent > 0 => Ok(()),
            missed => Err(Error::Unacknowledged { missed, sent: summary.sent }),
        };
    }
    let status = vm.wait().await.map_err(Error::Wait)?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(Error::QemuStatus(code)),
        None => Err(Error::QemuStatus(1)),
    }
}

fn print_summary(s: &Summary, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "type": "summary", "summary": s }));
    } else {
        println!("{}", summary_line(s));
    }
}

fn print_snapshot(
    region: &Region,
    snap: &acpimon::read::Snapshot,
    obs: Option<&acpimon::judge::Observation>,
    json: bool,
) {
    if json {
        let report = SnapshotReport { region: region.path(), snapshot: snap, observation: obs };
        println!("{}", serde_json::to_string(&report).expect("snapshot serialises"));
    } else {
        print!("{}", snapshot_table(region.path(), snap, obs));
    }
}

/// `snapshot --watch`: a live view. Errors while watching (a VM paused mid-write, a corrupt
/// header) are shown and the watch goes on.
fn watch_region(region: &Region, json: bool, interval: Duration, count: Option<u64>) -> Result<(), Error> {
    let tty = std::io::stdout().is_terminal() && !json;
    let mut tracker = Tracker::new();
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) {
        n += 1;
        let started = Instant::now();
        match region.snapshot() {
            Ok(snap) => {
                let obs = tracker.observe(snap.record.as_ref(), started);
                if tty {
                    print!("\x1b[H\x1b[2J{}", snapshot_table(region.path(), &snap, Some(&obs)));
                } else if obs.fresh || n == 1 {
                    print_snapshot(region, &snap, Some(&obs), json);
                }
            }
            Err(e) => eprintln!("acpimon: {e}"),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.into(), source })
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}
