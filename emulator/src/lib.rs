//! The per-device emulation process.
//!
//! It will receive its descriptors (slave fd, irqfds, guest memory) from the
//! VMM, sandbox itself, and serve the user device's access queue in a `mio`
//! event loop with an edu-compatible device model (issue 4).
//!
//! Empty for now: there is no user device to serve before the kernel series
//! exists.
