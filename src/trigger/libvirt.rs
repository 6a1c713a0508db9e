//! QMP through libvirt (cargo feature `libvirt`): for a domain libvirt manages, [`connect`]
//! gives the same [`Qmp`] a Unix socket gives, so nothing above it knows the difference.
//!
//! A bridge task speaks QMP's lines on one end of an in-memory pipe: it sends a greeting with
//! the hypervisor's version, runs each command through libvirt's monitor passthrough
//! (`virDomainQemuMonitorCommand`, on libvirt's own monitor connection), and writes QEMU's
//! events as libvirt relays them (`virConnectDomainQemuMonitorEventRegister`: every QMP event,
//! as QEMU sent it: STOP, RESUME, GUEST_PANICKED, SHUTDOWN, ...). When the domain stops running
//! the pipe closes, as QEMU's socket would.

use std::ffi::{c_char, c_int, c_longlong, c_uint, c_void, CStr};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::domain::Domain;

use super::qmp::{Qmp, QmpError};

/// How often the bridge asks libvirt whether the domain still runs.
const ACTIVE_POLL: Duration = Duration::from_secs(1);

fn failed(what: String) -> QmpError {
    QmpError::Io(std::io::Error::other(what))
}

/// libvirt delivers events from its event loop, which must be registered before the first
/// connection is opened and then run on a thread of its own.
fn event_loop() -> Result<(), QmpError> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!("libvirt's event loop: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| failed(format!("cannot start libvirt's event loop: {e}")))
}

/// The running domain `domain` (a name or a UUID) on `uri`, as a QMP session.
pub async fn connect(uri: &str, domain: &str) -> Result<Qmp, QmpError> {
    event_loop()?;
    let (uri, name) = (uri.to_string(), domain.to_string());
    let opened = tokio::task::spawn_blocking(move || open(&uri, &name))
        .await
        .map_err(|e| failed(format!("libvirt connection task failed: {e}")))??;
    let peer = format!("libvirt domain {domain}");
    let (client, bridge) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(client);
    let pid = opened.pid;
    tokio::spawn(run_bridge(opened, bridge));
    let mut qmp = Qmp::over(read, write, Path::new(&peer)).await?;
    qmp.pid = pid;
    qmp.libvirt_managed = true;
    Ok(qmp)
}

/// The QEMU process of a domain of the system instance, from the pid file libvirt keeps for
/// it, when readable from here and naming that domain's QEMU (`-name guest=NAME,...`): the
/// host-side evidence reads its threads. None for a session instance or another pid namespace.
fn domain_pid(uri: &str, name: &str) -> Option<u32> {
    if !uri.ends_with(":///system") || name.contains('/') {
        return None;
    }
    let text = crate::util::fs::read_capped(Path::new(&format!("/run/libvirt/qemu/{name}.pid")), 64).ok()?;
    let pid: u32 = String::from_utf8_lossy(&text).trim().parse().ok()?;
    let cmdline = crate::util::fs::read_capped(Path::new(&format!("/proc/{pid}/cmdline")), 64 << 10).ok()?;
    let ours = cmdline
        .split(|&b| b == 0)
        .any(|arg| String::from_utf8_lossy(arg).split(',').any(|part| part == format!("guest={name}")));
    ours.then_some(pid)
}

struct Opened {
    /// The domain's QEMU process, when visible ([`domain_pid`]).
    pid: Option<u32>,
    conn: Arc<Connect>,
    dom: Arc<Domain>,
    version: u32,
    events: mpsc::UnboundedReceiver<Value>,
    callback: c_int,
}

