//! The service's log lines, as `acpimon watch` writes them: human text by default (on the
//! streams the demo and tests read), JSON on request, journal priorities under systemd, and the
//! -q/RUST_LOG filters. Each run watches a state directory holding one invalid VM, so it logs an
//! info line ("watching") and a warning for a VM ("bad: not watched"), then gets SIGTERM.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    stdout: String,
    stderr: String,
}

/// Starts `acpimon watch` with `args` and `env` over a state directory with one invalid VM,
/// waits until `done` holds for what it wrote (stdout + stderr), stops it with SIGTERM.
fn watch(args: &[&str], env: &[(&str, &str)], journal: bool, done: impl Fn(&str) -> bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("bad")).unwrap();
    std::fs::write(state.join("bad/vm.json"), "not json").unwrap();
    let config = dir.path().join("watch.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\ndata_dir = {:?}\ndiscover_interval = \"200ms\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            state.display().to_string(),
            dir.path().join("data").display().to_string()
        ),
    )
    .unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let err_file = std::fs::File::create(&err_path).unwrap();
    let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if journal {
        // What systemd sets: the device and inode of the stream connected to the journal.
        use std::os::unix::fs::MetadataExt;
        let m = err_file.metadata().unwrap();
        env.push(("JOURNAL_STREAM".into(), format!("{}:{}", m.dev(), m.ino())));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_acpimon"))
        .args(args)
        .args(["watch", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(err_file)
        .spawn()
        .unwrap();
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(&(read(&out_path) + &read(&err_path))) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("acpimon watch exited ({status}):\n{}{}", read(&out_path), read(&err_path));
        }
        assert!(
            Instant::now() < deadline,
            "no expected output within 20 s:\n{}{}",
            read(&out_path),
            read(&err_path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "acpimon watch exited with {status}");
    Run { stdout: read(&out_path), stderr: read(&err_path) }
}

fn both(s: &str) -> bool {
    s.contains("acpimon watch: watching") && s.contains("not watched")
}

/// `2026-11-29T13:35:02.123Z ` and the like.
fn starts_with_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 20 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

#[test]
fn text_lines_read_as_before_on_their_streams() {
    let r = watch(&[], &[], false, both);
    let watching = r.stdout.lines().find(|l| l.contains("acpimon watch: watching")).expect("on stdout");
    assert!(starts_with_time(watching), "{watching:?}");
    let (_, rest) = watching.split_once(' ').unwrap();
    assert!(rest.starts_with("acpimon watch: watching "), "{watching:?}");
    let bad = r.stderr.lines().find(|l| l.contains("not watched")).expect("a warning on stderr");
    assert!(starts_with_time(bad) && bad.contains(" warning: bad: not watched: "), "{bad:?}");
    assert!(r.stdout.lines().any(|l| l.ends_with(" acpimon watch: stopped")), "{}", r.stdout);
}

#[test]
fn json_lines_are_objects_with_level_and_vm() {
    let r = watch(&["--log-format", "json"], &[], false, both);
    assert!(r.stdout.is_empty(), "JSON lines go to stderr; stdout has: {}", r.stdout);
    let lines: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let watching =
        lines.iter().find(|v| v["message"].as_str().unwrap_or("").starts_with("acpimon watch: watching"));
    let watching = watching.expect("the start line");
    assert_eq!(watching["level"], "info");
    assert!(watching["time"].as_str().is_some_and(starts_with_time), "{watching}");
    let bad = lines.iter().find(|v| v["vm"] == "bad").expect("a line tagged vm=bad");
    assert_eq!(bad["level"], "warn");
    assert!(bad["message"].as_str().unwrap().starts_with("not watched: "), "{bad}");
}

#[test]
fn under_the_journal_lines_carry_priorities_and_no_time() {
    let r = watch(&[], &[], true, both);
    assert!(r.stdout.is_empty(), "every line goes to the journal stream; stdout has: {}", r.stdout);
    let lines: Vec<&str> = r.stderr.lines().collect();
    let watching = lines.iter().find(|l| l.contains("acpimon watch: watching")).expect("the start line");
    assert!(watching.starts_with("<6>acpimon watch: watching "), "{watching:?}");
    let bad = lines.iter().find(|l| l.contains("not watched")).expect("the warning");
    assert!(bad.starts_with("<4>bad: not watched: "), "{bad:?}");
    assert!(lines.iter().all(|l| l.starts_with('<') && !starts_with_time(&l[3..])), "{lines:#?}");
}

#[test]
fn quiet_and_rust_log_leave_out_info_lines() {
    let warned = |s: &str| s.contains("not watched");
    let r = watch(&["-q"], &[], false, warned);
    assert!(r.stdout.is_empty(), "-q printed info lines: {}", r.stdout);
    assert!(r.stderr.contains("warning: bad: not watched"), "{}", r.stderr);

    let r = watch(&["--log-format", "json"], &[("RUST_LOG", "warn")], false, warned);
    assert!(!r.stderr.contains("watching"), "RUST_LOG=warn printed info lines: {}", r.stderr);
    assert!(r.stderr.contains("\"level\":\"warn\""), "{}", r.stderr);
}
