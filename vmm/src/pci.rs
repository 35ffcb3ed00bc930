//! PCI configuration space: mechanism #1 on ports 0xcf8/0xcfc, bus 0, a
//! host bridge and type-0 endpoints with one 32-bit memory BAR, INTA and an
//! MSI capability. Enough for a guest to find a device, size and place
//! BAR0, enable it and set up MSI.

use emulator::model::PciIdentity;

pub const CONFIG_ADDRESS: u16 = 0xcf8;
pub const CONFIG_DATA: u16 = 0xcfc;

pub use emulator::pci::{ConfigSpace, MsiMessage, COMMAND_MEMORY};

/// A device function on bus 0.
#[derive(Clone)]
pub struct Function {
    pub config: ConfigSpace,
    bar0_size: u64,
}

impl Function {
    /// The host bridge at 00:00.0.
    pub fn host_bridge() -> Self {
        Function {
            config: ConfigSpace::host_bridge(),
            bar0_size: 0,
        }
    }

    /// An endpoint presenting `id`, its INTA wired to GSI `irq_line`.
    pub fn endpoint(id: &PciIdentity, irq_line: u8) -> Self {
        Function {
            config: ConfigSpace::endpoint(id, irq_line),
            bar0_size: id.bar0_size,
        }
    }

    pub fn bar0_size(&self) -> u64 {
        self.bar0_size
    }

    /// Where BAR0 decodes, if memory decoding is on and it was placed.
    pub fn bar0(&self) -> Option<u64> {
        self.config.bar0().filter(|_| self.bar0_size > 0)
    }

    /// The MSI message, if the guest enabled MSI.
    pub fn msi(&self) -> Option<MsiMessage> {
        self.config.msi()
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
            .filter_map(|(dev, f)| Some((dev as u8, *f.as_ref()?.config.bytes())))
            .collect()
    }

    /// Puts a saved configuration space back into function `device`,
    /// which must be there already (the same devices, in the same order).
    pub fn restore(&mut self, device: u8, bytes: &[u8; 256]) -> bool {
        match self.slots.get_mut(device as usize) {
            Some(Some(f)) => {
                f.config.set_bytes(bytes);
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
