//! The `script` step: an operator's program, run without a shell, in its own process group so
//! that the timeout kills everything it started. Its stdout and stderr share one pipe (their
//! order kept); what it prints beyond [`super::MAX_FILE`] is read and dropped, so it never
//! blocks on a full pipe.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::{Ctx, Done, Keep, StepResult, MAX_FILE};

/// How long output is still read after the program exits (a child it left may hold the pipe).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Kills every process of the group `pgid`; whether any was there. std and tokio only kill
/// a single process, and a script's children must not outlive its timeout: kill(1) takes a
/// negative pid for a group (and keeps `unsafe` out of this module).
fn kill_group(pgid: u32) -> bool {
    if pgid <= 1 {
        return false;
    }
    std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(super) async fn run(ctx: &Ctx<'_>, argv: &[String]) -> StepResult {
    let fail = |what: &str, e: std::io::Error| Done::failed(format!("{what}: {e}"));
    let (write, mut reader) = pipe::pipe().map_err(|e| fail("cannot create a pipe", e))?;
    let write = write.into_blocking_fd().map_err(|e| fail("cannot set up the pipe", e))?;
    let write2 = write.try_clone().map_err(|e| fail("cannot duplicate the pipe", e))?;
    let t = ctx.trigger;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(ctx.dir)
        .env("ACPIMON_VM", ctx.target.vm)
        .env("ACPIMON_BUNDLE", ctx.dir)
        .env("ACPIMON_TRIGGER", &t.kind)
        .env("ACPIMON_TRIGGER_TIME", &t.time)
        .env("ACPIMON_TRIGGER_REASON", &t.reason)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0)
        .kill_on_drop(true);
    let spawned = cmd.spawn();
    // Our copies of the write end must go, or the pipe never reaches end of file.
    drop(cmd);
    let mut child = spawned.map_err(|e| fail(&format!("cannot start {}", argv[0]), e))?;
    let pgid = child.id().unwrap_or(0);

    let mut out = Vec::new();
    let mut dropped = 0u64;
    let mut chunk = vec![0u8; 16 << 10];
    let mut status = None;
    let mut eof = false;
    let mut drain_until: Option<Instant> = None;
    let timed_out = loop {
        let limit = drain_until.map_or(ctx.deadline, |d| d.min(ctx.deadline));
        if eof && status.is_some() {
            break false;
        }
        tokio::select! {
            r = reader.read(&mut chunk), if !eof => match r {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    // Room is left for the note of what was dropped.
                    let room = (MAX_FILE - 256).saturating_sub(out.len()).min(n);
                    out.extend_from_slice(&chunk[..room]);
                    dropped += (n - room) as u64;
                }
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            },
            _ = tokio::time::sleep_until(limit) => break status.is_none(),
        }
    };
    // Whatever it left behind goes too: a finished script's background children, or the
    // whole group at the timeout.
    let leftovers = pgid != 0 && kill_group(pgid);
    if timed_out {
        let _ = child.wait().await;
    }
    let mut text = out;
    if dropped > 0 {
        text.extend_from_slice(format!("\n[acpimon: {dropped} more bytes of output dropped]\n").as_bytes());
    }
    let file = ctx.write("log", &text, Keep::Head).await?;
    let (code, signal) = match &status {
        Some(Ok(s)) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        _ => (None, None),
    };
    let summary = json!({
        "exit": code,
        "signal": signal,
        "dropped_bytes": dropped,
        "killed_leftovers": leftovers && !timed_out,
    });
    if timed_out {
        return Err(Done::timeout(format!(
            "{} did not exit within {}: killed its process group",
            argv[0],
            ctx.timeout_text()
        ))
        .with_file(Some(file))
        .with_summary(summary));
    }
    let failed = match status {
        Some(Ok(s)) if s.success() => return Ok(Done::ok(Some(file), Some(summary))),
        Some(Ok(s)) => Done::failed(format!("{} exited with {s}", argv[0])),
        Some(Err(e)) => fail("cannot wait for the script", e),
        None => Done::failed("no exit status".into()),
    };
    Err(failed.with_file(Some(file)).with_summary(summary))
}
