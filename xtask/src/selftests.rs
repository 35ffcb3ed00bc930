//! `cargo xtask kvm-selftests`: every KVM selftest of the built kernel, run
//! in one VM boot, one line per test. For comparing kernels (the series
//! must not break what passed without it), not part of `cargo xtask test`.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::kernel::{self, Flavour};
use crate::vm::{self, shell_quote, VmOptions};

const RESULT: &str = "kvm-selftest-result";

/// The shell loop: each test under `dir`, bounded by `per_test`, its exit
/// status on a line of its own. kselftest's exit code 4 means "skipped".
fn runner(dir: &Path, per_test: Duration) -> Vec<String> {
    let script = format!(
        "cd {dir} || exit 125\n\
         for t in $(find . -type f -perm -u+x | sort); do\n\
           timeout -s KILL {secs} \"$t\" >/dev/null 2>&1 </dev/null\n\
           echo \"{RESULT} $? $t\"\n\
         done\n",
        dir = shell_quote(&dir.to_string_lossy()),
        secs = per_test.as_secs(),
    );
    vec!["sh".into(), "-c".into(), script]
}

fn verdict(status: i32) -> &'static str {
    match status {
        0 => "pass",
        4 => "skip",
        137 => "timeout",
        _ => "fail",
    }
}

/// Test name → verdict, from the runner's output.
fn parse(output: &str) -> BTreeMap<String, &'static str> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix(RESULT))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let status = w.next()?.parse().ok()?;
            let name = w.next()?.trim_start_matches("./").to_string();
            Some((name, verdict(status)))
        })
        .collect()
}

pub fn run(flavour: Flavour, per_test: Duration) -> Result<i32> {
    let kernel = kernel::find(flavour)?;
    let mut opts = VmOptions::new(flavour);
    opts.timeout = Duration::from_secs(3 * 3600);
    let run = vm::run(&opts, &runner(&kernel.selftests, per_test))?;
    run.explain();
    let results = parse(&run.output);
    if results.is_empty() {
        bail!("no selftest ran");
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, v) in &results {
        println!("{v:8} {name}");
        *counts.entry(v).or_default() += 1;
    }
    let summary: Vec<String> = counts.iter().map(|(v, n)| format!("{n} {v}")).collect();
    println!("kernel {}: {}", kernel.release, summary.join(", "));
    Ok(run.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parsed() {
        let out = format!(
            "noise\n{RESULT} 0 ./x86_64/a_test\n{RESULT} 4 ./b_test\n\
             {RESULT} 137 ./c_test\n{RESULT} 1 ./x86_64/d_test\n"
        );
        let r = parse(&out);
        assert_eq!(r["x86_64/a_test"], "pass");
        assert_eq!(r["b_test"], "skip");
        assert_eq!(r["c_test"], "timeout");
        assert_eq!(r["x86_64/d_test"], "fail");
        assert_eq!(r.len(), 4);
    }
}
