//! `cargo xtask setup`: install what bulkhead needs on a Debian 12 machine.
//!
//! Idempotent and quick when everything is there: it asks dpkg which packages are
//! installed and only runs `apt-get` for the missing ones, then installs the Rust
//! `virtiofsd` with cargo if it is not found.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Debian 12 packages bulkhead's build, tests and demo use, with why:
/// each one was checked to exist in bookworm (`apt-cache policy`).
pub const PACKAGES: &[&str] = &[
    // The reference VMM and the emulated KVM host for end-to-end tests.
    "qemu-system-x86",
    // initramfs of the emulated host: busybox, modprobe/depmod, cpio.
    "busybox-static",
    "kmod",
    "cpio",
    // The guest kernel source and its build dependencies.
    "linux-source-6.12",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "make",
    "gcc",
    // Needed to build virtiofsd.
    "libcap-ng-dev",
    "libseccomp-dev",
    "pkg-config",
    // containerd integration, reference runtime, OCI images and a local registry.
    "containerd",
    "runc",
    "umoci",
    "docker-registry",
    "skopeo",
    // CNI plugins (/usr/lib/cni): `bulkhead run`'s networks and the pods of the
    // tests' private containerd; portmap and the networks' host rules use iptables.
    "containernetworking-plugins",
    "iptables",
    // Egress policies (`bulkhead run --egress`) are nftables rules.
    "nftables",
    // `bulkhead-runtime`'s end-to-end tests run real engines through it:
    // podman (it brings conmon and crun), Docker 20.10 and buildah.
    "podman",
    "docker.io",
    "buildah",
    // `cargo xtask package` (dpkg-deb is in every Debian) and its end-to-end
    // test, which installs the package into a fresh Debian 12 root.
    "debootstrap",
];

/// Options of `cargo xtask setup`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Options {
    /// Only print what would be installed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Installs the missing Debian packages and `virtiofsd`, printing one line per step.
///
/// Exists so that a fresh Debian 12 machine gets everything the project needs with
/// one command, and a ready one is confirmed in well under a second.
/// Installing packages needs root; without it this fails naming what is missing.
pub fn run(opts: &Options) -> Result<()> {
    check_os();
    let missing = missing_packages(PACKAGES)?;
    if missing.is_empty() {
        println!("setup: apt: all {} packages installed", PACKAGES.len());
    } else {
        println!(
            "setup: apt: {} of {} packages missing: {}",
            missing.len(),
            PACKAGES.len(),
            missing.join(" ")
        );
        install_packages(&missing, opts.dry_run)?;
    }
    install_virtiofsd(opts.dry_run)?;
    allow_shmem_huge_pages(opts.dry_run);
    Ok(())
}

/// Where the kernel says whether shmem (memfd) mappings may use transparent huge pages.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Lets bulkhead-vmm's memfd guest RAM use transparent huge pages
/// (`shmem_enabled` from `never`, Debian's default, to `advise`: only mappings
/// that ask get them). Boots are about 20 % faster with it. Not persistent across
/// reboots; a failure is a warning, not an error, since VMs work without it.
fn allow_shmem_huge_pages(dry_run: bool) {
    let Ok(current) = std::fs::read_to_string(SHMEM_THP) else {
        println!("setup: huge pages: {SHMEM_THP} not found; guest RAM uses 4 KiB pages");
        return;
    };
    if !current.contains("[never]") {
        println!(
            "setup: huge pages: shmem THP already allowed ({})",
            current.trim()
        );
        return;
    }
    if dry_run {
        println!("setup: huge pages: would write advise to {SHMEM_THP}");
        return;
    }
    match std::fs::write(SHMEM_THP, "advise") {
        Ok(()) => println!("setup: huge pages: shmem THP set to advise (faster guest boots)"),
        Err(e) => {
            println!("setup: huge pages: cannot write {SHMEM_THP} ({e}); boots will be slower")
        }
    }
}

/// Warns (does not fail) when the machine is not Debian 12, whose package names
/// this list is written for.
fn check_os() {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = text
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"'))
        .unwrap_or("unknown");
    if codename != "bookworm" {
        println!("setup: note: written for Debian 12 (bookworm); this system is {codename:?}");
    }
}

