//! The process that holds one container's sandbox for its whole life: it
//! starts the microVM, mounts the rootfs and volumes into its share, creates
//! and starts the container, copies its output into the log (and to the
//! terminal when in the foreground), waits for it, records the exit status,
//! and tears everything down.
//!
//! A foreground `bulkhead run` is its own monitor. `bulkhead run -d` starts
//! `bulkhead __monitor ID` in a new session, so the container outlives the CLI;
//! other commands find it through the container's state file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bulkhead_protocol::agent::{
    CreateContainerRequest, RemoveContainerRequest, StartContainerRequest, StatsContainerRequest,
};
use bulkhead_protocol::ttrpc;
use nix::mount::{mount, MsFlags};
use oci_spec::runtime::{Mount, MountBuilder, Spec};

use super::containers::{
    now_millis, this_monitor, ContainerRecord, ContainerState, Containers, Status,
};
use super::network;
use super::spec;
use crate::config::{Config, GUEST_OVERHEAD_MIB};
use crate::sandbox::artifacts::Artifacts;
use crate::sandbox::container_log::LogWriter;
use crate::sandbox::process_io::{self, OutputSinks, ProcessRef};
use crate::sandbox::{guest_share_path, AgentConnection, Sandbox, SandboxError, RPC_TIMEOUT};

/// How the monitor's container is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// Output to our terminal too, stdin if `-i`, signals forwarded.
    Foreground,
    /// Output only to the log.
    Detached,
}

/// Runs container `id` to its end and returns its exit code. Its state file
/// says `running` once it runs, and `exited` (with the code or the error)
/// when it ends, whatever happened.
pub async fn supervise(
    config: &Config,
    containers: &Containers,
    id: &str,
    attach: Attach,
) -> Result<i32> {
    let record = containers.record(id)?;
    let mut state = ContainerState {
        monitor: this_monitor(),
        ..Default::default()
    };
    containers.set_state(id, &state)?;
    let outcome = start_and_wait(config, containers, &record, &mut state, attach).await;
    state.status = Status::Exited;
    state.finished_at = Some(now_millis());
    match &outcome {
        Ok(code) => state.exit_code = Some(*code),
        Err(e) => {
            state.error = Some(format!("{e:#}"));
            state.exit_code = Some(125);
        }
    }
    containers.set_state(id, &state)?;
    if record.auto_remove {
        containers
            .remove(id)
            .with_context(|| format!("removing container {} (--rm)", record.name))?;
    }
    outcome
}

