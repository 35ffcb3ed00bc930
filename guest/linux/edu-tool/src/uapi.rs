//! The driver's user interface, mirrored from
//! `guest/linux/edu-driver/kvm_userdev_edu.h` (keep the two in step; the
//! tests pin the numbers the C header yields), and an open `/dev/eduN`
//! with one safe method per ioctl.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

pub const DMA_BUFFER_SIZE: usize = 4096;

pub const IRQ_MODE_INTX: u32 = 0;
pub const IRQ_MODE_MSI: u32 = 1;

pub const FACTORIAL_IRQ: u32 = 0x1;

pub const DMA_TO_DEVICE: u32 = 0x1;
pub const DMA_FROM_DEVICE: u32 = 0x2;
pub const DMA_IRQ: u32 = 0x4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Info {
    pub id: u32,
    pub irq_mode: u32,
    pub irq: u32,
    pub index: u32,
    pub irq_count: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Liveness {
    pub value: u32,
    pub result: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Factorial {
    pub n: u32,
    pub flags: u32,
    pub result: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Irq {
    pub value: u32,
    pub seen: u32,
    pub status: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dma {
    pub addr: u64,
    pub len: u32,
    pub offset: u32,
    pub flags: u32,
    pub pad: u32,
}

const MAGIC: u32 = 0xed;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC()` of the generic (x86, arm64, riscv) encoding.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (MAGIC << 8) | nr
}

pub const IOC_INFO: u32 = ioc(IOC_READ, 0x00, size_of::<Info>());
pub const IOC_LIVENESS: u32 = ioc(IOC_READ | IOC_WRITE, 0x01, size_of::<Liveness>());
pub const IOC_FACTORIAL: u32 = ioc(IOC_READ | IOC_WRITE, 0x02, size_of::<Factorial>());
pub const IOC_IRQ: u32 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<Irq>());
pub const IOC_DMA: u32 = ioc(IOC_WRITE, 0x04, size_of::<Dma>());

/// An open `/dev/eduN`.
pub struct Edu {
    file: File,
}

impl Edu {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self { file })
    }

    /// # Safety
    ///
    /// `request` must be the driver's ioctl whose argument is a `T`, and any
    /// user memory that `arg` points to must be valid for what that ioctl
    /// does with it for the duration of the call.
    unsafe fn ioctl<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: the fd is open for the whole call; the caller vouches that
        // the kernel reads and writes exactly a `T` at `arg` (an exclusive
        // reference, so valid for both) and whatever `arg` points to.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), request as libc::Ioctl, arg as *mut T) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut info = Info::default();
        // SAFETY: EDU_IOC_INFO takes a struct edu_info; no pointers inside.
        unsafe { self.ioctl(IOC_INFO, &mut info) }?;
        Ok(info)
    }

    /// Writes `value` to the liveness register; returns what it reads.
    pub fn liveness(&self, value: u32) -> io::Result<u32> {
        let mut l = Liveness { value, result: 0 };
        // SAFETY: EDU_IOC_LIVENESS takes a struct edu_liveness; no pointers.
        unsafe { self.ioctl(IOC_LIVENESS, &mut l) }?;
        Ok(l.result)
    }

    pub fn factorial(&self, n: u32, irq: bool) -> io::Result<u32> {
        let mut f = Factorial {
            n,
            flags: if irq { FACTORIAL_IRQ } else { 0 },
            ..Default::default()
        };
        // SAFETY: EDU_IOC_FACTORIAL takes a struct edu_factorial; no pointers.
        unsafe { self.ioctl(IOC_FACTORIAL, &mut f) }?;
        Ok(f.result)
    }

    /// Raises `value`; returns the bits the handler saw and the interrupt
    /// status after it acknowledged them.
    pub fn raise(&self, value: u32) -> io::Result<(u32, u32)> {
        let mut r = Irq {
            value,
            ..Default::default()
        };
        // SAFETY: EDU_IOC_IRQ takes a struct edu_irq; no pointers inside.
        unsafe { self.ioctl(IOC_IRQ, &mut r) }?;
        Ok((r.seen, r.status))
    }

    /// Moves `data` into the device buffer at `offset`.
    pub fn dma_to_device(&self, data: &[u8], offset: u32, irq: bool) -> io::Result<()> {
        let mut d = Dma {
            addr: data.as_ptr() as u64,
            len: buf_len(data.len())?,
            offset,
            flags: DMA_TO_DEVICE | if irq { DMA_IRQ } else { 0 },
            pad: 0,
        };
        // SAFETY: EDU_IOC_DMA takes a struct edu_dma; with DMA_TO_DEVICE the
        // driver only reads `len` bytes at `addr`, which `data` provides.
        unsafe { self.ioctl(IOC_DMA, &mut d) }
    }

    /// Fills `data` from the device buffer at `offset`.
    pub fn dma_from_device(&self, data: &mut [u8], offset: u32, irq: bool) -> io::Result<()> {
        let mut d = Dma {
            addr: data.as_mut_ptr() as u64,
            len: buf_len(data.len())?,
            offset,
            flags: DMA_FROM_DEVICE | if irq { DMA_IRQ } else { 0 },
            pad: 0,
        };
        // SAFETY: EDU_IOC_DMA takes a struct edu_dma; with DMA_FROM_DEVICE
        // the driver writes up to `len` bytes at `addr`, which `data`, an
        // exclusive borrow, provides.
        unsafe { self.ioctl(IOC_DMA, &mut d) }
    }
}

fn buf_len(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the C header gives (printed by a C program that includes it).
    #[test]
    fn numbers_match_the_c_header() {
        assert_eq!(IOC_INFO, 0x8018_ed00);
        assert_eq!(IOC_LIVENESS, 0xc008_ed01);
        assert_eq!(IOC_FACTORIAL, 0xc010_ed02);
        assert_eq!(IOC_IRQ, 0xc010_ed03);
        assert_eq!(IOC_DMA, 0x4018_ed04);
    }

    #[test]
    fn sizes_match_the_c_header() {
        assert_eq!(size_of::<Info>(), 24);
        assert_eq!(size_of::<Liveness>(), 8);
        assert_eq!(size_of::<Factorial>(), 16);
        assert_eq!(size_of::<Irq>(), 16);
        assert_eq!(size_of::<Dma>(), 24);
    }

    #[test]
    fn header_defines_the_same_names() {
        let header = include_str!("../../edu-driver/kvm_userdev_edu.h");
        for line in [
            "#define EDU_IOC_MAGIC 0xED",
            "#define EDU_DMA_BUFFER_SIZE 4096",
            "#define EDU_IRQ_MODE_INTX 0",
            "#define EDU_IRQ_MODE_MSI 1",
            "#define EDU_FACTORIAL_IRQ 0x1",
            "#define EDU_DMA_TO_DEVICE 0x1",
            "#define EDU_DMA_FROM_DEVICE 0x2",
            "#define EDU_DMA_IRQ 0x4",
            "_IOR(EDU_IOC_MAGIC, 0x00, struct edu_info)",
            "_IOWR(EDU_IOC_MAGIC, 0x01, struct edu_liveness)",
            "_IOWR(EDU_IOC_MAGIC, 0x02, struct edu_factorial)",
            "_IOWR(EDU_IOC_MAGIC, 0x03, struct edu_irq)",
            "_IOW(EDU_IOC_MAGIC, 0x04, struct edu_dma)",
        ] {
            assert!(header.contains(line), "header lacks {line:?}");
        }
    }
}
