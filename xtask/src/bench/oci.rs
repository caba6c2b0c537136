//! `podman run --rm IMAGE true` with `bulkhead-runtime` against runc and crun
//! as podman's OCI runtime, in one private podman store, interleaved: what a
//! podman user pays for a microVM per container.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};

use super::median;
use crate::{place, workspace};

const IMAGE: &str = "localhost/bulkhead-bench:latest";
const DEADLINE: Duration = Duration::from_secs(600);

/// Builds outside the emulated host, then measures where KVM runs.
pub fn run(runs: usize) -> Result<()> {
    let target = workspace::root().join("target");
    let rootfs = target.join("bench").join("rootfs");
    let runtime = workspace::release_bin_dir().join("bulkhead-runtime");
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        crate::rootfs::busybox(&rootfs)?;
    }
    // One emulated vCPU: podman, conmon and a microVM's vCPU on two emulated
    // CPUs have wedged the emulated host's own kernel.
    place::run_with_kvm_on("bench oci", Some(1), || {
        measure(&rootfs, &runtime, runs.max(1))
    })
}

/// A podman of its own: store and run directories on /run (a tmpfs, which
/// overlayfs can stack on), the cgroupfs manager and file events (no
/// systemd in the emulated host).
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn cmd(&self, runtime: &Path) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .arg("--cgroup-manager")
            .arg("cgroupfs")
            .arg("--events-backend")
            .arg("file")
            .arg("--runtime")
            .arg(runtime);
        c
    }
}

fn measure(rootfs: &Path, runtime: &Path, runs: usize) -> Result<()> {
    let podman = Podman {
        dir: tempfile::Builder::new()
            .prefix("bulkhead-bench-podman-")
            .tempdir_in("/run")?,
    };
    // conmon passes the runtime almost no environment: a wrapper carries
    // the artifact overrides this run was given.
    let wrapper = podman.dir.path().join("bulkhead-runtime");
    let mut script = String::from("#!/bin/sh\n");
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("BULKHEAD_")) {
        script += &format!("export {k}='{}'\n", v.replace('\'', "'\\''"));
    }
    script += &format!("exec '{}' \"$@\"\n", runtime.display());
    std::fs::write(&wrapper, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;

    let archive = podman.dir.path().join("image.tar");
    write_image_archive(
        rootfs,
        IMAGE,
        &ImageConfig::default(),
        LayerCompression::None,
        &archive,
    )?;
    let mut load = podman.cmd(Path::new("runc"));
    load.arg("load").arg("-i").arg(&archive);
    bulkhead_tests::process::run(&mut load, DEADLINE).context("podman load")?;

    let runtimes: [(&str, &Path); 3] = [
        ("bulkhead", &wrapper),
        ("runc", Path::new("/usr/sbin/runc")),
        ("crun", Path::new("/usr/bin/crun")),
    ];
    println!(
        "bench oci: `podman run --rm IMAGE true` with --runtime bulkhead-runtime, runc and crun, {runs} runs each, interleaved"
    );
    // One untimed run of each: page cache, and bulkhead's VM template of
    // this shape (made once per host boot).
    for (name, path) in runtimes {
        podman_run(&podman, path).with_context(|| format!("warm-up with {name}"))?;
    }
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..runs {
        for (k, (name, path)) in runtimes.iter().enumerate() {
            let t = podman_run(&podman, path).with_context(|| format!("run {i} with {name}"))?;
            println!("  run {i:2} {name:8} {:8.1} ms", t * 1e3);
            times[k].push(t * 1e3);
        }
    }
    let [b, r, c] = times.map(|mut t| median(&mut t));
    println!("median: bulkhead-runtime {b:.1} ms, runc {r:.1} ms, crun {c:.1} ms");
    println!(
        "ratio bulkhead/runc: {:.2} (goal <= 2.5), bulkhead/crun: {:.2}",
        b / r,
        b / c
    );
    let mut reset = podman.cmd(Path::new("runc"));
    reset.args(["system", "reset", "-f"]);
    let _ = bulkhead_tests::process::run(&mut reset, DEADLINE);
    Ok(())
}

/// Seconds for one `podman run --rm IMAGE true` with `runtime`, checked.
fn podman_run(podman: &Podman, runtime: &Path) -> Result<f64> {
    let mut cmd = podman.cmd(runtime);
    cmd.args(["run", "--rm", IMAGE, "true"]);
    let started = Instant::now();
    let (status, out) = bulkhead_tests::process::run_status(&mut cmd, DEADLINE)?;
    let took = started.elapsed().as_secs_f64();
    ensure!(
        status.success(),
        "podman run with {} failed ({status}): {}",
        runtime.display(),
        out.stderr
    );
    Ok(took)
}
