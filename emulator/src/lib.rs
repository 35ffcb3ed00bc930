//! The per-device emulation process behind a `KVM_DEV_TYPE_USER` device.
//!
//! The VMM starts `kvm-userdev-emulator` in fresh namespaces and hands it,
//! over a UNIX socket ([`handoff`]), the backend fd, guest memory, irqfds
//! and, for a UART, its console's input and output (the output as
//! [`console`] messages).
//! The emulator maps what it needs, enters its [`sandbox`] and then serves
//! the device ([`serve`]): it consumes guest accesses from the ring in
//! batches, answers forwarded loads, keeps the shadow image current and
//! raises interrupts through the irqfds. With a [`state`] region from the
//! VMM it commits the model's state there after each batch, before the
//! batch's interrupts, replies and consumption, and a restarted emulator
//! continues from the last commit. For comparison it can also take
//! accesses over a socket from a VMM that handles the exits itself
//! ([`wire`]). Device models implement
//! [`model::DeviceModel`]; [`edu::Edu`] follows QEMU's edu device,
//! [`uart::Uart`] is a 16550A serving the guest's serial console.

pub mod console;
pub mod edu;
pub mod handoff;
pub mod model;
pub mod pci;
pub mod sandbox;
pub mod serve;
pub mod spawn;
pub mod state;
pub mod uart;
pub mod vfio_user;
pub mod wire;

/// Writes one line to stderr with a single write, so that the lines of
/// several emulators sharing the VMM's stderr do not interleave.
pub fn log(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut s = line.to_string();
    s.push('\n');
    let _ = std::io::stderr().write_all(s.as_bytes());
}

/// `log!("...", args)`: [`log`] with `format!` syntax.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::log(format_args!($($arg)*)) };
}
