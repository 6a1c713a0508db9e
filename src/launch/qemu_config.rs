//! The user's own QEMU configuration, as acpimon reads it: the argv and every `-readconfig`
//! file it names, in one typed model. Conflict checks, `--slot auto`, firmware detection and
//! the guest console's discovery all read this one model, so an option given on the command
//! line and the same option in EVE's merged config file are seen alike.
//!
//! Both syntaxes become [`Section`]s: `-device e1000,id=n0,addr=0x4` and
//! `[device "n0"]` / `driver = "e1000"` / `addr = "0x4"` are the same section. The file format
//! is QEMU's (`qemu_config_parse`): `[group]` or `[group "id"]` headers, `key = "value"` lines,
//! `#` comments. Options without a value (`-nodefaults`, `-S`) are [`QemuConfig::flags`].

use std::fmt;
use std::path::{Path, PathBuf};

/// Where a section was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// On the command line, at this index (of the option word).
    Argv { index: usize },
    /// In a `-readconfig` file, at this 1-based line (of the section header).
    File { path: PathBuf, line: usize },
}

/// One option, or one section of a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The option or group name without dashes: `device`, `drive`, `chardev`, `machine` (also
    /// for `-M`), `fw_cfg`, or a plain option such as `bios`, `serial`, `kernel`.
    pub group: String,
    /// The `id=` of an argv option, or the quoted id of a section header.
    pub id: Option<String>,
    /// Keys and values in order, the implied first key included (`driver` of `-device`,
    /// `qom-type` of `-object`, `backend` of `-chardev`, `type` of `-machine`, `model` of
    /// `-cpu`); a plain option's argument is under [`VALUE`].
    pub props: Vec<(String, String)>,
    pub origin: Origin,
}

/// The key a plain option's argument is stored under (`-bios FILE`, `-serial DEV`).
pub const VALUE: &str = "value";

/// Errors reading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum QemuConfigError {
    #[error("cannot read the QEMU config file {path}: {source}; check the -readconfig path")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: QEMU's -readconfig syntax expects `[group]`, `[group \"id\"]` or `key = \"value\"`, not `{text}`")]
    Syntax { path: PathBuf, line: usize, text: String },
    #[error("-readconfig at the end of the command line names no file; give the file after it")]
    MissingFile,
}

impl Section {
    /// The last value of `key` (QEMU keeps the last one).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A plain option's argument (`-bios FILE` → `FILE`).
    pub fn value(&self) -> Option<&str> {
        self.get(VALUE)
    }

    /// `-device`'s driver.
    pub fn driver(&self) -> Option<&str> {
        self.get("driver")
    }

    /// How the user would recognise it: `-device e1000,addr=0x4` or
    /// `[device "n0"] (driver = "e1000", addr = "0x4") in /run/vm.cfg:12`.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Argv { .. } => {
                let mut props = self.props.iter().peekable();
                let mut parts: Vec<String> = Vec::new();
                // The implied first key (or a plain option's argument) is written bare.
                if let Some((k, v)) =
                    props.next_if(|(k, _)| k == VALUE || implied_key(&self.group) == Some(k.as_str()))
                {
                    let _ = k;
                    parts.push(v.clone());
                }
                if let Some(id) = &self.id {
                    parts.push(format!("id={id}"));
                }
                parts.extend(props.map(|(k, v)| format!("{k}={v}")));
                format!("-{} {}", self.group, parts.join(","))
            }
            Origin::File { path, line } => {
                let head = match &self.id {
                    Some(id) => format!("[{} \"{id}\"]", self.group),
                    None => format!("[{}]", self.group),
                };
                let keys: Vec<String> =
                    ["driver", "qom-type", "backend", "type", "if", "addr", "bus", "name"]
                        .iter()
                        .filter_map(|k| self.get(k).map(|v| format!("{k} = \"{v}\"")))
                        .collect();
                if keys.is_empty() {
                    format!("{head} in {}:{line}", path.display())
                } else {
                    format!("{head} ({}) in {}:{line}", keys.join(", "), path.display())
                }
            }
        }
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The implied first key of an option written `-OPTION VALUE,key=value`.
fn implied_key(group: &str) -> Option<&'static str> {
    Some(match group {
        "device" => "driver",
        "object" => "qom-type",
        "chardev" => "backend",
        "netdev" | "machine" | "numa" => "type",
        "accel" => "accel",
        "cpu" => "model",
        "mon" => "chardev",
        "smp" => "cpus",
        "m" => "size",
        "audiodev" => "driver",
        "boot" => "order",
        "name" => "guest",
        _ => return None,
    })
}

