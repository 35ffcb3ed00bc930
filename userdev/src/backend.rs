//! The emulator's side: the backend fd, its ring, replies, the shadow image
//! and the access map.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{AtomicAccess, Bytes, FileOffset, MmapRegion, VolatileMemory};

use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};

use crate::sys;
use crate::{Error, Result};

/// Whether an access loads or stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Load,
    Store,
}

/// One guest access that reached the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Device-wide sequence number; a load's reply names it. Every access
    /// not served from the shadow image takes one, including those KVM
    /// dropped without queueing a record: a gap counts them ([`SeqGaps`]).
    pub seq: u64,
    /// The range id, as the VMM set it on the device fd.
    pub range: u16,
    /// From the start of the range.
    pub offset: u64,
    /// 1 to 8 bytes: 1, 2, 4 or 8, or 3, 5, 6 or 7 for the part of an
    /// access that a page boundary split.
    pub len: u8,
    pub op: Op,
    /// Store data: the first `len` bytes in access order (zero for loads).
    /// [`Access::value`] reads it as a number.
    pub data: [u8; 8],
    /// Index of the vCPU that made the access.
    pub vcpu: u32,
}

impl Access {
    /// The store data as a little-endian number of `len` bytes (the guest's
    /// byte order on x86).
    pub fn value(&self) -> u64 {
        data::to_u64(&self.data, self.len)
    }
}

impl From<&sys::kvm_user_access> for Access {
    fn from(r: &sys::kvm_user_access) -> Self {
        Access {
            seq: r.seq,
            range: r.range,
            offset: r.offset,
            len: r.len,
            op: if r.op == sys::KVM_USER_OP_STORE {
                Op::Store
            } else {
                Op::Load
            },
            data: r.data,
            vcpu: r.vcpu,
        }
    }
}

/// The answer to a forwarded load; laid out as `struct kvm_user_reply`, so
/// a batch goes to the kernel as it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The load's [`Access::seq`].
    pub seq: u64,
    /// The load's `len` bytes in access order.
    pub data: [u8; 8],
    /// Zero, as the kernel requires.
    flags: u64,
}

impl Reply {
    /// A reply with the load's bytes, in access order.
    pub fn new(seq: u64, data: [u8; 8]) -> Self {
        Reply {
            seq,
            data,
            flags: 0,
        }
    }

    /// A reply to a load of `len` bytes whose value is `value`
    /// (little-endian, the guest's byte order on x86).
    pub fn with_value(seq: u64, len: u8, value: u64) -> Self {
        Reply::new(seq, data::from_u64(value, len))
    }

    /// The reply's data as a little-endian number of `len` bytes.
    pub fn value(&self, len: u8) -> u64 {
        data::to_u64(&self.data, len)
    }
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<Reply>() == size_of::<sys::kvm_user_reply>());
    assert!(offset_of!(Reply, seq) == offset_of!(sys::kvm_user_reply, seq));
    assert!(offset_of!(Reply, data) == offset_of!(sys::kvm_user_reply, data));
    assert!(offset_of!(Reply, flags) == offset_of!(sys::kvm_user_reply, flags));
};

/// Access and reply data (`[u8; 8]`, the first `len` bytes in access
/// order) as numbers: little-endian, the guest's byte order on x86.
pub mod data {
    /// The first `len` bytes of `data` (at most 8) as a little-endian
    /// number; the bytes beyond `len` are ignored.
    pub fn to_u64(data: &[u8; 8], len: u8) -> u64 {
        let n = usize::from(len.min(8));
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[..n]);
        u64::from_le_bytes(b)
    }

    /// The low `len` bytes of `value` (at most 8), little-endian first;
    /// the bytes beyond `len` are zero.
    pub fn from_u64(value: u64, len: u8) -> [u8; 8] {
        let n = usize::from(len.min(8));
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        b
    }
}

