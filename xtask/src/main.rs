//! `cargo xtask`: set up a machine, build the guest, run the tests and benchmarks.
//!
//! Every step a developer or CI needs lives here (not in shell snippets), so a
//! fresh Debian 12 machine needs only the README's two commands.

mod agent_tests;
mod bench;
mod cmd;
mod demo;
mod guest;
mod images;
mod kernel;
mod package;
mod place;
mod rootfs;
mod setup;
mod test_log;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// bulkhead's project tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what this machine is missing (apt packages, kernel source,
    /// virtiofsd), build the guest kernel and fetch the emulated test host.
    Setup(setup::Options),
    /// Build the guest kernel (cached by version and config hash) into DIR/vmlinux.
    Kernel {
        /// Output folder.
        #[arg(long, default_value = "target/guest")]
        out: PathBuf,
    },
    /// Build what a microVM boots: DIR/vmlinux and DIR/initrd.img (the agent).
    Guest {
        /// Output folder.
        #[arg(long, default_value = "target/guest")]
        out: PathBuf,
    },
    /// Build what to install: the guest (target/guest/) and the static
    /// release binaries `bulkhead`, `bulkhead-runtime`,
    /// `containerd-shim-bulkhead-v2` and `bulkhead-vmm` (target/static/x86_64-unknown-linux-gnu/release/).
    Build,
    /// Build the Debian package (target/package/bulkhead_<version>_amd64.deb):
    /// the binaries, the guest, virtiofsd, a busybox image, the default
    /// config, completions and man pages.
    Package,
    /// Run a command in a container in a microVM, printing its output.
    Demo,
    /// Run the whole test suite: formatting, lints, unit and end-to-end tests.
    Test,
    /// Run only the agent's container tests, where they can run (this
    /// machine with root and cgroup v2, or the emulated host); `test` runs
    /// them too.
    TestAgent,
    /// Run a benchmark against its reference, in the same host, and print ratios.
    Bench {
        /// Which benchmark.
        #[arg(value_enum, default_value_t = bench::Which::Boot)]
        which: bench::Which,
        /// Runs of each side.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

/// Errors are printed with their causes but without a backtrace: CI sets
/// RUST_BACKTRACE for the tests, and forty lines of xtask frames would push
/// the test failure summary out of the log's tail.
fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup(opts) => {
            setup::run(&opts)?;
            if !opts.dry_run {
                kernel::build(&workspace::guest_dir())?;
                let assets = bulkhead_tests::testhost::ensure_assets()?;
                println!(
                    "setup: emulated test host kernel {} cached",
                    assets.kernel_package
                );
                // The debug build `cargo xtask test` uses too, so this costs
                // CI nothing extra.
                workspace::cargo(&["build", "--quiet", "--package", "bulkhead"])?;
                let cli = workspace::root()
                    .join("target")
                    .join("debug")
                    .join("bulkhead");
                let archive = images::busybox_archive()?;
                images::load(&cli, &archive, None)?;
                println!("setup: image {} loaded", images::BUSYBOX_IMAGE);
            }
            Ok(())
        }
        Task::Kernel { out } => kernel::build(&out).map(|_| ()),
        Task::Guest { out } => {
            let guest = guest::build(&out)?;
            println!(
                "guest: {} and {}",
                guest.kernel.display(),
                guest.initrd.display()
            );
            Ok(())
        }
        Task::Build => {
            workspace::build_release_runtime()?;
            println!(
                "build: guest in {}, binaries in {}",
                workspace::guest_dir().display(),
                workspace::release_bin_dir().display()
            );
            Ok(())
        }
        Task::Package => package::build().map(|_| ()),
        Task::Demo => demo::run(),
        Task::Test => workspace::test(),
        Task::TestAgent => agent_tests::run(),
        Task::Bench { which, runs } => bench::run(which, runs),
    }
}
