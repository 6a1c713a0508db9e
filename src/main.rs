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
use acpimon::launch::LaunchPlan;
use acpimon::read::{Access, Region, RegionError};
use acpimon::report::{snapshot_table, SnapshotReport};

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
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Launch(_) => 2,
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
        Command::QemuArgs { table, region_path, ssdt, format } => {
            let cfg = table.config()?;
            let ssdt_path = ssdt.unwrap_or_else(|| suffixed(&region_path, ".ssdt.aml"));
            let plan = LaunchPlan { ssdt: cfg, ssdt_path, region_path };
            // Render first, so a path QEMU cannot take leaves no files behind.
            let text = match format {
                Format::Argv => plan.argv()?.join("\n") + "\n",
                Format::Readconfig => {
                    let (ini, rest) = plan.readconfig()?;
                    format!(
                        "# acpimon: QEMU ignores -acpitable in a -readconfig file; also pass: {}\n{ini}",
                        rest.join(" ")
                    )
                }
            };
            write_file(&plan.ssdt_path, &generate::build(&plan.ssdt)?)?;
            Region::create(&plan.region_path, plan.ssdt.region_size)?;
            print!("{text}");
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