async fn start_and_wait(
    config: &Config,
    containers: &Containers,
    record: &ContainerRecord,
    state: &mut ContainerState,
    attach: Attach,
) -> Result<i32> {
    let sid = record.short_id().to_owned();
    let dir = containers.dir(&record.id);
    let artifacts = Artifacts::resolve(config)?;
    let memory_mib = record.memory_limit.map_or(config.memory_mib, |bytes| {
        ((bytes >> 20) as u32).saturating_add(GUEST_OVERHEAD_MIB)
    });
    let vcpus = record.cpus.map_or(config.vcpus, |c| {
        c.ceil().clamp(1.0, f64::from(crate::config::MAX_VCPUS)) as u16
    });
    let boot_timeout = record
        .boot_timeout_secs
        .map_or(config.boot_timeout(), std::time::Duration::from_secs);
    let sandbox_config =
        artifacts.sandbox_config(config, sid.clone(), vcpus, memory_mib, boot_timeout);
    let hostname = record.hostname.clone().unwrap_or_else(|| sid.clone());
    let mut spec = spec::build(&record.process, &sid, &hostname)?;
    // Until the container runs, a signal cancels the start: dropping the start
    // future kills what it spawned and removes the sandbox directory (and the
    // network is taken down below).
    let interrupted = super::run::first_signal();
    let started = tokio::select! {
        started = async {
            let pending = network::prepare(config, &dir, &sid, &record.network).await?;
            let (attachment, cni, reserved) = match pending {
                Some(p) => (Some(p.attachment), Some(p.cni), p.reserved),
                None => (None, None, Vec::new()),
            };
            // CNI's plugins take longer than the VM's start: both at once,
            // the VM on the tap alone, joined to CNI's interface once it is
            // there.
            let connect = async {
                match cni {
                    Some(cni) => cni.connect().await.map(Some),
                    None => Ok(None),
                }
            };
            let boot = Sandbox::start_on_network(&sandbox_config, &[], attachment.as_ref());
            let (connected, booted) = tokio::join!(connect, boot);
            let mut sandbox = booted
                .with_context(|| format!("starting the microVM of container {}", record.name))?;
            let guest = match connected {
                Ok(Some(_)) => {
                    match sandbox.join_network(network::IFNAME, &record.network.egress).await {
                        Ok(Some(guest)) => Some(guest),
                        Ok(None) => {
                            let _ = sandbox.stop().await;
                            anyhow::bail!("CNI made no {} in the container's namespace", network::IFNAME);
                        }
                        Err(e) => {
                            let _ = sandbox.stop().await;
                            return Err(anyhow::Error::from(e).context("joining the microVM to its network"));
                        }
                    }
                }
                Ok(None) => None,
                Err(e) => {
                    let _ = sandbox.stop().await;
                    return Err(e);
                }
            };
            Ok::<_, anyhow::Error>((sandbox, guest, reserved))
        } => Ok(started),
        number = interrupted => {
            let why = format!("interrupted by signal {number} while starting the microVM");
            eprintln!("bulkhead: {why}");
            state.error = Some(why);
            Err(number)
        }
    };
    let (mut sandbox, guest, reserved) = match started {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => {
            take_network_down(&dir).await;
            return Err(e);
        }
        Err(number) => {
            take_network_down(&dir).await;
            return Ok(128 + number);
        }
    };
    let addresses: Vec<std::net::IpAddr> = guest
        .as_ref()
        .map(|g| g.addresses.iter().map(|c| c.addr).collect())
        .unwrap_or_default();
    // The published ports stay held until the end.
    let _reserved = reserved;
    let result = async {
        share_rootfs(&mut sandbox, record, &dir, &sid)?;
        add_volumes(&mut sandbox, &mut spec, record, &sid)?;
        add_name_files(
            &mut sandbox,
            &mut spec,
            record,
            &dir,
            &sid,
            &hostname,
            &addresses,
        )?;
        if let network::NetworkMode::Named(name) = &record.network.mode {
            network::refresh_hosts(config, name);
        }
        // A foreground `--rm` container's log could only be read while it
        // runs, from another shell; not writing it keeps its output as fast
        // as the terminal takes it.
        let log = if attach == Attach::Foreground && record.auto_remove {
            None
        } else {
            Some(
                LogWriter::open(&dir.join("log"))
                    .with_context(|| format!("opening {}", dir.join("log").display()))?,
            )
        };
        let sinks = OutputSinks {
            terminal: attach == Attach::Foreground,
            log,
        };
        run_container(
            &sandbox, record, &sid, &spec, &sinks, containers, state, attach,
        )
        .await
    }
    .await;
    let console = sandbox.console_tail();
    // A failed RPC is usually the symptom (the connection closed); when the VM
    // itself died, its exit report is the cause.
    let vm_report = if result.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        sandbox.vm_exit_report()
    } else {
        None
    };
    // Independent, and CNI's DEL is the slower: at once.
    let (stopped, ()) = tokio::join!(sandbox.stop(), take_network_down(&dir));
    if let network::NetworkMode::Named(name) = &record.network.mode {
        network::refresh_hosts(config, name);
    }
    let code = result.with_context(|| {
        let cause = vm_report.map(|r| format!("{r}\n")).unwrap_or_default();
        format!(
            "container {}: {cause}last guest console lines:\n{console}",
            record.name
        )
    })?;
    stopped.context("cleaning up the sandbox")?;
    Ok(code)
}

/// Takes the container's network down, saying so if that fails (the
/// leftovers are named; `bulkhead rm` tries again).
async fn take_network_down(dir: &Path) {
    if let Err(e) = network::down(dir).await {
        eprintln!("bulkhead: warning: taking the container's network down: {e:#}");
    }
}

/// `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`, written in the
/// container's directory, shared with the guest and bind-mounted over the
/// image's, as docker does (so the image's own files stay untouched). A
/// container without a network still gets its name and localhost.
#[allow(clippy::too_many_arguments)]
fn add_name_files(
    sandbox: &mut Sandbox,
    spec: &mut Spec,
    record: &ContainerRecord,
    dir: &Path,
    sid: &str,
    hostname: &str,
    addresses: &[std::net::IpAddr],
) -> Result<()> {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let files = [
        (
            "hosts",
            network::hosts_file(
                &format!("{} {hostname}", record.name),
                addresses,
                &record.network.extra_hosts,
            ),
        ),
        (
            "resolv.conf",
            network::resolv_conf(&host_resolv, &record.network.dns),
        ),
        ("hostname", format!("{hostname}\n")),
    ];
    for (name, text) in &files {
        let path = etc.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let share_name = format!("{sid}-etc");
    sandbox.bind_into_share(&etc, &share_name)?;
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (name, _) in &files {
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from("/etc").join(name))
                .typ("bind")
                .source(guest_share_path(&share_name).join(name))
                .options(vec![
                    "rbind".to_owned(),
                    "rprivate".to_owned(),
                    "rw".to_owned(),
                ])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// The rootfs into the share under the sandbox id: an image's as an overlay
/// (the image's unpacked rootfs read-only below, the container's own
/// `upper` above), a `--rootfs` directory as a bind mount.
fn share_rootfs(
    sandbox: &mut Sandbox,
    record: &ContainerRecord,
    dir: &Path,
    sid: &str,
) -> Result<()> {
    if let Some(rootfs) = &record.rootfs {
        sandbox.bind_into_share(rootfs, sid)?;
        return Ok(());
    }
    let lower = record
        .image_rootfs
        .as_ref()
        .context("the container record names neither an image nor a rootfs")?;
    // overlayfs refuses an upper layer on overlayfs, with only EINVAL to say so.
    if nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC)
    {
        anyhow::bail!(
            "the container directory {} is on overlayfs, which cannot hold a container's writable layer: \
             set state_root in the config (or $BULKHEAD_ROOT) to a directory on ext4, xfs, btrfs or tmpfs",
            dir.display()
        );
    }
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    sandbox.mount_into_share(sid, |target| {
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| {
            SandboxError::Agent(format!(
                "cannot mount the overlay rootfs of {} ({options}) at {}: {e}",
                record.name,
                target.display()
            ))
        })
    })?;
    Ok(())
}

