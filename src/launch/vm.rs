//! A QEMU process launched with acpimon's additions, and its channels: QMP, the serial
//! console, and the region. `acpimon run`, `demo`, `bench` and every real-QEMU test use this
//! one handle. A channel that cannot be had is reported and the others are kept.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::channel::{self, Channel};
use super::conflicts::{self, Conflict};
use super::console::ConsoleError;
use super::qemu_config::{QemuConfig, QemuConfigError};
use super::qemu_version::{self, VersionError};
use super::{LaunchError, PrepareError, Prepared};
use crate::console::{self, Console};
use crate::generate::ConfigError;
use crate::read::{Access, Region, RegionError};
use crate::trigger::qmp::{Qmp, QmpError};
use crate::trigger::Completion;

/// The second monitor of a VM left to `acpimon watch`.
pub const CONTROL_QMP: &str = "control-qmp.sock";
/// How long QEMU may take to open its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the QEMU command line collides with acpimon's additions: {}", .0.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; "))]
    Conflicts(Vec<Conflict>),
    #[error("cannot start {program}: {source}; run tools/setup, or give the path of qemu-system-x86_64")]
    Spawn { program: String, source: std::io::Error },
    #[error("QEMU exited during start-up ({status}): {stderr}")]
    Exited { status: ExitStatus, stderr: String },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("the guest's console: {0}")]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    QemuConfig(#[from] QemuConfigError),
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// What to launch.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The QEMU program, e.g. `qemu-system-x86_64`.
    pub program: String,
    /// The user's QEMU arguments.
    pub args: Vec<String>,
    pub prepared: Prepared,
    /// Pass acpimon's additions as a `-readconfig` file (as EVE does) instead of argv.
    pub readconfig: bool,
    /// Leave the VM's QMP and console sockets to `acpimon watch`: this handle connects to a
    /// second monitor (`control-qmp.sock`, as EVE keeps two) and not to the console.
    pub leave_to_watch: bool,
    /// The chardev of the guest's console (`--console-chardev`); without it, the chardev of
    /// the first serial port `args` defines, if any (see [`super::console`]).
    pub console_chardev: Option<String>,
}

/// A running VM.
pub struct Vm {
    child: Child,
    pub qmp: Arc<Qmp>,
    /// `Err` says why the console is not available; monitoring goes on without it.
    pub console: Result<Console, String>,
    pub region: Arc<Region>,
    /// How heartbeats learn of their records: the doorbell, or polling and why.
    pub completion: Completion,
    pub prepared: Prepared,
    /// Where ivshmem sits, from the plan validated at launch.
    slot: crate::generate::PciSlot,
    /// What acpimon adapted for this VM, for the operator.
    pub notes: Vec<String>,
    stderr_path: PathBuf,
}

