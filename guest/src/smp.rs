//! A second CPU, for programs that measure two vCPUs at once.
//!
//! [`SecondCpu::start`] starts the CPU with local APIC ID 1 by INIT and two
//! start-up IPIs (the boot code takes it from real mode to long mode, on a
//! stack of its own); it then halts until the boot CPU hands it a job with
//! [`SecondCpu::run_both`] and wakes it with an IPI. Halted, it costs the
//! host nothing, so the boot CPU alone is measured alone. It takes no other
//! interrupt. [`SecondCpu::stop`] halts it for good.

use core::hint::spin_loop;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use crate::{apic, cpu, interrupts};

/// The IPI that wakes the second CPU for a job; its handler does nothing.
const WAKE_VECTOR: u8 = 0xfd;

/// Where the real-mode trampoline goes: a page below 1 MiB, outside the
/// image, whose old contents nothing needs once the program runs (our
/// VMM's start info and command line sit just below it; the benchmark runs
/// the same payload under QEMU's PVH loader).
const TRAMPOLINE: usize = 0x8000;
const SECOND_APIC_ID: u8 = 1;
const START_TIMEOUT_MS: u64 = 1000;

unsafe extern "C" {
    /// The trampoline's bounds in the image (see `boot`).
    static ap_trampoline: u8;
    static ap_trampoline_end: u8;
}

/// A job both CPUs run: called with the CPU's number, 0 or 1.
pub type Job<'a> = dyn Fn(usize) + Sync + 'a;

static STARTED: AtomicBool = AtomicBool::new(false);
static ALIVE: AtomicBool = AtomicBool::new(false);
/// The job posted: the address of a `&Job` on the boot CPU's stack, or
/// `STOP`; valid while `POSTED != DONE`.
static JOB: AtomicUsize = AtomicUsize::new(0);
const STOP: usize = 1;
/// How many jobs were posted and how many the second CPU finished.
static POSTED: AtomicU32 = AtomicU32::new(0);
static DONE: AtomicU32 = AtomicU32::new(0);

/// The second CPU, running and waiting for jobs.
pub struct SecondCpu(());

impl SecondCpu {
    /// Starts the second CPU; `None` if there is none (it did not answer
    /// within a second) or it was started before.
    pub fn start() -> Option<SecondCpu> {
        if STARTED.swap(true, Ordering::SeqCst) {
            return None;
        }
        let start = (&raw const ap_trampoline).addr();
        let len = (&raw const ap_trampoline_end).addr() - start;
        // SAFETY: the trampoline is `len` bytes of the image; the page at
        // TRAMPOLINE is RAM that nothing uses any more (see its comment) and
        // does not overlap the image, which starts at 1 MiB.
        unsafe { ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len) };
        interrupts::set_handler(WAKE_VECTOR, |_| {});
        apic::start_cpu(SECOND_APIC_ID, (TRAMPOLINE >> 12) as u8);
        cpu::wait_until(START_TIMEOUT_MS, || ALIVE.load(Ordering::Acquire)).then_some(SecondCpu(()))
    }

    /// Runs `job(0)` on this CPU and `job(1)` on the second one at the same
    /// time; returns when both have finished.
    pub fn run_both(&self, job: &Job<'_>) {
        let posted = self.post(ptr::from_ref(&job).addr());
        job(0);
        while DONE.load(Ordering::Acquire) != posted {
            spin_loop();
        }
    }

    /// Halts the second CPU for good.
    pub fn stop(self) {
        self.post(STOP);
    }

    fn post(&self, job: usize) -> u32 {
        JOB.store(job, Ordering::Relaxed);
        let posted = POSTED.fetch_add(1, Ordering::Release) + 1;
        apic::interrupt_cpu(SECOND_APIC_ID, WAKE_VECTOR);
        posted
    }
}

/// The second CPU's entry from the boot code, in long mode on its stack.
pub(crate) extern "C" fn ap_start() -> ! {
    cpu::init(1);
    interrupts::load();
    apic::enable_local();
    ALIVE.store(true, Ordering::Release);
    let mut done = 0;
    loop {
        while POSTED.load(Ordering::Acquire) == done {
            // SAFETY: waits for the wake-up IPI, whose handler is set;
            // `sti` delays interrupts until after `hlt`, so one that comes
            // after the check above still ends the halt.
            unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        }
        done += 1;
        match JOB.load(Ordering::Relaxed) {
            STOP => cpu::halt_forever(),
            job => {
                // SAFETY: `run_both` posted the address of a `&Job` on its
                // stack and waits for DONE before that goes away.
                let job: &Job<'_> = unsafe { *(job as *const &Job<'_>) };
                job(1);
            }
        }
        DONE.store(done, Ordering::Release);
    }
}
