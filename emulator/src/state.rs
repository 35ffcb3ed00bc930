//! The state region: a shared memory file that outlives each emulator of
//! a device, so that a successor of one that crashed (SIGKILL at any
//! instruction) continues where it stopped.
//!
//! The VMM creates it once per device ([`create_file`]) and hands it to
//! every emulator it starts for that device. It holds a header and two
//! slots, A and B, each a complete committed state:
//!
//! ```text
//! header   0  magic "KVMUSTAT" (u64)
//!          8  version (u32)
//!         12  current (u32): 0 nothing committed yet, 1 slot A, 2 slot B
//!         16  zero up to HEADER_LEN
//! slot     0  applied_seq (u64): the last ring record the state includes
//!          8  replies (u32): how many saved replies follow
//!         12  state_len (u32): the model state's length
//!         16  output_end (u64): the console stream's length with this state
//!         24  output_len (u32): the console bytes of the batch that made
//!             this state, which end at output_end
//!         28  zero
//!         32  MAX_SAVED_REPLIES x (seq u64, data [u8; 8]): the replies to
//!             the forwarded loads of the batch that made this state
//!   SLOT_OUTPUT  those console bytes, output_len of them
//!    SLOT_STATE  the model state (DeviceModel::save), state_len bytes
//! ```
//!
//! All little-endian. A commit writes the whole new state into the slot
//! that is not current, then publishes it with one release store to
//! `current`; a reader loads `current` with acquire and reads that slot.
//! A crash before the store leaves the old state current and untouched,
//! one after it the new state complete: never a mix.
//!
//! The previous emulator may have been compromised by its guest, so what
//! is read back is checked (selector, lengths) and copied out once before
//! use; the model checks its own state ([`crate::model::DeviceModel::restore`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use userdev::Reply;

/// The region's size, which the VMM gives it and the emulator expects.
pub const STATE_REGION_SIZE: usize = 64 << 10;
/// Replies to forwarded loads a commit saves; a batch with more loads
/// commits in the middle.
pub const MAX_SAVED_REPLIES: usize = 64;
/// Console bytes a commit saves; a batch with more output commits in the
/// middle.
pub const MAX_SAVED_OUTPUT: usize = 1024;

const MAGIC: [u8; 8] = *b"KVMUSTAT";
const VERSION: u32 = 2;
const MAGIC_OFFSET: usize = 0;
const VERSION_OFFSET: usize = 8;
const CURRENT_OFFSET: usize = 12;
const HEADER_LEN: usize = 64;

/// Each slot: half of what the header leaves.
const SLOT_LEN: usize = (STATE_REGION_SIZE - HEADER_LEN) / 2;
const SLOT_SEQ: usize = 0;
const SLOT_REPLIES_LEN: usize = 8;
const SLOT_STATE_LEN: usize = 12;
const SLOT_OUTPUT_END: usize = 16;
const SLOT_OUTPUT_LEN: usize = 24;
const SLOT_REPLIES: usize = 32;
const REPLY_LEN: usize = 16;
const SLOT_OUTPUT: usize = SLOT_REPLIES + MAX_SAVED_REPLIES * REPLY_LEN;
const SLOT_STATE: usize = SLOT_OUTPUT + MAX_SAVED_OUTPUT;
/// The largest model state a slot holds: two of them fit in the region.
pub const MAX_MODEL_STATE: usize = SLOT_LEN - SLOT_STATE;

const _: () = assert!(SLOT_LEN.is_multiple_of(8) && HEADER_LEN.is_multiple_of(8));
// edu's state, its 4 KiB DMA buffer above all, with room to spare.
const _: () = assert!(MAX_MODEL_STATE >= 4 * 4096);

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the state region has {0} bytes, expected {STATE_REGION_SIZE}")]
    Size(u64),
    #[error("not a state region of version {VERSION} (a bad header)")]
    Header,
    #[error("slot selector {0} (0, 1 or 2)")]
    Selector(u32),
    #[error("{replies} saved replies, {output} console bytes and a {state}-byte state do not fit a slot")]
    Lengths {
        replies: usize,
        output: usize,
        state: usize,
    },
    #[error("{output} console bytes before stream offset {end}")]
    Output { output: usize, end: u64 },
}

