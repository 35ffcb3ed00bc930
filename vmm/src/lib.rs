//! A minimal KVM VMM for kvm-userdev's tests and benchmarks.
//!
//! So far it holds [`RealModeVm`]: one vCPU in real mode over a small
//! anonymous memory slot, enough for the nested-KVM smoke test. The PCI
//! machine that hosts user devices and spawns emulators comes with issue 4.

mod realmode;

pub use realmode::{Error, RealModeVm};
