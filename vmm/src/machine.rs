//! The VM: RAM, the in-kernel irqchip and PIT, one or more vCPUs, PCI bus 0
//! with a function per PCI device of the configuration, ISA devices at
//! their fixed ports, and the vCPU loops. With user devices (the normal
//! case) those loops only see the slow path (PCI configuration, the debug
//! ports, stray MMIO); the classic paths kept for comparison, a model
//! inside the VMM or accesses forwarded over a socket, are served from
//! them.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use userdev::{Op, Range};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::device::{DeviceError, EmulatedDevice, EmulatorSpec, Wiring};
use crate::inprocess::InProcessDevice;
use crate::linux::{self, Linux};
use crate::memory::Ram;
use crate::mptable::{self, PciIrq};
use crate::pci::{self, Function};
use crate::rtc;
use crate::snapshot::Snapshot;
use crate::vmstate::{self, VcpuState, VmState};
use crate::{boot, console, irq};
use emulator::handoff::Transport;
use emulator::model::Placement;

/// Console: bytes written to this port go to stdout (QEMU's debugcon).
pub const DEBUGCON_PORT: u16 = 0xe9;
/// Exit: the value written is the VMM's exit status (QEMU's isa-debug-exit
/// port; QEMU exits with `value << 1 | 1` instead).
pub const EXIT_PORT: u16 = 0x501;
/// Control (this VMM only): `(command << 8) | device index`; command 1
/// kills that device's emulator and returns once it has ended, command 2
/// kills it after a random delay ([`Config::kill_delay`]) and returns once
/// that kill is armed ([`EmulatedDevice::kill_emulator_later`]), command 3
/// returns once no such kill is pending and an emulator serves, command 4
/// saves the device's state to [`Config::snapshot`] (and the VM's own, in a
/// PVH VM with one vCPU) and returns once it is written, command 5 puts the device back into the state saved there and
/// returns once an emulator serves it from that state.
pub const CONTROL_PORT: u16 = 0x502;
const CONTROL_KILL: u32 = 1;
const CONTROL_KILL_LATER: u32 = 2;
const CONTROL_WAIT_FOR_KILLS: u32 = 3;
const CONTROL_SAVE_STATE: u32 = 4;
const CONTROL_RESTORE_STATE: u32 = 5;
/// The i8042 keyboard controller's command port: command 0xfe pulses the
/// reset line, the way Linux reboots a PC without ACPI.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Where the VMM places PCI devices' BAR0 before a Linux guest starts, as
/// firmware would: the guest keeps what it finds.
const PCI_MMIO_BASE: u64 = 0xe000_0000;

/// What the machine runs.
#[derive(Debug, Clone)]
pub enum Boot {
    /// A PVH ELF payload (the project's freestanding guests).
    Pvh { payload: PathBuf },
    /// A Linux bzImage, with an initramfs.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub boot: Boot,
    pub cmdline: String,
    pub ram_mib: u64,
    /// vCPUs; more than one needs [`Boot::Linux`] (the MP table).
    pub cpus: u8,
    /// One device per entry.
    pub devices: Vec<EmulatorSpec>,
    pub serve: Serve,
    /// An MMIO address where a store is absorbed by an ioeventfd: the
    /// floor for a store that needs no reply.
    pub doorbell: Option<u64>,
    /// An MMIO address where a store signals an ioeventfd that another
    /// process sleeps on: the floor for a store that wakes its consumer.
    pub woken_doorbell: Option<u64>,
    pub timeout: Option<std::time::Duration>,
    /// The longest delay of a kill the guest asks for with command 2, and
    /// the seed of the delays: the same seed gives the same delays.
    pub kill_delay: std::time::Duration,
    pub kill_seed: u64,
    /// Where command 4 saves a snapshot, and command 5 reads it.
    pub snapshot: Option<PathBuf>,
    /// A snapshot to start from: the VM's state if it holds one, and the
    /// state of the device it names.
    pub restore: Option<Snapshot>,
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
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error("device {index}: {source}")]
    Device {
        index: usize,
        #[source]
        source: DeviceError,
    },
    #[error("device {index}: no device model called {model:?}")]
    UnknownModel { index: usize, model: String },
    #[error("device {index}: only one device can have the console")]
    SecondConsole { index: usize },
    #[error("the snapshot is of device {index}, a {model}, which this VM does not have")]
    SnapshotDevice { index: usize, model: String },
    #[error("restoring the VM: {0}")]
    VmState(#[from] vmstate::VmStateError),
    #[error("{0} vCPUs: a VM needs at least one")]
    Cpus(u8),
    #[error("this kernel has no KVM_DEV_TYPE_USER (boot the patched kernel: cargo xtask vm)")]
    NoUserDevice,
    #[error("the guest {0}")]
    Guest(String),
    #[error("the guest did not finish within {}s", .0.as_secs())]
    Timeout(Duration),
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

/// Where a device decodes guest accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    Mmio { base: u64, len: u64 },
    Pio { base: u16, len: u16 },
}

