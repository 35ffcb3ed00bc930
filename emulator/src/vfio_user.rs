//! A vfio-user server: the emulator serving a PCI device model to a VMM
//! that speaks vfio-user (QEMU's `-device vfio-user-pci,socket=PATH`).
//!
//! The client (the VMM) asks over one UNIX stream socket; the server
//! answers each request in order. What the device is made of:
//!
//! - **Regions.** BAR0 (the model's registers, read and written over the
//!   socket) and the configuration space ([`ConfigSpace`]: identity, BAR0,
//!   INTA and MSI, the same the project's VMM presents). The other BARs, the
//!   ROM and VGA are absent (size 0). Nothing is mmappable.
//! - **Interrupts.** INTx (maskable, automasked) and MSI with the model's
//!   vectors, each through the eventfds the client sets: with KVM these
//!   are irqfds, and INTx's unmask eventfd is KVM's resample fd, so the
//!   line works as it does under our VMM ([`Platform`]). A client that
//!   unmasks INTx with a message (no KVM irqchip) gets the same effect.
//! - **DMA.** Guest memory the client shares as file descriptors (a
//!   `memory-backend-memfd` with `share=on` in QEMU) is mapped and used as
//!   guest memory; memory it maps without a descriptor, or read-only, is
//!   not reachable by the device's DMA (the protocol's DMA_READ/WRITE
//!   messages are not implemented).
//! - **Reset.** A fresh model and configuration space; DMA mappings and
//!   eventfds stay.
//!
//! rust-vmm's `vfio_user` crate has a server, but it cannot be this one:
//! its loop blocks in accept and read and cannot watch an eventfd beside
//! the socket, it announces fixed capabilities, and an error it does not
//! class as invalid input reaches the client as errno 0. The messages are
//! therefore parsed here ([`message`]); the crate's command numbers name
//! the requests, and its client drives this server in the tests.
//!
//! Descriptors the client sends are installed by the kernel at the lowest
//! free numbers. The sandbox pins each system call to the descriptors it
//! may use, so an eventfd is moved to a fixed slot ([`SLOTS`]) before it is
//! used; the sandbox allows `write` and `read` on the slots only.

pub mod message;

use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Command;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::model::{DeviceModel, PciIdentity, Placement};
use crate::pci::{ConfigSpace, CONFIG_SIZE};
use crate::serve::{
    Batch, ConsoleInput, Intx, MapSpec, Platform, ServeError, Served, Spin, SHADOW_SIZE,
};
use message::{Errno, Header, EINVAL, HEADER_SIZE};
use userdev::Backend;

/// The protocol version this server speaks.
pub const MAJOR: u16 = 0;
pub const MINOR: u16 = 1;

/// The largest region access the server takes or gives, announced as
/// `max_data_xfer_size` (QEMU's default).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Descriptors one message may carry, announced as `max_msg_fds`.
pub const MAX_MSG_FDS: usize = 8;
/// DMA mappings the server keeps at once, announced as `max_dma_maps`.
/// Each holds its descriptor open; with [`MAX_MSG_FDS`] more in flight
/// they stay below [`SLOTS`].
pub const MAX_DMA_MAPS: usize = 16;
/// The most MSI vectors a model may have.
pub const MAX_MSI_VECTORS: u32 = 32;
/// Fixed descriptor numbers for what the client sends to keep: a user
/// device's backend fd, the INTx trigger and unmask eventfds, then the MSI
/// vectors' eventfds. The sandbox's `RLIMIT_NOFILE` ends at `SLOTS.end`.
pub const SLOTS: Range<RawFd> = 40..(43 + MAX_MSI_VECTORS as RawFd);
pub const BACKEND_SLOT: RawFd = SLOTS.start;
const INTX_TRIGGER_SLOT: RawFd = SLOTS.start + 1;
const INTX_UNMASK_SLOT: RawFd = SLOTS.start + 2;
const MSI_SLOT: RawFd = SLOTS.start + 3;

/// The version capability by which a client offers KVM user devices and
/// the server names the regions it serves through them (see
/// [`Server::attach_backend`]).
pub const CAP_KVM_USER_DEVICE: &str = "kvm_user_device";
/// The request that hands the server a user device's backend fd for one
/// region: `u32 argsz, u32 flags (0), u32 region, u32 range`, the backend
/// fd attached. Proposed with the capability by `qemu-patch/`, whose
/// change to the specification describes both; a client sends it only to a
/// server that named the region in [`CAP_KVM_USER_DEVICE`].
pub const KVM_USER_BACKEND: u16 = 19;
/// The regions a user device may serve: BAR0, the model's registers.
const USER_DEVICE_REGIONS: [u32; 1] = [VFIO_PCI_BAR0_REGION_INDEX];

