//! mmio-bench: times guest accesses to a PCI device, for `cargo xtask bench`.
//!
//! The same payload runs under every variant of the benchmark (our VMM with
//! a user device, the VMM's classic exit paths, QEMU in-process and
//! multi-process), so that only the path an access takes differs. It finds
//! the first edu (1234:11e8) or pci-testdev (1b36:0005) on bus 0, then per
//! access type warms up and times single accesses with the TSC.
//!
//! Command line (all optional): `samples=N` (default 200), `warmup=N`
//! (default 20), `doorbell=ADDR` (an MMIO address where the VMM put an
//! ioeventfd) or `doorbell=testdev` (pci-testdev's wildcard-eventfd test),
//! `woken-doorbell=ADDR` (an ioeventfd that another process sleeps on),
//! `idle=N` (halt N seconds after the timed accesses), `cpus=2` (then
//! time store, batched-store, sync-load and store-load on two vCPUs at once,
//! see `two`; the VMM must give the guest a second vCPU, APIC ID 1).
//!
//! Output, one line per access type, cycles in hex:
//! `bench: samples <type> <n> <cycles>...`; `bench: skip <type> <why>` for a
//! type this device or VMM cannot do; the `bench: smp` lines of `two`;
//! `bench: error <what>` if the device
//! answered wrongly (exit status 1); `bench: idle begin N` and `bench: idle
//! end` around the idle time; `bench: done` at the end (status 0).

#![no_std]
#![no_main]

mod device;
mod out;
mod two;

use kvm_userdev_guest::cpu::{self, rdtsc};
use kvm_userdev_guest::mmio::Mmio;
use kvm_userdev_guest::smp::SecondCpu;
use kvm_userdev_guest::{apic, entry, pci, platform, println};

use device::Device;
use out::Line;

entry!(main);

/// The most samples one access type takes.
pub(crate) const MAX_SAMPLES: usize = 4096;

struct Options {
    samples: usize,
    warmup: usize,
    doorbell: Option<Doorbell>,
    /// An ioeventfd whose eventfd a process reads, sleeping between stores.
    woken_doorbell: Option<usize>,
    /// Seconds to halt after the timed accesses: an idle guest, whose cost
    /// the host measures between the two lines it prints.
    idle_s: u64,
    /// 2: also time accesses from two vCPUs at once.
    cpus: usize,
}

#[derive(Clone, Copy)]
enum Doorbell {
    Address(usize),
    Testdev,
}

fn parse(cmdline: &str) -> Result<Options, &str> {
    let mut options = Options {
        samples: 200,
        warmup: 20,
        doorbell: None,
        woken_doorbell: None,
        idle_s: 0,
        cpus: 1,
    };
    for word in cmdline.split_whitespace() {
        match word.split_once('=') {
            Some(("samples", n)) => {
                options.samples = n.parse().map_err(|_| word)?;
                if !(1..=MAX_SAMPLES).contains(&options.samples) {
                    return Err(word);
                }
            }
            Some(("warmup", n)) => options.warmup = n.parse().map_err(|_| word)?,
            Some(("doorbell", "testdev")) => options.doorbell = Some(Doorbell::Testdev),
            Some(("doorbell", a)) => options.doorbell = Some(Doorbell::Address(hex(a, word)?)),
            Some(("woken-doorbell", a)) => options.woken_doorbell = Some(hex(a, word)?),
            Some(("idle", n)) => options.idle_s = n.parse().map_err(|_| word)?,
            Some(("cpus", n)) => {
                options.cpus = n.parse().map_err(|_| word)?;
                if !(1..=2).contains(&options.cpus) {
                    return Err(word);
                }
            }
            _ => println!("# ignoring {word}"),
        }
    }
    Ok(options)
}

fn hex<'a>(a: &str, word: &'a str) -> Result<usize, &'a str> {
    let a = a.strip_prefix("0x").ok_or(word)?;
    usize::from_str_radix(a, 16).map_err(|_| word)
}

/// The place an ioeventfd doorbell may be: the MMIO hole above the BAR
/// window, which the boot page tables map uncached.
const DOORBELL_WINDOW: core::ops::Range<usize> = 0xd000_0000..0xe000_0000;

