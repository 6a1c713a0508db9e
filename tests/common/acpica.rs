//! ACPICA as the oracle: `iasl` compiles and disassembles, `acpiexec` executes our AML against
//! simulated PCI config space and memory.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{repo, require, run, text};

/// Compiles `asl` into `out_dir`, returning the .aml path.
pub fn compile(asl: &Path, out_dir: &Path) -> PathBuf {
    require("iasl");
    let stem = asl.file_stem().unwrap().to_str().unwrap();
    let prefix = out_dir.join(stem);
    let out = run(Command::new("iasl").arg("-p").arg(&prefix).arg(asl));
    assert!(
        out.status.success(),
        "iasl failed on {}:\n{}{}",
        asl.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
    prefix.with_extension("aml")
}

/// Disassembles `aml` with `iasl -d`; returns the ASL with the header comment removed, after
/// asserting the disassembler reported no error and no warning.
pub fn disassemble(aml: &Path) -> String {
    require("iasl");
    let out = run(Command::new("iasl").arg("-d").arg(aml));
    let log = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "iasl -d failed on {}:\n{log}", aml.display());
    for bad in ["Error", "Warning", "ERROR", "WARNING"] {
        assert!(!log.contains(bad), "iasl -d reported a problem with {}:\n{log}", aml.display());
    }
    let dsl = std::fs::read_to_string(aml.with_extension("dsl")).expect("iasl -d writes a .dsl");
    dsl.lines().skip_while(|l| !l.starts_with("DefinitionBlock")).skip(1).collect::<Vec<_>>().join("\n")
}

/// The test-only DSDT stub and harness, compiled once per test into `dir`.
pub struct Machine {
    pub dsdt: PathBuf,
    pub harness: PathBuf,
}

impl Machine {
    pub fn new(dir: &Path) -> Machine {
        let src = repo().join("tests/acpica");
        Machine {
            dsdt: compile(&src.join("dsdt-stub.asl"), dir),
            harness: compile(&src.join("harness.asl"), dir),
        }
    }

    /// Loads the stub, `ssdt`, then the harness, and runs `commands` in order.
    pub fn exec(&self, ssdt: &Path, commands: &[String]) -> Results {
        self.exec_with(&[], ssdt, commands)
    }

    /// [`Machine::exec`] with acpiexec's `flags` (e.g. `-vr`: every region access, in order,
    /// in the log).
    pub fn exec_with(&self, flags: &[&str], ssdt: &Path, commands: &[String]) -> Results {
        require("acpiexec");
        let batch = commands.join("; ");
        let out = run(Command::new("acpiexec")
            .args(flags)
            .arg("-b")
            .arg(&batch)
            .arg(&self.dsdt)
            .arg(ssdt)
            .arg(&self.harness));
        let log = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "acpiexec failed:\n{log}");
        for bad in ["AE_ERROR", "AE_AML_", "AE_NOT_FOUND", "AE_ALREADY_EXISTS", "Exception"] {
            assert!(!log.contains(bad), "acpiexec reported {bad}:\n{log}");
        }
        Results::parse(&log)
    }
}

/// What the evaluated methods returned, in order.
#[derive(Debug, Default)]
pub struct Results {
    pub buffers: Vec<Vec<u8>>,
    pub integers: Vec<u64>,
    pub log: String,
}

impl Results {
    fn parse(log: &str) -> Results {
        let mut r = Results { log: log.to_string(), ..Default::default() };
        let mut lines = log.lines().peekable();
        while let Some(line) = lines.next() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("[Integer] = ") {
                r.integers.push(u64::from_str_radix(v.trim(), 16).expect("acpiexec integer"));
            } else if let Some(rest) = line.strip_prefix("[Buffer] Length ") {
                let len = usize::from_str_radix(rest.split_whitespace().next().unwrap(), 16).unwrap();
                let mut buf = Vec::with_capacity(len);
                while buf.len() < len {
                    let row = lines.next().expect("buffer rows").trim();
                    let hex = row.split_once(':').expect("offset: bytes").1;
                    let hex = hex.split("//").next().unwrap();
                    buf.extend(hex.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()));
                }
                r.buffers.push(buf);
            }
        }
        r
    }
}
