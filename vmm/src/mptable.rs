//! The MultiProcessor Specification 1.4 tables, which tell a guest without
//! ACPI (Linux with `CONFIG_X86_MPPARSE`) its processors, its I/O APIC and
//! how ISA and PCI interrupts reach the I/O APIC's pins.
//!
//! The floating pointer sits at the start of the last KiB of base memory,
//! one of the places the guest scans, and the configuration table right
//! after it; the VMM's e820 map keeps that KiB reserved.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Where the floating pointer goes: the last KiB below 640 KiB.
pub const ADDRESS: u64 = 0x9fc00;
/// What the tables may occupy from [`ADDRESS`] on.
pub const SIZE: u64 = 0x400;

const LOCAL_APIC: u32 = 0xfee0_0000;
const IO_APIC: u32 = 0xfec0_0000;
const SPEC_REVISION: u8 = 4;
const LOCAL_APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;

// Entry types.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;

// Interrupt types.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

const BUS_ISA: u8 = 0;
const BUS_PCI: u8 = 1;

/// A PCI function's INTA and the I/O APIC pin it is wired to.
#[derive(Clone, Copy, Debug)]
pub struct PciIrq {
    pub device: u8,
    pub pin: u8,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs: the MP table's processor entries take at most 254")]
    TooManyCpus(usize),
    #[error("the MP table does not fit in {SIZE} bytes")]
    TooBig,
    #[error("writing the MP table: {0}")]
    Memory(#[from] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_sub(*b))
}

/// The configuration table's entries, in the order the specification asks
/// for: processors, buses, I/O APICs, I/O interrupts, local interrupts.
fn entries(cpus: usize, pci: &[PciIrq]) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    let mut push = |e: &mut Vec<u8>, entry: &[u8]| {
        e.extend_from_slice(entry);
        count += 1;
    };
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        let mut p = [0u8; 20];
        p[..4].copy_from_slice(&[PROCESSOR, id as u8, LOCAL_APIC_VERSION, flags]);
        // Signature and features: the guest reads the real ones from CPUID.
        push(&mut e, &p);
    }
    push(&mut e, &[BUS, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    push(&mut e, &[BUS, BUS_PCI, b'P', b'C', b'I', b' ', b' ', b' ']);
    // The I/O APIC's id follows the processors'.
    let ioapic_id = cpus as u8;
    let mut io = [IOAPIC, ioapic_id, IO_APIC_VERSION, 1, 0, 0, 0, 0];
    io[4..].copy_from_slice(&IO_APIC.to_le_bytes());
    push(&mut e, &io);
    // ISA IRQ n on pin n, as KVM's default routing has it (IRQ 2 is the
    // cascade). Flags 0: polarity and trigger conform to the bus.
    for irq in (0..16u8).filter(|&i| i != 2) {
        push(
            &mut e,
            &[IO_INTERRUPT, INT, 0, 0, BUS_ISA, irq, ioapic_id, irq],
        );
    }
    // PCI INTA of device d is source IRQ d << 2 (pin A = 0).
    for p in pci {
        let source = p.device << 2;
        push(
            &mut e,
            &[IO_INTERRUPT, INT, 0, 0, BUS_PCI, source, ioapic_id, p.pin],
        );
    }
    // The 8259s' output on every LAPIC's LINT0, NMI on LINT1.
    push(
        &mut e,
        &[LOCAL_INTERRUPT, EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0],
    );
    push(&mut e, &[LOCAL_INTERRUPT, NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    (e, count)
}

/// The floating pointer and configuration table, as bytes at [`ADDRESS`].
pub fn build(cpus: usize, pci: &[PciIrq]) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let table_addr = ADDRESS as u32 + 16;
    let mut mpf = [0u8; 16];
    mpf[..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&table_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = SPEC_REVISION;
    mpf[10] = checksum(&mpf);

    let (body, count) = entries(cpus, pci);
    let mut header = [0u8; 44];
    let len = (header.len() + body.len()) as u16;
    header[..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&len.to_le_bytes());
    header[6] = SPEC_REVISION;
    header[8..16].copy_from_slice(b"KVMUSER ");
    header[16..28].copy_from_slice(b"kvm-userdev ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LOCAL_APIC.to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    let mut out = mpf.to_vec();
    out.extend_from_slice(&table);
    if out.len() as u64 > SIZE {
        return Err(MpTableError::TooBig);
    }
    Ok(out)
}

/// Writes the tables for `cpus` processors and the PCI interrupts `pci`.
pub fn write(memory: &GuestMemoryMmap, cpus: usize, pci: &[PciIrq]) -> Result<(), MpTableError> {
    let bytes = build(cpus, pci)?;
    memory.write_slice(&bytes, GuestAddress(ADDRESS))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts() {
        let pci = [PciIrq { device: 1, pin: 10 }, PciIrq { device: 2, pin: 11 }];
        let t = build(2, &pci).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        // 2 CPUs, 2 buses, 1 I/O APIC, 15 ISA + 2 PCI interrupts, 2 local.
        assert_eq!(count, 2 + 2 + 1 + 15 + 2 + 2);
        assert_eq!(len, 44 + 2 * 20 + (count as usize - 2) * 8);
        // The BSP is flagged, the AP only enabled.
        assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        assert_eq!((table[64 + 1], table[64 + 3]), (1, CPU_ENABLED));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(matches!(build(0, &[]), Err(MpTableError::TooManyCpus(0))));
        assert!(matches!(build(64, &[]), Err(MpTableError::TooBig)));
    }
}
