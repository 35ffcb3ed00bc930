//! The per-device emulation process behind a `KVM_DEV_TYPE_USER` device.
//!
//! The VMM starts `kvm-userdev-emulator` in fresh namespaces and hands it,
//! over a UNIX socket ([`handoff`]), the slave fd, guest memory and irqfds.
//! The emulator maps what it needs, enters its [`sandbox`] and then serves
//! the device ([`serve`]): it consumes guest accesses from the ring in
//! batches, answers forwarded loads, keeps the shadow image current and
//! raises interrupts through the irqfds. Device models implement
//! [`model::DeviceModel`]; [`edu::Edu`] follows QEMU's edu device.

pub mod edu;
pub mod handoff;
pub mod model;
pub mod sandbox;
pub mod serve;