fn os(op: &'static str) -> impl FnOnce(io::Error) -> RegionError {
    move |source| RegionError::Os { op, source }
}

/// The VMM's side: a new state region, zero-filled (nothing committed),
/// close-on-exec, its size sealed; F_SEAL_WRITE stays off, emulators
/// write it.
pub fn create_file() -> Result<OwnedFd, RegionError> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new.
    let fd = unsafe {
        libc::memfd_create(
            c"kvm-userdev-state".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("memfd_create(state region)")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(STATE_REGION_SIZE as u64)
        .map_err(os("size the state region"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int and touches no memory of ours.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(os("seal the state region")(io::Error::last_os_error()));
    }
    Ok(file.into())
}

/// What a commit holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// The seq of the last ring record whose effects the state includes
    /// (0: none; KVM numbers accesses from 1).
    pub applied_seq: u64,
    /// The replies to the forwarded loads of the batch that ended at
    /// `applied_seq`, for a successor that sees those loads again.
    pub replies: Vec<Reply>,
    /// How many console bytes the device has sent with this state: the
    /// stream offset its next byte goes to.
    pub output_end: u64,
    /// The console bytes of that batch, which end at `output_end`: a
    /// successor sends them again, in case its predecessor died before it
    /// sent them ([`crate::console`]).
    pub output: Vec<u8>,
    /// The model's state ([`crate::model::DeviceModel::save`]).
    pub state: Vec<u8>,
}

fn check_lengths(replies: usize, output: usize, state: usize) -> Result<(), RegionError> {
    if replies > MAX_SAVED_REPLIES || output > MAX_SAVED_OUTPUT || state > MAX_MODEL_STATE {
        return Err(RegionError::Lengths {
            replies,
            output,
            state,
        });
    }
    Ok(())
}

impl Committed {
    fn check(&self) -> Result<(), RegionError> {
        let output = self.output.len();
        check_lengths(self.replies.len(), output, self.state.len())?;
        if output as u64 > self.output_end {
            return Err(RegionError::Output {
                output,
                end: self.output_end,
            });
        }
        Ok(())
    }
}

/// An emulator's view of the state region.
#[derive(Debug)]
pub struct StateRegion {
    map: MmapRegion,
    /// The slot last published (0: none), as this emulator knows it: once
    /// taken over, never read back from the shared memory.
    current: u32,
}

impl StateRegion {
    /// Maps the region the VMM sent; reads nothing of it (call before the
    /// sandbox goes up, [`Self::take_over`] after).
    pub fn map(fd: OwnedFd) -> Result<Self, RegionError> {
        let file = File::from(fd);
        let len = file.metadata().map_err(os("fstat(state region)"))?.len();
        if len != STATE_REGION_SIZE as u64 {
            return Err(RegionError::Size(len));
        }
        let map = MmapRegion::build(
            Some(FileOffset::from_arc(Arc::new(file), 0)),
            STATE_REGION_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| RegionError::Os {
            op: "mmap(state region)",
            source: match e {
                MmapRegionError::Mmap(e) => e,
                other => io::Error::other(other),
            },
        })?;
        Ok(StateRegion { map, current: 0 })
    }

    fn current_ref(&self) -> &AtomicU32 {
        self.map
            .get_atomic_ref(CURRENT_OFFSET)
            .expect("the selector lies in the header")
    }

    fn read(&self, offset: usize, buf: &mut [u8]) {
        self.map
            .as_volatile_slice()
            .read_slice(buf, offset)
            .expect("offsets checked against the region's size");
    }

    fn write(&self, offset: usize, buf: &[u8]) {
        self.map
            .as_volatile_slice()
            .write_slice(buf, offset)
            .expect("offsets checked against the region's size");
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn slot_offset(slot: u32) -> usize {
        HEADER_LEN + (slot as usize - 1) * SLOT_LEN
    }

    /// Takes the region over: the committed state, if there is one. A
    /// region whose header or current slot does not check out is reset
    /// to nothing committed, and the error says why.
    pub fn take_over(&mut self) -> Result<Option<Committed>, RegionError> {
        match self.read_committed() {
            Ok(Some((slot, c))) => {
                self.current = slot;
                Ok(Some(c))
            }
            // Fresh from the VMM, or nothing committed yet.
            Ok(None) => {
                self.reset();
                Ok(None)
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    /// The committed state, without taking the region over: for a VMM
    /// that saves the state of a device whose emulator commits nothing
    /// meanwhile (its ring drained, its guest held).
    pub fn committed(&self) -> Result<Option<Committed>, RegionError> {
        Ok(self.read_committed()?.map(|(_, c)| c))
    }

    /// The committed state and the slot it is in.
    fn read_committed(&self) -> Result<Option<(u32, Committed)>, RegionError> {
        // The selector first: what it publishes is read after it.
        let current = self.current_ref().load(Ordering::Acquire);
        let mut magic = [0; 8];
        self.read(MAGIC_OFFSET, &mut magic);
        let version = self.read_u32(VERSION_OFFSET);
        if magic == [0; 8] && version == 0 && current == 0 {
            return Ok(None);
        }
        if magic != MAGIC || version != VERSION {
            return Err(RegionError::Header);
        }
        if current > 2 {
            return Err(RegionError::Selector(current));
        }
        if current == 0 {
            return Ok(None);
        }
        // Each field is read once, into our memory, and checked there.
        let slot = Self::slot_offset(current);
        let mut head = [0; SLOT_REPLIES];
        self.read(slot, &mut head);
        let field = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        let field64 = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
        let (replies, output, state) = (
            field(SLOT_REPLIES_LEN) as usize,
            field(SLOT_OUTPUT_LEN) as usize,
            field(SLOT_STATE_LEN) as usize,
        );
        check_lengths(replies, output, state)?;
        let mut raw = vec![0; replies * REPLY_LEN];
        self.read(slot + SLOT_REPLIES, &mut raw);
        let replies = raw
            .chunks_exact(REPLY_LEN)
            .map(|r| {
                let seq = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
                Reply::new(seq, r[8..].try_into().expect("8 bytes"))
            })
            .collect();
        let mut c = Committed {
            applied_seq: field64(SLOT_SEQ),
            replies,
            output_end: field64(SLOT_OUTPUT_END),
            output: vec![0; output],
            state: vec![0; state],
        };
        self.read(slot + SLOT_OUTPUT, &mut c.output);
        self.read(slot + SLOT_STATE, &mut c.state);
        c.check()?;
        Ok(Some((current, c)))
    }

    /// Nothing committed: the selector first, so that no slot is current
    /// while the header is rewritten.
    fn reset(&mut self) {
        self.current_ref().store(0, Ordering::Release);
        self.current = 0;
        self.write(MAGIC_OFFSET, &MAGIC);
        self.write(VERSION_OFFSET, &VERSION.to_le_bytes());
    }

    /// Commits a new state: written into the slot that is not current,
    /// then published. The caller caps the replies at
    /// [`MAX_SAVED_REPLIES`], the output at [`MAX_SAVED_OUTPUT`] and the
    /// state at [`MAX_MODEL_STATE`]; beyond, nothing is written.
    pub fn commit(&mut self, c: &Committed) -> Result<(), RegionError> {
        let slot = self.stage(c)?;
        self.publish(slot);
        Ok(())
    }

    /// The first half of a commit: fills the slot that is not current,
    /// which no reader looks at; returns it.
    fn stage(&self, c: &Committed) -> Result<u32, RegionError> {
        c.check()?;
        let slot = if self.current == 1 { 2 } else { 1 };
        let base = Self::slot_offset(slot);
        let mut head = [0; SLOT_REPLIES];
        let mut put = |at: usize, b: &[u8]| head[at..at + b.len()].copy_from_slice(b);
        put(SLOT_SEQ, &c.applied_seq.to_le_bytes());
        put(SLOT_REPLIES_LEN, &(c.replies.len() as u32).to_le_bytes());
        put(SLOT_STATE_LEN, &(c.state.len() as u32).to_le_bytes());
        put(SLOT_OUTPUT_END, &c.output_end.to_le_bytes());
        put(SLOT_OUTPUT_LEN, &(c.output.len() as u32).to_le_bytes());
        self.write(base, &head);
        let mut raw = [0; MAX_SAVED_REPLIES * REPLY_LEN];
        for (r, out) in c.replies.iter().zip(raw.chunks_exact_mut(REPLY_LEN)) {
            out[..8].copy_from_slice(&r.seq.to_le_bytes());
            out[8..].copy_from_slice(&r.data);
        }
        self.write(base + SLOT_REPLIES, &raw[..c.replies.len() * REPLY_LEN]);
        self.write(base + SLOT_OUTPUT, &c.output);
        self.write(base + SLOT_STATE, &c.state);
        Ok(slot)
    }

    /// The second half: one release store makes the staged slot current
    /// (everything written into it before comes with it).
    fn publish(&mut self, slot: u32) {
        self.current_ref().store(slot, Ordering::Release);
        self.current = slot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> (StateRegion, OwnedFd) {
        let fd = create_file().unwrap();
        let keep = fd.try_clone().unwrap();
        (StateRegion::map(fd).unwrap(), keep)
    }

    /// Another emulator of the same device: a mapping of its own.
    fn successor(fd: &OwnedFd) -> StateRegion {
        StateRegion::map(fd.try_clone().unwrap()).unwrap()
    }

    fn bytes(r: &StateRegion) -> Vec<u8> {
        let mut b = vec![0; STATE_REGION_SIZE];
        r.read(0, &mut b);
        b
    }

    fn committed(seq: u64, replies: usize, state_len: usize) -> Committed {
        let output: Vec<u8> = (0..seq as usize % 7 * 100).map(|i| i as u8).collect();
        Committed {
            applied_seq: seq,
            replies: (0..replies as u64)
                .map(|i| Reply::with_value(seq * 100 + i, 8, seq * 1000 + i))
                .collect(),
            output_end: seq * 1000 + output.len() as u64,
            output,
            state: (0..state_len).map(|i| (seq as usize + i) as u8).collect(),
        }
    }

    fn commit(r: &mut StateRegion, c: &Committed) {
        r.commit(c).unwrap();
    }

    #[test]
    fn the_file_is_sealed_and_sized() {
        let fd = create_file().unwrap();
        let file = File::from(fd);
        assert_eq!(file.metadata().unwrap().len(), STATE_REGION_SIZE as u64);
        // SAFETY: F_GET_SEALS on our fd.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        assert_eq!(seals & libc::F_SEAL_WRITE, 0);
        assert!(file.set_len(4096).is_err());
    }

    #[test]
    fn commits_reach_a_successor() {
        let (mut r, fd) = region();
        assert_eq!(r.take_over().unwrap(), None);
        let first = committed(10, 3, 4200);
        commit(&mut r, &first);
        assert_eq!(successor(&fd).take_over().unwrap(), Some(first));
        let second = committed(20, MAX_SAVED_REPLIES, MAX_MODEL_STATE);
        commit(&mut r, &second);
        let third = committed(30, 0, 0);
        commit(&mut r, &third);
        // The successor takes over and commits on top.
        let mut s = successor(&fd);
        assert_eq!(s.take_over().unwrap(), Some(third));
        let fourth = committed(40, 1, 7);
        commit(&mut s, &fourth);
        assert_eq!(successor(&fd).take_over().unwrap(), Some(fourth));
        // Too much for a slot, or output before the stream's start:
        // refused, nothing changes.
        let fifth = || committed(50, 0, 0);
        for bad in [
            Committed {
                state: vec![0; MAX_MODEL_STATE + 1],
                ..fifth()
            },
            Committed {
                replies: vec![Reply::with_value(1, 1, 0); MAX_SAVED_REPLIES + 1],
                ..fifth()
            },
            Committed {
                output: vec![0; MAX_SAVED_OUTPUT + 1],
                output_end: 1 << 20,
                ..fifth()
            },
            Committed {
                output: vec![0; 10],
                output_end: 9,
                ..fifth()
            },
        ] {
            assert!(s.commit(&bad).is_err());
        }
        assert_eq!(successor(&fd).take_over().unwrap().unwrap().applied_seq, 40);
    }

    /// A crash at any point of a commit: the staged slot holds any prefix
    /// of what the commit writes, and the selector is not flipped yet; the
    /// successor must read the old state. Once flipped, the new one.
    #[test]
    fn a_crash_during_a_commit_leaves_old_or_new() {
        for (old, new) in [
            (None, committed(5, 2, 300)),
            (Some(committed(5, 2, 300)), committed(9, 4, 4200)),
            (Some(committed(9, 4, 4200)), committed(12, 0, 10)),
        ] {
            let (mut r, fd) = region();
            r.take_over().unwrap();
            // Two commits back: the slot the new commit goes to holds
            // an older state, as it does in a running emulator.
            commit(&mut r, &committed(1, 1, 2000));
            match &old {
                Some(old) => commit(&mut r, old),
                None => r.reset(),
            }
            let before = bytes(&r);
            let slot = r.stage(&new).unwrap();
            let staged = bytes(&r);
            // Staging touches the inactive slot only.
            let span = StateRegion::slot_offset(slot)..StateRegion::slot_offset(slot) + SLOT_LEN;
            for (i, (a, b)) in before.iter().zip(&staged).enumerate() {
                assert!(a == b || span.contains(&i), "byte {i} outside the slot");
            }
            let changed: Vec<usize> = span.filter(|&i| before[i] != staged[i]).collect();
            // Stores may land in any order: every prefix of the changed
            // bytes, from either end.
            assert!(changed.len() > new.state.len() / 2);
            let (s, mut t) = (successor(&fd), successor(&fd));
            for forward in [true, false] {
                s.write(0, &before);
                for step in 0..=changed.len() {
                    assert_eq!(t.take_over().unwrap(), old, "{step} bytes in");
                    if let Some(&i) = match forward {
                        true => changed.get(step),
                        false => changed.iter().rev().nth(step),
                    } {
                        s.write(i, &staged[i..i + 1]);
                    }
                }
            }
            let mut s = successor(&fd);
            s.write(0, &staged);
            r.publish(slot);
            assert_eq!(s.take_over().unwrap(), Some(new));
        }
    }

    #[test]
    fn garbage_is_refused_and_reset() {
        let (mut r, fd) = region();
        r.take_over().unwrap();
        commit(&mut r, &committed(3, 1, 100));
        let set = |offset: usize, b: &[u8]| successor(&fd).write(offset, b);
        let slot = StateRegion::slot_offset(1);
        for (offset, bytes) in [
            (MAGIC_OFFSET, &b"XXXXXXXX"[..]),
            (VERSION_OFFSET, &1u32.to_le_bytes()),
            (CURRENT_OFFSET, &3u32.to_le_bytes()),
            (CURRENT_OFFSET, &u32::MAX.to_le_bytes()),
            (slot + SLOT_REPLIES_LEN, &65u32.to_le_bytes()),
            (
                slot + SLOT_OUTPUT_LEN,
                &(MAX_SAVED_OUTPUT as u32 + 1).to_le_bytes(),
            ),
            // More output than the stream had.
            (slot + SLOT_OUTPUT_END, &99u64.to_le_bytes()),
            (
                slot + SLOT_STATE_LEN,
                &(MAX_MODEL_STATE as u32 + 1).to_le_bytes(),
            ),
            (slot + SLOT_STATE_LEN, &u32::MAX.to_le_bytes()),
        ] {
            let mut s = successor(&fd);
            commit(&mut s, &committed(3, 1, 100));
            let mut s = successor(&fd);
            assert!(s.take_over().unwrap().is_some());
            set(offset, bytes);
            assert!(successor(&fd).take_over().is_err(), "{offset} {bytes:?}");
            // Reset: the next emulator starts from nothing, and commits.
            let mut next = successor(&fd);
            assert_eq!(next.take_over().unwrap(), None);
            commit(&mut next, &committed(4, 0, 1));
            assert_eq!(
                successor(&fd).take_over().unwrap(),
                Some(committed(4, 0, 1))
            );
        }
        // Any other bytes: whatever comes out is within the bounds.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut junk = vec![0; HEADER_LEN + SLOT_REPLIES];
            for b in &mut junk {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // A valid header half the time, a valid selector mostly.
            if x & 1 == 0 {
                junk[..8].copy_from_slice(&MAGIC);
                junk[8..12].copy_from_slice(&VERSION.to_le_bytes());
            }
            junk[12..16].copy_from_slice(&((x >> 8) as u32 % 4).to_le_bytes());
            set(0, &junk[..HEADER_LEN]);
            set(slot, &junk[HEADER_LEN..]);
            set(StateRegion::slot_offset(2), &junk[HEADER_LEN..]);
            if let Ok(Some(c)) = successor(&fd).take_over() {
                assert!(c.check().is_ok());
            }
        }
    }
}
