//! The real-QEMU test framework: a [`Guest`] is a fixture Linux guest booted under acpimon's
//! own launch code (`acpimon::launch::Vm`, the same path as `acpimon run`), with its QMP,
//! console and region. Every integration test that boots QEMU goes through here.
//!
//! `ACPIMON_QEMU` names the QEMU binary (default `qemu-system-x86_64`); CI runs the suite once
//! with QEMU 10, once with Debian bookworm's 7.2 (`tools/qemu-7.2`), and a reduced set with
//! bullseye's 5.2 (`tools/qemu-old bullseye`; see tools/test).
//!
//! `ACPIMON_KERNEL` names the fixture's kernel for every guest that does not pick its own
//! (`GuestSpec::kernel`): a `qemu-fixtures/build-guest --kernel` spec such as `trixie-cloud`
//! (default `bookworm`, Debian's 6.1). tests/kernels.rs boots each kernel of the matrix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
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
    /// OVMF as EVE gives it: two pflash drives (code read-only, a copy of the variables),
    /// booting the bzImage.
    Pflash(Edk2),
}

/// Which OVMF build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edk2 {
    /// Debian bookworm's edk2 2022.11 (/usr/share/OVMF, installed by tools/setup): honours
    /// OVMF's low-BAR knob only with a CPU address width it distrusts.
    Bookworm,
    /// Debian trixie's edk2 2025.02 (unpacked by `tools/ovmf trixie`): honours it alone.
    Trixie,
}

impl Edk2 {
    /// The directory holding OVMF_CODE_4M.fd and OVMF_VARS_4M.fd.
    pub fn dir(self) -> PathBuf {
        match self {
            Edk2::Bookworm => PathBuf::from("/usr/share/OVMF"),
            Edk2::Trixie => {
                static DIR: OnceLock<PathBuf> = OnceLock::new();
                DIR.get_or_init(|| {
                    let script = repo().join("tools/ovmf");
                    let out = run(Command::new(&script).arg("trixie"));
                    assert!(out.status.success(), "tools/ovmf trixie failed:\n{}", text(&out.stderr));
                    PathBuf::from(
                        text(&out.stdout).lines().last().expect("tools/ovmf prints its directory").trim(),
                    )
                })
                .clone()
            }
        }
    }
}

/// A fault the fixture's /init injects (`acpimon.fault=`; qemu-fixtures/faults/faults.c for the
/// lockups and the hung task).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A kthread bound to the CPU spins with preemption disabled (interrupts on).
    SoftLockup,
    /// The same with interrupts disabled.
    HardLockup,
    /// A kthread blocked in D state; /init sets `kernel.hung_task_timeout_secs` to 10.
    Hung,
    /// A userspace memory hog the OOM killer kills.
    Oom,
    /// SysRq c.
    Panic,
}

impl FaultKind {
    /// The word of `acpimon.fault=`.
    pub fn word(self) -> &'static str {
        match self {
            FaultKind::SoftLockup => "softlockup",
            FaultKind::HardLockup => "hardlockup",
            FaultKind::Hung => "hung",
            FaultKind::Oom => "oom",
            FaultKind::Panic => "panic",
        }
    }
}

/// [`GuestSpec::fault`]: what, on which CPU (lockups), how long after the ready marker.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub cpu: u32,
    pub delay: u32,
}

impl Fault {
    /// `kind` on CPU 1, 3 s after the ready marker.
    pub fn new(kind: FaultKind) -> Fault {
        Fault { kind, cpu: 1, delay: 3 }
    }

