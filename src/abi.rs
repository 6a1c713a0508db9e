//! The shared-region ABI, version 1: the bytes that the host and the guest's AML agree on.
//!
//! The region is the file behind QEMU's `memory-backend-file`, exposed to the guest as BAR2 of
//! an `ivshmem-plain` device. Every integer is a little-endian `u32` at a 4-byte-aligned offset,
//! because the guest's AML works with 32-bit integers (QEMU's DSDT is revision 1, which sets
//! the integer width for every table) and accesses the region with `DWordAcc` fields.
//!
//! | offset  | size | area    | written by                | contents                         |
//! |---------|------|---------|---------------------------|----------------------------------|
//! | `0x000` | 0x40 | header  | host, at creation         | [`Header`]                       |
//! | `0x040` | 0x40 | request | host, before each trigger | [`Request`]                      |
//! | `0x080` | 0x40 | record  | guest AML                 | [`Record`], under a seqlock      |
//! | `0x0c0` | 0x40 | —       | nobody                    | reserved for ABI 1.x, zero       |
//! | `0x100` | rest | mailbox | guest userspace           | [`AppMailbox`] (first 0x80 bytes)|
//!
//! The generator (`crate::generate`) takes every field offset it emits from the structs in this
//! module, and the reader decodes with the same structs, so the two sides cannot drift apart.
//!
//! **Sequence rule.** The AML reads `seq`, stores `s = (seq + 1) | 1` (odd: writing), fills the
//! record, then stores `s + 1` (even: complete). A record interrupted by a guest reset leaves
//! `seq` odd; the next writer still lands on an even value. `seq == 0` means no record yet.
//! 32-bit AML wraps `seq` after 2^31 records; the host compares with wrapping arithmetic.
//!
//! ## The port channel (no BAR)
//!
//! When `WREC` cannot write the region (every [`Status`] but `Ok`: BAR2 above 4 GiB, where
//! 32-bit AML cannot address it, e.g. OVMF keeping its 64-bit PCI window or a large-BAR
//! passthrough device; BAR2 unassigned; no ivshmem at the slot; a region without our header)
//! and the table has a doorbell port, the AML sends the record through that port instead, as a
//! [`PortFrame`]: every failure falls back, because the frame is the only way the host learns
//! that the event ran at all, and its `status` says why the region was not written (the host
//! reports it). The frame is [`FRAME_WORDS`] little-endian `u32` words, sent byte by byte with
//! SLIP escaping (RFC 1055: [`SLIP_END`] becomes `SLIP_ESC SLIP_ESC_END`, [`SLIP_ESC`] becomes
//! `SLIP_ESC SLIP_ESC_ESC`), then one [`SLIP_END`]. The bare [`DOORBELL_BYTE`] the AML writes
//! after a region record is an empty frame: a plain ring. The first word, [`FRAME_TAG`], is
//! `"AMF"` and the frame version ([`FRAME_VERSION`]) in its high byte; the last is
//! [`frame_checksum`] of the others, a position-weighted 32-bit sum the AML computes with
//! `Add` and `And` alone (its integers are 32-bit: the DSDT is revision 1).
//!
//! Request data travels without shared memory too: before raising the GED, the host writes the
//! beat's nonce to pc-testdev's 32-bit register at I/O port [`TOKEN_PORT`] (HMP
//! `o /w 0xe0 VALUE`, 32 bits), and the frame echoes what the AML read there as `token`. The host knows
//! which request number it gave that nonce, so a frame answers the beat whose nonce it carries
//! and no other: a stale frame carries an earlier beat's random nonce.

