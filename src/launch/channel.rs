//! Which channel carries a VM's records, and why: the ivshmem BAR2 as the guest firmware
//! placed it, read back through QMP `query-pci`. 32-bit AML reaches only a BAR below 4 GiB.
//!
//! OVMF puts 64-bit BARs above 4 GiB. `-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=0` (no
//! 64-bit PCI window; also as a `[fw_cfg]` section of a -readconfig file) moves BAR2 below.
//! Measured under TCG: edk2 2025.02 (Debian trixie's OVMF; from edk2-stable202505 on, and EVE
//! builds 202508) honours it alone (BAR2 at 0x80000000 on q35 and pc). edk2 2022.11 (Debian
//! bookworm's) honours it only with a CPU address width it does not trust (phys-bits below 41,
//! and not 36/39 with an Intel vendor string or 40 with AMD, e.g. `-cpu qemu64,phys-bits=37`):
//! otherwise its dynamic MMIO window overrides the 0.
//!
//! A VM whose table has a doorbell port does not need the region: when BAR2 is out of reach the
//! AML sends each record as a frame on that port (the port channel, [`crate::abi`]), and the
//! report says so ([`Channel::Port`]) with why the region is not used. The region stays the
//! better channel when it can be had: a beat on the port costs one more HMP command (the
//! nonce's) and the guest about 50 port writes instead of 1.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::generate::PciSlot;
use crate::trigger::qmp::{Qmp, QmpError};

/// The fw_cfg file that sets OVMF's 64-bit PCI window, in MiB.
pub const OVMF_MMIO64_KNOB: &str = "opt/ovmf/X-PciMmio64Mb";

/// How to get BAR2 below 4 GiB under OVMF, for the reports.
const LOW_BAR_FIX: &str = "-fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=0 (acpimon adds it when it sees OVMF in \
     the arguments or a -readconfig file; `prepare --ovmf` prints it) and, with OVMF older than edk2-stable202505 \
     (e.g. Debian bookworm's 2022.11), -cpu ...,phys-bits=37 too";

/// Where the records of a VM can go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "channel")]
pub enum Channel {
    /// BAR2 is below 4 GiB: the AML writes the region through it.
    Region { bar: u64 },
    /// BAR2 is above 4 GiB: the AML refuses to write (it would truncate the address).
    AboveFourGib { bar: u64 },
    /// The firmware has not assigned BAR2 (yet).
    Unassigned,
    /// No ivshmem device at the slot.
    NoDevice,
    /// The region is out of reach (`region` says why: never [`Channel::Region`]) and the table
    /// has a doorbell port: records come as frames on it.
    Port { port: u16, region: Box<Channel> },
}

impl Channel {
    /// The channel of a VM whose table rings `doorbell_port`: the port's frames when the
    /// region is out of reach, else this.
    pub fn with_port(self, doorbell_port: Option<u16>) -> Channel {
        match (self, doorbell_port) {
            (c @ (Channel::AboveFourGib { .. } | Channel::Unassigned | Channel::NoDevice), Some(port)) => {
                Channel::Port { port, region: Box::new(c) }
            }
            (c, _) => c,
        }
    }

    /// Whether records reach the host at all (through the region or the port).
    pub fn carries_records(&self) -> bool {
        matches!(self, Channel::Region { .. } | Channel::Port { .. })
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Region { bar } => write!(f, "shared region through ivshmem BAR2 at {bar:#x} (below 4 GiB)"),
            Channel::AboveFourGib { bar } => write!(
                f,
                "none: ivshmem BAR2 is at {bar:#x}, above 4 GiB, where 32-bit AML cannot write; under OVMF pass \
                 {LOW_BAR_FIX}"
            ),
            Channel::Unassigned => write!(f, "none: the firmware left ivshmem BAR2 unassigned"),
            Channel::NoDevice => write!(f, "none: no ivshmem device at the configured slot"),
            Channel::Port { port, region } => {
                write!(f, "I/O port {port:#x} frames: ")?;
                match region.as_ref() {
                    Channel::AboveFourGib { bar } => write!(
                        f,
                        "ivshmem BAR2 at {bar:#x} is above 4 GiB, where 32-bit AML cannot write, so the AML \
                         sends each record framed on the doorbell port. The shared region is cheaper (one HMP \
                         command per beat, one port write per record) when the firmware puts BAR2 below 4 GiB: \
                         under OVMF without a large-BAR device, pass {LOW_BAR_FIX}"
                    ),
                    Channel::Unassigned => {
                        write!(f, "the firmware left ivshmem BAR2 unassigned, so the AML sends each record on the port")
                    }
                    Channel::NoDevice => {
                        write!(f, "no ivshmem device at the configured slot, so the AML sends each record on the port")
                    }
                    other => write!(f, "{other}"),
                }
            }
        }
    }
}

