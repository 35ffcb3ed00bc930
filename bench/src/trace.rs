//! Where one access's time goes: a short run of a variant with the kernel's
//! KVM, user-device and scheduler tracepoints on, and a summary of the trace
//! per access kind: the time from the vCPU's exit to its next entry, and
//! when, within that, each step happened (median offsets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::report::percentile;

/// The tracepoints a run enables.
const EVENTS: &[&str] = &[
    "kvm/kvm_exit",
    "kvm/kvm_entry",
    "kvm/kvm_mmio",
    "kvm/kvm_userspace_exit",
    "kvm/kvm_user_enqueue",
    "kvm/kvm_user_forward",
    "kvm/kvm_user_shadow_hit",
    "kvm/kvm_user_reply",
    "kvm/kvm_user_fail",
    "sched/sched_waking",
    "sched/sched_wakeup",
    "sched/sched_switch",
];

/// Enabled where the kernel has them: spinlock contention.
const OPTIONAL_EVENTS: &[&str] = &["lock/contention_begin", "lock/contention_end"];

const TRACEFS: &str = "/sys/kernel/tracing";

/// The kernel's trace buffer, set up for one run (needs root, as in the VM).
pub struct Tracing {
    dir: PathBuf,
}

impl Tracing {
    /// Mounts tracefs if needed, clears the buffer and enables [`EVENTS`]
    /// with a clock that all CPUs share; tracing starts off.
    pub fn set_up() -> Result<Self> {
        let dir = PathBuf::from(TRACEFS);
        if !dir.join("trace").exists() {
            let status = Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .status()
                .context("run mount")?;
            if !status.success() {
                bail!("cannot mount tracefs on {TRACEFS} ({status})");
            }
        }
        let t = Tracing { dir };
        t.write("tracing_on", "0")?;
        t.write("trace_clock", "mono")?;
        t.write("buffer_size_kb", "32768")?;
        t.write("trace", "")?;
        t.enable_events("1")?;
        Ok(t)
    }

    /// Writes `value` to the enable file of each of [`EVENTS`] and of the
    /// [`OPTIONAL_EVENTS`] this kernel has.
    fn enable_events(&self, value: &str) -> Result<()> {
        let optional = OPTIONAL_EVENTS
            .iter()
            .filter(|e| self.dir.join("events").join(e).exists());
        for e in EVENTS.iter().chain(optional) {
            self.write(&format!("events/{e}/enable"), value)?;
        }
        Ok(())
    }

    pub fn on(&self, on: bool) -> Result<()> {
        self.write("tracing_on", if on { "1" } else { "0" })
    }

    /// The trace so far, as text; turns tracing and the events off.
    pub fn finish(self) -> Result<String> {
        self.on(false)?;
        self.enable_events("0")?;
        let path = self.dir.join("trace");
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .with_context(|| format!("write {value:?} to {}", path.display()))
    }
}

/// One line of the trace.
#[derive(Debug, PartialEq)]
struct Event<'a> {
    comm: &'a str,
    pid: u32,
    cpu: u32,
    /// Microseconds.
    t: f64,
    name: &'a str,
    args: &'a str,
}

/// Parses `<comm>-<pid> [<cpu>] <flags> <secs>: <event>: <args>`; the
/// comm may hold spaces and dashes.
fn parse_line(line: &str) -> Option<Event<'_>> {
    let (head, rest) = line.split_once("] ")?;
    let (task, cpu) = head.rsplit_once(" [")?;
    let (comm, pid) = task.trim().rsplit_once('-')?;
    let mut rest = rest.trim_start().splitn(2, ' ');
    let _flags = rest.next()?;
    let (secs, rest) = rest.next()?.trim_start().split_once(": ")?;
    let (name, args) = rest.split_once(": ").unwrap_or((rest, ""));
    Some(Event {
        comm,
        pid: pid.parse().ok()?,
        cpu: cpu.trim().parse().ok()?,
        t: secs.parse::<f64>().ok()? * 1e6,
        name,
        args,
    })
}

/// The text of `key` in `args`, up to `next` (comms may hold spaces).
fn field<'a>(args: &'a str, key: &str, next: &str) -> Option<&'a str> {
    let start = args.find(key)? + key.len();
    let len = args[start..].find(next).unwrap_or(args.len() - start);
    Some(&args[start..start + len])
}

