//! What a device model is, and what it may do to the world around it.

use userdev::Sizes;

/// The device's surroundings: guest memory for DMA, its interrupt, the
/// shadow image and the console. The emulator process implements it over
/// the user device; a VMM hosting the same model in-process implements it
/// without a shadow.
pub trait Env {
    /// DMA from guest memory; false if `addr..addr + buf.len()` is not RAM.
    fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool;
    /// DMA into guest memory; false if the span is not RAM.
    fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool;
    /// The device's interrupt output is (or became) asserted: a level the
    /// platform turns into its wire protocol. PCI: an MSI if the guest
    /// enabled MSI, otherwise INTx goes (and stays) high. ISA: an edge on
    /// the low-to-high transition only.
    fn raise_irq(&mut self);
    /// The interrupt output is deasserted (INTx goes low; nothing to do
    /// for MSI; an ISA line just becomes ready for its next edge).
    fn lower_irq(&mut self);
    /// Publishes a register's new value in the shadow image, at its
    /// offset in range 0.
    fn publish(&mut self, offset: u64, len: u8, value: u64);
    /// Bytes the device transmits on its console line, at most
    /// [`MAX_OUTPUT_PER_ACCESS`] per access. May block; the bytes are not
    /// lost to a short write.
    fn console_out(&mut self, bytes: &[u8]);
    /// What [`DeviceModel::batched_registers`] returns has changed: the
    /// access map follows before the accesses just handled are answered.
    fn access_map_changed(&mut self) {}
}

/// The most console bytes a model sends for one access (a 16550A sends
/// one).
pub const MAX_OUTPUT_PER_ACCESS: usize = 16;

/// A register KVM may serve from the shadow image: loads of `sizes` bytes
/// in `offset..offset + len` of range 0 have no side effect.
#[derive(Clone, Copy, Debug)]
pub struct ShadowRegister {
    pub offset: u64,
    pub len: u64,
    pub sizes: Sizes,
    /// No store the guest can make changes what a load here returns (an
    /// identification register), or not in a way the guest can tell: its
    /// loads may be served while stores are pending.
    pub passes_stores: bool,
}

/// Registers whose stores need no prompt service (a transmit or log
/// register): `offset..offset + len` of range 0.
#[derive(Clone, Copy, Debug)]
pub struct BatchedRegister {
    pub offset: u64,
    pub len: u64,
}

/// What the VMM needs to present the device on PCI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code (class, subclass, programming interface).
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// BAR0: 32-bit, non-prefetchable memory of this size (a power of two).
    pub bar0_size: u64,
    /// MSI vectors the device can use (0: no MSI capability).
    pub msi_vectors: u32,
}

/// Where the device sits in the machine. Either way the user device's
/// range 0 is the device's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// A PCI function whose BAR0 the model serves (range 0 of the user device).
    Pci(PciIdentity),
    /// An ISA device at fixed I/O ports `base..base+len` (range 0 of the
    /// user device, a PIO range), interrupt on ISA IRQ `irq` (edge-triggered).
    Isa { base: u16, len: u16, irq: u8 },
}

impl Placement {
    /// The PCI identity, for a PCI function.
    pub fn pci(&self) -> Option<&PciIdentity> {
        match self {
            Placement::Pci(id) => Some(id),
            Placement::Isa { .. } => None,
        }
    }
}

/// A device whose registers (range 0) the emulator serves.
/// `Send`: a VMM serving several vCPUs may call it from any of their
/// threads (one at a time).
pub trait DeviceModel: Send {
    fn placement(&self) -> Placement;
    /// A guest load of `len` bytes at range-0 offset `offset` that reached the
    /// model (not served from the shadow image); the value goes in the low
    /// `len` bytes. `len` is 1 to 8: 3, 5, 6 and 7 only for the part of an
    /// access that a page boundary split.
    fn load(&mut self, env: &mut dyn Env, offset: u64, len: u8) -> u64;
    /// A guest store; `data` is in the low `len` bytes (guest byte order,
    /// little-endian).
    fn store(&mut self, env: &mut dyn Env, offset: u64, len: u8, data: u64);
    /// The registers without load side effects, which the model keeps
    /// current in the shadow image through [`Env::publish`], as the
    /// device's mode has them now; a model whose answer changes says so with
    /// [`Env::access_map_changed`].
    fn shadow_registers(&self) -> &'static [ShadowRegister];
    /// The registers whose stores may be batched now: the emulator is
    /// woken for them within the device's batch delay instead of at once.
    /// A model whose answer changes says so with [`Env::access_map_changed`].
    fn batched_registers(&self) -> &'static [BatchedRegister] {
        &[]
    }
    /// Publishes every shadowed register (on start, into a fresh image).
    fn publish_all(&self, env: &mut dyn Env);
    /// How many received bytes the model can take now (free space in its
    /// receive FIFO); 0 for a device without a console line.
    fn input_room(&self) -> usize {
        0
    }
    /// Bytes received on the console line, at most [`Self::input_room`]
    /// of them.
    fn input(&mut self, env: &mut dyn Env, bytes: &[u8]) {
        let _ = (env, bytes);
    }
    /// Appends the model's whole state to `out` ([`StateWriter`]'s
    /// encoding), for a successor to [`Self::restore`].
    fn save(&self, out: &mut Vec<u8>);
    /// Takes over a state that [`Self::save`] wrote, possibly in another
    /// process that the guest may have compromised: every field is checked,
    /// and on an error the model is left as it was.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError>;
    /// Whether the model's interrupt output is asserted now (what its last
    /// [`Env::raise_irq`] or [`Env::lower_irq`] said).
    fn irq_asserted(&self) -> bool;
}

