//! The Linux guest: where its kernel and initramfs are (built by `cargo
//! xtask linux`), how a command reaches it, and the command line that
//! boots it under each host, the same for `cargo xtask linux`, the in-VM
//! tests and the benchmark's Linux part.
//!
//! The initramfs's init (guest/linux/init) runs the command it finds in
//! its environment variable `kvm_userdev_cmd` (base64: a kernel command
//! line parameter the kernel does not know goes to init's environment) and
//! reports its exit status on port 0x501.

use std::path::{Path, PathBuf};

/// The guest's kernel command line. `quiet`: every byte printk writes costs
/// the UART a store and a status load, so the boot log is kept to warnings.
/// `no_timer_check`: the boot CPU's check that the PIT ticks through the
/// I/O APIC waits a fixed number of TSC cycles, which a nested guest under
/// TCG on a busy host can spend before the L1 kernel's timer fires (seen:
/// "IO-APIC + timer doesn't work!" and a panic); `no5lvl` as in the VM.
pub const CMDLINE: &str = "console=ttyS0 quiet panic=-1 no5lvl no_timer_check";

/// The guest kernel and initramfs, under the repository.
pub fn kernel(repo: &Path) -> PathBuf {
    repo.join("target/guest-linux/bzImage")
}

pub fn initramfs(repo: &Path) -> PathBuf {
    repo.join("target/guest-linux/initramfs.cpio")
}

/// What runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Host {
    /// Our VMM with user devices.
    User,
    /// Our VMM with the same models in the VMM, on exits.
    InProcess,
    /// Our VMM with the emulators behind a socket, on exits.
    Socket,
    /// QEMU (-accel kvm) with its own 16550 and edu.
    Qemu,
    /// QEMU with its own 16550, the edu devices our emulators over
    /// vfio-user (`Boot::vfio_user`).
    QemuVfioUser,
    /// The same with QEMU's `qemu-patch/`: edu's BAR0 through a KVM user
    /// device.
    QemuVfioUserUserdev,
}

impl Host {
    /// The guest's own exit status from its host's: QEMU's isa-debug-exit
    /// makes `(value << 1) | 1` of it.
    pub fn guest_status(self, code: i32) -> i32 {
        match self {
            _ if self.is_qemu() && code & 1 == 1 => code >> 1,
            // QEMU ended without the port: the guest never reported.
            _ if self.is_qemu() && code == 0 => 1,
            _ => code,
        }
    }

    /// QEMU runs the guest (with whatever edu).
    pub fn is_qemu(self) -> bool {
        matches!(
            self,
            Host::Qemu | Host::QemuVfioUser | Host::QemuVfioUserUserdev
        )
    }
}

/// How to boot the guest.
#[derive(Clone, Debug)]
pub struct Boot {
    pub host: Host,
    pub cpus: u8,
    pub edu: usize,
    pub memory_mib: u32,
    /// The shell command the guest runs (none: an interactive shell).
    pub command: Option<String>,
    /// Extra words for the guest's kernel command line.
    pub append: Vec<String>,
    /// Extra arguments for our VMM.
    pub vmm_args: Vec<String>,
    /// Our VMM's --timeout, in seconds.
    pub timeout_s: u64,
    /// QEMU's binary (default: `qemu-system-x86_64` on PATH).
    pub qemu: Option<PathBuf>,
    /// Under QEMU: the edu devices are QEMU's vfio-user client for the
    /// servers listening on these sockets, not QEMU's own (the caller
    /// starts them: `crate::qemu::VfioUserServer`).
    pub vfio_user: Vec<PathBuf>,
}

impl Boot {
    pub fn new(host: Host) -> Self {
        Boot {
            host,
            cpus: 2,
            edu: 2,
            memory_mib: 512,
            command: None,
            append: Vec::new(),
            vmm_args: Vec::new(),
            timeout_s: 600,
            qemu: None,
            vfio_user: Vec::new(),
        }
    }