fn main(cmdline: &'static str) -> ! {
    println!("# mmio-bench: command line \"{cmdline}\"");
    let options = parse(cmdline).unwrap_or_else(|word| {
        println!("bench: error bad argument {word}");
        platform::exit(1)
    });
    let (khz, source) = cpu::tsc_khz_source();
    println!(
        "# TSC {} MHz ({source}); samples are TSC cycles",
        khz / 1000
    );

    let Some(mut dev) = pci::scan_bus0().find_map(Device::probe) else {
        println!("bench: error no edu or pci-testdev on bus 0");
        platform::exit(1)
    };
    println!("bench: device {}", dev.describe());

    let mut bench = Bench {
        samples: options.samples,
        warmup: options.warmup,
        buf: [0; MAX_SAMPLES],
        errors: 0,
    };
    bench.time("cpuid", || {
        cpu::cpuid(0, 0);
    });
    match options.doorbell {
        Some(Doorbell::Address(a)) if DOORBELL_WINDOW.contains(&a) && a % 4 == 0 => {
            // SAFETY: the VMM said an ioeventfd sits at `a`, in the MMIO hole
            // where no RAM is: a store there signals an eventfd, nothing more.
            let doorbell = unsafe { Mmio::new(a, 4) };
            bench.time("ioeventfd-store", || doorbell.write32(0, 1));
        }
        Some(Doorbell::Address(a)) => {
            println!("bench: error doorbell {a:#x} outside {DOORBELL_WINDOW:#x?}");
            bench.errors += 1;
        }
        Some(Doorbell::Testdev) => match dev.eventfd_store() {
            Some(t) => bench.time("ioeventfd-store", || t.store()),
            None => bench.skip("ioeventfd-store", "no pci-testdev eventfd test"),
        },
        None => bench.skip("ioeventfd-store", "no doorbell given"),
    }
    match options.woken_doorbell {
        Some(a) if DOORBELL_WINDOW.contains(&a) && a % 4 == 0 => {
            // SAFETY: as for the doorbell: an ioeventfd at `a` in the hole.
            let doorbell = unsafe { Mmio::new(a, 4) };
            bench.time("ioeventfd-wake", || doorbell.write32(0, 1));
        }
        Some(a) => {
            println!("bench: error woken-doorbell {a:#x} outside {DOORBELL_WINDOW:#x?}");
            bench.errors += 1;
        }
        None => bench.skip("ioeventfd-wake", "no woken doorbell given"),
    }
    bench.time("store", || dev.store());
    match dev.batched_store() {
        Some(store) => bench.time("batched-store", store),
        None => bench.skip("batched-store", "pci-testdev has no register to spare"),
    }
    bench.time_checked("load", || dev.load());
    bench.time_checked("sync-load", || dev.sync_load());
    bench.time_checked("store-load", || dev.store_load());
    bench.time_checked("store-load-other", || dev.store_load_other());
    match dev.irq_round_trip() {
        Some(mut round_trip) => bench.time_checked("irq", &mut round_trip),
        None => bench.skip("irq", "the device has no interrupt"),
    }
    if options.cpus == 2 {
        if dev.lane(0).is_none() {
            bench.skip("smp", "pci-testdev has no register for each CPU");
        } else if let Some(second) = SecondCpu::start() {
            bench.errors += two::run(&dev, &second, bench.warmup, bench.samples);
            second.stop();
        } else {
            println!("bench: error smp: the second vCPU did not start");
            bench.errors += 1;
        }
    }
    if bench.errors > 0 {
        println!("bench: error {} wrong answers", bench.errors);
        platform::exit(1)
    }
    if options.idle_s > 0 {
        println!("bench: idle begin {}", options.idle_s);
        apic::halt_ms(options.idle_s * 1000);
        println!("bench: idle end");
    }
    println!("bench: done");
    platform::exit(0)
}

struct Bench {
    samples: usize,
    warmup: usize,
    buf: [u64; MAX_SAMPLES],
    errors: usize,
}

impl Bench {
    fn time(&mut self, name: &str, mut access: impl FnMut()) {
        self.time_checked(name, || {
            access();
            Ok(())
        })
    }

    /// Times `access`, which says whether the device answered right. The
    /// first wrong answer is printed, later ones only counted.
    fn time_checked(&mut self, name: &str, mut access: impl FnMut() -> Result<(), device::Wrong>) {
        let check = |r: Result<(), device::Wrong>, errors: &mut usize| {
            if let Err(wrong) = r {
                if *errors == 0 {
                    println!("bench: error {name}: {wrong}");
                }
                *errors += 1;
            }
        };
        for _ in 0..self.warmup {
            check(access(), &mut self.errors);
        }
        for i in 0..self.samples {
            let start = rdtsc();
            let r = access();
            self.buf[i] = rdtsc() - start;
            check(r, &mut self.errors);
        }
        let mut line = Line::new();
        line.push_fmt(format_args!("bench: samples {name} {}", self.samples));
        for &cycles in &self.buf[..self.samples] {
            line.push_fmt(format_args!(" {cycles:x}"));
        }
        line.push_fmt(format_args!("\n"));
        line.flush();
    }

    fn skip(&self, name: &str, why: &str) {
        println!("bench: skip {name} {why}");
    }
}
