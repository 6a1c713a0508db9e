//! The `gdbstub` step, and the small part of the GDB remote serial protocol it needs.
//!
//! QEMU starts its gdbstub on demand (HMP `gdbserver unix:PATH,server=on,wait=off`, the same on
//! QEMU 7.2 and 10) and stops the VM when a client connects; `D` (detach) resumes it, even a VM
//! that was paused before, while closing the connection leaves it stopped. So the step detaches
//! only from a VM that was running, closes otherwise, then `gdbserver none`, and finally makes
//! sure a VM that was running runs again. QEMU 7.2 also sends an unsolicited stop reply
//! (`T02thread:01;`) on connect; 10 does not: stop replies are skipped.
//!
//! Thread ids are QEMU's: vCPU index + 1. Registers are decoded with the target description the
//! stub itself serves (`qXfer:features:read:target.xml` and what it includes), falling back to
//! the x86-64 core registers if it serves none.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::{Ctx, Done, Keep, StepResult};
use crate::trigger::qmp::{Qmp, Status};

/// The longest packet accepted from the stub.
const MAX_PACKET: usize = 256 << 10;
/// The most XML accepted for the target description, all files together.
const MAX_XML: usize = 256 << 10;
/// Read size for `qXfer` (QEMU's PacketSize is 0x1000).
const XFER_CHUNK: usize = 0x800;
/// The most threads (vCPUs) read.
const MAX_THREADS: usize = 1024;
/// Budget of each clean-up action.
const CLEANUP_STEP: Duration = Duration::from_millis(1500);

/// One register of the target description.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Reg {
    pub name: String,
    pub bits: u32,
}

/// One thread's registers as read.
struct ThreadRegs {
    id: String,
    raw: String,
}

/// What the connected part of the step found.
#[derive(Default)]
struct Found {
    layout: Vec<Reg>,
    layout_note: String,
    threads: Vec<ThreadRegs>,
}

/// `gdbstub`: see the module documentation.
pub(super) async fn gdbstub(ctx: &Ctx<'_>, qmp: &Qmp) -> StepResult {
    let path = &ctx.target.gdb_socket;
    let Some(path_text) = path.to_str().filter(|p| !p.contains(',') && p.len() <= 107) else {
        return Err(Done::failed(format!(
            "gdb socket path {} must be UTF-8, without commas, at most 107 bytes",
            path.display()
        )));
    };
    remove_stale_socket(path)?;
    let before = qmp.status(ctx.remaining()).await.map_err(|e| Done::qmp("query-status", e))?;
    let was_running = before.running;
    let started = hmp(qmp, &format!("gdbserver unix:{path_text},server=on,wait=off"), ctx.remaining())
        .await
        .map_err(|e| Done::qmp("HMP gdbserver", e))?;
    if !started.contains("Waiting for gdb connection") {
        return Err(Done::failed(format!("HMP gdbserver did not start the gdbstub: {}", started.trim())));
    }

    // From here on the gdbstub runs: whatever happens, it is stopped and the VM left as it was.
    let mut remote: Option<Remote> = None;
    let mut found = Found::default();
    let work = read_registers(qmp, path, was_running, &mut remote, &mut found);
    let result = tokio::time::timeout_at(ctx.deadline, work).await;
    let result = match result {
        Ok(r) => r.map_err(Done::failed),
        Err(_) => Err(Done::timeout(format!(
            "the gdbstub did not answer within {} ({} of the vCPUs read)",
            ctx.timeout_text(),
            found.threads.len()
        ))),
    };
    let (after, cleanup_notes) = cleanup(qmp, path, was_running, remote).await;

    let summary = json!({
        "status_before": before.status,
        "status_after": after.as_ref().map(|a| a.status.clone()),
        "threads": found.threads.iter().map(|t| thread_summary(&found.layout, t)).collect::<Vec<_>>(),
        "notes": cleanup_notes,
    });
    let text = render(&found, &before, after.as_ref(), &cleanup_notes);
    let file = if found.threads.is_empty() {
        None
    } else {
        Some(ctx.write("txt", text.as_bytes(), Keep::Head).await?)
    };
    match result {
        Ok(()) => Ok(Done::ok(file, Some(summary))),
        Err(d) => Err(d.with_file(file).with_summary(summary)),
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), Done> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Done::failed(format!("cannot remove the old gdb socket {}: {e}", path.display()))),
        Ok(_) => Err(Done::failed(format!("{} exists and is not a socket; not touching it", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Done::failed(format!("cannot check the gdb socket path {}: {e}", path.display()))),
    }
}

