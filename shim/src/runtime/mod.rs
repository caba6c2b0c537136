//! `bulkhead-runtime`: runc's command line, so podman, Docker 20.10, buildah
//! and containerd's runc shim run containers in bulkhead microVMs.
//!
//! - [`args`]: the command line as engines call it;
//! - [`state`]: each container's record under `--root`;
//! - [`handoff`]: how `create` leaves a process behind for the engine;
//! - [`keeper`]: that process, which holds the container's VM;
//! - [`console`]: the pty sent to an engine's console socket;
//! - [`host_cgroup`]: the spec's cgroup on the host, for the keeper and its VM;
//! - [`commands`] and [`exec`]: the commands.
//!
//! The VM lifecycle is the sandbox core's ([`crate::sandbox::bundle`]), the
//! same as the containerd shim's.

pub mod args;
pub mod commands;
pub mod console;
pub mod exec;
pub mod handoff;
pub mod host_cgroup;
pub mod keeper;
pub mod log_format;
pub mod state;

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::Parser;
use oci_spec::runtime::LinuxResources;

use args::{Cli, Command, LogFormat};
use state::Root;

/// What `--version` prints, in runc's shape (engines show its first line).
pub const VERSION_LINE: &str = concat!(
    "bulkhead-runtime version ",
    env!("CARGO_PKG_VERSION"),
    "\nspec: 1.0.2\nisolation: microVM (KVM)"
);

/// Runs the command line; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 1 } else { 0 };
        }
    };
    if cli.version {
        println!("{VERSION_LINE}");
        return 0;
    }
    let Some(command) = &cli.command else {
        eprintln!("bulkhead-runtime: no command given; see --help");
        return 1;
    };
    init_logging(&cli, command);
    tracing::debug!(args = ?std::env::args().skip(1).collect::<Vec<_>>(), "bulkhead-runtime");
    match run(&cli, command) {
        Ok(code) => code,
        Err(e) => {
            report_error(&cli, &e);
            1
        }
    }
}

fn run(cli: &Cli, command: &Command) -> Result<i32> {
    if cli.rootless.as_deref().is_some_and(|v| v != "false") {
        bail!(
            "--rootless is not supported: a microVM needs /dev/kvm and a tap device, run as root"
        );
    }
    let root = Root::new(cli.root.clone());
    let async_rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
    };
    match command {
        Command::Create(args) => {
            commands::create(&root, args, &global_args())?;
            Ok(0)
        }
        Command::Start { id } => {
            commands::start(&root, id)?;
            Ok(0)
        }
        Command::Run { create, detach, .. } => {
            let keeper = commands::create(&root, create, &global_args())?;
            if let Err(e) = commands::start(&root, &create.id) {
                let _ = commands::delete(&root, &create.id, true);
                return Err(e);
            }
            if *detach {
                return Ok(0);
            }
            // Our child: its status is the container's.
            let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(keeper as i32), None)
                .context("waiting for the container")?;
            let code = match status {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                nix::sys::wait::WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
                _ => 255,
            };
            commands::delete(&root, &create.id, true)?;
            Ok(code)
        }
        Command::State { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&commands::state(&root, id)?)?
            );
            Ok(0)
        }
        Command::Kill { all, id, signal } => {
            async_rt()?.block_on(commands::kill(&root, id, signal, *all))?;
            Ok(0)
        }
        Command::Delete { force, id } => {
            commands::delete(&root, id, *force)?;
            Ok(0)
        }
        Command::Exec(args) => exec::exec(&root, args, &global_args()),
        Command::Ps { format, id, .. } => {
            print!("{}", async_rt()?.block_on(commands::ps(&root, id, format))?);
            Ok(0)
        }
        Command::List { format, quiet } => {
            print!("{}", commands::list(&root, format, *quiet)?);
            Ok(0)
        }
        Command::Events {
            stats,
            interval,
            id,
        } => {
            let every = humantime::parse_duration(interval)
                .with_context(|| format!("--interval {interval}: e.g. 5s"))?;
            async_rt()?.block_on(async {
                loop {
                    let doc = commands::stats(&root, id).await?;
                    println!("{doc}");
                    let _ = std::io::stdout().flush();
                    if *stats {
                        return Ok::<_, anyhow::Error>(());
                    }
                    tokio::time::sleep(every).await;
                }
            })?;
            Ok(0)
        }
        Command::Update {
            resources,
            memory,
            cpu_quota,
            cpu_period,
            pids_limit,
            id,
        } => {
            let resources = update_resources(
                resources.as_deref(),
                memory.as_deref(),
                *cpu_quota,
                *cpu_period,
                *pids_limit,
            )?;
            async_rt()?.block_on(commands::update(&root, id, resources))?;
            Ok(0)
        }
        Command::Pause { id } => {
            async_rt()?.block_on(commands::freeze(&root, id, true))?;
            Ok(0)
        }
        Command::Resume { id } => {
            async_rt()?.block_on(commands::freeze(&root, id, false))?;
            Ok(0)
        }
        Command::Features => {
            println!("{}", serde_json::to_string_pretty(&commands::features())?);
            Ok(0)
        }
        Command::Spec { bundle } => {
            commands::write_spec(bundle)?;
            Ok(0)
        }
        Command::Checkpoint { .. } | Command::Restore { .. } => bail!(
            "checkpoint and restore are not supported by bulkhead-runtime yet: \
             they need snapshots of a running microVM"
        ),
        Command::Keeper {
            ready_fd,
            console_socket,
            id,
        } => Ok(keeper::main(
            root,
            id.clone(),
            *ready_fd,
            console_socket.clone(),
        )),
    }
}

