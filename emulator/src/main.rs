//! `kvm-userdev-emulator`: serves one user device for a VMM that started it
//! in fresh namespaces with the handoff socket as a descriptor.
//!
//! Usage: `kvm-userdev-emulator [--socket-fd N] [--poll-us N]
//! [--trace-accesses]`, or `kvm-userdev-emulator --vfio-user PATH [--model
//! edu] [--trace-accesses]` to serve a vfio-user client (QEMU's
//! `-device vfio-user-pci,socket=PATH`) in the same sandbox; with a KVM
//! user device from the client, `--forward OFFSET` and `--batch OFFSET`
//! shape its access map as the VMM's options of those names do. Without
//! `--vfio-user`: the handoff socket's descriptor (default 3); the
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
    /// Serve a vfio-user client that connects to this path.
    vfio_user: Option<std::path::PathBuf>,
    /// The sandboxed half of `--vfio-user`: the connected client at this
    /// descriptor.
    vfio_user_fd: Option<RawFd>,
    /// The device model a vfio-user server presents.
    model: String,
    /// A vfio-user server's access map: offsets forwarded, offsets batched.
    map: emulator::serve::MapSpec,
    /// The limit of the adaptive ring polling (0: sleep at once).
    poll_us: u64,
    probe: Option<String>,
}

