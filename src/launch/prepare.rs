//! A VM's state directory: the table, the region, the sockets, and `vm.json`, the descriptor
//! later tools (`run`, `watch`, `snapshot`) read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::console::ConsoleSource;
use super::LaunchPlan;
use crate::generate::{self, ConfigError, SsdtConfig};
use crate::read::{Region, RegionError};

/// File name of the descriptor inside a VM's directory.
pub const DESCRIPTOR: &str = "vm.json";
/// File name of the doorbell's socket inside a VM's directory.
pub const DOORBELL_SOCKET: &str = "doorbell.sock";
/// Unix socket paths are limited to 107 bytes.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("VM name '{0}' is not 1-64 characters of letters, digits, '.', '_' or '-'; choose a plain name")]
    BadName(String),
    #[error("cannot create {path}: {source}; check the state directory's permissions")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("socket path {0} is longer than the 107 bytes Unix sockets allow; use a shorter --state-dir")]
    SocketPathTooLong(PathBuf),
    #[error("cannot read {path}: {why}; prepare the VM again with `acpimon prepare`")]
    Descriptor { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// `vm.json`: everything needed to launch and watch one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Format of this file: 1.
    pub format: u32,
    pub name: String,
    pub irq: u8,
    /// QEMU `addr=` syntax.
    pub slot: String,
    pub region_size: u32,
    pub thermal_period_ds: Option<u16>,
    pub oem_table_id: String,
    pub ssdt: PathBuf,
    pub region: PathBuf,
    pub qmp: PathBuf,
    /// The guest console's socket acpimon connects to: its own serial port's, or the launcher's
    /// (with `console_chardev`).
    pub console: PathBuf,
    /// The launcher's chardev the guest kernel writes (`prepare --console-chardev`, or found in
    /// `run`'s command line); then acpimon adds no serial port of its own and re-exports the
    /// console on `console_share` for the launcher's tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_chardev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_share: Option<PathBuf>,
    /// The console is a libvirt domain's serial port, chardev `console_chardev`, read through
    /// libvirt's console stream (`prepare --console libvirt`); `console` is then unused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub console_libvirt: bool,
    /// The app channel's socket, when the VM has one (`prepare --app-channel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<PathBuf>,
    /// The guest agent's socket, when the VM has one (`prepare --guest-agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
    /// The doorbell the table rings when a heartbeat's record is complete; absent (a VM
    /// prepared before it existed, or with `--no-doorbell`), the host polls the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doorbell: Option<DoorbellDesc>,
}

/// The doorbell: an `isa-debugcon` at `port` whose chardev QEMU serves on `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorbellDesc {
    pub port: u16,
    pub socket: PathBuf,
}

