//! The command line: the clap definitions of every `acpimon` command, validated in one stage
//! without I/O ([`TableArgs::config`], [`RunArgs::command`]) into the library's working
//! objects, and the exit statuses ([`Error::exit_code`]). `src/main.rs` parses, dispatches and
//! prints errors; the man page and the shell completions are generated from these definitions.

mod error;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

pub use self::error::{qemu_exit_code, Error, BAD_INPUT, RUNTIME};
use crate::generate::{self, ConfigError, SsdtConfig};
use crate::launch::qemu_config::QemuConfig;
use crate::launch::qemu_version::{self, QemuVersion};
use crate::launch::{self, conflicts, LaunchPlan};
use crate::run::{RunCommand, RunOptions};
use crate::watch::config::default_state_dir;

/// Shown after `acpimon --help` and in the man page.
const EXIT_STATUS: &str = "\
Exit status: 0 success; 1 a runtime failure (region unreadable, I/O, a service not answering);
2 bad input (options, files), with one line naming the problem and the fix. `acpimon run`
reports QEMU's own failure apart from these: QEMU's exit status N as 64 + N (N above 63 as
127), QEMU killed by signal S as 128 + S.";

#[derive(Parser)]
#[command(
    name = "acpimon",
    version,
    about = "Agentless monitoring of QEMU VMs through a custom ACPI SSDT",
    after_help = EXIT_STATUS
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Logging, for every command (see the README, "Logs").
#[derive(Args)]
pub struct LogArgs {
    /// More log lines: -v adds debug lines (QMP messages acpimon does not route), -vv trace.
    /// Without -v/-q, RUST_LOG (e.g. acpimon::qmp=debug) chooses.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors only, -qq errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log lines as human text, or as one JSON object per line on stderr. Under systemd the
    /// text lines carry journal priorities and no timestamps.
    #[arg(long, global = true, value_enum, default_value_t, value_name = "FORMAT")]
    pub log_format: crate::logging::LogFormat,
}

impl LogArgs {
    /// What `logging::init` takes: -v and -q as one signed level.
    pub fn options(&self) -> crate::logging::Options {
        let verbosity = (i16::from(self.verbose) - i16::from(self.quiet)).clamp(-2, 2) as i8;
        crate::logging::Options { format: self.log_format, verbosity }
    }
}

