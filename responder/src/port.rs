//! The app channel: the virtio-serial port (or stdin/stdout), one line-delimited JSON
//! message per line, served from one thread with `poll`.
//!
//! How a Linux virtio port behaves decides the design (drivers/char/virtio_console.c): only
//! one process may have it open; while no host is connected (`acpimon watch` not running, or
//! restarting) `poll` reports `POLLHUP`, `read` returns 0 and a blocking `write` would wait
//! for the host. So the port is opened non-blocking, and while the host is away nothing is
//! written: queued lines are dropped (a late `ack` is worthless) and the port is looked at
//! again every [`RECONNECT_POLL`]. When a host connects, the responder greets it (`hello`,
//! then an unsolicited `health`). I/O errors close the port; it is reopened with backoff (up to
//! [`MAX_BACKOFF`]). Audits run on their own threads, so a slow one never delays an `ack`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::args::{Config, Port};
use crate::audit;
use crate::log;
use crate::proto::{self, AuditResult, Id, Request, MAX_LINE};
use crate::status::{Report, Status};
use crate::sys::{self, PollFd};

/// How often a port without a host is looked at again.
pub const RECONNECT_POLL: Duration = Duration::from_millis(250);
/// How often the status file is read.
pub const STATUS_POLL: Duration = Duration::from_secs(1);
/// Longest wait between attempts to open the port.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Lines queued for the host at most; beyond, the oldest are dropped.
pub const MAX_QUEUE: usize = 64;
/// Audits running at once at most; beyond, a request is answered at once ("busy").
pub const MAX_AUDITS: usize = 4;
/// Where the kernel lists virtio ports.
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// Finds the port: `path` itself if it exists, else the `/dev/vportNpM` whose sysfs `name` is
/// `path`'s last component (what udev's symlink would point at).
pub fn resolve(path: &Path, sysfs: &Path, dev: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let want = path.file_name()?.to_str()?;
    let mut entries: Vec<_> = std::fs::read_dir(sysfs).ok()?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        let node = dev.join(e.file_name());
        (name.trim_end() == want && node.exists()).then_some(node)
    })
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes (`\n` included); longer
/// lines are skipped whole and reported as `None`.
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
    skipping: bool,
}

impl Lines {
    /// Feeds `data`; calls `line` with each complete line (without `\n`), or `None` for a
    /// line that was too long.
    pub fn feed(&mut self, mut data: &[u8], mut line: impl FnMut(Option<&[u8]>)) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let chunk = &data[..nl.unwrap_or(data.len())];
            if !self.skipping {
                if self.buf.len() + chunk.len() < MAX_LINE {
                    self.buf.extend_from_slice(chunk);
                } else {
                    self.buf.clear();
                    self.skipping = true;
                }
            }
            match nl {
                Some(i) => {
                    if self.skipping {
                        line(None);
                    } else {
                        line(Some(&self.buf));
                    }
                    self.buf.clear();
                    self.skipping = false;
                    data = &data[i + 1..];
                }
                None => data = &[],
            }
        }
    }

    /// Forgets a partial line (the host went away mid-line).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }
}

/// Counts ignored lines and logs a few of them.
#[derive(Debug)]
struct IgnoredLog {
    total: u64,
    unlogged: u64,
    last_summary: Instant,
}

impl IgnoredLog {
    fn note(&mut self, why: &str) {
        self.total += 1;
        if self.total <= 3 {
            log!("ignored a line: {why}");
        } else {
            self.unlogged += 1;
            if self.last_summary.elapsed() >= Duration::from_secs(10) {
                log!("ignored {} more lines (last: {why}; {} in all)", self.unlogged, self.total);
                self.unlogged = 0;
                self.last_summary = Instant::now();
            }
        }
    }
}

/// An audit's result, sent back from its thread.
struct Done {
    id: Option<Id>,
    result: AuditResult,
}

/// How a session ended.
enum End {
    /// stdin reached EOF (or stdout closed) and everything is answered (`--port -`).
    Eof,
    /// The port failed; reopen it.
    Failed(String),
}

/// Lines waiting for the host, the first possibly half written.
#[derive(Default)]
struct Outbox {
    q: VecDeque<Vec<u8>>,
    written: usize,
    dropped: u64,
}

