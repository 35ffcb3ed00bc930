//! A minimal KVM VMM for kvm-userdev's tests and benchmarks.
//!
//! [`machine::Machine`] boots a PVH guest payload ([`boot`]) with RAM in a
//! shared memfd ([`memory`]), the in-kernel irqchip ([`irq`]) and PCI bus 0
//! ([`pci`]). Each device's BAR0 is normally a `KVM_DEV_TYPE_USER` device
//! served by its own sandboxed emulator process ([`device`], started by
//! [`spawn`]), and the VMM handles only the slow path: configuration space,
//! BAR moves, MSI routing, and emulators that end. For comparison the same
//! model can serve BAR0 from the VMM's own MMIO exits ([`inprocess`]), or
//! the emulator can get those exits over a socket. [`RealModeVm`] is the
//! tiny guest of the nested-KVM smoke test.

pub mod boot;
pub mod device;
pub mod inprocess;
pub mod irq;
pub mod machine;
pub mod memory;
pub mod pci;
mod realmode;
pub mod spawn;

pub use realmode::{Error, RealModeVm};
