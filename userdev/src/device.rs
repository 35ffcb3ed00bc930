//! The VMM's side: the KVM device fd, which creates the backend fd an
//! emulator serves.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use kvm_bindings::{kvm_create_device, kvm_device_attr, KVM_CREATE_DEVICE_TEST};
use kvm_ioctls::{DeviceFd, VmFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

use crate::stats::COUNTERS;
use crate::sys;
use crate::{Error, Result, Stats};

/// The bus a range lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    Mmio,
    Pio,
}

/// Where one of the device's ranges sits in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub bus: Bus,
    pub addr: u64,
    pub len: u64,
    /// Stores to the range are not posted: the storing vCPU waits until the
    /// backend has consumed the store (`KVM_USER_RANGE_NONPOSTED`; needs
    /// [`Features::NONPOSTED`]).
    pub nonposted: bool,
}

impl Range {
    /// A range of MMIO space, stores posted.
    pub fn mmio(addr: u64, len: u64) -> Self {
        Range {
            bus: Bus::Mmio,
            addr,
            len,
            nonposted: false,
        }
    }

    /// A range of port I/O space, stores posted.
    pub fn pio(port: u16, len: u64) -> Self {
        Range {
            bus: Bus::Pio,
            addr: port.into(),
            len,
            nonposted: false,
        }
    }

    /// The same range with stores that wait until they are consumed.
    pub fn nonposted(self) -> Self {
        Range {
            nonposted: true,
            ..self
        }
    }
}

/// Optional behaviour the kernel's device has (`KVM_DEV_USER_INFO_FEATURES`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features(u64);

impl Features {
    /// Ranges may be non-posted ([`Range::nonposted`]).
    pub const NONPOSTED: Features = Features(sys::KVM_USER_F_NONPOSTED);
    /// Access map entries may let loads pass pending stores.
    pub const PASS_STORES: Features = Features(sys::KVM_USER_F_PASS_STORES);
    /// Access map entries may batch stores.
    pub const BATCH_STORES: Features = Features(sys::KVM_USER_F_BATCH_STORES);
    /// A released backend's queue can wait for the next backend.
    pub const KEEP_QUEUE: Features = Features(sys::KVM_USER_F_KEEP_QUEUE);

