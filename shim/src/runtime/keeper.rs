//! The keeper: the host process that stands for a container's init. It boots
//! the container's microVM on the engine's network namespace, runs the
//! spec's host-side hooks (`prestart`, `createRuntime`: Docker wires its
//! network there), shares the bundle's rootfs and the spec's host mounts,
//! creates the container in the guest, and reports ready to `create`. On `start` (through its control
//! socket) it starts the init, carries its stdio (the engine's pipes, or a
//! pty sent to the engine's console socket), forwards the signals it gets,
//! and when the init exits it records the status, stops the VM and exits
//! with that status (128 + signal when killed), as runc's init would.
//!
//! The VM and virtiofsd die with it (`PR_SET_PDEATHSIG`), so an engine that
//! kills it with SIGKILL leaves no VM behind; `delete` removes the rest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bulkhead_protocol::agent::{
    CreateContainerRequest, RemoveContainerRequest, StartContainerRequest,
};
use bulkhead_protocol::ttrpc;
use oci_spec::runtime::{Hook, Hooks, Spec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use super::handoff::Reporter;
use super::state::{Record, Root, Status};
use crate::config::Config;
use crate::sandbox::artifacts::Artifacts;
use crate::sandbox::bundle::BundleVm;
use crate::sandbox::guest_spec::{self, Role};
use crate::sandbox::host_hooks;
use crate::sandbox::process_io::{self, OutputSinks, ProcessRef, Streams};
use crate::sandbox::RPC_TIMEOUT;

/// Runs the keeper of container `id`; returns the exit status to exit with.
pub fn main(root: Root, id: String, ready_fd: i32, console_socket: Option<PathBuf>) -> i32 {
    let mut reporter = match Reporter::from_fd(ready_fd) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(container = %id, "{e:#}");
            return 1;
        }
    };
    // Our own session: the engine's signals to its process group do not
    // reach us by accident, and a pty can become our terminal.
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!(container = %id, "setsid: {e}");
    }
    if let Some(socket) = &console_socket {
        let terminal =
            super::console::send_new_pty(socket).and_then(super::console::become_terminal);
        if let Err(e) = terminal {
            reporter.failed(&e);
            return 1;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            reporter.failed(&anyhow::Error::from(e).context("starting the async runtime"));
            return 1;
        }
    };
    let code = runtime.block_on(keep(&root, &id, &mut reporter));
    // The copy from our stdin (a pty, or a pipe the engine keeps open) sits
    // in a blocking read that never returns; dropping the runtime would wait
    // for it forever.
    runtime.shutdown_background();
    match code {
        Ok(code) => code,
        Err(e) => {
            // Before ready, `create` shows this; after, only the log has it.
            tracing::error!(container = %id, "{e:#}");
            reporter.failed(&e);
            root.set_status(&id, Status::Stopped, Some(255));
            255
        }
    }
}

/// The container prepared in its VM, not yet started.
struct Created {
    vm: BundleVm,
    process: ProcessRef,
    streams: Streams,
    /// The spec's hooks, for poststart and poststop.
    hooks: Hooks,
}

/// The runtime-spec state a hook reads on stdin.
fn hook_state(record: &Record, status: &str, pid: Option<u32>) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": super::state::OCI_VERSION,
        "id": record.id,
        "status": status,
        "pid": pid.unwrap_or(0),
        "bundle": record.bundle,
        "annotations": record.annotations,
    })
}

