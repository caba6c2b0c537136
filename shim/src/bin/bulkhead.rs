//! `bulkhead`: run containers in microVMs from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bulkhead::cli::doctor::{diagnose, use_colour};
use bulkhead::cli::exec::{exec, ExecOptions};
use bulkhead::cli::flags::{parse_cpus, parse_memory, parse_signal, parse_volume, read_env_file};
use bulkhead::cli::monitor::{supervise, Attach};
use bulkhead::cli::run::{run, RunOptions, Source};
use bulkhead::cli::{images, manage};
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
    /// Run a command in a new container, in its own microVM; exits with its
    /// status (or prints its id with -d).
    Run(RunArgs),
    /// Run another command in a running container.
    Exec(ExecArgs),
    /// List containers (running ones; all with -a).
    Ps(PsArgs),
    /// Print a container's output (stdout and stderr as written).
    Logs(LogsArgs),
    /// Stop containers: their stop signal, then SIGKILL after a grace period.
    Stop(StopArgs),
    /// Send a signal to containers.
    Kill(KillArgs),
    /// Remove stopped containers (running ones too, with -f).
    Rm(RmArgs),
    /// Show containers' settings and state as JSON.
    Inspect(NamesArgs),
    /// Pull an image from a registry.
    Pull(PullArgs),
    /// Load images from an OCI layout (directory or tar) or a `docker save` tarball.
    Load(LoadArgs),
    /// List images.
    Images(ImagesArgs),
    /// Remove images.
    Rmi(RmiArgs),
    /// Check that this host can run bulkhead, and say how to fix what is missing;
    /// exits 1 if a check failed.
    Doctor(DoctorArgs),
    /// (internal) Hold a detached container's microVM for its life.
    #[command(name = "__monitor", hide = true)]
    Monitor {
        /// The container's id.
        id: String,
    },
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// The containerd config to check for bulkhead's runtime [default: /etc/containerd/config.toml].
    #[arg(long, value_name = "FILE")]
    containerd_config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