impl Window {
    fn range(self) -> Range {
        match self {
            Window::Mmio { base, len } => Range::mmio(base, len),
            Window::Pio { base, len } => Range::pio(base, len.into()),
        }
    }

    /// The offset of a `bus` access at `addr` in this window, if it hits.
    fn offset(self, pio: bool, addr: u64) -> Option<u64> {
        let (base, len, is_pio) = match self {
            Window::Mmio { base, len } => (base, len, false),
            Window::Pio { base, len } => (base.into(), len.into(), true),
        };
        (is_pio == pio && (base..base + len).contains(&addr)).then(|| addr - base)
    }
}

/// A device and where it sits.
pub struct Slot {
    pub name: String,
    pub server: Server,
    /// Its device number on PCI bus 0 (none for an ISA device).
    pub pci_device: Option<u8>,
    /// Where it decodes now: an ISA device's ports, a PCI function's BAR0
    /// once placed and enabled.
    window: Option<Window>,
    bar0_size: u64,
    /// A PCI function's INTA: the GSI (an I/O APIC pin) it is wired to.
    intx_gsi: Option<u32>,
    msi: Option<pci::MsiMessage>,
    msi_gsi: u32,
}

/// What every vCPU thread reaches: the bus and the devices.
pub struct Devices {
    bus: pci::Bus,
    pub slots: Vec<Slot>,
    rtc: rtc::Cmos,
}

/// The VM's parts that outlive the vCPU threads that use them. Fields drop
/// in declaration order: the devices and the VM go before the memory
/// their memslots and emulators point into.
struct Shared {
    devices: Mutex<Devices>,
    _doorbell: Option<EventFd>,
    _woken_doorbell: Option<EventFd>,
    /// The delays of delayed kills: the longest, and the generator's state.
    kill_delay: std::time::Duration,
    kill_rng: Mutex<u64>,
    snapshot: Option<PathBuf>,
    /// Whether a snapshot includes the VM's own state (vmstate.rs): a PVH
    /// VM with one vCPU.
    vm_snapshots: bool,
    vm: VmFd,
    _kvm: Kvm,
    ram: Ram,
}

pub struct Machine {
    /// Taken by [`Machine::run`], each into a thread of its own.
    vcpus: Vec<VcpuFd>,
    shared: Arc<Shared>,
}

/// How a vCPU thread ended.
type VcpuEnd = (usize, Result<u32, MachineError>);

