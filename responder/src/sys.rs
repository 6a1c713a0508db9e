//! The few system calls std does not offer: `poll`, `kill` of a process group and
//! `CLOCK_MONOTONIC`. Each is a thin safe wrapper around one `unsafe` libc call. (The other
//! `unsafe` of this crate is the mailbox mapping, in `mailbox.rs`.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// One descriptor to [`poll`]: what to wait for, and what happened.
#[derive(Clone, Copy, Debug)]
pub struct PollFd {
    fd: libc::c_int,
    /// Events wanted ([`IN`], [`OUT`]).
    pub events: i16,
    /// Events that happened, after [`poll`].
    pub revents: i16,
}

/// Readable (or, on a virtio port, disconnected: see [`HUP`]).
pub const IN: i16 = libc::POLLIN;
/// Writable.
pub const OUT: i16 = libc::POLLOUT;
/// Hung up: for a virtio port, no host is connected.
pub const HUP: i16 = libc::POLLHUP;
/// An error condition.
pub const ERR: i16 = libc::POLLERR;
/// Not an open descriptor.
pub const NVAL: i16 = libc::POLLNVAL;

impl PollFd {
    /// An entry `poll` skips (a negative descriptor).
    pub fn none() -> PollFd {
        PollFd { fd: -1, events: 0, revents: 0 }
    }

    /// Waits on `fd` for `events` (the borrow only supplies the number: the caller keeps the
    /// descriptor open across [`poll`]).
    pub fn new(fd: BorrowedFd<'_>, events: i16) -> PollFd {
        PollFd { fd: fd.as_raw_fd(), events, revents: 0 }
    }
}

/// `poll(2)` with a timeout (rounded up to whole milliseconds); an interrupted call counts as
/// a timeout. Returns how many descriptors have events.
pub fn poll(fds: &mut [PollFd], timeout: Duration) -> io::Result<usize> {
    let mut raw: Vec<libc::pollfd> =
        fds.iter().map(|f| libc::pollfd { fd: f.fd, events: f.events, revents: 0 }).collect();
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `raw` is a valid, exclusively borrowed array of `raw.len()` pollfd structs that
    // outlives the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    for (f, r) in fds.iter_mut().zip(&raw) {
        f.revents = r.revents;
    }
    Ok(n as usize)
}

/// Sends `SIGKILL` to the process group `pgid` (a child started with `process_group(0)`);
/// an already empty group is not an error.
pub fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else { return };
    if pgid <= 1 {
        return; // never -1 (everything) or -0 (our own group)
    }
    // SAFETY: kill has no memory-safety preconditions; the negative pid names only the group
    // of the audit we started (checked above not to be ours or everyone).
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// `CLOCK_MONOTONIC` (the guest's uptime without suspend) in milliseconds.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).wrapping_mul(1000).wrapping_add(ts.tv_nsec as u64 / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn poll_reports_readable_and_times_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut fds = [PollFd::new(b.as_fd(), IN)];
        let t = Instant::now();
        assert_eq!(poll(&mut fds, Duration::from_millis(50)).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(40));
        a.write_all(b"x").unwrap();
        assert_eq!(poll(&mut fds, Duration::from_secs(5)).unwrap(), 1);
        assert_ne!(fds[0].revents & IN, 0);
        drop(a);
        poll(&mut fds, Duration::from_secs(5)).unwrap();
        assert_ne!(fds[0].revents & (IN | HUP), 0);
    }

    #[test]
    fn the_monotonic_clock_advances() {
        let a = monotonic_ms();
        std::thread::sleep(Duration::from_millis(20));
        assert!(monotonic_ms() >= a + 15);
    }

    #[test]
    fn kill_group_refuses_the_dangerous_ids() {
        kill_group(0);
        kill_group(1);
        kill_group(u32::MAX); // not a pid_t: ignored, not -1
    }
}
