//! Boot benchmark: time from process start to the guest's ready marker, for
//! bulkhead-vmm and for QEMU's microvm machine, booting the same kernel and
//! initrd with the same memory, vCPUs and command line, runs interleaved.
//!
//! The guest prints its own uptime with the marker, which splits each sample into
//! guest time (by the guest's clock) and the rest (process start, VM setup,
//! firmware if any). That split is only as good as the guest's clock: under
//! nested emulation QEMU's guest clock runs behind wall time (its printk clock
//! even stands still for stretches), so the "ready" totals are what compare.
//! Memory is the VMM process's RSS minus the guest RAM mapping (the largest
//! one), read from /proc/<pid>/smaps while the guest is up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_tests::initramfs::busybox::busybox_initrd;
use bulkhead_vmm::config::default_cmdline;

use super::median;
use crate::{kernel, place, workspace};

const MEMORY_MIB: u32 = 128;
const VCPUS: u32 = 1;
const MARKER: &str = "BULKHEAD-BENCH-READY";
/// One boot may take this long under emulation before the run is called failed.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

const BENCH_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
read up idle < /proc/uptime
echo "BULKHEAD-BENCH-READY uptime=$up"
sleep 30
reboot -f
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Bulkhead,
    Qemu,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Bulkhead => "bulkhead-vmm",
            Side::Qemu => "qemu microvm",
        }
    }
}

/// One boot's measurements.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Process start to marker seen.
    total_ms: f64,
    /// The guest's uptime when it printed the marker.
    kernel_ms: f64,
    /// VMM process RSS minus guest RAM pages, in KiB.
    own_kib: u64,
}

struct Inputs {
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds the inputs (outside the emulated host), then runs the benchmark where
/// KVM can boot the kernel.
pub fn run(runs: usize) -> Result<()> {
    let guest = workspace::guest_dir();
    let inputs = Inputs {
        vmm: workspace::release_bin_dir().join("bulkhead-vmm"),
        kernel: guest.join("vmlinux"),
        initrd: guest.join("bench-initrd.cpio"),
    };
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_release_binaries()?;
        kernel::build(&guest)?;
        busybox_initrd(BENCH_INIT, &inputs.initrd).context("building the benchmark initrd")?;
    }
    place::run_with_kvm("bench boot", || measure_all(&inputs, runs.max(1)))
}

fn measure_all(inputs: &Inputs, runs: usize) -> Result<()> {
    println!(
        "bench boot: {MEMORY_MIB} MiB, {VCPUS} vCPU, same kernel, initrd and command line; \
         {runs} runs per side, interleaved"
    );
    let mut samples: Vec<(Side, Sample)> = Vec::new();
    // One unmeasured boot of each warms the page cache for kernel and initrd.
    for side in [Side::Bulkhead, Side::Qemu] {
        boot_once(side, inputs).with_context(|| format!("warm-up boot of {}", side.name()))?;
    }
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [Side::Bulkhead, Side::Qemu]
        } else {
            [Side::Qemu, Side::Bulkhead]
        };
        for side in order {
            let s =
                boot_once(side, inputs).with_context(|| format!("run {i} of {}", side.name()))?;
            println!(
                "  run {i:2} {:13} ready {:8.1} ms  (guest clock {:8.1} ms, rest {:7.1} ms)  VMM own memory {:6.1} MiB",
                side.name(),
                s.total_ms,
                s.kernel_ms,
                s.total_ms - s.kernel_ms,
                s.own_kib as f64 / 1024.0
            );
            samples.push((side, s));
        }
    }
    let stat = |side: Side, f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, x)| f(x))
            .collect();
        median(&mut v)
    };
    let report = |side: Side| {
        let (total, kernel) = (stat(side, |s| s.total_ms), stat(side, |s| s.kernel_ms));
        let vmm = stat(side, |s| s.total_ms - s.kernel_ms);
        let own = stat(side, |s| s.own_kib as f64) / 1024.0;
        println!(
            "median {:13} ready {total:8.1} ms  (guest clock {kernel:8.1} ms, rest {vmm:7.1} ms)  VMM own memory {own:6.1} MiB",
            side.name()
        );
        (total, vmm, own)
    };
    let (b_total, b_vmm, b_own) = report(Side::Bulkhead);
    let (q_total, q_vmm, q_own) = report(Side::Qemu);
    println!(
        "(guest clock = the guest's uptime at the marker; QEMU's guest clock lags under \
         emulation, so its 'rest' is overstated: compare the ready totals. 'rest' ratio {:.2})",
        b_vmm / q_vmm
    );
    println!(
        "VMM own memory: bulkhead {b_own:.1} MiB vs qemu {q_own:.1} MiB (goal: bulkhead <= 5 MiB)"
    );
    println!(
        "boot ratio bulkhead/qemu-microvm: {:.2} (goal <= 0.60)",
        b_total / q_total
    );
    Ok(())
}

