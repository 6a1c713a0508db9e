//! Checks a user's QEMU configuration (argv and every `-readconfig` file, read through
//! [`QemuConfig`]) for what would collide with acpimon's additions: a device at our PCI slot,
//! an ISA device on our GED IRQ, an id or a single-instance device we add. Board facts
//! measured on QEMU 10.0 with `info qtree`: pc keeps `isa-fdc` (IRQ 6) even with
//! `-nodefaults`; without it, pc and q35 add `isa-parallel` (IRQ 7) and a first `isa-serial`
//! (IRQ 4). [`free_slot`] is `--slot auto`.

use crate::generate::PciSlot;
use crate::launch::qemu_config::{QemuConfig, Section};
use crate::launch::{self, LaunchPlan};

/// One collision, with its fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}; {fix}")]
pub struct Conflict {
    pub what: String,
    pub fix: String,
}

/// Whether the machine is i440FX (`pc`), QEMU's default for x86.
fn is_pc(machine: &str) -> bool {
    machine == "pc" || machine.starts_with("pc-i440fx") || machine == "isapc"
}

/// The slots the board's own devices hold on bus 0.
fn builtin_slots(machine: &str) -> &'static [u8] {
    if is_pc(machine) {
        &[0, 1]
    } else {
        &[0, 0x1f]
    }
}

/// Whether a device sits on the root bus: no `bus`, or `pcie.0` (q35) / `pci.0` (pc). EVE's
/// disks and NICs sit behind root ports (`bus = "pci.4"`, `addr = "0x0"`) and take no root slot.
fn on_root_bus(dev: &Section) -> bool {
    matches!(dev.get("bus"), None | Some("pcie.0") | Some("pci.0"))
}

/// The device number of an `addr=` (`0x4`, `04.0`, `0f`); `None` when it is not one.
fn slot_device(addr: &str) -> Option<u8> {
    let t = addr.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let dev = t.split('.').next()?;
    u8::from_str_radix(dev, 16).ok().filter(|d| *d <= 0x1f)
}

/// The root-bus slots (device numbers) the configuration's own devices name, with the device.
fn taken_slots(cfg: &QemuConfig) -> Vec<(u8, &Section)> {
    cfg.sections("device")
        .filter(|d| on_root_bus(d))
        .filter_map(|d| d.get("addr").and_then(slot_device).map(|n| (n, d)))
        .collect()
}

/// `--slot auto`: the highest root-bus slot below 0x1f that neither the board nor any device
/// in `cfg` uses. QEMU fills slots it picks itself from the lowest free one up, so the highest
/// free slot stays clear of them too.
pub fn free_slot(cfg: &QemuConfig) -> Option<PciSlot> {
    let machine = cfg.machine_type().unwrap_or("pc");
    let taken = taken_slots(cfg);
    (1..0x1f_u8)
        .rev()
        .find(|n| !builtin_slots(machine).contains(n) && !taken.iter().any(|(t, _)| t == n))
        .map(|device| PciSlot { device, function: 0 })
}

