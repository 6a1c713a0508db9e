//! CI's short fuzz run, and proof that the harness can fail: its generators reach the parsers'
//! accepting paths, and a panicking target is caught, reported and reproducible.

use acpimon::app::Message;
use acpimon::read::decode::decode;
use acpimon_fuzz::{run, run_one, target, Rng, Target, TARGETS};

#[test]
fn every_target_survives_100k_inputs() {
    for t in &TARGETS {
        let o = run(t, 100_000, 2, 0x5eed);
        assert_eq!(o.inputs, 100_000, "{}", t.name);
        let first = o.crashes.first().map(|c| format!("{} on {}", c.message, acpimon_fuzz::hex(&c.input)));
        assert!(o.crashes.is_empty(), "{}: {} crashes, first: {first:?}", t.name, o.crashes.len());
    }
}

/// Inputs that every parser rejects at its first check would prove nothing.
#[test]
fn the_generators_reach_the_accepting_paths() {
    let mut rng = Rng::new(7);
    let region = target("region").unwrap();
    let (mut records, mut empty) = (0, 0);
    for _ in 0..10_000 {
        let input = (region.generate)(&mut rng);
        let (len, bytes) = input.split_at(8.min(input.len()));
        let len = u64::from_le_bytes(len.try_into().unwrap_or([0; 8]));
        match decode(bytes, len) {
            Ok(s) if s.record.is_some() => records += 1,
            Ok(_) => empty += 1,
            Err(_) => {}
        }
    }
    assert!(records > 1000 && empty > 200, "decoded records {records}, empty regions {empty}");

    let frames = target("port-frames").unwrap();
    let (mut valid, mut bad) = (0, 0);
    for _ in 0..10_000 {
        let mut d = acpimon::read::frame::FrameDecoder::new();
        for b in (frames.generate)(&mut rng) {
            match d.push(b) {
                Some(acpimon::read::frame::FrameEvent::Frame(_)) => valid += 1,
                Some(acpimon::read::frame::FrameEvent::Bad(_)) => bad += 1,
                _ => {}
            }
        }
    }
    assert!(valid > 5000 && bad > 1000, "valid frames {valid}, dropped {bad}");

    let app = target("app-line").unwrap();
    let mut kinds = [0; 4];
    for _ in 0..10_000 {
        match acpimon::app::parse(&(app.generate)(&mut rng)) {
            Ok(Message::Ack { .. }) => kinds[0] += 1,
            Ok(Message::Health(_)) => kinds[1] += 1,
            Ok(Message::Info(_)) => kinds[2] += 1,
            Ok(Message::Hello(_)) => kinds[3] += 1,
            Err(_) => {}
        }
    }
    assert!(kinds.iter().all(|&k| k > 200), "ack, health, info, hello parsed: {kinds:?}");

    let qmp = target("qmp-message").unwrap();
    use acpimon::trigger::qmp::{parse_message, EventKind, Message as Qmp};
    // [greeting, reply, error, event the monitor reacts to]
    let mut kinds = [0usize; 4];
    for _ in 0..10_000 {
        match parse_message(&(qmp.generate)(&mut rng)) {
            Ok(Qmp::Greeting { .. }) => kinds[0] += 1,
            Ok(Qmp::Reply { .. }) => kinds[1] += 1,
            Ok(Qmp::Error { .. }) => kinds[2] += 1,
            Ok(Qmp::Event(ev)) if !matches!(ev.kind, EventKind::Other) => kinds[3] += 1,
            _ => {}
        }
    }
    assert!(kinds.iter().all(|&k| k > 200), "greeting, reply, error, known event parsed: {kinds:?}");
}

#[test]
fn a_panicking_target_is_caught_saved_and_reproduced() {
    fn gen(rng: &mut Rng) -> Vec<u8> {
        vec![rng.below(64) as u8]
    }
    fn check(input: &[u8]) {
        assert!(input != [42], "the planted bug");
    }
    static PLANTED: Target = Target { name: "planted", generate: gen, check };
    let o = run(&PLANTED, 10_000, 2, 1);
    let crash = o.crashes.first().expect("the planted bug is found");
    assert_eq!(crash.input, [42]);
    assert!(crash.message.contains("the planted bug"), "{}", crash.message);
    let dir = tempfile::tempdir().unwrap();
    let saved = crash.save(dir.path()).unwrap();
    let input = std::fs::read(&saved).unwrap();
    assert!(run_one(check, &input).is_err());
    assert!(run_one(check, &[1]).is_ok());
}
