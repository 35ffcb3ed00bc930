//! The Rust face of `KVM_DEV_TYPE_USER`, the KVM device that lets a separate
//! process serve a guest's MMIO and port I/O (see
//! `Documentation/virt/kvm/devices/user.rst` in the patched kernel).
//!
//! - [`UserDevice`] is the VMM's side, the device fd: it creates the device
//!   in a VM, places its ranges (and moves them when the guest reprograms a
//!   BAR), sets the timeout, reads the counters and what the kernel
//!   supports, drains the queue, and creates the backend fd.
//! - [`Backend`] is the emulator's side, the backend fd: it consumes guest
//!   accesses from the mapped ring in batches (or with `read()`), replies
//!   to loads, and keeps the [`Shadow`] image and its access map current,
//!   so that KVM serves side-effect-free loads itself.
//!
//! The raw uAPI is in [`sys`]; no other crate needs ioctl numbers.
//!
//! ```no_run
//! use kvm_ioctls::Kvm;
//! use userdev::{Access, Backend, MapEntry, Op, Range, Reply, Sizes, UserDevice};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = Kvm::new()?.create_vm()?;
//! // VMM: a 4 KiB MMIO range, then a backend fd for the emulator process.
//! let device = UserDevice::create(&vm)?;
//! device.set_range(0, Range::mmio(0xe000_0000, 0x1000))?;
//! let fd = device.create_backend(true)?;
//!
//! // Emulator (normally another process that got `fd` over SCM_RIGHTS):
//! // publish a read-only register at offset 0 and serve the rest.
//! let backend = Backend::new(fd)?;
//! let shadow = backend.create_shadow(4096)?;
//! shadow.write(0, 0x010000edu32)?;
//! backend.set_access_map(&[MapEntry::shadowed(0, 0, 4, Sizes::B4)])?;
//! let mut replies = Vec::new();
//! backend.consume(|a: &Access| {
//!     if a.op == Op::Load {
//!         replies.push(Reply::with_value(a.seq, a.len, !0));
//!     }
//! })?;
//! backend.reply(&replies)?;
//! println!("{:?}", device.stats()?);
//! # Ok(())
//! # }
//! ```

mod backend;
mod device;
mod error;
pub mod stats;
pub mod sys;

pub use backend::{
    data, Access, Backend, MapEntry, Op, Reply, SeqGaps, Shadow, ShadowValue, Sizes,
};
pub use device::{Bus, Features, Range, UserDevice};
pub use error::{Error, Result};
pub use stats::Stats;

/// Ranges per device (ids `0..MAX_RANGES`).
pub const MAX_RANGES: u16 = sys::KVM_USER_MAX_RANGES;
