//! Host packages: install what a step lacks, from Debian's archive as the
//! machine's apt configuration already names it.

use anyhow::{bail, Context, Result};
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Once;

use crate::util::{run, run_output};

/// What `cargo xtask kernel` needs to fetch and build the kernel.
pub const KERNEL_BUILD: &[&str] = &[
    "bc",
    "bison",
    "ccache",
    "cpio",
    "dwarves",
    "flex",
    "gcc",
    "git",
    "libelf-dev",
    "libssl-dev",
    "make",
    "rsync",
    "xz-utils",
];

/// The oldest QEMU that was seen to run nested SVM under TCG here.
const QEMU_MIN_MAJOR: u32 = 10;
const QEMU_PACKAGE: &str = "qemu-system-x86";
const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/kvm-userdev-backports.sources";

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .map(|o| o.status.success() && o.stdout == b"installed")
        .unwrap_or(false)
}

/// The installed version of a Debian package, if it is installed.
pub fn installed_version(package: &str) -> Option<String> {
    if !is_installed(package) {
        return None;
    }
    let out = run_output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package])).ok()?;
    Some(out.trim().to_string())
}

/// `program` run as root: directly when we are root, else through
/// password-less sudo.
fn privileged(program: &str) -> Result<Command> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(Command::new(program));
    }
    let sudo_ok = Command::new("sudo")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !sudo_ok {
        bail!("`{program}` needs root (or password-less sudo)");
    }
    let mut cmd = Command::new("sudo");
    cmd.args(["-n", "--preserve-env=DEBIAN_FRONTEND", program]);
    Ok(cmd)
}

fn apt_get() -> Result<Command> {
    let mut cmd = privileged("apt-get")?;
    // Another xtask (a kernel build beside a QEMU build) may be installing
    // at the same time: wait for its lock rather than fail.
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=600"]);
    Ok(cmd)
}

static APT_UPDATE: Once = Once::new();

fn apt_update(force: bool) -> Result<()> {
    let mut result = Ok(());
    let mut update = || {
        eprintln!("xtask: apt-get update");
        result = apt_get().and_then(|mut c| run(c.args(["-q", "update"]).stdout(io::stderr())));
    };
    if force {
        update();
    } else {
        APT_UPDATE.call_once(update);
    }
    result
}

/// Installs `args` (package names, `name=version` or `-t suite ...`).
pub fn apt_install(args: &[&str]) -> Result<()> {
    apt_update(false)?;
    eprintln!("xtask: apt-get install {}", args.join(" "));
    // Progress goes with xtask's own messages: stdout is for results (such
    // as the path `cargo xtask qemu` prints).
    run(apt_get()?
        .args(["-q", "-y", "--no-install-recommends", "install"])
        .args(args)
        .stdout(io::stderr()))
    .with_context(|| format!("apt-get install {}", args.join(" ")))
}

/// Makes sure every package in `packages` is installed.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn qemu_major(qemu: &Path) -> Option<u32> {
    let out = run_output(Command::new(qemu).arg("--version")).ok()?;
    parse_qemu_major(&out)
}

fn parse_qemu_major(version_output: &str) -> Option<u32> {
    let rest = version_output.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

/// Makes sure a QEMU that can run nested SVM under TCG is installed and
/// returns its path. Debian stable's QEMU may be too old; the backports suite
/// of the machine's own Debian archive has a newer one.
pub fn ensure_qemu() -> Result<&'static Path> {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if qemu_major(qemu).is_some_and(|v| v >= QEMU_MIN_MAJOR) {
        return Ok(qemu);
    }
    let suite = ensure_backports_suite()?;
    apt_install(&["-t", &suite, QEMU_PACKAGE])?;
    match qemu_major(qemu) {
        Some(v) if v >= QEMU_MIN_MAJOR => Ok(qemu),
        Some(v) => bail!(
            "{QEMU_PACKAGE} from {suite} is QEMU {v}; QEMU {QEMU_MIN_MAJOR} or later is needed"
        ),
        None => bail!(
            "{} does not run after installing {QEMU_PACKAGE}",
            qemu.display()
        ),
    }
}

fn os_codename() -> Result<String> {
    let release = std::fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// The apt source files in force: `sources.list` and the enabled files in
/// `sources.list.d` (others, such as `*.disabled`, apt ignores too).
fn apt_sources() -> Vec<(String, String)> {
    let mut files = vec![];
    let mut paths = vec![std::path::PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        paths.extend(more);
    }
    for path in paths {
        let name = path.to_string_lossy().into_owned();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&path) {
            files.push((name, text));
        }
    }
    files
}

/// Adds `<codename>-backports` beside the machine's own Debian archive unless
/// apt already knows it, and returns the suite name.
fn ensure_backports_suite() -> Result<String> {
    let codename = os_codename()?;
    let suite = format!("{codename}-backports");
    let sources = apt_sources();
    match backports_source(&codename, &sources) {
        Backports::Configured => {}
        Backports::Add(stanza) => {
            eprintln!("xtask: adding {suite} to apt's sources ({BACKPORTS_FILE})");
            let tmp = std::env::temp_dir().join("kvm-userdev-backports.sources");
            std::fs::write(&tmp, stanza)?;
            run(privileged("install")?
                .args(["-m", "0644"])
                .arg(&tmp)
                .arg(BACKPORTS_FILE))?;
            apt_update(true)?;
        }
        Backports::NoArchive => bail!(
            "no apt source for Debian {codename} found to derive {suite} from; \
             add {suite} to apt's sources and rerun"
        ),
    }
    Ok(suite)
}

#[derive(Debug, PartialEq, Eq)]
enum Backports {
    Configured,
    /// The deb822 stanza to add.
    Add(String),
    NoArchive,
}

