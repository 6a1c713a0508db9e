use std::time::Duration;

use serde_json::json;

use super::gdb::{decode_registers, frame, layout, next_frame, unescape, x86_64_core, Frame, Reg};
use super::*;

fn step(toml_text: &str) -> Result<Step, String> {
    toml::from_str::<toml::Table>(toml_text)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::Value::Table(t).try_into::<Step>().map_err(|e| e.message().to_string()))
}

#[test]
fn steps_parse_flat_with_per_kind_default_timeouts() {
    let s = step("step = \"sysrq\"\nkeys = \"wl\"\ntimeout = \"10s\"").unwrap();
    assert_eq!(s.timeout, Duration::from_secs(10));
    let StepSpec::Sysrq { keys, allow_destructive, per_key, quiet, chardev } = &s.spec else {
        panic!("{s:?}")
    };
    assert_eq!((keys.as_str(), *allow_destructive, chardev.as_str()), ("wl", false, "acpimon-console"));
    assert_eq!((*per_key, *quiet), (Duration::from_secs(5), Duration::from_millis(500)));

    assert_eq!(step("step = \"qmp-status\"").unwrap(), Step::new(StepSpec::QmpStatus {}));
    assert_eq!(step("step = \"qmp-status\"").unwrap().timeout, Duration::from_secs(5));
    let dump = step("step = \"memory-dump\"\nmax_bytes = \"64MiB\"").unwrap();
    assert_eq!(dump.spec, StepSpec::MemoryDump { max_bytes: 64 << 20 });
    assert_eq!(dump.timeout, Duration::from_secs(120));
    let tail = step("step = \"console-tail\"\nsettle = \"2s\"").unwrap();
    assert_eq!(tail.spec, StepSpec::ConsoleTail { settle: Duration::from_secs(2) });
    let script = step("step = \"script\"\nargv = [\"/bin/echo\", \"hi\"]\ntimeout = \"1m\"").unwrap();
    assert_eq!(script.timeout, Duration::from_secs(60));
}

#[test]
fn bad_steps_are_refused_with_the_fix() {
    let e = step("step = \"qmp-status\"\nbogus = 1").unwrap_err();
    assert!(e.contains("unknown field `bogus`"), "{e}");
    let e = step("step = \"frobnicate\"").unwrap_err();
    assert!(e.contains("unknown variant `frobnicate`") && e.contains("memory-dump"), "{e}");
    let e = step("step = \"sysrq\"\nkeys = \"wc\"").unwrap_err();
    assert!(e.contains("'c' (crash (panic))") && e.contains("allow_destructive = true"), "{e}");
    assert!(step("step = \"sysrq\"\nkeys = \"wc\"\nallow_destructive = true").is_ok());
    let e = step("step = \"sysrq\"\nkeys = \"w!\"").unwrap_err();
    assert!(e.contains("not a SysRq key"), "{e}");
    let e = step("step = \"sysrq\"\nkeys = \"\"").unwrap_err();
    assert!(e.contains("1 to 32 keys"), "{e}");
    let e = step("step = \"script\"\nargv = []").unwrap_err();
    assert!(e.contains("argv must name a program"), "{e}");
    let e = step("step = \"gdbstub\"\ntimeout = \"soon\"").unwrap_err();
    assert!(e.contains("not a duration"), "{e}");
    let e = step("step = \"gdbstub\"\ntimeout = 5").unwrap_err();
    assert!(e.contains("timeout = \"5s\""), "{e}");
    let e = step("step = \"gdbstub\"\ntimeout = \"0s\"").unwrap_err();
    assert!(e.contains("more than zero"), "{e}");
    let e = step("step = \"memory-dump\"\nmax_bytes = \"lots\"").unwrap_err();
    assert!(e.contains("not a size"), "{e}");
    let e = step("keys = \"w\"").unwrap_err();
    assert!(e.contains("step"), "{e}");
}

