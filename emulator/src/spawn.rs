//! Starting an emulator in fresh namespaces.
//!
//! `clone3()` puts the child in new mount, PID, IPC and UTS namespaces at
//! once (a process cannot move itself into a new PID namespace) and gives a
//! pidfd, so that killing it later cannot hit a recycled pid. The child
//! joins the VMM's one empty network namespace, is PID 1 of its namespace,
//! dies with the VMM (`PR_SET_PDEATHSIG`, which the sandbox sets again after
//! its credential change cleared it), keeps only the handoff socket
//! (as descriptor 3) and the standard streams, and execs the emulator, which
//! sandboxes itself the rest of the way.
//!
//! The network namespace is shared because tearing one down is the
//! costliest part of an emulator's exit, and on the way of every restart:
//! about 200 ms per restart on the debug kernel under nested TCG. Sharing
//! it gives nothing away: it holds only a loopback device that is down, and
//! an emulator may create no socket (seccomp) and reach no abstract socket
//! (Landlock scoping).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

/// The descriptor the emulator finds its handoff socket at.
pub const SOCKET_FD: i32 = 3;

/// `struct clone_args` (v0, as clone3 takes it).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// The emulators' network namespace, made on first use by a thread that
/// moves itself into a new one and exits; the descriptor keeps it.
fn empty_netns() -> io::Result<i32> {
    static NETNS: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NETNS.get() {
        return Ok(fd.as_raw_fd());
    }
    let made = std::thread::spawn(|| -> io::Result<OwnedFd> {
        // SAFETY: unshare has no memory arguments; it moves only this
        // thread, which ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))??;
    Ok(NETNS.get_or_init(|| made).as_raw_fd())
}

/// A started emulator.
#[derive(Debug)]
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
}

impl Child {
    /// Another handle on the same process.
    pub fn try_clone(&self) -> io::Result<Child> {
        Ok(Child {
            pid: self.pid,
            pidfd: self.pidfd.try_clone()?,
        })
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

/// Says what EPERM means when a namespace is made.
fn needs_root(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            "creating namespaces for the emulator needs root (CAP_SYS_ADMIN)",
        ),
        _ => e,
    }
}

/// Starts `program args...` in fresh namespaces with `socket` as
/// descriptor 3. Needs CAP_SYS_ADMIN (the VMM runs as root in the test VM).
pub fn spawn(program: &Path, args: &[String], socket: &impl AsRawFd) -> io::Result<Child> {
    // Everything the child needs is prepared here: after clone3 it may only
    // make async-signal-safe calls.
    let path = cstring(program.as_os_str())?;
    let mut argv_c = vec![path.clone()];
    for a in args {
        argv_c.push(cstring(OsStr::new(a))?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let socket = socket.as_raw_fd();
    let netns = empty_netns().map_err(needs_root)?;

    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_PIDFD) as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of
    // the address space, and below only makes async-signal-safe calls on
    // data prepared above before it execs or exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(needs_root(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on prepared data; never returns.
        unsafe { exec_child(socket, netns, &path, &argv, &envp) }
    }
    // SAFETY: clone3 stored a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Child {
        pid: pid as i32,
        pidfd,
    })
}

/// The child's side of [`spawn`].
///
/// # Safety
/// Only to be called in the child of a fork-like clone, with `argv` and
/// `envp` null-terminated arrays of valid C strings.
unsafe fn exec_child(
    socket: i32,
    netns: i32,
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    // SAFETY: the caller's contract; each call is async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
            libc::_exit(126);
        }
        if libc::setns(netns, libc::CLONE_NEWNET) < 0 {
            libc::_exit(126);
        }
        if socket == SOCKET_FD {
            // dup2 onto itself would keep close-on-exec set.
            libc::fcntl(SOCKET_FD, libc::F_SETFD, 0);
        } else if libc::dup2(socket, SOCKET_FD) < 0 {
            libc::_exit(126);
        }
        libc::syscall(libc::SYS_close_range, SOCKET_FD as u32 + 1, u32::MAX, 0u32);
        libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(127)
    }
}

/// Sends SIGKILL through the pidfd.
pub fn kill(child: &Child) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with our pidfd and no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            child.pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How an emulator ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signaled(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSYS => "SIGSYS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        _ => "other",
    }
}

/// Waits until `child` has ended or closed the other end of `control`,
/// whichever comes first. A dying process closes its descriptors, the
/// backend fd among them, well before it can be reaped: leaving its
/// namespaces takes a while more, most of a second on a debug kernel.
pub fn wait_closed(child: &Child, control: &impl AsRawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: child.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        // No events asked for: POLLHUP and POLLERR come all the same, and
        // a message the emulator sent stays for whoever reads it.
        libc::pollfd {
            fd: control.as_raw_fd(),
            events: 0,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll reads and writes the two pollfds above, no more.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret > 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits for `pid` (a child of this process) to end.
pub fn wait(pid: i32) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into `status`.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    })
}
