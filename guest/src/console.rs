//! Text output through the debug console port (QEMU's `-debugcon`).

use core::fmt::{self, Write};

use crate::io::Port;

// SAFETY: the debug console only prints the bytes written to it.
const DEBUGCON: Port = unsafe { Port::new(0xe9) };

/// The debug console: one string `out` per piece of text.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        DEBUGCON.write_bytes(s.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    // Console::write_str cannot fail.
    let _ = Console.write_fmt(args);
}

/// Like std's `print!`, to the debug console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::console::_print(format_args!($($arg)*))
    };
}

/// Like std's `println!`, to the debug console.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::_print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::_print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
