//! Which console the guest kernel writes: the chardev of the VM's first serial port (ttyS0),
//! found in the launcher's command line and `-readconfig` files, or named by the operator.
//!
//! A launcher that gives the VM its own serial port (EVE's `cons` socket, often `mux=on` with a
//! readline monitor on it) makes acpimon's added port ttyS1, where the kernel prints nothing.
//! acpimon then reads the launcher's console instead: it connects to that chardev's Unix socket
//! (QEMU serves one client per socket chardev) and re-exports it on a socket of its own for the
//! launcher's tools (see [`crate::console::Console::share`]).
//!
//! The launch is read through the one parser of QEMU configurations,
//! [`super::qemu_config::QemuConfig`], so a console given on the command line and one in EVE's
//! merged config file are found alike.

use std::path::PathBuf;

use super::qemu_config::{self, QemuConfig, Section};

/// The guest's console as the launch defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSource {
    /// The chardev id (for QMP `chardev-send-break`; a mux chardev's own id works).
    pub chardev: String,
    /// The Unix socket QEMU listens on for it.
    pub socket: PathBuf,
    /// Whether the chardev is multiplexed (`mux=on`), e.g. with a monitor.
    pub mux: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("no chardev '{0}' in the QEMU command line or its -readconfig files; name the chardev of the guest's serial console")]
    NoSuchChardev(String),
    #[error("chardev '{id}' is not a listening Unix socket (backend {backend}); acpimon can only share a console given as `socket` with `path=` and `server=on`")]
    NotASocket { id: String, backend: String },
    #[error(transparent)]
    Config(#[from] qemu_config::QemuConfigError),
}

/// One chardev definition: its id and its options.
#[derive(Clone, Debug, Default)]
struct Chardev {
    id: String,
    backend: String,
    opts: Vec<(String, String)>,
}

