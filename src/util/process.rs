//! Running an operator's program (event hook, controller analyzer, recovery command,
//! diagnostic script) under a timeout: started from an argv (never through a shell, so event
//! fields cannot inject commands), in its own process group, so that a timeout kills
//! everything it started, not only the program itself; with its output captured up to a bound
//! (the rest read and dropped, so it never blocks on a full pipe) or sent where the caller says.

use std::ffi::OsStr;
use std::fmt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{kill_process_group, Pid, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::time::Instant;

/// How long to wait for a killed program to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(1);
/// How long captured output is still read after the program exits (a child it left may hold
/// the pipe).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Where the program's stdout and stderr go.
pub enum Output {
    /// To these (`Stdio::null()`, a file, the service's own stderr, ...).
    To { stdout: Stdio, stderr: Stdio },
    /// Both into one pipe (their order kept), the first `limit` bytes kept.
    Capture { limit: usize },
}

/// A program to run; build it with [`Program::new`] and the setters.
pub struct Program<'a> {
    argv: &'a [String],
    env: Vec<(&'a str, &'a OsStr)>,
    dir: Option<&'a Path>,
    input: Option<&'a [u8]>,
    output: Output,
    timeout: Duration,
    kill_leftovers: bool,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Exited(ExitStatus),
    /// Still running after the timeout: its process group was killed.
    TimedOut(Duration),
    /// Could not be started (missing program, bad environment, ...).
    CannotStart(String),
    /// Started, but could not be waited for.
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
            Outcome::CannotStart(e) | Outcome::Failed(e) => f.write_str(e),
        }
    }
}

/// What [`Program::run`] reports.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    /// With [`Output::Capture`]: the output kept, and how many bytes beyond the limit were
    /// dropped.
    pub output: Vec<u8>,
    pub dropped: u64,
    /// Whether processes it left behind after exiting were killed (with
    /// [`Program::kill_leftovers`]).
    pub killed_leftovers: bool,
}

/// Sends SIGKILL to every process of group `pgid`; whether any was there.
pub fn kill_group(pgid: u32) -> bool {
    // Never group 0 (our own) or 1 (init's): a pid that did not come from a child is a bug.
    let pid = i32::try_from(pgid).ok().filter(|&p| p > 1).and_then(Pid::from_raw);
    pid.is_some_and(|pid| kill_process_group(pid, Signal::KILL).is_ok())
}

/// Asks process `pid` to terminate (SIGTERM); false when there is no such process.
pub fn terminate(pid: u32) -> bool {
    let pid = i32::try_from(pid).ok().filter(|&p| p > 1).and_then(Pid::from_raw);
    pid.is_some_and(|pid| rustix::process::kill_process(pid, Signal::TERM).is_ok())
}

/// Kills the process group it holds when dropped.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_group(pgid);
        }
    }
}

