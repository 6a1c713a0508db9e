//! The command line: what each command writes, and that every bad input exits non-zero with
//! one line naming the problem and the fix.

mod common;

use common::{acpimon, text};

/// Runs acpimon expecting exit status 2 and exactly one stderr line containing `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let out = acpimon(args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

#[test]
fn bad_table_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.aml");
    let o = out.to_str().unwrap();
    refused(&["ssdt", "--out", o, "--irq", "16"], &["IRQ 16 is out of range", "below 16"]);
    refused(&["ssdt", "--out", o, "--irq", "2"], &["IRQ 2 is taken", "pick a free one"]);
    refused(&["ssdt", "--out", o, "--slot", "2g"], &["PCI slot '2g' is malformed", "e.g. 0f"]);
    refused(&["ssdt", "--out", o, "--slot", "20"], &["0x00-0x1f"]);
    refused(&["ssdt", "--out", o, "--slot", "0f.9"], &["function must be 0-7"]);
    refused(&["ssdt", "--out", o, "--region-size", "5000"], &["not a power of two", "e.g. 4096"]);
    refused(
        &["ssdt", "--out", o, "--region-size", "2048"],
        &["smaller than the 4096 bytes", "at least 4096"],
    );
    refused(&["ssdt", "--out", o, "--region-size", "big"], &["not a number of bytes"]);
    refused(&["ssdt", "--out", o, "--thermal-period-ds", "0"], &["thermal period 0 ds", "1-36000"]);
    refused(&["ssdt", "--out", o, "--thermal-period-ds", "70000"], &["thermal period 70000 ds"]);
    refused(&["ssdt", "--out", o, "--oem-table-id", "WAYTOOLONG"], &["OEM table ID 'WAYTOOLONG'"]);
    assert!(!out.exists(), "nothing written on bad input");
}

#[test]
fn bad_region_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    refused(&["snapshot", &p("missing")], &["does not exist", "acpimon qemu-args --region-path"]);
    common::write(&dir.path().join("small"), &[0u8; 512]);
    refused(&["snapshot", &p("small")], &["is 512 bytes, smaller than the 4096"]);
    common::write(&dir.path().join("zeros"), &[0u8; 4096]);
    refused(&["snapshot", &p("zeros")], &["wrong magic 0x00000000", "create it with `acpimon qemu-args"]);
    let mut future = vec![0u8; 4096];
    future[..8].copy_from_slice(&[b'A', b'M', b'O', b'N', 2, 0, 0, 0]);
    common::write(&dir.path().join("future"), &future);
    refused(&["snapshot", &p("future")], &["ABI version 2 is not supported"]);
    // qemu-args on an existing region of another size: refused, file kept.
    common::write(&dir.path().join("other"), &[7u8; 8192]);
    refused(&["qemu-args", "--region-path", &p("other")], &["is 8192 bytes but 4096 were asked for"]);
    assert_eq!(std::fs::read(dir.path().join("other")).unwrap(), vec![7u8; 8192]);
}