/// Reads BAR2 of the ivshmem function at `slot` on bus 0. The five fields it needs are read
/// from the raw reply: qapi's `PciDeviceInfo` requires many more, and a device some QEMU
/// describes differently must not cost the VM its region.
pub async fn locate(qmp: &Qmp, slot: PciSlot) -> Result<Channel, QmpError> {
    let buses = qmp.execute_json(qapi::qmp::query_pci {}, crate::trigger::qmp::DEFAULT_TIMEOUT).await?;
    Ok(classify(&buses, slot))
}

fn classify(buses: &Value, slot: PciSlot) -> Channel {
    let devices = buses
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["bus"] == 0)
        .flat_map(|b| b["devices"].as_array().into_iter().flatten());
    for dev in devices {
        if dev["slot"] != u64::from(slot.device) || dev["function"] != u64::from(slot.function) {
            continue;
        }
        let bar2 = dev["regions"].as_array().into_iter().flatten().find(|r| r["bar"] == 2);
        return match bar2.and_then(|r| r["address"].as_i64()) {
            Some(a) if a <= 0 => Channel::Unassigned,
            Some(a) if a as u64 >= 1 << 32 => Channel::AboveFourGib { bar: a as u64 },
            Some(a) => Channel::Region { bar: a as u64 },
            None => Channel::Unassigned,
        };
    }
    Channel::NoDevice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci(addr: i64) -> Value {
        serde_json::json!([{ "bus": 0, "devices": [
            { "bus": 0, "slot": 0, "function": 0, "regions": [] },
            { "bus": 0, "slot": 15, "function": 0, "regions": [
                { "bar": 0, "address": 0xfebf_1000i64, "size": 256 },
                { "bar": 2, "address": addr, "size": 4096 } ] } ] }])
    }

    #[test]
    fn bars_are_classified() {
        let slot: PciSlot = "0f".parse().unwrap();
        assert_eq!(classify(&pci(0xc000_0000), slot), Channel::Region { bar: 0xc000_0000 });
        assert_eq!(classify(&pci(0xe0_0000_0000), slot), Channel::AboveFourGib { bar: 0xe0_0000_0000 });
        assert_eq!(classify(&pci(-1), slot), Channel::Unassigned);
        assert_eq!(classify(&pci(0xc000_0000), "0e".parse().unwrap()), Channel::NoDevice);
        assert!(Channel::AboveFourGib { bar: 1 << 40 }.to_string().contains("X-PciMmio64Mb,string=0"));
    }

    #[test]
    fn a_doorbell_port_carries_what_the_region_cannot() {
        let high = Channel::AboveFourGib { bar: 0x80_0000_0000 };
        let port = high.clone().with_port(Some(0x403));
        assert_eq!(port, Channel::Port { port: 0x403, region: Box::new(high.clone()) });
        let text = port.to_string();
        assert!(
            text.starts_with("I/O port 0x403 frames: ivshmem BAR2 at 0x8000000000 is above 4 GiB"),
            "{text}"
        );
        assert!(text.contains("cheaper") && text.contains("string=0"), "{text}");
        assert!(port.carries_records());
        // Degrade, don't fail: without a port the old explanation stands.
        assert_eq!(high.clone().with_port(None), high);
        assert!(!high.carries_records());
        let low = Channel::Region { bar: 0xc000_0000 };
        assert_eq!(low.clone().with_port(Some(0x403)), low);
        assert!(Channel::NoDevice.with_port(Some(0x403)).to_string().contains("no ivshmem device"));
        let json = serde_json::to_value(&port).unwrap();
        assert_eq!(json["channel"], "port");
        assert_eq!(json["region"]["channel"], "above-four-gib");
    }
}