/// The arguments before the subcommand (`--root`, `--log`, ...), for the
/// processes we start to see the same state and log.
fn global_args() -> Vec<OsString> {
    let names = [
        "create", "start", "run", "exec", "kill", "delete", "state", "__keeper",
    ];
    std::env::args_os()
        .skip(1)
        .take_while(|a| !names.iter().any(|n| a == n))
        .collect()
}

/// `update`'s resources: the `--resources` file (or stdin) with the flags
/// on top.
fn update_resources(
    file: Option<&Path>,
    memory: Option<&str>,
    cpu_quota: Option<i64>,
    cpu_period: Option<u64>,
    pids_limit: Option<i64>,
) -> Result<LinuxResources> {
    let mut resources: LinuxResources = match file {
        Some(p) if p == Path::new("-") => {
            serde_json::from_reader(std::io::stdin()).context("parsing the resources on stdin")?
        }
        Some(p) => serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing the resources in {}", p.display()))?,
        None => LinuxResources::default(),
    };
    if let Some(m) = memory {
        let bytes: i64 = m
            .parse()
            .with_context(|| format!("--memory {m}: a number of bytes"))?;
        let mut mem = resources.memory().unwrap_or_default();
        mem.set_limit(Some(bytes));
        resources.set_memory(Some(mem));
    }
    if cpu_quota.is_some() || cpu_period.is_some() {
        let mut cpu = resources.cpu().clone().unwrap_or_default();
        if cpu_quota.is_some() {
            cpu.set_quota(cpu_quota);
        }
        if cpu_period.is_some() {
            cpu.set_period(cpu_period);
        }
        resources.set_cpu(Some(cpu));
    }
    if let Some(limit) = pids_limit {
        let mut pids = resources.pids().unwrap_or_default();
        pids.set_limit(limit);
        resources.set_pids(Some(pids));
    }
    Ok(resources)
}

/// Logs go to `--log` (engines read runc's errors there), else, for the
/// keeper, to the container's `runtime.log`: never to stderr, which is the
/// container's.
fn init_logging(cli: &Cli, command: &Command) {
    let path = match (&cli.log, command) {
        (Some(p), _) => Some(p.clone()),
        (None, Command::Keeper { id, .. }) => Some(Root::new(cli.root.clone()).keeper_log(id)),
        _ => None,
    };
    let level = if cli.debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let Some(path) = path else {
        return;
    };
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    else {
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    let _ = match cli.log_format {
        LogFormat::Json => builder.event_format(log_format::RuncJson).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// An error on stderr (podman shows it) and, with `--log`, in runc's log
/// format (containerd's runc shim reads the last error line from there).
fn report_error(cli: &Cli, e: &anyhow::Error) {
    let msg = format!("{e:#}");
    eprintln!("bulkhead-runtime: {msg}");
    let Some(path) = &cli.log else {
        return;
    };
    let time = state::now_rfc3339();
    let line = match cli.log_format {
        LogFormat::Json => {
            serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
        }
        LogFormat::Text => format!("time={time:?} level=error msg={msg:?}"),
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
