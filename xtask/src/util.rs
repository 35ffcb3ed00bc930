//! Small helpers: running commands, where things live.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is passed through.
pub fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", describe(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` (the one running xtask), in the repository's top directory.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(repo_root());
    c
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where kernel sources, builds and ccache live: outside the repository,
/// kept across checkouts. `KVM_USERDEV_CACHE` overrides it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVM_USERDEV_CACHE") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&dir).join("kvm-userdev");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/kvm-userdev")
}

/// Parallel jobs for builds: one per CPU.
pub fn jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Prints the last `lines` lines of the log at `path` to stderr.
pub fn print_tail(path: &Path, lines: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        eprintln!("{line}");
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Takes an exclusive lock on the file `path` (created if missing), waiting
/// with a message if another xtask holds it; released when the file drops.
pub fn lock_file(path: &Path, what: &Path) -> Result<File> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    if f.try_lock().is_err() {
        eprintln!("xtask: waiting for another xtask using {}", what.display());
        f.lock()?;
    }
    Ok(f)
}

/// Feeds each file's name, length and content to `hasher`, under `label`.
pub fn hash_files(hasher: &mut Sha256, label: &str, files: &[PathBuf]) -> Result<()> {
    for f in files {
        let data = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(format!("{label} {name} {}\n", data.len()));
        hasher.update(&data);
    }
    Ok(())
}

pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The patches of a `git format-patch` series in `dir`, in order, without
/// its cover letter (which is not applied).
pub fn patch_series(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut patches: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".patch") && name != "0000-cover-letter.patch"
        })
        .collect();
    patches.sort();
    Ok(patches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(Duration::from_millis(6500)), "6.5s");
        assert_eq!(fmt_duration(Duration::from_secs(13 * 60 + 5)), "13m05s");
    }
}
