//! The MMIO latency benchmark: kvm-userdev against the classic exit paths and
//! plain QEMU, run inside the patched-kernel VM (issue 5).
//!
//! Empty for now: it needs the user device, the emulator and the VMM first.
