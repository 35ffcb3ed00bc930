//! `kvm-userdev-bench`: runs the MMIO latency benchmark inside the
//! patched-kernel VM (`cargo xtask bench` boots the VM and calls it), or
//! re-renders the report of an earlier run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use kvm_userdev_bench::results::{Results, RunConfig, System};
use kvm_userdev_bench::variants::{self, Programs};
use kvm_userdev_bench::{linux_bench, linux_report, qemu, report, run, system, trace};

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
        /// After the rounds, how long each variant of our VMM is measured
        /// with the guest idle (0: not).
        #[arg(long, default_value_t = 10)]
        idle_seconds: u32,
        /// vCPUs of the edu variants' guests: 2 adds the two-vCPU part
        /// (store, batched-store, sync-load, store-load on one vCPU alone and
        /// on two at once).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
        cpus: u32,
        /// Only these variants (comma-separated; the first is the baseline).
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        #[command(flatten)]
        programs: ProgramArgs,
        /// The CPU model of the machine the VM runs on, for the report.
        #[arg(long, default_value = "")]
        host_cpu: String,
        #[command(flatten)]
        linux: LinuxArgs,
    },
    /// Print the table of an earlier run and rewrite its plot and markdown.
    Report { results: PathBuf },
    /// Run one variant once, briefly, with KVM's, the user device's and the
    /// scheduler's tracepoints on; write the trace and its summary into OUT.
    Trace {
        #[arg(long)]
        out: PathBuf,
        /// The variant (any; QEMU's accesses show as exits to user space).
        #[arg(long, default_value = "kvm-userdev")]
        variant: String,
        /// Timed accesses per access type (each is a few trace lines).
        #[arg(long, default_value_t = 20)]
        samples: u32,
        /// 2: the guest's two-vCPU part too (edu variants), and a summary
        /// of how the vCPU threads shared the CPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        cpus: u32,
        #[command(flatten)]
        programs: ProgramArgs,
    },
}

/// The Linux part: an unmodified Linux guest under each host.
#[derive(clap::Args)]
struct LinuxArgs {
    /// Also boot the Linux guest (REPO/target/guest-linux, built by `cargo
    /// xtask linux`) under every host and measure its console and edu driver.
    #[arg(long, requires = "repo")]
    linux: bool,
    /// Only the Linux part: no MMIO variants. Its figures join the report
    /// already in OUT, if there is one (replacing an earlier Linux part).
    #[arg(long, requires = "linux")]
    linux_only: bool,
    /// The repository whose target/guest-linux holds the guest.
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Boots per host.
    #[arg(long, default_value_t = 1)]
    linux_rounds: u32,
    /// The guest's vCPUs.
    #[arg(long, default_value_t = 1)]
    linux_cpus: u8,
    /// How long each console measurement writes.
    #[arg(long, default_value_t = 3.0)]
    console_seconds: f64,
    /// Round trips per edu measurement.
    #[arg(long, default_value_t = 300)]
    edu_loops: u32,
}

/// The programs a run starts, as given on the command line.
#[derive(clap::Args)]
struct ProgramArgs {
    /// Our VMM (default: `vmm` beside this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The guest payload (mmio-bench).
    #[arg(long)]
    payload: PathBuf,
    /// The emulator (default: `kvm-userdev-emulator` beside this program).
    #[arg(long)]
    emulator: Option<PathBuf>,
    /// QEMU with the vfio-user client, for qemu-vfio-user.
    #[arg(long)]
    qemu_vfio_user: Option<PathBuf>,
    /// The same with qemu-patch/, for qemu-vfio-user-userdev.
    #[arg(long)]
    qemu_vfio_user_patched: Option<PathBuf>,
}

/// The same, resolved: the VMM's default, QEMU's place on PATH.
struct ProgramPaths {
    vmm: PathBuf,
    qemu: PathBuf,
    payload: PathBuf,
    emulator: PathBuf,
    qemu_vfio_user: Option<PathBuf>,
    qemu_vfio_user_patched: Option<PathBuf>,
}

impl ProgramArgs {
    fn resolve(self) -> ProgramPaths {
        ProgramPaths {
            vmm: self.vmm.unwrap_or_else(|| beside_me("vmm")),
            qemu: which(&self.qemu),
            payload: self.payload,
            emulator: self
                .emulator
                .unwrap_or_else(|| beside_me("kvm-userdev-emulator")),
            qemu_vfio_user: self.qemu_vfio_user,
            qemu_vfio_user_patched: self.qemu_vfio_user_patched,
        }
    }
}