/// Every collision between the user's configuration `cfg` and `plan`.
pub fn check(cfg: &QemuConfig, plan: &LaunchPlan) -> Vec<Conflict> {
    let mut out = Vec::new();
    let irq = plan.ssdt.irq;
    let slot = plan.ssdt.slot;
    let machine = cfg.machine_type().unwrap_or("pc");
    let nodefaults = cfg.has_flag("nodefaults");
    let slot_fix = || match free_slot(cfg) {
        Some(free) => {
            format!("choose another with --slot (e.g. {free}), or let acpimon pick one with --slot auto")
        }
        None => "no root-bus slot is free: move a device behind a PCIe root port or bridge".to_string(),
    };

    let mut isa_irqs: Vec<(u8, String)> = Vec::new();
    if is_pc(machine) {
        isa_irqs.push((6, format!("the floppy controller the {machine} board always has")));
    }
    if !nodefaults {
        isa_irqs.push((7, "the parallel port QEMU adds without -nodefaults".into()));
        isa_irqs.push((4, "the serial port QEMU adds without -nodefaults".into()));
    }
    let mut serials = if nodefaults { 0 } else { 1 };
    for s in &cfg.sections {
        match s.group.as_str() {
            "device" => {
                let driver = s.driver().unwrap_or("");
                if let Some(n) = s.get("irq").and_then(|v| v.parse::<u8>().ok()) {
                    isa_irqs.push((n, s.describe()));
                } else if driver == "isa-fdc" || driver == "floppy" {
                    isa_irqs.push((6, s.describe()));
                } else if driver == "isa-parallel" {
                    isa_irqs.push((7, s.describe()));
                } else if driver == "isa-serial" {
                    serials += 1;
                    isa_irqs.push((
                        if serials % 2 == 1 { 4 } else { 3 },
                        format!("serial port {serials} ({})", s.describe()),
                    ));
                }
            }
            "parallel" if s.value() != Some("none") => isa_irqs.push((7, s.describe())),
            "serial" if s.value() != Some("none") => {
                serials += 1;
                isa_irqs.push((
                    if serials % 2 == 1 { 4 } else { 3 },
                    format!("serial port {serials} ({})", s.describe()),
                ));
            }
            "fda" | "fdb" => isa_irqs.push((6, s.describe())),
            _ => {}
        }
    }
    for (n, dev) in taken_slots(cfg) {
        // A device on the same slot number collides whatever its function: QEMU refuses a
        // function 0 without multifunction=on beside another function.
        if n == slot.device && dev.id.as_deref() != Some(launch::IVSHMEM_ID) {
            out.push(Conflict {
                what: format!("PCI slot {slot} is taken by {}", dev.describe()),
                fix: slot_fix(),
            });
        }
    }
    for (n, owner) in isa_irqs {
        if n == irq {
            out.push(Conflict {
                what: format!("ISA IRQ {irq} is used by {owner}"),
                fix: "choose another with --irq (7 is free with -nodefaults on pc and q35; 5 and 3 are often free)"
                    .into(),
            });
        }
    }
    if builtin_slots(machine).contains(&slot.device) {
        out.push(Conflict {
            what: format!("PCI slot {slot} holds a device built into the {machine} board"),
            fix: slot_fix(),
        });
    }
    // acpimon's own ids: QEMU refuses a second chardev, device or object with the same id.
    if let Ok(items) = plan.items() {
        for item in &items {
            let Some(id) = item.id else { continue };
            for s in cfg.sections(item.option).filter(|s| s.id.as_deref() == Some(id)) {
                out.push(Conflict {
                    what: format!("the id {id} of {} is one acpimon adds itself", s.describe()),
                    fix: "rename it in your configuration, or leave acpimon's additions out of it (acpimon adds them)"
                        .into(),
                });
            }
        }
        // An I/O port holds one device: the user's own debug console on the doorbell's port.
        let doorbell = items.iter().any(|i| i.id == Some(launch::DOORBELL_ID) && i.option == "device");
        if let (true, Some(port)) = (doorbell, plan.ssdt.doorbell_port) {
            for s in cfg.sections("device").filter(|s| s.driver() == Some("isa-debugcon")) {
                // QEMU's default iobase is 0xe9.
                let iobase = s.get("iobase").map_or(Some(0xe9), parse_port);
                if iobase == Some(port) && !s.id.as_deref().is_some_and(|id| id.starts_with("acpimon-")) {
                    out.push(Conflict {
                        what: format!("I/O port {port:#x}, acpimon's doorbell, is taken by {}", s.describe()),
                        fix: "choose another with --doorbell-port, or leave the doorbell out with --no-doorbell"
                            .into(),
                    });
                }
            }
        }
        // Devices QEMU allows once per machine (their I/O ports are fixed).
        for (driver, what) in [("pc-testdev", "pc-testdev"), ("pvpanic", "pvpanic")] {
            let ours = items.iter().any(|i| i.head.as_ref().is_some_and(|(_, d)| d == driver));
            if !ours {
                continue;
            }
            for s in cfg.sections("device").filter(|s| s.driver() == Some(driver)) {
                if s.id.as_deref().is_some_and(|id| id.starts_with("acpimon-")) {
                    continue;
                }
                out.push(Conflict {
                    what: format!("{} adds a second {what}, which acpimon adds itself", s.describe()),
                    fix: format!("remove your {what} device: acpimon's reports the same events"),
                });
            }
        }
    }
    out
}

