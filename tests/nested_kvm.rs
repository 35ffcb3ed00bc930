//! Smoke test of nested KVM in the patched-kernel VM: a tiny real-mode guest
//! stores to and loads from an unbacked address, then stores to an address
//! that an ioeventfd may claim.

use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuExit};
use vmm::RealModeVm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x8000;
const LOAD_ADDR: u64 = 0x1000;
/// Unbacked: above the only memory slot.
const MMIO_BASE: u64 = 0xa000;
const DOORBELL: u64 = 0xb000;
const DOORBELL_STORES: u64 = 5;
/// What the host answers to the guest's 4-byte load.
const LOAD_VALUE: u32 = 0xdead_beef;

/// 16-bit real-mode code; DS is 0, so offsets are physical addresses.
#[rustfmt::skip]
const GUEST: &[u8] = &[
    0xb0, 0x42,                   // mov al, 0x42
    0xa2, 0x00, 0xa0,             // mov [0xa000], al      1-byte store
    0x66, 0xa1, 0x04, 0xa0,       // mov eax, [0xa004]     4-byte load
    0x66, 0xa3, 0x08, 0xa0,       // mov [0xa008], eax     store it back
    0xb9, 0x05, 0x00,             // mov cx, DOORBELL_STORES
    0xa3, 0x00, 0xb0,             // 1: mov [0xb000], ax   2-byte store
    0x49,                         // dec cx
    0x75, 0xfa,                   // jnz 1b
    0xf4,                         // hlt
];

#[derive(Debug, PartialEq, Eq)]
enum Access {
    Store { addr: u64, data: Vec<u8> },
    Load { addr: u64, len: usize },
}

/// Runs the guest to its `hlt`, answering loads with `LOAD_VALUE`, and
/// returns every access that exited to userspace, in order.
fn run_to_hlt(guest: &mut RealModeVm) -> Vec<Access> {
    let mut exits = Vec::new();
    loop {
        match guest.vcpu().run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(addr, data) => exits.push(Access::Store {
                addr,
                data: data.to_vec(),
            }),
            VcpuExit::MmioRead(addr, data) => {
                exits.push(Access::Load {
                    addr,
                    len: data.len(),
                });
                let value = LOAD_VALUE.to_le_bytes();
                let n = data.len().min(value.len());
                data[..n].copy_from_slice(&value[..n]);
            }
            VcpuExit::Hlt => return exits,
            other => panic!("unexpected exit {other:?} after {exits:?}"),
        }
        assert!(exits.len() < 64, "guest runs away: {exits:?}");
    }
}

fn new_guest() -> RealModeVm {
    RealModeVm::new(MEM_SIZE, GUEST, LOAD_ADDR).expect("create the real-mode guest")
}

fn doorbell_store() -> Access {
    // AX still holds the low half of the loaded value.
    Access::Store {
        addr: DOORBELL,
        data: (LOAD_VALUE as u16).to_le_bytes().to_vec(),
    }
}

#[test]
fn mmio_accesses_exit_with_address_size_and_data() {
    let mut guest = new_guest();
    let exits = run_to_hlt(&mut guest);

    let mut expected = vec![
        Access::Store {
            addr: MMIO_BASE,
            data: vec![0x42],
        },
        Access::Load {
            addr: MMIO_BASE + 4,
            len: 4,
        },
        // The guest stores what it loaded: the answer reached its register.
        Access::Store {
            addr: MMIO_BASE + 8,
            data: LOAD_VALUE.to_le_bytes().to_vec(),
        },
    ];
    expected.extend((0..DOORBELL_STORES).map(|_| doorbell_store()));
    assert_eq!(exits, expected);
}

#[test]
fn ioeventfd_absorbs_stores_in_the_kernel() {
    let mut guest = new_guest();
    let doorbell = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    guest
        .vm()
        .register_ioevent(&doorbell, &IoEventAddress::Mmio(DOORBELL), NoDatamatch)
        .expect("KVM_IOEVENTFD");

    let exits = run_to_hlt(&mut guest);

    assert!(
        !exits.contains(&doorbell_store()),
        "a store to the ioeventfd exited to userspace: {exits:?}"
    );
    assert_eq!(
        exits.len(),
        3,
        "only the plain MMIO accesses exit: {exits:?}"
    );
    assert_eq!(doorbell.read().expect("eventfd count"), DOORBELL_STORES);
}

#[test]
fn deregistered_ioeventfd_lets_stores_exit_again() {
    let mut guest = new_guest();
    let doorbell = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let addr = IoEventAddress::Mmio(DOORBELL);
    guest
        .vm()
        .register_ioevent(&doorbell, &addr, NoDatamatch)
        .expect("KVM_IOEVENTFD");
    guest
        .vm()
        .unregister_ioevent(&doorbell, &addr, NoDatamatch)
        .expect("KVM_IOEVENTFD deassign");

    let exits = run_to_hlt(&mut guest);

    let doorbells = exits.iter().filter(|a| **a == doorbell_store()).count();
    assert_eq!(doorbells as u64, DOORBELL_STORES);
    // Nothing was signalled: reading a zero eventfd would block.
    assert!(doorbell.read().is_err());
}

/// Probing for the user device (KVM_CREATE_DEVICE_TEST, which returns no
/// descriptor) leaves the caller's descriptors alone: an earlier version
/// closed fd 0, and the next file opened took stdin's place.
#[test]
fn probing_the_user_device_keeps_stdin_open() {
    let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: F_GETFD on a descriptor number; no memory is involved.
    let before = unsafe { libc::fcntl(0, libc::F_GETFD) };
    assert!(userdev::UserDevice::probe(&vm), "the patched kernel has it");
    // SAFETY: as above.
    let after = unsafe { libc::fcntl(0, libc::F_GETFD) };
    assert_eq!(before >= 0, after >= 0, "fd 0 open before and after");
}
