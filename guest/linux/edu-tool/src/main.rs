//! edu-tool: checks every feature of QEMU's edu device through the
//! kvm_userdev_edu driver (`/dev/eduN`, `guest/linux/edu-driver/`), one
//! `ok`/`FAIL` line per check; exits 1 if any check failed.
//!
//! ```text
//! edu-tool [--device /dev/eduN]... [--expect-dead | --loop N]
//! ```
//!
//! Without `--device` it takes every `/dev/eduN` there is. `--expect-dead`
//! checks instead that every operation fails (EIO, ENODEV or ETIMEDOUT)
//! within a bound, for a device whose emulator was killed. `--loop N` runs N
//! round trips each of a liveness store and load, a factorial with
//! interrupt and an interrupt raise and acknowledge, and prints the mean
//! time of each.

mod uapi;

use std::fmt::Display;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use uapi::{Edu, DMA_BUFFER_SIZE, IRQ_MODE_INTX, IRQ_MODE_MSI};

/// What the identification register reads: version 1.0, "ed".
const IDENTIFICATION: u32 = 0x0100_00ed;
const LIVENESS_VALUES: [u32; 6] = [0, 1, 0x1234_5678, 0xdead_beef, 0x8000_0000, 0xffff_ffff];
/// 12! is the largest factorial that fits 32 bits.
const FACTORIAL_MAX: u32 = 12;
/// Interrupt bits to raise: the device's own two events and others.
const RAISE_VALUES: [u32; 4] = [0x0000_0001, 0x0000_0100, 0x8000_0000, 0x1234_5678];
/// How long one operation on a dead device may take. A device that reads
/// all-ones fails at once; one that does not answer fails after the
/// driver's bound (EDU_TIMEOUT_MS, 5 s) per wait, and a DMA transfer waits
/// up to three times.
const DEAD_BOUND: Duration = Duration::from_secs(20);
/// The operations `--expect-dead` tries on each device.
const DEAD_OPS: u32 = 8;

const USAGE: &str = "usage: edu-tool [--device /dev/eduN]... [--expect-dead | --loop N]";

#[derive(Debug, Default, PartialEq)]
struct Args {
    devices: Vec<PathBuf>,
    expect_dead: bool,
    loops: Option<u64>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut out = Args::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => {
                let path = args.next().ok_or("--device needs a path")?;
                out.devices.push(path.into());
            }
            "--expect-dead" => out.expect_dead = true,
            "--loop" => {
                let n = args.next().ok_or("--loop needs a count")?;
                let n = n.parse().map_err(|_| format!("bad --loop count {n:?}"))?;
                if n == 0 {
                    return Err("--loop needs a count above 0".into());
                }
                out.loops = Some(n);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.expect_dead && out.loops.is_some() {
        return Err("--expect-dead and --loop exclude each other".into());
    }
    Ok(out)
}

/// The N of a `/dev/eduN` name.
fn edu_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("edu")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every `/dev/eduN`, in order of N.
fn find_devices() -> io::Result<Vec<PathBuf>> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/dev")?
        .filter_map(Result::ok)
        .filter_map(|e| Some((edu_index(e.file_name().to_str()?)?, e.path())))
        .collect();
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// The checks run so far.
#[derive(Default)]
struct Report {
    checks: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, dev: &Path, what: impl Display, ok: bool, detail: impl Display) -> bool {
        self.checks += 1;
        if !ok {
            self.failed += 1;
        }
        let verdict = if ok { "ok" } else { "FAIL" };
        println!("{verdict} {} {what}: {detail}", dev.display());
        ok
    }

    /// A check of an operation that should have succeeded with `want`.
    fn expect<T: PartialEq + std::fmt::LowerHex>(
        &mut self,
        dev: &Path,
        what: impl Display,
        got: io::Result<T>,
        want: T,
    ) -> bool {
        match got {
            Ok(got) if got == want => self.check(dev, what, true, format_args!("{got:#x}")),
            Ok(got) => self.check(
                dev,
                what,
                false,
                format_args!("got {got:#x}, want {want:#x}"),
            ),
            Err(e) => self.check(dev, what, false, format_args!("error: {e}")),
        }
    }
}

