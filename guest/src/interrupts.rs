//! The IDT, interrupt entry stubs and a vector -> handler registry.
//!
//! Every gate uses IST1, so that an interrupt never lands in the red zone of
//! the code it interrupts. The common stub saves all general registers and
//! the x87/SSE state (Rust code uses SSE registers) before calling
//! `dispatch`, which handles exceptions (vectors 0..31: report and exit),
//! calls the registered handler and then signals EOI to the local APIC.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::{apic, cpu, platform, println};

/// Exceptions for which the CPU pushes an error code.
const ERROR_CODE_VECTORS: u64 = 1 << 8
    | 1 << 10
    | 1 << 11
    | 1 << 12
    | 1 << 13
    | 1 << 14
    | 1 << 17
    | 1 << 21
    | 1 << 29
    | 1 << 30;

/// Distance between entry stubs; each is at most 12 bytes.
const STUB_SIZE: usize = 16;

global_asm!(
    ".pushsection .text.interrupts, \"ax\"",
    // One stub per vector, STUB_SIZE bytes apart. Each pushes an error code
    // (0 unless the CPU pushed one) and its vector, so that all frames look
    // alike.
    ".balign {stub_size}",
    "interrupt_stubs:",
    ".set vector, 0",
    ".rept 256",
    ".balign {stub_size}",
    ".if (({error_code_vectors} >> vector) & 1) == 0",
    "push 0",
    ".endif",
    "push vector",
    "jmp interrupt_common",
    ".set vector, vector + 1",
    ".endr",
    //
    "interrupt_common:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rbp, rsp", // the InterruptFrame
    "sub rsp, 512",
    "and rsp, -16", // fxsave needs 16-byte alignment, the call too
    "fxsave [rsp]",
    "cld",
    "mov rdi, rbp",
    "call {dispatch}",
    "fxrstor [rsp]",
    "mov rsp, rbp",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "add rsp, 16", // vector and error code
    "iretq",
    ".popsection",
    stub_size = const STUB_SIZE,
    error_code_vectors = const ERROR_CODE_VECTORS,
    dispatch = sym dispatch,
);

unsafe extern "C" {
    /// The first entry stub; not callable.
    fn interrupt_stubs();
}

/// The stack of an interrupt handler when `interrupt_common` calls `dispatch`.
#[repr(C)]
struct InterruptFrame {
    /// r15 first, rax last: reverse push order.
    registers: [u64; 15],
    vector: u64,
    error_code: u64,
    // Pushed by the CPU.
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const REGISTER_NAMES: [&str; 15] = [
    "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi", "rdx", "rcx", "rbx",
    "rax",
];

/// An interrupt gate: present, DPL 0, type 0xe (interrupts stay disabled
/// while the handler runs).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attributes: u8,
    offset_middle: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attributes: 0,
        offset_middle: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn new(handler: u64) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: cpu::CODE_SELECTOR,
            ist: 1,
            type_attributes: 0x8e,
            offset_middle: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate::MISSING; 256]);

#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT with the entry stubs and loads it.
pub(crate) fn init() {
    let stubs = interrupt_stubs as *const () as usize;
    let idt = &raw mut IDT;
    // SAFETY: runs once, on the boot CPU, before any other CPU starts and
    // with interrupts disabled: nothing else uses the IDT.
    unsafe {
        for (vector, gate) in (*idt).0.iter_mut().enumerate() {
            *gate = Gate::new((stubs + vector * STUB_SIZE) as u64);
        }
    }
    load();
}

/// Loads the IDT into this CPU; `init` filled it.
pub(crate) fn load() {
    let pointer = DescriptorTablePointer {
        limit: size_of::<Idt>() as u16 - 1,
        base: (&raw const IDT).addr() as u64,
    };
    // SAFETY: the IDT's gates point at the stubs, which handle every vector.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

pub fn enable() {
    // SAFETY: the IDT and local APIC are set up (before `main` runs).
    unsafe { asm!("sti", options(nomem, nostack)) };
}

pub fn disable() {
    // SAFETY: only delays interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Runs `f` with interrupts disabled, then restores the previous state.
pub fn without_interrupts<T>(f: impl FnOnce() -> T) -> T {
    let rflags: u64;
    // SAFETY: reads RFLAGS through the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    disable();
    let result = f();
    if rflags & (1 << 9) != 0 {
        enable();
    }
    result
}

/// The registered handlers, as `fn(u8)` addresses; 0 when none.
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Interrupts that arrived on a vector without a handler.
static UNEXPECTED: AtomicU32 = AtomicU32::new(0);

/// Makes `handler` serve `vector` (32..=254). It runs with interrupts
/// disabled, on the interrupt stack; EOI follows when it returns.
pub fn set_handler(vector: u8, handler: fn(u8)) {
    assert!(
        (32..apic::SPURIOUS_VECTOR).contains(&vector),
        "vector {vector:#x} is reserved"
    );
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::SeqCst);
}

pub fn clear_handler(vector: u8) {
    HANDLERS[usize::from(vector)].store(0, Ordering::SeqCst);
}

fn handler(vector: u8) -> Option<fn(u8)> {
    match HANDLERS[usize::from(vector)].load(Ordering::SeqCst) {
        0 => None,
        // SAFETY: `set_handler` stores nothing but `fn(u8)` addresses.
        address => Some(unsafe { core::mem::transmute::<usize, fn(u8)>(address) }),
    }
}

/// How many interrupts arrived on a vector that had no handler.
pub fn unexpected_count() -> u32 {
    UNEXPECTED.load(Ordering::SeqCst)
}

extern "C" fn dispatch(frame: &InterruptFrame) {
    let vector = frame.vector as u8;
    if vector < 32 {
        exception(frame);
    }
    if vector == apic::SPURIOUS_VECTOR {
        return; // no EOI for a spurious interrupt
    }
    match handler(vector) {
        Some(handler) => handler(vector),
        None => {
            UNEXPECTED.fetch_add(1, Ordering::SeqCst);
            println!("# unexpected interrupt, vector {vector:#x}");
        }
    }
    apic::eoi();
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating-point",
    "alignment check",
    "machine check",
    "SIMD floating-point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Reports a CPU exception and ends the VM: the guest cannot go on.
fn exception(frame: &InterruptFrame) -> ! {
    let vector = frame.vector as usize;
    println!(
        "exception {vector} ({}), error code {:#x}, rip {:#x}, rsp {:#x}, rflags {:#x}",
        EXCEPTION_NAMES[vector], frame.error_code, frame.rip, frame.rsp, frame.rflags
    );
    if vector == 14 {
        let cr2: u64;
        // SAFETY: reads the page fault address.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        println!("  fault address {cr2:#x}");
    }
    for (name, value) in REGISTER_NAMES.iter().zip(frame.registers).rev() {
        println!("  {name:>3} {value:#018x}");
    }
    println!("  cs {:#x} ss {:#x}", frame.cs, frame.ss);
    platform::exit(1)
}
