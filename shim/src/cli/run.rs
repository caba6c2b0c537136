//! `bulkhead run --rootfs DIR -- CMD...`: one container in its own microVM,
//! with stdin, stdout, stderr and the exit status behaving as under runc.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bulkhead_protocol::agent::{
    CreateContainerRequest, RemoveContainerRequest, SignalProcessRequest, StartContainerRequest,
    StdioStreams, WaitProcessRequest,
};
use bulkhead_protocol::stream::{StreamHeader, StreamKind};
use bulkhead_protocol::ttrpc;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use super::artifacts::Artifacts;
use super::spec::{self, ProcessOptions};
use crate::sandbox::{Sandbox, SandboxConfig, RPC_TIMEOUT};

/// Memory the guest itself needs besides the container (kernel, agent, page cache).
pub const GUEST_OVERHEAD_MIB: u32 = 96;
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
    /// Container memory limit in MiB (the VM gets this plus the guest's overhead).
    pub memory_mib: Option<u32>,
    /// vCPUs.
    pub cpus: u16,
    /// Seconds the guest has to come up.
    pub boot_timeout: Duration,
    /// Where sandbox directories go.
    pub run_root: PathBuf,
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
    if opts.cpus == 0 {
        bail!("--cpus must be at least 1");
    }
    let id = new_id();
    let mut process = opts.process.clone();
    process.memory_limit = opts.memory_mib.map(|m| i64::from(m) << 20);
    let spec = spec::build(&process, &id, &id)?;
    let artifacts = Artifacts::discover()?;
    let config = SandboxConfig {
        id: id.clone(),
        run_root: opts.run_root.clone(),
        kernel: artifacts.kernel,
        initrd: artifacts.initrd,
        vmm: artifacts.vmm,
        virtiofsd: artifacts.virtiofsd,
        memory_mib: opts.memory_mib.unwrap_or(128) + GUEST_OVERHEAD_MIB,
        vcpus: opts.cpus,
        boot_timeout: opts.boot_timeout,
    };
    let rootfs = opts
        .rootfs
        .canonicalize()
        .with_context(|| format!("resolving {}", opts.rootfs.display()))?;
    let sandbox = Sandbox::start(&config, &[(id.as_str(), rootfs.as_path())]).await?;
    let result = run_in(&sandbox, &id, &spec, &opts).await;
    let console = sandbox.console_tail();
    let stopped = sandbox.stop().await;
    let code =
        result.with_context(|| format!("container {id}; last guest console lines:\n{console}"))?;
    stopped.context("cleaning up the sandbox")?;
    Ok(code)
}

async fn run_in(
    sandbox: &Sandbox,
    id: &str,
    spec: &oci_spec::runtime::Spec,
    opts: &RunOptions,
) -> Result<i32> {
    let agent = sandbox.agent();
    let terminal = opts.process.terminal;
    let mut stdio = StdioStreams::new();
    stdio.stdin = opts.interactive;
    stdio.stdout = true;
    stdio.stderr = !terminal;
    let mut create = CreateContainerRequest::new();
    create.container_id = id.to_owned();
    create.oci_spec_json = serde_json::to_vec(spec)?;
    create.rootfs_path = id.to_owned();
    create.stdio = Some(stdio).into();
    create.terminal = terminal;
    agent
        .create_container(ttrpc::context::with_duration(RPC_TIMEOUT), &create)
        .await
        .context("creating the container")?;

    let open =
        |kind| sandbox.open_stream_owned(StreamHeader::new(kind, id, "").expect("valid ids"));
    let out_kind = if terminal {
        StreamKind::Tty
    } else {
        StreamKind::Stdout
    };
    let stdout_stream = open(out_kind).await?;
    let stderr_stream = if terminal {
        None
    } else {
        Some(open(StreamKind::Stderr).await?)
    };
    let stdin_stream = if opts.interactive && !terminal {
        Some(open(StreamKind::Stdin).await?)
    } else {
        None
    };

    let mut start = StartContainerRequest::new();
    start.container_id = id.to_owned();
    agent
        .start_container(ttrpc::context::with_duration(RPC_TIMEOUT), &start)
        .await
        .context("starting the container")?;

    let (mut out_read, _out_write) = stdout_stream.into_split();
    let stdout_pump = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        let copied = tokio::io::copy(&mut out_read, &mut out).await;
        let _ = out.flush().await;
        copied
    });
    let stderr_pump = stderr_stream.map(|s| {
        tokio::spawn(async move {
            let (mut read, _write) = s.into_split();
            let mut err = tokio::io::stderr();
            let copied = tokio::io::copy(&mut read, &mut err).await;
            let _ = err.flush().await;
            copied
        })
    });
    if let Some(s) = stdin_stream {
        tokio::spawn(async move {
            let (_read, mut write) = s.into_split();
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut write).await;
            // EOF on our stdin: half-close, the agent closes the process's stdin.
            let _ = write.shutdown().await;
        });
    }

    let forward = forward_signals(sandbox, id);
    let mut wait = WaitProcessRequest::new();
    wait.container_id = id.to_owned();
    let status = tokio::select! {
        status = agent.wait_process(ttrpc::context::Context::default(), &wait) => status.context("waiting for the container")?,
        err = forward => return Err(err),
    };
    // Output written just before exit is still in flight: drain it, bounded.
    let drain = Duration::from_secs(10);
    let _ = tokio::time::timeout(drain, stdout_pump).await;
    if let Some(p) = stderr_pump {
        let _ = tokio::time::timeout(drain, p).await;
    }
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = id.to_owned();
    if let Err(e) = agent
        .remove_container(ttrpc::context::with_duration(RPC_TIMEOUT), &remove)
        .await
    {
        tracing::warn!(container = id, "RemoveContainer: {e}");
    }
    let code = status.shell_status().ok_or_else(|| {
        anyhow::anyhow!("the agent reported neither an exit code nor a signal for {id}")
    })?;
    Ok(code as i32)
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the container's process.
/// Only returns on failure.
async fn forward_signals(sandbox: &Sandbox, id: &str) -> anyhow::Error {
    let setup = || -> std::io::Result<_> {
        Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::quit())?,
        ))
    };
    let (mut int, mut term, mut hup, mut quit) = match setup() {
        Ok(s) => s,
        Err(e) => return anyhow::anyhow!("cannot handle signals: {e}"),
    };
    loop {
        let number = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = quit.recv() => libc::SIGQUIT,
        };
        let mut req = SignalProcessRequest::new();
        req.container_id = id.to_owned();
        req.signal = number as u32;
        if let Err(e) = sandbox
            .agent()
            .signal_process(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
        {
            return anyhow::anyhow!("forwarding signal {number} to container {id}: {e}");
        }
    }
}

/// A fresh container id: "bh-" and 12 hex digits of randomness.
fn new_id() -> String {
    let mut bytes = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("bh-{hex}")
}
