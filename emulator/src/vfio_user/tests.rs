//! The server against rust-vmm's vfio-user client, and against raw
//! messages where that client cannot say what it got back.

use super::*;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use edu_regs as regs;
use vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

/// A server for an edu on a fresh socket, run on a thread until the
/// client hangs up; the thread returns its counters.
struct Running {
    path: PathBuf,
    thread: Option<JoinHandle<Counters>>,
}

impl Running {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kvm-userdev-vfio-user-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut server = Server::new(stream, "edu", false).unwrap();
            server.run().unwrap();
            server.counters
        });
        Running {
            path,
            thread: Some(thread),
        }
    }

    fn client(&self) -> vfio_user::Client {
        vfio_user::Client::new(&self.path).unwrap()
    }

    fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.path).unwrap()
    }

    /// The server's counters once the client has hung up.
    fn finish(mut self) -> Counters {
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.path.parent().unwrap());
    }
}

fn read32(c: &mut vfio_user::Client, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn write32(c: &mut vfio_user::Client, region: u32, offset: u64, v: u32) {
    c.region_write(region, offset, &v.to_le_bytes()).unwrap();
}

fn write64(c: &mut vfio_user::Client, offset: u64, v: u64) {
    c.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
}

/// Sets the eventfd of vector 0 of `index`'s `action`, or with `None`
/// disables the action.
fn set_irq(c: &mut vfio_user::Client, index: u32, action: u32, fd: Option<&EventFd>) {
    let (data, count, fds) = match fd {
        Some(fd) => (VFIO_IRQ_SET_DATA_EVENTFD, 1, vec![fd.as_raw_fd()]),
        None => (VFIO_IRQ_SET_DATA_NONE, 0, vec![]),
    };
    c.set_irqs(index, data | action, 0, count, &fds).unwrap();
}

fn count(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

#[test]
fn regions_identity_and_registers() {
    let server = Running::start("identity");
    let mut c = server.client();
    assert_eq!(c.region(BAR0).unwrap().size, u64::from(regs::BAR_SIZE));
    assert_eq!(c.region(CONFIG).unwrap().size, 256);
    assert_eq!(c.region(1).unwrap().size, 0, "no BAR1");
    assert_eq!(read32(&mut c, CONFIG, 0), 0x11e8_1234);
    assert_eq!(read32(&mut c, CONFIG, 0x3c) >> 8 & 0xff, 1, "INTA");
    assert_eq!(read32(&mut c, CONFIG, 0x34) & 0xff, 0x40, "MSI capability");
    // BAR0 sizing in the device's own register.
    write32(&mut c, CONFIG, 0x10, !0);
    assert_eq!(read32(&mut c, CONFIG, 0x10), !(regs::BAR_SIZE - 1));

    assert_eq!(read32(&mut c, BAR0, 0), regs::IDENTIFICATION);
    write32(&mut c, BAR0, regs::LIVENESS as u64, 0x1234_5678);
    assert_eq!(read32(&mut c, BAR0, regs::LIVENESS as u64), !0x1234_5678);
    write32(&mut c, BAR0, regs::FACTORIAL as u64, 5);
    assert_eq!(read32(&mut c, BAR0, regs::FACTORIAL as u64), 120);

    // Reset: the model starts over.
    c.reset().unwrap();
    assert_eq!(read32(&mut c, BAR0, regs::FACTORIAL as u64), 0);
    assert_eq!(read32(&mut c, CONFIG, 0x10), 0, "BAR0 unplaced again");
    c.shutdown().unwrap();
    drop(c);
    let counters = server.finish();
    assert_eq!((counters.bar_loads, counters.bar_stores), (4, 2));
    assert_eq!(counters.errors, 0);
}

#[test]
fn dma_through_shared_memory() {
    let server = Running::start("dma");
    let mut c = server.client();
    const GUEST: u64 = 0x10_0000;
    const SIZE: u64 = 0x10_0000;
    let ram = memfd(SIZE);
    c.dma_map(0, GUEST, SIZE, ram.as_raw_fd()).unwrap();
    let pattern: Vec<u8> = (0..64u8).collect();
    std::os::unix::fs::FileExt::write_at(&ram, &pattern, 0x1000).unwrap();
    // Guest RAM to the device's buffer, then back to another page.
    write64(&mut c, regs::DMA_SOURCE as u64, GUEST + 0x1000);
    write64(&mut c, regs::DMA_DESTINATION as u64, regs::DMA_BUFFER);
    write64(&mut c, regs::DMA_COUNT as u64, 64);
    write64(&mut c, regs::DMA_COMMAND as u64, regs::DMA_START);
    write64(&mut c, regs::DMA_SOURCE as u64, regs::DMA_BUFFER);
    write64(&mut c, regs::DMA_DESTINATION as u64, GUEST + 0x2000);
    write64(
        &mut c,
        regs::DMA_COMMAND as u64,
        regs::DMA_START | regs::DMA_TO_RAM,
    );
    let mut back = vec![0u8; 64];
    std::os::unix::fs::FileExt::read_at(&ram, &mut back, 0x2000).unwrap();
    assert_eq!(back, pattern);

    // Unmapped: DMA no longer reaches the memory.
    c.dma_unmap(GUEST, SIZE).unwrap();
    write64(&mut c, regs::DMA_DESTINATION as u64, GUEST + 0x3000);
    write64(
        &mut c,
        regs::DMA_COMMAND as u64,
        regs::DMA_START | regs::DMA_TO_RAM,
    );
    std::os::unix::fs::FileExt::read_at(&ram, &mut back, 0x3000).unwrap();
    assert_eq!(back, vec![0; 64]);
    drop(c);
    let counters = server.finish();
    assert_eq!((counters.dma_maps, counters.dma_unmaps), (1, 1));
}

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: memfd_create reads a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: the descriptor was just created and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Signals an EOI on `unmask` and returns once the server has acted on it:
/// it has read the eventfd (which is then no longer readable) and, before
/// it answers the next request, decided on the line.
fn eoi(c: &mut vfio_user::Client, unmask: &EventFd) {
    unmask.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut pfd = libc::pollfd {
            fd: unmask.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, of which poll writes only revents.
        if unsafe { libc::poll(&mut pfd, 1, 0) } == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the EOI was never taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    read32(c, BAR0, 0);
}

#[test]
fn intx_is_level_triggered_through_the_unmask_eventfd() {
    let server = Running::start("intx");
    let mut c = server.client();
    let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
    let unmask = EventFd::new(EFD_NONBLOCK).unwrap();
    let intx = c.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    assert_eq!(
        (intx.count, intx.flags & VFIO_IRQ_INFO_AUTOMASKED),
        (1, VFIO_IRQ_INFO_AUTOMASKED)
    );
    set_irq(
        &mut c,
        VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_TRIGGER,
        Some(&trigger),
    );
    set_irq(
        &mut c,
        VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_UNMASK,
        Some(&unmask),
    );
    write32(&mut c, BAR0, regs::IRQ_RAISE as u64, 1);
    // A read after the store: the server has handled both.
    read32(&mut c, BAR0, 0);
    assert_eq!(count(&trigger), 1);
    // EOI with the line still high: triggered again.
    eoi(&mut c, &unmask);
    assert_eq!(count(&trigger), 1);
    write32(&mut c, BAR0, regs::IRQ_ACKNOWLEDGE as u64, 1);
    eoi(&mut c, &unmask);
    assert_eq!(count(&trigger), 0, "low after the acknowledge");

    // MSI instead: INTx off, one vector.
    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    set_irq(
        &mut c,
        VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_TRIGGER,
        None,
    );
    set_irq(
        &mut c,
        VFIO_PCI_MSI_IRQ_INDEX,
        VFIO_IRQ_SET_ACTION_TRIGGER,
        Some(&msi),
    );
    write32(&mut c, BAR0, regs::IRQ_RAISE as u64, 1);
    read32(&mut c, BAR0, 0);
    assert_eq!((count(&msi), count(&trigger)), (1, 0));
    drop(c);
    assert_eq!(server.finish().errors, 0);
}

/// Sends one request and returns the reply's header and payload.
fn request(s: &mut UnixStream, id: u16, command: u16, payload: &[u8]) -> (Header, Vec<u8>) {
    request_with_fds(s, id, command, payload, &[])
}

/// The same with `fds` attached.
fn request_with_fds(
    s: &mut UnixStream,
    id: u16,
    command: u16,
    payload: &[u8],
    fds: &[RawFd],
) -> (Header, Vec<u8>) {
    let mut msg = Vec::new();
    Header {
        id,
        command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: message::TYPE_REQUEST,
        error: 0,
    }
    .encode(&mut msg);
    msg.extend_from_slice(payload);
    s.send_with_fds(&[&msg[..]], fds).unwrap();
    let mut head = [0u8; HEADER_SIZE];
    s.read_exact(&mut head).unwrap();
    let header = Header::decode(&head);
    let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
    s.read_exact(&mut body).unwrap();
    (header, body)
}

/// A version request's payload: version 0.1, `capabilities` as JSON.
fn version(capabilities: &str) -> Vec<u8> {
    let mut p = vec![0, 0, 1, 0];
    p.extend_from_slice(capabilities.as_bytes());
    p.push(0);
    p
}

fn refused(reply: (Header, Vec<u8>), errno: i32) {
    let (h, body) = reply;
    assert_eq!(h.flags, message::TYPE_REPLY | message::ERROR);
    assert_eq!((h.error as i32, body.len()), (errno, 0));
}

#[test]
fn bad_requests_get_their_errno() {
    let server = Running::start("errors");
    let mut s = server.raw();
    let read = |offset: u64, region: u32, count: u32| {
        message::Writer::default()
            .u64(offset)
            .u32(region)
            .u32(count)
            .0
    };
    // Nothing before the version.
    refused(
        request(&mut s, 1, Command::RegionRead as u16, &read(0, 0, 4)),
        libc::EINVAL,
    );
    // A malformed version is refused, not fatal.
    refused(
        request(&mut s, 2, Command::Version as u16, &version("{")),
        libc::EINVAL,
    );
    refused(
        request(&mut s, 3, Command::Version as u16, &[1]),
        libc::EINVAL,
    );
    let (h, body) = request(&mut s, 4, Command::Version as u16, &version("{}"));
    assert_eq!((h.id, h.flags, h.error), (4, message::TYPE_REPLY, 0));
    let v = message::Version::decode(&body).unwrap();
    assert_eq!((v.major, v.minor), (0, 1));
    assert_eq!(v.capability_u64("max_msg_fds"), Some(MAX_MSG_FDS as u64));
    // Outside BAR0, a width the BAR does not take, no such region.
    let end = u64::from(regs::BAR_SIZE);
    refused(request(&mut s, 5, 9, &read(end - 2, BAR0, 4)), libc::EINVAL);
    refused(request(&mut s, 6, 9, &read(0, BAR0, 3)), libc::EINVAL);
    refused(request(&mut s, 7, 9, &read(0, 5, 4)), libc::EINVAL);
    refused(request(&mut s, 8, 9, &read(250, CONFIG, 8)), libc::EINVAL);
    // Not implemented, unknown.
    refused(
        request(&mut s, 9, Command::DmaRead as u16, &[0; 16]),
        libc::EOPNOTSUPP,
    );
    refused(request(&mut s, 10, 99, &[]), libc::EOPNOTSUPP);
    // Still serving.
    let (h, body) = request(&mut s, 11, 9, &read(0, BAR0, 4));
    assert_eq!(h.error, 0);
    assert_eq!(body[16..], regs::IDENTIFICATION.to_le_bytes());
    drop(s);
    assert_eq!(server.finish().errors, 9);
}

#[test]
fn an_oversized_message_ends_the_connection() {
    let dir =
        std::env::temp_dir().join(format!("kvm-userdev-vfio-user-{}-big", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut server = Server::new(stream, "edu", false).unwrap();
    let mut msg = Vec::new();
    Header {
        id: 1,
        command: Command::RegionWrite as u16,
        size: u32::MAX,
        flags: 0,
        error: 0,
    }
    .encode(&mut msg);
    s.write_all(&msg).unwrap();
    assert!(matches!(server.run(), Err(ServerError::Protocol(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn user_devices_are_named_only_when_offered() {
    let backend = |region: u32| {
        message::Writer::default()
            .u32(16)
            .u32(0)
            .u32(region)
            .u32(region)
            .0
    };
    let not_a_backend = EventFd::new(EFD_NONBLOCK).unwrap();
    let fd = [not_a_backend.as_raw_fd()];

    // A client that does not offer it never sees it, and may not use it.
    let server = Running::start("no-offer");
    let mut s = server.raw();
    let no_offer = version("{\"capabilities\":{}}");
    let (_, body) = request(&mut s, 1, Command::Version as u16, &no_offer);
    let v = message::Version::decode(&body).unwrap();
    assert!(v.capability(CAP_KVM_USER_DEVICE).is_none());
    let (h, _) = request_with_fds(&mut s, 2, KVM_USER_BACKEND, &backend(0), &fd);
    assert_eq!(h.error as i32, libc::EINVAL);
    drop(s);
    server.finish();

    // One that offers it is told BAR0; a descriptor that is no backend,
    // another region, or none at all is refused.
    let server = Running::start("offer");
    let mut s = server.raw();
    let (_, body) = request(
        &mut s,
        1,
        Command::Version as u16,
        &version("{\"capabilities\":{\"kvm_user_device\":{}}}"),
    );
    let v = message::Version::decode(&body).unwrap();
    assert_eq!(
        v.capability(CAP_KVM_USER_DEVICE),
        Some(&serde_json::json!({ "regions": [0] }))
    );
    let (h, _) = request_with_fds(&mut s, 2, KVM_USER_BACKEND, &backend(0), &fd);
    assert_eq!(h.error as i32, libc::EINVAL, "an eventfd is no backend");
    let (h, _) = request_with_fds(&mut s, 3, KVM_USER_BACKEND, &backend(1), &fd);
    assert_eq!(h.error as i32, libc::EINVAL, "BAR1");
    let (h, _) = request_with_fds(&mut s, 4, KVM_USER_BACKEND, &backend(0), &[]);
    assert_eq!(h.error as i32, libc::EINVAL, "no descriptor");
    // The socket path still serves.
    let read = message::Writer::default().u64(0).u32(BAR0).u32(4).0;
    let (h, body) = request(&mut s, 5, Command::RegionRead as u16, &read);
    assert_eq!(h.error, 0);
    assert_eq!(body[16..], regs::IDENTIFICATION.to_le_bytes());
    drop(s);
    assert_eq!(server.finish().errors, 3);
}