/// Options whose argument is a `key=value,...` list.
fn is_keyed(group: &str) -> bool {
    implied_key(group).is_some()
        || matches!(
            group,
            "drive" | "fw_cfg" | "blockdev" | "global" | "action" | "rtc" | "overcommit" | "msg"
        )
}

/// Options that take no argument (the common ones; a word starting with `-` after an unknown
/// option also marks it as one).
const FLAGS: &[&str] = &[
    "S",
    "nodefaults",
    "no-shutdown",
    "no-reboot",
    "nographic",
    "enable-kvm",
    "daemonize",
    "no-hpet",
    "no-acpi",
    "snapshot",
    "no-user-config",
    "full-screen",
    "no-fd-bootchk",
    "preconfig",
    "version",
    "help",
    "win2k-hack",
    "old-param",
    "semihosting",
    "only-migratable",
    "enable-sync-profile",
    "s",
    "no-quit",
    "no-frame",
    "alt-grab",
    "ctrl-grab",
    "curses",
    "sdl",
    "no-kvm",
];

/// Splits `a=1,b=x,,y` into `[("a","1"), ("b","x,y")]`, the first key implied by `group`.
pub fn parse_keyed(group: &str, text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut parts: Vec<String> = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().unwrap().push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    let mut id = None;
    let mut props = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        if part.is_empty() {
            continue;
        }
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some((k, v)) => props.push((k.to_string(), v.to_string())),
            None => match implied_key(group) {
                Some(k) if i == 0 => props.push((k.to_string(), part)),
                // A bare key is QEMU's shorthand for key=on.
                _ => props.push((part, "on".to_string())),
            },
        }
    }
    (id, props)
}

/// A QEMU configuration: the argv's options and the sections of the files it reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuConfig {
    /// Every option with an argument and every file section, in the order QEMU reads them
    /// (a file's sections where its `-readconfig` stands).
    pub sections: Vec<Section>,
    /// Options without an argument, without dashes (`nodefaults`, `S`, `no-shutdown`).
    pub flags: Vec<String>,
    /// The config files read.
    pub files: Vec<PathBuf>,
}

impl QemuConfig {
    /// Parses an argv (without the program name) and reads each `-readconfig` file it names.
    pub fn from_args(args: &[String]) -> Result<QemuConfig, QemuConfigError> {
        let mut cfg = QemuConfig::default();
        let mut i = 0;
        while i < args.len() {
            let word = &args[i];
            let Some(opt) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
                // A stray word (QEMU takes it as the disk image): nothing for us.
                i += 1;
                continue;
            };
            let group = if opt == "M" { "machine" } else { opt };
            let next = args.get(i + 1);
            let is_flag = FLAGS.contains(&group)
                || next.is_none()
                || next.is_some_and(|n| n.starts_with('-') && !is_keyed(group) && n.len() > 1);
            if is_flag {
                if group == "readconfig" {
                    return Err(QemuConfigError::MissingFile);
                }
                cfg.flags.push(group.to_string());
                i += 1;
                continue;
            }
            let value = next.expect("checked above");
            if group == "readconfig" {
                cfg.add_file(Path::new(value))?;
            } else {
                let (id, props) = if is_keyed(group) {
                    parse_keyed(group, value)
                } else {
                    (None, vec![(VALUE.to_string(), value.clone())])
                };
                cfg.sections.push(Section {
                    group: group.to_string(),
                    id,
                    props,
                    origin: Origin::Argv { index: i },
                });
            }
            i += 2;
        }
        Ok(cfg)
    }

    /// Reads a `-readconfig` file and appends its sections.
    pub fn add_file(&mut self, path: &Path) -> Result<(), QemuConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| QemuConfigError::Read { path: path.to_path_buf(), source })?;
        self.sections.extend(parse_readconfig(&text, path)?);
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Whether the flag `-NAME` was given.
    pub fn has_flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }

    /// The sections of one group, in order.
    pub fn sections<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a Section> + 'a {
        self.sections.iter().filter(move |s| s.group == group)
    }

    /// The machine type, from the last `-M`/`-machine`/`[machine]` that names one; `None`
    /// means QEMU's default (`pc` for x86).
    pub fn machine_type(&self) -> Option<&str> {
        self.sections.iter().rev().filter(|s| s.group == "machine").find_map(|s| s.get("type"))
    }

    /// The section of `group` with this id (the last, as QEMU refuses duplicates anyway).
    pub fn by_id(&self, group: &str, id: &str) -> Option<&Section> {
        self.sections.iter().rev().find(|s| s.group == group && s.id.as_deref() == Some(id))
    }

    /// Every section with an id equal to `id`, in any group.
    pub fn with_id<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Section> + 'a {
        self.sections.iter().filter(move |s| s.id.as_deref() == Some(id))
    }

    /// How the configuration boots UEFI firmware, if it does: a pflash drive (`-drive
    /// if=pflash` or EVE's `[drive]` with `if = "pflash"`), `-machine pflash0=`, or a `-bios`
    /// or `-blockdev` whose file names OVMF/edk2. The text names where it was seen.
    pub fn uefi_firmware(&self) -> Option<String> {
        let names_ovmf = |v: &str| {
            let v = v.to_ascii_lowercase();
            v.contains("ovmf") || v.contains("edk2")
        };
        for s in &self.sections {
            let hit = match s.group.as_str() {
                "drive" => s.get("if") == Some("pflash"),
                "machine" => s.get("pflash0").is_some(),
                "bios" => s.value().is_some_and(names_ovmf),
                "blockdev" => s.get("filename").is_some_and(names_ovmf),
                _ => false,
            };
            if hit {
                return Some(s.describe());
            }
        }
        None
    }

    /// The `-fw_cfg`/`[fw_cfg]` entry with this name.
    pub fn fw_cfg(&self, name: &str) -> Option<&Section> {
        self.sections.iter().rev().find(|s| s.group == "fw_cfg" && s.get("name") == Some(name))
    }
}

