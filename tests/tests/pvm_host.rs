//! End-to-end, on a PVM host only (such as these development machines): a stock
//! kernel is refused at once with an error that says why and what to do, and a
//! kernel that spins under PVM is stopped by the boot deadline, never a hang.
//!
//! These run on this machine's own /dev/kvm, not in the emulated host: the PVM
//! hypervisor is exactly what they are about.

mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_tests::kvm::{self, KvmKind};
use common::{guest_kernel, processes_named, run_vmm};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let on_pvm = kvm::detect() == KvmKind::Pvm && !kvm::inside_emulated_host();
    if on_pvm {
        println!("e2e pvm_host: this machine's /dev/kvm is PVM: running the PVM-host checks on it");
    } else {
        println!(
            "e2e pvm_host: SKIPPED: these checks need a PVM host and this machine has {}",
            kvm::detect()
        );
    }
    let trials = vec![
        Trial::test("stock_kernel_is_refused_at_once", stock_kernel_is_refused)
            .with_ignored_flag(!on_pvm),
        Trial::test(
            "spinning_guest_is_stopped_by_the_deadline",
            spinning_guest_is_stopped,
        )
        .with_ignored_flag(!on_pvm),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

fn stock_kernel_is_refused() -> Result<(), Failed> {
    let kernel = guest_kernel()?;
    let started = Instant::now();
    let run = run_vmm(
        &["--kernel", &kernel.to_string_lossy()],
        Duration::from_secs(30),
    );
    if run.code() != 1 {
        return Err(format!("expected exit 1, got {}: {}", run.code(), run.stderr).into());
    }
    for needle in ["PVM hypervisor", "CONFIG_PVM_GUEST", "VT-x/AMD-V"] {
        if !run.stderr.contains(needle) {
            return Err(format!("the error lacks {needle:?}: {}", run.stderr).into());
        }
    }
    // "At once": no VM was started, so this is file checks only.
    if started.elapsed() > Duration::from_secs(10) {
        return Err(format!("refusal took {:?}", started.elapsed()).into());
    }
    Ok(())
}

fn spinning_guest_is_stopped() -> Result<(), Failed> {
    let kernel = guest_kernel()?;
    // Forced past the check, a stock kernel gets some way under PVM and then
    // spins; the deadline must stop it and show how far it got.
    let run = run_vmm(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--assume-pvm-guest",
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0",
            "--boot-timeout",
            "5",
            "--ready-marker",
            "NEVER-PRINTED",
        ],
        Duration::from_secs(60),
    );
    run.expect_code(3, "boot timeout")?;
    if !run.stderr.contains("within 5 s") || !run.stderr.contains("Last console lines") {
        return Err(format!(
            "the timeout error lacks the deadline or the console tail: {}",
            run.stderr
        )
        .into());
    }
    let left = processes_named("bulkhead-vmm");
    if !left.is_empty() {
        return Err(format!("bulkhead-vmm processes left: {left:?}").into());
    }
    Ok(())
}
