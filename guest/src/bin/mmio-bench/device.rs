//! The devices the benchmark drives and which register each access type
//! uses. Every access checks the answer where the device defines one, so
//! that a broken path cannot pass for a fast one.

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};

use kvm_userdev_guest::cpu::wait_until;
use kvm_userdev_guest::mmio::Mmio;
use kvm_userdev_guest::{apic, interrupts, pci, println};

/// Where BAR0 goes: the MMIO hole, which the boot page tables map uncached.
const BAR_ADDRESS: u32 = 0xe000_0000;
const MAX_BAR_SIZE: u32 = 1 << 24;

/// A wrong answer from the device.
pub enum Wrong {
    Value {
        register: usize,
        expected: u32,
        got: u32,
    },
    NoInterrupt,
}

impl fmt::Display for Wrong {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Wrong::Value {
                register,
                expected,
                got,
            } => write!(
                f,
                "register {register:#x} read {got:#x}, expected {expected:#x}"
            ),
            Wrong::NoInterrupt => write!(f, "no interrupt within {IRQ_TIMEOUT_MS} ms"),
        }
    }
}

fn expect(register: usize, expected: u32, got: u32) -> Result<(), Wrong> {
    if expected == got {
        Ok(())
    } else {
        Err(Wrong::Value {
            register,
            expected,
            got,
        })
    }
}

pub struct Device {
    pci: pci::Function,
    regs: Mmio,
    kind: Kind,
}

enum Kind {
    /// The boot CPU's lane: liveness and the factorial register.
    Edu(Lane),
    Testdev {
        store: TestdevStore,
        eventfd: Option<TestdevStore>,
    },
}

/// A pci-testdev test: a store of `width` bytes of `data` at `offset`.
#[derive(Clone, Copy)]
pub struct TestdevStore {
    regs: Mmio,
    offset: usize,
    width: u8,
    data: u32,
}

impl TestdevStore {
    pub fn store(&self) {
        match self.width {
            1 => self.regs.write8(self.offset, self.data as u8),
            2 => self.regs.write16(self.offset, self.data as u16),
            _ => self.regs.write32(self.offset, self.data),
        }
    }
}

/// QEMU's edu device; `cargo xtask bench` keeps FACTORIAL out of the shadow
/// image, so that its loads reach the emulator.
mod edu {
    pub use edu_regs::{
        DMA_SOURCE, FACTORIAL, IDENTIFICATION, IDENTIFICATION_REG, IRQ_ACKNOWLEDGE, IRQ_RAISE,
        IRQ_STATUS, LIVENESS, UNUSED,
    };
    pub const ID: (u16, u16) = (edu_regs::VENDOR_ID, edu_regs::DEVICE_ID);
}

/// QEMU's pci-testdev (docs/specs/pci-testdev.rst): BAR0 starts with the
/// header of the selected test; a byte store to offset 0 selects a test.
mod testdev {
    pub const ID: (u16, u16) = (0x1b36, 0x0005);
    pub const TEST: usize = 0;
    pub const WIDTH: usize = 1;
    pub const OFFSET: usize = 4;
    pub const DATA: usize = 8;
    pub const NAME: usize = 16;
    /// Tests to look through (QEMU has six: three MMIO, three port I/O).
    pub const MAX_TESTS: u8 = 16;
}

impl Device {
    /// The device if `function` is one we can drive, with BAR0 placed and
    /// memory decoding on.
    pub fn probe(function: pci::Function) -> Option<Device> {
        let id = (function.vendor_id(), function.device_id());
        if id != edu::ID && id != testdev::ID {
            return None;
        }
        let probe = function.probe_bar(0);
        if probe.flags & 1 != 0 || probe.size == 0 || probe.size > MAX_BAR_SIZE {
            println!("bench: error {id:04x?}: BAR0 is not memory of at most 16 MiB");
            return None;
        }
        function.set_memory_bar(0, BAR_ADDRESS);
        function.set_command(pci::COMMAND_MEMORY | pci::COMMAND_DMA);
        // SAFETY: BAR0 of this device, just placed in the MMIO hole; the
        // accesses below start no DMA.
        let regs = unsafe { Mmio::new(BAR_ADDRESS as usize, probe.size as usize) };
        let kind = if id == edu::ID {
            Kind::Edu(Lane::new(regs, 0, regs.read32(edu::FACTORIAL)))
        } else {
            testdev_tests(regs)?
        };
        Some(Device {
            pci: function,
            regs,
            kind,
        })
    }