#[test]
fn steps_serialise_back_to_the_same_flat_form() {
    for s in default_steps().into_iter().chain([
        Step::new(StepSpec::MemoryDump { max_bytes: 1 << 20 }),
        Step {
            spec: StepSpec::Script { argv: vec!["/bin/true".into()] },
            timeout: Duration::from_millis(1500),
        },
        Step::new(StepSpec::Gdbstub {}),
        Step::new(StepSpec::InjectNmi { capture: Duration::from_secs(2), quiet: Duration::from_millis(300) }),
    ]) {
        let text = toml::to_string(&s).unwrap();
        assert!(
            text.contains(&format!("step = \"{}\"", s.spec.name())) && text.contains("timeout = "),
            "{text}"
        );
        assert_eq!(step(&text).unwrap(), s, "{text}");
    }
}

#[test]
fn default_steps_are_the_non_intrusive_ones() {
    let names: Vec<_> = default_steps().iter().map(|s| s.spec.name()).collect();
    assert_eq!(
        names,
        ["host", "console-tail", "sysrq", "kernel-log", "qmp-status", "qmp-cpus", "registers", "guest-agent"]
    );
    assert!(default_steps().iter().all(|s| s.spec.validate().is_ok()));
}

#[test]
fn files_are_capped_with_a_note() {
    assert_eq!(cap(b"short", 100, Keep::Head), b"short");
    let big = vec![b'a'; 10_000];
    let head = cap(&big, 1000, Keep::Head);
    assert!(
        head.len() <= 1000
            && String::from_utf8_lossy(&head).ends_with("[acpimon: 9100 more bytes dropped]\n")
    );
    let tail = cap(&big, 1000, Keep::Tail);
    assert!(
        tail.len() <= 1000
            && String::from_utf8_lossy(&tail).starts_with("[acpimon: 9100 earlier bytes dropped]\n")
    );
}

#[test]
fn gdb_frames() {
    assert_eq!(frame("g"), b"$g#67");
    assert_eq!(frame("qfThreadInfo"), b"$qfThreadInfo#bb");
    // Acks and stray bytes are dropped; QEMU 7.2's stop reply is a packet like any other.
    let mut buf = b"++$T02thread:01;#04+$OK#9a-$O".to_vec();
    assert_eq!(next_frame(&mut buf), Some(Frame::Packet(b"T02thread:01;".to_vec())));
    assert_eq!(next_frame(&mut buf), Some(Frame::Packet(b"OK".to_vec())));
    assert_eq!(next_frame(&mut buf), Some(Frame::Nack));
    assert_eq!(next_frame(&mut buf), None, "incomplete");
    buf.extend_from_slice(b"K#00");
    assert_eq!(next_frame(&mut buf), Some(Frame::Bad), "bad checksum");
    assert!(buf.is_empty());
    // Escapes and run-length encoding: "0* " is '0' repeated 3 more times (' ' = 32 = 29 + 3).
    assert_eq!(unescape(b"a}\x03b0* "), b"a#b0000");
}