/// The ring polling's default limit, as KVM's halt polling's on x86.
const DEFAULT_POLL_US: u64 = 200;

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket_fd: 3,
        vfio_user: None,
        vfio_user_fd: None,
        model: "edu".into(),
        map: Default::default(),
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
            "--vfio-user" => {
                args.vfio_user = Some(it.next().ok_or("--vfio-user needs a socket path")?.into());
            }
            "--vfio-user-fd" => {
                let v = it.next().ok_or("--vfio-user-fd needs a number")?;
                let fd = v
                    .parse()
                    .map_err(|_| format!("--vfio-user-fd {v}: not a number"))?;
                args.vfio_user_fd = Some(fd);
            }
            "--model" => args.model = it.next().ok_or("--model needs a name")?,
            "--forward" | "--batch" => {
                let v = it.next().ok_or(format!("{a} needs a BAR0 offset"))?;
                let offset =
                    emulator::handoff::parse_u64(&v).ok_or(format!("{a} {v}: not a number"))?;
                match a.as_str() {
                    "--forward" => args.map.forward.push(offset),
                    _ => args.map.batch.push(offset),
                }
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

/// The CPUs this process may run on, read while there is a file system to
/// read it from (sched affinity and cgroup limits).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The ring's adaptive polling, calibrated before the sandbox (the clock
/// may need a system call). None with one CPU to run on: there a polling
/// emulator only holds up the vCPU that would queue its next access, and,
/// runnable instead of asleep, is not woken for that access either.
fn spin(poll_us: u64, cpus: usize) -> Option<Spin> {
    (poll_us > 0 && cpus > 1).then(|| Spin::calibrate(poll_us))
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    if let Some(path) = &args.vfio_user {
        return vfio_user_listen(path, &args);
    }
    if let Some(fd) = args.vfio_user_fd {
        return vfio_user_serve(fd, &args);
    }
    if args.socket_fd <= 2 {
        return Err(format!("--socket-fd {} is a standard stream", args.socket_fd).into());
    }
    // SAFETY: the VMM started us with the handoff socket at this descriptor,
    // which nothing else in this process owns.
    let control = unsafe { UnixDatagram::from_raw_fd(args.socket_fd) };
    let cpus = cpus();
    // Nothing of the guest's is here yet: the slow half of the sandbox
    // comes before the VMM counts this emulator as waiting.
    let isolated = sandbox::isolate()?;
    // While standing by, so that no restart waits for its 10 ms.
    let spin = spin(args.poll_us, cpus);
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
            .map(|(irq, resample)| Intx::new(eventfd(irq), Some(eventfd(resample)))),
        isa: fds.isa_irq.map(|irq| IsaIrq::new(eventfd(irq))),
        msi: fds.msi.into_iter().map(eventfd).collect(),
        msi_enabled: setup.msi_enabled,
        console: fds
            .console
            .map(|(input, output)| Console::new(input, output, setup.console.unwrap_or(0)))
            .transpose()?,
        map: setup.shadow.then(|| MapSpec {
            forward: setup.forward.clone(),
            batch: setup.batch.clone(),
        }),
        ..Platform::empty()
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

/// `--vfio-user PATH`: waits for one client on `PATH`, then serves it from
/// a sandboxed copy of this program in fresh namespaces (the sandbox needs
/// to be PID 1 of its own), and ends as that copy ends.
fn vfio_user_listen(path: &std::path::Path, args: &Args) -> Result<(), Box<dyn Error>> {
    let pci = model::by_name(&args.model).is_some_and(|m| m.placement().pci().is_some());
    if !pci {
        return Err(format!("--model {}: not a PCI device model", args.model).into());
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("vfio-user socket {}: {e}", path.display()))?;
    emulator::log!(
        "emulator[{}]: vfio-user server waiting on {}",
        args.model,
        path.display()
    );
    let (client, _) = listener.accept()?;
    // One client per server: nobody else may connect.
    drop(listener);
    let _ = std::fs::remove_file(path);
    let mut child_args = vec![
        "--vfio-user-fd".into(),
        "3".into(),
        "--model".into(),
        args.model.clone(),
    ];
    for (flag, offsets) in [
        ("--forward", &args.map.forward),
        ("--batch", &args.map.batch),
    ] {
        for offset in offsets {
            child_args.extend([flag.to_string(), format!("{offset:#x}")]);
        }
    }
    child_args.extend(["--poll-us".to_string(), args.poll_us.to_string()]);
    if emulator::serve::TRACE.load(std::sync::atomic::Ordering::Relaxed) {
        child_args.push("--trace-accesses".into());
    }
    let child = emulator::spawn::spawn(&std::env::current_exe()?, &child_args, &client)?;
    drop(client);
    match emulator::spawn::wait(child.pid)? {
        emulator::spawn::ExitStatus::Exited(0) => Ok(()),
        status => Err(format!("the sandboxed server {status}").into()),
    }
}

/// The sandboxed vfio-user server, on the client connected at `fd`.
fn vfio_user_serve(fd: RawFd, args: &Args) -> Result<(), Box<dyn Error>> {
    if fd <= 2 {
        return Err(format!("--vfio-user-fd {fd} is a standard stream").into());
    }
    // SAFETY: our parent started us with the client's connection at this
    // descriptor, which nothing else in this process owns.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let cpus = cpus();
    let isolated = sandbox::isolate()?;
    let mut server = emulator::vfio_user::Server::new(stream, &args.model, true)?;
    server.set_access_map_spec(args.map.clone());
    if let Some(spin) = spin(args.poll_us, cpus) {
        server.set_spin(spin);
    }
    let report = sandbox::lock_down(
        isolated,
        &sandbox::Fds {
            accesses: sandbox::Accesses::VfioUser(fd),
            control: None,
            resample: None,
            irqfds: Vec::new(),
            console_in: None,
            console_out: None,
        },
    )?;
    emulator::log!(
        "emulator[{}]: vfio-user server sandboxed: {report}",
        args.model
    );
    let result = server.run();
    let counters = format!("{}; ring: {}", server.counters, server.served);
    // Exit without running destructors, as the ring's server does.
    match result {
        Ok(()) => {
            emulator::log!(
                "emulator[{}]: vfio-user client gone: {counters}",
                args.model
            );
            std::process::exit(0)
        }
        Err(e) => {
            emulator::log!("emulator[{}]: vfio-user: {e}; {counters}", args.model);
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
            control: Some(control.as_raw_fd()),
            resample: platform
                .intx
                .as_ref()
                .and_then(|i| i.resample.as_ref())
                .map(|r| r.as_raw_fd()),
            irqfds,
            console_in: console.map(|c| c.input.as_raw_fd()),
            console_out: console.map(|c| c.output.as_raw_fd()),
        },
    )?;
    emulator::log!("emulator[{model}]: sandboxed: {report}");
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