    pub fn describe(&self) -> impl fmt::Display + '_ {
        struct D<'a>(&'a Device);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                let d = self.0;
                let name = match d.kind {
                    Kind::Edu(_) => "edu",
                    Kind::Testdev { .. } => "pci-testdev",
                };
                write!(
                    f,
                    "{name} {:04x}:{:04x} at {} BAR0 {:#x}",
                    d.pci.vendor_id(),
                    d.pci.device_id(),
                    d.pci.bdf,
                    d.regs.base()
                )
            }
        }
        D(self)
    }

    /// A store that the device takes without a reply.
    pub fn store(&mut self) {
        match &mut self.kind {
            Kind::Edu(lane) => lane.store(),
            Kind::Testdev { store, .. } => store.store(),
        }
    }

    /// A load of a register without side effects.
    pub fn load(&self) -> Result<(), Wrong> {
        match &self.kind {
            Kind::Edu(_) => expect(
                edu::IDENTIFICATION_REG,
                edu::IDENTIFICATION,
                self.regs.read32(edu::IDENTIFICATION_REG),
            ),
            Kind::Testdev { store, .. } => expect(
                testdev::OFFSET,
                store.offset as u32,
                self.regs.read32(testdev::OFFSET),
            ),
        }
    }

    /// A load that must reach the device model: for edu, the register our
    /// emulator is told to forward; under QEMU every load does.
    pub fn sync_load(&self) -> Result<(), Wrong> {
        match &self.kind {
            Kind::Edu(lane) => lane.sync_load(),
            Kind::Testdev { store, .. } => {
                expect(testdev::DATA, store.data, self.regs.read32(testdev::DATA))
            }
        }
    }

    /// A store to an offset the device ignores, which stands for a log or
    /// FIFO register: a store that needs no prompt service. Edu only (its
    /// emulator may batch it); pci-testdev has nothing to spare.
    pub fn batched_store(&self) -> Option<impl FnMut() + '_> {
        match &self.kind {
            Kind::Edu(lane) => Some(move || lane.batched_store()),
            Kind::Testdev { .. } => None,
        }
    }

    /// A store, then a load of another register whose value does not
    /// depend on it: an 8250 driver's THR store and LSR load. Edu: liveness,
    /// then the identification register (which its emulator lets pass
    /// pending stores).
    pub fn store_load_other(&mut self) -> Result<(), Wrong> {
        self.store();
        self.load()
    }

    /// A store, then a load of the same register, which must see it.
    pub fn store_load(&mut self) -> Result<(), Wrong> {
        match &mut self.kind {
            Kind::Edu(lane) => lane.store_load(),
            Kind::Testdev { store, .. } => {
                store.store();
                // What pci-testdev returns there is not defined: not checked.
                self.regs.read32(store.offset & !3);
                Ok(())
            }
        }
    }

    /// pci-testdev's wildcard-eventfd test, which QEMU backs with an
    /// ioeventfd.
    pub fn eventfd_store(&self) -> Option<TestdevStore> {
        match self.kind {
            Kind::Testdev { eventfd, .. } => eventfd,
            Kind::Edu(_) => None,
        }
    }

    /// An interrupt round trip, if the device has interrupts: raise over
    /// MSI, the handler reads the status and acknowledges, the guest sees
    /// the handler ran.
    pub fn irq_round_trip(&self) -> Option<impl FnMut() -> Result<(), Wrong>> {
        let Kind::Edu(_) = self.kind else {
            return None;
        };
        let msi = self.pci.msi()?;
        IRQ_DEVICE.store(self.regs.base(), SeqCst);
        interrupts::set_handler(MSI_VECTOR, irq_handler);
        msi.enable(apic::msi_address(), MSI_VECTOR.into());
        let regs = self.regs;
        Some(move || {
            let before = IRQ_COUNT.load(SeqCst);
            regs.write32(edu::IRQ_RAISE, 1);
            if wait_until(IRQ_TIMEOUT_MS, || IRQ_COUNT.load(SeqCst) != before) {
                Ok(())
            } else {
                Err(Wrong::NoInterrupt)
            }
        })
    }
}