    pub fn from_bits(bits: u64) -> Self {
        Features(bits)
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A `KVM_DEV_TYPE_USER` device (its device fd), held by the VMM that
/// created it. KVM refuses device ioctls from other processes: the emulator
/// gets a backend fd instead ([`UserDevice::create_backend`]).
#[derive(Debug)]
pub struct UserDevice {
    fd: DeviceFd,
}

const TIMEOUT_MAX: Duration = Duration::from_secs(1);
const POLL_MAX: Duration = Duration::from_millis(1);

impl UserDevice {
    /// Whether `vm`'s kernel has the device type (`KVM_CREATE_DEVICE_TEST`).
    pub fn probe(vm: &VmFd) -> bool {
        let mut dev = kvm_create_device {
            type_: sys::KVM_DEV_TYPE_USER,
            fd: 0,
            flags: KVM_CREATE_DEVICE_TEST,
        };
        // Not VmFd::create_device: it would wrap the fd field, which a test
        // leaves 0, in a File and close our stdin when dropping it.
        // SAFETY: the ioctl reads and writes `dev`, which outlives it.
        let ret = unsafe { ioctl_with_mut_ref(vm, sys::KVM_CREATE_DEVICE(), &mut dev) };
        ret == 0
    }

    /// Creates a device in `vm`, with no ranges and no backend.
    pub fn create(vm: &VmFd) -> Result<Self> {
        let mut dev = kvm_create_device {
            type_: sys::KVM_DEV_TYPE_USER,
            fd: 0,
            flags: 0,
        };
        let fd = vm.create_device(&mut dev).map_err(|e| match e.errno() {
            libc::ENODEV => Error::Unsupported(e.into()),
            _ => Error::Os {
                op: "KVM_CREATE_DEVICE(KVM_DEV_TYPE_USER)",
                source: e.into(),
            },
        })?;
        Ok(UserDevice { fd })
    }

    /// Adds range `id` at `range`, or moves it there if it exists. Safe while
    /// vCPUs run: accesses in flight to the old place finish first.
    pub fn set_range(&self, id: u16, range: Range) -> Result<()> {
        self.write_range(id, range)
    }

    /// Removes range `id` (a no-op if it is absent).
    pub fn remove_range(&self, id: u16) -> Result<()> {
        self.write_range(id, Range::mmio(0, 0))
    }

    fn write_range(&self, id: u16, range: Range) -> Result<()> {
        if id >= sys::KVM_USER_MAX_RANGES {
            return Err(Error::RangeId(id));
        }
        let raw = sys::kvm_user_range {
            bus: match range.bus {
                Bus::Mmio => sys::KVM_USER_BUS_MMIO,
                Bus::Pio => sys::KVM_USER_BUS_PIO,
            },
            flags: if range.nonposted {
                sys::KVM_USER_RANGE_NONPOSTED
            } else {
                0
            },
            addr: range.addr,
            len: range.len,
        };
        let attr = kvm_device_attr {
            flags: 0,
            group: sys::KVM_DEV_USER_GRP_RANGE,
            attr: id.into(),
            addr: &raw as *const _ as u64,
        };
        self.fd.set_device_attr(&attr).map_err(|e| {
            let (bus, addr, len) = (range.bus, range.addr, range.len);
            match e.errno() {
                libc::EEXIST => Error::RangeOverlap { id, bus, addr, len },
                libc::EINVAL => Error::RangeInvalid { id, bus, addr, len },
                _ => Error::Os {
                    op: "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_GRP_RANGE)",
                    source: e.into(),
                },
            }
        })
    }

    /// Where range `id` is, `None` if absent.
    pub fn range(&self, id: u16) -> Result<Option<Range>> {
        if id >= sys::KVM_USER_MAX_RANGES {
            return Err(Error::RangeId(id));
        }
        let mut raw = sys::kvm_user_range::default();
        self.get_attr(
            sys::KVM_DEV_USER_GRP_RANGE,
            id.into(),
            &mut raw,
            "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_GRP_RANGE)",
        )?;
        if raw.len == 0 {
            return Ok(None);
        }
        let bus = if raw.bus == sys::KVM_USER_BUS_PIO {
            Bus::Pio
        } else {
            Bus::Mmio
        };
        Ok(Some(Range {
            bus,
            addr: raw.addr,
            len: raw.len,
            nonposted: raw.flags & sys::KVM_USER_RANGE_NONPOSTED != 0,
        }))
    }

    /// How long a vCPU may wait for queue space or a load's reply, and
    /// [`UserDevice::drain`] for the backend (1 µs to 1 s; the kernel's
    /// default is 100 ms). Microsecond granularity.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        let us = timeout.as_micros();
        if us == 0 || timeout > TIMEOUT_MAX {
            return Err(Error::Timeout(timeout));
        }
        self.set_config(
            sys::KVM_DEV_USER_CONFIG_TIMEOUT_US,
            us as u64,
            "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_TIMEOUT_US)",
        )
    }

    /// The longest a vCPU polls for a forwarded load's reply before it
    /// sleeps, when the backend runs on another CPU (0 to 1 ms, nanosecond
    /// granularity; the kernel's default is 50 µs; zero never polls).
    pub fn set_poll(&self, poll: Duration) -> Result<()> {
        if poll > POLL_MAX {
            return Err(Error::Config("polling window", poll));
        }
        self.set_config(
            sys::KVM_DEV_USER_CONFIG_POLL_NS,
            poll.as_nanos() as u64,
            "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_POLL_NS)",
        )
    }

    /// Whether a forwarded load and its reply wake the other side on the
    /// waker's CPU (the kernel's default: on).
    pub fn set_handoff(&self, on: bool) -> Result<()> {
        self.set_config(
            sys::KVM_DEV_USER_CONFIG_HANDOFF,
            on as u64,
            "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_HANDOFF)",
        )
    }

    /// The longest a batched store waits before a sleeping backend is
    /// woken (1 µs to 1 s; the kernel's default is 100 µs).
    pub fn set_batch_delay(&self, delay: Duration) -> Result<()> {
        let us = delay.as_micros();
        if us == 0 || delay > TIMEOUT_MAX {
            return Err(Error::Config("batch delay", delay));
        }
        self.set_config(
            sys::KVM_DEV_USER_CONFIG_BATCH_US,
            us as u64,
            "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_BATCH_US)",
        )
    }

    /// Whether releasing the backend keeps its queue for the next one (the
    /// kernel's default) or drops it: stores lost, waiting loads failed.
    pub fn set_keep_queue(&self, keep: bool) -> Result<()> {
        self.set_config(
            sys::KVM_DEV_USER_CONFIG_RELEASE,
            if keep {
                sys::KVM_USER_RELEASE_KEEP
            } else {
                sys::KVM_USER_RELEASE_DROP
            },
            "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_RELEASE)",
        )
    }

    fn set_config(&self, attr: u64, value: u64, op: &'static str) -> Result<()> {
        let attr = kvm_device_attr {
            flags: 0,
            group: sys::KVM_DEV_USER_GRP_CONFIG,
            attr,
            addr: &value as *const u64 as u64,
        };
        self.fd.set_device_attr(&attr).map_err(|e| Error::Os {
            op,
            source: e.into(),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        for (field, (_, attr)) in stats.fields_mut().into_iter().zip(COUNTERS) {
            self.get_attr(
                sys::KVM_DEV_USER_GRP_STATS,
                attr,
                field,
                "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_GRP_STATS)",
            )?;
        }
        Ok(stats)
    }

    /// Optional behaviour this kernel's device has.
    pub fn features(&self) -> Result<Features> {
        self.info(
            sys::KVM_DEV_USER_INFO_FEATURES,
            "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_INFO_FEATURES)",
        )
        .map(Features)
    }

    /// Records the backend's ring holds.
    pub fn ring_entries(&self) -> Result<u64> {
        self.info(
            sys::KVM_DEV_USER_INFO_RING_ENTRIES,
            "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_INFO_RING_ENTRIES)",
        )
    }

    /// Bytes of the backend's ring mapping (header and records, page
    /// aligned).
    pub fn ring_mmap_size(&self) -> Result<u64> {
        self.info(
            sys::KVM_DEV_USER_INFO_RING_MMAP_SIZE,
            "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_INFO_RING_MMAP_SIZE)",
        )
    }

    /// The largest shadow image a backend may create.
    pub fn max_shadow_size(&self) -> Result<u64> {
        self.info(
            sys::KVM_DEV_USER_INFO_MAX_SHADOW_SIZE,
            "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_INFO_MAX_SHADOW_SIZE)",
        )
    }

    fn info(&self, attr: u64, op: &'static str) -> Result<u64> {
        let mut v = 0u64;
        self.get_attr(sys::KVM_DEV_USER_GRP_INFO, attr, &mut v, op)?;
        Ok(v)
    }

    /// Waits until the backend has consumed every access queued before the
    /// call, bounded by the device's timeout: what a VMM calls before it
    /// acts on something that must not pass the guest's posted stores (a
    /// PCI configuration write, say). [`Error::DrainTimeout`] if the
    /// backend was too slow, [`Error::DrainStalled`] at once if it is
    /// stalled, [`Error::DrainBackendReleased`] if it went
    /// away meanwhile (its accesses were dropped and counted); with no
    /// backend, nothing is queued and this returns at once.
    pub fn drain(&self) -> Result<()> {
        // SAFETY: the ioctl takes no argument (0) and touches no memory of
        // ours.
        let ret = unsafe { ioctl_with_val(&self.fd, sys::KVM_USER_DRAIN(), 0) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ETIMEDOUT) => Error::DrainTimeout,
                Some(libc::ENODEV) => Error::DrainBackendReleased,
                Some(libc::EAGAIN) => Error::DrainStalled,
                _ => Error::Os {
                    op: "KVM_USER_DRAIN",
                    source: e,
                },
            });
        }
        Ok(())
    }

