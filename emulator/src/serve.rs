//! The emulator's event loop: guest accesses from the backend's ring,
//! control messages from the VMM, and INTx resampling, on one mio poll.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::handoff::{Control, Transport};
use crate::model::{DeviceModel, Env};
use crate::sandbox;
use crate::wire;
use userdev::{Access, Backend, MapEntry, Op, Reply, SeqGaps, Shadow};

/// The range id the VMM gives BAR0.
pub const BAR0_RANGE: u16 = 0;
/// The shadow image mirrors BAR0's first page at the same offsets.
pub const SHADOW_SIZE: usize = 4096;

const ACCESSES: Token = Token(0);
const CONTROL: Token = Token(1);
const RESAMPLE: Token = Token(2);

/// INTx as an irqfd with a resample fd: the line stays high from a trigger
/// until the guest's EOI, when KVM signals the resample fd; if the device
/// still wants the line high, trigger again.
pub struct Intx {
    pub irqfd: EventFd,
    pub resample: EventFd,
    high: bool,
}

impl Intx {
    pub fn new(irqfd: EventFd, resample: EventFd) -> Self {
        Intx {
            irqfd,
            resample,
            high: false,
        }
    }
}

/// The device's world as the emulator process sees it.
pub struct Platform {
    pub memory: GuestMemoryMmap,
    pub shadow: Option<Shadow>,
    pub intx: Option<Intx>,
    pub msi: Vec<EventFd>,
    pub msi_enabled: bool,
    /// Triggers that failed (the irqfd's counter is full: cannot happen
    /// with KVM consuming it, but never panic on it).
    pub irq_errors: u64,
}

impl Platform {
    fn trigger(fd: &EventFd, errors: &mut u64) {
        if fd.write(1).is_err() {
            *errors += 1;
        }
    }

    /// The guest EOIed INTx (KVM lowered the line): take the notice.
    fn take_resample(&mut self) {
        if let Some(intx) = &self.intx {
            let _ = intx.resample.read();
        }
    }

    /// After a resample, raise the line again if the device still wants it.
    fn reassert(&mut self) {
        if let Some(intx) = &self.intx {
            if intx.high && !self.msi_enabled {
                Self::trigger(&intx.irqfd, &mut self.irq_errors);
            }
        }
    }
}

impl Env for Platform {
    fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool {
        self.memory.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool {
        self.memory.write_slice(buf, GuestAddress(addr)).is_ok()
    }

    fn raise_irq(&mut self) {
        if self.msi_enabled {
            if let Some(fd) = self.msi.first() {
                Self::trigger(fd, &mut self.irq_errors);
            }
        } else if let Some(intx) = &mut self.intx {
            intx.high = true;
            Self::trigger(&intx.irqfd, &mut self.irq_errors);
        }
    }

    fn lower_irq(&mut self) {
        // KVM drops the line at the EOI; not triggering again keeps it low.
        if let Some(intx) = &mut self.intx {
            intx.high = false;
        }
    }

    fn publish(&mut self, offset: u64, len: u8, value: u64) {
        let Some(shadow) = &self.shadow else { return };
        let offset = offset as usize;
        // Registers outside the image are simply not shadowed.
        let _ = match len {
            8 => shadow.write(offset, value),
            4 => shadow.write(offset, value as u32),
            2 => shadow.write(offset, value as u16),
            _ => shadow.write(offset, value as u8),
        };
    }
}

/// The access map for `model`'s shadowed registers inside the image,
/// leaving out the offsets in `forward`.
pub fn access_map(model: &dyn DeviceModel, forward: &[u64]) -> Vec<MapEntry> {
    model
        .shadow_registers()
        .iter()
        .filter(|r| r.offset + r.len <= SHADOW_SIZE as u64)
        .filter(|r| !forward.contains(&r.offset))
        .map(|r| MapEntry {
            range: BAR0_RANGE,
            offset: r.offset,
            len: r.len,
            shadow_offset: r.offset,
            sizes: r.sizes,
        })
        .collect()
}

/// What the loop has seen, for the emulator's last log line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    /// Accesses that reached the model: stores and forwarded loads.
    pub accesses: u64,
    /// Accesses KVM dropped before they reached this emulator (no backend,
    /// a stalled one, a ring that stayed full): gaps in the sequence
    /// numbers. Not an error: the model just never saw them.
    pub seq: SeqGaps,
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accesses={} missed_accesses={} seq_gaps={}",
            self.accesses,
            self.seq.missed(),
            self.seq.gaps()
        )
    }
}

