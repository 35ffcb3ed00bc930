//! `cargo xtask`: build the patched kernel, boot it in QEMU, run the tests in it.

mod bench;
mod binaries;
mod deps;
mod edu;
mod guest_linux;
mod initramfs;
mod kernel;
mod linux;
mod logscan;
mod qemu;
mod selftests;
mod stress;
mod test;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kvm_userdev_bench::linux::{Boot, Host};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, boot and test kvm-userdev's patched kernel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install Linux 6.12 source, apply kernel-patch/ and build the bzImage
    /// (cached outside the repository; an unchanged rebuild takes seconds).
    Kernel {
        /// The debug flavour: KASAN, lockdep, atomic-sleep checks, kmemleak.
        #[arg(long)]
        debug: bool,
    },
    /// Build a QEMU with the vfio-user client (`-device vfio-user-pci`) from
    /// Debian's source package (cached outside the repository) and print
    /// the path of its qemu-system-x86_64. Run it with `-L` for the
    /// system's firmware: `-L /usr/share/qemu -L /usr/share/seabios`.
    Qemu {
        /// With qemu-patch/*.patch applied (the cover letter left out).
        #[arg(long)]
        patched: bool,
    },
    /// Boot the built kernel under QEMU TCG and run CMD in it.
    ///
    /// Exits with CMD's status; 1 if CMD succeeded but the kernel logged a
    /// report (WARNING, BUG, KASAN, lockdep, kmemleak, Call Trace) or the VM
    /// died; 124 on timeout.
    Vm {
        /// Boot the debug flavour.
        #[arg(long)]
        debug: bool,
        /// Wall-clock limit in seconds, boot included.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Host directory shared read-write at the same path in the VM
        /// (also in $KVM_USERDEV_SCRATCH there); the kernel log lands in it.
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// The VM's vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// How QEMU's TCG runs them: a host thread each, or one for all.
        #[arg(long, value_enum, default_value_t = vm::Tcg::Multi)]
        tcg: vm::Tcg,
        /// The command, run in the current directory.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// fmt, clippy, host tests, the in-VM tests on the debug kernel, then
    /// the Linux guest's tests in a VM on the plain kernel.
    Test {
        /// Leave out the Linux guest's tests (and the plain kernel's build).
        #[arg(long)]
        no_linux: bool,
    },
    /// Boot an unmodified Linux guest in the VM: its console a 16550A UART
    /// and its edu devices user devices, each served by a sandboxed
    /// emulator; run CMD in it (exit status: CMD's) or, without CMD, give
    /// its shell on this terminal.
    Linux {
        /// What runs the guest: our VMM with user devices, with the models
        /// in-process or behind a socket, or QEMU with its own devices.
        #[arg(long, value_enum, default_value_t = Host::User)]
        host: Host,
        /// The guest's vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u8,
        /// How many edu devices.
        #[arg(long, default_value_t = 2)]
        edu: usize,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// A word for the guest's kernel command line (repeatable).
        #[arg(long = "append", allow_hyphen_values = true)]
        append: Vec<String>,
        /// An extra argument for our VMM (repeatable), e.g. --restart.
        #[arg(long = "vmm-arg", allow_hyphen_values = true)]
        vmm_args: Vec<String>,
        /// Boot the VM (not the guest) on the debug kernel.
        #[arg(long)]
        debug: bool,
        /// Wall-clock limit for the guest in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command to run in the guest.
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Run a guest that drives edu devices, each served by its own
    /// sandboxed emulator through a user device, in the VM (plain kernel).
    Edu {
        /// Boot the debug kernel instead.
        #[arg(long)]
        debug: bool,
        /// How many edu devices (one emulator each).
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// More arguments for the VMM (see `target/debug/vmm --help`).
        #[arg(last = true)]
        vmm_args: Vec<String>,
    },
    /// The MMIO latency benchmark: kvm-userdev against our VMM's classic
    /// exit paths, QEMU in-process and multi-process QEMU, all in the VM
    /// (plain kernel). Prints the table; writes results.json, results.svg,
    /// results.md and table.txt into OUT.
    Bench {
        /// Rounds; each runs every variant once, in turn.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Timed accesses per access type and run.
        #[arg(long, default_value_t = 200)]
        samples: u32,
        /// Only these variants (comma-separated; the first is the
        /// baseline). Default: all.
        #[arg(long)]
        variants: Option<String>,
        /// Where the results go (default: target/bench, with --trace
        /// target/bench-trace).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Instead of the benchmark: run the first of --variants (default
        /// kvm-userdev) once with KVM's, the user device's and the
        /// scheduler's tracepoints on, and summarise where each kind of
        /// access spent its time (trace.txt, trace-summary.txt in OUT).
        #[arg(long)]
        trace: bool,
        /// Also the Linux part: the Linux guest (`cargo xtask linux`'s)
        /// booted under our VMM with user devices, with in-process models,
        /// with socket emulators, and under QEMU; its console throughput,
        /// edu and interrupt round trips and boot time, in the same report.
        #[arg(long, conflicts_with = "trace")]
        linux: bool,
        /// Only the Linux part.
        #[arg(long, conflicts_with = "trace")]
        linux_only: bool,
        /// Boots per host in the Linux part.
        #[arg(long, default_value_t = 1)]
        linux_rounds: u32,
        /// The Linux guest's vCPUs in the Linux part (default 1: its VM
        /// has one, see the README).
        #[arg(long, default_value_t = 1)]
        linux_cpus: u8,
        /// vCPUs of the edu guests: 2 adds the two-vCPU part (one vCPU
        /// alone against two at once; the default, except with --trace), 1
        /// leaves it out. With --trace, 2 adds how the vCPU threads shared
        /// the CPUs.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2))]
        cpus: Option<u32>,
    },
    /// The randomized stress test of the user device for longer than
    /// `cargo xtask test` runs it, after a control arm without the device,
    /// in one boot of the debug kernel. Faults that the program attributes
    /// to QEMU TCG's nested SVM are counted and their run repeated once.
    Soak {
        /// Seconds of stress with the user device.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        /// Seconds of the control arm (the same guest loops, no device).
        #[arg(long, default_value_t = 120)]
        control: u64,
        /// The PRNG seed (default: the program picks one and prints it).
        #[arg(long)]
        seed: Option<u64>,
        /// Single-threaded TCG, where the test bed's fault was not seen
        /// (but wakeups across the VM's CPUs are slow).
        #[arg(long)]
        single_threaded_tcg: bool,
    },
    /// Run every KVM selftest of the built kernel in the VM, one line each
    /// (pass, fail, skip, timeout): for comparing kernels.
    KvmSelftests {
        /// Use the debug flavour.
        #[arg(long)]
        debug: bool,
        /// Seconds each test may take.
        #[arg(long, default_value_t = 300)]
        per_test: u64,
    },
}

fn run() -> Result<i32> {
    match Cli::parse().cmd {
        Cmd::Kernel { debug } => {
            kernel::build(kernel::Flavour::new(debug))?;
            Ok(0)
        }
        Cmd::Qemu { patched } => {
            let patches = if patched { qemu::series()? } else { vec![] };
            println!("{}", qemu::build(&patches)?.display());
            Ok(0)
        }
        Cmd::Vm {
            debug,
            timeout,
            memory,
            scratch,
            cpus,
            tcg,
            cmd,
        } => {
            let mut opts = vm::VmOptions::new(kernel::Flavour::new(debug));
            opts.timeout = Duration::from_secs(timeout);
            opts.memory_mib = memory;
            opts.cpus = cpus;
            opts.tcg = tcg;
            if let Some(dir) = scratch {
                opts.scratch = dir;
            }
            let run = vm::run(&opts, &cmd)?;
            run.explain();
            Ok(run.exit_code())
        }
        Cmd::Test { no_linux } => test::run(!no_linux),
        Cmd::Linux {
            host,
            cpus,
            edu,
            memory,
            append,
            vmm_args,
            debug,
            timeout,
            cmd,
        } => {
            let mut boot = Boot::new(host);
            boot.cpus = cpus;
            boot.edu = edu;
            boot.memory_mib = memory;
            boot.append = append;
            boot.vmm_args = vmm_args;
            boot.timeout_s = timeout;
            linux::run(&boot, kernel::Flavour::new(debug), &cmd)
        }
        Cmd::Edu {
            debug,
            devices,
            vmm_args,
        } => edu::run(kernel::Flavour::new(debug), devices, vmm_args),
        Cmd::Bench {
            rounds,
            samples,
            variants,
            out,
            trace,
            linux,
            linux_only,
            linux_rounds,
            linux_cpus,
            cpus,
        } => bench::run(&bench::Options {
            rounds,
            samples,
            variants,
            linux: match (linux, linux_only) {
                (_, true) => bench::Linux::Only,
                (true, false) => bench::Linux::Also,
                (false, false) => bench::Linux::No,
            },
            linux_rounds,
            linux_cpus,
            cpus,
            out: out.unwrap_or_else(|| {
                util::repo_root().join(if trace {
                    "target/bench-trace"
                } else {
                    "target/bench"
                })
            }),
            trace,
        }),
        Cmd::Soak {
            duration,
            control,
            seed,
            single_threaded_tcg,
        } => stress::soak(&stress::SoakOptions {
            duration: Duration::from_secs(duration),
            control: Duration::from_secs(control),
            seed,
            tcg: if single_threaded_tcg {
                vm::Tcg::Single
            } else {
                vm::Tcg::Multi
            },
        }),
        Cmd::KvmSelftests { debug, per_test } => {
            selftests::run(kernel::Flavour::new(debug), Duration::from_secs(per_test))
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
