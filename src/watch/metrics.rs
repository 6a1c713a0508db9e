//! What the service knows of every VM, shown two ways: Prometheus text at `/metrics` and JSON
//! at `/status` (what `acpimon status` prints), both on one loopback HTTP listener.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::state::State;
use crate::forward::{ForwardStats, Forwarder};
use crate::util::lock;

/// Upper bounds (seconds) of the heartbeat latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// One scenario of one VM, as shown.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioView {
    pub name: String,
    pub kind: String,
    pub consecutive_misses: u32,
    pub threshold: u32,
    pub misses_total: u64,
    pub answers_total: u64,
    pub last_latency_ms: Option<f64>,
    pub last_detail: Option<String>,
    pub unavailable: Option<String>,
}

/// One VM, as shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub state: State,
    /// When it entered the state (RFC 3339).
    pub since: String,
    pub reason: String,
    pub scenarios: Vec<ScenarioView>,
    /// Seconds since the last fresh record was read from the region.
    pub last_record_age_s: Option<f64>,
    pub boot_count: Option<u32>,
    pub reboots: u64,
    pub diagnostics_ok: u64,
    pub diagnostics_failed: u64,
    pub last_bundle: Option<String>,
    /// The current incident's bundle: `queued` (waiting for one of the node's
    /// `[bundles] concurrent` slots) or `collecting`; `None` when none is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosing: Option<String>,
    /// The last bundle's verdict: why the last incident happened.
    #[serde(default)]
    pub last_verdict: Option<crate::verdict::Verdict>,
    pub recoveries: u64,
    pub recoveries_refused: u64,
    pub events: u64,
    pub events_not_spooled: u64,
    /// Channels that are not available and why.
    pub degraded: Vec<String>,
    /// How heartbeats learn of their records: `doorbell (SOCKET)` or `polling: WHY`.
    #[serde(default)]
    pub completion: Option<String>,
    /// Which channel carries the records and why (the region, or frames on the doorbell port
    /// when the guest cannot reach it), as QMP's `query-pci` placed BAR2.
    #[serde(default)]
    pub channel: Option<String>,
    /// The app's own word on its health (app channel or mailbox), and its details.
    pub app_status: Option<crate::abi::AppStatus>,
    pub app_details: Option<String>,
    /// The app's last `info` or `hello`.
    pub app_info: Option<serde_json::Value>,
    /// Lines received on the app channel, by what became of them.
    pub app_lines: Option<crate::app::LineCounts>,
    /// The guest kernel's reports, by class, wherever they were read.
    #[serde(default)]
    pub kernel_reports: BTreeMap<crate::sentinel::ReportClass, u64>,
    /// Of those, the ones read in the kernel log followed in guest memory (the rest were read
    /// on the console).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kernel_reports_from_memory: BTreeMap<crate::sentinel::ReportClass, u64>,
    /// Where the guest kernel's reports are read (the console, the kernel log followed in
    /// guest memory, or both); `None` before the VM was attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_log: Option<String>,
    /// The console's bytes, by what became of them (over all of the VM's QEMU lives since the
    /// service started); `None` before a console was connected.
    #[serde(default)]
    pub console: Option<crate::console::ConsoleCounts>,
    /// QMP `BLOCK_IO_ERROR`s of the VM's drives since the service started, by drive (at most
    /// 64 drives).
    #[serde(default)]
    pub block_io_errors: BTreeMap<String, u64>,
    #[serde(skip)]
    pub latency_buckets: [u64; LATENCY_BUCKETS.len()],
    #[serde(skip)]
    pub latency_count: u64,
    #[serde(skip)]
    pub latency_sum: f64,
    #[serde(skip)]
    pub last_record_at: Option<Instant>,
}

impl VmView {
    pub fn new(name: &str) -> VmView {
        VmView {
            name: name.into(),
            state: State::Starting,
            since: crate::units::now_rfc3339(),
            reason: "watching".into(),
            scenarios: Vec::new(),
            last_record_age_s: None,
            boot_count: None,
            reboots: 0,
            diagnostics_ok: 0,
            diagnostics_failed: 0,
            last_bundle: None,
            diagnosing: None,
            last_verdict: None,
            recoveries: 0,
            recoveries_refused: 0,
            events: 0,
            events_not_spooled: 0,
            degraded: Vec::new(),
            completion: None,
            channel: None,
            app_status: None,
            app_details: None,
            app_info: None,
            app_lines: None,
            kernel_reports: BTreeMap::new(),
            kernel_reports_from_memory: BTreeMap::new(),
            kernel_log: None,
            console: None,
            block_io_errors: BTreeMap::new(),
            latency_buckets: [0; LATENCY_BUCKETS.len()],
            latency_count: 0,
            latency_sum: 0.0,
            last_record_at: None,
        }
    }

