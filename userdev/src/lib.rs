//! Rust face of the `KVM_DEV_TYPE_USER` uAPI.
//!
//! This crate will mirror the kernel header from `kernel-patch/` and give the
//! VMM (`Master`) and the device-emulation process (`Slave`) safe wrappers for
//! ranges, the access ring, replies, the shadow image and the access map.
//!
//! It is empty until the kernel series defines the uAPI (issue 3): nothing
//! here pretends to talk to a kernel that does not have the device yet.
