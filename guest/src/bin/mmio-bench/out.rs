//! Buffered console output: a line of a thousand samples leaves in a few
//! string `out`s instead of one exit per number.

use core::fmt::{self, Write};

use kvm_userdev_guest::console::Console;

pub struct Line {
    buf: [u8; 4096],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line {
            buf: [0; 4096],
            len: 0,
        }
    }

    pub fn push_fmt(&mut self, args: fmt::Arguments) {
        // Line::write_str cannot fail.
        let _ = self.write_fmt(args);
    }

    pub fn flush(&mut self) {
        if let Ok(s) = core::str::from_utf8(&self.buf[..self.len]) {
            let _ = Console.write_str(s);
        }
        self.len = 0;
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.buf.len() {
            self.flush();
        }
        if s.len() > self.buf.len() {
            return Console.write_str(s);
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}