impl Machine {
    pub fn new(config: &Config) -> Result<Self, MachineError> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        if config.serve == Serve::User && !userdev::UserDevice::probe(&vm) {
            return Err(MachineError::NoUserDevice);
        }
        let linux = matches!(config.boot, Boot::Linux { .. });
        if config.cpus == 0 {
            return Err(MachineError::Cpus(config.cpus));
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        if linux {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let ram_size = config.ram_mib << 20;
        let ram = Ram::new(&vm, ram_size).map_err(MachineError::Memory)?;

        let mut devices = Devices {
            bus: pci::Bus::new(),
            slots: Vec::new(),
            rtc: rtc::Cmos::default(),
        };
        devices.bus.add(Function::host_bridge());
        if let Some(s) = &config.restore {
            if config
                .devices
                .get(s.index)
                .is_none_or(|d| d.model != s.model)
            {
                return Err(MachineError::SnapshotDevice {
                    index: s.index,
                    model: s.model.clone(),
                });
            }
        }
        let mut console = None;
        for (index, spec) in config.devices.iter().enumerate() {
            let slot = add_device(
                &vm,
                &ram,
                &mut devices.bus,
                config.serve,
                index,
                spec,
                config.restore.as_ref().filter(|s| s.index == index),
                &mut console,
            )?;
            devices.slots.push(slot);
        }
        let woken_doorbell = match config.woken_doorbell {
            Some(addr) => {
                let fd = doorbell(&vm, addr, 0)?;
                spawn_consumer(&fd)?;
                Some(fd)
            }
            None => None,
        };
        let doorbell = match config.doorbell {
            Some(addr) => Some(doorbell(&vm, addr, EFD_NONBLOCK)?),
            None => None,
        };
        irq::set_routing(&vm, &[]).map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;

        let vcpus = create_vcpus(&kvm, &vm, config.cpus)?;
        let vm_snapshots = config.cpus == 1 && matches!(config.boot, Boot::Pvh { .. });
        let resumed = match config.restore.as_ref().filter(|s| !s.machine.is_empty()) {
            Some(_) if !vm_snapshots => {
                return Err(vmstate::VmStateError::Cpus(config.cpus.into()))?
            }
            Some(s) => Some(vmstate::Machine::decode(&s.machine)?),
            None => None,
        };
        match (&resumed, &config.boot) {
            (Some(saved), _) => resume(saved, &vm, &ram, &mut devices, &vcpus[0])?,
            (None, Boot::Pvh { payload }) => {
                let entry = boot::load(&ram.memory, payload, &config.cmdline)?;
                boot::setup_vcpu(&vcpus[0], entry)?;
            }
            (None, Boot::Linux { kernel, initrd }) => {
                let pci: Vec<PciIrq> = devices
                    .slots
                    .iter()
                    .filter_map(|s| {
                        Some(PciIrq {
                            device: s.pci_device?,
                            pin: s.intx_gsi? as u8,
                        })
                    })
                    .collect();
                mptable::write(&ram.memory, vcpus.len(), &pci)?;
                let entry = linux::load(
                    &ram.memory,
                    ram_size,
                    &Linux {
                        kernel,
                        initrd: initrd.as_deref(),
                        cmdline: &config.cmdline,
                    },
                )?;
                linux::setup_boot_cpu(&vcpus[0], entry)?;
                devices.place_bars(&vm);
            }
        }
        Ok(Machine {
            vcpus,
            shared: Arc::new(Shared {
                devices: Mutex::new(devices),
                _doorbell: doorbell,
                _woken_doorbell: woken_doorbell,
                kill_delay: config.kill_delay,
                // xorshift gets stuck at 0.
                kill_rng: Mutex::new(config.kill_seed | 1),
                snapshot: config.snapshot.clone(),
                vm_snapshots,
                vm,
                _kvm: kvm,
                ram,
            }),
        })
    }

    /// Waits until every emulator has consumed the accesses queued for
    /// it (each bounded by the device's timeout): when the guest ends, its
    /// last posted stores, the console's last bytes, are not lost.
    pub fn drain(&self) {
        for slot in &self.devices().slots {
            if let Server::Emulator(dev) = &slot.server {
                dev.drain();
            }
        }
    }

    /// The devices, for their counters.
    pub fn devices(&self) -> MutexGuard<'_, Devices> {
        self.shared.devices.lock().expect("devices lock")
    }

    /// Runs the guest until a vCPU writes the exit port (returns that
    /// value), a vCPU fails, or `timeout` passes. The other vCPU threads are
    /// left running: the caller ends the process.
    pub fn run(&mut self, timeout: Option<Duration>) -> Result<u32, MachineError> {
        let (tx, rx) = mpsc::channel::<VcpuEnd>();
        for (index, mut vcpu) in self.vcpus.drain(..).enumerate() {
            let shared = self.shared.clone();
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let end = shared.run_vcpu(&mut vcpu);
                    let _ = tx.send((index, end));
                    // Keep the vCPU (and its memory) until the process ends.
                    std::mem::forget(vcpu);
                })
                .map_err(|source| MachineError::Io {
                    op: "vCPU thread",
                    source,
                })?;
        }
        drop(tx);
        let end = match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => MachineError::Timeout(t),
                mpsc::RecvTimeoutError::Disconnected => {
                    MachineError::Guest("lost every vCPU".into())
                }
            })?,
            None => rx
                .recv()
                .map_err(|_| MachineError::Guest("lost every vCPU".into()))?,
        };
        match end {
            (_, Ok(status)) => Ok(status),
            (index, Err(e)) => Err(MachineError::Guest(format!("vCPU {index}: {e}"))),
        }
    }
}