    /// The console line /init prints when it injects the fault.
    pub const MARKER: &'static str = "ACPIMON-GUEST: fault ";
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
    /// The fixture's kernel (a `build-guest --kernel` spec, e.g. `bullseye-cloud`); `None`:
    /// `ACPIMON_KERNEL`, else bookworm's.
    pub kernel: Option<&'static str>,
    /// The guest's console as EVE gives it (implies the launcher's -readconfig file, as
    /// `eve_config`, without its `-S`): a mux socket (`cons`, with a readline monitor on it)
    /// that acpimon finds there, reads and re-exports (`console-share.sock`).
    pub eve_console: bool,
    /// Launch as EVE does: the machine and the firmware's pflash drives in the launcher's own
    /// -readconfig file, `-nodefaults -no-shutdown -S` on the command line, and `cont` once
    /// QMP is up (a watched guest: by its test, once the service has attached).
    pub eve_config: bool,
    /// Prepare the VM in this state directory (e.g. one a service already watches) instead of
    /// a temporary one of its own.
    pub state_dir: Option<PathBuf>,
    /// vCPUs (`-smp`); 1 adds nothing.
    pub smp: u32,
    /// A fault for /init to inject after the ready marker (any scenario).
    pub fault: Option<Fault>,
    /// The kernel's console (`console=`): `ttyS0`, acpimon's serial port, or e.g. `tty0` for a
    /// guest whose kernel log is not on the port acpimon reads (as many cloud images).
    pub kernel_console: &'static str,
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
            kernel: None,
            eve_console: false,
            eve_config: false,
            state_dir: None,
            smp: 1,
            fault: None,
            kernel_console: "ttyS0",
        }
    }

    /// QEMU's arguments for this guest (without acpimon's), as `acpimon run` takes them.
    pub fn qemu_args(&self) -> Vec<String> {
        assert!(
            !(self.eve_config || self.eve_console || matches!(self.firmware, Firmware::Pflash(_))),
            "this launch writes files: use qemu_args_in(DIR)"
        );
        self.qemu_args_in(Path::new("/nonexistent"))
    }

    /// The fixture this guest boots (its kernel's).
    pub fn fixture(&self) -> &'static Path {
        match self.kernel {
            Some(k) => fixture_for(k),
            None => fixture(),
        }
    }

    /// QEMU's arguments for this guest (without acpimon's); the files the launcher writes (its
    /// -readconfig file, OVMF's variable store, the EVE console socket) go in `dir`.
    pub fn qemu_args_in(&self, dir: &Path) -> Vec<String> {
        let fx = self.fixture();
        let mut cmdline = format!(
            "console={} acpimon.scenario={} acpimon.delay={}",
            self.kernel_console, self.scenario, self.delay
        );
        if let Some(f) = self.fault {
            cmdline.push_str(&format!(
                " acpimon.fault={} acpimon.fault_cpu={} acpimon.fault_delay={}",
                f.kind.word(),
                f.cpu,
                f.delay
            ));
        }
        for word in &self.append {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
        let mut args: Vec<String> =
            ["-m", "256", "-nodefaults", "-display", "none"].iter().map(|s| s.to_string()).collect();
        // The launcher's own sections: in its -readconfig file (EVE), or as argv.
        let mut launcher: Vec<(&str, Vec<(&str, String)>)> =
            vec![("machine", vec![("type", self.machine.into())])];
        let kernel = match self.firmware {
            Firmware::SeaBios => "vmlinux",
            Firmware::Ovmf => {
                args.extend(["-bios".into(), "/usr/share/ovmf/OVMF.fd".into()]);
                "vmlinuz"
            }
            Firmware::Pflash(edk2) => {
                let vars = dir.join("OVMF_VARS.fd");
                std::fs::copy(edk2.dir().join("OVMF_VARS_4M.fd"), &vars).unwrap();
                let code = edk2.dir().join("OVMF_CODE_4M.fd").to_string_lossy().into_owned();
                let drive = |unit: &str, file: String, readonly: bool| {
                    let mut p =
                        vec![("if", "pflash".to_string()), ("format", "raw".into()), ("unit", unit.into())];
                    if readonly {
                        p.push(("readonly", "on".into()));
                    }
                    p.push(("file", file));
                    ("drive", p)
                };
                launcher.push(drive("0", code, true));
                launcher.push(drive("1", vars.to_string_lossy().into_owned(), false));
                "vmlinuz"
            }
        };
        if self.eve_config || self.eve_console {
            let mut ini = String::from("# the launcher's own configuration, as EVE writes it\n");
            for (group, props) in &launcher {
                ini.push_str(&format!("[{group}]\n"));
                for (k, v) in props {
                    ini.push_str(&format!("  {k} = \"{v}\"\n"));
                }
                ini.push('\n');
            }
            if self.eve_console {
                ini.push_str(&eve_console_sections(dir));
            }
            let path = dir.join("launcher.cfg");
            std::fs::write(&path, ini).unwrap();
            args.push("-no-shutdown".into());
            if self.eve_config {
                args.push("-S".into());
            }
            args.extend(["-readconfig".into(), path.to_string_lossy().into()]);
        } else {
            for (group, props) in &launcher {
                let v: Vec<String> = props.iter().map(|(k, v)| format!("{k}={v}")).collect();
                args.extend([format!("-{group}"), v.join(",")]);
            }
        }
        if self.smp > 1 {
            args.extend(["-smp".into(), self.smp.to_string()]);
        }
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

/// The kernel spec of guests that do not name one: `ACPIMON_KERNEL`, else `bookworm`.
pub fn default_kernel() -> String {
    match std::env::var("ACPIMON_KERNEL") {
        Ok(k) if !k.is_empty() => k,
        _ => "bookworm".into(),
    }
}

/// The fixture guest's directory for the default kernel (`default_kernel`).
pub fn fixture() -> &'static Path {
    fixture_for(&default_kernel())
}

/// The fixture guest's directory with `kernel` (a `build-guest --kernel` spec), built (or
/// found in the cache) once per test binary and kernel.
pub fn fixture_for(kernel: &str) -> &'static Path {
    static DIRS: Mutex<BTreeMap<String, &'static Path>> = Mutex::new(BTreeMap::new());
    // Held while building: build-guest serialises builds on its cache lock anyway.
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = dirs.get(kernel) {
        return dir;
    }
    let script = repo().join("qemu-fixtures/build-guest");
    let out = run(Command::new(&script).args(["--kernel", kernel]));
    assert!(
        out.status.success(),
        "{} --kernel {kernel} failed (run tools/setup):\n{}",
        script.display(),
        text(&out.stderr)
    );
    let dir =
        PathBuf::from(text(&out.stdout).lines().last().expect("build-guest prints its directory").trim());
    assert!(dir.join("vmlinux").is_file(), "no vmlinux in {}", dir.display());
    let dir: &'static Path = Box::leak(dir.into_boxed_path());
    dirs.insert(kernel.to_string(), dir);
    dir
}

