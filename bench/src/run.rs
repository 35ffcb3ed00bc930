//! Running the variants in interleaved rounds and summarizing the samples.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::guest;
use crate::report::summarize;
use crate::results::{Results, RunConfig, System, VariantResult, ACCESSES};
use crate::two_vcpus;
use crate::variants::{Programs, Variant};

/// One variant's samples so far: per access type, per round, microseconds.
#[derive(Default)]
struct Collected {
    device: String,
    samples: BTreeMap<String, Vec<Vec<f64>>>,
    counters: BTreeMap<String, u64>,
    two_vcpus: two_vcpus::Collected,
}

/// Runs every variant `config.rounds` times. Each round runs all of them,
/// starting one further down the list than the round before, so that
/// drift of the machine spreads over all variants alike.
pub fn run(
    variants: &[Variant],
    programs: &Programs,
    system: System,
    config: RunConfig,
) -> Result<Results> {
    let cmdline = format!("samples={} warmup={}", config.samples, config.warmup);
    let cycles_per_us = system.tsc_khz as f64 / 1000.0;
    let mut collected: Vec<Collected> = variants.iter().map(|_| Collected::default()).collect();
    let started = Instant::now();
    for round in 0..config.rounds as usize {
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            let v = &variants[i];
            let t = Instant::now();
            let out = v
                .run(programs, &cmdline, config.cpus)
                .with_context(|| format!("variant {} (round {})", v.name, round + 1))?;
            let parsed = guest::parse(&out.guest)
                .with_context(|| format!("variant {} (round {})", v.name, round + 1))?;
            let c = &mut collected[i];
            c.two_vcpus.add(&parsed, cycles_per_us);
            c.device = parsed.device;
            for (access, cycles) in parsed.samples {
                let us = cycles.iter().map(|&c| c as f64 / cycles_per_us).collect();
                c.samples.entry(access).or_default().push(us);
            }
            for (name, value) in out.counters {
                *c.counters.entry(name).or_default() += value;
            }
            eprintln!(
                "bench: round {}/{}: {} done in {:.1}s ({:.0}s so far)",
                round + 1,
                config.rounds,
                v.name,
                t.elapsed().as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let mut idle = Vec::new();
    for v in variants {
        let cost = if config.idle_seconds > 0 {
            v.idle_cost(programs, config.idle_seconds)
                .with_context(|| format!("variant {} (idle)", v.name))?
        } else {
            None
        };
        if let Some(c) = &cost {
            eprintln!(
                "bench: {} idle {:.1}s: {:.2}% of a CPU (VMM {:.2}%, emulator {:.2}%)",
                v.name,
                c.seconds,
                c.total_percent(),
                c.vmm_percent,
                c.emulator_percent
            );
        }
        idle.push(cost);
    }
    let variants = variants
        .iter()
        .zip(collected)
        .zip(idle)
        .map(|((v, c), idle)| VariantResult {
            name: v.name.to_string(),
            description: v.description.to_string(),
            device: v.device.to_string(),
            accesses: ACCESSES
                .iter()
                .filter_map(|a| Some(summarize(a, c.samples.get(*a)?)))
                .collect(),
            counters: (!c.counters.is_empty()).then_some(c.counters),
            idle,
            two_vcpus: c.two_vcpus.finish(),
        })
        .collect();
    Ok(Results {
        date: utc_now(),
        system,
        config,
        variants,
        linux: None,
    })
}

/// The results of a run without MMIO variants (the Linux part alone).
pub fn empty(system: System, config: RunConfig) -> Results {
    Results {
        date: utc_now(),
        system,
        config,
        variants: Vec::new(),
        linux: None,
    }
}

/// Now, UTC, as `YYYY-MM-DD HH:MM`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01
/// (Howard Hinnant's civil-from-days algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