/// What an exit was for, from the events between it and the next entry.
fn classify(reason: &str, events: &[&Event], doorbell: u64) -> Option<&'static str> {
    let has = |n: &str| events.iter().any(|e| e.name == n);
    if has("kvm_user_fail") {
        return Some("failed access (user device)");
    }
    if has("kvm_user_forward") {
        return Some("forwarded load (user device)");
    }
    if has("kvm_user_enqueue") {
        return Some("posted store (user device)");
    }
    if has("kvm_user_shadow_hit") {
        return Some("shadow load (user device)");
    }
    if reason == "cpuid" {
        return Some("cpuid");
    }
    let mmio = events.iter().find(|e| e.name == "kvm_mmio")?;
    let gpa = field(mmio.args, "gpa 0x", " ").and_then(|g| u64::from_str_radix(g, 16).ok());
    let to_user = has("kvm_userspace_exit");
    match (mmio.args.split(' ').nth(1)?, gpa == Some(doorbell), to_user) {
        ("write", true, false) => Some("ioeventfd store"),
        ("write", _, true) => Some("store exiting to user space"),
        ("unsatisfied-read", _, true) => Some("load exiting to user space"),
        _ => None,
    }
}

/// One kind of exit: how long exit → entry took, and the steps seen.
pub struct Kind {
    pub name: &'static str,
    pub totals: Vec<f64>,
    /// For each step, its offsets from the exit, first occurrence per exit.
    pub steps: BTreeMap<String, Vec<f64>>,
}

/// Summarises a trace: the vCPU thread is the one with the most exits.
pub fn analyse(text: &str, doorbell: u64) -> Vec<Kind> {
    let events: Vec<Event> = text.lines().filter_map(parse_line).collect();
    let Some(vcpu) = vcpu_thread(&events) else {
        return Vec::new();
    };
    let mut kinds: Vec<Kind> = Vec::new();
    let mut open: Option<(usize, &str)> = None;
    for (i, e) in events.iter().enumerate() {
        if e.pid != vcpu {
            continue;
        }
        match (e.name, open) {
            ("kvm_exit", _) => {
                open = Some((i, field(e.args, "reason ", " ").unwrap_or("")));
            }
            ("kvm_entry", Some((start, reason))) => {
                open = None;
                let between: Vec<&Event> = events[start + 1..i].iter().collect();
                if let Some(name) = classify(reason, &between, doorbell) {
                    let kind = kind_named(&mut kinds, name);
                    kind.add(events[start].t, e.t, &between, vcpu);
                }
            }
            _ => {}
        }
    }
    kinds
}

/// The thread with the most exits.
fn vcpu_thread(events: &[Event]) -> Option<u32> {
    let mut exits: BTreeMap<u32, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.name == "kvm_exit") {
        *exits.entry(e.pid).or_default() += 1;
    }
    exits
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(pid, _)| pid)
}

fn kind_named<'k>(kinds: &'k mut Vec<Kind>, name: &'static str) -> &'k mut Kind {
    match kinds.iter().position(|k| k.name == name) {
        Some(k) => &mut kinds[k],
        None => {
            kinds.push(Kind {
                name,
                totals: Vec::new(),
                steps: BTreeMap::new(),
            });
            kinds.last_mut().expect("just pushed")
        }
    }
}

impl Kind {
    /// One exit at `exit`, entered again at `entry`, with the events
    /// between: each step's first occurrence, as an offset from the exit.
    fn add(&mut self, exit: f64, entry: f64, between: &[&Event], vcpu: u32) {
        self.totals.push(entry - exit);
        let mut seen = Vec::new();
        for ev in between {
            let l = label(ev, vcpu);
            if !seen.contains(&l) {
                self.steps.entry(l.clone()).or_default().push(ev.t - exit);
                seen.push(l);
            }
        }
    }
}

/// Who a task is: the vCPU thread, an idle CPU, or its command name.
fn role(pid: u32, comm: &str, vcpu: u32) -> String {
    if pid == vcpu {
        "vCPU thread".into()
    } else if pid == 0 || comm.starts_with("swapper") {
        "idle".into()
    } else {
        comm.into()
    }
}

