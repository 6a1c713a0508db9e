//! Stage 5 of the data path: judging successive snapshots of one VM.
//!
//! A single snapshot cannot tell a reboot from a wrapped timer, or a new record from an old
//! one; a [`Tracker`] remembers the last record and the host time it was seen, and says what
//! changed: a new record, a reboot (the boot count moved, or the guest timer went backwards
//! further than a 32-bit wrap explains), or an anomaly (the sequence or a per-boot counter
//! went backwards within one boot, which only a corrupt or hostile region does).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::read::GuestRecord;

/// 100 ns ticks per second, the unit of the AML `Timer`.
pub const TICKS_PER_SEC: u64 = 10_000_000;

/// Why the tracker believes the guest rebooted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "evidence")]
pub enum Reboot {
    /// The first record of a boot adds one to the region's boot count.
    BootCountChanged { from: u32, to: u32 },
    /// The guest clock advanced more than the host clock could have: it restarted.
    TimerWentBackwards { guest_ticks: u64, host_ticks: u64 },
}

/// Something a healthy guest never does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum HistoryAnomaly {
    SequenceWentBackwards { from: u32, to: u32 },
    CounterWentBackwards { counter: &'static str, from: u32, to: u32 },
}

/// What one new snapshot changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Observation {
    /// A record not seen before.
    pub fresh: bool,
    pub reboot: Option<Reboot>,
    pub anomalies: Vec<HistoryAnomaly>,
    /// Guest uptime: exact when this boot's `_INI` record was seen, otherwise only known
    /// modulo 429.5 s and `None`.
    #[serde(with = "opt_secs")]
    pub guest_uptime: Option<Duration>,
}

#[derive(Clone, Debug)]
struct Seen {
    record: GuestRecord,
    at: Instant,
    /// Unwrapped guest time of `record`, and whether it counts from this boot's start.
    ticks: u64,
    exact: bool,
}

/// Remembers one VM's last record.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    last: Option<Seen>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the record of a snapshot taken at host time `now`.
    pub fn observe(&mut self, record: Option<&GuestRecord>, now: Instant) -> Observation {
        let Some(rec) = record else {
            return Observation::default();
        };
        let mut obs = Observation { fresh: true, ..Observation::default() };
        let next = match &self.last {
            None => baseline(rec, now),
            Some(last) if last.record.seq == rec.seq => {
                obs.fresh = false;
                obs.guest_uptime = last.exact.then(|| ticks_to_duration(last.ticks));
                return obs;
            }
            Some(last) => self.advance(last, rec, now, &mut obs),
        };
        obs.guest_uptime = next.exact.then(|| ticks_to_duration(next.ticks));
        self.last = Some(next);
        obs
    }

    fn advance(&self, last: &Seen, rec: &GuestRecord, now: Instant, obs: &mut Observation) -> Seen {
        let prev = &last.record;
        if (rec.seq.wrapping_sub(prev.seq) as i32) < 0 {
            obs.anomalies.push(HistoryAnomaly::SequenceWentBackwards { from: prev.seq, to: rec.seq });
        }
        if rec.boot_count != prev.boot_count {
            obs.reboot = Some(Reboot::BootCountChanged { from: prev.boot_count, to: rec.boot_count });
            return baseline(rec, now);
        }
        let guest = u64::from(rec.timer_ticks.wrapping_sub(prev.timer_ticks));
        let host = duration_to_ticks(now.saturating_duration_since(last.at));
        // Guest time never runs ahead of host time; allow for scheduling and clock skew.
        if guest > host + host / 20 + 2 * TICKS_PER_SEC {
            obs.reboot = Some(Reboot::TimerWentBackwards { guest_ticks: guest, host_ticks: host });
            return Seen { exact: false, ..baseline(rec, now) };
        }
        for (counter, from, to) in [
            ("ged_count", prev.ged_count, rec.ged_count),
            ("thermal_count", prev.thermal_count, rec.thermal_count),
        ] {
            if to < from {
                obs.anomalies.push(HistoryAnomaly::CounterWentBackwards { counter, from, to });
            }
        }
        Seen { record: *rec, at: now, ticks: last.ticks + guest, exact: last.exact }
    }
}

