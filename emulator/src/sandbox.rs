//! The emulator's sandbox, entered before it reads anything the guest
//! controls.
//!
//! The VMM starts the emulator in fresh mount, PID, IPC and UTS namespaces
//! (a process cannot enter a new PID namespace itself) and an empty network
//! namespace its emulators share. Inside them the emulator
//!
//! 1. replaces its root with an empty, read-only tmpfs (no file system);
//! 2. becomes nobody (uid and gid 65534, no supplementary groups), which
//!    drops every capability, and sets again the parent-death signal
//!    (SIGKILL) that the credential change cleared;
//! 3. adds a Landlock ruleset that handles every file-system and network
//!    right and grants none, and scopes signals and abstract sockets (a
//!    second wall should the first fall);
//! 4. sets resource limits: no new descriptors, no file writes, no core
//!    dumps, no processes, bounded heap;
//! 5. sets no_new_privs and installs a seccomp filter that kills the
//!    process on any system call outside [`allowed`], with arguments pinned
//!    to its own descriptors where the call takes one.
//!
//! Steps 1 to 3 ([`isolate`]) need none of the descriptors the emulator
//! serves with and come before the VMM's setup brings them: they are the
//! slow ones (a mount, a pivot, a Landlock domain), and a standby emulator
//! has them behind it when it takes over. Steps 4 and 5 ([`lock_down`])
//! are pinned to the descriptors of the setup.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

use landlock::{Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetStatus, Scope, ABI};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Cmp,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

/// uid and gid of nobody.
pub const NOBODY: u32 = 65534;
/// Heap and private mappings the emulator may have.
const DATA_LIMIT: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "not started in fresh namespaces (pid {0}, expected 1): start emulators through the vmm"
    )]
    NotIsolated(i32),
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
}

/// The descriptors the sandboxed emulator keeps using, which its system
/// calls are pinned to.
#[derive(Clone, Debug)]
pub struct Fds {
    pub accesses: Accesses,
    /// The handoff socket to the VMM (none for a vfio-user server).
    pub control: Option<RawFd>,
    pub resample: Option<RawFd>,
    /// INTx, ISA and MSI irqfds.
    pub irqfds: Vec<RawFd>,
    /// The console line: read from the input, write to the output.
    pub console_in: Option<RawFd>,
    pub console_out: Option<RawFd>,
}

/// Where guest accesses come from.
#[derive(Clone, Copy, Debug)]
pub enum Accesses {
    /// The user device's backend fd: the ring, replies, ioctls.
    Ring(RawFd),
    /// A socket from a VMM that forwards its exits (see [`crate::wire`]).
    Socket(RawFd),
    /// A vfio-user client's socket ([`crate::vfio_user`]): requests with
    /// descriptors attached, eventfds moved to
    /// [`crate::vfio_user::SLOTS`].
    VfioUser(RawFd),
}

impl Accesses {
    fn fd(self) -> RawFd {
        match self {
            Accesses::Ring(fd) | Accesses::Socket(fd) | Accesses::VfioUser(fd) => fd,
        }
    }
}

/// What the sandbox came to, for the log.
#[derive(Debug)]
pub struct Report {
    pub landlock: RulesetStatus,
    pub syscalls: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "own namespaces, empty read-only root, uid/gid {NOBODY}, landlock {:?}, seccomp allow-list of {} system calls",
            self.landlock, self.syscalls
        )
    }
}

/// A process through [`isolate`], waiting for [`lock_down`].
#[derive(Debug)]
pub struct Isolated {
    landlock: RulesetStatus,
}

fn check(ret: libc::c_int, op: &'static str) -> Result<(), SandboxError> {
    if ret < 0 {
        return Err(SandboxError::Os {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Steps 1 to 3: empty root, nobody, Landlock. On error the caller must
/// exit, not carry on.
pub fn isolate() -> Result<Isolated, SandboxError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        return Err(SandboxError::NotIsolated(pid));
    }
    empty_root()?;
    become_nobody()?;
    let landlock = landlock()?;
    Ok(Isolated { landlock })
}

/// Steps 4 and 5, around `fds`: resource limits, then the seccomp filter.
/// On error the caller must exit, not carry on.
pub fn lock_down(isolated: Isolated, fds: &Fds) -> Result<Report, SandboxError> {
    // After Landlock, which needs a descriptor for its ruleset.
    limit_resources(fds)?;
    let rules = allowed(fds);
    let syscalls = rules.len();
    seccompiler::apply_filter(&filter(rules)?)?;
    Ok(Report {
        landlock: isolated.landlock,
        syscalls,
    })
}

fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    op: &'static str,
) -> Result<(), SandboxError> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    check(ret, op)
}

