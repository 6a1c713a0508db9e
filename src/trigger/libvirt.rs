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
    tokio::spawn(run_bridge(opened, bridge));
    Qmp::over(read, write, Path::new(&peer)).await
}

struct Opened {
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
    Ok(Opened { conn: Arc::new(conn), dom: Arc::new(dom), version, events, callback })
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
    if cfg.domains.is_empty() || cfg.domains.iter().any(|d| d == vm) {
        return Some(connect(&cfg.uri, vm).await);
    }
    let uuids: Vec<String> =
        cfg.domains.iter().filter(|d| d.len() == 36 && d.matches('-').count() == 4).cloned().collect();
    if uuids.is_empty() {
        return None;
    }
    event_loop().ok()?;
    let (uri, name) = (cfg.uri.clone(), vm.to_string());
    let uuid = tokio::task::spawn_blocking(move || {
        let conn = Connect::open(Some(&uri)).ok()?;
        uuids.into_iter().find(|u| {
            Domain::lookup_by_uuid_string(&conn, u).and_then(|d| d.get_name()).is_ok_and(|n| n == name)
        })
    })
    .await
    .ok()??;
    Some(connect(&cfg.uri, &uuid).await)
}