struct ExecArgs {
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
    /// User (name or UID, optionally :group) to run as.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// The container's name or id.
    container: String,
    /// The command and its arguments.
    #[arg(allow_hyphen_values = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Run on this host directory as the root file system instead of an image
    /// (then every argument is the command).
    #[arg(long, value_name = "DIR")]
    rootfs: Option<PathBuf>,
    /// Name the container; a random one otherwise.
    #[arg(long)]
    name: Option<String>,
    /// Run in the background and print the container's id.
    #[arg(short, long)]
    detach: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Give the process a terminal (pty).
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Read environment variables from a file, one KEY=VALUE per line (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Bind a host directory into the container, read-only with :ro (repeatable).
    #[arg(short, long = "volume", value_name = "HOST:CTR[:ro]")]
    volume: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User (name or UID, optionally :group) to run as.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Override the image's entrypoint ("" for none).
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Memory limit of the container, e.g. 256m or 1g (the microVM gets this
    /// plus the guest's share).
    #[arg(short, long, value_name = "SIZE")]
    memory: Option<String>,
    /// CPUs for the container, e.g. 1.5 (the microVM gets that many vCPUs,
    /// rounded up) [default: the config's `vcpus`, 1].
    #[arg(long)]
    cpus: Option<String>,
    /// Mount the root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// Seconds the microVM has to come up [default: the config's `boot_timeout_secs`, 60].
    #[arg(long, value_name = "SECS")]
    boot_timeout: Option<u64>,
    /// IMAGE [CMD...], or with --rootfs: CMD...
    #[arg(allow_hyphen_values = true, value_name = "IMAGE [CMD]")]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PsArgs {
    /// All containers, not only running ones.
    #[arg(short, long)]
    all: bool,
    /// Only ids.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// Keep printing new output until the container exits.
    #[arg(short, long)]
    follow: bool,
    /// The container's name or id.
    container: String,
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL.
    #[arg(short, long = "time", default_value_t = 10)]
    time: u64,
    /// Names or ids.
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct KillArgs {
    /// The signal (name or number).
    #[arg(short, long, default_value = "KILL")]
    signal: String,
    /// Names or ids.
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct RmArgs {
    /// Kill and remove running containers too.
    #[arg(short, long)]
    force: bool,
    /// Names or ids.
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct NamesArgs {
    /// Names or ids.
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PullArgs {
    /// Allow plain HTTP to this registry (host[:port]; localhost always may).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// The image, e.g. busybox, busybox:1.36, ghcr.io/org/app@sha256:...
    reference: String,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The archive: an OCI layout (directory or tar) or a `docker save` tarball.
    #[arg(short, long, value_name = "FILE")]
    input: PathBuf,
    /// The name to give an image the archive does not name.
    #[arg(long, value_name = "NAME[:TAG]")]
    tag: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ImagesArgs {
    /// Only ids.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct RmiArgs {
    /// Remove even if containers use it.
    #[arg(short, long)]
    force: bool,
    /// Names or ids.
    #[arg(required = true)]
    images: Vec<String>,
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
    runtime.block_on(dispatch(command, config))
}

async fn dispatch(command: Command, config: Config) -> Result<i32> {
    match command {
        Command::Run(args) => run(run_options(args, config)?).await,
        Command::Exec(args) => {
            let opts = ExecOptions {
                args: args.command,
                env: args.env,
                workdir: args.workdir,
                user: args.user,
                tty: args.tty,
                interactive: args.interactive,
            };
            exec(&config, &args.container, &opts).await
        }
        Command::Ps(args) => manage::ps(&config, args.all, args.quiet).map(|()| 0),
        Command::Logs(args) => manage::logs(&config, &args.container, args.follow)
            .await
            .map(|()| 0),
        Command::Stop(args) => {
            for c in &args.containers {
                manage::stop(&config, c, Duration::from_secs(args.time)).await?;
            }
            Ok(0)
        }
        Command::Kill(args) => {
            let signal = parse_signal(&args.signal)?;
            for c in &args.containers {
                manage::kill(&config, c, signal).await?;
            }
            Ok(0)
        }
        Command::Rm(args) => manage::rm(&config, &args.containers, args.force)
            .await
            .map(|()| 0),
        Command::Inspect(args) => manage::inspect(&config, &args.containers).map(|()| 0),
        Command::Pull(args) => images::pull(&config, &args.reference, &args.insecure_registry)
            .await
            .map(|()| 0),
        Command::Load(args) => images::load(&config, &args.input, args.tag).map(|()| 0),
        Command::Images(args) => images::list(&config, args.quiet).map(|()| 0),
        Command::Rmi(args) => images::remove(&config, &args.images, args.force).map(|()| 0),
        Command::Monitor { id } => {
            let containers = manage::containers(&config)?;
            supervise(&config, &containers, &id, Attach::Detached).await
        }
        Command::Doctor(_) => unreachable!("doctor runs before the runtime is built"),
    }
}

fn run_options(args: RunArgs, config: Config) -> Result<RunOptions> {
    let mut positional = args.args.into_iter();
    let source = match args.rootfs {
        Some(dir) => Source::Rootfs(dir),
        None => Source::Image(positional.next().ok_or_else(|| {
            anyhow::anyhow!(
                "no image given, e.g. `bulkhead run busybox echo hello` (or --rootfs DIR -- CMD)"
            )
        })?),
    };
    let mut env = Vec::new();
    for file in &args.env_file {
        env.extend(read_env_file(file)?);
    }
    // `-e NAME` takes NAME's value from here, or is left out, as in Docker.
    env.extend(args.env.into_iter().filter_map(|kv| {
        if kv.contains('=') {
            Some(kv)
        } else {
            std::env::var(&kv).ok().map(|v| format!("{kv}={v}"))
        }
    }));
    Ok(RunOptions {
        source,
        command: positional.collect(),
        entrypoint: args.entrypoint,
        env,
        workdir: args.workdir,
        user: args.user,
        tty: args.tty,
        interactive: args.interactive,
        detach: args.detach,
        auto_remove: args.rm,
        read_only: args.read_only,
        memory: args.memory.as_deref().map(parse_memory).transpose()?,
        cpus: args.cpus.as_deref().map(parse_cpus).transpose()?,
        volumes: args
            .volume
            .iter()
            .map(|v| parse_volume(v))
            .collect::<Result<_>>()?,
        boot_timeout: args.boot_timeout.map(Duration::from_secs),
        name: args.name,
        config,
    })
}