impl Outbox {
    fn push(&mut self, line: impl Into<Vec<u8>>) {
        if self.q.len() >= MAX_QUEUE {
            // Drop the oldest line not yet started.
            let at = usize::from(self.written > 0);
            if self.q.remove(at).is_some() {
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    log!("host reads too slowly: {} lines dropped", self.dropped);
                }
            }
        }
        self.q.push_back(line.into());
    }

    fn clear(&mut self) {
        self.q.clear();
        self.written = 0;
    }

    /// Writes as much as `out` takes; errors other than "would block" are returned.
    fn flush(&mut self, out: &mut File) -> std::io::Result<()> {
        while let Some(front) = self.q.front() {
            match out.write(&front[self.written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    if self.written == front.len() {
                        self.q.pop_front();
                        self.written = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The responder's state across sessions (reconnections).
struct Responder<'a> {
    cfg: &'a Config,
    garbage_sent: u64,
    garbage_logged: bool,
    audits_running: usize,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    last_report: Report,
    next_status: Instant,
    ignored: IgnoredLog,
}

/// Serves the port until `--port -` reaches EOF (a device port is served for ever).
pub fn serve(cfg: &Config) -> Result<(), String> {
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| format!("cannot create a socket pair: {e}"))?;
    for s in [&wake_tx, &wake_rx] {
        s.set_nonblocking(true).map_err(|e| format!("cannot make the socket pair non-blocking: {e}"))?;
    }
    let (done_tx, done_rx) = mpsc::channel();
    let mut r = Responder {
        cfg,
        garbage_sent: 0,
        garbage_logged: false,
        audits_running: 0,
        done_tx,
        done_rx,
        wake_tx,
        wake_rx,
        last_report: Report::read(cfg.status_file.as_deref()),
        next_status: Instant::now() + STATUS_POLL,
        ignored: IgnoredLog { total: 0, unlogged: 0, last_summary: Instant::now() },
    };
    match &cfg.port {
        Port::Stdio => {
            let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(File::from);
            let input = dup(std::io::stdin().as_fd()).map_err(|e| format!("stdin: {e}"))?;
            let output = dup(std::io::stdout().as_fd()).map_err(|e| format!("stdout: {e}"))?;
            match r.session(input, output, false) {
                End::Eof => Ok(()),
                End::Failed(e) => Err(e),
            }
        }
        Port::Device(path) => loop {
            let port = open_with_backoff(path);
            let output = match port.try_clone() {
                Ok(o) => o,
                Err(e) => {
                    log!("cannot duplicate the port's descriptor: {e}");
                    std::thread::sleep(MAX_BACKOFF);
                    continue;
                }
            };
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.session(port, output, true)));
            match outcome {
                Ok(End::Failed(e)) => log!("port: {e}; reopening"),
                Ok(End::Eof) => log!("port: end of file; reopening"),
                Err(_) => log!("port: the session panicked; reopening"),
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        Port::None => Ok(()),
    }
}

/// Opens the port, retrying with backoff until it works.
fn open_with_backoff(path: &Path) -> File {
    let mut backoff = Duration::from_millis(250);
    let mut last = String::new();
    loop {
        let res = match resolve(path, Path::new(SYSFS_PORTS), Path::new("/dev")) {
            None => Err(format!(
                "{} does not exist and no port in {SYSFS_PORTS} is named {:?}",
                path.display(),
                path.file_name().unwrap_or_default()
            )),
            Some(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&p)
                .map(|f| (f, p.clone()))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) => format!("{}: busy (another process has the port open)", p.display()),
                    _ => format!("{}: {e}", p.display()),
                }),
        };
        match res {
            Ok((f, p)) => {
                log!("port {} open", p.display());
                return f;
            }
            Err(e) => {
                if e != last {
                    log!("cannot open the port: {e} (retrying)");
                    last = e;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

impl Responder<'_> {
    fn status_file(&self) -> Option<&Path> {
        self.cfg.status_file.as_deref()
    }

    /// One connection's worth of serving: `port` says whether `POLLHUP` means "no host"
    /// (a virtio port) or EOF (stdin).
    fn session(&mut self, mut input: File, mut output: File, port: bool) -> End {
        let mut lines = Lines::default();
        let mut out = Outbox::default();
        let mut connected = !port;
        let mut greeted = false;
        let mut eof = false;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            self.collect_audits(connected, &mut out);
            self.poll_status(connected && greeted, &mut out);
            if connected && !greeted {
                // --garbage: first the garbage (once per run), then the greeting; lines from
                // the host wait in the port until then.
                while self.garbage_sent < self.cfg.garbage && out.q.len() < 8 {
                    out.push(proto::garbage(self.garbage_sent));
                    self.garbage_sent += 1;
                }
                if self.garbage_sent == self.cfg.garbage && out.q.len() < 8 {
                    if self.cfg.garbage > 0 && !self.garbage_logged {
                        log!("queued {} garbage lines; answering normally now", self.cfg.garbage);
                        self.garbage_logged = true;
                    }
                    self.greet(&mut out);
                    greeted = true;
                }
            }
            if eof && self.audits_running == 0 && out.q.is_empty() {
                return End::Eof;
            }
            let until_status = self.next_status.saturating_duration_since(Instant::now());

            if !connected {
                // No host: wait without touching the port (it would report POLLHUP at once).
                let mut fds = [PollFd::new(self.wake_rx.as_fd(), sys::IN)];
                if let Err(e) = sys::poll(&mut fds, until_status.min(RECONNECT_POLL)) {
                    return End::Failed(format!("poll: {e}"));
                }
                self.drain_wake();
                let mut probe = [PollFd::new(input.as_fd(), sys::IN)];
                if let Err(e) = sys::poll(&mut probe, Duration::ZERO) {
                    return End::Failed(format!("poll: {e}"));
                }
                if probe[0].revents & (sys::ERR | sys::NVAL) != 0 {
                    return End::Failed("the port reports an error".into());
                }
                if probe[0].revents & sys::HUP == 0 {
                    log!("host connected");
                    connected = true;
                    greeted = false;
                    lines.reset();
                } else if probe[0].revents & sys::IN != 0 {
                    // Disconnected: read returns what is left, then 0. Discard it.
                    if let Err(e) = read_some(&mut input, &mut buf) {
                        return End::Failed(format!("read: {e}"));
                    }
                }
                continue;
            }

            let want_in = if greeted && !eof { sys::IN } else { 0 };
            let want_out = if out.q.is_empty() { 0 } else { sys::OUT };
            let mut fds = [
                // At EOF stdin would report POLLHUP for ever: leave it out.
                if eof { PollFd::none() } else { PollFd::new(input.as_fd(), want_in) },
                PollFd::new(output.as_fd(), want_out),
                PollFd::new(self.wake_rx.as_fd(), sys::IN),
            ];
            // A port that has nothing to read and nothing to write is still watched for
            // POLLHUP, which poll reports whatever was asked for.
            if let Err(e) = sys::poll(&mut fds, until_status) {
                return End::Failed(format!("poll: {e}"));
            }
            let (rin, rout) = (fds[0].revents, fds[1].revents);
            self.drain_wake();
            if (rin | rout) & sys::NVAL != 0 || (port && (rin | rout) & sys::ERR != 0) {
                return End::Failed("the port reports an error".into());
            }
            if rin & sys::IN != 0 || (!port && want_in != 0 && rin & sys::HUP != 0) {
                match read_some(&mut input, &mut buf) {
                    // On a port, 0 means the host is gone (the HUP branch below, or a
                    // disconnection between poll and read).
                    Ok(0) if port => connected = false,
                    Ok(0) => eof = true,
                    Ok(n) => {
                        let data = std::mem::take(&mut buf);
                        lines.feed(&data[..n], |l| match l {
                            Some(l) => self.on_line(l, &mut out),
                            None => self.ignored.note("longer than 4096 bytes"),
                        });
                        buf = data;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return End::Failed(format!("read: {e}")),
                }
            }
            if port && ((rin | rout) & sys::HUP != 0 || !connected) {
                if !out.q.is_empty() {
                    log!("host disconnected; dropping {} unsent lines", out.q.len());
                } else {
                    log!("host disconnected");
                }
                out.clear();
                lines.reset();
                connected = false;
                continue;
            }
            if !port && rout & (sys::ERR | sys::HUP) != 0 {
                return End::Eof; // nobody reads stdout any more
            }
            if !out.q.is_empty() && (rout & sys::OUT != 0 || !port) {
                if let Err(e) = out.flush(&mut output) {
                    if !port && e.kind() == ErrorKind::BrokenPipe {
                        return End::Eof;
                    }
                    return End::Failed(format!("write: {e}"));
                }
            }
        }
    }

    fn greet(&mut self, out: &mut Outbox) {
        let version = env!("CARGO_PKG_VERSION");
        out.push(proto::hello(&self.cfg.app, version));
        let report = Report::read(self.status_file());
        out.push(proto::health(None, &report, None));
        self.last_report = report;
    }

    fn drain_wake(&mut self) {
        let mut b = [0u8; 64];
        while matches!(self.wake_rx.read(&mut b), Ok(n) if n > 0) {}
    }

    fn collect_audits(&mut self, connected: bool, out: &mut Outbox) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.audits_running -= 1;
            let report = audit::report_after(Report::read(self.status_file()), &done.result);
            if connected {
                out.push(proto::health(done.id.as_ref(), &report, Some(&done.result)));
            }
        }
    }

    fn poll_status(&mut self, report_changes: bool, out: &mut Outbox) {
        let now = Instant::now();
        if now < self.next_status {
            return;
        }
        self.next_status = now + STATUS_POLL;
        let report = Report::read(self.status_file());
        if report != self.last_report {
            log!(
                "status {} -> {}{}",
                self.last_report.status,
                report.status,
                report.details.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
            );
            if report_changes {
                out.push(proto::health(None, &report, None));
            }
            self.last_report = report;
        }
    }

    fn on_line(&mut self, line: &[u8], out: &mut Outbox) {
        match proto::parse_request(line) {
            Ok(Request::Challenge { seq, nonce }) => out.push(proto::ack(seq, &nonce)),
            Ok(Request::Health { id, audit: None }) => {
                out.push(proto::health(id.as_ref(), &Report::read(self.status_file()), None))
            }
            Ok(Request::Health { id, audit: Some(name) }) => self.start_audit(id, &name, out),
            Ok(Request::Hello { version }) => {
                log!("host says hello (acpimon {})", version.as_deref().unwrap_or("?"));
            }
            Ok(Request::Other(kind)) => self.ignored.note(&format!("unknown type {kind:?}")),
            Err(why) => self.ignored.note(&why.to_string()),
        }
    }

    fn start_audit(&mut self, id: Option<Id>, name: &str, out: &mut Outbox) {
        let file = Report::read(self.status_file());
        let Some(spec) = self.cfg.audit(name).cloned() else {
            let (report, result) = audit::unknown(name, &self.cfg.audit_names(), file);
            out.push(proto::health(id.as_ref(), &report, Some(&result)));
            return;
        };
        if self.audits_running >= MAX_AUDITS {
            let result = AuditResult {
                name: name.to_string(),
                exit: audit::EXIT_NOT_RUN,
                output: format!("not run: {MAX_AUDITS} audits are already running"),
            };
            let report = file.worst(Report::new(Status::Degraded, "audit busy"));
            out.push(proto::health(id.as_ref(), &report, Some(&result)));
            return;
        }
        let timeout = self.cfg.audit_timeout;
        let tx = self.done_tx.clone();
        let wake = self.wake_tx.try_clone();
        let spawned = std::thread::Builder::new().name(format!("audit {name}")).spawn(move || {
            let result = audit::run(&spec, timeout);
            let _ = tx.send(Done { id, result });
            if let Ok(mut w) = wake {
                let _ = w.write(b"!");
            }
        });
        match spawned {
            Ok(_) => self.audits_running += 1,
            Err(e) => log!("cannot start a thread for audit {name}: {e}"),
        }
    }
}

/// One `read`, retried on EINTR.
fn read_some(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Option<Vec<u8>>> {
        let mut l = Lines::default();
        let mut got = Vec::new();
        for c in chunks {
            l.feed(c, |x| got.push(x.map(<[u8]>::to_vec)));
        }
        got
    }

    #[test]
    fn splits_lines_across_reads() {
        assert_eq!(
            split(&[b"ab", b"c\nde", b"f\n\n", b"g"]),
            vec![Some(b"abc".to_vec()), Some(b"def".to_vec()), Some(vec![])]
        );
    }

    #[test]
    fn skips_overlong_lines_whole() {
        let long = vec![b'x'; 10_000];
        let got = split(&[&long[..3000], &long[3000..], b"\nok\n"]);
        assert_eq!(got, vec![None, Some(b"ok".to_vec())]);
        let exact = vec![b'y'; MAX_LINE - 1];
        let got = split(&[&exact, b"\n"]);
        assert_eq!(got, vec![Some(exact.clone())], "4095 bytes + newline is the limit");
        let over = vec![b'y'; MAX_LINE];
        assert_eq!(split(&[&over, b"\n"]), vec![None]);
    }

    #[test]
    fn resolves_ports_by_sysfs_name() {
        let root = std::env::temp_dir().join(format!("acpimon-responder-ports-{}", std::process::id()));
        let (sysfs, dev) = (root.join("sys"), root.join("dev"));
        for (vport, name) in [("vport1p1", "org.qemu.guest_agent.0"), ("vport1p2", "org.acpimon.app.0")] {
            std::fs::create_dir_all(sysfs.join(vport)).unwrap();
            std::fs::write(sysfs.join(vport).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(resolve(&root.join("nothing/org.acpimon.app.0"), &sysfs, &dev), None, "no node yet");
        std::fs::write(dev.join("vport1p2"), "").unwrap();
        assert_eq!(
            resolve(&root.join("nothing/org.acpimon.app.0"), &sysfs, &dev),
            Some(dev.join("vport1p2"))
        );
        assert_eq!(resolve(&root.join("org.other"), &sysfs, &dev), None);
        let direct = dev.join("vport1p2");
        assert_eq!(resolve(&direct, &sysfs, &dev), Some(direct.clone()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
