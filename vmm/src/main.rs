//! `vmm`: runs a guest payload, or a Linux kernel, with edu devices and
//! optionally a 16550A UART as its console, each served by its own
//! sandboxed emulator process through a KVM_DEV_TYPE_USER device (or, for
//! comparison, by the classic exit paths: `--serve in-process|socket`).
//!
//! Exit status: the value the guest wrote to the exit port (0 = its tests
//! passed), 2 if the VMM failed, 124 if `--timeout` expired.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use userdev::stats;
use vmm::device::{EmulatorSpec, Tuning};
use vmm::machine::{Boot, Config, Machine, MachineError, Serve, Server};
use vmm::snapshot::Snapshot;

#[derive(Parser, Debug)]
#[command(about = "A minimal KVM VMM whose PCI devices are served by sandboxed emulator processes")]
struct Args {
    /// The guest payload (a PVH ELF, e.g. target/guest/release/edu-test).
    #[arg(long, required_unless_present = "kernel", conflicts_with = "kernel")]
    payload: Option<PathBuf>,
    /// A Linux bzImage to boot instead of a payload.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The Linux kernel's initramfs.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The payload's or kernel's command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=3072))]
    memory: u64,
    /// vCPUs. A payload starts on vCPU 0 (APIC ID 0); the others wait for
    /// its INIT and start-up IPIs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    cpus: u8,
    /// A 16550A UART at port 0x3f8 on IRQ 4 (the guest's ttyS0), with its
    /// own emulator; it reads this process's stdin and writes its stdout.
    #[arg(long)]
    serial: bool,
    /// How many edu devices, each with its own emulator.
    #[arg(long, default_value_t = 1)]
    edu: usize,
    /// Start a new emulator through a new backend fd when one ends.
    #[arg(long)]
    restart: bool,
    /// The emulator program (default: kvm-userdev-emulator beside this one).
    #[arg(long)]
    emulator: Option<PathBuf>,
    /// An extra argument for the emulator (repeatable).
    #[arg(long = "emulator-arg", allow_hyphen_values = true)]
    emulator_args: Vec<String>,
    /// Publish nothing in the shadow image: every load reaches the emulator.
    #[arg(long)]
    no_shadow: bool,
    /// A BAR0 offset whose loads always reach the emulator (repeatable).
    #[arg(long, value_parser = parse_offset)]
    forward: Vec<u64>,
    /// A BAR0 offset of a 4-byte register whose stores are batched: the
    /// emulator is woken for them within the batch delay (repeatable).
    #[arg(long, value_parser = parse_offset)]
    batch: Vec<u64>,
    /// How long a vCPU may poll for a forwarded load's reply while the
    /// emulator runs on another CPU, in ns (0 to 1000000; the kernel's
    /// default is 200000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_ns: Option<u64>,
    /// Hand the waker's CPU over for a forwarded load and its reply,
    /// instead of letting the scheduler place the woken emulator and vCPU
    /// (the kernel's default).
    #[arg(long)]
    handoff: bool,
    /// How long a batched store may wait before the emulator is woken, in
    /// µs (1 to 1000000; the kernel's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch_us: Option<u64>,
    /// How long a vCPU may wait for an emulator's reply or for ring space,
    /// and the VMM for the emulator before a configuration write, in
    /// milliseconds (1 to 1000; the kernel's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    access_timeout_ms: Option<u64>,
    /// Who serves BAR0: `user` (a user device and a sandboxed emulator),
    /// `in-process` (the model in the VMM, on MMIO exits), `socket` (MMIO
    /// exits forwarded to the sandboxed emulator over a UNIX socket).
    #[arg(long, value_enum, default_value_t = Serve::User)]
    serve: Serve,
    /// Put an ioeventfd at this MMIO address (a store there costs only the
    /// exit into KVM).
    #[arg(long, value_parser = parse_offset)]
    doorbell: Option<u64>,
    /// Put an ioeventfd at this MMIO address and a process that sleeps on
    /// it (a store there costs the exit and the consumer's wakeup).
    #[arg(long, value_parser = parse_offset)]
    woken_doorbell: Option<u64>,
    /// Give up (exit 124) if the guest has not finished after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// The longest delay, in µs, of the emulator kills a payload asks for
    /// at random moments (control command 2).
    #[arg(long, default_value_t = 50_000)]
    kill_delay_us: u64,
    /// The seed of those delays.
    #[arg(long, default_value_t = 1)]
    kill_seed: u64,
    /// Where to save a snapshot when the payload asks (control command 4:
    /// the device's queue drained, its emulator's last committed state,
    /// and in a PVH VM with one vCPU the VM's own state; vmm/src/snapshot.rs
    /// and vmstate.rs), and what command 5 puts the running device back
    /// into (with --restart).
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Start from a snapshot: the guest goes on where it was, or, if the
    /// snapshot holds the device only, boots with the device restored.
    #[arg(long)]
    restore: Option<PathBuf>,
}