/// Counts the accesses a backend missed. KVM gives every access that is not
/// served from the shadow image the next sequence number, also those it
/// drops without a record (no backend, a stalled backend, a full ring that
/// stayed full): a gap between consecutive records is that many accesses
/// lost. That is not an error, the device model just never saw them.
/// Records reach a backend in sequence order, whether through the ring or
/// `read()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqGaps {
    last: Option<u64>,
    missed: u64,
    gaps: u64,
}

impl SeqGaps {
    /// Notes the access with `seq` (in the order records arrive); returns
    /// how many accesses were dropped just before it (0 for the first one
    /// seen: what came before this backend is unknown).
    pub fn note(&mut self, seq: u64) -> u64 {
        let missed = match self.last {
            Some(last) => seq.wrapping_sub(last).wrapping_sub(1),
            None => 0,
        };
        // A sequence number that went backwards is not a gap: count
        // nothing (a well-behaved kernel never does that).
        let missed = if missed > u64::MAX / 2 { 0 } else { missed };
        self.last = Some(seq);
        if missed > 0 {
            self.missed += missed;
            self.gaps += 1;
        }
        missed
    }

    /// Accesses missed so far.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Gaps seen so far (runs of missed accesses).
    pub fn gaps(&self) -> u64 {
        self.gaps
    }
}

