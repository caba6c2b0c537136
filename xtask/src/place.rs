//! Where a task that boots microVMs runs: on this machine's /dev/kvm when it can
//! boot a stock kernel, otherwise inside the emulated KVM host.

use anyhow::{bail, Result};
use bulkhead_tests::kvm::{self, KvmKind};
use bulkhead_tests::testhost::TestHost;

/// Runs `task` here if this machine (or the emulated host we are in) has
/// hardware-style KVM; otherwise runs this same xtask invocation inside the
/// emulated host. Says which.
pub fn run_with_kvm(name: &str, task: impl FnOnce() -> Result<()>) -> Result<()> {
    run_with_kvm_on(name, None, task)
}

/// Like [`run_with_kvm`], with `host_vcpus` vCPUs for the emulated host if one
/// is needed (its default otherwise).
pub fn run_with_kvm_on(
    name: &str,
    host_vcpus: Option<u32>,
    task: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if kvm::inside_emulated_host() {
        println!("{name}: running inside the emulated KVM host");
        return task();
    }
    match kvm::detect() {
        KvmKind::Hardware => {
            println!("{name}: running on this machine's /dev/kvm");
            task()
        }
        other => {
            println!(
                "{name}: this machine has {other}; running inside the emulated KVM host \
                 (QEMU TCG with AMD SVM, nested KVM). Times there are 10-100x hardware's."
            );
            let mut argv = vec![std::env::current_exe()?.to_string_lossy().into_owned()];
            argv.extend(std::env::args().skip(1));
            let env: Vec<(String, String)> = ["BULKHEAD_LOG", "RUST_BACKTRACE"]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
                .collect();
            let mut host = TestHost::builder();
            if let Some(vcpus) = host_vcpus {
                host = host.vcpus(vcpus);
            }
            let outcome =
                host.build()?
                    .run_retrying_stalls(&argv, &env, &std::env::current_dir()?, 2)?;
            if outcome.exit_code != 0 {
                bail!(
                    "{name} failed inside the emulated host (exit {})",
                    outcome.exit_code
                );
            }
            Ok(())
        }
    }
}