/// Each `-v` into the share (`<sid>-v<N>`), and into the spec as a bind mount
/// of that share path. A read-only volume is read-only twice: in the guest's
/// mount, and on the host's bind, so not even the guest's virtio-fs server
/// can write there.
fn add_volumes(
    sandbox: &mut Sandbox,
    spec: &mut Spec,
    record: &ContainerRecord,
    sid: &str,
) -> Result<()> {
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (n, volume) in record.volumes.iter().enumerate() {
        let name = format!("{sid}-v{n}");
        if !volume.host.exists() {
            // Docker creates a missing host directory.
            std::fs::create_dir_all(&volume.host).with_context(|| {
                format!("-v: creating the host directory {}", volume.host.display())
            })?;
        }
        let target = sandbox.bind_into_share(&volume.host, &name)?;
        if volume.read_only {
            // The bind is recursive: every mount in it becomes read-only,
            // not just the top one.
            let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            for m in crate::sandbox::mounts_under(&target) {
                mount(None::<&str>, &m, None::<&str>, flags, None::<&str>).with_context(|| {
                    format!(
                        "making {} (of the volume {}) read-only",
                        m.display(),
                        volume.host.display()
                    )
                })?;
            }
        }
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        options.push(if volume.read_only { "ro" } else { "rw" }.to_owned());
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from(&volume.container))
                .typ("bind")
                .source(guest_share_path(&name))
                .options(options)
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_container(
    sandbox: &Sandbox,
    record: &ContainerRecord,
    sid: &str,
    spec: &Spec,
    sinks: &OutputSinks,
    containers: &Containers,
    state: &mut ContainerState,
    attach: Attach,
) -> Result<i32> {
    let conn = sandbox.connection();
    let process = ProcessRef {
        container_id: sid.to_owned(),
        exec_id: String::new(),
        interactive: record.interactive && attach == Attach::Foreground,
        terminal: record.process.terminal,
    };
    let mut create = CreateContainerRequest::new();
    create.container_id = sid.to_owned();
    create.oci_spec_json = serde_json::to_vec(spec)?;
    create.rootfs_path = sid.to_owned();
    create.stdio = Some(process.streams()).into();
    create.terminal = process.terminal;
    conn.agent()
        .create_container(ttrpc::context::with_duration(RPC_TIMEOUT), &create)
        .await
        .context("creating the container")?;
    let streams = process_io::open_streams(conn, &process).await?;
    let mut start = StartContainerRequest::new();
    start.container_id = sid.to_owned();
    conn.agent()
        .start_container(ttrpc::context::with_duration(RPC_TIMEOUT), &start)
        .await
        .context("starting the container")?;
    state.status = Status::Running;
    state.started_at = Some(now_millis());
    containers.set_state(&record.id, state)?;
    let pumps = process_io::pump(streams, &process, sinks);
    let code = process_io::wait(conn, &process, pumps).await?;
    tracing::debug!(container = sid, code, "the container's process exited");
    state.oom_killed = oom_killed(conn, sid).await;
    if state.oom_killed && attach == Attach::Foreground {
        let limit = record
            .memory_limit
            .map(|m| format!(" (memory limit {} MiB)", m >> 20))
            .unwrap_or_default();
        eprintln!(
            "bulkhead: container {}: a process was killed by the out-of-memory killer{limit}",
            record.name
        );
    }
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = sid.to_owned();
    if let Err(e) = conn
        .agent()
        .remove_container(ttrpc::context::with_duration(RPC_TIMEOUT), &remove)
        .await
    {
        tracing::warn!(container = sid, "RemoveContainer: {e}");
    }
    tracing::debug!(container = sid, "removed in the guest");
    Ok(code)
}

/// Whether the kernel's OOM killer killed a process of the container.
async fn oom_killed(conn: &AgentConnection, sid: &str) -> bool {
    let mut req = StatsContainerRequest::new();
    req.container_id = sid.to_owned();
    match conn
        .agent()
        .stats_container(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
    {
        Ok(stats) => stats.memory.as_ref().is_some_and(|m| m.oom_kill > 0),
        Err(_) => false,
    }
}
