//! Port I/O.

use core::arch::asm;

/// An I/O port. Making one is the unsafe step; using it is not.
#[derive(Clone, Copy, Debug)]
pub struct Port(u16);

impl Port {
    /// # Safety
    ///
    /// Accesses to `port`, of any width and value, must not break memory
    /// safety: for example, they must not make a device write to memory that
    /// Rust code owns.
    pub const unsafe fn new(port: u16) -> Self {
        Port(port)
    }

    pub fn read8(self) -> u8 {
        let value;
        // SAFETY: allowed by the contract of `Port::new`. No `nomem`: the
        // access may have side effects that the compiler must not reorder.
        unsafe {
            asm!("in al, dx", out("al") value, in("dx") self.0, options(nostack, preserves_flags))
        };
        value
    }

    pub fn read16(self) -> u16 {
        let value;
        // SAFETY: as in `read8`.
        unsafe {
            asm!("in ax, dx", out("ax") value, in("dx") self.0, options(nostack, preserves_flags))
        };
        value
    }

    pub fn read32(self) -> u32 {
        let value;
        // SAFETY: as in `read8`.
        unsafe {
            asm!("in eax, dx", out("eax") value, in("dx") self.0, options(nostack, preserves_flags))
        };
        value
    }

    pub fn write8(self, value: u8) {
        // SAFETY: as in `read8`.
        unsafe {
            asm!("out dx, al", in("dx") self.0, in("al") value, options(nostack, preserves_flags))
        };
    }

    pub fn write16(self, value: u16) {
        // SAFETY: as in `read8`.
        unsafe {
            asm!("out dx, ax", in("dx") self.0, in("ax") value, options(nostack, preserves_flags))
        };
    }

    pub fn write32(self, value: u32) {
        // SAFETY: as in `read8`.
        unsafe {
            asm!("out dx, eax", in("dx") self.0, in("eax") value, options(nostack, preserves_flags))
        };
    }

    /// Writes `bytes` with one `rep outsb`: a VMM sees a single string I/O
    /// exit (per page) instead of one exit per byte.
    pub fn write_bytes(self, bytes: &[u8]) {
        // SAFETY: as in `read8`; `rsi..rsi + rcx` is `bytes`, which outsb
        // only reads. The direction flag is clear (the ABI requires it).
        unsafe {
            asm!("rep outsb", in("dx") self.0, inout("rsi") bytes.as_ptr() => _,
                 inout("rcx") bytes.len() => _, options(nostack, preserves_flags, readonly))
        };
    }
}
