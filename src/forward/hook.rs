//! The service's event hook: a program run for each event, best-effort (see the module docs of
//! [`super`]): one run at a time from a bounded queue; full queue → the event is dropped and
//! counted.
//!
//! It runs like the controller's analyzer, through [`crate::util::process`]: from its argv
//! (never through a shell, so event fields cannot inject commands), the event's JSON on stdin,
//! its key, kind and VM in the environment, its stdout discarded and its stderr the service's;
//! when it overruns its timeout its whole process group is killed.

use std::ffi::OsStr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{ForwardStats, HookConfig, HookJob};
use crate::util::lock;
use crate::util::process::{Output, Program};

/// The hook worker: runs the hook for each queued event, one at a time, until the queue closes
/// or the task is aborted (which kills a running hook).
pub(super) async fn run_hooks(
    cfg: HookConfig,
    mut queue: mpsc::Receiver<HookJob>,
    stats: Arc<Mutex<ForwardStats>>,
) {
    while let Some(job) = queue.recv().await {
        let env = job.event.hook_env();
        let outcome = Program::new(&cfg.argv, cfg.timeout)
            .input(&job.json)
            .env(env.iter().map(|(k, v)| (*k, OsStr::new(v))))
            .output(Output::To { stdout: Stdio::null(), stderr: Stdio::inherit() })
            .run()
            .await
            .outcome;
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
