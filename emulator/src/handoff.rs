//! What the VMM hands an emulator at start, and tells it later.
//!
//! One `SOCK_SEQPACKET` pair per emulator: the VMM sends one setup message
//! with the descriptors attached (`SCM_RIGHTS`, in the order of
//! [`SetupFds`]), then control messages
//! (the guest enabled or disabled MSI). Messages are short text, one
//! `key value...` per line, so that a trace of the socket reads plainly.
//! The emulator takes them from its VMM, which it trusts; what it does not
//! trust is the guest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAGIC: &str = "kvm-userdev-setup 1";
const MAX_MESSAGE: usize = 4096;
/// Backend, memory, INTx pair, ISA irqfd, MSI vectors, console pair, state
/// region.
pub const MAX_FDS: usize = 2 + 2 + 1 + MAX_MSI_VECTORS + 2 + 1;
pub const MAX_MSI_VECTORS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("handoff socket: {0}")]
    Io(#[from] io::Error),
    #[error("the VMM closed the handoff socket before the setup")]
    Closed,
    #[error("bad setup message: {0}")]
    Bad(String),
}

/// A piece of guest RAM in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The setup message, without its descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// Which device model to run (`edu`, `uart16550a`).
    pub model: String,
    pub memory: Vec<MemRegion>,
    /// INTx irqfd and its resample fd are attached.
    pub intx: bool,
    /// An ISA interrupt's irqfd is attached: edge semantics, one write per
    /// rising edge of the device's interrupt output.
    pub isa_irq: bool,
    /// MSI irqfds attached, one per vector.
    pub msi_vectors: u32,
    /// Whether the guest has MSI enabled right now.
    pub msi_enabled: bool,
    /// Publish registers in the shadow image (off: every load is forwarded).
    pub shadow: bool,
    /// BAR0 offsets left out of the access map even if the model could
    /// publish them (for measuring forwarded loads).
    pub forward: Vec<u64>,
    /// BAR0 offsets of 4-byte registers whose stores are batched, besides
    /// the model's own (for measuring batched stores).
    pub batch: Vec<u64>,
    /// How guest accesses arrive.
    pub transport: Transport,
    /// Console input (a non-blocking readable fd, a pipe the VMM feeds) and
    /// console output (a `SOCK_SEQPACKET` socket, [`crate::console`]) are
    /// attached, the output stream going on at this offset (what the VMM
    /// has of it: an emulator that finds no state to resume from goes on
    /// there).
    pub console: Option<u64>,
    /// A state region of this many bytes is attached
    /// ([`crate::state`]): the device's state, kept across its emulators.
    pub state_region: Option<u64>,
}

/// How guest accesses reach the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The user device's ring, through the backend fd.
    Ring,
    /// Messages from a VMM that takes the exits itself ([`crate::wire`]).
    Socket,
}

/// The descriptors of a setup, in the order they travel.
#[derive(Debug)]
pub struct SetupFds {
    /// The backend fd, or with [`Transport::Socket`] the access socket.
    pub accesses: OwnedFd,
    pub memory: OwnedFd,
    /// (irqfd, resample fd)
    pub intx: Option<(OwnedFd, OwnedFd)>,
    /// The ISA interrupt's irqfd.
    pub isa_irq: Option<OwnedFd>,
    pub msi: Vec<OwnedFd>,
    /// (console input, console output)
    pub console: Option<(OwnedFd, OwnedFd)>,
    /// The state region's memfd.
    pub state_region: Option<OwnedFd>,
}

/// A message after the setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    MsiEnabled(bool),
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec), as `UnixDatagram`s:
/// std has no seqpacket type, and send/recv behave the same on it.
pub fn socketpair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into `fds` on success.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    })
}

fn flag(b: bool) -> u8 {
    b.into()
}

