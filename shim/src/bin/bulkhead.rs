//! `bulkhead`: run containers in microVMs from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bulkhead::cli::exec::exec;
use bulkhead::cli::run::{run, RunOptions};
use bulkhead::cli::spec::ProcessOptions;
use clap::{Parser, Subcommand};

/// Containers in microVMs: each runs in its own KVM guest kernel.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command in a container, in its own microVM; exits with its status.
    Run(RunArgs),
    /// Run another command in a running container (started with `run --name`).
    Exec(ExecArgs),
}

/// The process flags `run` and `exec` share.
#[derive(Debug, clap::Args)]
struct ProcessArgs {
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Give the process a terminal (pty).
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Numeric user (and group) to run as.
    #[arg(short, long, value_name = "UID[:GID]")]
    user: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

impl ProcessArgs {
    fn options(self, read_only: bool) -> ProcessOptions {
        ProcessOptions {
            args: self.command,
            env: self.env,
            cwd: self.workdir,
            user: self.user,
            terminal: self.tty,
            read_only,
            memory_limit: None,
        }
    }
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// The container's name.
    name: String,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The container's root file system: a directory on this host.
    #[arg(long, value_name = "DIR")]
    rootfs: PathBuf,
    /// Name the container (for `bulkhead exec`); a random id otherwise.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    process: ProcessArgs,
    /// Container memory limit in MiB (the microVM gets this plus the guest's share).
    #[arg(long, value_name = "MIB")]
    memory: Option<u32>,
    /// vCPUs of the microVM.
    #[arg(long, default_value_t = 1)]
    cpus: u16,
    /// Mount the root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// Seconds the microVM has to come up.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    boot_timeout: u64,
}

/// Where sandbox directories live.
const RUN_ROOT: &str = "/run/bulkhead";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            // Like docker run: 125 when bulkhead itself failed.
            ExitCode::from(125)
        }
    }
}

fn real_main() -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let run_root = PathBuf::from(RUN_ROOT);
    match Cli::parse().command {
        Command::Exec(args) => {
            let interactive = args.process.interactive;
            let process = args.process.options(false);
            runtime.block_on(exec(&run_root, &args.name, &process, interactive))
        }
        Command::Run(args) => {
            let interactive = args.process.interactive;
            runtime.block_on(run(RunOptions {
                rootfs: args.rootfs,
                process: args.process.options(args.read_only),
                interactive,
                memory_mib: args.memory,
                cpus: args.cpus,
                boot_timeout: Duration::from_secs(args.boot_timeout),
                run_root,
                name: args.name,
            }))
        }
    }
}
