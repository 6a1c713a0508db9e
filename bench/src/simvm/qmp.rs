//! The simulated VM's QMP monitor: QEMU's greeting, negotiation, commands, events, and HMP
//! through `human-monitor-command`.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::task::JoinSet;

use super::machine::{Guest, Run, Shared};
use super::{PanicAction, QEMU_VERSION};

/// QMP clients served at once; more wait in the listen backlog.
pub const MAX_QMP_CLIENTS: usize = 4;
/// The longest command line accepted; a longer one is answered with an error and the client
/// is disconnected.
pub const MAX_QMP_LINE: usize = 64 << 10;
/// The commands the simulated monitor knows; any other is `CommandNotFound`.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-pci",
    "query-cpus-fast",
    "query-dump",
    "human-monitor-command",
    "stop",
    "cont",
    "system_reset",
    "inject-nmi",
    "dump-guest-memory",
    "quit",
];
/// vCPUs of the simulated guest.
const CPUS: i64 = 2;
/// Read buffer of one client: commands are short.
const READ_BUFFER: usize = 1024;

/// Serves QMP clients until the VM is gone, then waits for every client task to end.
pub(super) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut gone = shared.subscribe_gone();
    let mut clients = JoinSet::new();
    while !*gone.borrow_and_update() {
        tokio::select! {
            _ = gone.changed() => {}
            Some(_) = clients.join_next(), if !clients.is_empty() => {}
            accepted = listener.accept(), if clients.len() < MAX_QMP_CLIENTS => match accepted {
                Ok((stream, _)) => {
                    clients.spawn(client(stream, shared.clone()));
                }
                // Out of descriptors, most likely: try again later rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
    drop(listener);
    while clients.join_next().await.is_some() {}
}

/// What to do after a reply is written.
#[derive(Debug, PartialEq, Eq)]
enum After {
    Nothing,
    Reset,
    Quit,
    /// Close this client (its input was not QMP).
    Close,
}

/// One client: greeting, then commands and events until either side closes.
async fn client(mut stream: UnixStream, shared: Arc<Shared>) {
    let mut gone = shared.subscribe_gone();
    let mut events = shared.subscribe_events();
    let (read, mut write) = stream.split();
    let mut reader = BufReader::with_capacity(READ_BUFFER, read);
    let greeting = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {}, \"minor\": {}, \"major\": {}}}, \"package\": \"\"}}, \"capabilities\": [\"oob\"]}}}}\n",
        QEMU_VERSION.2, QEMU_VERSION.1, QEMU_VERSION.0
    );
    if *gone.borrow_and_update() || write.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut negotiated = false;
    let mut line = Vec::new();
    loop {
        tokio::select! {
            // Events first: what happened before the VM went (SHUTDOWN) still goes out.
            biased;
            event = events.recv() => match event {
                Ok(event) if negotiated => {
                    if write.write_all(event.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            _ = gone.changed() => return,
            read = read_line(&mut reader, &mut line) => {
                let complete = match read {
                    Ok(complete) => complete,
                    Err(_) => return,
                };
                if !complete {
                    return;
                }
                let was_negotiated = negotiated;
                let (reply, after) = if line.len() > MAX_QMP_LINE {
                    (Some(error(None, "GenericError", "JSON parse error, input too long")), After::Close)
                } else {
                    dispatch(&shared, &mut negotiated, &line)
                };
                line.clear();
                if line.capacity() > READ_BUFFER {
                    line = Vec::new();
                }
                // Events raised by the command itself (STOP for `stop`) precede its reply,
                // as in QEMU; a client that was not negotiated yet gets none of them.
                loop {
                    match events.try_recv() {
                        Ok(event) if was_negotiated => {
                            if write.write_all(event.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
                if let Some(reply) = reply {
                    let mut text = reply.to_string();
                    text.push('\n');
                    if write.write_all(text.as_bytes()).await.is_err() {
                        return;
                    }
                }
                match after {
                    After::Nothing => {}
                    After::Reset => shared.reset(false),
                    After::Quit => shared.quit(),
                    After::Close => return,
                }
            }
        }
    }
}

/// Reads up to and including a newline into `line`, bounded. Cancel-safe: bytes read before a
/// cancellation stay in `line`. `Ok(false)` at end of stream.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, line: &mut Vec<u8>) -> io::Result<bool> {
    let room = (MAX_QMP_LINE + 1).saturating_sub(line.len()) as u64;
    let n = (&mut *reader).take(room).read_until(b'\n', line).await?;
    Ok(n > 0 && (line.ends_with(b"\n") || line.len() > MAX_QMP_LINE))
}

fn error(id: Option<&Value>, class: &str, desc: &str) -> Value {
    let mut reply = json!({ "error": { "class": class, "desc": desc } });
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

/// Answers one input line; `None` for a blank line.
fn dispatch(shared: &Arc<Shared>, negotiated: &mut bool, line: &[u8]) -> (Option<Value>, After) {
    if line.trim_ascii().is_empty() {
        return (None, After::Nothing);
    }
    let input: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return (Some(error(None, "GenericError", &format!("JSON parse error, {e}"))), After::Nothing)
        }
    };
    let Some(input) = input.as_object() else {
        return (Some(error(None, "GenericError", "QMP input must be a JSON object")), After::Nothing);
    };
    let id = input.get("id");
    let Some(name) = input.get("execute").and_then(Value::as_str) else {
        return (Some(error(id, "GenericError", "QMP input lacks member 'execute'")), After::Nothing);
    };
    let empty = Map::new();
    let args = match input.get("arguments") {
        None => &empty,
        Some(Value::Object(args)) => args,
        Some(_) => {
            let desc = "QMP input member 'arguments' must be an object";
            return (Some(error(id, "GenericError", desc)), After::Nothing);
        }
    };
    let (result, after) = if *negotiated {
        command(shared, name, args)
    } else if name == "qmp_capabilities" {
        *negotiated = true;
        (Ok(json!({})), After::Nothing)
    } else {
        let desc = "Expecting capabilities negotiation with 'qmp_capabilities'";
        (Err(("CommandNotFound", desc.to_string())), After::Nothing)
    };
    let reply = match result {
        Ok(ret) => {
            let mut reply = json!({ "return": ret });
            if let Some(id) = id {
                reply["id"] = id.clone();
            }
            reply
        }
        Err((class, desc)) => error(id, class, &desc),
    };
    (Some(reply), after)
}

type CommandResult = Result<Value, (&'static str, String)>;

fn command(shared: &Arc<Shared>, name: &str, args: &Map<String, Value>) -> (CommandResult, After) {
    let ok = |v: Value| (Ok(v), After::Nothing);
    match name {
        "qmp_capabilities" => (
            Err(("CommandNotFound", "Capabilities negotiation is already complete, command ignored".into())),
            After::Nothing,
        ),
        "query-commands" => ok(COMMANDS.iter().map(|c| json!({ "name": c })).collect()),
        "query-version" => ok(version()),
        "query-status" => {
            let (run, _) = shared.run_and_guest();
            ok(json!({ "status": run.qapi(), "running": run == Run::Running }))
        }
        "query-pci" => ok(pci(shared)),
        "query-cpus-fast" => ok(cpus()),
        "query-dump" => ok(json!({ "status": "none", "completed": 0, "total": 0 })),
        "human-monitor-command" => {
            let Some(line) = args.get("command-line").and_then(Value::as_str) else {
                return (Err(("GenericError", "Parameter 'command-line' is missing".into())), After::Nothing);
            };
            let cpu = match args.get("cpu-index") {
                None => 0,
                Some(v) => match v.as_i64() {
                    Some(i) if (0..CPUS).contains(&i) => i,
                    _ => {
                        let desc = "Parameter 'cpu-index' expects a CPU number";
                        return (Err(("GenericError", desc.into())), After::Nothing);
                    }
                },
            };
            let (output, after) = hmp(shared, line, cpu);
            (Ok(Value::String(output)), after)
        }
        "stop" => {
            shared.stop_cmd();
            ok(json!({}))
        }
        "cont" => {
            shared.cont_cmd();
            ok(json!({}))
        }
        "system_reset" => (Ok(json!({})), After::Reset),
        "inject-nmi" => {
            shared.nmi();
            ok(json!({}))
        }
        "dump-guest-memory" => (dump(shared, args), After::Nothing),
        "quit" => (Ok(json!({})), After::Quit),
        _ => (Err(("CommandNotFound", format!("The command {name} has not been found"))), After::Nothing),
    }
}

fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({ "qemu": { "major": major, "minor": minor, "micro": micro }, "package": "" })
}

/// Bus 0 of a pc machine with `-nodefaults`: host bridge, ISA bridge, ACPI, and the ivshmem
/// function at the descriptor's slot with BAR2 where the records say it is.
fn pci(shared: &Shared) -> Value {
    let slot = shared.slot();
    let device = |slot: u8, function: u8, class: u32, desc: &str, vendor: u32, dev: u32, qdev: &str| {
        json!({
            "bus": 0, "slot": slot, "function": function,
            "class_info": { "class": class, "desc": desc },
            "id": { "vendor": vendor, "device": dev, "subsystem-vendor": 0x1af4, "subsystem": 0x1100 },
            "irq_pin": 0, "qdev_id": qdev, "regions": [],
        })
    };
    let mut ivshmem =
        device(slot.device, slot.function, 0x0500, "RAM controller", 0x1af4, 0x1110, "acpimon-shm");
    ivshmem["regions"] = json!([
        { "bar": 0, "type": "memory", "address": 0xfebf_1000u32, "size": 256,
          "prefetch": false, "mem_type_64": false },
        { "bar": 2, "type": "memory", "address": shared.bar(), "size": shared.region_size(),
          "prefetch": true, "mem_type_64": true },
    ]);
    json!([{ "bus": 0, "devices": [
        device(0, 0, 0x0600, "Host bridge", 0x8086, 0x1237, ""),
        device(1, 0, 0x0601, "ISA bridge", 0x8086, 0x7000, ""),
        device(1, 3, 0x0680, "Bridge", 0x8086, 0x7113, ""),
        ivshmem,
    ] }])
}

fn cpus() -> Value {
    let thread = std::process::id();
    (0..CPUS)
        .map(|i| {
            json!({
                "cpu-index": i, "qom-path": format!("/machine/unattached/device[{i}]"),
                "thread-id": thread, "target": "x86_64",
                "props": { "node-id": 0, "socket-id": 0, "core-id": i, "thread-id": 0 },
            })
        })
        .collect()
}

/// `dump-guest-memory` to `file:PATH`: a bare ELF core header (no guest memory is simulated),
/// then `DUMP_COMPLETED`.
fn dump(shared: &Shared, args: &Map<String, Value>) -> CommandResult {
    let generic = |desc: String| ("GenericError", desc);
    let protocol = args
        .get("protocol")
        .and_then(Value::as_str)
        .ok_or_else(|| generic("Parameter 'protocol' is missing".into()))?;
    let Some(path) = protocol.strip_prefix("file:") else {
        return Err(generic("the simulated VM dumps only to 'file:' paths".into()));
    };
    let header = elf_core_header();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, &header))
        .map_err(|e| generic(format!("Could not open '{path}': {e}")))?;
    shared.emit_dump_completed(header.len() as u64);
    Ok(json!({}))
}

/// A 64-byte ELF64 little-endian x86-64 core file header with no program headers.
fn elf_core_header() -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    h[16..18].copy_from_slice(&4u16.to_le_bytes()); // ET_CORE
    h[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    h[20..24].copy_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    h[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    h
}

/// One HMP command line; its output with HMP's `\r\n` line ends.
fn hmp(shared: &Arc<Shared>, line: &str, cpu: i64) -> (String, After) {
    let mut words = line.split_whitespace();
    let none = (String::new(), After::Nothing);
    match words.next() {
        Some("o") => {
            let rest: Vec<&str> = words.collect();
            let (_, args) = split_format(&rest);
            match (args.first().and_then(|a| number(a)), args.get(1).and_then(|v| number(v))) {
                (Some(port), Some(value)) => {
                    shared.ioport_write(port as u16, value as u32);
                    none
                }
                _ => ("o: expects an address and a value\r\n".into(), After::Nothing),
            }
        }
        Some("i") => {
            let rest: Vec<&str> = words.collect();
            let (size, args) = split_format(&rest);
            match args.first().and_then(|a| number(a)) {
                Some(port) => {
                    let (suffix, digits, mask) = match size {
                        4 => ('l', 8, u32::MAX),
                        2 => ('w', 4, 0xffff),
                        _ => ('b', 2, 0xff),
                    };
                    let value = shared.ioport_read(port as u16) & mask;
                    (format!("port{suffix}[0x{:04x}] = 0x{value:0digits$x}\r\n", port as u16), After::Nothing)
                }
                None => ("i: expects an address\r\n".into(), After::Nothing),
            }
        }
        Some("info") => match words.next() {
            Some("registers") => (registers(shared, cpu), After::Nothing),
            Some("status") => {
                let status = match shared.run_and_guest().0 {
                    Run::Running => "running",
                    Run::Paused => "paused",
                    Run::GuestPanicked => "paused (guest-panicked)",
                    Run::Prelaunch => "paused (prelaunch)",
                };
                (format!("VM status: {status}\r\n"), After::Nothing)
            }
            Some("version") => {
                let (a, b, c) = QEMU_VERSION;
                (format!("{a}.{b}.{c}\r\n"), After::Nothing)
            }
            _ => none,
        },
        Some("nmi") => {
            shared.nmi();
            none
        }
        Some("stop") => {
            shared.stop_cmd();
            none
        }
        Some("cont" | "c") => {
            shared.cont_cmd();
            none
        }
        Some("system_reset") => (String::new(), After::Reset),
        _ => none,
    }
}

/// HMP's optional `/FMT` argument: the access size (b = 1, h = 2, w = 4 bytes) and the rest.
fn split_format<'a>(words: &'a [&'a str]) -> (usize, &'a [&'a str]) {
    match words.first().and_then(|w| w.strip_prefix('/')) {
        Some(fmt) => {
            let size = match fmt.chars().last() {
                Some('h') => 2,
                Some('w') => 4,
                _ => 1,
            };
            (size, &words[1..])
        }
        None => (1, words),
    }
}

/// An HMP number: `0x` hex or decimal.
fn number(word: &str) -> Option<u64> {
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}

/// `info registers` of an x86-64 Linux guest: idle in `default_idle` (HLT) when alive,
/// spinning with interrupts on when hung, in `panic()`'s loop with interrupts off when
/// panicked.
fn registers(shared: &Shared, cpu: i64) -> String {
    let (rip, rfl, flags, hlt) = match shared.run_and_guest().1 {
        Guest::Alive => (0xffff_ffff_81c8_f2ae_u64, 0x246, "[---Z-P-]", 1),
        Guest::Hung => (0xffff_ffff_8110_d3a2, 0x206, "[-----P-]", 0),
        Guest::Panicked(PanicAction::Run | PanicAction::Pause) => {
            (0xffff_ffff_81c3_a1f1, 0x046, "[---Z-P-]", 0)
        }
    };
    let lines = [
        format!("CPU#{cpu}"),
        "RAX=0000000000000000 RBX=ffffffff82a0a940 RCX=0000000000000001 RDX=0000000000000000".into(),
        "RSI=0000000000000087 RDI=0000000000000087 RBP=ffffffff82a03e28 RSP=ffffffff82a03e08".into(),
        "R8 =ffff88807dc1e0c0 R9 =0000000000000000 R10=0000000000000001 R11=0000000000000000".into(),
        "R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000".into(),
        format!("RIP={rip:016x} RFL={rfl:08x} {flags} CPL=0 II=0 A20=1 SMM=0 HLT={hlt}"),
        "ES =0000 0000000000000000 ffffffff 00c00000".into(),
        "CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]".into(),
        "SS =0018 0000000000000000 ffffffff 00c09300 DPL=0 DS   [-WA]".into(),
        "DS =0000 0000000000000000 ffffffff 00c00000".into(),
        "FS =0000 0000000000000000 ffffffff 00c00000".into(),
        "GS =0000 ffff88807dc00000 ffffffff 00c00000".into(),
        "LDT=0000 0000000000000000 ffffffff 00c00000".into(),
        "TR =0040 fffffe0000003000 00004087 00008b00 DPL=0 TSS64-busy".into(),
        "GDT=     fffffe0000001000 0000007f".into(),
        "IDT=     fffffe0000000000 00000fff".into(),
        "CR0=80050033 CR2=0000000000000000 CR3=000000000260a000 CR4=000006f0".into(),
        "DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000".into(),
        "DR6=00000000ffff0ff0 DR7=0000000000000400".into(),
        "EFER=0000000000000d01".into(),
    ];
    lines.iter().map(|l| format!("{l}\r\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmp_numbers_and_formats() {
        assert_eq!(number("0x2007"), Some(0x2007));
        assert_eq!(number("7"), Some(7));
        assert_eq!(number("0xzz"), None);
        assert_eq!(split_format(&["/b", "0x2007", "1"]), (1, &["0x2007", "1"][..]));
        assert_eq!(split_format(&["/w", "0xe0"]), (4, &["0xe0"][..]));
        assert_eq!(split_format(&["/h", "0xe0"]).0, 2);
        assert_eq!(split_format(&["0x2007", "1"]), (1, &["0x2007", "1"][..]));
    }

    #[test]
    fn elf_header_is_a_core_file() {
        let h = elf_core_header();
        assert_eq!(&h[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([h[16], h[17]]), 4);
    }
}
