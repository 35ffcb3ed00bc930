//! A minimal KVM VMM for kvm-userdev's tests and benchmarks.
//!
//! [`machine::Machine`] boots a PVH guest payload ([`boot`]) or a Linux
//! bzImage on several vCPUs ([`linux`], [`mptable`]) with RAM in a shared
//! memfd ([`memory`]), the in-kernel irqchip ([`irq`]), PCI bus 0 ([`pci`])
//! and optionally a 16550A UART at its ISA ports as the guest's console on
//! the VMM's stdin and stdout ([`console`]). Each device's BAR0 is normally a `KVM_DEV_TYPE_USER` device
//! served by its own sandboxed emulator process ([`device`], started by
//! [`spawn`]), and the VMM handles only the slow path: configuration space,
//! BAR moves, MSI routing, and emulators that end. For comparison the same
//! model can serve BAR0 from the VMM's own MMIO exits ([`inprocess`]), or
//! the emulator can get those exits over a socket. [`RealModeVm`] is the
//! tiny guest of the nested-KVM smoke test.

pub mod boot;
pub mod console;
pub mod device;
pub mod inprocess;
pub mod irq;
pub mod linux;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod pci;
mod realmode;
pub mod rtc;
pub mod snapshot;
pub use emulator::spawn;
pub mod vmstate;

pub use realmode::{Error, RealModeVm};
