//! `cargo xtask qemu`: a QEMU with the vfio-user client (`-device
//! vfio-user-pci`, QEMU 10.1 and later), built from Debian's source package
//! and cached outside the repository, unpatched or with `qemu-patch/`.
//!
//! Debian stable's QEMU (and bookworm-backports') is older than 10.1, so the
//! source comes from a newer suite of the machine's own Debian archive,
//! through a private apt configuration that leaves the system's sources
//! alone.
//!
//! Cache layout (under `util::cache_dir()/qemu`):
//! - `apt/`: the private apt configuration, its lists and cache.
//! - `downloads/<version>/`: the source package (`.dsc` and tarballs).
//! - `wheels/`: the meson wheel QEMU's configure installs into its venv.
//! - `work/`: the last build's tree (wiped when the next build starts; kept
//!   at one path so that ccache hits across builds).
//! - `ccache/`: the compiler cache.
//! - `build.log`: the last build's full output.
//! - `<key>/`: finished builds (`qemu-system-x86_64`, `build.txt`,
//!   `build.log`), keyed by version + patches + configure arguments + recipe.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deps;
use crate::util::{
    cache_dir, fmt_duration, hash_files, hex, jobs, lock_file, patch_series, print_tail, repo_root,
    run, run_output,
};

/// The source package, pinned: the first Debian QEMU with the vfio-user
/// client whose files the archive serves here.
const PACKAGE: &str = "qemu";
const VERSION: &str = "1:10.2.2+ds-1";
/// Where to look for that version: it was measured in experimental, and
/// the archive here now lists it under unstable; apt takes it from
/// whichever index names it.
const SUITES: &str = "experimental unstable";
/// Bumped when the way QEMU is built changes, so old cache entries are not
/// mistaken for current ones.
const RECIPE: &str = "kvm-userdev qemu recipe 1: dpkg-source -x (Debian's patches applied), \
                      then patch -p1 --fuzz=0 each patch, ninja qemu-system-x86_64";
const BINARY: &str = "qemu-system-x86_64";

/// Only the x86 system emulator, with KVM and TCG and nothing optional:
/// the vfio-user client needs no switch (it follows VFIO_PCI). Debian's
/// tarball has no firmware blobs (see `firmware_args`) and configure must
/// not reach for the network.
const CONFIGURE: &[&str] = &[
    "--target-list=x86_64-softmmu",
    "--disable-download",
    "--disable-fdt",
    "--disable-install-blobs",
    "--without-default-features",
    "--enable-kvm",
    "--enable-tcg",
    "--disable-docs",
    "--disable-werror",
];

/// What fetching, unpacking and building the source needs (python3 and its
/// venv are checked apart: it may not be Debian's). With these configure
/// options glib and zlib are the only libraries; pixman is off, and flex and
/// bison would only serve the disabled dtc.
const BUILD_DEPS: &[&str] = &[
    "ccache",
    "dpkg-dev",
    "gcc",
    "libc6-dev",
    "libglib2.0-dev",
    "ninja-build",
    "patch",
    "pkg-config",
    "xz-utils",
    "zlib1g-dev",
];

/// Where Debian's packages put QEMU's firmware, in the order Debian's own
/// QEMU searches it (the benchmark and the tests pass the same list).
const FIRMWARE_DIRS: &[&str] = &kvm_userdev_bench::qemu::DEBIAN_FIRMWARE_DIRS;
/// Files the test VMs boot with: the BIOS and the PVH loader for `-kernel`.
const FIRMWARE_FILES: &[&str] = &["bios-256k.bin", "pvh.bin"];

/// The patches of `qemu-patch/`, in order, without the cover letter; none
/// if the directory does not exist.
pub fn series() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("qemu-patch");
    match patch_series(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        r => r.with_context(|| format!("read {}", dir.display())),
    }
}

/// The QEMUs the in-VM tests and the benchmark run: without and with our
/// patches.
pub struct Qemus {
    pub plain: PathBuf,
    pub patched: PathBuf,
}

impl Qemus {
    /// Both, built (or found in the cache), with the firmware they run
    /// with installed.
    pub fn build() -> Result<Qemus> {
        firmware_args()?;
        Ok(Qemus {
            plain: build(&[])?,
            patched: build(&series()?)?,
        })
    }

