//! What the benchmark ran on.

use std::time::{Duration, Instant};

/// The TSC frequency of this (virtual) machine in kHz, measured against
/// the monotonic clock. KVM gives its guests this machine's TSC rate, so
/// guest cycles convert with it.
pub fn measure_tsc_khz() -> u64 {
    let tsc = || {
        // SAFETY: RDTSC only reads the time stamp counter; x86-64 has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    };
    // The best of a few short windows: a preemption only lengthens one.
    (0..5)
        .map(|_| {
            let (t0, c0) = (Instant::now(), tsc());
            std::thread::sleep(Duration::from_millis(100));
            let (c1, t1) = (tsc(), Instant::now());
            let ns = (t1 - t0).as_nanos().max(1) as u64;
            (c1 - c0).saturating_mul(1_000_000) / ns
        })
        .min()
        .unwrap_or(0)
}

/// The running kernel's release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
