//! `kvm-userdev-emulator`: serves one user device for a VMM that started it
//! in fresh namespaces with the handoff socket as a descriptor.
//!
//! Usage: `kvm-userdev-emulator [--socket-fd N] [--poll-us N]
//! [--trace-accesses]`: the handoff socket's descriptor (default 3); the
//! most microseconds to keep watching the ring for more accesses before
//! going to sleep, a window that adapts to how close together accesses come
//! (default 200; 0: sleep at once, as it always does on a machine with one
//! CPU; see `serve::Spin`); log every access
//! that reaches the model on
//! stderr (for debugging a guest's use of the device). Built with the
//! `sandbox-probe` feature also `--probe open|socket|execve`, which tries
//! that system call once sandboxed (tests check that it is refused).

use std::error::Error;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;

use emulator::handoff::{recv_setup, send_ready, send_waiting};
use emulator::model;
use emulator::model::Env;
use emulator::sandbox;
use emulator::serve::{
    map_memory, serve, AccessSource, Console, Durable, Intx, IsaIrq, MapSpec, Platform, Resumed,
    Served, Sources, Spin, SHADOW_SIZE,
};
use emulator::state::{StateRegion, STATE_REGION_SIZE};
use vmm_sys_util::eventfd::EventFd;

struct Args {
    socket_fd: RawFd,
    /// The limit of the adaptive ring polling (0: sleep at once).
    poll_us: u64,
    probe: Option<String>,
}

/// The ring polling's default limit, as KVM's halt polling's on x86.
const DEFAULT_POLL_US: u64 = 200;

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket_fd: 3,
        poll_us: DEFAULT_POLL_US,
        probe: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket-fd" => {
                let v = it.next().ok_or("--socket-fd needs a number")?;
                args.socket_fd = v
                    .parse()
                    .map_err(|_| format!("--socket-fd {v}: not a number"))?;
            }
            "--trace-accesses" => {
                emulator::serve::TRACE.store(true, std::sync::atomic::Ordering::Relaxed)
            }
            "--poll-us" => {
                let v = it.next().ok_or("--poll-us needs a number")?;
                args.poll_us = v
                    .parse()
                    .ok()
                    .filter(|&us| us <= 1_000_000)
                    .ok_or(format!("--poll-us {v}: not a number of at most 1000000"))?;
            }
            "--probe" if cfg!(feature = "sandbox-probe") => {
                args.probe = Some(it.next().ok_or("--probe needs open, socket or execve")?);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the VMM sent an eventfd, and `fd` owns it; EventFd takes over.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    if args.socket_fd <= 2 {
        return Err(format!("--socket-fd {} is a standard stream", args.socket_fd).into());
    }
    // SAFETY: the VMM started us with the handoff socket at this descriptor,
    // which nothing else in this process owns.
    let control = unsafe { UnixDatagram::from_raw_fd(args.socket_fd) };
    // Read while there is a file system to read it from (sched affinity and
    // cgroup limits).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Nothing of the guest's is here yet: the slow half of the sandbox
    // comes before the VMM counts this emulator as waiting.
    let isolated = sandbox::isolate()?;
    // Calibrated before the sandbox (the clock may need a system call) and
    // while standing by, so that no restart waits for its 10 ms. With one
    // CPU to run on, a polling emulator only holds up the vCPU that would
    // queue its next access, and, runnable instead of asleep, is not woken
    // for that access either.
    let spin = (args.poll_us > 0 && cpus > 1).then(|| Spin::calibrate(args.poll_us));
    send_waiting(&control)?;
    let (setup, fds) = recv_setup(&control)?;
    control.set_nonblocking(true)?;

    let mut model = model::by_name(&setup.model)
        .ok_or_else(|| format!("unknown device model {:?}", setup.model))?;
    let source = AccessSource::new(setup.transport, fds.accesses)?;
    let shadow = match source.backend() {
        Some(backend) if setup.shadow => Some(backend.create_shadow(SHADOW_SIZE)?),
        _ => None,
    };
    // Mapped now, read once sandboxed. Only the ring has records to make
    // durable; the socket transport gets none from our VMM.
    let region = match (fds.state_region, setup.state_region, source.backend()) {
        (Some(fd), Some(len), Some(_)) => {
            if len != STATE_REGION_SIZE as u64 {
                return Err(format!(
                    "a state region of {len:#x} bytes, expected {STATE_REGION_SIZE:#x}"
                )
                .into());
            }
            Some(StateRegion::map(fd)?)
        }
        _ => None,
    };
    let mut platform = Platform {
        memory: map_memory(fds.memory, &setup.memory)?,
        shadow,
        intx: fds
            .intx
            .map(|(irq, resample)| Intx::new(eventfd(irq), eventfd(resample))),
        isa: fds.isa_irq.map(|irq| IsaIrq::new(eventfd(irq))),
        msi: fds.msi.into_iter().map(eventfd).collect(),
        msi_enabled: setup.msi_enabled,
        console: fds
            .console
            .map(|(input, output)| Console::new(input, output, setup.console.unwrap_or(0)))
            .transpose()?,
        irq_errors: 0,
        console_errors: 0,
        map: setup.shadow.then(|| MapSpec {
            forward: setup.forward.clone(),
            batch: setup.batch.clone(),
        }),
        map_changed: false,
        defer_irqs: false,
        hold_output: false,
        deferred_irqs: Vec::new(),
    };
    let mut sources = Sources::new(source.accesses(), &control, &platform);
    let spin = spin.filter(|_| source.backend().is_some());
    enter_sandbox(isolated, &setup.model, &source, &control, &platform, &args)?;

    // Only now is guest-controlled data read: the ring, guest memory, the
    // state region (a predecessor the guest compromised wrote it).
    let mut served = Served::default();
    let result = (|| -> Result<_, Box<dyn Error>> {
        let mut durable = match (region, source.backend()) {
            (Some(region), Some(backend)) => {
                let (durable, resumed) =
                    Durable::take_over(region, model.as_mut(), &mut platform, backend.pending());
                match resumed {
                    Resumed::Fresh => {}
                    Resumed::From {
                        applied_seq,
                        replies,
                    } => emulator::log!(
                        "emulator[{}]: resumed the state committed at applied_seq {applied_seq} ({replies} saved replies)",
                        setup.model
                    ),
                    Resumed::Refused(why) => emulator::log!(
                        "emulator[{}]: state region refused ({why}); starting from reset",
                        setup.model
                    ),
                }
                Some(durable)
            }
            _ => None,
        };
        if let (Some(backend), true) = (source.backend(), setup.shadow) {
            model.publish_all(&mut platform);
            platform.set_access_map(backend, model.as_ref())?;
        }
        // A restored device whose interrupt is asserted: the predecessor
        // may have died before it signalled it. A duplicate is harmless, a
        // lost one is not. (From reset the output is low.)
        if model.irq_asserted() {
            platform.raise_irq();
        }
        platform.defer_irqs = durable.is_some();
        platform.hold_output = source.backend().is_some();
        send_ready(&control)?;
        Ok(serve(
            &mut sources,
            source.accesses(),
            &control,
            &mut platform,
            model.as_mut(),
            spin,
            durable.as_mut(),
            &mut served,
        )?)
    })();
    let stats = format!(
        "{served} irq_errors={} console_errors={}",
        platform.irq_errors, platform.console_errors
    );
    // Exit without running destructors: close(2) is not on the allow-list.
    match result {
        Ok(exit) => {
            emulator::log!("emulator[{}]: done ({exit:?}): {stats}", setup.model);
            std::process::exit(0)
        }
        Err(e) => {
            emulator::log!("emulator[{}]: {e}; {stats}", setup.model);
            std::process::exit(1)
        }
    }
}

