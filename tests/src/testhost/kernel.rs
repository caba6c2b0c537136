//! Debian's generic kernel and the modules the emulated host needs.
//!
//! The emulated host boots Debian's `linux-image-*-amd64` (the cloud flavour lacks
//! 9p). This fetches the package with apt, unpacks it, resolves the modules' load
//! order with `depmod`/`modprobe --show-depends`, and caches the kernel image plus
//! just those modules (decompressed) under [`crate::cache::cache_root`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cache;
use crate::error::{Error, IoContext, Result};
use crate::process;

/// The Debian metapackage that depends on the current generic kernel.
const META_PACKAGE: &str = "linux-image-amd64";

/// Modules the emulated host loads, by modprobe name; their dependencies are added.
///
/// virtio-mmio + 9p carry the root file system, overlay makes it writable, kvm-amd
/// gives the nested `/dev/kvm`, tun and fuse are for the tests' own use. The rest
/// is what sandbox networking uses on a host: CNI's bridge and veth, tc's ingress
/// qdisc, u32 filter and mirred redirect (the tap joined to the interface), and
/// the netfilter pieces that iptables-nft needs for CNI's masquerade, portmap and
/// firewall plugins, and bridge connection tracking for egress policies.
pub const MODULES: &[&str] = &[
    "virtio_mmio",
    "9pnet_virtio",
    "9p",
    "overlay",
    "kvm_amd",
    "tun",
    "fuse",
    "bridge",
    "veth",
    "sch_ingress",
    "cls_u32",
    "act_mirred",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_fib_inet",
    "nft_reject_inet",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_addrtype",
    "xt_conntrack",
    "xt_comment",
    "xt_multiport",
    "xt_mark",
    "xt_tcpudp",
    // Egress policies: nftables' bridge family with connection tracking.
    "nf_conntrack_bridge",
    "nft_meta_bridge",
];

/// Bumped whenever the layout of a cached kernel entry changes.
const LAYOUT_VERSION: &str = "kernel-v1";

/// Name of the file in a kernel entry listing module file names in load order.
const LOAD_ORDER_FILE: &str = "load-order";

/// A kernel and its modules, unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The Debian package it came from, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// The package version, e.g. `6.1.192-2`.
    pub version: String,
    /// The bzImage to boot.
    pub vmlinuz: PathBuf,
    /// Uncompressed `.ko` files in the order they must be loaded.
    pub modules: Vec<PathBuf>,
}

/// Return the cached kernel, fetching and unpacking it first if needed.
pub fn ensure() -> Result<Kernel> {
    let (package, version) = kernel_package()?;
    let version = match version {
        Some(version) => version,
        None => candidate_version(&package)?,
    };
    let key = cache::hash_key([LAYOUT_VERSION, &MODULES.join(",")]);
    let name = format!("{}_{}-{}", package, sanitize(&version), &key[..12]);
    let dir = cache::cache_root()
        .join("testhost")
        .join("kernel")
        .join(name);
    let dir = cache::get_or_build(&dir, |tmp| build_entry(&package, &version, tmp))?;
    load_entry(&dir, package, version)
}

/// Read a finished cache entry.
fn load_entry(dir: &Path, package: String, version: String) -> Result<Kernel> {
    let order_path = dir.join(LOAD_ORDER_FILE);
    let order = std::fs::read_to_string(&order_path).at("reading", &order_path)?;
    let modules = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|name| dir.join("modules").join(name))
        .collect();
    Ok(Kernel {
        package,
        version,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    })
}

