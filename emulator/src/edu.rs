//! An edu-compatible device, after QEMU's docs/specs/edu.rst: identification,
//! liveness check, factorial, interrupt raise/acknowledge, and DMA between
//! guest memory and a 4 KiB device buffer.
//!
//! Where QEMU computes the factorial in a thread and runs DMA from a timer,
//! this model does both at once when it consumes the store. The guest sees
//! the same protocol (poll the busy bit, or take the interrupt); it just
//! never finds the device busy. Every load is free of side effects, so all
//! registers are published in the shadow image.

use crate::model::{
    DeviceModel, Env, PciIdentity, Placement, ShadowRegister, StateError, StateReader, StateWriter,
};
use edu_regs as regs;
use userdev::Sizes;

// The register map is edu_regs'; the model works in u64 offsets and
// values, as the ring and Env do.
const ID: u64 = regs::IDENTIFICATION_REG as u64;
const LIVENESS: u64 = regs::LIVENESS as u64;
const FACTORIAL: u64 = regs::FACTORIAL as u64;
const STATUS: u64 = regs::STATUS as u64;
const IRQ_STATUS: u64 = regs::IRQ_STATUS as u64;
const IRQ_RAISE: u64 = regs::IRQ_RAISE as u64;
const IRQ_ACK: u64 = regs::IRQ_ACKNOWLEDGE as u64;
const DMA_SRC: u64 = regs::DMA_SOURCE as u64;
const DMA_DST: u64 = regs::DMA_DESTINATION as u64;
const DMA_COUNT: u64 = regs::DMA_COUNT as u64;
const DMA_CMD: u64 = regs::DMA_COMMAND as u64;

pub use regs::{DMA_BUFFER, DMA_BUFFER_SIZE};
use regs::{
    DMA_IRQ, DMA_START, DMA_TO_RAM, IDENTIFICATION, IRQ_DMA, IRQ_FACTORIAL, STATUS_COMPUTING,
    STATUS_IRQ_ON_FACTORIAL,
};

/// The tag and version of a saved state ([`DeviceModel::save`]).
const STATE_TAG: &str = "edu";
const STATE_VERSION: u8 = 1;

pub const IDENTITY: PciIdentity = PciIdentity {
    vendor: regs::VENDOR_ID,
    device: regs::DEVICE_ID,
    revision: 0x10,
    class: [0xff, 0x00, 0x00],
    subsystem_vendor: 0x1af4,
    subsystem: 0x1100,
    bar0_size: regs::BAR_SIZE as u64,
    msi_vectors: 1,
};

const fn reg(offset: u64, len: u64, sizes: Sizes) -> ShadowRegister {
    ShadowRegister {
        offset,
        len,
        sizes,
        passes_stores: false,
    }
}

/// The 32-bit registers take 4-byte loads; the DMA registers take 8-byte
/// loads and 4-byte loads of their low half. Anything else reaches the model
/// and reads all-ones, as on QEMU's device. The identification register is
/// a constant: its loads need not wait for pending stores.
const SHADOWED: &[ShadowRegister] = &[
    ShadowRegister {
        passes_stores: true,
        ..reg(ID, 4, Sizes::B4)
    },
    reg(LIVENESS, 4, Sizes::B4),
    reg(FACTORIAL, 4, Sizes::B4),
    reg(STATUS, 4, Sizes::B4),
    reg(IRQ_STATUS, 4, Sizes::B4),
    reg(DMA_SRC, 8, Sizes::B8),
    reg(DMA_SRC, 4, Sizes::B4),
    reg(DMA_DST, 8, Sizes::B8),
    reg(DMA_DST, 4, Sizes::B4),
    reg(DMA_COUNT, 8, Sizes::B8),
    reg(DMA_COUNT, 4, Sizes::B4),
    reg(DMA_CMD, 8, Sizes::B8),
    reg(DMA_CMD, 4, Sizes::B4),
];

#[derive(Debug)]
pub struct Edu {
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buffer: Box<[u8; DMA_BUFFER_SIZE]>,
    /// DMA commands refused: a span outside the device buffer or guest RAM.
    pub dma_errors: u64,
}

impl Default for Edu {
    fn default() -> Self {
        Self::new()
    }
}

impl Edu {
    pub fn new() -> Self {
        Edu {
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buffer: Box::new([0; DMA_BUFFER_SIZE]),
            dma_errors: 0,
        }
    }

