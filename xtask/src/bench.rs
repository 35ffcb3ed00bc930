//! `cargo xtask bench`: the MMIO latency benchmark in the patched-kernel VM.
//!
//! Builds the plain kernel (cached) and the release binaries, boots the VM
//! with the output directory shared read-write, and runs
//! `kvm-userdev-bench run` there; that program runs the variants and
//! writes the report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{binaries, kernel, vm};

pub struct Options {
    pub rounds: u32,
    pub samples: u32,
    pub variants: Option<String>,
    pub out: PathBuf,
}

/// A generous bound on one variant's run in the VM (QEMU starts in a few
/// seconds there; a run with 4096 samples per access type takes longer).
const PER_RUN: Duration = Duration::from_secs(60);
const VARIANTS: u32 = 8;

pub fn run(opts: &Options) -> Result<i32> {
    let flavour = kernel::Flavour::new(false);
    kernel::build(flavour)?;
    let bins = binaries::build(true)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let mut cmd = vec![
        bins.bench.display().to_string(),
        "run".into(),
        "--out".into(),
        out.display().to_string(),
        "--vmm".into(),
        bins.vmm.display().to_string(),
        "--payload".into(),
        bins.guest_dir.join("mmio-bench").display().to_string(),
        "--rounds".into(),
        opts.rounds.to_string(),
        "--samples".into(),
        opts.samples.to_string(),
        "--host-cpu".into(),
        // Read here, on the host: in the VM, /proc/cpuinfo names QEMU's CPU.
        kvm_userdev_bench::system::cpu_model(),
    ];
    if let Some(v) = &opts.variants {
        cmd.extend(["--variants".into(), v.clone()]);
    }
    let mut vm_opts = vm::VmOptions::new(flavour);
    vm_opts.scratch = out;
    vm_opts.timeout = Duration::from_secs(120) + PER_RUN * VARIANTS * opts.rounds;
    eprintln!(
        "xtask: benchmark: {} rounds of {} samples per access type, in the VM",
        opts.rounds, opts.samples
    );
    let run = vm::run(&vm_opts, &cmd)?;
    run.explain();
    Ok(run.exit_code())
}