/// Fill the cache entry `out`: download, unpack, resolve and copy.
fn build_entry(package: &str, version: &str, out: &Path) -> Result<()> {
    // Unpack on the cache's file system (not a possibly small /tmp), beside `out`.
    let parent = out.parent().unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .at("creating temporary directory in", parent)?;
    eprintln!("bulkhead-tests: fetching {package}={version} for the emulated host");
    process::run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{package}={version}"))
            .current_dir(work.path()),
        Duration::from_secs(600),
    )?;
    let deb = find_deb(work.path())?;
    let root = work.path().join("root");
    process::run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        Duration::from_secs(600),
    )?;

    let release = kernel_release(&root)?;
    // Merged-/usr packages ship usr/lib/modules; depmod -b looks in lib/modules.
    if !root.join("lib/modules").is_dir() && root.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))
            .at("symlinking", root.join("lib"))?;
    }
    process::run(
        Command::new(tool("depmod"))
            .arg("-b")
            .arg(&root)
            .arg(&release),
        Duration::from_secs(300),
    )?;

    let mut ordered: Vec<PathBuf> = Vec::new();
    for module in MODULES {
        let mut cmd = Command::new(tool("modprobe"));
        cmd.arg("-d")
            .arg(&root)
            .args(["-S", &release, "--show-depends", module]);
        let (status, output) = process::run_status(&mut cmd, Duration::from_secs(60))?;
        let paths = parse_show_depends(&output.stdout);
        if !status.success() || paths.is_empty() && !output.stdout.contains("builtin") {
            return Err(Error::ModuleMissing {
                module: module.to_string(),
                tree: root.clone(),
                command: process::describe(&cmd),
                detail: process::tail_lines(&output.stderr, 5),
            });
        }
        for path in paths {
            if !ordered.contains(&path) {
                ordered.push(path);
            }
        }
    }

    let modules_dir = out.join("modules");
    std::fs::create_dir(&modules_dir).at("creating directory", &modules_dir)?;
    let mut order = String::new();
    for path in &ordered {
        let name = copy_module(path, &modules_dir)?;
        order.push_str(&name);
        order.push('\n');
    }
    let order_path = out.join(LOAD_ORDER_FILE);
    std::fs::write(&order_path, order).at("writing", &order_path)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    std::fs::copy(&vmlinuz, out.join("vmlinuz")).at("copying", &vmlinuz)?;
    Ok(())
}

/// Copy one module into `dir`, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz`.
///
/// Decompressing on the host means the guest's busybox `insmod` never has to
/// support a compression format (Debian 12's kernel ships plain `.ko`; later
/// releases compress them).
fn copy_module(path: &Path, dir: &Path) -> Result<String> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Each decompressor, given `-d`, replaces `x.ko.EXT` with `x.ko` in place.
    let (name, decompress): (String, Option<&[&str]>) = match file_name.rsplit_once(".ko.") {
        Some((stem, "xz")) => (format!("{stem}.ko"), Some(&["xz", "-d", "-f"])),
        Some((stem, "zst")) => (
            format!("{stem}.ko"),
            Some(&["zstd", "-q", "-d", "-f", "--rm"]),
        ),
        Some((stem, "gz")) => (format!("{stem}.ko"), Some(&["gzip", "-d", "-f"])),
        _ => (file_name.clone(), None),
    };
    let copied = dir.join(&file_name);
    std::fs::copy(path, &copied).at("copying", path)?;
    if let Some([program, args @ ..]) = decompress {
        process::run(
            Command::new(program).args(args).arg(&copied),
            Duration::from_secs(120),
        )?;
    }
    Ok(name)
}

/// The `linux-image-<release>-amd64` package that `linux-image-amd64` depends on,
/// with its version when the dependency pins it; runs `apt-get update` once if apt
/// knows no such package yet.
fn kernel_package() -> Result<(String, Option<String>)> {
    let query = || -> Result<Option<(String, Option<String>)>> {
        let mut cmd = Command::new("apt-cache");
        cmd.args(["show", "--no-all-versions", META_PACKAGE]);
        // apt-cache exits non-zero when it knows no such package: treat as "none".
        let (_, out) = process::run_status(&mut cmd, Duration::from_secs(120))?;
        Ok(parse_kernel_dependency(&out.stdout))
    };
    if let Some(found) = query()? {
        return Ok(found);
    }
    eprintln!("bulkhead-tests: apt knows no {META_PACKAGE}; running apt-get update");
    process::run(
        Command::new("apt-get").args(["update", "-q"]),
        Duration::from_secs(600),
    )?;
    query()?.ok_or_else(|| Error::UnexpectedOutput {
        command: format!("apt-cache show --no-all-versions {META_PACKAGE}"),
        detail: "no linux-image-*-amd64 dependency, even after apt-get update".into(),
    })
}

/// The version apt would install of `package`.
fn candidate_version(package: &str) -> Result<String> {
    let mut cmd = Command::new("apt-cache");
    cmd.args(["show", "--no-all-versions", package]);
    let out = process::run(&mut cmd, Duration::from_secs(120))?;
    parse_version(&out.stdout).ok_or_else(|| Error::UnexpectedOutput {
        command: process::describe(&cmd),
        detail: "no `Version:` field".into(),
    })
}