/// The packages of `wanted` that dpkg does not report as installed.
fn missing_packages(wanted: &[&str]) -> Result<Vec<String>> {
    // One dpkg-query for all packages. It exits 1 when some package is unknown to
    // dpkg (never installed), while still printing the known ones: so the exit
    // status is ignored and the output decides.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package}\t${Status}\n")
        .args(wanted)
        .output()
        .context("cannot run dpkg-query (setup supports Debian 12 only)")?;
    let installed = parse_installed(&String::from_utf8_lossy(&out.stdout));
    Ok(wanted
        .iter()
        .filter(|p| !installed.contains(**p))
        .map(|p| p.to_string())
        .collect())
}

/// Names whose dpkg status is `<want> ok installed` (e.g. `install ok installed`,
/// `hold ok installed`), from `dpkg-query -f='${Package}\t${Status}\n'` output.
fn parse_installed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, status)| {
            let words: Vec<&str> = status.split_whitespace().collect();
            words.len() == 3 && words[1] == "ok" && words[2] == "installed"
        })
        .map(|(name, _)| name.split(':').next().unwrap_or(name).to_string())
        .collect()
}

/// The effective user id, from /proc/self/status (no libc needed).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

fn logs_dir() -> Result<PathBuf> {
    let dir = bulkhead_tests::cache::cache_root().join("logs");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn apt_get(args: &[&str], missing: &[String]) -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args(args)
        .args(missing);
    c
}

fn install_packages(missing: &[String], dry_run: bool) -> Result<()> {
    let update = apt_get(&["update"], &[]);
    let install = apt_get(&["install", "-y", "--no-install-recommends"], missing);
    if dry_run {
        println!("setup: would run: {}", cmd::describe(&update));
        println!("setup: would run: {}", cmd::describe(&install));
        return Ok(());
    }
    if effective_uid() != Some(0) {
        bail!(
            "installing packages needs root; missing: {}\n\
             run `sudo -E cargo xtask setup`, or install them yourself:\n  \
             sudo apt-get install --no-install-recommends {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    let log = logs_dir()?.join("setup-apt.log");
    for mut c in [update, install] {
        let start = Instant::now();
        println!("setup: {}", cmd::describe(&c));
        cmd::run_logged(&mut c, &log, "setup: apt-get", Duration::from_secs(30))?;
        println!("setup: done in {} s", start.elapsed().as_secs());
    }
    let still = missing_packages(PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt-get finished but these are still not installed: {} (log {})",
            still.join(" "),
            log.display()
        );
    }
    Ok(())
}

/// Where an existing `virtiofsd` is: on PATH, else in cargo's bin folder.
/// The installed virtiofsd: on `PATH`, else in cargo's bin folder.
pub fn find_virtiofsd() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(cargo_bin_dir());
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| is_executable(p))
}

/// `$CARGO_HOME/bin`, else `$HOME/.cargo/bin`: where `cargo install` puts binaries.
fn cargo_bin_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    nonempty("CARGO_HOME")
        .map(|h| PathBuf::from(h).join("bin"))
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn install_virtiofsd(dry_run: bool) -> Result<()> {
    if let Some(path) = find_virtiofsd() {
        println!("setup: virtiofsd: {}", path.display());
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.args(["install", "virtiofsd", "--locked"])
        // Outside the repo, so that its .cargo/config.toml (rustflags, target)
        // does not apply to a third-party tool.
        .current_dir(std::env::temp_dir());
    if dry_run {
        println!("setup: would run: cargo install virtiofsd --locked");
        return Ok(());
    }
    println!(
        "setup: cargo install virtiofsd --locked: builds the vhost-user file server \
         from crates.io into cargo's bin folder (a few minutes)"
    );
    let log = logs_dir()?.join("setup-virtiofsd.log");
    let start = Instant::now();
    cmd::run_logged(&mut c, &log, "setup: virtiofsd", Duration::from_secs(30))?;
    let found = find_virtiofsd()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "cargo's bin folder (not on PATH)".into());
    println!(
        "setup: virtiofsd installed in {} s: {found}",
        start.elapsed().as_secs()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dpkg_status() {
        let out = "qemu-system-x86\tinstall ok installed\n\
                   containerd\tdeinstall ok config-files\n\
                   runc\tunknown ok not-installed\n\
                   libssl-dev:amd64\thold ok installed\n";
        let got = parse_installed(out);
        assert!(got.contains("qemu-system-x86"));
        assert!(got.contains("libssl-dev"));
        assert!(!got.contains("containerd"));
        assert!(!got.contains("runc"));
    }

    #[test]
    fn package_list_has_no_duplicates() {
        let set: BTreeSet<_> = PACKAGES.iter().collect();
        assert_eq!(set.len(), PACKAGES.len());
    }

    #[test]
    fn effective_uid_is_readable() {
        assert!(effective_uid().is_some());
    }
}
