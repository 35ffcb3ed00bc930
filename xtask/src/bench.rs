//! `cargo xtask bench`: the MMIO latency benchmark in the patched-kernel VM.
//!
//! Builds the plain kernel (cached) and the release binaries, boots the VM
//! with the output directory shared read-write, and runs
//! `kvm-userdev-bench run` there; that program runs the variants and
//! writes the report.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{binaries, kernel, vm};

pub struct Options {
    pub rounds: u32,
    pub samples: u32,
    pub variants: Option<String>,
    pub out: PathBuf,
    pub trace: bool,
    pub linux: Linux,
    pub linux_rounds: u32,
    pub linux_cpus: u8,
    /// vCPUs of the edu guests, if not the bench program's default.
    pub cpus: Option<u32>,
}

/// Whether the run includes the Linux part.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Linux {
    No,
    Also,
    Only,
}

/// A generous bound on one variant's run in the VM (QEMU starts in a few
/// seconds there; a run with 4096 samples per access type takes longer).
const PER_RUN: Duration = Duration::from_secs(60);
const VARIANTS: u32 = 10;
/// The same for one boot of the Linux guest, and how many hosts boot it.
const PER_LINUX_BOOT: Duration = Duration::from_secs(240);
const LINUX_HOSTS: u32 = 6;

pub fn run(opts: &Options) -> Result<i32> {
    let flavour = kernel::Flavour::new(false);
    kernel::build(flavour)?;
    if opts.linux != Linux::No {
        crate::linux::build_guest()?;
    }
    let bins = binaries::build(true)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let out = opts.out.canonicalize()?;
    let _ = std::fs::remove_file(out.join("host-load.txt"));
    let mut cmd = vec![
        bins.bench.display().to_string(),
        (if opts.trace { "trace" } else { "run" }).into(),
        "--out".into(),
        out.display().to_string(),
        "--vmm".into(),
        bins.vmm.display().to_string(),
        "--payload".into(),
        bins.guest_dir.join("mmio-bench").display().to_string(),
        "--samples".into(),
        opts.samples.to_string(),
    ];
    if let Some(cpus) = opts.cpus {
        cmd.extend(["--cpus".into(), cpus.to_string()]);
    }
    if opts.trace {
        if let Some(first) = opts.variants.as_deref().and_then(|v| v.split(',').next()) {
            cmd.extend(["--variant".into(), first.into()]);
        }
        eprintln!(
            "xtask: benchmark: one traced run of {} samples per access type, in the VM",
            opts.samples
        );
        return in_vm(vm::VmOptions::new(flavour), &out, &cmd, PER_RUN);
    }
    cmd.extend([
        "--rounds".into(),
        opts.rounds.to_string(),
        "--host-cpu".into(),
        // Read here, on the host: in the VM, /proc/cpuinfo names QEMU's CPU.
        kvm_userdev_bench::system::cpu_model(),
    ]);
    // The vfio-user variants' QEMUs, without and with qemu-patch/.
    let qemus = crate::qemu::Qemus::build()?;
    cmd.extend([
        "--qemu-vfio-user".into(),
        qemus.plain.display().to_string(),
        "--qemu-vfio-user-patched".into(),
        qemus.patched.display().to_string(),
    ]);
    if opts.linux != Linux::Only {
        let mut mmio = cmd.clone();
        if let Some(v) = &opts.variants {
            mmio.extend(["--variants".into(), v.clone()]);
        }
        eprintln!(
            "xtask: benchmark: {} rounds of {} samples per access type, in the VM",
            opts.rounds, opts.samples
        );
        let code = in_vm(
            vm::VmOptions::new(flavour),
            &out,
            &mmio,
            PER_RUN * VARIANTS * opts.rounds,
        )?;
        if code != 0 || opts.linux == Linux::No {
            return Ok(code);
        }
    }
    // The Linux part boots a VM of its own, the one the Linux guest's tests
    // use, and adds its figures to the report the MMIO part wrote.
    cmd.extend([
        "--linux".into(),
        "--linux-only".into(),
        "--repo".into(),
        crate::util::repo_root().display().to_string(),
        "--linux-rounds".into(),
        opts.linux_rounds.to_string(),
        "--linux-cpus".into(),
        opts.linux_cpus.to_string(),
    ]);
    eprintln!(
        "xtask: benchmark, Linux part: {} boot(s) of the guest under each of {LINUX_HOSTS} hosts, \
         in a VM of one vCPU (single-threaded TCG)",
        opts.linux_rounds
    );
    in_vm(
        vm::VmOptions::for_linux_guests(),
        &out,
        &cmd,
        PER_LINUX_BOOT * LINUX_HOSTS * opts.linux_rounds,
    )
}