#[derive(Subcommand)]
pub enum Command {
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
        /// followed by the arguments it cannot hold; libvirt: a domain XML fragment to merge.
        #[arg(long, value_enum, default_value_t = Format::Argv)]
        format: Format,
        #[command(flatten)]
        extras: ExtrasArgs,
        #[command(flatten)]
        launch: LaunchArgs,
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
        #[command(flatten)]
        launch: LaunchArgs,
        #[command(flatten)]
        console: ConsoleArgs,
        /// The launcher's own QEMU arguments, after `--`, to find the guest's console in
        /// (its -readconfig files are read too).
        #[arg(last = true, value_name = "QEMU ARGS")]
        launch_args: Vec<String>,
    },
    /// Launch QEMU with acpimon added, send heartbeats, show them live; exits with QEMU.
    ///
    /// Exit status: 0 when QEMU exits 0 (with --duration: when every heartbeat was
    /// acknowledged); 1 acpimon's own failure; 2 bad input; QEMU's exit status N as 64 + N
    /// (N above 63 as 127), also when QEMU fails during start-up (e.g. a bad option: 65);
    /// QEMU killed by signal S as 128 + S.
    Run {
        #[command(flatten)]
        run: RunArgs,
        /// The QEMU program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "QEMU ARGS")]
        qemu: Vec<String>,
    },
    #[cfg(feature = "controller")]
    /// The whole path on the test guest, watched live: a reference controller, the guest, and
    /// `acpimon watch` over it. Runs until Ctrl-C or --duration. tools/demo builds the guest.
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
        /// The configuration file (TOML; see the README). Without it: /etc/acpimon/watch.toml
        /// if it exists, else every VM in --state-dir with the default scenarios.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The state directory (overrides the file's state_dir).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Only validate the configuration, print what it resolves to, and exit.
        #[arg(long)]
        check: bool,
        /// With --check: print the resolved configuration as JSON.
        #[arg(long, requires = "check")]
        json: bool,
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
    #[cfg(feature = "controller")]
    /// The reference controller: receives events over HTTP, stores each once by its key, and
    /// optionally runs an analyzer on each new one.
    Controller {
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long, value_name = "IP:PORT")]
        listen: std::net::SocketAddr,
        /// Directory of the store: the SQLite database `controller.db` (unless --database),
        /// the analyses, and a JSON-file store of an older controller (imported once).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Store events in PostgreSQL instead of SQLite:
        /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (or ?host=/socket/dir).
        #[arg(long, value_name = "URL", env = "ACPIMON_DATABASE")]
        database: Option<String>,
        /// Seconds an analyzer run may take.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        analyzer_timeout: u64,
        /// Serve TLS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM).
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this CA (PEM).
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// The token file (`acpimon token add`): every request but /healthz then needs a
        /// bearer token, a node's to post its own events, an operator's to read.
        #[arg(long, value_name = "FILE")]
        tokens: Option<PathBuf>,
        /// The analyzer program and its arguments, after `--`: run once per new event, with the
        /// event's JSON on stdin.
        #[arg(last = true, value_name = "ANALYZER")]
        analyzer: Vec<String>,
    },
    /// Manage the controller's bearer tokens: one per node (it may post only its own
    /// events) and per operator (may read). The file keeps only their SHA-256.
    #[cfg(feature = "controller")]
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Print a VM's kernel log, read from its memory through QMP (no console, nothing in the
    /// guest): `[    1.234567] text` per line, as dmesg prints it.
    ///
    /// Needs the kernel's VMCOREINFO: published through `-device vmcoreinfo` (which `prepare`
    /// adds) by the guest's qemu_fw_cfg driver, else found by scanning guest RAM. Linux 5.10 or
    /// later. QEMU serves one client per QMP monitor: not while `acpimon watch` holds it.
    Dmesg {
        /// The VM's name (its directory under --state-dir).
        name: String,
        /// The state directory [default: $XDG_RUNTIME_DIR/acpimon or $TMPDIR/acpimon-UID].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// One JSON object per record (seq, ts_nsec, level, facility, flags, caller_id, text).
        #[arg(long)]
        json: bool,
        /// Keep reading: every 2 s, the records written since (only those are read), until the VM exits.
        #[arg(long)]
        follow: bool,
        /// Seconds one read of the log may take.
        #[arg(long, default_value_t = 30, value_name = "SECS")]
        timeout: u64,
        /// Read guest RAM from this file instead of through QMP: the mem-path of a
        /// `-object memory-backend-file,...,share=on` backing all of the guest's RAM (up to
        /// 2.75 GiB); works beside a client holding QMP.
        #[arg(long, value_name = "FILE")]
        ram_file: Option<PathBuf>,
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
    /// Print the completion script for a shell.
    ///
    /// E.g. `acpimon completions bash > /usr/share/bash-completion/completions/acpimon`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from these definitions.
    ///
    /// E.g. `acpimon man > acpimon.1`; with --dir, write it and one page per command there.
    Man {
        /// Write acpimon.1 and acpimon-COMMAND.1 into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Optional channels, shared by `qemu-args`, `prepare` and `run`.
#[derive(Args)]
pub struct ExtrasArgs {
    /// Add the app channel: a virtio-serial port named org.acpimon.app.0 on a socket
    /// (docs/app-protocol.md), for the app-heartbeat scenario.
    #[arg(long)]
    pub app_channel: bool,
    /// Add a virtio-serial port for the QEMU guest agent (org.qemu.guest_agent.0), for the
    /// guest-agent scenario.
    #[arg(long)]
    pub guest_agent: bool,
}

impl ExtrasArgs {
    pub fn extras(&self) -> launch::Extras {
        launch::Extras { app_channel: self.app_channel, guest_agent: self.guest_agent }
    }
}

/// Where `prepare` learns the guest's console, when the launcher gives the VM its own serial
/// port (as EVE's `cons` socket).
#[derive(Args)]
pub struct ConsoleArgs {
    /// The chardev the guest kernel's console is on (a listening Unix socket, mux=on or not),
    /// defined in a --launch-config file, after `--`, or given by --console-socket. Without it, the
    /// chardev of the first serial port those define. acpimon then adds no serial port of its
    /// own, reads that socket, and re-exports it on DIR/console-share.sock for other clients.
    #[arg(long, value_name = "ID")]
    pub console_chardev: Option<String>,
    /// The Unix socket QEMU listens on for --console-chardev, when no file defines it here.
    #[arg(long, value_name = "PATH", requires = "console_chardev")]
    pub console_socket: Option<PathBuf>,
    /// `libvirt` (with --format libvirt): the guest's console is the domain's own serial port
    /// (`<serial type='pty'>`), read through libvirt's console stream by `acpimon watch` with
    /// `[libvirt]`; acpimon adds no serial port and re-exports the console on
    /// DIR/console-share.sock. --console-chardev then names libvirt's chardev of that port
    /// [default: charserial0, the first <serial>].
    #[arg(long, value_enum, value_name = "FROM", conflicts_with = "console_socket")]
    pub console: Option<ConsoleFrom>,
}

/// Where the guest's console is read from, when not from a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleFrom {
    /// libvirt's console stream (`virDomainOpenConsole`) of the domain's serial port.
    Libvirt,
}

impl ConsoleArgs {
    /// The guest's console these name or lead to; `None` keeps acpimon's own serial port.
    /// `launch_config`: the launcher's -readconfig files (`LaunchArgs::launch_config`).
    pub fn source(
        &self,
        launch_args: &[String],
        launch_config: &[PathBuf],
    ) -> Result<Option<launch::console::ConsoleSource>, Error> {
        if self.console == Some(ConsoleFrom::Libvirt) {
            return Ok(None);
        }
        if let (Some(id), Some(socket)) = (&self.console_chardev, &self.console_socket) {
            return Ok(Some(launch::console::ConsoleSource {
                chardev: id.clone(),
                socket: socket.clone(),
                mux: false,
            }));
        }
        let mut args = launch_args.to_vec();
        for file in launch_config {
            args.extend(["-readconfig".to_string(), file.to_string_lossy().into_owned()]);
        }
        Ok(launch::console::from_launch(&args, self.console_chardev.as_deref())?)
    }
}

/// `acpimon qemu-args`' arguments, as parsed.
pub struct QemuArgsRequest {
    pub table: TableArgs,
    pub region_path: PathBuf,
    pub ssdt: Option<PathBuf>,
    pub format: Format,
    pub extras: ExtrasArgs,
    pub launch: LaunchArgs,
}

/// `acpimon qemu-args`: writes the table and the region file, and returns the QEMU options to
/// print and the notes for the operator.
pub fn qemu_args(r: QemuArgsRequest) -> Result<(String, Vec<String>), Error> {
    let user = r.launch.user_config(&[])?;
    let cfg = r.table.config_for(&user)?;
    let ssdt_path = r.ssdt.unwrap_or_else(|| suffixed(&r.region_path, ".ssdt.aml"));
    let mut plan = LaunchPlan::minimal(cfg, ssdt_path, r.region_path);
    plan.app_socket = r.extras.app_channel.then(|| suffixed(&plan.region_path, ".app.sock"));
    plan.guest_agent_socket = r.extras.guest_agent.then(|| suffixed(&plan.region_path, ".qga.sock"));
    let notes = r.launch.adapt(&mut plan, &user)?;
    // Render first, so a path QEMU cannot take leaves no files behind.
    let text = render(&plan, r.format)?;
    let table = generate::build(&plan.ssdt)?;
    std::fs::write(&plan.ssdt_path, table)
        .map_err(|source| Error::Write { path: plan.ssdt_path.clone(), source })?;
    crate::read::Region::create(&plan.region_path, plan.ssdt.region_size)?;
    Ok((text, notes))
}

/// `acpimon prepare`'s arguments, as parsed.
pub struct PrepareRequest {
    pub name: String,
    pub state_dir: PathBuf,
    pub table: TableArgs,
    pub format: Format,
    pub extras: ExtrasArgs,
    pub launch: LaunchArgs,
    pub console: ConsoleArgs,
    pub launch_args: Vec<String>,
}

/// `acpimon prepare`: checks the launch, then writes the VM's directory. Returns the QEMU
/// options to print and the notes for the operator.
pub fn prepare(r: PrepareRequest) -> Result<(String, Vec<String>), Error> {
    // The launcher's files first: one it cannot read is named as such, not as a console problem.
    let user = r.launch.user_config(&r.launch_args)?;
    let source = r.console.source(&r.launch_args, &r.launch.launch_config)?;
    let libvirt_console = r.console.console == Some(ConsoleFrom::Libvirt);
    if libvirt_console && !matches!(r.format, Format::Libvirt) {
        return Err(Error::ConsoleNeedsLibvirt);
    }
    let cfg = r.table.config_for(&user)?;
    // Check before anything is written, so a collision leaves no directory behind.
    let any = || Some(PathBuf::from("/"));
    let mut plan = LaunchPlan {
        qmp_socket: any(),
        // With the guest's own console acpimon adds no serial port.
        console_socket: if source.is_some() || libvirt_console { None } else { any() },
        pvpanic: true,
        app_socket: r.extras.app_channel.then(any).flatten(),
        guest_agent_socket: r.extras.guest_agent.then(any).flatten(),
        doorbell_socket: cfg.doorbell_port.and(any()),
        ..LaunchPlan::minimal(cfg.clone(), "/".into(), "/".into())
    };
    r.launch.adapt(&mut plan, &user)?;
    let mut prepared = launch::prepare_with(&r.state_dir, &r.name, &cfg, r.extras.extras())?;
    let mut notes = Vec::new();
    if let Some(src) = &source {
        prepared.use_guest_console(src)?;
        notes.push(format!(
            "the guest's console is chardev '{}' ({}); acpimon re-exports it on {}",
            src.chardev,
            src.socket.display(),
            prepared.dir.join(launch::prepare::CONSOLE_SHARE).display()
        ));
    }
    if libvirt_console {
        let chardev = r.console.console_chardev.as_deref().unwrap_or(launch::prepare::LIBVIRT_CONSOLE);
        prepared.use_libvirt_console(chardev)?;
        notes.push(format!(
            "the guest's console is the domain's serial port (libvirt's chardev '{chardev}'): \
             `acpimon watch` with [libvirt] reads it through libvirt's console stream and \
             re-exports it on {}; use that socket, not `virsh console`, which libvirt allows \
             one client at a time",
            prepared.dir.join(launch::prepare::CONSOLE_SHARE).display()
        ));
    }
    let mut plan = prepared.descriptor.plan()?;
    notes.extend(r.launch.adapt(&mut plan, &user)?);
    Ok((render(&plan, r.format)?, notes))
}

/// What `qemu-args` and `prepare` know of the launch they print options for.
#[derive(Args)]
pub struct LaunchArgs {
    /// A -readconfig file the VM is launched with (EVE's merged config; repeatable): acpimon
    /// checks it for devices on its slot or IRQ and its ids, picks --slot auto outside it, and
    /// adds OVMF's low-BAR knob when it boots OVMF from pflash drives.
    #[arg(long, value_name = "FILE")]
    pub launch_config: Vec<PathBuf>,
    /// The VM boots OVMF (UEFI) given outside the config files (e.g. -bios on the command
    /// line): add OVMF's low-BAR knob.
    #[arg(long)]
    pub ovmf: bool,
    /// The QEMU binary the VM runs on, asked for its version [default: qemu-system-x86_64].
    #[arg(long, value_name = "PATH", conflicts_with = "qemu_version")]
    pub qemu: Option<String>,
    /// The version of the QEMU the VM runs on, MAJOR.MINOR (5.2 and later), instead of asking
    /// a binary: before 6.0 there is no -action.
    #[arg(long, value_name = "X.Y")]
    pub qemu_version: Option<String>,
}

impl LaunchArgs {
    /// The launcher's configuration: its command line when given (`prepare ... -- ARGS`, with
    /// the -readconfig files it names) and its configuration files. Without the command line
    /// the devices QEMU adds without `-nodefaults` are not assumed (EVE passes it).
    pub fn user_config(&self, launch_args: &[String]) -> Result<QemuConfig, Error> {
        let mut cfg = QemuConfig::from_args(launch_args)?;
        for file in &self.launch_config {
            cfg.add_file(file)?;
        }
        if launch_args.is_empty() {
            cfg.flags.push("nodefaults".into());
        }
        Ok(cfg)
    }

    /// The QEMU version to print options for. Without --qemu or --qemu-version, an installed
    /// qemu-system-x86_64 is asked; with none installed, a current QEMU (6.0 on) is assumed.
    pub fn version(&self) -> Result<Option<QemuVersion>, Error> {
        let v = match (&self.qemu_version, &self.qemu) {
            (Some(text), _) => text.parse()?,
            (None, Some(program)) => qemu_version::probe(program)?,
            (None, None) => match qemu_version::probe("qemu-system-x86_64") {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("{e}; printing options for QEMU 6.0 or later");
                    return Ok(None);
                }
            },
        };
        Ok(Some(qemu_version::supported(v)?))
    }

    /// Adapts `plan` to this launch (OVMF, QEMU version) and checks it for collisions.
    /// Returns the notes for the operator.
    pub fn adapt(&self, plan: &mut LaunchPlan, user: &QemuConfig) -> Result<Vec<String>, Error> {
        plan.qemu_version = self.version()?;
        let mut notes = plan.adapt_to(user);
        if let Some(v) = plan.qemu_version.filter(|v| plan.pvpanic && !v.has_action()) {
            notes.push(format!(
                "QEMU {v} has no -action, so none is printed: launch with -no-shutdown to keep a panicked guest \
                 (paused) for diagnostics; without it QEMU powers it off"
            ));
        }
        if self.ovmf && !plan.ovmf_low_bar && user.fw_cfg(crate::launch::channel::OVMF_MMIO64_KNOB).is_none()
        {
            plan.ovmf_low_bar = true;
            notes.push(
                "OVMF (--ovmf): added OVMF's low-BAR knob; OVMF older than edk2-stable202505 also needs \
                 -cpu ...,phys-bits=37"
                    .into(),
            );
        }
        // Without a config file there is nothing of the VM's own to check against.
        let found = if self.launch_config.is_empty() { Vec::new() } else { conflicts::check(user, plan) };
        if !found.is_empty() {
            return Err(Error::Conflicts(found));
        }
        Ok(notes)
    }
}

