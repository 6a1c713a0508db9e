//! A fuzz harness on stable Rust for the parsers that read what a guest or QEMU writes: the
//! region decoder, the port channel's frame decoder, the app-protocol line parser and the QMP
//! message parser.
//!
//! cargo-fuzz (libFuzzer) needs a nightly compiler; this harness needs none. Each target has
//! a structure-aware generator (valid regions, protocol lines and QMP messages, built from the
//! ABI and the protocol documents) whose output is then mutated byte-wise: bits flipped, words
//! set to edge values, tokens spliced in, ranges deleted or duplicated, the input truncated or
//! extended; a share of inputs is plain random bytes. Every input runs under `catch_unwind`;
//! a panic (or a broken invariant, asserted after each call) is a crash, reported with its
//! input, which is written to a file that `acpimon-fuzz --reproduce` replays.
//!
//! Input `i` of worker `w` depends only on the seed, `w` and `i`, so a run is reproducible.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use acpimon::abi;
use acpimon::app::{self, Message};
use serde_json::{json, Map, Value};

/// A small, fast PRNG (the SplitMix64 sequence): quality is plenty for input generation.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A 32-bit word, biased towards the values parsers get wrong.
    pub fn word(&mut self) -> u32 {
        match self.below(4) {
            0 => *self.pick(&[0, 1, 2, 3, 0xff, 0x7fff_ffff, 0x8000_0000, u32::MAX, u32::MAX - 1]),
            1 => self.below(16) as u32,
            _ => self.next_u32(),
        }
    }
}

/// One fuzz target: a generator of inputs and the code under test with its invariants.
pub struct Target {
    pub name: &'static str,
    pub generate: fn(&mut Rng) -> Vec<u8>,
    /// Panics on a bug (the code under test panicked, or an invariant it promises broke).
    pub check: fn(&[u8]),
}

/// Every target, in the order a run reports them.
pub const TARGETS: [Target; 4] = [
    Target { name: "region", generate: region::generate, check: region::check },
    Target { name: "port-frames", generate: port_frames::generate, check: port_frames::check },
    Target { name: "app-line", generate: app_line::generate, check: app_line::check },
    Target { name: "qmp-message", generate: qmp_message::generate, check: qmp_message::check },
];

pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Applies 1–8 random edits to `buf`; `tokens` are spliced in (JSON punctuation, keys, ...).
pub fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, tokens: &[&[u8]]) {
    const BYTES: [u8; 14] =
        [0, 0xff, 0x7f, 0x80, 0xc0, 0xe0, b'"', b'\\', b'{', b'}', b'\n', b'\r', b'0', b'-'];
    for _ in 0..1 + rng.below(8) {
        let len = buf.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                buf[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                buf[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                buf[i] = *rng.pick(&BYTES);
            }
            3 if len >= 4 => {
                // Word-aligned mostly: the region is read as little-endian u32 fields.
                let i = if rng.one_in(4) { rng.below(len - 3) } else { rng.below(len / 4) * 4 };
                let w = rng.word();
                buf[i..i + 4].copy_from_slice(&w.to_le_bytes());
            }
            4 if !tokens.is_empty() => {
                let at = rng.below(len + 1);
                let t = rng.pick(tokens);
                buf.splice(at..at, t.iter().copied());
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16.min(len - a))).min(len);
                buf.drain(a..b);
            }
            6 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64.min(len - a))).min(len);
                let copy = buf[a..b].to_vec();
                let at = rng.below(len + 1);
                buf.splice(at..at, copy);
            }
            7 if len > 0 => buf.truncate(rng.below(len)),
            8 => {
                let n = 1 + rng.below(64);
                let extra = rng.bytes(n);
                buf.extend_from_slice(&extra);
            }
            9 if len > 0 && !tokens.is_empty() => {
                let t = rng.pick(tokens);
                let at = rng.below(len);
                let end = (at + t.len()).min(len);
                buf[at..end].copy_from_slice(&t[..end - at]);
            }
            _ => {
                // Swap two bytes (also the fallback when the buffer is too short for the rest).
                if len > 1 {
                    let (a, b) = (rng.below(len), rng.below(len));
                    buf.swap(a, b);
                } else {
                    buf.push(rng.next_u64() as u8);
                }
            }
        }
    }
}

