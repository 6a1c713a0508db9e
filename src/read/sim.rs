//! The AML's record writer, re-done in Rust against a mapped region: the simulated guest for
//! scale benchmarks and for stress-testing the reader. It performs the same stores in the
//! same order as `WREC` in `asl/acpimon.asl`; `tests/acpica.rs` checks both produce the same
//! bytes for the same inputs. It never replaces the real guest in functional tests.

use super::Region;
use crate::abi::{self, offsets, Source, Status};

/// The AML's per-boot state (`CNTB`, `CNTG`, `CNTT`) and the BAR it would find.
#[derive(Clone, Debug, Default)]
pub struct SimulatedAml {
    pub boot_count: u32,
    pub ged_count: u32,
    pub thermal_count: u32,
    /// What the AML would write as `bar`.
    pub bar: u32,
}

impl SimulatedAml {
    /// A freshly booted guest whose BAR2 is at `bar`.
    pub fn boot(bar: u32) -> Self {
        SimulatedAml { bar, ..Default::default() }
    }

    /// `WREC (source)` with guest time `timer_ticks`.
    pub fn write_record(&mut self, region: &Region, source: Source, timer_ticks: u32) -> Status {
        if region.load(offsets::MAGIC) != abi::MAGIC || region.load(offsets::ABI_VERSION) != abi::ABI_VERSION
        {
            return Status::BadHeader;
        }
        if self.boot_count == 0 {
            self.boot_count = region.load(offsets::BOOT_COUNT).wrapping_add(1);
        }
        match source {
            Source::Ged => self.ged_count = self.ged_count.wrapping_add(1),
            Source::Thermal => self.thermal_count = self.thermal_count.wrapping_add(1),
            _ => {}
        }
        let writing = region.load(offsets::SEQ).wrapping_add(1) | 1;
        region.store(offsets::SEQ, writing);
        region.store(offsets::STATUS, Status::Ok.code());
        region.store(offsets::SOURCE, source.code());
        region.store(offsets::ECHO_REQUEST_NO, region.load(offsets::REQUEST_NO));
        region.store(offsets::ECHO_NONCE, region.load(offsets::NONCE));
        region.store(offsets::TIMER, timer_ticks);
        region.store(offsets::BAR, self.bar);
        region.store(offsets::BOOT_COUNT, self.boot_count);
        region.store(offsets::GED_COUNT, self.ged_count);
        region.store(offsets::THERMAL_COUNT, self.thermal_count);
        region.store(offsets::SEQ, writing.wrapping_add(1));
        Status::Ok
    }
}
