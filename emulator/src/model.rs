//! What a device model is, and what it may do to the world around it.

use userdev::Sizes;

/// The device's surroundings: guest memory for DMA, its interrupt, the
/// shadow image and the console. The emulator process implements it over
/// the user device; a VMM hosting the same model in-process implements it
/// without a shadow.
pub trait Env {
    /// DMA from guest memory; false if `addr..addr + buf.len()` is not RAM.
    fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool;
    /// DMA into guest memory; false if the span is not RAM.
    fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool;
    /// The device's interrupt output is (or became) asserted: a level the
    /// platform turns into its wire protocol. PCI: an MSI if the guest
    /// enabled MSI, otherwise INTx goes (and stays) high. ISA: an edge on
    /// the low-to-high transition only.
    fn raise_irq(&mut self);
    /// The interrupt output is deasserted (INTx goes low; nothing to do
    /// for MSI; an ISA line just becomes ready for its next edge).
    fn lower_irq(&mut self);
    /// Publishes a register's new value in the shadow image, at its
    /// offset in range 0.
    fn publish(&mut self, offset: u64, len: u8, value: u64);
    /// Bytes the device transmits on its console line. May block; the
    /// bytes are not lost to a short write.
    fn console_out(&mut self, bytes: &[u8]);
    /// What [`DeviceModel::batched_registers`] returns has changed: the
    /// access map follows before the accesses just handled are answered.
    fn access_map_changed(&mut self) {}
}

/// A register KVM may serve from the shadow image: loads of `sizes` bytes
/// in `offset..offset + len` of range 0 have no side effect.
#[derive(Clone, Copy, Debug)]
pub struct ShadowRegister {
    pub offset: u64,
    pub len: u64,
    pub sizes: Sizes,
    /// No store the guest can make changes what a load here returns (an
    /// identification register), or not in a way the guest can tell: its
    /// loads may be served while stores are pending.
    pub passes_stores: bool,
}

/// Registers whose stores need no prompt service (a transmit or log
/// register): `offset..offset + len` of range 0.
#[derive(Clone, Copy, Debug)]
pub struct BatchedRegister {
    pub offset: u64,
    pub len: u64,
}

/// What the VMM needs to present the device on PCI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code (class, subclass, programming interface).
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// BAR0: 32-bit, non-prefetchable memory of this size (a power of two).
    pub bar0_size: u64,
    /// MSI vectors the device can use (0: no MSI capability).
    pub msi_vectors: u32,
}

/// Where the device sits in the machine. Either way the user device's
/// range 0 is the device's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A PCI function whose BAR0 the model serves (range 0 of the user device).
    Pci(PciIdentity),
    /// An ISA device at fixed I/O ports `base..base+len` (range 0 of the
    /// user device, a PIO range), interrupt on ISA IRQ `irq` (edge-triggered).
    Isa { base: u16, len: u16, irq: u8 },
}

impl Placement {
    /// The PCI identity, for a PCI function.
    pub fn pci(&self) -> Option<&PciIdentity> {
        match self {
            Placement::Pci(id) => Some(id),
            Placement::Isa { .. } => None,
        }
    }
}

/// A device whose registers (range 0) the emulator serves.
/// `Send`: a VMM serving several vCPUs may call it from any of their
/// threads (one at a time).
pub trait DeviceModel: Send {
    fn placement(&self) -> Placement;
    /// A guest load of `len` bytes at range-0 offset `offset` that reached the
    /// model (not served from the shadow image); the value goes in the low
    /// `len` bytes. `len` is 1 to 8: 3, 5, 6 and 7 only for the part of an
    /// access that a page boundary split.
    fn load(&mut self, env: &mut dyn Env, offset: u64, len: u8) -> u64;
    /// A guest store; `data` is in the low `len` bytes (guest byte order,
    /// little-endian).
    fn store(&mut self, env: &mut dyn Env, offset: u64, len: u8, data: u64);
    /// The registers without load side effects, which the model keeps
    /// current in the shadow image through [`Env::publish`], as the
    /// device's mode has them now; a model whose answer changes says so with
    /// [`Env::access_map_changed`].
    fn shadow_registers(&self) -> &'static [ShadowRegister];
    /// The registers whose stores may be batched now: the emulator is
    /// woken for them within the device's batch delay instead of at once.
    /// A model whose answer changes says so with [`Env::access_map_changed`].
    fn batched_registers(&self) -> &'static [BatchedRegister] {
        &[]
    }
    /// Publishes every shadowed register (on start, into a fresh image).
    fn publish_all(&self, env: &mut dyn Env);
    /// How many received bytes the model can take now (free space in its
    /// receive FIFO); 0 for a device without a console line.
    fn input_room(&self) -> usize {
        0
    }
    /// Bytes received on the console line, at most [`Self::input_room`]
    /// of them.
    fn input(&mut self, env: &mut dyn Env, bytes: &[u8]) {
        let _ = (env, bytes);
    }
}

/// The device model called `name` (the name the VMM and the handoff use),
/// fresh from reset.
pub fn by_name(name: &str) -> Option<Box<dyn DeviceModel>> {
    match name {
        "edu" => Some(Box::new(crate::edu::Edu::new())),
        "uart16550a" | "uart" => Some(Box::new(crate::uart::Uart::new())),
        _ => None,
    }
}
