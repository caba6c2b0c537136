//! `cargo xtask demo`: the main job of this stage, a microVM that boots the
//! project's kernel and prints what it sees.

use anyhow::{ensure, Context, Result};
use bulkhead_tests::initramfs::busybox::busybox_initrd;

use crate::{kernel, place, workspace};

const DEMO_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "hello from a bulkhead microVM: Linux $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, $(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo) MiB, up $(cut -d' ' -f1 /proc/uptime) s"
reboot -f
"#;

/// Builds what the demo boots, then boots it where KVM can run it.
pub fn run() -> Result<()> {
    let guest = workspace::guest_dir();
    let (vmm, kernel) = (workspace::vmm_path(true), guest.join("vmlinux"));
    let initrd = guest.join("demo-initrd.cpio");
    // Inside the emulated host the outer run has built everything already.
    if !bulkhead_tests::kvm::inside_emulated_host() {
        workspace::build_vmm(true)?;
        kernel::build(&guest)?;
        busybox_initrd(DEMO_INIT, &initrd).context("building the demo initrd")?;
    }
    place::run_with_kvm("demo", || {
        let started = std::time::Instant::now();
        let status = std::process::Command::new(&vmm)
            .args(["--kernel".as_ref(), kernel.as_os_str()])
            .args(["--initrd".as_ref(), initrd.as_os_str()])
            .args(["--vcpus", "2", "--memory", "256", "--console", "stdout"])
            .args([
                "--boot-timeout",
                "120",
                "--ready-marker",
                "hello from a bulkhead microVM",
            ])
            .status()
            .with_context(|| format!("cannot run {}", vmm.display()))?;
        ensure!(status.success(), "bulkhead-vmm failed ({status})");
        println!(
            "demo: the microVM booted, printed and stopped in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
