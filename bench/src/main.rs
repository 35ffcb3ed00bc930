//! `kvm-userdev-bench`: runs the MMIO latency benchmark inside the
//! patched-kernel VM (`cargo xtask bench` boots the VM and calls it), or
//! re-renders the report of an earlier run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use kvm_userdev_bench::results::{Results, RunConfig, System};
use kvm_userdev_bench::variants::{self, Programs};
use kvm_userdev_bench::{qemu, report, run, system};

#[derive(Parser)]
#[command(about = "MMIO latency: kvm-userdev against the classic exit paths and QEMU")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every variant, in rounds, and write the report into OUT.
    Run {
        /// Where results.json, results.svg, results.md and table.txt go.
        #[arg(long)]
        out: PathBuf,
        /// Rounds; each runs every variant once, in turn.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Timed accesses per access type and run.
        #[arg(long, default_value_t = 200)]
        samples: u32,
        /// Untimed accesses before those.
        #[arg(long, default_value_t = 20)]
        warmup: u32,
        /// Only these variants (comma-separated; the first is the baseline).
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// Our VMM (default: `vmm` beside this program).
        #[arg(long)]
        vmm: Option<PathBuf>,
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        /// The guest payload (mmio-bench).
        #[arg(long)]
        payload: PathBuf,
        /// The CPU model of the machine the VM runs on, for the report.
        #[arg(long, default_value = "")]
        host_cpu: String,
    },
    /// Print the table of an earlier run and rewrite its plot and markdown.
    Report { results: PathBuf },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            out,
            rounds,
            samples,
            warmup,
            variants,
            vmm,
            qemu,
            payload,
            host_cpu,
        } => {
            if rounds == 0 || !(1..=4096).contains(&samples) {
                bail!("--rounds must be at least 1 and --samples 1 to 4096");
            }
            let vmm = vmm.unwrap_or_else(|| beside_me("vmm"));
            let chosen = choose(&variants)?;
            let qemu_path = which(&qemu);
            let system = System {
                kernel: system::kernel(),
                qemu: qemu::version(&qemu_path)?,
                vm_cpu: system::cpu_model(),
                host_cpu,
                tsc_khz: system::measure_tsc_khz(),
            };
            let config = RunConfig {
                rounds,
                samples,
                warmup,
            };
            let programs = Programs {
                vmm: &vmm,
                qemu: &qemu_path,
                payload: &payload,
            };
            let results = run::run(&chosen, &programs, system, config)?;
            write(&out, &results)
        }
        Cmd::Report { results } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("read {}", results.display()))?;
            let r: Results = serde_json::from_str(&text)
                .with_context(|| format!("parse {}", results.display()))?;
            write(results.parent().unwrap_or(Path::new(".")), &r)
        }
    }
}

fn choose(names: &[String]) -> Result<Vec<variants::Variant>> {
    let all = variants::all();
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|n| {
            all.iter().find(|v| v.name == n).cloned().with_context(|| {
                let known: Vec<_> = all.iter().map(|v| v.name).collect();
                format!("unknown variant {n}; known: {}", known.join(", "))
            })
        })
        .collect()
}

/// Writes the four report files and prints the table.
fn write(out: &Path, results: &Results) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let files = [
        (
            "results.json",
            serde_json::to_string_pretty(results)? + "\n",
        ),
        ("results.svg", report::svg(results)),
        ("results.md", report::markdown(results)),
        ("table.txt", report::table(results)),
    ];
    for (name, text) in &files {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    print!("{}", report::table(results));
    println!(
        "bench: wrote results.json, results.svg, results.md, table.txt in {}",
        out.display()
    );
    Ok(())
}

fn beside_me(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name(name)
}

/// `program` as found on PATH (QEMU's path goes into error messages).
fn which(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
}
