//! The raw uAPI, mirroring the `KVM_DEV_TYPE_USER` part of
//! `include/uapi/linux/kvm.h` in the patched kernel.
//!
//! Layouts are checked at compile time below; the safe wrappers in this crate
//! are the only users of the ioctl numbers.

#![allow(non_camel_case_types)]

use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// `KVM_DEV_TYPE_USER` in `enum kvm_device_type` (after `KVM_DEV_TYPE_RISCV_AIA`).
pub const KVM_DEV_TYPE_USER: u32 = 12;

// Device fd attribute groups.
pub const KVM_DEV_USER_GRP_RANGE: u32 = 1;
pub const KVM_DEV_USER_GRP_CONFIG: u32 = 2;
pub const KVM_DEV_USER_CONFIG_TIMEOUT_US: u64 = 0;
pub const KVM_DEV_USER_CONFIG_POLL_NS: u64 = 1;
pub const KVM_DEV_USER_CONFIG_HANDOFF: u64 = 2;
pub const KVM_DEV_USER_CONFIG_BATCH_US: u64 = 3;
pub const KVM_DEV_USER_CONFIG_RELEASE: u64 = 4;
pub const KVM_DEV_USER_GRP_STATS: u32 = 3;
pub const KVM_DEV_USER_STAT_POSTED_STORES: u64 = 0;
pub const KVM_DEV_USER_STAT_SHADOW_LOADS: u64 = 1;
pub const KVM_DEV_USER_STAT_FORWARDED_LOADS: u64 = 2;
pub const KVM_DEV_USER_STAT_TIMEOUTS: u64 = 3;
pub const KVM_DEV_USER_STAT_DROPPED_STORES: u64 = 4;
pub const KVM_DEV_USER_STAT_QUEUE_FULL_WAITS: u64 = 5;
pub const KVM_DEV_USER_STAT_DETACHED_LOADS: u64 = 6;
pub const KVM_DEV_USER_STAT_STALLED_ACCESSES: u64 = 7;
pub const KVM_DEV_USER_STAT_BATCHED_STORES: u64 = 8;
pub const KVM_DEV_USER_STAT_KEPT_RECORDS: u64 = 9;
/// Get only.
pub const KVM_DEV_USER_GRP_INFO: u32 = 4;
pub const KVM_DEV_USER_INFO_FEATURES: u64 = 0;
pub const KVM_DEV_USER_INFO_RING_ENTRIES: u64 = 1;
pub const KVM_DEV_USER_INFO_RING_MMAP_SIZE: u64 = 2;
pub const KVM_DEV_USER_INFO_MAX_SHADOW_SIZE: u64 = 3;

/// Feature bits of `KVM_DEV_USER_INFO_FEATURES`.
pub const KVM_USER_F_NONPOSTED: u64 = 1 << 0;
pub const KVM_USER_F_PASS_STORES: u64 = 1 << 1;
pub const KVM_USER_F_BATCH_STORES: u64 = 1 << 2;
pub const KVM_USER_F_KEEP_QUEUE: u64 = 1 << 3;

/// Values of `KVM_DEV_USER_CONFIG_RELEASE`.
pub const KVM_USER_RELEASE_KEEP: u64 = 0;
pub const KVM_USER_RELEASE_DROP: u64 = 1;

pub const KVM_USER_MAX_RANGES: u16 = 16;
pub const KVM_USER_BUS_MMIO: u32 = 0;
pub const KVM_USER_BUS_PIO: u32 = 1;
/// Stores to the range wait until the backend has consumed them.
pub const KVM_USER_RANGE_NONPOSTED: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_user_range {
    pub bus: u32,
    pub flags: u32,
    pub addr: u64,
    pub len: u64,
}

pub const KVM_USER_OP_LOAD: u8 = 0;
pub const KVM_USER_OP_STORE: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_user_access {
    pub seq: u64,
    pub offset: u64,
    /// Store data: `len` bytes in access order.
    pub data: [u8; 8],
    pub vcpu: u32,
    pub range: u16,
    /// 1 to 8 (3, 5, 6, 7 for page-split accesses).
    pub len: u8,
    pub op: u8,
}

// SAFETY: integers and a byte array only, with no padding (the layout is
// asserted below): every bit pattern is a valid record.
unsafe impl vm_memory::ByteValued for kvm_user_access {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_user_reply {
    pub seq: u64,
    pub data: [u8; 8],
    /// Must be zero.
    pub flags: u64,
}

pub const KVM_USER_RING_NEED_WAKE: u32 = 1 << 0;

/// The ring's header; `records[]` follows at [`RING_RECORDS_OFFSET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct kvm_user_ring {
    pub head: u32,
    pub entries: u32,
    pub flags: u32,
    pub reserved0: [u32; 13],
    pub tail: u32,
    pub reserved1: [u32; 15],
}

pub const RING_HEAD_OFFSET: usize = 0;
pub const RING_ENTRIES_OFFSET: usize = 4;
pub const RING_FLAGS_OFFSET: usize = 8;
pub const RING_TAIL_OFFSET: usize = 64;
pub const RING_RECORDS_OFFSET: usize = 128;