    /// The environment that names them for the in-VM tests.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KVM_USERDEV_QEMU".into(), self.plain.display().to_string()),
            (
                "KVM_USERDEV_QEMU_PATCHED".into(),
                self.patched.display().to_string(),
            ),
        ]
    }
}

/// The `-L` arguments a QEMU built here needs: Debian strips the firmware
/// from the source, so it comes from the system's packages (those the system
/// QEMU pulls in, installed here if missing).
pub fn firmware_args() -> Result<Vec<String>> {
    deps::ensure_qemu()?;
    let dirs: Vec<&str> = FIRMWARE_DIRS
        .iter()
        .copied()
        .filter(|d| Path::new(d).is_dir())
        .collect();
    for file in FIRMWARE_FILES {
        if !dirs.iter().any(|d| Path::new(d).join(file).exists()) {
            bail!("no {file} in any of {}", FIRMWARE_DIRS.join(", "));
        }
    }
    Ok(dirs
        .iter()
        .flat_map(|d| ["-L".to_string(), d.to_string()])
        .collect())
}

/// The version without the epoch, as in the source package's file names.
fn file_version() -> &'static str {
    VERSION.split_once(':').map_or(VERSION, |(_, v)| v)
}

/// The cache key of a build: everything that goes into it. No patches give
/// the same key whichever variant asked, since it is the same QEMU.
fn cache_key(version: &str, patches: &[PathBuf], configure: &[&str]) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("{RECIPE}\nversion {version}\n"));
    for arg in configure {
        h.update(format!("configure {arg}\n"));
    }
    hash_files(&mut h, "patch", patches)?;
    let digest = hex(&h.finalize());
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    // Only characters that need no quoting anywhere in the directory name.
    let upstream: String = upstream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let variant = if patches.is_empty() {
        "plain"
    } else {
        "patched"
    };
    Ok(format!("{upstream}-{variant}-{}", &digest[..16]))
}

/// The deb-src stanza for the suites that have the pinned version, from the
/// machine's own archive entry: same mirror, same keyring.
fn source_stanza(archive: &deps::Archive) -> String {
    format!(
        "# Written by kvm-userdev's xtask for its own apt-get source; not in the system's \
         sources.\n{}",
        archive.stanza("deb-src", SUITES, "main")
    )
}

/// The `meson` version that QEMU's configure installs into its venv from
/// `python/wheels` (the `installed` field of the `[meson]` group).
fn meson_version(pythondeps: &str) -> Option<String> {
    let mut in_group = false;
    for line in pythondeps.lines().map(str::trim) {
        if line.starts_with('[') {
            in_group = line == "[meson]";
            continue;
        }
        if !in_group || !line.starts_with("meson") {
            continue;
        }
        let rest = line.split("installed").nth(1)?;
        let value = rest.trim_start().strip_prefix('=')?.trim_start();
        let value = value.strip_prefix('"')?;
        return value.split('"').next().map(String::from);
    }
    None
}

struct Cache {
    root: PathBuf,
}

impl Cache {
    fn new() -> Result<Self> {
        let root = cache_dir().join("qemu");
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        Ok(Cache { root })
    }

