//! Decoding a copy of the region's fixed areas into a typed [`Snapshot`].
//!
//! Input is untrusted: the guest can write any byte of the region. [`decode`] is a pure
//! function over a byte slice that returns a typed error or a snapshot with its oddities
//! listed in [`Snapshot::anomalies`]; no input makes it panic (a property test and the
//! `decode_never_panics` test drive it with arbitrary bytes).

use serde::Serialize;
use zerocopy::FromBytes;

use crate::abi::{self, AppMailbox, AppStatus, Header, Record, Request, Source, Status};

/// Why a region's bytes are not a usable snapshot. Messages name the problem and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the region holds {0} bytes, fewer than the {fixed} of the ABI's fixed areas; recreate it with `acpimon qemu-args --region-path`", fixed = abi::FIXED_SIZE)]
    Short(usize),
    #[error("wrong magic {0:#010x} (expected 0x4e4f4d41, \"AMON\"): not an acpimon region, or never initialised; create it with `acpimon qemu-args --region-path` before QEMU starts")]
    BadMagic(u32),
    #[error("region ABI version {0} is not supported (this acpimon reads version {current}); read it with the acpimon that created it, or recreate the region", current = abi::ABI_VERSION)]
    UnknownAbi(u32),
    #[error("the header says {field} = {found:#x} where ABI 1 has {expected:#x}: the header is corrupt; recreate the region while the VM is stopped")]
    BadLayout { field: &'static str, found: u32, expected: u32 },
    #[error("the header says the region is {header} bytes but it has {actual}; recreate the region with the size QEMU uses")]
    SizeMismatch { header: u32, actual: u64 },
    #[error("record {0} is still being written (odd sequence number); read again")]
    WriteInProgress(u32),
}

/// The host's current request, as the region holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RequestView {
    pub request_no: u32,
    pub nonce: u32,
    pub command: u32,
}

/// The last complete record the guest's AML wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestRecord {
    /// Sequence number (even); it advances by 2 per record.
    pub seq: u32,
    pub status: Status,
    pub source: Source,
    /// The request number the AML read when it wrote this record.
    pub echo_request_no: u32,
    /// The nonce the AML read when it wrote this record.
    pub echo_nonce: u32,
    /// Guest monotonic time, 100 ns ticks, modulo 2^32 (429.5 s).
    pub timer_ticks: u32,
    /// The BAR2 address the AML wrote through.
    pub bar: u32,
    pub boot_count: u32,
    pub ged_count: u32,
    pub thermal_count: u32,
}

impl GuestRecord {
    /// Whether this record answers request `request_no` with `nonce`: a GED record echoing
    /// both. Boot and thermal records echo the current request too, but no trigger made them.
    pub fn answers(&self, request_no: u32, nonce: u32) -> bool {
        self.source == Source::Ged && self.echo_request_no == request_no && self.echo_nonce == nonce
    }
}

/// Something odd in an otherwise decodable region: reported, never fatal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Anomaly {
    /// The record names a source this ABI does not define.
    UnknownSource { code: u32 },
    /// A record in the region should always say `Ok`: the AML writes nothing otherwise.
    UnexpectedStatus { code: u32 },
    /// This boot's counters claim more events than the sequence number has records.
    CountsExceedSequence { counted: u64, records: u32 },
    /// A reserved word is not zero.
    ReservedNotZero { offset: usize },
}

/// A consistent, decoded view of the region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub abi_version: u32,
    pub region_size: u32,
    pub mailbox_size: u32,
    pub request: RequestView,
    /// `None` until the guest has written its first record.
    pub record: Option<GuestRecord>,
    pub anomalies: Vec<Anomaly>,
}

