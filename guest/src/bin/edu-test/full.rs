//! mode=full: every feature of one edu device.

use kvm_userdev_guest::apic::{self, Trigger};
use kvm_userdev_guest::cpu::{delay_ms, wait_until};
use kvm_userdev_guest::dma::DmaBuffer;
use kvm_userdev_guest::interrupts;

use crate::edu::{self, Edu, TIMEOUT_MS, irq};
use crate::tap::Tap;

const INTX_VECTOR: u8 = 0x40;
const MSI_VECTOR: u8 = 0x41;

/// How long to watch for a second interrupt after the first: a level-
/// triggered line left asserted would deliver one at once.
const QUIET_MS: u64 = 50;

/// Where the BAR goes in the last test, from its first place.
const BAR_MOVE: u32 = 0x0080_0000;

/// The RAM side of DMA transfers (mode=survive uses them too).
pub static SOURCE: DmaBuffer<{ edu::DMA_BUFFER_SIZE }> = DmaBuffer::new();
pub static TARGET: DmaBuffer<{ edu::DMA_BUFFER_SIZE }> = DmaBuffer::new();

pub fn run(t: &mut Tap, edu: &mut Edu) {
    let i = edu.index;
    t.eq(
        format_args!("edu{i}: identification"),
        edu::IDENTIFICATION,
        edu.read(edu::IDENTIFICATION_REG),
    );
    for value in [0, 0xffff_ffff, 0x1234_5678, 0xa5a5_5a5a, 0x8000_0001] {
        edu.write(edu::LIVENESS, value);
        t.eq(
            format_args!("edu{i}: liveness {value:#x}"),
            !value,
            edu.read(edu::LIVENESS),
        );
    }
    for n in 0..=12 {
        match edu.factorial(n) {
            Ok(result) => t.eq(
                format_args!("edu{i}: factorial {n}"),
                edu::factorial(n),
                result,
            ),
            Err(status) => t.check(
                format_args!("edu{i}: factorial {n}"),
                false,
                format_args!("still computing after {TIMEOUT_MS} ms, status {status:#x}"),
            ),
        };
    }
    dma(t, edu, Completion::Polling);
    intx(t, edu);
    msi(t, edu);
    move_bar(t, edu);
}

/// Factorial and raised interrupts over INTx, routed level-triggered
/// through the IOAPIC.
fn intx(t: &mut Tap, edu: &Edu) {
    let i = edu.index;
    let pin = edu.pci.interrupt_line();
    let pins = apic::ioapic_pins();
    if !t.check(
        format_args!("edu{i}: INTx wired to IOAPIC input {pin}"),
        pin < pins,
        format_args!("the IOAPIC has inputs 0..{pins}"),
    ) {
        return;
    }
    interrupts::set_handler(INTX_VECTOR, irq::handler);
    apic::ioapic_route(pin, INTX_VECTOR, Trigger::Level);
    factorial_interrupt(t, edu, "INTx", INTX_VECTOR);
    raise_interrupt(t, edu, "INTx", INTX_VECTOR, 0x1234);
    apic::ioapic_mask(pin);
    interrupts::clear_handler(INTX_VECTOR);
}

/// The same over MSI, and DMA completion interrupts. INTx stays masked at
/// the IOAPIC, so an interrupt that comes must be an MSI.
fn msi(t: &mut Tap, edu: &Edu) {
    with_msi(t, edu, MSI_VECTOR, |t| {
        factorial_interrupt(t, edu, "MSI", MSI_VECTOR);
        raise_interrupt(t, edu, "MSI", MSI_VECTOR, 0x5678);
        dma(t, edu, Completion::Interrupt(MSI_VECTOR));
    });
}

/// Runs `body` with the device's MSI on, to `vector`, and the interrupt
/// handler there; a device without the capability fails the test.
pub fn with_msi(t: &mut Tap, edu: &Edu, vector: u8, body: impl FnOnce(&mut Tap)) {
    let i = edu.index;
    let Some(msi) = edu.pci.msi() else {
        t.fail(
            format_args!("edu{i}: MSI capability"),
            format_args!("not found"),
        );
        return;
    };
    let bits = if msi.is_64bit() { 64 } else { 32 };
    t.pass(format_args!(
        "edu{i}: MSI capability at {:#x}, {bits}-bit addresses",
        msi.offset()
    ));
    interrupts::set_handler(vector, irq::handler);
    msi.enable(apic::msi_address(), vector.into());
    body(t);
    msi.disable();
    interrupts::clear_handler(vector);
}