impl ProgramPaths {
    fn programs(&self) -> Programs<'_> {
        Programs {
            vmm: &self.vmm,
            qemu: &self.qemu,
            payload: &self.payload,
            emulator: &self.emulator,
            qemu_vfio_user: self.qemu_vfio_user.as_deref(),
            qemu_vfio_user_patched: self.qemu_vfio_user_patched.as_deref(),
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            out,
            rounds,
            samples,
            warmup,
            idle_seconds,
            cpus,
            variants,
            programs,
            host_cpu,
            linux,
        } => {
            if rounds == 0 || !(1..=4096).contains(&samples) {
                bail!("--rounds must be at least 1 and --samples 1 to 4096");
            }
            if linux.linux
                && (linux.linux_rounds == 0
                    || linux.linux_cpus == 0
                    || !(0.1..=600.0).contains(&linux.console_seconds)
                    || linux.edu_loops == 0)
            {
                bail!(
                    "--linux-rounds, --linux-cpus and --edu-loops must be at least 1, \
                     --console-seconds 0.1 to 600"
                );
            }
            let paths = programs.resolve();
            let chosen = choose(&variants)?;
            let system = System {
                kernel: system::kernel(),
                qemu: qemu::version(&paths.qemu)?,
                vm_cpu: system::cpu_model(),
                host_cpu,
                tsc_khz: system::measure_tsc_khz(),
            };
            let config = RunConfig {
                rounds,
                samples,
                warmup,
                idle_seconds,
                cpus,
            };
            let mut results = match linux.linux_only {
                true => earlier(&out).unwrap_or_else(|| run::empty(system, config)),
                false => run::run(&chosen, &paths.programs(), system, config)?,
            };
            if linux.linux {
                let repo = linux.repo.as_deref().expect("clap requires --repo");
                let programs = linux_bench::Programs {
                    repo,
                    vmm: &paths.vmm,
                    qemu: &paths.qemu,
                    emulator: &paths.emulator,
                    qemu_vfio_user: paths.qemu_vfio_user.as_deref(),
                    qemu_vfio_user_patched: paths.qemu_vfio_user_patched.as_deref(),
                };
                let config = linux_bench::Config {
                    rounds: linux.linux_rounds,
                    guest_cpus: linux.linux_cpus,
                    console_seconds: linux.console_seconds,
                    loops: linux.edu_loops,
                };
                results.linux = Some(linux_bench::run(&programs, &config)?);
            }
            write(&out, &results)
        }
        Cmd::Report { results } => {
            let text = std::fs::read_to_string(&results)
                .with_context(|| format!("read {}", results.display()))?;
            let r: Results = serde_json::from_str(&text)
                .with_context(|| format!("parse {}", results.display()))?;
            write(results.parent().unwrap_or(Path::new(".")), &r)
        }
        Cmd::Trace {
            out,
            variant,
            samples,
            cpus,
            programs,
        } => {
            if !(1..=4096).contains(&samples) {
                bail!("--samples must be 1 to 4096");
            }
            let paths = programs.resolve();
            let [chosen] = &choose(&[variant])?[..] else {
                unreachable!("one name, one variant");
            };
            let tracing = trace::Tracing::set_up()?;
            tracing.on(true)?;
            let ran = chosen.run(
                &paths.programs(),
                &format!("samples={samples} warmup=5"),
                cpus,
            );
            let text = tracing.finish()?;
            ran?;
            let mut summary = format!(
                "{} — exits of the vCPU thread, µs after the exit (median); \
                 tracing adds its own cost to every step\n\n{}",
                chosen.name,
                trace::render(&trace::analyse(&text, variants::DOORBELL))
            );
            if cpus == 2 {
                summary += &trace::sharing(&text);
            }
            trace::write(&out, &text, &summary)?;
            print!("{summary}");
            println!(
                "bench: wrote trace.txt, trace-summary.txt in {}",
                out.display()
            );
            Ok(())
        }
    }
}

/// The results an earlier run left in `out`, if any parse.
fn earlier(out: &Path) -> Option<Results> {
    let text = std::fs::read_to_string(out.join("results.json")).ok()?;
    serde_json::from_str(&text).ok()
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

/// Writes the report files (the Linux part's beside the MMIO part's, when
/// they ran) and prints the tables.
fn write(out: &Path, results: &Results) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut files = vec![(
        "results.json",
        serde_json::to_string_pretty(results)? + "\n",
    )];
    let mut markdown = Vec::new();
    let mut table = Vec::new();
    if !results.variants.is_empty() {
        files.push(("results.svg", report::svg(results)));
        markdown.push(report::markdown(results));
        table.push(report::table(results));
    }
    if let Some(linux) = &results.linux {
        files.push(("linux.svg", linux_report::svg(linux)));
        markdown.push(linux_report::markdown(linux));
        table.push(linux_report::table(linux));
    }
    files.push(("results.md", markdown.join("\n")));
    files.push(("table.txt", table.join("\n")));
    let mut names = Vec::new();
    for (name, text) in &files {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        names.push(*name);
    }
    print!("{}", table.join("\n"));
    println!("bench: wrote {} in {}", names.join(", "), out.display());
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
