//! The VM's own state in a snapshot, beside the device's: what a guest
//! needs to go on in a new VM where it was in the old one.
//!
//! Taken between two instructions of a VM with one vCPU, whose thread
//! takes it: the vCPU's registers (general, system, x87/SSE/AVX state
//! (XSAVE), XCRs, debug registers, the MSRs below, pending events, run
//! state), its local APIC, the PIC and I/O APIC, the KVM clock, every
//! PCI function's configuration space, and guest RAM (only the pages that
//! are not all zero). The rest of the VMM has no state a running guest
//! can see. What a PVH payload VM has is covered; a Linux VM's PIT and
//! UART console stream are not, so only PVH VMs are saved.
//!
//! The encoding is the KVM structures' bytes, each with its length, so a
//! snapshot only restores on the same kernel and host CPU model, as with
//! any KVM VM snapshot.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::fs::File;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::seek_hole::SeekHole;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The MSRs a guest of ours may set and depend on; the others KVM keeps
/// at their reset values, which a new vCPU has too.
const MSRS: [u32; 13] = [
    0x10,        // IA32_TSC: the guest's clock goes on from where it was
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // FMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("the snapshot holds a VM with one vCPU and a PVH payload, and this one has {0} vCPUs or boots Linux")]
    Cpus(usize),
    #[error("the snapshot's VM has {0} bytes of RAM, and this one another size")]
    Ram(u64),
    #[error("the snapshot has PCI device {0}, which this VM does not")]
    Pci(u8),
    #[error("the VM snapshot is cut short or malformed: {0}")]
    Format(&'static str),
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { op, source }
}

/// One vCPU's registers and local APIC.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must be stopped between two
    /// instructions (see [`complete_exit`]).
    pub fn save(vcpu: &VcpuFd) -> Result<VcpuState, VmStateError> {
        let mut msrs = Msrs::from_entries(&MSRS.map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        }))
        .expect("a short MSR list");
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            // KVM stops at the first MSR it cannot read; the rest keep
            // their reset values.
            msrs: msrs.as_slice()[..read].to_vec(),
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        })
    }

    /// Loads the state into a new vCPU (with the CPUID of the saved one):
    /// system registers before the local APIC (its base is in them), the
    /// events and run state last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VmStateError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave, read by KVM_GET_XSAVE
        // from a vCPU with the same CPUID, so its features fit in it.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VmStateError::Format("MSRs"))?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(VmStateError::Format("an MSR KVM refuses"));
        }
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

/// Completes the port or MMIO access `vcpu` exited for, without entering
/// the guest again: KVM finishes an instruction that exited to user space
/// only on the next KVM_RUN, and its registers are those of the next
/// instruction only after that.
pub fn complete_exit(vcpu: &mut VcpuFd) -> Result<(), VmStateError> {
    vcpu.set_kvm_immediate_exit(1);
    let ran = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match ran {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(VmStateError::Kvm {
            op: "KVM_RUN (immediate exit)",
            source,
        }),
        Ok(()) => Err(VmStateError::Format("KVM_RUN ran the guest")),
    }
}

/// The VM's interrupt controllers and clock.
pub struct VmState {
    irqchips: [kvm_irqchip; 3],
    clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
        let mut irqchips = CHIPS.map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut irqchips {
            vm.get_irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        }
        let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK takes only the value (and KVM_CLOCK_REALTIME).
        clock.flags = 0;
        Ok(VmState { irqchips, clock })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_clock(&self.clock).map_err(kvm("KVM_SET_CLOCK"))
    }
}

/// The whole VM but its devices' models: the vCPU, the interrupt
/// controllers, the PCI configuration spaces and RAM.
pub struct Machine {
    pub vcpu: VcpuState,
    pub vm: VmState,
    /// Each PCI function's device number and configuration space.
    pub pci: Vec<(u8, [u8; 256])>,
    /// RAM's size and its pages that are not all zero.
    pub ram_size: u64,
    pub pages: Vec<(u32, Vec<u8>)>,
}

