//! `bulkhead run --rm busybox true` (the CLI with the embedded image: a
//! record, an overlay over the image, the microVM, the container) against
//! `runc run` of the same root file system, in the same host and run.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::median;
use super::run::{command, make_runc_bundle, time_run, Inputs};
use crate::{images, place, workspace};

/// Builds everything outside the emulated host, then measures where KVM runs.
pub fn run(runs: usize) -> Result<()> {
    let target = workspace::root().join("target");
    let inputs = Inputs {
        cli: workspace::release_bin_dir().join("bulkhead"),
        rootfs: target.join("images").join("busybox-rootfs"),
        bundle: target.join("bench").join("cli-bundle"),
    };
    let archive = target.join("images").join("busybox.tar");
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        images::busybox_archive()?;
        make_runc_bundle(&inputs.bundle, &inputs.rootfs)?;
    }
    place::run_with_kvm_on("bench cli", Some(1), || {
        // A store of its own on /run (a tmpfs, as an overlay's upper layer
        // needs), holding just the embedded image.
        let root = Path::new("/run/bulkhead-bench");
        images::load(&inputs.cli, &archive, Some(root))?;
        let result = measure(&inputs, root, runs.max(1));
        let _ = std::fs::remove_dir_all(root);
        result
    })
}

fn measure(inputs: &Inputs, root: &Path, runs: usize) -> Result<()> {
    println!("bench cli: `bulkhead run --rm busybox true` vs `runc run` of the same rootfs, {runs} runs each, interleaved");
    // One untimed run of each first: page cache for both, and for bulkhead the
    // VM template of this shape (made once per host boot, like an image pull).
    let mut warm = Command::new(&inputs.cli);
    warm.env("BULKHEAD_ROOT", root)
        .args(["run", "--rm", "busybox", "true"]);
    time_run(warm)?;
    time_run(command("runc", inputs, "bench-cli-warm", &["true"]))?;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        let mut bulkhead = Command::new(&inputs.cli);
        bulkhead
            .env("BULKHEAD_ROOT", root)
            .args(["run", "--rm", "busybox", "true"]);
        let runc = command("runc", inputs, &format!("bench-cli-{i}"), &["true"]);
        for (k, (name, cmd)) in [("bulkhead", bulkhead), ("runc", runc)]
            .into_iter()
            .enumerate()
        {
            let (_, _, total) = time_run(cmd)?;
            println!("  run {i:2} {name:8} {:8.1} ms", total.as_secs_f64() * 1e3);
            times[k].push(total.as_secs_f64() * 1e3);
        }
    }
    let (b, r) = (median(&mut times[0]), median(&mut times[1]));
    println!("median: bulkhead {b:.1} ms, runc {r:.1} ms");
    println!("ratio bulkhead/runc: {:.2}", b / r);
    Ok(())
}