    /// The guest's kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec![CMDLINE.to_string()];
        words.extend(self.append.iter().cloned());
        if let Some(c) = &self.command {
            words.push(format!("kvm_userdev_cmd={}", base64(c.as_bytes())));
        }
        words.join(" ")
    }

    /// The program and arguments that boot the guest (in the VM): our VMM
    /// at `vmm`, or QEMU.
    pub fn command(&self, repo: &Path, vmm: &Path) -> Vec<String> {
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut c: Vec<String> = Vec::new();
        let mut arg = |a: &str, v: String| {
            c.push(a.into());
            c.push(v);
        };
        match self.host {
            Host::Qemu | Host::QemuVfioUser | Host::QemuVfioUserUserdev => {
                arg("-accel", "kvm".into());
                arg("-cpu", "host".into());
                arg("-display", "none".into());
                arg("-serial", "stdio".into());
                arg("-device", "isa-debug-exit,iobase=0x501,iosize=2".into());
                arg("-smp", self.cpus.to_string());
                arg("-m", format!("{}M", self.memory_mib));
                arg("-kernel", s(kernel(repo)));
                arg("-initrd", s(initramfs(repo)));
                arg("-append", self.cmdline());
                if self.vfio_user.is_empty() {
                    for _ in 0..self.edu {
                        arg("-device", "edu".into());
                    }
                } else {
                    // The servers do DMA in RAM that QEMU shares with them.
                    for dir in crate::qemu::debian_firmware() {
                        arg("-L", s(dir));
                    }
                    arg(
                        "-object",
                        format!(
                            "memory-backend-memfd,id=ram,size={}M,share=on",
                            self.memory_mib
                        ),
                    );
                    arg("-machine", "memory-backend=ram".into());
                    for socket in &self.vfio_user {
                        arg("-device", crate::qemu::vfio_user_device(socket));
                    }
                }
                let qemu = self
                    .qemu
                    .as_deref()
                    .unwrap_or(Path::new("qemu-system-x86_64"));
                let mut all: Vec<String> = vec![s(qemu.to_path_buf())];
                all.extend(["-nodefaults", "-no-user-config", "-no-reboot"].map(String::from));
                all.extend(c);
                all
            }
            Host::User | Host::InProcess | Host::Socket => {
                let serve = match self.host {
                    Host::InProcess => "in-process",
                    Host::Socket => "socket",
                    _ => "user",
                };
                arg("--kernel", s(kernel(repo)));
                arg("--initrd", s(initramfs(repo)));
                arg("--cmdline", self.cmdline());
                arg("--cpus", self.cpus.to_string());
                arg("--memory", self.memory_mib.to_string());
                arg("--serve", serve.into());
                arg("--edu", self.edu.to_string());
                arg("--timeout", self.timeout_s.to_string());
                let mut all = vec![vmm.to_string_lossy().into_owned(), "--serial".into()];
                all.extend(c);
                all.extend(self.vmm_args.iter().cloned());
                all
            }
        }
    }
}

/// Standard base64 (RFC 4648, with padding), which busybox decodes.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn command_rides_on_the_command_line() {
        let mut boot = Boot::new(Host::User);
        boot.command = Some("sh -c 'exit 7'".into());
        let line = boot.cmdline();
        assert!(line.starts_with(CMDLINE));
        assert!(line.ends_with(&format!("kvm_userdev_cmd={}", base64(b"sh -c 'exit 7'"))));
        let argv = boot.command(Path::new("/r"), Path::new("/r/vmm"));
        assert_eq!(argv[..2], ["/r/vmm", "--serial"]);
        assert!(argv.contains(&"/r/target/guest-linux/initramfs.cpio".to_string()));
    }

    #[test]
    fn qemu_status_decoded() {
        assert_eq!(Host::Qemu.guest_status(15), 7);
        assert_eq!(Host::Qemu.guest_status(1), 0);
        assert_eq!(Host::Qemu.guest_status(0), 1);
        assert_eq!(Host::User.guest_status(7), 7);
    }
}