/// Puts a VM's saved state into a new VM with the same devices, whose
/// vCPU then goes on where the saved one was.
fn resume(
    saved: &vmstate::Machine,
    vm: &VmFd,
    ram: &Ram,
    devices: &mut Devices,
    vcpu: &VcpuFd,
) -> Result<(), vmstate::VmStateError> {
    if saved.ram_size != ram.size() {
        return Err(vmstate::VmStateError::Ram(saved.ram_size));
    }
    saved.restore_pages(&ram.memory)?;
    for (dev, config) in &saved.pci {
        if !devices.bus.restore(*dev, config) {
            return Err(vmstate::VmStateError::Pci(*dev));
        }
        // BAR0's place and the MSI route follow.
        devices.config_changed(vm, *dev);
    }
    saved.vm.restore(vm)?;
    saved.vcpu.restore(vcpu)?;
    emulator::log!("vmm: the VM goes on from the snapshot");
    Ok(())
}

/// vCPUs 0..count, each with CPUID naming its APIC id. vCPU 0 is the boot
/// CPU; with the in-kernel LAPIC the others wait for INIT and SIPI.
fn create_vcpus(kvm: &Kvm, vm: &VmFd, count: u8) -> Result<Vec<VcpuFd>, MachineError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    (0..count)
        .map(|index| {
            let vcpu = vm
                .create_vcpu(index.into())
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&linux::cpuid_for(&cpuid, index, count))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            Ok(vcpu)
        })
        .collect()
}