/// Computes 10! with the completion interrupt enabled.
fn factorial_interrupt(t: &mut Tap, edu: &Edu, via: &str, vector: u8) {
    const N: u32 = 10;
    let i = edu.index;
    irq::arm(edu);
    edu.write(edu::STATUS, edu::STATUS_IRQ_ON_FACTORIAL);
    edu.write(edu::FACTORIAL, N);
    let what = format_args!("edu{i}: factorial {N} with {via} interrupt");
    if expect_one_interrupt(t, what, vector, edu::IRQ_FACTORIAL) {
        t.eq(
            format_args!("{what}: result"),
            edu::factorial(N),
            edu.read(edu::FACTORIAL),
        );
    }
    edu.write(edu::STATUS, 0);
}

/// Raises interrupt status bits by hand; the handler acknowledges them.
fn raise_interrupt(t: &mut Tap, edu: &Edu, via: &str, vector: u8, bits: u32) {
    let i = edu.index;
    irq::arm(edu);
    edu.write(edu::IRQ_RAISE, bits);
    let what = format_args!("edu{i}: raise interrupt {bits:#x} over {via}");
    expect_one_interrupt(t, what, vector, bits);
    t.eq(
        format_args!("{what}: status after acknowledge"),
        0,
        edu.read(edu::IRQ_STATUS),
    );
}

/// Checks that one interrupt arrives on `vector` with interrupt status
/// `status`, and no second one. Returns whether one arrived.
fn expect_one_interrupt(t: &mut Tap, what: core::fmt::Arguments, vector: u8, status: u32) -> bool {
    let arrived = wait_until(TIMEOUT_MS, || irq::count() > 0);
    if !t.check(
        what,
        arrived,
        format_args!("no interrupt within {TIMEOUT_MS} ms"),
    ) {
        return false;
    }
    t.eq(format_args!("{what}: vector"), vector, irq::vector());
    t.eq(
        format_args!("{what}: interrupt status"),
        status,
        irq::status(),
    );
    delay_ms(QUIET_MS);
    t.eq(format_args!("{what}: interrupts"), 1, irq::count());
    true
}

#[derive(Clone, Copy)]
enum Completion {
    Polling,
    /// The DMA interrupt, with its handler already registered for `vector`.
    Interrupt(u8),
}

/// A short transfer into the device buffer: RAM offset, device offset,
/// length. Odd numbers, to catch rounding.
const SHORT_WRITE: (usize, usize, usize) = (0x200, 0x123, 0x75);
/// A transfer back from the device buffer that covers the short one.
const SHORT_READ: (usize, usize, usize) = (0x801, 0x100, 0x200);
/// What TARGET holds outside SHORT_READ.
const UNTOUCHED: u8 = 0xee;

/// A page of RAM to device and back, then short transfers at offsets.
fn dma(t: &mut Tap, edu: &Edu, completion: Completion) {
    let i = edu.index;
    let (how, pass) = match completion {
        Completion::Polling => ("polling", 0),
        Completion::Interrupt(_) => ("interrupt", 1),
    };
    let seed = (2 * i + pass) as u8;
    let pattern = |offset: usize| {
        (offset as u8).wrapping_mul(7) ^ (offset >> 8) as u8 ^ seed.wrapping_mul(0x35)
    };
    let size = edu::DMA_BUFFER_SIZE;

    SOURCE.fill(pattern);
    TARGET.fill(|_| 0);
    let to_device = format_args!("edu{i}: DMA {size:#x} bytes RAM to device ({how})");
    transfer(
        t,
        edu,
        to_device,
        SOURCE.address(),
        edu::DMA_BUFFER,
        size,
        completion,
    );
    let to_ram = format_args!("edu{i}: DMA {size:#x} bytes device to RAM ({how})");
    transfer(
        t,
        edu,
        to_ram,
        edu::DMA_BUFFER,
        TARGET.address(),
        size,
        completion,
    );
    compare(
        t,
        format_args!("edu{i}: DMA page round trip data ({how})"),
        pattern,
    );

    let (source, device, length) = SHORT_WRITE;
    let what =
        format_args!("edu{i}: DMA {length:#x} bytes RAM+{source:#x} to device+{device:#x} ({how})");
    let source_address = SOURCE.address() + source as u64;
    transfer(
        t,
        edu,
        what,
        source_address,
        edu::DMA_BUFFER + device as u64,
        length,
        completion,
    );
    let device_byte = |offset: usize| match offset.checked_sub(device) {
        Some(k) if k < length => pattern(source + k),
        _ => pattern(offset),
    };

    let (target, device, length) = SHORT_READ;
    TARGET.fill(|_| UNTOUCHED);
    let what =
        format_args!("edu{i}: DMA {length:#x} bytes device+{device:#x} to RAM+{target:#x} ({how})");
    let target_address = TARGET.address() + target as u64;
    transfer(
        t,
        edu,
        what,
        edu::DMA_BUFFER + device as u64,
        target_address,
        length,
        completion,
    );
    compare(
        t,
        format_args!("edu{i}: DMA short transfers data ({how})"),
        |offset| match offset.checked_sub(target) {
            Some(k) if k < length => device_byte(device + k),
            _ => UNTOUCHED,
        },
    );
}

