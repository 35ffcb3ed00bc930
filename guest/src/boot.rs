//! PVH entry: from 32-bit protected mode to Rust in 64-bit long mode.
//!
//! The loader (QEMU's PVH option ROM, or our VMM) finds the entry point in the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note and jumps there in 32-bit protected mode
//! with paging off, flat segments, interrupts off and EBX pointing at
//! `struct hvm_start_info`. `pvh_entry` loads our GDT, enables PAE paging
//! with the static page tables below and long mode, jumps to 64-bit code,
//! zeroes .bss, switches to the boot stack and calls `rust_start`.
//!
//! The second CPU (see `smp`) starts in real mode at a copy of
//! `ap_trampoline` below 1 MiB, switches to 32-bit protected mode and joins
//! `pvh_entry` with [`AP_MARKER`] in place of the start info; in long mode
//! it takes its own stack and calls `smp::ap_start` instead.

use core::arch::global_asm;
use core::slice;

use crate::{apic, cpu, interrupts, println};

// Cargo cannot tell that linking depends on guest.ld, which only the
// rustflags name; including it makes it a dependency of this crate.
const _: &str = include_str!("../guest.ld");

const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the second CPU has in `%ebx` at `pvh_entry`: no start info is
/// there (the top of the 32-bit space is the local APIC's and firmware's).
const AP_MARKER: u32 = 0xffff_ffff;

const CR0_PE: u32 = 1 << 0;

const CR0_MP: u32 = 1 << 1; // SSE: monitor coprocessor
const CR0_EM: u32 = 1 << 2; // SSE: no x87 emulation
const CR0_TS: u32 = 1 << 3;
const CR0_NE: u32 = 1 << 5;
const CR0_PG: u32 = 1 << 31;
const CR4_PAE: u32 = 1 << 5;
const CR4_OSFXSR: u32 = 1 << 9; // fxsave/fxrstor and SSE enabled
const CR4_OSXMMEXCPT: u32 = 1 << 10; // SSE exceptions raise #XM
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_LARGE: u64 = 1 << 7; // a 2 MiB page, in a page directory entry

/// From here to 4 GiB: PCI memory (our BARs), the IOAPIC and the local APIC.
/// Mapped uncached, so that no access is combined, prefetched or delayed.
const MMIO_START: u64 = 0xc000_0000;

