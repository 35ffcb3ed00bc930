//! A child process (a QEMU, in practice) that is killed with SIGKILL and
//! reaped when dropped, gets SIGKILL should this process die first, and is
//! waited for through a pidfd. The benchmark's QEMUs and `cargo xtask vm`'s
//! QEMU run under it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};

pub struct Proc {
    /// "QEMU" or "remote QEMU", for messages.
    role: &'static str,
    child: Child,
    pidfd: OwnedFd,
    /// Set once reaped.
    status: Option<ExitStatus>,
    /// The status, if it exited before we sent it SIGKILL.
    exited_early: Option<ExitStatus>,
    /// Whether we sent it SIGKILL.
    killed: bool,
}

impl Proc {
    /// Starts `cmd`, with the standard streams its caller set up. `inherit`
    /// is a close-on-exec descriptor that the child (only the child) keeps
    /// open across exec, at the same number.
    pub fn spawn(role: &'static str, mut cmd: Command, inherit: Option<RawFd>) -> Result<Proc> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                // The child must not outlive us, whatever ends us.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("parent exited"));
                }
                if let Some(fd) = inherit {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("start {role}"))?;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).with_context(|| format!("pidfd_open for {role}"));
            }
        };
        Ok(Proc {
            role,
            child,
            pidfd,
            status: None,
            exited_early: None,
            killed: false,
        })
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it is, for messages.
    pub fn role(&self) -> &'static str {
        self.role
    }

    /// Its stdout, if the caller piped it and has not taken it yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Its stderr, likewise.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The status, if it exited before we sent it SIGKILL.
    pub fn exited_early(&self) -> Option<ExitStatus> {
        self.exited_early
    }

    /// How it ended so far: its exit status, "killed" or "running".
    pub fn ending(&self) -> String {
        match (self.exited_early, self.status) {
            (Some(status), _) => describe(status),
            (None, Some(_)) => "killed".to_string(),
            (None, None) => "running".to_string(),
        }
    }

    /// Reaps the process if it has exited.
    pub fn try_reap(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("wait for {}", self.role))?
            {
                self.status = Some(status);
                if !self.killed {
                    self.exited_early = Some(status);
                }
            }
        }
        Ok(self.status)
    }

    /// Waits until the process exits (its status) or `deadline` (None).
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            poll_exits(&[self.pidfd.as_fd()], deadline)
                .with_context(|| format!("wait for {}", self.role))?;
        }
    }

    /// Sends SIGKILL, unless the process has exited (or been reaped).
    pub fn send_kill(&mut self) {
        if !self.killed && self.try_reap().ok().flatten().is_none() {
            let _ = self.child.kill();
            self.killed = true;
        }
    }

    /// Kills (SIGKILL) and reaps the process, unless already reaped.
    pub fn kill(&mut self) {
        self.send_kill();
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child's output (a pipe), read by a thread as it comes: what has come
/// so far, or everything once the writers have closed it.
pub struct Collected {
    bytes: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Collected {
    pub fn start(mut from: impl io::Read + Send + 'static) -> Collected {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&bytes);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if let Ok(mut b) = sink.lock() {
                    b.extend_from_slice(&buf[..n]);
                }
            }
        });
        Collected {
            bytes,
            reader: Some(reader),
        }
    }

    /// What has come so far (lossy UTF-8).
    pub fn text(&self) -> String {
        self.bytes
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything, once the writers have closed the pipe.
    pub fn wait(mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.text()
    }
}

/// An exit status in words.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => format!("{status}"),
    }
}

/// Waits until one of `fds` (pidfds) is readable, i.e. its process exited,
/// or until `deadline`. Returns which are readable (all false on timeout).
pub fn poll_exits(fds: &[BorrowedFd], deadline: Instant) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up, so that a wait does not end just before the deadline.
        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        // SAFETY: pollfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 || Instant::now() >= deadline {
            return Ok(pollfds.iter().map(|p| p.revents != 0).collect());
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}
