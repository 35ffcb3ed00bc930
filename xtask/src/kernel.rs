//! `cargo xtask kernel`: the patched test kernel, built once per base version,
//! patch series and configuration and cached outside the repository.
//!
//! Cache layout (see `util::cache_dir`):
//! - `linux/`: the source as a git tree; tag `kvm-userdev-base` is Debian's
//!   source, the series is applied on top with `git am`. Switching series
//!   only touches the files that differ, so rebuilds stay incremental.
//! - `obj/{plain,debug}/`: the `O=` build directories.
//! - `kernels/<key>/`: finished kernels (`bzImage`, `config`, `release`,
//!   `build.txt`), keyed by base version + series + config fragments.
//! - `ccache/`: compiler cache shared by both flavours.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deps;
use crate::util::{
    cache_dir, fmt_duration, hash_files, hex, jobs, lock_file, patch_series, print_tail, repo_root,
    run, run_output,
};

/// Bumped when the way a kernel is built changes, so old cache entries are
/// not mistaken for current ones.
const RECIPE: &str = "kvm-userdev kernel recipe 2";
const BASE_TAG: &str = "kvm-userdev-base";
const GIT_IDENTITY: [&str; 4] = [
    "-c",
    "user.name=kvm-userdev xtask",
    "-c",
    "user.email=xtask@kvm-userdev.invalid",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Plain,
    Debug,
}

impl Flavour {
    pub fn new(debug: bool) -> Self {
        if debug {
            Flavour::Debug
        } else {
            Flavour::Plain
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Plain => "plain",
            Flavour::Debug => "debug",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Flavour::Plain => "",
            Flavour::Debug => " --debug",
        }
    }

    /// Config fragments merged onto `defconfig`, in order.
    fn fragments(self) -> Vec<PathBuf> {
        let dir = repo_root().join("kernel-patch");
        let mut v = vec![dir.join("vm.config")];
        if self == Flavour::Debug {
            v.push(dir.join("debug.config"));
        }
        v
    }
}

/// A built kernel in the cache.
pub struct Kernel {
    pub bzimage: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The KVM selftests built against its headers (`x86_64/...`).
    pub selftests: PathBuf,
}

/// The Debian source package the series is made against, from
/// `kernel-patch/BASE`.
struct Base {
    package: String,
    version: String,
}

fn read_base() -> Result<Base> {
    let path = repo_root().join("kernel-patch/BASE");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("{}: no `package version` line", path.display()))?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(package), Some(version), None) => Ok(Base {
            package: package.into(),
            version: version.into(),
        }),
        _ => bail!(
            "{}: expected `package version`, got `{line}`",
            path.display()
        ),
    }
}

/// The patches of the series, in order (the cover letter is not applied).
fn series() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("kernel-patch");
    patch_series(&dir).with_context(|| format!("read {}", dir.display()))
}

/// Identifies the series content, so the tree is re-patched when it changes.
fn series_id(patches: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    hash_files(&mut h, "patch", patches)?;
    Ok(hex(&h.finalize()))
}

/// The cache key of a kernel: everything that goes into it.
fn cache_key(base_version: &str, patches: &[PathBuf], flavour: Flavour) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "{RECIPE}\nbase {base_version}\nflavour {}\n",
        flavour.name()
    ));
    hash_files(&mut h, "patch", patches)?;
    hash_files(&mut h, "config", &flavour.fragments())?;
    let digest = hex(&h.finalize());
    Ok(format!("{}-{}", flavour.name(), &digest[..16]))
}

struct Cache {
    root: PathBuf,
}

impl Cache {
    fn new() -> Result<Self> {
        let root = cache_dir();
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        Ok(Cache { root })
    }

    fn tree(&self) -> PathBuf {
        self.root.join("linux")
    }

    /// Written last when the tree is unpacked: the Debian version it holds.
    fn tree_version_file(&self) -> PathBuf {
        self.root.join("linux.base-version")
    }

    /// The series id applied on top of the base tag.
    fn tree_series_file(&self) -> PathBuf {
        self.root.join("linux.series")
    }