impl Setup {
    pub fn encode(&self) -> String {
        let mut s = format!("{MAGIC}\nmodel {}\n", self.model);
        for m in &self.memory {
            s += &format!(
                "memory {:#x} {:#x} {:#x}\n",
                m.guest_addr, m.len, m.file_offset
            );
        }
        s += &format!(
            "intx {}\nisa-irq {}\nmsi-vectors {}\nmsi-enabled {}\nshadow {}\n",
            flag(self.intx),
            flag(self.isa_irq),
            self.msi_vectors,
            flag(self.msi_enabled),
            flag(self.shadow),
        );
        if let Some(offset) = self.console {
            s += &format!("console {offset:#x}\n");
        }
        for f in &self.forward {
            s += &format!("forward {f:#x}\n");
        }
        for b in &self.batch {
            s += &format!("batch {b:#x}\n");
        }
        s += match self.transport {
            Transport::Ring => "transport ring\n",
            Transport::Socket => "transport socket\n",
        };
        if let Some(len) = self.state_region {
            s += &format!("state-region {len:#x}\n");
        }
        s
    }

    pub fn decode(text: &str) -> Result<Self, HandoffError> {
        let bad = |what: &str| HandoffError::Bad(what.to_string());
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(bad("not a kvm-userdev setup (version 1)"));
        }
        let mut setup = Setup {
            model: String::new(),
            memory: Vec::new(),
            intx: false,
            isa_irq: false,
            msi_vectors: 0,
            msi_enabled: false,
            shadow: true,
            forward: Vec::new(),
            batch: Vec::new(),
            transport: Transport::Ring,
            console: None,
            state_region: None,
        };
        for line in lines {
            let mut w = line.split_whitespace();
            let key = w.next().unwrap_or("");
            let args: Vec<&str> = w.collect();
            let num = |i: usize| -> Result<u64, HandoffError> {
                let a = args.get(i).ok_or_else(|| bad(line))?;
                parse_u64(a).ok_or_else(|| bad(line))
            };
            let one = || -> Result<bool, HandoffError> {
                match args.as_slice() {
                    ["0"] => Ok(false),
                    ["1"] => Ok(true),
                    _ => Err(bad(line)),
                }
            };
            match key {
                "model" if args.len() == 1 => setup.model = args[0].to_string(),
                "memory" if args.len() == 3 => setup.memory.push(MemRegion {
                    guest_addr: num(0)?,
                    len: num(1)?,
                    file_offset: num(2)?,
                }),
                "intx" => setup.intx = one()?,
                "isa-irq" => setup.isa_irq = one()?,
                "console" if args.len() == 1 => setup.console = Some(num(0)?),
                "msi-vectors" if args.len() == 1 => {
                    setup.msi_vectors = u32::try_from(num(0)?)
                        .ok()
                        .filter(|&n| n as usize <= MAX_MSI_VECTORS)
                        .ok_or_else(|| bad(line))?
                }
                "msi-enabled" => setup.msi_enabled = one()?,
                "shadow" => setup.shadow = one()?,
                "forward" if args.len() == 1 => setup.forward.push(num(0)?),
                "batch" if args.len() == 1 => setup.batch.push(num(0)?),
                "transport" => {
                    setup.transport = match args.as_slice() {
                        ["ring"] => Transport::Ring,
                        ["socket"] => Transport::Socket,
                        _ => return Err(bad(line)),
                    }
                }
                "state-region" if args.len() == 1 => setup.state_region = Some(num(0)?),
                "" => {}
                _ => return Err(bad(line)),
            }
        }
        if setup.model.is_empty() || setup.memory.is_empty() {
            return Err(bad("no model or no memory"));
        }
        Ok(setup)
    }

    /// How many descriptors travel with this setup.
    pub fn fd_count(&self) -> usize {
        2 + if self.intx { 2 } else { 0 }
            + usize::from(self.isa_irq)
            + self.msi_vectors as usize
            + if self.console.is_some() { 2 } else { 0 }
            + usize::from(self.state_region.is_some())
    }
}

