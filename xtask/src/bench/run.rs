//! Container benchmarks, bulkhead against runc in the same host and run:
//! time from `bulkhead run` / `runc run` to the first byte of `echo`'s output,
//! stdout throughput of a 256 MiB `head`, and host memory of an idle sandbox.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::median;
use crate::{place, workspace};

const THROUGHPUT_BYTES: u64 = 256 << 20;
const DEADLINE: Duration = Duration::from_secs(300);

pub(super) struct Inputs {
    pub(super) cli: PathBuf,
    pub(super) rootfs: PathBuf,
    pub(super) bundle: PathBuf,
}

/// Builds everything outside the emulated host, then measures where KVM runs.
pub fn run(runs: usize) -> Result<()> {
    let target = workspace::root().join("target");
    let inputs = Inputs {
        cli: workspace::release_bin_dir().join("bulkhead"),
        rootfs: target.join("bench").join("rootfs"),
        bundle: target.join("bench").join("bundle"),
    };
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_runtime()?;
        crate::rootfs::busybox(&inputs.rootfs)?;
        make_runc_bundle(&inputs.bundle, &inputs.rootfs)?;
    }
    // One emulated vCPU: with two, QEMU 7.2's multi-threaded TCG emulation of
    // nested SVM corrupts the guest under sustained load (triple faults, wedged
    // vCPUs, seen only then and never with one), which the throughput phase hits.
    place::run_with_kvm_on("bench run", Some(1), || measure(&inputs, runs.max(1)))
}

/// `runc spec`'s default config, non-interactive, rooted at `rootfs`.
pub(super) fn make_runc_bundle(bundle: &Path, rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(bundle)?;
    let _ = std::fs::remove_file(bundle.join("config.json"));
    let status = Command::new("runc")
        .args(["spec"])
        .current_dir(bundle)
        .status()
        .context("running `runc spec`")?;
    ensure!(status.success(), "runc spec failed");
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["process"]["terminal"] = serde_json::json!(false);
    config["root"]["path"] = serde_json::json!(rootfs.canonicalize()?);
    std::fs::write(&path, config.to_string())?;
    Ok(())
}

/// The command that runs `args` in a container with `runtime`.
pub(super) fn command(runtime: &str, inputs: &Inputs, id: &str, args: &[&str]) -> Command {
    match runtime {
        "bulkhead" => {
            let mut c = Command::new(&inputs.cli);
            c.arg("run")
                .arg("--rm")
                .arg("--rootfs")
                .arg(&inputs.rootfs)
                .arg("--")
                .args(args);
            c
        }
        _ => {
            // runc takes the command from config.json: write a per-run copy.
            let bundle = inputs.bundle.with_file_name(format!("bundle-{id}"));
            if let Err(e) = write_runc_config(&inputs.bundle, &bundle, args) {
                eprintln!(
                    "bench: cannot write the runc bundle {}: {e:#}",
                    bundle.display()
                );
            }
            let mut c = Command::new("runc");
            c.arg("run").arg("--bundle").arg(&bundle).arg(id);
            c
        }
    }
}

/// Copies the bundle's config.json into `bundle` with `process.args` = `args`.
fn write_runc_config(base: &Path, bundle: &Path, args: &[&str]) -> Result<()> {
    std::fs::create_dir_all(bundle)?;
    let text = std::fs::read_to_string(base.join("config.json"))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    config["process"]["args"] = serde_json::json!(args);
    std::fs::write(bundle.join("config.json"), config.to_string())?;
    Ok(())
}

/// Runs a container, returns (time to first stdout byte, total bytes, total time).
pub(super) fn time_run(mut cmd: Command) -> Result<(Duration, u64, Duration)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting the container")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut first = None;
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| started.elapsed());
        total += n as u64;
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            bail!("the container ran past {DEADLINE:?}");
        }
    }
    let status = wait(&mut child)?;
    ensure!(status.success(), "the container failed: {status}");
    Ok((first.unwrap_or_default(), total, started.elapsed()))
}

