//! What a benchmark run produced: the shape of `results.json`.

use serde::{Deserialize, Serialize};

/// The access types the guest payload times, in report order.
pub const ACCESSES: [&str; 10] = [
    "cpuid",
    "ioeventfd-store",
    "ioeventfd-wake",
    "store",
    "batched-store",
    "load",
    "sync-load",
    "store-load",
    "store-load-other",
    "irq",
];

/// What each access type is, for the report's legend.
pub fn access_description(access: &str) -> &'static str {
    match access {
        "cpuid" => "null exit handled in KVM (floor)",
        "ioeventfd-store" => "MMIO store absorbed by an ioeventfd nobody waits on (floor)",
        "ioeventfd-wake" => {
            "MMIO store to an ioeventfd that wakes a process sleeping on it (floor)"
        }
        "store" => "store to a register (edu: 4 bytes, pci-testdev: 1 byte)",
        "batched-store" => "store that needs no prompt service (edu: an unused offset)",
        "load" => "4-byte load of a side-effect-free register",
        "sync-load" => "4-byte load that must reach the device model",
        "store-load" => "store, then load of the same register",
        "store-load-other" => "store, then load of a register that does not depend on it",
        "irq" => "interrupt round trip: raise, handler, acknowledge",
        _ => "",
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    /// When the run ended, UTC, `YYYY-MM-DD HH:MM`.
    pub date: String,
    pub system: System,
    pub config: RunConfig,
    /// In the order they ran within a round; the first is the baseline
    /// that ratios are taken against.
    pub variants: Vec<VariantResult>,
    /// The Linux guest's part (`--linux`), if it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux: Option<LinuxResults>,
}

/// The Linux guest's figures: the same guest kernel and initramfs booted
/// under every host (see [`crate::linux_bench`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinuxResults {
    /// When the part ended, UTC, `YYYY-MM-DD HH:MM` (it may run in a VM of
    /// its own, after the MMIO part).
    pub date: String,
    /// The vCPUs of the VM the guests ran in, and the guests' own.
    pub vm_cpus: usize,
    pub guest_cpus: u8,
    /// Each round boots the guest once under every host, in turn.
    pub rounds: u32,
    /// How long each console measurement wrote, in seconds.
    pub console_seconds: f64,
    /// Round trips per edu measurement.
    pub loops: u32,
    pub hosts: Vec<LinuxHostResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinuxHostResult {
    /// Short name, e.g. `kvm-userdev`.
    pub name: String,
    pub description: String,
    /// One per metric, in [`crate::linux_bench::METRICS`] order.
    pub figures: Vec<LinuxFigure>,
    /// User-device counters summed over the rounds, per device (the
    /// VMM's `vmm: stats` lines; kvm-userdev only).
    #[serde(default)]
    pub counters: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinuxFigure {
    pub metric: String,
    /// The median over the rounds, in the metric's unit.
    pub value: f64,
    /// Each round's value, in run order.
    pub rounds: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct System {
    /// `uname -r` inside the VM: the patched kernel.
    pub kernel: String,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu: String,
    /// CPU model the VM reports (`/proc/cpuinfo`).
    pub vm_cpu: String,
    /// CPU model of the machine the VM runs on.
    pub host_cpu: String,
    /// TSC frequency inside the VM, measured; guest cycles are converted
    /// with it (the nested guests' TSC runs at the VM's rate).
    pub tsc_khz: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunConfig {
    /// Each round runs every variant once, in turn.
    pub rounds: u32,
    /// Timed accesses per access type and run (after the warm-up).
    pub samples: u32,
    pub warmup: u32,
    /// How long each variant of our VMM was measured idle (0: not).
    #[serde(default)]
    pub idle_seconds: u32,
    /// vCPUs the edu variants' guests had: 2 adds the two-vCPU part.
    #[serde(default = "one")]
    pub cpus: u32,
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VariantResult {
    /// Short name, e.g. `kvm-userdev`.
    pub name: String,
    /// One line: what runs the device and how accesses reach it.
    pub description: String,
    /// The device the guest drove: `edu` or `pci-testdev`.
    pub device: String,
    /// One entry per access type the variant measured, in `ACCESSES`
    /// order; types a variant cannot do (no interrupt on pci-testdev) are
    /// absent.
    pub accesses: Vec<AccessResult>,
    /// User-device counters summed over the rounds (kvm-userdev variants
    /// only), by name: posted_stores, shadow_loads, forwarded_loads, ...,
    /// stalled_accesses (the keys of the VMM's `vmm: stats` line).
    pub counters: Option<std::collections::BTreeMap<String, u64>>,
    /// What the guest cost the host while idle (variants of our VMM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<crate::idle::IdleCost>,
    /// The two-vCPU part, per access type (edu variants, `--cpus 2`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub two_vcpus: Vec<crate::two_vcpus::TwoVcpuResult>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccessResult {
    pub access: String,
    /// Samples pooled over all rounds.
    pub n: usize,
    /// Microseconds.
    pub median_us: f64,
    pub p10_us: f64,
    pub p90_us: f64,
    /// Median of each round, in run order: drift shows here.
    pub round_medians_us: Vec<f64>,
}

impl Results {
    /// The baseline's median for `access`, if it measured it.
    pub fn baseline_median(&self, access: &str) -> Option<f64> {
        self.variants.first()?.access(access).map(|a| a.median_us)
    }
}

impl VariantResult {
    pub fn access(&self, access: &str) -> Option<&AccessResult> {
        self.accesses.iter().find(|a| a.access == access)
    }
}