/// An event's name, with the tasks a scheduler event is about.
fn label(e: &Event, vcpu: u32) -> String {
    match e.name {
        "sched_waking" | "sched_wakeup" => {
            let comm = field(e.args, "comm=", " pid=").unwrap_or("?");
            let pid = field(e.args, " pid=", " ").and_then(|p| p.parse().ok());
            format!("{} {}", e.name, role(pid.unwrap_or(u32::MAX), comm, vcpu))
        }
        "sched_switch" => {
            let side = |c: &str, p: &str, end: &str| {
                let comm = field(e.args, c, p).unwrap_or("?");
                let pid = field(e.args, p, end).and_then(|p| p.parse().ok());
                role(pid.unwrap_or(u32::MAX), comm, vcpu)
            };
            format!(
                "sched_switch {} -> {}",
                side("prev_comm=", " prev_pid=", " "),
                side("next_comm=", " next_pid=", " ")
            )
        }
        name => name.to_string(),
    }
}

/// The summary as text: per kind, the exit → entry time and the steps seen
/// in at least half of its exits, in order of their median offset.
pub fn render(kinds: &[Kind]) -> String {
    let mut s = String::new();
    for k in kinds {
        let mut t = k.totals.clone();
        t.sort_by(f64::total_cmp);
        s += &format!(
            "{}: {} exits, exit -> entry median {:.1} µs (p10 {:.1}, p90 {:.1})\n",
            k.name,
            t.len(),
            percentile(&t, 50.0),
            percentile(&t, 10.0),
            percentile(&t, 90.0)
        );
        let mut steps: Vec<(f64, &str, usize)> = k
            .steps
            .iter()
            .filter(|(_, o)| o.len() * 2 >= t.len())
            .map(|(l, o)| {
                let mut o = o.clone();
                o.sort_by(f64::total_cmp);
                (percentile(&o, 50.0), l.as_str(), o.len())
            })
            .collect();
        steps.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, label, n) in steps {
            s += &format!("  {at:8.1}  {label}");
            if n < t.len() {
                s += &format!(" ({n} of {})", t.len());
            }
            s += "\n";
        }
        s += "\n";
    }
    s
}

/// One vCPU thread's share of the CPUs, for [`sharing`].
#[derive(Default)]
struct Share {
    comm: String,
    exits: usize,
    first: f64,
    last: f64,
    /// Switched out while runnable: how often, for how long, for whom.
    preempted: usize,
    preempted_us: f64,
    by: BTreeMap<String, usize>,
    runnable_since: Option<f64>,
    /// Switched out to sleep (a forwarded load's wait, a halt, ...).
    slept: usize,
    /// Spinlock contention (lock:contention_begin/end).
    contended: usize,
    contended_us: f64,
    contended_since: Option<f64>,
}