/// n! modulo 2^32, as the device computes it.
fn factorial(n: u32) -> u32 {
    (2..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// xorshift64*: patterns that differ from run to run, without a crate.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ (u64::from(std::process::id()) << 32) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EIO) => "EIO".into(),
        Some(libc::ENODEV) => "ENODEV".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        _ => e.to_string(),
    }
}

/// The DMA check of one mode: pattern A into the whole device buffer,
/// pattern B into its upper half (so the driver's bounce buffer now starts
/// with B, not A), then the whole buffer back: A's lower half and B prove
/// that the bytes came from the device.
fn check_dma(report: &mut Report, dev: &Path, edu: &Edu, rng: &mut Rng, irq: bool) {
    let what = format!("dma {}", if irq { "irq" } else { "polled" });
    let half = DMA_BUFFER_SIZE / 2;
    let mut a = vec![0u8; DMA_BUFFER_SIZE];
    let mut b = vec![0u8; half];
    rng.fill(&mut a);
    rng.fill(&mut b);
    let mut want = a.clone();
    want[half..].copy_from_slice(&b);
    let mut got = vec![0u8; DMA_BUFFER_SIZE];

    let started = Instant::now();
    let result = edu
        .dma_to_device(&a, 0, irq)
        .and_then(|()| edu.dma_to_device(&b, half as u32, irq))
        .and_then(|()| edu.dma_from_device(&mut got, 0, irq));
    let elapsed = started.elapsed();
    match result {
        Err(e) => report.check(dev, what, false, format_args!("error: {e}")),
        Ok(()) => match got.iter().zip(&want).position(|(g, w)| g != w) {
            None => report.check(
                dev,
                what,
                true,
                format_args!(
                    "{DMA_BUFFER_SIZE} + {half} bytes RAM->device, {DMA_BUFFER_SIZE} back, \
                     match ({} ms)",
                    elapsed.as_millis()
                ),
            ),
            Some(i) => report.check(
                dev,
                what,
                false,
                format_args!(
                    "byte {i} of {DMA_BUFFER_SIZE} differs: got {:#04x}, want {:#04x}",
                    got[i], want[i]
                ),
            ),
        },
    };
}

/// Every feature of one device.
fn check_device(report: &mut Report, dev: &Path, rng: &mut Rng) {
    let edu = match Edu::open(dev) {
        Ok(edu) => edu,
        Err(e) => {
            report.check(dev, "open", false, format_args!("error: {e}"));
            return;
        }
    };
    let before = match edu.info() {
        Ok(info) => {
            let mode = match info.irq_mode {
                IRQ_MODE_MSI => "msi",
                IRQ_MODE_INTX => "intx",
                _ => "unknown",
            };
            report.check(
                dev,
                "id",
                info.id == IDENTIFICATION,
                format_args!(
                    "{:#010x} (want {IDENTIFICATION:#010x}), irq mode {mode}, irq {}",
                    info.id, info.irq
                ),
            );
            Some(info)
        }
        Err(e) => {
            report.check(dev, "id", false, format_args!("error: {e}"));
            None
        }
    };

    for v in LIVENESS_VALUES {
        report.expect(dev, format_args!("liveness {v:#010x}"), edu.liveness(v), !v);
    }
    for irq in [false, true] {
        let how = if irq { "irq" } else { "polled" };
        for n in 0..=FACTORIAL_MAX {
            let what = format_args!("factorial {n} {how}");
            report.expect(dev, what, edu.factorial(n, irq), factorial(n));
        }
    }
    for v in RAISE_VALUES {
        let what = format!("irq raise {v:#010x}");
        match edu.raise(v) {
            Ok((seen, status)) => report.check(
                dev,
                what,
                seen == v && status == 0,
                format_args!("handler saw {seen:#010x}, status after ack {status:#x}"),
            ),
            Err(e) => report.check(dev, what, false, format_args!("error: {e}")),
        };
    }
    check_dma(report, dev, &edu, rng, false);
    check_dma(report, dev, &edu, rng, true);

    // The driver refuses what it cannot do, rather than asking the device
    // (QEMU's model stops the VM on a DMA span outside its buffer).
    let refused = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (true, "EINVAL".to_string()),
        Err(e) => (false, format!("error {e}, want EINVAL")),
        Ok(()) => (false, "accepted, want EINVAL".to_string()),
    };
    let (ok, detail) = refused(edu.raise(0).map(|_| ()));
    report.check(dev, "irq raise 0 refused", ok, detail);
    let page = vec![0u8; DMA_BUFFER_SIZE];
    let (ok, detail) = refused(edu.dma_to_device(&page, 1, false));
    report.check(dev, "dma beyond the buffer refused", ok, detail);

    // Each interrupt operation above was one interrupt through the handler.
    let expected = u64::from(FACTORIAL_MAX + 1) + RAISE_VALUES.len() as u64 + 3;
    match (before, edu.info()) {
        (Some(before), Ok(after)) => {
            let handled = after.irq_count - before.irq_count;
            report.check(
                dev,
                "interrupts handled",
                handled >= expected,
                format_args!("{handled} (want at least {expected})"),
            )
        }
        (_, Err(e)) => report.check(dev, "interrupts handled", false, format_args!("{e}")),
        (None, Ok(_)) => false,
    };
}