/// Options of `run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub table: TableArgs,
    #[command(flatten)]
    pub extras: ExtrasArgs,
    /// Where the VM's directory goes [default: $XDG_RUNTIME_DIR/acpimon or /tmp/acpimon-$UID].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The VM's name.
    #[arg(long, default_value = "vm", value_name = "NAME")]
    pub name: String,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub interval_ms: u64,
    /// Milliseconds a heartbeat waits for its echo before it counts as missed.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub timeout_ms: u64,
    /// Stop after this many seconds, quit QEMU and print a summary; exit 0 only if every
    /// heartbeat was acknowledged.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Pass acpimon's QEMU options as a -readconfig file, as EVE does.
    #[arg(long)]
    pub readconfig: bool,
    /// The chardev of the guest kernel's console (a listening Unix socket, mux=on or not)
    /// [default: that of the first serial port the QEMU arguments or their -readconfig files
    /// define; acpimon's own serial port when they define none]. acpimon reads it and
    /// re-exports it on STATE_DIR/NAME/console-share.sock for other clients.
    #[arg(long, value_name = "ID")]
    pub console_chardev: Option<String>,
    /// When QEMU is started paused (-S), wait for your own `cont` (through another monitor)
    /// instead of resuming it; time spent paused counts toward --duration only.
    #[arg(long)]
    pub wait_cont: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The table's parameters, shared by `ssdt` and `qemu-args`.
