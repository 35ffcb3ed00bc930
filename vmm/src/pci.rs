//! PCI configuration space: mechanism #1 on ports 0xcf8/0xcfc, bus 0, a
//! host bridge and type-0 endpoints with one 32-bit memory BAR, INTA and an
//! MSI capability. Enough for a guest to find a device, size and place
//! BAR0, enable it and set up MSI.

use emulator::model::PciIdentity;

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const MSI_CAP: usize = 0x40;

pub const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAP_LIST: u16 = 1 << 4;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;

/// 256 bytes of configuration space and which bits the guest may write.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
}

impl ConfigSpace {
    fn new() -> Self {
        ConfigSpace {
            bytes: [0; 256],
            writable: [0; 256],
        }
    }

    fn set(&mut self, offset: usize, value: &[u8]) {
        self.bytes[offset..offset + value.len()].copy_from_slice(value);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().expect("4 bytes"))
    }

    /// A load of `len` (1, 2 or 4) bytes at `offset`; it must not cross
    /// the dword, which mechanism #1 guarantees.
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
}

/// Where the guest asked MSI to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// A device function on bus 0.
#[derive(Clone)]
pub struct Function {
    pub config: ConfigSpace,
    bar0_size: u64,
    msi: bool,
}

impl Function {
    /// The host bridge at 00:00.0 (an i440FX's identity, which guests know).
    pub fn host_bridge() -> Self {
        let mut c = ConfigSpace::new();
        c.set(0x00, &0x8086u16.to_le_bytes());
        c.set(0x02, &0x1237u16.to_le_bytes());
        c.set(0x0a, &[0x00, 0x06]); // host bridge
        Function {
            config: c,
            bar0_size: 0,
            msi: false,
        }
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
        let msi = id.msi_vectors > 0;
        if msi {
            c.set(STATUS, &STATUS_CAP_LIST.to_le_bytes());
            c.set(CAPABILITIES, &[MSI_CAP as u8]);
            c.set(MSI_CAP, &[0x05, 0x00]);
            c.set(MSI_CAP + 2, &MSI_64BIT.to_le_bytes());
            c.allow(MSI_CAP + 2, &0x0071u16.to_le_bytes()); // enable, multiple message enable
            c.allow(MSI_CAP + 4, &0xffff_fffcu32.to_le_bytes());
            c.allow(MSI_CAP + 8, &0xffff_ffffu32.to_le_bytes());
            c.allow(MSI_CAP + 12, &0xffffu16.to_le_bytes());
        }
        Function {
            config: c,
            bar0_size: id.bar0_size,
            msi,
        }
    }

    pub fn bar0_size(&self) -> u64 {
        self.bar0_size
    }

    /// Where BAR0 decodes, if memory decoding is on and it was placed.
    pub fn bar0(&self) -> Option<u64> {
        let enabled = self.config.u16(COMMAND) & COMMAND_MEMORY != 0;
        let addr = u64::from(self.config.u32(BAR0) & !0xf);
        (self.bar0_size > 0 && enabled && addr != 0).then_some(addr)
    }

    /// The MSI message, if the guest enabled MSI.
    pub fn msi(&self) -> Option<MsiMessage> {
        if !self.msi || self.config.u16(MSI_CAP + 2) & MSI_ENABLE == 0 {
            return None;
        }
        let address =
            u64::from(self.config.u32(MSI_CAP + 4)) | u64::from(self.config.u32(MSI_CAP + 8)) << 32;
        let data = u32::from(self.config.u16(MSI_CAP + 12));
        Some(MsiMessage { address, data })
    }
}

/// Bus 0 and the mechanism #1 address register.
#[derive(Default)]
pub struct Bus {
    slots: Vec<Option<Function>>,
    address: u32,
}

impl Bus {
    pub fn new() -> Self {
        Bus {
            slots: vec![None; 32],
            address: 0,
        }
    }

    /// Puts `function` in the first free slot; returns its device number.
    pub fn add(&mut self, function: Function) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(function);
        Some(slot as u8)
    }

    pub fn function(&self, device: u8) -> Option<&Function> {
        self.slots.get(device as usize)?.as_ref()
    }

    /// Every function's device number and configuration space, for a
    /// snapshot.
    pub fn save(&self) -> Vec<(u8, [u8; 256])> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(dev, f)| Some((dev as u8, f.as_ref()?.config.bytes)))
            .collect()
    }

    /// Puts a saved configuration space back into function `device`,
    /// which must be there already (the same devices, in the same order).
    pub fn restore(&mut self, device: u8, bytes: &[u8; 256]) -> bool {
        match self.slots.get_mut(device as usize) {
            Some(Some(f)) => {
                f.config.bytes = *bytes;
                true
            }
            _ => false,
        }
    }

    /// For an access of `len` bytes at data port `port`: the device the
    /// address register selects, if present, the configuration offset, and
    /// how many bytes of the access stay inside the selected dword.
    fn target(&self, port: u16, len: usize) -> Option<(u8, usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let (bus, device, function) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7);
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        self.slots[device as usize].as_ref()?;
        let byte = usize::from(port - CONFIG_DATA);
        Some((device as u8, (a & 0xfc) as usize + byte, len.min(4 - byte)))
    }

    /// A port read in 0xcf8..=0xcff.
    pub fn io_read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            CONFIG_ADDRESS if data.len() == 4 => self.address,
            CONFIG_DATA..=0xcff => match self.target(port, data.len()) {
                Some((dev, offset, len)) => {
                    let f = self.slots[dev as usize].as_ref().expect("selected");
                    f.config.read(offset, len)
                }
                None => !0,
            },
            _ => !0,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (value >> (8 * i)) as u8;
        }
    }

    /// The device whose configuration space a write of `len` bytes to
    /// `port` would change, before it is made ([`Bus::io_write`] says the
    /// same after the write).
    pub fn write_target(&self, port: u16, len: usize) -> Option<u8> {
        match port {
            CONFIG_DATA..=0xcff => self.target(port, len).map(|(dev, _, _)| dev),
            _ => None,
        }
    }

    /// A port write in 0xcf8..=0xcff; returns the device whose configuration
    /// changed, for the caller to act on (BAR moves, MSI).
    pub fn io_write(&mut self, port: u16, data: &[u8]) -> Option<u8> {
        let value = le(data);
        match port {
            CONFIG_ADDRESS if data.len() == 4 => {
                self.address = value;
                None
            }
            CONFIG_DATA..=0xcff => {
                let (dev, offset, len) = self.target(port, data.len())?;
                let f = self.slots[dev as usize].as_mut().expect("selected");
                f.config.write(offset, len, value);
                Some(dev)
            }
            _ => None,
        }
    }
}