impl Shared {
    fn devices(&self) -> MutexGuard<'_, Devices> {
        self.devices.lock().expect("devices lock")
    }

    /// One vCPU's loop, until the guest writes the exit port or fails.
    fn run_vcpu(&self, vcpu: &mut VcpuFd) -> Result<u32, MachineError> {
        loop {
            let exit = match vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => {
                    return Err(MachineError::Kvm {
                        op: "KVM_RUN",
                        source,
                    })
                }
            };
            let failure = match exit {
                VcpuExit::IoOut(I8042_COMMAND, [I8042_RESET]) => {
                    "reset itself (i8042 reset pulse)".to_string()
                }
                // Taken here, not in `control`: it needs the vCPU.
                VcpuExit::IoOut(CONTROL_PORT, data) if pci::le(data) >> 8 == CONTROL_SAVE_STATE => {
                    let index = (pci::le(data) & 0xff) as usize;
                    self.save_snapshot(vcpu, index);
                    continue;
                }
                VcpuExit::IoOut(port, data) => match self.io_out(port, data) {
                    Some(status) => return Ok(status),
                    None => continue,
                },
                VcpuExit::IoIn(port, data) => {
                    self.io_in(port, data);
                    continue;
                }
                VcpuExit::MmioRead(addr, data) => {
                    let value = self
                        .devices()
                        .access(&self.vm, false, addr, data.len(), None);
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                    continue;
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let value = pci::le64(data);
                    let len = data.len();
                    self.devices()
                        .access(&self.vm, false, addr, len, Some(value));
                    continue;
                }
                VcpuExit::Hlt => "halted with interrupts off".to_string(),
                VcpuExit::Shutdown => "shut down (triple fault, or a reset)".to_string(),
                other => format!("made an unexpected exit: {other:?}"),
            };
            // Only the exits that end the guest get here.
            return Err(MachineError::Guest(format!(
                "{failure}; {}",
                vcpu_state(vcpu)
            )));
        }
    }

    /// A port store; the exit status if it was the exit port's.
    fn io_out(&self, port: u16, data: &[u8]) -> Option<u32> {
        match port {
            DEBUGCON_PORT => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(data);
                if data.contains(&b'\n') {
                    let _ = out.flush();
                }
            }
            EXIT_PORT => {
                let _ = std::io::stdout().flush();
                return Some(pci::le(data));
            }
            CONTROL_PORT => self.control(pci::le(data)),
            rtc::INDEX_PORT | rtc::DATA_PORT => self.devices().rtc.write(port, data[0]),
            pci::CONFIG_ADDRESS..=0xcff => self.devices().config_write(&self.vm, port, data),
            _ => {
                let value = u64::from(pci::le(data));
                self.devices()
                    .access(&self.vm, true, port.into(), data.len(), Some(value));
            }
        }
        None
    }

    /// A port load.
    fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            rtc::INDEX_PORT | rtc::DATA_PORT => data.fill(self.devices().rtc.read(port)),
            pci::CONFIG_ADDRESS..=0xcff => self.devices().bus.io_read(port, data),
            _ => {
                let value = self
                    .devices()
                    .access(&self.vm, true, port.into(), data.len(), None);
                let n = data.len().min(8);
                data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
        }
    }

    /// The next of the seeded delays, as a fraction in [0, 1) (xorshift64).
    fn next_random_fraction(&self) -> f64 {
        let mut x = self.kill_rng.lock().expect("kill rng lock");
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn control(&self, value: u32) {
        let (command, index) = (value >> 8, (value & 0xff) as usize);
        // Not under the devices lock: killing waits for the emulator's end.
        let device = match self.devices().slots.get(index).map(|s| &s.server) {
            Some(Server::Emulator(dev)) => Some(dev.clone()),
            _ => None,
        };
        match (command, device) {
            (CONTROL_KILL, Some(dev)) => {
                emulator::log!("vmm: guest asks to kill the emulator of {}", dev.name);
                if let Err(e) = dev.kill_emulator() {
                    emulator::log!("vmm: {}: {e}", dev.name);
                }
            }
            (CONTROL_KILL_LATER, Some(dev)) => {
                let delay = self.kill_delay.mul_f64(self.next_random_fraction());
                emulator::log!(
                    "vmm: guest asks to kill the emulator of {} in {} us",
                    dev.name,
                    delay.as_micros()
                );
                dev.kill_emulator_later(delay);
            }
            (CONTROL_WAIT_FOR_KILLS, Some(dev)) => dev.wait_for_kills(),
            (CONTROL_RESTORE_STATE, Some(dev)) => self.restore_state(index, &dev),
            _ => emulator::log!("vmm: unknown control request {value:#x}"),
        }
    }

    /// Saves device `index`'s state to the snapshot file, and with it the
    /// VM's own if it has one vCPU, `vcpu`, which has stopped at the
    /// guest's request; a failure is logged (the guest learns of it from
    /// the file's absence).
    fn save_snapshot(&self, vcpu: &mut VcpuFd, index: usize) {
        let device = match self.devices().slots.get(index).map(|s| &s.server) {
            Some(Server::Emulator(dev)) => dev.clone(),
            _ => {
                emulator::log!("vmm: a snapshot of device {index}, which no emulator serves");
                return;
            }
        };
        let Some(path) = &self.snapshot else {
            emulator::log!("vmm: the guest asks for a snapshot, and there is no --snapshot file");
            return;
        };
        let saved = (|| -> Result<Snapshot, String> {
            let state = device.save_state().map_err(|e| e.to_string())?;
            let machine = if self.vm_snapshots {
                self.save_machine(vcpu).map_err(|e| e.to_string())?
            } else {
                Vec::new()
            };
            let s = Snapshot {
                index,
                model: device.model().to_string(),
                state,
                machine,
            };
            s.write(path).map_err(|e| e.to_string())?;
            Ok(s)
        })();
        match saved {
            Ok(s) => emulator::log!(
                "vmm: {}: state saved to {} ({} bytes{})",
                device.name,
                path.display(),
                s.state.len(),
                if s.machine.is_empty() {
                    ", the device's only: the VM has more than one vCPU or is not a PVH payload's"
                        .to_string()
                } else {
                    format!(", and {} bytes of the VM's", s.machine.len())
                }
            ),
            Err(e) => emulator::log!("vmm: {}: saving the state: {e}", device.name),
        }
    }

    /// The VM's own state, with `vcpu` (the only one) past the instruction
    /// that asked.
    fn save_machine(&self, vcpu: &mut VcpuFd) -> Result<Vec<u8>, vmstate::VmStateError> {
        vmstate::complete_exit(vcpu)?;
        let machine = vmstate::Machine {
            vcpu: VcpuState::save(vcpu)?,
            vm: VmState::save(&self.vm)?,
            pci: self.devices().bus.save(),
            ram_size: self.ram.size(),
            pages: vmstate::Machine::save_pages(self.ram.memory_file(), self.ram.size())?,
        };
        Ok(machine.encode())
    }

    /// Puts device `index` back into the state of the snapshot file; a
    /// failure is logged (the guest learns of it from the device).
    fn restore_state(&self, index: usize, dev: &EmulatedDevice) {
        let restored = (|| {
            let path = self
                .snapshot
                .as_ref()
                .ok_or("there is no --snapshot file")?;
            let s = Snapshot::read(path).map_err(|e| e.to_string())?;
            if (s.index, s.model.as_str()) != (index, dev.model()) {
                return Err(format!(
                    "the snapshot is of device {}, a {}",
                    s.index, s.model
                ));
            }
            dev.restore_in_place(&s.state).map_err(|e| e.to_string())
        })();
        match restored {
            Ok(()) => emulator::log!("vmm: {}: restored in place from the snapshot", dev.name),
            Err(e) => emulator::log!("vmm: {}: restoring the state: {e}", dev.name),
        }
    }
}