fn open(uri: &str, domain: &str) -> Result<Opened, QmpError> {
    let conn = Connect::open(Some(uri))
        .map_err(|e| failed(format!("cannot connect to libvirt at {uri}: {e}; is libvirtd running?")))?;
    let dom = Domain::lookup_by_name(&conn, domain)
        .or_else(|_| Domain::lookup_by_uuid_string(&conn, domain))
        .map_err(|e| failed(format!("no libvirt domain named {domain} at {uri}: {e}")))?;
    if !dom.is_active().unwrap_or(false) {
        return Err(failed(format!("libvirt domain {domain} is not running")));
    }
    let version = conn.get_hyp_version().map_err(|e| failed(format!("libvirt hypervisor version: {e}")))?;
    let (tx, events) = mpsc::unbounded_channel::<Value>();
    let opaque = Box::into_raw(Box::new(tx)).cast::<c_void>();
    // SAFETY: `conn` and `dom` are live libvirt objects; `on_event` and `free_sender` match the
    // callback types libvirt declares; `opaque` is a leaked Box that only `free_sender`
    // reclaims, which libvirt calls once when the callback is deregistered (or registration
    // fails, below, where libvirt does not call it).
    let callback = unsafe {
        virt::sys::virConnectDomainQemuMonitorEventRegister(
            conn.as_ptr(),
            dom.as_ptr(),
            std::ptr::null(),
            Some(on_event),
            opaque,
            Some(free_sender),
            0,
        )
    };
    if callback < 0 {
        // SAFETY: registration failed, so libvirt holds no copy of `opaque`.
        unsafe { free_sender(opaque) };
        return Err(failed(format!("libvirt refused QEMU monitor events for {domain}")));
    }
    let pid = dom.get_name().ok().and_then(|name| domain_pid(uri, &name));
    Ok(Opened { pid, conn: Arc::new(conn), dom: Arc::new(dom), version, events, callback })
}

/// Called by libvirt's event loop thread for each QMP event of the domain.
unsafe extern "C" fn on_event(
    _conn: virt::sys::virConnectPtr,
    _dom: virt::sys::virDomainPtr,
    event: *const c_char,
    seconds: c_longlong,
    micros: c_uint,
    details: *const c_char,
    opaque: *mut c_void,
) {
    if event.is_null() || opaque.is_null() {
        return;
    }
    // SAFETY: libvirt passes a NUL-terminated event name valid during this call.
    let name = unsafe { CStr::from_ptr(event) }.to_string_lossy().into_owned();
    let data = if details.is_null() {
        Value::Null
    } else {
        // SAFETY: as `event`: NUL-terminated, valid during the call.
        let text = unsafe { CStr::from_ptr(details) }.to_string_lossy();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    };
    let mut ev = json!({ "event": name, "timestamp": { "seconds": seconds, "microseconds": micros } });
    if !data.is_null() {
        ev["data"] = data;
    }
    // SAFETY: `opaque` is the sender boxed in `open`, alive until `free_sender`.
    let tx = unsafe { &*opaque.cast::<mpsc::UnboundedSender<Value>>() };
    let _ = tx.send(ev);
}

/// libvirt's free callback for `opaque`.
unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: `opaque` came from `Box::into_raw` in `open` and is freed only here, once.
        drop(unsafe { Box::from_raw(opaque.cast::<mpsc::UnboundedSender<Value>>()) });
    }
}

/// Serves one QMP session on `pipe` until the session or the domain ends.
async fn run_bridge(mut o: Opened, pipe: tokio::io::DuplexStream) {
    let (read, mut write) = tokio::io::split(pipe);
    let mut lines = BufReader::new(read).lines();
    let (major, minor, micro) = (o.version / 1_000_000, o.version / 1000 % 1000, o.version % 1000);
    let greeting = json!({ "QMP": {
        "version": { "qemu": { "major": major, "minor": minor, "micro": micro }, "package": "" },
        "capabilities": []
    }});
    let mut out = vec![greeting];
    let (replies_tx, mut replies) = mpsc::unbounded_channel::<Value>();
    let mut poll = tokio::time::interval(ACTIVE_POLL);
    'session: loop {
        for msg in out.drain(..) {
            let mut line = msg.to_string();
            line.push('\n');
            if write.write_all(line.as_bytes()).await.is_err() {
                break 'session;
            }
        }
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Some(reply) = command(&o.dom, &line, &replies_tx) {
                        out.push(reply);
                    }
                }
                _ => break,
            },
            Some(reply) = replies.recv() => out.push(reply),
            Some(ev) = o.events.recv() => out.push(ev),
            _ = poll.tick() => {
                let dom = o.dom.clone();
                let active = tokio::task::spawn_blocking(move || dom.is_active().unwrap_or(false)).await;
                if !matches!(active, Ok(true)) {
                    break;
                }
            }
        }
    }
    let (conn, callback) = (o.conn.clone(), o.callback);
    let _ = tokio::task::spawn_blocking(move || {
        // SAFETY: `callback` is the id `open` registered on this connection, deregistered once.
        unsafe { virt::sys::virConnectDomainQemuMonitorEventDeregister(conn.as_ptr(), callback) };
    })
    .await;
}

