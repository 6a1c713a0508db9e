//! `acpimon-responder`: see `acpimon-responder --help` and the crate's README.

use std::process::ExitCode;
use std::time::Duration;

use acpimon_responder::args::{self, Command, Config, Port};
use acpimon_responder::{log, mailbox, port};

fn main() -> ExitCode {
    match args::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("acpimon-responder {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(cfg)) => run(cfg),
        Err(e) => {
            eprintln!("acpimon-responder: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cfg: Config) -> ExitCode {
    if let Some(device) = cfg.mailbox.clone() {
        let (status_file, beat) = (cfg.status_file.clone(), cfg.beat);
        let spawned = std::thread::Builder::new().name("mailbox".into()).spawn(move || loop {
            let device = device.clone();
            let status_file = status_file.clone();
            // mailbox::run never returns; a panic in it is logged and the mailbox restarted.
            let _ = std::panic::catch_unwind(move || mailbox::run(device, status_file, beat));
            log!("mailbox: the writer panicked; restarting it in 5 s");
            std::thread::sleep(Duration::from_secs(5));
        });
        if let Err(e) = spawned {
            log!("cannot start the mailbox thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    match cfg.port {
        Port::None => loop {
            std::thread::park();
        },
        _ => match port::serve(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
