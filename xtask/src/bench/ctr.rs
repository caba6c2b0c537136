//! containerd benchmarks: `ctr run --rm IMAGE id echo hi` with the bulkhead
//! runtime against runc's, in the same private containerd, interleaved; then
//! ten bulkhead containers started at once, slowest against median.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::containerd::{ContainerdOptions, PrivateContainerd, Runtime};
use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};

use super::median;
use crate::{place, workspace};

const IMAGE: &str = "docker.io/library/bulkhead-bench:latest";
const PAUSE: &str = "registry.k8s.io/pause:bulkhead-bench";
const BULKHEAD: &str = "io.containerd.bulkhead.v2";
const RUNC: &str = "io.containerd.runc.v2";
const CONCURRENT: usize = 10;
const DEADLINE: Duration = Duration::from_secs(600);

/// Builds outside the emulated host, then measures where KVM runs.
pub fn run(runs: usize) -> Result<()> {
    let target = workspace::root().join("target");
    let rootfs = target.join("bench").join("rootfs");
    let shim_dir = workspace::release_bin_dir();
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        crate::rootfs::busybox(&rootfs)?;
    }
    // One emulated vCPU, as for `bench run` (two corrupt guests under load in
    // QEMU 7.2's TCG nested SVM).
    place::run_with_kvm_on("bench ctr", Some(1), || {
        measure(&rootfs, &shim_dir, runs.max(1))
    })
}

fn measure(rootfs: &Path, shim_dir: &Path, runs: usize) -> Result<()> {
    let work = tempfile::tempdir()?;
    let archive = work.path().join("image.tar");
    write_image_archive(
        rootfs,
        IMAGE,
        &ImageConfig::default(),
        LayerCompression::None,
        &archive,
    )?;
    let mut opts = ContainerdOptions::new(PAUSE)
        .runtime(Runtime::bulkhead())
        .shim_dir(shim_dir);
    // The snapshotter needs a non-overlay upper dir (the emulated host's /tmp is one).
    opts.temp_parent = Some(PathBuf::from("/run"));
    let daemon = PrivateContainerd::start(opts)?;
    daemon.import_image("default", &archive)?;

    // A warm-up of each, so neither side pays for first-use page cache (and
    // bulkhead's shim makes the VM template of this shape).
    for (i, runtime) in [BULKHEAD, RUNC].iter().enumerate() {
        ctr_run(&daemon, runtime, &format!("warm{i}"))?;
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let b = ctr_run(&daemon, BULKHEAD, &format!("b{i}"))?;
        let r = ctr_run(&daemon, RUNC, &format!("r{i}"))?;
        println!(
            "bench ctr: run {:>2}: bulkhead {:>7.0} ms, runc {:>6.0} ms",
            i + 1,
            b * 1e3,
            r * 1e3
        );
        ours.push(b);
        theirs.push(r);
    }
    let (b, r) = (median(&mut ours), median(&mut theirs));
    println!(
        "bench ctr: `ctr run --rm IMAGE id echo hi`, median of {runs}: bulkhead {:.0} ms, runc {:.0} ms",
        b * 1e3,
        r * 1e3
    );

    let mut all = concurrent(&daemon)?;
    let slowest = all.iter().copied().fold(0.0, f64::max);
    let mid = median(&mut all);
    println!(
        "bench ctr: {CONCURRENT} bulkhead containers started at once: median {:.0} ms, slowest {:.0} ms, slowest/median {:.2}",
        mid * 1e3,
        slowest * 1e3,
        slowest / mid
    );
    daemon.stop()?;
    println!(
        "bench ctr: start ratio bulkhead/runc {:.2} (goal <= 3)",
        b / r
    );
    Ok(())
}

/// Seconds for one `ctr run --rm` of `echo hi` with `runtime`, checked.
fn ctr_run(daemon: &PrivateContainerd, runtime: &str, id: &str) -> Result<f64> {
    let started = Instant::now();
    let mut cmd = daemon.ctr(["run", "--rm", "--runtime", runtime]);
    cmd.args([IMAGE, id, "echo", "hi"]);
    let out = bulkhead_tests::process::run(&mut cmd, DEADLINE)
        .with_context(|| format!("ctr run with {runtime}"))?;
    let took = started.elapsed().as_secs_f64();
    ensure!(
        out.stdout == "hi\n",
        "ctr run with {runtime} printed {:?} (stderr {:?})",
        out.stdout,
        out.stderr
    );
    Ok(took)
}

/// Starts `CONCURRENT` bulkhead containers at once; each one's seconds to exit.
fn concurrent(daemon: &PrivateContainerd) -> Result<Vec<f64>> {
    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..CONCURRENT {
        let mut cmd: Command = daemon.ctr(["run", "--rm", "--runtime", BULKHEAD]);
        cmd.args([IMAGE, &format!("c{i}"), "echo", "hi"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.push(cmd.spawn().context("starting ctr")?);
    }
    let mut times = vec![0.0; CONCURRENT];
    let mut done = [false; CONCURRENT];
    while done.iter().any(|d| !d) {
        for (i, child) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!("concurrent ctr run c{i} failed ({status}): {err}");
                }
                times[i] = started.elapsed().as_secs_f64();
                done[i] = true;
            }
        }
        if started.elapsed() > DEADLINE {
            for c in &mut children {
                let _ = c.kill();
            }
            bail!("{CONCURRENT} concurrent ctr runs did not end within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(times)
}