/// One command line from the client: answered at once (`qmp_capabilities`: libvirt negotiated
/// them on its own connection) or run through the passthrough, its reply sent to `replies`.
fn command(dom: &Arc<Domain>, line: &str, replies: &mpsc::UnboundedSender<Value>) -> Option<Value> {
    let Ok(mut cmd) = serde_json::from_str::<Value>(line) else {
        return Some(json!({ "error": { "class": "GenericError", "desc": "not JSON" } }));
    };
    let id = cmd.as_object_mut().and_then(|o| o.remove("id")).unwrap_or(Value::Null);
    if cmd["execute"] == "qmp_capabilities" {
        return Some(json!({ "return": {}, "id": id }));
    }
    let (dom, replies) = (dom.clone(), replies.clone());
    tokio::task::spawn_blocking(move || {
        let mut reply = match dom.qemu_monitor_command(&cmd.to_string(), 0) {
            Ok(text) => serde_json::from_str::<Value>(&text).unwrap_or_else(|e| {
                json!({ "error": { "class": "GenericError", "desc": format!("libvirt's reply is not JSON: {e}") } })
            }),
            Err(e) => json!({ "error": { "class": "GenericError", "desc": format!("libvirt: {e}") } }),
        };
        reply["id"] = id;
        let _ = replies.send(reply);
    });
    None
}

/// VM `vm` as a libvirt domain under `cfg`, if it is one: named in `cfg.domains` (or every VM
/// when the list is empty), or the name of a domain whose UUID is listed. `None`: not a libvirt
/// domain here, so its own QMP socket is used.
pub async fn connect_vm(
    cfg: &crate::watch::config::LibvirtConfig,
    vm: &str,
) -> Option<Result<Qmp, QmpError>> {
    let domain = domain_of(cfg, vm).await?;
    Some(connect(&cfg.uri, &domain).await)
}

/// The domain's name or UUID under `cfg` for VM `vm`: `vm` itself when `cfg.domains` names it
/// (or is empty), else the listed UUID of a domain named `vm`. `None`: not a libvirt domain here.
async fn domain_of(cfg: &crate::watch::config::LibvirtConfig, vm: &str) -> Option<String> {
    if cfg.domains.is_empty() || cfg.domains.iter().any(|d| d == vm) {
        return Some(vm.to_string());
    }
    let uuids: Vec<String> =
        cfg.domains.iter().filter(|d| d.len() == 36 && d.matches('-').count() == 4).cloned().collect();
    if uuids.is_empty() {
        return None;
    }
    event_loop().ok()?;
    let (uri, name) = (cfg.uri.clone(), vm.to_string());
    tokio::task::spawn_blocking(move || {
        let conn = Connect::open(Some(&uri)).ok()?;
        let found = uuids.into_iter().find(|u| {
            Domain::lookup_by_uuid_string(&conn, u).and_then(|d| d.get_name()).is_ok_and(|n| n == name)
        });
        let mut conn = conn;
        let _ = conn.close();
        found
    })
    .await
    .ok()?
}

/// VM `vm`'s console through libvirt's console stream (`virDomainOpenConsole`) of the serial
/// port whose QEMU chardev is `chardev` (libvirt's `char` + the port's alias, e.g.
/// `charserial0`), keeping the last `keep` bytes. `None`: `vm` is not a libvirt domain under
/// `cfg`.
///
/// libvirt serves one console client at a time. acpimon opens without `force`, so it never
/// takes the console away from an operator's `virsh console`; it says so when one holds it.
/// A later `virsh console --force` takes it from acpimon: the console then reads as closed.
pub async fn console_vm(
    cfg: &crate::watch::config::LibvirtConfig,
    vm: &str,
    chardev: &str,
    keep: usize,
) -> Option<Result<crate::console::Console, String>> {
    let domain = domain_of(cfg, vm).await?;
    Some(open_console(&cfg.uri, &domain, chardev, keep).await)
}

