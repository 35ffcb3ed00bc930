//! End to end under QEMU: the edu-test payload drives an edu device that
//! QEMU's vfio-user client (`-device vfio-user-pci`) presents and our
//! sandboxed emulator serves. Under an unmodified QEMU every BAR access is a
//! message over the socket; under QEMU with `qemu-patch/`, BAR0 goes through
//! a KVM user device and only configuration space, interrupts and DMA stay
//! on the socket. `cargo xtask test` builds both QEMUs (10.1 or later has
//! the client) and names them in `$KVM_USERDEV_QEMU` and
//! `$KVM_USERDEV_QEMU_PATCHED`.

use std::path::PathBuf;
use std::time::Duration;

use kvm_userdev_bench::qemu::{self, VfioUser};
use userdev::stats;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Which QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Qemu {
    Unmodified,
    Patched,
}

impl Qemu {
    fn path(self) -> PathBuf {
        let var = match self {
            Qemu::Unmodified => "KVM_USERDEV_QEMU",
            Qemu::Patched => "KVM_USERDEV_QEMU_PATCHED",
        };
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("${var} names the QEMU that cargo xtask qemu builds"))
    }
}

/// The line `mode=await-kill` prints before it waits for the kill.
const AWAITING_KILL: &str = "# waiting for the emulator to be killed";

/// Runs edu-test with `cmdline` under QEMU, the edu device ours over
/// vfio-user; prints what the guest, QEMU and the emulator said.
fn run(which: Qemu, cmdline: &str, kill_on: Option<&str>) -> qemu::Output {
    let emulator = repo().join("target/debug/kvm-userdev-emulator");
    let firmware = qemu::debian_firmware();
    let vfio = VfioUser {
        emulator: &emulator,
        firmware: &firmware,
        emulator_args: &[],
        patched: which == Qemu::Patched,
        kill_on,
    };
    let payload = repo().join("target/guest/release/edu-test");
    let out = qemu::run_vfio_user(
        &which.path(),
        &vfio,
        &payload,
        cmdline,
        1,
        Duration::from_secs(600),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "---- edu-test {cmdline} under {which:?} QEMU over vfio-user\n{}{}",
        out.debugcon, out.stderr
    );
    out
}

fn assert_passed(out: &qemu::Output) {
    assert!(
        out.guest_status == Some(0) && out.debugcon.contains("edu-test: PASS"),
        "guest did not pass (status {:?})",
        out.guest_status
    );
}

/// Counter `name` from the last line of `out.stderr` that contains
/// `marker` (`name=value` words).
fn counter(out: &qemu::Output, marker: &str, name: &str) -> u64 {
    let line = out
        .stderr
        .lines()
        .rfind(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker:?}"));
    // The emulator's groups end in ';'.
    stats::pairs(&line.replace(';', " "))
        .find_map(|(n, value)| (n == name).then_some(value))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// The emulator's counters, in its last line.
fn emulator(out: &qemu::Output, name: &str) -> u64 {
    counter(out, "vfio-user client gone:", name)
}

/// The KVM user device's counters, as the patched QEMU traces them at exit.
fn user_device(out: &qemu::Output, name: &str) -> u64 {
    counter(out, "vfio_user_kvm_stats", name)
}

#[test]
fn edu_features_over_vfio_user() {
    let out = run(Qemu::Unmodified, "mode=full devices=1", None);
    assert_passed(&out);
    assert!(out.stderr.contains("vfio-user server sandboxed"));
    // Every BAR access crossed the socket; DMA went to the shared RAM.
    assert!(emulator(&out, "bar_loads") > 0);
    assert!(emulator(&out, "bar_stores") > 0);
    assert!(emulator(&out, "dma_maps") > 0);
    assert_eq!(emulator(&out, "errors"), 0);
    assert_eq!(emulator(&out, "accesses"), 0, "no ring");
}

#[test]
fn edu_features_through_a_kvm_user_device_under_qemu() {
    let out = run(Qemu::Patched, "mode=full devices=1", None);
    assert_passed(&out);
    assert!(out
        .stderr
        .contains("region 0 now served through a KVM user device"));
    // BAR0 came through the ring and the shadow image, none of it over the
    // socket; configuration space still did.
    assert_eq!(emulator(&out, "bar_loads"), 0);
    assert_eq!(emulator(&out, "bar_stores"), 0);
    assert!(emulator(&out, "config_reads") > 0);
    assert!(emulator(&out, "accesses") > 0);
    assert_eq!(emulator(&out, "errors"), 0);
    assert!(user_device(&out, "posted_stores") > 0);
    assert!(user_device(&out, "shadow_loads") > 0);
    assert_eq!(user_device(&out, "timeouts"), 0);
    assert_eq!(user_device(&out, "dropped_stores"), 0);
}

/// The guest polls the device when the emulator is killed. Only the
/// patched QEMU: an unmodified QEMU 10.2.2 aborts on the connection reset
/// that a server dying with requests unread causes (qemu-patch/0001 is the
/// fix), taking the guest with it.
#[test]
fn emulator_killed_under_qemu_leaves_the_guest_running() {
    let out = run(
        Qemu::Patched,
        "mode=await-kill devices=1",
        Some(AWAITING_KILL),
    );
    assert_passed(&out);
    assert!(out
        .debugcon
        .contains("identification reads all-ones once the emulator is killed"));
    // Through the user device: its loads failed at once (release mode
    // DROP), none timed out.
    assert_eq!(user_device(&out, "timeouts"), 0);
}