    pub fn observe_latency(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *le {
                self.latency_buckets[i] += 1;
            }
        }
        self.latency_count += 1;
        self.latency_sum += s;
    }
}

/// The whole service, as `/status` returns it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub started: String,
    pub state_dir: String,
    pub vms: Vec<VmView>,
    pub forward: ForwardStats,
    /// Internal loops that are late, if any.
    pub stalled: Vec<String>,
}

/// Shared by every monitor (writers) and the HTTP endpoint (reader).
pub struct Registry {
    vms: Mutex<BTreeMap<String, Arc<Mutex<VmView>>>>,
    pub node: String,
    pub state_dir: String,
    started: SystemTime,
    forward: Forwarder,
    liveness: Arc<super::liveness::Liveness>,
    /// The host sampler, for the vCPU threads' CPU.
    sampler: Option<Arc<crate::host::sampler::Sampler>>,
}

impl Registry {
    pub fn new(
        node: String,
        state_dir: String,
        forward: Forwarder,
        liveness: Arc<super::liveness::Liveness>,
    ) -> Registry {
        Registry {
            vms: Mutex::default(),
            node,
            state_dir,
            started: SystemTime::now(),
            forward,
            liveness,
            sampler: None,
        }
    }

    /// Exports the vCPU threads' CPU as the host sampler reads it.
    pub fn with_sampler(mut self, sampler: Arc<crate::host::sampler::Sampler>) -> Registry {
        self.sampler = Some(sampler);
        self
    }

    /// The view of VM `name`, created on first use.
    pub fn vm(&self, name: &str) -> Arc<Mutex<VmView>> {
        lock(&self.vms).entry(name.into()).or_insert_with(|| Arc::new(Mutex::new(VmView::new(name)))).clone()
    }

    pub fn remove(&self, name: &str) {
        lock(&self.vms).remove(name);
    }