async fn open_console(
    uri: &str,
    domain: &str,
    chardev: &str,
    keep: usize,
) -> Result<crate::console::Console, String> {
    event_loop().map_err(|e| e.to_string())?;
    let alias = chardev.strip_prefix("char").unwrap_or(chardev).to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    let (uri_, domain_) = (uri.to_string(), domain.to_string());
    // A console this service just dropped (its QEMU session ended) may not have been released
    // by libvirt yet: a held console is retried briefly before it is reported.
    let stream = tokio::task::spawn_blocking(move || {
        let mut tries = 0;
        loop {
            match ConsoleStream::open(&uri_, &domain_, &alias, tx.clone()) {
                Err(Held(_)) if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other.map_err(|(Held(e) | Failed(e))| e),
            }
        }
    })
    .await
    .map_err(|e| format!("libvirt console task failed: {e}"))??;
    let (ours, bridge) = tokio::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    tokio::spawn(pump(Arc::new(stream), rx, bridge));
    Ok(crate::console::Console::over(ours, keep).with_chardev(chardev))
}

/// Why a console stream did not open: another client holds it, or anything else.
enum OpenError {
    Held(String),
    Failed(String),
}
use OpenError::{Failed, Held};

/// What the stream's callback hands on: output, an empty chunk at the end, or libvirt's error.
type Chunk = Result<Vec<u8>, String>;

/// An open, non-blocking libvirt console stream with its own connection: its output comes from
/// libvirt's event loop ([`on_console`]), so no thread blocks in libvirt holding the
/// connection, and input is sent from the pump.
struct ConsoleStream {
    conn: Connect,
    stream: virt::sys::virStreamPtr,
    /// The console is open on the stream, and its callback added: undone on drop.
    opened: bool,
    callback: bool,
}

// SAFETY: libvirt's stream and connection objects may be used from any thread (libvirt locks
// them); the pointer is freed only in `drop`.
unsafe impl Send for ConsoleStream {}
// SAFETY: as for `Send`: shared use is libvirt's stream calls, which lock the stream.
unsafe impl Sync for ConsoleStream {}

impl ConsoleStream {
    fn open(
        uri: &str,
        domain: &str,
        alias: &str,
        tx: mpsc::UnboundedSender<Chunk>,
    ) -> Result<Self, OpenError> {
        use virt::sys;
        let conn = Connect::open(Some(uri))
            .map_err(|e| Failed(format!("cannot connect to libvirt at {uri}: {e}; is libvirtd running?")))?;
        let mut this = ConsoleStream { conn, stream: std::ptr::null_mut(), opened: false, callback: false };
        let dom = Domain::lookup_by_name(&this.conn, domain)
            .or_else(|_| Domain::lookup_by_uuid_string(&this.conn, domain))
            .map_err(|e| Failed(format!("no libvirt domain named {domain} at {uri}: {e}")))?;
        // SAFETY: `this.conn` is a live connection.
        this.stream = unsafe { sys::virStreamNew(this.conn.as_ptr(), sys::VIR_STREAM_NONBLOCK) };
        if this.stream.is_null() {
            return Err(Failed(format!(
                "libvirt cannot create a stream: {}",
                virt::error::Error::last_error()
            )));
        }
        let dev =
            std::ffi::CString::new(alias).map_err(|_| Failed(format!("bad chardev alias {alias:?}")))?;
        // SAFETY: live domain and stream; `dev` outlives the call. No flags: never `force`.
        if unsafe { sys::virDomainOpenConsole(dom.as_ptr(), dev.as_ptr(), this.stream, 0) } < 0 {
            let e = virt::error::Error::last_error();
            let held = e.message().contains("Active console session");
            return Err(if held {
                Held(format!(
                    "libvirt's console of domain {domain} ({alias}) is held by another client \
                     (a `virsh console`?): libvirt serves one at a time; close it and use \
                     acpimon's console-share.sock, which re-exports the console"
                ))
            } else {
                Failed(format!(
                    "libvirt cannot open the console {alias} of domain {domain}: {e}; the domain \
                     needs <serial type='pty'> (and --console-chardev naming libvirt's chardev \
                     of it, `char` + its alias, if not the first)"
                ))
            });
        }
        this.opened = true;
        let opaque = Box::into_raw(Box::new(tx)).cast::<c_void>();
        let events =
            sys::VIR_STREAM_EVENT_READABLE | sys::VIR_STREAM_EVENT_ERROR | sys::VIR_STREAM_EVENT_HANGUP;
        // SAFETY: live stream; `on_console` and `free_chunks` match libvirt's callback types;
        // `opaque` is reclaimed only by `free_chunks`, which libvirt calls once when the
        // callback is removed (in `drop`), or below when registration fails.
        let rc = unsafe {
            sys::virStreamEventAddCallback(
                this.stream,
                events as c_int,
                Some(on_console),
                opaque,
                Some(free_chunks),
            )
        };
        if rc < 0 {
            // SAFETY: registration failed, so libvirt holds no copy of `opaque`.
            unsafe { free_chunks(opaque) };
            return Err(Failed(format!(
                "libvirt refused console events: {}",
                virt::error::Error::last_error()
            )));
        }
        this.callback = true;
        Ok(this)
    }