    fn obj(&self, flavour: Flavour) -> PathBuf {
        self.root.join("obj").join(flavour.name())
    }

    fn kernel_dir(&self, key: &str) -> PathBuf {
        self.root.join("kernels").join(key)
    }

    fn tree_version(&self) -> Option<String> {
        fs::read_to_string(self.tree_version_file())
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Serialises builds: two xtasks must not patch or build the same tree.
    fn lock(&self) -> Result<File> {
        lock_file(&self.root.join("lock"), &self.root)
    }
}

fn kernel_in(dir: &Path) -> Option<Kernel> {
    let bzimage = dir.join("bzImage");
    let release = fs::read_to_string(dir.join("release")).ok()?;
    bzimage.is_file().then(|| Kernel {
        bzimage,
        release: release.trim().to_string(),
        selftests: dir.join("selftests/kvm"),
    })
}

/// The cached kernel for the current series, without building anything.
pub fn find(flavour: Flavour) -> Result<Kernel> {
    let cache = Cache::new()?;
    let hint = format!("build it with `cargo xtask kernel{}`", flavour.flag());
    let Some(version) = cache.tree_version() else {
        bail!(
            "no kernel source unpacked yet in {}: {hint}",
            cache.root.display()
        );
    };
    let key = cache_key(&version, &series()?, flavour)?;
    kernel_in(&cache.kernel_dir(&key)).with_context(|| {
        format!(
            "no {} kernel built for the current kernel-patch/ series and config: {hint}",
            flavour.name()
        )
    })
}

/// What a build of the current series is made of, and its cache key.
struct Build {
    base: Base,
    version: String,
    patches: Vec<PathBuf>,
    key: String,
}

impl Build {
    /// With the cache locked: installs the source if needed.
    fn current(cache: &Cache, flavour: Flavour) -> Result<Self> {
        let base = read_base()?;
        let version = ensure_source(cache, &base)?;
        let patches = series()?;
        let key = cache_key(&version, &patches, flavour)?;
        Ok(Build {
            base,
            version,
            patches,
            key,
        })
    }
}

/// Patches and configures the tree and builds the bzImage of `build` in
/// the flavour's object tree, marking the tree as holding that build;
/// returns the object tree and the number of build steps.
fn build_objects(cache: &Cache, build: &Build, flavour: Flavour) -> Result<(PathBuf, u64)> {
    apply_series(cache, &build.base, &build.version, &build.patches)?;
    let obj = cache.obj(flavour);
    configure(cache, &obj, flavour)?;
    let steps = make_bzimage(cache, &obj, flavour)?;
    fs::write(obj.join(OBJ_KEY), &build.key)?;
    Ok((obj, steps))
}

/// Builds the kernel of `flavour` unless the cache has it already.
pub fn build(flavour: Flavour) -> Result<Kernel> {
    let started = Instant::now();
    deps::ensure_packages(deps::KERNEL_BUILD)?;
    let cache = Cache::new()?;
    let _lock = cache.lock()?;
    let build = Build::current(&cache, flavour)?;
    let Build {
        base,
        version,
        patches,
        key,
    } = &build;
    let out = cache.kernel_dir(key);
    if let Some(k) = kernel_in(&out) {
        eprintln!(
            "xtask: {} kernel {} is up to date: {}",
            flavour.name(),
            k.release,
            k.bzimage.display()
        );
        return Ok(k);
    }

    let (obj, steps) = build_objects(&cache, &build, flavour)?;

    let release = run_output(make(&cache, &obj).args(["-s", "kernelrelease"]))?;
    let tmp = out.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    build_selftests(&cache, &obj, &tmp.join("selftests/kvm"))?;
    fs::copy(obj.join("arch/x86/boot/bzImage"), tmp.join("bzImage"))?;
    fs::copy(obj.join(".config"), tmp.join("config"))?;
    fs::write(tmp.join("release"), release.trim())?;
    let names: Vec<String> = patches
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    fs::write(
        tmp.join("build.txt"),
        format!(
            "base: {} {version}\nflavour: {}\nrelease: {}\npatches: {}\nbuild steps: {steps}\n\
             built in: {}\n",
            base.package,
            flavour.name(),
            release.trim(),
            if names.is_empty() {
                "(none)".into()
            } else {
                names.join(" ")
            },
            fmt_duration(started.elapsed()),
        ),
    )?;
    let _ = fs::remove_dir_all(&out);
    fs::rename(&tmp, &out)?;
    let k = kernel_in(&out).context("kernel vanished from the cache")?;
    eprintln!(
        "xtask: built {} kernel {} in {}: {}",
        flavour.name(),
        k.release,
        fmt_duration(started.elapsed()),
        k.bzimage.display()
    );
    Ok(k)
}

/// Names the cached kernel whose build the object tree holds.
const OBJ_KEY: &str = ".kvm-userdev-key";

/// The trees an out-of-tree module for the kernel of `flavour` builds
/// against: (source tree, object tree). The object tree is shared by every
/// series and configuration of a flavour, so it is rebuilt (incrementally)
/// if it holds another build than the cached kernel's.
pub fn module_trees(flavour: Flavour) -> Result<(Kernel, PathBuf, PathBuf)> {
    let kernel = build(flavour)?;
    let cache = Cache::new()?;
    let _lock = cache.lock()?;
    let build = Build::current(&cache, flavour)?;
    let obj = cache.obj(flavour);
    if fs::read_to_string(obj.join(OBJ_KEY)).ok().as_deref() != Some(build.key.as_str()) {
        eprintln!(
            "xtask: the {} object tree holds another build: rebuilding it for modules",
            flavour.name()
        );
        build_objects(&cache, &build, flavour)?;
    }
    // What `make bzImage` leaves out and module builds need (the module
    // linker script); a no-op once done.
    run(make(&cache, &obj).args(["-s", "modules_prepare"]))?;
    Ok((kernel, cache.tree(), obj))
}

/// Installs the pinned source package (or, if the archive no longer has that
/// version, the newest one, loudly), unpacks it into the cache's git tree and
/// returns the Debian version the tree holds.
fn ensure_source(cache: &Cache, base: &Base) -> Result<String> {
    let installed = deps::installed_version(&base.package);
    if installed.as_deref() != Some(base.version.as_str()) {
        let pinned = format!("{}={}", base.package, base.version);
        if let Err(e) = deps::apt_install(&[&pinned]) {
            eprintln!(
                "xtask: WARNING: cannot install {pinned} ({e:#}); kernel-patch/BASE \
                 should be moved to the version the archive has now"
            );
            if installed.is_none() {
                deps::apt_install(&[&base.package])?;
            }
        }
    }
    let version = deps::installed_version(&base.package)
        .with_context(|| format!("{} is not installed", base.package))?;
    if cache.tree_version().as_deref() == Some(version.as_str()) {
        return Ok(version);
    }

    let tarball = PathBuf::from(format!("/usr/src/{}.tar.xz", base.package));
    eprintln!(
        "xtask: unpacking {} {version} into {} (once per base version)",
        base.package,
        cache.tree().display()
    );
    let started = Instant::now();
    for stale in [
        cache.tree(),
        cache.root.join("obj"),
        cache.root.join("unpack"),
    ] {
        if stale.exists() {
            fs::remove_dir_all(&stale).with_context(|| format!("remove {}", stale.display()))?;
        }
    }
    let _ = fs::remove_file(cache.tree_series_file());
    let unpack = cache.root.join("unpack");
    fs::create_dir_all(&unpack)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpack))?;
    fs::rename(unpack.join(&base.package), cache.tree()).with_context(|| {
        format!(
            "{} has no top directory {}",
            tarball.display(),
            base.package
        )
    })?;
    fs::remove_dir_all(&unpack)?;

    let tree = cache.tree();
    eprintln!("xtask: recording the pristine source in git (about a minute)");
    run(git(&tree).args(["init", "-q"]))?;
    // Debian's tarball ignores its whole top level; -f records it anyway.
    run(git(&tree).args(["add", "-Af", "."]))?;
    run(git(&tree)
        .args(["commit", "-q", "--no-verify", "-m"])
        .arg(format!("{} {version}", base.package)))?;
    run(git(&tree).args(["tag", BASE_TAG]))?;
    fs::write(cache.tree_version_file(), &version)?;
    eprintln!("xtask: source ready in {}", fmt_duration(started.elapsed()));
    Ok(version)
}

