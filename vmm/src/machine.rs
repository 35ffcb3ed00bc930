//! The VM: RAM, the in-kernel irqchip, one vCPU, PCI bus 0 with one device
//! per entry of the configuration, and the vCPU loop. With user devices
//! (the normal case) that loop only sees the slow path (PCI configuration,
//! the debug ports, stray MMIO); the classic paths kept for comparison,
//! a model inside the VMM or accesses forwarded over a socket, are served
//! from it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use userdev::Op;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::device::{DeviceError, EmulatedDevice, EmulatorSpec};
use crate::inprocess::InProcessDevice;
use crate::memory::Ram;
use crate::pci::{self, Function};
use crate::{boot, irq};
use emulator::handoff::Transport;

/// Console: bytes written to this port go to stdout (QEMU's debugcon).
pub const DEBUGCON_PORT: u16 = 0xe9;
/// Exit: the value written is the VMM's exit status (QEMU's isa-debug-exit
/// port; QEMU exits with `value << 1 | 1` instead).
pub const EXIT_PORT: u16 = 0x501;
/// Control (this VMM only): `(command << 8) | device index`; command 1
/// kills that device's emulator and returns once it has ended.
pub const CONTROL_PORT: u16 = 0x502;
const CONTROL_KILL: u32 = 1;

#[derive(Debug, Clone)]
pub struct Config {
    pub payload: PathBuf,
    pub cmdline: String,
    pub ram_mib: u64,
    /// One device per entry.
    pub devices: Vec<EmulatorSpec>,
    pub serve: Serve,
    /// An MMIO address where a store is absorbed by an ioeventfd: the
    /// floor for a store that needs no reply.
    pub doorbell: Option<u64>,
    pub timeout: Option<std::time::Duration>,
}

/// Who serves the devices' BAR0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Serve {
    /// A user device per device, served by a sandboxed emulator process.
    User,
    /// The device model in the VMM, on KVM_EXIT_MMIO.
    InProcess,
    /// KVM_EXIT_MMIO forwarded to the emulator process over a socket.
    Socket,
}

