//! Stage 2 of the data path: putting acpimon into a VM's launch.
//!
//! One list of [`QemuItem`]s renders two ways: an argv, and the INI format of QEMU's
//! `-readconfig` that EVE launches VMs from. Measured on QEMU 10.0: `[object]`, `[device]`,
//! `[chardev]`, `[mon]`, `[action]` and `[fw_cfg]` sections work there; an `[acpi]` section is
//! accepted but never loads the table (not even a missing file is reported), so `-acpitable` is
//! returned as an argv remainder. The user's own configuration is read by [`qemu_config`]. [`prepare`] writes a VM's state directory; [`vm`] runs QEMU.

pub mod channel;
pub mod conflicts;
pub mod console;
pub mod libvirt;
pub mod prepare;
pub mod qemu_config;
pub mod qemu_version;
pub mod vm;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

pub use self::prepare::{prepare, prepare_with, Descriptor, DoorbellDesc, Extras, PrepareError, Prepared};
use self::qemu_config::QemuConfig;
use self::qemu_version::QemuVersion;
pub use self::vm::{Vm, VmError, VmSpec};
use crate::generate::SsdtConfig;

/// QOM id of the memory backend.
pub const MEMDEV_ID: &str = "acpimon-mem";
/// Device id of the ivshmem function.
pub const IVSHMEM_ID: &str = "acpimon-shm";
/// Device id of pc-testdev.
pub const TESTDEV_ID: &str = "acpimon-testdev";
/// Chardev (and monitor) id of the QMP socket.
pub const QMP_ID: &str = "acpimon-qmp";
/// Chardev id of the serial console socket.
pub const CONSOLE_ID: &str = "acpimon-console";
/// Device id of the serial port on the console chardev.
pub const SERIAL_ID: &str = "acpimon-serial";
/// Device id of pvpanic.
pub const PVPANIC_ID: &str = "acpimon-pvpanic";
/// Device id of vmcoreinfo.
pub const VMCOREINFO_ID: &str = "acpimon-vmcoreinfo";
/// Chardev (and device) id of the doorbell's `isa-debugcon`.
pub const DOORBELL_ID: &str = "acpimon-doorbell";
/// The virtio-serial controller carrying the app channel and the guest agent.
pub const VSERIAL_ID: &str = "acpimon-vser";
/// The app channel's chardev, and its port.
pub const APP_ID: &str = "acpimon-app";
pub const APP_PORT_ID: &str = "acpimon-app-port";
/// The guest agent's chardev, and its port.
pub const QGA_ID: &str = "acpimon-qga";
pub const QGA_PORT_ID: &str = "acpimon-qga-port";
/// The app channel's port name (`docs/app-protocol.md`).
pub const APP_PORT_NAME: &str = "org.acpimon.app.0";
/// The port name qemu-ga looks for by default.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// Errors in rendering arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("path {0} is not valid UTF-8; QEMU's option syntax needs text, so choose a plain path")]
    NonUtf8Path(PathBuf),
    #[error("path {0} contains a double quote, which a -readconfig file cannot hold; choose another path")]
    QuoteInPath(String),
}

/// What acpimon adds to a VM's launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub ssdt: SsdtConfig,
    /// Where the table file is.
    pub ssdt_path: PathBuf,
    /// Where the region file is.
    pub region_path: PathBuf,
    /// A QMP monitor on this Unix socket (QEMU listens).
    pub qmp_socket: Option<PathBuf>,
    /// The first serial port on this Unix socket (QEMU listens).
    pub console_socket: Option<PathBuf>,
    /// Add pvpanic, and keep a panicked guest running (`-action panic=none`) so its state and
    /// console survive for diagnostics; QEMU's default powers it off. QEMU before 6.0 has no
    /// `-action`: there the guest pauses on a panic (and powers off without `-no-shutdown`).
    pub pvpanic: bool,
    /// Add `-device vmcoreinfo` (QEMU 2.11+, needs fw_cfg DMA: pc and q35 have it): the guest's
    /// `qemu_fw_cfg` driver then tells QEMU where its VMCOREINFO note is, which
    /// `acpimon dmesg` reads the kernel log with ([`crate::memory::vmcoreinfo`]). QEMU allows
    /// one: [`LaunchPlan::adapt_to`] drops it when the user's configuration has its own.
    pub vmcoreinfo: bool,
    /// Ask OVMF for no 64-bit PCI window, so the ivshmem BAR lands below 4 GiB (see
    /// [`channel`]): `-fw_cfg`, or a `[fw_cfg]` section in the -readconfig form.
    pub ovmf_low_bar: bool,
    /// The app channel (`docs/app-protocol.md`): a virtio-serial port on this Unix socket.
    pub app_socket: Option<PathBuf>,
    /// The QEMU guest agent's virtio-serial port on this Unix socket.
    pub guest_agent_socket: Option<PathBuf>,
    /// The doorbell (an `isa-debugcon` at the table's doorbell port) on this Unix socket; none
    /// without one, or when the table has no doorbell port.
    pub doorbell_socket: Option<PathBuf>,
    /// The QEMU the options are for; `None` means a current one (6.0 or later).
    pub qemu_version: Option<QemuVersion>,
}

