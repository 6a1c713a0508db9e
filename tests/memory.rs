//! The guest kernel's log read from its memory (`acpimon::memory`), against oracles nobody here
//! wrote: the kernel's own console (booted with `console=ttyS0` on acpimon's serial port) and
//! `makedumpfile --dump-dmesg` on an ELF `dump-guest-memory` of the same paused guest; on the
//! kernels of the matrix (5.10, 6.1, 6.12); and the kernel's symbols read from its kallsyms
//! against its own /proc/kallsyms, read over the console. Prints the costs (pmemsave round
//! trips, the log's read, the symbols' read, a RAM scan for VMCOREINFO, a full dump): run with
//! `--nocapture` to see them.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use acpimon::memory::dmesg::{read_log, LogLimits, LogStats};
use acpimon::memory::{kallsyms, vmcoreinfo, Budget, KernelLog, QmpMemory, VmcoreinfoCache};
use common::guest::{manifest_value, Guest, GuestSpec};

/// Kernel lines of a console transcript: those starting with a `[ seconds.micros]` stamp.
fn console_kernel_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| {
            let Some(rest) = l.strip_prefix('[') else { return false };
            let Some((stamp, _)) = rest.split_once("] ") else { return false };
            let stamp = stamp.trim_start();
            stamp.len() >= 8
                && stamp.split_once('.').is_some_and(|(s, us)| {
                    us.len() == 6
                        && s.bytes().all(|b| b.is_ascii_digit())
                        && us.bytes().all(|b| b.is_ascii_digit())
                })
        })
        .map(|l| l.trim_end().to_string())
        .collect()
}

fn decoded_lines(log: &KernelLog) -> Vec<String> {
    log.records
        .iter()
        .flat_map(|r| r.console_lines())
        .map(|l| acpimon::console::sanitize(l.as_bytes()).trim_end().to_string())
        .collect()
}

async fn read(g: &Guest, cache: &mut VmcoreinfoCache, boot: u64) -> (KernelLog, LogStats) {
    let limits = LogLimits { time: Duration::from_secs(60), ..LogLimits::default() };
    read_log(&g.vm.qmp, &g.vm.prepared.dir, cache, boot, &limits)
        .await
        .unwrap_or_else(|e| panic!("reading the kernel log failed: {e}"))
}

/// Whether console line `seen` is `line` with characters dropped (the serial console under
/// TCG loses characters, whole runs of them when the host is loaded): its stamp whole and at
/// least half of the line kept, in order.
fn lossy_copy(seen: &str, line: &str) -> bool {
    if seen == line {
        return true;
    }
    const STAMP: usize = "[    0.000000]".len();
    if seen.len() > line.len() || seen.len() * 2 < line.len() || seen.get(..STAMP) != line.get(..STAMP) {
        return false;
    }
    let mut want = line.chars();
    seen.chars().all(|c| want.by_ref().any(|w| w == c))
}

/// How many of `lines` are in `other` exactly, and which are in it not even as a lossy copy.
fn compare<'a>(lines: &'a [String], other: &[String], lines_lossy: bool) -> (usize, Vec<&'a String>) {
    let exact: BTreeSet<&str> = other.iter().map(String::as_str).collect();
    let mut equal = 0;
    let mut absent = Vec::new();
    for l in lines {
        if exact.contains(l.as_str()) {
            equal += 1;
            continue;
        }
        let found = other.iter().any(|o| if lines_lossy { lossy_copy(l, o) } else { lossy_copy(o, l) });
        if !found {
            absent.push(l);
        }
    }
    (equal, absent)
}

