//! The emulator's event loop: guest accesses from the backend's ring,
//! control messages from the VMM, INTx resampling and console input, on
//! one poll(2).
//!
//! With a state region ([`crate::state`], [`Durable`]) each batch of ring
//! records is made durable before the kernel may forget it, so that a
//! successor continues where an emulator killed at any instruction
//! stopped: the records are read without moving the tail; those a
//! predecessor applied already are skipped (a load among them gets the
//! reply saved with the state again); the others are applied to the model,
//! with DMA as it happens, and interrupt changes and console output held
//! back; the model's state is committed with the batch's last seq, its
//! replies and its console output; then come the interrupt changes in
//! order, the console output, the access map, the replies, and last the
//! tail moves. A crash before the commit replays the batch (DMA is done
//! again, which a guest that waits for its completion cannot tell); a
//! crash after it loses nothing: a record answered but not consumed is
//! delivered to the successor again, which skips it, and the successor
//! sends the committed console output again, which the VMM writes once
//! ([`crate::console`]). Without a state region each batch is applied and
//! consumed, then the access map and the replies follow.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::handoff::{Control, Transport};
use crate::model::{DeviceModel, Env, MAX_OUTPUT_PER_ACCESS};
use crate::sandbox;
use crate::state::{Committed, RegionError, StateRegion, MAX_SAVED_OUTPUT, MAX_SAVED_REPLIES};
use crate::wire;
use userdev::{Access, Backend, MapEntry, Op, Reply, SeqGaps, Shadow};

/// The range id the VMM gives the device's registers: BAR0 of a PCI
/// function, the I/O ports of an ISA device.
pub const BAR0_RANGE: u16 = 0;
/// The shadow image mirrors range 0's first page at the same offsets.
pub const SHADOW_SIZE: usize = 4096;

/// What the loop waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Accesses,
    Control,
    Resample,
    Console,
}

/// Log every access that reaches the model (`--trace-accesses`).
pub static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// INTx as an irqfd with a resample fd: the line stays high from a trigger
/// until the guest's EOI, when KVM signals the resample fd; if the device
/// still wants the line high, trigger again. (A vfio-user client without
/// KVM's irqchip sends the EOI as a message instead of a resample fd.)
pub struct Intx {
    pub irqfd: EventFd,
    pub resample: Option<EventFd>,
    high: bool,
}

impl Intx {
    pub fn new(irqfd: EventFd, resample: Option<EventFd>) -> Self {
        Intx {
            irqfd,
            resample,
            high: false,
        }
    }
}

/// An ISA interrupt: a plain irqfd, which pulses an edge-triggered GSI.
/// One write per rising edge of the device's interrupt output; a second
/// write while the output stays high would be a second interrupt.
pub struct IsaIrq {
    pub irqfd: EventFd,
    high: bool,
}

impl IsaIrq {
    pub fn new(irqfd: EventFd) -> Self {
        IsaIrq { irqfd, high: false }
    }
}

/// The device's console line: bytes it receives come from `input` (a pipe
/// the VMM feeds, non-blocking), bytes it sends go to `output` (a
/// `SOCK_SEQPACKET` socket to the VMM, [`crate::console`]).
pub struct Console {
    pub input: mio::unix::pipe::Receiver,
    pub output: std::fs::File,
    /// The stream offset of the next byte the device sends.
    end: u64,
    /// Bytes held back until the state that sent them is committed; they
    /// end at `end`.
    held: Vec<u8>,
}

impl Console {
    /// Takes over the two descriptors from the handoff, the stream going
    /// on at offset `end`. The input is made non-blocking here too: the
    /// loop must never sleep in read(2).
    pub fn new(input: OwnedFd, output: OwnedFd, end: u64) -> io::Result<Self> {
        let input = mio::unix::pipe::Receiver::from(input);
        input.set_nonblocking(true)?;
        Ok(Console {
            input,
            output: output.into(),
            end,
            held: Vec::new(),
        })
    }

    /// Sends `bytes`, which start at stream offset `offset`: one message
    /// per chunk, each a single write.
    fn send(&self, offset: u64, bytes: &[u8], errors: &mut u64) {
        *errors += crate::console::send(&self.output, offset, bytes);
    }
}

/// The device's world as the emulator process sees it.
pub struct Platform {
    pub memory: GuestMemoryMmap,
    pub shadow: Option<Shadow>,
    pub intx: Option<Intx>,
    pub isa: Option<IsaIrq>,
    pub msi: Vec<EventFd>,
    pub msi_enabled: bool,
    pub console: Option<Console>,
    /// Triggers that failed (the irqfd's counter is full: cannot happen
    /// with KVM consuming it, but never panic on it).
    pub irq_errors: u64,
    /// Console reads and writes that failed; a failed write loses the rest
    /// of its bytes.
    pub console_errors: u64,
    /// How the access map is made, if the emulator keeps one.
    pub map: Option<MapSpec>,
    /// The model asked for a new access map.
    pub map_changed: bool,
    /// Hold the model's interrupt changes back until
    /// [`Platform::flush_irqs`] (with a state region: until the state
    /// that made them is committed, so that none goes out for a state a
    /// successor would not have).
    pub defer_irqs: bool,
    /// Hold console output back until [`Platform::flush_output`]: with
    /// the ring, one message per batch, sent before the batch is consumed
    /// (a VMM that has waited for the queue to drain has it), and with a
    /// state region only once the state that sent it is committed.
    pub hold_output: bool,
    /// The changes held back, oldest first: true raises, false lowers.
    pub deferred_irqs: Vec<bool>,
}

/// What goes into the access map besides the model's own registers.
#[derive(Clone, Debug, Default)]
pub struct MapSpec {
    /// BAR0 offsets left out.
    pub forward: Vec<u64>,
    /// BAR0 offsets of 4-byte registers whose stores are batched.
    pub batch: Vec<u64>,
}

