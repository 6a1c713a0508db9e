//! Golden-byte tests for the table's pieces (ASL beside the bytes), and parameter errors.
//! Whole-table behaviour is proven by ACPICA in `tests/acpica.rs`.

use super::*;

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

#[test]
fn event_device_golden_bytes() {
    // Device (AMGE)
    // {
    //     Name (_HID, "ACPI0013")
    //     Name (_UID, Zero)
    //     Name (_CRS, ResourceTemplate ()
    //     {
    //         Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) { 0x00000007 }
    //     })
    //     OperationRegion (TDEV, SystemIO, 0x2007, One)
    //     Field (TDEV, ByteAcc, NoLock, Preserve) { TIRQ, 8 }
    //     Method (_EVT, 1, NotSerialized)
    //     {
    //         TIRQ = Zero
    //         \_SB.PCI0.AMSH.WREC (0x02)
    //     }
    // }
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        0x5b, 0x82, 0x49, 0x06, b'A', b'M', b'G', b'E',
        0x08, b'_', b'H', b'I', b'D', 0x0d, b'A', b'C', b'P', b'I', b'0', b'0', b'1', b'3', 0x00,
        0x08, b'_', b'U', b'I', b'D', 0x00,
        0x08, b'_', b'C', b'R', b'S',
            0x11, 0x0e, 0x0a, 0x0b,
            0x89, 0x06, 0x00, 0x01, 0x01, 0x07, 0x00, 0x00, 0x00,
            0x79, 0x00,
        0x5b, 0x80, b'T', b'D', b'E', b'V', 0x01, 0x0b, 0x07, 0x20, 0x01,
        0x5b, 0x81, 0x0b, b'T', b'D', b'E', b'V', 0x01, b'T', b'I', b'R', b'Q', 0x08,
        0x14, 0x21, b'_', b'E', b'V', b'T', 0x01,
            0x70, 0x00, b'T', b'I', b'R', b'Q',
            0x5c, 0x2f, 0x04, b'_', b'S', b'B', b'_', b'P', b'C', b'I', b'0',
                b'A', b'M', b'S', b'H', b'W', b'R', b'E', b'C', 0x0a, 0x02,
    ];
    assert_eq!(aml_bytes(&EventDevice { irq: 7, doorbell_port: None }), expected);
}

#[test]
fn the_doorbell_rings_after_the_record() {
    //     OperationRegion (DBEL, SystemIO, 0x0403, One)
    //     Field (DBEL, ByteAcc, NoLock, Preserve) { DBEB, 8 }
    //     Method (_EVT, 1, NotSerialized)
    //     {
    //         TIRQ = Zero
    //         \_SB.PCI0.AMSH.WREC (0x02)
    //         DBEB = 0xC0
    //     }
    let plain = aml_bytes(&EventDevice { irq: 7, doorbell_port: None });
    let rung = aml_bytes(&EventDevice { irq: 7, doorbell_port: Some(0x403) });
    #[rustfmt::skip]
    let region: Vec<u8> = vec![
        0x5b, 0x80, b'D', b'B', b'E', b'L', 0x01, 0x0b, 0x03, 0x04, 0x01,
        0x5b, 0x81, 0x0b, b'D', b'B', b'E', b'L', 0x01, b'D', b'B', b'E', b'B', 0x08,
    ];
    let ring = [0x70, 0x0a, 0xc0, b'D', b'B', b'E', b'B'];
    let at = rung.windows(region.len()).position(|w| w == region).expect("the doorbell's region");
    let evt = rung.windows(4).position(|w| w == b"_EVT").unwrap();
    assert!(at < evt, "declared before _EVT");
    assert!(rung.ends_with(&ring), "the ring is _EVT's last statement, after WREC");
    // Everything else is the plain device, with the lengths grown.
    assert_eq!(rung.len(), plain.len() + region.len() + ring.len());
    assert!(!plain.windows(4).any(|w| w == b"DBEL"));
}

#[test]
fn thermal_zone_golden_bytes() {
    // ThermalZone (AMTZ)
    // {
    //     Name (_TZP, 0x0A)
    //     Name (_CRT, 0x0F5C)
    //     Method (_TMP, 0, NotSerialized)
    //     {
    //         \_SB.PCI0.AMSH.WREC (0x03)
    //         Return (0x0BA6)
    //     }
    // }
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        0x5b, 0x85, 0x34, b'A', b'M', b'T', b'Z',
        0x08, b'_', b'T', b'Z', b'P', 0x0a, 0x0a,
        0x08, b'_', b'C', b'R', b'T', 0x0b, 0x5c, 0x0f,
        0x14, 0x1f, b'_', b'T', b'M', b'P', 0x00,
            0x5c, 0x2f, 0x04, b'_', b'S', b'B', b'_', b'P', b'C', b'I', b'0',
                b'A', b'M', b'S', b'H', b'W', b'R', b'E', b'C', 0x0a, 0x03,
            0xa4, 0x0b, 0xa6, 0x0b,
    ];
    assert_eq!(aml_bytes(&ThermalPoll { period_ds: 10 }), expected);
}