/// A shared mapping of part of the backend file, unmapped when dropped.
/// Never executable and always shared: the kernel refuses anything else.
fn map(file: &Arc<File>, len: usize, offset: u64, op: &'static str) -> Result<MmapRegion> {
    MmapRegion::build(
        Some(FileOffset::from_arc(Arc::clone(file), offset)),
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map_err(|e| Error::Os {
        op,
        source: match e {
            MmapRegionError::Mmap(e) => e,
            other => io::Error::other(other),
        },
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The emulator's end of a user device (the backend fd): consume accesses,
/// reply to loads, publish the shadow image.
///
/// Consume either from the ring ([`Backend::consume`], no syscall per
/// record; or [`Backend::peek_max`], then [`Backend::advance`] once the
/// records' effects are durable) or with [`Backend::read`]; not both from
/// concurrent threads.
#[derive(Debug)]
pub struct Backend {
    ring: MmapRegion,
    entries: u32,
    /// The backend fd; the mappings hold it too.
    file: Arc<File>,
}

/// The size of one ring record.
const RECORD: usize = std::mem::size_of::<sys::kvm_user_access>();

/// The largest shadow image this crate asks for: a sanity bound only; the
/// device's own limit is [`crate::UserDevice::max_shadow_size`], and the
/// kernel refuses more than that.
const MAX_SHADOW_SIZE: u64 = 16 << 20;

impl Backend {
    /// Takes over a backend fd (from [`crate::UserDevice::create_backend`],
    /// usually received over a UNIX socket) and maps its ring.
    pub fn new(fd: OwnedFd) -> Result<Self> {
        let file = Arc::new(File::from(fd));
        // The ring's size is in its header: map that first.
        let head = map(&file, page_size(), 0, "mmap(backend ring header)")?;
        let entries = head
            .get_atomic_ref::<AtomicU32>(sys::RING_ENTRIES_OFFSET)
            .expect("the header lies in the first page")
            .load(Ordering::Relaxed);
        drop(head);
        if !entries.is_power_of_two() || entries > 1 << 16 {
            return Err(Error::Os {
                op: "backend ring header",
                source: io::Error::new(io::ErrorKind::InvalidData, format!("{entries} entries")),
            });
        }
        let len =
            (sys::RING_RECORDS_OFFSET + entries as usize * RECORD).next_multiple_of(page_size());
        let ring = map(&file, len, 0, "mmap(backend ring)")?;
        Ok(Backend {
            ring,
            entries,
            file,
        })
    }

    /// A ring header field, which we and the kernel only access atomically.
    fn ring_u32(&self, offset: usize) -> &AtomicU32 {
        self.ring.get_atomic_ref(offset).expect("ring header field")
    }

    /// Records pending in the ring.
    pub fn pending(&self) -> u32 {
        let head = self.ring_u32(sys::RING_HEAD_OFFSET).load(Ordering::Acquire);
        let tail = self.ring_u32(sys::RING_TAIL_OFFSET).load(Ordering::Relaxed);
        head.wrapping_sub(tail)
    }

    /// Hands every pending record of the ring to `handle`, in order, then
    /// marks them consumed. Returns how many there were.
    ///
    /// Whatever `handle` does for a record (a shadow-image update above
    /// all) must be done when it returns: KVM serves loads from the shadow
    /// once every store queued before them is consumed.
    pub fn consume(&self, handle: impl FnMut(&Access)) -> Result<u32> {
        self.consume_max(u32::MAX, handle)
    }

    /// As [`Backend::consume`], but takes at most `max` records: those that
    /// [`Backend::pending`] counted, for a caller that must look at
    /// something else between seeing records arrive and handling them.
    pub fn consume_max(&self, max: u32, handle: impl FnMut(&Access)) -> Result<u32> {
        let n = self.peek_max(max, handle)?;
        if n > 0 {
            self.advance(n)?;
        }
        Ok(n)
    }

    /// Hands up to `max` pending records to `handle`, in order, without
    /// consuming them; returns how many. They stay in the ring, and are
    /// handed out again by the next peek or consume, until
    /// [`Backend::advance`] passes them: for a backend that must make a
    /// batch's effects durable before the kernel may forget the batch (a
    /// successor after a crash sees the records again).
    pub fn peek_max(&self, max: u32, mut handle: impl FnMut(&Access)) -> Result<u32> {
        let head = self.ring_u32(sys::RING_HEAD_OFFSET).load(Ordering::Acquire);
        let tail = self.ring_u32(sys::RING_TAIL_OFFSET).load(Ordering::Relaxed);
        // The kernel never has more than `entries` pending; anything else is
        // a tail that someone else (a read() in another thread) moved.
        let n = head.wrapping_sub(tail).min(self.entries).min(max);
        for i in 0..n {
            let slot = (tail.wrapping_add(i) & (self.entries - 1)) as usize;
            // The kernel wrote the record before releasing `head` and leaves
            // it alone until `tail` passes it.
            let record = self
                .ring
                .get_ref::<sys::kvm_user_access>(sys::RING_RECORDS_OFFSET + slot * RECORD)
                .expect("slot inside the ring")
                .load();
            handle(&Access::from(&record));
        }
        Ok(n)
    }

    /// Marks the first `n` pending records consumed: those a
    /// [`Backend::peek_max`] handed out, once everything they ask for is
    /// done (as for [`Backend::consume`]). More than are pending is an
    /// error, and moves nothing.
    pub fn advance(&self, n: u32) -> Result<()> {
        let head = self.ring_u32(sys::RING_HEAD_OFFSET).load(Ordering::Acquire);
        let tail = self.ring_u32(sys::RING_TAIL_OFFSET).load(Ordering::Relaxed);
        let pending = head.wrapping_sub(tail).min(self.entries);
        if n > pending {
            return Err(Error::NotPending { n, pending });
        }
        self.move_tail(tail.wrapping_add(n))
    }

    /// Marks the records before `tail` consumed: the one place the ring's
    /// tail moves. Publishes the tail (release: the records' effects come
    /// first), then, ordered after it by a full fence against a vCPU's "set
    /// NEED_WAKE, then re-check the tail", reads the flags. The flag stays
    /// set while vCPUs wait (for ring space, or for their stores to be
    /// consumed), so every tail move that sees it set must wake them.
    fn move_tail(&self, tail: u32) -> Result<()> {
        self.ring_u32(sys::RING_TAIL_OFFSET)
            .store(tail, Ordering::Release);
        fence(Ordering::SeqCst);
        let flags = self
            .ring_u32(sys::RING_FLAGS_OFFSET)
            .load(Ordering::Relaxed);
        if flags & sys::KVM_USER_RING_NEED_WAKE != 0 {
            // SAFETY: an ioctl whose argument is 0 on our own fd; it
            // touches no memory of ours.
            let ret = unsafe { ioctl(&*self.file, sys::KVM_USER_WAKE()) };
            if ret < 0 {
                return Err(self.gone_or("KVM_USER_WAKE"));
            }
        }
        Ok(())
    }

    /// The `read()` path: fills `out` with pending records; returns how
    /// many. Blocks while none is pending unless the fd is non-blocking,
    /// which gives `Ok(0)` then.
    ///
    /// The kernel *delivers* records with a read without consuming them:
    /// those returned by one call count as consumed only at the next call
    /// on this backend (whether it returns records, would block or blocks),
    /// or once [`Backend::consume`] moves the tail past them. So finish
    /// everything a batch asks for, shadow-image updates above all, before
    /// calling `read` again: KVM serves a vCPU's loads from the shadow
    /// image once its stores are consumed. (An empty `out` makes no call,
    /// and so consumes nothing.)
    pub fn read(&self, out: &mut [Access]) -> Result<usize> {
        let mut raw = [sys::kvm_user_access::default(); 32];
        let want = out.len().min(raw.len());
        if want == 0 {
            return Ok(0);
        }
        // SAFETY: `raw` is valid for `want` records, which bounds the read.
        let ret = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                raw.as_mut_ptr().cast(),
                want * RECORD,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(Error::Os {
                    op: "read(backend)",
                    source: e,
                }),
            };
        }
        if ret == 0 {
            return Err(Error::DeviceGone);
        }
        let n = ret as usize / RECORD;
        for (o, r) in out.iter_mut().zip(&raw[..n]) {
            *o = Access::from(r);
        }
        Ok(n)
    }

    /// Completes forwarded loads. A reply whose load is no longer waiting
    /// (it timed out and got all-ones) is rejected by the kernel; the others
    /// still go through. Returns how many were rejected.
    pub fn reply(&self, replies: &[Reply]) -> Result<usize> {
        let size = std::mem::size_of::<Reply>();
        let mut rejected = 0;
        let mut rest = replies;
        while !rest.is_empty() {
            // SAFETY: `rest` is valid for reading `rest.len()` replies, laid
            // out as the kernel reads them (asserted above).
            let ret = unsafe {
                libc::write(
                    self.file.as_raw_fd(),
                    rest.as_ptr().cast(),
                    std::mem::size_of_val(rest),
                )
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // The first reply of `rest` has no waiter: skip it.
                    Some(libc::EINVAL) => {
                        rejected += 1;
                        rest = &rest[1..];
                    }
                    Some(libc::ENODEV) => return Err(Error::DeviceGone),
                    _ => {
                        return Err(Error::Os {
                            op: "write(backend replies)",
                            source: e,
                        })
                    }
                }
            } else {
                rest = &rest[ret as usize / size..];
            }
        }
        Ok(rejected)
    }

    /// Allocates the zero-filled shadow image (`len` a multiple of the page
    /// size, at most the device's maximum, 16 MiB today; once per backend)
    /// and maps it.
    pub fn create_shadow(&self, len: usize) -> Result<Shadow> {
        let size = len as u64;
        if size == 0 || size > MAX_SHADOW_SIZE || !len.is_multiple_of(page_size()) {
            return Err(Error::ShadowSize(size));
        }
        // SAFETY: the ioctl reads one u64 from `size`, which outlives it.
        let ret = unsafe { ioctl_with_ref(&*self.file, sys::KVM_USER_SET_SHADOW_SIZE(), &size) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => Error::ShadowExists,
                Some(libc::EINVAL) => Error::ShadowSize(size),
                _ => Error::Os {
                    op: "KVM_USER_SET_SHADOW_SIZE",
                    source: e,
                },
            });
        }
        let map = map(
            &self.file,
            len,
            sys::KVM_USER_SHADOW_MMAP_OFFSET,
            "mmap(shadow image)",
        )?;
        Ok(Shadow { map })
    }

    /// Replaces the access map: which loads KVM may serve from the shadow
    /// image. An empty map sends every load to the emulator.
    pub fn set_access_map(&self, entries: &[MapEntry]) -> Result<()> {
        if entries.len() > sys::KVM_USER_MAX_MAP_ENTRIES as usize {
            return Err(Error::MapTooLarge(entries.len()));
        }
        // The header and its entries laid out as the kernel reads them.
        #[repr(C)]
        struct MapBuf {
            hdr: sys::kvm_user_access_map,
            entries: [sys::kvm_user_map_entry; sys::KVM_USER_MAX_MAP_ENTRIES as usize],
        }
        let mut buf = Box::new(MapBuf {
            hdr: sys::kvm_user_access_map {
                nr: entries.len() as u32,
                flags: 0,
            },
            entries: [sys::kvm_user_map_entry::default(); sys::KVM_USER_MAX_MAP_ENTRIES as usize],
        });
        for (raw, e) in buf.entries.iter_mut().zip(entries) {
            *raw = sys::kvm_user_map_entry {
                range: e.range,
                sizes: e.sizes.0,
                flags: e.flags(),
                offset: e.offset,
                len: e.len,
                shadow_offset: e.shadow_offset,
            };
        }
        // SAFETY: the kernel reads the header, then `nr` entries, all in
        // `buf`, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&*self.file, sys::KVM_USER_SET_ACCESS_MAP(), &*buf) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) => Error::MapInvalid,
                Some(libc::ENODEV) => Error::DeviceGone,
                _ => Error::Os {
                    op: "KVM_USER_SET_ACCESS_MAP",
                    source: e,
                },
            });
        }
        Ok(())
    }

    fn gone_or(&self, op: &'static str) -> Error {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODEV) => Error::DeviceGone,
            _ => Error::Os { op, source: e },
        }
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Backend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Load sizes an access-map entry allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes(u16);

