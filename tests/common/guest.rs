//! The real-QEMU test framework: a [`Guest`] is a fixture Linux guest booted under acpimon's
//! own launch code (`acpimon::launch::Vm`, the same path as `acpimon run`), with its QMP,
//! console and region. Every integration test that boots QEMU goes through here.
//!
//! `ACPIMON_QEMU` names the QEMU binary (default `qemu-system-x86_64`); CI runs the suite once
//! with QEMU 10 and once with Debian bookworm's 7.2 (`tools/qemu-7.2`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use acpimon::generate::SsdtConfig;
use acpimon::launch::{Vm, VmSpec};
use acpimon::read::{GuestRecord, Snapshot};
use acpimon::trigger::{Beat, Heartbeat};

use super::{repo, require, run, text};

/// How long a guest may take to print its ready marker under TCG.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub const READY: &str = "ACPIMON-GUEST: ready";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, booting the uncompressed kernel through PVH (fastest).
    SeaBios,
    /// OVMF (UEFI), booting the bzImage.
    Ovmf,
}

#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub machine: &'static str,
    pub firmware: Firmware,
    /// `acpimon.scenario=` of the fixture's /init.
    pub scenario: &'static str,
    /// Seconds before the scenario's stop or panic.
    pub delay: u32,
    pub ssdt: SsdtConfig,
    /// Launch acpimon's options through -readconfig, as EVE does.
    pub readconfig: bool,
    /// More QEMU arguments.
    pub extra: Vec<String>,
    /// Wait for the console's ready marker (a test of a broken channel may not).
    pub wait_ready: bool,
    /// Leave QMP and the console to an `acpimon watch` under test: the guest's handle uses a
    /// second monitor and has no console (so `wait_ready` is ignored).
    pub watched: bool,
    /// The app channel and the guest agent's port (`prepare --app-channel --guest-agent`).
    pub extras: acpimon::launch::Extras,
    /// More kernel command-line words for the fixture's /init (e.g. `acpimon.app=responder`).
    pub append: Vec<String>,
    /// Prepare the VM in this state directory (e.g. one a service already watches) instead of
    /// a temporary one of its own.
    pub state_dir: Option<PathBuf>,
}

impl GuestSpec {
    pub fn new(machine: &'static str) -> Self {
        GuestSpec {
            machine,
            firmware: Firmware::SeaBios,
            scenario: "healthy",
            delay: 3,
            ssdt: SsdtConfig::default(),
            readconfig: false,
            extra: Vec::new(),
            wait_ready: true,
            watched: false,
            extras: acpimon::launch::Extras::default(),
            append: Vec::new(),
            state_dir: None,
        }
    }

    /// QEMU's arguments for this guest (without acpimon's), as `acpimon run` takes them.
    pub fn qemu_args(&self) -> Vec<String> {
        let fx = fixture();
        let mut cmdline =
            format!("console=ttyS0 acpimon.scenario={} acpimon.delay={}", self.scenario, self.delay);
        for word in &self.append {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        let mut args: Vec<String> = ["-M", self.machine, "-m", "256", "-nodefaults", "-display", "none"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let kernel = match self.firmware {
            Firmware::SeaBios => "vmlinux",
            Firmware::Ovmf => {
                args.extend(["-bios".into(), "/usr/share/ovmf/OVMF.fd".into()]);
                "vmlinuz"
            }
        };
        args.extend(self.extra.iter().cloned());
        args.extend([
            "-kernel".into(),
            fx.join(kernel).to_string_lossy().into(),
            "-initrd".into(),
            fx.join("initrd.img").to_string_lossy().into(),
            "-append".into(),
            cmdline,
        ]);
        args
    }
}

/// The fixture guest's directory, built (or found in the cache) once per test binary.
pub fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = repo().join("qemu-fixtures/build-guest");
        let out = run(&mut Command::new(&script));
        assert!(
            out.status.success(),
            "{} failed (run tools/setup):\n{}",
            script.display(),
            text(&out.stderr)
        );
        let dir =
            PathBuf::from(text(&out.stdout).lines().last().expect("build-guest prints its directory").trim());
        assert!(dir.join("vmlinux").is_file(), "no vmlinux in {}", dir.display());
        dir
    })
}

