//! End-to-end: the Debian package installs into a fresh Debian 12 root and
//! runs there, with nothing from the source tree.
//!
//! On this machine (where the package registries are): a debootstrap'd
//! bookworm minbase root (cached), `apt-get install ./bulkhead_*.deb` in it,
//! which also pulls the declared dependencies from Debian. Then, where KVM can
//! boot the guest (the emulated host here), `bulkhead doctor` and `bulkhead run
//! busybox echo` chrooted into that root, with only the root's own files.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::{cache, kvm, process};
use common::processes_named;
use libtest_mimic::{Failed, Trial};

/// Where the prepared root is handed to the run inside the emulated host
/// (its prefix, `common::E2E_VAR_PREFIX`, has it passed in).
const ROOT_VAR: &str = "BULKHEAD_E2E_PACKAGE_ROOT";
/// The package under test, built by `cargo xtask test` (`cargo xtask package`).
const DEB_VAR: &str = "BULKHEAD_DEB";
/// debootstrap and apt-get, with the network; generous for a slow mirror.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    if kvm::inside_emulated_host() || std::env::var_os(ROOT_VAR).is_some() {
        return common::main("package", trials);
    }
    // Prepared here, where the registries are; removed when the tests end.
    let root = match prepare_root() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("e2e package: cannot install the package into a fresh Debian 12 root: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    std::env::set_var(ROOT_VAR, root.path());
    let code = common::main("package", trials);
    drop(root);
    code
}

fn trials() -> Vec<Trial> {
    vec![
        common::trial("installed_files_are_where_they_belong", installed_files),
        common::trial("doctor_passes_in_the_installed_root", doctor_passes),
        common::trial("busybox_runs_from_the_installed_root", busybox_runs),
    ]
}

/// The root the package was installed into.
fn root() -> Result<PathBuf> {
    std::env::var_os(ROOT_VAR)
        .map(PathBuf::from)
        .context("the fresh root was not prepared")
}

fn installed_files() -> Result<(), Failed> {
    let root = root()?;
    for file in [
        "usr/bin/bulkhead",
        "usr/bin/containerd-shim-bulkhead-v2",
        "usr/bin/bulkhead-runtime",
        "usr/bin/bulkhead-vmm",
        "usr/libexec/bulkhead/virtiofsd",
        "usr/share/bulkhead/vmlinux",
        "usr/share/bulkhead/initrd.img",
        "usr/share/bulkhead/containerd/bulkhead.toml",
        "etc/bulkhead/config.toml",
        "usr/share/man/man1/bulkhead.1.gz",
        "usr/share/man/man1/bulkhead-run.1.gz",
        "usr/share/bash-completion/completions/bulkhead",
        "usr/share/zsh/vendor-completions/_bulkhead",
        "usr/share/fish/vendor_completions.d/bulkhead.fish",
    ] {
        if !root.join(file).is_file() {
            return Err(format!("/{file} is not installed").into());
        }
    }
    let conffiles = std::fs::read_to_string(root.join("var/lib/dpkg/info/bulkhead.conffiles"))?;
    if !conffiles.contains("/etc/bulkhead/config.toml") {
        return Err(format!("the config is not a conffile: {conffiles:?}").into());
    }
    // The postinst loaded the embedded image.
    let images = chroot(&root, &["bulkhead", "images"], Duration::from_secs(60))?;
    if !images.stdout.contains("busybox") {
        return Err(format!("no busybox image after install: {images:?}").into());
    }
    Ok(())
}

fn doctor_passes() -> Result<(), Failed> {
    let root = root()?;
    let out = chroot(&root, &["bulkhead", "doctor"], Duration::from_secs(60))?;
    if out.code != Some(0) {
        return Err(format!("doctor failed: {out:?}").into());
    }
    // Each file found where the package put it, not anywhere else.
    for expected in [
        "/usr/share/bulkhead/vmlinux",
        "/usr/share/bulkhead/initrd.img",
        "/usr/bin/bulkhead-vmm",
        "/usr/libexec/bulkhead/virtiofsd",
    ] {
        if !out.stdout.contains(expected) {
            return Err(format!("doctor does not name {expected}:\n{}", out.stdout).into());
        }
    }
    Ok(())
}