    /// Creates the backend fd to hand to an emulator (close-on-exec; pass
    /// it with `SCM_RIGHTS`), which takes it with [`crate::Backend::new`].
    /// One backend at a time: [`Error::BackendAttached`] until the previous
    /// one is released, i.e. its emulator has exited and no copy of the fd
    /// or mapping of it is left.
    pub fn create_backend(&self, nonblocking: bool) -> Result<OwnedFd> {
        let mut flags = libc::O_CLOEXEC;
        if nonblocking {
            flags |= libc::O_NONBLOCK;
        }
        // SAFETY: the ioctl takes its flags by value and returns a new fd
        // or -1; it touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.fd, sys::KVM_USER_CREATE_BACKEND(), flags as _) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => Error::BackendAttached,
                _ => Error::Os {
                    op: "KVM_USER_CREATE_BACKEND",
                    source: e,
                },
            });
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(ret) })
    }

    fn get_attr<T>(&self, group: u32, attr: u64, out: &mut T, op: &'static str) -> Result<()> {
        let mut raw = kvm_device_attr {
            flags: 0,
            group,
            attr,
            addr: out as *mut T as u64,
        };
        // SAFETY: `addr` points to `out`, a live `T`, and every attribute of
        // these groups writes exactly the `T` its caller passes (a range
        // record, or a u64).
        unsafe { self.fd.get_device_attr(&mut raw) }.map_err(|e| Error::Os {
            op,
            source: e.into(),
        })
    }
}

impl AsRawFd for UserDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_posted_unless_asked() {
        let r = Range::mmio(0xe000_0000, 0x1000);
        assert!(!r.nonposted);
        assert!(r.nonposted().nonposted);
        assert_eq!(r.nonposted().addr, 0xe000_0000);
        assert!(!Range::pio(0x3f8, 8).nonposted);
    }

    #[test]
    fn features() {
        let f = Features::from_bits(sys::KVM_USER_F_NONPOSTED | 1 << 5);
        assert!(f.contains(Features::NONPOSTED));
        assert!(!Features::default().contains(Features::NONPOSTED));
        assert_eq!(f.bits(), 0x21);
    }
}
