use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::sim::SimulatedAml;
use super::*;
use crate::abi::{Source, Status};

fn temp_region(size: u32) -> (tempfile::TempDir, PathBuf, Region) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("region");
    let region = Region::create(&path, size).unwrap();
    (dir, path, region)
}

fn poke(path: &Path, offset: u64, value: u32) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), offset).unwrap();
}

#[test]
fn a_new_region_has_a_header_and_no_record() {
    let (_d, path, region) = temp_region(8192);
    let snap = region.snapshot().unwrap();
    assert_eq!(snap.region_size, 8192);
    assert_eq!(snap.mailbox_size, 8192 - 0x100);
    assert_eq!(snap.record, None);
    assert!(snap.anomalies.is_empty());
    let ro = Region::open(&path, Access::ReadOnly).unwrap();
    assert_eq!(ro.snapshot().unwrap(), snap);
}

#[test]
fn requests_and_records_round_trip() {
    let (_d, _p, region) = temp_region(4096);
    let mut guest = SimulatedAml::boot(0xfebf_f000);
    assert_eq!(guest.write_record(&region, Source::Boot, 12_345), Status::Ok);
    region.write_request(7, 0xdead_beef).unwrap();
    guest.write_record(&region, Source::Ged, 22_345);
    let snap = region.snapshot().unwrap();
    assert_eq!(snap.request, RequestView { request_no: 7, nonce: 0xdead_beef, command: 0 });
    let rec = snap.record.unwrap();
    assert_eq!(rec.seq, 4, "{snap:?}");
    assert_eq!(rec.source, Source::Ged);
    assert!(rec.answers(7, 0xdead_beef));
    assert!(!rec.answers(7, 0xdead_beee));
    // A boot record echoes the request but is no answer to a trigger.
    guest.write_record(&region, Source::Boot, 32_345);
    assert!(!region.snapshot().unwrap().record.unwrap().answers(7, 0xdead_beef));
    assert_eq!((rec.boot_count, rec.ged_count, rec.thermal_count), (1, 1, 0));
    assert_eq!((rec.timer_ticks, rec.bar), (22_345, 0xfebf_f000));
    assert!(snap.anomalies.is_empty());
}

#[test]
fn recreating_keeps_the_record_and_boot_count() {
    let (_d, path, region) = temp_region(4096);
    SimulatedAml::boot(0x1000).write_record(&region, Source::Boot, 1);
    drop(region);
    let again = Region::create(&path, 4096).unwrap();
    let rec = again.snapshot().unwrap().record.unwrap();
    assert_eq!(rec.boot_count, 1);
    // The next boot counts on from there.
    SimulatedAml::boot(0x1000).write_record(&again, Source::Boot, 1);
    assert_eq!(again.snapshot().unwrap().record.unwrap().boot_count, 2);
}

#[test]
fn a_region_of_another_size_is_refused_not_truncated() {
    let (_d, path, _r) = temp_region(4096);
    let e = Region::create(&path, 8192).err().unwrap().to_string();
    assert!(e.contains("is 4096 bytes but 8192 were asked for"), "{e}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
}

#[test]
fn missing_and_short_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let e = Region::open(&path, Access::ReadOnly).err().unwrap().to_string();
    assert!(e.contains("does not exist") && e.contains("acpimon qemu-args"), "{e}");
    std::fs::write(&path, [0u8; 100]).unwrap();
    let e = Region::open(&path, Access::ReadOnly).err().unwrap().to_string();
    assert!(e.contains("is 100 bytes, smaller than the 4096"), "{e}");
}

#[test]
fn a_bad_header_is_a_typed_error() {
    let (_d, path, region) = temp_region(4096);
    poke(&path, 0, 0x1234_5678);
    match region.snapshot() {
        Err(RegionError::Decode { source: DecodeError::BadMagic(0x1234_5678), .. }) => {}
        other => panic!("{other:?}"),
    }
    poke(&path, 0, abi::MAGIC);
    poke(&path, 4, 9);
    let e = region.snapshot().err().unwrap().to_string();
    assert!(e.contains("ABI version 9 is not supported"), "{e}");
    poke(&path, 4, abi::ABI_VERSION);
    poke(&path, 8, 8192);
    let e = region.snapshot().err().unwrap().to_string();
    assert!(e.contains("says the region is 8192 bytes but it has 4096"), "{e}");
    poke(&path, 8, 4096);
    poke(&path, 0x18, 0x90);
    let e = region.snapshot().err().unwrap().to_string();
    assert!(e.contains("record_offset = 0x90 where ABI 1 has 0x80"), "{e}");
}

#[test]
fn a_sequence_stuck_odd_times_out() {
    let (_d, path, region) = temp_region(4096);
    poke(&path, offsets::SEQ as u64, 5);
    let policy = RetryPolicy { max_wait: Duration::from_millis(5), max_attempts: 10 };
    match region.snapshot_with(policy) {
        Err(RegionError::StuckOdd { seq: 5, waited, .. }) => assert!(waited >= policy.max_wait),
        other => panic!("{other:?}"),
    }
    // The next record lands on an even number past it.
    SimulatedAml::boot(0x1000).write_record(&region, Source::Boot, 1);
    assert_eq!(region.snapshot().unwrap().record.unwrap().seq, 8);
}