    /// Sends all of `bytes`, waiting while libvirt's buffer is full (bounded).
    fn send(&self, bytes: &[u8]) -> Result<(), String> {
        let mut sent = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sent < bytes.len() {
            let rest = &bytes[sent..];
            // SAFETY: live stream; `rest` is valid for its length.
            let n = unsafe { virt::sys::virStreamSend(self.stream, rest.as_ptr().cast(), rest.len()) };
            match n {
                n if n > 0 => sent += n as usize,
                -2 if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                -2 => return Err("libvirt's console stream takes no input".into()),
                _ => return Err(format!("libvirt's console stream: {}", virt::error::Error::last_error())),
            }
        }
        Ok(())
    }
}

impl Drop for ConsoleStream {
    fn drop(&mut self) {
        if !self.stream.is_null() {
            // SAFETY: the stream is live and freed only here; each step is undone once, and
            // only when done (libvirt prints an error for the others).
            unsafe {
                if self.callback {
                    virt::sys::virStreamEventRemoveCallback(self.stream);
                }
                if self.opened {
                    virt::sys::virStreamAbort(self.stream);
                }
                virt::sys::virStreamFree(self.stream);
            }
        }
        let _ = self.conn.close();
    }
}

/// Called by libvirt's event loop thread when the console stream has output or ended.
unsafe extern "C" fn on_console(stream: virt::sys::virStreamPtr, events: c_int, opaque: *mut c_void) {
    if opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the sender boxed in `ConsoleStream::open`, alive until `free_chunks`.
    let tx = unsafe { &*opaque.cast::<mpsc::UnboundedSender<Chunk>>() };
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // SAFETY: live stream (the callback is removed before it is freed); `buf` is writable.
        let n = unsafe { virt::sys::virStreamRecv(stream, buf.as_mut_ptr().cast(), buf.len()) };
        let end = match n {
            n if n > 0 => {
                let _ = tx.send(Ok(buf[..n as usize].to_vec()));
                continue;
            }
            // Nothing to read now; after a hangup or an error, nothing ever will.
            -2 if events as u32
                & (virt::sys::VIR_STREAM_EVENT_HANGUP | virt::sys::VIR_STREAM_EVENT_ERROR)
                == 0 =>
            {
                return
            }
            0 | -2 => Ok(Vec::new()),
            _ => Err(virt::error::Error::last_error().to_string()),
        };
        let _ = tx.send(end);
        // Ended: no more events (the pump then drops the stream).
        // SAFETY: live stream; updating its callback's events from inside it is allowed.
        unsafe { virt::sys::virStreamEventUpdateCallback(stream, 0) };
        return;
    }
}

/// libvirt's free callback for the console's `opaque`.
unsafe extern "C" fn free_chunks(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: from `Box::into_raw` in `ConsoleStream::open`, freed only here, once.
        drop(unsafe { Box::from_raw(opaque.cast::<mpsc::UnboundedSender<Chunk>>()) });
    }
}

/// Moves bytes between libvirt's console stream and the [`crate::console::Console`]'s end of
/// `bridge` until either ends, then closes the stream.
async fn pump(
    stream: Arc<ConsoleStream>,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    bridge: tokio::net::UnixStream,
) {
    use tokio::io::AsyncReadExt;
    let (mut read, mut write) = bridge.into_split();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some(Ok(bytes)) if !bytes.is_empty() => {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!("libvirt's console stream failed: {e}");
                    break;
                }
                _ => break,
            },
            n = read.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    let (s, bytes) = (stream.clone(), buf[..n].to_vec());
                    match tokio::task::spawn_blocking(move || s.send(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("{e}"),
                        Err(_) => break,
                    }
                }
                _ => break,
            },
        }
    }
    drop(write);
    let _ = tokio::task::spawn_blocking(move || drop(stream)).await;
}