fn command(side: Side, inputs: &Inputs) -> Command {
    let cmdline = default_cmdline();
    match side {
        Side::Bulkhead => {
            let mut c = Command::new(&inputs.vmm);
            c.arg("--kernel")
                .arg(&inputs.kernel)
                .arg("--initrd")
                .arg(&inputs.initrd);
            c.args([
                "--memory",
                &MEMORY_MIB.to_string(),
                "--vcpus",
                &VCPUS.to_string(),
            ]);
            c.args(["--console", "stdout", "--cmdline", &cmdline]);
            c
        }
        Side::Qemu => {
            let mut c = Command::new("qemu-system-x86_64");
            // No option ROMs, no RTC: the closest QEMU gets to a firmware-less boot.
            c.args([
                "-M",
                "microvm,x-option-roms=off,rtc=off,isa-serial=on",
                "-accel",
                "kvm",
                "-cpu",
                "host",
            ]);
            c.args(["-m", &MEMORY_MIB.to_string(), "-smp", &VCPUS.to_string()]);
            c.args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ]);
            c.arg("-kernel")
                .arg(&inputs.kernel)
                .arg("-initrd")
                .arg(&inputs.initrd);
            c.args(["-append", &cmdline]);
            c
        }
    }
}

/// Boots once, waits for the marker, measures, and kills the VM.
fn boot_once(side: Side, inputs: &Inputs) -> Result<Sample> {
    let mut cmd = command(side, inputs);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", side.name()))?;
    let result = wait_and_measure(&mut child, started);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn wait_and_measure(child: &mut Child, started: Instant) -> Result<Sample> {
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = started + BOOT_DEADLINE;
    let mut console = Vec::new();
    loop {
        let line = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(_) => bail!(
                "no ready marker within {} s; console:\n{}",
                BOOT_DEADLINE.as_secs(),
                console.join("\n")
            ),
        };
        if let Some(rest) = line.split(MARKER).nth(1) {
            let total_ms = started.elapsed().as_secs_f64() * 1000.0;
            let kernel_ms =
                parse_uptime_ms(rest).with_context(|| format!("bad marker line {line:?}"))?;
            let own_kib = own_memory_kib(child.id())?;
            return Ok(Sample {
                total_ms,
                kernel_ms,
                own_kib,
            });
        }
        console.push(line);
    }
}

/// "uptime=1.23" -> 1230.0
fn parse_uptime_ms(text: &str) -> Option<f64> {
    let value = text.trim().strip_prefix("uptime=")?;
    value
        .split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .map(|s| s * 1000.0)
}

/// RSS of `pid` minus the RSS of its largest mapping (the guest's RAM), in KiB.
fn own_memory_kib(pid: u32) -> Result<u64> {
    let path = Path::new("/proc").join(pid.to_string()).join("smaps");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    own_memory_from_smaps(&text).with_context(|| format!("parsing {}", path.display()))
}

fn own_memory_from_smaps(text: &str) -> Option<u64> {
    let mut total = 0;
    let mut largest: (u64, u64) = (0, 0); // (size, rss) of the largest mapping
    let mut current_size = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                current_size = e - s;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = words.next()?.parse().ok()?;
            total += kib;
            if current_size > largest.0 {
                largest = (current_size, kib);
            }
        }
    }
    Some(total - largest.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_parsed() {
        assert_eq!(parse_uptime_ms(" uptime=1.25"), Some(1250.0));
        assert_eq!(parse_uptime_ms("nonsense"), None);
    }

    #[test]
    fn guest_ram_is_left_out_of_own_memory() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1 /usr/bin/vmm
Size:               1024 kB
Rss:                 800 kB
7f0000000000-7f0008000000 rw-s 00000000 00:01 2 /memfd:bulkhead-guest-ram (deleted)
Size:             131072 kB
Rss:               20000 kB
7f1000000000-7f1000021000 rw-p 00000000 00:00 0 [heap]
Size:                132 kB
Rss:                 100 kB
";
        assert_eq!(own_memory_from_smaps(smaps), Some(900));
    }
}
