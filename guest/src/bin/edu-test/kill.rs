//! mode=kill, kill-restart, dead and await-kill: a device whose emulator
//! process is gone. Its loads must complete with all-ones (what PCI
//! returns when no device claims a read) and its stores must not hang.
//! Only our VMM can kill an emulator on the guest's request; with
//! await-kill the test harness kills it, under any VMM.

use kvm_userdev_guest::cpu::{Deadline, delay_ms, rdtsc, tsc_khz};
use kvm_userdev_guest::platform::{self, CONTROL_KILL_EMULATOR};
use kvm_userdev_guest::println;

use crate::edu::{self, Edu};
use crate::tap::Tap;

const ALL_ONES: u32 = 0xffff_ffff;

/// How long a restarted emulator may take to answer.
const RESTART_TIMEOUT_MS: u64 = 10_000;

pub fn kill(t: &mut Tap, edu: &Edu, restart: bool) {
    let i = edu.index;
    t.eq(
        format_args!("edu{i}: identification before the kill"),
        edu::IDENTIFICATION,
        edu.read(edu::IDENTIFICATION_REG),
    );
    println!("# killing the emulator of device {i}");
    platform::control(CONTROL_KILL_EMULATOR, i as u8);
    if restart {
        wait_for_restart(t, edu);
    } else {
        check_dead(t, edu, "after the kill");
    }
}

/// How long await-kill waits for the emulator to die.
const KILL_TIMEOUT_MS: u64 = 120_000;

/// The line the harness waits for before it kills the emulator.
pub const AWAITING_KILL: &str = "# waiting for the emulator to be killed";

/// mode=await-kill: the device works; once the harness has killed its
/// emulator, loads read all-ones and the guest goes on.
pub fn await_kill(t: &mut Tap, edu: &Edu) {
    let i = edu.index;
    t.eq(
        format_args!("edu{i}: identification before the kill"),
        edu::IDENTIFICATION,
        edu.read(edu::IDENTIFICATION_REG),
    );
    println!("{AWAITING_KILL}");
    let deadline = Deadline::after_ms(KILL_TIMEOUT_MS);
    let gone = loop {
        if edu.read(edu::IDENTIFICATION_REG) == ALL_ONES {
            break true;
        }
        if deadline.passed() {
            break false;
        }
        delay_ms(1);
    };
    if t.check(
        format_args!("edu{i}: identification reads all-ones once the emulator is killed"),
        gone,
        format_args!("still answering after {KILL_TIMEOUT_MS} ms"),
    ) {
        check_dead(t, edu, "after the kill");
    }
}

/// mode=dead: the emulator died before the guest started.
pub fn dead(t: &mut Tap, edu: &Edu) {
    check_dead(t, edu, "of a dead emulator");
}

fn check_dead(t: &mut Tap, edu: &Edu, when: &str) {
    let i = edu.index;
    t.eq(
        format_args!("edu{i}: identification {when}"),
        ALL_ONES,
        edu.read(edu::IDENTIFICATION_REG),
    );
    edu.write(edu::LIVENESS, 0x1234_5678);
    t.eq(
        format_args!("edu{i}: liveness {when}"),
        ALL_ONES,
        edu.read(edu::LIVENESS),
    );
    edu.write(edu::FACTORIAL, 5);
    t.eq(
        format_args!("edu{i}: factorial {when}"),
        ALL_ONES,
        edu.read(edu::FACTORIAL),
    );
    // Getting here at all is the check.
    t.pass(format_args!("edu{i}: stores {when} complete"));
}

/// Polls identification until the restarted emulator answers, then checks
/// that it works.
fn wait_for_restart(t: &mut Tap, edu: &Edu) {
    let i = edu.index;
    let deadline = Deadline::after_ms(RESTART_TIMEOUT_MS);
    let start = rdtsc();
    let mut all_ones = 0u64;
    let mut other = 0u64;
    let last = loop {
        let value = edu.read(edu::IDENTIFICATION_REG);
        match value {
            edu::IDENTIFICATION => break value,
            ALL_ONES => all_ones += 1,
            _ => other += 1,
        }
        if deadline.passed() {
            break value;
        }
        delay_ms(1);
    };
    let ms = (rdtsc() - start) / tsc_khz();
    println!("# {all_ones} all-ones reads and {other} other values in {ms} ms before the restart");
    let answered = t.check(
        format_args!("edu{i}: restarted emulator answers"),
        last == edu::IDENTIFICATION,
        format_args!("identification still {last:#x} after {RESTART_TIMEOUT_MS} ms"),
    );
    t.eq(
        format_args!("edu{i}: only all-ones while restarting"),
        0,
        other,
    );
    if !answered {
        return;
    }
    edu.write(edu::LIVENESS, 0x1234_5678);
    t.eq(
        format_args!("edu{i}: liveness after the restart"),
        !0x1234_5678,
        edu.read(edu::LIVENESS),
    );
    match edu.factorial(5) {
        Ok(result) => t.eq(
            format_args!("edu{i}: factorial 5 after the restart"),
            120,
            result,
        ),
        Err(status) => t.check(
            format_args!("edu{i}: factorial 5 after the restart"),
            false,
            format_args!("still computing, status {status:#x}"),
        ),
    };
}