/// Parses the text of a `-readconfig` file; `path` is for the origins and errors.
pub fn parse_readconfig(text: &str, path: &Path) -> Result<Vec<Section>, QemuConfigError> {
    let mut out: Vec<Section> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let syntax =
            || QemuConfigError::Syntax { path: path.to_path_buf(), line: n + 1, text: line.to_string() };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let (group, id) = match head.split_once(char::is_whitespace) {
                Some((g, rest)) => {
                    let id =
                        rest.trim().strip_prefix('"').and_then(|r| r.strip_suffix('"')).ok_or_else(syntax)?;
                    (g, Some(id.to_string()))
                }
                None => (head, None),
            };
            if group.is_empty() {
                return Err(syntax());
            }
            out.push(Section {
                group: group.to_string(),
                id,
                props: Vec::new(),
                origin: Origin::File { path: path.to_path_buf(), line: n + 1 },
            });
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(syntax)?;
        let key = key.trim();
        let value = value.trim().strip_prefix('"').and_then(|v| v.strip_suffix('"')).ok_or_else(syntax)?;
        let section = out.last_mut().ok_or_else(syntax)?;
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(syntax());
        }
        section.props.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// The shape of EVE's merged config (pkg/pillar/hypervisor/kvm.go): machine, pflash,
/// root ports from slot 4 on, a disk and a NIC behind them, the muxed console.
#[cfg(test)]
pub(crate) const EVE_LIKE: &str = r#"# This file is automatically generated by domainmgr
[msg]
  timestamp = "on"

[machine]
  type = "q35"
  dump-guest-core = "off"
  accel = "kvm"
  vmport = "off"
  kernel-irqchip = "on"

[drive "drive-ovmf-code"]
  if = "pflash"
  format = "raw"
  readonly = "on"
  file = "/usr/lib/xen/boot/OVMF_CODE.fd"

[drive]
  if = "pflash"
  format = "raw"
  file = "/persist/vms/1/OVMF_VARS.fd"

[chardev "charmonitor"]
  backend = "socket"
  path = "/run/hypervisor/kvm/vm1/qmp"
  server = "on"
  wait = "off"

[mon "monitor"]
  chardev = "charmonitor"
  mode = "control"

[chardev "cons"]
  backend = "socket"
  path = "/run/hypervisor/kvm/vm1/cons"
  server = "on"
  wait = "off"
  mux = "on"
  logfile = "/dev/fd/1"

[device "serial0"]
  driver = "isa-serial"
  chardev = "cons"

[device "pci.4"]
  driver = "pcie-root-port"
  port = "12"
  chassis = "4"
  bus = "pcie.0"
  addr = "0x4"

[drive "drive-virtio-disk0"]
  file = "/persist/vault/volumes/disk0.qcow2"
  format = "qcow2"
  aio = "threads"
  cache = "writeback"
  if = "none"

[device "virtio-disk0"]
  driver = "virtio-blk-pci"
  scsi = "off"
  bus = "pci.4"
  addr = "0x0"
  drive = "drive-virtio-disk0"