#[derive(Args, Clone)]
pub struct TableArgs {
    /// ISA IRQ of the Generic Event Device (below 16), raised through pc-testdev.
    #[arg(long, default_value_t = u32::from(generate::DEFAULT_IRQ), value_name = "N")]
    pub irq: u32,
    /// PCI slot of ivshmem-plain, DEV[.FN] in hex as QEMU's addr= (e.g. 0f or 0x0f.0), or
    /// `auto`: the highest root-bus slot below 1f that the board and the VM's own devices (its
    /// argv and config files) leave free.
    #[arg(long, default_value = "0f.0", value_name = "DEV[.FN]|auto")]
    pub slot: String,
    /// Size of the shared region: a power of two, at least 4096 (e.g. 4096, 64K).
    #[arg(long, default_value = "4096", value_name = "BYTES")]
    pub region_size: String,
    /// Add the thermal-zone fallback, polled by the guest every N tenths of a second.
    #[arg(long, value_name = "N")]
    pub thermal_period_ds: Option<u32>,
    /// OEM table ID written in the table header (1-8 characters).
    #[arg(long, default_value = generate::DEFAULT_OEM_TABLE_ID, value_name = "ID")]
    pub oem_table_id: String,
    /// The I/O port the table rings when a heartbeat's record is complete (an isa-debugcon
    /// whose socket the host reads, so it wakes instead of polling the region).
    #[arg(long, default_value = "0x403", value_name = "PORT", value_parser = parse_port)]
    pub doorbell_port: u16,
    /// No doorbell: the host polls the region for each heartbeat's record.
    #[arg(long)]
    pub no_doorbell: bool,
}

