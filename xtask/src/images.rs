//! The embedded default image (`images/busybox`): Debian's busybox-static as
//! an OCI image archive, loaded into the `bulkhead` CLI's store by `cargo
//! xtask setup`, so `bulkhead run busybox echo hello` needs no registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};

use crate::{rootfs, workspace};

/// The name the embedded image is loaded under.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:latest";

/// Writes `target/images/busybox.tar` (rebuilt each time: it takes well under
/// a second, and its digests only change when busybox does).
pub fn busybox_archive() -> Result<PathBuf> {
    let dir = workspace::root().join("target").join("images");
    let rootfs = dir.join("busybox-rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing {}", rootfs.display()))?;
    }
    rootfs::busybox(&rootfs)?;
    let etc = workspace::root().join("images").join("busybox").join("etc");
    for entry in std::fs::read_dir(&etc).with_context(|| format!("reading {}", etc.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), rootfs.join("etc").join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    for d in ["root", "var/www"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    let out = dir.join("busybox.tar");
    write_image_archive(
        &rootfs,
        BUSYBOX_IMAGE,
        &ImageConfig::default(),
        LayerCompression::Gzip,
        &out,
    )
    .context("writing the busybox image archive")?;
    Ok(out)
}

/// `bulkhead load` of the embedded image into the store `cli` uses: under
/// `root` if given, else its config's `state_root`.
pub fn load(cli: &Path, archive: &Path, root: Option<&Path>) -> Result<()> {
    let mut cmd = Command::new(cli);
    if let Some(root) = root {
        cmd.env("BULKHEAD_ROOT", root);
    }
    let status = cmd
        .args(["load", "--input"])
        .arg(archive)
        .status()
        .with_context(|| format!("cannot run {}", cli.display()))?;
    ensure!(
        status.success(),
        "bulkhead load -i {} failed ({status})",
        archive.display()
    );
    Ok(())
}