/// `--expect-dead`: every operation fails at once with EIO, ENODEV or
/// ETIMEDOUT.
fn check_dead_device(report: &mut Report, dev: &Path) {
    let edu = match Edu::open(dev) {
        Ok(edu) => edu,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENXIO)) => {
            report.check(dev, "dead open", true, errno_name(&e));
            return;
        }
        Err(e) => {
            report.check(dev, "dead open", false, format_args!("error: {e}"));
            return;
        }
    };
    let mut page = vec![0u8; DMA_BUFFER_SIZE];
    type Op<'a> = Box<dyn FnMut() -> io::Result<()> + 'a>;
    let edu = &edu;
    let ops: Vec<(&str, Op)> = vec![
        ("id", Box::new(|| edu.info().map(|_| ()))),
        (
            "liveness",
            Box::new(|| edu.liveness(0x5a5a_5a5a).map(|_| ())),
        ),
        (
            "factorial polled",
            Box::new(|| edu.factorial(5, false).map(|_| ())),
        ),
        (
            "factorial irq",
            Box::new(|| edu.factorial(5, true).map(|_| ())),
        ),
        ("irq raise", Box::new(|| edu.raise(0x40).map(|_| ()))),
        (
            "dma to device",
            Box::new(|| edu.dma_to_device(&[0x5a; 64], 0, false)),
        ),
        (
            "dma irq",
            Box::new(|| edu.dma_to_device(&[0xa5; 64], 0, true)),
        ),
        (
            "dma from device",
            Box::new(|| edu.dma_from_device(&mut page, 0, false)),
        ),
    ];
    debug_assert_eq!(ops.len(), DEAD_OPS as usize);
    for (name, mut op) in ops {
        let started = Instant::now();
        let result = op();
        let elapsed = started.elapsed();
        let what = format!("dead {name}");
        let time = format!("{:.1} ms", elapsed.as_secs_f64() * 1e3);
        match result {
            Ok(()) => report.check(dev, what, false, format_args!("succeeded ({time})")),
            Err(e) => {
                let expected = matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::ENODEV | libc::ETIMEDOUT)
                );
                let in_time = elapsed <= DEAD_BOUND;
                let note = if in_time { "" } else { ", too slow" };
                report.check(
                    dev,
                    what,
                    expected && in_time,
                    format_args!("{} after {time}{note}", errno_name(&e)),
                )
            }
        };
    }
}

