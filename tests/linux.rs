//! An unmodified Linux guest on user devices: the project's plain kernel
//! booted by the VMM on two vCPUs, its console the 16550A UART and its edu
//! devices served by sandboxed emulators through user devices, and the
//! same guest under QEMU, with QEMU's own edu and with ours over vfio-user.
//! `cargo xtask test` builds the guest (target/guest-linux) first.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kvm_userdev_bench::linux::{Boot, Host};
use kvm_userdev_bench::qemu::VfioUserServer;
use userdev::{stats, Stats};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How long a guest may take, boot included, on the debug kernel under
/// nested TCG.
const TIMEOUT_S: u64 = 400;

struct Run {
    /// The guest's own exit status (see [`Host::guest_status`]).
    status: Option<i32>,
    /// The host process's: QEMU's 0 means the guest never reported.
    host_status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The counters of the device whose name starts with `name`.
    fn stats(&self, name: &str) -> Stats {
        let (_, counters) = stats::lines(&self.stderr)
            .find(|(device, _)| device.starts_with(name))
            .unwrap_or_else(|| panic!("no counters for {name}"));
        counters.parse().expect("counters parse")
    }

    /// Why the guest looks killed by the test bed rather than by itself or
    /// by us: it ended without reporting, by a triple fault or an exit KVM
    /// could not handle, and its console shows no panic or oops (a fault of
    /// the guest kernel or its drivers prints one before dying). QEMU TCG's
    /// nested SVM was seen to do this without any user device.
    fn testbed_death(&self, host: Host) -> Option<String> {
        let console = &self.stdout;
        if ["Kernel panic", "Oops", "BUG:", "general protection"]
            .iter()
            .any(|m| console.contains(m))
        {
            return None;
        }
        match host {
            _ if host.is_qemu() && self.host_status == Some(0) => {
                Some("QEMU ended without the guest's exit status (a triple fault or reset)".into())
            }
            _ if host.is_qemu() => None,
            _ => self
                .stderr
                .lines()
                .find(|l| l.contains("shut down (triple fault") || l.contains("unexpected exit"))
                .map(str::to_string),
        }
    }

    fn assert_exit(&self, status: i32) {
        assert_eq!(
            self.status,
            Some(status),
            "the guest's status (stdout above)"
        );
    }
}

fn boot(host: Host, command: &str) -> Boot {
    let mut b = Boot::new(host);
    b.command = Some(command.into());
    b.timeout_s = TIMEOUT_S;
    // As in the edu tests: on the debug kernel under nested TCG the
    // emulators can be slow to be scheduled; only a dead one should make a
    // load time out.
    b.vmm_args = vec!["--access-timeout-ms".into(), "1000".into()];
    b
}