/// The QEMU under test.
pub fn qemu() -> String {
    match std::env::var("ACPIMON_QEMU") {
        Ok(q) if !q.is_empty() => q,
        _ => {
            require("qemu-system-x86_64");
            "qemu-system-x86_64".into()
        }
    }
}

/// A booted guest.
pub struct Guest {
    pub vm: Vm,
    /// What it was launched with, to relaunch it in the same directory.
    spec: VmSpec,
    _dir: Option<tempfile::TempDir>,
}

impl Guest {
    /// Boots `spec` and waits for the guest's ready marker on the console.
    pub async fn boot(spec: GuestSpec) -> Guest {
        fixture();
        let (dir, state) = match &spec.state_dir {
            Some(state) => (None, state.clone()),
            None => {
                let dir = tempfile::Builder::new().prefix("acpimon-test").tempdir_in("/tmp").unwrap();
                let state = dir.path().to_path_buf();
                (Some(dir), state)
            }
        };
        let prepared = acpimon::launch::prepare_with(&state, "guest", &spec.ssdt, spec.extras).unwrap();
        let args = spec.qemu_args();
        let wait_ready = spec.wait_ready && !spec.watched;
        let spec = VmSpec {
            program: qemu(),
            args,
            prepared,
            readconfig: spec.readconfig,
            leave_to_watch: spec.watched,
        };
        let vm = Vm::launch(spec.clone()).await.unwrap_or_else(|e| panic!("launch failed: {e}"));
        let guest = Guest { vm, spec, _dir: dir };
        if wait_ready {
            guest.wait_console(READY, 0, BOOT_TIMEOUT).await;
        }
        guest
    }

    /// Kills QEMU (SIGKILL, as a crash or an operator would) and waits until it is gone.
    pub async fn kill(&mut self) {
        let pid = self.vm.qmp.pid.expect("QEMU's pid through its QMP socket");
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL sent");
        tokio::time::timeout(Duration::from_secs(20), self.vm.qmp.closed()).await.expect("QEMU exits");
    }

    /// Launches QEMU again in the same directory, created paused (`-S`) or not; does not wait
    /// for the guest (as a watched guest).
    pub async fn relaunch(&mut self, paused: bool) {
        self.spec.args.retain(|a| a != "-S");
        if paused {
            self.spec.args.push("-S".into());
        }
        self.vm = Vm::launch(self.spec.clone()).await.unwrap_or_else(|e| panic!("relaunch failed: {e}"));
    }

    pub fn snapshot(&self) -> Snapshot {
        self.vm.region.snapshot().expect("the region decodes")
    }

    pub fn record(&self) -> Option<GuestRecord> {
        self.snapshot().record
    }

    /// Waits for `needle` on the console after `mark`; panics with the console tail if not.
    pub async fn wait_console(&self, needle: &str, mark: u64, timeout: Duration) -> String {
        let console = self.vm.console().expect("console connected");
        match console.wait_for(needle, mark, timeout).await {
            Ok(seen) => seen,
            Err(seen) => panic!(
                "'{needle}' not on the console within {timeout:?}; QEMU stderr: {}\nconsole:\n{seen}",
                self.vm.stderr_tail()
            ),
        }
    }

    /// A heartbeat source for this guest.
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat::new(self.vm.region.clone(), self.vm.prepared.descriptor.irq).unwrap()
    }

    /// Beats until the first acknowledged one (the GED driver binds after the ready marker
    /// can appear); panics after `timeout`.
    pub async fn until_first_ack(&self, hb: &mut Heartbeat, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Beat::Acked { .. } = hb.beat(&self.vm.qmp, Duration::from_millis(500)).await.unwrap() {
                return;
            }
        }
        panic!("no heartbeat acknowledged within {timeout:?}: {:?}", self.snapshot());
    }

    /// `n` heartbeats, each of which must be acknowledged; returns their latencies.
    pub async fn beats_acked(&self, hb: &mut Heartbeat, n: usize) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            match hb.beat(&self.vm.qmp, Duration::from_secs(2)).await.unwrap() {
                Beat::Acked { latency, record, request_no } => {
                    assert_eq!(record.echo_request_no, request_no);
                    out.push(latency);
                }
                missed => panic!("heartbeat not acknowledged: {missed:?}"),
            }
        }
        out
    }
}