/// The value of a port access's data (little-endian, up to 4 bytes).
pub fn le(data: &[u8]) -> u32 {
    le64(data) as u32
}

/// The same for accesses of up to 8 bytes (MMIO).
pub fn le64(data: &[u8]) -> u64 {
    data.iter().rev().fold(0, |v, &b| v << 8 | u64::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edu() -> Function {
        Function::endpoint(&emulator::edu::IDENTITY, 10)
    }

    fn cfg_write(bus: &mut Bus, dev: u8, reg: u32, value: u32) -> Option<u8> {
        bus.io_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes(),
        );
        bus.io_write(CONFIG_DATA, &value.to_le_bytes())
    }

    fn cfg_read(bus: &mut Bus, dev: u8, reg: u32) -> u32 {
        bus.io_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes(),
        );
        let mut d = [0; 4];
        bus.io_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn identity_and_absent_devices() {
        let mut bus = Bus::new();
        assert_eq!(bus.add(Function::host_bridge()), Some(0));
        assert_eq!(bus.add(edu()), Some(1));
        assert_eq!(cfg_read(&mut bus, 1, 0), 0x11e8_1234);
        assert_eq!(
            cfg_read(&mut bus, 1, 8),
            0xff00_0010,
            "class ff, subclass 00, rev 10"
        );
        assert_eq!(cfg_read(&mut bus, 1, 0x3c) & 0xffff, 0x010a);
        assert_eq!(cfg_read(&mut bus, 2, 0), 0xffff_ffff);
        // A byte read at an offset inside the dword.
        bus.io_write(CONFIG_ADDRESS, &0x8000_0800u32.to_le_bytes());
        let mut b = [0u8; 1];
        bus.io_read(CONFIG_DATA + 2, &mut b);
        assert_eq!(b[0], 0xe8);
    }

    #[test]
    fn bar_sizing_and_placement() {
        let mut bus = Bus::new();
        let dev = bus.add(edu()).unwrap();
        assert_eq!(cfg_write(&mut bus, dev, 0x10, 0xffff_ffff), Some(dev));
        assert_eq!(
            cfg_read(&mut bus, dev, 0x10),
            0xfff0_0000,
            "1 MiB, 32-bit memory"
        );
        cfg_write(&mut bus, dev, 0x10, 0xe000_0000);
        assert_eq!(bus.function(dev).unwrap().bar0(), None, "decode off");
        cfg_write(&mut bus, dev, 0x04, 0x0006);
        assert_eq!(bus.function(dev).unwrap().bar0(), Some(0xe000_0000));
        assert_eq!(cfg_read(&mut bus, dev, 0x04) & 0xffff, 0x0006);
        // Read-only identity.
        cfg_write(&mut bus, dev, 0x00, 0);
        assert_eq!(cfg_read(&mut bus, dev, 0), 0x11e8_1234);
    }

    #[test]
    fn write_target_is_known_before_the_write() {
        let mut bus = Bus::new();
        bus.add(Function::host_bridge());
        let dev = bus.add(edu()).unwrap();
        assert_eq!(bus.write_target(CONFIG_DATA, 4), None, "nothing selected");
        bus.io_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | u32::from(dev) << 11 | 0x04).to_le_bytes(),
        );
        assert_eq!(bus.write_target(CONFIG_ADDRESS, 4), None);
        assert_eq!(bus.write_target(CONFIG_DATA, 2), Some(dev));
        assert_eq!(bus.write_target(CONFIG_DATA + 2, 1), Some(dev));
        assert_eq!(bus.io_write(CONFIG_DATA, &[6, 0]), Some(dev));
        // An absent device.
        bus.io_write(CONFIG_ADDRESS, &(0x8000_0000u32 | 5 << 11).to_le_bytes());
        assert_eq!(bus.write_target(CONFIG_DATA, 4), None);
    }

    #[test]
    fn msi_capability() {
        let mut bus = Bus::new();
        let dev = bus.add(edu()).unwrap();
        assert_eq!(cfg_read(&mut bus, dev, 0x34) & 0xff, 0x40);
        assert_eq!(cfg_read(&mut bus, dev, 0x40) & 0xffff, 0x0005);
        cfg_write(&mut bus, dev, 0x44, 0xfee0_0000);
        cfg_write(&mut bus, dev, 0x48, 0);
        cfg_write(&mut bus, dev, 0x4c, 0x41);
        assert_eq!(bus.function(dev).unwrap().msi(), None);
        cfg_write(&mut bus, dev, 0x40, 0x0001_0000 | 0x0005);
        assert_eq!(
            bus.function(dev).unwrap().msi(),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
    }
}