/// `--loop N`: the benchmark's round trips, N times each, every answer
/// checked: a liveness store and the load that reads it back (`~value`), a
/// factorial with interrupt, and an interrupt raise and acknowledge. Prints
/// the mean of each as `edu-tool: round trips: liveness_us=.. ...`.
fn loop_device(report: &mut Report, dev: &Path, loops: u64) {
    let edu = match Edu::open(dev) {
        Ok(edu) => edu,
        Err(e) => {
            report.check(dev, "open", false, format_args!("error: {e}"));
            return;
        }
    };
    let mut in_liveness = Duration::ZERO;
    let mut in_factorial = Duration::ZERO;
    let mut in_raise = Duration::ZERO;
    for i in 0..loops {
        let probe = LIVENESS_VALUES[(i % LIVENESS_VALUES.len() as u64) as usize];
        let n = (i % u64::from(FACTORIAL_MAX + 1)) as u32;
        let value = 1u32 << (i % 31);
        let t0 = Instant::now();
        let live = edu.liveness(probe);
        let t1 = Instant::now();
        let fact = edu.factorial(n, true);
        let t2 = Instant::now();
        let raised = edu.raise(value);
        in_raise += t2.elapsed();
        in_factorial += t2 - t1;
        in_liveness += t1 - t0;

        let what = format_args!("loop {i}");
        let detail = match (live, fact, raised) {
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => format!("error: {e}"),
            (Ok(got), _, _) if got != !probe => {
                format!("liveness {probe:#x} read {got:#x}, want {:#x}", !probe)
            }
            (_, Ok(got), _) if got != factorial(n) => {
                format!("{n}! read {got:#x}, want {:#x}", factorial(n))
            }
            (_, _, Ok((seen, status))) if seen != value || status != 0 => {
                format!("raised {value:#x}, saw {seen:#x}, status {status:#x}")
            }
            _ => continue,
        };
        report.check(dev, what, false, detail);
        return;
    }
    let mean_us = |d: Duration| d.as_secs_f64() * 1e6 / loops as f64;
    report.check(
        dev,
        format_args!("loop {loops}"),
        true,
        format_args!(
            "mean {:.1} us per loop",
            mean_us(in_liveness + in_factorial + in_raise)
        ),
    );
    println!(
        "edu-tool: round trips: liveness_us={:.2} factorial_irq_us={:.2} raise_ack_us={:.2}",
        mean_us(in_liveness),
        mean_us(in_factorial),
        mean_us(in_raise)
    );
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            if msg.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("edu-tool: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let devices = if args.devices.is_empty() {
        match find_devices() {
            Ok(found) => found,
            Err(e) => {
                eprintln!("edu-tool: cannot list /dev: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        args.devices.clone()
    };
    if devices.is_empty() {
        println!("FAIL edu-tool: no /dev/eduN (is kvm_userdev_edu loaded?)");
        return ExitCode::FAILURE;
    }

    let mut report = Report::default();
    let mut rng = Rng::seeded();
    if args.expect_dead {
        // Every operation within its bound, or SIGALRM ends the process, so
        // that a hung operation fails the run instead of blocking it.
        let devices = u32::try_from(devices.len()).unwrap_or(u32::MAX);
        let bound = devices.saturating_mul(DEAD_OPS * DEAD_BOUND.as_secs() as u32);
        // SAFETY: alarm() only arms a timer; SIGALRM's default action ends
        // the process, which is what a hung operation should lead to.
        unsafe { libc::alarm(bound.saturating_add(30)) };
    }
    for dev in &devices {
        if args.expect_dead {
            check_dead_device(&mut report, dev);
        } else if let Some(loops) = args.loops {
            loop_device(&mut report, dev, loops);
        } else {
            check_device(&mut report, dev, &mut rng);
        }
    }
    let verdict = if report.failed == 0 { "PASS" } else { "FAIL" };
    println!(
        "edu-tool: {verdict}: {} device(s), {} checks, {} failed",
        devices.len(),
        report.checks,
        report.failed
    );
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments_parse() {
        assert_eq!(parse(&[]), Ok(Args::default()));
        let args = parse(&["--device", "/dev/edu1", "--loop", "100"]).unwrap();
        assert_eq!(args.devices, [PathBuf::from("/dev/edu1")]);
        assert_eq!(args.loops, Some(100));
        assert!(parse(&["--expect-dead"]).unwrap().expect_dead);
        assert!(parse(&["--loop"]).is_err());
        assert!(parse(&["--loop", "0"]).is_err());
        assert!(parse(&["--expect-dead", "--loop", "3"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn device_names() {
        assert_eq!(edu_index("edu0"), Some(0));
        assert_eq!(edu_index("edu12"), Some(12));
        assert_eq!(edu_index("edu"), None);
        assert_eq!(edu_index("edux"), None);
        assert_eq!(edu_index("educ1"), None);
    }

    #[test]
    fn factorials_wrap_like_the_device() {
        assert_eq!(factorial(0), 1);
        assert_eq!(factorial(1), 1);
        assert_eq!(factorial(5), 120);
        assert_eq!(factorial(12), 479_001_600);
        assert_eq!(factorial(13), 6_227_020_800u64 as u32);
    }

    #[test]
    fn patterns_vary() {
        let mut rng = Rng(1);
        let mut a = [0u8; 13];
        let mut b = [0u8; 13];
        rng.fill(&mut a);
        rng.fill(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0; 13]);
    }
}