/// The largest message the server reads: a region write of
/// [`MAX_DATA_XFER`] bytes and its fields.
const MAX_MESSAGE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER as usize;

const ENOTSUP: Errno = Errno(libc::EOPNOTSUPP);
const ENOSPC: Errno = Errno(libc::ENOSPC);

/// What the server did, for the log and for tests that check which path
/// the guest's accesses took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests handled (replied or not).
    pub requests: u64,
    /// BAR0 loads and stores that came over the socket.
    pub bar_loads: u64,
    pub bar_stores: u64,
    pub config_reads: u64,
    pub config_writes: u64,
    pub dma_maps: u64,
    pub dma_unmaps: u64,
    /// Requests refused with an error.
    pub errors: u64,
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests={} bar_loads={} bar_stores={} config_reads={} config_writes={} dma_maps={} dma_unmaps={} errors={}",
            self.requests,
            self.bar_loads,
            self.bar_stores,
            self.config_reads,
            self.config_writes,
            self.dma_maps,
            self.dma_unmaps,
            self.errors
        )
    }
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the device model is not a PCI function")]
    NotPci,
    #[error("the model has {0} MSI vectors, at most {MAX_MSI_VECTORS} are served")]
    TooManyVectors(u32),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A guest memory range the client shared.
struct Dma {
    address: u64,
    size: u64,
    region: Arc<GuestRegionMmap>,
}

/// The server's side of one client connection.
pub struct Server {
    stream: UnixStream,
    model_name: String,
    model: Box<dyn DeviceModel>,
    identity: PciIdentity,
    config: ConfigSpace,
    pub platform: Platform,
    dma: Vec<Dma>,
    /// The client completed the version handshake.
    negotiated: bool,
    /// Eventfds go to fixed descriptors ([`SLOTS`]), for the sandbox.
    slots: bool,
    /// The client offered KVM user devices in its version message.
    user_device_offered: bool,
    /// BAR0's user device, once the client has handed over its backend.
    backend: Option<Backend>,
    /// What its access map leaves out or batches.
    map_spec: MapSpec,
    batch: Batch,
    input: ConsoleInput,
    /// Adaptive polling of the ring before each sleep, as under our VMM.
    spin: Option<Spin>,
    /// Accesses that came through the user device's ring.
    pub served: Served,
    pub counters: Counters,
}

/// A descriptor the kernel just installed for us, owned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor received with SCM_RIGHTS that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An eventfd the client sent, at descriptor `slot` of [`SLOTS`] if the
/// server keeps them there (then whatever was there is closed), else
/// where it is.
fn eventfd_at(fd: OwnedFd, slot: RawFd, slots: bool) -> Result<EventFd, Errno> {
    if !slots {
        // SAFETY: `fd` is a descriptor the client sent (an eventfd, or the
        // writes to it fail and are counted), owned by nobody else.
        return Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) });
    }
    // SAFETY: dup3 takes two descriptor numbers; `slot` is ours to reuse
    // (SLOTS holds nothing else), and `fd` stays owned and is closed on drop.
    if unsafe { libc::dup3(fd.as_raw_fd(), slot, libc::O_CLOEXEC) } < 0 {
        return Err(EINVAL);
    }
    // SAFETY: dup3 just made `slot` a copy of the eventfd, owned by nobody else.
    Ok(unsafe { EventFd::from_raw_fd(slot) })
}

impl Server {
    /// A server for the model called `model_name` on the connected
    /// `stream`; with `slots` the eventfds it receives are kept at
    /// [`SLOTS`], which must hold nothing else.
    pub fn new(stream: UnixStream, model_name: &str, slots: bool) -> Result<Self, ServerError> {
        let model = crate::model::by_name(model_name)
            .ok_or_else(|| ServerError::Protocol(format!("unknown model {model_name}")))?;
        let Placement::Pci(identity) = model.placement() else {
            return Err(ServerError::NotPci);
        };
        if identity.msi_vectors > MAX_MSI_VECTORS {
            return Err(ServerError::TooManyVectors(identity.msi_vectors));
        }
        Ok(Server {
            stream,
            model_name: model_name.to_string(),
            model,
            identity,
            config: ConfigSpace::endpoint(&identity, 0),
            platform: Platform::empty(),
            dma: Vec::new(),
            negotiated: false,
            slots,
            user_device_offered: false,
            backend: None,
            map_spec: MapSpec::default(),
            batch: Batch::default(),
            input: ConsoleInput::default(),
            spin: None,
            served: Served::default(),
            counters: Counters::default(),
        })
    }

