//! End to end: the edu-test guest payload drives edu devices through the
//! VMM; every MMIO access is served by a sandboxed emulator process through
//! a KVM_DEV_TYPE_USER device. `cargo xtask test` builds the VMM, the
//! emulators and the payload first (xtask/src/binaries.rs).

use std::path::PathBuf;
use std::process::Command;

use kvm_userdev_bench::results::ACCESSES;
use kvm_userdev_bench::variants::{DOORBELL, USER, WOKEN_DOORBELL};
use userdev::{stats, Stats};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The user devices' counters, as the VMM printed them at exit.
    fn stats(&self) -> Vec<Stats> {
        stats::lines(&self.stderr)
            .map(|(device, counters)| {
                counters
                    .parse()
                    .unwrap_or_else(|e| panic!("stats of {device}: {e}: {counters}"))
            })
            .collect()
    }

    /// What each emulator that ended on its own said it missed: accesses
    /// KVM dropped, seen as gaps in the sequence numbers.
    fn missed_accesses(&self) -> Vec<u64> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("emulator["))
            .flat_map(|l| l.split_whitespace())
            .filter_map(|w| w.strip_prefix("missed_accesses="))
            .map(|v| v.parse().unwrap_or(u64::MAX))
            .collect()
    }

    fn count(&self, needle: &str) -> usize {
        self.stderr.matches(needle).count()
    }

    fn assert_guest_passed(&self) {
        assert!(
            self.status == Some(0) && self.stdout.contains("edu-test: PASS"),
            "guest did not pass (status {:?})",
            self.status
        );
    }
}

/// Runs the VMM with the edu-test payload; the output is echoed for the log.
fn vmm(args: &[&str], emulator: Option<PathBuf>) -> Run {
    vmm_with("edu-test", args, emulator)
}

/// Runs the VMM with guest payload `payload`.
fn vmm_with(payload: &str, args: &[&str], emulator: Option<PathBuf>) -> Run {
    let mut cmd = Command::new(repo().join("target/debug/vmm"));
    cmd.arg("--payload")
        .arg(repo().join("target/guest/release").join(payload))
        .args(["--timeout", "300"])
        // The debug kernel under nested TCG can be slow to schedule the
        // emulator: give loads the longest wait the device allows (1 s), so
        // that only a dead emulator makes one time out.
        .args(["--access-timeout-ms", "1000"])
        .args(args);
    if let Some(e) = emulator {
        cmd.arg("--emulator").arg(e);
    }
    let out = cmd
        .output()
        .expect("run target/debug/vmm (built by cargo xtask test)");
    let run = Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!("---- vmm {}\n{}{}", args.join(" "), run.stdout, run.stderr);
    run
}

/// The benchmark payload under the user device as the benchmark's
/// kvm-userdev variant runs it: edu's factorial register forwarded, an
/// ioeventfd at the doorbell; `extra` VMM arguments on top.
/// The benchmark payload under the benchmark's kvm-userdev variant, with
/// `extra` arguments for the VMM.
fn mmio_bench(samples: u64, extra: &[&str]) -> Run {
    mmio_bench_with(samples, "", extra)
}

/// `mmio-bench` with `words` added to its command line.
fn mmio_bench_with(samples: u64, words: &str, extra: &[&str]) -> Run {
    let cmdline = format!(
        "samples={samples} warmup=2 doorbell={DOORBELL:#x} woken-doorbell={WOKEN_DOORBELL:#x} {words}"
    );
    let doorbell = format!("{DOORBELL:#x}");
    let woken = format!("{WOKEN_DOORBELL:#x}");
    let mut args = vec!["--cmdline", &cmdline, "--doorbell", &doorbell];
    args.extend(["--woken-doorbell", &woken]);
    args.extend(USER);
    args.extend(extra);
    vmm_with("mmio-bench", &args, None)
}

fn assert_clean(s: &Stats) {
    assert_eq!(
        (
            s.timeouts,
            s.dropped_stores,
            s.detached_loads,
            s.stalled_accesses
        ),
        (0, 0, 0, 0),
        "{s:?}"
    );
}

/// No emulator saw a gap in the sequence numbers (an emulator that did not
/// get to say so has nothing to check).
fn assert_nothing_missed(run: &Run) {
    let missed = run.missed_accesses();
    assert!(missed.iter().all(|&m| m == 0), "{missed:?}");
}

#[test]
fn edu_features_through_the_user_device() {
    let run = vmm(&["--edu", "1", "--cmdline", "mode=full devices=1"], None);
    run.assert_guest_passed();
    let stats = run.stats();
    assert_eq!(stats.len(), 1);
    let s = &stats[0];
    // Side-effect-free registers came from the shadow image, stores were
    // posted; only loads right behind an unconsumed store were forwarded.
    assert!(s.shadow_loads > 0 && s.posted_stores > 0, "{s:?}");
    assert_clean(s);
    assert_nothing_missed(&run);
    assert_eq!(run.count("was killed"), 0);
}

