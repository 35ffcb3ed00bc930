//! A PCI device whose BAR0 is served by an emulator process, and the
//! supervision of that process: start, report its end, restart. The
//! device's state region (with the user device) outlives its emulators: a
//! restarted one continues from the state its predecessor committed.
//!
//! Normally BAR0 is a user device and the emulator takes the accesses from
//! its ring. For comparison, the transport can instead be a socket: BAR0
//! accesses then exit to the VMM, whose vCPU thread forwards them
//! ([`EmulatedDevice::forward`]), the classic out-of-process path.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use emulator::handoff::{self, Control, MemRegion, Setup, Transport};
use emulator::state::{Committed, StateRegion};
use emulator::wire;
use userdev::{Access, Op, Range, Stats, UserDevice};

use crate::spawn::{self, Child, ExitStatus};

/// How to start this device's emulators.
#[derive(Clone, Debug)]
pub struct EmulatorSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub model: String,
    pub shadow: bool,
    pub forward: Vec<u64>,
    /// BAR0 offsets of 4-byte registers whose stores the emulator batches.
    pub batch: Vec<u64>,
    /// The user device's wakeup settings; `None` keeps the kernel's.
    pub tuning: Tuning,
    /// Start a new emulator (through a new backend fd) when one ends.
    pub restart: bool,
    /// How long a vCPU waits for the emulator, at most 1 s (the kernel's
    /// default: 100 ms; with `restart`, [`RESTART_ACCESS_TIMEOUT`]).
    pub access_timeout: Option<Duration>,
    pub transport: Transport,
}

/// How the user device wakes the emulator and the vCPUs (user.rst,
/// *Handoff and polling* and *Batched stores*).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// How long a vCPU may poll for a reply (at most 1 ms).
    pub poll: Option<Duration>,
    /// Whether a forwarded load and its reply hand the CPU over.
    pub handoff: Option<bool>,
    /// How long a batched store may wait before the emulator is woken.
    pub batch_delay: Option<Duration>,
}

impl Tuning {
    fn apply(&self, device: &UserDevice) -> userdev::Result<()> {
        if let Some(poll) = self.poll {
            device.set_poll(poll)?;
        }
        if let Some(on) = self.handoff {
            device.set_handoff(on)?;
        }
        if let Some(delay) = self.batch_delay {
            device.set_batch_delay(delay)?;
        }
        Ok(())
    }
}