fn command(boot: &Boot) -> Command {
    let mut argv = boot.command(&repo(), &repo().join("target/debug/vmm"));
    if boot.host.is_qemu() {
        // Our VMM ends itself after --timeout; QEMU has no such bound.
        let bound = ["timeout", "-s", "KILL", &TIMEOUT_S.to_string()].map(String::from);
        argv.splice(0..0, bound);
    }
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

fn finish(name: &str, host: Host, code: Option<i32>, stdout: String, stderr: String) -> Run {
    println!("---- {name}\n{stdout}{stderr}");
    Run {
        status: code.map(|c| host.guest_status(c)),
        host_status: code,
        // The guest's tty ends lines with CR LF.
        stdout: stdout.replace("\r\n", "\n"),
        stderr,
    }
}

/// Boots the guest, runs `command` in it and returns when it ends.
fn run(boot: &Boot) -> Run {
    let out = command(boot)
        .stdin(Stdio::null())
        .output()
        .expect("start the guest's host");
    finish(
        boot.command.as_deref().unwrap_or(""),
        boot.host,
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A guest that is running, its output read line by line.
struct Live {
    host: Host,
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Live {
    fn start(boot: &Boot) -> Live {
        let mut child = command(boot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the VMM");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            // Not lines(): the console carries bytes that are not UTF-8
            // (the 8250 driver's IRQ probe transmits 0xff).
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                if tx
                    .send(text.trim_end_matches(['\r', '\n']).to_string())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
        });
        let mut err = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Live {
            host: boot.host,
            child,
            lines,
            stdout: String::new(),
            stderr,
        }
    }

    /// Reads the guest's output until a line contains `marker`; if it
    /// never comes (the guest ended, or the time ran out), ends the guest
    /// and returns how it ended instead.
    fn wait_for(mut self, marker: &str) -> Result<Self, Run> {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(TIMEOUT_S)) {
                Ok(line) => {
                    self.stdout.push_str(&line);
                    self.stdout.push('\n');
                    if line.contains(marker) {
                        return Ok(self);
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    return Err(self.finish(&format!("no {marker:?} from the guest")));
                }
            }
        }
    }

    fn send(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .expect("write the guest's input");
        stdin.flush().expect("flush");
    }

    fn finish(mut self, name: &str) -> Run {
        let status = self.child.wait().expect("wait for the VMM").code();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push_str(&line);
            self.stdout.push('\n');
        }
        let stderr = self.stderr.join().unwrap_or_default();
        finish(name, self.host, status, self.stdout, stderr)
    }
}

/// The L1 kernel's KVM trace while a guest runs: entries and exits with
/// the guest's RIP, in a bounded ring that keeps the newest events. When a
/// guest dies its tail tells a test-bed fault (an L1 kernel address
/// entered as the guest's RIP, then the triple fault) from a guest that
/// went wrong by itself.
struct KvmTrace;

const TRACING: &str = "/sys/kernel/tracing";
const TRACE_EVENTS: &str = "kvm:kvm_entry kvm:kvm_exit kvm:kvm_user_fail";

impl KvmTrace {
    /// Starts an empty trace; without tracefs (not in the VM) there is
    /// none, and the tests run without it.
    fn start() -> Option<KvmTrace> {
        let set = |file: &str, value: &str| std::fs::write(format!("{TRACING}/{file}"), value);
        set("buffer_size_kb", "2048").ok()?;
        set("set_event", TRACE_EVENTS).ok()?;
        set("trace", "").ok()?;
        set("tracing_on", "1").ok()?;
        Some(KvmTrace)
    }

    /// Copies the trace to the scratch directory and prints where, with
    /// its last lines.
    fn keep(&self, label: &str) {
        let Ok(text) = std::fs::read_to_string(format!("{TRACING}/trace")) else {
            return;
        };
        let dir = std::env::var("KVM_USERDEV_SCRATCH").unwrap_or_else(|_| "/tmp".into());
        let path = format!("{dir}/linux-{label}.trace");
        let kept = std::fs::write(&path, &text).is_ok();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        println!("---- KVM trace, last lines (all of it in {path}: {kept})");
        for line in tail.iter().rev() {
            println!("{line}");
        }
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{TRACING}/set_event"), "");
    }
}

/// Runs `attempt` (one boot of the guest), and once more if the test bed
/// killed the guest: the mark `testbed-fault:` on stderr, outside libtest's
/// capture, lets `cargo xtask test` count it. The KVM trace of every death
/// is kept.
fn with_testbed_retry(label: &str, host: Host, attempt: impl Fn() -> Run) -> Run {
    let trace = KvmTrace::start();
    let r = attempt();
    let Some(why) = r.testbed_death(host) else {
        return r;
    };
    if let Some(t) = &trace {
        t.keep(&format!("{label}-testbed-fault"));
    }
    let mark = format!("testbed-fault: {label}: {why}; running the guest again\n");
    let _ = std::io::stderr().write_all(mark.as_bytes());
    if trace.is_some() {
        let _ = std::fs::write(format!("{TRACING}/trace"), "");
    }
    let r = attempt();
    if let (Some(t), Some(_)) = (&trace, r.testbed_death(host)) {
        t.keep(&format!("{label}-again"));
    }
    r
}

/// The pids of the emulators that serve a device, oldest first (the VMM
/// starts them in device order: the UART, then edu 0, edu 1). A standby
/// emulator, started ahead for a restart, serves nothing yet: it runs as
/// nobody already, but has no seccomp filter until its setup comes.
fn emulator_pids_now() -> Vec<i32> {
    let mut pids: Vec<(u64, i32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if comm.trim() != "kvm-userdev-emu" {
                return None;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))?
                    .split_whitespace()
                    .next()
                    .map(str::to_string)
            };
            // Mode 2: a seccomp filter.
            if field("Uid:")? != emulator::sandbox::NOBODY.to_string() || field("Seccomp:")? != "2"
            {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let start: u64 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(19)?
                .parse()
                .ok()?;
            Some((start, pid))
        })
        .collect();
    pids.sort();
    pids.into_iter().map(|(_, p)| p).collect()
}