use std::mem::offset_of;

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `"AMON"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"AMON");
/// The ABI version this build writes and reads.
pub const ABI_VERSION: u32 = 1;

/// Offset of the [`Header`].
pub const HEADER_OFFSET: usize = 0x000;
/// Offset of the [`Request`].
pub const REQUEST_OFFSET: usize = 0x040;
/// Offset of the [`Record`].
pub const RECORD_OFFSET: usize = 0x080;
/// Offset of the app mailbox; it runs to the end of the region.
pub const MAILBOX_OFFSET: usize = 0x100;
/// Bytes of the fixed areas (header, request, record, reserved) that a snapshot copies.
pub const FIXED_SIZE: usize = MAILBOX_OFFSET;

/// The doorbell byte the AML writes to the doorbell I/O port once a record is complete: a SLIP
/// END (RFC 1055), i.e. an empty frame, so a later channel that sends whole records as SLIP
/// frames on the same port rings the same doorbell with each frame's end. To the host it only
/// means "look now": the record itself is validated as ever.
pub const DOORBELL_BYTE: u8 = 0xc0;

/// SLIP (RFC 1055) bytes of the port channel's frames.
pub const SLIP_END: u8 = 0xc0;
pub const SLIP_ESC: u8 = 0xdb;
pub const SLIP_ESC_END: u8 = 0xdc;
pub const SLIP_ESC_ESC: u8 = 0xdd;
const _: () = assert!(DOORBELL_BYTE == SLIP_END);

/// The port-frame version this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// First word of a [`PortFrame`]: `"AMF"` and [`FRAME_VERSION`] as a little-endian `u32`.
pub const FRAME_TAG: u32 = u32::from_le_bytes([b'A', b'M', b'F', FRAME_VERSION]);
/// Words in a [`PortFrame`], checksum included.
pub const FRAME_WORDS: usize = 12;
/// Bytes of a [`PortFrame`] before escaping.
pub const FRAME_BYTES: usize = FRAME_WORDS * 4;
/// pc-testdev's 32-bit register, where the host leaves the beat's nonce for the AML.
pub const TOKEN_PORT: u16 = 0xe0;

/// A record sent through the doorbell port when the region cannot be written (the port
/// channel of the module docs). Its words go out in this order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PortFrame {
    /// [`FRAME_TAG`].
    pub tag: U32,
    /// Frames sent this boot, from 1 (the table's memory is lost at reset).
    pub frame_no: U32,
    /// [`Status`]: why the region was not written.
    pub status: U32,
    /// [`Source`] of the event.
    pub source: U32,
    /// What the AML read at [`TOKEN_PORT`]: the nonce of the host's latest request.
    pub token: U32,
    /// AML `Timer`, truncated to 32 bits, as [`Record::timer`].
    pub timer: U32,
    /// The DWord at config offset 0 of the ivshmem slot (vendor | device << 16).
    pub vendor_device: U32,
    /// BAR2 and BAR3 as read from config space: a 64-bit BAR2's low and high halves.
    pub bar2: U32,
    pub bar3: U32,
    /// GED events and thermal polls handled since this boot, as in [`Record`].
    pub ged_count: U32,
    pub thermal_count: U32,
    /// [`frame_checksum`] of the words before it.
    pub checksum: U32,
}

const _: () = assert!(size_of::<PortFrame>() == FRAME_BYTES);

/// The frame's checksum over `words` (all but the last): `a += w; b += a` for each word,
/// modulo 2^32, and `b` is the sum. `b` weighs each word by its distance from the end, so a
/// swapped or dropped word changes it, unlike a plain sum.
pub fn frame_checksum(words: &[u32]) -> u32 {
    let (mut a, mut b) = (0u32, 0u32);
    for w in words {
        a = a.wrapping_add(*w);
        b = b.wrapping_add(a);
    }
    b
}

impl PortFrame {
    /// The frame's words in sending order.
    pub fn words(&self) -> [u32; FRAME_WORDS] {
        let mut out = [0u32; FRAME_WORDS];
        for (o, c) in out.iter_mut().zip(self.as_bytes().chunks_exact(4)) {
            *o = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
        out
    }

    /// This frame with its checksum set.
    pub fn sealed(mut self) -> PortFrame {
        let words = self.words();
        self.checksum = frame_checksum(&words[..FRAME_WORDS - 1]).into();
        self
    }

    /// The bytes the AML writes to the port: escaped words, then [`SLIP_END`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FRAME_BYTES * 2 + 1);
        for b in self.as_bytes() {
            match *b {
                SLIP_END => out.extend([SLIP_ESC, SLIP_ESC_END]),
                SLIP_ESC => out.extend([SLIP_ESC, SLIP_ESC_ESC]),
                b => out.push(b),
            }
        }
        out.push(SLIP_END);
        out
    }
}

/// Smallest region: one page, which also keeps the mailbox usefully large.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region. Firmware places large BARs above 4 GiB, where 32-bit AML cannot reach.
pub const MAX_REGION_SIZE: u64 = 64 << 20;

/// Region header, written by the host when it creates the region. The AML checks `magic` and
/// `abi_version` before writing anything, so it never scribbles over a region it does not know.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    /// [`MAGIC`].
    pub magic: U32,
    /// [`ABI_VERSION`].
    pub abi_version: U32,
    /// Size of the whole region in bytes (a power of two).
    pub region_size: U32,
    /// Size of the header (0x40).
    pub header_size: U32,
    /// [`REQUEST_OFFSET`].
    pub request_offset: U32,
    /// Size of the request area (0x40).
    pub request_size: U32,
    /// [`RECORD_OFFSET`].
    pub record_offset: U32,
    /// Size of the record area (0x40).
    pub record_size: U32,
    /// [`MAILBOX_OFFSET`].
    pub mailbox_offset: U32,
    /// `region_size - MAILBOX_OFFSET`.
    pub mailbox_size: U32,
    /// Reserved, zero.
    pub flags: U32,
    /// Reserved, zero.
    pub reserved: [U32; 5],
}

/// Host-to-guest request, written by the host before it raises the GED interrupt.
/// The host writes `nonce` first and `request_no` last.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Request {
    /// Increments with every trigger; echoed in the record.
    pub request_no: U32,
    /// Random per request; echoed in the record, so a stale record cannot pass as an answer.
    pub nonce: U32,
    /// Reserved for later commands; 0 = none.
    pub command: U32,
    /// Argument of `command`; 0.
    pub command_arg: U32,
    /// Reserved, zero.
    pub reserved: [U32; 12],
}

/// The guest's record, written by the AML under the sequence rule of the module docs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Record {
    /// Odd while the AML writes, even when complete, 0 before the first record.
    pub seq: U32,
    /// [`Status`] of the AML that wrote this record (always `Ok` for a record in the region).
    pub status: U32,
    /// [`Source`] of the event that wrote this record.
    pub source: U32,
    /// Echo of [`Request::request_no`] as the AML read it.
    pub request_no: U32,
    /// Echo of [`Request::nonce`] as the AML read it.
    pub nonce: U32,
    /// AML `Timer`: guest monotonic time in 100 ns ticks, truncated to 32 bits (wraps every
    /// 429.5 s).
    pub timer: U32,
    /// The BAR2 address the AML wrote through.
    pub bar: U32,
    /// Boots seen by this region: `_INI` adds one to the previous record's value.
    pub boot_count: U32,
    /// GED events handled since this boot.
    pub ged_count: U32,
    /// Thermal polls handled since this boot.
    pub thermal_count: U32,
    /// Reserved, zero.
    pub reserved: [U32; 6],
}

const _: () = assert!(size_of::<Header>() == REQUEST_OFFSET - HEADER_OFFSET);
const _: () = assert!(size_of::<Request>() == RECORD_OFFSET - REQUEST_OFFSET);
const _: () = assert!(size_of::<Record>() == 0x40);
const _: () = assert!(RECORD_OFFSET + size_of::<Record>() <= MAILBOX_OFFSET);

/// `"APPM"` read as a little-endian `u32`: the app has written its mailbox.
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"APPM");
/// The mailbox layout version this build reads.
pub const MAILBOX_VERSION: u32 = 1;
/// Bytes of the mailbox layout (the rest of the mailbox area is the app's, unread).
pub const MAILBOX_LAYOUT_SIZE: usize = 0x80;
/// Bytes of [`AppMailbox::text`].
pub const MAILBOX_TEXT: usize = 96;

/// The app mailbox at [`MAILBOX_OFFSET`], written by guest userspace through the ivshmem BAR
/// (`docs/app-protocol.md`, section 7) under its own sequence lock: `seq` odd while the app
/// writes, even when complete.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct AppMailbox {
    /// [`MAILBOX_MAGIC`] once written.
    pub magic: U32,
    /// [`MAILBOX_VERSION`].
    pub version: U32,
    pub seq: U32,
    /// Incremented on every beat.
    pub beats: U32,
    /// 0 unknown, 1 ok, 2 degraded, 3 failed.
    pub status: U32,
    pub pid: U32,
    /// The guest's CLOCK_MONOTONIC in ms, low 32 bits.
    pub uptime_ms: U32,
    /// How often the app beats, in ms.
    pub period_ms: U32,
    /// Short UTF-8 details, NUL-padded.
    pub text: [u8; MAILBOX_TEXT],
}

const _: () = assert!(size_of::<AppMailbox>() == MAILBOX_LAYOUT_SIZE);
const _: () = assert!(MAILBOX_OFFSET + MAILBOX_LAYOUT_SIZE <= MIN_REGION_SIZE as usize);

/// Absolute region offsets of the fields the AML touches, taken from the structs above.
pub mod offsets {
    use super::*;

    pub const MAGIC: usize = HEADER_OFFSET + offset_of!(Header, magic);
    pub const ABI_VERSION: usize = HEADER_OFFSET + offset_of!(Header, abi_version);
    pub const REQUEST_NO: usize = REQUEST_OFFSET + offset_of!(Request, request_no);
    pub const NONCE: usize = REQUEST_OFFSET + offset_of!(Request, nonce);
    pub const SEQ: usize = RECORD_OFFSET + offset_of!(Record, seq);
    pub const STATUS: usize = RECORD_OFFSET + offset_of!(Record, status);
    pub const SOURCE: usize = RECORD_OFFSET + offset_of!(Record, source);
    pub const ECHO_REQUEST_NO: usize = RECORD_OFFSET + offset_of!(Record, request_no);
    pub const ECHO_NONCE: usize = RECORD_OFFSET + offset_of!(Record, nonce);
    pub const TIMER: usize = RECORD_OFFSET + offset_of!(Record, timer);
    pub const BAR: usize = RECORD_OFFSET + offset_of!(Record, bar);
    pub const BOOT_COUNT: usize = RECORD_OFFSET + offset_of!(Record, boot_count);
    pub const GED_COUNT: usize = RECORD_OFFSET + offset_of!(Record, ged_count);
    pub const THERMAL_COUNT: usize = RECORD_OFFSET + offset_of!(Record, thermal_count);
    pub const MAILBOX_SEQ: usize = MAILBOX_OFFSET + offset_of!(AppMailbox, seq);
    /// End of the last record field; the AML maps only this much of the region.
    pub const RECORD_END: usize = THERMAL_COUNT + 4;
    /// Reserved words, zero in ABI 1: `(start, end)` of each run below the mailbox.
    pub const RESERVED: [(usize, usize); 3] = [
        (HEADER_OFFSET + offset_of!(Header, flags), REQUEST_OFFSET),
        (REQUEST_OFFSET + offset_of!(Request, reserved), RECORD_OFFSET),
        (RECORD_OFFSET + offset_of!(Record, reserved), FIXED_SIZE),
    ];
}

/// An app's own word on its health: the mailbox's `status` codes, and the app protocol's
/// `status` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppStatus {
    Unknown,
    Ok,
    Degraded,
    Failed,
}

impl AppStatus {
    pub const fn from_code(code: u32) -> Self {
        match code {
            1 => AppStatus::Ok,
            2 => AppStatus::Degraded,
            3 => AppStatus::Failed,
            _ => AppStatus::Unknown,
        }
    }

    pub const fn code(self) -> u32 {
        match self {
            AppStatus::Unknown => 0,
            AppStatus::Ok => 1,
            AppStatus::Degraded => 2,
            AppStatus::Failed => 3,
        }
    }
}

/// What made the AML write a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `_INI` at boot.
    Boot,
    /// The GED's `_EVT`, raised by the host.
    Ged,
    /// The thermal zone's `_TMP`, polled by the guest kernel.
    Thermal,
    /// A value this ABI does not define (the region is guest-writable, so anything can appear).
    Unknown(u32),
}

impl Source {
    pub const fn code(self) -> u32 {
        match self {
            Source::Boot => 1,
            Source::Ged => 2,
            Source::Thermal => 3,
            Source::Unknown(v) => v,
        }
    }

    pub const fn from_code(code: u32) -> Self {
        match code {
            1 => Source::Boot,
            2 => Source::Ged,
            3 => Source::Thermal,
            v => Source::Unknown(v),
        }
    }
}

/// Outcome of the AML's search for the region (the AML also keeps the last one in `LSTA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The record was written.
    Ok,
    /// The PCI function at the configured slot is not ivshmem (1af4:1110 with a memory BAR2).
    NotIvshmem,
    /// BAR2 lies above 4 GiB, which 32-bit AML cannot address; nothing was written.
    BarAbove4Gib,
    /// BAR2 is not assigned (zero).
    BarUnassigned,
    /// The region's magic or ABI version is wrong: not a region this AML knows.
    BadHeader,
    /// The AML has not run yet (the initial value of `LSTA`).
    NotRun,
    /// A value this ABI does not define.
    Unknown(u32),
}