/// `info registers`-equivalent values of a real 'g' reply (QEMU 10.0, Linux idle in
/// native_safe_halt), decoded with the register list QEMU's i386-64bit.xml gives.
#[test]
fn gdb_registers_decode_with_the_target_description() {
    let xml = r#"<?xml version="1.0"?><feature name="org.gnu.gdb.i386.core">
      <reg name="rax" bitsize="64" type="int64" regnum="0"/><reg name="rbx" bitsize="64" type="int64"/>
      <reg name="rcx" bitsize="64"/><reg name="rdx" bitsize="64"/><reg name="rsi" bitsize="64"/>
      <reg name="rdi" bitsize="64"/><reg name="rbp" bitsize="64"/><reg name="rsp" bitsize="64"/>
      <reg name="r8" bitsize="64"/><reg name="r9" bitsize="64"/><reg name="r10" bitsize="64"/>
      <reg name="r11" bitsize="64"/><reg name="r12" bitsize="64"/><reg name="r13" bitsize="64"/>
      <reg name="r14" bitsize="64"/><reg name="r15" bitsize="64"/>
      <reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="x64_eflags"/>
      <reg name="cs" bitsize="32" type="int32"/>
      <!--reg name="ss_base" bitsize="64" type="int64"/-->
      <reg name="ss" bitsize="32" type="int32"/></feature>"#;
    let regs = layout(xml);
    assert_eq!(regs.len(), 20, "the commented-out register is not one: {regs:?}");
    assert_eq!(regs[16], Reg { name: "rip".into(), bits: 64 });
    assert_eq!(regs[..17], x86_64_core()[..17]);
    let g = "40ad0100000000000000000000000000000000000000000000000000000000400000000000000000740000000000000040aaa182ffffffff983ea082ffffffff0400000000000000def4a63700000000fbffffff0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000eb92a581ffffffff4602000010000000180000000000000000000000";
    let v = decode_registers(&regs, g);
    let get = |n: &str| v.iter().find(|(name, _)| name == n).unwrap().1.clone().unwrap();
    assert_eq!(get("rax"), "0x000000000001ad40");
    assert_eq!(get("rdx"), "0x4000000000000000");
    assert_eq!(get("rsp"), "0xffffffff82a03e98");
    assert_eq!(get("rip"), "0xffffffff81a592eb");
    assert_eq!(get("eflags"), "0x00000246");
    assert_eq!(get("cs"), "0x00000010");
    assert_eq!(get("ss"), "0x00000018");
    // Unavailable registers and a short reply.
    let v = decode_registers(&x86_64_core(), &format!("{}{}", "xx".repeat(8), "01".repeat(8)));
    assert_eq!(v, vec![("rax".into(), None), ("rbx".into(), Some("0x0101010101010101".into()))]);
    // Explicit regnums with a gap: `g` stops at the gap.
    let gap = layout(r#"<reg name="a" bitsize="32" regnum="0"/><reg name="b" bitsize="32" regnum="2"/>"#);
    assert_eq!(gap, vec![Reg { name: "a".into(), bits: 32 }]);
}

#[tokio::test]
async fn without_channels_every_step_is_skipped_and_the_manifest_written() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b/c");
    let target = Target {
        vm: "vm1",
        qmp: None,
        console: None,
        gdb_socket: dir.path().join("gdb.sock"),
        guest_agent: None,
        host: Default::default(),
        kernel_log: None,
    };
    let trigger = Trigger {
        kind: "unresponsive".into(),
        time: units::now_rfc3339(),
        reason: "3 heartbeats missed".into(),
        evidence: json!({ "missed": 3 }),
    };
    let mut steps = default_steps();
    steps.push(Step::new(StepSpec::MemoryDump { max_bytes: 1 }));
    steps.push(Step::new(StepSpec::Gdbstub {}));
    steps.push(Step::new(StepSpec::InjectNmi {
        capture: Duration::from_secs(1),
        quiet: Duration::from_secs(1),
    }));
    let timeline = vec![json!({ "time": "t", "state": "healthy" })];
    let m = collect(&steps, &target, &trigger, timeline.clone(), &bundle).await.unwrap();
    assert_eq!(m.schema, SCHEMA);
    assert_eq!(m.steps.len(), steps.len());
    // The host step reads the node without any channel to the VM, and says what it lacked.
    let host = m.step("host").unwrap();
    assert_eq!((host.outcome, host.file.as_deref()), (Outcome::Ok, Some("01-host.json")), "{host:?}");
    let report: crate::host::HostReport =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("01-host.json")).unwrap()).unwrap();
    assert!(report.node.cpus >= 1 && report.qemu.is_none(), "{report:?}");
    assert!(report.notes.iter().any(|n| n.contains("no QMP connection")), "{:?}", report.notes);
    assert!(report.notes.iter().any(|n| n.contains("pid is not visible")), "{:?}", report.notes);
    for s in m.steps.iter().filter(|s| s.name != "host") {
        assert_eq!(s.outcome, Outcome::Skipped, "{s:?}");
        assert!(s.reason.as_deref().unwrap().starts_with("no "), "{s:?}");
        assert_eq!((s.file.as_deref(), s.bytes), (None, 0));
    }
    let text = std::fs::read_to_string(bundle.join("manifest.json")).unwrap();
    let back: Manifest = serde_json::from_str(&text).unwrap();
    assert_eq!(back, m);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["steps"][1]["outcome"], "skipped");
    assert_eq!(v["steps"][1]["file"], serde_json::Value::Null, "keys are always present");
    assert_eq!(v["timeline"], json!(timeline));
    assert_eq!(v["trigger"]["evidence"]["missed"], 3);
    assert!(!bundle.join(".manifest.json.tmp").exists());
}

