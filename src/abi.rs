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