/// Runs the benchmark command `cmd` in a VM booted with `vm_opts`, which
/// may take `work` (plus time to boot), with `out` as its scratch
/// directory; writes how busy the host was meanwhile to
/// `out/host-load.txt` (appended to, one line per VM).
fn in_vm(mut vm_opts: vm::VmOptions, out: &Path, cmd: &[String], work: Duration) -> Result<i32> {
    vm_opts.scratch = out.to_path_buf();
    vm_opts.timeout = Duration::from_secs(120) + work;
    let before = HostCpu::now()?;
    let run = vm::run(&vm_opts, cmd)?;
    let load = HostCpu::now()?.since(&before);
    run.explain();
    eprintln!("{load}");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("host-load.txt"))?;
    writeln!(file, "{load}")?;
    Ok(run.exit_code())
}

/// The host's CPU time so far: all CPUs from /proc/stat, and what our
/// waited-for children (the VM) used.
struct HostCpu {
    at: Instant,
    busy: Duration,
    steal: Duration,
    children: Duration,
}

/// Who used the host's CPUs while the VM ran, in CPUs (1.0 = one CPU busy
/// for the whole run).
struct HostLoad {
    cpus: usize,
    vm: f64,
    others: f64,
    steal: f64,
}

impl HostCpu {
    fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let (busy, steal) = parse_cpu_line(&stat).context("no cpu line in /proc/stat")?;
        // SAFETY: sysconf takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks = |t: u64| Duration::from_secs_f64(t as f64 / hz);
        // SAFETY: rusage is plain integers, for which all-zero is valid.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one struct rusage, which we own.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let children = tv(ru.ru_utime) + tv(ru.ru_stime);
        Ok(HostCpu {
            at: Instant::now(),
            busy: ticks(busy),
            steal: ticks(steal),
            children,
        })
    }

    fn since(&self, before: &HostCpu) -> HostLoad {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let cpus = |d: Duration| d.as_secs_f64() / wall;
        let vm = cpus(self.children.saturating_sub(before.children));
        let busy = cpus(self.busy.saturating_sub(before.busy));
        HostLoad {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            vm,
            others: (busy - vm).max(0.0),
            steal: cpus(self.steal.saturating_sub(before.steal)),
        }
    }
}

/// Busy and stolen ticks from /proc/stat's first line: user nice system
/// idle iowait irq softirq steal ...
fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    Some((busy, field(7)))
}

/// Above this many CPUs of other work the two-process paths suffer first.
const QUIET: f64 = 0.1;

impl std::fmt::Display for HostLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "xtask: host CPUs during the run ({} in all): the VM {:.2}, other processes {:.2}, \
             stolen by the hypervisor {:.2}",
            self.cpus, self.vm, self.others, self.steal
        )?;
        if self.others + self.steal > QUIET {
            write!(
                f,
                "\nxtask: warning: the host was not quiet; paths that need two processes \
                 (emulator, multi-process QEMU) suffer first. Rerun with nothing else running."
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_counts_busy_and_steal() {
        let stat = "cpu  100 5 20 900 7 1 2 30 0 0\ncpu0 50 2 10 450 3 0 1 15 0 0\n";
        assert_eq!(parse_cpu_line(stat), Some((128, 30)));
        assert_eq!(parse_cpu_line("intr 1 2 3\n"), None);
    }
}