impl Sizes {
    pub const B1: Sizes = Sizes(1);
    pub const B2: Sizes = Sizes(2);
    pub const B4: Sizes = Sizes(4);
    pub const B8: Sizes = Sizes(8);
    pub const ALL: Sizes = Sizes(15);
    /// No load: an entry that only batches stores.
    pub const NONE: Sizes = Sizes(0);

    pub fn allows(self, len: u8) -> bool {
        len.is_power_of_two() && len <= 8 && self.0 & u16::from(len) != 0
    }
}

impl std::ops::BitOr for Sizes {
    type Output = Sizes;
    fn bitor(self, rhs: Sizes) -> Sizes {
        Sizes(self.0 | rhs.0)
    }
}

/// One entry of the access map: loads of `sizes` bytes anywhere in
/// `offset..offset + len` of range `range` are served from the shadow image
/// at `shadow_offset + (load offset - offset)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub range: u16,
    pub offset: u64,
    pub len: u64,
    pub shadow_offset: u64,
    pub sizes: Sizes,
    /// The loads may pass pending stores: their value does not depend on
    /// any store the guest can have pending (`KVM_USER_MAP_PASS_STORES`;
    /// user.rst says when that is safe).
    pub pass_stores: bool,
    /// Stores here need no prompt service: KVM may wake the emulator for
    /// them a little later (`KVM_USER_MAP_BATCH_STORES`).
    pub batch_stores: bool,
}