fn wait(child: &mut Child) -> Result<std::process::ExitStatus> {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() > until {
            let _ = child.kill();
            bail!("did not exit in {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn measure(inputs: &Inputs, runs: usize) -> Result<()> {
    println!("bench run: busybox rootfs, {runs} runs per runtime, interleaved");
    // One untimed run of each first: page cache for both, and for bulkhead the
    // VM template of this shape (made once per host boot, like an image pull).
    for runtime in ["bulkhead", "runc"] {
        time_run(command(
            runtime,
            inputs,
            &format!("bench-warm-{runtime}"),
            &["true"],
        ))?;
    }
    let mut starts: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // Until the CLI exits, so with the sandbox's teardown: what a script
    // running one command after another waits for. No goal, shown beside.
    let mut wholes: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..runs {
        for (k, runtime) in ["bulkhead", "runc"].iter().enumerate() {
            let id = format!("bench-{i}-{runtime}");
            let (first, _, total) = time_run(command(runtime, inputs, &id, &["echo", "hello"]))?;
            println!(
                "  run {i:2} {runtime:8} first byte {:8.1} ms, exit {:8.1} ms",
                first.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3
            );
            starts[k].push(first.as_secs_f64() * 1e3);
            wholes[k].push(total.as_secs_f64() * 1e3);
        }
    }
    let (b, r) = (median(&mut starts[0]), median(&mut starts[1]));
    println!("median first byte: bulkhead {b:.1} ms, runc {r:.1} ms");
    println!("start ratio bulkhead/runc: {:.2} (goal <= 3)", b / r);
    let (b, r) = (median(&mut wholes[0]), median(&mut wholes[1]));
    println!(
        "median until exit: bulkhead {b:.1} ms, runc {r:.1} ms, ratio {:.2}",
        b / r
    );

    let idle = idle_sandbox_memory(inputs)?;
    println!(
        "idle sandbox host memory: {:.1} MiB PSS of bulkhead-vmm + virtiofsd + CLI, of which {:.1} MiB guest RAM touched; \
         overhead without guest RAM {:.1} MiB (goal <= 20 MiB)",
        idle.0, idle.1, idle.0 - idle.1
    );
    let mut rates = [0.0f64; 2];
    let cat = format!("head -c {THROUGHPUT_BYTES} /dev/zero");
    for (k, runtime) in ["bulkhead", "runc"].iter().enumerate() {
        let (_, bytes, total) = time_run(command(
            runtime,
            inputs,
            &format!("tput-{runtime}"),
            &["sh", "-c", &cat],
        ))?;
        ensure!(
            bytes == THROUGHPUT_BYTES,
            "{runtime}: {bytes} bytes of {THROUGHPUT_BYTES} arrived"
        );
        rates[k] = bytes as f64 / total.as_secs_f64() / 1e6;
        println!(
            "stdout throughput {runtime:8}: {:.1} MB/s (256 MiB in {:.1} s)",
            rates[k],
            total.as_secs_f64()
        );
    }

    println!(
        "stdout throughput ratio bulkhead/runc: {:.2} (goal >= 0.5)",
        rates[0] / rates[1]
    );
    Ok(())
}

/// (total PSS MiB, guest RAM touched MiB) of a sandbox running `sleep`.
fn idle_sandbox_memory(inputs: &Inputs) -> Result<(f64, f64)> {
    let mut cmd = command(
        "bulkhead",
        inputs,
        "idle",
        &["sh", "-c", "echo up; exec sleep 60"],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut byte = [0u8; 1];
    out.read_exact(&mut byte)
        .context("the idle container never printed")?;
    std::thread::sleep(Duration::from_secs(2));
    let mut pss_kib = 0u64;
    let mut guest_kib = 0u64;
    for name in ["bulkhead-vmm", "virtiofsd", "bulkhead"] {
        for pid in pids_named(name) {
            pss_kib += smaps_field_sum(pid, "Pss:", None);
            if name == "bulkhead-vmm" {
                // Guest RAM is the memfd, and the kernel pages a restored VM
                // maps from its template's memory file.
                guest_kib +=
                    smaps_field_sum(pid, "Rss:", Some(bulkhead_vmm::memory::GUEST_MEMFD_NAME));
                let template_memory = format!("/{}", bulkhead_vmm::snapshot::MEMORY_FILE);
                guest_kib += smaps_field_sum(pid, "Rss:", Some(&template_memory));
            }
        }
    }
    // SAFETY: kill(2) of our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = wait(&mut child);
    Ok((pss_kib as f64 / 1024.0, guest_kib as f64 / 1024.0))
}

fn pids_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == name)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Sums `field` over the mappings of `pid` (only those whose name contains `only`, if given).
fn smaps_field_sum(pid: u32, field: &str, only: Option<&str>) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut sum = 0;
    let mut keep = only.is_none();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            keep = only.is_none_or(|o| line.contains(o));
        } else if first == field && keep {
            sum += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    sum
}