/// The first record of a series: its timer counts from boot if it is the boot record itself
/// (written within seconds of boot, so it cannot have wrapped).
fn baseline(rec: &GuestRecord, now: Instant) -> Seen {
    let first_of_boot =
        rec.source == crate::abi::Source::Boot && rec.ged_count == 0 && rec.thermal_count == 0;
    Seen { record: *rec, at: now, ticks: u64::from(rec.timer_ticks), exact: first_of_boot }
}

pub fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_nanos(ticks.saturating_mul(100))
}

fn duration_to_ticks(d: Duration) -> u64 {
    (d.as_nanos() / 100).min(u128::from(u64::MAX)) as u64
}

mod opt_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{Source, Status};

    fn rec(seq: u32, source: Source, timer: u32, boot: u32, ged: u32) -> GuestRecord {
        GuestRecord {
            seq,
            status: Status::Ok,
            source,
            echo_request_no: 0,
            echo_nonce: 0,
            timer_ticks: timer,
            bar: 0,
            boot_count: boot,
            ged_count: ged,
            thermal_count: 0,
        }
    }

    #[test]
    fn uptime_unwraps_across_the_32_bit_timer() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        let o = t.observe(Some(&rec(2, Source::Boot, 30_000_000, 1, 0)), t0);
        assert_eq!(o.guest_uptime, Some(Duration::from_secs(3)));
        // 300 s later, twice: the second step wraps the 32-bit timer (429.5 s).
        let step = 3_000_000_000u32;
        let o = t.observe(Some(&rec(4, Source::Ged, 30_000_000 + step, 1, 1)), t0 + Duration::from_secs(300));
        assert_eq!(o.guest_uptime, Some(Duration::from_secs(303)));
        let wrapped = 30_000_000u32.wrapping_add(step).wrapping_add(step);
        let o = t.observe(Some(&rec(6, Source::Ged, wrapped, 1, 2)), t0 + Duration::from_secs(600));
        assert_eq!(o.guest_uptime, Some(Duration::from_secs(603)));
        assert!(o.fresh && o.reboot.is_none() && o.anomalies.is_empty());
        // The same record again is not fresh.
        assert!(!t.observe(Some(&rec(6, Source::Ged, wrapped, 1, 2)), t0 + Duration::from_secs(601)).fresh);
    }

    #[test]
    fn a_new_boot_count_is_a_reboot() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe(Some(&rec(10, Source::Ged, 900_000_000, 1, 4)), t0);
        let o = t.observe(Some(&rec(12, Source::Boot, 20_000_000, 2, 0)), t0 + Duration::from_secs(5));
        assert_eq!(o.reboot, Some(Reboot::BootCountChanged { from: 1, to: 2 }));
        assert_eq!(o.guest_uptime, Some(Duration::from_secs(2)));
        assert!(o.anomalies.is_empty(), "counters restart with a boot: {o:?}");
    }

    #[test]
    fn a_timer_going_backwards_is_a_reboot() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe(Some(&rec(10, Source::Ged, 900_000_000, 1, 4)), t0);
        // 1 s of host time, but the guest timer fell from 90 s to 2 s.
        let o = t.observe(Some(&rec(12, Source::Ged, 20_000_000, 1, 5)), t0 + Duration::from_secs(1));
        assert!(matches!(o.reboot, Some(Reboot::TimerWentBackwards { .. })), "{o:?}");
    }

    #[test]
    fn counters_and_sequence_going_backwards_are_anomalies() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.observe(Some(&rec(10, Source::Ged, 100, 1, 4)), t0);
        let o = t.observe(Some(&rec(8, Source::Ged, 200, 1, 3)), t0 + Duration::from_secs(1));
        assert_eq!(
            o.anomalies,
            [
                HistoryAnomaly::SequenceWentBackwards { from: 10, to: 8 },
                HistoryAnomaly::CounterWentBackwards { counter: "ged_count", from: 4, to: 3 },
            ]
        );
        assert_eq!(o.reboot, None);
    }

    #[test]
    fn no_record_is_no_observation() {
        assert_eq!(Tracker::new().observe(None, Instant::now()), Observation::default());
    }
}
