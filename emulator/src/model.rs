//! What a device model is, and what it may do to the world around it.

use userdev::Sizes;

/// The device's surroundings: guest memory for DMA, its interrupt, and the
/// shadow image. The emulator process implements it over the user device;
/// a VMM hosting the same model in-process implements it without a shadow.
pub trait Env {
    /// DMA from guest memory; false if `addr..addr + buf.len()` is not RAM.
    fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool;
    /// DMA into guest memory; false if the span is not RAM.
    fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool;
    /// Raises the device's interrupt: an MSI if the guest enabled MSI,
    /// otherwise INTx goes (and stays) high.
    fn raise_irq(&mut self);
    /// Lowers INTx (nothing to do for MSI).
    fn lower_irq(&mut self);
    /// Publishes a register's new value in the shadow image, at its
    /// BAR offset.
    fn publish(&mut self, offset: u64, len: u8, value: u64);
}

/// A register KVM may serve from the shadow image: loads of `sizes` bytes
/// in `offset..offset + len` of BAR0 have no side effect.
#[derive(Clone, Copy, Debug)]
pub struct ShadowRegister {
    pub offset: u64,
    pub len: u64,
    pub sizes: Sizes,
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

/// A device whose BAR0 the emulator serves.
pub trait DeviceModel {
    fn identity(&self) -> PciIdentity;
    /// A guest load of `len` bytes at BAR0 offset `offset` that reached the
    /// model (not served from the shadow image); the value goes in the low
    /// `len` bytes. `len` is 1 to 8: 3, 5, 6 and 7 only for the part of an
    /// access that a page boundary split.
    fn load(&mut self, env: &mut dyn Env, offset: u64, len: u8) -> u64;
    /// A guest store; `data` is in the low `len` bytes (guest byte order,
    /// little-endian).
    fn store(&mut self, env: &mut dyn Env, offset: u64, len: u8, data: u64);
    /// The registers without load side effects, which the model keeps
    /// current in the shadow image through [`Env::publish`].
    fn shadow_registers(&self) -> &'static [ShadowRegister];
    /// Publishes every shadowed register (on start, into a fresh image).
    fn publish_all(&self, env: &mut dyn Env);
}

/// The device model called `name` (the name the VMM and the handoff use),
/// fresh from reset.
pub fn by_name(name: &str) -> Option<Box<dyn DeviceModel>> {
    match name {
        "edu" => Some(Box::new(crate::edu::Edu::new())),
        _ => None,
    }
}