fn git(tree: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(tree)
        .args(GIT_IDENTITY)
        .args(["-c", "gc.auto=0"]);
    c
}

/// Puts the tree at the base tag plus `patches`, unless it is there already.
fn apply_series(cache: &Cache, base: &Base, version: &str, patches: &[PathBuf]) -> Result<()> {
    let id = series_id(patches)?;
    if fs::read_to_string(cache.tree_series_file()).ok().as_deref() == Some(id.as_str()) {
        return Ok(());
    }
    let tree = cache.tree();
    let _ = fs::remove_file(cache.tree_series_file());
    let _ = git(&tree)
        .args(["am", "--abort"])
        .stderr(Stdio::null())
        .status();
    run(git(&tree).args(["checkout", "-q", "-f", "--detach", BASE_TAG]))?;
    for patch in patches {
        let name = patch.strip_prefix(repo_root()).unwrap_or(patch);
        eprintln!("xtask: applying {}", name.display());
        let out = git(&tree)
            .args(["am", "-q", "--whitespace=nowarn"])
            .arg(patch)
            .output()?;
        if !out.status.success() {
            let _ = git(&tree).args(["am", "--abort"]).status();
            bail!(
                "{} does not apply to {} {version}:\n{}{}",
                name.display(),
                base.package,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    fs::write(cache.tree_series_file(), id)?;
    Ok(())
}

/// `make` in the source tree, building into `obj`, through ccache.
fn make(cache: &Cache, obj: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C")
        .arg(cache.tree())
        .arg(format!("O={}", obj.display()))
        .arg("CC=ccache gcc")
        // An empty LOCALVERSION keeps setlocalversion from appending "+"
        // for the git tree; CONFIG_LOCALVERSION names the flavour instead.
        .arg("LOCALVERSION=")
        .env("CCACHE_DIR", cache.root.join("ccache"))
        .env("CCACHE_MAXSIZE", "8G");
    c
}

/// `defconfig`, then the fragments appended (later assignments win), then
/// `olddefconfig`; fails if any fragment option did not survive.
fn configure(cache: &Cache, obj: &Path, flavour: Flavour) -> Result<()> {
    fs::create_dir_all(obj)?;
    run(make(cache, obj).args(["-s", "defconfig"]))?;
    let config = obj.join(".config");
    // Later fragments win over earlier ones, and all of them over defconfig,
    // whose lines for the same symbols are dropped so that kconfig has no
    // overrides to warn about.
    let mut wanted = BTreeMap::new();
    for frag in flavour.fragments() {
        let body = fs::read_to_string(&frag).with_context(|| format!("read {}", frag.display()))?;
        for (sym, val) in parse_config(&body) {
            wanted.insert(sym, (val, frag.clone()));
        }
    }
    let mut text: String = fs::read_to_string(&config)?
        .lines()
        .filter(|l| parse_config(l).keys().all(|sym| !wanted.contains_key(sym)))
        .map(|l| format!("{l}\n"))
        .collect();
    for (sym, (val, _)) in &wanted {
        text.push_str(&match val.as_str() {
            "n" => format!("# {sym} is not set\n"),
            _ => format!("{sym}={val}\n"),
        });
    }
    fs::write(&config, text)?;
    run(make(cache, obj).args(["-s", "olddefconfig"]))?;

    let actual = parse_config(&fs::read_to_string(&config)?);
    let lost: Vec<String> = wanted
        .iter()
        .filter(|(sym, (val, _))| actual.get(*sym).map_or("n", String::as_str) != val)
        .map(|(sym, (val, frag))| {
            format!(
                "  {sym}={val} (from {}) became {}",
                frag.file_name().unwrap_or_default().to_string_lossy(),
                actual.get(sym).map_or("n", String::as_str)
            )
        })
        .collect();
    if !lost.is_empty() {
        bail!(
            "the kernel configuration does not have what the fragments ask for \
             (a dependency is missing?):\n{}",
            lost.join("\n")
        );
    }
    Ok(())
}

/// `CONFIG_FOO=val` and `# CONFIG_FOO is not set` lines as symbol → value,
/// "n" for unset.
fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(sym) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            if sym.starts_with("CONFIG_") {
                map.insert(sym.to_string(), "n".to_string());
            }
        } else if let Some((sym, val)) = line.split_once('=') {
            if sym.starts_with("CONFIG_") {
                map.insert(sym.to_string(), val.to_string());
            }
        }
    }
    map
}