/// Decodes the fixed areas (`bytes`, at least [`abi::FIXED_SIZE`] long) of a region whose
/// whole size is `region_len` bytes.
pub fn decode(bytes: &[u8], region_len: u64) -> Result<Snapshot, DecodeError> {
    let fixed = bytes.get(..abi::FIXED_SIZE).ok_or(DecodeError::Short(bytes.len()))?;
    let header = area::<Header>(fixed, abi::HEADER_OFFSET);
    let request = area::<Request>(fixed, abi::REQUEST_OFFSET);
    let record = area::<Record>(fixed, abi::RECORD_OFFSET);

    if header.magic.get() != abi::MAGIC {
        return Err(DecodeError::BadMagic(header.magic.get()));
    }
    if header.abi_version.get() != abi::ABI_VERSION {
        return Err(DecodeError::UnknownAbi(header.abi_version.get()));
    }
    let region_size = header.region_size.get();
    if u64::from(region_size) != region_len {
        return Err(DecodeError::SizeMismatch { header: region_size, actual: region_len });
    }
    let expected = abi::header_for(region_size);
    let layout = [
        ("header_size", header.header_size, expected.header_size),
        ("request_offset", header.request_offset, expected.request_offset),
        ("request_size", header.request_size, expected.request_size),
        ("record_offset", header.record_offset, expected.record_offset),
        ("record_size", header.record_size, expected.record_size),
        ("mailbox_offset", header.mailbox_offset, expected.mailbox_offset),
        ("mailbox_size", header.mailbox_size, expected.mailbox_size),
    ];
    for (field, found, expected) in layout {
        if found != expected {
            return Err(DecodeError::BadLayout { field, found: found.get(), expected: expected.get() });
        }
    }

    let mut anomalies = Vec::new();
    for (start, end) in abi::offsets::RESERVED {
        if let Some(i) = fixed[start..end].iter().position(|b| *b != 0) {
            anomalies.push(Anomaly::ReservedNotZero { offset: (start + i) & !3 });
        }
    }

    let seq = record.seq.get();
    let record = match seq {
        0 => None,
        s if s & 1 == 1 => return Err(DecodeError::WriteInProgress(s)),
        _ => Some(guest_record(&record, &mut anomalies)),
    };
    Ok(Snapshot {
        abi_version: abi::ABI_VERSION,
        region_size,
        mailbox_size: header.mailbox_size.get(),
        request: RequestView {
            request_no: request.request_no.get(),
            nonce: request.nonce.get(),
            command: request.command.get(),
        },
        record,
        anomalies,
    })
}

fn guest_record(r: &Record, anomalies: &mut Vec<Anomaly>) -> GuestRecord {
    let rec = GuestRecord {
        seq: r.seq.get(),
        status: Status::from_code(r.status.get()),
        source: Source::from_code(r.source.get()),
        echo_request_no: r.request_no.get(),
        echo_nonce: r.nonce.get(),
        timer_ticks: r.timer.get(),
        bar: r.bar.get(),
        boot_count: r.boot_count.get(),
        ged_count: r.ged_count.get(),
        thermal_count: r.thermal_count.get(),
    };
    if let Source::Unknown(code) = rec.source {
        anomalies.push(Anomaly::UnknownSource { code });
    }
    if rec.status != Status::Ok {
        anomalies.push(Anomaly::UnexpectedStatus { code: rec.status.code() });
    }
    // seq/2 counts every record this region has seen (across boots), so this boot's events
    // can never exceed it (the boot record is one more).
    let counted = u64::from(rec.ged_count) + u64::from(rec.thermal_count);
    if counted > u64::from(rec.seq / 2) {
        anomalies.push(Anomaly::CountsExceedSequence { counted, records: rec.seq / 2 });
    }
    rec
}

/// Copies the area at `offset` out as a `T`. Offsets are constants inside `fixed`, so the
/// slice is always long enough.
fn area<T: FromBytes>(fixed: &[u8], offset: usize) -> T {
    let (value, _) = T::read_from_prefix(&fixed[offset..]).expect("area lies inside the fixed part");
    value
}

/// The app mailbox, decoded (untrusted: every field is whatever the guest wrote).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mailbox")]
pub enum Mailbox {
    /// Nothing written yet (magic 0).
    Empty,
    /// Something that is not an ABI-1 mailbox.
    Foreign {
        magic: u32,
        version: u32,
    },
    Written(MailboxView),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MailboxView {
    pub seq: u32,
    pub beats: u32,
    pub status: AppStatus,
    pub pid: u32,
    pub uptime_ms: u32,
    pub period_ms: u32,
    /// The text up to its first NUL, invalid UTF-8 and control characters neutralised.
    pub text: String,
}

/// Decodes a copy of the mailbox layout.
pub fn decode_mailbox(bytes: &[u8; abi::MAILBOX_LAYOUT_SIZE]) -> Mailbox {
    let m = AppMailbox::read_from_bytes(bytes).expect("the array is exactly one mailbox");
    let (magic, version) = (m.magic.get(), m.version.get());
    if magic == 0 {
        return Mailbox::Empty;
    }
    if magic != abi::MAILBOX_MAGIC || version != abi::MAILBOX_VERSION {
        return Mailbox::Foreign { magic, version };
    }
    let end = m.text.iter().position(|&b| b == 0).unwrap_or(m.text.len());
    Mailbox::Written(MailboxView {
        seq: m.seq.get(),
        beats: m.beats.get(),
        status: AppStatus::from_code(m.status.get()),
        pid: m.pid.get(),
        uptime_ms: m.uptime_ms.get(),
        period_ms: m.period_ms.get(),
        text: crate::console::sanitize(&m.text[..end]).trim().to_string(),
    })
}
