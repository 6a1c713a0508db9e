//! Which console the guest kernel writes: the chardev of the VM's first serial port (ttyS0),
//! found in the launcher's command line and `-readconfig` files, or named by the operator.
//!
//! A launcher that gives the VM its own serial port (EVE's `cons` socket, often `mux=on` with a
//! readline monitor on it) makes acpimon's added port ttyS1, where the kernel prints nothing.
//! acpimon then reads the launcher's console instead: it connects to that chardev's Unix socket
//! (QEMU serves one client per socket chardev) and re-exports it on a socket of its own for the
//! launcher's tools (see [`crate::console::Console::share`]).
//!
//! The parsing here is the minimum this needs; [`guest_console`] is the one entry point, so a
//! shared argv/`-readconfig` parser can replace its internals.

use std::path::{Path, PathBuf};

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleError {
    #[error("no chardev '{0}' in the QEMU command line or its -readconfig files; name the chardev of the guest's serial console")]
    NoSuchChardev(String),
    #[error("chardev '{id}' is not a listening Unix socket (backend {backend}); acpimon can only share a console given as `socket` with `path=` and `server=on`")]
    NotASocket { id: String, backend: String },
    #[error("cannot read -readconfig file {path}: {why}")]
    Config { path: PathBuf, why: String },
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
}

/// `key = value` options of a section or an option.
type Opts = Vec<(String, String)>;
/// A `-readconfig` section being read: its group, id and options.
type Section = (String, String, Opts);

/// What the launch says about chardevs and serial ports.
#[derive(Default)]
struct Launch {
    chardevs: Vec<Chardev>,
    /// `-serial` values, in order (they are ttyS0, ttyS1, ... before any `-device isa-serial`).
    serial_options: Vec<String>,
    /// The `chardev=` of each `isa-serial` device, in order.
    isa_serials: Vec<String>,
}

/// Splits a QEMU option value at single commas (`,,` is an escaped comma).
fn split_opts(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("non-empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("non-empty").push(c);
        }
    }
    out
}

/// `key=value` pairs; a first word without `=` is returned as the implied head.
fn key_values(value: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut head = None;
    let mut kv = Vec::new();
    for (i, part) in split_opts(value).into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => kv.push((k.to_string(), v.to_string())),
            None if i == 0 => head = Some(part),
            None => kv.push((part, "on".into())),
        }
    }
    (head, kv)
}

impl Launch {
    fn chardev_arg(&mut self, value: &str) {
        let (head, opts) = key_values(value);
        let id = opts.iter().find(|(k, _)| k == "id").map(|(_, v)| v.clone()).unwrap_or_default();
        self.chardevs.push(Chardev { id, backend: head.unwrap_or_default(), opts });
    }

    fn device(&mut self, driver: &str, opts: &[(String, String)]) {
        if driver == "isa-serial" {
            let chardev =
                opts.iter().find(|(k, _)| k == "chardev").map(|(_, v)| v.clone()).unwrap_or_default();
            self.isa_serials.push(chardev);
        }
    }

    /// A `-readconfig` file: `[group "id"]` sections of `key = "value"` lines.
    fn config(&mut self, text: &str) {
        let mut section: Option<Section> = None;
        let flush = |me: &mut Launch, s: Option<Section>| {
            let Some((group, id, opts)) = s else { return };
            match group.as_str() {
                "chardev" => {
                    let backend = opts.iter().find(|(k, _)| k == "backend").map(|(_, v)| v.clone());
                    me.chardevs.push(Chardev { id, backend: backend.unwrap_or_default(), opts });
                }
                "device" => {
                    let driver = opts.iter().find(|(k, _)| k == "driver").map(|(_, v)| v.clone());
                    me.device(driver.as_deref().unwrap_or(""), &opts);
                }
                _ => {}
            }
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                flush(self, section.take());
                let rest = rest.trim_end_matches(']').trim();
                let (group, id) = match rest.split_once(' ') {
                    Some((g, id)) => (g.to_string(), id.trim().trim_matches('"').to_string()),
                    None => (rest.to_string(), String::new()),
                };
                section = Some((group, id, Vec::new()));
            } else if let (Some((_, _, opts)), Some((k, v))) = (section.as_mut(), line.split_once('=')) {
                opts.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
            }
        }
        flush(self, section);
    }

    fn find(&self, id: &str) -> Option<&Chardev> {
        self.chardevs.iter().rev().find(|c| c.id == id)
    }

    /// The chardev behind ttyS0, if the launch defines it as a chardev.
    fn first_serial(&self) -> Option<Chardev> {
        if let Some(first) = self.serial_options.iter().find(|s| s.as_str() != "none") {
            if let Some(id) = first.strip_prefix("chardev:") {
                return self.find(id).cloned().or(Some(Chardev { id: id.into(), ..Chardev::default() }));
            }
            // `-serial [mon:]unix:PATH,server=on,...`: QEMU names that chardev serial0 (a mux
            // with a monitor on it with `mon:`).
            let (mux, first) = match first.strip_prefix("mon:") {
                Some(rest) => (true, rest),
                None => (false, first.as_str()),
            };
            let (head, opts) = key_values(first);
            let head = head.unwrap_or_default();
            let (backend, path) = match head.split_once(':') {
                Some(("unix", p)) => ("socket".to_string(), p.to_string()),
                Some((b, _)) => (b.to_string(), String::new()),
                None => (head.clone(), String::new()),
            };
            let mut opts = opts;
            if !path.is_empty() {
                opts.push(("path".into(), path));
            }
            if mux {
                opts.push(("mux".into(), "on".into()));
            }
            return Some(Chardev { id: "serial0".into(), backend, opts });
        }
        let id = self.isa_serials.first()?;
        self.find(id).cloned().or(Some(Chardev { id: id.clone(), ..Chardev::default() }))
    }
}

