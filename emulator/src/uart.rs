//! A 16550A UART, as a PC's COM1 (I/O ports 0x3f8..0x400, ISA IRQ 4), after
//! the National Semiconductor PC16550D datasheet. Its line is the console:
//! transmitted bytes go to [`Env::console_out`], received ones come from
//! [`DeviceModel::input`].
//!
//! There is no bit clock: a byte written to THR is on the line at once, so
//! the transmitter is always empty (THRE and TEMT stay set), and the divisor
//! and line settings are kept for the guest to read back but change nothing.
//!
//! The receiver never sees a line error (no parity, framing or break on a
//! virtual line, and no overrun from the console because the serve loop only
//! hands over [`DeviceModel::input_room`] bytes). Loopback could overrun the
//! receive FIFO; the byte is then lost as on the chip, but OE is not set:
//! LSR is served from the shadow image, where a load cannot clear a sticky
//! error bit, and a set OE would then be reported forever. With no error
//! bits, reading LSR has no side effect, and the receiver line status
//! interrupt never arises.

use std::collections::VecDeque;

use crate::model::{
    BatchedRegister, DeviceModel, Env, Placement, ShadowRegister, StateError, StateReader,
    StateWriter,
};
use userdev::Sizes;

/// The tag and version of a saved state ([`DeviceModel::save`]).
const STATE_TAG: &str = "uart16550a";
const STATE_VERSION: u8 = 1;

/// COM1.
pub const PLACEMENT: Placement = Placement::Isa {
    base: 0x3f8,
    len: 8,
    irq: 4,
};

// Register offsets (DLL and DLM while LCR.DLAB is set).
const RBR_THR_DLL: u64 = 0;
const IER_DLM: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;
const REGISTERS: u64 = 8;

// IER: only the low four bits exist on a 16550A.
const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_MSI: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

// IIR: bit 0 set means no interrupt; bits 3:1 the source; bits 7:6 set
// while FIFOs are enabled (bit 5, the 16750's 64-byte FIFO, stays 0).
const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RX_TIMEOUT: u8 = 0x0c;
const IIR_FIFO_ENABLED: u8 = 0xc0;

// FCR.
const FCR_ENABLE_FIFO: u8 = 0x01;
const FCR_CLEAR_RCVR: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

// MCR: five bits.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

// MSR: modem inputs in bits 7:4, their changes in bits 3:0.
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The receive FIFO's depth; one byte (the RBR) while FIFOs are disabled.
pub const FIFO_SIZE: usize = 16;
/// FCR bits 7:6 select the receive trigger level.
const TRIGGER_LEVELS: [usize; 4] = [1, 4, 8, 14];

const fn byte_register(offset: u64, passes_stores: bool) -> ShadowRegister {
    ShadowRegister {
        offset,
        len: 1,
        sizes: Sizes::B1,
        passes_stores,
    }
}

/// Loads without side effects, 1-byte loads only (a wider load is a
/// sequence of byte cycles on ISA, some with side effects): IER/DLM, LCR,
/// MCR, LSR, SCR. RBR (pops a byte), IIR (acknowledges THRE) and MSR
/// (clears its change bits) go to the model.
///
/// Outside loopback, LSR's loads may pass pending stores: THRE and TEMT
/// are always set here (a byte written to THR is on the line at once, so a
/// byte still in the ring cannot be told from one already sent), and DR
/// changes with input, which the guest does not order against its stores.
/// One store still changes DR outside loopback: an FCR write that clears
/// the receive FIFO; an LSR load that passes it may read DR set, and the
/// RBR load that follows, forwarded behind the FCR write, finds the FIFO
/// empty, as if the load had come just before the FCR write. A driver only
/// clears the FIFOs when it expects no data (Linux's 8250 driver: at
/// startup and on a termios change).
const SHADOWED: &[ShadowRegister] = &[
    byte_register(IER_DLM, false),
    byte_register(LCR, false),
    byte_register(MCR, false),
    byte_register(LSR, true),
    byte_register(SCR, false),
];

/// In loopback THR writes reach the receiver, and LSR's DR depends on
/// them (Linux's size_fifo() counts DR after 256 of them): LSR waits for
/// pending stores like the other registers. The map changes when the
/// emulator applies the MCR write; an LSR load that passes that write
/// itself sees the UART as it was before loopback.
const SHADOWED_IN_LOOPBACK: &[ShadowRegister] = &[
    byte_register(IER_DLM, false),
    byte_register(LCR, false),
    byte_register(MCR, false),
    byte_register(LSR, false),
    byte_register(SCR, false),
];

/// THR (and DLL, at the same port) while the THRE interrupt is off: the
/// bytes of a polled console (Linux's printk writes them with IER clear),
/// which need no prompt service. While the interrupt is on, a driver
/// waits for it after its THR writes (the 8250 driver's IRQ probe allows
/// 20 µs, a chip at 115200 baud takes 9), so THR is not batched then.
const BATCHED: &[BatchedRegister] = &[BatchedRegister {
    offset: RBR_THR_DLL,
    len: 1,
}];