/// The benchmark's classic paths serve the same model: in the VMM on
/// MMIO exits, and in the sandboxed emulator over a socket.
#[test]
fn edu_features_served_in_the_vmm() {
    let run = vmm(
        &["--serve", "in-process", "--cmdline", "mode=full devices=1"],
        None,
    );
    run.assert_guest_passed();
    assert_eq!(run.count("in-process irq_errors=0"), 1);
    assert_eq!(run.count("emulator pid"), 0);
}

#[test]
fn edu_features_forwarded_over_a_socket() {
    let run = vmm(
        &["--serve", "socket", "--cmdline", "mode=full devices=1"],
        None,
    );
    run.assert_guest_passed();
    assert_eq!(run.count("socket timeouts=0"), 1);
    assert_eq!(run.count("was killed"), 0);
}

/// The benchmark payload checks every answer it times; under the user
/// device its accesses take the paths the benchmark says they take: with
/// the default settings (adaptive polling on both sides), without polling,
/// and with handoff, as the benchmark's variants do.
#[test]
fn bench_payload_paths() {
    const SAMPLES: u64 = 20;
    let configurations: [&[&str]; 3] = [
        &[],
        &[
            "--poll-ns",
            "0",
            "--emulator-arg=--poll-us",
            "--emulator-arg=0",
        ],
        &[
            "--poll-ns",
            "0",
            "--emulator-arg=--poll-us",
            "--emulator-arg=0",
            "--handoff",
        ],
    ];
    for extra in configurations {
        let run = mmio_bench(SAMPLES, extra);
        assert!(
            run.status == Some(0) && run.stdout.contains("bench: done"),
            "mmio-bench {extra:?} did not finish cleanly (status {:?})",
            run.status
        );
        // Every access type the report expects.
        for access in ACCESSES {
            assert!(
                run.stdout
                    .contains(&format!("bench: samples {access} {SAMPLES} ")),
                "{extra:?}: no {access} samples"
            );
        }
        let s = &run.stats()[0];
        assert_clean(s);
        // Loads of the identification register, two per round of timed
        // loads (load, store-load-other, where it passes the pending
        // store): from the shadow image; the forwarded factorial
        // register: from the emulator; stores to the unused register:
        // batched.
        let timed = SAMPLES + 2;
        assert!(s.shadow_loads >= 2 * timed, "{extra:?}: {s:?}");
        assert!(s.forwarded_loads >= timed, "{extra:?}: {s:?}");
        assert!(s.posted_stores >= 4 * timed, "{extra:?}: {s:?}");
        assert!(s.batched_stores >= timed, "{extra:?}: {s:?}");
    }
}

/// Two vCPUs drive the device at once (the benchmark's two-vCPU part):
/// every access answers right on both, each vCPU's accesses are timed, and
/// nothing times out, is dropped or waits for ring space.
#[test]
fn bench_payload_two_vcpus() {
    const SAMPLES: u64 = 20;
    let run = mmio_bench_with(SAMPLES, "cpus=2", &["--cpus", "2"]);
    assert!(
        run.status == Some(0),
        "mmio-bench cpus=2 ended with {:?}",
        run.status
    );
    let parsed = kvm_userdev_bench::guest::parse(&run.stdout).expect("the payload's output");
    for access in kvm_userdev_bench::two_vcpus::ACCESSES {
        for cpus in [1, 2] {
            let span = parsed
                .smp
                .iter()
                .find(|s| s.access == access && s.cpus == cpus);
            assert!(
                span.is_some_and(|s| s.n == SAMPLES && s.cycles > 0),
                "{access} on {cpus}: {span:?}"
            );
        }
        for cpu in [0, 1] {
            let samples = parsed
                .smp_samples
                .iter()
                .find(|(a, c, _)| a == access && *c == cpu);
            assert!(
                samples.is_some_and(|(_, _, v)| v.len() as u64 == SAMPLES),
                "{access} vCPU {cpu}: {samples:?}"
            );
        }
    }
    let s = &run.stats()[0];
    assert_clean(s);
    assert_eq!(s.queue_full_waits, 0, "{s:?}");
    // Sync-loads always reach the emulator (a store-load's load only
    // when its store is still queued): the one-vCPU part's, then vCPU 0's
    // alone and both vCPUs' in the two-vCPU part.
    assert!(s.forwarded_loads >= 4 * SAMPLES, "{s:?}");
    assert_nothing_missed(&run);
}