fn busybox_runs() -> Result<(), Failed> {
    let root = root()?;
    let _mounts = run_mounts(&root)?;
    let out = chroot(
        &root,
        &[
            "bulkhead",
            "run",
            "--rm",
            "busybox",
            "echo",
            "hi from the package",
        ],
        RUN_TIMEOUT,
    )?;
    if out.code != Some(0) || out.stdout != "hi from the package\n" {
        return Err(format!("bulkhead run: {out:?}").into());
    }
    let left: Vec<_> = ["bulkhead-vmm", "virtiofsd"]
        .iter()
        .flat_map(|name| processes_named(name))
        .collect();
    let run_root: Vec<_> = std::fs::read_dir(root.join("run/bulkhead"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let run_root: Vec<_> = run_root.into_iter().filter(|n| n != ".templates").collect();
    if !left.is_empty() || !run_root.is_empty() {
        return Err(format!("left behind: processes {left:?}, /run/bulkhead {run_root:?}").into());
    }
    Ok(())
}

/// What a command chrooted into the root gave.
#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in failure messages
struct ChrootRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `argv` chrooted into `root` with a clean environment (nothing of this
/// checkout's: no BULKHEAD_* overrides), /proc, /sys and /dev mounted.
fn chroot(root: &Path, argv: &[&str], timeout: Duration) -> Result<ChrootRun, Failed> {
    let _mounts = system_mounts(root)?;
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .arg("/usr/bin/env")
        .arg("-i")
        .args([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
        ])
        .args(argv);
    let (status, out) = process::run_status(&mut cmd, timeout).map_err(|e| format!("{e:#}"))?;
    Ok(ChrootRun {
        code: status.code(),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// Mounts under a root, unmounted (in reverse) when dropped.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], target: PathBuf) -> Result<(), Failed> {
        std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let status = Command::new("mount")
            .args(args)
            .arg(&target)
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount {args:?} {} failed", target.display()).into());
        }
        self.0.push(target);
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
    }
}

/// The root as a mount point of its own (as `/` is on a machine: virtiofsd's
/// sandbox pivot_roots, which a plain chroot directory refuses with EINVAL),
/// with /proc, /sys, /dev and a /tmp, for one chrooted command.
fn system_mounts(root: &Path) -> Result<Mounts, Failed> {
    let mut m = Mounts(Vec::new());
    let root_str = root.to_str().ok_or("the root's path is not UTF-8")?;
    m.mount(&["--rbind", root_str], root.to_path_buf())?;
    m.mount(&["-t", "proc", "proc"], root.join("proc"))?;
    m.mount(&["--rbind", "/sys"], root.join("sys"))?;
    m.mount(&["--rbind", "/dev"], root.join("dev"))?;
    m.mount(&["-t", "tmpfs", "tmpfs"], root.join("tmp"))?;
    Ok(m)
}

/// What a running container needs of the root: /run as a tmpfs (as on any
/// booted machine), and the store on a tmpfs too, because inside the
/// emulated host the root is an overlay, which cannot be the upper layer of
/// a container's overlay. The store keeps what the package's postinst put
/// there: it is copied onto the tmpfs.
fn run_mounts(root: &Path) -> Result<Mounts, Failed> {
    let mut m = Mounts(Vec::new());
    m.mount(&["-t", "tmpfs", "tmpfs"], root.join("run"))?;
    let store = root.join("var/lib/bulkhead");
    let saved = root.join("run/store-as-installed");
    copy_tree(&store, &saved)?;
    m.mount(&["-t", "tmpfs", "tmpfs"], store.clone())?;
    copy_tree(&saved.join("."), &store)?;
    std::fs::remove_dir_all(&saved).map_err(|e| format!("{}: {e}", saved.display()))?;
    Ok(m)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), Failed> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if !status.success() {
        return Err(format!("cp -a {} {} failed", from.display(), to.display()).into());
    }
    Ok(())
}

/// A fresh Debian 12 root with the package installed, removed when dropped.
struct PreparedRoot(tempfile::TempDir);

impl PreparedRoot {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for PreparedRoot {
    fn drop(&mut self) {
        // Nothing may be mounted in it any more, but be sure before removing.
        for sub in ["tmp", "dev", "sys", "proc"] {
            let _ = Command::new("umount")
                .arg("-R")
                .arg(self.0.path().join(sub))
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn prepare_root() -> Result<PreparedRoot> {
    let deb = std::env::var_os(DEB_VAR).map(PathBuf::from).context(
        "BULKHEAD_DEB is not set: run the tests with `cargo xtask test`, which builds the package",
    )?;
    ensure!(
        deb.is_file(),
        "BULKHEAD_DEB={} is not a file",
        deb.display()
    );
    let base = base_root_tarball()?;
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-e2e-package-")
        .tempdir_in("/var/tmp")?;
    let root = PreparedRoot(dir);
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .arg("-xf")
            .arg(&base),
        Duration::from_secs(120),
    )?;
    // The network settings of this machine, as on any installed one.
    for file in ["etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt"] {
        let _ = std::fs::copy(Path::new("/").join(file), root.path().join(file));
    }
    let deb_in_root = root
        .path()
        .join("tmp")
        .join(deb.file_name().context("deb name")?);
    let started = std::time::Instant::now();
    {
        let _mounts = system_mounts(root.path()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Into the chroot's /tmp (a tmpfs, gone with the mounts).
        std::fs::copy(&deb, &deb_in_root)?;
        let script = format!(
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends /tmp/{}",
            deb_in_root.file_name().unwrap().to_string_lossy()
        );
        run_checked(
            Command::new("chroot")
                .arg(root.path())
                .args(["/usr/bin/env", "DEBIAN_FRONTEND=noninteractive", "sh", "-c"])
                .arg(&script),
            INSTALL_TIMEOUT,
        )?;
    }
    println!(
        "e2e package: {} installed into a fresh Debian 12 root in {:.0} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// A debootstrap'd bookworm minbase root as a tarball, made once per machine
/// (about two minutes) and kept in the cache.
fn base_root_tarball() -> Result<PathBuf> {
    let mirror = debian_mirror()?;
    let key = cache::hash_key(["bookworm", "minbase", mirror.as_str()]);
    let dir = cache::cache_root().join("debian-root").join(&key[..16]);
    let dir = cache::get_or_build(&dir, |tmp| -> Result<()> {
        let root = tmp.join("root");
        println!("e2e package: debootstrap bookworm (minbase) from {mirror}, once per machine");
        run_checked(
            Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(&root)
                .arg(&mirror),
            INSTALL_TIMEOUT,
        )?;
        // Debian's own sources, as an installed system has them.
        let _ = std::fs::remove_file(root.join("etc/apt/sources.list"));
        for file in [
            "etc/apt/sources.list.d/debian.sources",
            "etc/apt/sources.list",
        ] {
            if Path::new("/").join(file).is_file() {
                std::fs::copy(Path::new("/").join(file), root.join(file))?;
            }
        }
        run_checked(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(tmp.join("root.tar"))
                .arg("."),
            Duration::from_secs(300),
        )?;
        std::fs::remove_dir_all(&root)?;
        Ok(())
    })?;
    Ok(dir.join("root.tar"))
}

/// This machine's Debian mirror, from its apt sources.
fn debian_mirror() -> Result<String> {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
        .context("no apt sources on this machine")?;
    sources
        .lines()
        .find_map(|l| {
            l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().next())
            })
        })
        .filter(|uri| !uri.contains("security"))
        .map(|uri| uri.split_whitespace().next().unwrap_or(uri).to_owned())
        .context("no Debian mirror in this machine's apt sources")
}

fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<()> {
    let (status, out) = process::run_status(cmd, timeout)?;
    if !status.success() {
        bail!(
            "{} failed ({status}):\n{}\n{}",
            process::describe(cmd),
            process::tail_lines(&out.stdout, 20),
            process::tail_lines(&out.stderr, 20)
        );
    }
    Ok(())
}
