//! Where the CLI finds what a sandbox needs: the guest kernel and initrd, the
//! bulkhead-vmm binary and virtiofsd.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The files a sandbox is made from.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initrd (the agent).
    pub initrd: PathBuf,
    /// bulkhead-vmm.
    pub vmm: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
}

impl Artifacts {
    /// Finds each file: an environment variable (BULKHEAD_KERNEL, BULKHEAD_INITRD,
    /// BULKHEAD_VMM, BULKHEAD_VIRTIOFSD) wins; then the installed location
    /// (/usr/share/bulkhead, next to this binary, PATH); then a development
    /// checkout (target/guest beside target/<profile>/bulkhead).
    pub fn discover() -> Result<Artifacts> {
        let exe = std::env::current_exe()?;
        let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        // target/<profile>/bulkhead -> target/guest
        let dev_guest = exe_dir
            .parent()
            .map(|t| t.join("guest"))
            .unwrap_or_default();
        let share = PathBuf::from("/usr/share/bulkhead");
        Ok(Artifacts {
            kernel: find(
                "BULKHEAD_KERNEL",
                "vmlinux",
                &[share.join("vmlinux"), dev_guest.join("vmlinux")],
            )?,
            initrd: find(
                "BULKHEAD_INITRD",
                "initrd.img",
                &[share.join("initrd.img"), dev_guest.join("initrd.img")],
            )?,
            vmm: find(
                "BULKHEAD_VMM",
                "bulkhead-vmm",
                &[exe_dir.join("bulkhead-vmm")]
                    .into_iter()
                    .chain(on_path("bulkhead-vmm"))
                    .collect::<Vec<_>>(),
            )?,
            virtiofsd: find(
                "BULKHEAD_VIRTIOFSD",
                "virtiofsd",
                &on_path("virtiofsd")
                    .into_iter()
                    .chain(cargo_bin("virtiofsd"))
                    .chain([PathBuf::from("/usr/libexec/virtiofsd")])
                    .collect::<Vec<_>>(),
            )?,
        })
    }
}

fn find(var: &str, what: &str, candidates: &[PathBuf]) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{var}={} is not a file", p.display());
        }
        return Ok(p);
    }
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "cannot find {what} (looked in {}); set {var}, or run `cargo xtask setup` and `cargo xtask guest`",
        looked.join(", ")
    )
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn cargo_bin(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin").join(name))
}
