//! The guest kernel's log followed in its memory for the kernel-report sentinel
//! (`kernel_log_follow`), for VMs whose console does not carry it.
//!
//! Which source, per QEMU life ([`KernelFollow::decision`]):
//! - `off`: never read.
//! - `always`: read every `kernel_log_every` and scanned beside the console.
//! - `auto`: read and scanned when the VM has no console connected. With a console, the log is
//!   read but only held (the newest [`HELD_MAX`] records) until either the console shows a
//!   kernel line (`[    1.234567] `: the console is the kernel's; reading stops for this
//!   QEMU life) or a poll finds the memory log gained a record at level 3 (error) or more
//!   urgent while the console showed no kernel line. Such records are printed even on a
//!   `quiet` console (console loglevel 4 prints levels 0 to 3), and the console had a whole
//!   poll interval to print it: from the next poll on, the held records and every new one are
//!   scanned. Every report of the kernel-report sentinel (soft lockup: level 0; RCU stall, hung
//!   task: level 3) is such a record.
//!
//! The memory log has its own [`Scanner`] (the console's stream never interleaves with it).
//! Its reports are held for [`HOLD`] so that the console's, if it carries the same report,
//! wins: a memory report whose first line (timestamp and text) the console reported is
//! dropped. The first poll of a QEMU life the service watched before (the service restarted)
//! only sets where to start: what the log held then was reported by the earlier watch; a life
//! it has not watched (a new QEMU, or a VM seen for the first time) is read from its start.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::FollowMode;
use crate::memory::{FollowLimits, LogFollower, LogRecord, MemError, NewRecords, VmcoreinfoCache};
use crate::sentinel::{KernelReport, Scanner};

/// Records held while `auto` has not decided.
pub const HELD_MAX: usize = 512;
/// How long a memory report waits for the console's twin.
pub const HOLD: Duration = Duration::from_secs(3);
/// The console reports remembered for deduplication.
const CONSOLE_REPORTS: usize = 64;
/// The most urgent levels a quiet console still prints (`KERN_ERR` and above).
const URGENT_LEVEL: u8 = 3;

/// What to do with the memory log now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Do not read it.
    Off,
    /// Read it, hold the records, scan nothing yet (`auto`, undecided).
    Hold,
    /// Read it and scan it.
    Scan,
}

/// A poll's outcome, from its task.
pub type PollDone = (LogFollower, Result<Result<NewRecords, MemError>, tokio::time::error::Elapsed>);

/// One VM's following of its kernel log.
pub struct KernelFollow {
    mode: FollowMode,
    every: Duration,
    follower: Option<LogFollower>,
    scanner: Scanner,
    /// A console is connected in this QEMU life.
    console: bool,
    /// The console has shown a kernel line in this QEMU life.
    console_kernel: bool,
    /// `auto` undecided: the records read so far, newest last (bounded).
    held: VecDeque<LogRecord>,
    /// A held record is urgent enough that the kernel prints it on any console.
    urgent_held: bool,
    /// The first poll of this life is done (its records are history).
    baselined: bool,
    /// Memory reports waiting for [`HOLD`].
    pending: VecDeque<(Instant, KernelReport)>,
    /// The console's recent reports: first line's stamp and text.
    console_reports: VecDeque<(Option<u64>, String)>,
    next: Option<Instant>,
    /// The last poll's error, reported once.
    pub error: Option<String>,
    /// Polls, records and reports so far, for the view.
    pub polls: u64,
    pub records: u64,
    pub lost: u64,
    /// Memory reports dropped because the console reported them.
    pub twins: u64,
}

impl KernelFollow {
    pub fn new(mode: FollowMode, every: Duration) -> KernelFollow {
        KernelFollow {
            mode,
            every,
            follower: None,
            scanner: Scanner::new(),
            console: false,
            console_kernel: false,
            held: VecDeque::new(),
            urgent_held: false,
            baselined: false,
            pending: VecDeque::new(),
            console_reports: VecDeque::new(),
            next: None,
            error: None,
            polls: 0,
            records: 0,
            lost: 0,
            twins: 0,
        }
    }

