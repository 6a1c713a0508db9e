//! The simulated VM's doorbell: the `isa-debugcon` chardev socket the table's `_EVT` rings
//! once its record is complete. One client at a time, as a QEMU socket chardev serves; like
//! QEMU with `wait=off`, a ring is dropped while no client is connected.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::machine::Shared;
use acpimon::abi::DOORBELL_BYTE;

/// Serves doorbell clients one after the other until the VM is gone.
pub(super) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut gone = shared.subscribe_gone();
    while !*gone.borrow_and_update() {
        tokio::select! {
            _ = gone.changed() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => client(stream, &shared, &mut gone).await,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
        }
    }
}

async fn client(mut stream: UnixStream, shared: &Shared, gone: &mut watch::Receiver<bool>) {
    // Rings from before the client connected were dropped, as QEMU drops them.
    shared.doorbell_pending.swap(0, Ordering::Relaxed);
    let (mut read, mut write) = stream.split();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            biased;
            _ = gone.changed() => return,
            _ = shared.doorbell.notified() => {
                let n = shared.doorbell_pending.swap(0, Ordering::Relaxed).min(64) as usize;
                if n > 0 && write.write_all(&[DOORBELL_BYTE; 64][..n]).await.is_err() {
                    return;
                }
            }
            // The host sends nothing; a read ends when it leaves.
            r = read.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
        }
    }
}
