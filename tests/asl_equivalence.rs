//! `asl/acpimon.asl` is the generated table written for people. iasl's compile of it must be
//! byte-identical to the generator's AML body, and both must disassemble to the same ASL.

mod common;

use acpimon::generate::{build, SsdtConfig};
use common::acpica::{compile, disassemble};

#[test]
fn the_asl_source_and_the_generator_agree() {
    let dir = tempfile::tempdir().unwrap();
    let from_asl = compile(&common::repo().join("asl/acpimon.asl"), dir.path());
    let iasl = std::fs::read(&from_asl).unwrap();
    let cfg = SsdtConfig { thermal_period_ds: Some(10), ..SsdtConfig::default() };
    let ours = build(&cfg).unwrap();
    let generated = dir.path().join("generated.aml");
    common::write(&generated, &ours);

    // Readable failure first: the disassemblies, header comments aside.
    assert_eq!(disassemble(&generated), disassemble(&from_asl), "asl/acpimon.asl and the generator disagree");
    // Then exact: header fields that are ours (not the compiler's id and checksum) and body.
    assert_eq!(
        &ours[..24],
        &iasl[..24].iter().enumerate().map(|(i, b)| if i == 9 { ours[9] } else { *b }).collect::<Vec<_>>()[..]
    );
    assert_eq!(&ours[36..], &iasl[36..], "AML bodies differ");
}
