//! A minimal runtime for freestanding x86-64 test guests.
//!
//! A program built on it is an ELF image that QEMU or our VMM boots with the
//! PVH boot protocol (see `boot`). The runtime switches to long mode with the
//! low 4 GiB identity-mapped, installs interrupt handling, masks the legacy
//! PICs, enables the local APIC and then calls the program's entry point,
//! named with [`entry!`], with the kernel command line:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! use kvm_userdev_guest::{entry, platform, println};
//!
//! entry!(main);
//!
//! fn main(cmdline: &'static str) -> ! {
//!     println!("hello, {cmdline}");
//!     platform::exit(0)
//! }
//! ```
//!
//! Everything runs on one vCPU, except what a program hands a second one
//! with [`smp::SecondCpu`]. Guest physical addresses equal virtual
//! addresses, so the address of a static is also what a device uses for DMA.
//! The image, its stacks and buffers stay below 16 MiB; the VMM must give the
//! guest at least 64 MiB of RAM from address 0.

#![no_std]

pub mod apic;
mod boot;
pub mod console;
pub mod cpu;
pub mod dma;
pub mod interrupts;
pub mod io;
mod mem;
pub mod mmio;
pub mod pci;
pub mod platform;
pub mod smp;

/// Names the program's entry point, a `fn(cmdline: &'static str) -> !`.
///
/// The runtime calls it once everything is set up, with interrupts enabled.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(export_name = "kvm_userdev_guest_main")]
        fn __kvm_userdev_guest_main(cmdline: &'static str) -> ! {
            let main: fn(&'static str) -> ! = $main;
            main(cmdline)
        }
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    interrupts::disable();
    match info.location() {
        Some(location) => println!("panic at {location}: {}", info.message()),
        None => println!("panic: {}", info.message()),
    }
    platform::exit(1)
}