global_asm!(
    // The PVH note.
    ".pushsection .note.Xen, \"a\", @note",
    ".balign 4",
    ".long 4", // name size
    ".long 4", // descriptor size
    ".long {phys32_entry}",
    ".asciz \"Xen\"",
    ".long pvh_entry", // descriptor: the 32-bit physical entry address
    ".popsection",
    //
    // Page tables identity-mapping 0..4 GiB with 2 MiB pages: one PML4 entry,
    // four PDPT entries, four page directories.
    ".pushsection .data.page_tables, \"aw\"",
    ".balign 4096",
    "boot_pml4:",
    ".quad boot_pdpt + {table}",
    ".fill 511, 8, 0",
    "boot_pdpt:",
    ".quad boot_pd + {table}",
    ".quad boot_pd + 0x1000 + {table}",
    ".quad boot_pd + 0x2000 + {table}",
    ".quad boot_pd + 0x3000 + {table}",
    ".fill 508, 8, 0",
    "boot_pd:",
    ".set page, 0",
    ".rept 2048",
    ".if page < {mmio_start}",
    ".quad page + {ram_page}",
    ".else",
    ".quad page + {mmio_page}",
    ".endif",
    ".set page, page + 0x200000",
    ".endr",
    "boot_gdt_pointer:",
    ".word {gdt_size} - 1",
    ".quad {gdt}",
    ".popsection",
    //
    ".pushsection .text.boot, \"ax\"",
    ".code32",
    ".global pvh_entry",
    "pvh_entry:",
    "cld",
    "mov esi, ebx", // hvm_start_info, for rust_start
    "lgdt [boot_gdt_pointer]",
    "mov ax, {data_selector}",
    "mov ds, ax",
    "mov es, ax",
    "mov fs, ax",
    "mov gs, ax",
    "mov ss, ax",
    "mov eax, cr4",
    "or eax, {cr4_set}",
    "mov cr4, eax",
    "mov eax, offset boot_pml4",
    "mov cr3, eax",
    "mov ecx, {msr_efer}",
    "rdmsr",
    "or eax, {efer_lme}",
    "wrmsr",
    "mov eax, cr0",
    "and eax, {cr0_clear}",
    "or eax, {cr0_set}",
    "mov cr0, eax", // paging on: now in compatibility mode
    "ljmp {code_selector}, offset boot_long_mode",
    ".code64",
    "boot_long_mode:",
    "cmp esi, {ap_marker}",
    "je 2f",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "xor eax, eax",
    "rep stosb",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "mov edi, esi",
    "call {rust_start}",
    "ud2",
    "2:",
    "lea rsp, [rip + {ap_stack} + {ap_stack_size}]",
    "call {ap_start}",
    "ud2",
    ".popsection",
    //
    // The second CPU's real-mode start, copied below 1 MiB by `smp` (its
    // start-up IPI's vector names the page): CS is that page, IP 0, so the
    // trampoline addresses its own data relative to CS. Data segments are
    // loaded before the jump: pvh_entry reads memory above 1 MiB, beyond the
    // 64 KiB limit of the real-mode segments that INIT left.
    ".pushsection .rodata.ap_trampoline, \"a\"",
    ".balign 16",
    ".global ap_trampoline",
    "ap_trampoline:",
    ".code16",
    "jmp 2f",
    // At offset 8, where the lgdt below looks. A 16-bit lgdt takes 24 bits
    // of base: the GDT lies below 16 MiB.
    ".balign 8",
    ".word {gdt_size} - 1",
    ".long {gdt}",
    "2:",
    "cli",
    "lgdt cs:[8]",
    "mov eax, cr0",
    "or eax, {cr0_pe}",
    "mov cr0, eax",
    "mov ax, {data_selector}",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov ebx, {ap_marker}",
    // ljmp with a 32-bit offset: pvh_entry lies above 64 KiB.
    ".byte 0x66, 0xea",
    ".long pvh_entry",
    ".word {code32_selector}",
    // Back to what the assembler expects of the blocks that follow.
    ".code64",
    ".global ap_trampoline_end",
    "ap_trampoline_end:",
    ".popsection",
    phys32_entry = const XEN_ELFNOTE_PHYS32_ENTRY,
    table = const PTE_PRESENT | PTE_WRITABLE,
    mmio_start = const MMIO_START,
    ram_page = const PTE_PRESENT | PTE_WRITABLE | PTE_LARGE,
    mmio_page = const PTE_PRESENT | PTE_WRITABLE | PTE_LARGE | PTE_PWT | PTE_PCD,
    gdt_size = const size_of::<[u64; cpu::GDT_ENTRIES]>(),
    gdt = sym cpu::GDT,
    data_selector = const cpu::DATA_SELECTOR,
    code_selector = const cpu::CODE_SELECTOR,
    cr4_set = const CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
    msr_efer = const MSR_EFER,
    efer_lme = const EFER_LME,
    cr0_clear = const !(CR0_EM | CR0_TS),
    cr0_set = const CR0_PG | CR0_MP | CR0_NE,
    stack = sym cpu::BOOT_STACK,
    stack_size = const cpu::BOOT_STACK_SIZE,
    rust_start = sym rust_start,
    ap_marker = const AP_MARKER,
    ap_stack = sym cpu::AP_STACK,
    ap_stack_size = const cpu::AP_STACK_SIZE,
    ap_start = sym crate::smp::ap_start,
    cr0_pe = const CR0_PE,
    code32_selector = const cpu::CODE32_SELECTOR,
);

unsafe extern "Rust" {
    /// The program's entry point, defined with `entry!`.
    safe fn kvm_userdev_guest_main(cmdline: &'static str) -> !;
}

/// Called by `pvh_entry` in long mode, on the boot stack, interrupts off.
extern "C" fn rust_start(start_info: u32) -> ! {
    cpu::init(0);
    interrupts::init();
    apic::init();
    interrupts::enable();
    kvm_userdev_guest_main(command_line(start_info))
}

/// The start of `struct hvm_start_info`, as far as we use it.
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
}

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_COMMAND_LINE: usize = 4096;

/// The NUL-terminated command line that the PVH start info points to, cut at
/// the first invalid UTF-8 byte.
fn command_line(start_info: u32) -> &'static str {
    if start_info == 0 {
        return "";
    }
    // SAFETY: the boot protocol puts the start info in RAM (identity-mapped)
    // outside our image; nothing writes it while we run.
    let info = unsafe { (start_info as usize as *const StartInfo).read() };
    if info.magic != START_INFO_MAGIC {
        println!("# bad PVH start info magic {:#x}", info.magic);
        return "";
    }
    if info.cmdline_paddr == 0 {
        return "";
    }
    let start = info.cmdline_paddr as usize as *const u8;
    // SAFETY: as for the start info; we read no further than its NUL (or
    // MAX_COMMAND_LINE bytes).
    let bytes = unsafe {
        let mut len = 0;
        while len < MAX_COMMAND_LINE && start.add(len).read() != 0 {
            len += 1;
        }
        slice::from_raw_parts(start, len)
    };
    match core::str::from_utf8(bytes) {
        Ok(line) => line,
        Err(error) => core::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default(),
    }
}
