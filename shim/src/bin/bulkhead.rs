//! `bulkhead`: run containers in microVMs from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use bulkhead::cli::args::{Cli, Command, NetworkCommand, RunArgs};
use bulkhead::cli::colour;
use bulkhead::cli::doctor::diagnose;
use bulkhead::cli::exec::{exec, ExecOptions};
use bulkhead::cli::flags::{parse_cpus, parse_memory, parse_signal, parse_volume, read_env_file};
use bulkhead::cli::monitor::{supervise, Attach};
use bulkhead::cli::network::{self, NetworkOptions};
use bulkhead::cli::run::{run, RunOptions, Source};
use bulkhead::cli::{images, manage};
use bulkhead::config::{Config, ConfigError, ConfigFile, NamedBy, DEFAULT_LOG_LEVEL};
use clap::Parser;

/// Like docker run: 125 when bulkhead itself failed.
const EXIT_BULKHEAD_FAILED: u8 = 125;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap's own message names the bad flag or value and hints at the
            // fix. Misuse exits 125, as docker's does; --help and --version
            // are not errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                EXIT_BULKHEAD_FAILED
            } else {
                0
            });
        }
    };
    if let Command::Completion(args) = &cli.command {
        clap_complete::generate(
            args.shell,
            &mut bulkhead::cli::args::command(),
            "bulkhead",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let loaded = load_config(cli.config);
    if let Command::Doctor(args) = cli.command {
        // A broken config is one of the things doctor reports, not a reason to stop.
        init_logging(loaded.as_ref().map_or(DEFAULT_LOG_LEVEL, |c| &c.log_level));
        let report = diagnose(loaded, args.containerd_config.as_deref());
        print!("{}", report.render(colour::enabled(&std::io::stdout())));
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
    // The first line of every debug log: which build was asked to do what.
    tracing::debug!(
        version = env!("CARGO_PKG_VERSION"),
        args = ?std::env::args().skip(1).collect::<Vec<_>>(),
        "bulkhead started"
    );
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
        .with_ansi(colour::enabled(&std::io::stderr()))
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
        Command::Network(cmd) => {
            match cmd {
                NetworkCommand::Create { subnet, name } => {
                    network::create(&config, &name, subnet.as_deref())?
                }
                NetworkCommand::Ls { quiet } => network::list(&config, quiet)?,
                NetworkCommand::Rm { names } => network::remove(&config, &names).await?,
                NetworkCommand::Inspect { names } => network::inspect(&config, &names)?,
            }
            Ok(0)
        }
        Command::Monitor { id } => {
            let containers = manage::containers(&config)?;
            supervise(&config, &containers, &id, Attach::Detached).await
        }
        Command::Doctor(_) | Command::Completion(_) => {
            unreachable!("doctor and completion run before the runtime is built")
        }
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
        cap_add: args.cap_add,
        cap_drop: args.cap_drop,
        security: bulkhead::cli::security::security_opts(&args.security_opt)?,
        ulimits: args.ulimit,
        sysctls: args.sysctl,
        tmpfs: args.tmpfs,
        shm_size: args
            .shm_size
            .as_deref()
            .map(bulkhead::cli::kernel_opts::shm_size)
            .transpose()?,
        memory: args.memory.as_deref().map(parse_memory).transpose()?,
        cpus: args.cpus.as_deref().map(parse_cpus).transpose()?,
        volumes: args
            .volume
            .iter()
            .map(|v| parse_volume(v))
            .collect::<Result<_>>()?,
        boot_timeout: args.boot_timeout.map(Duration::from_secs),
        name: args.name,
        network: NetworkOptions {
            mode: args
                .network
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or_default(),
            publish: args
                .publish
                .iter()
                .map(|p| network::parse_publish(p))
                .collect::<Result<_>>()?,
            dns: args
                .dns
                .iter()
                .map(|d| {
                    d.parse()
                        .map_err(|_| anyhow::anyhow!("--dns {d:?}: not an IP address"))
                })
                .collect::<Result<_>>()?,
            extra_hosts: args
                .add_host
                .iter()
                .map(|h| network::parse_add_host(h))
                .collect::<Result<_>>()?,
            egress: args
                .egress
                .as_deref()
                .unwrap_or(&config.egress)
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?,
        },
        hostname: args.hostname,
        config,
    })
}
