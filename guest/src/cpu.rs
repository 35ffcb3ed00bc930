//! The CPU: descriptor tables, stacks, time stamp counter, CPUID.

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, CpuidResult};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU64, Ordering};

/// GDT selectors.
pub(crate) const CODE_SELECTOR: u16 = 0x08;
pub(crate) const DATA_SELECTOR: u16 = 0x10;
/// 32-bit code, for the second CPU's way from real mode to long mode.
pub(crate) const CODE32_SELECTOR: u16 = 0x18;
/// Each CPU's TSS (two entries each).
const TSS_SELECTORS: [u16; CPUS] = [0x20, 0x30];

/// The CPUs the runtime can run on: the boot CPU and one more (see `smp`).
pub(crate) const CPUS: usize = 2;

/// 64-bit code: present, DPL 0, execute/read, long mode (L), 4 KiB granularity.
const CODE64_DESCRIPTOR: u64 = 0x00af_9a00_0000_ffff;
/// Flat 4 GiB data: present, DPL 0, read/write, 32-bit, 4 KiB granularity.
/// The 32-bit boot code uses it too.
const DATA_DESCRIPTOR: u64 = 0x00cf_9200_0000_ffff;
/// Flat 4 GiB 32-bit code: present, DPL 0, execute/read, 4 KiB granularity.
const CODE32_DESCRIPTOR: u64 = 0x00cf_9a00_0000_ffff;

pub(crate) const GDT_ENTRIES: usize = 8;

/// The GDT. The boot code loads it; `init` adds each CPU's TSS descriptor
/// (two entries) before loading its task register.
pub(crate) static mut GDT: [u64; GDT_ENTRIES] = [
    0,
    CODE64_DESCRIPTOR,
    DATA_DESCRIPTOR,
    CODE32_DESCRIPTOR,
    0,
    0,
    0,
    0,
];

#[repr(C, align(16))]
pub(crate) struct Stack<const N: usize>([u8; N]);

pub(crate) const BOOT_STACK_SIZE: usize = 128 * 1024;
pub(crate) const AP_STACK_SIZE: usize = 64 * 1024;
const INTERRUPT_STACK_SIZE: usize = 32 * 1024;

/// The stack `main` runs on (set up by the boot code).
pub(crate) static mut BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack([0; BOOT_STACK_SIZE]);

/// The stack the second CPU runs on (set up by the boot code).
pub(crate) static mut AP_STACK: Stack<AP_STACK_SIZE> = Stack([0; AP_STACK_SIZE]);

/// The stack every interrupt and exception runs on (IST1), one per CPU.
/// Rust code may use the 128-byte red zone below its stack pointer, which
/// an interrupt frame pushed onto the same stack would overwrite.
static mut INTERRUPT_STACKS: [Stack<INTERRUPT_STACK_SIZE>; CPUS] =
    [const { Stack([0; INTERRUPT_STACK_SIZE]) }; CPUS];

/// The 64-bit task state segment: only the interrupt stack table is used.
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static mut TSS: [Tss; CPUS] = [const {
    Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        // Past the end of the TSS: no I/O permission bitmap.
        iomap_base: size_of::<Tss>() as u16,
    }
}; CPUS];

/// Builds the two GDT entries of an available 64-bit TSS at `base`.
fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = size_of::<Tss>() as u64 - 1;
    let low = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, DPL 0, type 9: available 64-bit TSS
        | (limit >> 16 & 0xf) << 48
        | (base >> 24 & 0xff) << 56;
    [low, base >> 32]
}

/// Points IST1 of CPU `cpu`'s TSS at its interrupt stack and loads its
/// task register. Each CPU calls it once, for itself.
pub(crate) fn init(cpu: usize) {
    assert!(cpu < CPUS);
    // The top of the cpu'th stack; the array holds them back to back.
    let stack = (&raw const INTERRUPT_STACKS).addr() + (cpu + 1) * INTERRUPT_STACK_SIZE;
    let tss = (&raw mut TSS).cast::<Tss>().wrapping_add(cpu);
    let [low, high] = tss_descriptor(tss.addr() as u64);
    let selector = TSS_SELECTORS[cpu];
    let entry = usize::from(selector) / 8;
    // SAFETY: runs once per CPU, on that CPU, with its interrupts off:
    // nothing else uses this CPU's TSS or its GDT entries, which no other
    // CPU's selector refers to. The descriptor describes that TSS.
    unsafe {
        (*tss).ist[0] = stack as u64;
        GDT[entry] = low;
        GDT[entry + 1] = high;
        asm!("ltr {0:x}", in(reg) selector, options(nostack, preserves_flags));
    }
}

/// Stops this vCPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, `hlt` only waits for an NMI or reset.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads the time stamp counter; the fences keep earlier instructions from
/// finishing after it and later ones from starting before it.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only reads the TSC. No `nomem`, so that the compiler does not
    // move memory accesses across it either.
    unsafe {
        asm!("lfence", "rdtsc", "lfence", out("eax") low, out("edx") high, options(nostack, preserves_flags));
    }
    u64::from(high) << 32 | u64::from(low)
}

/// Executes CPUID for `leaf` and `subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// TSC frequency in kHz, 0 until first asked.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// What timeouts assume when no CPUID leaf gives the TSC frequency: on the
/// high side, so that they rather last too long.
const GUESSED_TSC_KHZ: u64 = 3_000_000;

/// The TSC frequency in kHz and where it comes from.
///
/// Tried in order: CPUID 0x15 (TSC/crystal ratio), 0x16 (base frequency) and
/// the hypervisor timing leaf 0x4000_0010 (TSC kHz in EAX), else a guess.
pub fn tsc_khz_source() -> (u64, &'static str) {
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let leaf = cpuid(0x15, 0);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            let khz = u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000;
            return (khz, "cpuid 0x15");
        }
    }
    if max_leaf >= 0x16 {
        let mhz = cpuid(0x16, 0).eax & 0xffff;
        if mhz != 0 {
            return (u64::from(mhz) * 1000, "cpuid 0x16");
        }
    }
    let hypervisor = cpuid(1, 0).ecx & 1 << 31 != 0;
    if hypervisor && cpuid(0x4000_0000, 0).eax >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0).eax;
        if khz != 0 {
            return (u64::from(khz), "cpuid 0x40000010");
        }
    }
    (GUESSED_TSC_KHZ, "guessed")
}

pub fn tsc_khz() -> u64 {
    match TSC_KHZ.load(Ordering::Relaxed) {
        0 => {
            let (khz, _) = tsc_khz_source();
            TSC_KHZ.store(khz, Ordering::Relaxed);
            khz
        }
        khz => khz,
    }
}

/// A point in time, `ms` milliseconds after it was made (by the TSC).
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Self {
        Deadline(rdtsc() + ms * tsc_khz())
    }

    pub fn passed(self) -> bool {
        rdtsc() >= self.0
    }
}

/// Polls `done` until it returns true or `timeout_ms` have passed; returns
/// the last answer.
pub fn wait_until(timeout_ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_ms(timeout_ms);
    loop {
        if done() {
            return true;
        }
        if deadline.passed() {
            return done();
        }
        spin_loop();
    }
}

/// Spins for `ms` milliseconds (interrupts keep being served).
pub fn delay_ms(ms: u64) {
    let deadline = Deadline::after_ms(ms);
    while !deadline.passed() {
        spin_loop();
    }
}