/// Pivots onto an empty tmpfs and drops the old root.
fn empty_root() -> Result<(), SandboxError> {
    mount(
        None,
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make / private",
    )?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some(c"none"),
        c"/tmp",
        Some(c"tmpfs"),
        flags,
        Some(c"size=4k,nr_inodes=2,mode=0555"),
        "mount tmpfs on /tmp",
    )?;
    // SAFETY: chdir/pivot_root/umount2 take NUL-terminated paths.
    unsafe {
        check(libc::chdir(c"/tmp".as_ptr()), "chdir /tmp")?;
        let ret = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr());
        check(ret as libc::c_int, "pivot_root")?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detach the old root",
        )?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    mount(
        None,
        c"/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
        None,
        "remount / read-only",
    )
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    op: &'static str,
) -> Result<(), SandboxError> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads `lim`, which outlives the call.
    check(unsafe { libc::setrlimit(resource, &lim) }, op)
}

fn limit_resources(fds: &Fds) -> Result<(), SandboxError> {
    let highest = [fds.accesses.fd()]
        .into_iter()
        .chain(fds.control)
        .chain(fds.resample)
        .chain(fds.irqfds.iter().copied())
        .chain(fds.console_in)
        .chain(fds.console_out)
        .max()
        .unwrap_or(2)
        .max(2);
    // A vfio-user server receives descriptors and keeps its eventfds at
    // fixed slots below this limit.
    let limit = match fds.accesses {
        Accesses::VfioUser(_) => crate::vfio_user::SLOTS.end,
        _ => highest + 1,
    };
    set_limit(libc::RLIMIT_NOFILE, limit as u64, "RLIMIT_NOFILE")?;
    set_limit(libc::RLIMIT_FSIZE, 0, "RLIMIT_FSIZE")?;
    set_limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    set_limit(libc::RLIMIT_MEMLOCK, 0, "RLIMIT_MEMLOCK")?;
    set_limit(libc::RLIMIT_MSGQUEUE, 0, "RLIMIT_MSGQUEUE")?;
    set_limit(libc::RLIMIT_DATA, DATA_LIMIT, "RLIMIT_DATA")?;
    set_limit(libc::RLIMIT_NPROC, 0, "RLIMIT_NPROC")
}

fn become_nobody() -> Result<(), SandboxError> {
    // SAFETY: plain credential calls with values, no pointers but a null
    // group list of length 0.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(NOBODY, NOBODY, NOBODY), "setresgid nobody")?;
        check(libc::setresuid(NOBODY, NOBODY, NOBODY), "setresuid nobody")?;
        // The credential change cleared the parent-death signal that our
        // parent set before exec: without it a killed parent would leave
        // this process serving (a vfio-user client's socket stays open).
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            "PR_SET_PDEATHSIG",
        )?;
    }
    Ok(())
}

fn landlock() -> Result<RulesetStatus, SandboxError> {
    let abi = ABI::V6;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .restrict_self()?;
    Ok(status.ruleset)
}