impl<'a> Program<'a> {
    /// `argv` (program and arguments; may be empty, which fails to start), killed after
    /// `timeout`. By default: no input, output discarded.
    pub fn new(argv: &'a [String], timeout: Duration) -> Program<'a> {
        Program {
            argv,
            env: Vec::new(),
            dir: None,
            input: None,
            output: Output::To { stdout: Stdio::null(), stderr: Stdio::null() },
            timeout,
            kill_leftovers: false,
        }
    }

    /// Adds variables to its environment.
    pub fn env(mut self, vars: impl IntoIterator<Item = (&'a str, &'a OsStr)>) -> Self {
        self.env.extend(vars);
        self
    }

    pub fn current_dir(mut self, dir: &'a Path) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Gives it `input` on stdin (then end of file). A program that does not read it is fine.
    pub fn input(mut self, input: &'a [u8]) -> Self {
        self.input = Some(input);
        self
    }

    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// Also kills what is left of its process group once it exited (a script's background
    /// children).
    pub fn kill_leftovers(mut self) -> Self {
        self.kill_leftovers = true;
        self
    }

    /// Runs it to its end or its timeout.
    pub async fn run(self) -> Finished {
        let mut finished = Finished {
            outcome: Outcome::Failed(String::new()),
            output: Vec::new(),
            dropped: 0,
            killed_leftovers: false,
        };
        let Some((program, args)) = self.argv.split_first() else {
            finished.outcome = Outcome::CannotStart("no program given".into());
            return finished;
        };
        let cannot_start = |what: &str, e: std::io::Error| Outcome::CannotStart(format!("{what}: {e}"));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(self.env.iter().copied())
            .stdin(if self.input.is_some() { Stdio::piped() } else { Stdio::null() })
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = self.dir {
            cmd.current_dir(dir);
        }
        let (mut reader, limit) = match self.output {
            Output::To { stdout, stderr } => {
                cmd.stdout(stdout).stderr(stderr);
                (None, 0)
            }
            Output::Capture { limit } => {
                let pipes = pipe::pipe().and_then(|(w, r)| {
                    let w = w.into_blocking_fd()?;
                    Ok((w.try_clone()?, w, r))
                });
                let (w1, w2, r) = match pipes {
                    Ok(p) => p,
                    Err(e) => {
                        finished.outcome = cannot_start("cannot create a pipe", e);
                        return finished;
                    }
                };
                cmd.stdout(Stdio::from(w1)).stderr(Stdio::from(w2));
                (Some(r), limit)
            }
        };
        let spawned = cmd.spawn();
        // Our copies of the pipe's write end must go, or it never reaches end of file.
        drop(cmd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                finished.outcome = cannot_start(&format!("cannot start {program}"), e);
                return finished;
            }
        };
        let pgid = child.id().unwrap_or(0);
        // Dropped before the end (the caller's task aborted at shutdown): the whole group goes.
        let mut guard = GroupGuard(Some(pgid));
        let stdin = child.stdin.take();
        let input = self.input.unwrap_or_default();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input is fine: ignore EPIPE and the like.
                let _ = stdin.write_all(input).await;
                let _ = stdin.shutdown().await;
            }
        };
        let mut feed = std::pin::pin!(feed);
        let mut fed = false;
        let deadline = Instant::now() + self.timeout;
        let mut chunk = vec![0u8; if reader.is_some() { 16 << 10 } else { 0 }];
        let mut status = None;
        let mut eof = reader.is_none();
        let mut drain_until: Option<Instant> = None;
        let timed_out = loop {
            if eof && status.is_some() {
                break false;
            }
            let until = drain_until.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                () = &mut feed, if !fed => fed = true,
                r = async { reader.as_mut().expect("reading only with a pipe").read(&mut chunk).await }, if !eof => {
                    match r {
                        Ok(0) | Err(_) => eof = true,
                        Ok(n) => {
                            let room = limit.saturating_sub(finished.output.len()).min(n);
                            finished.output.extend_from_slice(&chunk[..room]);
                            finished.dropped += (n - room) as u64;
                        }
                    }
                }
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
                () = tokio::time::sleep_until(until) => break status.is_none(),
            }
        };
        drop(reader);
        guard.0 = None;
        if timed_out {
            kill_group(pgid);
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            finished.outcome = Outcome::TimedOut(self.timeout);
            return finished;
        }
        if self.kill_leftovers {
            finished.killed_leftovers = kill_group(pgid);
        }
        finished.outcome = match status {
            Some(Ok(s)) => Outcome::Exited(s),
            Some(Err(e)) => Outcome::Failed(format!("cannot wait for {program}: {e}")),
            None => Outcome::Failed(format!("no exit status from {program}")),
        };
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    /// Whether `pid` is gone or a zombie (killed, not yet reaped).
    fn gone(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    }

    #[tokio::test]
    async fn passes_stdin_and_env_and_reports_status() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > '{}'; printf %s \"$X\" >> '{}'; exit 3", out.display(), out.display());
        let argv = sh(&script);
        let f = Program::new(&argv, Duration::from_secs(5))
            .input(b"input")
            .env([("X", OsStr::new("env"))])
            .run()
            .await;
        let o = f.outcome;
        assert!(matches!(&o, Outcome::Exited(s) if s.code() == Some(3)), "{o}");
        assert!(!o.success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "inputenv");
    }

    #[tokio::test]
    async fn kills_the_group_after_timeout_and_survives_bad_programs() {
        let start = std::time::Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // A background child that would outlive a kill of the shell alone.
        let argv = sh(&format!("sleep 30 & echo $! > '{}'; wait", pid_file.display()));
        let f = Program::new(&argv, Duration::from_millis(300)).run().await;
        assert!(matches!(f.outcome, Outcome::TimedOut(_)), "{}", f.outcome);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(f.outcome.to_string().contains("killed"));
        let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let t = std::time::Instant::now();
        while !gone(pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(pid), "the background child {pid} survived the timeout");
        // A program that ignores a large stdin, one that does not exist, one with a NUL byte.
        let big = vec![b'x'; 1 << 20];
        let argv = sh("exit 0");
        let f = Program::new(&argv, Duration::from_secs(5)).input(&big).run().await;
        assert!(f.outcome.success(), "{}", f.outcome);
        let argv = vec!["/nonexistent/acpimon-hook".to_string()];
        let o = Program::new(&argv, Duration::from_secs(1)).run().await.outcome;
        assert!(matches!(&o, Outcome::CannotStart(m) if m.contains("cannot start")), "{o}");
        let argv = sh("true");
        let o =
            Program::new(&argv, Duration::from_secs(1)).env([("X", OsStr::new("a\0b"))]).run().await.outcome;
        assert!(matches!(o, Outcome::CannotStart(_)), "{o}");
        let o = Program::new(&[], Duration::from_secs(1)).run().await.outcome;
        assert!(matches!(o, Outcome::CannotStart(_)), "{o}");
    }

    #[tokio::test]
    async fn an_abandoned_run_kills_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let argv = sh(&format!("sleep 30 & echo $! > '{}'; wait", pid_file.display()));
        let run = Program::new(&argv, Duration::from_secs(60)).run();
        // The caller gives up (a task aborted at shutdown) once the child is there.
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => panic!("the run ended on its own"),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {
                        if std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n')) {
                            return;
                        }
                    }
                }
            }
        });
        waited.await.expect("the child started");
        let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let t = std::time::Instant::now();
        while !gone(pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(pid), "the background child {pid} outlived its abandoned run");
    }

    #[tokio::test]
    async fn captures_a_bounded_output_and_kills_leftovers() {
        let argv = sh("echo out; echo err >&2; head -c 100000 /dev/zero; sleep 30 &");
        let f = Program::new(&argv, Duration::from_secs(10))
            .output(Output::Capture { limit: 1000 })
            .kill_leftovers()
            .run()
            .await;
        assert!(f.outcome.success(), "{}", f.outcome);
        assert_eq!(f.output.len(), 1000);
        assert!(f.output.starts_with(b"out\nerr\n"), "{:?}", &f.output[..8]);
        assert_eq!(f.dropped, 100_008 - 1000);
        assert!(f.killed_leftovers);
    }
}
