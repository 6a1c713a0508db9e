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
