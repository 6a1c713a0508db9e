//! A simulated VM for scale benchmarks of the watch service: it serves a prepared VM directory
//! (`acpimon prepare`) the way QEMU with a booted guest would, without QEMU. Real parts stay
//! the real parts in functional tests (see `tests/qemu.rs`); this exists in addition, so 500
//! VMs fit on the 2 cores that also run the service.
//!
//! What is simulated, and how faithfully:
//!
//! - **The guest's AML** is [`SimulatedAml`](acpimon::read::sim::SimulatedAml) (byte-identical
//!   to ACPICA executing our table, `tests/acpica.rs`), writing into the VM's real region
//!   file: the boot record at start and at every reset (as `_INI`), a GED record per raised
//!   IRQ (as `_EVT`), and, when the descriptor enables the thermal zone, a thermal record
//!   every period (as `_TMP`).
//! - **QMP** on `qmp.sock`: QEMU 10.0.2's greeting, capabilities negotiation (every other
//!   command is refused with `CommandNotFound` before it, as QEMU does), replies echoing `id`,
//!   events (`STOP`, `RESUME`, `RESET`, `SHUTDOWN`, `GUEST_PANICKED`, `DUMP_COMPLETED`) in
//!   QEMU's shape, with no `data` member when the event has none. The commands are listed in
//!   [`COMMANDS`]; HMP through `human-monitor-command` understands `o`, `i`, `info registers`,
//!   `info status`, `info version`, `nmi`, `stop`, `cont`/`c` and `system_reset`, and answers
//!   anything else with an empty string. Up to [`MAX_QMP_CLIENTS`] clients are served at once
//!   (QEMU can have several monitors); a further client waits in the listen backlog until
//!   one leaves, as a second client of one QEMU monitor does. Commands are read one per line
//!   (every QMP client sends a newline after each), at most [`MAX_QMP_LINE`] bytes.
//! - **The serial console** on `console.sock`: one client at a time (a QEMU socket chardev),
//!   input read and discarded, except that a line `uptime` is echoed and answered with a
//!   busybox-style uptime line and a prompt while the guest is alive and running. The guest
//!   prints a few kernel lines at boot, on a panic and on an NMI; like QEMU with `wait=off`,
//!   output is dropped while no client is connected.
//! - **The doorbell** on the descriptor's doorbell socket, when it has one: one client at a
//!   time, [`acpimon::abi::DOORBELL_BYTE`] written after each GED record, as the table's
//!   `_EVT` rings its `isa-debugcon`; dropped while no client is connected.
//! - **Timing**: a GED record is written [`SimVmOptions::latency`] after the IRQ is raised
//!   (immediately, inside the QMP command, when it is zero). The IRQ is level-triggered as
//!   with pc-testdev: raising it again before the guest ran `_EVT` makes no second event, and
//!   a raised line waits while the VM is paused or the guest hung, then runs when it answers
//!   again.
//!
//! States ([`SimVm::set_state`]) combine QEMU's run state with the guest's: a *hung* guest
//! leaves QEMU answering but writes nothing; *paused* is QEMU's `stop`; *panicked* is what
//! pvpanic reports, with `-action panic=none` (acpimon's launch: action `run`, the VM keeps
//! running) or `panic=pause` (action `pause`, run state `guest-panicked`, then `STOP`); *gone*
//! is QEMU killed: sockets closed and unlinked, no event. `quit` is a clean exit: `SHUTDOWN`,
//! then gone. A gone VM stays gone; to simulate the VM being started again, [`SimVm::stop`] it
//! and [`SimVm::start`] the same directory (the region keeps the boot count, which goes up).
//!
//! Cost: no threads; per VM two accept tasks (QMP, console), one task per QMP client and none
//! per console client (the accept task serves it), one short-lived task per delayed record,
//! one for the thermal zone if enabled. Each VM holds four descriptors once the service is
//! connected (two listeners, two connections): a process serving 500 VMs and the service
//! needs an open-file limit above 3000 (`ulimit -n`).

