//! A libvirt [`Domain`]: the fixture guest defined and started through a real `libvirtd`
//! (tools/libvirt starts it; `qemu:///system`, domain type `qemu` for TCG), with acpimon's part
//! of its XML from `acpimon prepare NAME --format libvirt` merged in the way the README tells a
//! user to. The domain is destroyed and undefined on drop, also when the test fails.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use acpimon::launch::Prepared;

use super::guest::fixture;
use super::{repo, require, run, text};

/// The connection URI, once tools/libvirt has installed and started libvirtd.
pub fn uri() -> &'static str {
    static URI: OnceLock<String> = OnceLock::new();
    URI.get_or_init(|| {
        let script = repo().join("tools/libvirt");
        let out = run(&mut Command::new(&script));
        assert!(
            out.status.success(),
            "{} failed (it runs as root: tools/test runs it):\n{}",
            script.display(),
            text(&out.stderr)
        );
        text(&out.stdout).lines().last().expect("tools/libvirt prints the URI").trim().to_string()
    })
}

/// Runs `virsh -c URI ARGS`.
pub fn virsh(args: &[&str]) -> Output {
    require("virsh");
    run(Command::new("virsh").arg("-c").arg(uri()).args(args))
}

/// `virsh`, panicking with its output unless it succeeds; returns its stdout.
pub fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(out.status.success(), "virsh {args:?} failed: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The fragment's children merged into `base` (a whole `<domain>`): `<devices>` and
/// `<features>` children into its own, everything else last in `<domain>`, and the
/// `xmlns:qemu` namespace on it.
pub fn merge(base: &str, fragment: &str) -> String {
    let open = fragment.find("<domain ").expect("the fragment has a <domain>");
    let body_at = open + fragment[open..].find('>').expect("<domain ...>") + 1;
    let end = fragment.rfind("</domain>").expect("</domain>");
    let mut body = fragment[body_at..end].to_string();
    let mut take = |tag: &str| {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        match (body.find(&open), body.find(&close)) {
            (Some(a), Some(b)) => {
                let inner = body[a + open.len()..b].to_string();
                body.replace_range(a..b + close.len(), "");
                inner
            }
            _ => String::new(),
        }
    };
    let (devices, features) = (take("devices"), take("features"));
    let ns = acpimon::launch::libvirt::QEMU_NS;
    base.replacen("<domain type='qemu'>", &format!("<domain type='qemu' xmlns:qemu='{ns}'>"), 1)
        .replacen("</devices>", &format!("{devices}</devices>"), 1)
        .replacen("</features>", &format!("{features}</features>"), 1)
        .replacen("</domain>", &format!("{body}</domain>"), 1)
}

/// A running libvirt domain booting the fixture guest.
pub struct Domain {
    pub name: String,
    pub prepared: Prepared,
    pub xml: String,
    _dir: tempfile::TempDir,
}

impl Domain {
    /// [`Domain::define`]s and starts a domain, created paused (`virsh start --paused`) so a
    /// watch service can attach before the guest's first line.
    pub fn start_paused(scenario: &str, delay: u32) -> Domain {
        let d = Domain::define(scenario, delay);
        d.virsh(&["start", "--paused"]);
        d
    }

    /// As [`Domain::start_paused`], with libvirt's own pty serial console (`<serial
    /// type='pty'>` + `<console type='pty'>`, the guest's ttyS0) as the guest's console:
    /// prepared with `--console libvirt`, so acpimon adds no serial port.
    pub fn start_paused_with_libvirt_console(scenario: &str, delay: u32) -> Domain {
        let d = Domain::define_with(scenario, delay, true);
        d.virsh(&["start", "--paused"]);
        d
    }

    /// Defines (does not start) a domain whose guest runs `scenario` after `delay` seconds.
    pub fn define(scenario: &str, delay: u32) -> Domain {
        Domain::define_with(scenario, delay, false)
    }

    fn define_with(scenario: &str, delay: u32, libvirt_console: bool) -> Domain {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("acpimon-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new().prefix("acpimon-libvirt").tempdir_in("/tmp").unwrap();
        let mut args =
            vec!["prepare", &name, "--state-dir", dir.path().to_str().unwrap(), "--format", "libvirt"];
        if libvirt_console {
            args.extend(["--console", "libvirt"]);
        }
        let out = super::acpimon(&args);
        assert!(out.status.success(), "prepare --format libvirt failed: {}", text(&out.stderr));
        let prepared = Prepared {
            dir: dir.path().join(&name),
            descriptor: acpimon::launch::Descriptor::load(&dir.path().join(&name)).unwrap(),
        };
        let mut base = base(&name, scenario, delay);
        if libvirt_console {
            base = base.replacen("  </devices>", LIBVIRT_CONSOLE, 1);
        }
        let xml = merge(&base, &text(&out.stdout));
        let file = dir.path().join("domain.xml");
        super::write(&file, xml.as_bytes());
        let d = Domain { name, prepared, xml, _dir: dir };
        virsh_ok(&["define", file.to_str().unwrap()]);
        d
    }

    /// The state directory `acpimon watch` is given.
    pub fn state_dir(&self) -> &Path {
        self.prepared.dir.parent().unwrap()
    }

    /// `virsh ARGS DOMAIN...`: the domain's name goes after `args`.
    pub fn virsh(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.push(&self.name);
        virsh_ok(&all)
    }

    /// libvirt's state and reason (`virsh domstate --reason`).
    pub fn state(&self) -> String {
        self.virsh(&["domstate", "--reason"]).trim().to_string()
    }

    /// QEMU's log as libvirt keeps it (its command line and stderr).
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", self.name)).unwrap_or_default()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Both may fail (already off, already gone); neither may leave the domain behind.
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

/// libvirt's usual serial console: a pty that libvirt's console stream (`virsh console`) serves.
const LIBVIRT_CONSOLE: &str = "    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>";

/// The user's domain before acpimon's part: the fixture guest under TCG with nothing libvirt
/// adds by default that the guest does not need.
fn base(name: &str, scenario: &str, delay: u32) -> String {
    let fx = fixture().display().to_string();
    let emulator = super::guest::qemu();
    let emulator = if emulator.contains('/') {
        emulator
    } else {
        text(&run(Command::new("sh").args(["-c", &format!("command -v {emulator}")])).stdout)
            .trim()
            .to_string()
    };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{fx}/vmlinux</kernel>
    <initrd>{fx}/initrd.img</initrd>
    <cmdline>console=ttyS0 acpimon.scenario={scenario} acpimon.delay={delay}</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"
    )
}