impl Chardev {
    fn get(&self, key: &str) -> Option<&str> {
        self.opts.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    fn on(&self, key: &str) -> bool {
        matches!(self.get(key), Some("on" | "yes" | "true" | "y"))
    }
    fn of(s: &Section) -> Chardev {
        Chardev {
            id: s.id.clone().unwrap_or_default(),
            backend: s.get("backend").unwrap_or_default().to_string(),
            opts: s.props.clone(),
        }
    }
}

/// The chardev `id`, or only its name when no section defines it.
fn find(cfg: &QemuConfig, id: &str) -> Chardev {
    cfg.by_id("chardev", id).map(Chardev::of).unwrap_or(Chardev { id: id.into(), ..Chardev::default() })
}

/// The chardev behind ttyS0, if the launch defines one: the first `-serial` that is not `none`
/// (they are ttyS0, ttyS1, ... before any `isa-serial` device), else the first `isa-serial`.
fn first_serial(cfg: &QemuConfig) -> Option<Chardev> {
    if let Some(first) = cfg.sections("serial").filter_map(Section::value).find(|v| *v != "none") {
        if let Some(id) = first.strip_prefix("chardev:") {
            return Some(find(cfg, id));
        }
        // `-serial [mon:]unix:PATH,server=on,...`: QEMU names that chardev serial0 (a mux
        // with a monitor on it with `mon:`).
        let (mux, first) = match first.strip_prefix("mon:") {
            Some(rest) => (true, rest),
            None => (false, first),
        };
        let (_, mut opts) = qemu_config::parse_keyed("serial", first);
        // The first word without `=` is the backend (`unix:PATH`), which the parser keeps as a
        // bare key.
        let bare = !first.split(',').next().unwrap_or_default().contains('=');
        let head = if bare && !opts.is_empty() { opts.remove(0).0 } else { String::new() };
        let (backend, path) = match head.split_once(':') {
            Some(("unix", p)) => ("socket".to_string(), p.to_string()),
            Some((b, _)) => (b.to_string(), String::new()),
            None => (head.clone(), String::new()),
        };
        if !path.is_empty() {
            opts.push(("path".into(), path));
        }
        if mux {
            opts.push(("mux".into(), "on".into()));
        }
        return Some(Chardev { id: "serial0".into(), backend, opts });
    }
    let dev = cfg.sections("device").find(|s| s.driver() == Some("isa-serial"))?;
    Some(find(cfg, dev.get("chardev").unwrap_or_default()))
}

/// The guest's console: the chardev named `chosen` (`--console-chardev`), or the one of the
/// first serial port the launch defines. `Ok(None)`: the launch defines no serial port, so
/// acpimon's own (ttyS0 then) is the console.
pub fn guest_console(cfg: &QemuConfig, chosen: Option<&str>) -> Result<Option<ConsoleSource>, ConsoleError> {
    let dev = match chosen {
        Some(id) => {
            cfg.by_id("chardev", id).map(Chardev::of).ok_or_else(|| ConsoleError::NoSuchChardev(id.into()))?
        }
        None => match first_serial(cfg) {
            Some(c) => c,
            None => return Ok(None),
        },
    };
    let socket = dev.get("path").filter(|p| !p.is_empty());
    match (dev.backend.as_str(), socket, dev.on("server")) {
        ("socket", Some(path), true) => {
            Ok(Some(ConsoleSource { chardev: dev.id.clone(), socket: path.into(), mux: dev.on("mux") }))
        }
        _ => Err(ConsoleError::NotASocket {
            id: dev.id.clone(),
            backend: if dev.backend.is_empty() { "undefined".into() } else { dev.backend.clone() },
        }),
    }
}

/// [`guest_console`] of a command line (without the program), reading the `-readconfig` files
/// it names.
pub fn from_launch(argv: &[String], chosen: Option<&str>) -> Result<Option<ConsoleSource>, ConsoleError> {
    guest_console(&QemuConfig::from_args(argv)?, chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    /// The launch of `args` and the config file `text`, as `from_launch` would read them.
    fn launch(args: &str, text: Option<&str>) -> QemuConfig {
        let mut cfg = QemuConfig::from_args(&argv(args)).unwrap();
        if let Some(text) = text {
            cfg.sections.extend(qemu_config::parse_readconfig(text, "vm.cfg".as_ref()).unwrap());
        }
        cfg
    }

    /// EVE's merged config, with its muxed `cons` console.
    const EVE: &str = qemu_config::EVE_LIKE;

    #[test]
    fn an_eve_config_gives_its_mux_socket() {
        let c = guest_console(&launch("-M q35 -nodefaults", Some(EVE)), None).unwrap().unwrap();
        assert_eq!(
            c,
            ConsoleSource {
                chardev: "cons".into(),
                socket: "/run/hypervisor/kvm/vm1/cons".into(),
                mux: true
            }
        );
        // Named explicitly: the same.
        assert_eq!(guest_console(&launch("", Some(EVE)), Some("cons")).unwrap().unwrap(), c);
    }

    #[test]
    fn argv_forms() {
        let a = argv("-chardev socket,id=cons,path=/r/c,,1,server=on,wait=off,mux=on -serial chardev:cons -mon chardev=cons,mode=readline");
        let c = guest_console(&QemuConfig::from_args(&a).unwrap(), None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("cons", "/r/c,1", true));
        let a = argv("-serial none -serial unix:/r/s,server=on,wait=off");
        let c = guest_console(&QemuConfig::from_args(&a).unwrap(), None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("serial0", "/r/s", false));
        let a = argv("-serial mon:unix:/r/m,server=on,wait=off");
        let c = guest_console(&QemuConfig::from_args(&a).unwrap(), None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("serial0", "/r/m", true));
        let a = argv("-chardev socket,id=s0,path=/r/s0,server=on -device isa-serial,chardev=s0");
        assert_eq!(guest_console(&QemuConfig::from_args(&a).unwrap(), None).unwrap().unwrap().chardev, "s0");
        let a = argv("-chardev socket,id=s1,path=/r/s1,server=on -device driver=isa-serial,chardev=s1");
        assert_eq!(guest_console(&QemuConfig::from_args(&a).unwrap(), None).unwrap().unwrap().chardev, "s1");
        // No serial port: acpimon's own is the console.
        assert_eq!(guest_console(&launch("-M q35 -nodefaults", None), None).unwrap(), None);
    }

    #[test]
    fn unusable_consoles_are_refused_with_the_reason() {
        let e = guest_console(&launch("-serial stdio", None), None).unwrap_err().to_string();
        assert!(e.contains("not a listening Unix socket (backend stdio)"), "{e}");
        let e =
            guest_console(&launch("-chardev pty,id=p -device isa-serial,chardev=p", None), None).unwrap_err();
        assert!(
            matches!(e, ConsoleError::NotASocket { ref id, ref backend } if id == "p" && backend == "pty"),
            "{e}"
        );
        let e = guest_console(&launch("", Some(EVE)), Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no chardev 'nope'"), "{e}");
        // A client socket (server=off) cannot be connected to.
        let e = guest_console(&launch("-chardev socket,id=c,path=/x -serial chardev:c", None), None);
        assert!(matches!(e, Err(ConsoleError::NotASocket { .. })), "{e:?}");
    }
}
