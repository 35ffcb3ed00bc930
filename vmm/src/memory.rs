//! Guest RAM in a memfd, so that emulators can map it for DMA.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use emulator::handoff::MemRegion;

/// Guest RAM from address 0, in one shared memory file.
pub struct Ram {
    pub memory: GuestMemoryMmap,
    file: Arc<File>,
    size: u64,
}

impl Ram {
    /// `size` bytes of RAM, mapped here and registered as slot 0 of `vm`.
    pub fn new(vm: &VmFd, size: u64) -> io::Result<Self> {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is new.
        let fd = unsafe { libc::memfd_create(c"kvm-userdev-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .map_err(io::Error::other)?;
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(io::Error::other)?;
            let slot = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is mapped for as long as `memory` lives,
            // and `Ram` outlives the VM's use of it (the VM is dropped first
            // or with it).
            unsafe { vm.set_user_memory_region(slot) }.map_err(io::Error::from)?;
        }
        Ok(Ram { memory, file, size })
    }

    /// The memory file, to hand to emulators.
    pub fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The layout of the memory file for the handoff.
    pub fn layout(&self) -> Vec<MemRegion> {
        vec![MemRegion {
            guest_addr: 0,
            len: self.size,
            file_offset: 0,
        }]
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memory file itself, for a snapshot to read.
    pub fn memory_file(&self) -> &File {
        &self.file
    }
}
