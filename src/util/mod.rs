//! One way to do each infrastructure job, used by every stage: durable file writes ([`fs`]),
//! running a program under a timeout ([`process`]), serving HTTP ([`http`]), TLS ([`tls`]), taking a lock
//! ([`lock`]) and waiting for shutdown ([`until_true`]).

pub mod fs;
pub mod http;
pub mod process;
pub mod tls;

use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// Locks `m`, also after a panic in another holder. Every lock in acpimon guards counters,
/// views or handles that stay consistent between statements, so a poisoned lock is still
/// usable; one panicking task must not take the whole service down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves when `flag` turns true or its sender is gone: the service's shutdown signal.
pub async fn until_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&s| s).await;
}

/// `s` as text for HTML or XML, in content or a quoted attribute: the five markup characters
/// as entities, control characters (but newline and tab, which XML 1.0 and HTML allow) as
/// U+FFFD. One function for the libvirt domain XML and the controller's pages.
pub fn escape_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}