impl Status {
    pub const fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::NotIvshmem => 1,
            Status::BarAbove4Gib => 2,
            Status::BarUnassigned => 3,
            Status::BadHeader => 4,
            Status::NotRun => 0xff,
            Status::Unknown(v) => v,
        }
    }

    /// Why the region was not written, for people.
    pub fn describe(self) -> String {
        match self {
            Status::Ok => "the record was written".into(),
            Status::NotIvshmem => "no ivshmem device with a memory BAR2 at the table's slot".into(),
            Status::BarAbove4Gib => "ivshmem BAR2 is above 4 GiB, where 32-bit AML cannot write".into(),
            Status::BarUnassigned => "ivshmem BAR2 is not assigned".into(),
            Status::BadHeader => "the region's header is not acpimon's".into(),
            Status::NotRun => "the AML has not run".into(),
            Status::Unknown(v) => format!("status {v:#x}, which this acpimon does not know"),
        }
    }

    pub const fn from_code(code: u32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::NotIvshmem,
            2 => Status::BarAbove4Gib,
            3 => Status::BarUnassigned,
            4 => Status::BadHeader,
            0xff => Status::NotRun,
            v => Status::Unknown(v),
        }
    }
}

/// The ivshmem PCI identity the AML insists on: vendor 0x1af4, device 0x1110, as the DWord at
/// config offset 0.
pub const IVSHMEM_VENDOR_DEVICE: u32 = 0x1110_1af4;

