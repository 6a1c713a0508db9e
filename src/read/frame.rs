//! Decoding the port channel: SLIP frames the AML writes to the doorbell port when it cannot
//! write the region (layout in [`crate::abi`], "The port channel").
//!
//! Input is untrusted: the guest can write any byte to the port, at any rate. [`FrameDecoder`]
//! is a byte-at-a-time state machine with a fixed buffer of one frame: a frame longer than
//! [`abi::FRAME_BYTES`], a bad escape, a wrong length, tag, version or checksum is reported as
//! a [`FrameError`] at its end and dropped; bytes before the first END (a host that connected
//! mid-frame) are one such frame. No input makes it panic or grow (a property test drives it
//! with arbitrary streams). The reader's flood budget bounds how fast bytes arrive.

use serde::Serialize;
use zerocopy::FromBytes;

use crate::abi::{self, PortFrame, Source, Status};
use crate::read::GuestRecord;

/// Why a frame was dropped. Messages say what the bytes were.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(rename_all = "kebab-case", tag = "error")]
pub enum FrameError {
    #[error("a frame longer than {} bytes", abi::FRAME_BYTES)]
    TooLong,
    #[error("a SLIP escape byte followed by {0:#04x}, not 0xdc or 0xdd")]
    BadEscape(u8),
    #[error("a frame of {0} bytes, not {n}", n = abi::FRAME_BYTES)]
    BadLength(usize),
    #[error("a frame tagged {0:#010x}, not acpimon's (\"AMF\" and a version)")]
    BadTag(u32),
    #[error("a frame of version {0}; this acpimon reads version {v}", v = abi::FRAME_VERSION)]
    UnknownVersion(u8),
    #[error("a frame whose checksum {found:#010x} is not its words' {expected:#010x}")]
    BadChecksum { found: u32, expected: u32 },
}

/// What one END byte closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// An empty frame: the plain doorbell ring of a record written to the region.
    Ring,
    /// A valid frame.
    Frame(PortFrame),
    /// A frame that was dropped, and why.
    Bad(FrameError),
}

/// The stream state between bytes.
#[derive(Clone, Debug)]
pub struct FrameDecoder {
    buf: [u8; abi::FRAME_BYTES],
    len: usize,
    escaped: bool,
    /// The first error of the frame being read; its bytes are skipped until END.
    error: Option<FrameError>,
    /// Bytes on the wire of the frame being read, and of the last one closed (END excluded).
    wire: usize,
    closed_wire: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: [0; abi::FRAME_BYTES],
            len: 0,
            escaped: false,
            error: None,
            wire: 0,
            closed_wire: 0,
        }
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one byte; an END byte returns what its frame was.
    pub fn push(&mut self, byte: u8) -> Option<FrameEvent> {
        if byte == abi::SLIP_END {
            let event = self.finish();
            (self.len, self.escaped, self.error) = (0, false, None);
            self.closed_wire = std::mem::take(&mut self.wire);
            return Some(event);
        }
        self.wire = self.wire.saturating_add(1);
        if self.error.is_some() {
            return None;
        }
        let byte = if std::mem::take(&mut self.escaped) {
            match byte {
                abi::SLIP_ESC_END => abi::SLIP_END,
                abi::SLIP_ESC_ESC => abi::SLIP_ESC,
                other => {
                    self.error = Some(FrameError::BadEscape(other));
                    return None;
                }
            }
        } else if byte == abi::SLIP_ESC {
            self.escaped = true;
            return None;
        } else {
            byte
        };
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
            }
            None => self.error = Some(FrameError::TooLong),
        }
        None
    }

    /// Bytes on the wire of the frame the last END closed, escapes included, END excluded.
    pub fn closed_len(&self) -> usize {
        self.closed_wire
    }

    fn finish(&self) -> FrameEvent {
        if let Some(e) = self.error {
            return FrameEvent::Bad(e);
        }
        if self.escaped {
            return FrameEvent::Bad(FrameError::BadEscape(abi::SLIP_END));
        }
        if self.len == 0 {
            return FrameEvent::Ring;
        }
        match check(&self.buf[..self.len]) {
            Ok(f) => FrameEvent::Frame(f),
            Err(e) => FrameEvent::Bad(e),
        }
    }
}

/// Validates one unescaped frame.
pub fn check(bytes: &[u8]) -> Result<PortFrame, FrameError> {
    let frame = PortFrame::read_from_bytes(bytes).map_err(|_| FrameError::BadLength(bytes.len()))?;
    let tag = frame.tag.get();
    let [a, m, f, version] = tag.to_le_bytes();
    if [a, m, f] != *b"AMF" {
        return Err(FrameError::BadTag(tag));
    }
    if version != abi::FRAME_VERSION {
        return Err(FrameError::UnknownVersion(version));
    }
    let words = frame.words();
    let expected = abi::frame_checksum(&words[..abi::FRAME_WORDS - 1]);
    if frame.checksum.get() != expected {
        return Err(FrameError::BadChecksum { found: frame.checksum.get(), expected });
    }
    Ok(frame)
}