/// A kbuild progress line, `  CC      kernel/fork.o`: one build step.
fn is_build_step(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("  ") else {
        return false;
    };
    let tag: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    !tag.is_empty()
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Builds the bzImage, printing a progress line now and then; the full
/// output goes to `obj/build.log`. Returns the number of build steps.
fn make_bzimage(cache: &Cache, obj: &Path, flavour: Flavour) -> Result<u64> {
    let jobs = jobs();
    let cold = !obj.join("vmlinux").exists();
    let estimate_file = cache.root.join(format!("steps-{}", flavour.name()));
    let log_path = obj.join("build.log");
    eprintln!(
        "xtask: building the {} kernel ({}, {jobs} jobs; log: {})",
        flavour.name(),
        if cold {
            "cold: about 15 min on 2 cores, less with a warm ccache"
        } else {
            "incremental"
        },
        log_path.display()
    );
    let log = Arc::new(Mutex::new(File::create(&log_path)?));
    let mut child = make(cache, obj)
        .arg(format!("-j{jobs}"))
        .arg("bzImage")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run make")?;
    let stderr = child.stderr.take().expect("piped");
    let err_log = Arc::clone(&log);
    let err_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(err_log.lock().unwrap(), "{line}");
        }
    });

    let mut progress = Progress::new(flavour, cold.then(|| cold_steps(&estimate_file)));
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let _ = writeln!(log.lock().unwrap(), "{line}");
        if is_build_step(&line) {
            progress.step(&line);
        }
    }
    let status = child.wait()?;
    let _ = err_thread.join();
    if !status.success() {
        print_tail(&log_path, 40);
        bail!(
            "kernel build failed ({status}); full log: {}",
            log_path.display()
        );
    }
    if cold {
        let _ = fs::write(&estimate_file, progress.steps.to_string());
    }
    Ok(progress.steps)
}

