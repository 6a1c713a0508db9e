//! The simulated machine: QEMU's run state, the guest's state, the AML's records, and what the
//! VM tells its QMP clients (events) and its console.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, watch, Notify};

use super::{PanicAction, SimState};
use acpimon::abi::Source;
use acpimon::generate::{PciSlot, TESTDEV_IRQ_PORT_BASE};
use acpimon::launch::Descriptor;
use acpimon::read::sim::SimulatedAml;
use acpimon::read::Region;

/// pc-testdev's 4-byte scratch register.
pub(super) const TESTDEV_REG_PORT: u16 = 0xe0;
/// Queued events per QMP client; a client further behind loses the oldest.
const EVENT_QUEUE: usize = 16;
/// Queued console writes; a client further behind loses the oldest.
const CONSOLE_QUEUE: usize = 8;

/// QEMU's run state (the subset a simulated VM reaches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Run {
    Running,
    Paused,
    /// Stopped by a panic with `-action panic=pause`.
    GuestPanicked,
    /// Reset while stopped: not yet running again.
    Prelaunch,
}

impl Run {
    pub(super) fn qapi(self) -> &'static str {
        match self {
            Run::Running => "running",
            Run::Paused => "paused",
            Run::GuestPanicked => "guest-panicked",
            Run::Prelaunch => "prelaunch",
        }
    }
}

/// What the guest kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Guest {
    Alive,
    Hung,
    Panicked(PanicAction),
}

struct Machine {
    run: Run,
    guest: Guest,
    aml: SimulatedAml,
    booted_at: Instant,
    /// The boot record is due as soon as the guest runs.
    boot_pending: bool,
    /// The GED's level-triggered IRQ line is raised and `_EVT` has not run yet.
    irq_high: bool,
    /// The ticket of the delayed `_EVT` under way, if any.
    scheduled: Option<u64>,
    tickets: u64,
    testdev_reg: u32,
    gone: bool,
}

impl Machine {
    fn answers(&self) -> bool {
        !self.gone && self.run == Run::Running && self.guest == Guest::Alive
    }

    /// AML `Timer`: 100 ns ticks since boot, modulo 2^32.
    fn timer_ticks(&self) -> u32 {
        (self.booted_at.elapsed().as_nanos() / 100) as u32
    }

    fn uptime(&self) -> Duration {
        self.booted_at.elapsed()
    }
}

/// Everything the VM's tasks share.
pub(super) struct Shared {
    descriptor: Descriptor,
    slot: PciSlot,
    bar: u32,
    latency: Duration,
    region: Region,
    machine: Mutex<Machine>,
    events: broadcast::Sender<Arc<str>>,
    console: broadcast::Sender<Arc<str>>,
    gone: watch::Sender<bool>,
    triggers: AtomicU64,
    runtime: Handle,
    /// The socket files this VM bound, with their inodes.
    sockets: Vec<(PathBuf, u64)>,
    /// Rings of the doorbell (when the descriptor has one) not yet sent, and their wake-up.
    pub(super) doorbell_pending: AtomicU64,
    pub(super) doorbell: Notify,
}