/// The decoded log and the console agree: every kernel line the console printed is a decoded
/// line (timestamp and text), and every decoded record the console should have printed (level
/// below the console's 7, in the console's time span) is on it. The console is the lossy side
/// (the serial port under TCG drops characters, more when the host is loaded): a console line
/// must be a decoded one with characters dropped ([`lossy_copy`]) and a decoded line must be on
/// the console at least that way; all but 1 line in 10, as a line that lost its newline or its
/// stamp matches neither way. Most lines must arrive whole (the strict oracle is makedumpfile's).
fn assert_matches_console(kernel: &str, log: &KernelLog, console: &str) {
    let on_console = console_kernel_lines(console);
    assert!(on_console.len() > 50, "{kernel}: too few kernel lines on the console:\n{console}");
    let decoded = decoded_lines(log);
    let (equal, missing) = compare(&on_console, &decoded, true);
    assert!(
        missing.len() * 10 <= on_console.len(),
        "{kernel}: {} of {} console lines are not in the decoded log, e.g. {:#?}",
        missing.len(),
        on_console.len(),
        &missing[..missing.len().min(10)]
    );
    // Most lines arrive whole: a lossy match everywhere would mean a broken comparison.
    assert!(
        equal * 2 >= on_console.len(),
        "{kernel}: only {equal} of {} console lines are exact",
        on_console.len()
    );
    let last = on_console.last().unwrap().clone();
    let shown: Vec<String> = log
        .records
        .iter()
        .filter(|r| r.level < 7 && r.prefix().as_str() <= last.as_str())
        .flat_map(|r| r.console_lines())
        .map(|l| acpimon::console::sanitize(l.as_bytes()).trim_end().to_string())
        .collect();
    assert!(shown.len() > 50, "{kernel}: too few decoded lines: {decoded:#?}");
    let (_, absent) = compare(&shown, &on_console, false);
    assert!(
        absent.len() * 10 <= shown.len(),
        "{kernel}: {} of {} decoded lines are not on the console, e.g. {:#?}",
        absent.len(),
        shown.len(),
        &absent[..absent.len().min(10)]
    );
    assert_eq!(log.dropped, 0);
    println!(
        "{kernel}: {} records ({} skipped), {} console kernel lines ({equal} exact, {} not decoded), {} decoded \
         lines not on the console",
        log.records.len(),
        log.skipped,
        on_console.len(),
        missing.len(),
        absent.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Boots `kernel`'s fixture with its console on acpimon's port (and `append` on its command
/// line), reads the log and compares.
async fn log_equals_console(kernel: Option<&'static str>, append: &[&str]) -> (Guest, KernelLog) {
    let append = append.iter().map(|s| s.to_string()).collect();
    let g = Guest::boot(GuestSpec { kernel, append, ..GuestSpec::new("pc") }).await;
    let name = manifest_value(g.fixture, "kernel_release");
    let console = g.vm.console().unwrap().since(0);
    let mut cache = VmcoreinfoCache::default();
    let (log, stats) = read(&g, &mut cache, 1).await;
    println!("{name}: live read: {stats:?}");
    assert_eq!(stats.osrelease.as_deref(), Some(name.as_str()), "VMCOREINFO of another kernel");
    assert_eq!(stats.vmcoreinfo, "device", "{name}: the guest's qemu_fw_cfg did not publish VMCOREINFO");
    assert!(log.records[0].text.starts_with("Linux version "), "{name}: {:?}", log.records[0]);
    assert_matches_console(&name, &log, &console);
    // Again for the same boot: from the cache, no discovery.
    let (again, stats) = read(&g, &mut cache, 1).await;
    assert_eq!(stats.vmcoreinfo, "cache");
    assert!(again.records.len() >= log.records.len());
    (g, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_equals_the_console_and_makedumpfile_on_6_1() {
    common::require("makedumpfile");
    let (g, log) = log_equals_console(None, &[]).await;
    // Debian's default ring: the static one in the kernel image, 128 KiB of text.
    assert_eq!(log.ring_text_bytes, 128 << 10);
    let qmp = &g.vm.qmp;
    let dir = g.vm.prepared.dir.clone();

    // What one pmemsave round trip costs, by size (the reader's chunk is CHUNK).
    let mut mem = QmpMemory::new(qmp, &dir, Budget::new(1 << 30, Duration::from_secs(60)));
    for size in [4096u64, 64 << 10, 1 << 20] {
        let start = Instant::now();
        for i in 0..20 {
            mem.fetch(0x100000 + i * size, size).await.unwrap();
        }
        println!("pmemsave of {size} bytes: {:.2} ms per round trip", ms(start.elapsed()) / 20.0);
    }

    // Without the device's note: a scan of RAM finds the same note.
    let start = Instant::now();
    let (scanned, found) = vmcoreinfo::scan_ram(qmp, &dir, Duration::from_secs(120), vmcoreinfo::SCAN_MAX)
        .await
        .expect("the scan finds VMCOREINFO");
    println!("VMCOREINFO by scan: {found:?} in {:.0} ms", ms(start.elapsed()));
    let (device, _) = vmcoreinfo::discover(qmp, &dir, Duration::from_secs(30), 0).await.unwrap();
    assert_eq!(scanned, device, "the scan found another note than the device's");

    // Paused, the ring holds still: the decoded records are makedumpfile's, line for line.
    qmp.execute(qapi::qmp::stop {}).await.unwrap();
    let (log, stats) = read(&g, &mut VmcoreinfoCache::default(), 1).await;
    println!("paused read: {stats:?}");
    // Two full dumps of the same paused guest: raw ELF (the cheapest), and kdump-zlib
    // (compressed; what makedumpfile reads: it refuses QEMU's ELF without paging).
    let elf = full_dump(qmp, &dir, qapi::qmp::DumpGuestMemoryFormat::elf, "full.elf").await;
    let _ = std::fs::remove_file(&elf);
    let kdump = full_dump(qmp, &dir, qapi::qmp::DumpGuestMemoryFormat::kdump_zlib, "full.kdump").await;
    println!(
        "the log's read: {} ms, {} KiB in {} pmemsave calls",
        stats.elapsed_ms,
        stats.bytes >> 10,
        stats.pmemsave_calls
    );
    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    let theirs = makedumpfile_dmesg(&kdump);
    let _ = std::fs::remove_file(&kdump);
    // makedumpfile prints a multi-line record's further lines without the stamp: compare the
    // stamped lines, each record's first.
    let ours: Vec<String> = log
        .records
        .iter()
        .map(|r| format!("{}{}", r.prefix(), r.text.split('\n').next().unwrap()).trim_end().to_string())
        .collect();
    let theirs: Vec<String> =
        theirs.lines().filter(|l| l.starts_with('[')).map(|l| l.trim_end().to_string()).collect();
    assert_eq!(ours.len(), theirs.len(), "record counts differ");
    let differ: Vec<(&String, &String)> = ours.iter().zip(&theirs).filter(|(a, b)| a != b).collect();
    // Only non-printable bytes, which makedumpfile escapes as \xNN, may differ.
    assert!(differ.iter().all(|(_, b)| b.contains("\\x")), "records differ from makedumpfile's: {differ:#?}");
    println!(
        "makedumpfile --dump-dmesg: {} records, all equal ({} differ only in escaping)",
        theirs.len(),
        differ.len()
    );
}

/// A full `dump-guest-memory` into `dir/file`, timed.
async fn full_dump(
    qmp: &acpimon::trigger::qmp::Qmp,
    dir: &Path,
    format: qapi::qmp::DumpGuestMemoryFormat,
    file: &str,
) -> std::path::PathBuf {
    let path = dir.join(file);
    let cmd = qapi::qmp::dump_guest_memory {
        paging: false,
        protocol: format!("file:{}", path.display()),
        detach: Some(false),
        format: Some(format),
        begin: None,
        length: None,
    };
    let start = Instant::now();
    qmp.execute_within(cmd, Duration::from_secs(300)).await.unwrap();
    let took = start.elapsed();
    let size = std::fs::metadata(&path).unwrap().len();
    println!("full dump-guest-memory ({file}): {:.0} ms, {:.1} MiB", ms(took), size as f64 / 1048576.0);
    path
}

/// `makedumpfile --dump-dmesg` on QEMU's flattened kdump `dump` (first made a plain kdump
/// file with `makedumpfile -R`); it reads VMCOREINFO from the dump.
fn makedumpfile_dmesg(dump: &Path) -> String {
    let (plain, out) = (dump.with_extension("plain"), dump.with_extension("dmesg"));
    let input = std::fs::File::open(dump).unwrap();
    let r = common::run(std::process::Command::new("makedumpfile").arg("-R").arg(&plain).stdin(input));
    assert!(
        r.status.success(),
        "makedumpfile -R failed: {}{}",
        common::text(&r.stdout),
        common::text(&r.stderr)
    );
    let r = common::run(std::process::Command::new("makedumpfile").arg("--dump-dmesg").arg(&plain).arg(&out));
    assert!(
        r.status.success(),
        "makedumpfile failed: {}{}",
        common::text(&r.stdout),
        common::text(&r.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&plain);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_equals_the_console_on_5_10() {
    log_equals_console(Some("bullseye"), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_equals_the_console_on_6_12() {
    log_equals_console(Some("trixie"), &[]).await;
}

/// `log_buf_len=` moves the ring out of the kernel image into memory allocated at boot (the
/// direct map, under KASLR's randomised base): read through the kernel's page tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_allocated_at_boot_is_read_through_the_page_tables() {
    let (_g, log) = log_equals_console(None, &["log_buf_len=1M"]).await;
    assert_eq!(log.ring_text_bytes, 1 << 20);
}

/// 5-level paging (`-cpu max` has LA57 under TCG, and Debian's kernel enables it when booted
/// through its decompressor: the bzImage, here under OVMF; PVH skips it): a ring allocated at
/// boot is read through the five levels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_level_page_tables_are_walked() {
    let g = Guest::boot(GuestSpec {
        firmware: common::guest::Firmware::Ovmf,
        extra: vec!["-cpu".into(), "max".into()],
        append: vec!["log_buf_len=1M".into()],
        ..GuestSpec::new("pc")
    })
    .await;
    let (info, _) =
        vmcoreinfo::discover(&g.vm.qmp, &g.vm.prepared.dir, Duration::from_secs(30), 0).await.unwrap();
    assert_eq!(info.number("pgtable_l5_enabled"), Some(1), "the guest did not enable 5-level paging");
    let console = g.vm.console().unwrap().since(0);
    let (log, _) = read(&g, &mut VmcoreinfoCache::default(), 1).await;
    assert_eq!(log.ring_text_bytes, 1 << 20);
    assert_matches_console("5-level", &log, &console);
}

/// A panicked guest (SysRq c; pvpanic keeps it as it is) whose console is not read: its log
/// holds the panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_guests_log_holds_the_panic() {
    let g = Guest::boot(GuestSpec { scenario: "panic", delay: 1, ..GuestSpec::new("pc") }).await;
    let mut events = g.vm.qmp.events();
    common::guest::next_qmp_event(&mut events, "GUEST_PANICKED", Duration::from_secs(60)).await;
    let (log, stats) = read(&g, &mut VmcoreinfoCache::default(), 1).await;
    println!("panicked guest: {stats:?}");
    let panic = log.records.iter().find(|r| r.text.starts_with("Kernel panic - not syncing"));
    let panic =
        panic.unwrap_or_else(|| panic!("no panic in the log: {:#?}", &log.records[log.records.len() - 20..]));
    assert_eq!(panic.level, 0, "the panic is logged as KERN_EMERG: {panic:?}");
    assert!(
        log.records.iter().any(|r| r.text.contains("sysrq: Trigger a crash")),
        "{:#?}",
        log.records.last()
    );
}

/// A watched guest whose kernel prints on `tty0`, not on acpimon's serial port, panics: the
/// console says nothing, but the bundle's `kernel-log` step read the log from memory, with the
/// panic, and the verdict quotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_with_the_console_elsewhere_is_in_the_bundles_kernel_log_and_verdict() {
    let work = tempfile::Builder::new().prefix("acpimon-memory").tempdir_in("/tmp").unwrap();
    let spec = GuestSpec {
        watched: true,
        scenario: "panic",
        delay: 8,
        kernel_console: "tty0",
        extra: vec!["-S".into()],
        ..GuestSpec::new("pc")
    };
    let g = Guest::boot(spec).await;
    let svc = common::service::watch_guest(&g, work.path(), "[defaults]\nstartup_grace = \"90s\"\n").await;
    let b = svc
        .wait_event("panicked bundle", Duration::from_secs(120), |e| {
            e.kind == "bundle" && e.detail["manifest"]["trigger"]["kind"] == "panicked"
        })
        .await;
    let tail = common::service::step_file(&b, "console-tail");
    assert!(!tail.contains("Kernel panic"), "the console should not have the kernel's log: {tail}");
    let step = common::service::step(&b.detail["manifest"], "kernel-log");
    assert_eq!(step["outcome"], "ok", "{step:#}");
    assert!(step["summary"]["records"].as_u64().unwrap() > 50, "{step:#}");
    let log = common::service::step_file(&b, "kernel-log");
    assert!(log.contains("] Kernel panic - not syncing: sysrq triggered crash"), "{log}");
    let v = &b.detail["manifest"]["verdict"];
    assert_eq!(v["class"], "panic", "{v:#}");
    assert!(
        v["headline"]
            .as_str()
            .unwrap()
            .starts_with("the guest kernel panicked: not syncing: sysrq triggered crash"),
        "{v:#}"
    );
    // No [diagnostics] symbols: the verdict has the guest's own (6.1 publishes its kallsyms),
    // read by the same step, and names the functions the vCPUs are in.
    let summary = &step["summary"]["symbols"];
    assert!(summary["count"].as_u64().unwrap_or(0) > 20_000, "{step:#}");
    println!("kallsyms in the kernel-log step: {summary}");
    let evidence = v["evidence"].as_array().unwrap();
    let line = |e: &serde_json::Value| e["line"].as_str().unwrap_or_default().to_string();
    let release = manifest_value(g.fixture, "kernel_release");
    assert!(
        evidence.iter().any(|e| e["source"] == "symbols"
            && line(e).ends_with(&format!(" symbols from the guest's kallsyms ({release})"))),
        "{v:#}"
    );
    assert!(
        evidence.iter().any(|e| {
            let l = line(e);
            l.contains("(kernel text) ")
                && l.split("(kernel text) ").nth(1).is_some_and(|r| r.contains("+0x"))
        }),
        "no symbolised RIP: {v:#}"
    );
}

/// Guest RAM in a shared file (`memory-backend-file,share=on`): `acpimon dmesg --ram-file`
/// reads the same log as through QMP, without QMP, here while the test's own client holds the
/// VM's monitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_ram_file_gives_the_same_log_without_qmp() {
    let state = tempfile::Builder::new().prefix("acpimon-ramfile").tempdir_in("/tmp").unwrap();
    let ram = state.path().join("guest-ram");
    let g = Guest::boot(GuestSpec {
        state_dir: Some(state.path().into()),
        extra: vec![
            "-object".into(),
            format!("memory-backend-file,id=test-ram,size=256M,mem-path={},share=on", ram.display()),
            "-machine".into(),
            "memory-backend=test-ram".into(),
        ],
        ..GuestSpec::new("pc")
    })
    .await;
    let (log, _) = read(&g, &mut VmcoreinfoCache::default(), 1).await;
    let dir = state.path().to_str().unwrap();
    let out = common::acpimon(&["dmesg", "guest", "--state-dir", dir, "--ram-file", ram.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let text = common::text(&out.stdout);
    let through_qmp: Vec<String> = log
        .records
        .iter()
        .flat_map(|r| r.console_lines())
        .map(|l| acpimon::console::sanitize(l.as_bytes()))
        .collect();
    assert!(through_qmp.len() > 100);
    assert!(
        text.starts_with(&through_qmp.join("\n")),
        "the file's log is not the QMP one:\n{text}\n---\n{}",
        through_qmp.join("\n")
    );
}

/// `acpimon dmesg NAME --state-dir DIR` beside a running guest (the test's own handle on a
/// second monitor): dmesg's lines, and `--json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acpimon_dmesg_prints_the_log() {
    let state = tempfile::Builder::new().prefix("acpimon-dmesg").tempdir_in("/tmp").unwrap();
    let _g = Guest::boot(GuestSpec {
        watched: true,
        state_dir: Some(state.path().into()),
        ..GuestSpec::new("pc")
    })
    .await;
    let dir = state.path().to_str().unwrap().to_string();
    // --follow from the start of the boot: the records come as the kernel writes them.
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_acpimon"))
        .args(["dmesg", "guest", "--state-dir", &dir, "--follow", "-q"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let followed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Run /init as init process");
            lines.push(line);
            if done {
                break;
            }
        }
        lines
    });
    let followed = tokio::time::timeout(Duration::from_secs(120), followed).await;
    let _ = follow.kill();
    let _ = follow.wait();
    let followed = followed.expect("--follow printed /init's start within 120 s").unwrap();
    assert!(followed[0].starts_with("[    0.000000] Linux version "), "{followed:#?}");

    let out = common::acpimon(&["dmesg", "guest", "--state-dir", &dir]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let text = common::text(&out.stdout);
    assert!(
        text.starts_with(&followed.join("\n")),
        "the log is what --follow printed (each record once), and more"
    );
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("[    0.000000] Linux version "), "{first}");
    assert!(console_kernel_lines(&text).len() == text.lines().count(), "every line is stamped:\n{text}");
    let out = common::acpimon(&["dmesg", "guest", "--state-dir", &dir, "--json"]);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let records: Vec<serde_json::Value> =
        common::text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records[0]["seq"], 0);
    assert_eq!(records[0]["ts_nsec"], 0);
    assert!(records[0]["text"].as_str().unwrap().starts_with("Linux version "));
    assert!(records.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    // A VM that does not exist: bad input, naming the fix.
    let out = common::acpimon(&["dmesg", "nosuchvm", "--state-dir", &dir]);
    assert_eq!(out.status.code(), Some(2), "{}", common::text(&out.stderr));
    assert!(common::text(&out.stderr).contains("acpimon prepare"), "{}", common::text(&out.stderr));
}

/// Lines of the guest's own /proc/kallsyms for `names` (and their aliases of other types),
/// read over its console from the fixture's shell: `(address, type, name, module)`. The
/// serial console under TCG may drop characters: a damaged line does not parse (16 hex digits,
/// a type letter, a name of the set) and is left out.
async fn proc_kallsyms(g: &Guest, names: &[&str]) -> Vec<(u64, char, String, Option<String>)> {
    let console = g.vm.console().unwrap();
    let mark = console.position();
    let command = format!(
        "grep -E ' ({})([[:space:]]|$)' /proc/kallsyms; echo kallsyms-done-$((6*7))\n",
        names.join("|")
    );
    console.send(command.as_bytes()).await.unwrap();
    g.wait_console("kallsyms-done-42", mark, Duration::from_secs(60)).await;
    let mut out = Vec::new();
    for l in console.since(mark).lines() {
        let mut f = l.split_ascii_whitespace();
        let (Some(a), Some(t), Some(n)) = (f.next(), f.next(), f.next()) else { continue };
        let Ok(addr) = u64::from_str_radix(a, 16) else { continue };
        if a.len() != 16 || t.len() != 1 || !names.contains(&n) {
            continue;
        }
        let module = f.next().and_then(|m| m.strip_prefix('[')?.strip_suffix(']')).map(str::to_string);
        out.push((addr, t.chars().next().unwrap(), n.to_string(), module));
    }
    out
}

/// The guest's kallsyms read from its memory agree with its own /proc/kallsyms: for a sample of
/// functions, the host-side lookup of each address is that function at offset 0, and a byte
/// further in, the same function, a module's with its module's name. Prints the cost.
async fn kallsyms_equal_proc_kallsyms(kernel: &'static str) {
    let g = Guest::boot(GuestSpec { kernel: Some(kernel), ..GuestSpec::new("pc") }).await;
    let release = manifest_value(g.fixture, "kernel_release");
    let names = [
        "schedule",
        "vfs_read",
        "do_sys_open",
        "default_idle",
        "native_safe_halt",
        "pv_native_safe_halt",
        "panic",
        "virtblk_probe",
        "fw_cfg_sysfs_probe",
    ];
    let oracle = proc_kallsyms(&g, &names).await;
    let mut cache = VmcoreinfoCache::default();
    read(&g, &mut cache, 1).await;
    let info = cache.get(1).expect("VMCOREINFO found by the log's read");
    let t0 = Instant::now();
    let (syms, stats) = kallsyms::read_symbols(
        &g.vm.qmp,
        &g.vm.prepared.dir,
        &info,
        kallsyms::DEFAULT_MAX_BYTES,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("{release}: {e}"));
    println!(
        "{release}: kallsyms read in {:.0} ms: {} symbols, {} modules with {} functions ({} functions in all), \
         {} bytes in {} pmemsave calls",
        ms(t0.elapsed()),
        stats.symbols,
        stats.modules,
        stats.module_symbols,
        syms.len(),
        stats.bytes,
        stats.pmemsave_calls
    );
    assert_eq!(stats.modules_error, None, "{release}");
    assert_eq!(syms.source, format!("the guest's kallsyms ({release})"));
    assert!(syms.len() > 30_000, "{release}: only {} text symbols", syms.len());
    let mut image = 0;
    let mut modules = 0;
    for (addr, kind, name, module) in &oracle {
        if !matches!(kind, 't' | 'T') {
            continue;
        }
        let at = syms.lookup(*addr).unwrap_or_else(|| panic!("{release}: {name} at {addr:#x} not found"));
        assert_eq!(
            (at.name.as_str(), at.offset, &at.module),
            (name.as_str(), 0, module),
            "{release}: {addr:#x}"
        );
        let inside = syms.lookup(addr + 1).unwrap();
        assert_eq!((inside.name.as_str(), inside.offset), (name.as_str(), 1), "{release}");
        match module {
            Some(_) => modules += 1,
            None => image += 1,
        }
    }
    println!("{release}: {image} image and {modules} module functions agree with /proc/kallsyms");
    assert!(image >= 5, "{release}: too few sample lines from /proc/kallsyms: {oracle:?}");
    assert!(modules >= 1, "{release}: no module function in /proc/kallsyms: {oracle:?}");

    // A bundle's registers are named with them: the kernel-log step reads them, the registers
    // step after it puts each vCPU's function beside its RIP.
    use acpimon::diagnose::{collect, KernelLogContext, Step, StepSpec, Target, Trigger};
    let target = Target {
        vm: "guest",
        qmp: Some(&g.vm.qmp),
        console: None,
        gdb_socket: g.vm.prepared.dir.join("gdb.sock"),
        guest_agent: None,
        host: Default::default(),
        kernel_log: Some(KernelLogContext {
            dir: g.vm.prepared.dir.clone(),
            cache: Default::default(),
            boot: 1,
            guest_symbols: true,
        }),
    };
    let trigger = Trigger {
        kind: "unresponsive".into(),
        time: acpimon::units::now_rfc3339(),
        reason: "test".into(),
        evidence: serde_json::Value::Null,
    };
    let steps = [Step::new(StepSpec::KernelLog {}), Step::new(StepSpec::Registers {})];
    let dir = tempfile::tempdir().unwrap();
    let m = collect(&steps, &target, &trigger, vec![], &dir.path().join("b")).await.unwrap();
    let cpus = m.step("registers").and_then(|s| s.summary.as_ref()).map(|s| s["cpus"].clone()).unwrap();
    let cpu0 = &cpus[0];
    let rip = u64::from_str_radix(cpu0["rip"].as_str().unwrap(), 16).unwrap();
    let want = syms.lookup(rip).map(|r| r.to_string());
    assert!(want.is_some(), "{release}: an idle guest's vCPU 0 is in the kernel: {cpus}");
    assert_eq!(cpu0["symbol"].as_str().map(str::to_string), want, "{release}: {cpus}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kallsyms_equal_proc_kallsyms_on_6_12() {
    kallsyms_equal_proc_kallsyms("trixie").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kallsyms_equal_proc_kallsyms_on_6_1() {
    kallsyms_equal_proc_kallsyms("bookworm").await;
}

/// 5.10 does not publish its kallsyms: the error says which kernel, what is missing and what
/// to give instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kallsyms_of_5_10_say_what_is_missing() {
    let g = Guest::boot(GuestSpec { kernel: Some("bullseye"), ..GuestSpec::new("pc") }).await;
    let release = manifest_value(g.fixture, "kernel_release");
    let mut cache = VmcoreinfoCache::default();
    read(&g, &mut cache, 1).await;
    let info = cache.get(1).unwrap();
    let e = kallsyms::read_symbols(&g.vm.qmp, &g.vm.prepared.dir, &info, 1 << 20, Duration::from_secs(30))
        .await
        .map(|(s, _)| s.len())
        .expect_err("5.10 has no kallsyms in VMCOREINFO")
        .to_string();
    for want in [release.as_str(), "SYMBOL(kallsyms_", "Linux 6.0 and later", "`[diagnostics] symbols`"] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
}