    /// An attach to QEMU: everything starts over, but the VM's VMCOREINFO cache, shared with
    /// the `kernel-log` step. `fresh`: a QEMU life the service has not watched before, whose
    /// whole log is new (else the first poll's records were the earlier watch's to report).
    pub fn attach(&mut self, cache: Arc<Mutex<VmcoreinfoCache>>, boot: u64, console: bool, fresh: bool) {
        let limits = FollowLimits {
            // A poll never takes longer than its interval (nor 10 s): a wedged QMP is a skipped poll.
            time: self.every.min(Duration::from_secs(10)),
            // A booting guest publishes VMCOREINFO within seconds; one without (an old kernel,
            // no vmcoreinfo device: each search is a RAM scan, up to this poll's time) is
            // looked for less and less often.
            retry_min: self.every,
            retry_max: Duration::from_secs(300),
            // Attaching to many booting VMs at once must not scan all their RAM: the device's
            // note comes within seconds of boot; a guest without it is scanned after this.
            scan_after: Duration::from_secs(120),
            ..FollowLimits::default()
        };
        *self = KernelFollow::new(self.mode, self.every);
        self.follower = Some(LogFollower::new(cache, boot, limits));
        self.console = console;
        self.baselined = fresh;
    }

    /// Console output: does it show the kernel's log?
    pub fn console_bytes(&mut self, bytes: &[u8]) {
        if !self.console_kernel && crate::sentinel::has_kernel_line(bytes) {
            self.console_kernel = true;
            self.held.clear();
        }
    }

    /// A report the console's sentinel read: a memory report of the same first line is its twin.
    pub fn console_report(&mut self, r: &KernelReport) {
        if self.console_reports.len() == CONSOLE_REPORTS {
            self.console_reports.pop_front();
        }
        self.console_reports.push_back((r.stamp_us, r.line.clone()));
    }

    pub fn decision(&self) -> Decision {
        decide(self.mode, self.console, self.console_kernel, self.urgent_held)
    }

    /// For the VM's view: where its kernel reports come from.
    pub fn describe(&self) -> String {
        match (self.mode, self.decision()) {
            (FollowMode::Off, _) => "console only (kernel_log_follow = \"off\")".into(),
            (_, Decision::Off) => "console (it shows the kernel's log)".into(),
            (_, Decision::Hold) => {
                "console; the log in memory is watched until the console shows a kernel line".into()
            }
            (FollowMode::Always, Decision::Scan) => {
                format!("console and followed from memory ({} reports read on both, sent once)", self.twins)
            }
            (_, Decision::Scan) if !self.console => "followed from memory (no console)".into(),
            (_, Decision::Scan) => "followed from memory (the console shows no kernel line)".into(),
        }
    }

    /// The follower, when a poll is due now (the caller runs it as its own task).
    pub fn due(&mut self, now: Instant, boot: u64) -> Option<(LogFollower, Duration)> {
        if self.decision() == Decision::Off || self.next.is_some_and(|n| now < n) {
            return None;
        }
        let mut f = self.follower.take()?;
        f.set_boot(boot);
        if f.backing_off() {
            self.follower = Some(f);
            return None;
        }
        // The poll's own deadline, with a margin for its last QMP answer.
        let bound = self.every.min(Duration::from_secs(10)) + Duration::from_secs(2);
        Some((f, bound))
    }

    /// A poll ended: the reports its records finished (to be held, see [`KernelFollow::release`]).
    pub fn polled(&mut self, done: PollDone, now: Instant) {
        let (f, r) = done;
        self.follower = Some(f);
        self.next = Some(now + self.every);
        let new = match r {
            Err(_) => {
                tracing::debug!("kernel log poll skipped: QMP did not answer in time");
                return;
            }
            // Not yet published, and not yet scanned for (`scan_after`): a guest that has not
            // booted that far, as every VM is at attach. Only a scan that found nothing is news.
            Ok(Err(MemError::NoVmcoreinfo { scanned_mib: 0 })) => {
                tracing::debug!("kernel log: the guest has not published VMCOREINFO yet");
                return;
            }
            Ok(Err(e)) => {
                let text = e.to_string();
                if self.error.as_ref() != Some(&text) {
                    tracing::warn!("cannot follow the guest's kernel log in its memory: {text}");
                    self.error = Some(text);
                }
                return;
            }
            Ok(Ok(new)) => new,
        };
        self.error = None;
        self.polls += 1;
        self.records += new.records.len() as u64;
        if !new.full {
            self.lost += new.lost;
        }
        tracing::debug!(
            records = new.records.len(),
            lost = new.lost,
            full = new.full,
            bytes = new.bytes,
            calls = new.pmemsave_calls,
            elapsed_us = new.elapsed_us,
            "kernel log polled"
        );
        if new.restarted {
            // A new boot's log: what the old one's scanner held is ended.
            self.finish();
        }
        if !self.baselined && !new.restarted {
            // History: written before this life was watched.
            self.baselined = true;
            return;
        }
        self.baselined = true;
        let quiet = new.records.is_empty();
        match self.decision() {
            Decision::Off => {}
            Decision::Hold => {
                self.urgent_held |= new.records.iter().any(|r| r.level <= URGENT_LEVEL);
                self.held.extend(new.records);
                while self.held.len() > HELD_MAX {
                    self.held.pop_front();
                }
            }
            Decision::Scan => {
                let held: Vec<LogRecord> = self.held.drain(..).collect();
                for r in held.iter().chain(&new.records) {
                    for line in r.console_lines() {
                        let done = self.scanner.feed(line.as_bytes());
                        self.hold_reports(done, now);
                        let done = self.scanner.feed(b"\n");
                        self.hold_reports(done, now);
                    }
                }
            }
        }
        if quiet {
            // Nothing more for a whole interval: the report being read has ended.
            self.finish_at(now);
        }
    }

