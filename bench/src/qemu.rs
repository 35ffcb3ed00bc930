//! Running the guest payload under QEMU: the device in QEMU's own process, or
//! in a second QEMU process (multi-process QEMU).
//!
//! These are the baselines that kvm-userdev is compared with. Both run inside
//! the patched-kernel VM with `-accel kvm`, boot the payload (a PVH ELF) with
//! `-kernel`, and give it the same machine: `q35`, one vCPU (`-cpu host`),
//! 128 MiB of RAM, nothing but the device under test, a debug console at
//! port 0xe9 (written to a file in a scratch directory) and `isa-debug-exit`
//! at port 0x501 (QEMU then exits with `value << 1 | 1`). The two set-ups
//! differ only in where the device lives:
//!
//! - **In-process** ([`run_in_process`]): `-device edu` or
//!   `-device pci-testdev` in the guest's QEMU. An MMIO access leaves KVM for
//!   QEMU's vCPU thread, which calls the device model directly.
//!
//! - **Multi-process** ([`run_multi_process`]): `pci-testdev` lives in a
//!   second QEMU started with `-machine x-remote` and an `x-remote-object`;
//!   the guest's QEMU has an `x-pci-proxy-dev` in its place. Every
//!   configuration or BAR access (stores included) is a synchronous message
//!   round trip over a UNIX socket between the two. The two ends of a
//!   socketpair are inherited by the processes, each by its own number
//!   (`fd=N`): both ends are created close-on-exec, and only the child that
//!   owns an end clears that flag, after the fork, so no other process
//!   (neither the other QEMU nor anything else this process spawns) holds a
//!   copy that would keep the connection open after one side dies.
//!
//! The proxy needs three things that shape the command lines:
//!
//! - **KVM.** It routes INTx through KVM irqfds; under TCG it crashes.
//! - **fd-backed guest RAM.** The proxy sends the remote the file
//!   descriptors of guest RAM so that the device can do DMA. Anonymous RAM
//!   has none: BAR accesses still work, but the guest's QEMU logs "Unable to
//!   write to socket: Bad file descriptor" at every memory map change. RAM
//!   is therefore a `memory-backend-memfd` with `share=on`, used as the
//!   machine's RAM (`-machine q35,memory-backend=ram`; `-numa
//!   node,memdev=ram` works too). The in-process variants use the same RAM,
//!   so that the guest's QEMU command lines differ only in the device.
//! - **A device the remote can build.** QEMU's `edu` cannot be used there:
//!   its realize needs MSI ("MSI is not supported by interrupt controller"),
//!   which the `x-remote` machine lacks. `pci-testdev` has no interrupt at
//!   all, so the benchmark uses it on both sides.
//!
//! The machine is `q35` with its default firmware (SeaBIOS). `pc` works as
//! well and starts no faster. qboot (`-bios qboot.rom`) would save a few
//! hundred milliseconds per launch, but it neither assigns BARs nor sets up
//! INTx routing and the interrupt line register, which the payloads'
//! interrupt tests rely on.
//!
//! `pci-testdev` (QEMU 10.0.2, hw/misc/pci-testdev.c; checked from a guest):
//! BAR0 is 4 KiB of 32-bit non-prefetchable MMIO, BAR1 256 bytes of port
//! I/O, no interrupt pin. Each starts with the header of the selected test,
//! `{ u8 test; u8 width; u8 pad[2]; u32 offset; u8 data; u8 pad[3];
//! u32 count; char name[]; }`. A byte store of `n` (0..=2) to BAR0 offset 0
//! selects MMIO test `n` (any other value deselects):
//!
//! | n | name | store | handled by (in-process, KVM) |
//! |---|------|-------|------------------------------|
//! | 0 | `mmio-no-eventfd` | byte 0xfa at 0x800 | QEMU (counted in `count`) |
//! | 1 | `mmio-wildcard-eventfd` | any width and value at exactly 0x801 | a KVM ioeventfd of length 0: never reaches QEMU |
//! | 2 | `mmio-datamatch-eventfd` | byte 0xfa at 0x802 | a KVM ioeventfd matching 0xfa |
//!
//! The device only implements byte accesses: QEMU splits a wider load into
//! byte reads (a 4-byte load at 4 returns the u32 offset) and a wider store
//! into byte writes. Loads past the header, and all loads while no test is
//! selected, return 0. Loads have no effect the guest can see (with an
//! eventfd test selected, QEMU also drains that test's eventfd). Through the
//! proxy, tests 1 and 2 are not absorbed by KVM: each store is a round trip
//! to the remote, which matches it against the eventfd there.
//!
//! Every process started here is killed with SIGKILL and reaped before the
//! call returns, whatever happened (a guard does it on every error path); the
//! processes also get SIGKILL should this process die first.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{describe, poll_exits, Collected, Proc};

