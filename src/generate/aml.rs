//! AML constructs that `acpi_tables` does not provide, built on its [`Aml`] trait so they nest
//! with its types, plus the field-list helper the generator uses.

use acpi_tables::aml::{FieldEntry, Path};
use acpi_tables::{Aml, AmlSink};

const EXT_OP_PREFIX: u8 = 0x5b;
const TIMER_OP: u8 = 0x33;
const THERMAL_ZONE_OP: u8 = 0x85;
const INCREMENT_OP: u8 = 0x75;
const DECREMENT_OP: u8 = 0x76;
const LAND_OP: u8 = 0x90;
const LOR_OP: u8 = 0x91;
const EXTERNAL_OP: u8 = 0x15;

/// Object type codes of `External ()` declarations.
pub const DEVICE_OBJ: u8 = 6;

/// `External (path, type)`: declares an object another table defines, so disassemblers and
/// `iasl` resolve it.
pub struct External {
    pub path: Path,
    pub object_type: u8,
}

impl Aml for External {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(EXTERNAL_OP);
        self.path.to_aml_bytes(sink);
        sink.byte(self.object_type);
        sink.byte(0); // argument count, for methods only
    }
}

/// `Timer`: the guest's monotonic clock in 100 ns ticks (ACPI 3.0+).
pub struct Timer;

impl Aml for Timer {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(EXT_OP_PREFIX);
        sink.byte(TIMER_OP);
    }
}

/// `Increment (target)`.
pub struct Increment<'a>(pub &'a dyn Aml);

impl Aml for Increment<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(INCREMENT_OP);
        self.0.to_aml_bytes(sink);
    }
}

/// `Decrement (target)`.
pub struct Decrement<'a>(pub &'a dyn Aml);

impl Aml for Decrement<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(DECREMENT_OP);
        self.0.to_aml_bytes(sink);
    }
}

/// `LAnd (a, b)`.
pub struct LAnd<'a>(pub &'a dyn Aml, pub &'a dyn Aml);

impl Aml for LAnd<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(LAND_OP);
        self.0.to_aml_bytes(sink);
        self.1.to_aml_bytes(sink);
    }
}

/// `LOr (a, b)`.
pub struct LOr<'a>(pub &'a dyn Aml, pub &'a dyn Aml);

impl Aml for LOr<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(LOR_OP);
        self.0.to_aml_bytes(sink);
        self.1.to_aml_bytes(sink);
    }
}

/// `ThermalZone (name) { children }`.
pub struct ThermalZone<'a> {
    pub path: Path,
    pub children: Vec<&'a dyn Aml>,
}

impl Aml for ThermalZone<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut body = Vec::new();
        self.path.to_aml_bytes(&mut body);
        for child in &self.children {
            child.to_aml_bytes(&mut body);
        }
        sink.byte(EXT_OP_PREFIX);
        sink.byte(THERMAL_ZONE_OP);
        sink.vec(&pkg_length(body.len()));
        sink.vec(&body);
    }
}

/// PkgLength encoding (ACPI 6.5 §20.2.4) of a body of `len` bytes, counting its own bytes.
fn pkg_length(len: usize) -> Vec<u8> {
    // One lead byte holds 6 bits; each following byte adds 8 bits over the lead's low nibble.
    let (extra, total) = match len {
        0..=62 => (0, len + 1),
        63..=4093 => (1, len + 2),
        4094..=1_048_572 => (2, len + 3),
        _ => (3, len + 4),
    };
    if extra == 0 {
        return vec![total as u8];
    }
    let mut out = vec![((extra as u8) << 6) | (total & 0x0f) as u8];
    for i in 0..extra {
        out.push((total >> (4 + 8 * i)) as u8);
    }
    out
}

/// A field list of `(name, byte offset, bits)` in ascending offset order, with `Offset ()` gaps
/// encoded as reserved entries, exactly as `iasl` encodes them.
pub fn field_list(fields: &[(&str, usize, usize)]) -> Vec<FieldEntry> {
    let mut out = Vec::with_capacity(fields.len() * 2);
    let mut bit = 0;
    for &(name, offset, bits) in fields {
        let start = offset * 8;
        assert!(start >= bit, "field {name} overlaps the previous one");
        if start > bit {
            out.push(FieldEntry::Reserved(start - bit));
        }
        let name: [u8; 4] = name.as_bytes().try_into().expect("AML names are 4 bytes");
        out.push(FieldEntry::Named(name, bits));
        bit = start + bits;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(aml: &dyn Aml) -> Vec<u8> {
        let mut v = Vec::new();
        aml.to_aml_bytes(&mut v);
        v
    }

    #[test]
    fn timer_and_logic_ops() {
        // Timer
        assert_eq!(bytes(&Timer), [0x5b, 0x33]);
        // Local0++
        assert_eq!(bytes(&Increment(&acpi_tables::aml::Local(0))), [0x75, 0x60]);
        // Local1--
        assert_eq!(bytes(&Decrement(&acpi_tables::aml::Local(1))), [0x76, 0x61]);
        // (Arg0 && Arg1)
        let (a0, a1) = (acpi_tables::aml::Arg(0), acpi_tables::aml::Arg(1));
        assert_eq!(bytes(&LAnd(&a0, &a1)), [0x90, 0x68, 0x69]);
        // (Arg0 || Arg1)
        assert_eq!(bytes(&LOr(&a0, &a1)), [0x91, 0x68, 0x69]);
    }

    #[test]
    fn thermal_zone_encoding() {
        // ThermalZone (TZ00) { Name (_TZP, 0x0A) }
        let name = acpi_tables::aml::Name::new("_TZP".into(), &10u8);
        let tz = ThermalZone { path: "TZ00".into(), children: vec![&name] };
        assert_eq!(
            bytes(&tz),
            [0x5b, 0x85, 0x0c, b'T', b'Z', b'0', b'0', 0x08, b'_', b'T', b'Z', b'P', 0x0a, 0x0a]
        );
    }

    #[test]
    fn pkg_length_boundaries() {
        assert_eq!(pkg_length(0), [0x01]);
        assert_eq!(pkg_length(62), [0x3f]);
        // 63 body bytes + 2 length bytes = 65 = 0x41
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        assert_eq!(pkg_length(4093), [0x4f, 0xff]);
        assert_eq!(pkg_length(4094), [0x81, 0x00, 0x01]);
    }

    #[test]
    fn field_gaps_become_reserved_entries() {
        let f = field_list(&[("VDID", 0, 32), ("BAR2", 0x18, 32), ("BAR3", 0x1c, 32)]);
        assert_eq!(
            f,
            [
                FieldEntry::Named(*b"VDID", 32),
                FieldEntry::Reserved(0x14 * 8),
                FieldEntry::Named(*b"BAR2", 32),
                FieldEntry::Named(*b"BAR3", 32),
            ]
        );
    }
}
