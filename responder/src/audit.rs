//! Audits: named checks the host can ask for (`{"type":"health","audit":"disk"}`), each a
//! program configured with `--audit NAME=PROGRAM [ARGS...]`.
//!
//! An audit runs with no shell: the text after `=` is split on whitespace into the program and
//! its arguments (no quoting; write a script for anything fancier). Its stdin is `/dev/null`;
//! stdout and stderr go to one pipe, of which the first [`MAX_OUTPUT`] bytes are kept. It runs
//! in its own process group; after the timeout the whole group is killed (`SIGKILL`) and the
//! exit status is 124, as with `timeout(1)`. A program that cannot be started gives 127, one
//! killed by signal N gives 128+N.
//!
//! What the result means for the app's status is [`report_after`]'s rule: a failed audit
//! (exit status other than 0) makes the status at least `degraded`.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::proto::{AuditResult, MAX_OUTPUT};
use crate::status::{Report, Status};
use crate::sys;

/// Exit status of an audit that ran out of time.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status of an audit that is not configured or could not be started.
pub const EXIT_NOT_RUN: i32 = 127;
/// How long to wait for the output pipe to close after the audit itself exited (a background
/// child may hold it open; its group is killed then).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// One configured audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSpec {
    /// The name the host asks for.
    pub name: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
}

impl AuditSpec {
    /// Parses `NAME=PROGRAM [ARGS...]`.
    pub fn parse(text: &str) -> Result<AuditSpec, String> {
        let (name, cmd) = text
            .split_once('=')
            .ok_or_else(|| format!("--audit '{text}': expected NAME=PROGRAM [ARGS...]"))?;
        let name = name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "--audit '{text}': the name must be 1 to 64 characters of letters, digits, '.', '_' or '-'"
            ));
        }
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        if argv.is_empty() {
            return Err(format!("--audit '{text}': no program after '='"));
        }
        Ok(AuditSpec { name: name.to_string(), argv })
    }
}

/// Runs `spec`, waiting at most `timeout` for it.
pub fn run(spec: &AuditSpec, timeout: Duration) -> AuditResult {
    let (exit, output) = match run_inner(&spec.argv, timeout) {
        Ok(r) => r,
        Err(e) => (EXIT_NOT_RUN, format!("cannot run {}: {e}", spec.argv[0])),
    };
    AuditResult { name: spec.name.clone(), exit, output }
}

fn run_inner(argv: &[String], timeout: Duration) -> std::io::Result<(i32, String)> {
    let (mut reader, writer) = std::io::pipe()?;
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .spawn()?;
    // The Command (and with it our copies of the pipe's write end) is gone: EOF comes when
    // the audit and whatever it started have closed theirs.
    let pid = child.id();
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::with_capacity(256);
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT - kept.len().min(MAX_OUTPUT);
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = out_tx.send(kept);
    });
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let (exit, timed_out) = match exit_rx.recv_timeout(timeout) {
        Ok(status) => (status?, false),
        Err(_) => {
            sys::kill_group(pid);
            let status = exit_rx.recv().map_err(|_| std::io::Error::other("lost the audit's wait thread"))?;
            (status?, true)
        }
    };
    let kept = match out_rx.recv_timeout(DRAIN_GRACE) {
        Ok(k) => k,
        Err(_) => {
            // Something the audit left behind holds the pipe open: end it.
            sys::kill_group(pid);
            out_rx.recv_timeout(DRAIN_GRACE).unwrap_or_default()
        }
    };
    let mut output = String::from_utf8_lossy(&kept).into_owned();
    let trimmed = output.trim_end_matches(['\n', '\r']).len();
    output.truncate(trimmed);
    let code = if timed_out {
        // Keep the note within the host's 1024 bytes.
        output.truncate(crate::json::truncate_utf8(&output, MAX_OUTPUT - 40).len());
        if !output.is_empty() {
            output.push('\n');
        }
        output.push_str(&format!("(timed out after {})", show_duration(timeout)));
        EXIT_TIMEOUT
    } else if let Some(c) = exit.code() {
        c
    } else {
        128 + exit.signal().unwrap_or(0)
    };
    Ok((code, output))
}

