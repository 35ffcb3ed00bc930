//! The PC's CMOS real-time clock (an MC146818 at ports 0x70 and 0x71),
//! enough for Linux to read the time: without it every read of port 0x71
//! gives all-ones, the update-in-progress bit never clears, and the guest's
//! `rtc_cmos` probe spends seconds (14 s nested under TCG) polling it before
//! it gives up.
//!
//! The clock shows the host's UTC time in 24-hour mode, in BCD or, once
//! the guest sets status B's data-mode bit, in binary, and never updates in
//! the middle of a read. It raises no interrupts; the other
//! registers are plain memory, so what the guest writes reads back.

/// The index port: bit 7 masks NMIs, the rest selects a register.
pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: the usual 32.768 kHz divider and 1024 Hz rate, no update in
/// progress.
const A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode (BCD: data mode bit clear).
const B_24H: u8 = 0x02;
/// Status B's data-mode bit: binary instead of BCD.
const B_BINARY: u8 = 0x04;
/// Status D: the battery is good, the contents valid.
const D_VALID: u8 = 0x80;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0; 128];
        ram[usize::from(REG_A)] = A_DEFAULT;
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = D_VALID;
        Cmos { index: 0, ram }
    }
}

/// The host's time, broken down in UTC.
fn now_utc() -> libc::tm {
    // SAFETY: time() with a null pointer only returns the time.
    let t = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: tm is plain integers (and a pointer gmtime_r sets), for
    // which all-zero is valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: gmtime_r reads one time_t and writes one tm, both ours.
    unsafe { libc::gmtime_r(&t, &mut tm) };
    tm
}

impl Cmos {
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            INDEX_PORT => self.index = value & 0x7f,
            // The clock is the host's: writes to it are ignored. Status C
            // and D are read-only.
            DATA_PORT if self.index > REG_YEAR && self.index != REG_C && self.index != REG_D => {
                self.ram[usize::from(self.index)] = value;
            }
            _ => {}
        }
    }

    pub fn read(&self, port: u16) -> u8 {
        if port != DATA_PORT {
            return 0xff;
        }
        self.register(self.index, &now_utc())
    }

    fn register(&self, index: u8, tm: &libc::tm) -> u8 {
        let binary = self.ram[usize::from(REG_B)] & B_BINARY != 0;
        // Two decimal digits, in the mode status B asks for.
        let digits = |v: i32| {
            let v = v.rem_euclid(100) as u8;
            if binary {
                v
            } else {
                ((v / 10) << 4) | (v % 10)
            }
        };
        match index {
            REG_SECONDS => digits(tm.tm_sec),
            REG_MINUTES => digits(tm.tm_min),
            REG_HOURS => digits(tm.tm_hour),
            REG_WEEKDAY => digits(tm.tm_wday + 1),
            REG_DAY => digits(tm.tm_mday),
            REG_MONTH => digits(tm.tm_mon + 1),
            REG_YEAR => digits(tm.tm_year + 1900),
            REG_CENTURY => digits((tm.tm_year + 1900) / 100),
            _ => self.ram[usize::from(index)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i32, mon: i32, mday: i32, hour: i32, min: i32, sec: i32) -> libc::tm {
        // SAFETY: as in now_utc().
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        (tm.tm_year, tm.tm_mon, tm.tm_mday) = (year - 1900, mon - 1, mday);
        (tm.tm_hour, tm.tm_min, tm.tm_sec, tm.tm_wday) = (hour, min, sec, 0);
        tm
    }

    #[test]
    fn time_reads_in_bcd() {
        let c = Cmos::default();
        let tm = at(2026, 11, 29, 21, 5, 59);
        let regs: Vec<u8> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]
            .iter()
            .map(|&r| c.register(r, &tm))
            .collect();
        assert_eq!(regs, [0x59, 0x05, 0x21, 0x01, 0x29, 0x11, 0x26, 0x20]);
    }

    #[test]
    fn time_reads_in_binary_when_asked() {
        let mut c = Cmos::default();
        c.write(INDEX_PORT, REG_B);
        c.write(DATA_PORT, B_24H | B_BINARY);
        let tm = at(2026, 11, 29, 21, 5, 59);
        assert_eq!(c.register(REG_SECONDS, &tm), 59);
        assert_eq!(c.register(REG_YEAR, &tm), 26);
    }

    #[test]
    fn status_says_valid_and_never_updating() {
        let mut c = Cmos::default();
        for (reg, want) in [(REG_A, 0x26), (REG_B, 0x02), (REG_C, 0), (REG_D, 0x80)] {
            c.write(INDEX_PORT, reg | 0x80);
            assert_eq!(c.read(DATA_PORT), want, "register {reg:#x}");
        }
        // What the guest writes to status B and to memory reads back; the
        // clock and status D do not change.
        for (reg, value, want) in [(REG_B, 0x06, 0x06), (0x40, 0x5a, 0x5a), (REG_D, 0, 0x80)] {
            c.write(INDEX_PORT, reg);
            c.write(DATA_PORT, value);
            assert_eq!(c.read(DATA_PORT), want, "register {reg:#x}");
        }
        assert_eq!(c.read(INDEX_PORT), 0xff);
    }
}