/// Runs best-effort hooks (poststart, poststop: the runtime spec only logs
/// their failures).
async fn run_logged_hooks(stage: &'static str, hooks: Option<Vec<Hook>>, state: serde_json::Value) {
    let Some(list) = hooks.filter(|l| !l.is_empty()) else {
        return;
    };
    match tokio::task::spawn_blocking(move || host_hooks::run(stage, &list, &state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!("{stage} hooks: {e}"),
    }
}

async fn keep(root: &Root, id: &str, reporter: &mut Reporter) -> Result<i32> {
    process_io::catch_forwarded_signals().context("handling signals")?;
    let created = create(root, id).await?;
    let control = root.control_socket(id);
    let listening = (|| {
        let _ = std::fs::remove_file(&control);
        let short = super::state::ShortPath::new(&control)
            .with_context(|| format!("opening the directory of {}", control.display()))?;
        let listener = UnixListener::bind(short.path())
            .with_context(|| format!("listening on {}", control.display()))?;
        // Read again, not kept from the start: `create` writes our pid into
        // the record after it started us, and saving an older copy would
        // lose it.
        let mut record = root.load(id)?;
        record.status = Status::Created;
        root.save(&record)?;
        Ok::<_, anyhow::Error>(listener)
    })();
    let listener = match listening {
        Ok(l) => l,
        Err(e) => {
            created.vm.stop().await;
            return Err(e);
        }
    };
    let reported = reporter.ready(std::process::id());
    let Created {
        mut vm,
        process,
        streams,
        hooks,
    } = created;
    if !reported {
        tracing::warn!(
            container = id,
            "create went away before it learned of us; tearing down"
        );
        root.set_status(id, Status::Stopped, Some(255));
        vm.stop().await;
        let _ = std::fs::remove_file(&control);
        return Ok(255);
    }
    tracing::info!(container = id, "created; waiting for start");

    let record = match root.load(id) {
        Ok(r) => r,
        Err(e) => {
            vm.stop().await;
            return Err(e.into());
        }
    };
    let vmm_pid = vm.sandbox.vmm_pid();
    let started = wait_for_start(&listener, &mut vm, id).await;
    let code = match started {
        Ok(Some(reply)) => {
            root.set_status(id, Status::Running, None);
            let _ = reply.send(Ok(()));
            run_logged_hooks(
                "poststart",
                hooks.poststart().clone(),
                hook_state(&record, "running", vmm_pid),
            )
            .await;
            let pumps = process_io::pump(
                streams,
                &process,
                &OutputSinks {
                    terminal: true,
                    log: None,
                },
            );
            // Later `start`s get runc's error; the listener lives on for them.
            let refuse = refuse_starts(listener, id.to_owned());
            let code = process_io::wait(&vm.conn, &process, pumps).await;
            refuse.abort();
            code.unwrap_or_else(|e| {
                tracing::error!(container = id, "{e:#}");
                255
            })
        }
        Ok(None) => 143,
        Err(e) => {
            tracing::error!(container = id, "{e:#}");
            255
        }
    };
    tracing::info!(container = id, code, "the container's process exited");
    root.set_status(id, Status::Stopped, Some(code));
    let mut remove = RemoveContainerRequest::new();
    remove.container_id = id.to_owned();
    if let Err(e) = vm
        .conn
        .agent()
        .remove_container(ttrpc::context::with_duration(RPC_TIMEOUT), &remove)
        .await
    {
        tracing::warn!(container = id, "RemoveContainer: {e}");
    }
    vm.stop().await;
    run_logged_hooks(
        "poststop",
        hooks.poststop().clone(),
        hook_state(&record, "stopped", None),
    )
    .await;
    let _ = std::fs::remove_file(&control);
    Ok(code)
}

/// Boots the VM and creates the container in it.
async fn create(root: &Root, id: &str) -> Result<Created> {
    let record = root.load(id)?;
    let config_path = record.bundle.join("config.json");
    let spec =
        Spec::load(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    if let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
        // Before the VMM and virtiofsd start: they inherit it.
        match super::host_cgroup::join(&path) {
            Ok(Some(dir)) => {
                let mut r = root.load(id)?;
                r.host_cgroup = Some(dir);
                root.save(&r)?;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(container = id, cgroup = %path.display(), "joining the host cgroup: {e}")
            }
        }
    }
    let config = Config::load().context("reading bulkhead's config")?;
    let artifacts = Artifacts::resolve(&config)?;
    let (vcpus, memory_mib) =
        crate::sandbox::sizing::vm_size(&spec, config.vcpus, config.memory_mib);
    let sandbox_config = artifacts.sandbox_config(
        &config,
        id.to_owned(),
        vcpus,
        memory_mib,
        config.boot_timeout(),
    );
    tracing::info!(container = id, vcpus, memory_mib, "booting the microVM");
    let mut vm = BundleVm::boot(&sandbox_config, &spec)
        .await
        .with_context(|| format!("container {id}"))?;
    let hooks = spec.hooks().clone().unwrap_or_default();
    let prepared = async {
        // The runtime spec runs these after the namespaces exist and before
        // the process starts; the VMM stands in the sandbox's network
        // namespace, so its pid is the one they are told.
        let state = hook_state(&record, "creating", vm.sandbox.vmm_pid());
        for (stage, list) in [
            ("prestart", hooks.prestart()),
            ("createRuntime", hooks.create_runtime()),
        ] {
            let list = list.clone().unwrap_or_default();
            let state = state.clone();
            tokio::task::spawn_blocking(move || host_hooks::run(stage, &list, &state))
                .await
                .context("running the hooks")?
                .with_context(|| format!("container {id}"))?;
        }
        create_in_vm(&mut vm, id, &record.rootfs, spec).await
    }
    .await;
    match prepared {
        Ok((process, streams)) => Ok(Created {
            vm,
            process,
            streams,
            hooks,
        }),
        Err(e) => {
            vm.stop().await;
            Err(e)
        }
    }
}

async fn create_in_vm(
    vm: &mut BundleVm,
    id: &str,
    rootfs: &std::path::Path,
    spec: Spec,
) -> Result<(ProcessRef, Streams)> {
    let rootfs_name = format!("{id}/rootfs");
    vm.sandbox.bind_into_share(rootfs, &rootfs_name)?;
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let guest = guest_spec::for_guest(spec, id, &Role::Standalone, None);
    for note in &guest.notes {
        tracing::info!(container = id, "{note}");
    }
    for bind in &guest.binds {
        vm.sandbox.bind_into_share(&bind.source, &bind.share_name)?;
    }
    // Whatever the engine gave as stdin goes through: /dev/null ends at
    // once (and so does the process's stdin), a pipe when the engine
    // closes it.
    let process = ProcessRef {
        container_id: id.to_owned(),
        exec_id: String::new(),
        interactive: true,
        terminal,
    };
    let mut create = CreateContainerRequest::new();
    create.container_id = id.to_owned();
    create.oci_spec_json = serde_json::to_vec(&guest.spec)?;
    create.rootfs_path = rootfs_name;
    create.stdio = Some(process.streams()).into();
    create.terminal = terminal;
    vm.conn
        .agent()
        .create_container(ttrpc::context::with_duration(RPC_TIMEOUT), &create)
        .await
        .with_context(|| format!("creating container {id} in its microVM"))?;
    let streams = process_io::open_streams(&vm.conn, &process).await?;
    Ok((process, streams))
}

type StartReply = tokio::sync::oneshot::Sender<Result<(), String>>;

/// Waits for a `start` on the control socket and starts the init; `None`
/// if a signal asked us to give up first.
async fn wait_for_start(
    listener: &UnixListener,
    vm: &mut BundleVm,
    id: &str,
) -> Result<Option<StartReply>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("accepting on the control socket")?,
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
            _ = hup.recv() => return Ok(None),
        };
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        if BufReader::new(read).read_line(&mut line).await.is_err() || line.trim() != "start" {
            let _ = write.write_all(b"error unknown request\n").await;
            continue;
        }
        // The engine may have wired the namespace after create (`ctr run
        // --cni` does); join it now.
        let outcome = async {
            vm.join_network()
                .await
                .with_context(|| format!("joining container {id}'s microVM to its network"))?;
            let mut start = StartContainerRequest::new();
            start.container_id = id.to_owned();
            vm.conn
                .agent()
                .start_container(ttrpc::context::with_duration(RPC_TIMEOUT), &start)
                .await
                .with_context(|| format!("starting container {id}"))?;
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        tokio::spawn(async move {
            let answer = match rx.await {
                Ok(Ok(())) => "ok\n".to_owned(),
                Ok(Err(e)) => format!("error {}\n", e.replace('\n', "\\n")),
                Err(_) => "error the keeper went away\n".to_owned(),
            };
            let _ = write.write_all(answer.as_bytes()).await;
        });
        match outcome {
            Ok(()) => return Ok(Some(tx)),
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
                return Err(e);
            }
        }
    }
}

/// Answers every later `start` with runc's error for a started container.
fn refuse_starts(listener: UnixListener, id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (_, mut write) = stream.into_split();
            let msg = format!("error cannot start a container that has already started: {id}\n");
            let _ = write.write_all(msg.as_bytes()).await;
        }
    })
}