    /// BAR0 offsets a user device forwards rather than serving them from
    /// the shadow image, and offsets of 4-byte registers whose stores it
    /// batches (as the VMM's `--forward` and `--batch`).
    pub fn set_access_map_spec(&mut self, spec: MapSpec) {
        self.map_spec = spec;
    }

    /// Watch a user device's ring adaptively before sleeping (see
    /// [`Spin`]; not on a machine with one CPU).
    pub fn set_spin(&mut self, spin: Spin) {
        self.spin = Some(spin);
    }

    pub fn socket(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The INTx unmask eventfd, which the loop watches.
    pub fn unmask_fd(&self) -> Option<RawFd> {
        self.platform
            .intx
            .as_ref()
            .and_then(|i| i.resample.as_ref())
            .map(|r| r.as_raw_fd())
    }

    /// Serves the client until it hangs up.
    pub fn run(&mut self) -> Result<(), ServerError> {
        loop {
            let mut fds =
                [self.socket(), self.unmask_fd().unwrap_or(-1), -1].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            if let Some(backend) = &self.backend {
                fds[2].fd = backend.as_raw_fd();
            }
            // Work found while spinning: still look at the other sources,
            // without sleeping.
            let busy = match (&self.backend, self.spin.as_mut()) {
                (Some(backend), Some(spin)) => spin.wait(backend),
                _ => false,
            };
            let timeout = if busy { 0 } else { -1 };
            // SAFETY: `fds` is a live array of three pollfds; poll writes
            // only their revents.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if let (Some(backend), Some(spin)) = (&self.backend, self.spin.as_mut()) {
                if !busy && backend.pending() > 0 {
                    spin.woke();
                }
            }
            // The guest acknowledges the device (a posted store) before its
            // EOI: the ring and the requests already sent first, then the
            // line. (Requests that arrive meanwhile are answered first too:
            // a store made after the EOI then counts as made before it,
            // which can only spare an interrupt that it cleared anyway.)
            self.serve_ring()?;
            if fds[1].revents != 0 {
                if !self.handle_sent()? {
                    return Ok(());
                }
                self.platform.intx_eoi();
            }
            if fds[0].revents != 0 {
                // What the guest queued before the client sent the request
                // comes first (a posted store before a config read).
                self.serve_ring()?;
                if !self.handle_one()? {
                    return Ok(());
                }
            }
        }
    }

    /// Answers the requests that have arrived, without waiting for more;
    /// false once the client hung up.
    fn handle_sent(&mut self) -> Result<bool, ServerError> {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.socket(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, of which poll writes only revents.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n <= 0 {
                return Ok(true);
            }
            if !self.handle_one()? {
                return Ok(false);
            }
        }
    }

