//! `acpimon-responder`: the reference guest side of the acpimon app protocol
//! (`docs/app-protocol.md`).
//!
//! One module per concern: [`args`] (the command line, no I/O), [`json`] and [`proto`] (the
//! messages), [`status`] (the status file), [`audit`] (running checks), [`port`] (the app
//! channel's I/O loop), [`mailbox`] (the app mailbox in the ivshmem BAR) and [`sys`] (the few
//! system calls std lacks). `unsafe` appears only in [`sys`] and [`mailbox`], each block with
//! its `SAFETY` argument.

pub mod args;
pub mod audit;
pub mod json;
pub mod mailbox;
pub mod port;
pub mod proto;
pub mod status;
pub mod sys;

/// Logs one line to stderr, prefixed with the program's name.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("acpimon-responder: {}", format_args!($($arg)*))
    };
}
