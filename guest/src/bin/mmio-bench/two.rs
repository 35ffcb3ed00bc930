//! Two vCPUs driving the device at once (`cpus=2`, edu only): for each
//! access type, the boot CPU alone, then both CPUs, each with its own
//! register where the type stores (see `Device::lane`). The two take turns
//! in four chunks, so that a machine that changes speed for a while slows
//! both alike.
//!
//! Output per type: `bench: smp <type> <cpus> <n> <cycles>`, n accesses on
//! each of `cpus` CPUs in `cycles`, summed over the chunks, each from the
//! first CPU's start to the last one's end (KVM keeps the vCPUs' TSCs in
//! step), and for the runs on two,
//! `bench: smp-samples <type> <cpu> <n> <cycles>...`, each CPU's accesses
//! timed one by one.

use core::hint::spin_loop;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use kvm_userdev_guest::cpu::rdtsc;
use kvm_userdev_guest::println;
use kvm_userdev_guest::smp::SecondCpu;

use crate::MAX_SAMPLES;
use crate::device::{Device, Lane, Wrong};
use crate::out::Line;

#[derive(Clone, Copy)]
enum Access {
    Store,
    BatchedStore,
    SyncLoad,
    StoreLoad,
}

const ACCESSES: [(&str, Access); 4] = [
    ("store", Access::Store),
    ("batched-store", Access::BatchedStore),
    ("sync-load", Access::SyncLoad),
    ("store-load", Access::StoreLoad),
];

impl Access {
    fn on(self, lane: &mut Lane) -> Result<(), Wrong> {
        match self {
            Access::Store => lane.store(),
            Access::BatchedStore => lane.batched_store(),
            Access::SyncLoad => return lane.sync_load(),
            Access::StoreLoad => return lane.store_load(),
        }
        Ok(())
    }
}

/// Each CPU's timed accesses, and when its timed part began and ended.
static SAMPLES: [[AtomicU64; MAX_SAMPLES]; 2] =
    [const { [const { AtomicU64::new(0) }; MAX_SAMPLES] }; 2];
static SPANS: [[AtomicU64; 2]; 2] = [const { [const { AtomicU64::new(0) }; 2] }; 2];
/// CPUs done warming up, for the start of the timed part.
static READY: AtomicUsize = AtomicUsize::new(0);
static WRONG: AtomicUsize = AtomicUsize::new(0);

/// How many turns one vCPU alone and two take, per access type.
const CHUNKS: usize = 4;

struct Run<'a> {
    dev: &'a Device,
    access: Access,
    warmup: usize,
    /// The samples this chunk fills.
    samples: Range<usize>,
    cpus: usize,
}

impl Run<'_> {
    /// CPU `cpu`'s part: warm up, wait for the other CPU, time this chunk's
    /// accesses.
    fn drive(&self, cpu: usize) {
        let Some(mut lane) = self.dev.lane(cpu) else {
            return;
        };
        let check = |r: Result<(), Wrong>| {
            if let Err(wrong) = r
                && WRONG.fetch_add(1, SeqCst) == 0
            {
                println!("bench: error smp cpu {cpu}: {wrong}");
            }
        };
        for _ in 0..self.warmup {
            check(self.access.on(&mut lane));
        }
        READY.fetch_add(1, SeqCst);
        while READY.load(SeqCst) < self.cpus {
            spin_loop();
        }
        let start = rdtsc();
        for sample in &SAMPLES[cpu][self.samples.clone()] {
            let t = rdtsc();
            let r = self.access.on(&mut lane);
            sample.store(rdtsc() - t, SeqCst);
            check(r);
        }
        SPANS[cpu][0].store(start, SeqCst);
        SPANS[cpu][1].store(rdtsc(), SeqCst);
    }

    fn span(&self) -> u64 {
        let spans = &SPANS[..self.cpus];
        let start = spans.iter().map(|s| s[0].load(SeqCst)).min().unwrap_or(0);
        let end = spans.iter().map(|s| s[1].load(SeqCst)).max().unwrap_or(0);
        end.saturating_sub(start)
    }
}

/// Runs the two-vCPU part; returns the number of wrong answers.
pub fn run(dev: &Device, second: &SecondCpu, warmup: usize, samples: usize) -> usize {
    for (name, access) in ACCESSES {
        let mut cycles = [0; 2];
        for chunk in 0..CHUNKS {
            for cpus in [1, 2] {
                let run = Run {
                    dev,
                    access,
                    warmup: if chunk == 0 { warmup } else { 0 },
                    samples: chunk * samples / CHUNKS..(chunk + 1) * samples / CHUNKS,
                    cpus,
                };
                READY.store(0, SeqCst);
                if cpus == 1 {
                    run.drive(0);
                } else {
                    second.run_both(&|cpu| run.drive(cpu));
                }
                cycles[cpus - 1] += run.span();
            }
        }
        for (cpus, cycles) in cycles.iter().enumerate() {
            println!("bench: smp {name} {} {samples} {cycles}", cpus + 1);
        }
        for (cpu, samples_of_cpu) in SAMPLES.iter().enumerate() {
            let mut line = Line::new();
            line.push_fmt(format_args!("bench: smp-samples {name} {cpu} {samples}"));
            for sample in &samples_of_cpu[..samples] {
                line.push_fmt(format_args!(" {:x}", sample.load(SeqCst)));
            }
            line.push_fmt(format_args!("\n"));
            line.flush();
        }
    }
    WRONG.load(SeqCst)
}