    fn register(&self, offset: u64) -> Option<u64> {
        Some(match offset {
            ID => IDENTIFICATION.into(),
            LIVENESS => (!self.liveness).into(),
            FACTORIAL => self.factorial.into(),
            STATUS => self.status.into(),
            IRQ_STATUS => self.irq_status.into(),
            DMA_SRC => self.dma_src,
            DMA_DST => self.dma_dst,
            DMA_COUNT => self.dma_count,
            DMA_CMD => self.dma_cmd,
            _ => return None,
        })
    }

    fn publish(&self, env: &mut dyn Env, offset: u64) {
        let len = if offset >= DMA_SRC { 8 } else { 4 };
        if let Some(v) = self.register(offset) {
            env.publish(offset, len, v);
        }
    }

    fn raise(&mut self, env: &mut dyn Env, bits: u32) {
        self.irq_status |= bits;
        self.publish(env, IRQ_STATUS);
        if self.irq_status != 0 {
            env.raise_irq();
        }
    }

    fn acknowledge(&mut self, env: &mut dyn Env, bits: u32) {
        self.irq_status &= !bits;
        self.publish(env, IRQ_STATUS);
        if self.irq_status == 0 {
            env.lower_irq();
        }
    }

    fn compute_factorial(&mut self, env: &mut dyn Env, n: u32) {
        // 32-bit arithmetic, wrapping past 12!, as the specification's C does.
        self.factorial = (2..=n).fold(1u32, |acc, k| acc.wrapping_mul(k));
        self.status &= !STATUS_COMPUTING;
        self.publish(env, FACTORIAL);
        self.publish(env, STATUS);
        if self.status & STATUS_IRQ_ON_FACTORIAL != 0 {
            self.raise(env, IRQ_FACTORIAL);
        }
    }

    /// The device side of a DMA span, if it lies inside the buffer.
    fn buffer_span(&self, addr: u64, count: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(addr.checked_sub(DMA_BUFFER)?).ok()?;
        let end = start.checked_add(count)?;
        (end <= DMA_BUFFER_SIZE).then_some(start..end)
    }

    fn run_dma(&mut self, env: &mut dyn Env) {
        let count = usize::try_from(self.dma_count).unwrap_or(usize::MAX);
        let ok = if self.dma_cmd & DMA_TO_RAM == 0 {
            match self.buffer_span(self.dma_dst, count) {
                Some(span) => env.read_guest(self.dma_src, &mut self.buffer[span]),
                None => false,
            }
        } else {
            match self.buffer_span(self.dma_src, count) {
                Some(span) => env.write_guest(self.dma_dst, &self.buffer[span]),
                None => false,
            }
        };
        if !ok {
            self.dma_errors += 1;
        }
        self.dma_cmd &= !DMA_START;
        self.publish(env, DMA_CMD);
        if self.dma_cmd & DMA_IRQ != 0 {
            self.raise(env, IRQ_DMA);
        }
    }
}

impl DeviceModel for Edu {
    fn placement(&self) -> Placement {
        Placement::Pci(IDENTITY)
    }

    fn load(&mut self, _env: &mut dyn Env, offset: u64, len: u8) -> u64 {
        let value = match (offset, len) {
            (..DMA_SRC, 4) => self.register(offset),
            (DMA_SRC.., 4) => self.register(offset).map(|v| v & 0xffff_ffff),
            (DMA_SRC.., 8) => self.register(offset),
            _ => None,
        };
        value.unwrap_or(!0)
    }

    fn store(&mut self, env: &mut dyn Env, offset: u64, len: u8, data: u64) {
        let valid = match len {
            4 => true,
            8 => offset >= DMA_SRC,
            _ => false,
        };
        if !valid {
            return;
        }
        let low = data as u32;
        match offset {
            LIVENESS => {
                self.liveness = low;
                self.publish(env, LIVENESS);
            }
            FACTORIAL if self.status & STATUS_COMPUTING == 0 => {
                self.status |= STATUS_COMPUTING;
                self.compute_factorial(env, low);
            }
            STATUS => {
                self.status =
                    (self.status & !STATUS_IRQ_ON_FACTORIAL) | (low & STATUS_IRQ_ON_FACTORIAL);
                self.publish(env, STATUS);
            }
            IRQ_RAISE => self.raise(env, low),
            IRQ_ACK => self.acknowledge(env, low),
            DMA_SRC => {
                self.dma_src = data;
                self.publish(env, DMA_SRC);
            }
            DMA_DST => {
                self.dma_dst = data;
                self.publish(env, DMA_DST);
            }
            DMA_COUNT => {
                self.dma_count = data;
                self.publish(env, DMA_COUNT);
            }
            DMA_CMD if self.dma_cmd & DMA_START == 0 => {
                self.dma_cmd = data;
                if data & DMA_START != 0 {
                    self.run_dma(env);
                } else {
                    self.publish(env, DMA_CMD);
                }
            }
            _ => {}
        }
    }

