//! Memory-mapped device registers.

/// A window of device registers at a fixed guest physical address.
///
/// Accesses are single `mov` instructions of the requested width (volatile),
/// which is what a VMM's instruction decoder expects to see.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    base: usize,
    size: usize,
}

impl Mmio {
    /// # Safety
    ///
    /// `base..base + size` must be identity-mapped memory that no Rust object
    /// lives in (device registers, or nothing at all), and any access to it
    /// must not break memory safety (for example by starting DMA into memory
    /// that Rust code owns).
    pub const unsafe fn new(base: usize, size: usize) -> Self {
        Mmio { base, size }
    }

    pub fn base(&self) -> usize {
        self.base
    }

    /// The address of the register at `offset`, checked against the window.
    fn register<T>(&self, offset: usize) -> *mut T {
        let width = size_of::<T>();
        assert!(
            offset.is_multiple_of(width) && offset + width <= self.size,
            "bad MMIO offset {offset:#x}"
        );
        (self.base + offset) as *mut T
    }

    pub fn read8(&self, offset: usize) -> u8 {
        let register = self.register::<u8>(offset);
        // SAFETY: inside the window that `Mmio::new` vouched for.
        unsafe { register.read_volatile() }
    }

    pub fn write8(&self, offset: usize, value: u8) {
        let register = self.register::<u8>(offset);
        // SAFETY: as in `read8`.
        unsafe { register.write_volatile(value) }
    }

    pub fn read16(&self, offset: usize) -> u16 {
        let register = self.register::<u16>(offset);
        // SAFETY: inside the window that `Mmio::new` vouched for, aligned.
        unsafe { register.read_volatile() }
    }

    pub fn write16(&self, offset: usize, value: u16) {
        let register = self.register::<u16>(offset);
        // SAFETY: as in `read16`.
        unsafe { register.write_volatile(value) }
    }

    pub fn read32(&self, offset: usize) -> u32 {
        let register = self.register::<u32>(offset);
        // SAFETY: inside the window that `Mmio::new` vouched for, aligned.
        unsafe { register.read_volatile() }
    }

    pub fn write32(&self, offset: usize, value: u32) {
        let register = self.register::<u32>(offset);
        // SAFETY: as in `read32`.
        unsafe { register.write_volatile(value) }
    }

    pub fn read64(&self, offset: usize) -> u64 {
        let register = self.register::<u64>(offset);
        // SAFETY: as in `read32`.
        unsafe { register.read_volatile() }
    }

    pub fn write64(&self, offset: usize, value: u64) {
        let register = self.register::<u64>(offset);
        // SAFETY: as in `read32`.
        unsafe { register.write_volatile(value) }
    }
}