/// The header a new region of `region_size` bytes starts with.
pub fn header_for(region_size: u32) -> Header {
    Header {
        magic: MAGIC.into(),
        abi_version: ABI_VERSION.into(),
        region_size: region_size.into(),
        header_size: (size_of::<Header>() as u32).into(),
        request_offset: (REQUEST_OFFSET as u32).into(),
        request_size: (size_of::<Request>() as u32).into(),
        record_offset: (RECORD_OFFSET as u32).into(),
        record_size: (size_of::<Record>() as u32).into(),
        mailbox_offset: (MAILBOX_OFFSET as u32).into(),
        mailbox_size: (region_size - MAILBOX_OFFSET as u32).into(),
        ..Header::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_documented_table() {
        assert_eq!(offsets::MAGIC, 0x00);
        assert_eq!(offsets::REQUEST_NO, 0x40);
        assert_eq!(offsets::NONCE, 0x44);
        assert_eq!(offsets::SEQ, 0x80);
        assert_eq!(offsets::TIMER, 0x94);
        assert_eq!(offsets::THERMAL_COUNT, 0xa4);
        assert_eq!(offsets::RECORD_END, 0xa8);
    }

    #[test]
    fn codes_round_trip() {
        for code in [0, 1, 2, 3, 4, 5, 0xff, u32::MAX] {
            assert_eq!(Status::from_code(code).code(), code);
            assert_eq!(Source::from_code(code).code(), code);
        }
    }

    #[test]
    fn magic_spells_amon() {
        assert_eq!(&MAGIC.to_le_bytes(), b"AMON");
        assert_eq!(MAGIC, 0x4e4f_4d41);
    }
}
