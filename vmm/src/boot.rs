//! Loading a guest payload and starting it by the PVH boot protocol: a
//! 64-bit ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in 32-bit
//! protected mode without paging, `%ebx` pointing to `hvm_start_info`.
//! QEMU boots the same payloads with `-kernel`, which lets the benchmark
//! run one guest under every VMM.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::elf::start_info::hvm_start_info;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Payloads load from 1 MiB up; below it sit the boot structures.
const LOAD_START: u64 = 0x10_0000;
const START_INFO: u64 = 0x6000;
const CMDLINE: u64 = 0x7000;
const CMDLINE_MAX: usize = 0x1000;
const START_INFO_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("payload {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("payload {path}: {source}")]
    Elf {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("payload {0}: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(String),
    #[error("kernel {0}: not a bzImage (no setup header)")]
    NotBzImage(String),
    #[error("initramfs {0}: does not fit in RAM above the kernel")]
    InitrdTooBig(String),
    #[error("command line longer than {CMDLINE_MAX} bytes")]
    Cmdline,
    #[error("writing boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("setting vCPU registers: {0}")]
    Vcpu(#[from] kvm_ioctls::Error),
}

/// Loads the payload and its command line; returns the PVH entry point.
pub fn load(memory: &GuestMemoryMmap, payload: &Path, cmdline: &str) -> Result<u64, BootError> {
    let path = payload.display().to_string();
    let mut file = File::open(payload).map_err(|source| BootError::Open {
        path: path.clone(),
        source,
    })?;
    let loaded =
        Elf::load(memory, None, &mut file, Some(GuestAddress(LOAD_START))).map_err(|source| {
            BootError::Elf {
                path: path.clone(),
                source,
            }
        })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhEntry(path));
    };

    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline);
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    memory.write_slice(&line, GuestAddress(CMDLINE))?;
    let info = hvm_start_info {
        magic: START_INFO_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        ..Default::default()
    };
    // linux-loader declares hvm_start_info ByteValued.
    memory.write_obj(info, GuestAddress(START_INFO))?;
    Ok(entry.0)
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// 32-bit protected mode with flat 4 GiB segments, code at selector `cs`
/// and data at `ds`; paging and interrupts off.
pub fn set_flat_protected_mode(vcpu: &VcpuFd, cs: u16, ds: u16) -> Result<(), BootError> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = flat_segment(cs, 0xb); // execute/read, accessed
    let data = flat_segment(ds, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)?;
    Ok(())
}

/// The PVH entry state: flat 32-bit protected mode, `%ebx` pointing to the
/// start info.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), BootError> {
    set_flat_protected_mode(vcpu, 0x08, 0x10)?;
    let regs = kvm_regs {
        rip: entry,
        rbx: START_INFO,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}