impl Platform {
    /// A platform with nothing attached yet: no guest memory, no
    /// interrupt, no shadow, no console (a vfio-user client brings them).
    pub fn empty() -> Self {
        Platform {
            memory: GuestMemoryMmap::default(),
            shadow: None,
            intx: None,
            isa: None,
            msi: Vec::new(),
            msi_enabled: false,
            console: None,
            irq_errors: 0,
            console_errors: 0,
            map: None,
            map_changed: false,
            defer_irqs: false,
            hold_output: false,
            deferred_irqs: Vec::new(),
        }
    }

    fn trigger(fd: &EventFd, errors: &mut u64) {
        if fd.write(1).is_err() {
            *errors += 1;
        }
    }

    /// Sets the access map that `model` asks for now, if the emulator keeps
    /// one.
    pub fn set_access_map(
        &mut self,
        backend: &Backend,
        model: &dyn DeviceModel,
    ) -> userdev::Result<()> {
        self.map_changed = false;
        match &self.map {
            Some(spec) => backend.set_access_map(&access_map(model, &spec.forward, &spec.batch)),
            None => Ok(()),
        }
    }

    /// The guest EOIed INTx (KVM lowered the line): take the notice.
    fn take_resample(&mut self) {
        if let Some(resample) = self.intx.as_ref().and_then(|i| i.resample.as_ref()) {
            let _ = resample.read();
        }
    }

    /// The guest EOIed INTx: raise it again if the device still wants it.
    pub fn intx_eoi(&mut self) {
        self.take_resample();
        self.reassert();
    }

    /// Carries out the interrupt changes held back, in order.
    pub fn flush_irqs(&mut self) {
        for i in 0..self.deferred_irqs.len() {
            if self.deferred_irqs[i] {
                self.assert_irq();
            } else {
                self.deassert_irq();
            }
        }
        self.deferred_irqs.clear();
    }

    /// Sends the console output held back.
    pub fn flush_output(&mut self) {
        if let Some(c) = &mut self.console {
            c.send(
                c.end - c.held.len() as u64,
                &c.held,
                &mut self.console_errors,
            );
            c.held.clear();
        }
    }

    /// The console output held back, and the stream offset it ends at.
    fn held_output(&self) -> (u64, &[u8]) {
        self.console.as_ref().map_or((0, &[]), |c| (c.end, &c.held))
    }

    /// Takes the console stream over where a predecessor's commit left it:
    /// sends that commit's output again, in case the predecessor died
    /// before it did (the VMM keeps each offset's first copy).
    fn resume_output(&mut self, end: u64, output: &[u8]) {
        if let Some(c) = &mut self.console {
            c.end = end;
            c.send(end - output.len() as u64, output, &mut self.console_errors);
        }
    }

    fn assert_irq(&mut self) {
        if let Some(isa) = &mut self.isa {
            if !isa.high {
                isa.high = true;
                Self::trigger(&isa.irqfd, &mut self.irq_errors);
            }
        }
        if self.msi_enabled {
            if let Some(fd) = self.msi.first() {
                Self::trigger(fd, &mut self.irq_errors);
            }
        } else if let Some(intx) = &mut self.intx {
            intx.high = true;
            Self::trigger(&intx.irqfd, &mut self.irq_errors);
        }
    }