    fn out(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn apt(&self) -> PathBuf {
        self.root.join("apt")
    }

    fn downloads(&self) -> PathBuf {
        self.root.join("downloads").join(file_version())
    }

    fn wheels(&self) -> PathBuf {
        self.root.join("wheels")
    }

    fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    fn log(&self) -> PathBuf {
        self.root.join("build.log")
    }

    /// Its own lock, so a QEMU build does not wait for a kernel build.
    fn lock(&self) -> Result<File> {
        lock_file(&self.root.join("lock"), &self.root)
    }
}

fn binary_in(dir: &Path) -> Option<PathBuf> {
    let bin = dir.join(BINARY);
    bin.is_file().then_some(bin)
}

fn describe(patches: &[PathBuf]) -> String {
    if patches.is_empty() {
        return "unpatched".into();
    }
    let names: Vec<String> = patches
        .iter()
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    format!("patched: {}", names.join(" "))
}

/// Builds QEMU `VERSION` with `patches` applied in order, unless the cache
/// has that build; returns the path of its `qemu-system-x86_64` (run it with
/// `firmware_args()`).
pub fn build(patches: &[PathBuf]) -> Result<PathBuf> {
    let started = Instant::now();
    let cache = Cache::new()?;
    let key = cache_key(VERSION, patches, CONFIGURE)?;
    let out = cache.out(&key);
    let up_to_date = |bin: &Path| {
        eprintln!(
            "xtask: QEMU {} ({}) is up to date: {}",
            file_version(),
            describe(patches),
            bin.display()
        );
    };
    // A cached build is returned without the lock, packages or network.
    if let Some(bin) = binary_in(&out) {
        up_to_date(&bin);
        return Ok(bin);
    }
    let _lock = cache.lock()?;
    if let Some(bin) = binary_in(&out) {
        up_to_date(&bin);
        return Ok(bin);
    }

    deps::ensure_packages(BUILD_DEPS)?;
    ensure_python()?;
    let dsc = ensure_source(&cache)?;
    let work = cache.work();
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let tree = work.join("src");
    eprintln!(
        "xtask: unpacking {PACKAGE} {VERSION} into {}",
        tree.display()
    );
    run_quiet(
        Command::new("dpkg-source").arg("-x").arg(&dsc).arg(&tree),
        &work.join("unpack.log"),
    )?;
    apply_patches(&tree, patches)?;
    let meson = ensure_meson_wheel(&cache, &tree)?;

    let log_path = cache.log();
    let mut log = File::create(&log_path)?;
    writeln!(
        log,
        "QEMU {VERSION} ({}), meson {meson}\nconfigure {}\n",
        describe(patches),
        CONFIGURE.join(" ")
    )?;
    let build_dir = tree.join("build");
    fs::create_dir_all(&build_dir)?;
    configure(&cache, &tree, &build_dir, &log_path)?;
    let steps = ninja(&cache, &build_dir, &log_path)?;
    let built = build_dir.join(BINARY);
    let version = check(&built)?;

    let tmp = out.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| -> Result<PathBuf> {
        fs::create_dir_all(&tmp)?;
        fs::copy(&built, tmp.join(BINARY))?;
        fs::copy(&log_path, tmp.join("build.log"))?;
        fs::write(
            tmp.join("build.txt"),
            format!(
                "source: {PACKAGE} {VERSION}\nversion: {version}\nvariant: {}\nmeson: {meson}\n\
                 configure: {}\nbuild steps: {steps}\nbuilt in: {}\n",
                describe(patches),
                CONFIGURE.join(" "),
                fmt_duration(started.elapsed()),
            ),
        )?;
        let _ = fs::remove_dir_all(&out);
        fs::rename(&tmp, &out)?;
        binary_in(&out).context("QEMU vanished from the cache")
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    let bin = result?;
    eprintln!(
        "xtask: built QEMU {} ({}) in {}: {}",
        file_version(),
        describe(patches),
        fmt_duration(started.elapsed()),
        bin.display()
    );
    Ok(bin)
}

/// Runs `cmd` with its output in `log`; prints the log's tail if it fails.
fn run_quiet(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = File::create(log)?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        print_tail(log, 30);
        bail!(
            "{:?} failed ({status}); log: {}",
            cmd.get_program(),
            log.display()
        );
    }
    Ok(())
}

/// configure creates a venv with `python3 -m venv` and installs meson into
/// it with pip; the wheel is fetched with pip too.
fn ensure_python() -> Result<()> {
    let works = |args: &[&str]| {
        Command::new("python3")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(&["--version"]) {
        deps::ensure_packages(&["python3"])?;
    }
    if !works(&["-c", "import venv, ensurepip"]) {
        deps::ensure_packages(&["python3-venv"])?;
    }
    if !works(&["-m", "pip", "--version"]) {
        deps::ensure_packages(&["python3-pip"])?;
    }
    Ok(())
}

/// apt-get with a configuration of its own under the cache: the deb-src
/// stanza, its lists and package cache. The system's configuration (proxy,
/// options) still applies, the system's sources do not.
fn apt_get(cache: &Cache) -> Result<Command> {
    let apt = cache.apt();
    let sources = apt.join("sources.list.d");
    for dir in [
        sources.clone(),
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&dir)?;
    }
    let list = apt.join("qemu-source.sources");
    fs::write(&list, source_stanza(&deps::debian_archive()?))?;
    let mut cmd = Command::new("apt-get");
    let dir = |opt: &str, path: &Path| format!("{opt}={}", path.display());
    for opt in [
        dir("Dir::Etc::SourceList", &list),
        dir("Dir::Etc::SourceParts", &sources),
        dir("Dir::State::Lists", &apt.join("lists")),
        dir("Dir::Cache", &apt.join("cache")),
        // The cache lives in a home directory that apt's download user
        // cannot enter; apt would fall back to root anyway, with a warning.
        "APT::Sandbox::User=root".into(),
    ] {
        cmd.arg("-o").arg(opt);
    }
    Ok(cmd)
}

/// Downloads the source package unless the cache has it, and returns its
/// `.dsc`. Signatures are checked as apt does for any source (the Release
/// file against the archive's keyring, the files against its hashes).
fn ensure_source(cache: &Cache) -> Result<PathBuf> {
    let dest = cache.downloads();
    let dsc = dest.join(format!("{PACKAGE}_{}.dsc", file_version()));
    if dsc.is_file() {
        return Ok(dsc);
    }
    eprintln!("xtask: downloading {PACKAGE} {VERSION} (source, about 40 MB)");
    // Their output goes to stderr: stdout is for the path.
    run(apt_get(cache)?.args(["-q", "update"]).stdout(io::stderr()))?;
    let tmp = dest.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let fetched = run(apt_get(cache)?
        .current_dir(&tmp)
        .args(["-q", "source", "--download-only"])
        .arg(format!("{PACKAGE}={VERSION}"))
        .stdout(io::stderr()));
    if let Err(e) = fetched {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).context(format!(
            "the machine's Debian archive does not serve {PACKAGE} {VERSION} in {SUITES}"
        ));
    }
    // Complete downloads only: the directory appears whole.
    fs::rename(&tmp, &dest)?;
    if !dsc.is_file() {
        bail!("apt-get source left no {}", dsc.display());
    }
    Ok(dsc)
}

