//! Booting a Linux bzImage by the 32-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the protected-mode kernel at 1 MiB,
//! the zero page (`boot_params`) with the setup header, an e820 map, the
//! command line and an initramfs, and the boot CPU entered at
//! `code32_start` in flat 32-bit protected mode with `%esi` pointing to
//! the zero page. The other vCPUs wait for the guest's INIT/SIPI in the
//! in-kernel LAPIC; the MP table ([`crate::mptable`]) tells the guest
//! about them.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, CpuId};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{self, BootError};
use crate::mptable;

const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
/// Linux's COMMAND_LINE_SIZE on x86.
const CMDLINE_MAX: usize = 2048;
/// Where the kernel loads itself from (`code32_start`'s default).
const HIGH_MEMORY: u64 = 0x10_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags`: the kernel is loaded high (a bzImage).
const LOADED_HIGH: u8 = 0x01;
/// The selectors the 32-bit protocol asks for (`__BOOT_CS`, `__BOOT_DS`).
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;

/// What to boot.
#[derive(Clone, Debug)]
pub struct Linux<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// The e820 map: all of RAM but the last KiB of base memory (the MP
/// table) and the legacy video and BIOS area up to 1 MiB.
fn e820(ram_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, kind: u32| boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    vec![
        entry(0, mptable::ADDRESS, E820_RAM),
        entry(
            mptable::ADDRESS,
            HIGH_MEMORY - mptable::ADDRESS,
            E820_RESERVED,
        ),
        entry(HIGH_MEMORY, ram_size - HIGH_MEMORY, E820_RAM),
    ]
}

/// Loads the kernel, the initramfs, the command line and the zero page
/// into `memory` (`ram_size` bytes from 0); returns the entry point.
pub fn load(memory: &GuestMemoryMmap, ram_size: u64, linux: &Linux) -> Result<u64, BootError> {
    let path = linux.kernel.display().to_string();
    let mut kernel = open(linux.kernel)?;
    let loaded = BzImage::load(memory, None, &mut kernel, Some(GuestAddress(HIGH_MEMORY)))
        .map_err(|source| BootError::Elf {
            path: path.clone(),
            source,
        })?;
    let Some(hdr) = loaded.setup_header else {
        return Err(BootError::NotBzImage(path));
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HEADER_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH;

    if linux.cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline);
    }
    let mut line = linux.cmdline.as_bytes().to_vec();
    line.push(0);
    memory.write_slice(&line, GuestAddress(CMDLINE))?;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = linux.cmdline.len() as u32;

    if let Some(initrd) = linux.initrd {
        let data = std::fs::read(initrd).map_err(|source| BootError::Open {
            path: initrd.display().to_string(),
            source,
        })?;
        // As high as the kernel accepts, page-aligned, clear of the kernel.
        let top = ram_size.min(u64::from(params.hdr.initrd_addr_max) + 1);
        let addr = top.saturating_sub(data.len() as u64) & !0xfff;
        if addr < loaded.kernel_end {
            return Err(BootError::InitrdTooBig(initrd.display().to_string()));
        }
        memory.write_slice(&data, GuestAddress(addr))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = data.len() as u32;
    }

    let map = e820(ram_size);
    params.e820_table[..map.len()].copy_from_slice(&map);
    params.e820_entries = map.len() as u8;
    memory.write_obj(params, GuestAddress(ZERO_PAGE))?;
    Ok(u64::from(params.hdr.code32_start))
}

/// The boot CPU's state at the 32-bit entry.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), BootError> {
    boot::set_flat_protected_mode(vcpu, BOOT_CS, BOOT_DS)?;
    let regs = kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// CPUID for vCPU `index` of `count`: KVM's supported leaves with this
/// vCPU's APIC id, so that each processor the MP table lists finds itself.
pub fn cpuid_for(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC id, [23:16] logical processors.
                e.ebx = (e.ebx & 0xffff) | u32::from(count) << 16 | u32::from(index) << 24;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            // x2APIC topology: EDX is this processor's x2APIC id.
            0xb | 0x1f => e.edx = index.into(),
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_mp_table() {
        let map = e820(256 << 20);
        assert_eq!(map.len(), 3);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIGH_MEMORY - mptable::ADDRESS));
        let reserved = map[1];
        assert!(reserved.addr <= mptable::ADDRESS);
        assert!(reserved.addr + reserved.size >= mptable::ADDRESS + mptable::SIZE);
    }
}