impl MapEntry {
    /// Loads of `sizes` bytes in `offset..offset + len` of `range`, served
    /// from the same offsets of the shadow image; no flags.
    pub fn shadowed(range: u16, offset: u64, len: u64, sizes: Sizes) -> Self {
        MapEntry {
            range,
            offset,
            len,
            shadow_offset: offset,
            sizes,
            pass_stores: false,
            batch_stores: false,
        }
    }

    /// Stores to `offset..offset + len` of `range` are batched; no load is
    /// served.
    pub fn batched(range: u16, offset: u64, len: u64) -> Self {
        MapEntry {
            batch_stores: true,
            ..MapEntry::shadowed(range, offset, len, Sizes::NONE)
        }
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.pass_stores {
            flags |= sys::KVM_USER_MAP_PASS_STORES;
        }
        if self.batch_stores {
            flags |= sys::KVM_USER_MAP_BATCH_STORES;
        }
        flags
    }
}

/// The shadow image, shared with KVM. Write a register's value here (with
/// the size and alignment the guest reads it with) to have its loads
/// served without waking the emulator.
#[derive(Debug)]
pub struct Shadow {
    map: MmapRegion,
}

/// Values the shadow image holds: u8, u16, u32 and u64, naturally aligned
/// and stored single-copy atomically, so that KVM never sees half a value.
pub trait ShadowValue: AtomicAccess + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! shadow_value {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl ShadowValue for $t {}
    )*};
}

