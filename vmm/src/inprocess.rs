//! A device model inside the VMM: the classic path, where every access to
//! BAR0 exits to the vCPU thread (KVM_EXIT_MMIO) and is served there. For
//! comparison with the user device; nothing is sandboxed here.

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use emulator::model::{DeviceModel, Env};

use crate::device::{eventfd, kvm_err, DeviceError};

pub struct InProcessDevice {
    model: Box<dyn DeviceModel>,
    world: World,
}

/// The model's surroundings, apart from the VM fd that each access lends.
struct World {
    memory: GuestMemoryMmap,
    /// Registered as an irqfd for the MSI route.
    msi: EventFd,
    msi_enabled: bool,
    /// INTx is driven with KVM_IRQ_LINE: level-triggered, no resampling
    /// needed when the VMM itself knows the level.
    intx_gsi: u32,
    intx_high: bool,
    irq_errors: u64,
}

struct InProcessEnv<'a> {
    world: &'a mut World,
    vm: &'a VmFd,
}

impl InProcessDevice {
    pub fn new(
        vm: &VmFd,
        model: Box<dyn DeviceModel>,
        memory: GuestMemoryMmap,
        intx_gsi: u32,
        msi_gsi: u32,
    ) -> Result<Self, DeviceError> {
        let msi = eventfd()?;
        vm.register_irqfd(&msi, msi_gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(InProcessDevice {
            model,
            world: World {
                memory,
                msi,
                msi_enabled: false,
                intx_gsi,
                intx_high: false,
                irq_errors: 0,
            },
        })
    }

    pub fn load(&mut self, vm: &VmFd, offset: u64, len: u8) -> u64 {
        let mut env = InProcessEnv {
            world: &mut self.world,
            vm,
        };
        self.model.load(&mut env, offset, len)
    }

    pub fn store(&mut self, vm: &VmFd, offset: u64, len: u8, data: u64) {
        let mut env = InProcessEnv {
            world: &mut self.world,
            vm,
        };
        self.model.store(&mut env, offset, len, data)
    }

    pub fn set_msi_enabled(&mut self, on: bool) {
        self.world.msi_enabled = on;
    }

    /// Interrupt triggers that failed.
    pub fn irq_errors(&self) -> u64 {
        self.world.irq_errors
    }
}

impl InProcessEnv<'_> {
    fn set_intx(&mut self, high: bool) {
        self.world.intx_high = high;
        if self.vm.set_irq_line(self.world.intx_gsi, high).is_err() {
            self.world.irq_errors += 1;
        }
    }
}

impl Env for InProcessEnv<'_> {
    fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool {
        self.world
            .memory
            .read_slice(buf, GuestAddress(addr))
            .is_ok()
    }

    fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool {
        self.world
            .memory
            .write_slice(buf, GuestAddress(addr))
            .is_ok()
    }

    fn raise_irq(&mut self) {
        if self.world.msi_enabled {
            if self.world.msi.write(1).is_err() {
                self.world.irq_errors += 1;
            }
        } else {
            self.set_intx(true);
        }
    }

    fn lower_irq(&mut self) {
        if self.world.intx_high {
            self.set_intx(false);
        }
    }

    /// No shadow image: every load exits and reaches the model.
    fn publish(&mut self, _offset: u64, _len: u8, _value: u64) {}
}
