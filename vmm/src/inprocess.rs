//! A device model inside the VMM: the classic path, where every access to
//! BAR0 exits to the vCPU thread (KVM_EXIT_MMIO) and is served there. For
//! comparison with the user device; nothing is sandboxed here.

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use emulator::model::{DeviceModel, Env};

use crate::device::{eventfd, kvm_err, Console, DeviceError, Wiring};

pub struct InProcessDevice {
    model: Box<dyn DeviceModel>,
    world: World,
}

/// The model's surroundings, apart from the VM fd that each access lends.
struct World {
    memory: GuestMemoryMmap,
    /// Registered as an irqfd for the MSI route (a PCI device's).
    msi: Option<EventFd>,
    msi_enabled: bool,
    /// The interrupt line, driven with KVM_IRQ_LINE: a PCI device's INTx is
    /// level-triggered, and needs no resampling when the VMM itself knows
    /// the level; an ISA device's line is edge-triggered, pulsed as it
    /// rises.
    line_gsi: u32,
    edge: bool,
    line_high: bool,
    /// Where the device's console output goes, and its stream offset.
    console: Option<(std::fs::File, u64)>,
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
        wiring: Wiring,
        console: Option<Console>,
    ) -> Result<Self, DeviceError> {
        let (msi, line_gsi, edge) = match wiring {
            Wiring::Pci { intx_gsi, msi_gsi } => {
                let msi = eventfd()?;
                vm.register_irqfd(&msi, msi_gsi)
                    .map_err(kvm_err("KVM_IRQFD"))?;
                (Some(msi), intx_gsi, false)
            }
            Wiring::Isa { gsi } => (None, gsi, true),
        };
        // Console input would need a thread of its own feeding the model;
        // the in-process variant serves output only (the benchmark's case).
        let console = console.map(|c| (std::fs::File::from(c.output), 0));
        Ok(InProcessDevice {
            model,
            world: World {
                memory,
                msi,
                msi_enabled: false,
                line_gsi,
                edge,
                line_high: false,
                console,
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
    fn set_line(&mut self, high: bool) {
        if self.vm.set_irq_line(self.world.line_gsi, high).is_err() {
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
        match &self.world.msi {
            Some(msi) if self.world.msi_enabled => {
                if msi.write(1).is_err() {
                    self.world.irq_errors += 1;
                }
            }
            _ if self.world.edge => {
                if !self.world.line_high {
                    self.world.line_high = true;
                    self.set_line(true);
                    self.set_line(false);
                }
            }
            _ => {
                self.world.line_high = true;
                self.set_line(true);
            }
        }
    }

    fn lower_irq(&mut self) {
        if self.world.line_high {
            self.world.line_high = false;
            if !self.world.edge {
                self.set_line(false);
            }
        }
    }

    fn console_out(&mut self, bytes: &[u8]) {
        // A closed stdout loses the output, and nothing else.
        if let Some((out, end)) = &mut self.world.console {
            emulator::console::send(out, *end, bytes);
            *end += bytes.len() as u64;
        }
    }

    /// No shadow image: every load exits and reaches the model.
    fn publish(&mut self, _offset: u64, _len: u8, _value: u64) {}
}