/// `10s`, `1.5s`, `250ms`.
pub fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// The status to report after an audit: the status file's, made at least `degraded` when the
/// audit failed (with details saying so, unless the file's status was already worse).
pub fn report_after(file: Report, result: &AuditResult) -> Report {
    if result.exit == 0 {
        return file;
    }
    let why = match result.exit {
        EXIT_TIMEOUT => format!("audit {} timed out", result.name),
        EXIT_NOT_RUN => format!("audit {} could not run (exit {})", result.name, result.exit),
        n => format!("audit {} failed (exit {n})", result.name),
    };
    match file.status {
        Status::Ok => Report::new(Status::Degraded, &why),
        _ => file,
    }
}

/// The `health` answer for an audit name that is not configured: `degraded`, details
/// `unknown audit`, and an audit result with exit status 127 naming the configured ones.
pub fn unknown(name: &str, configured: &[&str], file: Report) -> (Report, AuditResult) {
    let output = if configured.is_empty() {
        "no audits are configured".to_string()
    } else {
        format!("not configured; configured audits: {}", configured.join(", "))
    };
    let result = AuditResult { name: name.to_string(), exit: EXIT_NOT_RUN, output };
    let report = match file.status {
        Status::Ok => Report::new(Status::Degraded, "unknown audit"),
        _ => file,
    };
    (report, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn spec(cmd: &str) -> AuditSpec {
        AuditSpec::parse(&format!("t={cmd}")).unwrap()
    }

    #[test]
    fn parses_specs() {
        assert_eq!(
            AuditSpec::parse("disk=df  -h /").unwrap(),
            AuditSpec { name: "disk".into(), argv: vec!["df".into(), "-h".into(), "/".into()] }
        );
        assert_eq!(AuditSpec::parse(" fail = false").unwrap().name, "fail");
        for bad in ["disk", "=df", "disk=", "disk=  ", "a b=df", "d\"=x", &format!("{}=x", "n".repeat(65))] {
            assert!(AuditSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runs_and_keeps_output_and_status() {
        let r = run(&spec("echo hello world"), Duration::from_secs(10));
        assert_eq!((r.exit, r.output.as_str()), (0, "hello world"));
        let r = run(&spec("false"), Duration::from_secs(10));
        assert_eq!(r.exit, 1);
        let r = run(&spec("ls /definitely/not/here"), Duration::from_secs(10));
        assert_ne!(r.exit, 0);
        assert!(r.output.contains("/definitely/not/here"), "stderr is kept: {r:?}");
    }

    #[test]
    fn a_missing_program_is_127() {
        let r = run(&spec("/no/such/program x"), Duration::from_secs(10));
        assert_eq!(r.exit, EXIT_NOT_RUN);
        assert!(r.output.starts_with("cannot run /no/such/program"), "{r:?}");
    }

    #[test]
    fn output_is_bounded() {
        let r = run(&spec("seq 1 100000"), Duration::from_secs(20));
        assert_eq!(r.exit, 0);
        assert!(r.output.len() <= MAX_OUTPUT && r.output.starts_with("1\n2\n3\n"), "{}", r.output.len());
    }

    #[test]
    fn a_slow_audit_is_killed_with_its_group() {
        let t = Instant::now();
        let r = run(&spec("sh -c sleep${IFS}30&sleep${IFS}30"), Duration::from_millis(300));
        assert_eq!(r.exit, EXIT_TIMEOUT, "{r:?}");
        assert_eq!(r.output, "(timed out after 300 ms)");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_background_child_holding_the_pipe_does_not_hang_the_audit() {
        let t = Instant::now();
        let r = run(&spec("sh -c echo${IFS}started;sleep${IFS}30&"), Duration::from_secs(10));
        assert_eq!(r.exit, 0, "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn status_after_an_audit() {
        let ok = |exit| AuditResult { name: "disk".into(), exit, output: String::new() };
        assert_eq!(report_after(Report::ok(), &ok(0)), Report::ok());
        assert_eq!(
            report_after(Report::ok(), &ok(1)),
            Report::new(Status::Degraded, "audit disk failed (exit 1)")
        );
        assert_eq!(
            report_after(Report::ok(), &ok(124)),
            Report::new(Status::Degraded, "audit disk timed out")
        );
        let failed = Report::new(Status::Failed, "db down");
        assert_eq!(report_after(failed.clone(), &ok(1)), failed);
        let (r, a) = unknown("nope", &["disk", "fail"], Report::ok());
        assert_eq!(r, Report::new(Status::Degraded, "unknown audit"));
        assert_eq!((a.exit, a.output.as_str()), (127, "not configured; configured audits: disk, fail"));
    }
}
