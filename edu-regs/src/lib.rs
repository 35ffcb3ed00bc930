//! The register map of QEMU's edu device (QEMU's docs/specs/edu.rst), the
//! one definition that the emulator's model and the guest programs (a
//! freestanding workspace of their own) share.
//!
//! Offsets are into BAR0. Up to 0x7f registers take 32-bit accesses; from
//! 0x80 the DMA registers take 32- and 64-bit ones.

#![no_std]

/// PCI vendor and device ID.
pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x11e8;
/// BAR0's size.
pub const BAR_SIZE: u32 = 1 << 20;

/// Major 1, minor 0, "ed": what [`IDENTIFICATION_REG`] reads.
pub const IDENTIFICATION: u32 = 0x0100_00ed;

pub const IDENTIFICATION_REG: usize = 0x00;
/// Reads the inverse of what was written.
pub const LIVENESS: usize = 0x04;
/// Write n, read n! (32-bit, wrapping) once the status is no longer busy.
pub const FACTORIAL: usize = 0x08;
/// Nothing: the device ignores stores here (the benchmark's batched store).
pub const UNUSED: usize = 0x10;
pub const STATUS: usize = 0x20;
pub const IRQ_STATUS: usize = 0x24;
pub const IRQ_RAISE: usize = 0x60;
pub const IRQ_ACKNOWLEDGE: usize = 0x64;
pub const DMA_SOURCE: usize = 0x80;
pub const DMA_DESTINATION: usize = 0x88;
pub const DMA_COUNT: usize = 0x90;
pub const DMA_COMMAND: usize = 0x98;

/// [`STATUS`]: a factorial is being computed.
pub const STATUS_COMPUTING: u32 = 0x01;
/// [`STATUS`]: raise an interrupt when the factorial is done.
pub const STATUS_IRQ_ON_FACTORIAL: u32 = 0x80;

/// [`IRQ_STATUS`] bits of the device's own events.
pub const IRQ_FACTORIAL: u32 = 0x001;
pub const IRQ_DMA: u32 = 0x100;

/// [`DMA_COMMAND`]: start; reads back set until the transfer is done.
pub const DMA_START: u64 = 0x1;
/// [`DMA_COMMAND`]: from the device buffer to RAM (clear: RAM to device).
pub const DMA_TO_RAM: u64 = 0x2;
/// [`DMA_COMMAND`]: raise an interrupt when done.
pub const DMA_IRQ: u64 = 0x4;

/// The device's DMA buffer, in the device's address space.
pub const DMA_BUFFER: u64 = 0x40000;
pub const DMA_BUFFER_SIZE: usize = 4096;
