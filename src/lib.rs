//! acpimon: agentless monitoring of QEMU VMs through a custom ACPI SSDT.
//!
//! One module per stage of the data path (see `../shared/DESIGN.md` and the README):
//! [`generate`] the SSDT → [`launch`] QEMU with it → (trigger, later) → [`read`] the shared
//! region → [`judge`] what it says. [`abi`] is the contract between the AML and the reader.

pub mod abi;
pub mod app;
pub mod cli;
pub mod console;
#[cfg(feature = "controller")]
pub mod controller;
#[cfg(feature = "controller")]
pub mod demo;
pub mod diagnose;
pub mod event;
pub mod forward;
pub mod generate;
pub mod host;
pub mod judge;
pub mod launch;
pub mod logging;
pub mod memory;
pub mod read;
pub mod report;
pub mod run;
pub mod sentinel;
pub mod trigger;
pub mod units;
pub mod util;
pub mod verdict;
pub mod watch;
