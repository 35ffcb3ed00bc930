//! The benchmark's Linux part: the same guest kernel and initramfs
//! (`cargo xtask linux`'s) booted under each [`Host`], one after another,
//! each boot measuring, from inside the guest:
//!
//! - console output through the tty layer and through printk
//!   (`console-bench`, the 8250 driver on our 16550A model or QEMU's);
//! - the edu driver's round trips (`edu-tool --loop`): a liveness store and
//!   the load that reads it back, and an interrupt raised, handled and
//!   acknowledged;
//!
//! and, from outside, the time from starting the VMM (or QEMU) to the first
//! line of the guest's shell.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use userdev::stats;

use crate::linux::{Boot, Host};
use crate::process::{Collected, Proc};
use crate::qemu::VfioUserServer;
use crate::report::percentile;
use crate::results::{LinuxFigure, LinuxHostResult, LinuxResults};
use crate::variants::{BATCH_REGISTER, SYNC_LOAD_REGISTER};

/// A measured quantity.
pub struct Metric {
    pub key: &'static str,
    pub description: &'static str,
    pub unit: &'static str,
    /// Throughputs are; times are not.
    pub higher_is_better: bool,
}

/// What each boot measures, in report order.
pub const METRICS: [Metric; 5] = [
    Metric {
        key: "boot",
        description: "VMM start to the guest's shell",
        unit: "s",
        higher_is_better: false,
    },
    Metric {
        key: "tty",
        description: "console output through the tty layer (a FIFO per THRE interrupt)",
        unit: "KiB/s",
        higher_is_better: true,
    },
    Metric {
        key: "printk",
        description: "console output through printk (LSR polled before every byte)",
        unit: "KiB/s",
        higher_is_better: true,
    },
    Metric {
        key: "edu",
        description: "edu round trip through the driver: a store, then a load of it",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        key: "irq",
        description: "interrupt round trip through the driver: raise, handler, acknowledge",
        unit: "µs",
        higher_is_better: false,
    },
];

/// The hosts, in run order; QEMU, the reference, last.
pub const HOSTS: [Host; 6] = [
    Host::User,
    Host::InProcess,
    Host::Socket,
    Host::QemuVfioUser,
    Host::QemuVfioUserUserdev,
    Host::Qemu,
];

pub fn host_name(host: Host) -> &'static str {
    match host {
        Host::User => "kvm-userdev",
        Host::InProcess => "vmm-in-process",
        Host::Socket => "vmm-socket",
        Host::Qemu => "qemu",
        Host::QemuVfioUser => "qemu-vfio-user",
        Host::QemuVfioUserUserdev => "qemu-vfio-user-userdev",
    }
}

fn host_description(host: Host) -> &'static str {
    match host {
        Host::User => {
            "our VMM, the UART and edu served by sandboxed emulators through user devices"
        }
        Host::InProcess => "our VMM, the same models in the VMM, on exits to user space",
        Host::Socket => "our VMM, the same emulators behind a socket, on exits to user space",
        Host::Qemu => "QEMU -accel kvm with its own 16550A and edu, on exits to user space",
        Host::QemuVfioUser => {
            "QEMU 10.2 with its own 16550A, edu our sandboxed emulator over vfio-user (each BAR access an exit and a message)"
        }
        Host::QemuVfioUserUserdev => {
            "the same QEMU with qemu-patch/: edu's BAR0 through a KVM user device, the same emulator"
        }
    }
}

/// How much each boot measures.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub rounds: u32,
    /// The guest's vCPUs.
    pub guest_cpus: u8,
    pub console_seconds: f64,
    pub loops: u32,
}

/// The programs a boot needs: our VMM and QEMU, and the repository whose
/// target/guest-linux holds the guest.
pub struct Programs<'a> {
    pub repo: &'a Path,
    pub vmm: &'a Path,
    pub qemu: &'a Path,
    /// For the vfio-user hosts: the emulator, QEMU with the vfio-user
    /// client, and the same with qemu-patch/.
    pub emulator: &'a Path,
    pub qemu_vfio_user: Option<&'a Path>,
    pub qemu_vfio_user_patched: Option<&'a Path>,
}

/// The line the guest's command prints first: the shell is up.
const SHELL_UP: &str = "kvm-userdev-bench: shell";

/// The guest's command: every measurement, each only if the one before
/// succeeded.
fn guest_command(config: &Config) -> String {
    let s = config.console_seconds;
    format!(
        "echo {SHELL_UP} && console-bench tty {s} && console-bench printk {s} && \
         edu-tool --device /dev/edu0 --loop {}",
        config.loops
    )
}

/// One boot's figures, by metric key, and the counters per device.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    values: BTreeMap<&'static str, f64>,
    counters: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The guest's figures from its console: `console-bench: path=P bytes=N
