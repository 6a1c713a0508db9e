//! Running a program for an event: the service's hook and the controller's analyzer.
//!
//! The program is started from an argv (never through a shell, so event fields cannot inject
//! commands), gets the event's JSON on stdin and its key, kind and VM in the environment, and
//! is killed when it overruns its timeout. Only the program itself is killed: one that starts
//! children of its own should `exec` its last command or clean up after them.
//!
//! The hook is best-effort (see the module docs of [`super`]): one run at a time from a bounded
//! queue; full queue → the event is dropped and counted.

use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{lock, ForwardStats, HookConfig, HookJob};

/// How long to wait for a killed program to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Exited(ExitStatus),
    TimedOut(Duration),
    /// Could not start, or could not be waited for.
    Failed(String),
}

impl Outcome {
    pub fn success(&self) -> bool {
        matches!(self, Outcome::Exited(s) if s.success())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(s) => write!(f, "{s}"),
            Outcome::TimedOut(t) => {
                write!(f, "still running after {}, killed", crate::units::format_duration(*t))
            }
            Outcome::Failed(e) => f.write_str(e),
        }
    }
}

/// Runs `argv` with `input` on stdin and `env` added to the environment; kills it after
/// `timeout`. `argv` must not be empty.
pub(crate) async fn run_program(
    argv: &[String],
    input: &[u8],
    env: &[(&str, String)],
    timeout: Duration,
    stdout: Stdio,
    stderr: Stdio,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::Failed("no program given".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start {program}: {e}")),
    };
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A program that does not read its input is fine: ignore EPIPE and the like.
            let _ = stdin.write_all(input).await;
            let _ = stdin.shutdown().await;
        }
    };
    let waited = tokio::time::timeout(timeout, async { tokio::join!(feed, child.wait()).1 }).await;
    match waited {
        Ok(Ok(status)) => Outcome::Exited(status),
        Ok(Err(e)) => Outcome::Failed(format!("cannot wait for {program}: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            Outcome::TimedOut(timeout)
        }
    }
}

/// The hook worker: runs the hook for each queued event, one at a time, until the queue closes
/// or the task is aborted (which kills a running hook).
pub(super) async fn run_hooks(
    cfg: HookConfig,
    mut queue: mpsc::Receiver<HookJob>,
    stats: Arc<Mutex<ForwardStats>>,
) {
    while let Some(job) = queue.recv().await {
        let env = job.event.hook_env();
        let outcome =
            run_program(&cfg.argv, &job.json, &env, cfg.timeout, Stdio::null(), Stdio::inherit()).await;
        let ok = outcome.success();
        let summary = format!("{} for event {}: {outcome}", cfg.argv[0], job.event.key);
        if !ok {
            tracing::warn!("hook {summary}");
        }
        let mut s = lock(&stats);
        s.hook_runs += 1;
        if !ok {
            s.hook_failures += 1;
        }
        s.hook_last = Some(summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn passes_stdin_and_env_and_reports_status() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > '{}'; printf %s \"$X\" >> '{}'; exit 3", out.display(), out.display());
        let o = run_program(
            &sh(&script),
            b"input",
            &[("X", "env".into())],
            Duration::from_secs(5),
            Stdio::null(),
            Stdio::null(),
        )
        .await;
        assert!(matches!(&o, Outcome::Exited(s) if s.code() == Some(3)), "{o}");
        assert!(!o.success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "inputenv");
    }

    #[tokio::test]
    async fn kills_after_timeout_and_survives_bad_programs() {
        let start = std::time::Instant::now();
        let o = run_program(
            &sh("exec sleep 30"),
            b"",
            &[],
            Duration::from_millis(100),
            Stdio::null(),
            Stdio::null(),
        )
        .await;
        assert!(matches!(o, Outcome::TimedOut(_)), "{o}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(o.to_string().contains("killed"));
        // A program that ignores a large stdin, one that does not exist, one with a NUL byte.
        let big = vec![b'x'; 1 << 20];
        let o =
            run_program(&sh("exit 0"), &big, &[], Duration::from_secs(5), Stdio::null(), Stdio::null()).await;
        assert!(o.success(), "{o}");
        let o = run_program(
            &["/nonexistent/acpimon-hook".into()],
            b"",
            &[],
            Duration::from_secs(1),
            Stdio::null(),
            Stdio::null(),
        )
        .await;
        assert!(matches!(&o, Outcome::Failed(m) if m.contains("cannot start")), "{o}");
        let o = run_program(
            &sh("true"),
            b"",
            &[("X", "a\0b".into())],
            Duration::from_secs(1),
            Stdio::null(),
            Stdio::null(),
        )
        .await;
        assert!(matches!(o, Outcome::Failed(_)), "{o}");
    }
}