/// Applies `patches` in order to the fresh tree, without fuzz: a patch that
/// does not apply exactly fails the build.
fn apply_patches(tree: &Path, patches: &[PathBuf]) -> Result<()> {
    for patch in patches {
        let name = patch.strip_prefix(repo_root()).unwrap_or(patch);
        eprintln!("xtask: applying {}", name.display());
        let out = Command::new("patch")
            .current_dir(tree)
            .args(["-p1", "--batch", "--forward", "--fuzz=0", "--quiet", "-i"])
            .arg(patch)
            .output()
            .context("run patch")?;
        if !out.status.success() {
            bail!(
                "{} does not apply to {PACKAGE} {VERSION}:\n{}{}",
                name.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Puts the meson wheel configure wants into the tree's `python/wheels`
/// (Debian's tarball ships none, and configure runs offline), downloading
/// it from PyPI into the cache once. Returns meson's version.
fn ensure_meson_wheel(cache: &Cache, tree: &Path) -> Result<String> {
    let toml = fs::read_to_string(tree.join("pythondeps.toml"))
        .context("read the source's pythondeps.toml")?;
    let version = meson_version(&toml).context("no meson version in pythondeps.toml")?;
    let find = || -> Option<PathBuf> {
        let prefix = format!("meson-{version}-");
        fs::read_dir(cache.wheels())
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                name.starts_with(&prefix) && name.ends_with(".whl")
            })
    };
    let wheel = match find() {
        Some(w) => w,
        None => {
            eprintln!("xtask: downloading the meson {version} wheel");
            fs::create_dir_all(cache.wheels())?;
            run(Command::new("python3")
                .args(["-m", "pip", "download", "-q", "--no-deps"])
                .args(["--only-binary=:all:", "-d"])
                .arg(cache.wheels())
                .arg(format!("meson=={version}"))
                .stdout(io::stderr()))?;
            find().with_context(|| format!("pip left no meson {version} wheel"))?
        }
    };
    let dest = tree.join("python/wheels");
    fs::create_dir_all(&dest)?;
    fs::copy(&wheel, dest.join(wheel.file_name().expect("a file")))?;
    Ok(version)
}

fn ccache_env(cache: &Cache, cmd: &mut Command) {
    cmd.env("CCACHE_DIR", cache.root.join("ccache"))
        .env("CCACHE_MAXSIZE", "2G");
}

fn configure(cache: &Cache, tree: &Path, build_dir: &Path, log_path: &Path) -> Result<()> {
    eprintln!("xtask: configuring QEMU (log: {})", log_path.display());
    let log = fs::OpenOptions::new().append(true).open(log_path)?;
    let mut cmd = Command::new(tree.join("configure"));
    cmd.current_dir(build_dir)
        .args(CONFIGURE)
        .arg("--cc=ccache gcc")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ccache_env(cache, &mut cmd);
    let status = cmd.status().context("run configure")?;
    if !status.success() {
        print_tail(log_path, 40);
        bail!(
            "QEMU's configure failed ({status}); full log: {}",
            log_path.display()
        );
    }
    Ok(())
}

/// Builds the system emulator with ninja, printing a progress line at every
/// tenth of the build or after 30 s without one; the full output goes to
/// the log. Returns the number of build steps.
fn ninja(cache: &Cache, build_dir: &Path, log_path: &Path) -> Result<u64> {
    let jobs = jobs();
    eprintln!(
        "xtask: building {BINARY} ({jobs} jobs; cold about 7 min on 2 cores, longer beside \
         another build, less with a warm ccache)"
    );
    let log = Arc::new(Mutex::new(
        fs::OpenOptions::new().append(true).open(log_path)?,
    ));
    let mut cmd = Command::new("ninja");
    cmd.arg("-C")
        .arg(build_dir)
        .arg(format!("-j{jobs}"))
        .arg(BINARY)
        // The status prefix parsed below, whatever the caller's setting.
        .env("NINJA_STATUS", "[%f/%t] ")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ccache_env(cache, &mut cmd);
    let mut child = cmd.spawn().context("run ninja")?;
    let stderr = child.stderr.take().expect("piped");
    let err_log = Arc::clone(&log);
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(err_log.lock().unwrap(), "{line}");
        }
    });
    let mut progress = Progress::new();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let _ = writeln!(log.lock().unwrap(), "{line}");
        if let Some((done, total)) = ninja_step(&line) {
            progress.step(done, total, &line);
        }
    }
    let status = child.wait()?;
    let _ = err_thread.join();
    if !status.success() {
        print_tail(log_path, 40);
        bail!(
            "QEMU build failed ({status}); full log: {}",
            log_path.display()
        );
    }
    Ok(progress.done)
}