/// Locks this process down to the descriptors it serves with, and says so.
fn enter_sandbox(
    isolated: sandbox::Isolated,
    model: &str,
    source: &AccessSource,
    control: &UnixDatagram,
    platform: &Platform,
    args: &Args,
) -> Result<(), Box<dyn Error>> {
    let mut irqfds: Vec<RawFd> = platform.msi.iter().map(|e| e.as_raw_fd()).collect();
    irqfds.extend(platform.intx.as_ref().map(|i| i.irqfd.as_raw_fd()));
    irqfds.extend(platform.isa.as_ref().map(|i| i.irqfd.as_raw_fd()));
    let console = platform.console.as_ref();
    let report = sandbox::lock_down(
        isolated,
        &sandbox::Fds {
            accesses: source.accesses().sandboxed(),
            control: control.as_raw_fd(),
            resample: platform.intx.as_ref().map(|i| i.resample.as_raw_fd()),
            irqfds,
            console_in: console.map(|c| c.input.as_raw_fd()),
            console_out: console.map(|c| c.output.as_raw_fd()),
        },
    )?;
    emulator::log!(
        "emulator[{model}]: sandboxed: own namespaces, empty read-only root, uid/gid {}, landlock {:?}, seccomp allow-list of {} system calls",
        sandbox::NOBODY,
        report.landlock,
        report.syscalls
    );
    #[cfg(feature = "sandbox-probe")]
    if let Some(what) = &args.probe {
        emulator::log!("{}", sandbox::probe(what));
    }
    #[cfg(not(feature = "sandbox-probe"))]
    let _ = &args.probe;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emulator::log!("emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
