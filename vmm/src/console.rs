//! The guest's serial console on the VMM's standard streams. Output comes
//! from whoever serves the UART as messages on a `SOCK_SEQPACKET` socket,
//! each with the stream offset of its bytes ([`emulator::console`]); a
//! thread of the VMM writes each offset to stdout once, so that an
//! emulator's successor may send again what it is not sure went out.
//! Input is read from stdin by another thread and passed on through a
//! pipe, whose read end the UART's emulator polls. The emulator thus never
//! holds the VMM's stdin or stdout, and a terminal on stdin is put into
//! raw mode for as long as the VMM runs, so that keys reach the guest as
//! typed.

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use emulator::console::{Dedup, MAX_CHUNK};
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

/// The VMM's end of the console output.
pub struct Output {
    socket: UnixDatagram,
    /// Held while messages are taken from the socket and written, so that
    /// the thread and [`flush`] write them in order.
    dedup: Mutex<Dedup>,
}

impl Output {
    /// The stream offset of the next byte to write: where an emulator
    /// without a state to resume from goes on.
    pub fn offset(&self) -> u64 {
        self.dedup.lock().expect("console lock").next()
    }

    /// Writes what the socket holds now, without waiting for more.
    fn pump(&self) {
        let mut dedup = self.dedup.lock().expect("console lock");
        let mut buf = vec![0; MAX_CHUNK + 8];
        let mut out = io::stdout().lock();
        // Only an empty socket (or our own end gone) stops this.
        while let Ok(n) = self.socket.recv(&mut buf) {
            // A closed stdout loses the output, and nothing else.
            let _ = out.write_all(dedup.accept(&buf[..n]));
        }
        let _ = out.flush();
    }

    /// Waits until the socket has a message.
    fn wait(&self) -> io::Result<()> {
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: poll reads and writes the one pollfd above.
            if unsafe { libc::poll(&mut fd, 1, -1) } >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The console output, once [`open`] made it.
static OUTPUT: OnceLock<Arc<Output>> = OnceLock::new();

/// Writes the console output that has come and is not written yet: at the
/// end, once the emulators have consumed the guest's last accesses.
/// Says so if bytes never came.
pub fn flush() {
    if let Some(output) = OUTPUT.get() {
        output.pump();
        let d = output.dedup.lock().expect("console lock");
        if d.lost > 0 || d.malformed > 0 {
            emulator::log!(
                "vmm: console output: {} bytes lost, {} malformed messages",
                d.lost,
                d.malformed
            );
        }
    }
}

/// A pipe fed from stdin, and a socket whose messages reach stdout, for
/// the UART's server. There is one console.
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
    let (ours, theirs) = emulator::handoff::socketpair()?;
    ours.set_nonblocking(true)?;
    let stream = Arc::new(Output {
        socket: ours,
        dedup: Mutex::default(),
    });
    if OUTPUT.set(stream.clone()).is_err() {
        return Err(io::Error::other("a second console"));
    }
    raw_mode();
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || feed_from_stdin(std::fs::File::from(feed)))?;
    let writer = stream.clone();
    std::thread::Builder::new()
        .name("console-output".into())
        .spawn(move || {
            while writer.wait().is_ok() {
                writer.pump();
            }
        })?;
    Ok(Console {
        input,
        output: theirs.into(),
        stream,
    })
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