/// The allow-list: each system call the emulator makes once sandboxed,
/// and what pins it. An empty rule list allows the call outright.
pub fn allowed(fds: &Fds) -> BTreeMap<i64, Vec<SeccompRule>> {
    let fd_is = |fd: RawFd| Cond::new(0, Len::Dword, Cmp::Eq, fd as u64).expect("valid condition");
    let on_fds = |list: &[RawFd]| -> Vec<SeccompRule> {
        list.iter()
            .map(|&fd| SeccompRule::new(vec![fd_is(fd)]).expect("valid rule"))
            .collect()
    };
    let ioctl = |backend: RawFd, cmd: u64| {
        SeccompRule::new(vec![
            fd_is(backend),
            Cond::new(1, Len::Dword, Cmp::Eq, cmd).expect("valid condition"),
        ])
        .expect("valid rule")
    };
    let no_exec = Cond::new(2, Len::Dword, Cmp::MaskedEq(libc::PROT_EXEC as u64), 0)
        .expect("valid condition");

    // Log lines, irqfd triggers, readiness to the VMM (std sends on a
    // connected socket with write(2)), console output.
    let mut writers = vec![libc::STDERR_FILENO];
    writers.extend(fds.control);
    writers.extend(&fds.irqfds);
    writers.extend(fds.console_out);
    let mut receivers: Vec<RawFd> = fds.control.into_iter().collect();
    let mut readers: Vec<RawFd> = fds.resample.into_iter().chain(fds.console_in).collect();
    let mut rules = BTreeMap::new();
    match fds.accesses {
        Accesses::Ring(backend) => {
            // Replies to forwarded loads.
            writers.push(backend);
            // Waking vCPUs that wait for ring space; access-map updates.
            rules.insert(
                libc::SYS_ioctl,
                vec![
                    ioctl(backend, userdev::sys::KVM_USER_WAKE()),
                    ioctl(backend, userdev::sys::KVM_USER_SET_ACCESS_MAP()),
                ],
            );
        }
        Accesses::Socket(socket) => {
            // Accesses in, replies out (std sends on a connected socket
            // with write(2)).
            receivers.push(socket);
            writers.push(socket);
        }
        Accesses::VfioUser(socket) => {
            // Requests, some with descriptors (recvmsg), the rest of a
            // request (std reads a stream socket with recvfrom), replies
            // (std writes one with sendto and MSG_NOSIGNAL).
            rules.insert(libc::SYS_recvmsg, on_fds(&[socket]));
            rules.insert(libc::SYS_sendto, on_fds(&[socket]));
            receivers.push(socket);
            // Eventfds the client sends are moved to the slots (dup3 to a
            // slot), written (triggers) and read (INTx unmask) there.
            let slots = crate::vfio_user::SLOTS;
            let slot = SeccompRule::new(vec![
                Cond::new(1, Len::Dword, Cmp::Ge, slots.start as u64).expect("valid condition"),
                Cond::new(1, Len::Dword, Cmp::Lt, slots.end as u64).expect("valid condition"),
            ])
            .expect("valid rule");
            rules.insert(libc::SYS_dup3, vec![slot]);
            // A user device's backend, in its slot: the ring's ioctls, and
            // the shadow image, which it sets up once handed over.
            let backend = crate::vfio_user::BACKEND_SLOT;
            rules.insert(
                libc::SYS_ioctl,
                vec![
                    ioctl(backend, userdev::sys::KVM_USER_WAKE()),
                    ioctl(backend, userdev::sys::KVM_USER_SET_ACCESS_MAP()),
                    ioctl(backend, userdev::sys::KVM_USER_SET_SHADOW_SIZE()),
                ],
            );
            writers.extend(slots.clone());
            readers.extend(slots);
            // Guest memory comes and goes with DMA map and unmap: mmap as
            // below, and close(2) for the descriptors behind it, the ones
            // the slots replace and any the server refuses.
            rules.insert(libc::SYS_close, vec![]);
            // std's debug builds check that a descriptor is open before
            // they close it.
            let getfd =
                Cond::new(1, Len::Dword, Cmp::Eq, libc::F_GETFD as u64).expect("valid condition");
            rules.insert(
                libc::SYS_fcntl,
                vec![SeccompRule::new(vec![getfd]).expect("valid rule")],
            );
        }
    }
    // Event loop: poll(2) (glibc may use either call). Its descriptors are
    // in memory, out of seccomp's reach; waiting on a descriptor gives
    // nothing the calls pinned here do not.
    rules.insert(libc::SYS_poll, vec![]);
    rules.insert(libc::SYS_ppoll, vec![]);
    // Polling the ring yields the CPU between looks.
    rules.insert(libc::SYS_sched_yield, vec![]);
    // Irqfd triggers, log lines on stderr, replies to loads, console
    // output.
    rules.insert(libc::SYS_write, on_fds(&writers));
    // The INTx resample eventfd, console input.
    if !readers.is_empty() {
        rules.insert(libc::SYS_read, on_fds(&readers));
    }
    // Control messages from the VMM, forwarded accesses (recv(2) is recvfrom on x86-64).
    if !receivers.is_empty() {
        rules.insert(libc::SYS_recvfrom, on_fds(&receivers));
    }
    // The state region (crate::state) is mapped before the sandbox goes
    // up and used as plain memory after: it needs no call of its own.
    // The allocator: never executable memory.
    rules.insert(
        libc::SYS_mmap,
        vec![SeccompRule::new(vec![no_exec]).expect("valid rule")],
    );
    rules.insert(libc::SYS_munmap, vec![]);
    rules.insert(libc::SYS_mremap, vec![]);
    rules.insert(libc::SYS_brk, vec![]);
    rules.insert(libc::SYS_madvise, vec![]);
    // Return from std's stack-overflow signal handler; ending the process
    // (std's exit path takes down the main thread's signal stack first).
    rules.insert(libc::SYS_rt_sigreturn, vec![]);
    rules.insert(libc::SYS_sigaltstack, vec![]);
    rules.insert(libc::SYS_exit, vec![]);
    rules.insert(libc::SYS_exit_group, vec![]);
    rules
}