/// One apt source entry, from either format.
#[derive(Debug)]
struct Entry {
    uris: String,
    suites: Vec<String>,
    components: String,
    signed_by: Option<String>,
}

fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut entries = vec![];
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = vec![];
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push('\n');
                    v.push_str(line);
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        let enabled = get("enabled").is_none_or(|v| v != "no");
        let is_deb = get("types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if let (true, true, Some(uris), Some(suites)) =
            (enabled, is_deb, get("uris"), get("suites"))
        {
            entries.push(Entry {
                uris,
                suites: suites.split_whitespace().map(String::from).collect(),
                components: get("components").unwrap_or_else(|| "main".into()),
                signed_by: get("signed-by"),
            });
        }
    }
    entries
}

fn parse_one_line(text: &str) -> Vec<Entry> {
    let mut entries = vec![];
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(String::from);
            rest = after.trim();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        entries.push(Entry {
            uris: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.collect::<Vec<_>>().join(" "),
            signed_by,
        });
    }
    entries
}

fn parse_sources(files: &[(String, String)]) -> Vec<Entry> {
    files
        .iter()
        .flat_map(|(name, text)| {
            if name.ends_with(".sources") {
                parse_deb822(text)
            } else {
                parse_one_line(text)
            }
        })
        .collect()
}

/// The machine's own Debian archive: where apt gets the release's suite
/// from, and the keyring that its signatures are checked with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    pub uris: String,
    pub components: String,
    pub signed_by: Option<String>,
}

impl Archive {
    /// A deb822 stanza for other suites of the same archive, trusted
    /// through the same keyring.
    pub fn stanza(&self, types: &str, suites: &str, components: &str) -> String {
        let mut stanza = format!(
            "Types: {types}\nURIs: {}\nSuites: {suites}\nComponents: {components}\n",
            self.uris
        );
        if let Some(key) = &self.signed_by {
            stanza.push_str(&format!("Signed-By: {key}\n"));
        }
        stanza
    }
}

/// The archive entry for the release `codename` among apt source `files`
/// (path, content).
pub fn archive_in(codename: &str, files: &[(String, String)]) -> Option<Archive> {
    parse_sources(files)
        .into_iter()
        .find(|e| e.suites.iter().any(|s| s == codename))
        .map(|e| Archive {
            uris: e.uris,
            components: e.components,
            signed_by: e.signed_by,
        })
}

/// The machine's Debian archive, from the apt configuration in force.
pub fn debian_archive() -> Result<Archive> {
    let codename = os_codename()?;
    archive_in(&codename, &apt_sources()).with_context(|| {
        format!("no apt source for Debian {codename} found in /etc/apt/sources.list{{,.d}}")
    })
}

fn backports_source(codename: &str, files: &[(String, String)]) -> Backports {
    let suite = format!("{codename}-backports");
    if parse_sources(files)
        .iter()
        .any(|e| e.suites.contains(&suite))
    {
        return Backports::Configured;
    }
    let Some(base) = archive_in(codename, files) else {
        return Backports::NoArchive;
    };
    Backports::Add(format!(
        "# Added by kvm-userdev's xtask beside the Debian archive apt already uses.\n{}",
        base.stanza("deb", &suite, &base.components)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n\
        # a comment\n\
        URIs: http://archive.invalid/debian\n\
        Suites: bookworm bookworm-updates\n\
        Components: main\n\
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
        \n\
        Types: deb\n\
        URIs: http://security.invalid/debian-security\n\
        Suites: bookworm-security\n\
        Components: main\n";

    #[test]
    fn backports_derived_from_deb822_archive() {
        let files = vec![(
            "/etc/apt/sources.list.d/debian.sources".into(),
            DEB822.into(),
        )];
        let Backports::Add(stanza) = backports_source("bookworm", &files) else {
            panic!("expected a stanza");
        };
        assert!(stanza.contains("URIs: http://archive.invalid/debian\n"));
        assert!(stanza.contains("Suites: bookworm-backports\n"));
        assert!(stanza.contains("Components: main\n"));
        assert!(stanza.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"));
    }

    #[test]
    fn backports_derived_from_one_line_archive() {
        let files = vec![(
            "/etc/apt/sources.list".into(),
            "deb [arch=amd64 signed-by=/k.gpg] http://archive.invalid/debian bookworm main contrib\n"
                .into(),
        )];
        let Backports::Add(stanza) = backports_source("bookworm", &files) else {
            panic!("expected a stanza");
        };
        assert!(stanza.contains("URIs: http://archive.invalid/debian\n"));
        assert!(stanza.contains("Components: main contrib\n"));
        assert!(stanza.contains("Signed-By: /k.gpg\n"));
    }

    #[test]
    fn backports_already_configured_or_underivable() {
        let with = format!(
            "{DEB822}\nTypes: deb\nURIs: http://a.invalid/debian\nSuites: bookworm-backports\n"
        );
        let files = vec![("x.sources".to_string(), with)];
        assert_eq!(backports_source("bookworm", &files), Backports::Configured);
        let files = vec![("x.sources".to_string(), DEB822.to_string())];
        assert_eq!(backports_source("trixie", &files), Backports::NoArchive);
        let disabled = DEB822.replace("Types: deb\n#", "Types: deb\nEnabled: no\n#");
        let files = vec![("x.sources".to_string(), disabled)];
        assert_eq!(backports_source("bookworm", &files), Backports::NoArchive);
    }

    #[test]
    fn qemu_version_parsed() {
        let out = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n";
        assert_eq!(parse_qemu_major(out), Some(10));
        assert_eq!(parse_qemu_major("garbage"), None);
    }
}
