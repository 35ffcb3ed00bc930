//! Guest accesses over a UNIX socket: the classic out-of-process path, for
//! comparison with the user device.
//!
//! A VMM that takes KVM_EXIT_MMIO itself forwards each access to the
//! emulator as one `SOCK_SEQPACKET` message and, for a load, waits for the
//! reply, as crosvm's proxy devices and multi-process QEMU do. Stores get
//! no reply (crosvm posts them too); the socket keeps them in order with
//! later loads. Messages are fixed-size and little-endian:
//!
//! - access, 32 bytes: seq u64, offset u64, data 8 bytes (as in the user
//!   device's records: the first len bytes in access order, the rest
//!   zero), len u8 (1 to 8), op u8 (0 load, 1 store), 6 bytes zero;
//! - reply, 16 bytes: seq u64, data 8 bytes (the load's len bytes in
//!   access order).
//!
//! The sequence number lets a VMM that gave up on a load (timeout) drop
//! the late reply instead of taking it for the next one's.

use userdev::{Access, Op, Reply};

use crate::serve::BAR0_RANGE;

pub const ACCESS_LEN: usize = 32;
pub const REPLY_LEN: usize = 16;

const OP_LOAD: u8 = 0;
const OP_STORE: u8 = 1;

fn bytes_at(b: &[u8], at: usize) -> [u8; 8] {
    b[at..at + 8].try_into().expect("8 bytes")
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes_at(b, at))
}

pub fn encode_access(a: &Access) -> [u8; ACCESS_LEN] {
    let mut b = [0; ACCESS_LEN];
    b[0..8].copy_from_slice(&a.seq.to_le_bytes());
    b[8..16].copy_from_slice(&a.offset.to_le_bytes());
    b[16..24].copy_from_slice(&a.data);
    b[24] = a.len;
    b[25] = match a.op {
        Op::Load => OP_LOAD,
        Op::Store => OP_STORE,
    };
    b
}

/// An access of BAR0, or `None` for a malformed message.
pub fn decode_access(b: &[u8]) -> Option<Access> {
    if b.len() != ACCESS_LEN || b[26..].iter().any(|&x| x != 0) {
        return None;
    }
    let op = match b[25] {
        OP_LOAD => Op::Load,
        OP_STORE => Op::Store,
        _ => return None,
    };
    let len = b[24];
    if !(1..=8).contains(&len) {
        return None;
    }
    Some(Access {
        seq: u64_at(b, 0),
        range: BAR0_RANGE,
        offset: u64_at(b, 8),
        len,
        op,
        data: bytes_at(b, 16),
        vcpu: 0,
    })
}

pub fn encode_reply(r: &Reply) -> [u8; REPLY_LEN] {
    let mut b = [0; REPLY_LEN];
    b[0..8].copy_from_slice(&r.seq.to_le_bytes());
    b[8..16].copy_from_slice(&r.data);
    b
}

pub fn decode_reply(b: &[u8]) -> Option<Reply> {
    (b.len() == REPLY_LEN).then(|| Reply::new(u64_at(b, 0), bytes_at(b, 8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let a = Access {
            seq: 7,
            range: BAR0_RANGE,
            offset: 0x60,
            len: 4,
            op: Op::Store,
            data: userdev::data::from_u64(0x1234, 4),
            vcpu: 0,
        };
        assert_eq!(decode_access(&encode_access(&a)), Some(a));
        assert_eq!(encode_access(&a)[16..20], [0x34, 0x12, 0, 0]);
        let r = Reply::with_value(9, 4, !0);
        assert_eq!(decode_reply(&encode_reply(&r)), Some(r));
    }

    #[test]
    fn malformed_refused() {
        let a = Access {
            seq: 1,
            range: BAR0_RANGE,
            offset: 0,
            len: 4,
            op: Op::Load,
            data: [0; 8],
            vcpu: 0,
        };
        let good = encode_access(&a);
        assert!(decode_access(&good[..31]).is_none());
        for (at, value) in [(24, 9), (24, 0), (25, 2), (31, 1)] {
            let mut b = good;
            b[at] = value;
            assert!(decode_access(&b).is_none(), "byte {at} = {value}");
        }
        assert!(decode_reply(&[0; 15]).is_none());
    }
}
