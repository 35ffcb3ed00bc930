//! What an idle guest costs the host: the benchmark payload halts for a
//! while after a few timed accesses (so that adaptive polling has grown),
//! and the CPU time the VMM (its vCPU threads included) and the emulator
//! use meanwhile is read from `/proc`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::process::{Collected, Proc};

/// What one idle measurement found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleCost {
    /// How long the guest was idle, as the host measured it.
    pub seconds: f64,
    /// CPU time over that span, in percent of one CPU.
    pub vmm_percent: f64,
    pub emulator_percent: f64,
}

impl IdleCost {
    pub fn total_percent(&self) -> f64 {
        self.vmm_percent + self.emulator_percent
    }
}

/// CPU seconds `pid` (all its threads) has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The fields after the command's closing parenthesis start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .with_context(|| format!("/proc/{pid}/stat field {i}"))
    };
    // SAFETY: sysconf has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(14)? + ticks(15)?) / hz)
}

/// The pids the VMM reported for its emulators (`emulator pid N started`).
fn emulator_pids(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("emulator pid ")?.1.strip_suffix(" started"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn sample(vmm: u32, emulators: &[u32]) -> Result<(f64, f64)> {
    let mut emu = 0.0;
    for &pid in emulators {
        emu += cpu_seconds(pid)?;
    }
    Ok((cpu_seconds(vmm)?, emu))
}

/// Runs `command` (our VMM with the payload, its command line asking for
/// `idle=N`) and measures the idle span the payload announces. The VMM is
/// killed if it has not ended by `timeout`.
pub fn measure(mut command: Command, timeout: Duration) -> Result<IdleCost> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut vmm = Proc::spawn("the VMM", command, None)?;
    let pid = vmm.id();
    let stderr = Arc::new(Collected::start(vmm.take_stderr().context("stderr")?));
    // The console, line by line: the CPU times are read at the two lines
    // around the idle span, the emulators' pids (all started by then) at
    // the first.
    let out_pipe = vmm.take_stdout().context("stdout")?;
    let log = Arc::clone(&stderr);
    let console = std::thread::spawn(move || -> Result<(Option<IdleCost>, String)> {
        let mut transcript = String::new();
        let mut begin = None;
        for line in BufReader::new(out_pipe).lines() {
            let line = line?;
            transcript.push_str(&line);
            transcript.push('\n');
            if line.starts_with("bench: idle begin") {
                let emulators = emulator_pids(&log.text());
                begin = Some((Instant::now(), sample(pid, &emulators)?, emulators));
            } else if line.starts_with("bench: idle end") {
                let Some((t0, (vmm0, emu0), emulators)) = begin.take() else {
                    bail!("idle end without a beginning");
                };
                let (vmm1, emu1) = sample(pid, &emulators)?;
                let seconds = t0.elapsed().as_secs_f64();
                let cost = IdleCost {
                    seconds,
                    vmm_percent: 100.0 * (vmm1 - vmm0) / seconds,
                    emulator_percent: 100.0 * (emu1 - emu0) / seconds,
                };
                return Ok((Some(cost), transcript));
            }
        }
        Ok((None, transcript))
    });
    let status = vmm.wait_until(Instant::now() + timeout)?;
    vmm.kill();
    let (cost, transcript) = console.join().expect("console reader")?;
    let stderr = Arc::into_inner(stderr)
        .expect("the console reader has ended")
        .wait();
    match (cost, status) {
        (Some(cost), Some(status)) if status.success() => Ok(cost),
        _ => bail!(
            "the idle run ended ({}) without measuring\nguest:\n{}\nvmm:\n{}",
            vmm.ending(),
            crate::qemu::tail(&transcript),
            crate::qemu::tail(&stderr)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_pids_from_the_vmm_log() {
        let log = "vmm: edu at 00:01.0: emulator pid 412 started\nvmm: other\n\
                   vmm: uart: emulator pid 7 started\n";
        assert_eq!(emulator_pids(log), vec![412, 7]);
    }

    #[test]
    fn own_cpu_time_reads() {
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }
}