/// Why a saved model state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the state ends early")]
    Truncated,
    #[error("{0} bytes after the state's end")]
    Trailing(usize),
    #[error("the state is of another model ({0:?})")]
    Model(String),
    #[error("state version {found}, expected {expected}")]
    Version { found: u8, expected: u8 },
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Writes a model state: a version byte, the model's tag (a length byte
/// and its bytes), then the model's fields, little-endian, in an order the
/// model defines and [`StateReader`] reads back.
pub struct StateWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> StateWriter<'a> {
    /// Starts the state of model `tag` (at most 255 bytes), encoding
    /// `version`.
    pub fn new(out: &'a mut Vec<u8>, tag: &str, version: u8) -> Self {
        debug_assert!(tag.len() <= usize::from(u8::MAX));
        out.push(version);
        out.push(tag.len() as u8);
        out.extend_from_slice(tag.as_bytes());
        StateWriter { out }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v.into())
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Raw bytes; a variable length goes before them as a field of its own.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }
}

/// Reads what [`StateWriter`] wrote, refusing anything short, long or of
/// another model or version.
pub struct StateReader<'a> {
    rest: &'a [u8],
}

impl<'a> StateReader<'a> {
    /// Checks the version and tag; the fields follow.
    pub fn new(bytes: &'a [u8], tag: &str, version: u8) -> Result<Self, StateError> {
        let mut r = StateReader { rest: bytes };
        let found = r.u8()?;
        if found != version {
            return Err(StateError::Version {
                found,
                expected: version,
            });
        }
        let len = r.u8()?;
        let name = r.bytes(usize::from(len))?;
        if name != tag.as_bytes() {
            return Err(StateError::Model(
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        Ok(r)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.rest.len() {
            return Err(StateError::Truncated);
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.array::<1>()?[0])
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self, what: &'static str) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Invalid(what)),
        }
    }

    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The state must end here.
    pub fn finish(self) -> Result<(), StateError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(StateError::Trailing(n)),
        }
    }
}

/// The device model called `name` (the name the VMM and the handoff use),
/// fresh from reset.
pub fn by_name(name: &str) -> Option<Box<dyn DeviceModel>> {
    match name {
        "edu" => Some(Box::new(crate::edu::Edu::new())),
        "uart16550a" | "uart" => Some(Box::new(crate::uart::Uart::new())),
        _ => None,
    }
}

/// What the models' state tests share.
#[cfg(test)]
pub(crate) mod state_tests {
    use super::{DeviceModel, StateError};

    /// The model's state as [`DeviceModel::save`] writes it.
    pub fn saved(model: &dyn DeviceModel) -> Vec<u8> {
        let mut out = Vec::new();
        model.save(&mut out);
        out
    }

    /// Why a model fresh from `fresh` refuses `bytes`; a refused state
    /// must leave it as it was.
    pub fn refused<M: DeviceModel>(fresh: impl Fn() -> M, bytes: &[u8]) -> StateError {
        let mut model = fresh();
        let err = model.restore(bytes).unwrap_err();
        assert_eq!(saved(&model), saved(&fresh()), "left as it was");
        err
    }

    /// `good` with `changes` bytes replaced at random and up to two cut off
    /// its end, drawn from the xorshift state `x`.
    pub fn mangled(good: &[u8], changes: usize, x: &mut u64) -> Vec<u8> {
        let mut b = good.to_vec();
        for _ in 0..changes {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            let at = (*x >> 16) as usize % b.len();
            b[at] = *x as u8;
        }
        b.truncate(b.len() - (*x >> 40) as usize % 3);
        b
    }

    /// `good` cut short anywhere is truncated, one byte longer trailing.
    pub fn refuses_wrong_lengths<M: DeviceModel>(fresh: impl Fn() -> M, good: &[u8]) {
        for n in 0..good.len() {
            assert_eq!(
                refused(&fresh, &good[..n]),
                StateError::Truncated,
                "{n} bytes"
            );
        }
        assert_eq!(
            refused(&fresh, &[good, &[0]].concat()),
            StateError::Trailing(1)
        );
    }
}