#[test]
fn ssdt_writes_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.aml");
    let r = acpimon(&["ssdt", "--out", out.to_str().unwrap(), "--irq", "7", "--thermal-period-ds", "10"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let t = std::fs::read(&out).unwrap();
    assert_eq!(&t[..4], b"SSDT");
    assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert!(t.windows(4).any(|w| w == b"AMTZ"));
}

#[test]
fn qemu_args_create_the_files_and_print_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("vm1.region");
    let r = region.to_str().unwrap();
    let out = acpimon(&["qemu-args", "--region-path", r, "--region-size", "8K", "--slot", "1e"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let argv = text(&out.stdout);
    let lines: Vec<&str> = argv.lines().collect();
    assert_eq!(lines[0], "-acpitable");
    assert_eq!(lines[1], format!("file={r}.ssdt.aml"));
    assert!(lines
        .contains(&format!("memory-backend-file,id=acpimon-mem,mem-path={r},size=8192,share=on").as_str()));
    assert!(lines.contains(&"ivshmem-plain,id=acpimon-shm,memdev=acpimon-mem,addr=1e.0"));
    assert!(lines.contains(&"pc-testdev,id=acpimon-testdev"));
    assert_eq!(std::fs::metadata(&region).unwrap().len(), 8192);
    assert_eq!(&std::fs::read(format!("{r}.ssdt.aml")).unwrap()[..4], b"SSDT");

    let out = acpimon(&["qemu-args", "--region-path", r, "--region-size", "8K", "--format", "readconfig"]);
    let ini = text(&out.stdout);
    assert!(
        ini.starts_with(
            "# acpimon: a -readconfig file cannot carry these; pass them on the command line: -acpitable file="
        ),
        "{ini}"
    );
    assert!(ini.contains("[object \"acpimon-mem\"]\n  qom-type = \"memory-backend-file\""), "{ini}");
    assert!(ini.contains("[device \"acpimon-testdev\"]\n  driver = \"pc-testdev\""), "{ini}");
}

#[test]
fn snapshot_prints_a_table_json_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("r");
    let r = region.to_str().unwrap();
    assert!(acpimon(&["qemu-args", "--region-path", r]).status.success());

    let out = acpimon(&["snapshot", r]);
    let table = text(&out.stdout);
    assert!(out.status.success());
    assert!(table.contains("(4096 bytes, ABI 1)") && table.contains("none yet"), "{table}");

    let out = acpimon(&["snapshot", r, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["region_size"], 4096);
    assert_eq!(v["record"], serde_json::Value::Null);

    let out = acpimon(&["snapshot", r, "--json", "--watch", "--count", "3", "--interval-ms", "10"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).lines().count(), 1, "one line: the first read, then no new records");
}

#[test]
fn run_refuses_a_colliding_command_line_before_launch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    refused(
        &["run", "--state-dir", d, "--irq", "6", "--", "qemu-system-x86_64", "-M", "pc", "-nodefaults"],
        &["ISA IRQ 6 is used by the floppy controller the pc board always has", "--irq"],
    );
    refused(
        &["run", "--state-dir", d, "--", "qemu-system-x86_64", "-M", "q35", "-device", "e1000,addr=0f.0"],
        &["PCI slot 0f.0 is taken by -device e1000,addr=0f.0", "parallel port", "--slot"],
    );
}

#[test]
fn watch_checks_its_configuration_and_reports_every_problem_with_its_line() {
    let shipped = common::repo().join("dist/watch.toml");
    let out = acpimon(&["watch", "--config", shipped.to_str().unwrap(), "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.contains("scenario acpi-heartbeat"), "{summary}");
    assert!(
        summary.contains("diagnostics \"host\", \"console-tail\", \"sysrq\", \"kernel-log\""),
        "{summary}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("watch.toml");
    common::write(
        &bad,
        b"[[defaults.scenario]]\nkind = \"tcp\"\n\n[[defaults.diagnostic]]\nstep = \"sysrq\"\nkeys = \"c\"\n",
    );
    let out = acpimon(&["watch", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("watch.toml has 2 problems; fix them and start again:"), "{err}");
    assert!(err.contains("watch.toml:1: defaults.scenario 'tcp': needs `address"), "{err}");
    assert!(err.contains("watch.toml:4: defaults.diagnostic:"), "{err}");
    assert!(out.stdout.is_empty());
    refused(
        &["watch", "--config", "/nonexistent/watch.toml"],
        &["/nonexistent/watch.toml", "cannot read it"],
    );
}

#[test]
fn watch_check_prints_words_or_json_never_debug() {
    let shipped = common::repo().join("dist/watch.toml");
    let shipped = shipped.to_str().unwrap();
    let out = acpimon(&["watch", "--config", shipped, "--check"]);
    let summary = text(&out.stdout);
    assert!(summary.contains("(defaults): grace 2m, pauses counts, recovery none"), "{summary}");
    assert!(summary.contains(", kernel log auto every 5s"), "{summary}");
    assert!(!summary.contains("Counts"), "{summary}");

    let out = acpimon(&["watch", "--config", shipped, "--check", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(v["defaults"]["pause"], "counts");
    assert_eq!(
        (&v["defaults"]["kernel_log_follow"], &v["defaults"]["kernel_log_every"]),
        (&"auto".into(), &"5s".into())
    );
    assert_eq!(v["defaults"]["scenario"][0]["kind"], "acpi-heartbeat");
    let steps: Vec<&str> =
        v["defaults"]["diagnostic"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps,
        ["host", "console-tail", "sysrq", "kernel-log", "qmp-status", "qmp-cpus", "registers", "guest-agent"]
    );
    assert_eq!(v["state_dir"], "/run/acpimon");

    let out = acpimon(&["watch", "--config", shipped, "--json"]);
    assert_eq!(out.status.code(), Some(2), "--json only goes with --check");
    assert!(text(&out.stderr).contains("--check"), "{}", text(&out.stderr));
}

#[test]
fn status_without_a_service_says_how_to_find_one() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = acpimon(&["status", "--addr", &format!("127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no acpimon watch answers on 127.0.0.1:"), "{err}");
    assert!(err.contains("--addr"), "{err}");
}

#[test]
fn tokens_are_made_listed_and_revoked_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let f = file.to_str().unwrap();
    let out = acpimon(&["token", "add", "edge-1", "--tokens", f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    assert!(text(&out.stderr).contains("the one time it is shown"));
    assert!(!std::fs::read_to_string(&file).unwrap().contains(&token), "only the hash is stored");
    let out = acpimon(&["token", "add", "alice", "--role", "operator", "--tokens", f]);
    assert!(out.status.success());
    let out = acpimon(&["token", "list", "--tokens", f]);
    let list = text(&out.stdout);
    assert!(
        list.contains("edge-1")
            && list.contains("node")
            && list.contains("alice")
            && list.contains("operator"),
        "{list}"
    );
    let out = acpimon(&["token", "add", "edge-1", "--tokens", f]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("already has a node token"), "{}", text(&out.stderr));
    assert!(acpimon(&["token", "remove", "edge-1", "--tokens", f]).status.success());
    let out = acpimon(&["token", "remove", "edge-1", "--tokens", f]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("has no token for 'edge-1'"), "{}", text(&out.stderr));
    // The controller refuses plain HTTP beyond loopback, with the fix, as bad input.
    let out = acpimon(&["controller", "--listen", "0.0.0.0:0", "--store", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--tls-cert"), "{}", text(&out.stderr));
}

/// The operator commands, as `acpimon --help` lists them (and nothing else: the benchmarks
/// are `acpimon-bench`).
const COMMANDS: [&str; 13] = [
    "ssdt",
    "qemu-args",
    "prepare",
    "run",
    "demo",
    "watch",
    "status",
    "controller",
    "token",
    "dmesg",
    "snapshot",
    "completions",
    "man",
];

#[test]
fn help_lists_only_the_operator_commands() {
    let out = acpimon(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    let listed: Vec<&str> = help
        .split("Commands:\n")
        .nth(1)
        .expect("a command list")
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert_eq!(listed, COMMANDS, "{help}");
    assert!(help.contains("Exit status: 0 success; 1 a runtime failure"), "{help}");
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    let out = acpimon(&["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bash = text(&out.stdout);
    assert!(bash.contains("complete -F _acpimon"), "{bash}");
    for c in COMMANDS {
        assert!(bash.contains(c), "bash completion lacks {c}");
    }
    assert!(bash.contains("--region-path") && bash.contains("--state-dir"), "options complete too");
    let out = acpimon(&["completions", "cmd.exe"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid value 'cmd.exe'"), "{}", text(&out.stderr));

    let out = acpimon(&["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH acpimon 1"), "{page}");
    assert!(page.contains(".SH \"EXIT STATUS\""), "{page}");
    for c in COMMANDS {
        // roff escapes the hyphen of acpimon-COMMAND(1).
        let reference = format!("acpimon\\-{}(1)", c.replace('-', "\\-"));
        assert!(page.contains(&reference), "the man page lacks {reference}:\n{page}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = acpimon(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for c in COMMANDS {
        let sub = std::fs::read_to_string(dir.path().join(format!("acpimon-{c}.1"))).unwrap();
        assert!(sub.contains(&format!(".TH acpimon-{c} 1")), "{sub}");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("acpimon.1")).unwrap(), page);
}

#[test]
fn run_reports_qemus_exit_status_apart_from_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // QEMU refuses an option it does not know and exits 1: acpimon exits 64 + 1.
    let qemu = common::guest::qemu();
    let out = acpimon(&["run", "--state-dir", d, "--", &qemu, "-M", "pc", "-nodefaults", "--no-such-option"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("QEMU exited during start-up (exit status: 1)"), "{err}");
    assert!(err.contains("no-such-option"), "QEMU's own message is shown: {err}");
    // QEMU ending after it ran: a wrapper stops it after 2 s and exits 3, or is killed.
    for (ending, code) in [("exit 3", 67), ("kill -KILL $$", 137)] {
        let script = format!("\"$0\" \"$@\" & q=$!; sleep 2; kill $q; wait $q; {ending}");
        let out = acpimon(&[
            "run",
            "--state-dir",
            d,
            "--",
            "sh",
            "-c",
            &script,
            &qemu,
            "-M",
            "pc",
            "-nodefaults",
            "-display",
            "none",
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{ending}: {err}");
        assert!(err.contains("QEMU exited unsuccessfully"), "{err}");
    }
    // A program that is not there is acpimon's failure, not QEMU's.
    let out = acpimon(&["run", "--state-dir", d, "--", "/nonexistent/qemu", "-M", "pc", "-nodefaults"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot start /nonexistent/qemu"), "{err}");
}

#[test]
fn prepare_finds_the_launchers_console_in_its_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.cfg");
    common::write(
        &cfg,
        b"[chardev \"cons\"]\n  backend = \"socket\"\n  path = \"/run/vm1/cons\"\n  server = \"on\"\n  wait = \"off\"\n  mux = \"on\"\n\n[device \"serial0\"]\n  driver = \"isa-serial\"\n  chardev = \"cons\"\n",
    );
    let state = dir.path().join("state");
    let (s, c) = (state.to_str().unwrap(), cfg.to_str().unwrap());
    let out = acpimon(&["prepare", "vm1", "--state-dir", s, "--launch-config", c, "--format", "readconfig"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("chardev 'cons' (/run/vm1/cons)"), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("isa-serial"),
        "no serial port of acpimon's own: {}",
        text(&out.stdout)
    );
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("vm1/vm.json")).unwrap()).unwrap();
    assert_eq!(vm["console_chardev"], "cons");
    assert_eq!(vm["console"], "/run/vm1/cons");
    assert!(vm["console_share"].as_str().unwrap().ends_with("vm1/console-share.sock"), "{vm}");
    // Told, with the socket: no file needed.
    let out = acpimon(&[
        "prepare",
        "vm2",
        "--state-dir",
        s,
        "--console-chardev",
        "c0",
        "--console-socket",
        "/run/c0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    refused(
        &["prepare", "vm3", "--state-dir", s, "--launch-config", c, "--console-chardev", "nope"],
        &["no chardev 'nope'", "name the chardev"],
    );
    refused(
        &["prepare", "vm3", "--state-dir", s, "--", "-serial", "stdio"],
        &["not a listening Unix socket (backend stdio)"],
    );
}

/// A launcher's merged -readconfig file as EVE writes it: q35, OVMF in pflash drives, a root
/// port per device from slot 4 up (here up to 0x0f), a disk behind the first.
fn eve_config(dir: &std::path::Path, last_port: u8) -> String {
    let mut ini = String::from(
        "[machine]\n  type = \"q35\"\n\n[drive]\n  if = \"pflash\"\n  format = \"raw\"\n  readonly = \"on\"\n  \
         file = \"/usr/share/OVMF/OVMF_CODE_4M.fd\"\n\n[chardev \"cons\"]\n  backend = \"socket\"\n  path = \"/run/cons\"\n  \
         server = \"on\"\n  wait = \"off\"\n  mux = \"on\"\n\n[device \"serial0\"]\n  driver = \"isa-serial\"\n  chardev = \"cons\"\n",
    );
    for n in 4..=last_port {
        ini.push_str(&format!(
            "\n[device \"pci.{n}\"]\n  driver = \"pcie-root-port\"\n  bus = \"pcie.0\"\n  addr = \"{n:#x}\"\n"
        ));
    }
    ini.push_str(
        "\n[device \"disk0\"]\n  driver = \"virtio-blk-pci\"\n  bus = \"pci.4\"\n  addr = \"0x0\"\n",
    );
    let path = dir.join("vm.cfg");
    std::fs::write(&path, ini).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn prepare_checks_the_launchers_config_file_and_picks_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cfg = eve_config(dir.path(), 0x0f);
    refused(
        &["prepare", "vm", "--state-dir", d, "--launch-config", &cfg],
        &[
            "PCI slot 0f.0 is taken by [device \"pci.15\"] (driver = \"pcie-root-port\"",
            "vm.cfg:",
            "--slot auto",
        ],
    );
    assert!(!dir.path().join("vm").exists(), "a refused prepare writes nothing");
    refused(
        &["prepare", "vm", "--state-dir", d, "--launch-config", &cfg, "--irq", "4"],
        &["ISA IRQ 4", "serial0", "--irq"],
    );
    refused(
        &["prepare", "vm", "--state-dir", d, "--launch-config", &format!("{d}/none.cfg")],
        &["cannot read the QEMU config file"],
    );

    let out = acpimon(&[
        "prepare",
        "vm",
        "--state-dir",
        d,
        "--launch-config",
        &cfg,
        "--slot",
        "auto",
        "--format",
        "readconfig",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ini = text(&out.stdout);
    assert!(ini.contains("  addr = \"1e.0\""), "the highest free slot: {ini}");
    assert!(
        ini.contains("[fw_cfg]\n  name = \"opt/ovmf/X-PciMmio64Mb\"\n  string = \"0\""),
        "OVMF from the pflash drive: {ini}"
    );
    let err = text(&out.stderr);
    assert!(err.contains("OVMF ([drive] (if = \"pflash\")") && err.contains("phys-bits=37"), "{err}");
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("vm/vm.json")).unwrap()).unwrap();
    assert_eq!(vm["slot"], "1e.0");
}

#[test]
fn prepare_prints_options_for_the_qemu_it_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec!["prepare", "vm", "--state-dir", d];
        a.extend_from_slice(extra);
        let out = acpimon(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(args(&[]).contains("-action\npanic=none"), "the installed QEMU 10 has -action");
    assert!(args(&["--qemu-version", "7.2"]).contains("-action\npanic=none"));
    let out = acpimon(&["prepare", "vm", "--state-dir", d, "--qemu-version", "5.2"]);
    assert!(
        text(&out.stderr).contains("QEMU 5.2 has no -action") && text(&out.stderr).contains("-no-shutdown")
    );
    let old = args(&["--qemu-version", "5.2"]);
    assert!(!old.contains("-action") && old.contains("pvpanic"), "{old}");
    assert!(!args(&["--qemu-version", "5.2", "--format", "readconfig"]).contains("[action]"));
    assert!(args(&["--ovmf"]).contains("-fw_cfg\nname=opt/ovmf/X-PciMmio64Mb,string=0"));
    refused(&["prepare", "vm", "--state-dir", d, "--qemu-version", "4.2"], &["older than 5.2"]);
    refused(&["prepare", "vm", "--state-dir", d, "--qemu-version", "five"], &["not a QEMU version"]);
    refused(
        &["prepare", "vm", "--state-dir", d, "--qemu", "/nonexistent/qemu"],
        &["/nonexistent/qemu --version", "--qemu-version"],
    );
}

#[test]
fn run_checks_the_readconfig_files_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let cfg = eve_config(dir.path(), 0x0f);
    refused(
        &["run", "--state-dir", d, "--", "qemu-system-x86_64", "-nodefaults", "-readconfig", &cfg],
        &["PCI slot 0f.0 is taken by [device \"pci.15\"]", "--slot auto"],
    );
    let bad = dir.path().join("bad.cfg");
    std::fs::write(&bad, "[device \"x\"]\n  driver e1000\n").unwrap();
    refused(
        &["run", "--state-dir", d, "--", "qemu-system-x86_64", "-readconfig", bad.to_str().unwrap()],
        &["bad.cfg:2:", "key = \"value\""],
    );
}