    /// Reads and answers one request; false once the client hung up.
    pub fn handle_one(&mut self) -> Result<bool, ServerError> {
        let mut head = [0u8; HEADER_SIZE];
        let mut raw = [-1 as RawFd; MAX_MSG_FDS];
        let mut iov = [libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        }];
        // SAFETY: the iovec covers `head`, which may take any bytes.
        let (n, nfds) = match unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => return Ok(true),
            Err(e) => return Err(io::Error::from(e).into()),
        };
        let fds: Vec<OwnedFd> = raw[..nfds].iter().map(|&fd| owned(fd)).collect();
        if n == 0 && fds.is_empty() {
            return Ok(false);
        }
        if n < HEADER_SIZE {
            self.stream.read_exact(&mut head[n..])?;
        }
        let header = Header::decode(&head);
        let size = header.size as usize;
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
            return Err(ServerError::Protocol(format!(
                "message {} (command {}) of {size} bytes",
                header.id, header.command
            )));
        }
        let mut payload = vec![0u8; size - HEADER_SIZE];
        self.stream.read_exact(&mut payload)?;
        if !header.is_request() {
            return Err(ServerError::Protocol(format!(
                "message {} is not a request (flags {:#x})",
                header.id, header.flags
            )));
        }
        self.counters.requests += 1;
        let reply = match self.dispatch(&header, &payload, fds) {
            Ok(body) => message::reply(&header, &body),
            Err(errno) => {
                self.counters.errors += 1;
                crate::log!(
                    "emulator[{}]: vfio-user: command {} refused: {}",
                    self.model_name,
                    header.command,
                    io::Error::from(errno)
                );
                message::error_reply(&header, errno.0)
            }
        };
        if header.wants_reply() {
            self.stream.write_all(&reply)?;
        }
        Ok(true)
    }

    fn dispatch(
        &mut self,
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<u8>, Errno> {
        if header.command == KVM_USER_BACKEND && self.negotiated {
            return self.attach_backend(payload, fds);
        }
        let command = Command::n(header.command).ok_or(ENOTSUP)?;
        if !self.negotiated && !matches!(command, Command::Version) {
            return Err(EINVAL);
        }
        // Only these take descriptors; any others are closed (dropped).
        if !matches!(command, Command::DmaMap | Command::SetIrqs) && !fds.is_empty() {
            return Err(EINVAL);
        }
        match command {
            Command::Version => self.version(payload),
            Command::DmaMap => self.dma_map(payload, fds),
            Command::DmaUnmap => self.dma_unmap(payload),
            Command::DeviceGetInfo => Ok(self.device_info()),
            Command::DeviceGetRegionInfo => self.region_info(payload),
            Command::GetIrqInfo => self.irq_info(payload),
            Command::SetIrqs => self.set_irqs(payload, fds),
            Command::RegionRead => self.region_read(payload),
            Command::RegionWrite => self.region_write(payload),
            Command::DeviceReset => self.reset().map(|()| Vec::new()),
            Command::Unknown
            | Command::GetRegionIoFds
            | Command::DmaRead
            | Command::DmaWrite
            | Command::UserDirtyPages => Err(ENOTSUP),
        }
    }

    fn version(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let client = message::Version::decode(payload)?;
        if self.negotiated || client.major != MAJOR {
            return Err(EINVAL);
        }
        self.negotiated = true;
        let mut capabilities = serde_json::json!({
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
            "max_dma_maps": MAX_DMA_MAPS,
        });
        // Answered only when offered: an unpatched client would warn about
        // a capability it does not know.
        self.user_device_offered = client.capability(CAP_KVM_USER_DEVICE).is_some();
        if self.user_device_offered {
            capabilities[CAP_KVM_USER_DEVICE] =
                serde_json::json!({ "regions": USER_DEVICE_REGIONS });
        }
        let capabilities = serde_json::json!({ "capabilities": capabilities });
        Ok(message::Version {
            major: MAJOR,
            minor: client.minor.min(MINOR),
            capabilities,
        }
        .encode())
    }

    fn device_info(&self) -> Vec<u8> {
        message::Writer::default()
            .u32(16)
            .u32(VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET)
            .u32(VFIO_PCI_NUM_REGIONS)
            .u32(VFIO_PCI_NUM_IRQS)
            .0
    }

    /// The size of region `index`; 0 for the regions the device lacks.
    fn region_size(&self, index: u32) -> u64 {
        match index {
            VFIO_PCI_BAR0_REGION_INDEX => self.identity.bar0_size,
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
            _ => 0,
        }
    }

    fn region_info(&self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let asked = message::RegionInfo::decode(payload)?;
        if asked.index >= VFIO_PCI_NUM_REGIONS {
            return Err(EINVAL);
        }
        let size = self.region_size(asked.index);
        let flags = if size > 0 {
            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
        } else {
            0
        };
        Ok(message::RegionInfo {
            argsz: message::REGION_INFO_SIZE,
            flags,
            index: asked.index,
            cap_offset: 0,
            size,
            // Where the region would be mmapped: none is mmappable.
            offset: 0,
        }
        .encode())
    }

    fn irq_info(&self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let asked = message::IrqInfo::decode(payload)?;
        let (flags, count) = match asked.index {
            VFIO_PCI_INTX_IRQ_INDEX => (
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                1,
            ),
            VFIO_PCI_MSI_IRQ_INDEX if self.identity.msi_vectors > 0 => (
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                self.identity.msi_vectors,
            ),
            // Error reporting: QEMU warns about a device without it. Our
            // models have no errors to report, so it never fires.
            VFIO_PCI_ERR_IRQ_INDEX => (VFIO_IRQ_INFO_EVENTFD, 1),
            i if i < VFIO_PCI_NUM_IRQS => (0, 0),
            _ => return Err(EINVAL),
        };
        Ok(message::IrqInfo {
            argsz: 16,
            flags,
            index: asked.index,
            count,
        }
        .encode())
    }

    fn set_irqs(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>, Errno> {
        let set = message::IrqSet::decode(payload)?;
        let data = set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = set.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let vectors = match set.index {
            VFIO_PCI_INTX_IRQ_INDEX | VFIO_PCI_ERR_IRQ_INDEX => 1,
            VFIO_PCI_MSI_IRQ_INDEX => self.identity.msi_vectors,
            _ => 0,
        };
        let end = set.start.checked_add(set.count).ok_or(EINVAL)?;
        if end > vectors
            || set.flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0
        {
            return Err(EINVAL);
        }
        // Eventfds: one per vector, or none to take the vectors' away (how
        // a client sends the -1 of VFIO_DEVICE_SET_IRQS).
        let fds_allowed = if data == VFIO_IRQ_SET_DATA_EVENTFD {
            set.count
        } else {
            0
        };
        if !fds.is_empty() && fds.len() != fds_allowed as usize {
            return Err(EINVAL);
        }
        let selected = match data {
            VFIO_IRQ_SET_DATA_NONE => Ok(set.count > 0),
            // One byte per vector; the request acts on those set.
            VFIO_IRQ_SET_DATA_BOOL => set
                .data
                .get(..set.count as usize)
                .map(|b| b.iter().any(|&v| v != 0))
                .ok_or(EINVAL),
            _ => Ok(false),
        };
        const INTX: u32 = VFIO_PCI_INTX_IRQ_INDEX;
        const MSI: u32 = VFIO_PCI_MSI_IRQ_INDEX;
        const TRIGGER: u32 = VFIO_IRQ_SET_ACTION_TRIGGER;
        const UNMASK: u32 = VFIO_IRQ_SET_ACTION_UNMASK;
        const EVENTFD: u32 = VFIO_IRQ_SET_DATA_EVENTFD;
        const NONE: u32 = VFIO_IRQ_SET_DATA_NONE;
        let mut fds = fds.into_iter();
        match (set.index, action, data) {
            (INTX, TRIGGER, EVENTFD) => {
                let Some(fd) = fds.next() else {
                    self.platform.intx = None;
                    return Ok(Vec::new());
                };
                // The old irqfd is closed before its slot is reused.
                let unmask = self.platform.intx.take().and_then(|i| i.resample);
                let irqfd = eventfd_at(fd, INTX_TRIGGER_SLOT, self.slots)?;
                self.platform.intx = Some(Intx::new(irqfd, unmask));
                // A line that is high already is seen by the new irqfd.
                if self.model.irq_asserted() {
                    crate::model::Env::raise_irq(&mut self.platform);
                }
            }
            (INTX, TRIGGER, NONE) if set.count == 0 => self.platform.intx = None,
            (INTX, UNMASK, EVENTFD) => {
                let intx = self.platform.intx.as_mut().ok_or(EINVAL)?;
                intx.resample = None;
                if let Some(fd) = fds.next() {
                    intx.resample = Some(eventfd_at(fd, INTX_UNMASK_SLOT, self.slots)?);
                }
            }
            (INTX, UNMASK, _) => {
                if selected? {
                    self.platform.intx_eoi();
                }
            }
            // INTx masks itself until the unmask (it is automasked).
            (INTX, VFIO_IRQ_SET_ACTION_MASK, NONE | VFIO_IRQ_SET_DATA_BOOL) => {}
            (MSI, TRIGGER, EVENTFD) if fds.len() == 0 => {
                // The model signals its vectors in order: only the last
                // ones can go.
                let msi = &mut self.platform.msi;
                if (end as usize) < msi.len() {
                    return Err(ENOTSUP);
                }
                msi.truncate(set.start as usize);
            }
            (MSI, TRIGGER, EVENTFD) => {
                // The vectors from `start` on are set anew (QEMU sets them
                // all at once); the old ones are closed before their slots
                // are reused.
                let start = set.start as usize;
                if start > self.platform.msi.len() {
                    return Err(EINVAL);
                }
                self.platform.msi.truncate(start);
                for (i, fd) in fds.enumerate() {
                    let slot = MSI_SLOT + (start + i) as RawFd;
                    let fd = eventfd_at(fd, slot, self.slots)?;
                    self.platform.msi.push(fd);
                }
                self.platform.msi_enabled = true;
            }
            (MSI, TRIGGER, NONE) if set.count == 0 => {
                self.platform.msi.clear();
                self.platform.msi_enabled = false;
            }
            // A loopback test: fire the vectors.
            (MSI, TRIGGER, _) => {
                if selected? {
                    let msi = &self.platform.msi;
                    for fd in msi.iter().skip(set.start as usize).take(set.count as usize) {
                        let _ = fd.write(1);
                    }
                }
            }
            // Nothing ever signals an error: the eventfd is not kept.
            (VFIO_PCI_ERR_IRQ_INDEX, TRIGGER, EVENTFD | NONE) => {}
            _ => return Err(ENOTSUP),
        }
        Ok(Vec::new())
    }

    /// [`KVM_USER_BACKEND`]: from now on the guest's accesses to the
    /// region come through the user device's ring (stores posted, loads
    /// without side effects served by KVM from the shadow image this sets
    /// up); whatever still comes over the socket is served as before.
    fn attach_backend(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>, Errno> {
        let mut r = message::Reader::new(payload);
        let (_argsz, flags, region, range) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            return Err(EINVAL);
        };
        let served_region = USER_DEVICE_REGIONS.contains(&region);
        if !self.user_device_offered || flags != 0 || !served_region || range != region {
            return Err(EINVAL);
        }
        if self.backend.is_some() {
            return Err(Errno(libc::EBUSY));
        }
        let fd = match self.slots {
            // SAFETY: dup3 takes two descriptor numbers; the slot is ours.
            true if unsafe { libc::dup3(fd.as_raw_fd(), BACKEND_SLOT, libc::O_CLOEXEC) } < 0 => {
                return Err(EINVAL)
            }
            // SAFETY: dup3 just made the slot a copy that nobody else owns.
            true => unsafe { OwnedFd::from_raw_fd(BACKEND_SLOT) },
            false => fd,
        };
        let backend = Backend::new(fd).map_err(|_| EINVAL)?;
        let shadow = backend.create_shadow(SHADOW_SIZE).map_err(|_| EINVAL)?;
        self.platform.shadow = Some(shadow);
        self.platform.map = Some(self.map_spec.clone());
        self.model.publish_all(&mut self.platform);
        self.platform
            .set_access_map(&backend, self.model.as_ref())
            .map_err(|_| EINVAL)?;
        self.backend = Some(backend);
        crate::log!(
            "emulator[{}]: vfio-user: region {region} now served through a KVM user device",
            self.model_name
        );
        Ok(Vec::new())
    }

    /// Consumes what the ring holds.
    fn serve_ring(&mut self) -> Result<(), ServerError> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        match crate::serve::serve_ring(
            backend,
            None,
            &mut self.platform,
            self.model.as_mut(),
            &mut self.input,
            &mut self.batch,
            None,
            &mut self.served,
        ) {
            Ok(()) => Ok(()),
            // The VM is gone: the socket follows.
            Err(ServeError::Device(userdev::Error::DeviceGone)) => {
                self.backend = None;
                Ok(())
            }
            Err(e) => Err(ServerError::Protocol(format!("user device: {e}"))),
        }
    }

    fn dma_map(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> Result<Vec<u8>, Errno> {
        let map = message::DmaMap::decode(payload)?;
        let end = map.address.checked_add(map.size).ok_or(EINVAL)?;
        if map.size == 0
            || self
                .dma
                .iter()
                .any(|d| d.address < end && map.address < d.address + d.size)
        {
            return Err(EINVAL);
        }
        let mut fds = fds.into_iter();
        let (fd, None) = (fds.next(), fds.next()) else {
            return Err(EINVAL);
        };
        self.counters.dma_maps += 1;
        // Memory without a descriptor, or that the device may only read
        // (it writes wherever it reads), is out of its reach: the mapping
        // is taken, and DMA there fails as to an unmapped address.
        const READ_WRITE: u32 = 3;
        let Some(fd) = fd.filter(|_| map.flags & READ_WRITE == READ_WRITE) else {
            return Ok(Vec::new());
        };
        if self.dma.len() >= MAX_DMA_MAPS {
            return Err(ENOSPC);
        }
        let size = usize::try_from(map.size).map_err(|_| EINVAL)?;
        let file = FileOffset::new(std::fs::File::from(fd), map.offset);
        let region = GuestRegionMmap::from_range(GuestAddress(map.address), size, Some(file))
            .map_err(|_| EINVAL)?;
        self.dma.push(Dma {
            address: map.address,
            size: map.size,
            region: Arc::new(region),
        });
        self.remap();
        Ok(Vec::new())
    }

    fn dma_unmap(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let unmap = message::DmaUnmap::decode(payload)?;
        if unmap.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(ENOTSUP);
        }
        if unmap.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            self.dma.clear();
        } else {
            // A range that was mapped without a descriptor has no entry.
            self.dma
                .retain(|d| !(d.address == unmap.address && d.size == unmap.size));
        }
        self.counters.dma_unmaps += 1;
        self.remap();
        Ok(unmap.encode())
    }

    /// Guest memory as the DMA mappings make it now.
    fn remap(&mut self) {
        self.dma.sort_by_key(|d| d.address);
        let regions = self.dma.iter().map(|d| d.region.clone()).collect();
        self.platform.memory = GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default();
    }

    fn region_read(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let access = message::RegionAccess::decode(payload)?;
        let count = access.count as usize;
        if access.count > MAX_DATA_XFER || !access.data.is_empty() {
            return Err(EINVAL);
        }
        let mut data = vec![0u8; count];
        match access.region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                let len = self.bar_access(access.offset, count)?;
                let value = self.model.load(&mut self.platform, access.offset, len);
                data.copy_from_slice(&value.to_le_bytes()[..count]);
                self.counters.bar_loads += 1;
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let offset = self.config_access(access.offset, count)?;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.config.read(offset + i, 1) as u8;
                }
                self.counters.config_reads += 1;
            }
            _ => return Err(EINVAL),
        }
        Ok(access.reply(&data))
    }

    fn region_write(&mut self, payload: &[u8]) -> Result<Vec<u8>, Errno> {
        let access = message::RegionAccess::decode(payload)?;
        let count = access.count as usize;
        if access.data.len() != count {
            return Err(EINVAL);
        }
        match access.region {
            VFIO_PCI_BAR0_REGION_INDEX => {
                let len = self.bar_access(access.offset, count)?;
                let mut value = [0u8; 8];
                value[..count].copy_from_slice(access.data);
                self.model.store(
                    &mut self.platform,
                    access.offset,
                    len,
                    u64::from_le_bytes(value),
                );
                self.counters.bar_stores += 1;
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let offset = self.config_access(access.offset, count)?;
                for (i, &b) in access.data.iter().enumerate() {
                    self.config.write(offset + i, 1, u32::from(b));
                }
                self.counters.config_writes += 1;
            }
            _ => return Err(EINVAL),
        }
        Ok(access.reply(&[]))
    }

    /// Checks a BAR0 access: 1, 2, 4 or 8 bytes inside the BAR.
    fn bar_access(&self, offset: u64, count: usize) -> Result<u8, Errno> {
        let fits = offset
            .checked_add(count as u64)
            .is_some_and(|end| end <= self.identity.bar0_size);
        match count {
            1 | 2 | 4 | 8 if fits => Ok(count as u8),
            _ => Err(EINVAL),
        }
    }

    /// Checks a configuration space access; returns its offset.
    fn config_access(&self, offset: u64, count: usize) -> Result<usize, Errno> {
        match offset.checked_add(count as u64) {
            Some(end) if end <= CONFIG_SIZE as u64 => Ok(offset as usize),
            _ => Err(EINVAL),
        }
    }

    /// A device reset: the model and its configuration space start over,
    /// the interrupt output is low.
    fn reset(&mut self) -> Result<(), Errno> {
        self.model = crate::model::by_name(&self.model_name).ok_or(EINVAL)?;
        self.config = ConfigSpace::endpoint(&self.identity, 0);
        crate::model::Env::lower_irq(&mut self.platform);
        // KVM serves the fresh model's registers from now on.
        if let Some(backend) = &self.backend {
            self.model.publish_all(&mut self.platform);
            self.platform
                .set_access_map(backend, self.model.as_ref())
                .map_err(|_| EINVAL)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
