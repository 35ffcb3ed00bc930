//! `cargo xtask vm`: boot the cached patched kernel under QEMU TCG and run a
//! command in it.
//!
//! The VM is `qemu-system-x86_64 -accel tcg,thread=multi -cpu max`
//! (`thread=single` on request, see [`Tcg`]): TCG because the host's own
//! /dev/kvm cannot boot Linux, `-cpu max` because it exposes AMD SVM, so
//! the patched kernel's kvm_amd can run nested guests.
//! The host's root file system is shared read-only over virtio-9p and a
//! scratch directory read-write at the same path; `vm-init.sh` is PID 1.

use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_userdev_bench::process::Proc;

use crate::deps;
use crate::kernel::{self, Flavour};
use crate::logscan;
use crate::util::{cache_dir, fmt_duration, lock_file, print_tail, repo_root};

pub struct VmOptions {
    pub flavour: Flavour,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    pub scratch: PathBuf,
    pub tcg: Tcg,
    /// The command reads our stdin (through QEMU and the VM's console):
    /// for an interactive shell in a guest.
    pub interactive: bool,
    /// Environment variables the command gets.
    pub env: Vec<(String, String)>,
}

/// How QEMU's TCG runs the VM's vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tcg {
    /// One host thread per vCPU: the VM's CPUs run in parallel, which
    /// every test and the benchmark use; its nested SVM occasionally
    /// corrupts an L2 vCPU's state under stress (an L1 address saved as the
    /// guest's RIP).
    Multi,
    /// One host thread for all vCPUs: that fault was not seen, but a wakeup
    /// of a process on the other vCPU waits for TCG to switch CPUs, so
    /// tests that hand work between processes crawl (`cargo xtask soak
    /// --single-threaded-tcg`).
    Single,
}

impl Tcg {
    fn accel(self) -> &'static str {
        match self {
            Tcg::Multi => "tcg,thread=multi",
            Tcg::Single => "tcg,thread=single",
        }
    }
}

impl VmOptions {
    pub fn new(flavour: Flavour) -> Self {
        VmOptions {
            flavour,
            timeout: Duration::from_secs(600),
            memory_mib: 2048,
            cpus: 2,
            scratch: default_scratch(),
            tcg: Tcg::Multi,
            interactive: false,
            env: Vec::new(),
        }
    }
}

impl VmOptions {
    /// The VM that nested Linux guests run in (`cargo xtask linux`, the
    /// tests and the benchmark): the plain kernel (a nested Linux boot on the debug kernel
    /// takes minutes), one vCPU under single-threaded TCG. On two vCPUs
    /// under multi-threaded TCG, QEMU's nested SVM reset about one nested
    /// Linux guest in three (QEMU's own guest too), which it was not seen to
    /// do single-threaded; with one vCPU nothing waits for TCG to switch
    /// CPUs, so the Linux tests take no longer than on two.
    pub fn for_linux_guests() -> Self {
        let mut opts = VmOptions::new(Flavour::Plain);
        opts.cpus = 1;
        opts.tcg = Tcg::Single;
        opts
    }
}

pub fn default_scratch() -> PathBuf {
    repo_root().join("target/vm-scratch")
}

/// How a VM run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The command exited with this status.
    Exited(i32),
    /// The wall-clock limit ran out and the VM was killed.
    TimedOut(Duration),
    /// The VM stopped without the command finishing (a panic, or init died).
    Died,
}

pub struct VmRun {
    pub outcome: Outcome,
    /// What the command printed (stdout and stderr, in order).
    pub output: String,
    pub kernel_log_path: PathBuf,
    /// Kernel reports (warnings, KASAN, lockdep, leaks) that fail the run.
    pub reports: Vec<logscan::Report>,
}

