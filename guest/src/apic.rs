//! Interrupt controllers: the legacy PICs (masked), the local APIC and the
//! IOAPIC, at their architectural addresses.

use crate::interrupts::without_interrupts;
use crate::io::Port;
use crate::mmio::Mmio;

const LOCAL_APIC_BASE: usize = 0xfee0_0000;
const IOAPIC_BASE: usize = 0xfec0_0000;

// Local APIC registers.
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;
const SVR_APIC_ENABLE: u32 = 1 << 8;
const LAPIC_ICR_LOW: usize = 0x300;
const LAPIC_ICR_HIGH: usize = 0x310;
const ICR_FIXED: u32 = 0x000;
const ICR_INIT: u32 = 0x500;
const ICR_STARTUP: u32 = 0x600;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_PENDING: u32 = 1 << 12;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_TIMER_INITIAL: usize = 0x380;
const LAPIC_TIMER_DIVIDE: usize = 0x3e0;
const TIMER_DIVIDE_BY_1: u32 = 0xb;

/// The vector of the local APIC timer, which only wakes a halted CPU.
pub const TIMER_VECTOR: u8 = 0xfe;

/// The local APIC's spurious interrupt vector; it needs no EOI.
pub const SPURIOUS_VECTOR: u8 = 0xff;

// IOAPIC registers: select a register by index, then access it via the window.
const IOAPIC_REGSEL: usize = 0x00;
const IOAPIC_WINDOW: usize = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIRECTION_TABLE: u32 = 0x10;

// Redirection entry, low half: fixed delivery, physical destination and
// active high are all 0.
const REDIRECTION_LEVEL: u32 = 1 << 15;
const REDIRECTION_MASKED: u32 = 1 << 16;

// SAFETY: the interrupt mask registers of the two 8259s.
const PIC1_DATA: Port = unsafe { Port::new(0x21) };
// SAFETY: as above.
const PIC2_DATA: Port = unsafe { Port::new(0xa1) };

fn local_apic() -> Mmio {
    // SAFETY: the local APIC's register page, mapped uncached; its registers
    // do not reach memory.
    unsafe { Mmio::new(LOCAL_APIC_BASE, 0x1000) }
}

fn ioapic() -> Mmio {
    // SAFETY: the IOAPIC's two registers, mapped uncached; they do not reach
    // memory.
    unsafe { Mmio::new(IOAPIC_BASE, 0x20) }
}

/// Masks the PICs and every IOAPIC input, then enables the local APIC.
pub(crate) fn init() {
    PIC1_DATA.write8(0xff);
    PIC2_DATA.write8(0xff);
    for pin in 0..ioapic_pins() {
        ioapic_mask(pin);
    }
    enable_local();
}

/// Enables this CPU's local APIC (INIT leaves it disabled), accepting
/// every priority.
pub(crate) fn enable_local() {
    local_apic().write32(LAPIC_TPR, 0);
    local_apic().write32(LAPIC_SVR, SVR_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// Halts this CPU for `ms` milliseconds (by the TSC), woken by one-shot
/// local APIC timer interrupts: an idle guest. The timer's rate is taken
/// to be KVM's (1 GHz); a wrong guess only changes how often it wakes.
pub fn halt_ms(ms: u64) {
    fn wake(_: u8) {}
    crate::interrupts::set_handler(TIMER_VECTOR, wake);
    let deadline = crate::cpu::Deadline::after_ms(ms);
    let lapic = local_apic();
    lapic.write32(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    lapic.write32(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR));
    while !deadline.passed() {
        // One second at most: the initial count is 32 bits of ns.
        lapic.write32(LAPIC_TIMER_INITIAL, 1_000_000_000);
        // SAFETY: `sti; hlt` waits for the next interrupt (the window
        // between the two instructions is interrupt-shadowed, so the timer
        // cannot fire before the halt); handlers are set up.
        unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
    }
    lapic.write32(LAPIC_TIMER_INITIAL, 0);
    crate::interrupts::clear_handler(TIMER_VECTOR);
}

/// Sends CPU `apic_id` an INIT and then two start-up IPIs, the protocol
/// that starts it in real mode at page `vector` (address `vector << 12`).
pub fn start_cpu(apic_id: u8, vector: u8) {
    send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
    crate::cpu::delay_ms(10);
    for _ in 0..2 {
        send_ipi(apic_id, ICR_STARTUP | u32::from(vector));
        crate::cpu::delay_ms(1);
    }
}

/// Interrupts CPU `apic_id` on `vector` (fixed delivery).
pub fn interrupt_cpu(apic_id: u8, vector: u8) {
    send_ipi(apic_id, ICR_FIXED | ICR_LEVEL_ASSERT | u32::from(vector));
}

fn send_ipi(apic_id: u8, command: u32) {
    let lapic = local_apic();
    without_interrupts(|| {
        lapic.write32(LAPIC_ICR_HIGH, u32::from(apic_id) << 24);
        lapic.write32(LAPIC_ICR_LOW, command);
    });
    crate::cpu::wait_until(100, || lapic.read32(LAPIC_ICR_LOW) & ICR_PENDING == 0);
}

/// This CPU's local APIC ID.
pub fn id() -> u8 {
    (local_apic().read32(LAPIC_ID) >> 24) as u8
}

/// Signals the end of the interrupt being handled. For a level-triggered
/// one, the IOAPIC delivers it again if its input is still asserted.
pub fn eoi() {
    local_apic().write32(LAPIC_EOI, 0);
}

/// The MSI address that targets this CPU (physical destination mode). The
/// message data is the vector (fixed delivery, edge-triggered).
pub fn msi_address() -> u64 {
    0xfee0_0000 | u64::from(id()) << 12
}

fn ioapic_read(register: u32) -> u32 {
    without_interrupts(|| {
        ioapic().write32(IOAPIC_REGSEL, register);
        ioapic().read32(IOAPIC_WINDOW)
    })
}

fn ioapic_write(register: u32, value: u32) {
    without_interrupts(|| {
        ioapic().write32(IOAPIC_REGSEL, register);
        ioapic().write32(IOAPIC_WINDOW, value);
    })
}

/// The number of IOAPIC inputs (GSIs 0..n).
pub fn ioapic_pins() -> u8 {
    (ioapic_read(IOAPIC_VERSION) >> 16) as u8 + 1
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    /// What PCI INTx needs.
    Level,
}

/// Routes IOAPIC input `pin` to `vector` on this CPU (fixed delivery, active
/// high) and unmasks it.
pub fn ioapic_route(pin: u8, vector: u8, trigger: Trigger) {
    let register = IOAPIC_REDIRECTION_TABLE + 2 * u32::from(pin);
    let mut low = u32::from(vector);
    if trigger == Trigger::Level {
        low |= REDIRECTION_LEVEL;
    }
    ioapic_write(register + 1, u32::from(id()) << 24);
    ioapic_write(register, low);
}

pub fn ioapic_mask(pin: u8) {
    ioapic_write(
        IOAPIC_REDIRECTION_TABLE + 2 * u32::from(pin),
        REDIRECTION_MASKED,
    );
}