    fn deassert_irq(&mut self) {
        // KVM drops the line at the EOI; not triggering again keeps it low.
        if let Some(intx) = &mut self.intx {
            intx.high = false;
        }
        // The ISA line's pulse is over already; the next raise is an edge.
        if let Some(isa) = &mut self.isa {
            isa.high = false;
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
        if self.defer_irqs {
            self.deferred_irqs.push(true);
        } else {
            self.assert_irq();
        }
    }

    fn lower_irq(&mut self) {
        if self.defer_irqs {
            self.deferred_irqs.push(false);
        } else {
            self.deassert_irq();
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

    /// Held back while [`Platform::hold_output`] says so, at most
    /// [`MAX_SAVED_OUTPUT`] bytes: [`apply`] commits a batch in parts
    /// before more would be held (a model sends at most
    /// [`MAX_OUTPUT_PER_ACCESS`] bytes per access); without a state region
    /// what is held goes out early instead.
    fn console_out(&mut self, bytes: &[u8]) {
        let held = self.console.as_ref().map_or(0, |c| c.held.len());
        if self.hold_output && held + bytes.len() > MAX_SAVED_OUTPUT {
            self.flush_output();
        }
        // Without a console the line goes nowhere.
        let Some(console) = &mut self.console else {
            return;
        };
        if self.hold_output && bytes.len() <= MAX_SAVED_OUTPUT {
            console.held.extend_from_slice(bytes);
        } else {
            console.send(console.end, bytes, &mut self.console_errors);
        }
        console.end += bytes.len() as u64;
    }

    fn access_map_changed(&mut self) {
        self.map_changed = true;
    }
}

/// Console bytes read from the VMM that the model had no room for yet.
/// `readable` stays set until a read finds the pipe empty, also when the
/// loop stops reading for lack of room; the loop waits for the pipe only
/// while it is clear.
pub(crate) struct ConsoleInput {
    buf: [u8; 256],
    start: usize,
    end: usize,
    readable: bool,
    /// End of file (or an error): stop reading; the guest runs on.
    closed: bool,
}

impl Default for ConsoleInput {
    fn default() -> Self {
        // Readable until shown otherwise: data may wait from before the
        // loop started.
        ConsoleInput {
            buf: [0; 256],
            start: 0,
            end: 0,
            readable: true,
            closed: false,
        }
    }
}

impl ConsoleInput {
    /// Whether the loop should wait for the pipe: it found it empty.
    fn waits(&self) -> bool {
        !self.readable && !self.closed
    }

    /// Gives the model as many bytes as it has room for, reading the
    /// console when the buffer runs dry; whether it gave any.
    fn feed(&mut self, platform: &mut Platform, model: &mut dyn DeviceModel) -> bool {
        let mut fed = false;
        loop {
            let room = model.input_room();
            if room == 0 {
                return fed;
            }
            if self.start == self.end {
                let Some(console) = &platform.console else {
                    return fed;
                };
                if !self.readable || self.closed {
                    return fed;
                }
                match (&console.input).read(&mut self.buf) {
                    Ok(0) => {
                        self.closed = true;
                        return fed;
                    }
                    Ok(n) => (self.start, self.end) = (0, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.readable = false;
                        return fed;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        platform.console_errors += 1;
                        self.closed = true;
                        return fed;
                    }
                }
            }
            let n = room.min(self.end - self.start);
            if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
                crate::log!(
                    "emulator: trace input {:x?}",
                    &self.buf[self.start..self.start + n]
                );
            }
            model.input(platform, &self.buf[self.start..self.start + n]);
            self.start += n;
            fed = true;
        }
    }
}

/// Feeds console input to the model; with a state region, commits what
/// the input changed before its interrupt changes go out. Bytes taken
/// from the console are lost if the emulator dies before that commit.
fn feed(
    input: &mut ConsoleInput,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    durable: Option<&mut Durable>,
) -> Result<(), RegionError> {
    let fed = input.feed(platform, model);
    if let (true, Some(durable)) = (fed, durable) {
        durable.commit_input(model, platform)?;
    }
    platform.flush_irqs();
    platform.flush_output();
    Ok(())
}

/// The access map for `model`'s shadowed registers inside the image,
/// leaving out the offsets in `forward`, and for its batched registers and
/// the 4-byte registers at the offsets in `batch`.
pub fn access_map(model: &dyn DeviceModel, forward: &[u64], batch: &[u64]) -> Vec<MapEntry> {
    let shadowed = model
        .shadow_registers()
        .iter()
        .filter(|r| r.offset + r.len <= SHADOW_SIZE as u64)
        .filter(|r| !forward.contains(&r.offset))
        .map(|r| MapEntry {
            pass_stores: r.passes_stores,
            ..MapEntry::shadowed(BAR0_RANGE, r.offset, r.len, r.sizes)
        });
    let batched = model
        .batched_registers()
        .iter()
        .map(|r| (r.offset, r.len))
        .chain(batch.iter().map(|&offset| (offset, 4)))
        .filter(|&(offset, len)| offset + len <= SHADOW_SIZE as u64)
        .map(|(offset, len)| MapEntry::batched(BAR0_RANGE, offset, len));
    shadowed.chain(batched).collect()
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
    /// Records a predecessor had applied already, delivered again after
    /// it died: skipped.
    pub redelivered: u64,
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accesses={} missed_accesses={} seq_gaps={} redelivered={}",
            self.accesses,
            self.seq.missed(),
            self.seq.gaps(),
            self.redelivered
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
    #[error("state region: {0}")]
    State(#[from] RegionError),
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

/// The descriptors the loop waits on, with poll(2). epoll would do as
/// well for four descriptors, but a task that sleeps in epoll_wait() is
/// woken by epoll's own wakeup, which drops the user device's handoff: a
/// forwarded load wakes this emulator on the waiting vCPU's CPU only if it
/// sleeps in poll(2) on the backend fd itself (user.rst, *Handoff and
/// polling*).
pub struct Sources {
    fds: Vec<libc::pollfd>,
    sources: Vec<(Source, RawFd)>,
}

impl Sources {
    pub fn new(accesses: Accesses, control: &UnixDatagram, platform: &Platform) -> Self {
        let mut sources = Sources {
            fds: Vec::with_capacity(4),
            sources: Vec::with_capacity(4),
        };
        sources.add(Source::Accesses, accesses.as_raw_fd());
        sources.add(Source::Control, control.as_raw_fd());
        if let Some(resample) = platform.intx.as_ref().and_then(|i| i.resample.as_ref()) {
            sources.add(Source::Resample, resample.as_raw_fd());
        }
        if let Some(console) = &platform.console {
            sources.add(Source::Console, console.input.as_raw_fd());
        }
        sources
    }

    fn add(&mut self, source: Source, fd: RawFd) {
        self.fds.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        self.sources.push((source, fd));
    }

    /// Waits until a source is ready or `timeout` passes (`None`: no
    /// limit). The console is waited for only when `console` is set.
    fn wait(&mut self, timeout: Option<Duration>, console: bool) -> io::Result<()> {
        for (pfd, &(source, fd)) in self.fds.iter_mut().zip(&self.sources) {
            pfd.revents = 0;
            // poll(2) skips a negative descriptor.
            pfd.fd = if source == Source::Console && !console {
                -1
            } else {
                fd
            };
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `fds` is a live array of `fds.len()` pollfds, which poll
        // writes only the revents of.
        let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The sources that were ready, and whether each one's peer hung up.
    fn ready(&self) -> impl Iterator<Item = (Source, bool)> + '_ {
        self.fds
            .iter()
            .zip(&self.sources)
            .filter(|(pfd, _)| pfd.fd >= 0 && pfd.revents != 0)
            .map(|(pfd, &(source, _))| (source, pfd.revents & libc::POLLHUP != 0))
    }
}

/// Adaptive polling of the ring before sleeping, as KVM's halt polling
/// does for a halted vCPU: after a batch the emulator watches the ring for
/// up to a window before it sleeps. While it watches, a vCPU's store finds
/// no sleeper to wake and a forwarded load is seen at once. The window
/// starts at zero; when the next access comes after a watch that ended
/// empty, the window grows (10 µs, then doubling, up to the limit) if that
/// access came within the limit, and halves (below 10 µs: zero) if it came
/// later. So a device in use keeps the emulator awake between accesses
/// that come close together, and an idle guest costs no CPU.
///
/// Between two looks at the ring the emulator yields its CPU. A yield that
/// takes long means another task (a vCPU) wanted this CPU: then polling
/// only delays the emulator, which, runnable rather than asleep, is not
/// woken (and so not run at once) when that vCPU queues a record. It stops
/// polling for a second, and sleeps.
///
/// Time is read from the TSC: no system call, nothing the sandbox must
/// allow, and the TSC rate is measured before the sandbox goes up.
#[derive(Clone, Copy, Debug)]
pub struct Spin {
    ticks_per_us: u64,
    limit: u64,
    window: u64,
    /// When the last watch began, if it ended empty.
    watched_since: Option<u64>,
    /// No polling before this TSC value: the CPU was shared.
    shared_until: u64,
}

/// A yield longer than this ran another task.
const YIELD_SHARED_US: u64 = 50;
/// How long the emulator stops polling once it found its CPU shared.
const SHARED_BACKOFF_US: u64 = 1_000_000;

impl Spin {
    /// Measures the TSC against the monotonic clock; a window of at most
    /// `limit_us`.
    pub fn calibrate(limit_us: u64) -> Spin {
        let (t0, c0) = (Instant::now(), tsc());
        std::thread::sleep(Duration::from_millis(10));
        let (us, ticks) = (t0.elapsed().as_micros() as u64, tsc().wrapping_sub(c0));
        let ticks_per_us = (ticks / us.max(1)).max(1);
        Spin {
            ticks_per_us,
            limit: limit_us * ticks_per_us,
            window: 0,
            watched_since: None,
            shared_until: 0,
        }
    }

    /// The current window, in µs.
    pub fn window_us(&self) -> u64 {
        self.window / self.ticks_per_us
    }

    /// Watches the ring for up to the window; true if it holds work.
    pub(crate) fn wait(&mut self, backend: &Backend) -> bool {
        let start = tsc();
        if start < self.shared_until {
            return backend.pending() > 0;
        }
        loop {
            if backend.pending() > 0 {
                self.watched_since = None;
                return true;
            }
            let before = tsc();
            if before.wrapping_sub(start) >= self.window {
                self.watched_since = Some(start);
                return false;
            }
            // SAFETY: sched_yield has no arguments and cannot fail here.
            unsafe { libc::sched_yield() };
            let now = tsc();
            if now.wrapping_sub(before) > YIELD_SHARED_US * self.ticks_per_us {
                self.window = 0;
                self.watched_since = None;
                self.shared_until = now + SHARED_BACKOFF_US * self.ticks_per_us;
                return backend.pending() > 0;
            }
        }
    }

    /// Work came after a sleep: adapt the window to how long after the
    /// last watch began it came.
    pub(crate) fn woke(&mut self) {
        let Some(since) = self.watched_since.take() else {
            return;
        };
        let start = 10 * self.ticks_per_us;
        self.window = if tsc().wrapping_sub(since) <= self.limit {
            (self.window * 2).max(start).min(self.limit)
        } else if self.window / 2 < start {
            0
        } else {
            self.window / 2
        };
    }
}

fn tsc() -> u64 {
    // SAFETY: rdtsc reads a counter; x86-64 always has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// With a state region: the device's state as last committed there, and
/// the records a predecessor applied that may come again.
pub struct Durable {
    region: StateRegion,
    /// What the last commit said, its buffers reused for the next: a
    /// commit for console input, which applies no record, says its seq
    /// and replies again.
    last: Committed,
    /// Until the predecessor's records have passed.
    resume: Option<Resume>,
}

/// What a predecessor committed about the records still in the ring.
struct Resume {
    applied_seq: u64,
    replies: Vec<Reply>,
    /// Records that can still be the predecessor's: those pending at the
    /// take-over. A state that names a later seq (garbage) skips no more.
    left: u32,
}

/// How [`Durable::take_over`] found the region.
#[derive(Debug, PartialEq, Eq)]
pub enum Resumed {
    /// Nothing committed yet: the model starts from reset.
    Fresh,
    /// The model continues from the state committed with `applied_seq`.
    From { applied_seq: u64, replies: usize },
    /// What the region held was refused (why): the model starts from reset.
    Refused(String),
}

impl Durable {
    /// Takes `region` over for `model`, fresh from reset: restores the
    /// committed state, if there is one and it checks out, and the console
    /// stream where it left it. `pending`: the ring's records now, the only
    /// ones a predecessor can have applied. The region is read here: call
    /// it once sandboxed.
    pub fn take_over(
        mut region: StateRegion,
        model: &mut dyn DeviceModel,
        platform: &mut Platform,
        pending: u32,
    ) -> (Durable, Resumed) {
        let (last, resumed) = match region.take_over() {
            Ok(None) => (None, Resumed::Fresh),
            Err(e) => (None, Resumed::Refused(e.to_string())),
            Ok(Some(c)) => match model.restore(&c.state) {
                Ok(()) => {
                    let resumed = Resumed::From {
                        applied_seq: c.applied_seq,
                        replies: c.replies.len(),
                    };
                    (Some(c), resumed)
                }
                // The model is left at reset.
                Err(e) => (None, Resumed::Refused(format!("the model's state: {e}"))),
            },
        };
        let resume = last.as_ref().map(|c| {
            platform.resume_output(c.output_end, &c.output);
            Resume {
                applied_seq: c.applied_seq,
                replies: c.replies.clone(),
                left: pending,
            }
        });
        let last = last.unwrap_or_else(|| Committed {
            // From reset, the stream goes on where the VMM has it.
            output_end: platform.held_output().0,
            ..Committed::default()
        });
        let durable = Durable {
            region,
            last,
            resume,
        };
        (durable, resumed)
    }

    /// Whether `a` is a record the predecessor applied; a load among them
    /// gets its saved reply again, if there is one (if not, its vCPU waits
    /// for the timeout and reads all-ones).
    fn redelivered(&mut self, a: &Access, replies: &mut Vec<Reply>) -> bool {
        let Some(resume) = &mut self.resume else {
            return false;
        };
        // Records come in seq order: once one is new, all that follow are.
        if resume.left == 0 || a.seq > resume.applied_seq {
            self.resume = None;
            return false;
        }
        resume.left -= 1;
        if a.op == Op::Load {
            replies.extend(resume.replies.iter().find(|r| r.seq == a.seq));
        }
        true
    }

    /// Commits the model's state as of the record `applied_seq`, with the
    /// batch's `replies` and the console output `platform` holds back (the
    /// bytes sent since the last commit). A commit without output keeps
    /// the last one's: sending it again costs nothing.
    fn commit(
        &mut self,
        model: &dyn DeviceModel,
        applied_seq: u64,
        replies: &[Reply],
        platform: &Platform,
    ) -> Result<(), RegionError> {
        let last = &mut self.last;
        last.applied_seq = applied_seq;
        last.replies.clear();
        last.replies.extend_from_slice(replies);
        let (end, output) = platform.held_output();
        if end != last.output_end {
            last.output_end = end;
            last.output.clear();
            last.output.extend_from_slice(output);
        }
        last.state.clear();
        model.save(&mut last.state);
        self.region.commit(last)
    }

    /// Commits a change that came from console input, not from the ring.
    fn commit_input(
        &mut self,
        model: &dyn DeviceModel,
        platform: &Platform,
    ) -> Result<(), RegionError> {
        let replies = std::mem::take(&mut self.last.replies);
        self.commit(model, self.last.applied_seq, &replies, platform)
    }
}

/// Serves the device until the VM or the VMM goes away. With `spin`, the
/// ring is watched for an adaptive while before each sleep; with
/// `durable`, each batch from the ring is committed to the state region
/// before it is consumed. `served` counts what came in, also when this
/// returns an error.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    sources: &mut Sources,
    accesses: Accesses,
    control: &UnixDatagram,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    mut spin: Option<Spin>,
    mut durable: Option<&mut Durable>,
    served: &mut Served,
) -> Result<Exit, ServeError> {
    let mut batch = Batch::default();
    let mut input = ConsoleInput::default();
    loop {
        // Work found while spinning: still collect other events, without
        // sleeping, so that a busy ring does not starve resampling.
        let busy = match (accesses, spin.as_mut()) {
            (Accesses::Ring(backend), Some(spin)) => spin.wait(backend),
            _ => false,
        };
        let timeout = busy.then_some(Duration::ZERO);
        match sources.wait(timeout, input.waits()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        if let (Accesses::Ring(backend), Some(spin)) = (accesses, spin.as_mut()) {
            if !busy && backend.pending() > 0 {
                spin.woke();
            }
        }
        let mut resampled = false;
        for (source, hung_up) in sources.ready() {
            match source {
                Source::Control if !drain_control(control, platform) => return Ok(Exit::VmmGone),
                Source::Resample => resampled = true,
                Source::Console => input.readable = true,
                Source::Accesses if hung_up => return Ok(Exit::DeviceGone),
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
                match serve_ring(
                    backend,
                    Some(control),
                    platform,
                    model,
                    &mut input,
                    &mut batch,
                    durable.as_deref_mut(),
                    served,
                ) {
                    Ok(()) => true,
                    Err(ServeError::Device(userdev::Error::DeviceGone)) => false,
                    Err(e) => return Err(e),
                }
            }
            Accesses::Socket(socket) => {
                serve_socket(socket, control, platform, model, &mut input, served)?
            }
        };
        // Console input that arrived while the ring was idle.
        feed(&mut input, platform, model, durable.as_deref_mut())?;
        if !open {
            return Ok(Exit::DeviceGone);
        }
        if resampled {
            platform.reassert();
        }
    }
}

/// The ring loop's buffers, reused from batch to batch.
#[derive(Default)]
pub(crate) struct Batch {
    records: Vec<Access>,
    replies: Vec<Reply>,
}

/// Consumes the ring until it is empty. Each batch is applied in full,
/// shadow-image updates included, before the tail moves past it: KVM
/// serves a vCPU's loads from the shadow image once its stores are
/// consumed. With `durable`, the batch is committed first, and the tail
/// moves after the replies (the module docs say why). After each batch,
/// console input the model now has room for (the guest may have read RBR).
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve_ring(
    backend: &Backend,
    control: Option<&UnixDatagram>,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    input: &mut ConsoleInput,
    batch: &mut Batch,
    mut durable: Option<&mut Durable>,
    served: &mut Served,
) -> Result<(), ServeError> {
    loop {
        // Snapshot the head before reading control messages: a message the
        // VMM sent before a vCPU made one of these accesses (MSI enabled,
        // then a store that raises) is then already in the socket.
        let pending = backend.pending();
        if pending == 0 {
            return Ok(());
        }
        if let Some(control) = control {
            drain_control(control, platform);
        }
        let replies = &mut batch.replies;
        match durable.as_deref_mut() {
            None => {
                replies.clear();
                let n = backend.peek_max(pending, |a: &Access| {
                    handle(a, platform, model, replies, served)
                })?;
                platform.flush_output();
                backend.advance(n)?;
                answer(backend, platform, model, replies)?;
            }
            Some(durable) => {
                batch.records.clear();
                backend.peek_max(pending, |a: &Access| batch.records.push(*a))?;
                let mut rest = &batch.records[..];
                while !rest.is_empty() {
                    replies.clear();
                    let n = apply(rest, platform, model, durable, replies, served);
                    durable.commit(model, rest[n - 1].seq, replies, platform)?;
                    platform.flush_irqs();
                    platform.flush_output();
                    answer(backend, platform, model, replies)?;
                    // Only now may the kernel forget these records.
                    backend.advance(n as u32)?;
                    rest = &rest[n..];
                }
            }
        }
        feed(input, platform, model, durable.as_deref_mut())?;
    }
}

/// After a batch: the access map, then the replies. The map comes first: a
/// guest that waits for one of them (a load behind the store that changed
/// the map) then stores under the new map.
fn answer(
    backend: &Backend,
    platform: &mut Platform,
    model: &dyn DeviceModel,
    replies: &[Reply],
) -> userdev::Result<()> {
    if platform.map_changed {
        platform.set_access_map(backend, model)?;
    }
    if !replies.is_empty() {
        // A reply whose load no longer waits (it timed out, or it was the
        // predecessor's and its vCPU gave up) is refused and counted by
        // `reply`, not an error.
        backend.reply(replies)?;
    }
    Ok(())
}

/// Applies records from the front of `records`, skipping those a
/// predecessor applied, until the replies or the console output to save
/// could overflow; returns how many it took (at least one).
fn apply(
    records: &[Access],
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    durable: &mut Durable,
    replies: &mut Vec<Reply>,
    served: &mut Served,
) -> usize {
    let mut taken = 0;
    for a in records {
        if a.op == Op::Load && replies.len() >= MAX_SAVED_REPLIES {
            break;
        }
        if taken > 0 && platform.held_output().1.len() + MAX_OUTPUT_PER_ACCESS > MAX_SAVED_OUTPUT {
            break;
        }
        if durable.redelivered(a, replies) {
            served.redelivered += 1;
            served.seq.note(a.seq);
            if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
                crate::log!("emulator: trace seq {} redelivered, skipped", a.seq);
            }
        } else {
            handle(a, platform, model, replies, served);
        }
        taken += 1;
    }
    taken
}

/// Takes forwarded accesses until none is left, feeding console input
/// after each; false once the VMM's end is closed.
fn serve_socket(
    socket: &UnixDatagram,
    control: &UnixDatagram,
    platform: &mut Platform,
    model: &mut dyn DeviceModel,
    input: &mut ConsoleInput,
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
        input.feed(platform, model);
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
    // Only range 0 is ours; anything else reads all-ones, as an access
    // that no device claims does.
    let replied = replies.len();
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
    if TRACE.load(std::sync::atomic::Ordering::Relaxed) {
        let data = match replies.get(replied..) {
            Some([reply]) => reply.value(a.len),
            _ => a.value(),
        };
        crate::log!(
            "emulator: trace seq {} vcpu {} {:?} range {} offset {:#x} len {} data {data:#x}",
            a.seq,
            a.vcpu,
            a.op,
            a.range,
            a.offset,
            a.len,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uart::{Uart, FIFO_SIZE};
    use std::io::{PipeWriter, Write};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A platform with an ISA irqfd and a console (a pipe in, a seqpacket
    /// pair out, as from the VMM); the test's ends are returned: the
    /// console's feed and its output.
    fn platform() -> (Platform, PipeWriter, UnixDatagram) {
        let (input, feed) = std::io::pipe().unwrap();
        let (output_reader, output) = crate::handoff::socketpair().unwrap();
        let platform = Platform {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
            isa: Some(IsaIrq::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            console: Some(Console::new(input.into(), output.into(), 0).unwrap()),
            ..Platform::empty()
        };
        (platform, feed, output_reader)
    }

    fn pulses(p: &Platform) -> u64 {
        p.isa.as_ref().unwrap().irqfd.read().unwrap_or(0)
    }

    #[test]
    fn isa_irq_is_one_write_per_rising_edge() {
        let (mut p, _, _) = platform();
        p.raise_irq();
        p.raise_irq();
        assert_eq!(pulses(&p), 1);
        p.lower_irq();
        assert_eq!(pulses(&p), 0);
        p.raise_irq();
        assert_eq!(pulses(&p), 1);
    }

    #[test]
    fn console_output_and_input() {
        let (mut p, mut feed, out) = platform();
        p.console_out(b"hello");
        p.console_out(b"!");
        let mut buf = [0u8; 32];
        let n = out.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], *b"\0\0\0\0\0\0\0\0hello");
        let n = out.recv(&mut buf).unwrap();
        assert_eq!(buf[..n], *b"\x05\0\0\0\0\0\0\0!");

        let mut uart = Uart::new();
        let mut input = ConsoleInput::default();
        // Nothing there yet: the read finds the pipe empty.
        input.feed(&mut p, &mut uart);
        assert!(!input.readable);
        let sent: Vec<u8> = (0..40).collect();
        feed.write_all(&sent).unwrap();
        input.readable = true;
        // 16450 mode: one byte of room; the rest waits on the host side.
        input.feed(&mut p, &mut uart);
        assert_eq!(uart.input_room(), 0);
        let mut got = vec![uart.load(&mut p, 0, 1) as u8];
        // FIFOs on: sixteen at a time, as the guest makes room.
        uart.store(&mut p, 2, 1, 0x01);
        for _ in 0..sent.len() {
            input.feed(&mut p, &mut uart);
            assert!(uart.input_room() == 0 || got.len() + FIFO_SIZE > sent.len());
            while uart.load(&mut p, 5, 1) & 1 != 0 {
                got.push(uart.load(&mut p, 0, 1) as u8);
            }
            if got.len() == sent.len() {
                break;
            }
        }
        assert_eq!(got, sent);
        assert!(!input.closed);
        // The hang-up is an event like new data: the loop marks the input
        // readable.
        drop(feed);
        input.readable = true;
        input.feed(&mut p, &mut uart);
        assert!(input.closed, "end of file: reading stops");
        assert_eq!(p.console_errors, 0);
    }

    fn access(seq: u64, op: Op, offset: u64, value: u8) -> Access {
        Access {
            seq,
            range: BAR0_RANGE,
            offset,
            len: 1,
            op,
            data: userdev::data::from_u64(value.into(), 1),
            vcpu: 0,
        }
    }

    fn store(seq: u64, offset: u64, value: u8) -> Access {
        access(seq, Op::Store, offset, value)
    }

    fn load(seq: u64, offset: u64) -> Access {
        access(seq, Op::Load, offset, 0)
    }

    /// A new emulator's view of the device's state region (`fd`).
    fn take_over(
        fd: &OwnedFd,
        model: &mut dyn DeviceModel,
        p: &mut Platform,
        pending: u32,
    ) -> (Durable, Resumed) {
        let region = StateRegion::map(fd.try_clone().unwrap()).unwrap();
        Durable::take_over(region, model, p, pending)
    }

    /// serve_ring's durable path without the backend: apply, commit, then
    /// the interrupts; the replies of each commit, in order.
    fn run(
        records: &[Access],
        p: &mut Platform,
        model: &mut dyn DeviceModel,
        d: &mut Durable,
        served: &mut Served,
    ) -> Vec<Reply> {
        let mut all = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let mut replies = Vec::new();
            let n = apply(rest, p, model, d, &mut replies, served);
            d.commit(model, rest[n - 1].seq, &replies, p).unwrap();
            p.flush_irqs();
            p.flush_output();
            all.extend(replies);
            rest = &rest[n..];
        }
        all
    }

    /// The messages a platform's console sent, once it is dropped: their
    /// bytes, all of them, and those a VMM that had `seen` bytes already
    /// would write.
    fn output(p: Platform, out: UnixDatagram, seen: u64) -> (Vec<u8>, Vec<u8>) {
        drop(p);
        let mut dedup = crate::console::Dedup::default();
        dedup.accept(
            &crate::console::messages(0, &vec![0; seen as usize])
                .next()
                .unwrap_or_default(),
        );
        let (mut all, mut new) = (Vec::new(), Vec::new());
        let mut buf = [0; crate::console::MAX_CHUNK + 8];
        loop {
            let n = out.recv(&mut buf).unwrap();
            if n == 0 {
                return (all, new);
            }
            all.extend_from_slice(&buf[8..n]);
            new.extend_from_slice(dedup.accept(&buf[..n]));
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const FCR: u64 = 2;
    const MCR: u64 = 4;
    const LSR: u64 = 5;

    /// FIFOs on, the receive interrupt enabled and wired (OUT2), one byte
    /// sent.
    fn setup_batch() -> Vec<Access> {
        vec![
            store(1, MCR, 0x08),
            store(2, IER, 0x01),
            store(3, FCR, 0x01),
            store(4, THR, b'a'),
        ]
    }

    /// Reads a received byte, sends one, reads LSR.
    fn second_batch() -> Vec<Access> {
        vec![load(5, THR), store(6, THR, b'b'), load(7, LSR)]
    }

    /// The first emulator of a UART: the setup batch, console input "hi",
    /// the second batch; it dies after committing that (`committed`) or
    /// just before. Returns its replies to the second batch, and the state
    /// region's fd.
    fn first_emulator(committed: bool) -> (Vec<Reply>, OwnedFd, Vec<u8>) {
        let fd = crate::state::create_file().unwrap();
        let (mut p, mut feed_in, out) = platform();
        p.defer_irqs = true;
        p.hold_output = true;
        let mut uart = Uart::new();
        let (mut d, resumed) = take_over(&fd, &mut uart, &mut p, 0);
        assert_eq!(resumed, Resumed::Fresh);
        let mut served = Served::default();
        run(&setup_batch(), &mut p, &mut uart, &mut d, &mut served);
        feed_in.write_all(b"hi").unwrap();
        let mut input = ConsoleInput::default();
        feed(&mut input, &mut p, &mut uart, Some(&mut d)).unwrap();
        assert_eq!(pulses(&p), 1, "the received data's interrupt");
        let replies = if committed {
            run(&second_batch(), &mut p, &mut uart, &mut d, &mut served)
        } else {
            let mut replies = Vec::new();
            apply(
                &second_batch(),
                &mut p,
                &mut uart,
                &mut d,
                &mut replies,
                &mut served,
            );
            replies
        };
        (replies, fd, output(p, out, 0).0)
    }

    /// The same accesses and input, in one emulator that does not die.
    fn reference() -> (Uart, Vec<Reply>) {
        let (mut p, _, _) = platform();
        let mut uart = Uart::new();
        let mut replies = Vec::new();
        for a in setup_batch() {
            handle(&a, &mut p, &mut uart, &mut replies, &mut Served::default());
        }
        uart.input(&mut p, b"hi");
        for a in second_batch().iter().chain(&[load(8, THR)]) {
            handle(a, &mut p, &mut uart, &mut replies, &mut Served::default());
        }
        (uart, replies)
    }

    /// Killed after the commit, before the replies and the tail: the
    /// successor gets the second batch again, skips it (the received byte
    /// is not read twice, the sent one not sent twice), answers its loads
    /// as the first emulator did, and goes on. It sends the committed
    /// output again, which the VMM has already.
    #[test]
    fn a_successor_skips_what_was_committed() {
        let (replies, fd, out) = first_emulator(true);
        assert_eq!(out, b"ab");
        assert_eq!(replies[0].value(1), u64::from(b'h'));
        let (mut p, _, out) = platform();
        p.defer_irqs = true;
        p.hold_output = true;
        let mut uart = Uart::new();
        let (mut d, resumed) = take_over(&fd, &mut uart, &mut p, 4);
        assert_eq!(
            resumed,
            Resumed::From {
                applied_seq: 7,
                replies: 2
            }
        );
        assert!(uart.irq_asserted(), "'i' waits with RDI on");
        let mut served = Served::default();
        let records: Vec<Access> = second_batch().into_iter().chain([load(8, THR)]).collect();
        let again = run(&records, &mut p, &mut uart, &mut d, &mut served);
        assert_eq!(again[..2], replies[..]);
        assert_eq!(again[2].value(1), u64::from(b'i'));
        assert_eq!((served.redelivered, served.accesses), (3, 1));
        let (want, want_replies) = reference();
        assert_eq!(again[2], want_replies[want_replies.len() - 1]);
        let state = |m: &Uart| {
            let mut v = Vec::new();
            m.save(&mut v);
            v
        };
        assert_eq!(state(&uart), state(&want));
        assert_eq!(
            output(p, out, 2),
            (b"b".to_vec(), b"".to_vec()),
            "nothing written twice"
        );
        // And a third emulator, after the successor died before its tail
        // moved: the successor's commit kept every reply it gave.
        let mut third = Uart::new();
        let (mut p, _, _) = platform();
        let (mut d, _) = take_over(&fd, &mut third, &mut p, 4);
        let mut replies = Vec::new();
        assert_eq!(
            apply(
                &records,
                &mut p,
                &mut third,
                &mut d,
                &mut replies,
                &mut served
            ),
            4
        );
        assert_eq!(replies, again);
        assert_eq!(state(&third), state(&want));
    }

    /// Killed before the commit: the successor starts from the commit
    /// before (console input included) and applies the batch again. The
    /// byte the batch sends went nowhere the first time, and the VMM
    /// writes it once.
    #[test]
    fn a_successor_replays_what_was_not_committed() {
        let (replies, fd, out) = first_emulator(false);
        assert_eq!(out, b"a", "the uncommitted byte is held back");
        let (mut p, _, out) = platform();
        p.defer_irqs = true;
        p.hold_output = true;
        let mut uart = Uart::new();
        let (mut d, resumed) = take_over(&fd, &mut uart, &mut p, 3);
        // The setup batch; the input's commit kept its seq.
        assert_eq!(
            resumed,
            Resumed::From {
                applied_seq: 4,
                replies: 0
            }
        );
        let mut served = Served::default();
        let records: Vec<Access> = second_batch().into_iter().chain([load(8, THR)]).collect();
        let again = run(&records, &mut p, &mut uart, &mut d, &mut served);
        assert_eq!(again[..2], replies[..], "the same answers");
        assert_eq!((served.redelivered, served.accesses), (0, 4));
        let (want, _) = reference();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        uart.save(&mut a);
        want.save(&mut b);
        assert_eq!(a, b);
        assert_eq!(output(p, out, 1), (b"ab".to_vec(), b"b".to_vec()));
    }

    /// Interrupt changes wait for the commit, then go out in order.
    #[test]
    fn interrupts_wait_for_the_commit() {
        let fd = crate::state::create_file().unwrap();
        let (mut p, mut feed_in, _out) = platform();
        p.defer_irqs = true;
        p.hold_output = true;
        let mut uart = Uart::new();
        let (mut d, _) = take_over(&fd, &mut uart, &mut p, 0);
        let mut replies = Vec::new();
        let mut served = Served::default();
        apply(
            &setup_batch(),
            &mut p,
            &mut uart,
            &mut d,
            &mut replies,
            &mut served,
        );
        feed_in.write_all(b"x").unwrap();
        let mut input = ConsoleInput::default();
        input.feed(&mut p, &mut uart);
        // Raised by the input, lowered by reading it, raised again.
        apply(
            &[load(5, THR)],
            &mut p,
            &mut uart,
            &mut d,
            &mut replies,
            &mut served,
        );
        uart.input(&mut p, b"y");
        assert_eq!(pulses(&p), 0, "nothing before the commit");
        assert_eq!(p.deferred_irqs, [true, false, true]);
        d.commit(&uart, 5, &replies, &p).unwrap();
        p.flush_irqs();
        p.flush_output();
        assert_eq!(pulses(&p), 2, "two rising edges");
        assert!(p.deferred_irqs.is_empty());
    }

    /// More output than a commit saves: the batch is committed in parts,
    /// and every byte goes out once.
    #[test]
    fn batches_split_at_the_saved_output() {
        let fd = crate::state::create_file().unwrap();
        let (mut p, _, out) = platform();
        p.defer_irqs = true;
        p.hold_output = true;
        let mut uart = Uart::new();
        let (mut d, _) = take_over(&fd, &mut uart, &mut p, 0);
        let stores: Vec<Access> = (1..=2500).map(|seq| store(seq, THR, seq as u8)).collect();
        let mut replies = Vec::new();
        let mut served = Served::default();
        let first = apply(
            &stores,
            &mut p,
            &mut uart,
            &mut d,
            &mut replies,
            &mut served,
        );
        assert_eq!(first, MAX_SAVED_OUTPUT - MAX_OUTPUT_PER_ACCESS + 1);
        p.flush_irqs();
        p.flush_output();
        run(&stores[first..], &mut p, &mut uart, &mut d, &mut served);
        let want: Vec<u8> = stores.iter().map(|a| a.seq as u8).collect();
        assert_eq!(output(p, out, 0).1, want);
    }

    /// More loads than a commit saves replies for: the batch is committed
    /// in parts; records a (garbage) state claims beyond the ring's
    /// records at the take-over are applied.
    #[test]
    fn batches_split_at_the_saved_replies() {
        let fd = crate::state::create_file().unwrap();
        let (mut p, _, _) = platform();
        let mut uart = Uart::new();
        let (mut d, _) = take_over(&fd, &mut uart, &mut p, 0);
        let loads: Vec<Access> = (1..=150).map(|seq| load(seq, LSR)).collect();
        let mut replies = Vec::new();
        let mut served = Served::default();
        assert_eq!(
            apply(&loads, &mut p, &mut uart, &mut d, &mut replies, &mut served),
            MAX_SAVED_REPLIES
        );
        let replies = run(&loads, &mut p, &mut uart, &mut d, &mut served);
        assert_eq!(replies.len(), 150);
        assert_eq!(
            take_over(&fd, &mut Uart::new(), &mut p, 150).1,
            Resumed::From {
                applied_seq: 150,
                replies: 150 - 2 * MAX_SAVED_REPLIES
            }
        );
        // A successor that found only two records pending skips only those.
        let (mut d, _) = take_over(&fd, &mut uart, &mut p, 2);
        let mut served = Served::default();
        run(&loads[..5], &mut p, &mut uart, &mut d, &mut served);
        assert_eq!((served.redelivered, served.accesses), (2, 3));
    }
}