/// How long a forwarded load waits for its reply by default, as the
/// kernel's user device does.
const DEFAULT_ACCESS_TIMEOUT: Duration = Duration::from_millis(100);
/// The access timeout with restart, unless one is given: the kernel's
/// maximum, since a load waiting for the successor must be answered
/// within it (on the debug kernel a restart takes longer than 100 ms).
pub const RESTART_ACCESS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a starting emulator may take to serve its device.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("user device: {0}")]
    UserDev(#[from] userdev::Error),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("handoff: {0}")]
    Handoff(#[from] handoff::HandoffError),
    #[error("{0}")]
    State(#[from] emulator::state::RegionError),
    #[error("no state to save or restore: the device is not a user device")]
    NoState,
    #[error("restoring a running device takes a new emulator: start the VMM with --restart")]
    NoRestart,
    #[error("{op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Names the KVM call that failed.
pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceError {
    move |source| DeviceError::Kvm { op, source }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Io { op, source }
}

/// The emulator side, shared with the thread that waits for it.
struct Supervised {
    child: Option<Child>,
    control: Option<UnixDatagram>,
    /// With restart: the next emulator, started ahead and waiting for its
    /// setup (it holds nothing of the guest's yet), so that a restart does
    /// not wait for a process to be created and loaded.
    standby: Option<(Child, UnixDatagram)>,
    /// A delayed kill ([`EmulatedDevice::kill_emulator_later`]) is pending.
    kill_pending: bool,
    /// When the VMM last killed the emulator, for the restart's log line.
    killed_at: Option<Instant>,
    /// With [`Transport::Socket`]: the VMM's end of the access socket.
    accesses: Option<Arc<UnixDatagram>>,
    /// Bumped whenever an emulator has ended and was reaped.
    generation: u64,
    exits: Vec<ExitStatus>,
    msi_enabled: bool,
}

/// A PCI device whose BAR0 an emulator process serves: through a user
/// device (its device fd here, the backend fd in the emulator) or, for
/// comparison, over a socket.
pub struct EmulatedDevice {
    pub name: String,
    /// The user device (none with the socket transport).
    pub user_device: Option<UserDevice>,
    spec: EmulatorSpec,
    memory_file: std::fs::File,
    memory: Vec<MemRegion>,
    irqs: Irqfds,
    console: Option<Console>,
    /// The device's state region ([`emulator::state`]), with the user
    /// device: made once, handed to every emulator of the device, so that
    /// a restarted one continues where the last one stopped.
    state_region: Option<std::fs::File>,
    state: Mutex<Supervised>,
    ended: Condvar,
    /// Socket transport: the next access's sequence number, and loads
    /// that got no reply in time.
    next_seq: AtomicU64,
    timeouts: AtomicU64,
}

const RANGE_BAR0: u16 = emulator::serve::BAR0_RANGE;

/// How a device's interrupt reaches the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wiring {
    /// A PCI function: INTx on a level-triggered GSI (an irqfd with a
    /// resample fd), and one MSI route.
    Pci { intx_gsi: u32, msi_gsi: u32 },
    /// An ISA device: an edge-triggered GSI (a plain irqfd, which pulses
    /// the line).
    Isa { gsi: u32 },
}

/// The irqfds registered for a device, by its [`Wiring`].
enum Irqfds {
    Pci {
        intx: EventFd,
        resample: EventFd,
        msi: EventFd,
    },
    Isa(EventFd),
}

impl Irqfds {
    fn register(vm: &VmFd, wiring: Wiring) -> Result<Self, DeviceError> {
        Ok(match wiring {
            Wiring::Pci { intx_gsi, msi_gsi } => {
                let (intx, resample, msi) = (eventfd()?, eventfd()?, eventfd()?);
                vm.register_irqfd_with_resample(&intx, &resample, intx_gsi)
                    .map_err(kvm_err("KVM_IRQFD (resample)"))?;
                vm.register_irqfd(&msi, msi_gsi)
                    .map_err(kvm_err("KVM_IRQFD"))?;
                Irqfds::Pci {
                    intx,
                    resample,
                    msi,
                }
            }
            Wiring::Isa { gsi } => {
                let irq = eventfd()?;
                vm.register_irqfd(&irq, gsi).map_err(kvm_err("KVM_IRQFD"))?;
                Irqfds::Isa(irq)
            }
        })
    }
}

/// A console the device's emulator reads and writes: the read end of a
/// pipe the VMM feeds from its stdin, and the emulator's end of the socket
/// that carries the output to the VMM's stdout ([`crate::console`]).
pub struct Console {
    pub input: std::os::fd::OwnedFd,
    pub output: std::os::fd::OwnedFd,
    pub stream: Arc<crate::console::Output>,
}

/// An eventfd for an irqfd: close-on-exec, non-blocking.
pub(crate) fn eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(io("eventfd"))
}

impl EmulatedDevice {
    /// Creates the user device and its interrupt plumbing: INTx on
    /// `intx_gsi` with a resample fd, MSI on `msi_gsi`.
    pub fn new(
        vm: &VmFd,
        name: String,
        spec: EmulatorSpec,
        memory_file: BorrowedFd<'_>,
        memory: Vec<MemRegion>,
        wiring: Wiring,
        console: Option<Console>,
    ) -> Result<Arc<Self>, DeviceError> {
        let user_device = match spec.transport {
            Transport::Ring => {
                let device = UserDevice::create(vm)?;
                let restart_timeout = spec.restart.then_some(RESTART_ACCESS_TIMEOUT);
                if let Some(t) = spec.access_timeout.or(restart_timeout) {
                    device.set_timeout(t)?;
                }
                spec.tuning.apply(&device)?;
                // Without a successor nobody takes a kept queue over: the
                // guest is better served by failing at once.
                device.set_keep_queue(spec.restart)?;
                Some(device)
            }
            Transport::Socket => None,
        };
        let irqs = Irqfds::register(vm, wiring)?;
        let memory_file = std::fs::File::from(
            memory_file
                .try_clone_to_owned()
                .map_err(io("dup memory fd"))?,
        );
        let state_region = match &user_device {
            Some(_) => Some(std::fs::File::from(emulator::state::create_file()?)),
            None => None,
        };
        Ok(Arc::new(EmulatedDevice {
            name,
            user_device,
            spec,
            memory_file,
            memory,
            irqs,
            console,
            state_region,
            state: Mutex::new(Supervised {
                child: None,
                control: None,
                standby: None,
                kill_pending: false,
                killed_at: None,
                accesses: None,
                generation: 0,
                exits: Vec::new(),
                msi_enabled: false,
            }),
            ended: Condvar::new(),
            next_seq: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }))
    }

    /// Places the device's window (BAR0, or its fixed ports) at `range`
    /// (moving it if needed) or, with `None`, removes it.
    pub fn set_window(&self, range: Option<Range>) -> Result<(), DeviceError> {
        // Without a user device, accesses simply exit to the VMM.
        let Some(device) = &self.user_device else {
            return Ok(());
        };
        match range {
            Some(r) => device.set_range(RANGE_BAR0, r)?,
            None => device.remove_range(RANGE_BAR0)?,
        }
        Ok(())
    }

    /// Waits until the emulator has consumed the guest's accesses queued so
    /// far: called before the VMM applies a configuration write to the
    /// device, which must not pass the guest's posted stores (PCI ordering:
    /// a non-posted request does not pass posted writes), and when the
    /// guest has ended, so that its last stores are not lost. Bounded by the
    /// device's timeout. A slow or vanished emulator is only logged: the
    /// supervisor reports an emulator's end, and the guest keeps running.
    /// The socket transport has nothing to drain: there the vCPU thread
    /// itself hands the emulator each access, in order.
    pub fn drain(&self) {
        let Some(device) = &self.user_device else {
            return;
        };
        // A timeout or a released backend (its accesses were dropped and
        // counted) leaves nothing to wait for; any other failure neither.
        if let Err(e) = device.drain() {
            emulator::log!(
                "vmm: {}: waiting for the emulator to catch up: {e}",
                self.name
            );
        }
    }

    /// The device's state region, mapped in the VMM.
    fn map_state_region(&self) -> Result<StateRegion, DeviceError> {
        let region = self.state_region.as_ref().ok_or(DeviceError::NoState)?;
        let fd = region.try_clone().map_err(io("dup the state region"))?;
        Ok(StateRegion::map(fd.into())?)
    }

    /// The device's state as its emulators last committed it, once the
    /// emulator has consumed every access queued (KVM_USER_DRAIN); the
    /// state at reset if none was committed yet. It is as consistent as
    /// the guest is still: the caller holds it (the vCPU that asks for a
    /// snapshot waits in the VMM meanwhile).
    pub fn save_state(&self) -> Result<Vec<u8>, DeviceError> {
        let device = self.user_device.as_ref().ok_or(DeviceError::NoState)?;
        device.drain()?;
        let mut state = Vec::new();
        match self.map_state_region()?.committed()? {
            Some(c) => state = c.state,
            None => emulator::model::by_name(&self.spec.model)
                .expect("the machine checked the model")
                .save(&mut state),
        }
        Ok(state)
    }

    /// Commits `state` to the state region, for the next emulator to
    /// resume from: call it before [`Self::start`], or with no emulator
    /// attached. The console stream goes on where the last commit left it.
    /// The emulator checks the state as it checks any it resumes from.
    pub fn restore_state(&self, state: &[u8]) -> Result<(), DeviceError> {
        let mut region = self.map_state_region()?;
        // A region that does not check out is reset: the stream from 0.
        let output_end = region
            .take_over()
            .ok()
            .flatten()
            .map_or(0, |c| c.output_end);
        region.commit(&Committed {
            state: state.to_vec(),
            output_end,
            ..Committed::default()
        })?;
        Ok(())
    }

    /// Puts the running device back into `state`: drains its queue, ends
    /// its emulator, commits `state` before a successor can take over, and
    /// returns once the successor serves (with restart only: without, the
    /// device would be left without an emulator). The guest must be held
    /// meanwhile, as for [`Self::save_state`].
    pub fn restore_in_place(&self, state: &[u8]) -> Result<(), DeviceError> {
        if !self.spec.restart {
            return Err(DeviceError::NoRestart);
        }
        self.user_device
            .as_ref()
            .ok_or(DeviceError::NoState)?
            .drain()?;
        let st = self.state.lock().expect("device lock");
        let (Some(child), Some(control)) = (&st.child, &st.control) else {
            return Err(DeviceError::NoState);
        };
        // Under the lock, which the supervisor needs to start the
        // successor: the state is in place before that. Once the old
        // emulator has closed its descriptors it writes nothing more.
        spawn::kill(child).map_err(io("kill emulator"))?;
        spawn::wait_closed(child, control).map_err(io("wait for the emulator's end"))?;
        self.restore_state(state)?;
        let generation = st.generation;
        let (_st, waited) = self.wait_while(st, READY_TIMEOUT, |st| {
            st.generation == generation || st.child.is_none()
        });
        if !waited {
            return Err(DeviceError::Io {
                op: "wait for the restored emulator",
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        Ok(())
    }

    /// Socket transport: hands a BAR0 access that exited to the VMM to the
    /// emulator; for a load, waits for the value. Like the user device, a
    /// load that gets no reply in time, or no emulator, reads all-ones.
    pub fn forward(&self, op: Op, offset: u64, len: u8, data: u64) -> u64 {
        let socket = self.state.lock().expect("device lock").accesses.clone();
        let Some(socket) = socket else { return !0 };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let access = Access {
            seq,
            range: RANGE_BAR0,
            offset,
            len,
            op,
            data: userdev::data::from_u64(data, len),
            vcpu: 0,
        };
        if socket.send(&wire::encode_access(&access)).is_err() {
            return !0;
        }
        if op == Op::Store {
            return 0;
        }
        let mut buf = [0u8; wire::REPLY_LEN];
        loop {
            let reply = match socket.recv(&mut buf) {
                Ok(n) => wire::decode_reply(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) {
                        self.timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    return !0;
                }
            };
            match reply {
                Some(r) if r.seq == seq => return r.value(len),
                // A late reply to a load that timed out: drop it.
                Some(r) if r.seq < seq => {}
                // End of file (the emulator is gone), or garbage.
                _ => return !0,
            }
        }
    }

    /// Socket transport: loads that read all-ones because no reply came in
    /// time.
    pub fn forward_timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// The guest turned MSI on or off: tell the emulator, which picks the
    /// irqfd. Sent before the vCPU resumes, so it precedes the guest's next
    /// access to the device.
    pub fn set_msi_enabled(&self, on: bool) {
        let mut st = self.state.lock().expect("device lock");
        st.msi_enabled = on;
        if let Some(c) = &st.control {
            // A dead emulator's socket fails; its successor gets the state
            // in its setup.
            let _ = c.send(Control::MsiEnabled(on).encode().as_bytes());
        }
    }

    /// The user device's counters (none with the socket transport).
    pub fn stats(&self) -> Option<Result<Stats, DeviceError>> {
        let device = self.user_device.as_ref()?;
        Some(device.stats().map_err(DeviceError::from))
    }

    /// The device model's name.
    pub fn model(&self) -> &str {
        &self.spec.model
    }

    /// How the emulators of this device ended so far.
    pub fn exits(&self) -> Vec<ExitStatus> {
        self.state.lock().expect("device lock").exits.clone()
    }

    /// Starts the first emulator and the thread that supervises it.
    pub fn start(self: &Arc<Self>) -> Result<(), DeviceError> {
        let mut st = self.state.lock().expect("device lock");
        self.start_locked(&mut st)?;
        // The guest must not reach the device before the emulator serves
        // it: its first accesses would wait, time out and stall the
        // backend. An emulator that dies first is the supervisor's business.
        if let Some(control) = &st.control {
            if let Err(e) = handoff::wait_ready(control, READY_TIMEOUT) {
                emulator::log!("vmm: {}: the emulator did not report ready: {e}", self.name);
            }
        }
        drop(st);
        let dev = self.clone();
        std::thread::Builder::new()
            .name(format!("supervise-{}", self.name))
            .spawn(move || dev.supervise())
            .map_err(io("supervisor thread"))?;
        Ok(())
    }

    fn start_locked(&self, st: &mut Supervised) -> Result<(), DeviceError> {
        // What the emulator takes accesses from: a new backend fd, or its
        // end of a new access socket.
        let (accesses, vmm_end): (std::os::fd::OwnedFd, _) = match &self.user_device {
            Some(device) => (self.create_backend(device)?, None),
            None => {
                let (vmm_end, theirs) = handoff::socketpair().map_err(io("socketpair"))?;
                let timeout = self.spec.access_timeout.unwrap_or(DEFAULT_ACCESS_TIMEOUT);
                vmm_end
                    .set_read_timeout(Some(timeout))
                    .map_err(io("access socket timeout"))?;
                (theirs.into(), Some(Arc::new(vmm_end)))
            }
        };
        let (child, ours) = match st.standby.take() {
            Some(standby) => standby,
            None => self.spawn_emulator()?,
        };
        let pci = matches!(self.irqs, Irqfds::Pci { .. });
        let setup = Setup {
            model: self.spec.model.clone(),
            memory: self.memory.clone(),
            intx: pci,
            isa_irq: !pci,
            msi_vectors: pci.into(),
            msi_enabled: st.msi_enabled,
            shadow: self.spec.shadow,
            forward: self.spec.forward.clone(),
            batch: self.spec.batch.clone(),
            transport: self.spec.transport,
            console: self.console.as_ref().map(|c| c.stream.offset()),
            state_region: self
                .state_region
                .as_ref()
                .map(|_| emulator::state::STATE_REGION_SIZE as u64),
        };
        // In the order the handoff defines.
        let mut fds: Vec<&dyn AsRawFd> = vec![&accesses, &self.memory_file];
        match &self.irqs {
            Irqfds::Pci {
                intx,
                resample,
                msi,
            } => fds.extend([intx as &dyn AsRawFd, resample, msi]),
            Irqfds::Isa(irq) => fds.push(irq),
        }
        if let Some(c) = &self.console {
            fds.extend([&c.input as &dyn AsRawFd, &c.output]);
        }
        if let Some(region) = &self.state_region {
            fds.push(region);
        }
        // If the emulator died already, the send fails or goes nowhere; the
        // supervisor reports its end either way.
        if let Err(e) = handoff::send_setup(&ours, &setup, &fds) {
            emulator::log!(
                "vmm: {}: handing descriptors to emulator pid {}: {e}",
                self.name,
                child.pid
            );
        }
        emulator::log!("vmm: {}: emulator pid {} started", self.name, child.pid);
        st.child = Some(child);
        st.control = Some(ours);
        st.accesses = vmm_end;
        Ok(())
    }

    /// A new emulator process, loaded and waiting for its setup on the
    /// socket whose other end is returned. One that does not say so in
    /// time is still returned: its setup waits in the socket, and whether
    /// it lives is the supervisor's business.
    fn spawn_emulator(&self) -> Result<(Child, UnixDatagram), DeviceError> {
        let (ours, theirs) = handoff::socketpair().map_err(io("socketpair"))?;
        let child = spawn::spawn(&self.spec.program, &self.spec.args, &theirs)
            .map_err(io("start emulator"))?;
        drop(theirs);
        if let Err(e) = handoff::wait_waiting(&ours, READY_TIMEOUT) {
            emulator::log!(
                "vmm: {}: emulator pid {} is not waiting for its setup: {e}",
                self.name,
                child.pid
            );
        }
        Ok((child, ours))
    }

    /// With restart, starts the standby emulator if there is none, without
    /// holding the device's lock while it loads. A failure only costs the
    /// next restart its head start.
    fn prepare_standby(&self) {
        if !self.spec.restart || self.state.lock().expect("device lock").standby.is_some() {
            return;
        }
        match self.spawn_emulator() {
            Ok(standby) => {
                self.state.lock().expect("device lock").standby = Some(standby);
                self.ended.notify_all();
            }
            Err(e) => emulator::log!("vmm: {}: standby emulator: {e}", self.name),
        }
    }

    /// A new backend fd, once the previous one is released: the kernel
    /// releases it when the last reference (the dead emulator's descriptor
    /// and mappings) goes, which is done by the time the process is reaped;
    /// retry briefly all the same.
    fn create_backend(&self, device: &UserDevice) -> Result<std::os::fd::OwnedFd, DeviceError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match device.create_backend(true) {
                Err(userdev::Error::BackendAttached) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                r => return Ok(r?),
            }
        }
    }

    fn supervise(&self) {
        self.prepare_standby();
        loop {
            let watched = {
                let st = self.state.lock().expect("device lock");
                let (Some(child), Some(control)) = (&st.child, &st.control) else {
                    return;
                };
                child
                    .try_clone()
                    .and_then(|child| Ok((child, control.try_clone()?)))
            };
            let (child, control) = match watched {
                Ok(w) => w,
                Err(e) => {
                    emulator::log!("vmm: {}: watching the emulator: {e}", self.name);
                    return;
                }
            };
            let pid = child.pid;
            if let Err(e) = spawn::wait_closed(&child, &control) {
                emulator::log!("vmm: {}: waiting for emulator pid {pid}: {e}", self.name);
                return;
            }
            let hung_up = Instant::now();
            // It is dying, or broke the protocol by closing its end: either
            // way it must go (a signal to a process that exits already
            // changes nothing). The successor takes over now, the reaping
            // comes after.
            let _ = spawn::kill(&child);
            let mut st = self.state.lock().expect("device lock");
            st.child = None;
            st.control = None;
            st.accesses = None;
            let restarted = self.spec.restart && {
                match self.start_locked(&mut st) {
                    Ok(()) => true,
                    Err(e) => {
                        emulator::log!("vmm: {}: restart failed: {e}", self.name);
                        false
                    }
                }
            };
            let control = st.control.as_ref().and_then(|c| c.try_clone().ok());
            let successor = st.child.as_ref().map(|c| c.pid);
            let killed_at = st.killed_at.take();
            drop(st);
            if let (Some(control), Some(successor)) = (control, successor) {
                // An emulator that dies first closes its end: no wait.
                if handoff::wait_ready(&control, READY_TIMEOUT).is_ok() {
                    self.log_restart(pid, successor, hung_up, killed_at);
                }
            }
            let status = match spawn::wait(pid) {
                Ok(s) => s,
                Err(e) => {
                    emulator::log!("vmm: {}: reaping emulator pid {pid}: {e}", self.name);
                    return;
                }
            };
            emulator::log!("vmm: {}: emulator pid {pid} {status}", self.name);
            let mut st = self.state.lock().expect("device lock");
            st.exits.push(status);
            st.generation += 1;
            drop(st);
            self.ended.notify_all();
            if !restarted {
                emulator::log!("vmm: {}: no emulator; the guest sees all-ones", self.name);
                return;
            }
            // The next standby once the successor serves: starting a
            // process sooner would slow the take-over down.
            self.prepare_standby();
        }
    }

    /// How long the guest may have waited on a restart: the evidence to
    /// compare with the access timeout when a load read all-ones.
    fn log_restart(&self, old: i32, new: i32, hung_up: Instant, killed_at: Option<Instant>) {
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1e3;
        let after_kill = killed_at.map_or(String::new(), |k| {
            format!(", {:.1} ms after the kill", ms(k))
        });
        emulator::log!(
            "vmm: {}: emulator pid {new} serves {:.1} ms after pid {old} hung up{after_kill}",
            self.name,
            ms(hung_up)
        );
    }

    /// Kills the current emulator and waits until it has ended (and, with
    /// restart, a new one was started).
    pub fn kill_emulator(&self) -> Result<(), DeviceError> {
        let mut st = self.state.lock().expect("device lock");
        let Some(child) = &st.child else {
            return Ok(());
        };
        spawn::kill(child).map_err(io("kill emulator"))?;
        st.killed_at = Some(Instant::now());
        let generation = st.generation;
        let (_st, waited) = self.wait_while(st, Duration::from_secs(10), |st| {
            st.generation == generation
        });
        if !waited {
            return Err(DeviceError::Io {
                op: "wait for the killed emulator",
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        Ok(())
    }

    /// Waits, at most `timeout`, while `busy` holds of the supervision
    /// state (it changes under the lock, with `ended` notified); the guard,
    /// and whether `busy` stopped holding.
    fn wait_while<'a>(
        &self,
        st: MutexGuard<'a, Supervised>,
        timeout: Duration,
        busy: impl FnMut(&mut Supervised) -> bool,
    ) -> (MutexGuard<'a, Supervised>, bool) {
        let (st, result) = self
            .ended
            .wait_timeout_while(st, timeout, busy)
            .expect("device lock");
        (st, !result.timed_out())
    }

    /// Waits (at most [`READY_TIMEOUT`]) until no delayed kill is pending
    /// and an emulator serves again.
    pub fn wait_for_kills(&self) {
        let st = self.state.lock().expect("device lock");
        let (_st, waited) = self.wait_while(st, READY_TIMEOUT, |st| {
            st.kill_pending || st.child.is_none()
        });
        if !waited {
            emulator::log!("vmm: {}: a kill or restart did not end", self.name);
        }
    }

    /// Kills the current emulator after `delay`, without waiting for it.
    /// Returns once the kill is armed: the previous delayed kill done, and
    /// the emulator it hits serving with a successor on standby (at most
    /// [`READY_TIMEOUT`]), so that kills never come faster than the VMM
    /// restarts emulators.
    pub fn kill_emulator_later(self: &Arc<Self>, delay: Duration) {
        let st = self.state.lock().expect("device lock");
        let restart = self.spec.restart;
        let (mut st, waited) = self.wait_while(st, READY_TIMEOUT, |st| {
            st.kill_pending || st.child.is_none() || (restart && st.standby.is_none())
        });
        if !waited {
            emulator::log!("vmm: {}: no emulator to kill", self.name);
            return;
        }
        st.kill_pending = true;
        drop(st);
        let dev = self.clone();
        let killer = std::thread::Builder::new()
            .name(format!("kill-{}", self.name))
            .spawn(move || {
                std::thread::sleep(delay);
                if let Err(e) = dev.kill_emulator() {
                    emulator::log!("vmm: {}: {e}", dev.name);
                }
                dev.state.lock().expect("device lock").kill_pending = false;
                dev.ended.notify_all();
            });
        if let Err(e) = killer {
            emulator::log!("vmm: kill thread: {e}");
            self.state.lock().expect("device lock").kill_pending = false;
        }
    }
}
