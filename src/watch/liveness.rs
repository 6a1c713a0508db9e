//! The service's own liveness: every internal loop beats; systemd's watchdog (`sd_notify
//! WATCHDOG=1`) and the optional touch file are refreshed only while every loop has beaten
//! recently, so a node watchdog notices a wedged service by its silence.

use crate::util::lock;
use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Loops and the time each last beat.
#[derive(Default)]
pub struct Liveness {
    loops: Mutex<BTreeMap<String, (Instant, Duration)>>,
}

impl Liveness {
    /// Registers a loop that must beat at least every `max_silence`.
    pub fn register(&self, name: &str, max_silence: Duration) {
        lock(&self.loops).insert(name.into(), (Instant::now(), max_silence));
    }

    pub fn beat(&self, name: &str) {
        if let Some(l) = lock(&self.loops).get_mut(name) {
            l.0 = Instant::now();
        }
    }

    pub fn unregister(&self, name: &str) {
        lock(&self.loops).remove(name);
    }

    /// Loops that have not beaten in time, with how long they have been silent.
    pub fn stalled(&self) -> Vec<String> {
        let now = Instant::now();
        lock(&self.loops)
            .iter()
            .filter(|(_, (at, max))| now.duration_since(*at) > *max)
            .map(|(name, (at, _))| format!("{name} (silent {:.1}s)", now.duration_since(*at).as_secs_f64()))
            .collect()
    }
}

/// systemd's notification socket (`NOTIFY_SOCKET`), when the service runs under systemd.
pub struct Notifier {
    socket: Option<(UnixDatagram, PathBuf)>,
    /// `WATCHDOG_USEC` halved: how often systemd wants a WATCHDOG=1.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, PathBuf::from(p)))
        });
        let pid_ok = std::env::var("WATCHDOG_PID").map_or(true, |p| p.parse() == Ok(std::process::id()));
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|_| pid_ok)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { socket, watchdog_every }
    }

    /// Sends `state` (e.g. "READY=1"); without systemd, does nothing.
    pub fn notify(&self, state: &str) {
        let Some((sock, path)) = &self.socket else { return };
        let bytes = state.as_bytes();
        let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
                    .and_then(|addr| sock.send_to_addr(bytes, &addr))
            }
            None => sock.send_to(bytes, path),
        };
        if let Err(e) = sent {
            tracing::warn!(socket = %path.display(), error = %e, "cannot notify systemd");
        }
    }
}

/// Refreshes the touch file's modification time (creating it if needed).
pub fn touch(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.set_modified(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_stalled() {
        let l = Liveness::default();
        l.register("fast", Duration::from_secs(60));
        l.register("slow", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        let s = l.stalled();
        assert_eq!(s.len(), 1);
        assert!(s[0].starts_with("slow (silent"), "{s:?}");
        l.register("slow", Duration::from_secs(60));
        assert!(l.stalled().is_empty());
    }

    #[test]
    fn notify_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier { socket: Some((UnixDatagram::unbound().unwrap(), path)), watchdog_every: None };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn touch_refreshes_the_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("alive");
        touch(&p).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        touch(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap().modified().unwrap();
        assert!(m.elapsed().unwrap() < Duration::from_secs(60));
    }
}
