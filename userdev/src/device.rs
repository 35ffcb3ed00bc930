//! The VMM's side: the KVM device fd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use kvm_bindings::{kvm_create_device, kvm_device_attr, KVM_CREATE_DEVICE_TEST};
use kvm_ioctls::{DeviceFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_val;

use crate::sys;
use crate::{Error, Result};

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
}

impl Range {
    pub fn mmio(addr: u64, len: u64) -> Self {
        Range {
            bus: Bus::Mmio,
            addr,
            len,
        }
    }

    pub fn pio(port: u16, len: u64) -> Self {
        Range {
            bus: Bus::Pio,
            addr: port.into(),
            len,
        }
    }
}

/// The device's counters (`KVM_DEV_USER_GRP_STATS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub posted_stores: u64,
    pub shadow_loads: u64,
    pub forwarded_loads: u64,
    pub timeouts: u64,
    pub dropped_stores: u64,
    pub queue_full_waits: u64,
    pub detached_loads: u64,
}

/// A `KVM_DEV_TYPE_USER` device, held by the VMM that created it. KVM
/// refuses device ioctls from other processes: the emulator gets a slave fd
/// instead ([`Master::create_slave`]).
#[derive(Debug)]
pub struct Master {
    fd: DeviceFd,
}

const TIMEOUT_MAX: Duration = Duration::from_secs(10);

impl Master {
    /// Whether `vm`'s kernel has the device type (`KVM_CREATE_DEVICE_TEST`).
    pub fn probe(vm: &VmFd) -> bool {
        let mut dev = kvm_create_device {
            type_: sys::KVM_DEV_TYPE_USER,
            fd: 0,
            flags: KVM_CREATE_DEVICE_TEST,
        };
        vm.create_device(&mut dev).is_ok()
    }

    /// Creates a device in `vm`, with no ranges and no slave.
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
        Ok(Master { fd })
    }

    /// Adds range `id` at `range`, or moves it there if it exists. Safe while
    /// vCPUs run: accesses in flight to the old place finish first.
    pub fn set_range(&self, id: u32, range: Range) -> Result<()> {
        self.write_range(id, range)
    }

    /// Removes range `id` (a no-op if it is absent).
    pub fn remove_range(&self, id: u32) -> Result<()> {
        self.write_range(id, Range::mmio(0, 0))
    }

    fn write_range(&self, id: u32, range: Range) -> Result<()> {
        if id >= sys::KVM_USER_MAX_RANGES {
            return Err(Error::RangeId(id));
        }
        let raw = sys::kvm_user_range {
            bus: match range.bus {
                Bus::Mmio => sys::KVM_USER_BUS_MMIO,
                Bus::Pio => sys::KVM_USER_BUS_PIO,
            },
            flags: 0,
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
    pub fn range(&self, id: u32) -> Result<Option<Range>> {
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
        }))
    }

    /// How long a vCPU may wait for queue space or a load's reply (1 µs to
    /// 10 s; the kernel's default is 1 s). Microsecond granularity.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        let us = timeout.as_micros();
        if us == 0 || timeout > TIMEOUT_MAX {
            return Err(Error::Timeout(timeout));
        }
        let us = us as u64;
        let attr = kvm_device_attr {
            flags: 0,
            group: sys::KVM_DEV_USER_GRP_CONFIG,
            attr: sys::KVM_DEV_USER_CONFIG_TIMEOUT_US,
            addr: &us as *const u64 as u64,
        };
        self.fd.set_device_attr(&attr).map_err(|e| Error::Os {
            op: "KVM_SET_DEVICE_ATTR(KVM_DEV_USER_CONFIG_TIMEOUT_US)",
            source: e.into(),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> Result<Stats> {
        let stat = |attr| -> Result<u64> {
            let mut v = 0u64;
            self.get_attr(
                sys::KVM_DEV_USER_GRP_STATS,
                attr,
                &mut v,
                "KVM_GET_DEVICE_ATTR(KVM_DEV_USER_GRP_STATS)",
            )?;
            Ok(v)
        };
        Ok(Stats {
            posted_stores: stat(sys::KVM_DEV_USER_STAT_POSTED_STORES)?,
            shadow_loads: stat(sys::KVM_DEV_USER_STAT_SHADOW_LOADS)?,
            forwarded_loads: stat(sys::KVM_DEV_USER_STAT_FORWARDED_LOADS)?,
            timeouts: stat(sys::KVM_DEV_USER_STAT_TIMEOUTS)?,
            dropped_stores: stat(sys::KVM_DEV_USER_STAT_DROPPED_STORES)?,
            queue_full_waits: stat(sys::KVM_DEV_USER_STAT_QUEUE_FULL_WAITS)?,
            detached_loads: stat(sys::KVM_DEV_USER_STAT_DETACHED_LOADS)?,
        })
    }

    /// Creates the slave fd to hand to an emulator (close-on-exec; pass it
    /// with `SCM_RIGHTS`). One slave at a time: [`Error::SlaveAttached`]
    /// until the previous one is released, i.e. its emulator has exited and
    /// no copy of the fd or mapping of it is left.
    pub fn create_slave(&self, nonblocking: bool) -> Result<OwnedFd> {
        let mut flags = libc::O_CLOEXEC;
        if nonblocking {
            flags |= libc::O_NONBLOCK;
        }
        // SAFETY: the ioctl takes its flags by value and returns a new fd
        // or -1; it touches no memory of ours.
        let ret = unsafe { ioctl_with_val(&self.fd, sys::KVM_USER_CREATE_SLAVE(), flags as _) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => Error::SlaveAttached,
                _ => Error::Os {
                    op: "KVM_USER_CREATE_SLAVE",
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
        // these groups writes exactly the `T` its caller passes.
        unsafe { self.fd.get_device_attr(&mut raw) }.map_err(|e| Error::Os {
            op,
            source: e.into(),
        })
    }
}

impl AsRawFd for Master {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