/// An `iobase=` value: hex with `0x`, or decimal, as QEMU's integer properties take it.
fn parse_port(v: &str) -> Option<u16> {
    let t = v.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SsdtConfig;

    fn plan(irq: u8, slot: &str) -> LaunchPlan {
        let cfg = SsdtConfig { irq, slot: slot.parse().unwrap(), ..SsdtConfig::default() };
        LaunchPlan::minimal(cfg, "/t".into(), "/r".into())
    }

    fn argv(s: &str) -> QemuConfig {
        let words: Vec<String> = s.split_whitespace().map(String::from).collect();
        QemuConfig::from_args(&words).unwrap()
    }

    #[test]
    fn defaults_are_free_with_nodefaults() {
        assert_eq!(check(&argv("-M pc -nodefaults -m 256"), &plan(7, "0f")), []);
        assert_eq!(check(&argv("-M q35 -nodefaults"), &plan(7, "0f")), []);
        assert_eq!(check(&argv("-M q35 -nodefaults"), &plan(6, "0f")), []);
    }

    #[test]
    fn board_devices_are_reported_with_a_fix() {
        let c = check(&argv("-M pc -nodefaults"), &plan(6, "0f"));
        assert_eq!(c.len(), 1);
        assert!(c[0].to_string().contains("ISA IRQ 6 is used by the floppy controller"), "{}", c[0]);
        assert!(c[0].to_string().contains("--irq"));
        let c = check(&argv("-M q35"), &plan(7, "0f"));
        assert!(c[0].what.contains("parallel port QEMU adds without -nodefaults"), "{c:?}");
        // No -M: QEMU's default machine is pc, with its floppy controller on 6.
        assert!(check(&argv("-m 256"), &plan(6, "0f"))[0].what.contains("floppy"));
        assert!(check(&argv("-m 256"), &plan(7, "0f"))[0].what.contains("parallel"));
    }

    #[test]
    fn a_debug_console_on_the_doorbell_port_is_reported() {
        let p = LaunchPlan { doorbell_socket: Some("/d".into()), ..plan(7, "0f") };
        let c = check(&argv("-M q35 -nodefaults -device isa-debugcon,iobase=0x403,chardev=x"), &p);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].what.contains("I/O port 0x403") && c[0].fix.contains("--doorbell-port"), "{c:?}");
        // QEMU's default port 0xe9, SeaBIOS's 0x402: no collision; nor without the doorbell.
        assert_eq!(check(&argv("-M q35 -nodefaults -device isa-debugcon,chardev=x"), &p), []);
        assert_eq!(check(&argv("-M q35 -nodefaults -device isa-debugcon,iobase=0x402,chardev=x"), &p), []);
        let c = check(&argv("-M q35 -nodefaults -device isa-debugcon,iobase=1027,chardev=x"), &plan(7, "0f"));
        assert_eq!(c, []);
    }

    #[test]
    fn explicit_devices_are_reported() {
        let c = check(&argv("-M q35 -nodefaults -device e1000,addr=0x0f.0"), &plan(7, "0f"));
        assert_eq!(c[0].what, "PCI slot 0f.0 is taken by -device e1000,addr=0x0f.0");
        assert!(c[0].fix.contains("--slot (e.g. 1e.0)") && c[0].fix.contains("--slot auto"), "{}", c[0].fix);
        let c = check(&argv("-M q35 -nodefaults -device isa-serial,irq=7"), &plan(7, "0f"));
        assert!(c[0].what.contains("-device isa-serial,irq=7"), "{c:?}");
        let c = check(&argv("-M q35 -nodefaults -serial stdio -serial null"), &plan(3, "0f"));
        assert!(c[0].what.contains("serial port 2"), "{c:?}");
        let c = check(&argv("-M q35 -nodefaults"), &plan(7, "1f"));
        assert!(c[0].what.contains("built into the q35 board"), "{c:?}");
    }

    /// EVE's merged config, with `-nodefaults` on its command line, plus `extra` sections.
    fn eve(extra: &str) -> (tempfile::TempDir, QemuConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.cfg");
        std::fs::write(&path, format!("{}{extra}", crate::launch::qemu_config::EVE_LIKE)).unwrap();
        let cfg = QemuConfig::from_args(&[
            "-nodefaults".into(),
            "-readconfig".into(),
            path.to_string_lossy().into(),
        ])
        .unwrap();
        (dir, cfg)
    }

    #[test]
    fn an_eve_config_file_is_checked_like_argv() {
        let (_d, cfg) = eve("");
        assert_eq!(check(&cfg, &plan(7, "0f")), [], "root ports at 4 and 5, the rest behind them");
        let c = check(&cfg, &plan(7, "04"));
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(
            c[0].what
                .starts_with("PCI slot 04.0 is taken by [device \"pci.4\"] (driver = \"pcie-root-port\""),
            "{}",
            c[0].what
        );
        assert!(c[0].what.contains("vm.cfg:45"), "names the file and line: {}", c[0].what);
        assert!(c[0].fix.contains("--slot (e.g. 1e.0)"), "{}", c[0].fix);
        // The console's isa-serial is the first serial port: IRQ 4.
        let c = check(&cfg, &plan(4, "0f"));
        assert!(c[0].what.contains("ISA IRQ 4 is used by serial port 1 ([device \"serial0\"]"), "{c:?}");
    }

    #[test]
    fn passthrough_devices_on_every_slot_and_our_ids_are_reported() {
        // EVE gives each device its own slot from 4 up: a long list reaches 0x0f.
        let mut extra = String::new();
        for n in 6..=0x10 {
            extra.push_str(&format!(
                "\n[device \"pci.{n}\"]\n  driver = \"pcie-root-port\"\n  bus = \"pcie.0\"\n  addr = \"{n:#x}\"\n"
            ));
        }
        extra.push_str("\n[device \"acpimon-testdev\"]\n  driver = \"pc-testdev\"\n");
        extra.push_str("\n[device \"panic\"]\n  driver = \"pvpanic\"\n");
        let (_d, cfg) = eve(&extra);
        let c = check(&cfg, &plan(7, "0f"));
        let text: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        assert!(text.iter().any(|t| t.contains("taken by [device \"pci.15\"]")), "{text:#?}");
        assert!(
            text.iter().any(|t| t.contains("the id acpimon-testdev of [device \"acpimon-testdev\"]")),
            "{text:#?}"
        );
        assert_eq!(text.len(), 2, "pvpanic is not in this plan: {text:#?}");
        let with_panic = LaunchPlan { pvpanic: true, ..plan(7, "0e") };
        let c = check(&cfg, &with_panic);
        assert!(
            c.iter().any(|c| c.what.starts_with("[device \"panic\"] (driver = \"pvpanic\")")
                && c.what.contains("adds a second pvpanic")),
            "{c:?}"
        );
        assert_eq!(free_slot(&cfg), Some("1e".parse().unwrap()));
    }

    #[test]
    fn auto_slot_is_the_highest_free_one() {
        assert_eq!(free_slot(&argv("-M q35")), Some("1e".parse().unwrap()));
        assert_eq!(free_slot(&argv("-M pc")), Some("1e".parse().unwrap()));
        let cfg = argv("-M q35 -device e1000,addr=1e -device virtio-net-pci,bus=pci.4,addr=0x1d");
        assert_eq!(
            free_slot(&cfg),
            Some("1d".parse().unwrap()),
            "a device behind a bridge takes no root slot"
        );
        let mut words = "-M q35".to_string();
        for n in 1..0x1f {
            words.push_str(&format!(" -device e1000,addr={n:#x}"));
        }
        assert_eq!(free_slot(&argv(&words)), None);
        let c = check(&argv(&words), &plan(7, "0f"));
        assert!(c[0].fix.contains("no root-bus slot is free"), "{c:?}");
    }
}
