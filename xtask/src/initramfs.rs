//! The Linux guest's initramfs: Debian's static busybox, the project's
//! guest-side programs and `guest/linux/init`, written as a `newc` cpio
//! archive (the format the kernel unpacks; Documentation/driver-api/
//! early-userspace/buffer-format.rst). Written here rather than with
//! cpio(1) so that it needs no root for the device node the kernel wants
//! before any file system is mounted: /dev/console.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// What goes into the archive.
pub struct Contents {
    /// A static busybox, installed as /bin/busybox.
    pub busybox: PathBuf,
    /// The init script, installed as /init.
    pub init: PathBuf,
    /// Further files: (path in the guest, host file, mode).
    pub files: Vec<(String, PathBuf, u32)>,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const CHAR: u32 = 0o020_000;

/// A `newc` archive being written.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & DIR != 0 { 2 } else { 1 },
            0, // mtime: the archive is the same from run to run
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, DIR | 0o755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, FILE | mode, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// The archive's bytes.
pub fn build(contents: &Contents) -> Result<Vec<u8>> {
    let mut cpio = Cpio::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    cpio.entry("dev/console", CHAR | 0o600, (5, 1), &[]);
    cpio.file("bin/busybox", 0o755, &read(&contents.busybox)?);
    cpio.file("init", 0o755, &read(&contents.init)?);
    for (name, host, mode) in &contents.files {
        cpio.file(name.trim_start_matches('/'), *mode, &read(host)?);
    }
    Ok(cpio.finish())
}

/// Writes the archive to `path`.
pub fn write(contents: &Contents, path: &Path) -> Result<()> {
    fs::write(path, build(contents)?).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_extracts_with_cpio1() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut cpio = Cpio::new();
        cpio.dir("etc");
        cpio.file("etc/hello", 0o644, b"hello, world\n");
        cpio.file("odd", 0o755, b"abc");
        fs::write(dir.join("a.cpio"), cpio.finish()).unwrap();
        // cpio(1): Debian priority "important", and a kernel build dependency.
        let status = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F", "a.cpio"])
            .current_dir(&dir)
            .status()
            .expect("cpio(1) runs");
        assert!(status.success());
        assert_eq!(fs::read(dir.join("etc/hello")).unwrap(), b"hello, world\n");
        assert_eq!(fs::read(dir.join("odd")).unwrap(), b"abc");
        let _ = fs::remove_dir_all(&dir);
    }
}