/// Runs one DMA transfer to its end (the command's start bit clears);
/// `source` or `destination` is in the device buffer.
fn transfer(
    t: &mut Tap,
    edu: &Edu,
    what: core::fmt::Arguments,
    source: u64,
    destination: u64,
    count: usize,
    completion: Completion,
) {
    let mut command = edu::DMA_START;
    if edu::in_device_buffer(source) {
        command |= edu::DMA_TO_RAM;
    }
    if let Completion::Interrupt(_) = completion {
        command |= edu::DMA_IRQ;
        irq::arm(edu);
    }
    edu.start_dma(source, destination, count, command);
    match completion {
        Completion::Polling => {
            let done = wait_until(TIMEOUT_MS, || edu.dma_command() & edu::DMA_START == 0);
            t.check(
                what,
                done,
                format_args!(
                    "not done after {TIMEOUT_MS} ms, command {:#x}",
                    edu.dma_command()
                ),
            );
        }
        Completion::Interrupt(vector) => {
            let arrived = wait_until(TIMEOUT_MS, || irq::count() > 0);
            let command = edu.dma_command();
            let passed = arrived
                && irq::vector() == vector
                && irq::status() == edu::IRQ_DMA
                && command & edu::DMA_START == 0;
            t.check(
                what,
                passed,
                format_args!(
                    "{} interrupts, last on vector {:#x} with status {:#x} (want {vector:#x}, {:#x}); command {command:#x}",
                    irq::count(),
                    irq::vector(),
                    irq::status(),
                    edu::IRQ_DMA
                ),
            );
        }
    }
}

/// Compares TARGET with `expected`, reporting the first difference.
fn compare(t: &mut Tap, what: core::fmt::Arguments, expected: impl Fn(usize) -> u8) {
    match (0..TARGET.len()).find(|&offset| TARGET.read(offset) != expected(offset)) {
        None => t.pass(what),
        Some(offset) => t.fail(
            what,
            format_args!(
                "byte {offset:#x}: expected {:#x} got {:#x}",
                expected(offset),
                TARGET.read(offset)
            ),
        ),
    }
}

/// Moves BAR0 within the window: the registers follow, and the old address
/// no longer reaches the device.
fn move_bar(t: &mut Tap, edu: &mut Edu) {
    let i = edu.index;
    let old = edu.regs.base() as u32;
    let new = old + BAR_MOVE;
    edu.pci.set_memory_bar(0, new);
    t.eq(
        format_args!("edu{i}: BAR0 moved"),
        new,
        edu.pci.memory_bar(0),
    );
    edu.regs = edu::registers_at(new);
    t.eq(
        format_args!("edu{i}: identification at {new:#x}"),
        edu::IDENTIFICATION,
        edu.read(edu::IDENTIFICATION_REG),
    );
    // Nothing decodes the old address: an unclaimed PCI read is all-ones,
    // QEMU's unassigned memory reads 0.
    let stale = edu::registers_at(old);
    let value = stale.read32(edu::IDENTIFICATION_REG);
    t.check(
        format_args!("edu{i}: nothing at old address {old:#x}"),
        value == 0xffff_ffff || value == 0,
        format_args!("expected 0xffffffff (or 0) got {value:#x}"),
    );
    edu.write(edu::LIVENESS, 0x600d);
    stale.write32(edu::LIVENESS, 0xbad);
    t.eq(
        format_args!("edu{i}: store to old address does not reach the device"),
        !0x600d,
        edu.read(edu::LIVENESS),
    );
}
