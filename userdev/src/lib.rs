//! The Rust face of `KVM_DEV_TYPE_USER`, the KVM device that lets a separate
//! process serve a guest's MMIO and port I/O (see
//! `Documentation/virt/kvm/devices/user.rst` in the patched kernel).
//!
//! - [`Master`] is the VMM's side: it creates the device in a VM, places its
//!   ranges (and moves them when the guest reprograms a BAR), sets the
//!   timeout, reads the counters and creates the slave fd.
//! - [`Slave`] is the emulator's side: it consumes guest accesses from the
//!   mapped ring in batches (or with `read()`), replies to loads, and keeps
//!   the [`Shadow`] image and its access map current, so that KVM serves
//!   side-effect-free loads itself.
//!
//! The raw uAPI is in [`sys`]; no other crate needs ioctl numbers.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use userdev::{Access, MapEntry, Master, Op, Range, Reply, Sizes, Slave};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = Kvm::new()?.create_vm()?;
//! // VMM: a 4 KiB MMIO range, then a slave fd for the emulator process.
//! let master = Master::create(&vm)?;
//! master.set_range(0, Range::mmio(0xe000_0000, 0x1000))?;
//! let fd = master.create_slave(true)?;
//!
//! // Emulator (normally another process that got `fd` over SCM_RIGHTS):
//! // publish a read-only register at offset 0 and serve the rest.
//! let slave = Slave::new(fd)?;
//! let shadow = slave.create_shadow(4096)?;
//! shadow.write(0, 0x010000edu32)?;
//! slave.set_access_map(&[MapEntry { range: 0, offset: 0, len: 4, shadow_offset: 0, sizes: Sizes::B4 }])?;
//! let mut replies = Vec::new();
//! slave.consume(|a: &Access| {
//!     if a.op == Op::Load {
//!         replies.push(Reply { seq: a.seq, data: !0 });
//!     }
//! })?;
//! slave.reply(&replies)?;
//! println!("{:?}", master.stats()?);
//! # Ok(())
//! # }
//! ```

mod error;
mod master;
mod slave;
pub mod sys;

pub use error::{Error, Result};
pub use master::{Bus, Master, Range, Stats};
pub use slave::{Access, MapEntry, Op, Reply, Shadow, ShadowValue, Sizes, Slave};

/// Ranges per device (ids `0..MAX_RANGES`).
pub const MAX_RANGES: u32 = sys::KVM_USER_MAX_RANGES;