/// The machine type of every variant (see the module documentation).
pub const MACHINE: &str = "q35";

/// Guest RAM, MiB (the payloads need 64).
pub const RAM_MIB: u32 = 128;

/// The port of the debug console the payload prints to.
pub const DEBUGCON_PORT: u16 = 0xe9;

/// The port of `isa-debug-exit`.
pub const EXIT_PORT: u16 = 0x501;

/// How long the guest's QEMU may take to exit after the remote QEMU did
/// (the remote sees the socket close as soon as the guest's QEMU starts
/// exiting, and may get there first).
const REMOTE_EXIT_GRACE: Duration = Duration::from_secs(2);

/// How much of a QEMU's stderr an error message quotes.
const TAIL_LINES: usize = 20;
const TAIL_BYTES: usize = 4000;

/// The device under test, as QEMU names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// `-device edu`: QEMU's educational device (1234:11e8).
    Edu,
    /// `-device pci-testdev`: QEMU's PCI test device (1b36:0005).
    PciTestdev,
}

impl Device {
    /// The QEMU device type.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Device::Edu => "edu",
            Device::PciTestdev => "pci-testdev",
        }
    }
}

/// What a QEMU run left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Everything the payload wrote to the debug console (port 0xe9).
    pub debugcon: String,
    /// QEMU's stdout and stderr. For a multi-process run, the guest's QEMU
    /// first, then the remote QEMU's after a `--- remote QEMU:` line (if it
    /// wrote anything).
    pub stderr: String,
    /// The value the guest wrote to port 0x501, decoded from QEMU's exit
    /// status (`value << 1 | 1`, so only values up to 127 come through
    /// intact); `None` if QEMU exited with status 0 (the guest shut down or
    /// reset without writing it, for example after a triple fault).
    pub guest_status: Option<u8>,
}