shadow_value!(u8, u16, u32, u64);

impl Shadow {
    pub fn len(&self) -> usize {
        self.map.size()
    }

    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    /// Publishes `value` at `offset` (naturally aligned, inside the image).
    pub fn write<T: ShadowValue>(&self, offset: usize, value: T) -> Result<()> {
        self.map
            .as_volatile_slice()
            .store(value, offset, Ordering::Relaxed)
            .map_err(|_| self.bounds::<T>(offset))
    }

    /// What the image holds at `offset`.
    pub fn read<T: ShadowValue>(&self, offset: usize) -> Result<T> {
        self.map
            .as_volatile_slice()
            .load(offset, Ordering::Relaxed)
            .map_err(|_| self.bounds::<T>(offset))
    }

    fn bounds<T>(&self, offset: usize) -> Error {
        Error::ShadowBounds {
            offset,
            len: std::mem::size_of::<T>(),
            size: self.map.size(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let s = Sizes::B4 | Sizes::B8;
        assert!(s.allows(4) && s.allows(8));
        assert!(!s.allows(1) && !s.allows(2) && !s.allows(3) && !s.allows(16));
        assert!(Sizes::ALL.allows(1));
    }

    #[test]
    fn access_from_record() {
        let raw = sys::kvm_user_access {
            seq: 7,
            offset: 0x24,
            data: [0xab, 0xcd, 0, 0, 0x99, 0, 0, 0],
            range: 1,
            vcpu: 3,
            len: 4,
            op: sys::KVM_USER_OP_STORE,
        };
        let a = Access::from(&raw);
        assert_eq!(
            (a.seq, a.offset, a.range, a.vcpu, a.len),
            (7, 0x24, 1, 3, 4)
        );
        assert_eq!(a.op, Op::Store);
        // Bytes beyond `len` are not part of the value.
        assert_eq!(a.value(), 0xcdab);
    }

    #[test]
    fn data_is_little_endian_in_access_order() {
        assert_eq!(
            data::from_u64(0x1122_3344, 4),
            [0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0]
        );
        assert_eq!(data::from_u64(!0, 3), [0xff, 0xff, 0xff, 0, 0, 0, 0, 0]);
        assert_eq!(data::from_u64(!0, 8), [0xff; 8]);
        assert_eq!(
            data::to_u64(&[1, 2, 3, 4, 5, 6, 7, 8], 8),
            0x0807_0605_0403_0201
        );
        assert_eq!(data::to_u64(&[1, 2, 3, 4, 5, 6, 7, 8], 6), 0x0605_0403_0201);
        assert_eq!(data::to_u64(&[0xff; 8], 1), 0xff);
        // A length the kernel never sends is clamped, not a panic.
        assert_eq!(data::to_u64(&[0xff; 8], 200), u64::MAX);
        assert_eq!(data::from_u64(5, 0), [0; 8]);
        for len in 1..=8 {
            let v = 0x8877_6655_4433_2211u64;
            let mask = if len == 8 {
                !0
            } else {
                (1u64 << (8 * len)) - 1
            };
            assert_eq!(data::to_u64(&data::from_u64(v, len), len), v & mask);
        }
    }

    #[test]
    fn replies_as_the_kernel_reads_them() {
        let r = Reply::with_value(9, 2, 0xbeef);
        assert_eq!(r.seq, 9);
        assert_eq!(r.data, [0xef, 0xbe, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.value(2), 0xbeef);
        assert_eq!(r.flags, 0);
        assert_eq!(Reply::new(9, r.data), r);
    }

    #[test]
    fn seq_gaps_count_dropped_accesses() {
        let mut g = SeqGaps::default();
        // The first record says nothing about what came before it.
        assert_eq!(g.note(100), 0);
        assert_eq!(g.note(101), 0);
        assert_eq!(g.note(105), 3);
        assert_eq!(g.note(106), 0);
        assert_eq!(g.note(108), 1);
        assert_eq!((g.missed(), g.gaps()), (4, 2));
        // Going backwards is not a gap.
        assert_eq!(g.note(50), 0);
        assert_eq!(g.note(51), 0);
        assert_eq!(g.missed(), 4);
        // Wrapping around is not one either.
        let mut g = SeqGaps::default();
        g.note(u64::MAX);
        assert_eq!(g.note(0), 0);
        assert_eq!(g.note(2), 1);
    }

    // The shadow's bounds and alignment checks, on an anonymous mapping.
    #[test]
    fn shadow_cells_checked() {
        let fd = memfd();
        let shadow = Shadow {
            map: map(&Arc::new(File::from(fd)), 4096, 0, "mmap").unwrap(),
        };
        shadow.write(0x24u32 as usize, 0x1234_5678u32).unwrap();
        assert_eq!(shadow.read::<u32>(0x24).unwrap(), 0x1234_5678);
        assert_eq!(shadow.read::<u16>(0x26).unwrap(), 0x1234);
        assert!(matches!(
            shadow.write(0x22, 0u32),
            Err(Error::ShadowBounds { .. })
        ));
        assert!(shadow.write(4092, 0u64).is_err());
        assert!(shadow.write(4096, 0u8).is_err());
        assert!(shadow.write(usize::MAX, 0u8).is_err());
        shadow.write(4088, u64::MAX).unwrap();
    }

    // The test plays the kernel on a ring of 8 records in a memfd, through
    // a mapping of its own; no flag asks for a wakeup.
    #[test]
    fn peek_leaves_records_until_advance() {
        let fd = memfd();
        let file = Arc::new(File::from(fd.try_clone().unwrap()));
        let kernel = map(&file, 4096, 0, "mmap").unwrap();
        let field = |offset| kernel.get_atomic_ref::<AtomicU32>(offset).unwrap();
        field(sys::RING_ENTRIES_OFFSET).store(8, Ordering::Relaxed);
        let backend = Backend::new(fd).unwrap();
        for seq in 1..=3u64 {
            let slot = (seq - 1) as usize;
            let record = sys::kvm_user_access {
                seq,
                len: 4,
                op: sys::KVM_USER_OP_STORE,
                ..Default::default()
            };
            kernel
                .get_ref::<sys::kvm_user_access>(sys::RING_RECORDS_OFFSET + slot * RECORD)
                .unwrap()
                .store(record);
        }
        field(sys::RING_HEAD_OFFSET).store(3, Ordering::Release);
        let tail = || field(sys::RING_TAIL_OFFSET).load(Ordering::Acquire);
        let peek = |max| {
            let mut seen = Vec::new();
            backend.peek_max(max, |a| seen.push(a.seq)).unwrap();
            seen
        };
        assert_eq!(peek(u32::MAX), [1, 2, 3]);
        assert_eq!(peek(u32::MAX), [1, 2, 3], "still there");
        assert_eq!(peek(2), [1, 2]);
        assert_eq!(tail(), 0);
        backend.advance(2).unwrap();
        assert_eq!((tail(), backend.pending()), (2, 1));
        assert!(matches!(
            backend.advance(2),
            Err(Error::NotPending { n: 2, pending: 1 })
        ));
        assert_eq!(tail(), 2, "nothing moved");
        assert_eq!(peek(u32::MAX), [3]);
        let mut seen = Vec::new();
        assert_eq!(backend.consume(|a| seen.push(a.seq)).unwrap(), 1);
        assert_eq!((seen, tail(), backend.pending()), (vec![3], 3, 0));
        backend.advance(0).unwrap();
    }

    fn memfd() -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(c"shadow-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        fd
    }
}
