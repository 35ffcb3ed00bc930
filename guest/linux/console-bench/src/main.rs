//! `console-bench tty|printk SECONDS`: how fast the guest's serial console
//! takes output, the way the benchmark's Linux part measures it.
//!
//! - `tty` writes lines to /dev/ttyS0 for SECONDS, then waits until the
//!   driver has sent them all (tcdrain): the 8250 driver's interrupt-driven
//!   path, a FIFO's worth of THR stores per THRE interrupt.
//! - `printk` writes lines to /dev/kmsg for SECONDS with every level
//!   printed on the console: each write returns once the console driver has
//!   printed it, and the 8250 console polls LSR before every byte.
//!
//! Prints one line, `console-bench: path=P bytes=N seconds=S`: the bytes
//! counted are what the lines hold (a newline included, the CR the tty adds
//! and printk's prefix not), the same on every host.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: console-bench tty|printk SECONDS";

/// What every line says; 64 bytes with its newline, free of anything the
/// host looks for in the console output.
const LINE: &[u8; 64] = b"console-bench output: the quick brown fox jumps over the dog ..\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Tty,
    Printk,
}

fn parse_args(args: &[String]) -> Result<(Path, Duration), String> {
    let [path, seconds] = args else {
        return Err(USAGE.into());
    };
    let path = match path.as_str() {
        "tty" => Path::Tty,
        "printk" => Path::Printk,
        other => return Err(format!("unknown path {other:?}\n{USAGE}")),
    };
    let seconds: f64 = seconds
        .parse()
        .map_err(|_| format!("bad SECONDS {seconds:?}"))?;
    if !(0.1..=600.0).contains(&seconds) {
        return Err("SECONDS must be 0.1 to 600".into());
    }
    Ok((path, Duration::from_secs_f64(seconds)))
}

/// Writes lines to the tty until `duration` has passed, then drains it.
fn tty(duration: Duration) -> io::Result<(u64, Duration)> {
    let mut tty = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ttyS0")?;
    let chunk = LINE.repeat(16);
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        tty.write_all(&chunk)?;
        bytes += chunk.len() as u64;
    }
    // SAFETY: tcdrain only waits on the descriptor, which `tty` owns.
    if unsafe { libc::tcdrain(tty.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((bytes, started.elapsed()))
}

/// A setting in a file of /proc or /sys, put back when dropped. Values
/// are written as read, newline included: printk_devkmsg refuses one
/// without it.
struct Setting {
    path: &'static str,
    old: String,
}

impl Setting {
    fn set(path: &'static str, value: &str) -> io::Result<Setting> {
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, format!("{value}\n"))
            .map_err(|e| io::Error::new(e.kind(), format!("write {value} to {path}: {e}")))?;
        Ok(Setting { path, old })
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.old);
    }
}

/// Writes records to /dev/kmsg until `duration` has passed.
fn printk(duration: Duration) -> io::Result<(u64, Duration)> {
    // Every level to the console (the guest boots `quiet`), no timestamp
    // before each line, and no rate limit on /dev/kmsg.
    let _level = Setting::set("/proc/sys/kernel/printk", "8")?;
    let _time = Setting::set("/sys/module/printk/parameters/time", "N")?;
    let _limit = Setting::set("/proc/sys/kernel/printk_devkmsg", "on")?;
    let mut kmsg = File::options().write(true).open("/dev/kmsg")?;
    let mut record = b"<6>".to_vec();
    record.extend_from_slice(LINE);
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        // One write is one record, printed before the write returns (the
        // writer takes the console lock and prints what is pending).
        kmsg.write_all(&record)?;
        bytes += LINE.len() as u64;
    }
    Ok((bytes, started.elapsed()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, duration) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("console-bench: {msg}");
            return ExitCode::from(2);
        }
    };
    let (name, measured) = match path {
        Path::Tty => ("tty", tty(duration)),
        Path::Printk => ("printk", printk(duration)),
    };
    match measured {
        Ok((bytes, took)) => {
            println!(
                "console-bench: path={name} bytes={bytes} seconds={:.6}",
                took.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("console-bench: {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse() {
        let args = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(args(&["tty", "3"]), Ok((Path::Tty, Duration::from_secs(3))));
        assert_eq!(
            args(&["printk", "0.5"]),
            Ok((Path::Printk, Duration::from_millis(500)))
        );
        assert!(args(&["tty"]).is_err());
        assert!(args(&["disk", "3"]).is_err());
        assert!(args(&["tty", "0"]).is_err());
        assert!(args(&["tty", "x"]).is_err());
    }

    #[test]
    fn lines_are_what_they_say() {
        assert_eq!(LINE.len(), 64);
        assert_eq!(LINE.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