/// A number in decimal or, with `0x`, in hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Sends the setup with its descriptors: backend (or access socket), memory,
/// [INTx irqfd, resample fd,] [ISA irqfd,] MSI irqfds, [console input,
/// console output,] [state region].
pub fn send_setup(
    sock: &UnixDatagram,
    setup: &Setup,
    fds: &[&dyn AsRawFd],
) -> Result<(), HandoffError> {
    let text = setup.encode();
    if fds.len() != setup.fd_count() || text.len() > MAX_MESSAGE {
        return Err(HandoffError::Bad(format!(
            "{} descriptors for a setup that needs {}",
            fds.len(),
            setup.fd_count()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    sock.send_with_fds(&[text.as_bytes()], &raw)
        .map_err(io::Error::from)?;
    Ok(())
}

/// What the emulator sends on the handoff socket once it serves the device:
/// sandboxed, its shadow image and access map in place.
pub const READY: &[u8] = b"ready";
/// What the emulator sends first, once it is loaded and waits for its
/// setup: a VMM may start it ahead of need and know when it is.
pub const WAITING: &[u8] = b"waiting";

/// Tells the VMM that the device is served ([`READY`]).
pub fn send_ready(sock: &UnixDatagram) -> io::Result<()> {
    sock.send(READY).map(drop)
}

/// Tells the VMM that the emulator waits for its setup ([`WAITING`]).
pub fn send_waiting(sock: &UnixDatagram) -> io::Result<()> {
    sock.send(WAITING).map(drop)
}

/// Waits up to `timeout` for the emulator's [`READY`]. An error if it
/// closed its end first (it died) or sent something else.
pub fn wait_ready(sock: &UnixDatagram, timeout: Duration) -> io::Result<()> {
    wait_for(sock, READY, timeout)
}

/// Waits up to `timeout` for the emulator's [`WAITING`], as
/// [`wait_ready`] does for [`READY`].
pub fn wait_waiting(sock: &UnixDatagram, timeout: Duration) -> io::Result<()> {
    wait_for(sock, WAITING, timeout)
}

fn wait_for(sock: &UnixDatagram, message: &[u8], timeout: Duration) -> io::Result<()> {
    let mut buf = [0u8; 16];
    sock.set_read_timeout(Some(timeout))?;
    let len = sock.recv(&mut buf);
    sock.set_read_timeout(None)?;
    match len? {
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the emulator closed its end",
        )),
        n if &buf[..n] == message => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the emulator sent something else",
        )),
    }
}