#[test]
fn table_header_and_checksum() {
    let cfg = SsdtConfig { oem_table_id: "EVE".into(), ..SsdtConfig::default() };
    let t = build(&cfg).unwrap();
    assert_eq!(&t[0..4], b"SSDT");
    assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize, t.len());
    assert_eq!(t[8], 1, "revision 1: 32-bit integers, as QEMU's DSDT");
    assert_eq!(&t[10..16], b"ACPIMN");
    assert_eq!(&t[16..24], b"EVE\0\0\0\0\0");
    assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
}

#[test]
fn parameters_change_the_table() {
    let base = build(&SsdtConfig::default()).unwrap();
    let with_thermal = build(&SsdtConfig { thermal_period_ds: Some(10), ..SsdtConfig::default() }).unwrap();
    assert!(with_thermal.len() > base.len());
    assert!(with_thermal.windows(4).any(|w| w == b"AMTZ"));
    assert!(!base.windows(4).any(|w| w == b"AMTZ"));
    // IRQ 5: the resource descriptor's interrupt number and the testdev port 0x2005.
    let irq5 = build(&SsdtConfig { irq: 5, ..SsdtConfig::default() }).unwrap();
    assert!(irq5.windows(9).any(|w| w == [0x89, 0x06, 0x00, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00]));
    assert!(irq5.windows(4).any(|w| w == [0x01, 0x0b, 0x05, 0x20]));
    // Slot 1e.3: _ADR 0x001E0003.
    let slot = build(&SsdtConfig { slot: "1e.3".parse().unwrap(), ..SsdtConfig::default() }).unwrap();
    assert!(slot.windows(9).any(|w| w == [b'_', b'A', b'D', b'R', 0x0c, 0x03, 0x00, 0x1e, 0x00]));
}

#[test]
fn slots_parse_like_qemu_addr() {
    let ok = |s: &str| s.parse::<PciSlot>().unwrap();
    assert_eq!(ok("0f"), PciSlot { device: 0x0f, function: 0 });
    assert_eq!(ok("0x0f.0"), PciSlot { device: 0x0f, function: 0 });
    assert_eq!(ok("1f.7"), PciSlot { device: 0x1f, function: 7 });
    assert_eq!(ok("5"), PciSlot { device: 5, function: 0 });
    assert_eq!(ok("1e.3").to_string(), "1e.3");
    for bad in ["", "20", "0", "g", "0f.8", "0f.", "123", "0f.0.1", "-1"] {
        let e = bad.parse::<PciSlot>().unwrap_err().to_string();
        assert!(e.contains("malformed") && e.contains("DEV[.FN]"), "{bad}: {e}");
    }
}

#[test]
fn bad_parameters_name_the_problem_and_the_fix() {
    let e = validate_irq(16).unwrap_err().to_string();
    assert!(e.contains("IRQ 16 is out of range") && e.contains("below 16"), "{e}");
    let e = validate_irq(9).unwrap_err().to_string();
    assert!(e.contains("IRQ 9 is taken") && e.contains("pick a free one"), "{e}");
    assert_eq!(validate_irq(7), Ok(7));

    let e = parse_region_size("5000").unwrap_err().to_string();
    assert!(e.contains("not a power of two") && e.contains("4096"), "{e}");
    let e = parse_region_size("1024").unwrap_err().to_string();
    assert!(e.contains("smaller than the 4096 bytes") && e.contains("at least 4096"), "{e}");
    let e = parse_region_size("1G").unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
    let e = parse_region_size("lots").unwrap_err().to_string();
    assert!(e.contains("not a number of bytes"), "{e}");
    assert_eq!(parse_region_size("4096"), Ok(4096));
    assert_eq!(parse_region_size("0x2000"), Ok(8192));
    assert_eq!(parse_region_size("64K"), Ok(65536));
    assert_eq!(parse_region_size("1MiB"), Ok(1 << 20));

    let long = SsdtConfig { oem_table_id: "TOOLONGID".into(), ..SsdtConfig::default() };
    assert!(matches!(build(&long), Err(ConfigError::BadOemTableId(_))));
    let slow = SsdtConfig { thermal_period_ds: Some(0), ..SsdtConfig::default() };
    let e = build(&slow).unwrap_err().to_string();
    assert!(e.contains("thermal period 0 ds is out of range"), "{e}");
    for taken in [0, 0x402, 0xe9, 0xcf8, 0x2007] {
        let e = validate_doorbell_port(taken).unwrap_err().to_string();
        assert!(e.contains("is taken") && e.contains("0x403"), "{taken:#x}: {e}");
    }
    assert_eq!(validate_doorbell_port(0x403), Ok(0x403));
    let off = SsdtConfig { doorbell_port: None, ..SsdtConfig::default() };
    assert!(build(&off).unwrap().len() < build(&SsdtConfig::default()).unwrap().len());
}
