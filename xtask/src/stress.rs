//! The randomized stress test of the user device, the selftest program
//! `x86_64/user_dev_stress`: a minute of it in `cargo xtask test`, longer
//! runs with `cargo xtask soak`.
//!
//! The test bed can fail by itself under such stress: QEMU TCG's nested SVM
//! was seen to save an L1 kernel address as an L2 vCPU's RIP, and the L2
//! guest then triple-faults. The program tells that apart from a device bug
//! by the saved state and exits with [`TESTBED_FAULT`]; the run is then
//! repeated once. The KVM trace of a run that failed either way is kept in
//! the scratch directory.

use anyhow::Result;
use std::time::Duration;

use crate::kernel::{self, Flavour};
use crate::vm::{self, shell_quote, Tcg, VmOptions};

/// The stress program, relative to the built selftests.
pub const PROGRAM: &str = "x86_64/user_dev_stress";

/// The program's exit status for a fault it attributes to the test bed.
pub const TESTBED_FAULT: i32 = 10;

/// What the program prints, with the registers, for such a fault.
pub const TESTBED_MARK: &str = "testbed-fault";

/// Tracepoints kept in a bounded ring buffer while the program runs
/// (set_event takes no partial globs).
const EVENTS: &str = "kvm:kvm_exit kvm:kvm_entry kvm:kvm_mmio kvm:kvm_pio \
    kvm:kvm_user_enqueue kvm:kvm_user_forward kvm:kvm_user_shadow_hit \
    kvm:kvm_user_reply kvm:kvm_user_fail";

/// How long past its own duration the program may run before the script
/// keeps its threads' kernel stacks and kills it. The program's watchdog
/// ends a shutdown that stalls for 30 s; this catches a watchdog that is
/// stuck itself.
const OVERRUN: Duration = Duration::from_secs(120);

/// A shell script that runs the stress program with `args` for `duration`,
/// tracing KVM into a bounded buffer, repeats it once after a test-bed
/// fault, and copies the trace of a run that did not pass to
/// `$KVM_USERDEV_SCRATCH/<label>-*.trace`. A run that outlives `duration`
/// by [`OVERRUN`] has its threads' state printed and is killed. Exits with
/// the last run's status.
pub fn script(program: &str, args: &[String], duration: Duration, label: &str) -> String {
    let mut cmd = shell_quote(program);
    for arg in args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(arg));
    }
    let limit = (duration + OVERRUN).as_secs();
    format!(
        "t=/sys/kernel/tracing\n\
         echo 4096 > $t/buffer_size_kb\n\
         echo '{EVENTS}' > $t/set_event\n\
         echo 1 > $t/tracing_on\n\
         keep() {{ cp $t/trace \"$KVM_USERDEV_SCRATCH/{label}-$1.trace\"; \
         echo \"== KVM trace kept: $KVM_USERDEV_SCRATCH/{label}-$1.trace\"; }}\n\
         guarded() {{ {cmd} & p=$!; \
         ( i=0; while kill -0 $p 2>/dev/null; do sleep 1; i=$((i+1)); \
         if [ $i = {limit} ]; then echo \"== still running after {limit} s: its threads\"; \
         for d in /proc/$p/task/*; do echo \"-- $d $(cat $d/comm) $(cat $d/wchan)\"; \
         grep State $d/status; cat $d/stack; done; keep overran; kill -KILL $p; fi; \
         done ) & w=$!; wait $p; st=$?; wait $w; }}\n\
         echo > $t/trace; guarded\n\
         if [ $st = {TESTBED_FAULT} ]; then keep testbed-fault; \
         echo '== test-bed fault: repeating the run once'; \
         echo > $t/trace; guarded; fi\n\
         [ $st = 0 ] || keep status-$st\n\
         echo > $t/set_event\n\
         exit $st\n"
    )
}

/// How many test-bed faults a run's output reports.
pub fn testbed_faults(output: &str) -> usize {
    output
        .lines()
        .filter(|l| l.starts_with(TESTBED_MARK))
        .count()
}

pub struct SoakOptions {
    pub duration: Duration,
    pub control: Duration,
    pub seed: Option<u64>,
    pub tcg: Tcg,
}

/// `cargo xtask soak`: the control arm (no user device) and then the stress
/// program for `duration`, in one boot of the debug kernel.
pub fn soak(opts: &SoakOptions) -> Result<i32> {
    let kernel = kernel::build(Flavour::Debug)?;
    let program = kernel.selftests.join(PROGRAM);
    let program = program.to_string_lossy();
    let mut args = vec![];
    if let Some(seed) = opts.seed {
        args.extend(["-s".to_string(), seed.to_string()]);
    }
    let mut control = args.clone();
    control.extend([
        "-c".to_string(),
        "-d".to_string(),
        opts.control.as_secs().to_string(),
    ]);
    let mut device = args;
    device.extend(["-d".to_string(), opts.duration.as_secs().to_string()]);
    let script = format!(
        "echo '== control arm (no user device)'\n( {} ); c=$?\n\
         echo '== user device'\n( {} ); d=$?\n\
         echo \"== control arm: status $c; user device: status $d\"\n\
         [ $c = 0 ] && [ $d = 0 ]\n",
        script(&program, &control, opts.control, "soak-control"),
        script(&program, &device, opts.duration, "soak-device"),
    );
    let mut vm_opts = VmOptions::new(Flavour::Debug);
    vm_opts.tcg = opts.tcg;
    vm_opts.timeout = opts.control + opts.duration * 2 + Duration::from_secs(600);
    let run = vm::run(&vm_opts, &["sh".into(), "-c".into(), script])?;
    run.explain();
    eprintln!(
        "xtask: soak: {} test-bed fault(s) reported",
        testbed_faults(&run.output)
    );
    Ok(run.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_repeats_a_testbed_fault_once_guards_and_keeps_traces() {
        let d = Duration::from_secs(60);
        let args = ["-d".into(), "60".into()];
        let s = script("/k/user_dev_stress", &args, d, "stress");
        assert_eq!(s.matches("user_dev_stress").count(), 1);
        assert_eq!(s.matches("; guarded").count(), 2);
        assert!(s.contains("if [ $i = 180 ]"));
        assert!(s.contains("if [ $st = 10 ]"));
        assert!(s.contains("stress-$1.trace"));
        assert!(s.ends_with("exit $st\n"));
    }

    #[test]
    fn testbed_faults_counted_from_marks() {
        let out = "seed=7\ntestbed-fault: rip 0xffffffff81000000\nok\n";
        assert_eq!(testbed_faults(out), 1);
        assert_eq!(testbed_faults("all fine\n"), 0);
    }
}