/// Text a guest (or a confused QEMU) might put in a string: plain, long, escapes, controls,
/// multi-byte characters.
pub fn string(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => String::new(),
        1 => "x".repeat(rng.below(3000)),
        2 => (0..rng.below(40)).map(|_| char::from(rng.below(0x20) as u8)).collect(),
        3 => (0..rng.below(40))
            .map(|_| {
                *rng.pick(&['é', '€', '𝄞', '\u{7f}', '\u{85}', '\u{202e}', '\u{fffd}', '"', '\\', '\u{1b}'])
            })
            .collect(),
        4 => rng
            .pick(&["ok", "degraded", "failed", "running", "paused", "STOP", "pause", "9f1c2a7e"])
            .to_string(),
        _ => (0..rng.below(24)).map(|_| char::from(b' ' + rng.below(95) as u8)).collect(),
    }
}

/// A number JSON allows, biased to the edges.
pub fn number(rng: &mut Rng) -> Value {
    match rng.below(7) {
        0 => json!(u64::MAX),
        1 => json!(i64::MIN),
        2 => json!(rng.next_u64() as f64 / 7.0),
        3 => json!(-(rng.below(1000) as i64)),
        4 => json!(1e308),
        5 => json!(rng.next_u32()),
        _ => json!(rng.below(4)),
    }
}

