//! `cargo xtask test`: the checks, host tests, then the in-VM tests on the
//! debug kernel, ending with one `N passed, N failed` line.

use anyhow::{Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::binaries::guest_cargo;
use crate::kernel::{self, Flavour};
use crate::stress;
use crate::util::{cargo, fmt_duration};
use crate::vm::{self, shell_quote, Outcome, VmOptions};

/// The package whose tests run inside the VM.
const VM_TESTS: &str = "vm-tests";
/// Its Linux guest tests (tests/linux.rs), which run on the plain kernel.
const LINUX_TESTS: &str = "linux-";

/// The kernel's own tests of the series, relative to the built selftests,
/// with their arguments. `figures` reports timings, which mean nothing on the
/// debug kernel; the benchmark runs it on the plain one.
const KVM_SELFTESTS: &[(&str, &[&str])] = &[("x86_64/user_dev_test", &["-T", "figures"])];

/// How long the randomized stress test runs in `cargo xtask test`.
const STRESS_SECONDS: u64 = 45;

/// What the debug kernel may take for all in-VM tests, boot included.
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    failures: Vec<String>,
    /// Faults attributed to QEMU TCG: by the stress test, or a VM that
    /// ended without a kernel report.
    testbed_faults: usize,
}

impl Tally {
    fn check(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failures.push(name.to_string());
        }
    }

    /// Adds libtest's `test result:` lines from `output`; returns how many
    /// it found.
    fn add_libtest(&mut self, what: &str, output: &str) -> usize {
        let mut found = 0;
        for line in output.lines() {
            if let Some(r) = parse_libtest_result(line) {
                found += 1;
                self.add(what, &r);
            }
        }
        found
    }

    fn add(&mut self, what: &str, r: &LibtestResult) {
        self.passed += r.passed;
        self.ignored += r.ignored;
        if r.failed > 0 {
            self.failed += r.failed;
            self.failures.push(format!("{what}: {} test(s)", r.failed));
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct LibtestResult {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`
fn parse_libtest_result(line: &str) -> Option<LibtestResult> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, counts) = rest.split_once(". ")?;
    let mut r = LibtestResult {
        passed: 0,
        failed: 0,
        ignored: 0,
    };
    for part in counts.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => r.passed = n,
            "failed" => r.failed = n,
            "ignored" => r.ignored = n,
            _ => {}
        }
    }
    Some(r)
}

fn banner(what: &str) {
    eprintln!("\n==== {what}");
}

/// Runs `cmd`, passing its output through and returning it as well.
fn tee(cmd: &mut Command) -> Result<(bool, String)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    }
    Ok((child.wait()?.success(), out))
}

/// Builds the in-VM test binaries and returns their paths.
fn build_vm_tests() -> Result<Vec<PathBuf>> {
    let mut child = cargo()
        .args([
            "test",
            "-p",
            VM_TESTS,
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut json = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut json)?;
    if !child.wait()?.success() {
        anyhow::bail!("cargo test -p {VM_TESTS} --no-run failed");
    }
    let mut bins = vec![];
    for line in json.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            if let Some(exe) = msg["executable"].as_str() {
                bins.push(PathBuf::from(exe));
            }
        }
    }
    Ok(bins)
}

const SECTION: &str = "== in-VM test ";
const CRASHED: &str = "== exit status ";

/// How a test program reports.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Rust's libtest: `test result: ok. N passed; ...`.
    Libtest,
    /// The kernel's kselftest harness: TAP, `ok N name` / `not ok N name`.
    Ktap,
    /// One test whose exit status is the verdict.
    Status,
}

/// A test program to run in the VM.
#[derive(Clone)]
struct Suite {
    name: String,
    path: PathBuf,
    args: Vec<String>,
    format: Format,
    /// A shell script to run instead of the program with `args`.
    script: Option<String>,
}

impl Suite {
    fn new(path: PathBuf, format: Format) -> Self {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        Suite {
            name,
            path,
            args: vec![],
            format,
            script: None,
        }
    }
}

/// The shell loop the VM runs: every test program, announced, and its exit
/// status printed when not 0, so a crash without results is seen.
fn vm_runner(suites: &[Suite]) -> Vec<String> {
    let mut script = String::from("rc=0\n");
    for suite in suites {
        let mut cmd = shell_quote(&suite.path.to_string_lossy());
        for arg in &suite.args {
            cmd.push(' ');
            cmd.push_str(&shell_quote(arg));
        }
        if let Some(script) = &suite.script {
            cmd = format!("( {script} )");
        }
        script.push_str(&format!(
            "echo '{SECTION}{}'\n{cmd} || {{ echo \"{CRASHED}$?\"; rc=1; }}\n",
            suite.name
        ));
    }
    script.push_str("exit $rc\n");
    vec!["sh".into(), "-c".into(), script]
}

/// TAP results: `ok` and `not ok` lines at the top level, and the plan.
fn parse_ktap(output: &str) -> (LibtestResult, Option<u64>) {
    let mut r = LibtestResult {
        passed: 0,
        failed: 0,
        ignored: 0,
    };
    let mut plan = None;
    for line in output.lines() {
        if let Some(n) = line.strip_prefix("1..") {
            plan = n.trim().parse().ok();
        } else if line.starts_with("not ok ") {
            r.failed += 1;
        } else if line.starts_with("ok ") {
            if line.contains("# SKIP") {
                r.ignored += 1;
            } else {
                r.passed += 1;
            }
        }
    }
    (r, plan)
}

/// Tallies the runner's output, one section per test program.
fn tally_vm_output(output: &str, suites: &[Suite], tally: &mut Tally) {
    let sections: Vec<&str> = output.split(SECTION).skip(1).collect();
    for section in &sections {
        let name = section.lines().next().unwrap_or("?").to_string();
        let what = format!("in-VM {name}");
        let format = suites
            .iter()
            .find(|s| s.name == name)
            .map_or(Format::Libtest, |s| s.format);
        let failed_before = tally.failed;
        // The stress test and the Linux guest's tests mark each fault they
        // attribute to the test bed (and repeat that run once).
        tally.testbed_faults += stress::testbed_faults(section);
        let complete = match format {
            Format::Libtest => tally.add_libtest(&what, section) > 0,
            Format::Status => {
                tally.check(&what, !section.contains(CRASHED));
                true
            }
            Format::Ktap => {
                let (r, plan) = parse_ktap(section);
                tally.add(&what, &r);
                plan == Some(r.passed + r.failed + r.ignored)
            }
        };
        let exited_badly = section.contains(CRASHED);
        if !complete || (exited_badly && tally.failed == failed_before) {
            tally.check(&format!("{what} (results missing: crashed?)"), false);
        }
    }
    if sections.len() < suites.len() {
        tally.check(
            &format!(
                "in-VM tests ({} of {} programs ran)",
                sections.len(),
                suites.len()
            ),
            false,
        );
    }
}

pub fn run(linux_guest: bool) -> Result<i32> {
    let started = Instant::now();
    let mut tally = Tally::default();
    host_checks(&mut tally)?;

    banner("debug kernel: cargo xtask kernel --debug");
    let kernel = match kernel::build(Flavour::Debug) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            None
        }
    };
    tally.check("debug kernel build", kernel.is_some());

    banner("QEMU with the vfio-user client: cargo xtask qemu [--patched]");
    let qemu_env = match crate::qemu::Qemus::build() {
        Ok(qemus) => qemus.env(),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            tally.check("QEMU build", false);
            Vec::new()
        }
    };

    banner("in-VM tests on the debug kernel");
    // The VMM, the emulators, the guest payloads and the Linux guest (the
    // plain kernel, its edu module and initramfs) the tests run.
    let bins = crate::binaries::build(false)
        .and_then(|_| match linux_guest {
            true => crate::linux::build_guest(),
            false => Ok(()),
        })
        .and_then(|_| build_vm_tests());
    match (kernel, bins) {
        (None, _) => eprintln!("xtask: no kernel, so no in-VM tests"),
        (Some(_), Err(e)) => {
            eprintln!("xtask: {e:#}");
            tally.check("in-VM test build", false);
        }
        (Some(kernel), Ok(bins)) => {
            // The Linux guest's tests boot a whole kernel nested under TCG:
            // on the debug kernel one boot takes minutes, so they get a
            // boot of the plain one of their own.
            let (linux, others): (Vec<_>, Vec<_>) = bins.into_iter().partition(|b| {
                b.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(LINUX_TESTS))
            });
            let suites = suites(others, &kernel);
            let mut opts = VmOptions::new(Flavour::Debug);
            opts.env = qemu_env.clone();
            run_in_vm(opts, &suites, &mut tally).context("run the VM")?;
            if linux_guest {
                banner("Linux guest tests, in a VM on the plain kernel");
                let suites: Vec<Suite> = linux.into_iter().map(libtest_suite).collect();
                let mut opts = VmOptions::for_linux_guests();
                opts.env = qemu_env;
                run_in_vm(opts, &suites, &mut tally).context("run the VM")?
            } else {
                eprintln!("\nxtask: the Linux guest's tests were left out (--no-linux)");
            }
        }
    }

    eprintln!(
        "\n==== cargo xtask test finished in {}",
        fmt_duration(started.elapsed())
    );
    for f in &tally.failures {
        eprintln!("FAILED: {f}");
    }
    if tally.testbed_faults > 0 {
        eprintln!(
            "xtask: {} test-bed fault(s) (QEMU TCG) in the stress test or a VM, each run repeated once",
            tally.testbed_faults
        );
    }
    let skipped = if tally.ignored > 0 {
        format!(", {} skipped", tally.ignored)
    } else {
        String::new()
    };
    println!("{} passed, {} failed{skipped}", tally.passed, tally.failed);
    let _ = std::io::stdout().flush();
    Ok(if tally.failed == 0 { 0 } else { 1 })
}

/// fmt and clippy on both workspaces, then the host tests.
fn host_checks(tally: &mut Tally) -> Result<()> {
    banner("cargo fmt --all --check");
    let ok = cargo()
        .args(["fmt", "--all", "--check"])
        .status()?
        .success();
    tally.check("cargo fmt --check", ok);

    banner("cargo clippy --workspace --all-targets -- -D warnings");
    let ok = cargo()
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .status()?
        .success();
    tally.check("cargo clippy", ok);

    banner("guest payloads: cargo fmt --check, cargo clippy (in guest/)");
    let ok = guest_cargo().args(["fmt", "--check"]).status()?.success();
    tally.check("guest: cargo fmt --check", ok);
    let ok = guest_cargo()
        .args(["clippy", "--release", "--", "-D", "warnings"])
        .status()?
        .success();
    tally.check("guest: cargo clippy", ok);

    banner("host tests: cargo test --workspace");
    let (ok, out) = tee(cargo().args(["test", "--workspace", "--exclude", VM_TESTS]))?;
    if tally.add_libtest("host tests", &out) == 0 || (!ok && tally.failed == 0) {
        tally.check("host tests (cargo test did not run them)", ok);
    }

    Ok(())
}

/// An in-VM test binary, one test at a time: each boots a nested guest
/// and starts emulators, and the VM has two vCPUs.
fn libtest_suite(bin: PathBuf) -> Suite {
    let mut s = Suite::new(bin, Format::Libtest);
    s.args = vec!["--test-threads=1".into()];
    s
}

/// What the VM runs, in order: the in-VM test binaries, the series'
/// selftest and the stress test.
fn suites(bins: Vec<PathBuf>, kernel: &kernel::Kernel) -> Vec<Suite> {
    // One test at a time: each boots a nested guest and starts
    // emulators, and the VM has two vCPUs.
    let mut suites: Vec<Suite> = bins.into_iter().map(libtest_suite).collect();
    for (selftest, args) in KVM_SELFTESTS {
        let mut suite = Suite::new(kernel.selftests.join(selftest), Format::Ktap);
        suite.args = args.iter().map(|a| a.to_string()).collect();
        suites.push(suite);
    }
    let stress = kernel.selftests.join(stress::PROGRAM);
    let mut suite = Suite::new(stress.clone(), Format::Status);
    suite.script = Some(stress::script(
        &stress.to_string_lossy(),
        &["-d".into(), STRESS_SECONDS.to_string()],
        Duration::from_secs(STRESS_SECONDS),
        "stress",
    ));
    suites.push(suite);
    suites
}

/// A VM that stopped before its command finished, without a panic or any
/// other report in its kernel log.
fn testbed_death(run: &vm::VmRun) -> bool {
    let log = std::fs::read_to_string(&run.kernel_log_path).unwrap_or_default();
    matches!(run.outcome, Outcome::Died) && run.reports.is_empty() && !log.contains("Kernel panic")
}

/// One boot of the VM `opts` describes, running `suites`. The debug
/// kernel's VM runs multi-threaded TCG: its tests need the emulators and
/// vCPUs to run in parallel. Under single-threaded TCG on two vCPUs, every
/// wakeup of a process on the other vCPU waits for TCG to switch CPUs: the
/// end-to-end tests took 865 s and three ran out of time, and the stress
/// test got through one guest iteration a minute. The stress test tells the
/// test bed's nested SVM fault apart instead.
fn run_in_vm(mut opts: VmOptions, suites: &[Suite], tally: &mut Tally) -> Result<()> {
    let flavour = opts.flavour;
    opts.timeout = VM_TIMEOUT;
    let mut run = vm::run(&opts, &vm_runner(suites))?;
    run.explain();
    if testbed_death(&run) {
        // QEMU TCG ended the VM itself: no panic, oops or report in the
        // kernel log, which simply stops (seen while nested Linux guests
        // boot). Like the stress test's test-bed faults: counted, and the
        // run repeated once; a second one fails.
        eprintln!(
            "xtask: the VM ended without a kernel report (a QEMU TCG fault, kernel log above): running it again"
        );
        tally.testbed_faults += 1;
        run = vm::run(&opts, &vm_runner(suites))?;
        run.explain();
    }
    tally_vm_output(&run.output, suites, tally);
    if !matches!(run.outcome, Outcome::Exited(_)) {
        tally.check(
            &format!(
                "in-VM run, {} kernel (the VM did not finish)",
                flavour.name()
            ),
            false,
        );
    }
    tally.check(
        &format!("kernel log clean ({} kernel)", flavour.name()),
        run.reports.is_empty(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_results_parsed() {
        let ok = "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; \
                  finished in 0.03s";
        assert_eq!(
            parse_libtest_result(ok),
            Some(LibtestResult {
                passed: 3,
                failed: 0,
                ignored: 1
            })
        );
        let failed = "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured";
        assert_eq!(parse_libtest_result(failed).unwrap().failed, 1);
        assert_eq!(parse_libtest_result("test foo ... ok"), None);
    }

    #[test]
    fn tally_counts_results_and_failures() {
        let mut t = Tally::default();
        let out = "test result: ok. 3 passed; 0 failed; 0 ignored\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored\n";
        assert_eq!(t.add_libtest("x", out), 2);
        t.check("fmt", true);
        t.check("clippy", false);
        assert_eq!((t.passed, t.failed), (5, 3));
        assert_eq!(t.failures, ["x: 2 test(s)", "clippy"]);
    }

    #[test]
    fn vm_output_sections_tallied() {
        let suites = [
            Suite::new(PathBuf::from("/t/a-1"), Format::Libtest),
            Suite::new(PathBuf::from("/t/b-2"), Format::Libtest),
            Suite::new(PathBuf::from("/k/user_dev_test"), Format::Ktap),
        ];
        let script = &vm_runner(&suites)[2];
        assert!(script.contains("'/t/a-1' || "));
        let out = format!(
            "{SECTION}a-1\ntest result: ok. 2 passed; 0 failed; 0 ignored\n\
             {SECTION}b-2\nthread panicked\n{CRASHED}101\n\
             {SECTION}user_dev_test\nTAP version 13\n1..3\n# Starting 3 tests\n\
             ok 1 udev.ranges\nnot ok 2 udev.bad\nok 3 udev.skip # SKIP why\n{CRASHED}1\n"
        );
        let mut t = Tally::default();
        tally_vm_output(&out, &suites, &mut t);
        assert_eq!((t.passed, t.failed, t.ignored), (3, 2, 1));

        // A TAP program that stops before its plan is done has failed.
        let cut = out.replace("ok 3 udev.skip # SKIP why\n", "");
        let mut t = Tally::default();
        tally_vm_output(&cut, &suites, &mut t);
        assert_eq!((t.passed, t.failed), (3, 3));

        // A program that never ran has failed.
        let mut more = suites.to_vec();
        more.push(Suite::new(PathBuf::from("/t/d-4"), Format::Libtest));
        let mut t = Tally::default();
        tally_vm_output(&out, &more, &mut t);
        assert_eq!(t.failed, 3);
    }
}
