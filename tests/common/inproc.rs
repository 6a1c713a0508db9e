//! The reference controller in the test's own process (`acpimon::controller::serve` on a
//! tokio task), for tests of the forwarding protocol that need no node service.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use acpimon::controller::{self, ControllerError, ControllerOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Options with nothing but where to listen and store: no analyzer, plain HTTP, no tokens.
pub fn options(listen: SocketAddr, store: &Path) -> ControllerOptions {
    ControllerOptions {
        listen,
        store: store.into(),
        database: None,
        analyzer: None,
        analyzer_timeout: Duration::from_secs(5),
        tls: None,
        tokens: None,
    }
}

/// A controller serving on a task.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), ControllerError>>,
}

impl Running {
    /// Starts it, or returns why it did not start.
    pub async fn start(opts: ControllerOptions) -> Result<Running, ControllerError> {
        let (stop, rx) = watch::channel(false);
        let (ready_tx, ready) = oneshot::channel();
        let task = tokio::spawn(controller::serve(opts, rx, Some(ready_tx)));
        match ready.await {
            Ok(addr) => Ok(Running { addr, stop, task }),
            Err(_) => Err(task.await.unwrap().expect_err("neither an address nor an error")),
        }
    }

    /// Stops it, promptly.
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("controller stops")
            .unwrap()
            .unwrap();
    }
}