/// The user device's tracepoints fire on each path, between the vCPU's
/// exit and its next entry, and `cargo xtask bench --trace` reads them back:
/// a forwarded load's exit holds the emulator's reply.
#[test]
fn tracepoints_show_each_path() {
    use kvm_userdev_bench::trace::{analyse, Tracing};
    const SAMPLES: u64 = 10;
    let tracing = Tracing::set_up().expect("set up tracefs");
    tracing.on(true).expect("tracing on");
    let run = mmio_bench(SAMPLES, &[]);
    let text = tracing.finish().expect("read the trace");
    assert!(
        run.status == Some(0),
        "mmio-bench failed ({:?})",
        run.status
    );
    let kinds = analyse(&text, DOORBELL);
    let kind = |name: &str| {
        kinds
            .iter()
            .find(|k| k.name == name)
            .unwrap_or_else(|| panic!("no {name} in the trace"))
    };
    for name in [
        "posted store (user device)",
        "shadow load (user device)",
        "forwarded load (user device)",
        "ioeventfd store",
    ] {
        assert!(kind(name).totals.len() as u64 >= SAMPLES, "too few {name}s");
    }
    assert!(kinds
        .iter()
        .all(|k| k.name != "failed access (user device)"));
    let forwarded = kind("forwarded load (user device)");
    let replies = &forwarded.steps["kvm_user_reply"];
    assert_eq!(replies.len(), forwarded.totals.len(), "a reply per load");
}

#[test]
fn every_load_forwarded_without_the_shadow_image() {
    let run = vmm(
        &[
            "--edu",
            "1",
            "--no-shadow",
            "--cmdline",
            "mode=full devices=1",
        ],
        None,
    );
    run.assert_guest_passed();
    let s = &run.stats()[0];
    assert_eq!(s.shadow_loads, 0, "{s:?}");
    assert!(s.forwarded_loads > 0 && s.posted_stores > 0, "{s:?}");
    assert_clean(s);
    assert_nothing_missed(&run);
}

#[test]
fn two_devices_two_emulators() {
    let run = vmm(&["--edu", "2", "--cmdline", "mode=full devices=2"], None);
    run.assert_guest_passed();
    assert_eq!(run.count(" started"), 2, "one emulator per device");
    let stats = run.stats();
    assert_eq!(stats.len(), 2);
    for s in &stats {
        assert!(s.shadow_loads > 0 && s.posted_stores > 0, "{s:?}");
        assert_clean(s);
    }
    assert_nothing_missed(&run);
}

#[test]
fn killed_emulator_reads_all_ones() {
    let run = vmm(&["--edu", "1", "--cmdline", "mode=kill"], None);
    run.assert_guest_passed();
    assert_eq!(run.count("was killed by signal 9 (SIGKILL)"), 1);
    let s = &run.stats()[0];
    assert!(s.detached_loads > 0, "{s:?}");
}

#[test]
fn restarted_emulator_answers_again() {
    let run = vmm(
        &["--edu", "1", "--restart", "--cmdline", "mode=kill-restart"],
        None,
    );
    run.assert_guest_passed();
    assert_eq!(run.count("was killed by signal 9 (SIGKILL)"), 1);
    assert_eq!(run.count(" started"), 2, "a second emulator took over");
}