/// An I/O port, in hex (`0x403`) or decimal.
fn parse_port(s: &str) -> Result<u16, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not an I/O port; write e.g. 0x403"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Argv,
    Readconfig,
    /// A libvirt domain XML fragment to merge into a domain (`<qemu:commandline>`, `<panic>`).
    Libvirt,
}

impl TableArgs {
    /// [`TableArgs::config`], with `--slot auto` resolved against the VM's configuration.
    pub fn config_for(&self, user: &QemuConfig) -> Result<SsdtConfig, Error> {
        if self.slot.trim() != "auto" {
            return Ok(self.config()?);
        }
        let slot = conflicts::free_slot(user).ok_or(Error::NoFreeSlot)?;
        let table = TableArgs { slot: slot.to_string(), ..self.clone() };
        Ok(table.config()?)
    }

    /// Validation stage: no I/O, every problem as a library error. `--slot auto` is resolved
    /// against no configuration (the board alone).
    pub fn config(&self) -> Result<SsdtConfig, ConfigError> {
        if self.slot.trim() == "auto" {
            let slot = conflicts::free_slot(&QemuConfig::default()).expect("an empty board has free slots");
            let table = TableArgs { slot: slot.to_string(), ..self.clone() };
            return table.config();
        }
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
            doorbell_port: if self.no_doorbell {
                None
            } else {
                Some(generate::validate_doorbell_port(self.doorbell_port)?)
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl RunArgs {
    /// Validation stage of `acpimon run`: no I/O.
    pub fn command(&self, qemu: &[String]) -> Result<RunCommand, Error> {
        let (program, args) = qemu.split_first().ok_or(Error::NoQemu)?;
        Ok(RunCommand {
            state_dir: self.state_dir.clone().unwrap_or_else(default_state_dir),
            name: self.name.clone(),
            // `--slot auto` reads the -readconfig files the arguments name.
            ssdt: if self.table.slot.trim() == "auto" {
                self.table.config_for(&QemuConfig::from_args(args)?)?
            } else {
                self.table.config()?
            },
            extras: self.extras.extras(),
            readconfig: self.readconfig,
            json: self.json,
            console_chardev: self.console_chardev.clone(),
            options: RunOptions {
                interval: Duration::from_millis(self.interval_ms.max(1)),
                timeout: Duration::from_millis(self.timeout_ms.max(1)),
                duration: self.duration.map(Duration::from_secs_f64),
                boot_timeout: Duration::from_secs(120),
                cont: !self.wait_cont,
            },
            program: program.clone(),
            args: args.to_vec(),
        })
    }
}

/// The QEMU options `qemu-args` and `prepare` print, in `format`.
pub fn render(plan: &LaunchPlan, format: Format) -> Result<String, Error> {
    Ok(match format {
        Format::Argv => plan.argv()?.join("\n") + "\n",
        Format::Readconfig => {
            let (ini, rest) = plan.readconfig()?;
            format!(
                "# acpimon: a -readconfig file cannot carry these; pass them on the command line: {}\n{ini}",
                rest.join(" ")
            )
        }
        Format::Libvirt => crate::launch::libvirt::domain_xml(plan)?,
    })
}

/// The service's configuration: the file, /etc/acpimon/watch.toml, or the built-in one;
/// `--state-dir` overrides.
pub fn watch_config(file: Option<&Path>, state_dir: Option<PathBuf>) -> Result<crate::watch::Config, Error> {
    let system = Path::new(crate::watch::config::SYSTEM_CONFIG);
    Ok(crate::watch::Config::resolve(file, system, state_dir)?)
}

/// Where `acpimon status` asks: `--addr`, else the address in `--config` (or
/// /etc/acpimon/watch.toml), else the default.
pub fn status_addr(
    addr: Option<std::net::SocketAddr>,
    config: Option<&Path>,
) -> Result<std::net::SocketAddr, Error> {
    let system = Path::new(crate::watch::config::SYSTEM_CONFIG);
    let config = config.or_else(|| system.exists().then_some(system));
    Ok(match (addr, config) {
        (Some(a), _) => a,
        (None, Some(file)) => crate::watch::Config::load(file)?.metrics.ok_or_else(|| {
            Error::Status(format!(
                "{} turns the status endpoint off ([metrics] listen = \"\")",
                file.display()
            ))
        })?,
        (None, None) => crate::watch::config::DEFAULT_METRICS.parse().expect("valid address"),
    })
}

/// `acpimon completions SHELL`: the script.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "acpimon", &mut out);
    out
}

/// `acpimon man`: the page (roff). clap_mangen's sections, with the exit statuses under their
/// customary title rather than its generic "EXTRA".
pub fn man_page() -> Vec<u8> {
    let man = clap_mangen::Man::new(Cli::command());
    let mut out = Vec::new();
    type Section = fn(&clap_mangen::Man, &mut dyn Write) -> std::io::Result<()>;
    let sections: [Section; 6] = [
        clap_mangen::Man::render_title,
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
        clap_mangen::Man::render_subcommands_section,
    ];
    for section in sections {
        section(&man, &mut out).expect("writing to memory cannot fail");
    }
    out.extend_from_slice(b".SH \"EXIT STATUS\"\n");
    out.extend_from_slice(EXIT_STATUS.replace('-', "\\-").as_bytes());
    out.extend_from_slice(b"\n");
    man.render_version_section(&mut out).expect("writing to memory cannot fail");
    out
}

/// `acpimon man --dir DIR`: acpimon.1 and one page per command, written into `dir`.
pub fn man_pages(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.into(), source })?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|source| Error::Write { path: dir.into(), source })?;
    let main = dir.join("acpimon.1");
    std::fs::write(&main, man_page()).map_err(|source| Error::Write { path: main, source })
}

