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
    let n: usize = words.next().context("no count")?.parse()?;
    let values = words
        .map(|w| u64::from_str_radix(w, 16))
        .collect::<Result<Vec<_>, _>>()?;
    if values.len() != n {
        bail!("{n} samples announced, {} given", values.len());
    }
    Ok((access, values))
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
    }

    #[test]
    fn refuses_errors_and_short_runs() {
        assert!(parse("bench: error load: wrong\nbench: done\n").is_err());
        assert!(parse("bench: samples store 1 10\n").is_err());
        assert!(parse("bench: samples store 2 10\nbench: done\n").is_err());
        assert!(parse("bench: samples store 1 xyz\nbench: done\n").is_err());
    }
}