/// seconds=S` and `edu-tool: round trips: liveness_us=.. raise_ack_us=..`.
fn parse_console(console: &str, values: &mut BTreeMap<&'static str, f64>) -> Result<()> {
    let words = |line: &str| -> BTreeMap<String, String> {
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let number = |w: &BTreeMap<String, String>, key: &str| -> Result<f64> {
        w.get(key)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .with_context(|| format!("no number {key}= in the guest's figures"))
    };
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("console-bench: ") {
            let w = words(rest);
            let key = match w.get("path").map(String::as_str) {
                Some("tty") => "tty",
                Some("printk") => "printk",
                _ => bail!("unexpected console-bench line {line:?}"),
            };
            let seconds = number(&w, "seconds")?;
            if seconds <= 0.0 {
                bail!("console-bench measured no time: {line:?}");
            }
            values.insert(key, number(&w, "bytes")? / 1024.0 / seconds);
        } else if let Some(rest) = line.strip_prefix("edu-tool: round trips: ") {
            let w = words(rest);
            values.insert("edu", number(&w, "liveness_us")?);
            values.insert("irq", number(&w, "raise_ack_us")?);
        }
    }
    Ok(())
}

/// Boots the guest once under `host` and measures.
fn run_host(host: Host, programs: &Programs, config: &Config) -> Result<Sample> {
    let mut boot = Boot::new(host);
    boot.cpus = config.guest_cpus;
    boot.edu = 1;
    boot.command = Some(guest_command(config));
    boot.timeout_s = 600;
    // The vfio-user hosts' emulator, killed when this returns.
    let mut server = None;
    let sockets = std::env::temp_dir().join(format!("linux-bench.{}", std::process::id()));
    match host {
        Host::Qemu => boot.qemu = Some(programs.qemu.to_path_buf()),
        Host::QemuVfioUser | Host::QemuVfioUserUserdev => {
            let (qemu, option) = match host {
                Host::QemuVfioUser => (programs.qemu_vfio_user, "--qemu-vfio-user"),
                _ => (programs.qemu_vfio_user_patched, "--qemu-vfio-user-patched"),
            };
            let qemu = qemu.with_context(|| format!("{} needs {option}", host_name(host)))?;
            let _ = std::fs::remove_dir_all(&sockets);
            std::fs::create_dir_all(&sockets)?;
            let socket = sockets.join("edu0");
            // Set up as the MMIO part's qemu-vfio-user-userdev.
            let args = ["--forward", SYNC_LOAD_REGISTER, "--batch", BATCH_REGISTER];
            server = Some(VfioUserServer::start(programs.emulator, &socket, &args)?);
            boot.qemu = Some(qemu.to_path_buf());
            boot.vfio_user = vec![socket];
        }
        _ => {}
    }
    let argv = boot.command(programs.repo, programs.vmm);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut proc = Proc::spawn(host_name(host), cmd, None)?;
    let stdout = proc.take_stdout().expect("piped");
    // The console, line by line (not UTF-8 throughout: the 8250 driver's
    // IRQ probe sends 0xff): the time the shell came up, and the lines
    // that carry figures or tell what went wrong.
    let reader = std::thread::spawn(move || {
        let mut shell_up = None;
        let mut kept = String::new();
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line);
            if shell_up.is_none() && text.contains(SHELL_UP) {
                shell_up = Some(started.elapsed());
            }
            if !text.starts_with("console-bench output") {
                kept.push_str(&text);
            }
            line.clear();
        }
        (shell_up, kept)
    });
    let errors = Collected::start(proc.take_stderr().expect("piped"));
    let deadline = Instant::now() + Duration::from_secs(boot.timeout_s + 60);
    let status = proc.wait_until(deadline)?;
    proc.kill();
    let (shell_up, console) = reader.join().expect("console reader");
    let stderr = errors.wait();
    let emulator_log = server.as_mut().map(VfioUserServer::finish);
    let _ = std::fs::remove_dir_all(&sockets);
    let guest_status = status.and_then(|s| s.code()).map(|c| host.guest_status(c));
    if guest_status != Some(0) {
        bail!(
            "the guest under {} ended with {guest_status:?} (host: {})\nconsole:\n{}\n{}:\n{}",
            host_name(host),
            proc.ending(),
            tail(&console),
            proc.role(),
            tail(&format!("{stderr}{}", emulator_log.unwrap_or_default()))
        );
    }
    let mut sample = Sample::default();
    let shell_up = shell_up.context("the guest's shell never printed its first line")?;
    sample.values.insert("boot", shell_up.as_secs_f64());
    parse_console(&console, &mut sample.values)
        .with_context(|| format!("the guest's figures:\n{}", tail(&console)))?;
    for m in &METRICS {
        if !sample.values.contains_key(m.key) {
            bail!("the guest printed no {} figure:\n{}", m.key, tail(&console));
        }
    }
    for (device, counters) in stats::lines(&stderr) {
        let counters = stats::pairs(counters)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        sample.counters.insert(device.to_string(), counters);
    }
    Ok(sample)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Boots the guest under every host, `config.rounds` times, each round