impl Descriptor {
    pub fn ssdt_config(&self) -> Result<SsdtConfig, ConfigError> {
        let cfg = SsdtConfig {
            slot: self.slot.parse()?,
            irq: self.irq,
            region_size: self.region_size,
            oem_table_id: self.oem_table_id.clone(),
            thermal_period_ds: self.thermal_period_ds,
            doorbell_port: self.doorbell.as_ref().map(|d| d.port),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The full launch: table, region, QMP, console, pvpanic, vmcoreinfo.
    pub fn plan(&self) -> Result<LaunchPlan, ConfigError> {
        Ok(LaunchPlan {
            ssdt: self.ssdt_config()?,
            ssdt_path: self.ssdt.clone(),
            region_path: self.region.clone(),
            qmp_socket: Some(self.qmp.clone()),
            console_socket: self.console_chardev.is_none().then(|| self.console.clone()),
            pvpanic: true,
            vmcoreinfo: true,
            ovmf_low_bar: false,
            app_socket: self.app.clone(),
            guest_agent_socket: self.guest_agent.clone(),
            doorbell_socket: self.doorbell.as_ref().map(|d| d.socket.clone()),
            qemu_version: None,
        })
    }

    /// Reads and validates `DIR/vm.json`.
    pub fn load(dir: &Path) -> Result<Descriptor, PrepareError> {
        let path = dir.join(DESCRIPTOR);
        let bad = |why: String| PrepareError::Descriptor { path: path.clone(), why };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let d: Descriptor = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if d.format != 1 {
            return Err(bad(format!("format {} is not 1", d.format)));
        }
        d.ssdt_config()?;
        Ok(d)
    }
}

/// A prepared VM.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub dir: PathBuf,
    pub descriptor: Descriptor,
}

/// Where acpimon re-exports a launcher's console, inside the VM's directory.
pub const CONSOLE_SHARE: &str = "console-share.sock";
/// libvirt's chardev id of a domain's first `<serial>` (`char` + its alias `serial0`).
pub const LIBVIRT_CONSOLE: &str = "charserial0";

impl Prepared {
    /// Makes the launcher's chardev `src` the VM's console (see [`Descriptor::console_chardev`])
    /// and rewrites `vm.json`.
    pub fn use_guest_console(&mut self, src: &ConsoleSource) -> Result<(), PrepareError> {
        let share = self.dir.join(CONSOLE_SHARE);
        for sock in [&src.socket, &share] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(PrepareError::SocketPathTooLong(sock.clone()));
            }
        }
        self.descriptor.console = src.socket.clone();
        self.descriptor.console_chardev = Some(src.chardev.clone());
        self.descriptor.console_share = Some(share);
        let json = serde_json::to_vec_pretty(&self.descriptor).expect("descriptor serialises");
        write_atomic(&self.dir.join(DESCRIPTOR), &json)
    }

    /// Makes the libvirt domain's serial port with chardev `chardev` the VM's console, read
    /// through libvirt's console stream (see [`Descriptor::console_libvirt`]), and rewrites
    /// `vm.json`.
    pub fn use_libvirt_console(&mut self, chardev: &str) -> Result<(), PrepareError> {
        let share = self.dir.join(CONSOLE_SHARE);
        if share.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(PrepareError::SocketPathTooLong(share));
        }
        self.descriptor.console_chardev = Some(chardev.to_string());
        self.descriptor.console_share = Some(share);
        self.descriptor.console_libvirt = true;
        let json = serde_json::to_vec_pretty(&self.descriptor).expect("descriptor serialises");
        write_atomic(&self.dir.join(DESCRIPTOR), &json)
    }
}

/// Whether `name` is a VM name `prepare` accepts.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('.')
}

/// Optional channels a VM can be prepared with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// The app channel (virtio-serial, `docs/app-protocol.md`).
    pub app_channel: bool,
    /// A virtio-serial port for the QEMU guest agent.
    pub guest_agent: bool,
}

/// [`prepare_with`] without extras.
pub fn prepare(state_dir: &Path, name: &str, cfg: &SsdtConfig) -> Result<Prepared, PrepareError> {
    prepare_with(state_dir, name, cfg, Extras::default())
}

