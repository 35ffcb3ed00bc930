//! Helpers shared by the tests that run inside the patched-kernel VM.
//!
//! These tests are not run by a plain `cargo test`: `cargo xtask test` builds
//! them on the host and runs them in the VM, where `/dev/kvm` is the patched
//! kernel's nested KVM.

/// The path of the VM's writable scratch directory, as exported by the VM's
/// init (`cargo xtask vm`), if the test runs inside it.
pub fn scratch_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("KVM_USERDEV_SCRATCH").map(Into::into)
}