#[derive(Debug)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    trigger: usize,
    rx: VecDeque<u8>,
    /// The THRE interrupt's latch: set when THR empties or ETBEI is
    /// written, cleared by writing THR or by reading IIR while THRE is the
    /// source it reports.
    thre_pending: bool,
    /// MSR bits 3:0, cleared by reading MSR.
    msr_delta: u8,
    /// The interrupt output as last told to the Env.
    line: bool,
    /// The shadowed registers as last published, by offset.
    published: [u8; REGISTERS as usize],
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    /// Fresh from reset.
    pub fn new() -> Self {
        let mut uart = Uart {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            // No firmware programs the divisor, and a driver that derives
            // the baud rate from it must not divide by zero: 115200 baud.
            dll: 1,
            dlm: 0,
            fifo_enabled: false,
            trigger: 1,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            thre_pending: false,
            msr_delta: 0,
            line: false,
            published: [0; REGISTERS as usize],
        };
        uart.published = uart.settled_image();
        uart
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_SIZE
        } else {
            1
        }
    }

    fn lsr(&self) -> u8 {
        let dr = if self.rx.is_empty() { 0 } else { LSR_DR };
        dr | LSR_THRE | LSR_TEMT
    }

    /// The modem inputs (MSR bits 7:4). On the console line the other end
    /// is always there and ready; in loopback the chip wires its own
    /// outputs back: RTS to CTS, DTR to DSR, OUT1 to RI, OUT2 to DCD.
    fn modem_inputs(&self) -> u8 {
        if !self.loopback() {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        let mut m = 0;
        for (out, input) in [
            (MCR_RTS, MSR_CTS),
            (MCR_DTR, MSR_DSR),
            (MCR_OUT1, MSR_RI),
            (MCR_OUT2, MSR_DCD),
        ] {
            if self.mcr & out != 0 {
                m |= input;
            }
        }
        m
    }

    /// The highest-priority pending interrupt, as IIR bits 3:0. Receiver
    /// line status, above all others, never arises (see the module docs).
    fn source(&self) -> Option<u8> {
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            // Below the trigger level, data waiting is the character
            // timeout: without a bit clock it has waited long enough.
            if self.fifo_enabled && self.rx.len() < self.trigger {
                return Some(IIR_RX_TIMEOUT);
            }
            return Some(IIR_RDI);
        }
        if self.ier & IER_THRI != 0 && self.thre_pending {
            return Some(IIR_THRI);
        }
        if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            return Some(IIR_MSI);
        }
        None
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fifo_enabled {
            IIR_FIFO_ENABLED
        } else {
            0
        };
        fifo | self.source().unwrap_or(IIR_NO_INT)
    }

    /// What the shadow image holds at a shadowed offset.
    fn shadow_value(&self, offset: u64) -> u8 {
        match offset {
            IER_DLM if self.dlab() => self.dlm,
            IER_DLM => self.ier,
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => self.lsr(),
            SCR => self.scr,
            _ => 0xff,
        }
    }

    /// The interrupt output as the registers have it. On a PC the UART's
    /// interrupt reaches the bus only through a driver enabled by OUT2,
    /// which loopback forces inactive.
    fn wanted_line(&self) -> bool {
        self.source().is_some() && self.mcr & MCR_OUT2 != 0 && !self.loopback()
    }

    /// What [`Self::published`] holds once [`Self::settle`] ran: the
    /// shadowed registers' values, zero elsewhere.
    fn settled_image(&self) -> [u8; REGISTERS as usize] {
        let mut image = [0; REGISTERS as usize];
        for r in SHADOWED {
            image[r.offset as usize] = self.shadow_value(r.offset);
        }
        image
    }

    /// After every change: the shadow image first (a guest woken by the
    /// interrupt reads LSR from it), then the interrupt output.
    fn settle(&mut self, env: &mut dyn Env) {
        for r in SHADOWED {
            let value = self.shadow_value(r.offset);
            let last = &mut self.published[r.offset as usize];
            if *last != value {
                *last = value;
                env.publish(r.offset, 1, value.into());
            }
        }
        let line = self.wanted_line();
        if line != self.line {
            self.line = line;
            if line {
                env.raise_irq();
            } else {
                env.lower_irq();
            }
        }
    }

    fn set_modem_control(&mut self, env: &mut dyn Env, value: u8) {
        let before = self.modem_inputs();
        let loopback = self.loopback();
        self.mcr = value & MCR_MASK;
        if self.loopback() != loopback {
            env.access_map_changed();
        }
        let after = self.modem_inputs();
        let changed = (before ^ after) & (MSR_CTS | MSR_DSR | MSR_DCD);
        // RI reports only its trailing edge (TERI).
        let ri_ended = before & !after & MSR_RI;
        self.msr_delta |= (changed | ri_ended) >> 4;
    }

    fn transmit(&mut self, env: &mut dyn Env, byte: u8) {
        if self.loopback() {
            // The transmitter's output feeds the receiver. A full FIFO
            // loses the byte in the shift register; the 16450-mode RBR is
            // overwritten (no OE either way, see the module docs).
            if self.rx.len() < self.rx_capacity() {
                self.rx.push_back(byte);
            } else if !self.fifo_enabled {
                self.rx.clear();
                self.rx.push_back(byte);
            }
        } else {
            env.console_out(&[byte]);
        }
        // The byte left at once: THR is empty again.
        self.thre_pending = true;
    }

    fn write_fifo_control(&mut self, value: u8) {
        let enable = value & FCR_ENABLE_FIFO != 0;
        // Switching between FIFO and 16450 mode empties the FIFOs.
        if enable != self.fifo_enabled {
            self.fifo_enabled = enable;
            self.rx.clear();
        }
        // The other bits take effect only together with FCR0. Clearing the
        // transmit FIFO has nothing to do: it is always empty.
        if enable {
            if value & FCR_CLEAR_RCVR != 0 {
                self.rx.clear();
            }
            self.trigger = TRIGGER_LEVELS[usize::from(value >> 6)];
        }
    }

    fn load_byte(&mut self, offset: u64) -> u8 {
        match offset {
            RBR_THR_DLL if self.dlab() => self.dll,
            RBR_THR_DLL => self.rx.pop_front().unwrap_or(0),
            IER_DLM | LCR | MCR | LSR | SCR => self.shadow_value(offset),
            IIR_FCR => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRI {
                    self.thre_pending = false;
                }
                iir
            }
            MSR => {
                let msr = self.modem_inputs() | self.msr_delta;
                self.msr_delta = 0;
                msr
            }
            _ => 0xff,
        }
    }

    fn store_byte(&mut self, env: &mut dyn Env, offset: u64, value: u8) {
        match offset {
            RBR_THR_DLL if self.dlab() => self.dll = value,
            RBR_THR_DLL => self.transmit(env, value),
            IER_DLM if self.dlab() => self.dlm = value,
            IER_DLM => {
                let thri = self.ier & IER_THRI;
                self.ier = value & IER_MASK;
                if self.ier & IER_THRI != thri {
                    env.access_map_changed();
                }
                // Enabling the THRE interrupt while THR is empty (always,
                // here) makes it pending, also when it was enabled already:
                // drivers rely on a 16550A reasserting it.
                if self.ier & IER_THRI != 0 {
                    self.thre_pending = true;
                }
            }
            IIR_FCR => self.write_fifo_control(value),
            LCR => self.lcr = value,
            MCR => self.set_modem_control(env, value),
            SCR => self.scr = value,
            // LSR and MSR are read-only here (writing them is a factory
            // test on the chip).
            _ => {}
        }
    }
}