/// One `key=value` line of a fixture's manifest (e.g. `kernel_release`).
pub fn manifest_value(fixture: &Path, key: &str) -> String {
    let path = fixture.join("manifest");
    let manifest =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    manifest
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {}", path.display()))
        .to_string()
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

/// The socket of [`GuestSpec::eve_console`]'s console in the guest's directory `dir`.
pub fn eve_console_socket(dir: &Path) -> PathBuf {
    dir.join("eve").join("cons")
}

/// The console sections of an EVE-style `-readconfig` file: a mux socket under `dir` shared by
/// the first serial port and a readline monitor.
fn eve_console_sections(dir: &Path) -> String {
    std::fs::create_dir_all(dir.join("eve")).unwrap();
    format!(
        r#"[chardev "cons"]
  backend = "socket"
  path = "{}"
  server = "on"
  wait = "off"
  mux = "on"

[device "serial0"]
  driver = "isa-serial"
  chardev = "cons"

[mon "cons-mon"]
  chardev = "cons"
  mode = "readline"
"#,
        eve_console_socket(dir).display()
    )
}

/// A booted guest.
pub struct Guest {
    pub vm: Vm,
    /// The fixture directory it booted (its manifest names the kernel).
    pub fixture: &'static Path,
    /// What it was launched with, to relaunch it in the same directory.
    spec: VmSpec,
    _dir: Option<tempfile::TempDir>,
}

impl Guest {
    /// Boots `spec` and waits for the guest's ready marker on the console.
    pub async fn boot(spec: GuestSpec) -> Guest {
        let fx = spec.fixture();
        let (dir, state) = match &spec.state_dir {
            Some(state) => (None, state.clone()),
            None => {
                let dir = tempfile::Builder::new().prefix("acpimon-test").tempdir_in("/tmp").unwrap();
                let state = dir.path().to_path_buf();
                (Some(dir), state)
            }
        };
        let prepared = acpimon::launch::prepare_with(&state, "guest", &spec.ssdt, spec.extras).unwrap();
        let args = spec.qemu_args_in(&state);
        let wait_ready = spec.wait_ready && !spec.watched;
        // EVE resumes the VM once it is set up; a watched guest is left for its test to resume.
        let eve_cont = spec.eve_config && !spec.watched;
        let spec = VmSpec {
            program: qemu(),
            args,
            prepared,
            readconfig: spec.readconfig,
            leave_to_watch: spec.watched,
            console_chardev: None,
        };
        let vm = Vm::launch(spec.clone()).await.unwrap_or_else(|e| panic!("launch failed: {e}"));
        let guest = Guest { vm, fixture: fx, spec, _dir: dir };
        if eve_cont {
            guest.vm.qmp.execute(qapi::qmp::cont {}).await.expect("cont");
        }
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
        Heartbeat::new(self.vm.region.clone(), self.vm.prepared.descriptor.irq)
            .unwrap()
            .with_completion(self.vm.completion.clone())
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
                Beat::Acked { latency, record, request_no, .. } => {
                    assert_eq!(record.echo_request_no, request_no);
                    out.push(latency);
                }
                missed => panic!("heartbeat not acknowledged: {missed:?}"),
            }
        }
        out
    }
}

/// QEMU arguments for a virtio-blk drive `disk0` (the guest's `/dev/vda`, 4 MiB in `dir`)
/// whose writes fail on the host: QEMU's `blkdebug` driver returns EIO for every write
/// (`write_aio`), reads work; with `werror=stop,rerror=stop` QEMU stops the VM on the error
/// (`BLOCK_IO_ERROR`, then `STOP`; status `io-error`). QEMU 5.2, 7.2 and 10 take it alike.
/// The guest writes to it with `acpimon.disk_write=vda`.
pub fn failing_drive(dir: &Path) -> Vec<String> {
    let conf = dir.join("blkdebug.conf");
    std::fs::write(&conf, "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\n").unwrap();
    let image = dir.join("disk0.img");
    std::fs::File::create(&image).unwrap().set_len(4 << 20).unwrap();
    vec![
        "-drive".into(),
        format!(
            "if=none,id=disk0,format=raw,werror=stop,rerror=stop,file=blkdebug:{}:{}",
            conf.display(),
            image.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vdisk0".into(),
    ]
}

/// The next QMP event named `name` on `events` (subscribed before what raises it), within
/// `timeout`; panics naming the event otherwise.
pub async fn next_qmp_event(
    events: &mut tokio::sync::broadcast::Receiver<acpimon::trigger::qmp::QmpEvent>,
    name: &str,
    timeout: Duration,
) -> acpimon::trigger::qmp::QmpEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == name => return ev,
                Ok(_) => {}
                Err(e) => panic!("QMP events: {e}"),
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or_else(|_| panic!("no {name} within {timeout:?}"))
}