fn parse_offset(s: &str) -> Result<u64, String> {
    emulator::handoff::parse_u64(s)
        .ok_or_else(|| format!("{s}: not a decimal or 0x-prefixed hex number"))
}

fn default_emulator() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.with_file_name("kvm-userdev-emulator")
}

fn main() {
    let args = Args::parse();
    let edu = EmulatorSpec {
        program: args.emulator.clone().unwrap_or_else(default_emulator),
        args: args.emulator_args.clone(),
        model: "edu".into(),
        shadow: !args.no_shadow,
        forward: args.forward.clone(),
        batch: args.batch.clone(),
        tuning: Tuning {
            poll: args.poll_ns.map(Duration::from_nanos),
            handoff: args.handoff.then_some(true),
            batch_delay: args.batch_us.map(Duration::from_micros),
        },
        restart: args.restart,
        access_timeout: args.access_timeout_ms.map(Duration::from_millis),
        transport: args.serve.transport(),
    };
    let mut devices = Vec::new();
    if args.serial {
        // The UART publishes its side-effect-free registers; edu's
        // --forward offsets mean nothing to it.
        devices.push(EmulatorSpec {
            model: "uart16550a".into(),
            forward: Vec::new(),
            batch: Vec::new(),
            ..edu.clone()
        });
    }
    devices.extend(std::iter::repeat_n(edu, args.edu));
    let boot = match (&args.payload, &args.kernel) {
        (Some(payload), _) => Boot::Pvh {
            payload: payload.clone(),
        },
        (None, Some(kernel)) => Boot::Linux {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
        },
        (None, None) => unreachable!("clap requires one"),
    };
    let restore = match args.restore.as_deref().map(Snapshot::read).transpose() {
        Ok(r) => r,
        Err(e) => {
            emulator::log!("vmm: --restore: {e}");
            std::process::exit(2)
        }
    };
    let config = Config {
        boot,
        cmdline: args.cmdline.clone(),
        ram_mib: args.memory,
        cpus: args.cpus,
        devices,
        serve: args.serve,
        doorbell: args.doorbell,
        woken_doorbell: args.woken_doorbell,
        timeout: args.timeout.map(Duration::from_secs),
        kill_delay: Duration::from_micros(args.kill_delay_us),
        kill_seed: args.kill_seed,
        snapshot: args.snapshot.clone(),
        restore,
    };
    let code = run(&config);
    vmm::console::flush();
    vmm::console::restore();
    // Other vCPU threads may still be in the guest: end them with the
    // process rather than tearing the VM down under them.
    std::process::exit(code)
}

fn run(config: &Config) -> i32 {
    let mut machine = match Machine::new(config) {
        Ok(m) => m,
        Err(e) => {
            emulator::log!("vmm: {e}");
            return 2;
        }
    };
    let result = machine.run(config.timeout);
    machine.drain();
    for slot in &machine.devices().slots {
        print_stats(slot);
    }
    match result {
        Ok(status) => {
            emulator::log!("vmm: the guest exited with status {status}");
            status as u8 as i32
        }
        Err(e @ MachineError::Timeout(_)) => {
            emulator::log!("vmm: {e}");
            124
        }
        Err(e) => {
            emulator::log!("vmm: {e}");
            2
        }
    }
}

/// What served the device's accesses, on stderr.
fn print_stats(slot: &vmm::machine::Slot) {
    let name = &slot.name;
    match &slot.server {
        Server::Emulator(d) => match d.stats() {
            Some(Ok(s)) => emulator::log!("{}", stats::line(name, &s)),
            Some(Err(e)) => emulator::log!("{}", stats::line(name, &e)),
            None => emulator::log!(
                "{}",
                stats::line(name, &format!("socket timeouts={}", d.forward_timeouts()))
            ),
        },
        Server::InProcess(d) => emulator::log!(
            "{}",
            stats::line(name, &format!("in-process irq_errors={}", d.irq_errors()))
        ),
    }
}
