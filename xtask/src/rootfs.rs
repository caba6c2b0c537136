//! A small container root file system from Debian's busybox-static, for the
//! demo and the benchmarks (no image registry needed).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Makes a busybox root file system at `dir` (static busybox and a symlink per
/// applet), unless one is there already.
pub fn busybox(dir: &Path) -> Result<()> {
    if dir.join("bin/busybox").exists() {
        return Ok(());
    }
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(())
}