/// The emulator of the second edu device (the third emulator).
fn second_edu_emulator() -> i32 {
    emulator_pids_now()
        .into_iter()
        .nth(2)
        .expect("three emulators: the UART's and two edu devices'")
}

fn kill(pid: i32) {
    // SAFETY: kill(2) takes a pid and a signal number, nothing else.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

/// Kills `victim` and waits until the VMM has started an emulator in its
/// place; returns the new one's pid.
fn kill_and_replace(victim: i32) -> i32 {
    let before = emulator_pids_now();
    kill(victim);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pids = emulator_pids_now();
        if pids.len() == 3 && !pids.contains(&victim) {
            let mut new = pids.iter().filter(|p| !before.contains(p));
            if let (Some(&pid), None) = (new.next(), new.next()) {
                return pid;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no emulator took over from pid {victim}: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uses /dev/edu1 until it fails (its emulator is killed meanwhile).
const USE_UNTIL_IT_FAILS: &str =
    "echo kill-now; while edu-tool --device /dev/edu1 >/dev/null 2>&1; do :; done; echo edu1-failed";

/// One boot, the main path: both CPUs online, the 8250 driver's own probe
/// finds a 16550A at 0x3f8 on IRQ 4, input typed on the VMM's stdin reaches
/// a shell in the guest and its output comes back, the edu driver's checks
/// pass on two devices with MSI, an emulator killed while the guest uses
/// its device leaves the guest running and the driver failing instead of
/// hanging, and the command's exit status is the VMM's.
#[test]
fn linux_guest_on_user_devices() {
    let command = format!(
        "echo cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online); \
         dmesg | grep ttyS0; cat /proc/tty/driver/serial; \
         echo ready; read -r line; echo \"got:$line\"; \
         cat /sys/class/misc/edu*/irq_mode; edu-tool || exit 1; \
         {USE_UNTIL_IT_FAILS}; \
         edu-tool --device /dev/edu1 --expect-dead || exit 2; \
         edu-tool --device /dev/edu0 || exit 3; exit 7"
    );
    let b = boot(Host::User, &command);
    let r = with_testbed_retry("user-devices", b.host, || {
        let mut live = match Live::start(&b).wait_for("ready") {
            Ok(live) => live,
            Err(r) => return r,
        };
        live.send("hello from the host\n");
        let live = match live.wait_for("kill-now") {
            Ok(live) => live,
            Err(r) => return r,
        };
        kill(second_edu_emulator());
        live.finish("Linux guest on user devices")
    });
    r.assert_exit(7);
    assert!(r.stdout.contains("cpus=2 online=0-1"), "both CPUs online");
    assert!(
        r.stdout.contains("ttyS0 at I/O 0x3f8 (irq = 4") && r.stdout.contains("is a 16550A"),
        "the 8250 driver's verdict"
    );
    assert!(r.stdout.contains("0: uart:16550A port:000003F8 irq:4"));
    assert!(
        r.stdout.contains("got:hello from the host"),
        "console input"
    );
    assert_eq!(r.stdout.matches("msi\n").count(), 2, "both devices use MSI");
    assert!(r.stdout.contains("edu-tool: PASS: 2 device(s)"));
    assert!(r.stdout.contains("edu1-failed"));
    // Every path carried UART accesses: THR stores posted and batched, LSR
    // polls from the shadow image (also right behind a THR store), RBR and
    // IIR (and other loads right behind a store) forwarded.
    let s = r.stats("uart16550a");
    assert!(
        s.posted_stores > 0 && s.batched_stores > 0 && s.shadow_loads > 0 && s.forwarded_loads > 0,
        "{s:?}"
    );
    assert_eq!((s.timeouts, s.dropped_stores), (0, 0), "{s:?}");
    let s = r.stats("edu at 00:01.0");
    assert!(s.posted_stores > 0 && s.shadow_loads > 0, "{s:?}");
}

/// INTx instead of MSI, and with --restart a killed emulator's successor
/// serves the device again.
#[test]
fn linux_guest_with_intx_and_a_restarted_emulator() {
    // A kill that finds nothing in flight between two runs of edu-tool
    // goes unseen: the successor answers the next run from a reset
    // device. So the guest uses the device until it fails or the host
    // says the successor is up, whichever comes first.
    let command = "cat /sys/class/misc/edu*/irq_mode; edu-tool || exit 1; echo kill-now; \
         (while [ ! -e /edu1-stop ] && edu-tool --device /dev/edu1 >/dev/null 2>&1; do :; done; \
          [ -e /edu1-stop ] || echo edu1-failed) & \
         read -r line; touch /edu1-stop; wait; echo \"got:$line\"; \
         n=0; until edu-tool --device /dev/edu1; do n=$((n + 1)); [ $n -lt 30 ] || exit 2; sleep 1; done; \
         echo answers-again";
    let mut b = boot(Host::User, command);
    b.append.push("kvm_userdev_edu.nomsi=1".into());
    b.vmm_args.push("--restart".into());
    let r = with_testbed_retry("intx-restart", b.host, || {
        let mut live = match Live::start(&b).wait_for("kill-now") {
            Ok(live) => live,
            Err(r) => return r,
        };
        kill_and_replace(second_edu_emulator());
        live.send("restarted\n");
        live.finish("INTx, restart")
    });
    r.assert_exit(0);
    assert_eq!(
        r.stdout.matches("intx\n").count(),
        2,
        "both devices use INTx"
    );
    assert!(r.stdout.contains("got:restarted") && r.stdout.contains("answers-again"));
    println!(
        "the guest {} the kill",
        if r.stdout.contains("edu1-failed") {
            "saw"
        } else {
            "did not see"
        }
    );
}

/// The guest's console across emulator kills: with --restart, the UART's
/// emulator is killed again and again while the guest writes numbered
/// lines, and every line arrives once, in order; the UART's queue drops
/// nothing and no load waits in vain.
#[test]
fn console_output_survives_emulator_kills() {
    const KILLS: usize = 5;
    const LINES: usize = 3000;
    // Printk quiet, so that only the loop writes. The loop ends by itself:
    // console input sent while the guest writes without pause was seen to
    // wait minutes before the guest read it, kills or not (not understood
    // yet), so the host does not tell it when to stop.
    let command = format!(
        "dmesg -n 1; echo kill-now; \
         i=0; while [ $i -lt {LINES} ]; do i=$((i + 1)); echo \"line $i\"; done; \
         echo \"lines-done $i\""
    );
    let mut b = boot(Host::User, &command);
    b.vmm_args.push("--restart".into());
    let r = with_testbed_retry("console-kills", b.host, || {
        let mut live = match Live::start(&b).wait_for("kill-now") {
            Ok(live) => live,
            Err(r) => return r,
        };
        let mut uart = emulator_pids_now()[0];
        for kill in 0..KILLS {
            // Each kill lands while lines are coming.
            live = match live.wait_for(&format!("line {}", 100 * (kill + 1))) {
                Ok(live) => live,
                Err(r) => return r,
            };
            uart = kill_and_replace(uart);
        }
        assert!(
            !live.stdout.contains("lines-done"),
            "the guest wrote all {LINES} lines before the last kill"
        );
        live.finish("console across kills")
    });
    r.assert_exit(0);
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .skip_while(|l| !l.contains("kill-now"))
        .skip(1)
        .take_while(|l| !l.starts_with("lines-done"))
        .collect();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line {}", i + 1),
            "line {} of the guest's output",
            i + 1
        );
    }
    assert_eq!(lines.len(), LINES, "every line once");
    assert!(r.stdout.contains(&format!("lines-done {LINES}")));
    assert_eq!(
        r.stderr.matches("was killed by signal 9 (SIGKILL)").count(),
        KILLS
    );
    assert!(
        !r.stderr.contains("vmm: console output:"),
        "the VMM saw a gap in the output"
    );
    let s = r.stats("uart16550a");
    assert_eq!(
        (s.timeouts, s.dropped_stores, s.detached_loads),
        (0, 0, 0),
        "{s:?}"
    );
    println!(
        "kills={KILLS} lines={LINES} kept_records={} resumed={}",
        s.kept_records,
        r.stderr.matches("uart16550a]: resumed the state").count()
    );
}

/// The same module and tool against QEMU's own edu devices, with the same
/// guest kernel and initramfs: the driver is written for the device.
#[test]
fn edu_driver_passes_under_qemu() {
    let b = boot(Host::Qemu, "edu-tool");
    let r = with_testbed_retry("qemu-edu", b.host, || run(&b));
    r.assert_exit(0);
    assert!(r.stdout.contains("edu-tool: PASS: 2 device(s)"));
}

/// The same module and tool against our emulator, one per edu device, as
/// vfio-user servers for QEMU's client: with an unmodified QEMU every BAR
/// access is a message over the socket; with QEMU and qemu-patch/, BAR0
/// goes through a KVM user device. `cargo xtask test` names the two QEMUs.
#[test]
fn edu_driver_passes_under_qemu_over_vfio_user() {
    let emulator = repo().join("target/debug/kvm-userdev-emulator");
    for (var, host, label) in [
        ("KVM_USERDEV_QEMU", Host::QemuVfioUser, "qemu-vfio-user"),
        (
            "KVM_USERDEV_QEMU_PATCHED",
            Host::QemuVfioUserUserdev,
            "qemu-vfio-user-userdev",
        ),
    ] {
        let qemu = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("${var} names the QEMU that cargo xtask qemu builds"));
        let logs = std::cell::RefCell::new(String::new());
        let r = with_testbed_retry(label, host, || {
            let dir = std::env::temp_dir().join(format!("{label}.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a directory for the sockets");
            let sockets: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("edu{i}"))).collect();
            let mut servers: Vec<VfioUserServer> = sockets
                .iter()
                .map(|s| VfioUserServer::start(&emulator, s, &[]).expect("start the emulator"))
                .collect();
            let mut b = boot(host, "edu-tool");
            b.qemu = Some(qemu.clone());
            b.vfio_user = sockets;
            let r = run(&b);
            let mut text = String::new();
            for s in &mut servers {
                text.push_str(&s.finish());
            }
            println!("---- {label}: the emulators\n{text}");
            *logs.borrow_mut() = text;
            let _ = std::fs::remove_dir_all(&dir);
            r
        });
        r.assert_exit(0);
        assert!(r.stdout.contains("edu-tool: PASS: 2 device(s)"), "{label}");
        let through_user_device = logs
            .borrow()
            .matches("now served through a KVM user device")
            .count();
        let expected = if host == Host::QemuVfioUserUserdev {
            2
        } else {
            0
        };
        assert_eq!(through_user_device, expected, "{label}");
    }
}
