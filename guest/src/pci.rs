//! PCI configuration space through configuration mechanism #1 (ports
//! 0xcf8/0xcfc), bus 0 scanning, BAR sizing and MSI.

use core::fmt;

use crate::interrupts::without_interrupts;
use crate::io::Port;

// SAFETY: configuration mechanism #1. Configuration accesses can redirect
// BARs and enable a device's DMA; the functions below only do what their
// callers ask for, and tests place BARs in the MMIO hole, away from RAM.
const CONFIG_ADDRESS: Port = unsafe { Port::new(0xcf8) };
const CONFIG_DATA: u16 = 0xcfc;

// Configuration space registers (type 0 header).
pub const VENDOR_ID: u8 = 0x00;
pub const DEVICE_ID: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const BAR0: u8 = 0x10;
pub const CAPABILITIES_POINTER: u8 = 0x34;
pub const INTERRUPT_LINE: u8 = 0x3c;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// The device may initiate transactions of its own (DMA, MSI writes).
pub const COMMAND_DMA: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const CAPABILITY_MSI: u8 = 0x05;

/// Bus, device and function numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A PCI function, by address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
}

/// Functions 0 of the devices present on bus 0.
pub fn scan_bus0() -> impl Iterator<Item = Function> {
    (0..32)
        .map(|device| Function {
            bdf: Bdf {
                bus: 0,
                device,
                function: 0,
            },
        })
        .filter(|function| function.read16(VENDOR_ID) != 0xffff)
}

/// What sizing a BAR found.
#[derive(Clone, Copy, Debug)]
pub struct BarProbe {
    /// Bits 0..3: 0 for 32-bit non-prefetchable memory.
    pub flags: u32,
    /// In bytes; 0 for an unimplemented BAR.
    pub size: u32,
}

impl Function {
    /// Selects register `offset & !3`, then runs `access` on the data port
    /// for the byte at `offset`. Interrupts are off so that no handler
    /// changes the selection in between.
    fn config<T>(&self, offset: u8, access: impl FnOnce(Port) -> T) -> T {
        let Bdf {
            bus,
            device,
            function,
        } = self.bdf;
        let address = 1 << 31
            | u32::from(bus) << 16
            | u32::from(device) << 11
            | u32::from(function) << 8
            | u32::from(offset & 0xfc);
        // SAFETY: the data port of configuration mechanism #1 (and of the
        // byte or word inside it), see CONFIG_ADDRESS.
        let data = unsafe { Port::new(CONFIG_DATA + u16::from(offset & 3)) };
        without_interrupts(|| {
            CONFIG_ADDRESS.write32(address);
            access(data)
        })
    }

    pub fn read8(&self, offset: u8) -> u8 {
        self.config(offset, |data| data.read8())
    }

    pub fn read16(&self, offset: u8) -> u16 {
        assert!(offset.is_multiple_of(2));
        self.config(offset, |data| data.read16())
    }

    pub fn read32(&self, offset: u8) -> u32 {
        assert!(offset.is_multiple_of(4));
        self.config(offset, |data| data.read32())
    }

    pub fn write8(&self, offset: u8, value: u8) {
        self.config(offset, |data| data.write8(value))
    }

    pub fn write16(&self, offset: u8, value: u16) {
        assert!(offset.is_multiple_of(2));
        self.config(offset, |data| data.write16(value))
    }

    pub fn write32(&self, offset: u8, value: u32) {
        assert!(offset.is_multiple_of(4));
        self.config(offset, |data| data.write32(value))
    }

    pub fn vendor_id(&self) -> u16 {
        self.read16(VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.read16(DEVICE_ID)
    }

    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    pub fn set_command(&self, command: u16) {
        self.write16(COMMAND, command)
    }

    /// The IOAPIC input (GSI) that INTx is wired to, as firmware or the VMM
    /// wrote it.
    pub fn interrupt_line(&self) -> u8 {
        self.read8(INTERRUPT_LINE)
    }

    /// Sizes BAR `index` by writing all-ones to it, with memory and I/O
    /// decoding off meanwhile. The BAR keeps its value.
    pub fn probe_bar(&self, index: u8) -> BarProbe {
        let offset = BAR0 + 4 * index;
        let command = self.command();
        self.set_command(command & !(COMMAND_MEMORY | COMMAND_IO));
        let original = self.read32(offset);
        self.write32(offset, !0);
        let mask = self.read32(offset);
        self.write32(offset, original);
        self.set_command(command);
        BarProbe {
            flags: mask & 0xf,
            size: (!(mask & !0xf)).wrapping_add(1),
        }
    }

    /// Moves 32-bit memory BAR `index` to `address`, with memory decoding off
    /// meanwhile (the device's previous command state comes back after).
    pub fn set_memory_bar(&self, index: u8, address: u32) {
        let command = self.command();
        self.set_command(command & !COMMAND_MEMORY);
        self.write32(BAR0 + 4 * index, address);
        self.set_command(command);
    }

    pub fn memory_bar(&self, index: u8) -> u32 {
        self.read32(BAR0 + 4 * index) & !0xf
    }

    /// The offset of capability `id` in configuration space.
    pub fn find_capability(&self, id: u8) -> Option<u8> {
        if self.read16(STATUS) & STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut offset = self.read8(CAPABILITIES_POINTER) & 0xfc;
        // At most 48 capabilities fit: the bound stops a looping list.
        for _ in 0..48 {
            if offset == 0 {
                return None;
            }
            if self.read8(offset) == id {
                return Some(offset);
            }
            offset = self.read8(offset + 1) & 0xfc;
        }
        None
    }

    pub fn msi(&self) -> Option<Msi> {
        let capability = self.find_capability(CAPABILITY_MSI)?;
        Some(Msi {
            function: *self,
            capability,
        })
    }
}

/// The MSI capability of a function.
#[derive(Clone, Copy, Debug)]
pub struct Msi {
    function: Function,
    capability: u8,
}

const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSI_CONTROL_MULTIPLE_ENABLE: u16 = 0b111 << 4;
const MSI_CONTROL_64BIT: u16 = 1 << 7;

impl Msi {
    pub fn offset(&self) -> u8 {
        self.capability
    }

    fn control(&self) -> u16 {
        self.function.read16(self.capability + 2)
    }

    /// Whether the function takes a 64-bit message address.
    pub fn is_64bit(&self) -> bool {
        self.control() & MSI_CONTROL_64BIT != 0
    }

    /// Programs a single message and enables MSI.
    pub fn enable(&self, address: u64, data: u16) {
        let f = &self.function;
        let base = self.capability;
        f.write32(base + 4, address as u32);
        let data_offset = if self.is_64bit() {
            f.write32(base + 8, (address >> 32) as u32);
            base + 12
        } else {
            assert!(address >> 32 == 0, "32-bit MSI address capability");
            base + 8
        };
        f.write16(data_offset, data);
        let control = self.control() & !MSI_CONTROL_MULTIPLE_ENABLE;
        f.write16(base + 2, control | MSI_CONTROL_ENABLE);
    }

    pub fn disable(&self) {
        let control = self.control();
        self.function
            .write16(self.capability + 2, control & !MSI_CONTROL_ENABLE);
    }
}
