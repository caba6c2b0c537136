//! The agent's container tests (agent/tests: namespaces, cgroup v2 limits
//! and OOM, seccomp, ptys) need root and a cgroup v2 hierarchy with the
//! memory controller, as in the guest. `cargo test` skips them loudly where
//! those are missing (these machines' hosts are cgroup v1), so `cargo xtask
//! test` runs them again where they can run: here when this machine has
//! them, otherwise inside the emulated host. There a skip is a failure
//! (`BULKHEAD_AGENT_TESTS_REQUIRED`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bulkhead_tests::testhost::TestHost;

const REQUIRED: &str = "BULKHEAD_AGENT_TESTS_REQUIRED";

/// Runs every integration test binary of bulkhead-agent where it can run.
pub fn run() -> Result<()> {
    let exes = executables()?;
    if exes.is_empty() {
        bail!("cargo found no test binaries of bulkhead-agent");
    }
    let names: Vec<String> = exes.iter().map(|e| e.display().to_string()).collect();
    if runs_here() {
        println!("xtask: agent container tests: running on this machine (root, cgroup v2)");
        for exe in &exes {
            let status = Command::new(exe)
                .arg("--test-threads=1")
                .env(REQUIRED, "1")
                .status()
                .with_context(|| format!("running {}", exe.display()))?;
            if !status.success() {
                bail!("agent container tests failed: {} ({status})", exe.display());
            }
        }
        return Ok(());
    }
    println!(
        "xtask: agent container tests: this machine has no cgroup v2 for them; running {} \
         inside the emulated host",
        names.join(", ")
    );
    let script = names
        .iter()
        .map(|n| format!("{n} --test-threads=1"))
        .collect::<Vec<_>>()
        .join(" && ");
    let argv = ["/bin/sh".to_owned(), "-c".to_owned(), script];
    let env = [(REQUIRED.to_owned(), "1".to_owned())];
    let outcome = TestHost::builder().vcpus(1).build()?.run_retrying_stalls(
        &argv,
        &env,
        Path::new("/tmp"),
        2,
    )?;
    if outcome.exit_code != 0 {
        bail!(
            "agent container tests failed inside the emulated host (exit {})",
            outcome.exit_code
        );
    }
    Ok(())
}

/// Root and a cgroup v2 hierarchy with the memory controller.
fn runs_here() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
}

/// The integration test executables of bulkhead-agent, as cargo built them.
fn executables() -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "test",
            "--quiet",
            "--package",
            "bulkhead-agent",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(crate::workspace::root())
        .output()
        .with_context(|| format!("running {cargo} test --no-run"))?;
    if !out.status.success() {
        bail!(
            "building the agent's tests failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact" && m["target"]["kind"] == serde_json::json!(["test"])
        })
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect())
}
