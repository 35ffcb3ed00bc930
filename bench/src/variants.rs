//! The variants: who serves the device, and how an access reaches it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::idle::{self, IdleCost};
use crate::qemu::{self, tail};
use userdev::stats;

/// Where our VMM puts its ioeventfd doorbell (the guest's doorbell window).
pub const DOORBELL: u64 = 0xd000_0000;
/// Where it puts the doorbell whose eventfd another process sleeps on.
pub const WOKEN_DOORBELL: u64 = 0xd000_1000;
/// The edu register the kvm-userdev variant keeps out of the shadow image,
/// so that its loads reach the emulator (the guest's sync-load register,
/// `edu_regs::FACTORIAL`; a string for the VMM's command line).
pub const SYNC_LOAD_REGISTER: &str = "0x8";
/// The edu offset whose stores the kvm-userdev variants batch (the guest's
/// batched-store register, `edu_regs::UNUSED`).
pub const BATCH_REGISTER: &str = "0x10";

#[derive(Clone, Debug)]
pub struct Variant {
    pub name: &'static str,
    pub description: &'static str,
    pub device: &'static str,
    how: How,
}

#[derive(Clone, Debug)]
enum How {
    /// Our VMM with these arguments, then these.
    Vmm(&'static [&'static str], &'static [&'static str]),
    QemuInProcess(qemu::Device),
    QemuMultiProcess,
    /// QEMU's vfio-user client and our emulator: with `qemu-patch/`
    /// (BAR0 through a KVM user device) or without.
    QemuVfioUser {
        patched: bool,
    },
}

/// Every variant; the first is the baseline.
pub fn all() -> Vec<Variant> {
    vec![
        Variant {
            name: "kvm-userdev",
            description: "user device, default settings: stores posted (batched-store batched), loads from the shadow image, sync-load forwarded to the sandboxed emulator; the emulator and a waiting vCPU poll adaptively (up to 200 µs)",
            device: "edu",
            how: How::Vmm(USER, &[]),
        },
        Variant {
            name: "kvm-userdev-poll",
            description: "as kvm-userdev, with limits scaled to this test bed, where a wakeup or an exit costs ten times or more what it costs on hardware and accesses come a hundred times further apart: the emulator polls up to 2 ms, a vCPU up to 1 ms, a batched store waits up to 10 ms",
            device: "edu",
            how: How::Vmm(USER, &["--poll-ns", "1000000", "--emulator-arg=--poll-us", "--emulator-arg=2000", "--batch-us", "10000"]),
        },
        Variant {
            name: "kvm-userdev-sleep",
            description: "as kvm-userdev, polling on neither side: the emulator sleeps after each batch, a vCPU sleeps at once",
            device: "edu",
            how: How::Vmm(USER, &["--poll-ns", "0", "--emulator-arg=--poll-us", "--emulator-arg=0"]),
        },
        Variant {
            name: "kvm-userdev-handoff",
            description: "as kvm-userdev-sleep, with handoff: a forwarded load wakes the emulator on the vCPU's CPU, its reply the vCPU on the emulator's",
            device: "edu",
            how: How::Vmm(USER, &["--poll-ns", "0", "--emulator-arg=--poll-us", "--emulator-arg=0", "--handoff"]),
        },
        Variant {
            name: "kvm-userdev-noshadow",
            description: "user device without shadow image: every load forwarded to the sandboxed emulator",
            device: "edu",
            how: How::Vmm(&["--serve", "user", "--no-shadow"], &[]),
        },
        Variant {
            name: "vmm-in-process",
            description: "our VMM, device model in the VMM process (KVM_EXIT_MMIO)",
            device: "edu",
            how: How::Vmm(&["--serve", "in-process"], &[]),
        },
        Variant {
            name: "vmm-socket",
            description: "our VMM forwards KVM_EXIT_MMIO to the sandboxed emulator over a UNIX socket",
            device: "edu",
            how: How::Vmm(&["--serve", "socket"], &[]),
        },
        Variant {
            name: "qemu-edu",
            description: "QEMU, -device edu in the QEMU process",
            device: "edu",
            how: How::QemuInProcess(qemu::Device::Edu),
        },
        Variant {
            name: "qemu-vfio-user",
            description: "QEMU 10.2, unmodified (built from Debian's source), -device vfio-user-pci: our sandboxed emulator serves edu over the vfio-user socket; every BAR access leaves KVM for QEMU and is a message (a store posted, a load a round trip)",
            device: "edu",
            how: How::QemuVfioUser { patched: false },
        },
        Variant {
            name: "qemu-vfio-user-userdev",
            description: "the same QEMU with qemu-patch/ and the same emulator: BAR0 through a KVM user device set up as kvm-userdev's (sync-load forwarded, batched-store batched), configuration space, interrupts and DMA on the socket",
            device: "edu",
            how: How::QemuVfioUser { patched: true },
        },
        Variant {
            name: "qemu-testdev",
            description: "QEMU, -device pci-testdev in the QEMU process",
            device: "pci-testdev",
            how: How::QemuInProcess(qemu::Device::PciTestdev),
        },
        Variant {
            name: "qemu-multi-process",
            description: "multi-process QEMU: pci-testdev in an x-remote process behind x-pci-proxy-dev",
            device: "pci-testdev",
            how: How::QemuMultiProcess,
        },
    ]
}

