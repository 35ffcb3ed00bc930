//! QEMU's edu device (docs/specs/edu.rst): its registers (from `edu_regs`),
//! and what its interrupts showed.

use kvm_userdev_guest::cpu::wait_until;
use kvm_userdev_guest::mmio::Mmio;
use kvm_userdev_guest::pci;

pub use edu_regs::*;

pub fn in_device_buffer(address: u64) -> bool {
    (DMA_BUFFER..DMA_BUFFER + DMA_BUFFER_SIZE as u64).contains(&address)
}

/// How long any wait for the device may take.
pub const TIMEOUT_MS: u64 = 3000;

/// Where the test puts edu BARs: a 16 MiB slot per device in the MMIO hole,
/// which the boot page tables map uncached.
const BAR_WINDOW: u32 = 0xe000_0000;
const BAR_SLOT_SIZE: u32 = 0x0100_0000;
pub const MAX_DEVICES: usize = 16;

/// The BAR address of edu device `index`.
pub fn bar_slot(index: usize) -> u32 {
    assert!(index < MAX_DEVICES);
    BAR_WINDOW + index as u32 * BAR_SLOT_SIZE
}

/// The registers of an edu BAR at `address`, in the BAR window.
pub fn registers_at(address: u32) -> Mmio {
    let window = BAR_WINDOW..BAR_WINDOW + MAX_DEVICES as u32 * BAR_SLOT_SIZE;
    assert!(window.contains(&address) && address.is_multiple_of(BAR_SIZE));
    // SAFETY: the BAR window is MMIO hole, not RAM. Only edu BARs are put
    // there, and an edu device only does DMA to the addresses that the test
    // programs, which are DMA buffers.
    unsafe { Mmio::new(address as usize, BAR_SIZE as usize) }
}

/// An edu device, its BAR0 placed.
#[derive(Clone, Copy, Debug)]
pub struct Edu {
    /// Position among the edu devices in scan order: the device index of
    /// our VMM's control commands.
    pub index: usize,
    pub pci: pci::Function,
    pub regs: Mmio,
}

impl Edu {
    pub fn read(&self, register: usize) -> u32 {
        self.regs.read32(register)
    }

    pub fn write(&self, register: usize, value: u32) {
        self.regs.write32(register, value)
    }

    /// Computes `n!` by polling the status register; on timeout, returns the
    /// status.
    pub fn factorial(&self, n: u32) -> Result<u32, u32> {
        self.write(FACTORIAL, n);
        if wait_until(TIMEOUT_MS, || self.read(STATUS) & STATUS_COMPUTING == 0) {
            Ok(self.read(FACTORIAL))
        } else {
            Err(self.read(STATUS))
        }
    }

    pub fn start_dma(&self, source: u64, destination: u64, count: usize, command: u64) {
        self.regs.write64(DMA_SOURCE, source);
        self.regs.write64(DMA_DESTINATION, destination);
        self.regs.write64(DMA_COUNT, count as u64);
        self.regs.write64(DMA_COMMAND, command);
    }

    /// Runs a DMA transfer without its interrupt; whether it ended in time.
    pub fn dma(&self, source: u64, destination: u64, count: usize, command: u64) -> bool {
        self.start_dma(source, destination, count, command);
        wait_until(TIMEOUT_MS, || self.dma_command() & DMA_START == 0)
    }

    pub fn dma_command(&self) -> u64 {
        self.regs.read64(DMA_COMMAND)
    }
}

/// `n!` as the device computes it: in 32 bits, wrapping.
pub fn factorial(n: u32) -> u32 {
    (1..=n).fold(1, u32::wrapping_mul)
}

/// What the interrupt handler saw since the test last armed it. One device
/// at a time is armed; it stays armed, so that a late interrupt still gets
/// acknowledged (an unacknowledged INTx would fire again at once).
pub mod irq {
    use core::sync::atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering::SeqCst};

    use super::{Edu, IRQ_ACKNOWLEDGE, IRQ_STATUS, registers_at};

    /// BAR0 address of the armed device; 0 before the first.
    static DEVICE: AtomicUsize = AtomicUsize::new(0);
    static COUNT: AtomicU32 = AtomicU32::new(0);
    static STATUS: AtomicU32 = AtomicU32::new(0);
    static VECTOR: AtomicU8 = AtomicU8::new(0);

    pub fn arm(edu: &Edu) {
        COUNT.store(0, SeqCst);
        STATUS.store(0, SeqCst);
        VECTOR.store(0, SeqCst);
        DEVICE.store(edu.regs.base(), SeqCst);
    }

    pub fn count() -> u32 {
        COUNT.load(SeqCst)
    }

    /// The interrupt status register as the last interrupt found it.
    pub fn status() -> u32 {
        STATUS.load(SeqCst)
    }

    pub fn vector() -> u8 {
        VECTOR.load(SeqCst)
    }

    /// The interrupt handler: acknowledges everything pending, which lowers
    /// INTx before the dispatcher's EOI.
    pub fn handler(vector: u8) {
        let base = DEVICE.load(SeqCst);
        if base != 0 {
            let regs = registers_at(base as u32);
            let status = regs.read32(IRQ_STATUS);
            regs.write32(IRQ_ACKNOWLEDGE, status);
            STATUS.store(status, SeqCst);
        }
        VECTOR.store(vector, SeqCst);
        COUNT.fetch_add(1, SeqCst);
    }
}
