//! The `script` step: an operator's program, run without a shell, in its own process group so
//! that the timeout kills everything it started. Its stdout and stderr share one pipe (their
//! order kept); what it prints beyond [`super::MAX_FILE`] is read and dropped, so it never
//! blocks on a full pipe.

use std::ffi::OsStr;

use serde_json::json;

use super::{Ctx, Done, Keep, StepResult, MAX_FILE};
use crate::util::process::{Outcome, Output, Program};

pub(super) async fn run(ctx: &Ctx<'_>, argv: &[String]) -> StepResult {
    let t = ctx.trigger;
    let env = [
        ("ACPIMON_VM", OsStr::new(ctx.target.vm)),
        ("ACPIMON_BUNDLE", ctx.dir.as_os_str()),
        ("ACPIMON_TRIGGER", OsStr::new(&t.kind)),
        ("ACPIMON_TRIGGER_TIME", OsStr::new(&t.time)),
        ("ACPIMON_TRIGGER_REASON", OsStr::new(&t.reason)),
    ];
    // Room is left for the note of what was dropped.
    let finished = Program::new(argv, ctx.remaining())
        .current_dir(ctx.dir)
        .env(env)
        .output(Output::Capture { limit: MAX_FILE - 256 })
        .kill_leftovers()
        .run()
        .await;
    let (status, timed_out) = match finished.outcome {
        Outcome::CannotStart(e) => return Err(Done::failed(e)),
        Outcome::Exited(s) => (Some(s), false),
        Outcome::TimedOut(_) => (None, true),
        Outcome::Failed(e) => {
            let mut text = finished.output;
            text.extend_from_slice(format!("\n[acpimon: {e}]\n").as_bytes());
            let file = ctx.write("log", &text, Keep::Head).await?;
            return Err(Done::failed(e).with_file(Some(file)));
        }
    };
    let (leftovers, dropped) = (finished.killed_leftovers, finished.dropped);
    let mut text = finished.output;
    if dropped > 0 {
        text.extend_from_slice(format!("\n[acpimon: {dropped} more bytes of output dropped]\n").as_bytes());
    }
    let file = ctx.write("log", &text, Keep::Head).await?;
    let (code, signal) = match &status {
        Some(s) => {
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
        Some(s) if s.success() => return Ok(Done::ok(Some(file), Some(summary))),
        Some(s) => Done::failed(format!("{} exited with {s}", argv[0])),
        None => Done::failed("no exit status".into()),
    };
    Err(failed.with_file(Some(file)).with_summary(summary))
}
