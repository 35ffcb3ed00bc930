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
    RangeId(u32),
    #[error("range {id} ({bus:?} {addr:#x}+{len:#x}) overlaps another device on that bus")]
    RangeOverlap {
        id: u32,
        bus: Bus,
        addr: u64,
        len: u64,
    },
    #[error("range {id} ({bus:?} {addr:#x}+{len:#x}) is refused: too long, wrapping, or PIO above 0xffff")]
    RangeInvalid {
        id: u32,
        bus: Bus,
        addr: u64,
        len: u64,
    },
    #[error("timeout {0:?} is out of range (1 µs to 10 s)")]
    Timeout(Duration),
    #[error("the device already has a slave attached; it can be replaced once released")]
    SlaveAttached,
    #[error("the device is gone (its VM was destroyed)")]
    DeviceGone,
    #[error(
        "shadow image of {0:#x} bytes refused: a non-zero multiple of the page size up to 16 MiB"
    )]
    ShadowSize(u64),
    #[error("the shadow image exists already (one per slave)")]
    ShadowExists,
    #[error("shadow access of {len} bytes at {offset:#x} is outside the {size:#x}-byte image or misaligned")]
    ShadowBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("access map of {0} entries: at most {max}", max = crate::sys::KVM_USER_MAX_MAP_ENTRIES)]
    MapTooLarge(usize),
    #[error("access map refused: an entry names a bad range, size, span or shadow offset")]
    MapInvalid,
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn os(op: &'static str) -> Self {
        Error::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }
}