/// One QEMU option: `-OPTION [head,]id=ID,key=value...`, or a `[OPTION "ID"]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuItem {
    /// The option (and -readconfig group) name: `object`, `device`, `chardev`, ...
    pub option: &'static str,
    /// The implied first key and its value (`qom-type`, `driver`, `backend`), if any.
    pub head: Option<(&'static str, String)>,
    pub id: Option<&'static str>,
    pub props: Vec<(&'static str, String)>,
    /// Whether `-readconfig` can hold it.
    pub readconfig: bool,
}

impl QemuItem {
    fn new(option: &'static str, head: Option<(&'static str, &str)>, id: Option<&'static str>) -> Self {
        let head = head.map(|(k, v)| (k, v.to_string()));
        QemuItem { option, head, id, props: Vec::new(), readconfig: true }
    }

    fn prop(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.props.push((key, value.into()));
        self
    }

    /// The item as argv words. Commas inside values are doubled, as QEMU's option parser
    /// requires.
    pub fn argv(&self) -> Vec<String> {
        let mut parts: Vec<String> = Vec::new();
        if let Some((_, v)) = &self.head {
            parts.push(v.replace(',', ",,"));
        }
        if let Some(id) = self.id {
            parts.push(format!("id={id}"));
        }
        parts.extend(self.props.iter().map(|(k, v)| format!("{k}={}", v.replace(',', ",,"))));
        vec![format!("-{}", self.option), parts.join(",")]
    }

    /// The item as a `-readconfig` section.
    fn section(&self, out: &mut String) -> Result<(), LaunchError> {
        match self.id {
            Some(id) => writeln!(out, "[{} \"{id}\"]", self.option).unwrap(),
            None => writeln!(out, "[{}]", self.option).unwrap(),
        }
        for (k, v) in self.head.iter().chain(&self.props) {
            if v.contains('"') {
                return Err(LaunchError::QuoteInPath(v.clone()));
            }
            writeln!(out, "  {k} = \"{v}\"").unwrap();
        }
        out.push('\n');
        Ok(())
    }
}

fn utf8(p: &Path) -> Result<String, LaunchError> {
    p.to_str().map(str::to_string).ok_or_else(|| LaunchError::NonUtf8Path(p.into()))
}

/// A listening Unix-socket chardev.
fn socket_chardev(id: &'static str, path: &Path) -> Result<QemuItem, LaunchError> {
    Ok(QemuItem::new("chardev", Some(("backend", "socket")), Some(id))
        .prop("path", utf8(path)?)
        .prop("server", "on")
        .prop("wait", "off"))
}

impl LaunchPlan {
    /// A plan with only the table and the region (what `qemu-args` prints).
    pub fn minimal(ssdt: SsdtConfig, ssdt_path: PathBuf, region_path: PathBuf) -> Self {
        LaunchPlan {
            ssdt,
            ssdt_path,
            region_path,
            qmp_socket: None,
            console_socket: None,
            pvpanic: false,
            vmcoreinfo: false,
            ovmf_low_bar: false,
            app_socket: None,
            guest_agent_socket: None,
            doorbell_socket: None,
            qemu_version: None,
        }
    }

