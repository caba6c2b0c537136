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
    cargo_with(args, &[])
}

/// Runs `cargo ARGS` in the workspace with `env` set, failing if it fails.
fn cargo_with(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .envs(env.iter().copied())
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

/// Builds the debug `bulkhead-vmm` (what the end-to-end tests boot) and returns
/// its path.
pub fn build_debug_vmm() -> Result<PathBuf> {
    cargo(&["build", "--quiet", "--package", "bulkhead-vmm"])?;
    Ok(root().join("target").join("debug").join("bulkhead-vmm"))
}

/// The only platform this builds for (host and guest): x86-64 Linux with
/// glibc. Naming it lets cargo keep the static builds' RUSTFLAGS away from
/// build scripts and proc-macros, which must stay ordinary host code.
pub const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Where `build_release_runtime` puts `bulkhead`, `bulkhead-runtime`,
/// `containerd-shim-bulkhead-v2` and `bulkhead-vmm`, side by side (the CLI and the shim look for the VMM
/// next to themselves).
pub fn release_bin_dir() -> PathBuf {
    root()
        .join("target")
        .join("static")
        .join(HOST_TRIPLE)
        .join("release")
}

/// Builds what runs a container, in release: the guest (kernel + the agent's
/// initrd), bulkhead-vmm and the `bulkhead` CLI with its shim. The demo and
/// the container benchmarks all start with this.
pub fn build_release_runtime() -> Result<()> {
    crate::guest::build(&guest_dir())?;
    build_release_binaries()
}

/// Builds the host binaries statically linked, into `release_bin_dir()`.
///
/// - `bulkhead`, `bulkhead-runtime` and `containerd-shim-bulkhead-v2` are static and not
///   position-independent, like runc and containerd's own shims: a sandbox
///   start execs the CLI or the shim, and a dynamic PIE spends its first
///   milliseconds in the loader and on tens of thousands of relocations. Under
///   emulation it is far worse: QEMU 7.2 caches translated code by virtual
///   address too, so a binary at a new random address each run is translated
///   anew each run. With all three binaries dynamic PIE, a sandbox start
///   took about 940 ms in the emulated host; built like this, 550-750 ms.
/// - `bulkhead-vmm` is static-pie: no loader, but it keeps address
///   randomisation, because it is the process that parses what the guest
///   writes.
///
/// The static glibc still loads the NSS modules of the host's glibc for name
/// lookups (registries), so build these on the kind of host they run on.
pub fn build_release_binaries() -> Result<()> {
    let dir = root().join("target").join("static");
    let dir = dir.to_string_lossy();
    let build = |verb: &str, rest: &[&str]| {
        let mut args = vec![verb, "--quiet", "--release", "--target", HOST_TRIPLE];
        args.extend(["--target-dir", &dir]);
        args.extend_from_slice(rest);
        cargo_with(&args, &[("RUSTFLAGS", "-C target-feature=+crt-static")])
    };
    // Everything is compiled position-independent (the static-pie VMM needs
    // it); the CLI's and the shim's own crates are then linked non-PIE, which
    // position-independent libraries allow. One `cargo rustc` per binary keeps
    // each invocation's fingerprint stable, so a rebuild with nothing changed
    // compiles nothing.
    build("build", &["--package", "bulkhead-vmm"])?;
    for bin in [
        "bulkhead",
        "bulkhead-runtime",
        "containerd-shim-bulkhead-v2",
    ] {
        let non_pie = ["--", "-C", "relocation-model=static"];
        build(
            "rustc",
            &[&["--package", "bulkhead", "--bin", bin], &non_pie[..]].concat(),
        )?;
    }
    Ok(())
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
    let vmm = build_debug_vmm()?;
    cargo(&["build", "--quiet", "--package", "bulkhead"])?;
    let cli = root().join("target").join("debug").join("bulkhead");
    // The package e2e test installs exactly what a user would.
    let deb = crate::package::build()?;
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
        .env("BULKHEAD_DEB", &deb)
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
                return crate::agent_tests::run();
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