[device "pci.5"]
  driver = "pcie-root-port"
  port = "13"
  chassis = "5"
  bus = "pcie.0"
  addr = "0x5"

[netdev "hostnet0"]
  type = "tap"
  ifname = "nbu1x1"
  br = "bn1"
  script = "/etc/xen/scripts/qemu-ifup"
  downscript = "no"

[device "net0"]
  driver = "virtio-net-pci"
  netdev = "hostnet0"
  mac = "02:16:3e:00:00:01"
  bus = "pci.5"
  addr = "0x0"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn argv_options_become_sections() {
        let c = QemuConfig::from_args(&argv(
            "-M q35,accel=tcg -nodefaults -S -m 256 -device e1000,id=n0,addr=0x0f.0 -bios /x/OVMF.fd -chardev socket,id=c,path=/a,,b,server=on disk.img",
        ))
        .unwrap();
        assert_eq!(c.machine_type(), Some("q35"));
        assert!(c.has_flag("nodefaults") && c.has_flag("S") && !c.has_flag("no-shutdown"));
        let dev = c.by_id("device", "n0").unwrap();
        assert_eq!(dev.driver(), Some("e1000"));
        assert_eq!(dev.get("addr"), Some("0x0f.0"));
        assert_eq!(dev.origin, Origin::Argv { index: 6 });
        assert_eq!(dev.describe(), "-device e1000,id=n0,addr=0x0f.0");
        assert_eq!(c.by_id("chardev", "c").unwrap().get("path"), Some("/a,b"), "a doubled comma is a comma");
        assert_eq!(c.sections("bios").next().unwrap().value(), Some("/x/OVMF.fd"));
        assert_eq!(c.sections("m").next().unwrap().get("size"), Some("256"));
        assert!(c.uefi_firmware().unwrap().contains("-bios /x/OVMF.fd"));
    }

    #[test]
    fn an_eve_like_config_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.cfg");
        std::fs::write(&path, EVE_LIKE).unwrap();
        let args = vec!["-nodefaults".into(), "-readconfig".into(), path.to_string_lossy().into_owned()];
        let c = QemuConfig::from_args(&args).unwrap();
        assert_eq!(c.files, std::slice::from_ref(&path));
        assert_eq!(c.machine_type(), Some("q35"));
        let port = c.by_id("device", "pci.4").unwrap();
        assert_eq!(
            (port.driver(), port.get("addr"), port.get("bus")),
            (Some("pcie-root-port"), Some("0x4"), Some("pcie.0"))
        );
        assert_eq!(port.origin, Origin::File { path: path.clone(), line: 45 });
        assert!(port
            .describe()
            .starts_with("[device \"pci.4\"] (driver = \"pcie-root-port\", addr = \"0x4\""));
        assert_eq!(c.by_id("chardev", "cons").unwrap().get("mux"), Some("on"));
        assert_eq!(c.sections("drive").count(), 3);
        let fw = c.uefi_firmware().expect("pflash drives are UEFI firmware");
        assert!(fw.contains("[drive \"drive-ovmf-code\"]") && fw.contains("if = \"pflash\""), "{fw}");
        assert!(c.fw_cfg("opt/ovmf/X-PciMmio64Mb").is_none());
    }

    #[test]
    fn firmware_and_fw_cfg_are_found_in_argv() {
        let c = QemuConfig::from_args(&argv(
            "-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd -fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=0",
        ))
        .unwrap();
        assert!(c.uefi_firmware().unwrap().starts_with("-drive if=pflash"));
        assert_eq!(c.fw_cfg("opt/ovmf/X-PciMmio64Mb").unwrap().get("string"), Some("0"));
        assert_eq!(
            QemuConfig::from_args(&argv("-M pc -kernel vmlinux -bios bios.bin")).unwrap().uefi_firmware(),
            None
        );
    }

    #[test]
    fn bad_files_are_reported_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.cfg");
        std::fs::write(&path, "[device \"a\"]\n  driver = e1000\n").unwrap();
        let e =
            QemuConfig::from_args(&["-readconfig".into(), path.to_string_lossy().into_owned()]).unwrap_err();
        assert!(e.to_string().contains("bad.cfg:2:") && e.to_string().contains("driver = e1000"), "{e}");
        let missing = dir.path().join("missing.cfg");
        let e = QemuConfig::from_args(&["-readconfig".into(), missing.to_string_lossy().into_owned()])
            .unwrap_err();
        assert!(e.to_string().contains("cannot read the QEMU config file"), "{e}");
        assert!(matches!(QemuConfig::from_args(&argv("-readconfig")), Err(QemuConfigError::MissingFile)));
    }
}
