//! Building the workspace and running its checks, the way CI does.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// The workspace root: xtask lives in `<root>/xtask`.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where built guest artifacts (vmlinux, initrds) are placed for use.
pub fn guest_dir() -> PathBuf {
    root().join("target").join("guest")
}

/// Runs `cargo ARGS` in the workspace, failing if it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// Runs `cargo ARGS` in the workspace with extra environment variables.
pub fn cargo_with_env(args: &[&str], envs: &[(&str, &std::path::Path)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// Builds `bulkhead-vmm` in `profile` ("debug" or "release") and returns its path.
pub fn build_vmm(release: bool) -> Result<PathBuf> {
    let mut args = vec!["build", "--quiet", "--package", "bulkhead-vmm"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    Ok(vmm_path(release))
}

/// Where cargo puts `bulkhead-vmm` for that profile.
pub fn vmm_path(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    root().join("target").join(profile).join("bulkhead-vmm")
}

/// `cargo xtask test`: format and lint checks, then every unit and end-to-end
/// test, with the guest kernel built (or taken from the cache) first.
pub fn test() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    let guest = crate::guest::build(&guest_dir())?;
    let vmm = build_vmm(false)?;
    cargo(&["build", "--quiet", "--package", "bulkhead"])?;
    let cli = root().join("target").join("debug").join("bulkhead");
    // The end-to-end tests boot exactly these.
    cargo_with_env(
        &["test", "--workspace", "--no-fail-fast"],
        &[
            ("BULKHEAD_KERNEL", &guest.kernel),
            ("BULKHEAD_INITRD", &guest.initrd),
            ("BULKHEAD_VMM", &vmm),
            ("BULKHEAD_CLI", &cli),
        ],
    )
}
