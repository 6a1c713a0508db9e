//! The `acpimon` command: parses arguments ([`acpimon::cli`]), dispatches each command to the
//! library module it belongs to, and prints errors. Exit status ([`acpimon::cli::Error`]): 0
//! success, 1 a runtime failure, 2 bad input with a one-line message naming the problem and the
//! fix; `acpimon run` reports QEMU's own exit status N as 64 + N (signal S as 128 + S).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use acpimon::cli::{self, Cli, Command, Error};
use acpimon::generate;
use acpimon::read::{Access, Region};
use acpimon::watch::config::default_state_dir;

fn main() -> ExitCode {
    let cli = Cli::parse();
    acpimon::logging::init(cli.log.options());
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
        Command::QemuArgs { table, region_path, ssdt, format, extras, launch } => {
            let request = cli::QemuArgsRequest { table, region_path, ssdt, format, extras, launch };
            print_with_notes(cli::qemu_args(request)?);
            Ok(())
        }
        Command::Prepare { name, state_dir, table, format, extras, launch, console, launch_args } => {
            let request =
                cli::PrepareRequest { name, state_dir, table, format, extras, launch, console, launch_args };
            print_with_notes(cli::prepare(request)?);
            Ok(())
        }
        Command::Run { run, qemu } => {
            let command = run.command(&qemu)?;
            Ok(runtime().block_on(acpimon::run::command(command))?)
        }
        #[cfg(feature = "controller")]
        Command::Demo { guest, state_dir, machine, ovmf, duration, hang_at } => {
            let opts = acpimon::demo::DemoOptions {
                guest: guest.ok_or(Error::NoGuest)?,
                state_dir: state_dir.unwrap_or_else(default_state_dir),
                machine,
                ovmf,
                duration: duration.map(Duration::from_secs_f64),
                hang_at: hang_at.map(Duration::from_secs_f64),
            };
            runtime().block_on(async { acpimon::demo::run(opts, shutdown_on_signal()).await })?;
            Ok(())
        }
        Command::Watch { config, state_dir, check, json } => {
            let config = cli::watch_config(config.as_deref(), state_dir)?;
            if check && json {
                println!("{:#}", acpimon::report::config_json(&config));
                return Ok(());
            }
            if check {
                print!("{}", acpimon::report::config_summary(&config));
                return Ok(());
            }
            runtime().block_on(async { acpimon::watch::serve(config, shutdown_on_signal(), None).await })?;
            Ok(())
        }
        Command::Dmesg { name, state_dir, json, follow, timeout, ram_file } => {
            let limits = acpimon::memory::dmesg::LogLimits {
                time: Duration::from_secs(timeout),
                ..Default::default()
            };
            if !acpimon::launch::prepare::valid_name(&name) {
                return Err(acpimon::launch::PrepareError::BadName(name).into());
            }
            let dir = state_dir.unwrap_or_else(default_state_dir).join(name);
            let c = acpimon::memory::dmesg::DmesgCommand { dir, json, follow, limits, ram_file };
            Ok(runtime().block_on(acpimon::memory::dmesg::command(c))?)
        }
        Command::Status { config, addr, json } => {
            let addr = cli::status_addr(addr, config.as_deref())?;
            let status = runtime()
                .block_on(acpimon::watch::metrics::fetch_status(addr, Duration::from_secs(5)))
                .map_err(Error::Status)?;
            acpimon::report::print_status(&status, json);
            Ok(())
        }
        #[cfg(feature = "controller")]
        Command::Controller {
            listen,
            store,
            database,
            analyzer_timeout,
            tls_cert,
            tls_key,
            tls_client_ca,
            tokens,
            analyzer,
        } => {
            let tls = tls_cert.zip(tls_key).map(|(cert, key)| acpimon::util::tls::ServerTls {
                cert,
                key,
                client_ca: tls_client_ca,
            });
            let scheme = if tls.is_some() { "https" } else { "http" };
            let opts = acpimon::controller::ControllerOptions {
                listen,
                store,
                database,
                analyzer: (!analyzer.is_empty()).then_some(analyzer),
                analyzer_timeout: Duration::from_secs(analyzer_timeout),
                tls,
                tokens,
            };
            runtime().block_on(async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if let Ok(addr) = rx.await {
                        println!("acpimon controller: listening on {scheme}://{addr}");
                    }
                });
                acpimon::controller::serve(opts, shutdown_on_signal(), Some(tx)).await
            })?;
            Ok(())
        }
        #[cfg(feature = "controller")]
        Command::Token { action } => Ok(acpimon::controller::auth::run(action)?),
        Command::Snapshot { region, json, watch, interval_ms, count } => {
            let region = Region::open(&region, Access::ReadOnly)?;
            if watch {
                let interval = Duration::from_millis(interval_ms.max(10));
                acpimon::report::watch_region(&region, json, interval, count);
            } else {
                acpimon::report::print_snapshot(&region, &region.snapshot()?, None, json);
            }
            Ok(())
        }
        Command::Completions { shell } => print_bytes(&cli::completions(shell)),
        Command::Man { dir: Some(dir) } => cli::man_pages(&dir),
        Command::Man { dir: None } => print_bytes(&cli::man_page()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
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

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not a failure.
fn print_bytes(bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::Stdout(e)),
        _ => Ok(()),
    }
}

/// A command's output on stdout, its notes for the operator on stderr.
fn print_with_notes((text, notes): (String, Vec<String>)) {
    for note in notes {
        eprintln!("acpimon: {note}");
    }
    print!("{text}");
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.into(), source })
}