/// The default variant's VMM arguments.
pub const USER: &[&str] = &[
    "--serve",
    "user",
    "--forward",
    SYNC_LOAD_REGISTER,
    "--batch",
    BATCH_REGISTER,
];

/// The programs a run needs.
pub struct Programs<'a> {
    pub vmm: &'a Path,
    pub qemu: &'a Path,
    pub payload: &'a Path,
    /// `kvm-userdev-emulator`, for the vfio-user variants.
    pub emulator: &'a Path,
    /// QEMU with the vfio-user client, without and with `qemu-patch/`
    /// (`cargo xtask qemu [--patched]`).
    pub qemu_vfio_user: Option<&'a Path>,
    pub qemu_vfio_user_patched: Option<&'a Path>,
}

/// What one run of a variant printed.
pub struct RunOutput {
    /// The guest's console.
    pub guest: String,
    /// The VMM's user-device (or other) counters, `name=value`.
    pub counters: Vec<(String, u64)>,
}

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

impl Variant {
    /// Runs the payload once under this variant with `cmdline` (samples,
    /// warm-up); the doorbell is added where the variant has one. With
    /// `cpus` 2, a variant whose device is edu gives the guest two vCPUs and
    /// the payload times its two-vCPU part too.
    pub fn run(&self, programs: &Programs, cmdline: &str, cpus: u32) -> Result<RunOutput> {
        let cpus = if self.device == "edu" { cpus } else { 1 };
        let cmdline = match cpus {
            1 => cmdline.to_string(),
            n => format!("{cmdline} cpus={n}"),
        };
        match &self.how {
            How::Vmm(base, extra) => run_vmm(
                programs,
                &[*base, *extra, &["--cpus", &cpus.to_string()]].concat(),
                &format!("{cmdline} doorbell={DOORBELL:#x} woken-doorbell={WOKEN_DOORBELL:#x}"),
            ),
            How::QemuInProcess(device) => {
                let cmdline = match device {
                    qemu::Device::PciTestdev => format!("{cmdline} doorbell=testdev"),
                    qemu::Device::Edu => cmdline,
                };
                let out = qemu::run_in_process(
                    programs.qemu,
                    programs.payload,
                    &cmdline,
                    cpus,
                    *device,
                    RUN_TIMEOUT,
                )?;
                qemu_output(out)
            }
            How::QemuVfioUser { patched } => {
                let (qemu, option) = match patched {
                    false => (programs.qemu_vfio_user, "--qemu-vfio-user"),
                    true => (programs.qemu_vfio_user_patched, "--qemu-vfio-user-patched"),
                };
                let Some(qemu) = qemu else {
                    bail!("{} needs {option} (cargo xtask bench passes it)", self.name);
                };
                let firmware = qemu::debian_firmware();
                let vfio = qemu::VfioUser {
                    emulator: programs.emulator,
                    firmware: &firmware,
                    emulator_args: &["--forward", SYNC_LOAD_REGISTER, "--batch", BATCH_REGISTER],
                    patched: *patched,
                    kill_on: None,
                };
                let out = qemu::run_vfio_user(
                    qemu,
                    &vfio,
                    programs.payload,
                    &cmdline,
                    cpus,
                    RUN_TIMEOUT,
                )?;
                let counters = trace_counters(&out.stderr);
                let mut run = qemu_output(out)?;
                run.counters = counters;
                Ok(run)
            }
            How::QemuMultiProcess => {
                let out = qemu::run_multi_process(
                    programs.qemu,
                    programs.payload,
                    &cmdline,
                    RUN_TIMEOUT,
                )?;
                qemu_output(out)
            }
        }
    }
}