/// The first line of `qemu --version`.
pub fn version(qemu: &Path) -> Result<String> {
    let out = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} --version", qemu.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or("").trim();
    if !out.status.success() || first.is_empty() {
        bail!(
            "{} --version failed ({}):\n{}",
            qemu.display(),
            describe(out.status),
            tail(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok(first.to_string())
}

/// Runs `payload` with `cmdline` on `cpus` vCPUs under plain QEMU with KVM,
/// `device` in the QEMU process, until QEMU exits or `timeout` passes (then
/// QEMU is killed and this is an error).
pub fn run_in_process(
    qemu: &Path,
    payload: &Path,
    cmdline: &str,
    cpus: u32,
    device: Device,
    timeout: Duration,
) -> Result<Output> {
    let scratch = ScratchDir::new()?;
    let mut args = guest_args(payload, cmdline, cpus, &scratch.debugcon());
    args.extend(in_process_device_args(device));
    let mut guest = Qemu::spawn("QEMU", qemu, &args, scratch.file("qemu.log"), None)?;
    let deadline = Instant::now() + timeout;
    let status = match guest.proc.wait_until(deadline)? {
        Some(status) => status,
        None => {
            guest.proc.kill();
            bail!(
                "QEMU timed out after {timeout:?} and was killed\n{}\n{}",
                guest.report(),
                debugcon_report(&scratch)
            );
        }
    };
    let stderr = guest.log();
    let guest_status = guest_status(status, &stderr)
        .map_err(|why| anyhow!("QEMU failed: {why}\n{}", guest.report()))?;
    Ok(Output {
        debugcon: read_lossy(&scratch.debugcon()),
        stderr,
        guest_status,
    })
}

/// Runs `payload` with `cmdline` under multi-process QEMU with KVM:
/// `pci-testdev` in a remote QEMU process, an `x-pci-proxy-dev` for it in
/// the guest's QEMU. Ends when the guest's QEMU exits (the remote is then
/// killed) or `timeout` passes (both are killed and this is an error).
pub fn run_multi_process(
    qemu: &Path,
    payload: &Path,
    cmdline: &str,
    timeout: Duration,
) -> Result<Output> {
    let scratch = ScratchDir::new()?;
    let deadline = Instant::now() + timeout;
    let (guest_end, remote_end) = socketpair()?;

    let mut remote = Qemu::spawn(
        "remote QEMU",
        qemu,
        &remote_args(remote_end.as_raw_fd()),
        scratch.file("remote.log"),
        Some(remote_end.as_raw_fd()),
    )?;
    drop(remote_end);
    let mut args = guest_args(payload, cmdline, 1, &scratch.debugcon());
    args.extend(proxy_device_args(guest_end.as_raw_fd()));
    let mut guest = Qemu::spawn(
        "QEMU",
        qemu,
        &args,
        scratch.file("qemu.log"),
        Some(guest_end.as_raw_fd()),
    )?;
    drop(guest_end);

    let ending = wait_pair(&mut guest, &mut remote, deadline)?;
    // The remote has nothing left to serve once the guest's QEMU is gone.
    // Both get SIGKILL before either is waited for: on a timeout, neither
    // should see the other go first and fill its log with complaints.
    guest.proc.send_kill();
    remote.proc.send_kill();
    guest.proc.kill();
    remote.proc.kill();
    let both = || {
        format!(
            "{}\n{}\n{}",
            guest.report(),
            remote.report(),
            debugcon_report(&scratch)
        )
    };
    let status = match ending {
        PairEnding::Guest(status) => status,
        PairEnding::TimedOut => bail!(
            "multi-process QEMU timed out after {timeout:?}: the guest's QEMU was still \
             running ({}); both were killed\n{}",
            match remote.proc.exited_early() {
                Some(status) => format!("the remote QEMU had exited: {}", describe(status)),
                None => "the remote QEMU was still running too".to_string(),
            },
            both()
        ),
        PairEnding::RemoteDied(status) => bail!(
            "the remote QEMU exited ({}) while the guest's QEMU kept running; \
             the guest's QEMU was killed {REMOTE_EXIT_GRACE:?} later\n{}",
            describe(status),
            both()
        ),
    };
    let stderr = guest.log();
    let guest_status = guest_status(status, &stderr).map_err(|why| {
        anyhow!(
            "QEMU (guest side of multi-process QEMU) failed: {why}\n{}",
            both()
        )
    })?;
    let mut combined = stderr;
    let remote_log = remote.log();
    if !remote_log.trim().is_empty() {
        combined.push_str("--- remote QEMU:\n");
        combined.push_str(&remote_log);
    }
    Ok(Output {
        debugcon: read_lossy(&scratch.debugcon()),
        stderr: combined,
        guest_status,
    })
}

/// QEMU's vfio-user client (QEMU 10.1 or later) with our emulator as the
/// server: what [`run_vfio_user`] needs besides QEMU.
pub struct VfioUser<'a> {
    /// `kvm-userdev-emulator`, started with `--vfio-user SOCKET`.
    pub emulator: &'a Path,
    /// Firmware directories for `-L`: a QEMU built from Debian's source
    /// has no firmware of its own.
    pub firmware: &'a [PathBuf],
    /// More arguments for the emulator (`--forward`, `--batch`).
    pub emulator_args: &'a [&'a str],
    /// QEMU has our patches: it traces the user device's counters at exit
    /// (`vfio_user_kvm_stats`, in [`Output::stderr`]).
    pub patched: bool,
    /// Kill the emulator (SIGKILL) once the guest's debug console shows
    /// this line.
    pub kill_on: Option<&'a str>,
}

/// The firmware directories of Debian's QEMU packages that exist here
/// (SeaBIOS, and the option ROMs such as `pvh.bin` for `-kernel`), for a
/// QEMU built from Debian's source, which ships none.
pub fn debian_firmware() -> Vec<PathBuf> {
    DEBIAN_FIRMWARE_DIRS
        .into_iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect()
}