impl Shared {
    pub(super) fn new(
        descriptor: Descriptor,
        slot: PciSlot,
        region: Region,
        latency: Duration,
        sockets: Vec<(PathBuf, u64)>,
    ) -> Arc<Shared> {
        let bar = bar_for(descriptor.region_size);
        Arc::new(Shared {
            slot,
            bar,
            latency,
            region,
            machine: Mutex::new(Machine {
                run: Run::Running,
                guest: Guest::Alive,
                aml: SimulatedAml::boot(bar),
                booted_at: Instant::now(),
                boot_pending: false,
                irq_high: false,
                scheduled: None,
                tickets: 0,
                testdev_reg: 0,
                gone: false,
            }),
            events: broadcast::channel(EVENT_QUEUE).0,
            console: broadcast::channel(CONSOLE_QUEUE).0,
            gone: watch::channel(false).0,
            triggers: AtomicU64::new(0),
            runtime: Handle::current(),
            sockets,
            doorbell_pending: AtomicU64::new(0),
            doorbell: Notify::new(),
            descriptor,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    pub(super) fn slot(&self) -> PciSlot {
        self.slot
    }

    pub(super) fn bar(&self) -> u32 {
        self.bar
    }

    pub(super) fn region_size(&self) -> u32 {
        self.descriptor.region_size
    }

    pub(super) fn triggers(&self) -> u64 {
        self.triggers.load(Ordering::Relaxed)
    }

    /// Serialised events for one QMP client, from now on.
    pub(super) fn subscribe_events(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// Console output for one console client, from now on.
    pub(super) fn subscribe_console(&self) -> broadcast::Receiver<Arc<str>> {
        self.console.subscribe()
    }

    /// Becomes `true` once, when the VM is gone.
    pub(super) fn subscribe_gone(&self) -> watch::Receiver<bool> {
        self.gone.subscribe()
    }

    /// The first boot: `_INI`'s record.
    pub(super) fn power_on(self: &Arc<Self>) {
        let mut m = self.lock();
        m.boot_pending = true;
        self.settle(&mut m);
    }

    pub(super) fn state(&self) -> SimState {
        let m = self.lock();
        match (m.gone, m.guest, m.run) {
            (true, ..) => SimState::Gone,
            (_, Guest::Panicked(action), _) => SimState::Panicked(action),
            (_, _, Run::Paused | Run::Prelaunch | Run::GuestPanicked) => SimState::Paused,
            (_, Guest::Hung, _) => SimState::Hung,
            _ => SimState::Running,
        }
    }

    pub(super) fn run_status(&self) -> &'static str {
        self.lock().run.qapi()
    }

    pub(super) fn run_and_guest(&self) -> (Run, Guest) {
        let m = self.lock();
        (m.run, m.guest)
    }

    pub(super) fn set_state(self: &Arc<Self>, state: SimState) {
        let mut m = self.lock();
        if m.gone {
            return;
        }
        match state {
            SimState::Running => {
                m.guest = Guest::Alive;
                self.resume(&mut m);
            }
            SimState::Hung => m.guest = Guest::Hung,
            SimState::Paused => self.pause(&mut m),
            SimState::Panicked(action) => {
                if matches!(m.guest, Guest::Panicked(_)) {
                    return;
                }
                m.guest = Guest::Panicked(action);
                self.emit("GUEST_PANICKED", Some(json!({ "action": action.qapi() })));
                let up = m.uptime();
                self.print(&kernel_lines(
                    up,
                    &[
                        "Kernel panic - not syncing: sysrq triggered crash",
                        "CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0-sim #1",
                        "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
                    ],
                ));
                if action == PanicAction::Pause && m.run == Run::Running {
                    m.run = Run::GuestPanicked;
                    self.emit("STOP", None);
                }
            }
            SimState::Gone => self.go(&mut m),
        }
        self.settle(&mut m);
    }

    /// QMP `stop`.
    pub(super) fn stop_cmd(self: &Arc<Self>) {
        let mut m = self.lock();
        self.pause(&mut m);
    }

    /// QMP `cont`.
    pub(super) fn cont_cmd(self: &Arc<Self>) {
        let mut m = self.lock();
        self.resume(&mut m);
        self.settle(&mut m);
    }

    fn pause(&self, m: &mut Machine) {
        if m.run == Run::Running {
            m.run = Run::Paused;
            self.emit("STOP", None);
        }
    }

    fn resume(&self, m: &mut Machine) {
        if m.run != Run::Running {
            m.run = Run::Running;
            self.emit("RESUME", None);
        }
    }

    /// A reset: by the guest (`guest`) or by QMP `system_reset`. A stopped VM stays stopped
    /// (QEMU's `prelaunch`); the boot record comes when it runs.
    pub(super) fn reset(self: &Arc<Self>, guest: bool) {
        let mut m = self.lock();
        if m.gone {
            return;
        }
        let reason = if guest { "guest-reset" } else { "host-qmp-system-reset" };
        self.emit("RESET", Some(json!({ "guest": guest, "reason": reason })));
        m.guest = Guest::Alive;
        m.aml = SimulatedAml::boot(self.bar);
        m.booted_at = Instant::now();
        m.boot_pending = true;
        m.irq_high = false;
        m.scheduled = None;
        m.testdev_reg = 0;
        if m.run != Run::Running {
            m.run = Run::Prelaunch;
        }
        self.settle(&mut m);
    }

    /// QMP `quit`: `SHUTDOWN`, then gone.
    pub(super) fn quit(self: &Arc<Self>) {
        let mut m = self.lock();
        if !m.gone {
            self.emit("SHUTDOWN", Some(json!({ "guest": false, "reason": "host-qmp-quit" })));
            self.go(&mut m);
        }
    }

    /// QMP `inject-nmi`: a live kernel reports an unknown NMI on its console.
    pub(super) fn nmi(&self) {
        let m = self.lock();
        if m.answers() {
            self.print(&kernel_lines(
                m.uptime(),
                &[
                    "Uhhuh. NMI received for unknown reason 30 on CPU 0.",
                    "Dazed and confused, but trying to continue",
                ],
            ));
        }
    }

    fn go(&self, m: &mut Machine) {
        if m.gone {
            return;
        }
        m.gone = true;
        m.scheduled = None;
        // As QEMU does on exit: remove the socket files, but only the ones this VM bound.
        for (path, ino) in &self.sockets {
            if std::fs::symlink_metadata(path).is_ok_and(|md| md.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
        self.gone.send_replace(true);
    }

    /// HMP `o`: an I/O port write. pc-testdev's IRQ port for our GED raises (non-zero) or
    /// lowers the line.
    pub(super) fn ioport_write(self: &Arc<Self>, port: u16, value: u32) {
        let mut m = self.lock();
        if port == TESTDEV_IRQ_PORT_BASE + u16::from(self.descriptor.irq) {
            if value == 0 {
                m.irq_high = false;
                return;
            }
            self.triggers.fetch_add(1, Ordering::Relaxed);
            if !m.irq_high {
                m.irq_high = true;
                self.settle(&mut m);
            }
        } else if port == TESTDEV_REG_PORT {
            m.testdev_reg = value;
        }
    }

    /// HMP `i`: an I/O port read.
    pub(super) fn ioport_read(&self, port: u16) -> u32 {
        let m = self.lock();
        match port {
            TESTDEV_REG_PORT => m.testdev_reg,
            _ => 0,
        }
    }

    /// Whether the guest answers on its console, and its uptime.
    pub(super) fn console_uptime(&self) -> Option<Duration> {
        let m = self.lock();
        m.answers().then(|| m.uptime())
    }

    /// Runs what became possible: the boot record, then a pending GED event.
    fn settle(self: &Arc<Self>, m: &mut Machine) {
        if !m.answers() {
            return;
        }
        if m.boot_pending {
            m.boot_pending = false;
            m.aml.write_record(&self.region, Source::Boot, m.timer_ticks());
            self.print(&kernel_lines(
                Duration::ZERO,
                &["Linux version 6.1.0-sim (acpimon simulated guest)", "ACPI: SSDT AMON loaded"],
            ));
        }
        if m.irq_high && m.scheduled.is_none() {
            if self.latency.is_zero() {
                self.run_evt(m);
            } else {
                m.tickets += 1;
                let ticket = m.tickets;
                m.scheduled = Some(ticket);
                let shared = self.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep(shared.latency).await;
                    let mut m = shared.lock();
                    if m.scheduled == Some(ticket) {
                        m.scheduled = None;
                        if m.irq_high && m.answers() {
                            shared.run_evt(&mut m);
                        }
                    }
                });
            }
        }
    }

    /// `_EVT`: drop the line, write the record, ring the doorbell when the table has one.
    fn run_evt(&self, m: &mut Machine) {
        m.irq_high = false;
        m.aml.write_record(&self.region, Source::Ged, m.timer_ticks());
        if self.descriptor.doorbell.is_some() {
            self.doorbell_pending.fetch_add(1, Ordering::Relaxed);
            self.doorbell.notify_one();
        }
    }

    /// `_TMP`, when the thermal zone polls.
    fn poll_thermal(&self) {
        let mut m = self.lock();
        if m.answers() {
            let ticks = m.timer_ticks();
            m.aml.write_record(&self.region, Source::Thermal, ticks);
        }
    }

    /// Sends an event, QEMU-shaped, to every negotiated QMP client.
    fn emit(&self, name: &str, data: Option<Value>) {
        let _ = self.events.send(event_line(name, data, SystemTime::now()).into());
    }

    /// Sends a `DUMP_COMPLETED` event.
    pub(super) fn emit_dump_completed(&self, bytes: u64) {
        self.emit(
            "DUMP_COMPLETED",
            Some(json!({ "result": { "status": "completed", "completed": bytes, "total": bytes } })),
        );
    }

    /// Writes to the console client, if one is connected.
    fn print(&self, text: &str) {
        let _ = self.console.send(text.into());
    }
}

/// Linux polls `_TMP` every `_TZP`.
pub(super) async fn thermal_zone(shared: Arc<Shared>, period: Duration) {
    let mut gone = shared.subscribe_gone();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*gone.borrow_and_update() {
        tokio::select! {
            _ = tick.tick() => shared.poll_thermal(),
            _ = gone.changed() => {}
        }
    }
}

/// Where SeaBIOS would put a BAR of `size` bytes (a power of two) below the IOAPIC: 0xfebff000
/// for 4 KiB, as measured.
pub(super) fn bar_for(size: u32) -> u32 {
    (0xfec0_0000u32 - size) & !(size - 1)
}

/// One QMP event line: `{"event", ["data",] "timestamp"}`; QEMU leaves `data` out for events
/// without members.
pub(super) fn event_line(name: &str, data: Option<Value>, now: SystemTime) -> String {
    let t = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut event = json!({
        "event": name,
        "timestamp": { "seconds": t.as_secs(), "microseconds": t.subsec_micros() },
    });
    if let Some(data) = data {
        event["data"] = data;
    }
    let mut line = event.to_string();
    line.push('\n');
    line
}

/// Kernel log lines as the serial console shows them.
fn kernel_lines(uptime: Duration, lines: &[&str]) -> String {
    let t = uptime.as_secs_f64();
    lines.iter().map(|l| format!("[{t:12.6}] {l}\r\n")).collect()
}