/// How the vCPU threads (every thread with exits) shared the CPUs: how
/// often and how long each waited, runnable, for a CPU and who had it, how
/// often it slept, and how often and how long it spun on a contended
/// spinlock (where the kernel has the lock tracepoints: the user device's
/// queue lock is one).
pub fn sharing(text: &str) -> String {
    let events: Vec<Event> = text.lines().filter_map(parse_line).collect();
    let mut threads: BTreeMap<u32, Share> = BTreeMap::new();
    for e in events.iter().filter(|e| e.name == "kvm_exit") {
        let t = threads.entry(e.pid).or_insert_with(|| Share {
            comm: e.comm.to_string(),
            first: e.t,
            ..Share::default()
        });
        t.exits += 1;
        t.last = e.t;
    }
    for e in &events {
        match e.name {
            "sched_switch" => {
                let prev = field(e.args, " prev_pid=", " ").and_then(|p| p.parse().ok());
                let next = field(e.args, " next_pid=", " ").and_then(|p| p.parse().ok());
                if let Some(t) = prev.and_then(|p: u32| threads.get_mut(&p)) {
                    let state = field(e.args, "prev_state=", " ").unwrap_or("");
                    if state.starts_with('R') {
                        t.preempted += 1;
                        t.runnable_since = Some(e.t);
                        let next_comm = field(e.args, "next_comm=", " next_pid=").unwrap_or("?");
                        *t.by.entry(next_comm.to_string()).or_default() += 1;
                    } else {
                        t.slept += 1;
                    }
                }
                if let Some(t) = next.and_then(|p: u32| threads.get_mut(&p)) {
                    if let Some(since) = t.runnable_since.take() {
                        t.preempted_us += e.t - since;
                    }
                }
            }
            // Spinlocks only: rwlocks (KVM's mmu_lock) say SPIN|READ or
            // SPIN|WRITE, mutexes MUTEX.
            "contention_begin" if e.args.contains("(flags=SPIN)") => {
                if let Some(t) = threads.get_mut(&e.pid) {
                    t.contended += 1;
                    t.contended_since = Some(e.t);
                }
            }
            "contention_end" => {
                if let Some(t) = threads.get_mut(&e.pid) {
                    if let Some(since) = t.contended_since.take() {
                        t.contended_us += e.t - since;
                    }
                }
            }
            _ => {}
        }
    }
    let lock_events = events.iter().any(|e| e.name.starts_with("contention_"));
    let mut s = String::from("how the vCPU threads shared the CPUs, from first to last exit\n");
    for t in threads.values() {
        let mut by: Vec<(&String, &usize)> = t.by.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        let by: Vec<String> = by.iter().map(|(c, n)| format!("{c} {n}")).collect();
        s += &format!(
            "  {}: {} exits in {:.1} ms; waited for a CPU {} times, {:.1} ms in all (it went to: {}); slept {} times",
            t.comm,
            t.exits,
            (t.last - t.first) / 1000.0,
            t.preempted,
            t.preempted_us / 1000.0,
            if by.is_empty() { "-".to_string() } else { by.join(", ") },
            t.slept,
        );
        if lock_events {
            s += &format!(
                "; spun on a contended spinlock {} times, {:.1} µs in all",
                t.contended, t.contended_us
            );
        }
        s += "\n";
    }
    if !lock_events {
        s += "  (no lock contention tracepoints in this kernel)\n";
    }
    s
}