async fn hmp(qmp: &Qmp, line: &str, timeout: Duration) -> Result<String, crate::trigger::qmp::QmpError> {
    let out = qmp.hmp_within(line, None, timeout).await?;
    Ok(crate::console::sanitize(out.as_bytes()))
}

/// Connects, waits for the VM to stop, and reads the target description and every thread's
/// registers into `found` as it goes (so a timeout keeps what was read).
async fn read_registers(
    qmp: &Qmp,
    path: &Path,
    was_running: bool,
    remote: &mut Option<Remote>,
    found: &mut Found,
) -> Result<(), String> {
    let r = remote.insert(Remote::connect(path).await?);
    if was_running {
        // Registers are only consistent once every vCPU has stopped.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if matches!(qmp.status(Duration::from_secs(1)).await, Ok(s) if !s.running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // QEMU 7.2 announces the stop with an unsolicited packet.
    r.drain(Duration::from_millis(100)).await;
    (found.layout, found.layout_note) = match target_description(r).await {
        Ok(xml) => match layout(&xml) {
            regs if !regs.is_empty() => {
                let note = format!("target.xml from the gdbstub ({} registers)", regs.len());
                (regs, note)
            }
            _ => (x86_64_core(), "built-in x86-64 core registers (target.xml lists none)".into()),
        },
        Err(e) => (x86_64_core(), format!("built-in x86-64 core registers (no target.xml: {e})")),
    };
    for id in thread_ids(r).await? {
        let ok = r.request(&format!("Hg{id}")).await?;
        if ok != b"OK" {
            return Err(format!("Hg{id} answered {}", String::from_utf8_lossy(&ok)));
        }
        let g = r.request("g").await?;
        if g.first() == Some(&b'E') || !g.iter().all(|b| b.is_ascii_hexdigit() || *b == b'x') {
            return Err(format!(
                "g for thread {id} answered {}",
                String::from_utf8_lossy(&g[..g.len().min(40)])
            ));
        }
        found.threads.push(ThreadRegs { id, raw: String::from_utf8_lossy(&g).into_owned() });
    }
    if found.threads.is_empty() {
        return Err("the gdbstub lists no threads".into());
    }
    Ok(())
}

/// Detaches (only from a VM that was running: `D` resumes any VM), closes, stops the gdbstub,
/// and resumes a VM that was running and is now paused. Returns the final status and notes.
async fn cleanup(
    qmp: &Qmp,
    path: &Path,
    was_running: bool,
    remote: Option<Remote>,
) -> (Option<Status>, Vec<String>) {
    let mut notes = Vec::new();
    if let (true, Some(mut r)) = (was_running, remote) {
        match tokio::time::timeout(CLEANUP_STEP, r.request("D")).await {
            Ok(Ok(ok)) if ok == b"OK" => {}
            Ok(Ok(other)) => notes.push(format!("detach answered {}", String::from_utf8_lossy(&other))),
            Ok(Err(e)) => notes.push(format!("detach failed: {e}")),
            Err(_) => notes.push("detach got no answer".into()),
        }
    }
    if let Err(e) = hmp(qmp, "gdbserver none", CLEANUP_STEP).await {
        notes.push(format!("HMP gdbserver none failed: {e}"));
    }
    let mut after = qmp.status(CLEANUP_STEP).await.ok();
    if was_running && after.as_ref().is_some_and(|a| a.status == "paused") {
        match qmp.execute_within(qapi::qmp::cont {}, CLEANUP_STEP).await {
            Ok(_) => notes.push("the VM was left paused by the gdbstub: resumed it (cont)".into()),
            Err(e) => notes.push(format!("the VM was left paused by the gdbstub and cont failed: {e}")),
        }
        after = qmp.status(CLEANUP_STEP).await.ok();
    }
    if matches!(std::fs::symlink_metadata(path), Ok(m) if m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    (after, notes)
}

fn thread_summary(layout: &[Reg], t: &ThreadRegs) -> Value {
    let regs = decode_registers(layout, &t.raw);
    let get = |name: &str| regs.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.clone());
    json!({ "thread": t.id, "rip": get("rip"), "rsp": get("rsp"), "eflags": get("eflags") })
}

fn render(found: &Found, before: &Status, after: Option<&Status>, notes: &[String]) -> String {
    let mut out = format!(
        "# every vCPU's registers over QEMU's gdbstub (GDB remote protocol), read at {}\n# layout: {}\n\
         # VM status before: {}; after: {}\n",
        super::now(),
        found.layout_note,
        before.status,
        after.map_or("?", |a| a.status.as_str()),
    );
    for n in notes {
        out.push_str(&format!("# {n}\n"));
    }
    for t in &found.threads {
        let vcpu = u64::from_str_radix(&t.id, 16).ok().and_then(|n| n.checked_sub(1));
        out.push_str(&format!(
            "\nthread {} (vCPU {})\n",
            t.id,
            vcpu.map_or("?".to_string(), |n| n.to_string())
        ));
        for (name, value) in decode_registers(&found.layout, &t.raw) {
            out.push_str(&format!("  {name:<10} {}\n", value.as_deref().unwrap_or("unavailable")));
        }
        out.push_str(&format!("  {:<10} {}\n", "raw", t.raw));
    }
    out
}

/// The register list `g` returns, by regnum, from a target description (includes expanded).
pub(super) fn layout(xml: &str) -> Vec<Reg> {
    let comments = Regex::new(r"(?s)<!--.*?-->").unwrap();
    let reg = Regex::new(r"<reg\s([^>]*)>").unwrap();
    let attr = Regex::new(r#"([\w-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')"#).unwrap();
    let xml = comments.replace_all(xml, "");
    let mut by_num = BTreeMap::new();
    let mut next = 0u32;
    for r in reg.captures_iter(&xml) {
        let mut name = None;
        let mut bits = None;
        let mut num = None;
        for a in attr.captures_iter(&r[1]) {
            let v = a.get(2).or(a.get(3)).map_or("", |m| m.as_str());
            match &a[1] {
                "name" => name = Some(v.to_string()),
                "bitsize" => bits = v.parse::<u32>().ok(),
                "regnum" => num = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(name), Some(bits)) = (name, bits) else { continue };
        let n = num.unwrap_or(next);
        next = n.saturating_add(1);
        by_num.insert(n, Reg { name, bits });
    }
    // `g` holds registers 0, 1, 2, ... in order: stop at the first gap.
    by_num.into_iter().enumerate().take_while(|(i, (n, _))| *i as u32 == *n).map(|(_, (_, r))| r).collect()
}

/// The x86-64 registers every stub sends first in `g`.
pub(super) fn x86_64_core() -> Vec<Reg> {
    let mut v: Vec<Reg> = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "rip",
    ]
    .iter()
    .map(|n| Reg { name: n.to_string(), bits: 64 })
    .collect();
    for n in ["eflags", "cs", "ss", "ds", "es", "fs", "gs"] {
        v.push(Reg { name: n.into(), bits: 32 });
    }
    v
}

/// `g`'s hex (target byte order: little-endian) as `0x...` values; `None` for a register the
/// stub marks unavailable (`xx`). Registers beyond the data are left out.
pub(super) fn decode_registers(layout: &[Reg], hex: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut off = 0;
    for r in layout {
        let width = (r.bits as usize).div_ceil(8) * 2;
        let Some(chunk) = hex.get(off..off + width) else { break };
        off += width;
        let value = if chunk.bytes().all(|b| b.is_ascii_hexdigit()) {
            let bytes: Vec<&str> = (0..chunk.len()).step_by(2).map(|i| &chunk[i..i + 2]).collect();
            Some(format!("0x{}", bytes.iter().rev().copied().collect::<String>().to_ascii_lowercase()))
        } else {
            None
        };
        out.push((r.name.clone(), value));
    }
    out
}

/// The whole target description: `target.xml` with its `xi:include`s expanded in place.
async fn target_description(r: &mut Remote) -> Result<String, String> {
    let mut xml = r.xfer("target.xml").await?;
    let include = Regex::new(r#"<xi:include\s+href\s*=\s*["']([^"']+)["']\s*/>"#).unwrap();
    for _ in 0..16 {
        let Some(c) = include.captures(&xml) else { break };
        let (range, href) = (c.get(0).unwrap().range(), c[1].to_string());
        let inner = r.xfer(&href).await.unwrap_or_default();
        if xml.len() + inner.len() > MAX_XML {
            return Err("target description larger than 256 KiB".into());
        }
        xml.replace_range(range, &inner);
    }
    Ok(xml)
}

/// Every thread id, from `qfThreadInfo`/`qsThreadInfo`.
async fn thread_ids(r: &mut Remote) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let mut reply = r.request("qfThreadInfo").await?;
    while ids.len() <= MAX_THREADS {
        match reply.split_first() {
            Some((b'm', rest)) => {
                ids.extend(
                    String::from_utf8_lossy(rest)
                        .split(',')
                        .filter(|s| {
                            !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
                        })
                        .map(str::to_string),
                );
                reply = r.request("qsThreadInfo").await?;
            }
            Some((b'l', _)) => return Ok(ids),
            _ => return Err(format!("qfThreadInfo answered {}", String::from_utf8_lossy(&reply))),
        }
    }
    Err(format!("the gdbstub lists more than {MAX_THREADS} threads"))
}

/// A frame taken off the front of the input.
#[derive(Debug, PartialEq)]
pub(super) enum Frame {
    /// A packet with a good checksum, decoded (escapes and run-length encoding undone).
    Packet(Vec<u8>),
    /// A packet with a bad checksum (to be nacked).
    Bad,
    /// The stub refused our last packet.
    Nack,
}

/// Takes the next frame off `buf`, dropping acks and stray bytes; `None` until a whole frame
/// is there.
pub(super) fn next_frame(buf: &mut Vec<u8>) -> Option<Frame> {
    loop {
        match buf.first()? {
            b'$' => {
                let hash = buf.iter().position(|&b| b == b'#')?;
                if buf.len() < hash + 3 {
                    return None;
                }
                let data = &buf[1..hash];
                let sum = std::str::from_utf8(&buf[hash + 1..hash + 3])
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok());
                let frame =
                    if sum == Some(checksum(data)) { Frame::Packet(unescape(data)) } else { Frame::Bad };
                buf.drain(..hash + 3);
                return Some(frame);
            }
            b'-' => {
                buf.remove(0);
                return Some(Frame::Nack);
            }
            _ => {
                buf.remove(0);
            }
        }
    }
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// `$payload#xx`.
pub(super) fn frame(payload: &str) -> Vec<u8> {
    format!("${payload}#{:02x}", checksum(payload.as_bytes())).into_bytes()
}

/// Undoes `}` escapes and `*` run-length encoding.
pub(super) fn unescape(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'}' if i + 1 < data.len() => {
                out.push(data[i + 1] ^ 0x20);
                i += 2;
            }
            b'*' if i + 1 < data.len() && !out.is_empty() => {
                let n = data[i + 1].saturating_sub(29) as usize;
                let last = *out.last().unwrap();
                out.extend(std::iter::repeat_n(last, n));
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// A stop reply (`S05`, `T05thread:01;`), which the stub may send unasked.
fn is_stop_reply(p: &[u8]) -> bool {
    matches!(p, [b'S' | b'T', a, b, ..] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit())
}

/// A connection to a gdbstub.
struct Remote {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Remote {
    /// Connects, retrying while QEMU sets the socket up (the caller bounds the time).
    async fn connect(path: &Path) -> Result<Remote, String> {
        let mut tries = 0;
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Ok(Remote { stream, buf: Vec::new() }),
                Err(e) if tries >= 100 => {
                    return Err(format!("cannot connect to the gdbstub at {}: {e}", path.display()))
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Discards whatever arrives until the line has been quiet for `quiet`.
    async fn drain(&mut self, quiet: Duration) {
        let mut chunk = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(quiet, self.stream.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
        }
        self.buf.clear();
    }

    /// Sends `payload` and returns the reply, acking it; skips stop replies; resends on a nack.
    async fn request(&mut self, payload: &str) -> Result<Vec<u8>, String> {
        let io = |e: std::io::Error| format!("gdbstub connection: {e}");
        let packet = frame(payload);
        self.stream.write_all(&packet).await.map_err(io)?;
        let mut resent = 0;
        let mut chunk = vec![0u8; 16 << 10];
        loop {
            while let Some(f) = next_frame(&mut self.buf) {
                match f {
                    Frame::Packet(p) => {
                        self.stream.write_all(b"+").await.map_err(io)?;
                        if !is_stop_reply(&p) {
                            return Ok(p);
                        }
                    }
                    Frame::Bad => self.stream.write_all(b"-").await.map_err(io)?,
                    Frame::Nack if resent < 3 => {
                        resent += 1;
                        self.stream.write_all(&packet).await.map_err(io)?;
                    }
                    Frame::Nack => return Err(format!("the gdbstub keeps refusing {payload}")),
                }
            }
            if self.buf.len() > MAX_PACKET {
                return Err("the gdbstub sent a packet longer than 256 KiB".into());
            }
            let n = self.stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err("the gdbstub closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A whole `qXfer:features:read` object.
    async fn xfer(&mut self, annex: &str) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            let reply =
                self.request(&format!("qXfer:features:read:{annex}:{:x},{XFER_CHUNK:x}", out.len())).await?;
            match reply.split_first() {
                Some((b'm', rest)) if !rest.is_empty() => out.extend_from_slice(rest),
                Some((b'l', rest)) => {
                    out.extend_from_slice(rest);
                    return Ok(String::from_utf8_lossy(&out).into_owned());
                }
                _ => return Err(format!("qXfer {annex} answered {:?}", String::from_utf8_lossy(&reply))),
            }
            if out.len() > MAX_XML {
                return Err(format!("{annex} is larger than 256 KiB"));
            }
        }
    }
}