/// starting one host further down the list so that drift spreads evenly.
pub fn run(programs: &Programs, config: &Config) -> Result<LinuxResults> {
    let mut samples: Vec<Vec<Sample>> = HOSTS.iter().map(|_| Vec::new()).collect();
    let started = Instant::now();
    for round in 0..config.rounds as usize {
        for k in 0..HOSTS.len() {
            let i = (round + k) % HOSTS.len();
            let host = HOSTS[i];
            let t = Instant::now();
            let what = || format!("Linux guest, {} (round {})", host_name(host), round + 1);
            // A boot that fails is run once more: the test bed's nested
            // SVM resets a nested Linux guest now and then by itself
            // (see the README's Test section).
            let sample = match run_host(host, programs, config) {
                Ok(sample) => sample,
                Err(e) => {
                    eprintln!("bench: {}: {e:#}\nbench: booting it once more", what());
                    run_host(host, programs, config).with_context(what)?
                }
            };
            eprintln!(
                "bench: Linux round {}/{}: {} done in {:.1}s ({:.0}s so far)",
                round + 1,
                config.rounds,
                host_name(host),
                t.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
            samples[i].push(sample);
        }
    }
    let hosts = HOSTS
        .iter()
        .zip(samples)
        .map(|(&host, samples)| summarize(host, &samples))
        .collect();
    Ok(LinuxResults {
        date: crate::run::utc_now(),
        vm_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        guest_cpus: config.guest_cpus,
        rounds: config.rounds,
        console_seconds: config.console_seconds,
        loops: config.loops,
        hosts,
    })
}

fn summarize(host: Host, samples: &[Sample]) -> LinuxHostResult {
    let figures = METRICS
        .iter()
        .map(|m| {
            let rounds: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.values.get(m.key))
                .copied()
                .collect();
            let mut sorted = rounds.clone();
            sorted.sort_by(f64::total_cmp);
            LinuxFigure {
                metric: m.key.to_string(),
                value: percentile(&sorted, 50.0),
                rounds,
            }
        })
        .collect();
    let mut counters: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for s in samples {
        for (device, c) in &s.counters {
            let sum = counters.entry(device.clone()).or_default();
            for (k, v) in c {
                *sum.entry(k.clone()).or_default() += v;
            }
        }
    }
    LinuxHostResult {
        name: host_name(host).to_string(),
        description: host_description(host).to_string(),
        figures,
        counters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_figures_parse() {
        let console = "kvm-userdev-bench: shell\r\n\
                       console-bench output: the quick brown fox\r\n\
                       console-bench: path=tty bytes=20480 seconds=2.000000\r\n\
                       console-bench: path=printk bytes=4096 seconds=4.0\n\
                       ok /dev/edu0: loop 300: mean 900.0 us per loop\n\
                       edu-tool: round trips: liveness_us=120.50 factorial_irq_us=400.00 raise_ack_us=380.25\n";
        let mut values = BTreeMap::new();
        parse_console(console, &mut values).unwrap();
        assert_eq!(values["tty"], 10.0);
        assert_eq!(values["printk"], 1.0);
        assert_eq!(values["edu"], 120.5);
        assert_eq!(values["irq"], 380.25);

        let mut values = BTreeMap::new();
        assert!(parse_console("console-bench: path=tty bytes=x seconds=1\n", &mut values).is_err());
        assert!(
            parse_console("console-bench: path=disk bytes=1 seconds=1\n", &mut values).is_err()
        );
        assert!(parse_console("console-bench: path=tty bytes=1 seconds=0\n", &mut values).is_err());
    }

    #[test]
    fn command_measures_in_order() {
        let c = guest_command(&Config {
            rounds: 1,
            guest_cpus: 1,
            console_seconds: 3.0,
            loops: 300,
        });
        assert!(c.starts_with(&format!("echo {SHELL_UP} && console-bench tty 3 &&")));
        assert!(c.ends_with("edu-tool --device /dev/edu0 --loop 300"));
    }

    #[test]
    fn rounds_summarized_by_median_and_counters_summed() {
        let sample = |tty: f64, posted: u64| Sample {
            values: METRICS
                .iter()
                .map(|m| (m.key, if m.key == "tty" { tty } else { 1.0 }))
                .collect(),
            counters: [(
                "uart".to_string(),
                [("posted_stores".to_string(), posted)].into(),
            )]
            .into(),
        };
        let r = summarize(
            Host::User,
            &[sample(3.0, 5), sample(1.0, 7), sample(2.0, 1)],
        );
        assert_eq!(r.name, "kvm-userdev");
        let tty = r.figures.iter().find(|f| f.metric == "tty").unwrap();
        assert_eq!((tty.value, tty.rounds.clone()), (2.0, vec![3.0, 1.0, 2.0]));
        assert_eq!(r.counters["uart"]["posted_stores"], 13);
        assert_eq!(r.figures.len(), METRICS.len());
    }
}
