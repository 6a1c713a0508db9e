//! The node-wide limit on diagnostic bundles collected at once (`[bundles] concurrent`).
//!
//! Every incident starts its own bundle; when many VMs fail together (a storage outage, a host
//! under memory pressure) thousands of bundles at once would starve the runtime that also
//! runs the heartbeats, and delay the detection of the next hang (measured: 1,999 bundles at
//! once stretched detection to 1.67× its bound). Detection never waits for a slot: the
//! `unresponsive` transition and its event are emitted before the bundle is queued. A queued
//! bundle waits for a slot in the order it was queued (tokio's semaphore is fair), and its
//! VM's view says `queued` until it gets one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The default limit: the node's CPU count, at least 2 (one slow bundle does not hold all
/// others up) and at most 16.
pub fn default_concurrent() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16)
}

/// Slots for bundles being collected, shared by every VM of the service.
#[derive(Debug)]
pub struct BundleSlots {
    limit: usize,
    sem: Arc<Semaphore>,
    queued: AtomicUsize,
}

/// A bundle's slot; the next queued bundle gets it when this is dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Counts a waiter as queued until it gets its slot or gives up (its task aborted).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl BundleSlots {
    /// At most `limit` bundles at once (0 is taken as 1).
    pub fn new(limit: usize) -> Arc<BundleSlots> {
        let limit = limit.max(1);
        Arc::new(BundleSlots { limit, sem: Arc::new(Semaphore::new(limit)), queued: AtomicUsize::new(0) })
    }

    /// Waits for a slot, behind every bundle queued before.
    pub async fn acquire(&self) -> Slot {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.queued);
        let permit = self.sem.clone().acquire_owned().await.expect("the semaphore is never closed");
        Slot { _permit: permit }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bundles being collected now.
    pub fn running(&self) -> usize {
        self.limit - self.sem.available_permits()
    }

    /// Bundles waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn at_most_the_limit_run_and_queued_bundles_are_taken_in_order() {
        // One thread: the order the tasks record is the order their slots were given.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let slots = BundleSlots::new(2);
            let running = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let order = Arc::new(Mutex::new(Vec::new()));
            // Bundles that finish only when told to.
            let (go_tx, go) = tokio::sync::watch::channel(false);
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (slots2, running, peak, order) =
                    (slots.clone(), running.clone(), peak.clone(), order.clone());
                let mut go = go.clone();
                tasks.push(tokio::spawn(async move {
                    let _slot = slots2.acquire().await;
                    order.lock().unwrap().push(i);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let _ = go.wait_for(|&g| g).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                }));
                // Each one queued before the next.
                while slots.running() + slots.queued() < i + 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            assert_eq!((slots.running(), slots.queued()), (2, 6));
            go_tx.send_replace(true);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(peak.load(Ordering::SeqCst), 2);
            assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
            assert_eq!((slots.running(), slots.queued()), (0, 0));
        });
    }

    #[test]
    fn an_aborted_waiter_leaves_the_queue_and_a_dropped_slot_frees_its_place() {
        rt().block_on(async {
            let slots = BundleSlots::new(1);
            let held = slots.acquire().await;
            let s = slots.clone();
            let waiter = tokio::spawn(async move {
                let _slot = s.acquire().await;
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!((slots.running(), slots.queued()), (1, 1));
            waiter.abort();
            let _ = waiter.await;
            assert_eq!(slots.queued(), 0, "an aborted waiter is no longer counted as queued");
            drop(held);
            // The slot is free again: a new bundle gets it at once.
            let got = tokio::time::timeout(Duration::from_secs(1), slots.acquire()).await;
            assert!(got.is_ok(), "the slot was not given back");
            assert_eq!(slots.running(), 1);
        });
    }

    #[test]
    fn the_default_limit_follows_the_cores_within_bounds() {
        let n = default_concurrent();
        assert!((2..=16).contains(&n), "{n}");
        assert_eq!(BundleSlots::new(0).limit(), 1);
    }
}