impl Serve {
    /// How an emulator gets the accesses (the in-process model needs none).
    pub fn transport(self) -> Transport {
        match self {
            Serve::Socket => Transport::Socket,
            Serve::User | Serve::InProcess => Transport::Ring,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory: {0}")]
    Memory(#[source] std::io::Error),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("device {index}: {source}")]
    Device {
        index: usize,
        #[source]
        source: DeviceError,
    },
    #[error("device {index}: no device model called {model:?}")]
    UnknownModel { index: usize, model: String },
    #[error("this kernel has no KVM_DEV_TYPE_USER (boot the patched kernel: cargo xtask vm)")]
    NoUserDevice,
    #[error("the guest {0}")]
    Guest(String),
}

/// Names the KVM call that failed.
fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { op, source }
}

/// What serves a device.
pub enum Server {
    /// An emulator process, through a user device or a socket.
    Emulator(Arc<EmulatedDevice>),
    InProcess(InProcessDevice),
}

/// A device and where it sits on the bus.
pub struct Slot {
    pub name: String,
    pub server: Server,
    pub pci_device: u8,
    bar0: Option<u64>,
    bar0_size: u64,
    msi: Option<pci::MsiMessage>,
    msi_gsi: u32,
}

pub struct Machine {
    // Fields drop in declaration order: the vCPU, the devices and the VM go
    // before the memory their memslots and emulators point into.
    vcpu: VcpuFd,
    bus: pci::Bus,
    pub slots: Vec<Slot>,
    _doorbell: Option<EventFd>,
    vm: VmFd,
    _kvm: Kvm,
    _ram: Ram,
}

impl Machine {
    pub fn new(config: &Config) -> Result<Self, MachineError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if config.serve == Serve::User && !userdev::UserDevice::probe(&vm) {
            return Err(MachineError::NoUserDevice);
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let ram = Ram::new(&vm, config.ram_mib << 20).map_err(MachineError::Memory)?;
        let entry = boot::load(&ram.memory, &config.payload, &config.cmdline)?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        boot::setup_vcpu(&vcpu, entry)?;

        let mut bus = pci::Bus::new();
        bus.add(Function::host_bridge());
        let mut slots = Vec::new();
        for (index, spec) in config.devices.iter().enumerate() {
            slots.push(add_device(&vm, &ram, &mut bus, config.serve, index, spec)?);
        }
        let doorbell = match config.doorbell {
            Some(addr) => Some(doorbell(&vm, addr)?),
            None => None,
        };
        irq::set_routing(&vm, &[]).map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
        Ok(Machine {
            vcpu,
            bus,
            slots,
            _doorbell: doorbell,
            vm,
            _kvm: kvm,
            _ram: ram,
        })
    }

    /// Runs the guest until it writes the exit port; returns that value.
    pub fn run(&mut self) -> Result<u32, MachineError> {
        let mut out = std::io::stdout().lock();
        loop {
            match self.vcpu.run().map_err(kvm_err("KVM_RUN"))? {
                VcpuExit::IoOut(port, data) => match port {
                    DEBUGCON_PORT => {
                        let _ = out.write_all(data);
                        if data.contains(&b'\n') {
                            let _ = out.flush();
                        }
                    }
                    EXIT_PORT => {
                        let _ = out.flush();
                        return Ok(pci::le(data));
                    }
                    CONTROL_PORT => {
                        let value = pci::le(data);
                        self.control(value)
                    }
                    pci::CONFIG_ADDRESS..=0xcff => {
                        let data = data.to_vec();
                        if let Some(dev) = self.bus.write_target(port, data.len()) {
                            self.drain(dev);
                        }
                        if let Some(dev) = self.bus.io_write(port, &data) {
                            self.config_changed(dev);
                        }
                    }
                    _ => {}
                },
                VcpuExit::IoIn(port, data) => match port {
                    pci::CONFIG_ADDRESS..=0xcff => self.bus.io_read(port, data),
                    _ => data.fill(0xff),
                },
                VcpuExit::MmioRead(addr, data) => {
                    let value = mmio(&mut self.slots, &self.vm, addr, data.len(), None);
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let value = pci::le64(data);
                    mmio(&mut self.slots, &self.vm, addr, data.len(), Some(value));
                }
                VcpuExit::Hlt => {
                    return Err(MachineError::Guest("halted with interrupts off".into()))
                }
                VcpuExit::Shutdown => {
                    let state = self.vcpu_state();
                    return Err(MachineError::Guest(format!(
                        "shut down (triple fault?); {state}"
                    )));
                }
                other => {
                    return Err(MachineError::Guest(format!(
                        "made an unexpected exit: {other:?}"
                    )))
                }
            }
        }
    }

    /// The registers that tell where a guest went wrong.
    fn vcpu_state(&self) -> String {
        match (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x} cs {:#x}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit, s.cs.selector
            ),
            _ => "registers unreadable".into(),
        }
    }

    fn control(&self, value: u32) {
        let (command, index) = (value >> 8, (value & 0xff) as usize);
        let slot = self.slots.get(index);
        match (command, slot.map(|s| &s.server)) {
            (CONTROL_KILL, Some(Server::Emulator(dev))) => {
                eprintln!("vmm: guest asks to kill the emulator of {}", dev.name);
                if let Err(e) = dev.kill_emulator() {
                    eprintln!("vmm: {}: {e}", dev.name);
                }
            }
            _ => eprintln!("vmm: unknown control request {value:#x}"),
        }
    }

    /// The guest is about to write device `dev`'s configuration space:
    /// first let its emulator consume the guest's earlier stores to it, so
    /// that the write (decoding turned off, BAR0 moved) does not pass them.
    fn drain(&self, dev: u8) {
        let slot = self.slots.iter().find(|s| s.pci_device == dev);
        if let Some(Slot {
            server: Server::Emulator(d),
            ..
        }) = slot
        {
            d.drain();
        }
    }

    /// The guest wrote device `dev`'s configuration space: follow BAR0 and
    /// MSI.
    fn config_changed(&mut self, dev: u8) {
        let Some(i) = self.slots.iter().position(|s| s.pci_device == dev) else {
            return;
        };
        let function = self.bus.function(dev).expect("slot on the bus");
        let (bar0, size, msi) = (function.bar0(), function.bar0_size(), function.msi());
        let slot = &mut self.slots[i];
        if bar0 != slot.bar0 {
            let placed = match &slot.server {
                Server::Emulator(dev) => dev.set_bar0(bar0, size),
                Server::InProcess(_) => Ok(()),
            };
            match placed {
                Ok(()) => slot.bar0 = bar0,
                Err(e) => eprintln!("vmm: {}: BAR0 at {bar0:x?}: {e}", slot.name),
            }
        }
        if msi != slot.msi {
            let was_enabled = slot.msi.is_some();
            slot.msi = msi;
            let routes: Vec<_> = self
                .slots
                .iter()
                .filter_map(|s| s.msi.map(|m| (s.msi_gsi, m)))
                .collect();
            if let Err(e) = irq::set_routing(&self.vm, &routes) {
                eprintln!("vmm: GSI routing: {e}");
            }
            if was_enabled != msi.is_some() {
                match &mut self.slots[i].server {
                    Server::Emulator(dev) => dev.set_msi_enabled(msi.is_some()),
                    Server::InProcess(dev) => dev.set_msi_enabled(msi.is_some()),
                }
            }
        }
    }
}

/// An MMIO access that exited to the VMM: a store if `store` holds its
/// data, else a load, whose value is returned. BAR0 of a device served by
/// exits goes to its model or emulator; anything else decodes nowhere (an
/// old BAR address, say) and reads all-ones, as an access that no PCI
/// device claims does.
fn mmio(slots: &mut [Slot], vm: &VmFd, addr: u64, len: usize, store: Option<u64>) -> u64 {
    let hit = slots.iter_mut().find_map(|s| {
        let base = s.bar0?;
        (base..base + s.bar0_size)
            .contains(&addr)
            .then(|| (addr - base, &mut s.server))
    });
    let len = len as u8;
    match (hit, store) {
        (Some((offset, Server::InProcess(dev))), None) => dev.load(vm, offset, len),
        (Some((offset, Server::InProcess(dev))), Some(data)) => {
            dev.store(vm, offset, len, data);
            0
        }
        (Some((offset, Server::Emulator(dev))), None) => dev.forward(Op::Load, offset, len, 0),
        (Some((offset, Server::Emulator(dev))), Some(data)) => {
            dev.forward(Op::Store, offset, len, data)
        }
        (None, _) => !0,
    }
}

/// Device `index` of the configuration, on the bus, with what serves it.
fn add_device(
    vm: &VmFd,
    ram: &Ram,
    bus: &mut pci::Bus,
    serve: Serve,
    index: usize,
    spec: &EmulatorSpec,
) -> Result<Slot, MachineError> {
    let model =
        emulator::model::by_name(&spec.model).ok_or_else(|| MachineError::UnknownModel {
            index,
            model: spec.model.clone(),
        })?;
    let identity = model.identity();
    let intx_gsi = irq::INTX_BASE + index as u32;
    let msi_gsi = irq::MSI_BASE + index as u32;
    let pci_device = bus
        .add(Function::endpoint(&identity, intx_gsi as u8))
        .expect("fewer devices than slots");
    let name = format!("{} at 00:{pci_device:02x}.0", spec.model);
    let device_error = |source| MachineError::Device { index, source };
    let server = match serve {
        Serve::User | Serve::Socket => {
            let dev = EmulatedDevice::new(
                vm,
                name.clone(),
                spec.clone(),
                ram.file(),
                ram.layout(),
                intx_gsi,
                msi_gsi,
            )
            .map_err(device_error)?;
            dev.start().map_err(device_error)?;
            Server::Emulator(dev)
        }
        Serve::InProcess => {
            let dev = InProcessDevice::new(vm, model, ram.memory.clone(), intx_gsi, msi_gsi)
                .map_err(device_error)?;
            Server::InProcess(dev)
        }
    };
    Ok(Slot {
        name,
        server,
        pci_device,
        bar0: None,
        bar0_size: identity.bar0_size,
        msi: None,
        msi_gsi,
    })
}

/// An ioeventfd that absorbs stores to `addr`.
fn doorbell(vm: &VmFd, addr: u64) -> Result<EventFd, MachineError> {
    let fd = EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(|source| MachineError::Io {
        op: "eventfd",
        source,
    })?;
    vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
    Ok(fd)
}
