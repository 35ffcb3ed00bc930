//! GSI routing: the in-kernel irqchip's pins, plus one MSI route per device
//! that has MSI enabled. KVM_SET_GSI_ROUTING replaces the whole table, so
//! it is always rebuilt from both.

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::pci::MsiMessage;

/// KVM's irqchip ids (kvm.h) for the two cascaded 8259 PICs: the first
/// takes IRQs 0-7, the second, behind the first's pin 2, IRQs 8-15. The
/// IOAPIC follows them as irqchip 2.
const PIC_FIRST: u32 = 0;
const PIC_SECOND: u32 = 1;
const _: () = assert!(KVM_IRQCHIP_IOAPIC == PIC_SECOND + 1);

/// IOAPIC inputs.
pub const IOAPIC_PINS: u32 = 24;
/// Devices' INTx lines: GSI `INTX_BASE + device index`.
pub const INTX_BASE: u32 = 10;
/// Devices' MSI routes: GSI `MSI_BASE + device index`.
pub const MSI_BASE: u32 = IOAPIC_PINS;

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

fn msi(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let route = kvm_irq_routing_msi {
        address_lo: m.address as u32,
        address_hi: (m.address >> 32) as u32,
        data: m.data,
        ..Default::default()
    };
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 { msi: route },
        ..Default::default()
    }
}

/// The routing table: KVM's default irqchip routes (GSIs below 16 on the
/// PICs and the IOAPIC, the rest on the IOAPIC) and `msi` (gsi, message).
pub fn table(msis: &[(u32, MsiMessage)]) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            entries.push(irqchip(gsi, PIC_FIRST, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, PIC_SECOND, gsi - 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    entries.extend(msis.iter().map(|&(gsi, m)| msi(gsi, m)));
    entries
}

pub fn set_routing(vm: &VmFd, msis: &[(u32, MsiMessage)]) -> Result<(), kvm_ioctls::Error> {
    let entries = table(msis);
    let routing = KvmIrqRouting::from_entries(&entries).expect("well below KVM_MAX_IRQ_ROUTES");
    vm.set_gsi_routing(&routing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_and_msi() {
        let m = MsiMessage {
            address: 0x1_fee0_0000,
            data: 0x41,
        };
        let t = table(&[(MSI_BASE, m)]);
        assert_eq!(t.len(), 16 * 2 + 8 + 1);
        let last = t.last().unwrap();
        assert_eq!((last.gsi, last.type_), (MSI_BASE, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry holds the msi member.
        let r = unsafe { last.u.msi };
        assert_eq!((r.address_lo, r.address_hi, r.data), (0xfee0_0000, 1, 0x41));
    }
}
