//! mode=survive: the edu device's features in rounds, while our VMM kills
//! device 0's emulator at a random moment of each round and starts another.
//! The kernel keeps the queue for the successor and the successor continues
//! from its predecessor's state, so every answer must be right: no
//! all-ones, no lost store, no lost interrupt. A duplicate interrupt is
//! allowed (a successor re-raises an interrupt it cannot tell was sent).

use kvm_userdev_guest::cpu::wait_until;
use kvm_userdev_guest::platform::{self, CONTROL_KILL_EMULATOR_LATER, CONTROL_WAIT_FOR_KILLS};

use crate::edu::{self, Edu, TIMEOUT_MS, irq};
use crate::full::{SOURCE, TARGET, with_msi};
use crate::tap::Tap;

const MSI_VECTOR: u8 = 0x42;

pub fn run(t: &mut Tap, edu: &Edu, rounds: u32) {
    with_msi(t, edu, MSI_VECTOR, |t| {
        let i = edu.index;
        let mut failed = 0;
        for round in 0..rounds {
            platform::control(CONTROL_KILL_EMULATOR_LATER, i as u8);
            if let Err(e) = one_round(edu, round) {
                failed += 1;
                t.fail(format_args!("edu{i}: round {round}"), format_args!("{e}"));
            }
        }
        // The last kill may still be pending: the device must work after it.
        platform::control(CONTROL_WAIT_FOR_KILLS, i as u8);
        let what = format_args!("edu{i}: {rounds} rounds with the emulator killed in each");
        match one_round(edu, rounds) {
            Ok(()) if failed == 0 => t.pass(what),
            Ok(()) => t.fail(what, format_args!("{failed} rounds failed")),
            Err(e) => t.fail(what, format_args!("the last check: {e}")),
        }
    });
}

/// What went wrong in a round.
enum Wrong {
    Value(&'static str, u64, u64),
    NoInterrupt(&'static str),
    Timeout(&'static str),
    Data(usize, u8, u8),
}

impl core::fmt::Display for Wrong {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Wrong::Value(what, want, got) => write!(f, "{what}: want {want:#x}, got {got:#x}"),
            Wrong::NoInterrupt(what) => write!(f, "{what}: no interrupt in {TIMEOUT_MS} ms"),
            Wrong::Timeout(what) => write!(f, "{what}: not done in {TIMEOUT_MS} ms"),
            Wrong::Data(offset, want, got) => {
                write!(f, "DMA data at {offset:#x}: want {want:#x}, got {got:#x}")
            }
        }
    }
}

fn expect(what: &'static str, want: u64, got: u64) -> Result<(), Wrong> {
    if want == got {
        Ok(())
    } else {
        Err(Wrong::Value(what, want, got))
    }
}

/// Liveness, a factorial by polling, one with its interrupt, and a page
/// of DMA to the device and back, the second with its interrupt.
fn one_round(edu: &Edu, round: u32) -> Result<(), Wrong> {
    let value = round.wrapping_mul(0x9e37_79b9) ^ 0x5a5a_0000;
    edu.write(edu::LIVENESS, value);
    expect("liveness", (!value).into(), edu.read(edu::LIVENESS).into())?;

    let n = round % 13;
    match edu.factorial(n) {
        Ok(result) => expect("factorial", edu::factorial(n).into(), result.into())?,
        Err(_) => return Err(Wrong::Timeout("factorial")),
    }

    let n = 12 - round % 13;
    irq::arm(edu);
    edu.write(edu::STATUS, edu::STATUS_IRQ_ON_FACTORIAL);
    edu.write(edu::FACTORIAL, n);
    if !wait_until(TIMEOUT_MS, || irq::count() > 0) {
        return Err(Wrong::NoInterrupt("factorial"));
    }
    expect(
        "factorial with interrupt",
        edu::factorial(n).into(),
        edu.read(edu::FACTORIAL).into(),
    )?;
    edu.write(edu::STATUS, 0);

    let seed = round as u8;
    let pattern = |offset: usize| (offset as u8).wrapping_mul(13) ^ (offset >> 8) as u8 ^ seed;
    SOURCE.fill(pattern);
    TARGET.fill(|_| !seed);
    if !edu.dma(
        SOURCE.address(),
        edu::DMA_BUFFER,
        edu::DMA_BUFFER_SIZE,
        edu::DMA_START,
    ) {
        return Err(Wrong::Timeout("DMA to the device"));
    }
    irq::arm(edu);
    edu.start_dma(
        edu::DMA_BUFFER,
        TARGET.address(),
        edu::DMA_BUFFER_SIZE,
        edu::DMA_START | edu::DMA_TO_RAM | edu::DMA_IRQ,
    );
    if !wait_until(TIMEOUT_MS, || irq::count() > 0) {
        return Err(Wrong::NoInterrupt("DMA to RAM"));
    }
    expect(
        "DMA command after its interrupt",
        0,
        edu.dma_command() & edu::DMA_START,
    )?;
    match (0..TARGET.len()).find(|&o| TARGET.read(o) != pattern(o)) {
        None => Ok(()),
        Some(o) => Err(Wrong::Data(o, pattern(o), TARGET.read(o))),
    }
}