#[test]
fn odd_values_are_flagged_not_fatal() {
    let (_d, path, region) = temp_region(4096);
    SimulatedAml::boot(0x1000).write_record(&region, Source::Boot, 1);
    poke(&path, offsets::SOURCE as u64, 77);
    poke(&path, offsets::STATUS as u64, 3);
    poke(&path, offsets::GED_COUNT as u64, 1000);
    poke(&path, 0xf0, 1);
    let snap = region.snapshot().unwrap();
    assert_eq!(snap.record.unwrap().source, Source::Unknown(77));
    assert_eq!(
        snap.anomalies,
        [
            Anomaly::ReservedNotZero { offset: 0xf0 },
            Anomaly::UnknownSource { code: 77 },
            Anomaly::UnexpectedStatus { code: 3 },
            Anomaly::CountsExceedSequence { counted: 1000, records: 1 },
        ]
    );
}

#[test]
fn read_only_regions_refuse_requests() {
    let (_d, path, _r) = temp_region(4096);
    let ro = Region::open(&path, Access::ReadOnly).unwrap();
    assert!(matches!(ro.write_request(1, 2), Err(RegionError::ReadOnly { .. })));
}

/// A writer that never pauses against a reader that never pauses: every copy the seqlock
/// accepts must be a record the writer wrote whole.
#[test]
fn seqlock_copies_are_never_torn() {
    let (_d, path, region) = temp_region(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let region = Region::open(&path, Access::ReadWrite).unwrap();
            let mut guest = SimulatedAml::boot(0x1000);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                region.write_request(n, n.wrapping_mul(0x9e37_79b9)).unwrap();
                guest.write_record(&region, Source::Ged, n.wrapping_mul(3));
                // ~50k records/s: 100 times what a guest manages, with gaps a reader can use.
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
            }
            n
        })
    };
    let policy = RetryPolicy { max_wait: Duration::from_secs(1), max_attempts: 1_000_000 };
    let mut checked = 0;
    let start = Instant::now();
    while checked < 20_000 && start.elapsed() < Duration::from_secs(3) {
        if let Some(r) = region.snapshot_with(policy).unwrap().record {
            let n = r.echo_request_no;
            assert_eq!(r.echo_nonce, n.wrapping_mul(0x9e37_79b9), "torn: {r:?}");
            assert_eq!(r.timer_ticks, n.wrapping_mul(3), "torn: {r:?}");
            assert_eq!(r.ged_count, n, "torn: {r:?}");
            assert_eq!(r.seq, 2 * n, "torn: {r:?}");
            checked += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(checked >= 200 && written > 1000, "checked {checked}, written {written}");
}

mod decode_property {
    use proptest::prelude::*;

    use super::*;

    fn valid_fixed(size: u32) -> Vec<u8> {
        let mut v = vec![0u8; abi::FIXED_SIZE];
        v[..0x40].copy_from_slice(abi::header_for(size).as_bytes());
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// Arbitrary bytes of any length never panic the decoder.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), len in any::<u64>()) {
            let _ = decode(&bytes, len);
        }

        /// A valid header with arbitrary guest-written words after it: always a snapshot or a
        /// typed error, and an accepted record always has an even sequence number.
        #[test]
        fn arbitrary_guest_words(words in proptest::collection::vec((0x10usize..0x40, any::<u32>()), 0..40)) {
            let mut fixed = valid_fixed(4096);
            for (i, w) in words {
                fixed[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            match decode(&fixed, 4096) {
                Ok(snap) => if let Some(r) = snap.record { prop_assert_eq!(r.seq & 1, 0) },
                Err(e) => prop_assert!(matches!(e, DecodeError::WriteInProgress(_))),
            }
        }
    }
}

mod mailbox {
    use std::os::unix::fs::FileExt;

    use super::super::*;
    use crate::abi::AppStatus;

    fn write_words(path: &Path, words: &[(usize, u32)]) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        for (off, v) in words {
            f.write_at(&v.to_le_bytes(), *off as u64).unwrap();
        }
    }

    #[test]
    fn the_app_mailbox_decodes_and_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("region");
        let region = Region::create(&path, 4096).unwrap();
        assert_eq!(region.mailbox().unwrap(), Mailbox::Empty);
        let m = abi::MAILBOX_OFFSET;
        write_words(
            &path,
            &[
                (m, abi::MAILBOX_MAGIC),
                (m + 4, 1),
                (m + 8, 6),
                (m + 12, 41),
                (m + 16, 2),
                (m + 20, 77),
                (m + 28, 1000),
            ],
        );
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_at(b"disk \x1b[31mfull\0junk", (m + 0x20) as u64).unwrap();
        match region.mailbox().unwrap() {
            Mailbox::Written(v) => {
                assert_eq!(
                    (v.seq, v.beats, v.status, v.pid, v.period_ms),
                    (6, 41, AppStatus::Degraded, 77, 1000)
                );
                assert_eq!(v.text, "disk ^[[31mfull", "cut at NUL, escape neutralised");
            }
            other => panic!("{other:?}"),
        }
        // Odd: the app is writing (or died writing); the copy gives up after its wait.
        write_words(&path, &[(m + 8, 7)]);
        let policy = RetryPolicy { max_wait: Duration::from_millis(5), ..RetryPolicy::default() };
        assert!(matches!(region.copy_mailbox(policy), Err(RegionError::StuckOdd { seq: 7, .. })));
        write_words(&path, &[(m, 0xdead_beef), (m + 8, 8)]);
        assert_eq!(region.mailbox().unwrap(), Mailbox::Foreign { magic: 0xdead_beef, version: 1 });
    }
}
