//! The command line: parsed and validated here, without I/O; `main` turns it into threads.

use std::path::PathBuf;
use std::time::Duration;

use crate::audit::AuditSpec;

/// The default app port.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.acpimon.app.0";
/// The default app name in `hello`.
pub const DEFAULT_APP: &str = "acpimon-responder";

/// The help text.
pub const USAGE: &str = "\
usage: acpimon-responder [OPTIONS]

The reference guest side of the acpimon app protocol (docs/app-protocol.md): answers the
host's challenges and health requests on the app port, runs audits, reports status changes,
and optionally beats the app mailbox in the acpimon region.

options:
  --port PATH            the app port (default /dev/virtio-ports/org.acpimon.app.0; without
                         udev, the vport whose /sys/class/virtio-ports/*/name is the path's
                         last component). '-' reads stdin and writes stdout, and exits at EOF
                         (for tests).
  --app NAME             the app name sent in hello (default acpimon-responder)
  --status-file PATH     the app's status: first line 'ok|degraded|failed [DETAILS]'; a
                         missing or empty file is ok. Polled every second; a change is reported
                         on its own. Without it the status is always ok.
  --audit NAME=PROGRAM [ARGS...]
                         an audit the host can ask for; the text after '=' is split on
                         whitespace (no shell, no quoting). Repeatable.
  --audit-timeout DUR    how long an audit may run (default 10s; e.g. 10, 10s, 500ms); then
                         its process group is killed and it reports exit 124
  --mailbox [DIR]        also beat the app mailbox through DIR/resource2 (DIR: the ivshmem PCI
                         device in sysfs; default /sys/bus/pci/devices/0000:00:0f.0, else any
                         1af4:1110 device holding an acpimon region)
  --mailbox-only         beat the mailbox only (no port)
  --beat-ms N            mailbox period in ms (default 1000; 10 to 3600000)
  --garbage N            test mode: first write N lines of garbage (oversized, not JSON, wrong
                         version, binary, ...) as fast as the port takes them, then behave
  -h, --help             this text
  -V, --version          the version

Exit status: 0 after EOF with --port -, 2 for a usage error. Otherwise it runs until killed:
port and mailbox errors are logged to stderr and retried with backoff.";

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the responder.
    Run(Config),
    /// Print [`USAGE`].
    Help,
    /// Print the version.
    Version,
}

/// Where the protocol runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Port {
    /// A virtio-serial port (a device path, or a name found in sysfs).
    Device(PathBuf),
    /// stdin and stdout (`--port -`), until EOF.
    Stdio,
    /// No port (`--mailbox-only`).
    None,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The app port.
    pub port: Port,
    /// The app name in `hello`.
    pub app: String,
    /// The status file.
    pub status_file: Option<PathBuf>,
    /// The audits, by name.
    pub audits: Vec<AuditSpec>,
    /// How long an audit may run.
    pub audit_timeout: Duration,
    /// `Some(device)` to beat the mailbox (`Some(None)`: find the device).
    pub mailbox: Option<Option<PathBuf>>,
    /// The mailbox period.
    pub beat: Duration,
    /// Garbage lines to write first.
    pub garbage: u64,
}

impl Config {
    /// The configured audit called `name`.
    pub fn audit(&self, name: &str) -> Option<&AuditSpec> {
        self.audits.iter().find(|a| a.name == name)
    }

    /// The configured audits' names.
    pub fn audit_names(&self) -> Vec<&str> {
        self.audits.iter().map(|a| a.name.as_str()).collect()
    }
}

/// Parses a duration: `10` (seconds), `10s`, `1.5s`, `500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (num, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 0.001)
    } else {
        (t.strip_suffix('s').unwrap_or(t), 1.0)
    };
    let v: f64 = num.trim().parse().ok()?;
    if !v.is_finite() || v <= 0.0 || v * scale > 86_400.0 {
        return None;
    }
    Some(Duration::from_secs_f64(v * scale))
}

/// Parses the arguments (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    let mut port: Option<String> = None;
    let mut app = DEFAULT_APP.to_string();
    let mut status_file = None;
    let mut audits: Vec<AuditSpec> = Vec::new();
    let mut audit_timeout = Duration::from_secs(10);
    let mut mailbox: Option<Option<PathBuf>> = None;
    let mut mailbox_only = false;
    let mut beat_ms: u64 = 1000;
    let mut garbage = 0;

    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().ok_or_else(|| format!("{flag} needs {what}")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--port" => port = Some(value("a path")?),
            "--app" => {
                app = value("a name")?;
                if app.is_empty() || app.len() > 256 {
                    return Err("--app: the name must be 1 to 256 bytes".into());
                }
            }
            "--status-file" => status_file = Some(PathBuf::from(value("a path")?)),
            "--audit" => {
                let spec = AuditSpec::parse(&value("NAME=PROGRAM")?)?;
                if audits.iter().any(|a| a.name == spec.name) {
                    return Err(format!("--audit: '{}' is configured twice", spec.name));
                }
                audits.push(spec);
            }
            "--audit-timeout" => {
                let v = value("a duration")?;
                audit_timeout = parse_duration(&v).ok_or_else(|| {
                    format!("--audit-timeout '{v}': want e.g. 10, 10s or 500ms (up to a day)")
                })?;
            }
            "--mailbox" => {
                let dir = match inline.clone() {
                    Some(v) => Some(PathBuf::from(v)),
                    None => match args.peek() {
                        Some(next) if !next.starts_with('-') => args.next().map(PathBuf::from),
                        _ => None,
                    },
                };
                mailbox = Some(dir);
            }
            "--mailbox-only" => mailbox_only = true,
            "--beat-ms" => {
                let v = value("a number of milliseconds")?;
                beat_ms = v.parse().ok().filter(|n| (10..=3_600_000).contains(n)).ok_or_else(|| {
                    format!("--beat-ms '{v}': want a number of milliseconds from 10 to 3600000")
                })?;
            }
            "--garbage" => {
                let v = value("a number of lines")?;
                garbage = v.parse().map_err(|_| format!("--garbage '{v}': want a number of lines"))?;
            }
            _ => return Err(format!("unknown argument '{arg}' (see --help)")),
        }
    }

    let port = match (mailbox_only, port) {
        (true, Some(_)) => return Err("--mailbox-only and --port exclude each other".into()),
        (true, None) => {
            if garbage > 0 {
                return Err("--garbage needs the port; it cannot go with --mailbox-only".into());
            }
            Port::None
        }
        (false, Some(p)) if p == "-" => Port::Stdio,
        (false, Some(p)) if p.is_empty() => return Err("--port: empty path".into()),
        (false, Some(p)) => Port::Device(PathBuf::from(p)),
        (false, None) => Port::Device(PathBuf::from(DEFAULT_PORT)),
    };
    if mailbox_only && mailbox.is_none() {
        mailbox = Some(None);
    }
    if let Some(Some(dir)) = &mailbox {
        if dir.as_os_str().is_empty() {
            return Err("--mailbox: empty device directory".into());
        }
    }
    Ok(Command::Run(Config {
        port,
        app,
        status_file,
        audits,
        audit_timeout,
        mailbox,
        beat: Duration::from_millis(beat_ms),
        garbage,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Command::Run(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[]).unwrap();
        assert_eq!(c.port, Port::Device(DEFAULT_PORT.into()));
        assert_eq!(c.app, DEFAULT_APP);
        assert_eq!(c.audit_timeout, Duration::from_secs(10));
        assert_eq!((c.mailbox, c.beat, c.garbage), (None, Duration::from_secs(1), 0));
        assert!(c.audits.is_empty() && c.status_file.is_none());
    }

    #[test]
    fn everything() {
        let c = run(&[
            "--port",
            "/dev/vport1p1",
            "--app=web",
            "--status-file",
            "/run/app-status",
            "--audit",
            "disk=df /",
            "--audit=fail=false",
            "--audit-timeout",
            "500ms",
            "--mailbox",
            "/sys/bus/pci/devices/0000:00:04.0",
            "--beat-ms",
            "250",
            "--garbage",
            "20",
        ])
        .unwrap();
        assert_eq!(c.port, Port::Device("/dev/vport1p1".into()));
        assert_eq!(c.app, "web");
        assert_eq!(c.status_file, Some("/run/app-status".into()));
        assert_eq!(c.audit_names(), ["disk", "fail"]);
        assert_eq!(c.audit("disk").unwrap().argv, ["df", "/"]);
        assert_eq!(c.audit("fail").unwrap().argv, ["false"]);
        assert_eq!(c.audit_timeout, Duration::from_millis(500));
        assert_eq!(c.mailbox, Some(Some("/sys/bus/pci/devices/0000:00:04.0".into())));
        assert_eq!((c.beat, c.garbage), (Duration::from_millis(250), 20));
    }

    #[test]
    fn mailbox_value_is_optional() {
        assert_eq!(run(&["--mailbox", "--port", "-"]).unwrap().mailbox, Some(None));
        assert_eq!(run(&["--mailbox"]).unwrap().mailbox, Some(None));
        let c = run(&["--mailbox-only"]).unwrap();
        assert_eq!((c.port, c.mailbox), (Port::None, Some(None)));
        assert_eq!(run(&["--port", "-"]).unwrap().port, Port::Stdio);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "0", "-1", "x", "1h", "nan", "inf", "100000"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        for (args, needle) in [
            (&["--port"][..], "--port needs"),
            (&["--bogus"], "unknown argument '--bogus'"),
            (&["--audit", "disk"], "NAME=PROGRAM"),
            (&["--audit", "a=x", "--audit", "a=y"], "configured twice"),
            (&["--audit-timeout", "soon"], "--audit-timeout 'soon'"),
            (&["--beat-ms", "5"], "--beat-ms '5'"),
            (&["--garbage", "-3"], "--garbage '-3'"),
            (&["--mailbox-only", "--port", "-"], "exclude each other"),
            (&["--mailbox-only", "--garbage", "3"], "--garbage needs the port"),
            (&["--app", ""], "--app"),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        assert_eq!(parse(["--help".to_string()]).unwrap(), Command::Help);
        assert_eq!(parse(["-V".to_string()]).unwrap(), Command::Version);
    }
}