/// The guest-waiting steps share the deadline: a guest agent that accepts and never answers
/// gets what is left, the next one nothing (skipped, saying why); a host-side step still runs.
#[tokio::test]
async fn the_deadline_bounds_the_steps_that_wait_on_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    // Accepts and holds every connection, saying nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            held.push(c);
        }
    });
    let target = Target {
        vm: "vm1",
        qmp: None,
        console: None,
        gdb_socket: dir.path().join("gdb.sock"),
        guest_agent: Some(sock),
        host: Default::default(),
        kernel_log: None,
    };
    let trigger = Trigger {
        kind: "unresponsive".into(),
        time: units::now_rfc3339(),
        reason: "test".into(),
        evidence: json!({}),
    };
    let steps = vec![
        Step::new(StepSpec::GuestAgent {}),
        Step::new(StepSpec::GuestAgent {}),
        Step { spec: StepSpec::Script { argv: vec!["/bin/true".into()] }, timeout: Duration::from_secs(5) },
    ];
    let opts = Options { deadline: Some(Duration::from_secs(1)), ..Options::default() };
    let t0 = std::time::Instant::now();
    let m = collect_with(&steps, &target, &trigger, vec![], &dir.path().join("b"), &opts).await.unwrap();
    silent.abort();
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}: {m:#?}", t0.elapsed());
    assert_ne!(m.steps[0].outcome, Outcome::Ok, "{:?}", m.steps[0]);
    assert!(m.steps[0].duration_ms <= 1500 && m.steps[0].timeout_ms <= 1000, "{:?}", m.steps[0]);
    assert_eq!(m.steps[1].outcome, Outcome::Skipped, "{:?}", m.steps[1]);
    assert!(
        m.steps[1].reason.as_deref().unwrap().starts_with("the bundle's deadline of 1s was used up"),
        "{:?}",
        m.steps[1]
    );
    assert_eq!(m.steps[2].outcome, Outcome::Ok, "{:?}", m.steps[2]);
    // Without channels or registers: a verdict all the same.
    let v = m.verdict.expect("a verdict");
    assert_eq!(v.class, crate::verdict::Class::Unknown);
    assert_eq!(v.headline, "no cause found: no kernel report, and no registers were read");
}

#[tokio::test]
async fn an_unwritable_bundle_directory_is_the_only_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"").unwrap();
    let target = Target {
        vm: "vm1",
        qmp: None,
        console: None,
        gdb_socket: dir.path().join("gdb.sock"),
        guest_agent: None,
        host: Default::default(),
        kernel_log: None,
    };
    let trigger = Trigger {
        kind: "panicked".into(),
        time: String::new(),
        reason: String::new(),
        evidence: json!(null),
    };
    let e = collect(&default_steps(), &target, &trigger, vec![], &file.join("bundle")).await.unwrap_err();
    assert!(matches!(e, DiagnoseError::CreateDir { .. }), "{e}");
}