/// The guest runs edu's features in rounds while the VMM kills its
/// emulator at a random moment of each (seeded) and starts another: the
/// queue waits in the kernel for the successor, which continues from the
/// state its predecessor committed, so the guest sees nothing. A load
/// waiting through a restart waits up to the 1 s access timeout; the VMM
/// logs how long each restart took, and the longest is printed.
#[test]
fn emulator_killed_in_every_round_goes_unnoticed() {
    const ROUNDS: usize = 10;
    let cmdline = format!("mode=survive rounds={ROUNDS}");
    let run = vmm(
        &[
            "--edu",
            "1",
            "--restart",
            "--kill-seed",
            "15",
            "--kill-delay-us",
            "40000",
            "--cmdline",
            &cmdline,
        ],
        None,
    );
    run.assert_guest_passed();
    assert_eq!(run.count("was killed by signal 9 (SIGKILL)"), ROUNDS);
    let s = &run.stats()[0];
    assert_clean(s);
    let resumed = run.count("resumed the state committed at applied_seq");
    let redelivered: u64 = run
        .stderr
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("redelivered="))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    let longest_restart_ms = run
        .stderr
        .lines()
        .filter_map(|l| l.strip_suffix(" ms after the kill"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    println!(
        "kills={ROUNDS} resumed={resumed} kept_records={} redelivered_at_exit={redelivered} longest_restart_ms={longest_restart_ms:.0}",
        s.kept_records
    );
    // A kill that lands before the first commit leaves nothing to resume.
    assert!(
        resumed > 0 && resumed <= ROUNDS,
        "{resumed} successors resumed"
    );
    assert_eq!(run.count("state region refused"), 0);
}

/// A snapshot taken mid-run (control command 4, `--snapshot`): the device
/// changed and put back into it (command 5: the guest goes on where it
/// was), and a new VM started from it (`--restore`) in which the guest
/// goes on from the instruction after command 4, without booting: it
/// prints the same device answers and ends as the saved VM's guest did.
/// With two vCPUs only the device is saved, and a new VM boots its guest
/// afresh with the device restored (`mode=restored`).
#[test]
fn snapshot_restores_the_same_device_answers() {
    let file = std::env::temp_dir().join(format!("edu-{}.state", std::process::id()));
    let file_arg = file.to_str().expect("a UTF-8 path");
    let with_file = ["--edu", "1", "--restart", "--snapshot", file_arg];
    let saved = vmm(
        &[&with_file[..], &["--cmdline", "mode=snapshot"]].concat(),
        None,
    );
    saved.assert_guest_passed();
    assert_eq!(saved.count("state saved to"), 1);
    assert_eq!(saved.count("bytes of the VM's"), 1);
    assert_eq!(saved.count("restored in place from the snapshot"), 1);
    let resumed = vmm(&[&with_file[..], &["--restore", file_arg]].concat(), None);
    resumed.assert_guest_passed();
    assert_eq!(resumed.count("the VM goes on from the snapshot"), 1);
    // The OUT that asked was completed before the vCPU was saved.
    assert_eq!(resumed.count("state saved to"), 0, "command 4 again");
    // Its first emulator, and the one after the restore in place.
    assert_eq!(resumed.count("resumed the state committed"), 2);
    assert_eq!(resumed.count("restored in place from the snapshot"), 1);
    let after_save = |r: &Run| -> Vec<String> {
        let out = &r.stdout;
        let from = out.find("# answers:").expect("answers");
        out[from..].lines().map(str::to_string).collect()
    };
    assert!(
        !resumed.stdout.contains("# edu-test: command line"),
        "the guest booted again:\n{}",
        resumed.stdout
    );
    assert_eq!(
        after_save(&saved),
        resumed
            .stdout
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        "the resumed guest printed what the saved one printed after the snapshot"
    );

    let two_vcpus = vmm(
        &[
            &with_file[..],
            &["--cpus", "2", "--cmdline", "mode=snapshot"],
        ]
        .concat(),
        None,
    );
    two_vcpus.assert_guest_passed();
    assert_eq!(two_vcpus.count("the device's only"), 1);
    let restored = vmm(
        &[
            "--edu",
            "1",
            "--restore",
            file_arg,
            "--cmdline",
            "mode=restored",
        ],
        None,
    );
    std::fs::remove_file(&file).expect("the snapshot file");
    restored.assert_guest_passed();
    assert_eq!(restored.count("restored from a snapshot of device 0"), 1);
    assert_eq!(restored.count("resumed the state committed"), 1);
    for run in [&saved, &resumed, &two_vcpus, &restored] {
        assert_clean(&run.stats()[0]);
    }
    let answers = |r: &Run| -> Vec<String> {
        r.stdout
            .lines()
            .filter(|l| l.starts_with("# answers:"))
            .map(str::to_string)
            .collect()
    };
    let (saved, two_vcpus, restored) = (answers(&saved), answers(&two_vcpus), answers(&restored));
    assert_eq!(saved.len(), 4, "{saved:?}");
    assert_eq!(saved[..2], saved[2..], "restored in place");
    assert_eq!(saved, two_vcpus, "two vCPUs");
    assert_eq!(saved[..2], restored[..], "the device restored in a new VM");
}

/// The test-only emulator tries `what` once sandboxed; seccomp must kill it.
fn sandbox_refuses(what: &str) {
    let probe = repo().join("target/probe/debug/kvm-userdev-emulator");
    let run = vmm(
        &[
            "--edu",
            "1",
            "--emulator-arg",
            "--probe",
            "--emulator-arg",
            what,
            "--cmdline",
            "mode=dead",
        ],
        Some(probe),
    );
    run.assert_guest_passed();
    assert!(
        !run.stderr.contains("SUCCEEDED"),
        "{what} got through the sandbox"
    );
    let killed = run.count("was killed by signal 31 (SIGSYS)") == 1;
    let refused = run
        .stderr
        .contains(&format!("sandbox probe: {what} refused"));
    assert!(
        killed || refused,
        "{what} neither killed the emulator nor was refused"
    );
}

#[test]
fn sandbox_refuses_open() {
    sandbox_refuses("open");
}

#[test]
fn sandbox_refuses_socket() {
    sandbox_refuses("socket");
}

#[test]
fn sandbox_refuses_execve() {
    sandbox_refuses("execve");
}
