//! `cargo xtask demo`: the main job, end to end: a command in a container in
//! its own microVM, printing its output.

use anyhow::{ensure, Context, Result};

use crate::{guest, place, rootfs, workspace};

/// Builds what the demo needs, then runs a container where KVM can boot it.
pub fn run() -> Result<()> {
    let target = workspace::root().join("target");
    let cli = target.join("release").join("bulkhead");
    let rootfs = target.join("demo").join("rootfs");
    // Inside the emulated host the outer run has built everything already.
    if !bulkhead_tests::kvm::inside_emulated_host() {
        guest::build(&workspace::guest_dir())?;
        workspace::build_vmm(true)?;
        workspace::cargo(&["build", "--quiet", "--release", "--package", "bulkhead"])?;
        rootfs::busybox(&rootfs)?;
    }
    place::run_with_kvm("demo", || {
        let started = std::time::Instant::now();
        let script = "echo \"hello from a container in a bulkhead microVM: $(uname -sr), $(nproc) vCPUs, pid $$\"";
        let status = std::process::Command::new(&cli)
            .arg("run")
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["--cpus", "2", "--", "sh", "-c", script])
            .status()
            .with_context(|| format!("cannot run {}", cli.display()))?;
        ensure!(status.success(), "bulkhead run failed ({status})");
        println!(
            "demo: the container ran in its own microVM and exited in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
