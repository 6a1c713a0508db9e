//! `acpimon watch` and `acpimon controller` under test, as the real binary in child processes
//! (so a test can kill one with SIGKILL and start it again), with helpers that wait for what
//! they report: states from `/status`, events from the JSON-lines log, deliveries from the
//! controller's store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Tests read events as JSON, kind and fields as sent; every logged line must also read as a
// typed event (checked in `Service::events`).
use acpimon::event::RawEvent as Event;
use acpimon::watch::metrics::{StatusView, VmView};
use acpimon::watch::state::State;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_acpimon"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("the acpimon binary starts")
}

/// `acpimon watch` with a configuration file.
pub struct Service {
    child: Option<Child>,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// The current run's output; each start gets its own file.
    pub log: PathBuf,
    work: PathBuf,
    starts: usize,
    env: Vec<(String, String)>,
}

impl Service {
    /// Writes `config` (TOML, without `[metrics]`, `state_dir` and `data_dir`, which this adds)
    /// and starts the service; returns once `/status` answers.
    pub async fn start(state_dir: &Path, work: &Path, config: &str) -> Service {
        Service::start_with_env(state_dir, work, config, &[]).await
    }

    /// [`Service::start`] with more environment variables (e.g. systemd's).
    pub async fn start_with_env(
        state_dir: &Path,
        work: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> Service {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let data_dir = work.join("data");
        let text = format!(
            "state_dir = {:?}\ndata_dir = {:?}\ndiscover_interval = \"500ms\"\n{config}\n[metrics]\nlisten = \"{addr}\"\n",
            state_dir.display().to_string(),
            data_dir.display().to_string()
        );
        let config_path = work.join("watch.toml");
        std::fs::write(&config_path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Service {
            child: None,
            config_path,
            addr,
            data_dir,
            log: PathBuf::new(),
            work: work.into(),
            starts: 0,
            env,
        };
        s.restart().await;
        s
    }

    /// Starts the (stopped or killed) service again, appending to its log.
    pub async fn restart(&mut self) {
        self.starts += 1;
        self.log = self.work.join(format!("watch-{}.log", self.starts));
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.child = Some(spawn(&["watch", "--config", self.config_path.to_str().unwrap()], &self.log, &env));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_status().await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("acpimon watch exited ({status}): {}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("acpimon watch did not answer /status within 20 s: {}", self.log_text());
    }

    /// The running service's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_child(&c);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM sent");
        c.wait().unwrap()
    }

    pub async fn try_status(&self) -> Result<StatusView, String> {
        acpimon::watch::metrics::fetch_status(self.addr, Duration::from_secs(5)).await
    }

    pub async fn status(&self) -> StatusView {
        self.try_status().await.unwrap_or_else(|e| panic!("{e}\n{}", self.log_text()))
    }

    pub async fn vm(&self, name: &str) -> Option<VmView> {
        self.status().await.vms.into_iter().find(|v| v.name == name)
    }

    /// Waits until VM `name` is in `state`; returns its view and how long that took.
    pub async fn wait_state(&self, name: &str, state: State, timeout: Duration) -> (VmView, Duration) {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < timeout {
            if let Some(v) = self.vm(name).await {
                if v.state == state {
                    return (v, start.elapsed());
                }
                last = Some(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} not {state} within {timeout:?}; last seen {last:#?}\nlog:\n{}", self.log_text());
    }

    /// How many transitions of VM `name` to `state` the log holds.
    pub fn transitions_to(&self, name: &str, state: State) -> usize {
        self.events().iter().filter(|e| e.vm.as_deref() == Some(name) && is_transition(e, state)).count()
    }

    /// Waits for transition number `seen + 1` of VM `name` to `state` (`seen` from
    /// `transitions_to` before the action): for states a VM may pass through between two polls
    /// of `/status` (recovered lasts until the next answer, sometimes 50 ms).
    pub async fn wait_transition(&self, name: &str, state: State, seen: usize, timeout: Duration) -> Event {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let mut to = self
                .events()
                .into_iter()
                .filter(|e| e.vm.as_deref() == Some(name) && is_transition(e, state));
            if let Some(e) = to.nth(seen) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} did not become {state} within {timeout:?}\nlog:\n{}", self.log_text());
    }

    /// Every event in the JSON-lines log, each checked to be a typed event. A last line without
    /// its newline is one the service is still writing (a long event, e.g. a kernel report with
    /// its trace, may take more than one write): it is left for the next read.
    pub fn events(&self) -> Vec<Event> {
        let mut text = std::fs::read_to_string(self.data_dir.join("events.jsonl")).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text.lines()
            .map(|l| {
                if let Err(e) = serde_json::from_str::<acpimon::event::Event>(l) {
                    panic!("logged event is not a typed event ({e}): {l}");
                }
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}"))
            })
            .collect()
    }

    /// Waits for the first event satisfying `pred`.
    pub async fn wait_event(&self, what: &str, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {what} event within {timeout:?}; events: {:#?}\nlog:\n{}", self.events(), self.log_text());
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the service on `g`'s state directory and, once it has attached (so it has the
/// console from the first line), lets the guest, created paused (`-S`, as EVE launches), run.
pub async fn watch_guest(g: &super::guest::Guest, work: &Path, config: &str) -> Service {
    let svc = Service::start(g.vm.prepared.dir.parent().unwrap(), work, config).await;
    svc.wait_state("guest", State::Paused, Duration::from_secs(30)).await;
    g.vm.qmp.execute_within(qapi::qmp::cont {}, Duration::from_secs(5)).await.unwrap();
    svc
}

/// A transition event to `to`.
pub fn is_transition(e: &Event, to: State) -> bool {
    e.kind == "transition" && e.detail["to"] == serde_json::to_value(to).unwrap()
}

/// `acpimon controller`.
pub struct Controller {
    child: Child,
    pub addr: SocketAddr,
    pub store: PathBuf,
    log: PathBuf,
}

impl Controller {
    pub async fn start(port: u16, store: &Path) -> Controller {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = store.with_extension("log");
        let child = spawn(
            &["controller", "--listen", &addr.to_string(), "--store", store.to_str().unwrap()],
            &log,
            &[],
        );
        let c = Controller { child, addr, store: store.into(), log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the controller did not listen on {addr}: {:?}",
                std::fs::read_to_string(&c.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c
    }

    /// The events stored, one per key, in arrival order (`GET /v1/events`; a short blocking
    /// exchange with the local controller).
    pub fn events(&self) -> Vec<Event> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr).expect("the controller answers");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "GET /v1/events: {head}\n{body}");
        serde_json::from_str(body).expect("a JSON list of events")
    }

    /// Waits until the store holds every key in `keys`.
    pub async fn wait_keys(&self, keys: &[String], timeout: Duration) {
        let start = Instant::now();
        loop {
            let have: std::collections::BTreeSet<String> = self.events().into_iter().map(|e| e.key).collect();
            let missing: Vec<&String> = keys.iter().filter(|k| !have.contains(*k)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "the controller lacks {} events after {timeout:?}: {missing:?}",
                missing.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bundle event's manifest step called `name`.
pub fn step<'a>(manifest: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    manifest["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {manifest:#}"))
}

/// The text of a bundle step's file.
pub fn step_file(bundle: &Event, name: &str) -> String {
    let dir = PathBuf::from(bundle.detail["bundle"].as_str().expect("bundle path"));
    let s = step(&bundle.detail["manifest"], name);
    let file = s["file"].as_str().unwrap_or_else(|| panic!("step {name} has no file: {s:#}"));
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// A plain HTTP GET of `path` on `addr`: the whole response, head and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Sends `sig` to process `pid` (QEMU, to stop or continue it as a host would).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("signal sent");
}