pub const KVM_USER_SHADOW_MMAP_OFFSET: u64 = 1 << 32;
pub const KVM_USER_MAX_MAP_ENTRIES: u32 = 64;
/// Loads the entry serves need not wait for pending stores.
pub const KVM_USER_MAP_PASS_STORES: u32 = 1 << 0;
/// Stores the entry covers may wait a while before the backend is woken.
pub const KVM_USER_MAP_BATCH_STORES: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_user_map_entry {
    pub range: u16,
    /// Allowed load sizes: an OR of 1, 2, 4, 8 (0 with batching only).
    pub sizes: u16,
    /// `KVM_USER_MAP_*`.
    pub flags: u32,
    pub offset: u64,
    pub len: u64,
    pub shadow_offset: u64,
}

/// Header of `struct kvm_user_access_map`; `nr` entries follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct kvm_user_access_map {
    pub nr: u32,
    pub flags: u32,
}

/// The user device's ioctl type.
pub const KVM_USER_IO: u32 = 0xB9;

/// KVMIO's KVM_CREATE_DEVICE, for probing with KVM_CREATE_DEVICE_TEST:
/// kvm-ioctls' wrapper takes the (then unset) fd field as a descriptor
/// to own, and closing it would close the caller's fd 0.
pub const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(
    KVM_CREATE_DEVICE,
    KVMIO,
    0xe0,
    kvm_bindings::kvm_create_device
);

// On the device fd.
ioctl_io_nr!(KVM_USER_CREATE_BACKEND, KVM_USER_IO, 0x00);
ioctl_io_nr!(KVM_USER_DRAIN, KVM_USER_IO, 0x01);
// On the backend fd.
ioctl_iow_nr!(KVM_USER_SET_SHADOW_SIZE, KVM_USER_IO, 0x10, u64);
ioctl_iow_nr!(
    KVM_USER_SET_ACCESS_MAP,
    KVM_USER_IO,
    0x11,
    kvm_user_access_map
);
ioctl_io_nr!(KVM_USER_WAKE, KVM_USER_IO, 0x12);

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<kvm_user_range>() == 24);
    assert!(size_of::<kvm_user_access>() == 32);
    assert!(offset_of!(kvm_user_access, data) == 16);
    assert!(offset_of!(kvm_user_access, vcpu) == 24);
    assert!(offset_of!(kvm_user_access, range) == 28);
    assert!(offset_of!(kvm_user_access, len) == 30);
    assert!(offset_of!(kvm_user_access, op) == 31);
    assert!(size_of::<kvm_user_reply>() == 24);
    assert!(offset_of!(kvm_user_reply, data) == 8);
    assert!(offset_of!(kvm_user_reply, flags) == 16);
    assert!(size_of::<kvm_user_ring>() == RING_RECORDS_OFFSET);
    assert!(offset_of!(kvm_user_ring, head) == RING_HEAD_OFFSET);
    assert!(offset_of!(kvm_user_ring, entries) == RING_ENTRIES_OFFSET);
    assert!(offset_of!(kvm_user_ring, flags) == RING_FLAGS_OFFSET);
    assert!(offset_of!(kvm_user_ring, tail) == RING_TAIL_OFFSET);
    assert!(size_of::<kvm_user_map_entry>() == 32);
    assert!(offset_of!(kvm_user_map_entry, sizes) == 2);
    assert!(offset_of!(kvm_user_map_entry, flags) == 4);
    assert!(offset_of!(kvm_user_map_entry, offset) == 8);
    assert!(size_of::<kvm_user_access_map>() == 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// `_IO(KVM_USER_IO, nr)`: no direction, no size.
    fn io(nr: u32) -> libc::c_ulong {
        (KVM_USER_IO << 8 | nr).into()
    }

    /// `_IOW(KVM_USER_IO, nr, T)`: direction write (bit 30), the size in
    /// bits 16 and up.
    fn iow(nr: u32, size: usize) -> libc::c_ulong {
        (0x4000_0000 | (size as u32) << 16 | KVM_USER_IO << 8 | nr).into()
    }

    // The numbers the kernel header's _IO/_IOW macros produce.
    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(KVM_USER_CREATE_BACKEND(), io(0x00));
        assert_eq!(KVM_USER_DRAIN(), io(0x01));
        assert_eq!(KVM_USER_SET_SHADOW_SIZE(), iow(0x10, 8));
        assert_eq!(KVM_USER_SET_ACCESS_MAP(), iow(0x11, 8));
        assert_eq!(KVM_USER_WAKE(), io(0x12));
        // Spelled out once, against a slip in the helpers above.
        assert_eq!(KVM_USER_CREATE_BACKEND(), 0xb900);
        assert_eq!(KVM_CREATE_DEVICE(), 0xc00c_aee0);
        assert_eq!(KVM_USER_SET_ACCESS_MAP(), 0x4008_b911);
    }

    #[test]
    fn device_type_follows_riscv_aia() {
        assert_eq!(
            KVM_DEV_TYPE_USER,
            kvm_bindings::kvm_device_type_KVM_DEV_TYPE_RISCV_AIA + 1
        );
    }
}
