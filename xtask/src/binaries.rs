//! The programs the in-VM tests, the demo and the benchmark run: the VMM,
//! the emulator, the benchmark runner, the test-only emulator with the
//! sandbox probe, and the
//! freestanding guest payloads (`guest/`, a workspace of its own because
//! it needs its own rustflags).

use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

use crate::util::{cargo, repo_root, run};

pub struct Binaries {
    pub vmm: PathBuf,
    /// The benchmark runner, kvm-userdev-bench.
    pub bench: PathBuf,
    /// The edu-test payload and its siblings live here.
    pub guest_dir: PathBuf,
}

/// `cargo` for the guest payloads: run from inside guest/, whose
/// .cargo/config.toml carries the freestanding link flags (which outer
/// RUSTFLAGS would replace), into target/guest.
pub fn guest_cargo() -> Command {
    let mut c = cargo();
    c.current_dir(repo_root().join("guest"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", repo_root().join("target/guest"));
    c
}

/// Builds the guest payloads; returns where they are.
pub fn build_guest() -> Result<PathBuf> {
    run(guest_cargo().args(["build", "--release"]))?;
    Ok(repo_root().join("target/guest/release"))
}

/// Builds everything (debug or release VMM and emulator); the probe
/// emulator goes to its own target directory so that the feature never
/// reaches the emulator that serves devices.
pub fn build(release: bool) -> Result<Binaries> {
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    eprintln!("xtask: building the VMM, the emulator and the guest payloads");
    run(cargo()
        .args([
            "build",
            "-p",
            "vmm",
            "-p",
            "emulator",
            "-p",
            "kvm-userdev-bench",
        ])
        .arg("--bins")
        .args(profile))?;
    run(cargo()
        .args([
            "build",
            "-p",
            "emulator",
            "--bins",
            "--features",
            "sandbox-probe",
            "--target-dir",
        ])
        .arg(repo_root().join("target/probe"))
        .args(profile))?;
    let guest_dir = build_guest()?;
    let dir = if release { "release" } else { "debug" };
    let target = repo_root().join("target").join(dir);
    Ok(Binaries {
        vmm: target.join("vmm"),
        bench: target.join("kvm-userdev-bench"),
        guest_dir,
    })
}