    fn shadow_registers(&self) -> &'static [ShadowRegister] {
        SHADOWED
    }

    fn publish_all(&self, env: &mut dyn Env) {
        for r in SHADOWED {
            self.publish(env, r.offset);
        }
    }

    fn save(&self, out: &mut Vec<u8>) {
        StateWriter::new(out, STATE_TAG, STATE_VERSION)
            .u32(self.liveness)
            .u32(self.factorial)
            .u32(self.status)
            .u32(self.irq_status)
            .u64(self.dma_src)
            .u64(self.dma_dst)
            .u64(self.dma_count)
            .u64(self.dma_cmd)
            .u64(self.dma_errors)
            .bytes(&self.buffer[..]);
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let mut r = StateReader::new(bytes, STATE_TAG, STATE_VERSION)?;
        let liveness = r.u32()?;
        let factorial = r.u32()?;
        let status = r.u32()?;
        let irq_status = r.u32()?;
        let (dma_src, dma_dst, dma_count, dma_cmd) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let dma_errors = r.u64()?;
        let buffer = r.bytes(DMA_BUFFER_SIZE)?;
        r.finish()?;
        // The model computes and copies at once: between two accesses it
        // is never busy, and STATUS keeps only the interrupt enable.
        if status & !STATUS_IRQ_ON_FACTORIAL != 0 {
            return Err(StateError::Invalid("edu status"));
        }
        if dma_cmd & DMA_START != 0 {
            return Err(StateError::Invalid("edu DMA command (running)"));
        }
        // Checked in full: only now does the model change.
        (self.liveness, self.factorial, self.status, self.irq_status) =
            (liveness, factorial, status, irq_status);
        (self.dma_src, self.dma_dst, self.dma_count, self.dma_cmd) =
            (dma_src, dma_dst, dma_count, dma_cmd);
        self.dma_errors = dma_errors;
        self.buffer.copy_from_slice(buffer);
        Ok(())
    }

    /// The output follows the status: raised whenever a bit is set,
    /// lowered when the last one is acknowledged.
    fn irq_asserted(&self) -> bool {
        self.irq_status != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state_tests::{mangled, refused, refuses_wrong_lengths, saved};
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct FakeEnv {
        ram: Vec<u8>,
        level: bool,
        raised: u32,
        shadow: BTreeMap<u64, u64>,
    }

    impl Env for FakeEnv {
        fn read_guest(&mut self, addr: u64, buf: &mut [u8]) -> bool {
            let a = addr as usize;
            match self.ram.get(a..a + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
        fn write_guest(&mut self, addr: u64, buf: &[u8]) -> bool {
            let a = addr as usize;
            match self.ram.get_mut(a..a + buf.len()) {
                Some(dst) => {
                    dst.copy_from_slice(buf);
                    true
                }
                None => false,
            }
        }
        fn raise_irq(&mut self) {
            self.level = true;
            self.raised += 1;
        }
        fn lower_irq(&mut self) {
            self.level = false;
        }
        fn publish(&mut self, offset: u64, _len: u8, value: u64) {
            self.shadow.insert(offset, value);
        }
        fn console_out(&mut self, _bytes: &[u8]) {}
    }

    fn setup() -> (Edu, FakeEnv) {
        let env = FakeEnv {
            ram: vec![0; 0x10000],
            ..Default::default()
        };
        (Edu::new(), env)
    }

    #[test]
    fn identification_and_liveness() {
        let (mut edu, mut env) = setup();
        assert_eq!(edu.load(&mut env, ID, 4), 0x0100_00ed);
        assert_eq!(edu.load(&mut env, LIVENESS, 4), 0xffff_ffff);
        edu.store(&mut env, LIVENESS, 4, 0x1234_5678);
        assert_eq!(edu.load(&mut env, LIVENESS, 4), 0xedcb_a987);
        assert_eq!(env.shadow[&LIVENESS], 0xedcb_a987);
        // Wrong sizes: ignored stores, all-ones loads.
        edu.store(&mut env, LIVENESS, 2, 0);
        assert_eq!(edu.load(&mut env, LIVENESS, 4), 0xedcb_a987);
        assert_eq!(edu.load(&mut env, ID, 2), 0xffff_ffff_ffff_ffff);
        assert_eq!(edu.load(&mut env, 0x10, 4), !0);
    }

    #[test]
    fn factorial_with_and_without_interrupt() {
        let (mut edu, mut env) = setup();
        edu.store(&mut env, FACTORIAL, 4, 10);
        assert_eq!(edu.load(&mut env, FACTORIAL, 4), 3_628_800);
        assert_eq!(env.raised, 0);
        edu.store(&mut env, FACTORIAL, 4, 0);
        assert_eq!(edu.load(&mut env, FACTORIAL, 4), 1);
        edu.store(&mut env, FACTORIAL, 4, 13);
        assert_eq!(
            edu.load(&mut env, FACTORIAL, 4),
            6_227_020_800u64 as u32 as u64
        );

        edu.store(&mut env, STATUS, 4, 0x81);
        assert_eq!(
            edu.load(&mut env, STATUS, 4),
            0x80,
            "the busy bit is read-only"
        );
        edu.store(&mut env, FACTORIAL, 4, 5);
        assert_eq!(edu.load(&mut env, FACTORIAL, 4), 120);
        assert_eq!(edu.load(&mut env, IRQ_STATUS, 4), 1);
        assert!(env.level);
        edu.store(&mut env, IRQ_ACK, 4, 1);
        assert!(!env.level);
        assert_eq!(env.shadow[&IRQ_STATUS], 0);
    }

    #[test]
    fn raise_and_acknowledge() {
        let (mut edu, mut env) = setup();
        edu.store(&mut env, IRQ_RAISE, 4, 0x1200);
        edu.store(&mut env, IRQ_RAISE, 4, 0x0034);
        assert_eq!(edu.load(&mut env, IRQ_STATUS, 4), 0x1234);
        assert_eq!(env.raised, 2);
        edu.store(&mut env, IRQ_ACK, 4, 0x1200);
        assert!(env.level, "still pending");
        edu.store(&mut env, IRQ_ACK, 4, 0x0034);
        assert!(!env.level);
    }

    #[test]
    fn dma_both_ways() {
        let (mut edu, mut env) = setup();
        for (i, b) in env.ram[0x1000..0x2000].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        edu.store(&mut env, DMA_SRC, 8, 0x1000);
        edu.store(&mut env, DMA_DST, 8, DMA_BUFFER);
        edu.store(&mut env, DMA_COUNT, 8, 4096);
        edu.store(&mut env, DMA_CMD, 8, DMA_START | DMA_IRQ);
        assert_eq!(edu.load(&mut env, DMA_CMD, 8), DMA_IRQ);
        assert_eq!(edu.load(&mut env, IRQ_STATUS, 4), 0x100);
        // Back to another place, at an offset inside the buffer, 4-byte
        // register stores.
        edu.store(&mut env, DMA_SRC, 4, DMA_BUFFER + 0x10);
        edu.store(&mut env, DMA_DST, 4, 0x3000);
        edu.store(&mut env, DMA_COUNT, 4, 32);
        edu.store(&mut env, DMA_CMD, 4, DMA_START | DMA_TO_RAM);
        assert_eq!(env.ram[0x3000..0x3020], env.ram[0x1010..0x1030]);
        assert_eq!(edu.dma_errors, 0);
        // Past the buffer's end, and outside RAM: refused, and the command
        // still completes.
        edu.store(&mut env, DMA_SRC, 8, DMA_BUFFER + 4095);
        edu.store(&mut env, DMA_COUNT, 8, 2);
        edu.store(&mut env, DMA_CMD, 8, DMA_START | DMA_TO_RAM);
        edu.store(&mut env, DMA_SRC, 8, DMA_BUFFER);
        edu.store(&mut env, DMA_DST, 8, 0xffff_0000);
        edu.store(&mut env, DMA_CMD, 8, DMA_START | DMA_TO_RAM);
        assert_eq!(edu.dma_errors, 2);
        assert_eq!(edu.load(&mut env, DMA_CMD, 8) & DMA_START, 0);
        // Only the low half of a DMA register at its own offset.
        assert_eq!(edu.load(&mut env, DMA_DST + 4, 4), !0);
        assert_eq!(edu.load(&mut env, DMA_DST, 4), 0xffff_0000);
    }

    #[test]
    fn publish_all_covers_the_map() {
        let (edu, mut env) = setup();
        edu.publish_all(&mut env);
        for r in SHADOWED {
            assert!(env.shadow.contains_key(&r.offset));
        }
        assert_eq!(env.shadow[&ID], 0x0100_00ed);
        assert_eq!(env.shadow[&LIVENESS], 0xffff_ffff);
    }

    /// An edu in use: liveness, factorial with its interrupt, DMA in both
    /// directions, a raised status bit.
    fn busy() -> (Edu, FakeEnv) {
        let (mut edu, mut env) = setup();
        for (i, b) in env.ram[0x1000..0x2000].iter_mut().enumerate() {
            *b = (i * 13) as u8;
        }
        edu.store(&mut env, LIVENESS, 4, 0xdead_beef);
        edu.store(&mut env, STATUS, 4, 0x80);
        edu.store(&mut env, FACTORIAL, 4, 7);
        edu.store(&mut env, DMA_SRC, 8, 0x1000);
        edu.store(&mut env, DMA_DST, 8, DMA_BUFFER + 0x100);
        edu.store(&mut env, DMA_COUNT, 8, 0x800);
        edu.store(&mut env, DMA_CMD, 8, DMA_START);
        edu.store(&mut env, IRQ_RAISE, 4, 0x40);
        edu.store(&mut env, DMA_SRC, 8, DMA_BUFFER + 0x100);
        edu.store(&mut env, DMA_DST, 8, 0x3000);
        edu.store(&mut env, DMA_CMD, 8, DMA_START | DMA_TO_RAM);
        edu.store(&mut env, DMA_DST, 8, DMA_BUFFER);
        edu.store(&mut env, DMA_SRC, 8, 0xffff_0000);
        edu.store(&mut env, DMA_CMD, 8, DMA_START);
        assert_eq!(edu.dma_errors, 1);
        (edu, env)
    }

    #[test]
    fn state_round_trip() {
        let (edu, env) = busy();
        let state = saved(&edu);
        let mut copy = Edu::new();
        copy.restore(&state).unwrap();
        assert_eq!(saved(&copy), state);
        assert!(copy.irq_asserted() && edu.irq_asserted());
        assert!(!Edu::new().irq_asserted());
        // The same accesses from here on, the same answers and effects.
        let mut pair = [(edu, env), (copy, FakeEnv::default())];
        pair[1].1.ram = pair[0].1.ram.clone();
        pair[1].1.level = pair[1].0.irq_asserted();
        for (edu, env) in &mut pair {
            env.shadow.clear();
            edu.publish_all(env);
            edu.store(env, DMA_SRC, 8, DMA_BUFFER);
            edu.store(env, DMA_DST, 8, 0x4000);
            edu.store(env, DMA_COUNT, 8, 4096);
            edu.store(env, DMA_CMD, 8, DMA_START | DMA_TO_RAM);
            edu.store(env, IRQ_ACK, 4, 0x141);
        }
        let [(a, ea), (b, eb)] = &mut pair;
        for offset in [
            ID, LIVENESS, FACTORIAL, STATUS, IRQ_STATUS, DMA_SRC, DMA_CMD,
        ] {
            assert_eq!(a.load(ea, offset, 4), b.load(eb, offset, 4), "{offset:#x}");
        }
        assert_eq!(ea.ram, eb.ram);
        assert_eq!(ea.shadow, eb.shadow);
        assert_eq!((ea.level, eb.level), (false, false));
        assert_eq!(saved(a), saved(b));
    }

    #[test]
    fn bad_states_refused() {
        let (mut edu, _) = busy();
        let good = saved(&edu);
        let refused = |bytes: &[u8]| refused(Edu::new, bytes);
        refuses_wrong_lengths(Edu::new, &good);
        let with = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        assert!(matches!(
            refused(&with(0, &[2])),
            StateError::Version { .. }
        ));
        assert!(matches!(refused(&with(2, b"ede")), StateError::Model(_)));
        // The fields: 1 + 1 + 3 bytes of version and tag, then liveness,
        // factorial, status (offset 13), irq status, DMA source,
        // destination, count, command (offset 45).
        assert_eq!(&good[13..17], &0x80u32.to_le_bytes());
        assert!(matches!(
            refused(&with(13, &[0x81])),
            StateError::Invalid(_)
        ));
        assert!(matches!(refused(&with(15, &[1])), StateError::Invalid(_)));
        assert!(matches!(
            refused(&with(45, &[DMA_START as u8])),
            StateError::Invalid(_)
        ));
        let mut uart = Vec::new();
        crate::uart::Uart::new().save(&mut uart);
        assert!(matches!(refused(&uart), StateError::Model(_)));
        // Whatever the bytes, no panic, and a refusal changes nothing.
        let before = saved(&edu);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..500 {
            let b = mangled(&good, round % 7 + 1, &mut x);
            if edu.restore(&b).is_ok() {
                edu.restore(&before).unwrap();
            }
            assert_eq!(saved(&edu), before);
        }
    }
}
