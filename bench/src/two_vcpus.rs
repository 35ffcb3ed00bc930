//! The two-vCPU part (`--cpus 2`): the payload times store, batched-store,
//! sync-load and store-load on one vCPU alone and then on two at once, each
//! with a register of its own. This condenses what it printed into rates
//! (accesses per second, both vCPUs together) and each vCPU's latency.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::guest::GuestRun;
use crate::report::{fmt_us, md_escape, md_row, percentile, sorted, titled_table};
use crate::results::Results;

/// The access types of the part, in report order (the payload's `two`).
pub const ACCESSES: [&str; 4] = ["store", "batched-store", "sync-load", "store-load"];

/// One access type of one variant.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TwoVcpuResult {
    pub access: String,
    /// Accesses per second of one vCPU alone and of two at once (both
    /// together), medians over the rounds.
    pub one_per_s: f64,
    pub two_per_s: f64,
    /// Per round, the two vCPUs' rate over the one's, in run order.
    pub round_ratios: Vec<f64>,
    /// Each vCPU's median latency while both run, µs, over all rounds.
    pub median_us: [f64; 2],
}

impl TwoVcpuResult {
    /// The two vCPUs' rate over one's: the median of the rounds' ratios.
    pub fn ratio(&self) -> f64 {
        median(&self.round_ratios)
    }
}

/// What the rounds of one variant gave so far.
#[derive(Default)]
pub struct Collected {
    by_access: BTreeMap<String, Access>,
}

#[derive(Default)]
struct Access {
    /// Per round: accesses per second on one vCPU, on two.
    rates: Vec<(f64, f64)>,
    /// Per vCPU, µs.
    samples: [Vec<f64>; 2],
}

impl Collected {
    /// Adds one run's two-vCPU lines; a run without them adds nothing.
    pub fn add(&mut self, run: &GuestRun, cycles_per_us: f64) {
        for access in ACCESSES {
            let rate = |cpus: u32| {
                let span = run
                    .smp
                    .iter()
                    .find(|s| s.access == access && s.cpus == cpus)?;
                let seconds = span.cycles as f64 / cycles_per_us / 1e6;
                (seconds > 0.0).then(|| (span.n * u64::from(cpus)) as f64 / seconds)
            };
            let (Some(one), Some(two)) = (rate(1), rate(2)) else {
                continue;
            };
            let a = self.by_access.entry(access.to_string()).or_default();
            a.rates.push((one, two));
            for (name, cpu, cycles) in &run.smp_samples {
                if name == access && *cpu < 2 {
                    a.samples[*cpu].extend(cycles.iter().map(|&c| c as f64 / cycles_per_us));
                }
            }
        }
    }

    /// One result per access type measured, in [`ACCESSES`] order.
    pub fn finish(mut self) -> Vec<TwoVcpuResult> {
        ACCESSES
            .iter()
            .filter_map(|access| {
                let a = self.by_access.remove(*access)?;
                let ones: Vec<f64> = a.rates.iter().map(|r| r.0).collect();
                let twos: Vec<f64> = a.rates.iter().map(|r| r.1).collect();
                Some(TwoVcpuResult {
                    access: access.to_string(),
                    one_per_s: median(&ones),
                    two_per_s: median(&twos),
                    round_ratios: a.rates.iter().map(|(one, two)| two / one).collect(),
                    median_us: [median(&a.samples[0]), median(&a.samples[1])],
                })
            })
            .collect()
    }
}

fn median(values: &[f64]) -> f64 {
    percentile(&sorted(values.iter().copied()), 50.0)
}

/// The queue-full waits a variant's counters show (the whole run's).
fn queue_full_waits(results: &Results, variant: usize) -> Option<u64> {
    let counters = results.variants[variant].counters.as_ref()?;
    counters.get("queue_full_waits").copied()
}

/// The terminal report's block: a row per variant and access type.
pub fn text_section(results: &Results) -> Vec<String> {
    let header: Vec<String> = [
        "variant",
        "access",
        "1 vCPU/s",
        "2 vCPUs/s",
        "2÷1",
        "vCPU0 µs",
        "vCPU1 µs",
        "queue-full waits",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = Vec::new();
    for (i, v) in results.variants.iter().enumerate() {
        for (k, t) in v.two_vcpus.iter().enumerate() {
            let first = k == 0;
            rows.push(vec![
                if first { v.name.clone() } else { String::new() },
                t.access.clone(),
                format!("{:.0}", t.one_per_s),
                format!("{:.0}", t.two_per_s),
                format!("{:.2}x", t.ratio()),
                fmt_us(t.median_us[0]),
                fmt_us(t.median_us[1]),
                match (first, queue_full_waits(results, i)) {
                    (true, Some(n)) => n.to_string(),
                    _ => String::new(),
                },
            ]);
        }
    }
    if rows.is_empty() {
        return Vec::new();
    }
    titled_table(
        "two vCPUs — accesses per second of one vCPU alone and of two at once (together), \
         each vCPU's median latency while both run; queue-full waits over the whole run"
            .to_string(),
        &header,
        &rows,
        &[false, false, true, true, true, true, true, true],
    )
}

/// The README's table: variants as rows, each access type's `2÷1` ratio
/// with the two vCPUs' median latencies.
pub fn markdown(results: &Results) -> Vec<String> {
    let rows: Vec<(usize, &crate::results::VariantResult)> = results
        .variants
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.two_vcpus.is_empty())
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![String::new()];
    let mut header = vec!["two vCPUs: rate ÷ one vCPU's (vCPU0, vCPU1 median µs)".to_string()];
    header.extend(ACCESSES.iter().map(|a| format!("`{a}`")));
    header.push("queue-full waits".to_string());
    lines.push(md_row(&header));
    let mut align = vec!["---".to_string()];
    align.extend(std::iter::repeat_n("---:".to_string(), ACCESSES.len() + 1));
    lines.push(md_row(&align));
    for (i, v) in rows {
        let mut cells = vec![md_escape(&v.name)];
        cells.extend(
            ACCESSES
                .iter()
                .map(|a| match v.two_vcpus.iter().find(|t| t.access == *a) {
                    Some(t) => format!(
                        "{:.2}× ({}, {})",
                        t.ratio(),
                        fmt_us(t.median_us[0]),
                        fmt_us(t.median_us[1])
                    ),
                    None => "—".to_string(),
                }),
        );
        cells.push(queue_full_waits(results, i).map_or("—".to_string(), |n| n.to_string()));
        lines.push(md_row(&cells));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::parse;

    #[test]
    fn rates_and_latencies_from_a_run() {
        // 1000 cycles per µs: one vCPU, 2 stores in 4 µs; two, 2 each in 5 µs.
        let out = "bench: smp store 1 2 4000\nbench: smp store 2 2 5000\n\
                   bench: smp-samples store 0 2 7d0 bb8\nbench: smp-samples store 1 2 3e8 3e8\n\
                   bench: done\n";
        let mut c = Collected::default();
        c.add(&parse(out).unwrap(), 1000.0);
        let r = c.finish();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].access, "store");
        assert!((r[0].one_per_s - 500_000.0).abs() < 1e-6);
        assert!((r[0].two_per_s - 800_000.0).abs() < 1e-6);
        assert!((r[0].ratio() - 1.6).abs() < 1e-9);
        assert_eq!(r[0].median_us, [2.5, 1.0]);
    }

    #[test]
    fn runs_without_the_part_add_nothing() {
        let mut c = Collected::default();
        c.add(&parse("bench: done\n").unwrap(), 1000.0);
        assert!(c.finish().is_empty());
    }
}
