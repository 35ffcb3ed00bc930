//! `cargo xtask edu`: the edu-test guest on the VMM, each edu device served
//! by its own sandboxed emulator through a user device, in the VM.

use anyhow::Result;

use crate::{binaries, kernel, vm};

/// Boots the VM and runs the guest with `devices` edu devices; `vmm_args`
/// go to the VMM as they are. Returns the VMM's exit status.
pub fn run(flavour: kernel::Flavour, devices: usize, vmm_args: Vec<String>) -> Result<i32> {
    kernel::build(flavour)?;
    let bins = binaries::build(false)?;
    let mut cmd = vec![
        bins.vmm.to_string_lossy().into_owned(),
        "--payload".into(),
        bins.guest_dir
            .join("edu-test")
            .to_string_lossy()
            .into_owned(),
        "--edu".into(),
        devices.to_string(),
        "--cmdline".into(),
        format!("mode=full devices={devices}"),
        "--timeout".into(),
        "600".into(),
    ];
    cmd.extend(vmm_args);
    let run = vm::run(&vm::VmOptions::new(flavour), &cmd)?;
    run.explain();
    Ok(run.exit_code())
}
