//! `bulkhead run --rootfs DIR -- CMD...`: one container in its own microVM,
//! with stdin, stdout, stderr and the exit status behaving as under runc.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulkhead_protocol::agent::{
    CreateContainerRequest, RemoveContainerRequest, StartContainerRequest, StatsContainerRequest,
};
use bulkhead_protocol::ttrpc;

use super::artifacts::Artifacts;
use super::process_io::{self, ProcessRef};
use super::spec::{self, ProcessOptions};
use crate::config::{Config, MAX_VCPUS};
use crate::sandbox::{AgentConnection, Sandbox, SandboxConfig, RPC_TIMEOUT};

pub use crate::config::GUEST_OVERHEAD_MIB;
/// Smallest container memory limit we accept.
pub const MIN_CONTAINER_MIB: u32 = 8;

/// Everything `bulkhead run` was asked.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The container's root file system on the host.
    pub rootfs: PathBuf,
    /// The process.
    pub process: ProcessOptions,
    /// Pass stdin through.
    pub interactive: bool,
    /// Container memory limit in MiB: the VM gets this plus the guest's
    /// overhead. Without it the container has no limit and the VM gets the
    /// config's `memory_mib`.
    pub memory_mib: Option<u32>,
    /// vCPUs (`--cpus`); the config's `vcpus` when not given.
    pub cpus: Option<u16>,
    /// How long the guest has to come up (`--boot-timeout`); the config's
    /// `boot_timeout_secs` when not given.
    pub boot_timeout: Option<Duration>,
    /// The container's name (also its sandbox id); random when not given.
    pub name: Option<String>,
    /// This host's settings: where the artifacts are, the defaults the flags
    /// above override, where sandbox directories go.
    pub config: Config,
}

/// Runs the container and returns the exit code the CLI should exit with.
pub async fn run(opts: RunOptions) -> Result<i32> {
    if !opts.rootfs.is_dir() {
        bail!("the rootfs {} is not a directory", opts.rootfs.display());
    }
    if let Some(m) = opts.memory_mib {
        if m < MIN_CONTAINER_MIB {
            bail!("--memory {m}: a container needs at least {MIN_CONTAINER_MIB} MiB (the VM adds {GUEST_OVERHEAD_MIB} MiB for the guest)");
        }
    }
    let vcpus = opts.cpus.unwrap_or(opts.config.vcpus);
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        bail!("--cpus {vcpus}: a microVM has 1 to {MAX_VCPUS} vCPUs");
    }
    let boot_timeout = opts.boot_timeout.unwrap_or(opts.config.boot_timeout());
    if boot_timeout.is_zero() {
        bail!("--boot-timeout 0: the microVM needs at least 1 s to come up");
    }
    let id = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("bh-{}", random_hex(6)));
    let mut process = opts.process.clone();
    process.memory_limit = opts.memory_mib.map(|m| i64::from(m) << 20);
    let spec = spec::build(&process, &id, &id)?;
    let artifacts = Artifacts::resolve(&opts.config)?;
    let config = SandboxConfig {
        id: id.clone(),
        run_root: opts.config.run_root.clone(),
        kernel: artifacts.kernel,
        initrd: artifacts.initrd,
        vmm: artifacts.vmm,
        virtiofsd: artifacts.virtiofsd,
        memory_mib: opts.memory_mib.map_or(opts.config.memory_mib, |m| {
            m.saturating_add(GUEST_OVERHEAD_MIB)
        }),
        vcpus,
        boot_timeout,
        virtiofsd_cache: opts.config.virtiofsd_cache.as_str(),
        debug_console: opts.config.debug_console,
    };
    let rootfs = opts
        .rootfs
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.rootfs.display()))?;
    // Until the container runs, a signal cancels the start: dropping the start
    // future kills what it spawned and removes the sandbox directory.
    let interrupted = first_signal();
    let shares = [(id.as_str(), rootfs.as_path())];
    let sandbox = tokio::select! {
        sandbox = Sandbox::start(&config, &shares) => sandbox?,
        number = interrupted => {
            eprintln!("bulkhead: interrupted by signal {number} while starting the microVM");
            return Ok(128 + number);
        }
    };
    let result = run_in(&sandbox, &id, &spec, &opts).await;
    let mut sandbox = sandbox;
    let console = sandbox.console_tail();
    // A failed RPC is usually the symptom (the connection closed); when the VM
    // itself died, its exit report is the cause.
    let vm_report = if result.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sandbox.vm_exit_report()
    } else {
        None
    };
    let stopped = sandbox.stop().await;
    let code = result.with_context(|| {
        let cause = vm_report.map(|r| format!("{r}\n")).unwrap_or_default();
        format!("container {id}: {cause}last guest console lines:\n{console}")
    })?;
    stopped.context("cleaning up the sandbox")?;
    Ok(code)
}

async fn run_in(
    sandbox: &Sandbox,
    id: &str,
    spec: &oci_spec::runtime::Spec,
    opts: &RunOptions,
) -> Result<i32> {
    let conn = sandbox.connection();
    let process = ProcessRef {
        container_id: id.to_owned(),
        exec_id: String::new(),
        interactive: opts.interactive,
        terminal: opts.process.terminal,
    };
    let mut create = CreateContainerRequest::new();
    create.container_id = id.to_owned();
    create.oci_spec_json = serde_json::to_vec(spec)?;
    create.rootfs_path = id.to_owned();
    create.stdio = Some(process.streams()).into();
    create.terminal = process.terminal;
    conn.agent()
        .create_container(ttrpc::context::with_duration(RPC_TIMEOUT), &create)
        .await
        .context("creating the container")?;
    let streams = process_io::open_streams(conn, &process).await?;
    let mut start = StartContainerRequest::new();
    start.container_id = id.to_owned();
    conn.agent()
        .start_container(ttrpc::context::with_duration(RPC_TIMEOUT), &start)
        .await
        .context("starting the container")?;
    let pumps = process_io::pump(streams, &process);
    let code = process_io::wait(conn, &process, pumps).await?;
    report_oom(conn, id, opts.memory_mib).await;
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = id.to_owned();
    if let Err(e) = conn
        .agent()
        .remove_container(ttrpc::context::with_duration(RPC_TIMEOUT), &remove)
        .await
    {
        tracing::warn!(container = id, "RemoveContainer: {e}");
    }
    Ok(code)
}

/// Says so on stderr when the kernel's OOM killer killed a process of the container.
async fn report_oom(conn: &AgentConnection, id: &str, limit_mib: Option<u32>) {
    let mut req = StatsContainerRequest::new();
    req.container_id = id.to_owned();
    let Ok(stats) = conn
        .agent()
        .stats_container(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
    else {
        return;
    };
    let kills = stats.memory.as_ref().map_or(0, |m| m.oom_kill);
    if kills > 0 {
        let limit = limit_mib
            .map(|m| format!(" (memory limit {m} MiB)"))
            .unwrap_or_default();
        eprintln!("bulkhead: container {id}: {kills} process(es) killed by the out-of-memory killer{limit}");
    }
}

/// The first of SIGINT, SIGTERM or SIGHUP. The handlers are installed here,
/// before the returned future is first polled (registering them also stops
/// them from killing the CLI outright, which would leave the VM behind).
fn first_signal() -> impl std::future::Future<Output = i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        }
    }
}

/// `n` random bytes as hex, for ids.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