/// Where a trace run writes: `trace.txt` (the raw trace) and
/// `trace-summary.txt` beside it.
pub fn write(out: &Path, text: &str, summary: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    for (name, body) in [("trace.txt", text), ("trace-summary.txt", summary)] {
        let path = out.join(name);
        std::fs::write(&path, body).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
# tracer: nop
             vmm-57      [001] d..1.     2.000000: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x1 info2 0xe0000004 intr_info 0x0 error_code 0x0
             vmm-57      [001] .....     2.000020: kvm_mmio: mmio write len 4 gpa 0xe0000004 val 0x32
             vmm-57      [001] d..6.     2.000030: sched_waking: comm=kvm-userdev-emu pid=59 prio=120 target_cpu=000
             vmm-57      [001] .....     2.000040: kvm_user_enqueue: vcpu 0 seq 76 range 0 offset 0x4 len 4 data 0x32
          <idle>-0       [000] dNh2.     2.000045: sched_wakeup: comm=kvm-userdev-emu pid=59 prio=120 target_cpu=000
             vmm-57      [001] d..1.     2.000050: kvm_entry: vcpu 0, rip 0x2
             vmm-57      [001] d..1.     2.000100: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x1 info2 0xe0000008 intr_info 0x0 error_code 0x0
             vmm-57      [001] .....     2.000120: kvm_user_forward: vcpu 0 seq 77 range 0 offset 0x8 len 4 data 0x0
             vmm-57      [001] d..2.     2.000125: sched_switch: prev_comm=vmm prev_pid=57 prev_prio=120 prev_state=D ==> next_comm=swapper/1 next_pid=0 next_prio=120
 kvm-userdev-emu-59      [000] .....     2.000160: kvm_user_reply: seq 77 data 0x0
             vmm-57      [001] d..1.     2.000200: kvm_entry: vcpu 0, rip 0x2
             vmm-57      [001] d..1.     2.000300: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x1 info2 0xd0000000 intr_info 0x0 error_code 0x0
             vmm-57      [001] .....     2.000310: kvm_mmio: mmio write len 4 gpa 0xd0000000 val 0x1
             vmm-57      [001] d..1.     2.000325: kvm_entry: vcpu 0, rip 0x2
             vmm-57      [001] d..1.     2.000400: kvm_exit: vcpu 0 reason io rip 0x1 info1 0x1 info2 0x0 intr_info 0x0 error_code 0x0
             vmm-57      [001] d..1.     2.000420: kvm_entry: vcpu 0, rip 0x2
";

    #[test]
    fn sharing_counts_preemption_sleep_and_contention() {
        let trace = "\
           vcpu0-60      [000] d..1.     1.000000: kvm_exit: vcpu 0 reason npf
           vcpu0-60      [000] d..2.     1.000010: contention_begin: 00000000deadbeef (flags=SPIN)
           vcpu0-60      [000] d..2.     1.000014: contention_end: 00000000deadbeef (ret=0)
           vcpu0-60      [000] d..2.     1.000015: contention_begin: 00000000cafe (flags=SPIN|READ)
           vcpu0-60      [000] d..2.     1.000017: contention_end: 00000000cafe (ret=0)
           vcpu0-60      [000] d..2.     1.000020: sched_switch: prev_comm=vcpu0 prev_pid=60 prev_prio=120 prev_state=R+ ==> next_comm=kvm-userdev-emu next_pid=59 next_prio=120
 kvm-userdev-emu-59      [000] d..2.     1.000120: sched_switch: prev_comm=kvm-userdev-emu prev_pid=59 prev_prio=120 prev_state=S ==> next_comm=vcpu0 next_pid=60 next_prio=120
           vcpu0-60      [000] d..2.     1.000200: sched_switch: prev_comm=vcpu0 prev_pid=60 prev_prio=120 prev_state=D ==> next_comm=swapper/0 next_pid=0 next_prio=120
           vcpu0-60      [000] d..1.     1.001000: kvm_exit: vcpu 0 reason npf
";
        let s = sharing(trace);
        assert!(
            s.contains(
                "vcpu0: 2 exits in 1.0 ms; waited for a CPU 1 times, 0.1 ms in all \
                 (it went to: kvm-userdev-emu 1); slept 1 times; \
                 spun on a contended spinlock 1 times, 4.0 µs in all"
            ),
            "{s}"
        );
    }

    #[test]
    fn lines_parse_with_dashes_in_the_comm() {
        let e = parse_line(
            " kvm-userdev-emu-59      [000] .....     2.000160: kvm_user_reply: seq 77 data 0x0",
        )
        .unwrap();
        assert_eq!((e.comm, e.pid, e.cpu), ("kvm-userdev-emu", 59, 0));
        assert_eq!((e.name, e.args), ("kvm_user_reply", "seq 77 data 0x0"));
        assert!((e.t - 2_000_160.0).abs() < 0.01);
        assert!(parse_line("# tracer: nop").is_none());
    }

    #[test]
    fn exits_are_classified_and_timed() {
        let kinds = analyse(TRACE, 0xd000_0000);
        let names: Vec<_> = kinds.iter().map(|k| k.name).collect();
        assert_eq!(
            names,
            [
                "posted store (user device)",
                "forwarded load (user device)",
                "ioeventfd store"
            ]
        );
        let total = |i: usize| kinds[i].totals[0].round();
        assert_eq!((total(0), total(1), total(2)), (50.0, 100.0, 25.0));
        let store = &kinds[0].steps;
        assert_eq!(store["sched_waking kvm-userdev-emu"][0].round(), 30.0);
        assert_eq!(store["sched_wakeup kvm-userdev-emu"][0].round(), 45.0);
        let load = &kinds[1].steps;
        assert_eq!(load["sched_switch vCPU thread -> idle"][0].round(), 25.0);
        assert_eq!(load["kvm_user_reply"][0].round(), 60.0);
    }

    #[test]
    fn summary_lists_steps_in_order() {
        let text = render(&analyse(TRACE, 0xd000_0000));
        let store = text.split("\n\n").next().unwrap();
        assert_eq!(
            store,
            "posted store (user device): 1 exits, exit -> entry median 50.0 µs (p10 50.0, p90 50.0)\n\
             \x20     20.0  kvm_mmio\n\
             \x20     30.0  sched_waking kvm-userdev-emu\n\
             \x20     40.0  kvm_user_enqueue\n\
             \x20     45.0  sched_wakeup kvm-userdev-emu"
        );
    }
}
