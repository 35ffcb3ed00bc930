//! mode=snapshot and mode=restored: a device state saved to a file by our
//! VMM, and the device put back into it. mode=snapshot puts device 0 into
//! a state of its own (liveness, a factorial, the interrupt-on-factorial
//! flag, DMA registers and a DMA buffer of a known pattern), asks the VMM to
//! save it (control command 4) and reads the device's answers; then changes
//! all of it, has the VMM restore the saved state (command 5) and reads
//! them again, going on where it was. A VM started from the snapshot
//! (`--restore`) goes on after command 4 and does all that again.
//! mode=restored, in a freshly booted VM whose device alone was restored
//! (a snapshot of a VM with more vCPUs), reads them without changing the
//! device first. Each prints the answers, so that the test can see they
//! are the same, and checks them against what the state must be.

use kvm_userdev_guest::platform::{self, CONTROL_RESTORE_STATE, CONTROL_SAVE_STATE};
use kvm_userdev_guest::println;

use crate::edu::{self, Edu, TIMEOUT_MS};
use crate::full::{SOURCE, TARGET};
use crate::tap::Tap;

const LIVENESS: u32 = 0x5eed_1e55;
const FACTORIAL_OF: u32 = 11;
/// Where the device's last DMA went: its own buffer, from SOURCE.
const DMA_COUNT: u64 = edu::DMA_BUFFER_SIZE as u64;

fn pattern(offset: usize) -> u8 {
    (offset as u8).wrapping_mul(29) ^ (offset >> 8) as u8 ^ 0xa5
}

/// Brings device 0 into the state the snapshot holds, saves it, changes
/// the device and restores it.
pub fn take(t: &mut Tap, edu: &Edu) {
    let i = edu.index;
    let set = set_state(edu, LIVENESS, FACTORIAL_OF, pattern);
    t.check(
        format_args!("edu{i}: the state to save"),
        set.is_ok(),
        format_args!("{set:?}: not done in {TIMEOUT_MS} ms"),
    );
    // Interrupts stay off: the flag is state, not an interrupt.
    edu.write(edu::STATUS, edu::STATUS_IRQ_ON_FACTORIAL);
    platform::control(CONTROL_SAVE_STATE, i as u8);
    answers(t, edu, "after the snapshot");

    let set = set_state(edu, !LIVENESS, 3, |o| !pattern(o));
    edu.write(edu::STATUS, 0);
    t.check(
        format_args!("edu{i}: the device changed after the snapshot"),
        set.is_ok() && edu.read(edu::LIVENESS) == LIVENESS,
        format_args!("{set:?}, liveness {:#x}", edu.read(edu::LIVENESS)),
    );
    platform::control(CONTROL_RESTORE_STATE, i as u8);
    answers(t, edu, "restored in place");
}

/// Writes `liveness`, has the device compute `n!`, and fills its DMA
/// buffer with `fill` (by DMA from RAM); what did not finish in time.
fn set_state(
    edu: &Edu,
    liveness: u32,
    n: u32,
    fill: impl Fn(usize) -> u8,
) -> Result<(), &'static str> {
    edu.write(edu::LIVENESS, liveness);
    edu.factorial(n).map_err(|_| "the factorial")?;
    SOURCE.fill(fill);
    if !edu.dma(
        SOURCE.address(),
        edu::DMA_BUFFER,
        edu::DMA_BUFFER_SIZE,
        edu::DMA_START,
    ) {
        return Err("DMA into the device");
    }
    Ok(())
}

/// Reads device 0's answers, as a VM restored from the snapshot finds them.
pub fn restored(t: &mut Tap, edu: &Edu) {
    answers(t, edu, "restored");
}

/// Reads the registers, then the DMA buffer (copied out to RAM by DMA,
/// which changes the DMA registers: they are read first), prints them and
/// checks them.
fn answers(t: &mut Tap, edu: &Edu, when: &str) {
    let i = edu.index;
    let regs = [
        edu.read(edu::LIVENESS),
        edu.read(edu::FACTORIAL),
        edu.read(edu::STATUS),
        edu.read(edu::IRQ_STATUS),
    ];
    let dma = [
        edu.regs.read64(edu::DMA_SOURCE),
        edu.regs.read64(edu::DMA_DESTINATION),
        edu.regs.read64(edu::DMA_COUNT),
    ];
    println!("# answers: regs {regs:x?} dma {dma:x?}");
    let want_regs = [
        !LIVENESS,
        edu::factorial(FACTORIAL_OF),
        edu::STATUS_IRQ_ON_FACTORIAL,
        0,
    ];
    let names = ["liveness", "factorial", "status", "interrupt status"];
    for ((name, want), got) in names.iter().zip(want_regs).zip(regs) {
        t.eq(format_args!("edu{i}: {name} {when}"), want, got);
    }
    let names = ["DMA source", "DMA destination", "DMA count"];
    let want_dma = [SOURCE.address(), edu::DMA_BUFFER, DMA_COUNT];
    for ((name, want), got) in names.iter().zip(want_dma).zip(dma) {
        t.eq(format_args!("edu{i}: {name} {when}"), want, got);
    }
    TARGET.fill(|_| 0);
    if !edu.dma(
        edu::DMA_BUFFER,
        TARGET.address(),
        edu::DMA_BUFFER_SIZE,
        edu::DMA_START | edu::DMA_TO_RAM,
    ) {
        t.fail(
            format_args!("edu{i}: DMA buffer {when}"),
            format_args!("DMA not done in {TIMEOUT_MS} ms"),
        );
        return;
    }
    // FNV-1: a rotate-and-xor sum cancels out over the buffer's period.
    let sum = (0..TARGET.len()).fold(0x811c_9dc5u32, |s, o| {
        s.wrapping_mul(0x0100_0193) ^ u32::from(TARGET.read(o))
    });
    println!("# answers: DMA buffer checksum {sum:#010x}");
    match (0..TARGET.len()).find(|&o| TARGET.read(o) != pattern(o)) {
        None => t.pass(format_args!("edu{i}: DMA buffer {when}")),
        Some(o) => t.fail(
            format_args!("edu{i}: DMA buffer {when}"),
            format_args!(
                "at {o:#x}: want {:#x}, got {:#x}",
                pattern(o),
                TARGET.read(o)
            ),
        ),
    }
}
