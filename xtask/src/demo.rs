//! `cargo xtask demo`: the main job, end to end: a command in a container in
//! its own microVM, printing its output.

use anyhow::{ensure, Context, Result};

use crate::{images, place, workspace};

/// Builds what the demo needs, then runs a container where KVM can boot it.
pub fn run() -> Result<()> {
    let target = workspace::root().join("target");
    let cli = workspace::release_bin_dir().join("bulkhead");
    let archive = target.join("images").join("busybox.tar");
    // Inside the emulated host the outer run has built everything already.
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        images::busybox_archive()?;
    }
    place::run_with_kvm("demo", || {
        let mut run = std::process::Command::new(&cli);
        if bulkhead_tests::kvm::inside_emulated_host() {
            // There `/var/lib` is an overlay, which cannot hold a container's
            // writable layer: keep images and containers on the /run tmpfs,
            // and load the embedded image there.
            let root = std::path::Path::new("/run/bulkhead-demo");
            images::load(&cli, &archive, Some(root))?;
            run.env("BULKHEAD_ROOT", root);
        }
        let started = std::time::Instant::now();
        let script = "echo \"hello from a container in a bulkhead microVM: $(uname -sr), $(nproc) vCPUs, pid $$\"";
        println!("demo: bulkhead run --rm --cpus 2 busybox sh -c '{script}'");
        let status = run
            .args(["run", "--rm", "--cpus", "2", "busybox", "sh", "-c", script])
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