/// Why the loop ended.
#[derive(Debug)]
pub enum Exit {
    /// The VM (and with it the device) is gone.
    DeviceGone,
    /// The VMM closed the control socket.
    VmmGone,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("poll: {0}")]
    Poll(#[from] io::Error),
    #[error("user device: {0}")]
    Device(#[from] userdev::Error),
}

/// Where guest accesses come from.
#[derive(Clone, Copy)]
pub enum Accesses<'a> {
    /// The user device's ring.
    Ring(&'a Backend),
    /// A VMM forwarding its exits ([`crate::wire`]); non-blocking.
    Socket(&'a UnixDatagram),
}

impl Accesses<'_> {
    /// The same descriptor, as the sandbox's filter names it.
    pub fn sandboxed(self) -> sandbox::Accesses {
        match self {
            Accesses::Ring(backend) => sandbox::Accesses::Ring(backend.as_raw_fd()),
            Accesses::Socket(socket) => sandbox::Accesses::Socket(socket.as_raw_fd()),
        }
    }
}

/// What [`Accesses`] borrows: the backend fd or the access socket, by the
/// transport the VMM chose.
pub enum AccessSource {
    Ring(Backend),
    Socket(UnixDatagram),
}

impl AccessSource {
    /// Takes over `fd`, which the VMM sent for `transport`.
    pub fn new(transport: Transport, fd: OwnedFd) -> Result<Self, ServeError> {
        Ok(match transport {
            Transport::Ring => AccessSource::Ring(Backend::new(fd)?),
            Transport::Socket => {
                let socket = UnixDatagram::from(fd);
                socket.set_nonblocking(true)?;
                AccessSource::Socket(socket)
            }
        })
    }

    pub fn accesses(&self) -> Accesses<'_> {
        match self {
            AccessSource::Ring(backend) => Accesses::Ring(backend),
            AccessSource::Socket(socket) => Accesses::Socket(socket),
        }
    }

    /// The user device's backend fd, unless accesses come over a socket.
    pub fn backend(&self) -> Option<&Backend> {
        match self {
            AccessSource::Ring(backend) => Some(backend),
            AccessSource::Socket(_) => None,
        }
    }
}

impl AsRawFd for Accesses<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Accesses::Ring(backend) => backend.as_raw_fd(),
            Accesses::Socket(socket) => socket.as_raw_fd(),
        }
    }
}

/// The poll instance with every source registered, made before the
/// sandbox (whose filter pins epoll_wait to it) goes up.
pub fn poll_sources(
    accesses: Accesses,
    control: &UnixDatagram,
    platform: &Platform,
) -> io::Result<Poll> {
    let poll = Poll::new()?;
    let reg = poll.registry();
    reg.register(
        &mut SourceFd(&accesses.as_raw_fd()),
        ACCESSES,
        Interest::READABLE,
    )?;
    reg.register(
        &mut SourceFd(&control.as_raw_fd()),
        CONTROL,
        Interest::READABLE,
    )?;
    if let Some(intx) = &platform.intx {
        reg.register(
            &mut SourceFd(&intx.resample.as_raw_fd()),
            RESAMPLE,
            Interest::READABLE,
        )?;
    }
    Ok(poll)
}

/// Busy-polling of the ring before sleeping: how many looks at the ring
/// head fit in the polling time. While the emulator polls, a vCPU's store
/// finds no sleeper to wake, and a forwarded load is seen at once; the
/// price is a CPU kept busy that long after each batch.
#[derive(Clone, Copy, Debug)]
pub struct Spin {
    looks: u64,
}

impl Spin {
    /// Measures how fast this CPU looks at `backend`'s ring head and sizes
    /// the spin to last about `us` microseconds.
    pub fn calibrate(backend: &Backend, us: u64) -> Spin {
        const TRIAL: u64 = 100_000;
        let start = Instant::now();
        for _ in 0..TRIAL {
            std::hint::black_box(backend.pending());
            std::hint::spin_loop();
        }
        let ns = (start.elapsed().as_nanos() as u64).max(1);
        Spin {
            looks: (TRIAL * us * 1000 / ns).max(1),
        }
    }