/// The guest's console: the chardev named `chosen` (`--console-chardev`), or the one of the
/// first serial port the launch defines. `argv` is the user's QEMU arguments (without the
/// program); `configs` the text of its `-readconfig` files, in order. `Ok(None)`: the launch
/// defines no serial port, so acpimon's own (ttyS0 then) is the console.
pub fn guest_console(
    argv: &[String],
    configs: &[String],
    chosen: Option<&str>,
) -> Result<Option<ConsoleSource>, ConsoleError> {
    let mut launch = Launch::default();
    for text in configs {
        launch.config(text);
    }
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let opt = arg.trim_start_matches('-');
        if !arg.starts_with('-') {
            continue;
        }
        match opt {
            "chardev" | "serial" | "device" => {
                let Some(value) = args.next() else { break };
                match opt {
                    "chardev" => launch.chardev_arg(value),
                    "serial" => launch.serial_options.push(value.clone()),
                    _ => {
                        let (driver, opts) = key_values(value);
                        let driver = driver
                            .or_else(|| opts.iter().find(|(k, _)| k == "driver").map(|(_, v)| v.clone()));
                        launch.device(driver.as_deref().unwrap_or(""), &opts);
                    }
                }
            }
            _ => {}
        }
    }
    let dev = match chosen {
        Some(id) => launch.find(id).cloned().ok_or_else(|| ConsoleError::NoSuchChardev(id.into()))?,
        None => match launch.first_serial() {
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

/// [`guest_console`] reading the `-readconfig` files `argv` names.
pub fn from_launch(argv: &[String], chosen: Option<&str>) -> Result<Option<ConsoleSource>, ConsoleError> {
    let mut configs = Vec::new();
    for pair in argv.windows(2) {
        if pair[0] == "-readconfig" || pair[0] == "--readconfig" {
            let path = Path::new(&pair[1]);
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConsoleError::Config { path: path.into(), why: e.to_string() })?;
            configs.push(text);
        }
    }
    guest_console(argv, &configs, chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    const EVE: &str = r#"
[machine]
  type = "q35"

[chardev "cons"]
  backend = "socket"
  path = "/run/hypervisor/kvm/vm1/cons"
  server = "on"
  wait = "off"
  mux = "on"

[device "serial0"]
  driver = "isa-serial"
  chardev = "cons"

[mon "cons-mon"]
  chardev = "cons"
  mode = "readline"
"#;

    #[test]
    fn an_eve_config_gives_its_mux_socket() {
        let c = guest_console(&argv("-M q35 -nodefaults"), &[EVE.into()], None).unwrap().unwrap();
        assert_eq!(
            c,
            ConsoleSource {
                chardev: "cons".into(),
                socket: "/run/hypervisor/kvm/vm1/cons".into(),
                mux: true
            }
        );
        // Named explicitly: the same.
        assert_eq!(guest_console(&[], &[EVE.into()], Some("cons")).unwrap().unwrap(), c);
    }

    #[test]
    fn argv_forms() {
        let a = argv("-chardev socket,id=cons,path=/r/c,,1,server=on,wait=off,mux=on -serial chardev:cons -mon chardev=cons,mode=readline");
        let c = guest_console(&a, &[], None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("cons", "/r/c,1", true));
        let a = argv("-serial none -serial unix:/r/s,server=on,wait=off");
        let c = guest_console(&a, &[], None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("serial0", "/r/s", false));
        let a = argv("-serial mon:unix:/r/m,server=on,wait=off");
        let c = guest_console(&a, &[], None).unwrap().unwrap();
        assert_eq!((c.chardev.as_str(), c.socket.to_str().unwrap(), c.mux), ("serial0", "/r/m", true));
        let a = argv("-chardev socket,id=s0,path=/r/s0,server=on -device isa-serial,chardev=s0");
        assert_eq!(guest_console(&a, &[], None).unwrap().unwrap().chardev, "s0");
        let a = argv("-chardev socket,id=s1,path=/r/s1,server=on -device driver=isa-serial,chardev=s1");
        assert_eq!(guest_console(&a, &[], None).unwrap().unwrap().chardev, "s1");
        // No serial port: acpimon's own is the console.
        assert_eq!(guest_console(&argv("-M q35 -nodefaults"), &[], None).unwrap(), None);
    }

    #[test]
    fn unusable_consoles_are_refused_with_the_reason() {
        let e = guest_console(&argv("-serial stdio"), &[], None).unwrap_err().to_string();
        assert!(e.contains("not a listening Unix socket (backend stdio)"), "{e}");
        let e =
            guest_console(&argv("-chardev pty,id=p -device isa-serial,chardev=p"), &[], None).unwrap_err();
        assert_eq!(e, ConsoleError::NotASocket { id: "p".into(), backend: "pty".into() });
        let e = guest_console(&[], &[EVE.into()], Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no chardev 'nope'"), "{e}");
        // A client socket (server=off) cannot be connected to.
        let e = guest_console(&argv("-chardev socket,id=c,path=/x -serial chardev:c"), &[], None);
        assert!(matches!(e, Err(ConsoleError::NotASocket { .. })), "{e:?}");
    }
}