/// Creates (or refreshes) `state_dir/name/`: writes the table, creates the region (kept if it
/// exists with the same size, so its boot count carries on) and writes `vm.json` last, so a
/// reader never sees a descriptor whose files are missing.
pub fn prepare_with(
    state_dir: &Path,
    name: &str,
    cfg: &SsdtConfig,
    extras: Extras,
) -> Result<Prepared, PrepareError> {
    if !valid_name(name) {
        return Err(PrepareError::BadName(name.into()));
    }
    cfg.validate()?;
    let dir = state_dir.join(name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PrepareError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let d = Descriptor {
        format: 1,
        name: name.into(),
        irq: cfg.irq,
        slot: cfg.slot.to_string(),
        region_size: cfg.region_size,
        thermal_period_ds: cfg.thermal_period_ds,
        oem_table_id: cfg.oem_table_id.clone(),
        ssdt: dir.join("ssdt.aml"),
        region: dir.join("region"),
        qmp: dir.join("qmp.sock"),
        console: dir.join("console.sock"),
        console_chardev: None,
        console_share: None,
        console_libvirt: false,
        app: extras.app_channel.then(|| dir.join("app.sock")),
        guest_agent: extras.guest_agent.then(|| dir.join("qga.sock")),
        doorbell: cfg.doorbell_port.map(|port| DoorbellDesc { port, socket: dir.join(DOORBELL_SOCKET) }),
    };
    let doorbell = d.doorbell.as_ref().map(|b| &b.socket);
    for sock in [&d.qmp, &d.console].into_iter().chain(&d.app).chain(&d.guest_agent).chain(doorbell) {
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(PrepareError::SocketPathTooLong(sock.clone()));
        }
    }
    write_atomic(&d.ssdt, &generate::build(cfg)?)?;
    Region::create(&d.region, cfg.region_size)?;
    let json = serde_json::to_vec_pretty(&d).expect("descriptor serialises");
    write_atomic(&dir.join(DESCRIPTOR), &json)?;
    Ok(Prepared { dir, descriptor: d })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PrepareError> {
    crate::util::fs::atomic_write(path, bytes)
        .map_err(|source| PrepareError::Io { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_a_loadable_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let p = prepare(dir.path(), "vm-1", &SsdtConfig::default()).unwrap();
        assert_eq!(Descriptor::load(&p.dir).unwrap(), p.descriptor);
        assert!(p.descriptor.region.exists() && p.descriptor.ssdt.exists());
        let plan = p.descriptor.plan().unwrap();
        assert!(plan.argv().unwrap().join(" ").contains("qmp.sock"));
        assert!(plan.vmcoreinfo, "the full launch publishes VMCOREINFO");
        // The doorbell, by default: in vm.json, and its device and socket in the launch.
        let bell = p.descriptor.doorbell.as_ref().expect("a doorbell by default");
        assert_eq!((bell.port, bell.socket.clone()), (0x403, p.dir.join(DOORBELL_SOCKET)));
        assert!(plan
            .argv()
            .unwrap()
            .join(" ")
            .contains("-device isa-debugcon,id=acpimon-doorbell,iobase=0x403"));
        // Without: none, and a descriptor from before the doorbell (no field) loads without.
        let off = SsdtConfig { doorbell_port: None, ..SsdtConfig::default() };
        let q = prepare(dir.path(), "vm-2", &off).unwrap();
        assert!(q.descriptor.doorbell.is_none());
        assert!(!std::fs::read_to_string(q.dir.join(DESCRIPTOR)).unwrap().contains("doorbell"));
        assert_eq!(Descriptor::load(&q.dir).unwrap().ssdt_config().unwrap().doorbell_port, None);
        // Again: the same files, refreshed.
        prepare(dir.path(), "vm-1", &SsdtConfig::default()).unwrap();
    }

    #[test]
    fn a_launchers_console_replaces_acpimons_serial_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = prepare(dir.path(), "vm-1", &SsdtConfig::default()).unwrap();
        let src = ConsoleSource { chardev: "cons".into(), socket: "/run/vm-1/cons".into(), mux: true };
        p.use_guest_console(&src).unwrap();
        let d = Descriptor::load(&p.dir).unwrap();
        assert_eq!(d.console_chardev.as_deref(), Some("cons"));
        assert_eq!(d.console, PathBuf::from("/run/vm-1/cons"));
        assert_eq!(d.console_share, Some(p.dir.join(CONSOLE_SHARE)));
        let argv = d.plan().unwrap().argv().unwrap().join(" ");
        assert!(!argv.contains("isa-serial") && !argv.contains("cons"), "{argv}");
        // Preparing again without it gives acpimon's own serial port back.
        let d = prepare(dir.path(), "vm-1", &SsdtConfig::default()).unwrap().descriptor;
        assert_eq!(d.console_chardev, None);
        assert!(d.plan().unwrap().argv().unwrap().join(" ").contains("isa-serial"));
    }

    #[test]
    fn bad_names_and_long_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "a/b", "..", ".hidden", &"x".repeat(65)] {
            let e = prepare(dir.path(), bad, &SsdtConfig::default()).unwrap_err().to_string();
            assert!(e.contains("is not 1-64 characters"), "{bad}: {e}");
        }
        let deep = dir.path().join("d".repeat(100));
        let e = prepare(&deep, "vm", &SsdtConfig::default()).unwrap_err().to_string();
        assert!(e.contains("longer than the 107 bytes"), "{e}");
    }
}
