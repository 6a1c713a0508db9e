//! Stage 2 of the data path: the QEMU arguments that put acpimon into a VM's launch.
//!
//! One list of [`QemuItem`]s renders two ways: an argv, and the INI format of QEMU's
//! `-readconfig` that EVE launches VMs from. `-acpitable` has no `-readconfig` form (QEMU
//! accepts an `[acpi]` section but never loads the table: measured on QEMU 10.0), so the
//! readconfig rendering returns it as an argv remainder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::generate::SsdtConfig;

/// QOM id of the memory backend.
pub const MEMDEV_ID: &str = "acpimon-mem";
/// Device id of the ivshmem function.
pub const IVSHMEM_ID: &str = "acpimon-shm";
/// Device id of pc-testdev.
pub const TESTDEV_ID: &str = "acpimon-testdev";

/// Errors in rendering arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("path {0} is not valid UTF-8; QEMU's option syntax needs text, so choose a plain path")]
    NonUtf8Path(PathBuf),
    #[error("path {0} contains a double quote, which a -readconfig file cannot hold; choose another path")]
    QuoteInPath(String),
}

/// What acpimon adds to a VM's launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub ssdt: SsdtConfig,
    /// Where the table file is.
    pub ssdt_path: PathBuf,
    /// Where the region file is.
    pub region_path: PathBuf,
}

/// One QEMU option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QemuItem {
    /// `-acpitable file=PATH`.
    AcpiTable { file: String },
    /// `-object QOM-TYPE,id=ID,props...`.
    Object { qom_type: &'static str, id: &'static str, props: Vec<(&'static str, String)> },
    /// `-device DRIVER,id=ID,props...`.
    Device { driver: &'static str, id: &'static str, props: Vec<(&'static str, String)> },
}

fn utf8(p: &Path) -> Result<String, LaunchError> {
    p.to_str().map(str::to_string).ok_or_else(|| LaunchError::NonUtf8Path(p.into()))
}

impl LaunchPlan {
    /// The options, in the order QEMU needs them (the backend before its device).
    pub fn items(&self) -> Result<Vec<QemuItem>, LaunchError> {
        Ok(vec![
            QemuItem::AcpiTable { file: utf8(&self.ssdt_path)? },
            QemuItem::Object {
                qom_type: "memory-backend-file",
                id: MEMDEV_ID,
                props: vec![
                    ("mem-path", utf8(&self.region_path)?),
                    ("size", self.ssdt.region_size.to_string()),
                    ("share", "on".into()),
                ],
            },
            QemuItem::Device {
                driver: "ivshmem-plain",
                id: IVSHMEM_ID,
                props: vec![("memdev", MEMDEV_ID.into()), ("addr", self.ssdt.slot.to_string())],
            },
            QemuItem::Device { driver: "pc-testdev", id: TESTDEV_ID, props: vec![] },
        ])
    }

    /// The options as argv words.
    pub fn argv(&self) -> Result<Vec<String>, LaunchError> {
        Ok(self.items()?.iter().flat_map(QemuItem::argv).collect())
    }

    /// The options as a `-readconfig` file, and the argv words it cannot express.
    pub fn readconfig(&self) -> Result<(String, Vec<String>), LaunchError> {
        let mut ini = String::new();
        let mut rest = Vec::new();
        for item in self.items()? {
            let (group, id, head, props) = match &item {
                QemuItem::AcpiTable { .. } => {
                    rest.extend(item.argv());
                    continue;
                }
                QemuItem::Object { qom_type, id, props } => ("object", id, ("qom-type", qom_type), props),
                QemuItem::Device { driver, id, props } => ("device", id, ("driver", driver), props),
            };
            writeln!(ini, "[{group} \"{id}\"]").unwrap();
            let head = (head.0, head.1.to_string());
            for (k, v) in std::iter::once(head).chain(props.iter().cloned()) {
                if v.contains('"') {
                    return Err(LaunchError::QuoteInPath(v));
                }
                writeln!(ini, "  {k} = \"{v}\"").unwrap();
            }
            ini.push('\n');
        }
        Ok((ini, rest))
    }
}

impl QemuItem {
    /// The item as argv words. Commas inside values are doubled, as QEMU's option parser
    /// requires.
    pub fn argv(&self) -> Vec<String> {
        let join = |head: String, props: &[(&str, String)]| {
            props.iter().fold(head, |mut acc, (k, v)| {
                write!(acc, ",{k}={}", v.replace(',', ",,")).unwrap();
                acc
            })
        };
        match self {
            QemuItem::AcpiTable { file } => {
                vec!["-acpitable".into(), format!("file={}", file.replace(',', ",,"))]
            }
            QemuItem::Object { qom_type, id, props } => {
                vec!["-object".into(), join(format!("{qom_type},id={id}"), props)]
            }
            QemuItem::Device { driver, id, props } => {
                vec!["-device".into(), join(format!("{driver},id={id}"), props)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            ssdt: SsdtConfig::default(),
            ssdt_path: "/run/vm1/ssdt.aml".into(),
            region_path: "/run/vm1/region".into(),
        }
    }

    #[test]
    fn argv_form() {
        assert_eq!(
            plan().argv().unwrap(),
            [
                "-acpitable",
                "file=/run/vm1/ssdt.aml",
                "-object",
                "memory-backend-file,id=acpimon-mem,mem-path=/run/vm1/region,size=4096,share=on",
                "-device",
                "ivshmem-plain,id=acpimon-shm,memdev=acpimon-mem,addr=0f.0",
                "-device",
                "pc-testdev,id=acpimon-testdev",
            ]
        );
    }

    #[test]
    fn readconfig_form() {
        let (ini, rest) = plan().readconfig().unwrap();
        assert_eq!(
            ini,
            "[object \"acpimon-mem\"]\n  qom-type = \"memory-backend-file\"\n  mem-path = \"/run/vm1/region\"\n  size = \"4096\"\n  share = \"on\"\n\n\
             [device \"acpimon-shm\"]\n  driver = \"ivshmem-plain\"\n  memdev = \"acpimon-mem\"\n  addr = \"0f.0\"\n\n\
             [device \"acpimon-testdev\"]\n  driver = \"pc-testdev\"\n\n"
        );
        assert_eq!(rest, ["-acpitable", "file=/run/vm1/ssdt.aml"]);
    }

    #[test]
    fn commas_are_escaped_and_quotes_refused() {
        let mut p = plan();
        p.region_path = "/run/a,b/region".into();
        assert!(p.argv().unwrap()[3].contains("mem-path=/run/a,,b/region,"));
        p.region_path = "/run/a\"b".into();
        assert_eq!(p.readconfig(), Err(LaunchError::QuoteInPath("/run/a\"b".into())));
    }
}