impl Variant {
    /// What an idle guest costs under this variant: the payload makes a
    /// few accesses of each type, then halts `seconds`. Only for our VMM's
    /// variants (None for QEMU's).
    pub fn idle_cost(&self, programs: &Programs, seconds: u32) -> Result<Option<IdleCost>> {
        let How::Vmm(base, extra) = &self.how else {
            return Ok(None);
        };
        let args = [*base, *extra].concat();
        let cmdline = format!(
            "samples=20 warmup=2 idle={seconds} doorbell={DOORBELL:#x} woken-doorbell={WOKEN_DOORBELL:#x}"
        );
        let mut command = vmm_command(programs, &args, &cmdline);
        command.args([
            "--timeout",
            &(RUN_TIMEOUT.as_secs() + u64::from(seconds)).to_string(),
        ]);
        idle::measure(command, RUN_TIMEOUT + Duration::from_secs(seconds.into())).map(Some)
    }
}

fn qemu_output(out: qemu::Output) -> Result<RunOutput> {
    if out.guest_status != Some(0) {
        bail!(
            "the guest under QEMU ended with {:?}\nguest:\n{}\nQEMU:\n{}",
            out.guest_status,
            tail(&out.debugcon),
            tail(&out.stderr)
        );
    }
    Ok(RunOutput {
        guest: out.debugcon,
        counters: Vec::new(),
    })
}

/// The `name=value` words of the patched QEMU's `vfio_user_kvm_stats`
/// trace line: the user device's counters.
fn trace_counters(stderr: &str) -> Vec<(String, u64)> {
    stderr
        .lines()
        .filter(|l| l.contains("vfio_user_kvm_stats"))
        .flat_map(stats::pairs)
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// Our VMM with the payload, both doorbells and `args`; no timeout yet.
fn vmm_command(programs: &Programs, args: &[&str], cmdline: &str) -> Command {
    let mut command = Command::new(programs.vmm);
    command
        .arg("--payload")
        .arg(programs.payload)
        .args(["--cmdline", cmdline])
        .args(["--doorbell", &format!("{DOORBELL:#x}")])
        .args(["--woken-doorbell", &format!("{WOKEN_DOORBELL:#x}")])
        .args(args);
    command
}

fn run_vmm(programs: &Programs, args: &[&str], cmdline: &str) -> Result<RunOutput> {
    let out = vmm_command(programs, args, cmdline)
        .args(["--timeout", &RUN_TIMEOUT.as_secs().to_string()])
        .output()
        .with_context(|| format!("run {}", programs.vmm.display()))?;
    let guest = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "vmm {} exited with {}\nguest:\n{}\nvmm:\n{}",
            args.join(" "),
            out.status,
            tail(&guest),
            tail(&stderr)
        );
    }
    Ok(RunOutput {
        guest,
        counters: counters(&stderr),
    })
}

/// The `name=value` words of the VMM's `vmm: stats ...` lines.
fn counters(stderr: &str) -> Vec<(String, u64)> {
    stats::lines(stderr)
        .flat_map(|(_, counters)| stats::pairs(counters))
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_stats_lines() {
        let stderr = "vmm: edu: emulator pid 5 started\n\
            vmm: stats edu at 00:01.0: posted_stores=240 shadow_loads=170 timeouts=0 stalled_accesses=2\n\
            emulator[edu]: done (VmmGone): accesses=9 missed_accesses=1\n";
        assert_eq!(
            counters(stderr),
            vec![
                ("posted_stores".to_string(), 240),
                ("shadow_loads".to_string(), 170),
                ("timeouts".to_string(), 0),
                ("stalled_accesses".to_string(), 2)
            ]
        );
    }

    #[test]
    fn registers_are_the_guests() {
        assert_eq!(SYNC_LOAD_REGISTER, format!("{:#x}", edu_regs::FACTORIAL));
        assert_eq!(BATCH_REGISTER, format!("{:#x}", edu_regs::UNUSED));
    }

    #[test]
    fn baseline_first_and_names_unique() {
        let v = all();
        assert_eq!(v[0].name, "kvm-userdev");
        let mut names: Vec<_> = v.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), v.len());
    }
}