/// A valid frame as the record the rest of the host reads. `seq` is twice the frame number
/// (even, advancing by 2 per frame like the region's), `bar` is BAR2's low half without its
/// flag bits, and the boot count is 0: the region holds it, and the frame was sent because the
/// region could not be written. `echo_request_no` is the request the host gave the nonce the
/// frame carries, `request_no` (the frame echoes only that nonce, as its token).
pub fn frame_record(f: &PortFrame, request_no: u32) -> GuestRecord {
    GuestRecord {
        seq: f.frame_no.get().wrapping_mul(2),
        status: Status::from_code(f.status.get()),
        source: Source::from_code(f.source.get()),
        echo_request_no: request_no,
        echo_nonce: f.token.get(),
        timer_ticks: f.timer.get(),
        bar: f.bar2.get() & !0xf,
        boot_count: 0,
        ged_count: f.ged_count.get(),
        thermal_count: f.thermal_count.get(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(token: u32) -> PortFrame {
        PortFrame {
            tag: abi::FRAME_TAG.into(),
            frame_no: 3.into(),
            status: Status::BarAbove4Gib.code().into(),
            source: Source::Ged.code().into(),
            token: token.into(),
            timer: 0x0102_0304.into(),
            vendor_device: abi::IVSHMEM_VENDOR_DEVICE.into(),
            bar2: 0x0000_000c.into(),
            bar3: 0x80.into(),
            ged_count: 2.into(),
            thermal_count: 0.into(),
            checksum: 0.into(),
        }
        .sealed()
    }

    fn feed(d: &mut FrameDecoder, bytes: &[u8]) -> Vec<FrameEvent> {
        bytes.iter().filter_map(|b| d.push(*b)).collect()
    }

    #[test]
    fn a_frame_round_trips_with_its_escapes() {
        // Token bytes 0xc0 and 0xdb must be escaped.
        let f = frame(0x11c0_db22);
        let bytes = f.encode();
        assert!(bytes.windows(2).any(|w| w == [abi::SLIP_ESC, abi::SLIP_ESC_END]));
        assert!(bytes.windows(2).any(|w| w == [abi::SLIP_ESC, abi::SLIP_ESC_ESC]));
        assert_eq!(bytes.iter().filter(|b| **b == abi::SLIP_END).count(), 1);
        let mut d = FrameDecoder::new();
        assert_eq!(feed(&mut d, &bytes), [FrameEvent::Frame(f)]);
        assert_eq!(d.closed_len(), bytes.len() - 1);
        let r = frame_record(&f, 9);
        assert!(r.answers(9, 0x11c0_db22));
        assert_eq!((r.seq, r.status, r.bar), (6, Status::BarAbove4Gib, 0));
    }

    #[test]
    fn empty_frames_are_rings_and_bad_frames_are_named() {
        let mut d = FrameDecoder::new();
        let good = frame(1).encode();
        let mut stream = vec![abi::SLIP_END];
        // Garbage before a frame (a host connected mid-frame).
        stream.extend(b"junk\xc0");
        stream.extend(&good);
        // A flipped bit.
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        stream.extend(&flipped);
        // Too long, then a bad escape, an escape at the end, another version, a foreign tag.
        stream.extend([0x41; 200]);
        stream.push(abi::SLIP_END);
        stream.extend([abi::SLIP_ESC, 0x00, abi::SLIP_END, abi::SLIP_ESC, abi::SLIP_END]);
        let mut v2 = frame(1);
        v2.tag = u32::from_le_bytes(*b"AMF\x02").into();
        stream.extend(v2.sealed().encode());
        let mut other = frame(1);
        other.tag = 0x1234_5678.into();
        stream.extend(other.sealed().encode());
        let events = feed(&mut d, &stream);
        let expected = frame(1);
        assert_eq!(
            events[..3],
            [FrameEvent::Ring, FrameEvent::Bad(FrameError::BadLength(4)), FrameEvent::Frame(expected)]
        );
        assert!(matches!(events[3], FrameEvent::Bad(FrameError::BadChecksum { .. })), "{:?}", events[3]);
        assert_eq!(
            events[4..],
            [
                FrameEvent::Bad(FrameError::TooLong),
                FrameEvent::Bad(FrameError::BadEscape(0)),
                FrameEvent::Bad(FrameError::BadEscape(abi::SLIP_END)),
                FrameEvent::Bad(FrameError::UnknownVersion(2)),
                FrameEvent::Bad(FrameError::BadTag(0x1234_5678)),
            ]
        );
        // The decoder is ready for the next frame after all that.
        assert_eq!(feed(&mut d, &good), [FrameEvent::Frame(expected)]);
    }

    #[test]
    fn the_checksum_catches_swapped_words() {
        let words = frame(5).words();
        let mut swapped = words;
        swapped.swap(2, 4);
        let n = abi::FRAME_WORDS - 1;
        assert_ne!(abi::frame_checksum(&words[..n]), abi::frame_checksum(&swapped[..n]));
    }

    proptest! {
        /// Any byte stream: no panic, and every END closes exactly one event.
        #[test]
        fn random_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::new();
            let events = feed(&mut d, &bytes);
            prop_assert_eq!(events.len(), bytes.iter().filter(|b| **b == abi::SLIP_END).count());
        }

        /// A valid frame after any garbage and an END is decoded.
        #[test]
        fn a_frame_survives_garbage_before_it(junk in proptest::collection::vec(any::<u8>(), 0..512), token in any::<u32>()) {
            let mut d = FrameDecoder::new();
            feed(&mut d, &junk);
            d.push(abi::SLIP_END);
            let f = frame(token);
            prop_assert_eq!(feed(&mut d, &f.encode()), vec![FrameEvent::Frame(f)]);
        }
    }
}