impl VmRun {
    /// The exit status `cargo xtask vm` reports: the command's own, unless
    /// it succeeded and the kernel did not.
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Outcome::Exited(0) if !self.reports.is_empty() => 1,
            Outcome::Exited(code) => code,
            Outcome::TimedOut(_) => 124,
            Outcome::Died => 1,
        }
    }

    /// Prints why the run failed, if it did for a reason other than the
    /// command's own exit status.
    pub fn explain(&self) {
        match self.outcome {
            Outcome::TimedOut(t) => {
                eprintln!(
                    "xtask: the VM did not finish within {}: killed",
                    fmt_duration(t)
                );
                self.print_log_tail();
            }
            Outcome::Died => {
                eprintln!("xtask: the VM stopped before the command finished");
                self.print_log_tail();
            }
            Outcome::Exited(_) => {}
        }
        if !self.reports.is_empty() {
            eprintln!(
                "xtask: the kernel log has {} report(s) ({}):",
                self.reports.len(),
                self.kernel_log_path.display()
            );
            for r in &self.reports {
                eprintln!("--- kernel log line {}:", r.line);
                for l in &r.excerpt {
                    eprintln!("{l}");
                }
            }
        }
    }

    fn print_log_tail(&self) {
        eprintln!(
            "--- last kernel log lines ({}):",
            self.kernel_log_path.display()
        );
        print_tail(&self.kernel_log_path, 40);
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script the VM's init runs: the host's working directory and a few
/// environment variables, then the command.
fn command_script(
    cmd: &[String],
    cwd: &Path,
    scratch: &Path,
    interactive: bool,
    env: &[(String, String)],
) -> String {
    let mut s = String::from("# written by cargo xtask vm\n");
    if interactive {
        // The console that carries our stdin (QEMU's stdio chardev).
        s.push_str("exec </dev/hvc0\n");
    }
    s.push_str(&format!(
        "cd {} || exit 125\n",
        shell_quote(&cwd.to_string_lossy())
    ));
    s.push_str("export HOME=\"${TMPDIR:-/tmp}\" TERM=dumb\n");
    s.push_str(&format!(
        "export KVM_USERDEV_SCRATCH={}\n",
        shell_quote(&scratch.to_string_lossy())
    ));
    for var in ["RUST_BACKTRACE", "RUST_LOG"] {
        if let Ok(v) = std::env::var(var) {
            s.push_str(&format!("export {var}={}\n", shell_quote(&v)));
        }
    }
    for (var, v) in env {
        s.push_str(&format!("export {var}={}\n", shell_quote(v)));
    }
    let words: Vec<String> = cmd.iter().map(|w| shell_quote(w)).collect();
    s.push_str(&format!("exec {}\n", words.join(" ")));
    s
}

/// Boots the kernel of `opts.flavour` and runs `cmd` in it, streaming its
/// output to our stdout.
pub fn run(opts: &VmOptions, cmd: &[String]) -> Result<VmRun> {
    if cmd.is_empty() {
        bail!("no command to run in the VM");
    }
    let kernel = kernel::find(opts.flavour)?;
    let qemu = deps::ensure_qemu()?;

    let scratch = &opts.scratch;
    fs::create_dir_all(scratch).with_context(|| format!("create {}", scratch.display()))?;
    let scratch = scratch.canonicalize()?;
    // The command, its status and the kernel log pass through fixed names
    // in the scratch directory: one VM at a time per directory.
    let _lock = lock_file(&scratch.join(".vm-lock"), &scratch)?;
    for f in [".vm-status", ".vm-kmemleak", ".vm-cmd"] {
        let _ = fs::remove_file(scratch.join(f));
    }
    let cwd = std::env::current_dir()?;
    // The guest gets a tmpfs of its own on /tmp, unless that would hide host
    // files the run needs (a checkout or cache under /tmp); then /tmp stays
    // the host's, read-only, and TMPDIR points to a tmpfs instead.
    let host_tmp = [&cwd, &repo_root(), &cache_dir(), &scratch]
        .iter()
        .any(|p| p.starts_with("/tmp"));
    fs::write(
        scratch.join(".vm-cmd"),
        command_script(cmd, &cwd, &scratch, opts.interactive, &opts.env),
    )?;
    let kernel_log_path = scratch.join("kernel.log");
    let qemu_cmd = qemu_command(
        qemu,
        opts,
        &kernel.bzimage,
        &kernel_append(host_tmp, &scratch),
        &scratch,
        &kernel_log_path,
    );

    eprintln!(
        "xtask: booting {} ({} kernel, {} vCPUs, {} MiB, limit {})",
        kernel.release,
        opts.flavour.name(),
        opts.cpus,
        opts.memory_mib,
        fmt_duration(opts.timeout)
    );
    let started = Instant::now();
    let (timed_out, output) = supervise(qemu_cmd, opts.timeout)?;

    let status = fs::read_to_string(scratch.join(".vm-status"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let outcome = match (timed_out, status) {
        (true, _) => Outcome::TimedOut(opts.timeout),
        (false, Some(code)) => Outcome::Exited(code),
        (false, None) => Outcome::Died,
    };
    let mut log = fs::read_to_string(&kernel_log_path).unwrap_or_default();
    if let Ok(leaks) = fs::read_to_string(scratch.join(".vm-kmemleak")) {
        log.push_str(&leaks);
    }
    eprintln!("xtask: VM finished in {}", fmt_duration(started.elapsed()));
    Ok(VmRun {
        outcome,
        output,
        kernel_log_path,
        reports: logscan::scan(&log),
    })
}

/// The kernel's command line: root over 9p, `vm-init.sh` as init, the
/// scratch directory as its argument.
fn kernel_append(host_tmp: bool, scratch: &Path) -> String {
    let init = repo_root().join("xtask/vm-init.sh");
    // The root is read-only and does not change while the VM runs, so the
    // guest may cache it (cache=loose): without that every exec reads the
    // binary and its libraries over 9p again, page by page.
    // no5lvl: with -cpu max the kernel would use 5-level paging, under which
    // 6.12's early KASAN reports a wild access at boot.
    format!(
        "console=ttyS0 root=/dev/root rootfstype=9p \
         rootflags=trans=virtio,version=9p2000.L,cache=loose,msize=524288 \
         ro init={} panic=-1 no5lvl kvm_userdev_tmp={} -- {}",
        init.display(),
        if host_tmp { "host" } else { "tmpfs" },
        scratch.display()
    )
}

/// QEMU with the host's root and the scratch directory over 9p, the kernel
/// log into `kernel_log`, the command's output on its stdout (piped).
fn qemu_command(
    qemu: &Path,
    opts: &VmOptions,
    bzimage: &Path,
    append: &str,
    scratch: &Path,
    kernel_log: &Path,
) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", opts.tcg.accel(), "-cpu", "max"])
        .args(["-smp", &opts.cpus.to_string()])
        .args(["-m", &format!("{}M", opts.memory_mib)])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(bzimage)
        .args(["-append", append])
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on",
        ])
        .args(["-device", "virtio-9p-pci,fsdev=root,mount_tag=/dev/root"])
        .arg("-fsdev")
        .arg(format!(
            "local,id=scratch,path={},security_model=none",
            scratch.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=scratch,mount_tag=scratch"])
        .arg("-serial")
        .arg(format!("file:{}", kernel_log.display()))
        .args(["-device", "virtio-serial-pci"])
        .args(["-chardev", "stdio,id=out,signal=off"])
        .args(["-device", "virtconsole,chardev=out"])
        .stdout(Stdio::piped());
    // QEMU's stdio chardev puts a terminal on stdin into raw mode itself.
    cmd.stdin(if opts.interactive {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    cmd
}

/// Runs QEMU until it exits or `timeout` passes (then it is killed), while
/// copying its stdout to ours. Returns whether it timed out, and the output.
/// QEMU is killed on every way out of here, an error included.
fn supervise(qemu_cmd: Command, timeout: Duration) -> Result<(bool, String)> {
    let mut qemu = Proc::spawn("qemu-system-x86_64", qemu_cmd, None)?;
    let mut stdout = qemu.take_stdout().expect("piped");
    let copier = std::thread::spawn(move || {
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&buf[..n]);
            let _ = out.flush();
            output.extend_from_slice(&buf[..n]);
        }
        output
    });
    let timed_out = qemu.wait_until(Instant::now() + timeout)?.is_none();
    qemu.kill();
    let output = copier.join().unwrap_or_default();
    Ok((timed_out, String::from_utf8_lossy(&output).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        let script = command_script(
            &["printf".into(), "%s|".into(), "it's".into(), "$HOME".into()],
            Path::new("/work/a b"),
            Path::new("/s"),
            false,
            &[],
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(script.replace("cd '/work/a b' || exit 125", "cd /"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's|$HOME|");
        assert!(script.contains("cd '/work/a b' || exit 125"));
    }

    #[test]
    fn exit_code_reflects_kernel_reports() {
        let run = |outcome, reports: Vec<logscan::Report>| VmRun {
            outcome,
            output: String::new(),
            kernel_log_path: PathBuf::new(),
            reports,
        };
        let report = || logscan::scan("WARNING: x\n");
        assert_eq!(run(Outcome::Exited(0), vec![]).exit_code(), 0);
        assert_eq!(run(Outcome::Exited(3), vec![]).exit_code(), 3);
        assert_eq!(run(Outcome::Exited(0), report()).exit_code(), 1);
        assert_eq!(run(Outcome::Exited(3), report()).exit_code(), 3);
        assert_eq!(
            run(Outcome::TimedOut(Duration::ZERO), vec![]).exit_code(),
            124
        );
        assert_eq!(run(Outcome::Died, vec![]).exit_code(), 1);
    }
}