mod console;
mod doorbell;
mod machine;
mod qmp;

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use self::machine::Shared;
pub use self::qmp::{COMMANDS, MAX_QMP_CLIENTS, MAX_QMP_LINE};
use acpimon::generate::{ConfigError, SsdtConfig};
use acpimon::launch::{prepare, Descriptor, PrepareError};
use acpimon::read::{Access, Region, RegionError};

/// QEMU's version, as the simulated VM reports it.
pub const QEMU_VERSION: (u64, u64, u64) = (10, 0, 2);

/// How to run one simulated VM.
#[derive(Clone, Debug)]
pub struct SimVmOptions {
    /// A VM directory made by [`acpimon::launch::prepare()`] (its `vm.json`, region and socket
    /// paths are used).
    pub dir: PathBuf,
    /// The guest's delay between the raised IRQ and the GED record (zero: at once).
    pub latency: Duration,
}

impl SimVmOptions {
    /// Options for the VM in `dir`, answering at once.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SimVmOptions { dir: dir.into(), latency: Duration::ZERO }
    }
}

/// What pvpanic's `GUEST_PANICKED` reports as QEMU's reaction (QEMU's `GuestPanicAction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PanicAction {
    /// `-action panic=none` (acpimon's launch): QEMU reports action `run` and keeps the VM
    /// running; the panicked kernel answers nothing.
    #[default]
    Run,
    /// `-action panic=pause`: QEMU reports action `pause` and stops the VM (`guest-panicked`).
    Pause,
}

impl PanicAction {
    /// The name QEMU puts in the event's `action`.
    pub fn qapi(self) -> &'static str {
        match self {
            PanicAction::Run => "run",
            PanicAction::Pause => "pause",
        }
    }
}

/// What the simulated VM does. See the module docs for the exact effects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimState {
    /// Running with a live guest: every raised IRQ gets its record. From a paused state this
    /// is `cont` (`RESUME`); from a hung or panicked guest, the guest recovers.
    Running,
    /// QEMU answers, the guest kernel does not: no records, no console answers.
    Hung,
    /// QEMU's `stop`: `STOP`, run state `paused`, no records until running again.
    Paused,
    /// The guest kernel panicked (pvpanic): `GUEST_PANICKED`, no records until a reset.
    Panicked(PanicAction),
    /// QEMU exited: monitor and console closed, socket files removed. Final.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("cannot listen on {path}: {source}; check the directory, and with many VMs raise the open-file limit (ulimit -n)")]
    Listen { path: PathBuf, source: io::Error },
}

/// A running simulated VM; dropping it is [`SimState::Gone`] without waiting for its tasks.
pub struct SimVm {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimVm {
    /// Boots the VM of `opts.dir` on the current tokio runtime: writes the boot record (the
    /// boot count carries on from the region) and listens on its QMP and console sockets
    /// (replacing stale socket files, as QEMU does).
    pub async fn start(opts: SimVmOptions) -> Result<SimVm, SimError> {
        let descriptor = Descriptor::load(&opts.dir)?;
        let cfg = descriptor.ssdt_config()?;
        let region = Region::open(&descriptor.region, Access::ReadWrite)?;
        // The header must be one the AML accepts; the reader's checks say why not.
        region.snapshot()?;
        let (qmp_listener, qmp_ino) = listen(&descriptor.qmp)?;
        let (console_listener, console_ino) = listen(&descriptor.console)?;
        let mut sockets = vec![(descriptor.qmp.clone(), qmp_ino), (descriptor.console.clone(), console_ino)];
        let doorbell = match &descriptor.doorbell {
            Some(bell) => {
                let (listener, ino) = listen(&bell.socket)?;
                sockets.push((bell.socket.clone(), ino));
                Some(listener)
            }
            None => None,
        };
        let thermal = descriptor.thermal_period_ds.map(|ds| Duration::from_millis(u64::from(ds) * 100));
        let shared = Shared::new(descriptor, cfg.slot, region, opts.latency, sockets);
        shared.power_on();
        let mut tasks = vec![
            tokio::spawn(qmp::serve(qmp_listener, shared.clone())),
            tokio::spawn(console::serve(console_listener, shared.clone())),
        ];
        if let Some(listener) = doorbell {
            tasks.push(tokio::spawn(doorbell::serve(listener, shared.clone())));
        }
        if let Some(period) = thermal {
            tasks.push(tokio::spawn(machine::thermal_zone(shared.clone(), period)));
        }
        Ok(SimVm { shared, tasks })
    }

