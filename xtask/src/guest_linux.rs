//! The Linux guest's own pieces: the kernel module `kvm_userdev_edu.ko`
//! (guest/linux/edu-driver), the static `edu-tool` that checks it
//! (guest/linux/edu-tool) and the static `console-bench`
//! (guest/linux/console-bench).

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{cargo, repo_root, run};

/// The module's name, and so its file's.
const MODULE: &str = "kvm_userdev_edu";
/// The tools' target: a full triple, so that the host's RUSTFLAGS reach
/// only the tools and not build scripts, and so that `crt-static` applies.
const TOOL_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the module against the kernel tree `kernel_src` configured and
/// built in `kernel_obj` (an `O=` directory with CONFIG_MODULES=y); returns
/// the .ko. The build runs on a copy of the sources in `out_dir` (the
/// objects land there too), never in the source tree; unchanged files are
/// not copied again, so a second build does nothing.
pub fn build_edu_module(kernel_src: &Path, kernel_obj: &Path, out_dir: &Path) -> Result<PathBuf> {
    // The module linker script comes from `make modules_prepare` (which
    // `make modules` includes); `make bzImage` alone leaves it out.
    if !kernel_obj.join("scripts/module.lds").is_file() {
        bail!(
            "{} is not prepared for external modules (no scripts/module.lds): \
             build it with `make modules_prepare` or `make modules` too",
            kernel_obj.display()
        );
    }
    let mut make = Command::new("make");
    make.arg("-C")
        .arg(kernel_src)
        .arg(format!("O={}", kernel_obj.display()))
        .arg(format!("M={}", out_dir.display()))
        // As the kernel was built (kernel.rs): without it kbuild appends
        // "+" for the git tree, and the module's version magic would not
        // match the kernel's.
        .arg("LOCALVERSION=");
    // modpost resolves the module's symbols against the kernel's exports:
    // Module.symvers after `make modules`; after only `make bzImage` the
    // same table is vmlinux.symvers (then kbuild warns that Module.symvers
    // is missing, harmlessly: the module needs no other module).
    if !kernel_obj.join("Module.symvers").is_file() {
        let vmlinux = kernel_obj.join("vmlinux.symvers");
        if !vmlinux.is_file() {
            bail!(
                "{} holds no kernel built with CONFIG_MODULES=y \
                 (neither Module.symvers nor vmlinux.symvers)",
                kernel_obj.display()
            );
        }
        make.arg(format!("KBUILD_EXTRA_SYMBOLS={}", vmlinux.display()));
    }
    let src = repo_root().join("guest/linux/edu-driver");
    sync_dir(&src, out_dir)?;

    eprintln!(
        "xtask: building {MODULE}.ko against {}",
        kernel_obj.display()
    );
    run(make.arg("modules"))?;
    let ko = out_dir.join(format!("{MODULE}.ko"));
    if !ko.is_file() {
        bail!("make did not produce {}", ko.display());
    }
    Ok(ko)
}

/// Builds the guest program `package` (a binary of the same name) fully
/// static (the C library linked in, no program interpreter) and copies it
/// to `out_dir/<package>`; returns that path. The build's own directory is
/// target/guest-linux.
pub fn build_static_tool(package: &str, out_dir: &Path) -> Result<PathBuf> {
    let target_dir = repo_root().join("target/guest-linux");
    eprintln!("xtask: building the static {package}");
    run(cargo()
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        // A non-PIE static executable: `file` says "statically linked".
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static",
        )
        .args(["build", "-p", package, "--release", "--target", TOOL_TARGET])
        .arg("--target-dir")
        .arg(&target_dir))?;
    let built = target_dir.join(TOOL_TARGET).join("release").join(package);
    fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let tool = out_dir.join(package);
    fs::copy(&built, &tool)
        .with_context(|| format!("copy {} to {}", built.display(), tool.display()))?;
    Ok(tool)
}

/// Makes `to` hold a copy of every regular file of `from`; files whose
/// contents did not change keep their times, so make rebuilds nothing.
fn sync_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let data = fs::read(&src).with_context(|| format!("read {}", src.display()))?;
        if fs::read(&dst).ok().as_deref() != Some(data.as_slice()) {
            fs::write(&dst, &data).with_context(|| format!("write {}", dst.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_copies_only_changes() {
        let base = std::env::temp_dir().join(format!("xtask-sync-{}", std::process::id()));
        let (from, to) = (base.join("from"), base.join("to"));
        fs::create_dir_all(&from).unwrap();
        fs::write(from.join("a.c"), "one").unwrap();
        sync_dir(&from, &to).unwrap();
        assert_eq!(fs::read_to_string(to.join("a.c")).unwrap(), "one");
        let before = fs::metadata(to.join("a.c")).unwrap().modified().unwrap();
        sync_dir(&from, &to).unwrap();
        let after = fs::metadata(to.join("a.c")).unwrap().modified().unwrap();
        assert_eq!(before, after);
        fs::write(from.join("a.c"), "two").unwrap();
        sync_dir(&from, &to).unwrap();
        assert_eq!(fs::read_to_string(to.join("a.c")).unwrap(), "two");
        fs::remove_dir_all(&base).unwrap();
    }
}