/// Receives the setup (blocking) and takes ownership of its descriptors.
pub fn recv_setup(sock: &UnixDatagram) -> Result<(Setup, SetupFds), HandoffError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which may take any bytes.
    let (len, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
    // SAFETY: the first `nfds` entries are descriptors the kernel just
    // installed for us; nothing else owns them.
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if len == 0 && nfds == 0 {
        return Err(HandoffError::Closed);
    }
    let text =
        std::str::from_utf8(&buf[..len]).map_err(|_| HandoffError::Bad("not UTF-8".into()))?;
    let setup = Setup::decode(text)?;
    if fds.len() != setup.fd_count() {
        return Err(HandoffError::Bad(format!(
            "{} descriptors for a setup that needs {}",
            fds.len(),
            setup.fd_count()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted");
    let accesses = next();
    let memory = next();
    let intx = setup.intx.then(|| (next(), next()));
    let isa_irq = setup.isa_irq.then(&mut next);
    let msi = (0..setup.msi_vectors).map(|_| next()).collect();
    let console = setup.console.map(|_| (next(), next()));
    let state_region = setup.state_region.is_some().then(&mut next);
    Ok((
        setup,
        SetupFds {
            accesses,
            memory,
            intx,
            isa_irq,
            msi,
            console,
            state_region,
        },
    ))
}

impl Control {
    pub fn encode(&self) -> String {
        match self {
            Control::MsiEnabled(on) => format!("msi-enabled {}", flag(*on)),
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        match text.trim() {
            "msi-enabled 0" => Some(Control::MsiEnabled(false)),
            "msi-enabled 1" => Some(Control::MsiEnabled(true)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    fn setup() -> Setup {
        Setup {
            model: "edu".into(),
            memory: vec![MemRegion {
                guest_addr: 0,
                len: 0x1000_0000,
                file_offset: 0,
            }],
            intx: true,
            isa_irq: false,
            msi_vectors: 1,
            msi_enabled: false,
            shadow: true,
            forward: vec![0x20],
            batch: vec![0x10],
            transport: Transport::Ring,
            console: None,
            state_region: Some(0x10000),
        }
    }

    /// A UART's setup: ISA interrupt and console, no PCI interrupts.
    fn uart_setup() -> Setup {
        Setup {
            model: "uart16550a".into(),
            intx: false,
            isa_irq: true,
            msi_vectors: 0,
            forward: vec![],
            console: Some(0x1234),
            ..setup()
        }
    }

    #[test]
    fn setup_round_trip() {
        let s = setup();
        assert_eq!(Setup::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.fd_count(), 6);
        let s = Setup {
            state_region: None,
            ..s
        };
        assert_eq!(Setup::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.fd_count(), 5);
        let s = Setup {
            transport: Transport::Socket,
            ..s
        };
        assert_eq!(Setup::decode(&s.encode()).unwrap(), s);
        let s = uart_setup();
        assert_eq!(Setup::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.fd_count(), 6);
        let all = Setup {
            intx: true,
            msi_vectors: MAX_MSI_VECTORS as u32,
            ..uart_setup()
        };
        assert_eq!(all.fd_count(), MAX_FDS);
    }

    #[test]
    fn bad_setups_refused() {
        for text in [
            "",
            "kvm-userdev-setup 2\nmodel edu\nmemory 0 1 0\n",
            "kvm-userdev-setup 1\nmodel edu\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 x 0\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nintx 2\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nmsi-vectors 33\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nwhat 1\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\ntransport pigeon\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nisa-irq yes\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nconsole 1 1\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nstate-region\n",
            "kvm-userdev-setup 1\nmodel edu\nmemory 0 1 0\nstate-region big\n",
        ] {
            assert!(Setup::decode(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn control_round_trip() {
        for c in [Control::MsiEnabled(true), Control::MsiEnabled(false)] {
            assert_eq!(Control::decode(&c.encode()), Some(c));
        }
        assert_eq!(Control::decode("msi-enabled"), None);
    }

    // Descriptors arrive in order and owned; the count is checked.
    #[test]
    fn descriptors_travel() {
        let (a, b) = socketpair().unwrap();
        let files: Vec<std::fs::File> = (0..6)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let fds: Vec<&dyn AsRawFd> = files.iter().map(|f| f as &dyn AsRawFd).collect();
        send_setup(&a, &setup(), &fds).unwrap();
        let (s, got) = recv_setup(&b).unwrap();
        assert_eq!(s, setup());
        assert!(got.intx.is_some());
        assert_eq!(got.msi.len(), 1);
        assert!(got.state_region.is_some());
        assert!(send_setup(&a, &setup(), &fds[..5]).is_err());

        // Each descriptor lands in its place: tell them apart by their
        // inode (a pipe per slot).
        let pipes: Vec<_> = (0..6).map(|_| std::io::pipe().unwrap()).collect();
        let fds: Vec<&dyn AsRawFd> = pipes.iter().map(|p| &p.0 as &dyn AsRawFd).collect();
        send_setup(&a, &uart_setup(), &fds).unwrap();
        let (s, got) = recv_setup(&b).unwrap();
        assert_eq!(s, uart_setup());
        let ino = |f: &dyn AsFd| {
            std::fs::File::from(f.as_fd().try_clone_to_owned().unwrap())
                .metadata()
                .unwrap()
                .ino()
        };
        let want: Vec<u64> = pipes.iter().map(|p| ino(&p.0)).collect();
        let (input, output) = got.console.as_ref().unwrap();
        assert!(got.intx.is_none() && got.msi.is_empty());
        assert_eq!(
            [
                ino(&got.accesses),
                ino(&got.memory),
                ino(got.isa_irq.as_ref().unwrap()),
                ino(input),
                ino(output),
                ino(got.state_region.as_ref().unwrap()),
            ],
            want[..]
        );
        // Without a state region, one descriptor fewer.
        let plain = Setup {
            state_region: None,
            ..uart_setup()
        };
        send_setup(&a, &plain, &fds[..5]).unwrap();
        let (s, got) = recv_setup(&b).unwrap();
        assert_eq!(s, plain);
        assert!(got.state_region.is_none());
        drop(a);
        assert!(matches!(recv_setup(&b), Err(HandoffError::Closed)));
    }
}