/// `[n/m] Compiling C object ...` → (n, m).
fn ninja_step(line: &str) -> Option<(u64, u64)> {
    let (counts, _) = line.strip_prefix('[')?.split_once("] ")?;
    let (done, total) = counts.split_once('/')?;
    Some((done.parse().ok()?, total.parse().ok()?))
}

struct Progress {
    started: Instant,
    last_report: Instant,
    last_tenth: u64,
    done: u64,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            last_report: Instant::now(),
            last_tenth: 0,
            done: 0,
        }
    }

    fn step(&mut self, done: u64, total: u64, line: &str) {
        self.done = done;
        let tenth = done * 10 / total.max(1);
        if tenth <= self.last_tenth && self.last_report.elapsed() < Duration::from_secs(30) {
            return;
        }
        self.last_tenth = self.last_tenth.max(tenth);
        self.last_report = Instant::now();
        let what = line.split_once("] ").map_or("", |(_, w)| w);
        eprintln!(
            "xtask:   qemu: {done}/{total} ({}%), {}: {what}",
            done * 100 / total.max(1),
            fmt_duration(self.started.elapsed()),
        );
    }
}

/// Checks that the built QEMU runs and has the vfio-user client; returns its
/// `--version` line.
fn check(qemu: &Path) -> Result<String> {
    let firmware = firmware_args()?;
    let version = run_output(Command::new(qemu).args(&firmware).arg("--version"))?;
    let devices = run_output(Command::new(qemu).args(&firmware).args(["-device", "help"]))?;
    if !devices.contains("\"vfio-user-pci\"") {
        bail!(
            "{} has no vfio-user-pci device (`-device help`)",
            qemu.display()
        );
    }
    let props = run_output(
        Command::new(qemu)
            .args(&firmware)
            .args(["-device", "vfio-user-pci,help"]),
    )?;
    if !props.contains("socket=") {
        bail!(
            "{}'s vfio-user-pci has no socket property:\n{props}",
            qemu.display()
        );
    }
    let version = version
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    eprintln!("xtask: {version}; vfio-user-pci present");
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_stanza_from_deb822_archive() {
        let files = vec![(
            "/etc/apt/sources.list.d/debian.sources".to_string(),
            "Types: deb\nURIs: http://archive.invalid/debian\n\
             Suites: bookworm bookworm-updates\nComponents: main contrib\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: http://security.invalid/debian-security\n\
             Suites: bookworm-security\nComponents: main\n"
                .to_string(),
        )];
        let archive = deps::archive_in("bookworm", &files).expect("an archive");
        let stanza = source_stanza(&archive);
        assert!(stanza.contains("Types: deb-src\n"));
        assert!(stanza.contains("URIs: http://archive.invalid/debian\n"));
        assert!(stanza.contains(&format!("Suites: {SUITES}\n")));
        // Only main: QEMU is there, and the machine may not use the others.
        assert!(stanza.contains("Components: main\n"));
        assert!(stanza.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"));
        // A stanza, and apt reads it as one.
        assert!(!stanza.contains("\n\n"));
    }

    #[test]
    fn source_stanza_from_one_line_archive() {
        let files = vec![(
            "/etc/apt/sources.list".to_string(),
            "deb http://security.invalid/debian-security bookworm-security main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://archive.invalid/debian bookworm main\n"
                .to_string(),
        )];
        let archive = deps::archive_in("bookworm", &files).expect("an archive");
        let stanza = source_stanza(&archive);
        assert!(stanza.contains("URIs: http://archive.invalid/debian\n"));
        assert!(stanza.contains("Signed-By: /k.gpg\n"));
        // Without Signed-By the system's trusted keys apply, as for the
        // archive itself.
        let files = vec![(
            "/etc/apt/sources.list".to_string(),
            "deb http://archive.invalid/debian bookworm main\n".to_string(),
        )];
        let stanza = source_stanza(&deps::archive_in("bookworm", &files).unwrap());
        assert!(!stanza.contains("Signed-By"));
        assert!(deps::archive_in("trixie", &files).is_none());
    }

    #[test]
    fn cache_key_follows_every_input() {
        let dir = std::env::temp_dir().join(format!("xtask-qemu-key-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let patch = dir.join("0001-a.patch");
        fs::write(&patch, "one").unwrap();
        let patches = vec![patch.clone()];
        let key = |v: &str, p: &[PathBuf], c: &[&str]| cache_key(v, p, c).unwrap();
        let k1 = key(VERSION, &patches, CONFIGURE);
        assert_eq!(k1, key(VERSION, &patches, CONFIGURE));
        assert!(k1.starts_with("10.2.2-ds-1-patched-"), "{k1}");
        assert!(key(VERSION, &[], CONFIGURE).starts_with("10.2.2-ds-1-plain-"));
        assert_ne!(k1, key("1:10.2.2+ds-2", &patches, CONFIGURE));
        assert_ne!(k1, key(VERSION, &[], CONFIGURE));
        assert_ne!(k1, key(VERSION, &patches, &CONFIGURE[1..]));
        let other = dir.join("0002-b.patch");
        fs::write(&other, "two").unwrap();
        assert_ne!(k1, key(VERSION, &[patch.clone(), other], CONFIGURE));
        fs::write(&patch, "changed").unwrap();
        assert_ne!(k1, key(VERSION, &patches, CONFIGURE));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn meson_version_read_from_pythondeps() {
        let toml = "# comment\n[meson]\n# The install key should match\n\
                    meson = { accepted = \">=1.5.0\", installed = \"1.9.0\", canary = \"meson\" }\n\
                    \n[meson-rust]\nmeson = { accepted = \">=1.9.0\", installed = \"1.9.1\" }\n\
                    [docs]\nsphinx = { installed = \"6.2.1\" }\n";
        assert_eq!(meson_version(toml).as_deref(), Some("1.9.0"));
        assert_eq!(
            meson_version("[docs]\nsphinx = { installed = \"6\" }\n"),
            None
        );
    }

    #[test]
    fn ninja_progress_parsed() {
        assert_eq!(
            ninja_step("[12/2400] Compiling C object libqemuutil.a.p/util_osdep.c.o"),
            Some((12, 2400))
        );
        assert_eq!(ninja_step("ninja: Entering directory `build'"), None);
        assert_eq!(ninja_step("[x/y] nothing"), None);
    }

    #[test]
    fn epoch_left_out_of_file_names() {
        assert_eq!(file_version(), "10.2.2+ds-1");
    }
}
