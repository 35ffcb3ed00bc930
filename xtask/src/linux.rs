//! `cargo xtask linux`: an unmodified Linux guest (the project's plain
//! kernel) booted by our VMM inside the patched-kernel VM, its console a
//! 16550A UART and its edu devices user devices, each served by a
//! sandboxed emulator. Or, with `--host qemu`, the same guest kernel and
//! initramfs under QEMU with its own 16550 and edu, for comparison.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

use kvm_userdev_bench::linux::{self as guest, Boot};

use crate::initramfs::{self, Contents};
use crate::kernel::{self, Flavour};
use crate::util::repo_root;
use crate::{binaries, deps, guest_linux, vm};

/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";

/// Builds what the guest needs into target/guest-linux: the plain kernel
/// (copied there), the edu module against it, the guest tools, and the
/// initramfs with them and Debian's busybox-static (installed if missing).
pub fn build_guest() -> Result<()> {
    deps::ensure_packages(&["busybox-static"])?;
    let (kernel, src, obj) = kernel::module_trees(Flavour::Plain)?;
    let repo = repo_root();
    let out = repo.join("target/guest-linux");
    std::fs::create_dir_all(&out)?;
    let module = guest_linux::build_edu_module(&src, &obj, &out.join("edu-driver"))?;
    let edu_tool = guest_linux::build_static_tool("edu-tool", &out)?;
    let console_bench = guest_linux::build_static_tool("console-bench", &out)?;
    std::fs::copy(&kernel.bzimage, guest::kernel(&repo))
        .with_context(|| format!("copy {}", kernel.bzimage.display()))?;
    initramfs::write(
        &Contents {
            busybox: PathBuf::from(BUSYBOX),
            init: repo.join("guest/linux/init"),
            files: vec![
                ("lib/modules/kvm_userdev_edu.ko".into(), module, 0o644),
                ("bin/edu-tool".into(), edu_tool, 0o755),
                ("bin/console-bench".into(), console_bench, 0o755),
            ],
        },
        &guest::initramfs(&repo),
    )?;
    eprintln!(
        "xtask: Linux guest: {} and {}",
        guest::kernel(&repo).display(),
        guest::initramfs(&repo).display()
    );
    Ok(())
}

/// `cargo xtask linux [-- CMD...]`: boots the guest in the VM and runs
/// CMD in it (exit status: CMD's), or gives its shell.
pub fn run(boot: &Boot, vm_flavour: Flavour, command: &[String]) -> Result<i32> {
    if boot.host.is_qemu() && boot.host != kvm_userdev_bench::linux::Host::Qemu {
        anyhow::bail!(
            "--host qemu-vfio-user*: the emulators must be started beside QEMU, which the \
             tests (tests/linux.rs) and the benchmark do; see the README's Serve QEMU"
        );
    }
    build_guest()?;
    let bins = binaries::build(false)?;
    kernel::build(vm_flavour)?;
    let mut boot = boot.clone();
    boot.command = (!command.is_empty()).then(|| {
        command
            .iter()
            .map(|w| vm::shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let mut opts = vm::VmOptions::for_linux_guests();
    opts.flavour = vm_flavour;
    opts.timeout = Duration::from_secs(boot.timeout_s + 120);
    opts.interactive = boot.command.is_none();
    let run =
        vm::run(&opts, &boot.command(&repo_root(), &bins.vmm)).context("the patched-kernel VM")?;
    run.explain();
    Ok(boot.host.guest_status(run.exit_code()))
}
