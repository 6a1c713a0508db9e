//! Checks a user's QEMU command line for what would collide with acpimon's additions: a
//! device at our PCI slot, or an ISA device on our GED IRQ. Board facts measured on QEMU 10.0
//! with `info qtree`: pc keeps `isa-fdc` (IRQ 6) even with `-nodefaults`; without it, pc and
//! q35 add `isa-parallel` (IRQ 7) and a first `isa-serial` (IRQ 4).

use crate::generate::PciSlot;
use crate::launch::LaunchPlan;

/// One collision, with its fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}; {fix}")]
pub struct Conflict {
    pub what: String,
    pub fix: String,
}

/// Every collision between `argv` (QEMU's arguments without the program name) and `plan`.
pub fn check(argv: &[String], plan: &LaunchPlan) -> Vec<Conflict> {
    let mut out = Vec::new();
    let irq = plan.ssdt.irq;
    let slot = plan.ssdt.slot;
    let opts: Vec<(&str, &str)> = argv
        .iter()
        .zip(argv.iter().skip(1))
        .filter(|(o, _)| o.starts_with('-'))
        .map(|(o, v)| (o.trim_start_matches('-'), v.as_str()))
        .collect();
    let flag = |name: &str| argv.iter().any(|a| a.trim_start_matches('-') == name);
    let machine = opts
        .iter()
        .find(|(o, _)| *o == "M" || *o == "machine")
        .map(|(_, v)| v.split(',').next().unwrap_or(""))
        .unwrap_or("pc");
    let is_pc = machine == "pc" || machine.starts_with("pc-i440fx") || machine == "isapc";
    let nodefaults = flag("nodefaults");

    let mut isa_irqs: Vec<(u8, String)> = Vec::new();
    if is_pc {
        isa_irqs.push((6, format!("the floppy controller the {machine} board always has")));
    }
    if !nodefaults {
        isa_irqs.push((7, "the parallel port QEMU adds without -nodefaults".into()));
        isa_irqs.push((4, "the serial port QEMU adds without -nodefaults".into()));
    }
    let mut serials = if nodefaults { 0 } else { 1 };
    for (opt, val) in &opts {
        let props =
            |key: &str| val.split(',').find_map(|p| p.strip_prefix(key).and_then(|r| r.strip_prefix('=')));
        let driver = val.split(',').next().unwrap_or("");
        let driver = driver.strip_prefix("driver=").unwrap_or(driver);
        match *opt {
            "device" => {
                if let Some(n) = props("irq").and_then(|v| v.parse::<u8>().ok()) {
                    isa_irqs.push((n, format!("-device {driver},irq={n}")));
                } else if driver == "isa-fdc" || driver == "floppy" {
                    isa_irqs.push((6, format!("-device {driver}")));
                } else if driver == "isa-parallel" {
                    isa_irqs.push((7, "-device isa-parallel".into()));
                } else if driver == "isa-serial" {
                    serials += 1;
                    isa_irqs.push((if serials % 2 == 1 { 4 } else { 3 }, format!("serial port {serials}")));
                }
                if let Some(addr) = props("addr") {
                    if addr.parse::<PciSlot>().ok() == Some(slot) && driver != "ivshmem-plain" {
                        out.push(Conflict {
                            what: format!("PCI slot {slot} is taken by -device {driver},addr={addr}"),
                            fix: "choose another with --slot (e.g. 0e or 1e)".into(),
                        });
                    }
                }
            }
            "parallel" if *val != "none" => isa_irqs.push((7, "-parallel".into())),
            "serial" if *val != "none" => {
                serials += 1;
                isa_irqs
                    .push((if serials % 2 == 1 { 4 } else { 3 }, format!("serial port {serials} (-serial)")));
            }
            "fda" | "fdb" => isa_irqs.push((6, format!("-{opt}"))),
            _ => {}
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
    let builtin: &[u8] = if is_pc { &[0, 1] } else { &[0, 0x1f] };
    if builtin.contains(&slot.device) {
        out.push(Conflict {
            what: format!("PCI slot {slot} holds a device built into the {machine} board"),
            fix: "choose another with --slot (e.g. 0f)".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SsdtConfig;

    fn plan(irq: u8, slot: &str) -> LaunchPlan {
        let cfg = SsdtConfig { irq, slot: slot.parse().unwrap(), ..SsdtConfig::default() };
        LaunchPlan::minimal(cfg, "/t".into(), "/r".into())
    }

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
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
    fn explicit_devices_are_reported() {
        let c = check(&argv("-M q35 -nodefaults -device e1000,addr=0x0f.0"), &plan(7, "0f"));
        assert_eq!(c[0].what, "PCI slot 0f.0 is taken by -device e1000,addr=0x0f.0");
        let c = check(&argv("-M q35 -nodefaults -device isa-serial,irq=7"), &plan(7, "0f"));
        assert!(c[0].what.contains("-device isa-serial,irq=7"), "{c:?}");
        let c = check(&argv("-M q35 -nodefaults -serial stdio -serial null"), &plan(3, "0f"));
        assert!(c[0].what.contains("serial port 2"), "{c:?}");
        let c = check(&argv("-M q35 -nodefaults"), &plan(7, "1f"));
        assert!(c[0].what.contains("built into the q35 board"), "{c:?}");
    }
}
