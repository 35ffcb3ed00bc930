use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where KVM may put the real-mode TSS on Intel hosts without unrestricted
/// guest support; three pages just below the 4 GiB BIOS area, far from RAM.
const TSS_ADDR: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    #[error("loading the code: {0}")]
    Load(#[source] vm_memory::GuestMemoryError),
    #[error("payload of {len} bytes at {addr:#x} does not fit in {mem_size:#x} bytes of memory")]
    PayloadTooBig {
        addr: u64,
        len: usize,
        mem_size: usize,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// A one-vCPU guest in 16-bit real mode.
///
/// Memory is a single slot at guest physical address 0; every address above
/// it is unbacked, so guest accesses there exit to userspace as MMIO unless
/// something in the kernel (an ioeventfd, a user device) claims them.
pub struct RealModeVm {
    // The fds are declared before the memory so that they are dropped first:
    // KVM must let go of the slot before its host mapping disappears.
    vcpu: VcpuFd,
    vm: VmFd,
    memory: GuestMemoryMmap<()>,
}

impl RealModeVm {
    /// Creates the VM with `mem_size` bytes of RAM, copies `code` to
    /// `load_addr` and points CS:IP at it with all segments at 0 and the
    /// stack at the top of memory (which must then stay below 64 KiB).
    pub fn new(mem_size: usize, code: &[u8], load_addr: u64) -> Result<Self, Error> {
        if load_addr as usize + code.len() > mem_size || load_addr > 0xffff {
            return Err(Error::PayloadTooBig {
                addr: load_addr,
                len: code.len(),
                mem_size,
            });
        }
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;

        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(Error::Memory)?;
        let region = memory
            .find_region(GuestAddress(0))
            .expect("the range just created");
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping is owned by `memory`, which lives as long as the
        // VM fd (see the field order of `RealModeVm`), and is not handed out
        // as a Rust reference that KVM's writes could alias.
        unsafe { vm.set_user_memory_region(slot) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        memory
            .write_slice(code, GuestAddress(load_addr))
            .map_err(Error::Load)?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = load_addr;
        regs.rsp = mem_size.min(0x1_0000) as u64 - 2;
        regs.rflags = 2; // bit 1 is reserved and must be set
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

        Ok(RealModeVm { vcpu, vm, memory })
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    pub fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }
}