    /// Ends the report being read (QEMU went away, or the log restarted).
    pub fn finish(&mut self) {
        self.finish_at(Instant::now());
    }

    fn finish_at(&mut self, now: Instant) {
        if let Some(r) = self.scanner.flush() {
            self.pending.push_back((now, r));
        }
    }

    fn hold_reports(&mut self, reports: Vec<KernelReport>, now: Instant) {
        self.pending.extend(reports.into_iter().map(|r| (now, r)));
    }

    /// The memory reports held for [`HOLD`] (all of them with `all`), minus those the console
    /// also reported.
    pub fn release(&mut self, now: Instant, all: bool) -> Vec<KernelReport> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.pending.front() {
            if !all && now.duration_since(*at) < HOLD {
                break;
            }
            let (_, r) = self.pending.pop_front().expect("a front");
            if self.console_reports.iter().any(|(stamp, line)| *stamp == r.stamp_us && *line == r.line) {
                tracing::debug!(line = %r.line, "a kernel report in memory the console reported too");
                self.twins += 1;
                continue;
            }
            out.push(r);
        }
        out
    }
}

/// [`KernelFollow::decision`]: `mode`, whether a console is connected, whether it has shown a
/// kernel line in this QEMU life, and whether an urgent record was held from an earlier poll.
pub fn decide(mode: FollowMode, console: bool, console_kernel: bool, urgent_held: bool) -> Decision {
    match mode {
        FollowMode::Off => Decision::Off,
        FollowMode::Always => Decision::Scan,
        FollowMode::Auto if !console => Decision::Scan,
        FollowMode::Auto if console_kernel => Decision::Off,
        FollowMode::Auto if urgent_held => Decision::Scan,
        FollowMode::Auto => Decision::Hold,
    }
}

