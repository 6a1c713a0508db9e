//! The launch as a libvirt domain XML fragment (`prepare --format libvirt`).
//!
//! libvirt has native elements for some of what acpimon adds and not for the rest:
//!
//! - pvpanic is `<panic model='isa'/>` (libvirt adds `-device pvpanic` on port 0x505), and the
//!   guest is kept after a panic with `<on_crash>preserve</on_crash>`;
//! - vmcoreinfo is `<features><vmcoreinfo state='on'/></features>` (virt-install turns it on by
//!   default, and QEMU allows one such device: a second through `<qemu:commandline>` would stop
//!   the domain from starting);
//! - the region cannot be libvirt's `<shmem>`: libvirt always backs an ivshmem-plain device with
//!   `/dev/shm/NAME`, never with a file elsewhere, while acpimon's region lives in the VM's
//!   state directory (with its ABI header written before QEMU starts); and the ACPI table is
//!   not an `<acpi><table>` type libvirt 9.0 knows (only SLIC). These, pc-testdev, acpimon's
//!   own QMP monitor and console, and `-action panic=none`, go through `<qemu:commandline>`,
//!   which needs the `xmlns:qemu` namespace on the `<domain>` element.
//!
//! The fragment is a well-formed `<domain>` document whose children a user merges into theirs.
//! libvirt 9.0 with QEMU 10.0 accepts acpimon's second QMP monitor and `-action panic=none`
//! beside its own `-S`, `-no-shutdown`, `-nodefaults`, QMP monitor and `-sandbox`.

use std::fmt::Write as _;

use super::{LaunchError, LaunchPlan, PVPANIC_ID, VMCOREINFO_ID};

/// The namespace `<qemu:commandline>` lives in.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// The fragment for `plan`, with comments saying where each part goes.
pub fn domain_xml(plan: &LaunchPlan) -> Result<String, LaunchError> {
    let mut args = Vec::new();
    let (mut panic, mut vmcoreinfo) = (false, false);
    for item in plan.items()? {
        if item.option == "device" && item.id == Some(PVPANIC_ID) {
            // libvirt's own element; it also tells libvirt the guest has a panic notifier.
            panic = true;
            continue;
        }
        if item.option == "device" && item.id == Some(VMCOREINFO_ID) {
            vmcoreinfo = true;
            continue;
        }
        args.extend(item.argv());
    }
    let mut out = String::new();
    out.push_str(
        "<!-- acpimon: merge the children of this <domain> into your domain's XML (virsh edit):\n     \
         add the xmlns:qemu attribute to your <domain> element, put <on_crash> beside\n     \
         <on_poweroff>, the <features> and <devices> children into yours, and <qemu:commandline>\n     \
         last in <domain>. PCI slot of the ivshmem device: keep it free of libvirt's devices. -->\n",
    );
    writeln!(out, "<domain xmlns:qemu='{QEMU_NS}'>").unwrap();
    if panic {
        out.push_str(
            "  <!-- keep a panicked guest (its memory and console) for acpimon's diagnostics -->\n  \
             <on_crash>preserve</on_crash>\n  <devices>\n    <panic model='isa'/>\n  </devices>\n",
        );
    }
    if vmcoreinfo {
        out.push_str(
            "  <!-- lets `acpimon dmesg` find the guest kernel's log (the guest loads qemu_fw_cfg) -->\n  \
             <features>\n    <vmcoreinfo state='on'/>\n  </features>\n",
        );
    }
    out.push_str("  <qemu:commandline>\n");
    for arg in args {
        writeln!(out, "    <qemu:arg value='{}'/>", crate::util::escape_markup(&arg)).unwrap();
    }
    out.push_str("  </qemu:commandline>\n</domain>\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SsdtConfig;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            qmp_socket: Some("/run/vm1/qmp.sock".into()),
            console_socket: Some("/run/vm1/console.sock".into()),
            pvpanic: true,
            ..LaunchPlan::minimal(SsdtConfig::default(), "/run/vm1/ssdt.aml".into(), "/run/vm1/region".into())
        }
    }

    #[test]
    fn native_panic_and_the_rest_as_qemu_args() {
        let xml = domain_xml(&plan()).unwrap();
        assert!(xml.contains("<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"), "{xml}");
        assert!(xml.contains("<devices>\n    <panic model='isa'/>\n  </devices>"), "{xml}");
        assert!(xml.contains("<on_crash>preserve</on_crash>"), "{xml}");
        assert!(!xml.contains("pvpanic,"), "pvpanic is libvirt's element, not an argument: {xml}");
        let args: Vec<&str> = xml
            .lines()
            .filter_map(|l| l.trim().strip_prefix("<qemu:arg value='")?.strip_suffix("'/>"))
            .collect();
        let mut want = plan().argv().unwrap();
        let i = want.iter().position(|a| a == "pvpanic,id=acpimon-pvpanic").unwrap();
        want.drain(i - 1..=i);
        assert_eq!(args, want);
        assert_eq!(args.last(), Some(&"panic=none"));
        assert!(xml.trim_end().ends_with("</qemu:commandline>\n</domain>"), "{xml}");
    }

    #[test]
    fn vmcoreinfo_is_libvirts_feature_not_an_argument() {
        let xml = domain_xml(&LaunchPlan { vmcoreinfo: true, ..plan() }).unwrap();
        assert!(xml.contains("  <features>\n    <vmcoreinfo state='on'/>\n  </features>\n"), "{xml}");
        assert!(!xml.contains("<qemu:arg value='vmcoreinfo"), "{xml}");
        assert!(!domain_xml(&plan()).unwrap().contains("vmcoreinfo"));
    }

    #[test]
    fn without_pvpanic_no_panic_element_and_values_are_escaped() {
        let mut p = LaunchPlan { pvpanic: false, ..plan() };
        p.region_path = "/run/a'b&<c>/region".into();
        let xml = domain_xml(&p).unwrap();
        assert!(!xml.contains("<panic model") && !xml.contains("<on_crash>preserve"), "{xml}");
        assert!(xml.contains("mem-path=/run/a&#39;b&amp;&lt;c&gt;/region,"), "{xml}");
    }
}