/// A cold build's length in steps: measured by the last cold build here
/// (kept in `file`), else what one measured when this was written (about
/// 2,200 for either flavour).
fn cold_steps(file: &Path) -> u64 {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u64| n > 0)
        .unwrap_or(2200)
}

/// A progress line every 15 s of a build: steps so far (against the
/// estimate of a cold build), time, and the step being made.
struct Progress {
    flavour: Flavour,
    estimate: Option<u64>,
    started: Instant,
    last_report: Instant,
    steps: u64,
}

impl Progress {
    fn new(flavour: Flavour, estimate: Option<u64>) -> Self {
        Progress {
            flavour,
            estimate,
            started: Instant::now(),
            last_report: Instant::now(),
            steps: 0,
        }
    }

    fn step(&mut self, line: &str) {
        self.steps += 1;
        if self.last_report.elapsed() < Duration::from_secs(15) {
            return;
        }
        self.last_report = Instant::now();
        let steps = self.steps;
        let done = match self.estimate {
            Some(total) => format!(
                "{steps}/~{total} steps ({}%)",
                (steps * 100 / total).min(99)
            ),
            None => format!("{steps} steps"),
        };
        eprintln!(
            "xtask:   {} kernel: {done}, {}: {}",
            self.flavour.name(),
            fmt_duration(self.started.elapsed()),
            line.trim()
        );
    }
}