impl Vm {
    /// Checks the command line, starts QEMU, and connects QMP, the console and the region.
    pub async fn launch(mut spec: VmSpec) -> Result<Vm, VmError> {
        let mut notes = Vec::new();
        let found = match super::console::from_launch(&spec.args, spec.console_chardev.as_deref()) {
            Ok(found) => found,
            // Not asked for: a console acpimon cannot share (`-serial stdio`, an unreadable
            // file QEMU will report itself) leaves acpimon's own serial port, as before.
            Err(e) if spec.console_chardev.is_none() => {
                notes.push(format!(
                    "{e}; acpimon's own serial port (the next ttyS) is its console, so the kernel's console \
                     must be on it (console=ttyS1), or give --console-chardev"
                ));
                None
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(src) = found {
            spec.prepared.use_guest_console(&src)?;
            notes.push(format!(
                "the guest's console is chardev '{}' ({}{}): acpimon reads it and re-exports it on {} for other clients",
                src.chardev,
                src.socket.display(),
                if src.mux { ", mux" } else { "" },
                spec.prepared.dir.join(super::prepare::CONSOLE_SHARE).display()
            ));
        }
        let d = &spec.prepared.descriptor;
        let mut plan = d.plan()?;
        let user = QemuConfig::from_args(&spec.args)?;
        // A QEMU that cannot be run is reported when it is started, with the usual message.
        plan.qemu_version = match qemu_version::probe(&spec.program) {
            Ok(v) => Some(qemu_version::supported(v)?),
            Err(_) => None,
        };
        notes.extend(plan.adapt_to(&user));
        if let Some(v) = plan.qemu_version.filter(|v| plan.pvpanic && !v.has_action()) {
            notes.push(if user.has_flag("no-shutdown") {
                format!("QEMU {v} has no -action: a panicked guest pauses (guest-panicked) instead of running on")
            } else {
                format!(
                    "QEMU {v} has no -action: a panicked guest is powered off after GUEST_PANICKED; add -no-shutdown \
                     to keep it paused for diagnostics"
                )
            });
        }
        let found = conflicts::check(&user, &plan);
        if !found.is_empty() {
            return Err(VmError::Conflicts(found));
        }
        let dir = &spec.prepared.dir;
        let control = dir.join(CONTROL_QMP);
        // The launcher's console socket is QEMU's to replace, not acpimon's to remove.
        let own_console = d.console_chardev.is_none().then_some(&d.console);
        let doorbell = d.doorbell.as_ref().map(|b| &b.socket);
        for sock in [&d.qmp, &control]
            .into_iter()
            .chain(own_console)
            .chain(&d.app)
            .chain(&d.guest_agent)
            .chain(doorbell)
        {
            let _ = std::fs::remove_file(sock);
        }
        let mut ours = if spec.readconfig {
            let (ini, rest) = plan.readconfig()?;
            let path = dir.join("acpimon.cfg");
            std::fs::write(&path, ini).map_err(|source| VmError::Io { path: path.clone(), source })?;
            let mut v = vec!["-readconfig".to_string(), path.to_string_lossy().into_owned()];
            v.extend(rest);
            v
        } else {
            plan.argv()?
        };
        let stderr_path = dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|source| VmError::Io { path: stderr_path.clone(), source })?;
        let qmp_path = if spec.leave_to_watch {
            ours.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", control.display())]);
            control.clone()
        } else {
            d.qmp.clone()
        };
        let mut child = Command::new(&spec.program)
            .args(&spec.args)
            .args(&ours)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VmError::Spawn { program: spec.program.clone(), source })?;

        let qmp = tokio::select! {
            q = Qmp::connect(&qmp_path, QMP_WAIT) => q,
            status = child.wait() => {
                let status = status.map_err(|source| VmError::Spawn { program: spec.program.clone(), source })?;
                return Err(VmError::Exited { status, stderr: read_tail(&stderr_path) });
            }
        };
        let qmp = match qmp {
            Ok(q) => Arc::new(q),
            Err(e) => {
                let _ = child.start_kill();
                return Err(e.into());
            }
        };
        let console = if spec.leave_to_watch {
            Err("left to acpimon watch".to_string())
        } else {
            connect_console(d).await
        };
        // QEMU serves one client per chardev socket: left to watch, the doorbell is its.
        let completion = if spec.leave_to_watch {
            Completion::Polling("the doorbell is left to acpimon watch".into())
        } else {
            Completion::connect(d.doorbell.as_ref().map(|b| b.socket.as_path())).await
        };
        let region = Arc::new(Region::open(&d.region, Access::ReadWrite)?);
        let slot = plan.ssdt.slot;
        Ok(Vm { child, qmp, console, region, completion, prepared: spec.prepared, slot, notes, stderr_path })
    }

    /// Which channel carries this VM's records, from where the firmware put BAR2.
    pub async fn channel(&self) -> Result<Channel, QmpError> {
        let port = self.prepared.descriptor.doorbell.as_ref().map(|b| b.port);
        Ok(channel::locate(&self.qmp, self.slot).await?.with_port(port))
    }

    /// The console, or why there is none.
    pub fn console(&self) -> Result<&Console, &str> {
        self.console.as_ref().map_err(String::as_str)
    }

    /// Waits for QEMU to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Whether QEMU has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// What QEMU wrote on stderr, last 4 KiB.
    pub fn stderr_tail(&self) -> String {
        read_tail(&self.stderr_path)
    }

    /// Asks QEMU to quit, and kills it if it has not exited within 5 s.
    pub async fn shutdown(&mut self) -> std::io::Result<ExitStatus> {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp.execute(qapi::qmp::quit {})).await;
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                self.child.start_kill()?;
                self.child.wait().await
            }
        }
    }
}

/// Connects the VM's console, naming its chardev, and re-exports it when it is the launcher's.
pub async fn connect_console_with(
    d: &super::Descriptor,
    keep: usize,
    wait: Duration,
) -> Result<Console, String> {
    let console = Console::connect(&d.console, keep, wait)
        .await
        .map_err(|e| format!("console socket {}: {e}", d.console.display()))?
        .with_chardev(d.console_chardev.as_deref().unwrap_or(super::CONSOLE_ID));
    if let Some(share) = &d.console_share {
        console
            .share(share)
            .map_err(|e| format!("cannot re-export the console on {}: {e}", share.display()))?;
    }
    Ok(console)
}

async fn connect_console(d: &super::Descriptor) -> Result<Console, String> {
    connect_console_with(d, console::DEFAULT_KEEP, Duration::from_secs(5)).await
}

fn read_tail(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(4096);
    console::sanitize(&bytes[start..]).trim().to_string()
}
