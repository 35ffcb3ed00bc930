//! Console output on its way to the VMM: `SOCK_SEQPACKET` messages, each
//! the stream offset of its first byte (u64, little-endian) and then the
//! bytes. The offsets make the output exactly-once across emulator
//! restarts: a successor sends again what its predecessor committed but
//! may have died before sending, and the VMM writes each offset once.

/// The most bytes one message carries.
pub const MAX_CHUNK: usize = 4096;
const HEADER: usize = 8;

/// The messages that carry `bytes`, which start at stream offset
/// `offset`: one per [`MAX_CHUNK`].
pub fn messages(offset: u64, bytes: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    bytes.chunks(MAX_CHUNK).enumerate().map(move |(i, chunk)| {
        let mut m = Vec::with_capacity(HEADER + chunk.len());
        m.extend_from_slice(&(offset + (i * MAX_CHUNK) as u64).to_le_bytes());
        m.extend_from_slice(chunk);
        m
    })
}

/// Sends `bytes`, which start at stream offset `offset`, on `socket`: one
/// message per chunk, each a single write. Returns how many messages were
/// lost (the VMM gone, or a short write, which a seqpacket socket does not
/// make): the sender goes on without them.
pub fn send(socket: &std::fs::File, offset: u64, bytes: &[u8]) -> u64 {
    use std::io::Write;
    let mut lost = 0;
    for m in messages(offset, bytes) {
        loop {
            match (&*socket).write(&m) {
                Ok(n) if n == m.len() => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    lost
}

/// The VMM's side: which bytes of each message are new.
#[derive(Debug, Default)]
pub struct Dedup {
    /// The offset of the next byte to write.
    next: u64,
    /// Bytes that never came (offsets skipped over).
    pub lost: u64,
    /// Messages too short to hold an offset.
    pub malformed: u64,
}

impl Dedup {
    /// The offset of the next byte to write.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The bytes of `message` not written yet, in stream order.
    pub fn accept<'a>(&mut self, message: &'a [u8]) -> &'a [u8] {
        let Some((offset, bytes)) = message.split_first_chunk::<HEADER>() else {
            self.malformed += 1;
            return &[];
        };
        let offset = u64::from_le_bytes(*offset);
        let end = offset.saturating_add(bytes.len() as u64);
        if end <= self.next {
            return &[];
        }
        if offset > self.next {
            self.lost += offset - self.next;
            self.next = offset;
        }
        let new = &bytes[(self.next - offset) as usize..];
        self.next = end;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(offset: u64, bytes: &[u8]) -> Vec<Vec<u8>> {
        messages(offset, bytes).collect()
    }

    #[test]
    fn each_byte_is_written_once_in_order() {
        let mut d = Dedup::default();
        let mut out = Vec::new();
        for (offset, bytes) in [
            (0, &b"hello"[..]),
            // A successor sends the last committed batch again.
            (0, b"hello"),
            (3, b"lo, w"),
            (5, b", w"),
            (7, b"world"),
            (12, b""),
        ] {
            for m in all(offset, bytes) {
                out.extend_from_slice(d.accept(&m));
            }
        }
        assert_eq!(out, b"hello, world");
        assert_eq!((d.lost, d.malformed), (0, 0));
    }

    #[test]
    fn gaps_and_garbage_are_counted() {
        let mut d = Dedup::default();
        assert_eq!(d.accept(&all(4, b"ab")[0]), b"ab");
        assert_eq!(d.lost, 4);
        assert_eq!(d.accept(&[1, 2, 3]), b"");
        assert_eq!(d.malformed, 1);
        // An offset near the end of the stream cannot overflow.
        assert_eq!(d.accept(&all(u64::MAX - 1, b"xyz")[0]), b"xyz");
        assert_eq!(d.accept(&all(0, b"again")[0]), b"");
    }

    #[test]
    fn long_output_is_split() {
        let bytes: Vec<u8> = (0..MAX_CHUNK * 2 + 10).map(|i| i as u8).collect();
        let ms = all(7, &bytes);
        assert_eq!(ms.len(), 3);
        let mut d = Dedup::default();
        d.accept(&all(0, &[0; 7])[0]);
        let out: Vec<u8> = ms.iter().flat_map(|m| d.accept(m).to_vec()).collect();
        assert_eq!(out, bytes);
    }
}