    /// Adapts the plan to the user's own configuration: asks OVMF for a low BAR when the
    /// firmware is UEFI and the user has not set the window. Returns what it changed, for the
    /// operator.
    pub fn adapt_to(&mut self, user: &QemuConfig) -> Vec<String> {
        let mut notes = Vec::new();
        if self.vmcoreinfo && user.sections("device").any(|d| d.driver() == Some("vmcoreinfo")) {
            // The user's own device serves acpimon as well.
            self.vmcoreinfo = false;
        }
        let Some(firmware) = user.uefi_firmware() else { return notes };
        if user.fw_cfg(channel::OVMF_MMIO64_KNOB).is_some() {
            return notes;
        }
        self.ovmf_low_bar = true;
        notes.push(format!(
            "OVMF ({firmware}): added -fw_cfg name={},string=0 (a [fw_cfg] section in the -readconfig form) so \
             the ivshmem BAR lands below 4 GiB; this VM gets no 64-bit PCI window",
            channel::OVMF_MMIO64_KNOB
        ));
        let phys_bits = user.sections("cpu").any(|c| c.get("phys-bits").is_some());
        if !phys_bits {
            notes.push(
                "OVMF from edk2-stable202505 on (Debian trixie's 2025.02) honours that alone; older OVMF \
                 (Debian bookworm's 2022.11) only with a CPU address width it distrusts: add \
                 -cpu ...,phys-bits=37 if the channel is reported above 4 GiB"
                    .into(),
            );
        }
        notes
    }

    /// The options, in the order QEMU needs them (a backend before its device).
    pub fn items(&self) -> Result<Vec<QemuItem>, LaunchError> {
        let mut items = vec![
            QemuItem { readconfig: false, ..QemuItem::new("acpitable", None, None) }
                .prop("file", utf8(&self.ssdt_path)?),
            QemuItem::new("object", Some(("qom-type", "memory-backend-file")), Some(MEMDEV_ID))
                .prop("mem-path", utf8(&self.region_path)?)
                .prop("size", self.ssdt.region_size.to_string())
                .prop("share", "on"),
            QemuItem::new("device", Some(("driver", "ivshmem-plain")), Some(IVSHMEM_ID))
                .prop("memdev", MEMDEV_ID)
                .prop("addr", self.ssdt.slot.to_string()),
            QemuItem::new("device", Some(("driver", "pc-testdev")), Some(TESTDEV_ID)),
        ];
        if let Some(path) = &self.qmp_socket {
            items.push(socket_chardev(QMP_ID, path)?);
            items.push(
                QemuItem::new("mon", None, Some(QMP_ID)).prop("chardev", QMP_ID).prop("mode", "control"),
            );
        }
        if let Some(path) = &self.console_socket {
            items.push(socket_chardev(CONSOLE_ID, path)?);
            items.push(
                QemuItem::new("device", Some(("driver", "isa-serial")), Some(SERIAL_ID))
                    .prop("chardev", CONSOLE_ID),
            );
        }
        if let (Some(path), Some(port)) = (&self.doorbell_socket, self.ssdt.doorbell_port) {
            // The same id for chardev and device, as for the QMP monitor: distinct namespaces.
            items.push(socket_chardev(DOORBELL_ID, path)?);
            items.push(
                QemuItem::new("device", Some(("driver", "isa-debugcon")), Some(DOORBELL_ID))
                    .prop("iobase", format!("{port:#x}"))
                    .prop("chardev", DOORBELL_ID),
            );
        }
        if self.pvpanic {
            items.push(QemuItem::new("device", Some(("driver", "pvpanic")), Some(PVPANIC_ID)));
            if self.qemu_version.is_none_or(QemuVersion::has_action) {
                items.push(QemuItem::new("action", None, None).prop("panic", "none"));
            }
        }
        if self.vmcoreinfo {
            items.push(QemuItem::new("device", Some(("driver", "vmcoreinfo")), Some(VMCOREINFO_ID)));
        }
        let ports = [
            (&self.app_socket, APP_ID, APP_PORT_ID, APP_PORT_NAME),
            (&self.guest_agent_socket, QGA_ID, QGA_PORT_ID, QGA_PORT_NAME),
        ];
        if ports.iter().any(|(path, ..)| path.is_some()) {
            items.push(QemuItem::new("device", Some(("driver", "virtio-serial-pci")), Some(VSERIAL_ID)));
        }
        for (path, id, port_id, name) in ports {
            if let Some(path) = path {
                items.push(socket_chardev(id, path)?);
                items.push(
                    QemuItem::new("device", Some(("driver", "virtserialport")), Some(port_id))
                        .prop("bus", format!("{VSERIAL_ID}.0"))
                        .prop("chardev", id)
                        .prop("name", name),
                );
            }
        }
        if self.ovmf_low_bar {
            items.push(
                QemuItem::new("fw_cfg", None, None)
                    .prop("name", channel::OVMF_MMIO64_KNOB)
                    .prop("string", "0"),
            );
        }
        Ok(items)
    }

