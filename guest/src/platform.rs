//! The VMM's side channels: exit status and control commands.

use crate::cpu;
use crate::io::Port;

// SAFETY: writing the exit port ends the VM (QEMU's isa-debug-exit, our VMM)
// or does nothing.
const EXIT: Port = unsafe { Port::new(0x501) };

// SAFETY: only our VMM implements the control port; its commands act on
// device emulators, never on guest memory.
const CONTROL: Port = unsafe { Port::new(0x502) };

/// Control command: kill the emulator process of a device, and return once it
/// has exited.
pub const CONTROL_KILL_EMULATOR: u8 = 1;
/// Control command: kill the emulator process of a device after a delay the
/// VMM draws at random (seeded, up to its `--kill-delay-us`), and return at
/// once: the kill lands somewhere in what the guest does next.
pub const CONTROL_KILL_EMULATOR_LATER: u8 = 2;
/// Control command: return once no kill of command 2 is pending for the
/// device and an emulator serves it again.
pub const CONTROL_WAIT_FOR_KILLS: u8 = 3;
/// Control command: save the device's state to the VMM's `--snapshot`
/// file, its queue drained first, and return once the file is written.
pub const CONTROL_SAVE_STATE: u8 = 4;
/// Control command: put the device back into the state saved by command 4,
/// and return once an emulator serves it from that state.
pub const CONTROL_RESTORE_STATE: u8 = 5;

/// Ends the VM with `status` (0: success).
///
/// QEMU's `isa-debug-exit` exits with `(status << 1) | 1`, our VMM with
/// `status`. Without either, the vCPU halts for good.
pub fn exit(status: u8) -> ! {
    EXIT.write8(status);
    cpu::halt_forever()
}

/// Sends `command` about device `device` (its index in PCI scan order) to our
/// VMM, which handles it before the `out` instruction completes.
pub fn control(command: u8, device: u8) {
    CONTROL.write32(u32::from(command) << 8 | u32::from(device));
}