/// Any JSON value, nested at most `depth` deep.
pub fn value(rng: &mut Rng, depth: usize) -> Value {
    let leaf = depth == 0 || rng.one_in(2);
    match (leaf, rng.below(6)) {
        (_, 0) => Value::Null,
        (_, 1) => Value::Bool(rng.one_in(2)),
        (_, 2) => number(rng),
        (true, _) => Value::String(string(rng)),
        (false, 3) => Value::Array((0..rng.below(6)).map(|_| value(rng, depth - 1)).collect()),
        (false, _) => {
            let mut m = Map::new();
            for _ in 0..rng.below(6) {
                let key = if rng.one_in(2) {
                    rng.pick(&[
                        "v", "type", "id", "event", "data", "return", "error", "class", "desc", "status",
                    ])
                    .to_string()
                } else {
                    string(rng)
                };
                m.insert(key, value(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// Serialises `v` as one line, then maybe mutates it with `tokens`, maybe nests it deeply,
/// maybe replaces it with random bytes.
fn line(rng: &mut Rng, v: &Value, tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("a Value serialises");
    match rng.below(10) {
        0..=2 => {}
        3 => out.extend_from_slice(b"\r"),
        4 => {
            // Deep nesting: the parsers must refuse it, not overflow the stack.
            let depth = 1 + rng.below(2000);
            let mut deep = Vec::with_capacity(out.len() + 2 * depth);
            deep.extend(std::iter::repeat_n(b'[', depth));
            deep.extend_from_slice(&out);
            deep.extend(std::iter::repeat_n(b']', depth));
            out = deep;
        }
        5 => {
            let n = rng.below(256);
            out = rng.bytes(n);
        }
        _ => mutate(rng, &mut out, tokens),
    }
    out
}

/// The control characters [`acpimon::console::sanitize`] promises to have neutralised.
fn assert_sanitized(what: &str, s: &str) {
    assert!(
        !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
        "{what} holds a control character: {s:?}"
    );
}

/// The region: [`acpimon::read::decode`] (header, request, record) and the app mailbox.
/// Input layout: the region's length as 8 little-endian bytes, then the region's bytes.
pub mod region {
    use super::*;
    use acpimon::read::decode::{decode, decode_mailbox, Mailbox};
    use zerocopy::IntoBytes;

    const SIZES: [u32; 6] = [4096, 8192, 65536, 1 << 20, 64 << 20, 4096 * 3];

    pub fn generate(rng: &mut Rng) -> Vec<u8> {
        if rng.one_in(16) {
            let n = rng.below(abi::FIXED_SIZE + abi::MAILBOX_LAYOUT_SIZE + 64);
            return rng.bytes(n);
        }
        let size =
            if rng.one_in(8) { rng.word().max(abi::MIN_REGION_SIZE as u32) } else { *rng.pick(&SIZES) };
        let mut b = vec![0u8; abi::MAILBOX_OFFSET + abi::MAILBOX_LAYOUT_SIZE];
        let header = abi::header_for(size);
        b[abi::HEADER_OFFSET..abi::HEADER_OFFSET + header.as_bytes().len()]
            .copy_from_slice(header.as_bytes());
        let mut put = |off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(abi::offsets::REQUEST_NO, rng.word());
        put(abi::offsets::NONCE, rng.next_u32());
        let seq = match rng.below(4) {
            0 => 0,
            1 => rng.word() | 1,
            _ => rng.word() & !1,
        };
        put(abi::offsets::SEQ, seq);
        put(abi::offsets::STATUS, if rng.one_in(2) { 0 } else { rng.word() });
        put(abi::offsets::SOURCE, if rng.one_in(2) { rng.below(4) as u32 } else { rng.word() });
        for off in [
            abi::offsets::ECHO_REQUEST_NO,
            abi::offsets::ECHO_NONCE,
            abi::offsets::TIMER,
            abi::offsets::BAR,
            abi::offsets::BOOT_COUNT,
            abi::offsets::GED_COUNT,
            abi::offsets::THERMAL_COUNT,
        ] {
            put(off, rng.word());
        }
        let m = abi::MAILBOX_OFFSET;
        if !rng.one_in(4) {
            put(m, if rng.one_in(8) { rng.word() } else { abi::MAILBOX_MAGIC });
            put(m + 4, if rng.one_in(8) { rng.word() } else { abi::MAILBOX_VERSION });
            for i in 2..8 {
                put(m + 4 * i, rng.word());
            }
            let text = string(rng).into_bytes();
            let n = text.len().min(abi::MAILBOX_TEXT);
            b[m + 32..m + 32 + n].copy_from_slice(&text[..n]);
            if rng.one_in(4) {
                let junk = rng.bytes(abi::MAILBOX_TEXT);
                b[m + 32..m + 32 + abi::MAILBOX_TEXT].copy_from_slice(&junk);
            }
        }
        if rng.one_in(2) {
            mutate(rng, &mut b, &[]);
        }
        let len: u64 = match rng.below(8) {
            0 => rng.next_u64(),
            1 => u64::from(size) + 1,
            2 => u64::from(size).wrapping_sub(1),
            _ => u64::from(size),
        };
        let mut input = len.to_le_bytes().to_vec();
        input.extend_from_slice(&b);
        input
    }

    pub fn check(input: &[u8]) {
        let (len, bytes) = match input.split_first_chunk::<8>() {
            Some((len, rest)) => (u64::from_le_bytes(*len), rest),
            None => (0, input),
        };
        if let Ok(snap) = decode(bytes, len) {
            assert_eq!(u64::from(snap.region_size), len, "a snapshot of another size than the region");
            if let Some(r) = &snap.record {
                assert!(r.seq != 0 && r.seq & 1 == 0, "a record accepted mid-write (seq {})", r.seq);
            }
            let _ = acpimon::report::snapshot_table(Path::new("region"), &snap, None);
            let _ = serde_json::to_string(&snap).expect("a snapshot serialises");
        }
        if let Some(m) = bytes.get(abi::MAILBOX_OFFSET..abi::MAILBOX_OFFSET + abi::MAILBOX_LAYOUT_SIZE) {
            let m: &[u8; abi::MAILBOX_LAYOUT_SIZE] = m.try_into().expect("sliced to the layout size");
            if let Mailbox::Written(v) = decode_mailbox(m) {
                assert_sanitized("the mailbox text", &v.text);
                assert!(v.text.len() <= 3 * abi::MAILBOX_TEXT, "the mailbox text grew unbounded");
            }
        }
    }
}

/// The app protocol: [`acpimon::app::parse`] on one line from the guest.
/// The port channel's byte stream (doorbell rings and SLIP frames on the doorbell port): valid
/// frames, rings and garbage, mutated.
pub mod port_frames {
    use super::*;
    use acpimon::abi::PortFrame;
    use acpimon::read::frame::{FrameDecoder, FrameEvent};

    pub fn generate(rng: &mut Rng) -> Vec<u8> {
        if rng.one_in(16) {
            let n = rng.below(512);
            return rng.bytes(n);
        }
        let mut out = Vec::new();
        for _ in 0..1 + rng.below(6) {
            match rng.below(4) {
                0 => out.push(abi::SLIP_END),
                1 => {
                    let n = rng.below(64);
                    out.extend(rng.bytes(n));
                }
                _ => {
                    let w: Vec<u32> = (0..abi::FRAME_WORDS).map(|_| rng.word()).collect();
                    let mut f = PortFrame::default();
                    let words = [
                        &mut f.frame_no,
                        &mut f.status,
                        &mut f.source,
                        &mut f.token,
                        &mut f.timer,
                        &mut f.vendor_device,
                        &mut f.bar2,
                        &mut f.bar3,
                        &mut f.ged_count,
                        &mut f.thermal_count,
                    ];
                    for (dst, v) in words.into_iter().zip(w) {
                        *dst = v.into();
                    }
                    f.tag = if rng.one_in(8) { rng.word() } else { abi::FRAME_TAG }.into();
                    out.extend(f.sealed().encode());
                }
            }
        }
        if rng.one_in(2) {
            mutate(rng, &mut out, &[&[abi::SLIP_END], &[abi::SLIP_ESC], &[abi::SLIP_ESC, abi::SLIP_ESC_END]]);
        }
        out
    }

    pub fn check(input: &[u8]) {
        let mut d = FrameDecoder::new();
        let mut events = 0;
        for b in input {
            if let Some(e) = d.push(*b) {
                events += 1;
                if let FrameEvent::Frame(f) = e {
                    // Only a frame whose checksum holds is accepted.
                    let w = f.words();
                    assert_eq!(abi::frame_checksum(&w[..abi::FRAME_WORDS - 1]), f.checksum.get());
                }
            }
        }
        assert_eq!(events, input.iter().filter(|b| **b == abi::SLIP_END).count(), "one event per END");
    }
}

pub mod app_line {
    use super::*;

    pub const TOKENS: [&[u8]; 22] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"\\u0000",
        b"\\ud800",
        b"\\\"",
        b"null",
        b"true",
        b"1e999",
        b"-0",
        b"\"v\":1",
        b"\"type\":\"health\"",
        b"\"type\":\"ack\"",
        b"\"status\":\"ok\"",
        b"\"audit\":",
        b"\"nonce\":",
        b"\xff\xfe",
        b"\r",
    ];

    pub fn generate(rng: &mut Rng) -> Vec<u8> {
        let v = match rng.below(16) {
            0 => 1.into(),
            1 => rng
                .pick(&[json!(0), json!(2), json!("1"), json!(1.0), json!(-1), json!(u64::MAX), Value::Null])
                .clone(),
            _ => json!(1),
        };
        let mut m = Map::new();
        m.insert("v".into(), v);
        match rng.below(7) {
            0 => {
                m.insert("type".into(), json!("ack"));
                m.insert("nonce".into(), if rng.one_in(4) { value(rng, 2) } else { json!(string(rng)) });
                m.insert("seq".into(), number(rng));
            }
            1 | 2 => {
                m.insert("type".into(), json!("health"));
                let status = if rng.one_in(4) {
                    json!(string(rng))
                } else {
                    json!(rng.pick(&["ok", "degraded", "failed"]))
                };
                m.insert("status".into(), status);
                if rng.one_in(2) {
                    m.insert("id".into(), json!(string(rng)));
                }
                if rng.one_in(2) {
                    m.insert("details".into(), json!(string(rng)));
                }
                let audit = match rng.below(4) {
                    0 => Value::Null,
                    1 => value(rng, 2),
                    _ => json!({ "name": string(rng), "exit": number(rng), "output": string(rng) }),
                };
                if rng.one_in(2) {
                    m.insert("audit".into(), audit);
                }
            }
            3 => {
                m.insert("type".into(), json!("info"));
                m.insert("app".into(), json!(string(rng)));
                m.insert("data".into(), value(rng, 4));
            }
            4 => {
                m.insert("type".into(), json!("hello"));
                m.insert("version".into(), json!(string(rng)));
            }
            5 => {
                m.insert("type".into(), json!(rng.pick(&["challenge", "", "HEALTH", "ack "])));
            }
            _ => {
                let v = value(rng, 5);
                return line(rng, &v, &TOKENS);
            }
        }
        line(rng, &Value::Object(m), &TOKENS)
    }

    pub fn check(input: &[u8]) {
        let text_ok = |what: &str, s: &str| {
            assert!(s.len() <= app::MAX_TEXT, "{what} longer than MAX_TEXT: {} bytes", s.len());
            assert_sanitized(what, s);
        };
        match app::parse(input) {
            Ok(Message::Ack { nonce }) => text_ok("the nonce", &nonce),
            Ok(Message::Health(h)) => {
                for (what, s) in [("the id", &h.id), ("the details", &h.details)] {
                    if let Some(s) = s {
                        text_ok(what, s);
                    }
                }
                if let Some(a) = &h.audit {
                    text_ok("the audit name", &a.name);
                    text_ok("the audit output", &a.output);
                }
            }
            Ok(Message::Info(v) | Message::Hello(v)) => {
                let whole = v.to_string().len() <= app::MAX_TEXT;
                let clipped = v.as_object().is_some_and(|m| {
                    m.len() == 1
                        && m.get("truncated")
                            .and_then(Value::as_str)
                            .is_some_and(|s| s.len() <= app::MAX_TEXT)
                });
                assert!(whole || clipped, "an unbounded value kept: {} bytes", v.to_string().len());
            }
            Err(_) => {}
        }
    }
}

/// QMP: [`acpimon::trigger::qmp::parse_message`] on one line from QEMU, and qapi's typed
/// decoding of whatever parses as an event (the monitor's next step).
pub mod qmp_message {
    use super::*;

    pub const TOKENS: [&[u8]; 16] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"\\u0000",
        b"\\udfff",
        b"null",
        b"1e999",
        b"-0",
        b"\"event\":",
        b"\"return\":",
        b"\"error\":",
        b"\"id\":",
    ];

    const EVENTS: [&str; 10] = [
        "STOP",
        "RESUME",
        "RESET",
        "SHUTDOWN",
        "POWERDOWN",
        "GUEST_PANICKED",
        "GUEST_CRASHLOADED",
        "WATCHDOG",
        "DEVICE_DELETED",
        "X_UNKNOWN_EVENT",
    ];

    fn event_data(rng: &mut Rng, name: &str) -> Value {
        match name {
            "SHUTDOWN" | "RESET" => json!({ "guest": rng.one_in(2), "reason": string(rng) }),
            "GUEST_PANICKED" | "GUEST_CRASHLOADED" => {
                let info = match rng.below(3) {
                    0 => json!({ "type": "hyper-v", "arg1": number(rng), "arg2": number(rng),
                                 "arg3": number(rng), "arg4": number(rng), "arg5": number(rng) }),
                    1 => json!({ "type": "s390", "core": number(rng), "psw-mask": number(rng),
                                 "psw-addr": number(rng), "reason": string(rng) }),
                    _ => value(rng, 3),
                };
                json!({ "action": rng.pick(&["pause", "poweroff", "run", "x"]), "info": info })
            }
            "WATCHDOG" => json!({ "action": rng.pick(&["reset", "pause", "none", "x"]) }),
            _ if rng.one_in(4) => value(rng, 3),
            _ => json!({}),
        }
    }

    pub fn generate(rng: &mut Rng) -> Vec<u8> {
        let id = if rng.one_in(4) { value(rng, 1) } else { json!(rng.next_u32()) };
        let msg = match rng.below(6) {
            // Half of the greetings are as QEMU sends them, so the version path is reached.
            0 if rng.one_in(2) => {
                json!({ "QMP": { "version": { "qemu": { "major": rng.below(12), "minor": rng.below(3), "micro": rng.below(3) },
                                               "package": string(rng) },
                                  "capabilities": if rng.one_in(2) { json!(["oob"]) } else { json!([]) } } })
            }
            0 => {
                json!({ "QMP": { "version": { "qemu": { "major": number(rng), "minor": number(rng), "micro": number(rng) },
                                               "package": string(rng) },
                                  "capabilities": value(rng, 2) } })
            }
            1 => {
                let ret = match rng.below(4) {
                    0 => json!({ "status": rng.pick(&["running", "paused", "internal-error", "x"]),
                                 "running": rng.one_in(2), "singlestep": false }),
                    1 => json!(string(rng)),
                    2 => json!({}),
                    _ => value(rng, 4),
                };
                json!({ "return": ret, "id": id })
            }
            2 => {
                json!({ "error": { "class": rng.pick(&["GenericError", "CommandNotFound", "DeviceNotActive"]),
                                    "desc": string(rng) }, "id": id })
            }
            3 | 4 => {
                let name = if rng.one_in(8) { string(rng) } else { rng.pick(&EVENTS).to_string() };
                let data = event_data(rng, &name);
                let mut m = Map::new();
                m.insert("event".into(), json!(name));
                if !rng.one_in(8) {
                    m.insert("data".into(), data);
                }
                let timestamp = if rng.one_in(4) {
                    json!({ "seconds": number(rng), "microseconds": number(rng) })
                } else {
                    json!({ "seconds": rng.next_u32(), "microseconds": rng.below(1_000_000) })
                };
                m.insert("timestamp".into(), timestamp);
                Value::Object(m)
            }
            _ => value(rng, 5),
        };
        line(rng, &msg, &TOKENS)
    }

    pub fn check(input: &[u8]) {
        use acpimon::trigger::qmp::{parse_message, Message};
        if let Ok(Message::Event(ev)) = parse_message(input) {
            assert!(ev.raw.is_object(), "an event that is not an object: {}", ev.raw);
            assert_eq!(ev.raw["event"].as_str(), Some(ev.name.as_str()), "the event's name is not its own");
            let _ = serde_json::from_value::<qapi::qmp::Event>(ev.raw);
        }
    }
}

/// One crash: the target, the panic's message, the input.
#[derive(Clone, Debug)]
pub struct Crash {
    pub target: &'static str,
    pub message: String,
    pub input: Vec<u8>,
}

impl Crash {
    /// Writes the input to `dir/TARGET-HASH.bin` and returns the path.
    pub fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let hash = self
            .input
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
        let path = dir.join(format!("{}-{hash:016x}.bin", self.target));
        std::fs::write(&path, &self.input)?;
        Ok(path)
    }
}

/// The result of running one target.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub target: &'static str,
    pub inputs: u64,
    pub elapsed: Duration,
    pub crashes: Vec<Crash>,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Panics inside the harness are recorded, not printed (a crash is reported once, with its
/// input); panics elsewhere still print as usual.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = match info.payload().downcast_ref::<&str>() {
                Some(s) => s.to_string(),
                None => info.payload().downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into()),
            };
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            let recorded = LAST_PANIC.with(|p| {
                let mut p = p.borrow_mut();
                let inside = p.is_some();
                if inside {
                    *p = Some(format!("{message}{at}"));
                }
                inside
            });
            if !recorded {
                previous(info);
            }
        }));
    });
}

