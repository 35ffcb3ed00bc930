use std::io;
use std::time::Duration;

use crate::Bus;

/// What went wrong, named after the operation and, where the kernel's answer
/// has one meaning, after that meaning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this kernel has no KVM_DEV_TYPE_USER device")]
    Unsupported(#[source] io::Error),
    #[error("range id {0} is out of bounds (ids go up to {max})", max = crate::MAX_RANGES - 1)]
    RangeId(u16),
    #[error("range {id} ({bus:?} {addr:#x}+{len:#x}) overlaps another device on that bus")]
    RangeOverlap {
        id: u16,
        bus: Bus,
        addr: u64,
        len: u64,
    },
    #[error("range {id} ({bus:?} {addr:#x}+{len:#x}) is refused: too long, wrapping, PIO above 0xffff, or a flag this kernel lacks")]
    RangeInvalid {
        id: u16,
        bus: Bus,
        addr: u64,
        len: u64,
    },
    #[error("timeout {0:?} is out of range (1 µs to 1 s)")]
    Timeout(Duration),
    #[error("{0} {1:?} is out of range (polling window: 0 to 1 ms; batch delay: 1 µs to 1 s)")]
    Config(&'static str, Duration),
    #[error("KVM_USER_CREATE_BACKEND: the device has a backend already; a new one can be created once it is released")]
    BackendAttached,
    #[error(
        "KVM_USER_DRAIN: the backend did not consume the queued accesses within the device timeout"
    )]
    DrainTimeout,
    #[error(
        "KVM_USER_DRAIN: the backend was released meanwhile; its queued accesses were dropped"
    )]
    DrainBackendReleased,
    #[error(
        "KVM_USER_DRAIN: the backend is stalled (an access timed out, no progress since): not waited for"
    )]
    DrainStalled,
    #[error("the device is gone (its VM was destroyed)")]
    DeviceGone,
    #[error(
        "KVM_USER_SET_SHADOW_SIZE: {0:#x} bytes refused: a non-zero multiple of the page size up to the device's maximum (16 MiB today)"
    )]
    ShadowSize(u64),
    #[error("KVM_USER_SET_SHADOW_SIZE: the shadow image exists already (one per backend)")]
    ShadowExists,
    #[error("shadow access of {len} bytes at {offset:#x} is outside the {size:#x}-byte image or misaligned")]
    ShadowBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("access map of {0} entries: at most {max}", max = crate::sys::KVM_USER_MAX_MAP_ENTRIES)]
    MapTooLarge(usize),
    #[error(
        "KVM_USER_SET_ACCESS_MAP: refused: an entry names a bad range, size, span or shadow offset"
    )]
    MapInvalid,
    #[error("cannot consume {n} records of the ring: {pending} are pending")]
    NotPending { n: u32, pending: u32 },
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