fn filter(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Test-only: tries what the sandbox must refuse. Returns a line for the log
/// if the call came back (refused with an error); a call that succeeds is a
/// hole, and the process exits with status 99.
#[cfg(feature = "sandbox-probe")]
pub fn probe(what: &str) -> String {
    // SAFETY: each call gets NUL-terminated strings or plain values, and its
    // result is only inspected.
    let ret = unsafe {
        match what {
            "open" => libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY),
            "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0),
            "execve" => {
                let argv = [c"/bin/sh".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), envp.as_ptr())
            }
            _ => return format!("sandbox probe: unknown probe {what:?}"),
        }
    };
    if ret >= 0 {
        crate::log!("sandbox probe: {what} SUCCEEDED: the sandbox has a hole");
        std::process::exit(99);
    }
    format!(
        "sandbox probe: {what} refused: {}",
        io::Error::last_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles_and_pins_fds() {
        let fds = Fds {
            accesses: Accesses::Ring(3),
            control: Some(4),
            resample: Some(7),
            irqfds: vec![6, 8],
            console_in: None,
            console_out: None,
        };
        let rules = allowed(&fds);
        // stderr, the control socket, two irqfds, the backend.
        assert_eq!(rules[&libc::SYS_write].len(), 5);
        assert_eq!(rules[&libc::SYS_ioctl].len(), 2);
        assert!(!rules.contains_key(&libc::SYS_openat));
        assert!(!rules.contains_key(&libc::SYS_socket));
        assert!(!rules.contains_key(&libc::SYS_execve));
        filter(allowed(&fds)).unwrap();
        let no_intx = Fds {
            resample: None,
            ..fds.clone()
        };
        assert!(!allowed(&no_intx).contains_key(&libc::SYS_read));
        let socket = Fds {
            accesses: Accesses::Socket(3),
            ..fds.clone()
        };
        let rules = allowed(&socket);
        assert!(!rules.contains_key(&libc::SYS_ioctl));
        assert_eq!(rules[&libc::SYS_recvfrom].len(), 2);
        assert_eq!(rules[&libc::SYS_write].len(), 5);
        filter(rules).unwrap();
        // A UART: one ISA irqfd, a console, no INTx.
        let uart = Fds {
            accesses: Accesses::Ring(3),
            control: Some(4),
            resample: None,
            irqfds: vec![6],
            console_in: Some(9),
            console_out: Some(10),
        };
        let rules = allowed(&uart);
        // stderr, the control socket, the irqfd, the backend, the console.
        assert_eq!(rules[&libc::SYS_write].len(), 5);
        // The console input only.
        assert_eq!(rules[&libc::SYS_read].len(), 1);
        assert!(!rules.contains_key(&libc::SYS_writev));
        assert!(!rules.contains_key(&libc::SYS_readv));
        assert_eq!(rules.len(), allowed(&fds).len());
        filter(rules).unwrap();
        // A vfio-user server: no VMM, descriptors come and go.
        let vfio_user = Fds {
            accesses: Accesses::VfioUser(3),
            control: None,
            resample: None,
            irqfds: vec![],
            console_in: None,
            console_out: None,
        };
        let rules = allowed(&vfio_user);
        let slots = crate::vfio_user::SLOTS.len();
        // stderr, the slots.
        assert_eq!(rules[&libc::SYS_write].len(), 1 + slots);
        assert_eq!(rules[&libc::SYS_sendto].len(), 1);
        assert_eq!(rules[&libc::SYS_read].len(), slots);
        assert_eq!(rules[&libc::SYS_recvmsg].len(), 1);
        assert_eq!(rules[&libc::SYS_recvfrom].len(), 1);
        assert_eq!(rules[&libc::SYS_dup3].len(), 1);
        assert_eq!(rules[&libc::SYS_ioctl].len(), 3);
        filter(rules).unwrap();
    }
}