/// One poll, as a task: the follower comes back with its outcome, whatever it is; `bound`
/// ends a poll whose QMP stopped answering.
pub async fn poll(
    mut f: LogFollower,
    qmp: Arc<crate::trigger::qmp::Qmp>,
    dir: PathBuf,
    bound: Duration,
) -> PollDone {
    let r = tokio::time::timeout(bound, f.poll(&qmp, &dir)).await;
    (f, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sentinel::ReportClass;

    fn record(seq: u64, level: u8, text: &str) -> LogRecord {
        LogRecord {
            seq,
            ts_nsec: 40_000_000_000 + seq * 1000,
            level,
            facility: 0,
            flags: 2,
            caller_id: 1,
            text: text.into(),
        }
    }

    fn follow(mode: FollowMode, console: bool) -> KernelFollow {
        let mut k = KernelFollow::new(mode, Duration::from_secs(5));
        k.attach(Default::default(), 1, console, false);
        k
    }

    fn done(k: &mut KernelFollow, records: Vec<LogRecord>, now: Instant) {
        let f = k.follower.take().unwrap();
        k.polled((f, Ok(Ok(NewRecords { records, ..Default::default() }))), now);
    }

    const LOCKUP: &str = "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [spin:93]";

    #[test]
    fn vmcoreinfo_not_yet_published_is_no_error_until_a_scan_found_none() {
        let t0 = Instant::now();
        let mut k = follow(FollowMode::Auto, false);
        let fail = |k: &mut KernelFollow, scanned_mib| {
            let f = k.follower.take().unwrap();
            k.polled((f, Ok(Err(MemError::NoVmcoreinfo { scanned_mib }))), t0);
        };
        // At attach the guest has not booted: only the device was asked.
        fail(&mut k, 0);
        assert_eq!(k.error, None);
        // After `scan_after`, a scan of its RAM found nothing: that is worth saying.
        fail(&mut k, 256);
        assert!(k.error.as_deref().is_some_and(|e| e.contains("no VMCOREINFO")), "{:?}", k.error);
    }

    #[test]
    fn auto_follows_without_a_console_or_with_one_that_shows_no_kernel_line() {
        use Decision::{Hold, Scan};
        use FollowMode::{Always, Auto};
        assert_eq!(decide(Auto, false, false, false), Scan);
        assert_eq!(decide(Auto, true, false, false), Hold);
        assert_eq!(decide(Auto, true, false, true), Scan);
        assert_eq!(decide(Auto, true, true, true), Decision::Off, "the console is the kernel's");
        assert_eq!(decide(Always, true, true, false), Scan);
        assert_eq!(decide(FollowMode::Off, false, false, true), Decision::Off);
        let mut k = follow(Auto, true);
        k.console_bytes(b"acpimon responder up\n");
        assert_eq!(k.decision(), Hold);
        k.console_bytes(b"[   12.345678] random: crng init done\n");
        assert_eq!(k.decision(), Decision::Off);
        assert!(k.describe().starts_with("console (it shows"), "{}", k.describe());
    }

    #[test]
    fn a_held_urgent_record_turns_auto_on_and_its_report_is_read() {
        let t0 = Instant::now();
        let mut k = follow(FollowMode::Auto, true);
        done(&mut k, vec![record(1, 6, "history")], t0);
        // The lockup's first line (level 0) is held one poll: the console could still print it.
        done(&mut k, vec![record(2, 6, "boot goes on"), record(3, 0, LOCKUP)], t0);
        assert_eq!(k.decision(), Decision::Scan);
        assert!(k.describe().contains("shows no kernel line"), "{}", k.describe());
        done(&mut k, vec![record(4, 4, "Modules linked in: faults")], t0);
        done(&mut k, vec![], t0 + Duration::from_secs(5));
        assert!(k.release(t0 + Duration::from_secs(6), false).is_empty(), "held for HOLD");
        let out = k.release(t0 + Duration::from_secs(9), false);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].class, out[0].cpu, out[0].line.as_str()),
            (ReportClass::SoftLockup, Some(1), LOCKUP)
        );
        assert_eq!(out[0].stamp_us, Some(40_000_003));
        assert!(out[0].trace.iter().any(|l| l.contains("Modules linked in")), "{out:?}");
    }

    #[test]
    fn the_first_poll_of_a_watched_life_is_history_and_a_console_twin_wins() {
        let t0 = Instant::now();
        let mut k = follow(FollowMode::Always, true);
        done(&mut k, vec![record(1, 0, LOCKUP)], t0);
        done(&mut k, vec![], t0);
        assert!(k.release(t0 + HOLD, true).is_empty(), "what the log held before is not reported");
        // The console read the same report (its line and stamp); the memory one is dropped.
        let console = crate::sentinel::scan_text(&format!("[   40.000002] {LOCKUP}\n"));
        k.console_report(&console[0]);
        done(&mut k, vec![record(2, 0, LOCKUP)], t0);
        done(&mut k, vec![], t0);
        assert!(k.release(t0 + HOLD, false).is_empty());
        assert_eq!(k.twins, 1);
        // Another of the same text, later: the console did not have it.
        done(&mut k, vec![record(9, 0, LOCKUP)], t0);
        done(&mut k, vec![], t0);
        let out = k.release(t0 + HOLD, false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].stamp_us, Some(40_000_009));
    }

    #[test]
    fn a_new_life_is_read_from_its_start() {
        let t0 = Instant::now();
        let mut k = KernelFollow::new(FollowMode::Auto, Duration::from_secs(5));
        k.attach(Default::default(), 1, false, true);
        done(&mut k, vec![record(1, 0, LOCKUP)], t0);
        done(&mut k, vec![], t0);
        assert_eq!(k.release(t0 + HOLD, false).len(), 1);
    }

    #[test]
    fn errors_are_kept_once_and_a_timeout_is_a_skipped_poll() {
        let mut k = follow(FollowMode::Auto, false);
        let f = k.follower.take().unwrap();
        k.polled((f, Ok(Err(MemError::Missing("SYMBOL(prb)".into())))), Instant::now());
        assert!(k.error.as_deref().unwrap().contains("SYMBOL(prb)"));
        assert!(k.due(Instant::now(), 1).is_none(), "not before the interval");
        assert!(k.due(Instant::now() + Duration::from_secs(6), 1).is_some());
    }
}