    pub fn status(&self) -> StatusView {
        let now = Instant::now();
        let vms = lock(&self.vms)
            .values()
            .map(|v| {
                let mut v = lock(v).clone();
                v.last_record_age_s = v.last_record_at.map(|t| now.duration_since(t).as_secs_f64());
                v
            })
            .collect();
        StatusView {
            node: self.node.clone(),
            started: crate::units::rfc3339(self.started),
            state_dir: self.state_dir.clone(),
            vms,
            forward: self.forward.stats(),
            stalled: self.liveness.stalled(),
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self) -> String {
        let mut text = render(&self.status());
        let vcpus = self.sampler.as_ref().map(|s| s.vcpu_metrics()).unwrap_or_default();
        render_vcpus(&mut text, &vcpus);
        text
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The status's views keep the histogram too (serde skips it only for `/status`).
fn render(status: &StatusView) -> String {
    let full = status.vms.as_slice();
    let mut o = String::with_capacity(1024 + 2048 * full.len());
    header(&mut o, "acpimon_vms", "gauge", "VMs being watched.");
    let _ = writeln!(o, "acpimon_vms {}", full.len());
    header(&mut o, "acpimon_vm_state", "gauge", "1 for the state each VM is in, 0 for the others.");
    for v in full {
        for s in State::ALL {
            let _ = writeln!(
                o,
                "acpimon_vm_state{{vm=\"{}\",state=\"{s}\"}} {}",
                esc(&v.name),
                u8::from(v.state == s)
            );
        }
    }
    header(
        &mut o,
        "acpimon_heartbeat_latency_seconds",
        "histogram",
        "ACPI heartbeat trigger-to-record time.",
    );
    for v in full {
        let vm = esc(&v.name);
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "acpimon_heartbeat_latency_seconds_bucket{{vm=\"{vm}\",le=\"{le}\"}} {}",
                v.latency_buckets[i]
            );
        }
        let _ = writeln!(
            o,
            "acpimon_heartbeat_latency_seconds_bucket{{vm=\"{vm}\",le=\"+Inf\"}} {}",
            v.latency_count
        );
        let _ = writeln!(o, "acpimon_heartbeat_latency_seconds_sum{{vm=\"{vm}\"}} {}", v.latency_sum);
        let _ = writeln!(o, "acpimon_heartbeat_latency_seconds_count{{vm=\"{vm}\"}} {}", v.latency_count);
    }
    header(&mut o, "acpimon_scenario_misses_total", "counter", "Probes that missed.");
    scenario_lines(&mut o, full, "acpimon_scenario_misses_total", |s| s.misses_total as f64);
    header(&mut o, "acpimon_scenario_answers_total", "counter", "Probes that answered.");
    scenario_lines(&mut o, full, "acpimon_scenario_answers_total", |s| s.answers_total as f64);
    header(
        &mut o,
        "acpimon_scenario_consecutive_misses",
        "gauge",
        "Misses in a row (the threshold counts these).",
    );
    scenario_lines(&mut o, full, "acpimon_scenario_consecutive_misses", |s| f64::from(s.consecutive_misses));
    header(&mut o, "acpimon_scenario_available", "gauge", "1 if the scenario can run for the VM.");
    scenario_lines(&mut o, full, "acpimon_scenario_available", |s| {
        if s.unavailable.is_none() {
            1.0
        } else {
            0.0
        }
    });
    header(
        &mut o,
        "acpimon_last_record_age_seconds",
        "gauge",
        "Time since the region last had a new record.",
    );
    for v in full {
        if let Some(a) = v.last_record_age_s {
            let _ = writeln!(o, "acpimon_last_record_age_seconds{{vm=\"{}\"}} {a:.3}", esc(&v.name));
        }
    }
    type Counter = (&'static str, &'static str, fn(&VmView) -> u64);
    let counters: [Counter; 5] = [
        ("acpimon_reboots_total", "Guest reboots seen.", |v| v.reboots),
        ("acpimon_diagnostics_total", "Diagnostic bundles written.", |v| v.diagnostics_ok),
        ("acpimon_diagnostics_failed_total", "Diagnostic runs that could not write a bundle.", |v| {
            v.diagnostics_failed
        }),
        ("acpimon_recoveries_total", "Recovery actions taken.", |v| v.recoveries),
        ("acpimon_recoveries_refused_total", "Recovery actions refused by the rate limit.", |v| {
            v.recoveries_refused
        }),
    ];
    for (name, help, get) in counters {
        header(&mut o, name, "counter", help);
        for v in full {
            let _ = writeln!(o, "{name}{{vm=\"{}\"}} {}", esc(&v.name), get(v));
        }
    }
    let f = &status.forward;
    let forward: [(&str, &str, &str, u64); 13] = [
        ("acpimon_forward_delivered_total", "counter", "Events the controller acknowledged.", f.delivered),
        (
            "acpimon_forward_duplicates_total",
            "counter",
            "Deliveries the controller already had.",
            f.duplicates_acknowledged,
        ),
        (
            "acpimon_forward_failed_attempts_total",
            "counter",
            "Delivery attempts that failed.",
            f.attempts_failed,
        ),
        ("acpimon_forward_pending_events", "gauge", "Events in the spool.", f.pending_events as u64),
        ("acpimon_forward_pending_bytes", "gauge", "Bytes in the spool.", f.pending_bytes),
        (
            "acpimon_forward_rejected_full_total",
            "counter",
            "Events refused because the spool was full.",
            f.rejected_full,
        ),
        (
            "acpimon_forward_hook_failures_total",
            "counter",
            "Analyzer hook runs that failed.",
            f.hook_failures,
        ),
        (
            "acpimon_forward_events_logged_total",
            "counter",
            "Events written and fsynced to the event log (acknowledged).",
            f.events_logged,
        ),
        (
            "acpimon_forward_write_failures_total",
            "counter",
            "Writes of the event log, spool or state files that failed.",
            f.write_failures,
        ),
        (
            "acpimon_forward_held_events",
            "gauge",
            "Accepted events held in memory because the disk refuses writes.",
            f.held_events as u64,
        ),
        ("acpimon_forward_held_bytes", "gauge", "Bytes of the events held in memory.", f.held_bytes),
        (
            "acpimon_forward_events_lost_total",
            "counter",
            "Accepted events dropped: the disk refused writes and the hold was full.",
            f.events_lost,
        ),
        (
            "acpimon_disk_full",
            "gauge",
            "1 while the disk refuses the service's writes (events held or lost).",
            u64::from(f.disk_problem.is_some()),
        ),
    ];
    for (name, kind, help, value) in forward {
        header(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {value}");
    }
    header(
        &mut o,
        "acpimon_app_lines_total",
        "counter",
        "Lines received on the app channel, by what became of them.",
    );
    for v in full {
        if let Some(c) = &v.app_lines {
            let vm = esc(&v.name);
            for (what, n) in [
                ("accepted", c.accepted),
                ("oversized", c.oversized),
                ("rate-limited", c.rate_limited),
                ("malformed", c.malformed),
                ("unsupported", c.unsupported),
                ("unknown-type", c.unknown_type),
            ] {
                let _ = writeln!(o, "acpimon_app_lines_total{{vm=\"{vm}\",what=\"{what}\"}} {n}");
            }
        }
    }
    header(
        &mut o,
        "acpimon_kernel_reports_total",
        "counter",
        "The guest kernel's own fault reports, by class and where they were read (console, or the kernel log in guest memory).",
    );
    for v in full {
        let vm = esc(&v.name);
        for class in crate::sentinel::ReportClass::ALL {
            let all = v.kernel_reports.get(&class).copied().unwrap_or(0);
            let memory = v.kernel_reports_from_memory.get(&class).copied().unwrap_or(0).min(all);
            for (source, n) in [("console", all - memory), ("memory", memory)] {
                let _ = writeln!(
                    o,
                    "acpimon_kernel_reports_total{{vm=\"{vm}\",class=\"{class}\",source=\"{source}\"}} {n}"
                );
            }
        }
    }
    header(
        &mut o,
        "acpimon_console_bytes_total",
        "counter",
        "Bytes the guest printed on its console, by what became of them (dropped: over the console budget).",
    );
    for v in full {
        if let Some(c) = &v.console {
            let vm = esc(&v.name);
            for (what, n) in [("received", c.received), ("kept", c.kept), ("dropped", c.dropped)] {
                let _ = writeln!(o, "acpimon_console_bytes_total{{vm=\"{vm}\",what=\"{what}\"}} {n}");
            }
        }
    }
    header(&mut o, "acpimon_console_reads_total", "counter", "Reads of the console's socket.");
    for v in full {
        if let Some(c) = &v.console {
            let _ = writeln!(o, "acpimon_console_reads_total{{vm=\"{}\"}} {}", esc(&v.name), c.reads);
        }
    }
    header(
        &mut o,
        "acpimon_block_io_errors_total",
        "counter",
        "I/O errors QEMU reported of the VM's drives (QMP BLOCK_IO_ERROR), by drive.",
    );
    for v in full {
        let vm = esc(&v.name);
        for (device, n) in &v.block_io_errors {
            let _ =
                writeln!(o, "acpimon_block_io_errors_total{{vm=\"{vm}\",device=\"{}\"}} {n}", esc(device));
        }
    }
    header(&mut o, "acpimon_stalled_loops", "gauge", "Internal loops that are late.");
    let _ = writeln!(o, "acpimon_stalled_loops {}", status.stalled.len());
    o
}

/// The vCPU threads' CPU, from the host sampler (a thread several vCPUs share is one series).
fn render_vcpus(o: &mut String, vcpus: &[crate::host::sampler::VcpuMetric]) {
    header(
        o,
        "acpimon_vcpu_cpu_seconds_total",
        "counter",
        "CPU time of each vCPU's host thread (utime + stime).",
    );
    for m in vcpus {
        let _ = writeln!(
            o,
            "acpimon_vcpu_cpu_seconds_total{{vm=\"{}\",vcpu=\"{}\"}} {:.3}",
            esc(&m.vm),
            m.cpu,
            m.cpu_seconds
        );
    }
    header(
        o,
        "acpimon_vcpu_busy_ratio",
        "gauge",
        "Share of one host CPU each vCPU's thread used over the last 10 s (1 = always running).",
    );
    for m in vcpus {
        if let Some(b) = m.busy {
            let _ = writeln!(o, "acpimon_vcpu_busy_ratio{{vm=\"{}\",vcpu=\"{}\"}} {b}", esc(&m.vm), m.cpu);
        }
    }
}

fn scenario_lines(o: &mut String, full: &[VmView], name: &str, get: impl Fn(&ScenarioView) -> f64) {
    for v in full {
        for s in &v.scenarios {
            let _ = writeln!(
                o,
                "{name}{{vm=\"{}\",scenario=\"{}\",kind=\"{}\"}} {}",
                esc(&v.name),
                esc(&s.name),
                s.kind,
                get(s)
            );
        }
    }
}

/// Serves `/metrics`, `/status` and `/healthz` until `shutdown`, on the shared server (its
/// timeouts and limits: [`crate::util::http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let handler = move |req| respond(req, registry.clone());
    crate::util::http::serve(listener, "metrics endpoint", handler, shutdown).await;
}

async fn respond(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Ok(Response::builder()
            .status(code)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts"))
    };
    if req.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let registry = registry.clone();
            let text = tokio::task::spawn_blocking(move || registry.prometheus()).await.unwrap_or_default();
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/status" => {
            let body = serde_json::to_string_pretty(&registry.status()).expect("status serialises");
            reply(StatusCode::OK, "application/json", body)
        }
        "/healthz" => {
            let mut problems = Vec::new();
            let stalled = registry.liveness.stalled();
            if !stalled.is_empty() {
                problems.push(format!("stalled: {}", stalled.join(", ")));
            }
            // Not healthy while events are held in memory (or lost) because the disk refuses them.
            problems.extend(registry.forward.stats().disk_condition());
            if problems.is_empty() {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{}\n", problems.join("\n")))
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /status or /healthz\n".into()),
    }
}

/// Binds the endpoint, with an error that says what to change.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} for metrics and status: {e}; set [metrics] listen to a free address, or \"\" to turn it off")
    })
}

