//! edu-test: exercises QEMU's edu device, or our emulator of it.
//!
//! Command line (all optional):
//! `mode=full|kill|kill-restart|dead|await-kill|survive|snapshot|restored` (default
//! full), `devices=N`, the number of edu devices expected (default: at least
//! one), and `rounds=N` for mode=survive (default 20). Prints TAP-like
//! results and exits with status 0 if all passed, 1 otherwise.

#![no_std]
#![no_main]

mod edu;
mod full;
mod kill;
mod snapshot;
mod survive;
mod tap;

use kvm_userdev_guest::{apic, cpu, entry, interrupts, pci, platform, println};

use edu::Edu;
use tap::Tap;

entry!(main);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Everything the device does.
    Full,
    /// Our VMM kills device 0's emulator: its loads read all-ones.
    Kill,
    /// The same, and our VMM restarts the emulator: it works again.
    KillRestart,
    /// Device 0's emulator died before the guest started.
    Dead,
    /// Device 0's emulator is killed from outside (any VMM) once the guest
    /// says it waits for that: then its loads read all-ones.
    AwaitKill,
    /// Rounds of device 0's features, its emulator killed at a random
    /// moment of each and restarted: every answer must be right.
    Survive,
    /// Device 0 in a known state, saved by our VMM to its snapshot file.
    Snapshot,
    /// Device 0 restored from that file: the same answers.
    Restored,
}

struct Options {
    mode: Mode,
    devices: Option<usize>,
    rounds: u32,
}

impl Options {
    fn parse(cmdline: &str) -> Result<Options, &str> {
        let mut options = Options {
            mode: Mode::Full,
            devices: None,
            rounds: 20,
        };
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("mode", mode)) => {
                    options.mode = match mode {
                        "full" => Mode::Full,
                        "kill" => Mode::Kill,
                        "kill-restart" => Mode::KillRestart,
                        "dead" => Mode::Dead,
                        "await-kill" => Mode::AwaitKill,
                        "survive" => Mode::Survive,
                        "snapshot" => Mode::Snapshot,
                        "restored" => Mode::Restored,
                        _ => return Err(word),
                    }
                }
                Some(("devices", n)) => options.devices = Some(n.parse().map_err(|_| word)?),
                Some(("rounds", n)) => options.rounds = n.parse().map_err(|_| word)?,
                _ => println!("# ignoring {word}"),
            }
        }
        Ok(options)
    }
}

fn main(cmdline: &'static str) -> ! {
    println!("# edu-test: command line \"{cmdline}\"");
    let options = Options::parse(cmdline).unwrap_or_else(|word| {
        println!("Bail out! bad argument {word}");
        platform::exit(1)
    });
    let (khz, source) = cpu::tsc_khz_source();
    println!(
        "# local APIC {}, TSC {} MHz ({source})",
        apic::id(),
        khz / 1000
    );

    let mut t = Tap::new("edu-test");
    let mut devices: [Option<Edu>; edu::MAX_DEVICES] = [None; edu::MAX_DEVICES];
    let mut found = 0;
    for function in pci::scan_bus0() {
        let (vendor, device) = (function.vendor_id(), function.device_id());
        println!("pci {} {vendor:04x}:{device:04x}", function.bdf);
        if (vendor, device) != (edu::VENDOR_ID, edu::DEVICE_ID) {
            continue;
        }
        if found < edu::MAX_DEVICES {
            devices[found] = set_up(&mut t, found, function);
        }
        found += 1;
    }
    match options.devices {
        Some(expected) => t.eq(format_args!("number of edu devices"), expected, found),
        None => t.check(
            format_args!("edu devices found"),
            found > 0,
            format_args!("none"),
        ),
    };
    if found > edu::MAX_DEVICES {
        t.fail(
            format_args!("edu devices tested"),
            format_args!("only the first {}", edu::MAX_DEVICES),
        );
    }

    match (options.mode, &mut devices[0]) {
        (Mode::Full, _) => devices
            .iter_mut()
            .flatten()
            .for_each(|edu| full::run(&mut t, edu)),
        (Mode::Kill, Some(edu)) => kill::kill(&mut t, edu, false),
        (Mode::KillRestart, Some(edu)) => kill::kill(&mut t, edu, true),
        (Mode::Dead, Some(edu)) => kill::dead(&mut t, edu),
        (Mode::AwaitKill, Some(edu)) => kill::await_kill(&mut t, edu),
        (Mode::Survive, Some(edu)) => survive::run(&mut t, edu, options.rounds),
        (Mode::Snapshot, Some(edu)) => snapshot::take(&mut t, edu),
        (Mode::Restored, Some(edu)) => snapshot::restored(&mut t, edu),
        (mode, None) => println!("# no usable edu device 0: nothing to test in mode {mode:?}"),
    }
    t.eq(
        format_args!("no unexpected interrupts"),
        0,
        interrupts::unexpected_count(),
    );
    t.finish()
}

/// Sizes BAR0 of edu device `index`, places it in its slot, and enables
/// memory decoding and DMA.
fn set_up(t: &mut Tap, index: usize, function: pci::Function) -> Option<Edu> {
    let probe = function.probe_bar(0);
    let size_ok = t.eq(
        format_args!("edu{index}: BAR0 size"),
        edu::BAR_SIZE,
        probe.size,
    );
    let flags_ok = t.eq(
        format_args!("edu{index}: BAR0 is 32-bit memory, not prefetchable"),
        0,
        probe.flags,
    );
    if !(size_ok && flags_ok) {
        return None;
    }
    let address = edu::bar_slot(index);
    function.set_memory_bar(0, address);
    function.set_command(pci::COMMAND_MEMORY | pci::COMMAND_DMA);
    t.eq(
        format_args!("edu{index}: BAR0 at {address:#x}"),
        address,
        function.memory_bar(0),
    );
    Some(Edu {
        index,
        pci: function,
        regs: edu::registers_at(address),
    })
}