/// The directories [`debian_firmware`] looks in.
pub const DEBIAN_FIRMWARE_DIRS: [&str; 3] = [
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// How long the emulator may take to create its socket.
const SERVER_START: Duration = Duration::from_secs(10);

/// Runs `payload` with `cmdline` on `cpus` vCPUs under QEMU with KVM, the
/// edu device served by our emulator over vfio-user (`-device
/// vfio-user-pci`). Unpatched, every configuration and BAR access is a
/// message over the socket (a BAR store is posted, a load waits for its
/// reply); patched, BAR0 goes through a KVM user device. QEMU's trace of
/// that device's counters, then the emulator's log after a `--- emulator:`
/// line, follow QEMU's stderr in [`Output::stderr`].
pub fn run_vfio_user(
    qemu: &Path,
    vfio: &VfioUser,
    payload: &Path,
    cmdline: &str,
    cpus: u32,
    timeout: Duration,
) -> Result<Output> {
    let scratch = ScratchDir::new()?;
    let deadline = Instant::now() + timeout;
    let socket = scratch.file("vfio-user.sock");
    let mut server = VfioUserServer::start(vfio.emulator, &socket, vfio.emulator_args)?;
    let mut args: Vec<OsString> = vfio
        .firmware
        .iter()
        .flat_map(|dir| [os("-L"), os(dir)])
        .collect();
    args.extend(guest_args(payload, cmdline, cpus, &scratch.debugcon()));
    args.extend(vfio_user_device_args(&socket));
    let trace = scratch.file("trace.log");
    if vfio.patched {
        // Into a file of its own: QEMU's stderr must hold only errors and
        // warnings (see `guest_status`).
        args.extend([
            os("-trace"),
            os("vfio_user_kvm_stats"),
            os("-D"),
            os(&trace),
        ]);
    }
    let mut guest = Qemu::spawn("QEMU", qemu, &args, scratch.file("qemu.log"), None)?;
    let report = |guest: &Qemu, server: &VfioUserServer| {
        format!(
            "{}\n{}\n{}",
            guest.report(),
            server.report(),
            debugcon_report(&scratch)
        )
    };
    let mut killed = false;
    let status = loop {
        let step = deadline.min(Instant::now() + Duration::from_millis(20));
        if let Some(status) = guest.proc.wait_until(step)? {
            break status;
        }
        if Instant::now() >= deadline {
            guest.proc.kill();
            bail!(
                "QEMU timed out after {timeout:?} and was killed\n{}",
                report(&guest, &server)
            );
        }
        let kill_now = !killed
            && vfio
                .kill_on
                .is_some_and(|line| read_lossy(&scratch.debugcon()).contains(line));
        if kill_now {
            server.kill();
            killed = true;
        }
    };
    server.kill();
    let mut stderr = guest.log();
    // After the kill QEMU reports the server gone, which is no failure of
    // its own (and it started long before: status 1 is the guest's 0).
    let complaints = if killed { "" } else { stderr.as_str() };
    let guest_status = guest_status(status, complaints)
        .map_err(|why| anyhow!("QEMU failed: {why}\n{}", report(&guest, &server)))?;
    stderr.push_str(&read_lossy(&trace));
    stderr.push_str("--- emulator:\n");
    stderr.push_str(&server.finish());
    Ok(Output {
        debugcon: read_lossy(&scratch.debugcon()),
        stderr,
        guest_status,
    })
}

/// Our emulator as a vfio-user server for one device, started and
/// listening; SIGKILLed (and so is its sandboxed copy, by its parent-death
/// signal) when dropped.
pub struct VfioUserServer {
    proc: Proc,
    log: Option<Collected>,
}

impl VfioUserServer {
    /// Starts `emulator --vfio-user socket args...` and waits until it
    /// listens.
    pub fn start(emulator: &Path, socket: &Path, args: &[&str]) -> Result<VfioUserServer> {
        let mut cmd = Command::new(emulator);
        cmd.arg("--vfio-user")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A pipe: the sandbox allows no file writes, so a log file
            // would take none of the emulator's lines.
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn("emulator", cmd, None)?;
        let log = Collected::start(proc.take_stderr().expect("piped"));
        let deadline = Instant::now() + SERVER_START;
        while !socket.exists() {
            if let Some(status) = proc.try_reap()? {
                bail!(
                    "the emulator exited before it listened ({}):\n{}",
                    describe(status),
                    tail(&log.text())
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the emulator made no socket in {SERVER_START:?}:\n{}",
                    tail(&log.text())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(VfioUserServer {
            proc,
            log: Some(log),
        })
    }

    /// SIGKILL, unless it has ended.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Kills it if still running and returns everything it logged.
    pub fn finish(&mut self) -> String {
        self.proc.kill();
        self.log.take().map(Collected::wait).unwrap_or_default()
    }

    /// How it ended and its last lines, for an error message.
    fn report(&self) -> String {
        let text = self.log.as_ref().map(Collected::text).unwrap_or_default();
        format!(
            "--- emulator ({}), last lines:\n{}",
            self.proc.ending(),
            tail(&text)
        )
    }
}

// ---------------------------------------------------------------------------
// Command lines.

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// Escapes a value for QEMU's `key=value,...` option syntax: a comma is
/// written as two.
fn opt_escape(value: &OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The guest's QEMU without its device: everything the variants share.
fn guest_args(payload: &Path, cmdline: &str, cpus: u32, debugcon: &Path) -> Vec<OsString> {
    let mut chardev = os("file,id=debugcon,path=");
    chardev.push(opt_escape(debugcon.as_os_str()));
    vec![
        os("-nodefaults"),
        os("-no-user-config"),
        os("-machine"),
        os(format!("{MACHINE},memory-backend=ram")),
        os("-accel"),
        os("kvm"),
        os("-cpu"),
        os("host"),
        os("-smp"),
        os(cpus.to_string()),
        os("-m"),
        os(format!("{RAM_MIB}M")),
        os("-object"),
        os(format!(
            "memory-backend-memfd,id=ram,size={RAM_MIB}M,share=on"
        )),
        os("-display"),
        os("none"),
        os("-serial"),
        os("none"),
        os("-monitor"),
        os("none"),
        os("-no-reboot"),
        os("-kernel"),
        os(payload),
        os("-append"),
        os(cmdline),
        os("-chardev"),
        chardev,
        os("-device"),
        os(format!(
            "isa-debugcon,iobase={DEBUGCON_PORT:#x},chardev=debugcon"
        )),
        os("-device"),
        os(format!("isa-debug-exit,iobase={EXIT_PORT:#x},iosize=2")),
    ]
}

fn in_process_device_args(device: Device) -> Vec<OsString> {
    vec![os("-device"), os(device.qemu_name())]
}

/// `-device` for QEMU's vfio-user client of the server at `socket`: its
/// `socket` is a SocketAddress, which only the JSON form can give.
pub fn vfio_user_device(socket: &Path) -> String {
    serde_json::json!({
        "driver": "vfio-user-pci",
        "socket": { "type": "unix", "path": socket.to_string_lossy() },
    })
    .to_string()
}

fn vfio_user_device_args(socket: &Path) -> Vec<OsString> {
    vec![os("-device"), os(vfio_user_device(socket))]
}

fn proxy_device_args(fd: RawFd) -> Vec<OsString> {
    vec![
        os("-device"),
        os(format!("x-pci-proxy-dev,id=proxy,fd={fd}")),
    ]
}

/// The remote QEMU: pci-testdev served over the socket at `fd`.
fn remote_args(fd: RawFd) -> Vec<OsString> {
    vec![
        os("-nodefaults"),
        os("-no-user-config"),
        os("-machine"),
        os("x-remote,vfio-user=off"),
        os("-display"),
        os("none"),
        os("-serial"),
        os("none"),
        os("-monitor"),
        os("none"),
        os("-device"),
        os("pci-testdev,id=testdev"),
        os("-object"),
        os(format!("x-remote-object,id=remote,devid=testdev,fd={fd}")),
    ]
}

/// A command line as a shell would show it, for error messages.
fn show_command(qemu: &Path, args: &[OsString]) -> String {
    let mut s = qemu.display().to_string();
    for a in args {
        let a = a.to_string_lossy();
        s.push(' ');
        if !a.is_empty()
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/+@%".contains(&b))
        {
            s.push_str(&a);
        } else {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Exit statuses and messages.

/// The status the guest wrote to `isa-debug-exit`, from QEMU's exit status,
/// or why QEMU itself failed.
///
/// Exit status 1 is ambiguous: QEMU also exits with 1 when it fails (bad
/// option, payload it cannot load, device it cannot create), and then it
/// says why on stderr, in a line prefixed with its name or with `qemu:`.
/// Status 1 therefore counts as the guest's 0 only if QEMU printed nothing
/// but warnings.
fn guest_status(status: ExitStatus, stderr: &str) -> Result<Option<u8>, String> {
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => return Err(format!("killed by signal {signal}")),
        _ => return Err(format!("{status}")),
    };
    match code {
        0 => Ok(None),
        1 => match qemu_error(stderr) {
            Some(line) => Err(format!("exit status 1 after printing: {line}")),
            None => Ok(Some(0)),
        },
        code if code & 1 == 1 && (0..=255).contains(&code) => Ok(Some((code >> 1) as u8)),
        code => Err(format!("exit status {code}")),
    }
}

/// The first line of `stderr` that is not empty and not a warning.
fn qemu_error(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.contains("warning:"))
}

/// The last lines of `text` (at most TAIL_LINES lines and about TAIL_BYTES
/// bytes).
pub(crate) fn tail(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        return "(nothing)".to_string();
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut start = lines.len().saturating_sub(TAIL_LINES);
    while start + 1 < lines.len()
        && lines[start..].iter().map(|l| l.len() + 1).sum::<usize>() > TAIL_BYTES
    {
        start += 1;
    }
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines]\n"));
    }
    let last = lines[start..].join("\n");
    if last.len() > TAIL_BYTES {
        let mut cut = last.len() - TAIL_BYTES;
        while !last.is_char_boundary(cut) {
            cut += 1;
        }
        out.push_str("[...]");
        out.push_str(&last[cut..]);
    } else {
        out.push_str(&last);
    }
    out
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn debugcon_report(scratch: &ScratchDir) -> String {
    format!(
        "--- guest debug console, last lines:\n{}",
        tail(&read_lossy(&scratch.debugcon()))
    )
}

// ---------------------------------------------------------------------------
// Processes.

/// A directory for one run's files, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("kvm-userdev-qemu.{}.{n}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(ScratchDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("create {}", dir.display()));
                }
            }
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn debugcon(&self) -> PathBuf {
        self.file("debugcon")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A UNIX stream socketpair, both ends close-on-exec (as std makes them).
fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let (a, b) = UnixStream::pair().context("socketpair for multi-process QEMU")?;
    Ok((above_stdio(a.into())?, above_stdio(b.into())?))
}

/// `fd`, moved to a number above 2 if it is not: the child's stdin, stdout
/// and stderr are set up before it can clear close-on-exec, and would
/// replace a socket there (possible only if this process runs with one of
/// them closed).
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error()).context("move a socket above fd 2");
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A QEMU process (killed and reaped when dropped) and its log.
struct Qemu {
    proc: Proc,
    command: String,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Qemu {
    /// Starts `qemu args...` with stdin from /dev/null and stdout and stderr
    /// into `log`; `inherit` as for [`Proc::spawn`].
    fn spawn(
        role: &'static str,
        qemu: &Path,
        args: &[OsString],
        log: PathBuf,
        inherit: Option<RawFd>,
    ) -> Result<Qemu> {
        let command = show_command(qemu, args);
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(qemu);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let proc = Proc::spawn(role, cmd, inherit).with_context(|| command.clone())?;
        Ok(Qemu { proc, command, log })
    }

    /// Its output so far.
    fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// How it ended and what it wrote, for an error message.
    fn report(&self) -> String {
        format!(
            "--- {} ({}): {}\n--- its stderr, last lines:\n{}",
            self.proc.role(),
            self.proc.ending(),
            self.command,
            tail(&self.log())
        )
    }
}

enum PairEnding {
    /// The guest's QEMU exited.
    Guest(ExitStatus),
    /// The remote QEMU exited and the guest's QEMU did not follow in time.
    RemoteDied(ExitStatus),
    TimedOut,
}

/// Waits for the guest's QEMU to exit, watching the remote meanwhile.
fn wait_pair(guest: &mut Qemu, remote: &mut Qemu, deadline: Instant) -> Result<PairEnding> {
    loop {
        if let Some(status) = guest.proc.try_reap()? {
            return Ok(PairEnding::Guest(status));
        }
        if let Some(remote_status) = remote.proc.try_reap()? {
            // The remote may just have seen the guest's QEMU close the socket
            // on its way out: give it a moment.
            let grace = deadline.min(Instant::now() + REMOTE_EXIT_GRACE);
            return Ok(match guest.proc.wait_until(grace)? {
                Some(status) => PairEnding::Guest(status),
                None if grace == deadline => PairEnding::TimedOut,
                None => PairEnding::RemoteDied(remote_status),
            });
        }
        if Instant::now() >= deadline {
            return Ok(PairEnding::TimedOut);
        }
        poll_exits(&[guest.proc.pidfd(), remote.proc.pidfd()], deadline)
            .context("wait for multi-process QEMU")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn guest_status_decoding() {
        assert_eq!(guest_status(exited(1), ""), Ok(Some(0)));
        assert_eq!(guest_status(exited(3), ""), Ok(Some(1)));
        assert_eq!(guest_status(exited(255), ""), Ok(Some(127)));
        assert_eq!(guest_status(exited(0), ""), Ok(None));
        assert!(guest_status(exited(2), "").is_err());
        assert!(guest_status(ExitStatus::from_raw(libc::SIGKILL), "").is_err());
        // Warnings do not make exit status 1 a failure; errors do.
        let warning = "qemu-system-x86_64: warning: host doesn't support requested feature\n";
        assert_eq!(guest_status(exited(1), warning), Ok(Some(0)));
        let error = "qemu-system-x86_64: -device foo: 'foo' is not a valid device model name\n";
        assert!(guest_status(exited(1), error)
            .unwrap_err()
            .contains("is not a valid device"));
        // Seen with QEMU 10.0.2 for a payload path that does not exist.
        let error = "qemu: could not open kernel file '/x': No such file or directory\n";
        assert!(guest_status(exited(1), error).is_err());
        // Statuses other than 1 are the guest's, whatever QEMU printed.
        assert_eq!(guest_status(exited(3), error), Ok(Some(1)));
    }

    #[test]
    fn escapes_commas() {
        assert_eq!(opt_escape(OsStr::new("/tmp/a,b,,c")), "/tmp/a,,b,,,,c");
        assert_eq!(opt_escape(OsStr::new("/tmp/x")), "/tmp/x");
    }

    #[test]
    fn guest_command_line() {
        let args = strings(&guest_args(
            Path::new("/p/edu-test"),
            "mode=full devices=1",
            2,
            Path::new("/t/a,b/debugcon"),
        ));
        let joined = args.join(" ");
        for needle in [
            "-nodefaults",
            "-machine q35,memory-backend=ram",
            "-accel kvm",
            "-cpu host",
            "-smp 2",
            "-m 128M",
            "-object memory-backend-memfd,id=ram,size=128M,share=on",
            "-display none",
            "-no-reboot",
            "-kernel /p/edu-test",
            "-chardev file,id=debugcon,path=/t/a,,b/debugcon",
            "-device isa-debugcon,iobase=0xe9,chardev=debugcon",
            "-device isa-debug-exit,iobase=0x501,iosize=2",
        ] {
            assert!(joined.contains(needle), "{needle:?} missing in {joined}");
        }
        // The command line stays one argument, spaces and all.
        let i = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[i + 1], "mode=full devices=1");
        assert_eq!(
            strings(&in_process_device_args(Device::PciTestdev)),
            ["-device", "pci-testdev"]
        );
        assert_eq!(
            strings(&in_process_device_args(Device::Edu)),
            ["-device", "edu"]
        );
        assert_eq!(
            strings(&proxy_device_args(7)),
            ["-device", "x-pci-proxy-dev,id=proxy,fd=7"]
        );
    }

    #[test]
    fn remote_command_line() {
        let joined = strings(&remote_args(9)).join(" ");
        assert!(joined.contains("-machine x-remote,vfio-user=off"));
        assert!(joined.contains("-device pci-testdev,id=testdev"));
        assert!(joined.contains("-object x-remote-object,id=remote,devid=testdev,fd=9"));
    }

    #[test]
    fn shows_commands_for_a_shell() {
        let args = [os("-append"), os("a b"), os("it's"), os("")];
        assert_eq!(
            show_command(Path::new("/q"), &args),
            r"/q -append 'a b' 'it'\''s' ''"
        );
    }

    #[test]
    fn tails() {
        assert_eq!(tail(""), "(nothing)");
        assert_eq!(tail("a\nb\n"), "a\nb");
        let many: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let t = tail(&many);
        assert!(t.starts_with("[... 10 earlier lines]\nline 10\n"));
        assert!(t.ends_with("line 29"));
        let long = "x".repeat(3 * TAIL_BYTES);
        assert!(tail(&long).len() <= TAIL_BYTES + 10);
    }

    /// Shell code for the fake guest's QEMU: wait until the fake remote has
    /// done its part (so that killing it cannot cut that short).
    const WAIT_FOR_REMOTE: &str = "while [ ! -e \"$d/remote.ready\" ]; do sleep 0.01; done";

    /// A stand-in for QEMU: a shell script that records its pid, then acts
    /// as told by the file `mode` beside it.
    struct FakeQemu {
        dir: ScratchDir,
    }

    impl FakeQemu {
        fn new(guest: &str, remote: &str) -> FakeQemu {
            use std::os::unix::fs::PermissionsExt;
            let dir = ScratchDir::new().unwrap();
            let script = format!(
                "#!/bin/sh\n\
                 d=$(dirname \"$0\")\n\
                 case \"$*\" in\n\
                 *x-remote*) echo $$ > \"$d/remote.pid\"; {remote} ;;\n\
                 *) echo $$ > \"$d/guest.pid\"; {guest} ;;\n\
                 esac\n"
            );
            let path = dir.file("qemu");
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            FakeQemu { dir }
        }

        fn path(&self) -> PathBuf {
            self.dir.file("qemu")
        }

        /// Asserts that the process that wrote `name` is gone (reaped, not
        /// a zombie).
        fn assert_gone(&self, name: &str) {
            let pid = fs::read_to_string(self.dir.file(name)).unwrap();
            let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
            assert!(
                !proc_dir.exists(),
                "{name}: {} still exists",
                proc_dir.display()
            );
        }
    }

    #[test]
    fn fake_in_process_status_and_timeout() {
        let fake = FakeQemu::new("echo hello >&2; exit 5", "exit 9");
        let out = run_in_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            1,
            Device::Edu,
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.guest_status, Some(2));
        assert_eq!(out.stderr, "hello\n");
        fake.assert_gone("guest.pid");

        let fake = FakeQemu::new("echo stuck >&2; exec sleep 1000", "exit 9");
        let started = Instant::now();
        let err = run_in_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            1,
            Device::Edu,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.contains("QEMU timed out"), "{err}");
        assert!(err.contains("stuck"), "{err}");
        fake.assert_gone("guest.pid");
    }

    #[test]
    fn fake_multi_process_reaps_both() {
        // The guest finishes; the remote would run forever.
        let fake = FakeQemu::new(
            &format!("{WAIT_FOR_REMOTE}; exit 1"),
            "echo serving >&2; touch \"$d/remote.ready\"; exec sleep 1000",
        );
        let out = run_multi_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.guest_status, Some(0));
        assert!(
            out.stderr.contains("--- remote QEMU:\nserving\n"),
            "{out:?}"
        );
        fake.assert_gone("guest.pid");
        fake.assert_gone("remote.pid");

        // Both hang.
        let fake = FakeQemu::new(
            &format!("{WAIT_FOR_REMOTE}; exec sleep 1000"),
            "touch \"$d/remote.ready\"; exec sleep 1000",
        );
        let err = run_multi_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(err.contains("remote QEMU was still running"), "{err}");
        fake.assert_gone("guest.pid");
        fake.assert_gone("remote.pid");

        // The remote dies at once; the guest's QEMU hangs.
        let fake = FakeQemu::new("exec sleep 1000", "echo broken >&2; exit 1");
        let err = run_multi_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            Duration::from_secs(30),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("remote QEMU exited (exit status 1)"), "{err}");
        assert!(err.contains("broken"), "{err}");
        fake.assert_gone("guest.pid");
        fake.assert_gone("remote.pid");
    }

    #[test]
    fn fake_multi_process_inherits_only_its_end() {
        // Each process has its own fd=N open, and no other socket.
        let check = |me: &str| {
            format!(
                "fd=$(echo \"$*\" | sed -n 's/.*fd=\\([0-9]*\\).*/\\1/p'); \
                 if [ -S /proc/$$/fd/$fd ]; then echo ok; else echo missing; fi > \"$d/{me}\"; \
                 ls -l /proc/$$/fd | grep -c socket >> \"$d/{me}\""
            )
        };
        let fake = FakeQemu::new(
            &format!("{}; {WAIT_FOR_REMOTE}; exit 1", check("guest")),
            &format!(
                "{}; touch \"$d/remote.ready\"; exec sleep 1000",
                check("remote")
            ),
        );
        let out = run_multi_process(
            &fake.path(),
            Path::new("/payload"),
            "",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.guest_status, Some(0));
        for me in ["guest", "remote"] {
            let seen = fs::read_to_string(fake.dir.file(me)).unwrap();
            assert_eq!(seen, "ok\n1\n", "{me}");
        }
        fake.assert_gone("guest.pid");
        fake.assert_gone("remote.pid");
    }
}
