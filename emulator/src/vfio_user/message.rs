//! vfio-user messages on the wire: a 16-byte header, then the command's
//! fields, little-endian, as QEMU's docs/interop/vfio-user.rst lays them
//! out. Everything here is parsing and encoding, checked against the
//! sizes the header claims; the server ([`super`]) gives them meaning.

use std::io;

/// Header bytes of every message.
pub const HEADER_SIZE: usize = 16;

/// Header flags: the message type (low four bits), no reply wanted, error.
pub const TYPE_MASK: u32 = 0xf;
pub const TYPE_REQUEST: u32 = 0;
pub const TYPE_REPLY: u32 = 1;
pub const NO_REPLY: u32 = 1 << 4;
pub const ERROR: u32 = 1 << 5;

/// The message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// The whole message, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let mut r = Reader::new(b);
        Header {
            id: r.u16().expect("sized"),
            command: r.u16().expect("sized"),
            size: r.u32().expect("sized"),
            flags: r.u32().expect("sized"),
            error: r.u32().expect("sized"),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.command.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.error.to_le_bytes());
    }

    pub fn wants_reply(&self) -> bool {
        self.flags & NO_REPLY == 0
    }

    pub fn is_request(&self) -> bool {
        self.flags & TYPE_MASK == TYPE_REQUEST
    }
}

/// A reply to `request` whose payload is `body`.
pub fn reply(request: &Header, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    Header {
        id: request.id,
        command: request.command,
        size: (HEADER_SIZE + body.len()) as u32,
        flags: TYPE_REPLY,
        error: 0,
    }
    .encode(&mut out);
    out.extend_from_slice(body);
    out
}

/// An error reply to `request`: errno `errno`, no payload.
pub fn error_reply(request: &Header, errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE);
    Header {
        id: request.id,
        command: request.command,
        size: HEADER_SIZE as u32,
        flags: TYPE_REPLY | ERROR,
        error: errno as u32,
    }
    .encode(&mut out);
    out
}

/// Why a request was refused: the errno its error reply carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<Errno> for io::Error {
    fn from(e: Errno) -> Self {
        io::Error::from_raw_os_error(e.0)
    }
}

pub const EINVAL: Errno = Errno(libc::EINVAL);

/// Reads fields off a message payload; running short is `EINVAL`.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if n > self.rest.len() {
            return Err(EINVAL);
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Errno> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }

    pub fn u16(&mut self) -> Result<u16, Errno> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// `VFIO_USER_DMA_MAP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    pub flags: u32,
    /// Offset into the file descriptor sent with the message.
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

impl DmaMap {
    pub fn decode(payload: &[u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        let _argsz = r.u32()?;
        Ok(DmaMap {
            flags: r.u32()?,
            offset: r.u64()?,
            address: r.u64()?,
            size: r.u64()?,
        })
    }
}

/// `VFIO_USER_DMA_UNMAP` (its reply echoes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

impl DmaUnmap {
    pub fn decode(payload: &[u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        Ok(DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            address: r.u64()?,
            size: r.u64()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.argsz)
            .u32(self.flags)
            .u64(self.address)
            .u64(self.size)
            .0
    }
}

/// `struct vfio_region_info`, as `VFIO_USER_DEVICE_GET_REGION_INFO`'s
/// request and reply carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// Bytes of `struct vfio_region_info`.
pub const REGION_INFO_SIZE: u32 = 32;

impl RegionInfo {
    pub fn decode(payload: &[u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        Ok(RegionInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.cap_offset)
            .u64(self.size)
            .u64(self.offset)
            .0
    }
}

/// `struct vfio_irq_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

impl IrqInfo {
    pub fn decode(payload: &[u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        Ok(IrqInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count)
            .0
    }
}

/// `struct vfio_irq_set` and the data after it (one byte per vector for
/// `VFIO_IRQ_SET_DATA_BOOL`; eventfds come as descriptors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqSet<'a> {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub data: &'a [u8],
}

impl<'a> IrqSet<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        let _argsz = r.u32()?;
        Ok(IrqSet {
            flags: r.u32()?,
            index: r.u32()?,
            start: r.u32()?,
            count: r.u32()?,
            data: r.rest(),
        })
    }
}

/// `VFIO_USER_REGION_READ` and `_WRITE`: where, and for a write the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionAccess<'a> {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: &'a [u8],
}

impl<'a> RegionAccess<'a> {
    pub fn decode(payload: &'a [u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        Ok(RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
            data: r.rest(),
        })
    }

    /// The reply's payload: the same fields, then `data` (a read's
    /// result; empty for a write).
    pub fn reply(&self, data: &[u8]) -> Vec<u8> {
        Writer::default()
            .u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .bytes(data)
            .0
    }
}

/// `VFIO_USER_VERSION`: the protocol version and the capabilities, a
/// NUL-terminated JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub capabilities: serde_json::Value,
}

impl Version {
    pub fn decode(payload: &[u8]) -> Result<Self, Errno> {
        let mut r = Reader::new(payload);
        let major = r.u16()?;
        let minor = r.u16()?;
        let json = r.rest();
        let json = json.strip_suffix(&[0]).unwrap_or(json);
        let capabilities = if json.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(json).map_err(|_| EINVAL)?
        };
        if !capabilities.is_object() {
            return Err(EINVAL);
        }
        Ok(Version {
            major,
            minor,
            capabilities,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        Writer::default()
            .u16(self.major)
            .u16(self.minor)
            .bytes(self.capabilities.to_string().as_bytes())
            .bytes(&[0])
            .0
    }

    /// `capabilities.<name>` as a number, if present.
    pub fn capability_u64(&self, name: &str) -> Option<u64> {
        self.capabilities.get("capabilities")?.get(name)?.as_u64()
    }

    /// `capabilities.<name>`, if present.
    pub fn capability(&self, name: &str) -> Option<&serde_json::Value> {
        self.capabilities.get("capabilities")?.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            id: 7,
            command: 9,
            size: 40,
            flags: NO_REPLY,
            error: 0,
        };
        let mut b = Vec::new();
        h.encode(&mut b);
        assert_eq!(Header::decode(&b.try_into().unwrap()), h);
        assert!(!h.wants_reply() && h.is_request());
    }

    #[test]
    fn short_payloads_are_refused() {
        assert_eq!(DmaMap::decode(&[0; 31]), Err(EINVAL));
        assert_eq!(RegionInfo::decode(&[0; 31]), Err(EINVAL));
        assert_eq!(RegionAccess::decode(&[0; 15]), Err(EINVAL));
        assert_eq!(IrqSet::decode(&[0; 19]), Err(EINVAL));
        assert_eq!(Version::decode(&[0; 3]), Err(EINVAL));
    }

    #[test]
    fn version_capabilities() {
        let v = Version::decode(b"\0\0\x01\0{\"capabilities\":{\"max_msg_fds\":8}}\0").unwrap();
        assert_eq!((v.major, v.minor), (0, 1));
        assert_eq!(v.capability_u64("max_msg_fds"), Some(8));
        assert_eq!(v.capability_u64("pgsizes"), None);
        assert_eq!(Version::decode(&v.encode()).unwrap(), v);
        assert_eq!(
            Version::decode(b"\0\0\0\0[1]\0"),
            Err(EINVAL),
            "not an object"
        );
        assert_eq!(Version::decode(b"\0\0\0\0{\0"), Err(EINVAL), "not JSON");
    }
}