/// Runs `check` on `input`; `Err` is the panic's message.
pub fn run_one(check: fn(&[u8]), input: &[u8]) -> Result<(), String> {
    install_hook();
    LAST_PANIC.with(|p| *p.borrow_mut() = Some(String::new()));
    let result = catch_unwind(AssertUnwindSafe(|| check(input)));
    let message = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default();
    result.map_err(|_| message)
}

/// Runs `inputs` generated inputs through `target` on `workers` threads. Stops early after
/// the first few crashes.
pub fn run(target: &'static Target, inputs: u64, workers: usize, seed: u64) -> Outcome {
    const MAX_CRASHES: usize = 8;
    let workers = workers.max(1) as u64;
    let crashes = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..workers {
            let share = inputs / workers + u64::from(w < inputs % workers);
            let (crashes, done, stop) = (crashes.clone(), done.clone(), stop.clone());
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (w + 1).wrapping_mul(0xa076_1d64_78bd_642f));
                let mut n = 0;
                while n < share && !stop.load(Ordering::Relaxed) {
                    let input = (target.generate)(&mut rng);
                    if let Err(message) = run_one(target.check, &input) {
                        let mut c = crashes.lock().unwrap_or_else(|e| e.into_inner());
                        c.push(Crash { target: target.name, message, input });
                        if c.len() >= MAX_CRASHES {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    let crashes = std::mem::take(&mut *crashes.lock().unwrap_or_else(|e| e.into_inner()));
    Outcome { target: target.name, inputs: done.load(Ordering::Relaxed), elapsed: started.elapsed(), crashes }
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