/// `GET /status` from a running service at `addr` (what `acpimon status` shows).
pub async fn fetch_status(addr: SocketAddr, timeout: Duration) -> Result<StatusView, String> {
    let not_running = |e: &dyn std::fmt::Display| {
        format!(
            "no acpimon watch answers on {addr} ({e}); start it, or pass the address it listens on with --addr \
             or its --config"
        )
    };
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| not_running(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| not_running(&e))?;
        tokio::spawn(conn);
        let req = Request::get("/status")
            .header("host", addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("static request parts");
        let resp = sender.send_request(req).await.map_err(|e| not_running(&e))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("{addr} answered {} to GET /status; is it acpimon watch?", resp.status()));
        }
        let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(resp.into_body(), 64 << 20))
            .await
            .map_err(|e| format!("reading the status from {addr}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{addr} sent a status acpimon cannot read: {e}"))
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| not_running(&"no answer in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentinel::ReportClass;

    #[test]
    fn kernel_reports_are_counted_per_vm_and_class() {
        let mut vm = VmView::new("web");
        vm.kernel_reports.insert(ReportClass::SoftLockup, 3);
        vm.kernel_reports_from_memory.insert(ReportClass::SoftLockup, 1);
        vm.block_io_errors.insert("disk\"0".into(), 7);
        let status = StatusView {
            node: "n".into(),
            started: "s".into(),
            state_dir: "/d".into(),
            vms: vec![vm],
            forward: ForwardStats::default(),
            stalled: vec![],
        };
        let text = render(&status);
        assert!(
            text.contains(
                "acpimon_kernel_reports_total{vm=\"web\",class=\"soft-lockup\",source=\"console\"} 2\n\
                 acpimon_kernel_reports_total{vm=\"web\",class=\"soft-lockup\",source=\"memory\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("acpimon_kernel_reports_total{vm=\"web\",class=\"panic\",source=\"console\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE acpimon_block_io_errors_total counter\n"), "{text}");
        assert!(
            text.contains("acpimon_block_io_errors_total{vm=\"web\",device=\"disk\\\"0\"} 7\n"),
            "{text}"
        );
        // And /status says the same, by class name.
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["vms"][0]["kernel_reports"]["soft-lockup"], 3);
        assert_eq!(json["vms"][0]["kernel_reports_from_memory"]["soft-lockup"], 1);
    }

    #[test]
    fn vcpu_lines_follow_their_help_and_type() {
        use crate::host::sampler::VcpuMetric;
        let mut text = String::new();
        let m = |vm: &str, cpu, busy| VcpuMetric { vm: vm.into(), cpu, cpu_seconds: 12.3456, busy };
        render_vcpus(&mut text, &[m("web", 0, Some(0.97)), m("a\"b", 1, None)]);
        assert_eq!(
            text,
            "# HELP acpimon_vcpu_cpu_seconds_total CPU time of each vCPU's host thread (utime + stime).\n\
             # TYPE acpimon_vcpu_cpu_seconds_total counter\n\
             acpimon_vcpu_cpu_seconds_total{vm=\"web\",vcpu=\"0\"} 12.346\n\
             acpimon_vcpu_cpu_seconds_total{vm=\"a\\\"b\",vcpu=\"1\"} 12.346\n\
             # HELP acpimon_vcpu_busy_ratio Share of one host CPU each vCPU's thread used over the last 10 s (1 = always running).\n\
             # TYPE acpimon_vcpu_busy_ratio gauge\n\
             acpimon_vcpu_busy_ratio{vm=\"web\",vcpu=\"0\"} 0.97\n"
        );
        // No VM watched: the families are still declared, with no samples.
        let mut empty = String::new();
        render_vcpus(&mut empty, &[]);
        assert_eq!(empty.lines().filter(|l| !l.starts_with('#')).count(), 0);
    }
}