/// The registers that tell where a guest went wrong.
fn vcpu_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x} cs {:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit, s.cs.selector
        ),
        _ => "registers unreadable".into(),
    }
}

impl Devices {
    /// A write to the configuration mechanism's ports.
    fn config_write(&mut self, vm: &VmFd, port: u16, data: &[u8]) {
        if let Some(dev) = self.bus.write_target(port, data.len()) {
            self.drain(dev);
        }
        if let Some(dev) = self.bus.io_write(port, data) {
            self.config_changed(vm, dev);
        }
    }

    /// Gives every PCI function's BAR0 an address and turns memory decoding
    /// on, as firmware does before it starts an operating system.
    fn place_bars(&mut self, vm: &VmFd) {
        let mut next = PCI_MMIO_BASE;
        let functions: Vec<(u8, u64)> = self
            .slots
            .iter()
            .filter_map(|s| Some((s.pci_device?, s.bar0_size)))
            .collect();
        for (dev, size) in functions {
            next = next.next_multiple_of(size);
            let select = 0x8000_0000u32 | u32::from(dev) << 11;
            for (offset, value) in [(0x10, next as u32), (0x04, u32::from(pci::COMMAND_MEMORY))] {
                let address = select | offset;
                self.config_write(vm, pci::CONFIG_ADDRESS, &address.to_le_bytes());
                self.config_write(vm, pci::CONFIG_DATA, &value.to_le_bytes());
            }
            next += size;
        }
    }

