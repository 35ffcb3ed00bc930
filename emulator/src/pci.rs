//! A PCI function's configuration space as a device model presents it:
//! identity, BAR0 (32-bit memory), INTA and an MSI capability. Our VMM
//! puts it on its bus; the vfio-user server hands it to QEMU, which
//! emulates the BARs and MSI on top of it.

use crate::model::PciIdentity;

pub const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
pub const BAR0: usize = 0x10;
const CAPABILITIES: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const MSI_CAP: usize = 0x40;
/// Bytes of configuration space of a conventional PCI function.
pub const CONFIG_SIZE: usize = 256;

pub const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAP_LIST: u16 = 1 << 4;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;

/// 256 bytes of configuration space and which bits the guest may write.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
}

/// Where the guest asked MSI to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl ConfigSpace {
    fn new() -> Self {
        ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
        }
    }

    fn set(&mut self, offset: usize, value: &[u8]) {
        self.bytes[offset..offset + value.len()].copy_from_slice(value);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// A host bridge (an i440FX's identity, which guests know).
    pub fn host_bridge() -> Self {
        let mut c = ConfigSpace::new();
        c.set(0x00, &0x8086u16.to_le_bytes());
        c.set(0x02, &0x1237u16.to_le_bytes());
        c.set(0x0a, &[0x00, 0x06]);
        c
    }

    /// An endpoint presenting `id`, its INTA wired to GSI `irq_line`.
    pub fn endpoint(id: &PciIdentity, irq_line: u8) -> Self {
        assert!(id.bar0_size.is_power_of_two() && id.bar0_size >= 16 && id.bar0_size <= 1 << 31);
        let mut c = ConfigSpace::new();
        c.set(0x00, &id.vendor.to_le_bytes());
        c.set(0x02, &id.device.to_le_bytes());
        c.set(0x08, &[id.revision, id.class[2], id.class[1], id.class[0]]);
        c.set(0x2c, &id.subsystem_vendor.to_le_bytes());
        c.set(0x2e, &id.subsystem.to_le_bytes());
        c.set(INTERRUPT_LINE, &[irq_line, 1]); // INTA
        c.allow(COMMAND, &0x0407u16.to_le_bytes()); // I/O, memory, DMA, INTx disable
        let bar_mask = !(id.bar0_size as u32 - 1) & !0xf;
        c.allow(BAR0, &bar_mask.to_le_bytes());
        c.allow(INTERRUPT_LINE, &[0xff]);
        if id.msi_vectors > 0 {
            c.set(STATUS, &STATUS_CAP_LIST.to_le_bytes());
            c.set(CAPABILITIES, &[MSI_CAP as u8]);
            c.set(MSI_CAP, &[0x05, 0x00]);
            c.set(MSI_CAP + 2, &MSI_64BIT.to_le_bytes());
            c.allow(MSI_CAP + 2, &0x0071u16.to_le_bytes()); // enable, multiple message enable
            c.allow(MSI_CAP + 4, &0xffff_fffcu32.to_le_bytes());
            c.allow(MSI_CAP + 8, &0xffff_ffffu32.to_le_bytes());
            c.allow(MSI_CAP + 12, &0xffffu16.to_le_bytes());
        }
        c
    }

    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Puts saved contents back (the writable bits stay the device's).
    pub fn set_bytes(&mut self, bytes: &[u8; CONFIG_SIZE]) {
        self.bytes = *bytes;
    }

    pub fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().expect("4 bytes"))
    }

    /// A load of `len` (1 to 4) bytes at `offset`, inside the space.
    pub fn read(&self, offset: usize, len: usize) -> u32 {
        (0..len).fold(0, |v, i| v | u32::from(self.bytes[offset + i]) << (8 * i))
    }

    /// A store; bits the device does not implement stay as they are.
    pub fn write(&mut self, offset: usize, len: usize, value: u32) {
        for i in 0..len {
            let b = (value >> (8 * i)) as u8;
            let mask = self.writable[offset + i];
            self.bytes[offset + i] = (self.bytes[offset + i] & !mask) | (b & mask);
        }
    }

    /// Where BAR0 points, if memory decoding is on and it was placed.
    pub fn bar0(&self) -> Option<u64> {
        let enabled = self.u16(COMMAND) & COMMAND_MEMORY != 0;
        let addr = u64::from(self.u32(BAR0) & !0xf);
        (enabled && addr != 0).then_some(addr)
    }

    /// Whether the function has an MSI capability.
    pub fn has_msi(&self) -> bool {
        self.bytes[CAPABILITIES] == MSI_CAP as u8
    }

    /// The MSI message, if the guest enabled MSI.
    pub fn msi(&self) -> Option<MsiMessage> {
        if !self.has_msi() || self.u16(MSI_CAP + 2) & MSI_ENABLE == 0 {
            return None;
        }
        let address = u64::from(self.u32(MSI_CAP + 4)) | u64::from(self.u32(MSI_CAP + 8)) << 32;
        let data = u32::from(self.u16(MSI_CAP + 12));
        Some(MsiMessage { address, data })
    }
}