/// `path` with `suffix` appended to its last component.
pub fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_resolves_slot_auto_from_its_qemu_arguments() {
        let cli = Cli::try_parse_from([
            "acpimon",
            "run",
            "--slot",
            "auto",
            "--",
            "qemu",
            "-M",
            "q35",
            "-device",
            "e1000,addr=1e",
        ])
        .unwrap();
        let Command::Run { run, qemu } = cli.command else { panic!("not run") };
        assert_eq!(run.command(&qemu).unwrap().ssdt.slot.to_string(), "1d.0");
        let table = TableArgs {
            slot: "auto".into(),
            ..Cli::try_parse_from(["acpimon", "ssdt", "--out", "x"])
                .map(|c| match c.command {
                    Command::Ssdt { table, .. } => table,
                    _ => unreachable!(),
                })
                .unwrap()
        };
        assert_eq!(table.config().unwrap().slot.to_string(), "1e.0", "no configuration: the board alone");
    }
}

/// `acpimon token ...`.
#[cfg(feature = "controller")]
#[derive(Subcommand)]
pub enum TokenAction {
    /// Make a token for NAME, print it once, and store its hash.
    Add {
        /// The node's name (acpimon watch's `node` setting), or an operator's.
        name: String,
        /// What the token allows.
        #[arg(long, value_enum, default_value = "node")]
        role: crate::controller::auth::Role,
        /// The controller's token file.
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
    },
    /// List the tokens' names, roles and dates.
    List {
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
    },
    /// Revoke NAME's tokens (the controller stops taking them at once).
    Remove {
        name: String,
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
    },
}