    /// Changes what the VM does (see [`SimState`]); emits the events QEMU would.
    pub fn set_state(&self, state: SimState) {
        self.shared.set_state(state);
    }

    /// The current state. A VM that was reset while stopped reports [`SimState::Paused`]
    /// (QEMU's `prelaunch`) until it runs.
    pub fn state(&self) -> SimState {
        self.shared.state()
    }

    /// QEMU's run state as `query-status` reports it (`running`, `paused`, ...).
    pub fn run_status(&self) -> &'static str {
        self.shared.run_status()
    }

    /// The guest reboots itself: `RESET` (guest-initiated), a fresh AML whose boot record
    /// (boot count + 1) is written as soon as the VM runs.
    pub fn reboot(&self) {
        self.shared.reset(true);
    }

    /// HMP commands that raised the GED IRQ (`o /b 0x20NN` with a non-zero value), records or
    /// not.
    pub fn triggers(&self) -> u64 {
        self.shared.triggers()
    }

    /// The VM's descriptor (`vm.json`).
    pub fn descriptor(&self) -> &Descriptor {
        self.shared.descriptor()
    }

    /// The BAR2 address the guest's firmware "assigned": what `query-pci` reports and the
    /// records carry.
    pub fn bar(&self) -> u32 {
        self.shared.bar()
    }

    /// Ends the VM as [`SimState::Gone`] and waits until its tasks have closed every socket.
    pub async fn stop(mut self) {
        self.shared.set_state(SimState::Gone);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        self.shared.set_state(SimState::Gone);
    }
}

/// Prepares `n` VMs named `sim-0000`, `sim-0001`, ... under `root` (default table options,
/// with the doorbell; existing directories are refreshed, their regions kept) and starts them
/// with `template`'s latency (its `dir` is ignored). On an error the VMs already started are
/// stopped.
pub async fn spawn_fleet(root: &Path, n: usize, template: SimVmOptions) -> Result<Vec<SimVm>, SimError> {
    spawn_fleet_with(root, n, template, &SsdtConfig::default()).await
}

/// [`spawn_fleet`] with the table options `cfg` (e.g. without the doorbell).
pub async fn spawn_fleet_with(
    root: &Path,
    n: usize,
    template: SimVmOptions,
    cfg: &SsdtConfig,
) -> Result<Vec<SimVm>, SimError> {
    let root = root.to_path_buf();
    let cfg = cfg.clone();
    let dirs = tokio::task::spawn_blocking(move || {
        (0..n).map(|i| prepare(&root, &fleet_name(i), &cfg).map(|p| p.dir)).collect::<Result<Vec<_>, _>>()
    })
    .await
    .expect("preparing VM directories does not panic")?;
    let mut vms = Vec::with_capacity(n);
    for dir in dirs {
        vms.push(SimVm::start(SimVmOptions { dir, ..template.clone() }).await?);
    }
    Ok(vms)
}

/// The name of the `i`th VM of a fleet.
pub fn fleet_name(i: usize) -> String {
    format!("sim-{i:04}")
}

/// Binds a private listening socket at `path` (replacing whatever is there, as QEMU does) and
/// returns its inode, so that only this socket is later removed.
fn listen(path: &Path) -> Result<(UnixListener, u64), SimError> {
    let err = |source| SimError::Listen { path: path.into(), source };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let ino = std::fs::metadata(path).map_err(err)?.ino();
    Ok((listener, ino))
}

#[cfg(test)]
mod tests;
