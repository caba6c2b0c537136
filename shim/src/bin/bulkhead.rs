//! `bulkhead`: run containers in microVMs from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bulkhead::cli::doctor::{diagnose, use_colour};
use bulkhead::cli::exec::exec;
use bulkhead::cli::run::{run, RunOptions};
use bulkhead::cli::spec::ProcessOptions;
use bulkhead::config::{Config, ConfigError, ConfigFile, NamedBy, DEFAULT_LOG_LEVEL};
use clap::{Parser, Subcommand};

/// Containers in microVMs: each runs in its own KVM guest kernel.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version)]
struct Cli {
    /// Read settings from FILE instead of $BULKHEAD_CONFIG or /etc/bulkhead/config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command in a container, in its own microVM; exits with its status.
    Run(RunArgs),
    /// Run another command in a running container (started with `run --name`).
    Exec(ExecArgs),
    /// Check that this host can run bulkhead, and say how to fix what is missing;
    /// exits 1 if a check failed.
    Doctor(DoctorArgs),
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// The containerd config to check for bulkhead's runtime [default: /etc/containerd/config.toml].
    #[arg(long, value_name = "FILE")]
    containerd_config: Option<PathBuf>,
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
    /// vCPUs of the microVM [default: the config's `vcpus`, 1].
    #[arg(long)]
    cpus: Option<u16>,
    /// Mount the root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// Seconds the microVM has to come up [default: the config's `boot_timeout_secs`, 60].
    #[arg(long, value_name = "SECS")]
    boot_timeout: Option<u64>,
}

/// Like docker run: 125 when bulkhead itself failed.
const EXIT_BULKHEAD_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = load_config(cli.config);
    if let Command::Doctor(args) = cli.command {
        // A broken config is one of the things doctor reports, not a reason to stop.
        init_logging(loaded.as_ref().map_or(DEFAULT_LOG_LEVEL, |c| &c.log_level));
        let report = diagnose(loaded, args.containerd_config.as_deref());
        print!("{}", report.render(use_colour()));
        return ExitCode::from(if report.passed() { 0 } else { 1 });
    }
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            eprintln!("bulkhead: {:#}", anyhow::Error::from(e));
            return ExitCode::from(EXIT_BULKHEAD_FAILED);
        }
    };
    init_logging(&config.log_level);
    match real_main(cli.command, config) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            ExitCode::from(EXIT_BULKHEAD_FAILED)
        }
    }
}

/// The file `--config` names, else what [`Config::load`] finds.
fn load_config(flag: Option<PathBuf>) -> Result<Config, ConfigError> {
    match flag {
        Some(path) => Config::load_file(ConfigFile {
            path,
            named_by: NamedBy::Flag,
        }),
        None => Config::load(),
    }
}

/// Logs to stderr, filtered by `$BULKHEAD_LOG` if set, else by `level` (the
/// config's `log_level`).
fn init_logging(level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL)),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn real_main(command: Command, config: Config) -> Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match command {
        Command::Exec(args) => {
            let interactive = args.process.interactive;
            let process = args.process.options(false);
            runtime.block_on(exec(&config.run_root, &args.name, &process, interactive))
        }
        Command::Run(args) => {
            let interactive = args.process.interactive;
            runtime.block_on(run(RunOptions {
                rootfs: args.rootfs,
                process: args.process.options(args.read_only),
                interactive,
                memory_mib: args.memory,
                cpus: args.cpus,
                boot_timeout: args.boot_timeout.map(Duration::from_secs),
                name: args.name,
                config,
            }))
        }
        Command::Doctor(_) => unreachable!("doctor runs before the runtime is built"),
    }
}