/// From the `Depends:` field of `apt-cache show linux-image-amd64`, the first
/// dependency named `linux-image-<digit...>-amd64`, and its version if pinned with
/// `(= version)`.
pub fn parse_kernel_dependency(text: &str) -> Option<(String, Option<String>)> {
    let depends = text.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends.split([',', '|']).find_map(|dep| {
        let dep = dep.trim();
        let (name, constraint) = match dep.split_once('(') {
            Some((name, rest)) => (name.trim(), Some(rest.trim_end_matches(')').trim())),
            None => (dep, None),
        };
        let inner = name.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
        if !inner.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let version = constraint
            .and_then(|c| c.strip_prefix('='))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        Some((name.to_string(), version))
    })
}

/// The `Version:` field of an `apt-cache show` record.
pub fn parse_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Module paths, in load order, from `modprobe --show-depends` output
/// (`insmod /path/x.ko [params]` lines; `builtin x` lines need no loading).
pub fn parse_show_depends(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("insmod "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(PathBuf::from)
        .collect()
}

/// The kernel release (`6.1.0-56-amd64`) of an unpacked image package.
fn kernel_release(root: &Path) -> Result<String> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot).at("listing", &boot)?;
    for entry in entries {
        let entry = entry.at("listing", &boot)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok(release.to_string());
        }
    }
    Err(Error::UnexpectedOutput {
        command: "dpkg-deb -x".into(),
        detail: format!("no vmlinuz-* in {}", boot.display()),
    })
}

/// The single `.deb` that `apt-get download` left in `dir`.
fn find_deb(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).at("listing", dir)?;
    for entry in entries {
        let path = entry.at("listing", dir)?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            return Ok(path);
        }
    }
    Err(Error::UnexpectedOutput {
        command: "apt-get download".into(),
        detail: format!("no .deb file in {}", dir.display()),
    })
}

/// Find an admin tool that may be outside a non-root `PATH` (`/usr/sbin`, `/sbin`).
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    PathBuf::from(name)
}

/// Make a version string safe as a directory name (`1:2.3` -> `1_2.3`).
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kernel_dependency() {
        let text = "Package: linux-image-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            parse_kernel_dependency(text),
            Some((
                "linux-image-6.1.0-56-amd64".to_string(),
                Some("6.1.192-2".to_string())
            ))
        );
        let alt = "Depends: initramfs-tools | linux-initramfs-tool, linux-image-6.12.9-amd64\n";
        assert_eq!(
            parse_kernel_dependency(alt),
            Some(("linux-image-6.12.9-amd64".to_string(), None))
        );
        assert_eq!(parse_kernel_dependency(""), None);
        assert_eq!(
            parse_kernel_dependency("Depends: linux-image-amd64-signed-template\n"),
            None
        );
    }

    #[test]
    fn finds_version() {
        let text = "Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nArchitecture: amd64\n";
        assert_eq!(parse_version(text).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_version("Package: x\n"), None);
    }

    #[test]
    fn parses_show_depends() {
        let text = "insmod /r/lib/modules/6.1/kernel/virt/lib/irqbypass.ko \n\
                    builtin crc32c\n\
                    insmod /r/lib/modules/6.1/kernel/arch/x86/kvm/kvm.ko.xz nx_huge_pages=0\n";
        assert_eq!(
            parse_show_depends(text),
            [
                PathBuf::from("/r/lib/modules/6.1/kernel/virt/lib/irqbypass.ko"),
                PathBuf::from("/r/lib/modules/6.1/kernel/arch/x86/kvm/kvm.ko.xz"),
            ]
        );
    }

    #[test]
    fn sanitizes_versions() {
        assert_eq!(sanitize("1:6.1.192-2+b1"), "1_6.1.192-2+b1");
    }

    #[test]
    fn decompresses_xz_modules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("m.ko");
        std::fs::write(&plain, b"module bytes").expect("write");
        let status = Command::new("xz").arg("-k").arg(&plain).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("xz not available; skipping");
            return;
        }
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        let name = copy_module(&dir.path().join("m.ko.xz"), &out).expect("copy");
        assert_eq!(name, "m.ko");
        assert_eq!(
            std::fs::read(out.join("m.ko")).expect("read"),
            b"module bytes"
        );
    }
}