    /// Watches the ring for up to the polling time; true if it holds work.
    fn wait(self, backend: &Backend) -> bool {
        for _ in 0..self.looks {
            if backend.pending() > 0 {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }
}

/// Serves the device until the VM or the VMM goes away. With `spin`, the
/// ring is watched for a while before each sleep. `served` counts what
/// came in, also when this returns an error.
pub fn serve(
    poll: &mut Poll,
    accesses: Accesses,
    control: &UnixDatagram,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    spin: Option<Spin>,
    served: &mut Served,
) -> Result<Exit, ServeError> {
    let mut events = Events::with_capacity(8);
    let mut replies = Vec::with_capacity(64);
    loop {
        // Work found while spinning: still collect other events, without
        // sleeping, so that a busy ring does not starve resampling.
        let busy = match (accesses, spin) {
            (Accesses::Ring(backend), Some(spin)) => spin.wait(backend),
            _ => false,
        };
        let timeout = busy.then_some(Duration::ZERO);
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        let mut resampled = false;
        for event in events.iter() {
            match event.token() {
                CONTROL if !drain_control(control, platform) => return Ok(Exit::VmmGone),
                RESAMPLE => resampled = true,
                ACCESSES if event.is_read_closed() => return Ok(Exit::DeviceGone),
                _ => {}
            }
        }
        // A guest acknowledges the device (a posted store) before its EOI:
        // take the resample notice, then the ring, then decide on the line.
        if resampled {
            platform.take_resample();
        }
        let open = match accesses {
            Accesses::Ring(backend) => {
                match serve_ring(backend, control, platform, model, &mut replies, served) {
                    Ok(()) => true,
                    Err(userdev::Error::DeviceGone) => false,
                    Err(e) => return Err(e.into()),
                }
            }
            Accesses::Socket(socket) => serve_socket(socket, control, platform, model, served)?,
        };
        if !open {
            return Ok(Exit::DeviceGone);
        }
        if resampled {
            platform.reassert();
        }
    }
}

/// Consumes the ring until it is empty. Each batch is applied in full,
/// shadow-image updates included, before the tail moves past it: KVM
/// serves a vCPU's loads from the shadow image once its stores are
/// consumed.
fn serve_ring(
    backend: &Backend,
    control: &UnixDatagram,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    replies: &mut Vec<Reply>,
    served: &mut Served,
) -> userdev::Result<()> {
    loop {
        // Snapshot the head before reading control messages: a message the
        // VMM sent before a vCPU made one of these accesses (MSI enabled,
        // then a store that raises) is then already in the socket.
        let pending = backend.pending();
        if pending == 0 {
            return Ok(());
        }
        drain_control(control, platform);
        replies.clear();
        backend.consume_max(pending, |a: &Access| {
            handle(a, platform, model, replies, served)
        })?;
        if !replies.is_empty() {
            backend.reply(replies)?;
        }
    }
}

/// Takes forwarded accesses until none is left; false once the VMM's end
/// is closed.
fn serve_socket(
    socket: &UnixDatagram,
    control: &UnixDatagram,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    served: &mut Served,
) -> io::Result<bool> {
    // As on the ring: control messages sent before these accesses first.
    drain_control(control, platform);
    let mut buf = [0u8; wire::ACCESS_LEN + 1];
    let mut replies = Vec::with_capacity(1);
    loop {
        let n = match socket.recv(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(access) = wire::decode_access(&buf[..n]) else {
            crate::log!("emulator: ignoring a malformed access message");
            continue;
        };
        replies.clear();
        handle(&access, platform, model, &mut replies, served);
        for r in &replies {
            // A VMM that is gone shows as end of file on the next recv.
            let _ = socket.send(&wire::encode_reply(r));
        }
    }
}

fn handle(
    a: &Access,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    replies: &mut Vec<Reply>,
    served: &mut Served,
) {
    served.accesses += 1;
    let missed = served.seq.note(a.seq);
    if missed > 0 && served.seq.gaps() == 1 {
        crate::log!(
            "emulator: KVM dropped {missed} accesses before seq {} (no backend, a stalled one, or a full ring); later gaps are only counted",
            a.seq
        );
    }
    // Only BAR0 is ours; anything else reads all-ones, as an access that
    // no device claims does.
    match (a.op, a.range == BAR0_RANGE) {
        (Op::Store, true) => model.store(platform, a.offset, a.len, a.value()),
        (Op::Load, true) => replies.push(Reply::with_value(
            a.seq,
            a.len,
            model.load(platform, a.offset, a.len),
        )),
        (Op::Load, false) => replies.push(Reply::with_value(a.seq, a.len, !0)),
        (Op::Store, false) => {}
    }
}

/// Applies pending control messages; false once the VMM has gone.
fn drain_control(control: &UnixDatagram, platform: &mut Platform) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match control.recv(&mut buf) {
            Ok(0) => return false,
            Ok(n) => match std::str::from_utf8(&buf[..n])
                .ok()
                .and_then(Control::decode)
            {
                Some(Control::MsiEnabled(on)) => platform.msi_enabled = on,
                None => crate::log!("emulator: ignoring unknown control message"),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Guest memory from the VMM's memory file.
pub fn map_memory(
    file: OwnedFd,
    regions: &[crate::handoff::MemRegion],
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    let file = std::sync::Arc::new(std::fs::File::from(file));
    let ranges: Vec<_> = regions
        .iter()
        .map(|r| {
            let f = vm_memory::FileOffset::from_arc(file.clone(), r.file_offset);
            (GuestAddress(r.guest_addr), r.len as usize, Some(f))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges)
}
