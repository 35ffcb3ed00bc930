//! Memory that devices access by DMA.

use core::cell::UnsafeCell;

/// A page-aligned buffer for DMA, meant to be a `static`.
///
/// Its address is its bus address (identity mapping, no IOMMU). The guest
/// only touches it with volatile byte accesses, never through references,
/// because a device changes it behind the compiler's back. Volatile accesses
/// also stay in program order with the (volatile) MMIO accesses that start a
/// transfer and see it finish, and x86 does not reorder them either.
#[repr(C, align(4096))]
pub struct DmaBuffer<const N: usize>(UnsafeCell<[u8; N]>);

// SAFETY: no references to the contents are ever handed out; all accesses
// are volatile. The guest runs on one vCPU, and a test does not look at a
// buffer while a device transfer to it is in flight.
unsafe impl<const N: usize> Sync for DmaBuffer<N> {}

impl<const N: usize> Default for DmaBuffer<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> DmaBuffer<N> {
    pub const fn new() -> Self {
        DmaBuffer(UnsafeCell::new([0; N]))
    }

    /// The guest physical (and bus) address of byte 0.
    pub fn address(&self) -> u64 {
        self.0.get().expose_provenance() as u64
    }

    pub const fn len(&self) -> usize {
        N
    }

    pub const fn is_empty(&self) -> bool {
        N == 0
    }

    fn byte(&self, offset: usize) -> *mut u8 {
        assert!(offset < N, "DMA buffer offset {offset:#x} out of range");
        self.0.get().cast::<u8>().wrapping_add(offset)
    }

    pub fn read(&self, offset: usize) -> u8 {
        let byte = self.byte(offset);
        // SAFETY: in bounds; see the Sync impl for why no one else writes.
        unsafe { byte.read_volatile() }
    }

    pub fn write(&self, offset: usize, value: u8) {
        let byte = self.byte(offset);
        // SAFETY: as in `read`.
        unsafe { byte.write_volatile(value) }
    }

    /// Sets every byte to `pattern(offset)`.
    pub fn fill(&self, pattern: impl Fn(usize) -> u8) {
        (0..N).for_each(|offset| self.write(offset, pattern(offset)));
    }
}
