//! What the guest payload (`mmio-bench`) prints, parsed.

use anyhow::{bail, Context, Result};

/// One run of the payload.
#[derive(Debug, Default)]
pub struct GuestRun {
    /// `bench: device ...`: what the guest found.
    pub device: String,
    /// Per access type, the samples in TSC cycles.
    pub samples: Vec<(String, Vec<u64>)>,
    pub skipped: Vec<(String, String)>,
    /// `bench: smp`: the two-vCPU part's spans.
    pub smp: Vec<SmpSpan>,
    /// `bench: smp-samples`: per access type and vCPU, the two-vCPU run's
    /// samples in TSC cycles.
    pub smp_samples: Vec<(String, usize, Vec<u64>)>,
}

/// `n` accesses on each of `cpus` vCPUs took `cycles`, first start to last
/// end.
#[derive(Debug, PartialEq)]
pub struct SmpSpan {
    pub access: String,
    pub cpus: u32,
    pub n: u64,
    pub cycles: u64,
}

/// Parses the payload's output; fails on a `bench: error` line or if it
/// did not reach `bench: done`.
pub fn parse(output: &str) -> Result<GuestRun> {
    let mut run = GuestRun::default();
    let mut done = false;
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("bench: ") else {
            continue;
        };
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "device" => run.device = rest.to_string(),
            "samples" => run.samples.push(
                samples(rest).with_context(|| format!("bad samples line: {}", truncate(line)))?,
            ),
            "smp" => run
                .smp
                .push(smp_span(rest).with_context(|| format!("bad smp line: {}", truncate(line)))?),
            "smp-samples" => run.smp_samples.push(
                smp_samples(rest)
                    .with_context(|| format!("bad smp-samples line: {}", truncate(line)))?,
            ),
            "skip" => {
                let (access, why) = rest.split_once(' ').unwrap_or((rest, ""));
                run.skipped.push((access.to_string(), why.to_string()));
            }
            "error" => bail!("the guest reports an error: {rest}"),
            "done" => done = true,
            _ => {}
        }
    }
    if !done {
        bail!("the guest did not finish (no `bench: done`)");
    }
    Ok(run)
}

/// `<access> <n> <hex>...`
fn samples(rest: &str) -> Result<(String, Vec<u64>)> {
    let mut words = rest.split_whitespace();
    let access = words.next().context("no access type")?.to_string();
    Ok((access, counted_hex(words)?))
}

/// `<access> <cpu> <n> <hex>...`
fn smp_samples(rest: &str) -> Result<(String, usize, Vec<u64>)> {
    let mut words = rest.split_whitespace();
    let access = words.next().context("no access type")?.to_string();
    let cpu = words.next().context("no vCPU")?.parse()?;
    Ok((access, cpu, counted_hex(words)?))
}

/// `<n> <hex>...`: n values.
fn counted_hex<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<Vec<u64>> {
    let n: usize = words.next().context("no count")?.parse()?;
    let values = words
        .map(|w| u64::from_str_radix(w, 16))
        .collect::<Result<Vec<_>, _>>()?;
    if values.len() != n {
        bail!("{n} samples announced, {} given", values.len());
    }
    Ok(values)
}

/// `<access> <cpus> <n> <cycles>`, decimal.
fn smp_span(rest: &str) -> Result<SmpSpan> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let [access, cpus, n, cycles] = words[..] else {
        bail!("expected 4 words");
    };
    Ok(SmpSpan {
        access: access.to_string(),
        cpus: cpus.parse()?,
        n: n.parse()?,
        cycles: cycles.parse()?,
    })
}

fn truncate(line: &str) -> String {
    line.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_run() {
        let out = "# comment\nbench: device edu 1234:11e8 at 00:01.0\n\
                   bench: samples store 3 10 ff a\nbench: skip irq no interrupt\nbench: done\n";
        let run = parse(out).unwrap();
        assert_eq!(run.device, "edu 1234:11e8 at 00:01.0");
        assert_eq!(run.samples, vec![("store".to_string(), vec![16, 255, 10])]);
        assert_eq!(run.skipped[0].0, "irq");
        assert!(run.smp.is_empty());
    }

    #[test]
    fn parses_the_two_vcpu_part() {
        let out = "bench: smp store 1 2 300\nbench: smp store 2 2 500\n\
                   bench: smp-samples store 1 2 10 ff\nbench: done\n";
        let run = parse(out).unwrap();
        assert_eq!(
            run.smp[1],
            SmpSpan {
                access: "store".into(),
                cpus: 2,
                n: 2,
                cycles: 500
            }
        );
        assert_eq!(
            run.smp_samples,
            vec![("store".to_string(), 1, vec![16, 255])]
        );
        assert!(parse("bench: smp store 2 x 500\nbench: done\n").is_err());
        assert!(parse("bench: smp-samples store 0 3 1 2\nbench: done\n").is_err());
    }

    #[test]
    fn refuses_errors_and_short_runs() {
        assert!(parse("bench: error load: wrong\nbench: done\n").is_err());
        assert!(parse("bench: samples store 1 10\n").is_err());
        assert!(parse("bench: samples store 2 10\nbench: done\n").is_err());
        assert!(parse("bench: samples store 1 xyz\nbench: done\n").is_err());
    }
}
