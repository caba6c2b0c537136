//! Building the workspace and running its checks, the way CI does.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::test_log::TestLog;

/// How long the whole `cargo test` run may take. It takes about ten minutes
/// here; CI allows ninety for everything, and a test that hangs must end as a
/// failure that names it, not as a CI timeout that shows nothing.
const TEST_DEADLINE: Duration = Duration::from_secs(50 * 60);

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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
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

/// Builds what runs a container, in release: the guest (kernel + the agent's
/// initrd), bulkhead-vmm and the `bulkhead` CLI with its shim. The demo and
/// the container benchmarks all start with this.
pub fn build_release_runtime() -> Result<()> {
    crate::guest::build(&guest_dir())?;
    build_vmm(true)?;
    cargo(&["build", "--quiet", "--release", "--package", "bulkhead"])
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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = ["test", "--workspace", "--no-fail-fast"];
    println!(
        "xtask: cargo {} (deadline {} min)",
        args.join(" "),
        TEST_DEADLINE.as_secs() / 60
    );
    let mut child = Command::new(&cargo)
        .args(args)
        .env("BULKHEAD_KERNEL", &guest.kernel)
        .env("BULKHEAD_INITRD", &guest.initrd)
        .env("BULKHEAD_VMM", &vmm)
        .env("BULKHEAD_CLI", &cli)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a deadline kill reaches the test binaries
        // and the emulated hosts they started, not just cargo.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {cargo}"))?;
    let log = TestLog::new();
    let pipes = [
        log.tee(child.stdout.take().context("cargo test's stdout")?, false),
        log.tee(child.stderr.take().context("cargo test's stderr")?, true),
    ];
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for cargo test")? {
            TestLog::drain(&pipes);
            if status.success() {
                return Ok(());
            }
            let (failed, summary) = log.failure_summary();
            println!("{summary}");
            bail!(
                "cargo {} failed ({status}); failed: {}",
                args.join(" "),
                if failed.is_empty() {
                    "see above".to_owned()
                } else {
                    failed.join(", ")
                }
            );
        }
        if start.elapsed() > TEST_DEADLINE {
            // SAFETY: kill(2) on the process group we created; no memory involved.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "cargo test still running after {} min: killed. The test that hung is the one \
                 libtest reported as \"running for over 60 seconds\" above without a result",
                TEST_DEADLINE.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