impl DeviceModel for Uart {
    fn placement(&self) -> Placement {
        PLACEMENT
    }

    /// A wider access is a sequence of byte cycles at consecutive ports,
    /// as an ISA bus runs it for an 8-bit device.
    fn load(&mut self, env: &mut dyn Env, offset: u64, len: u8) -> u64 {
        let mut value = 0u64;
        for i in 0..u64::from(len.min(8)) {
            let byte = match offset.checked_add(i) {
                Some(o) if o < REGISTERS => self.load_byte(o),
                _ => 0xff,
            };
            value |= u64::from(byte) << (8 * i);
        }
        self.settle(env);
        value
    }

    fn store(&mut self, env: &mut dyn Env, offset: u64, len: u8, data: u64) {
        for i in 0..u64::from(len.min(8)) {
            if let Some(o) = offset.checked_add(i).filter(|&o| o < REGISTERS) {
                self.store_byte(env, o, (data >> (8 * i)) as u8);
            }
        }
        // Once per access: a THR write takes THRE down and up again, which
        // is one edge at most, not a pulse per byte.
        self.settle(env);
    }

    fn shadow_registers(&self) -> &'static [ShadowRegister] {
        if self.loopback() {
            SHADOWED_IN_LOOPBACK
        } else {
            SHADOWED
        }
    }

    fn batched_registers(&self) -> &'static [BatchedRegister] {
        if self.ier & IER_THRI == 0 {
            BATCHED
        } else {
            &[]
        }
    }

    fn publish_all(&self, env: &mut dyn Env) {
        for r in SHADOWED {
            env.publish(r.offset, 1, self.shadow_value(r.offset).into());
        }
    }

    /// Nothing while in loopback: the receiver is cut off from the line,
    /// and the bytes wait on the host side instead of being lost.
    fn input_room(&self) -> usize {
        if self.loopback() {
            return 0;
        }
        self.rx_capacity().saturating_sub(self.rx.len())
    }

    fn input(&mut self, env: &mut dyn Env, bytes: &[u8]) {
        let room = self.input_room();
        self.rx.extend(bytes.iter().take(room));
        self.settle(env);
    }

    fn save(&self, out: &mut Vec<u8>) {
        let (front, back) = self.rx.as_slices();
        StateWriter::new(out, STATE_TAG, STATE_VERSION)
            .u8(self.ier)
            .u8(self.lcr)
            .u8(self.mcr)
            .u8(self.scr)
            .u8(self.dll)
            .u8(self.dlm)
            .bool(self.fifo_enabled)
            .u8(self.trigger as u8)
            .u8(self.rx.len() as u8)
            .bytes(front)
            .bytes(back)
            .bool(self.thre_pending)
            .u8(self.msr_delta)
            .bool(self.line)
            .bytes(&self.published);
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let mut r = StateReader::new(bytes, STATE_TAG, STATE_VERSION)?;
        let (ier, lcr, mcr, scr, dll, dlm) = (r.u8()?, r.u8()?, r.u8()?, r.u8()?, r.u8()?, r.u8()?);
        let fifo_enabled = r.bool("UART FIFO enable")?;
        let trigger = usize::from(r.u8()?);
        let rx_len = usize::from(r.u8()?);
        let rx = r.bytes(rx_len)?;
        let thre_pending = r.bool("UART THRE latch")?;
        let msr_delta = r.u8()?;
        let line = r.bool("UART interrupt output")?;
        let published = r.bytes(REGISTERS as usize)?;
        r.finish()?;
        if ier & !IER_MASK != 0 || mcr & !MCR_MASK != 0 || msr_delta & !0x0f != 0 {
            return Err(StateError::Invalid("UART register bits"));
        }
        if !TRIGGER_LEVELS.contains(&trigger) {
            return Err(StateError::Invalid("UART trigger level"));
        }
        let mut fifo = VecDeque::with_capacity(FIFO_SIZE);
        fifo.extend(rx);
        let uart = Uart {
            ier,
            lcr,
            mcr,
            scr,
            dll,
            dlm,
            fifo_enabled,
            trigger,
            rx: fifo,
            thre_pending,
            msr_delta,
            line,
            published: [0; REGISTERS as usize],
        };
        // Every access ends in settle(): the FIFO within its depth, the
        // latches agreeing with the registers.
        if rx_len > uart.rx_capacity() {
            return Err(StateError::Invalid("UART receive FIFO length"));
        }
        if line != uart.wanted_line() {
            return Err(StateError::Invalid("UART interrupt output"));
        }
        let settled = uart.settled_image();
        if published != settled {
            return Err(StateError::Invalid("UART published registers"));
        }
        *self = Uart {
            published: settled,
            ..uart
        };
        Ok(())
    }

    fn irq_asserted(&self) -> bool {
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::state_tests::{mangled, refused, refuses_wrong_lengths, saved};
    use std::collections::BTreeMap;

    // serial_reg.h values the driver sequences below use.
    const FCR_CLEAR_XMIT: u8 = 0x04;
    const FCR7_64BYTE: u8 = 0x20;
    const FCR_R_TRIG_10: u8 = 0x80;
    const IER_RLSI: u8 = 0x04;
    const IER_UUE: u8 = 0x40;
    const LCR_CONF_MODE_A: u8 = 0x80;
    const LCR_CONF_MODE_B: u8 = 0xbf;
    const LCR_WLEN8: u8 = 0x03;
    const IIR_FIFO_ENABLED_16750: u8 = 0xe0;
    const MSR_STATUS_BITS: u8 = 0xf0;
    const EFR: u64 = 2;

    #[derive(Default)]
    struct FakeEnv {
        shadow: BTreeMap<u64, u8>,
        out: Vec<u8>,
        level: bool,
        raised: u32,
        lowered: u32,
        map_changes: u32,
    }

    impl Env for FakeEnv {
        fn read_guest(&mut self, _addr: u64, _buf: &mut [u8]) -> bool {
            false
        }
        fn write_guest(&mut self, _addr: u64, _buf: &[u8]) -> bool {
            false
        }
        fn raise_irq(&mut self) {
            assert!(!self.level, "raised twice without lowering");
            self.level = true;
            self.raised += 1;
        }
        fn lower_irq(&mut self) {
            assert!(self.level, "lowered while low");
            self.level = false;
            self.lowered += 1;
        }
        fn publish(&mut self, offset: u64, len: u8, value: u64) {
            assert_eq!(len, 1);
            self.shadow.insert(offset, value as u8);
        }
        fn console_out(&mut self, bytes: &[u8]) {
            self.out.extend_from_slice(bytes);
        }
        fn access_map_changed(&mut self) {
            self.map_changes += 1;
        }
    }

    /// The guest's view through KVM: shadowed byte loads come from the
    /// image, which must always agree with the model.
    struct Bus {
        uart: Uart,
        env: FakeEnv,
    }

    impl Bus {
        fn new() -> Self {
            let mut bus = Bus {
                uart: Uart::new(),
                env: FakeEnv::default(),
            };
            bus.uart.publish_all(&mut bus.env);
            bus
        }

        fn check_shadow(&mut self) {
            for r in SHADOWED {
                let model = self.uart.shadow_value(r.offset);
                assert_eq!(
                    self.env.shadow.get(&r.offset),
                    Some(&model),
                    "shadow at offset {}",
                    r.offset
                );
            }
        }

        fn inb(&mut self, offset: u64) -> u8 {
            let value = if SHADOWED.iter().any(|r| r.offset == offset) {
                self.env.shadow[&offset]
            } else {
                self.uart.load(&mut self.env, offset, 1) as u8
            };
            self.check_shadow();
            value
        }

        fn outb(&mut self, offset: u64, value: u8) {
            self.uart.store(&mut self.env, offset, 1, value.into());
            self.check_shadow();
        }

        fn input(&mut self, bytes: &[u8]) {
            assert!(bytes.len() <= self.uart.input_room());
            self.uart.input(&mut self.env, bytes);
            self.check_shadow();
        }
    }

    // What autoconfig() concluded.
    #[derive(Debug, PartialEq)]
    enum Port {
        NotThere,
        Uart8250Or16450,
        Uart16550,
        Uart16550A,
        Unknown,
        Other(&'static str),
    }

    /// size_fifo(): loopback at the fastest rate, 256 bytes sent, count
    /// what arrived.
    fn size_fifo(b: &mut Bus) -> usize {
        let old_lcr = b.inb(LCR);
        b.outb(LCR, 0);
        let old_fcr = b.inb(IIR_FCR);
        let old_mcr = b.inb(MCR);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT);
        b.outb(MCR, MCR_LOOP);
        b.outb(LCR, LCR_CONF_MODE_A);
        let old_dl = (b.inb(0), b.inb(1));
        b.outb(0, 1);
        b.outb(1, 0);
        b.outb(LCR, LCR_WLEN8);
        for c in 0..=255u8 {
            b.outb(RBR_THR_DLL, c);
        }
        let mut count = 0;
        while b.inb(LSR) & LSR_DR != 0 && count < 256 {
            assert_eq!(b.inb(RBR_THR_DLL), count as u8, "FIFO order");
            count += 1;
        }
        b.outb(IIR_FCR, old_fcr);
        b.outb(MCR, old_mcr);
        b.outb(LCR, LCR_CONF_MODE_A);
        b.outb(0, old_dl.0);
        b.outb(1, old_dl.1);
        b.outb(LCR, old_lcr);
        count
    }

    /// autoconfig_16550a() with the full variant probe.
    fn autoconfig_16550a(b: &mut Bus) -> Port {
        b.outb(LCR, LCR_CONF_MODE_A);
        if b.inb(EFR) == 0 {
            return Port::Other("16650 or FSL64");
        }
        b.outb(LCR, LCR_CONF_MODE_B);
        if b.inb(EFR) == 0 {
            return Port::Other("EFR v2");
        }
        b.outb(LCR, 0);
        let status1 = b.inb(MCR);
        b.outb(LCR, 0xe0);
        let mut status2 = b.inb(2);
        if (status2 ^ status1) & MCR_LOOP == 0 {
            b.outb(LCR, 0);
            b.outb(MCR, status1 ^ MCR_LOOP);
            b.outb(LCR, 0xe0);
            status2 = b.inb(2);
            b.outb(LCR, 0);
            b.outb(MCR, status1);
            if (status2 ^ status1) & MCR_LOOP != 0 {
                return Port::Other("NS16550A");
            }
        }
        b.outb(LCR, 0);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR7_64BYTE);
        let status1 = b.inb(IIR_FCR) & IIR_FIFO_ENABLED_16750;
        b.outb(IIR_FCR, FCR_ENABLE_FIFO);
        b.outb(LCR, LCR_CONF_MODE_A);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR7_64BYTE);
        let status2 = b.inb(IIR_FCR) & IIR_FIFO_ENABLED_16750;
        b.outb(IIR_FCR, FCR_ENABLE_FIFO);
        b.outb(LCR, 0);
        if status1 == 0xc0 && status2 == IIR_FIFO_ENABLED_16750 {
            return Port::Other("16750");
        }
        let iersave = b.inb(IER_DLM);
        b.outb(IER_DLM, iersave & !IER_UUE);
        if b.inb(IER_DLM) & IER_UUE == 0 {
            b.outb(IER_DLM, iersave | IER_UUE);
            if b.inb(IER_DLM) & IER_UUE != 0 {
                return Port::Other("XScale");
            }
        }
        b.outb(IER_DLM, iersave);
        if size_fifo(b) == 64 {
            return Port::Other("U6 16550A");
        }
        Port::Uart16550A
    }

    /// autoconfig(), loopback test included (COM1 skips it, other ports
    /// do not).
    fn autoconfig(b: &mut Bus) -> Port {
        let scratch = b.inb(IER_DLM);
        b.outb(IER_DLM, 0);
        let scratch2 = b.inb(IER_DLM) & IER_MASK;
        b.outb(IER_DLM, IER_MASK);
        let scratch3 = b.inb(IER_DLM) & IER_MASK;
        b.outb(IER_DLM, scratch);
        if scratch2 != 0 || scratch3 != IER_MASK {
            return Port::NotThere;
        }
        let save_mcr = b.inb(MCR);
        let save_lcr = b.inb(LCR);
        b.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        let status1 = b.inb(MSR) & MSR_STATUS_BITS;
        b.outb(MCR, save_mcr);
        if status1 != MSR_DCD | MSR_CTS {
            return Port::NotThere;
        }
        b.outb(LCR, LCR_CONF_MODE_B);
        b.outb(EFR, 0);
        b.outb(LCR, 0);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO);
        let port = match b.inb(IIR_FCR) & IIR_FIFO_ENABLED {
            0x00 => Port::Uart8250Or16450,
            0x80 => Port::Uart16550,
            0xc0 => autoconfig_16550a(b),
            _ => Port::Unknown,
        };
        b.outb(LCR, save_lcr);
        // Reset: MCR back, FIFOs cleared and off, RBR read, IER cleared.
        b.outb(MCR, save_mcr);
        clear_fifos(b);
        b.inb(RBR_THR_DLL);
        b.outb(IER_DLM, 0);
        port
    }

    fn clear_fifos(b: &mut Bus) {
        b.outb(IIR_FCR, FCR_ENABLE_FIFO);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT);
        b.outb(IIR_FCR, 0);
    }

    /// serial8250_do_startup() and set_termios() for an ISA port with an
    /// IRQ; returns whether the driver would flag UART_BUG_THRE or
    /// UART_BUG_TXEN.
    fn startup(b: &mut Bus) -> (bool, bool) {
        clear_fifos(b);
        b.inb(LSR);
        b.inb(RBR_THR_DLL);
        b.inb(IIR_FCR);
        b.inb(MSR);
        assert_ne!(b.inb(LSR), 0xff, "LSR safety check");
        // The THRE test.
        assert_ne!(b.inb(LSR) & LSR_THRE, 0);
        b.outb(IER_DLM, IER_THRI);
        let iir1 = b.inb(IIR_FCR);
        b.outb(IER_DLM, 0);
        b.outb(IER_DLM, IER_THRI);
        let iir = b.inb(IIR_FCR);
        b.outb(IER_DLM, 0);
        let bug_thre = iir1 & IIR_NO_INT == 0 && iir & IIR_NO_INT != 0;
        b.outb(LCR, LCR_WLEN8);
        b.outb(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        // The TXEN test.
        b.outb(IER_DLM, IER_THRI);
        let lsr = b.inb(LSR);
        let iir = b.inb(IIR_FCR);
        b.outb(IER_DLM, 0);
        let bug_txen = lsr & LSR_TEMT != 0 && iir & IIR_NO_INT != 0;
        b.inb(LSR);
        b.inb(RBR_THR_DLL);
        b.inb(IIR_FCR);
        b.inb(MSR);
        b.outb(IER_DLM, IER_RLSI | IER_RDI);
        // set_termios(): 115200 8N1, FIFOs with an 8-byte trigger.
        b.outb(LCR, LCR_WLEN8 | LCR_DLAB);
        b.outb(0, 1);
        b.outb(1, 0);
        b.outb(LCR, LCR_WLEN8);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR_R_TRIG_10);
        (bug_thre, bug_txen)
    }

    fn started() -> Bus {
        let mut b = Bus::new();
        assert_eq!(autoconfig(&mut b), Port::Uart16550A);
        assert_eq!(startup(&mut b), (false, false));
        b
    }

    #[test]
    fn linux_detects_a_16550a_and_starts_it() {
        let mut b = Bus::new();
        assert_eq!(autoconfig(&mut b), Port::Uart16550A);
        // Probing left the chip idle: nothing received, nothing sent,
        // no interrupt.
        assert_eq!(b.inb(LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(b.inb(IER_DLM), 0);
        assert_eq!(b.inb(LCR), 0);
        assert!(b.env.out.is_empty());
        assert!(!b.env.level);
        assert_eq!(startup(&mut b), (false, false));
        assert_eq!(b.inb(IIR_FCR), IIR_FIFO_ENABLED | IIR_NO_INT);
        assert_eq!(b.inb(MCR), MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert_eq!(b.uart.trigger, 8);
        assert!(b.env.out.is_empty());
    }

    /// THR is batched only while the THRE interrupt is off, and LSR passes
    /// pending stores only outside loopback; each change asks for a new map.
    #[test]
    fn access_map_follows_the_mode() {
        let mut b = Bus::new();
        let lsr_passes = |u: &Uart| {
            u.shadow_registers()
                .iter()
                .find(|r| r.offset == LSR)
                .is_some_and(|r| r.passes_stores)
        };
        assert_eq!(b.uart.batched_registers().len(), 1);
        assert!(lsr_passes(&b.uart));
        b.outb(IER_DLM, IER_THRI);
        assert_eq!(b.env.map_changes, 1);
        assert!(b.uart.batched_registers().is_empty());
        b.outb(IER_DLM, IER_THRI | IER_RDI);
        assert_eq!(b.env.map_changes, 1, "THRI unchanged");
        b.outb(IER_DLM, 0);
        assert_eq!(b.env.map_changes, 2);
        assert_eq!(b.uart.batched_registers().len(), 1);
        b.outb(MCR, MCR_LOOP);
        assert_eq!(b.env.map_changes, 3);
        assert!(!lsr_passes(&b.uart));
        b.outb(MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(b.env.map_changes, 3, "still in loopback");
        b.outb(MCR, MCR_OUT2);
        assert_eq!(b.env.map_changes, 4);
        assert!(lsr_passes(&b.uart));
    }

    #[test]
    fn scratch_and_ier_bits() {
        let mut b = Bus::new();
        b.outb(SCR, 0xa5);
        assert_eq!(b.inb(SCR), 0xa5);
        b.outb(IER_DLM, 0xff);
        assert_eq!(b.inb(IER_DLM), 0x0f, "only the low four bits exist");
        b.outb(MCR, 0xff);
        assert_eq!(b.inb(MCR), 0x1f);
    }

    #[test]
    fn loopback_msr() {
        let mut b = Bus::new();
        assert_eq!(b.inb(MSR), MSR_DCD | MSR_DSR | MSR_CTS, "line ready");
        b.outb(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        // DSR dropped (DTR is low), CTS and DCD stayed up.
        assert_eq!(b.inb(MSR), MSR_DCD | MSR_CTS | 0x02);
        assert_eq!(b.inb(MSR), MSR_DCD | MSR_CTS, "deltas cleared by the read");
        b.outb(MCR, MCR_LOOP | MCR_OUT1 | MCR_DTR);
        // CTS and DCD fell, DSR and RI rose: no TERI on a leading edge.
        assert_eq!(b.inb(MSR), MSR_RI | MSR_DSR | 0x01 | 0x02 | 0x08);
        b.outb(MCR, MCR_LOOP | MCR_DTR);
        assert_eq!(b.inb(MSR), MSR_DSR | 0x04, "TERI on RI's trailing edge");
        // Loopback: THR goes to the receiver, not to the console, and the
        // line is cut off from input.
        assert_eq!(b.uart.input_room(), 0);
        b.outb(RBR_THR_DLL, b'x');
        assert!(b.env.out.is_empty());
        assert_eq!(b.inb(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert_eq!(b.inb(RBR_THR_DLL), b'x');
        b.outb(MCR, 0);
        assert_eq!(b.uart.input_room(), 1);
        b.outb(RBR_THR_DLL, b'y');
        assert_eq!(b.env.out, b"y");
    }

    #[test]
    fn fifo_iir_bits_and_reset() {
        let mut b = Bus::new();
        assert_eq!(b.inb(IIR_FCR), IIR_NO_INT);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR7_64BYTE);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_NO_INT, "no 64-byte FIFO");
        assert_eq!(b.uart.input_room(), FIFO_SIZE);
        b.input(b"hello");
        assert_eq!(b.uart.input_room(), FIFO_SIZE - 5);
        b.outb(IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR);
        assert_eq!(b.inb(LSR) & LSR_DR, 0);
        // Leaving FIFO mode empties the FIFO too; then one byte of room.
        b.input(b"abc");
        b.outb(IIR_FCR, 0);
        assert_eq!(b.inb(LSR) & LSR_DR, 0);
        assert_eq!(b.inb(IIR_FCR), IIR_NO_INT);
        assert_eq!(b.uart.input_room(), 1);
        // Without FCR0 the other bits are not programmed.
        b.outb(IIR_FCR, 0xc0);
        assert_eq!(b.uart.trigger, 1);
        assert!(!b.uart.fifo_enabled);
    }

    #[test]
    fn thre_interrupt_on_enable_and_after_writes() {
        let mut b = started();
        assert!(!b.env.level);
        b.outb(IER_DLM, IER_RDI | IER_THRI);
        assert!(b.env.level, "enabling ETBEI with THR empty");
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_THRI);
        assert!(!b.env.level, "the IIR read acknowledged it");
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_NO_INT);
        // Each THR write sends the byte and THRE comes back: one edge per
        // write after an acknowledgement.
        let raised = b.env.raised;
        for (i, c) in (1..).zip(b"ok\n") {
            b.outb(RBR_THR_DLL, *c);
            assert!(b.env.level);
            assert_eq!(b.env.raised, raised + i);
            assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_THRI);
        }
        assert_eq!(b.env.out, b"ok\n");
        // Back-to-back writes without an acknowledgement: the line stays
        // high, no new edge.
        b.outb(RBR_THR_DLL, b'a');
        let raised = b.env.raised;
        b.outb(RBR_THR_DLL, b'b');
        assert_eq!(b.env.raised, raised);
        // Rewriting IER with ETBEI set reasserts THRE.
        b.inb(IIR_FCR);
        b.outb(IER_DLM, IER_RDI | IER_THRI);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_THRI);
        // Disabling it lowers the line and hides the source.
        b.outb(IER_DLM, IER_THRI);
        b.outb(IER_DLM, 0);
        assert!(!b.env.level);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_NO_INT);
    }

    #[test]
    fn receive_data_interrupt_and_lsr() {
        let mut b = started();
        assert_eq!(b.inb(IER_DLM), IER_RLSI | IER_RDI);
        b.input(b"abc");
        assert_eq!(b.inb(LSR), LSR_DR | LSR_THRE | LSR_TEMT);
        assert!(b.env.level);
        // Below the 8-byte trigger: the character timeout indication.
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_RX_TIMEOUT);
        b.input(b"defgh");
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_RDI);
        assert_eq!(b.uart.input_room(), FIFO_SIZE - 8);
        let mut got = Vec::new();
        while b.inb(LSR) & LSR_DR != 0 {
            got.push(b.inb(RBR_THR_DLL));
        }
        assert_eq!(got, b"abcdefgh");
        assert!(!b.env.level);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_NO_INT);
        // input() never takes more than the room.
        b.uart.input(&mut b.env, &[0; 40]);
        assert_eq!(b.uart.input_room(), 0);
        assert_eq!(b.uart.rx.len(), FIFO_SIZE);
        // Without OUT2 the interrupt does not reach the bus.
        b.outb(MCR, MCR_DTR | MCR_RTS);
        assert!(!b.env.level);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_RDI, "still pending");
        b.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        assert!(b.env.level);
    }

    #[test]
    fn iir_priority() {
        let mut b = started();
        b.outb(IER_DLM, IER_RDI | IER_THRI | IER_MSI);
        // A modem status change: loopback toggled cuts the interrupt from
        // the bus, but the sources stay pending.
        b.outb(MCR, MCR_LOOP | MCR_OUT2);
        b.outb(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        b.input(b"z");
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_RX_TIMEOUT, "data first");
        assert_eq!(b.inb(RBR_THR_DLL), b'z');
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_THRI, "then THRE");
        assert_eq!(b.inb(IIR_FCR) & 0x0f, IIR_MSI, "then modem status");
        assert!(b.env.level);
        assert_ne!(b.inb(MSR) & 0x0f, 0);
        assert_eq!(b.inb(IIR_FCR), 0xc0 | IIR_NO_INT);
        assert!(!b.env.level);
        // 16450 mode: data is RDI at once.
        b.outb(IIR_FCR, 0);
        b.input(b"q");
        assert_eq!(b.inb(IIR_FCR), IIR_RDI);
    }

    #[test]
    fn dlab_banks_divisor_latch() {
        let mut b = Bus::new();
        b.outb(IER_DLM, 0x05);
        b.outb(LCR, LCR_DLAB | LCR_WLEN8);
        assert_eq!(b.inb(0), 1, "a usable divisor from reset");
        assert_eq!(b.inb(IER_DLM), 0, "DLM in the shadow while DLAB is set");
        b.outb(0, 0x0c);
        b.outb(IER_DLM, 0x34);
        assert_eq!(b.inb(IER_DLM), 0x34);
        assert_eq!(b.inb(0), 0x0c);
        assert!(b.env.out.is_empty(), "DLL is not THR");
        b.outb(LCR, LCR_WLEN8);
        assert_eq!(b.inb(IER_DLM), 0x05, "IER back in the shadow");
        b.outb(LCR, LCR_DLAB);
        assert_eq!(b.inb(IER_DLM), 0x34);
    }

    #[test]
    fn raise_and_lower_are_edges_of_a_level() {
        let mut b = started();
        // FakeEnv asserts strict alternation; count the transitions.
        let base = (b.env.raised, b.env.lowered);
        let moved = |b: &Bus| (b.env.raised - base.0, b.env.lowered - base.1);
        b.input(b"1");
        b.input(b"2");
        assert_eq!(moved(&b), (1, 0));
        b.inb(RBR_THR_DLL);
        assert!(b.env.level);
        b.inb(RBR_THR_DLL);
        assert_eq!(moved(&b), (1, 1));
        b.input(b"3");
        assert_eq!(moved(&b), (2, 1));
    }

    #[test]
    fn shadow_follows_every_change() {
        let mut b = Bus::new();
        assert_eq!(b.env.shadow[&LSR], LSR_THRE | LSR_TEMT);
        assert_eq!(b.env.shadow[&IER_DLM], 0);
        // Every operation in the tests above goes through Bus, which checks
        // the image after each; here the wide and odd accesses.
        b.uart.store(&mut b.env, LCR, 2, 0x1b_83);
        b.check_shadow();
        assert_eq!(b.env.shadow[&LCR], 0x83);
        assert_eq!(b.env.shadow[&MCR], 0x1b);
        assert_eq!(b.uart.load(&mut b.env, LCR, 2), 0x1b_83);
        assert_eq!(b.uart.load(&mut b.env, SCR, 2), 0xff_00);
        assert_eq!(b.uart.load(&mut b.env, 9, 1), 0xff);
        b.uart.store(&mut b.env, 9, 1, 0);
        b.check_shadow();
        let shadowed: Vec<u64> = b.uart.shadow_registers().iter().map(|r| r.offset).collect();
        assert_eq!(shadowed, [IER_DLM, LCR, MCR, LSR, SCR]);
    }

    #[test]
    fn placement_is_com1() {
        assert_eq!(
            Uart::new().placement(),
            Placement::Isa {
                base: 0x3f8,
                len: 8,
                irq: 4
            }
        );
        assert!(Uart::new().placement().pci().is_none());
        assert!(crate::model::by_name("uart").is_some());
        assert!(crate::model::by_name("uart16550a").is_some());
    }

    /// A bus whose UART took over `state`, as a restarted emulator's:
    /// a fresh image published, the line as the model has it.
    fn restored(state: &[u8]) -> Bus {
        let mut b = Bus::new();
        b.uart.restore(state).unwrap();
        b.env.shadow.clear();
        b.uart.publish_all(&mut b.env);
        b.env.level = b.uart.irq_asserted();
        b
    }

    /// Started, data waiting (with the FIFO wrapped around), the THRE
    /// latch set, a modem status change pending, the divisor changed.
    fn busy() -> Bus {
        let mut b = started();
        b.outb(LCR, LCR_WLEN8 | LCR_DLAB);
        b.outb(0, 0x0c);
        b.outb(LCR, LCR_WLEN8);
        b.outb(SCR, 0x5a);
        b.input(b"0123456789ab");
        for _ in 0..10 {
            b.inb(RBR_THR_DLL);
        }
        b.input(b"cdefghij");
        b.outb(IER_DLM, IER_RDI | IER_THRI | IER_MSI);
        b.outb(MCR, MCR_OUT2 | MCR_DTR);
        b
    }

    #[test]
    fn state_round_trip() {
        let mut a = busy();
        let state = saved(&a.uart);
        let mut b = restored(&state);
        assert_eq!(saved(&b.uart), state);
        assert!(b.uart.irq_asserted());
        assert!(!Uart::new().irq_asserted());
        b.check_shadow();
        // The same accesses from here on: the same answers, output and
        // interrupt edges (FakeEnv checks they alternate).
        for bus in [&mut a, &mut b] {
            bus.env.out.clear();
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(bus.inb(IIR_FCR));
                seen.push(bus.inb(MSR));
                seen.push(bus.inb(LSR));
            }
            while bus.inb(LSR) & LSR_DR != 0 {
                seen.push(bus.inb(RBR_THR_DLL));
            }
            bus.outb(RBR_THR_DLL, b'!');
            seen.push(bus.inb(IIR_FCR));
            bus.outb(MCR, MCR_LOOP);
            bus.outb(RBR_THR_DLL, b'?');
            seen.push(bus.inb(RBR_THR_DLL));
            seen.extend([bus.env.level as u8, bus.inb(IER_DLM)]);
            bus.env.out.extend(seen);
        }
        assert_eq!(a.env.out, b.env.out);
        // The output byte, nine status reads, then the FIFO's ten bytes.
        assert_eq!(&a.env.out[10..20], b"abcdefghij".as_slice());
        assert_eq!(saved(&a.uart), saved(&b.uart));
    }

    #[test]
    fn bad_states_refused() {
        let good = saved(&busy().uart);
        let refused = |bytes: &[u8]| refused(Uart::new, bytes);
        refuses_wrong_lengths(Uart::new, &good);
        // Version, the tag (10 bytes), then IER at 12, LCR, MCR, SCR, DLL,
        // DLM, FIFO enable at 18, trigger, FIFO length at 20, its bytes,
        // THRE latch, MSR deltas, line, published image.
        assert_eq!(&good[12..21], &[0x0b, 0x03, 0x09, 0x5a, 0x0c, 0, 1, 8, 10]);
        let with = |at: usize, byte: u8| {
            let mut b = good.clone();
            b[at] = byte;
            b
        };
        let rx_end = 21 + 10;
        assert!(matches!(refused(&with(0, 9)), StateError::Version { .. }));
        assert!(matches!(refused(&with(3, b'x')), StateError::Model(_)));
        for (at, byte) in [
            (12, 0x10),          // IER
            (14, 0x20),          // MCR
            (18, 2),             // FIFO enable
            (19, 3),             // trigger
            (rx_end, 2),         // THRE latch
            (rx_end + 1, 0x10),  // MSR deltas
            (rx_end + 2, 0),     // the line, though an interrupt is pending
            (rx_end + 3 + 5, 0), // published LSR
            (rx_end + 3 + 6, 1), // an offset that is not shadowed
            (14, 0x01),          // MCR without OUT2: the line goes low
        ] {
            assert!(
                matches!(refused(&with(at, byte)), StateError::Invalid(_)),
                "byte {at} = {byte:#x}"
            );
        }
        // More data than the FIFO holds: 17 bytes, or 2 without the FIFO.
        let fill = |fifo: u8, n: u8| {
            let mut b = good[..18].to_vec();
            b.extend([fifo, 8, n]);
            b.extend(std::iter::repeat_n(b'z', n.into()));
            b.extend(&good[rx_end..]);
            b
        };
        assert!(Uart::new().restore(&fill(1, 16)).is_ok());
        assert!(matches!(refused(&fill(1, 17)), StateError::Invalid(_)));
        assert!(matches!(refused(&fill(0, 2)), StateError::Invalid(_)));
        let mut edu = Vec::new();
        crate::edu::Edu::new().save(&mut edu);
        assert!(matches!(refused(&edu), StateError::Model(_)));
        // Whatever the bytes, no panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let b = mangled(&good, 1, &mut x);
            let mut u = Uart::new();
            if u.restore(&b).is_ok() {
                assert_eq!(saved(&u), b);
            }
        }
    }
}