    /// The guest is about to write device `dev`'s configuration space:
    /// first let its emulator consume the guest's earlier stores to it, so
    /// that the write (decoding turned off, BAR0 moved) does not pass them.
    fn drain(&self, dev: u8) {
        let slot = self.slots.iter().find(|s| s.pci_device == Some(dev));
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
    fn config_changed(&mut self, vm: &VmFd, dev: u8) {
        let Some(i) = self.slots.iter().position(|s| s.pci_device == Some(dev)) else {
            return;
        };
        let function = self.bus.function(dev).expect("slot on the bus");
        let (bar0, size, msi) = (function.bar0(), function.bar0_size(), function.msi());
        let window = bar0.map(|base| Window::Mmio { base, len: size });
        let slot = &mut self.slots[i];
        if window != slot.window {
            let placed = match &slot.server {
                Server::Emulator(dev) => dev.set_window(window.map(Window::range)),
                Server::InProcess(_) => Ok(()),
            };
            match placed {
                Ok(()) => slot.window = window,
                Err(e) => emulator::log!("vmm: {}: BAR0 at {bar0:x?}: {e}", slot.name),
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
            if let Err(e) = irq::set_routing(vm, &routes) {
                emulator::log!("vmm: GSI routing: {e}");
            }
            if was_enabled != msi.is_some() {
                match &mut self.slots[i].server {
                    Server::Emulator(dev) => dev.set_msi_enabled(msi.is_some()),
                    Server::InProcess(dev) => dev.set_msi_enabled(msi.is_some()),
                }
            }
        }
    }

    /// An access that exited to the VMM, on the port bus if `pio`: a store
    /// if `store` holds its data, else a load, whose value is returned. A
    /// device served by exits gets it from its model or emulator; anything
    /// else decodes nowhere (an old BAR address, a port nobody has) and
    /// reads all-ones, as an access that no device claims does.
    fn access(&mut self, vm: &VmFd, pio: bool, addr: u64, len: usize, store: Option<u64>) -> u64 {
        let hit = self.slots.iter_mut().find_map(|s| {
            let offset = s.window?.offset(pio, addr)?;
            Some((offset, &mut s.server))
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
}

/// Device `index` of the configuration, on PCI or at its ISA ports, with
/// what serves it, starting from the state `restore` if there is one. An
/// ISA device (a UART) gets the console, which only one may have.
#[allow(clippy::too_many_arguments)]
fn add_device(
    vm: &VmFd,
    ram: &Ram,
    bus: &mut pci::Bus,
    serve: Serve,
    index: usize,
    spec: &EmulatorSpec,
    restore: Option<&Snapshot>,
    console_taken: &mut Option<usize>,
) -> Result<Slot, MachineError> {
    let model =
        emulator::model::by_name(&spec.model).ok_or_else(|| MachineError::UnknownModel {
            index,
            model: spec.model.clone(),
        })?;
    let placement = model.placement();
    let msi_gsi = irq::MSI_BASE + index as u32;
    let (wiring, pci_device, window, bar0_size) = match &placement {
        Placement::Pci(identity) => {
            let intx_gsi = irq::INTX_BASE + index as u32;
            let dev = bus
                .add(Function::endpoint(identity, intx_gsi as u8))
                .expect("fewer devices than slots");
            (
                Wiring::Pci { intx_gsi, msi_gsi },
                Some(dev),
                None,
                identity.bar0_size,
            )
        }
        Placement::Isa { base, len, irq } => (
            Wiring::Isa { gsi: (*irq).into() },
            None,
            Some(Window::Pio {
                base: *base,
                len: *len,
            }),
            0,
        ),
    };
    let name = match (pci_device, window) {
        (Some(dev), _) => format!("{} at 00:{dev:02x}.0", spec.model),
        (None, Some(Window::Pio { base, .. })) => format!("{} at port {base:#x}", spec.model),
        _ => spec.model.clone(),
    };
    let console = match wiring {
        Wiring::Isa { .. } => {
            if console_taken.replace(index).is_some() {
                return Err(MachineError::SecondConsole { index });
            }
            Some(console::open().map_err(|source| MachineError::Io {
                op: "console",
                source,
            })?)
        }
        Wiring::Pci { .. } => None,
    };
    let device_error = |source| MachineError::Device { index, source };
    let server = match serve {
        Serve::User | Serve::Socket => {
            let dev = EmulatedDevice::new(
                vm,
                name.clone(),
                spec.clone(),
                ram.file(),
                ram.layout(),
                wiring,
                console,
            )
            .map_err(device_error)?;
            if let Some(s) = restore {
                dev.restore_state(&s.state).map_err(device_error)?;
                emulator::log!("vmm: {name}: restored from a snapshot of device {index}");
            }
            dev.start().map_err(device_error)?;
            if let Some(w) = window {
                dev.set_window(Some(w.range())).map_err(device_error)?;
            }
            Server::Emulator(dev)
        }
        Serve::InProcess if restore.is_some() => {
            return Err(device_error(DeviceError::NoState));
        }
        Serve::InProcess => {
            let dev = InProcessDevice::new(vm, model, ram.memory.clone(), wiring, console)
                .map_err(device_error)?;
            Server::InProcess(dev)
        }
    };
    Ok(Slot {
        name,
        server,
        pci_device,
        window,
        bar0_size,
        intx_gsi: match wiring {
            Wiring::Pci { intx_gsi, .. } => Some(intx_gsi),
            Wiring::Isa { .. } => None,
        },
        msi: None,
        msi_gsi,
    })
}

/// An ioeventfd that absorbs stores to `addr`.
fn doorbell(vm: &VmFd, addr: u64, flags: i32) -> Result<EventFd, MachineError> {
    let fd = EventFd::new(EFD_CLOEXEC | flags).map_err(|source| MachineError::Io {
        op: "eventfd",
        source,
    })?;
    vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
    Ok(fd)
}

/// A child process that sleeps in read(2) on `fd` and so is woken by every
/// store to its doorbell, as a vhost worker or an I/O thread in another
/// process would be. It dies with the VMM.
fn spawn_consumer(fd: &EventFd) -> Result<(), MachineError> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
    // SAFETY: the child only calls async-signal-safe functions (prctl,
    // read, _exit) on memory of its own stack before it exits, so the
    // state other threads left behind in the copied address space does not
    // matter.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(MachineError::Io {
            op: "fork (doorbell consumer)",
            source: std::io::Error::last_os_error(),
        }),
        0 => {
            let mut count = 0u64;
            // SAFETY: as above; `count` is 8 writable bytes.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                while libc::read(raw, &mut count as *mut u64 as *mut libc::c_void, 8) == 8 {}
                libc::_exit(0)
            }
        }
        _ => Ok(()),
    }
}
