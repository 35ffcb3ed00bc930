//! The guest's serial console on the VMM's standard streams: output goes
//! straight to stdout, written by whoever serves the UART; input is read
//! from stdin by a thread of the VMM and passed on through a pipe, whose
//! read end the UART's emulator polls. The emulator thus never holds the
//! VMM's stdin, and a terminal on stdin is put into raw mode for as long as
//! the VMM runs, so that keys reach the guest as typed.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::terminal::Terminal;

use crate::device::Console;

/// Standard input as a terminal, without taking std's lock on it (the
/// input thread holds that while it waits for keys).
struct StdinTty;

// SAFETY: descriptor 0 stays open for the life of the process.
unsafe impl Terminal for StdinTty {
    fn tty_fd(&self) -> std::os::fd::RawFd {
        libc::STDIN_FILENO
    }
}

/// Whether stdin is a terminal that [`open`] put into raw mode.
static RAW: AtomicBool = AtomicBool::new(false);

/// A pipe fed from stdin and a duplicate of stdout, for the UART's server.
pub fn open() -> io::Result<Console> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds` on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    let (input, feed) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The emulator polls the read end and must never block on it. The flag
    // is on the pipe's open file, which only the emulator reads.
    set_nonblocking(&input)?;
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    raw_mode();
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || feed_from_stdin(std::fs::File::from(feed)))?;
    Ok(Console { input, output })
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Copies stdin into the pipe until either ends.
fn feed_from_stdin(mut pipe: std::fs::File) {
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if pipe.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Puts a terminal on stdin into raw mode (no echo, no line editing, no
/// signals from keys: ^C goes to the guest).
fn raw_mode() {
    if io::stdin().is_terminal() && StdinTty.set_raw_mode().is_ok() {
        RAW.store(true, Ordering::Relaxed);
    }
}

/// Puts a terminal on stdin back into canonical mode if [`open`] took it
/// out of it.
pub fn restore() {
    if RAW.swap(false, Ordering::Relaxed) {
        let _ = StdinTty.set_canon_mode();
    }
}