/// Installs the patched tree's uAPI headers into `obj` and builds the KVM
/// selftests against them, copying the test programs to `dest`.
fn build_selftests(cache: &Cache, obj: &Path, dest: &Path) -> Result<()> {
    let log_path = obj.join("selftests.log");
    let log = File::create(&log_path)?;
    let out = obj.join("kselftest/kvm");
    eprintln!(
        "xtask: building the KVM selftests (log: {})",
        log_path.display()
    );
    let mut headers = make(cache, obj);
    headers.args(["-s", "headers_install"]);
    let mut tests = Command::new("make");
    tests
        .arg("-C")
        .arg(cache.tree().join("tools/testing/selftests/kvm"))
        .arg(format!("-j{}", jobs()))
        .arg(format!(
            "KHDR_INCLUDES=-isystem {}",
            obj.join("usr/include").display()
        ))
        .arg(format!("OUTPUT={}", out.display()));
    // Programs of an earlier series (a test since removed) must not be
    // carried over; make relinks the current ones from its objects.
    remove_programs(&out)?;
    for cmd in [&mut headers, &mut tests] {
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .status()?;
        if !status.success() {
            print_tail(&log_path, 30);
            bail!(
                "KVM selftests build failed ({status}); log: {}",
                log_path.display()
            );
        }
    }
    copy_programs(&out, dest)
}

fn is_program(path: &Path, meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.is_file() && meta.permissions().mode() & 0o111 != 0 && path.extension().is_none()
}

/// Removes the executables under `dir`, keeping objects for make to reuse.
fn remove_programs(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            remove_programs(&path)?;
        } else if is_program(&path, &meta) {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Copies the executables under `from` (not objects or dependency files)
/// to the same relative paths under `to`.
fn copy_programs(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            copy_programs(&path, &to.join(entry.file_name()))?;
        } else if is_program(&path, &meta) {
            fs::copy(&path, to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_parsed() {
        let map = parse_config(
            "CONFIG_KVM=y\n# CONFIG_USB is not set\nCONFIG_LOCALVERSION=\"-x\"\n\
             # comment\nNOT_CONFIG=1\n",
        );
        assert_eq!(map["CONFIG_KVM"], "y");
        assert_eq!(map["CONFIG_USB"], "n");
        assert_eq!(map["CONFIG_LOCALVERSION"], "\"-x\"");
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn build_steps_recognised() {
        assert!(is_build_step("  CC      kernel/fork.o"));
        assert!(is_build_step("  AR      lib/built-in.a"));
        assert!(is_build_step("  HOSTCC  scripts/basic/fixdep"));
        assert!(!is_build_step("make[1]: Entering directory"));
        assert!(!is_build_step(
            "Kernel: arch/x86/boot/bzImage is ready  (#1)"
        ));
        assert!(!is_build_step("  "));
    }

    #[test]
    fn cache_key_follows_every_input() {
        let dir = std::env::temp_dir().join(format!("xtask-key-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let patch = dir.join("0001-a.patch");
        fs::write(&patch, "one").unwrap();
        let patches = vec![patch.clone()];
        let k1 = cache_key("6.12.117-1", &patches, Flavour::Plain).unwrap();
        assert_eq!(
            k1,
            cache_key("6.12.117-1", &patches, Flavour::Plain).unwrap()
        );
        assert!(k1.starts_with("plain-"));
        assert_ne!(
            k1,
            cache_key("6.12.118-1", &patches, Flavour::Plain).unwrap()
        );
        assert_ne!(
            k1,
            cache_key("6.12.117-1", &patches, Flavour::Debug).unwrap()
        );
        assert_ne!(k1, cache_key("6.12.117-1", &[], Flavour::Plain).unwrap());
        fs::write(&patch, "two").unwrap();
        assert_ne!(
            k1,
            cache_key("6.12.117-1", &patches, Flavour::Plain).unwrap()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