    /// The options as argv words.
    pub fn argv(&self) -> Result<Vec<String>, LaunchError> {
        Ok(self.items()?.iter().flat_map(QemuItem::argv).collect())
    }

    /// The options as a `-readconfig` file, and the argv words it cannot express.
    pub fn readconfig(&self) -> Result<(String, Vec<String>), LaunchError> {
        let mut ini = String::new();
        let mut rest = Vec::new();
        for item in self.items()? {
            if item.readconfig {
                item.section(&mut ini)?;
            } else {
                rest.extend(item.argv());
            }
        }
        Ok((ini, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan::minimal(SsdtConfig::default(), "/run/vm1/ssdt.aml".into(), "/run/vm1/region".into())
    }

    #[test]
    fn argv_form() {
        assert_eq!(
            plan().argv().unwrap(),
            [
                "-acpitable",
                "file=/run/vm1/ssdt.aml",
                "-object",
                "memory-backend-file,id=acpimon-mem,mem-path=/run/vm1/region,size=4096,share=on",
                "-device",
                "ivshmem-plain,id=acpimon-shm,memdev=acpimon-mem,addr=0f.0",
                "-device",
                "pc-testdev,id=acpimon-testdev",
            ]
        );
    }

    #[test]
    fn readconfig_form() {
        let (ini, rest) = plan().readconfig().unwrap();
        assert_eq!(
            ini,
            "[object \"acpimon-mem\"]\n  qom-type = \"memory-backend-file\"\n  mem-path = \"/run/vm1/region\"\n  size = \"4096\"\n  share = \"on\"\n\n\
             [device \"acpimon-shm\"]\n  driver = \"ivshmem-plain\"\n  memdev = \"acpimon-mem\"\n  addr = \"0f.0\"\n\n\
             [device \"acpimon-testdev\"]\n  driver = \"pc-testdev\"\n\n"
        );
        assert_eq!(rest, ["-acpitable", "file=/run/vm1/ssdt.aml"]);
    }

    #[test]
    fn monitor_console_and_panic_items() {
        let p = LaunchPlan {
            qmp_socket: Some("/run/vm1/qmp.sock".into()),
            console_socket: Some("/run/vm1/console.sock".into()),
            pvpanic: true,
            ..plan()
        };
        let argv = p.argv().unwrap().join(" ");
        assert!(argv.contains(
            "-chardev socket,id=acpimon-qmp,path=/run/vm1/qmp.sock,server=on,wait=off -mon id=acpimon-qmp,chardev=acpimon-qmp,mode=control"
        ), "{argv}");
        assert!(argv.contains("-device isa-serial,id=acpimon-serial,chardev=acpimon-console"), "{argv}");
        assert!(argv.ends_with("-device pvpanic,id=acpimon-pvpanic -action panic=none"), "{argv}");
        let (ini, _) = p.readconfig().unwrap();
        assert!(
            ini.contains("[mon \"acpimon-qmp\"]\n  chardev = \"acpimon-qmp\"\n  mode = \"control\""),
            "{ini}"
        );
        assert!(ini.contains("[action]\n  panic = \"none\""), "{ini}");
    }

    #[test]
    fn the_doorbell_in_either_form() {
        let p = LaunchPlan { doorbell_socket: Some("/run/vm1/doorbell.sock".into()), ..plan() };
        let argv = p.argv().unwrap().join(" ");
        assert!(
            argv.contains(
                "-chardev socket,id=acpimon-doorbell,path=/run/vm1/doorbell.sock,server=on,wait=off \
             -device isa-debugcon,id=acpimon-doorbell,iobase=0x403,chardev=acpimon-doorbell"
            ),
            "{argv}"
        );
        let (ini, _) = p.readconfig().unwrap();
        assert!(ini.contains(
            "[device \"acpimon-doorbell\"]\n  driver = \"isa-debugcon\"\n  iobase = \"0x403\"\n  chardev = \"acpimon-doorbell\"\n"
        ), "{ini}");
        // A table without a doorbell port gets no device, whatever the socket.
        let mut p = p;
        p.ssdt.doorbell_port = None;
        assert!(!p.argv().unwrap().join(" ").contains("debugcon"));
    }

    #[test]
    fn vmcoreinfo_in_either_form_unless_the_user_has_one() {
        let p = LaunchPlan { vmcoreinfo: true, ..plan() };
        assert!(p.argv().unwrap().join(" ").contains("-device vmcoreinfo,id=acpimon-vmcoreinfo"));
        let (ini, _) = p.readconfig().unwrap();
        assert!(ini.contains("[device \"acpimon-vmcoreinfo\"]\n  driver = \"vmcoreinfo\"\n"), "{ini}");
        let mut p = p;
        let own = QemuConfig::from_args(&["-device".into(), "vmcoreinfo".into()]).unwrap();
        p.adapt_to(&own);
        assert!(!p.vmcoreinfo && !p.argv().unwrap().join(" ").contains("vmcoreinfo"));
        // prepare's full launch has it.
        assert!(!plan().argv().unwrap().join(" ").contains("vmcoreinfo"));
    }

    #[test]
    fn commas_are_escaped_and_quotes_refused() {
        let mut p = plan();
        p.region_path = "/run/a,b/region".into();
        assert!(p.argv().unwrap()[3].contains("mem-path=/run/a,,b/region,"));
        p.region_path = "/run/a\"b".into();
        assert_eq!(p.readconfig(), Err(LaunchError::QuoteInPath("/run/a\"b".into())));
    }

    #[test]
    fn older_qemu_gets_no_action_and_ovmf_gets_the_knob_in_either_form() {
        let p = LaunchPlan { pvpanic: true, qemu_version: Some("5.2".parse().unwrap()), ..plan() };
        let argv = p.argv().unwrap().join(" ");
        assert!(argv.ends_with("-device pvpanic,id=acpimon-pvpanic"), "{argv}");
        assert!(!p.readconfig().unwrap().0.contains("[action]"));
        let p = LaunchPlan { qemu_version: Some("6.0".parse().unwrap()), ..p };
        assert!(p.argv().unwrap().join(" ").ends_with("-action panic=none"));

        let mut p = plan();
        let user = QemuConfig {
            sections: qemu_config::parse_readconfig(qemu_config::EVE_LIKE, Path::new("/run/vm.cfg")).unwrap(),
            ..QemuConfig::default()
        };
        let notes = p.adapt_to(&user);
        assert!(p.ovmf_low_bar);
        assert!(notes[0].contains("[drive \"drive-ovmf-code\"]"), "{notes:?}");
        assert!(notes[1].contains("phys-bits=37"), "{notes:?}");
        let (ini, rest) = p.readconfig().unwrap();
        assert!(
            ini.ends_with("[fw_cfg]\n  name = \"opt/ovmf/X-PciMmio64Mb\"\n  string = \"0\"\n\n"),
            "{ini}"
        );
        assert_eq!(rest, ["-acpitable", "file=/run/vm1/ssdt.aml"]);
        assert!(p.argv().unwrap().join(" ").ends_with("-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=0"));

        // The user's own window, or no UEFI firmware: nothing added.
        let own = QemuConfig::from_args(&[
            "-bios".into(),
            "OVMF.fd".into(),
            "-fw_cfg".into(),
            "name=opt/ovmf/X-PciMmio64Mb,string=32768".into(),
        ])
        .unwrap();
        let mut p = plan();
        assert!(p.adapt_to(&own).is_empty() && !p.ovmf_low_bar);
        assert!(p.adapt_to(&QemuConfig::from_args(&["-M".into(), "q35".into()]).unwrap()).is_empty());
    }
}