impl Device {
    /// CPU `cpu`'s share of the device when two CPUs drive it at once (edu
    /// only): each stores to, and loads back, a register of its own.
    pub fn lane(&self, cpu: usize) -> Option<Lane> {
        let Kind::Edu(lane) = &self.kind else {
            return None;
        };
        Some(Lane::new(self.regs, cpu, lane.factorial))
    }
}

/// One CPU's edu registers (see [`Device::lane`]); the boot CPU's lane
/// also serves the one-CPU accesses.
pub struct Lane {
    regs: Mmio,
    register: usize,
    invert: bool,
    factorial: u32,
    value: u32,
}

impl Lane {
    /// `factorial`: what the factorial register holds; nothing changes it.
    fn new(regs: Mmio, cpu: usize, factorial: u32) -> Lane {
        // Liveness reads back inverted, the DMA source as written.
        let (register, invert) = match cpu {
            0 => (edu::LIVENESS, true),
            _ => (edu::DMA_SOURCE, false),
        };
        Lane {
            regs,
            register,
            invert,
            factorial,
            value: 0,
        }
    }

    pub fn store(&mut self) {
        self.value = self.value.wrapping_add(1);
        self.regs.write32(self.register, self.value);
    }

    pub fn batched_store(&self) {
        self.regs.write32(edu::UNUSED, 0);
    }

    pub fn sync_load(&self) -> Result<(), Wrong> {
        expect(
            edu::FACTORIAL,
            self.factorial,
            self.regs.read32(edu::FACTORIAL),
        )
    }

    pub fn store_load(&mut self) -> Result<(), Wrong> {
        self.store();
        let expected = if self.invert { !self.value } else { self.value };
        expect(self.register, expected, self.regs.read32(self.register))
    }
}

/// Finds pci-testdev's MMIO no-eventfd and wildcard-eventfd tests and
/// selects the first (loads then read its header).
fn testdev_tests(regs: Mmio) -> Option<Kind> {
    let mut store = None;
    let mut eventfd = None;
    for test in 0..testdev::MAX_TESTS {
        regs.write8(testdev::TEST, test);
        let mut name = [0u8; 32];
        let mut len = 0;
        while len < name.len() {
            match regs.read8(testdev::NAME + len) {
                0 => break,
                c => name[len] = c,
            }
            len += 1;
        }
        let name = core::str::from_utf8(&name[..len]).unwrap_or("");
        if name.is_empty() {
            break;
        }
        let t = TestdevStore {
            regs,
            offset: read32_bytewise(&regs, testdev::OFFSET) as usize,
            width: regs.read8(testdev::WIDTH),
            data: read32_bytewise(&regs, testdev::DATA),
        };
        println!(
            "# pci-testdev test {test}: {name}, offset {:#x} width {} data {:#x}",
            t.offset, t.width, t.data
        );
        let usable = matches!(t.width, 1 | 2 | 4)
            && t.offset.is_multiple_of(usize::from(t.width))
            && t.offset < 4096;
        match name {
            _ if !usable || !name.starts_with("mmio") => {}
            _ if name.ends_with("no-eventfd") => store = store.or(Some((test, t))),
            _ if name.ends_with("wildcard-eventfd") => eventfd = eventfd.or(Some(t)),
            _ => {}
        }
    }
    let Some((test, store)) = store else {
        println!("bench: error pci-testdev has no usable MMIO no-eventfd test");
        return None;
    };
    regs.write8(testdev::TEST, test);
    Some(Kind::Testdev { store, eventfd })
}

fn read32_bytewise(regs: &Mmio, offset: usize) -> u32 {
    (0..4).fold(0, |v, i| v | u32::from(regs.read8(offset + i)) << (8 * i))
}

const MSI_VECTOR: u8 = 0x41;
const IRQ_TIMEOUT_MS: u64 = 3000;
/// BAR0 address of the device whose interrupts the handler acknowledges.
static IRQ_DEVICE: AtomicUsize = AtomicUsize::new(0);
static IRQ_COUNT: AtomicU32 = AtomicU32::new(0);

fn irq_handler(_vector: u8) {
    // SAFETY: the address is BAR0 of the device `irq_round_trip` set up,
    // which stays there; reading the status and acknowledging start no DMA.
    let regs = unsafe { Mmio::new(IRQ_DEVICE.load(SeqCst), 0x100) };
    let status = regs.read32(edu::IRQ_STATUS);
    regs.write32(edu::IRQ_ACKNOWLEDGE, status);
    IRQ_COUNT.fetch_add(1, SeqCst);
}