impl Machine {
    /// The pages of RAM's memory file that hold anything. Only the file's
    /// data extents are read, with pread: touching a hole through the
    /// mapping would allocate it, which for a guest that used a few MiB
    /// of 256 costs minutes on the debug kernel.
    pub fn save_pages(file: &File, size: u64) -> Result<Vec<(u32, Vec<u8>)>, VmStateError> {
        let io = |e: std::io::Error| VmStateError::Memory(e.to_string());
        let mut seeker = file.try_clone().map_err(io)?;
        let mut pages = Vec::new();
        let mut page = vec![0u8; PAGE];
        let mut offset = 0;
        while let Some(data) = seeker.seek_data(offset).map_err(io)? {
            let end = seeker
                .seek_hole(data)
                .map_err(io)?
                .unwrap_or(size)
                .min(size);
            for index in data / PAGE as u64..end.div_ceil(PAGE as u64) {
                file.read_exact_at(&mut page, index * PAGE as u64)
                    .map_err(io)?;
                if page.iter().any(|&b| b != 0) {
                    pages.push((index as u32, page.clone()));
                }
            }
            if end >= size {
                break;
            }
            offset = end;
        }
        Ok(pages)
    }

    /// Writes the saved pages into a new VM's RAM, which is all zero.
    pub fn restore_pages(&self, memory: &GuestMemoryMmap) -> Result<(), VmStateError> {
        for (index, page) in &self.pages {
            memory
                .write_slice(page, GuestAddress(u64::from(*index) * PAGE as u64))
                .map_err(|e| VmStateError::Memory(e.to_string()))?;
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        let v = &self.vcpu;
        w.put(v.regs.as_bytes());
        w.put(v.sregs.as_bytes());
        w.put(v.xsave.as_bytes());
        w.put(v.xcrs.as_bytes());
        w.put(v.debugregs.as_bytes());
        w.put(v.msrs.as_slice().as_bytes());
        w.put(v.lapic.as_bytes());
        w.put(v.events.as_bytes());
        w.put(v.mp_state.as_bytes());
        for chip in &self.vm.irqchips {
            w.put(chip.as_bytes());
        }
        w.put(self.vm.clock.as_bytes());
        w.put(&(self.pci.len() as u32).to_le_bytes());
        for (dev, config) in &self.pci {
            w.put(&[*dev]);
            w.put(config);
        }
        w.put(&self.ram_size.to_le_bytes());
        w.put(&(self.pages.len() as u32).to_le_bytes());
        for (index, page) in &self.pages {
            w.put(&index.to_le_bytes());
            w.put(page);
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Machine, VmStateError> {
        let mut r = Reader(bytes);
        let vcpu = VcpuState {
            regs: r.get("registers")?,
            sregs: r.get("system registers")?,
            xsave: r.get("XSAVE")?,
            xcrs: r.get("XCRs")?,
            debugregs: r.get("debug registers")?,
            msrs: msr_entries(r.next("MSRs")?)?,
            lapic: r.get("local APIC")?,
            events: r.get("events")?,
            mp_state: r.get("run state")?,
        };
        let irqchips = [r.get("PIC")?, r.get("PIC")?, r.get("I/O APIC")?];
        let vm = VmState {
            irqchips,
            clock: r.get("clock")?,
        };
        let functions = u32::from_le_bytes(r.get("PCI")?);
        let mut pci = Vec::new();
        for _ in 0..functions.min(32) {
            let [dev] = r.get::<[u8; 1]>("PCI device")?;
            pci.push((dev, r.get("PCI configuration space")?));
        }
        let ram_size = u64::from_le_bytes(r.get("RAM size")?);
        let count = u32::from_le_bytes(r.get("RAM")?);
        let mut pages = Vec::new();
        for _ in 0..count {
            let index = u32::from_le_bytes(r.get("page index")?);
            if u64::from(index) >= ram_size / PAGE as u64 {
                return Err(VmStateError::Format("a page beyond RAM"));
            }
            let page = r.next("page")?;
            if page.len() != PAGE {
                return Err(VmStateError::Format("page"));
            }
            pages.push((index, page.to_vec()));
        }
        if !r.0.is_empty() {
            return Err(VmStateError::Format("bytes after the RAM"));
        }
        Ok(Machine {
            vcpu,
            vm,
            pci,
            ram_size,
            pages,
        })
    }
}

fn msr_entries(bytes: &[u8]) -> Result<Vec<kvm_msr_entry>, VmStateError> {
    let size = std::mem::size_of::<kvm_msr_entry>();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size > MSRS.len() {
        return Err(VmStateError::Format("MSRs"));
    }
    bytes
        .chunks_exact(size)
        .map(|e| kvm_msr_entry::read_from_bytes(e).map_err(|_| VmStateError::Format("MSRs")))
        .collect()
}

/// Length-prefixed fields (u32, little-endian).
struct Writer(Vec<u8>);

impl Writer {
    fn put(&mut self, bytes: &[u8]) {
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn next(&mut self, what: &'static str) -> Result<&'a [u8], VmStateError> {
        let (len, rest) = self
            .0
            .split_first_chunk::<4>()
            .ok_or(VmStateError::Format(what))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(VmStateError::Format(what));
        }
        let (field, rest) = rest.split_at(len);
        self.0 = rest;
        Ok(field)
    }

    /// A field that must be exactly one `T`.
    fn get<T: FromBytes + Immutable>(&mut self, what: &'static str) -> Result<T, VmStateError> {
        T::read_from_bytes(self.next(what)?).map_err(|_| VmStateError::Format(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        let regs = kvm_regs {
            rip: 0x10_0000,
            ..Default::default()
        };
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        Machine {
            vcpu: VcpuState {
                regs,
                sregs: kvm_sregs::default(),
                xsave: kvm_xsave::default(),
                xcrs: kvm_xcrs::default(),
                debugregs: kvm_debugregs::default(),
                msrs: vec![kvm_msr_entry {
                    index: 0x10,
                    data: 12345,
                    ..Default::default()
                }],
                lapic,
                events: kvm_vcpu_events::default(),
                mp_state: kvm_mp_state::default(),
            },
            vm: VmState {
                irqchips: CHIPS.map(|chip_id| kvm_irqchip {
                    chip_id,
                    ..Default::default()
                }),
                clock: kvm_clock_data::default(),
            },
            pci: vec![(0, [1; 256]), (1, [2; 256])],
            ram_size: 16 * PAGE as u64,
            pages: vec![(3, vec![9; PAGE])],
        }
    }

    #[test]
    fn only_pages_with_data_are_saved() {
        let path = std::env::temp_dir().join(format!("kvm-userdev-ram-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(64 * PAGE as u64).unwrap();
        file.write_all_at(&[5; 10], 3 * PAGE as u64 + 100).unwrap();
        file.write_all_at(&[0; PAGE], 9 * PAGE as u64).unwrap();
        file.write_all_at(&[1], 64 * PAGE as u64 - 1).unwrap();
        let pages = Machine::save_pages(&file, 64 * PAGE as u64).unwrap();
        let indices: Vec<u32> = pages.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [3, 63]);
        assert_eq!(pages[0].1[100..110], [5; 10]);
    }

    #[test]
    fn round_trip() {
        let bytes = machine().encode();
        let back = Machine::decode(&bytes).unwrap();
        assert_eq!(back.vcpu.regs.rip, 0x10_0000);
        assert_eq!(back.vcpu.msrs[0].data, 12345);
        assert_eq!(back.pci.len(), 2);
        assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn truncated_or_mangled_snapshots_are_refused() {
        let good = machine().encode();
        for len in (0..good.len()).step_by(7) {
            assert!(Machine::decode(&good[..len]).is_err(), "{len} bytes");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(Machine::decode(&longer).is_err());
        // The page index, last but one field: beyond RAM.
        let mut beyond = good.clone();
        let at = good.len() - PAGE - 4 - 4;
        beyond[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
        assert!(Machine::decode(&beyond).is_err());
        // The registers' length.
        let mut short = good;
        short[0] -= 1;
        assert!(Machine::decode(&short).is_err());
    }
}
