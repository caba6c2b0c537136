//! The agent API ([`Agent`]) on top of the container core.
//!
//! Every method has the same preamble ([`AgentService::call`]): trace the call,
//! [`Validate`] the request, run the `do_*` function, and map its
//! [`RpcError`] (which names the container) to a ttrpc status. Blocking work
//! (libcontainer, cgroup files, waits) runs on tokio's blocking pool.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bulkhead_protocol::agent::*;
use bulkhead_protocol::agent_ttrpc::Agent;
use bulkhead_protocol::async_trait::async_trait;
use bulkhead_protocol::network::GuestNetwork;
use bulkhead_protocol::ttrpc::{self, asynchronous::TtrpcContext, Code};
use bulkhead_protocol::{Validate, ValidationError};
use oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use tokio::sync::{mpsc, Mutex as AsyncMutex};

use crate::container::{Container, ContainerError, CreateOptions};
use crate::mapping;
use crate::process::Process;
use crate::registry::{ExitInfo, ProcEntry, StreamSet, Table, TableError, TtyState};
use crate::spare_netns::SpareNetns;
use crate::stdio::Stdio;
use crate::streams::{self, Lookup};

/// How long `StartContainer` (and `ExecProcess`) wait for the requested
/// streams to attach.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed call: the ttrpc status code and a message naming the container.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct RpcError {
    code: Code,
    msg: String,
}

impl RpcError {
    fn new(code: Code, msg: impl Into<String>) -> Self {
        RpcError {
            code,
            msg: msg.into(),
        }
    }

    fn not_found(id: &str, what: &str) -> Self {
        Self::new(Code::NOT_FOUND, format!("container {id}: {what} not found"))
    }

    fn invalid(id: &str, msg: impl std::fmt::Display) -> Self {
        Self::new(Code::INVALID_ARGUMENT, format!("container {id}: {msg}"))
    }

    fn precondition(id: &str, msg: impl std::fmt::Display) -> Self {
        Self::new(Code::FAILED_PRECONDITION, format!("container {id}: {msg}"))
    }

    fn internal(id: &str, msg: impl std::fmt::Display) -> Self {
        Self::new(Code::INTERNAL, format!("container {id}: {msg}"))
    }

    /// The status code.
    pub fn code(&self) -> Code {
        self.code
    }
}

impl From<ContainerError> for RpcError {
    fn from(err: ContainerError) -> Self {
        let code = match err {
            ContainerError::Invalid { .. } => Code::FAILED_PRECONDITION,
            ContainerError::CommandNotFound { .. } => Code::NOT_FOUND,
            ContainerError::Op { .. } => Code::INTERNAL,
        };
        // The error names the container already; include the causes.
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        RpcError::new(code, msg)
    }
}

/// One container and its processes.
#[derive(Debug)]
pub struct ContainerEntry {
    container: Arc<Container>,
    init: Arc<ProcEntry>,
    execs: Table<ProcEntry>,
    started: AtomicBool,
    stop_oom_watch: Arc<AtomicBool>,
}

/// Where the agent's configuration comes from.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the virtio-fs share is mounted.
    pub share_dir: PathBuf,
    /// The agent's state directory.
    pub run_dir: PathBuf,
    /// The agent's binary, bind-mounted into containers as their init; `None`
    /// to run commands unwrapped.
    pub init_binary: Option<PathBuf>,
    /// A network namespace made ahead of time for the first container.
    pub spare_netns: Option<Arc<SpareNetns>>,
}

/// The agent service: the container table, the OOM event queue.
pub struct AgentService {
    config: Config,
    containers: Table<ContainerEntry>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: AsyncMutex<mpsc::UnboundedReceiver<String>>,
    /// Set by the first ConfigureNetwork: the NIC has moved.
    network_set: AtomicBool,
}

impl AgentService {
    /// A service with no containers.
    pub fn new(config: Config) -> Arc<Self> {
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        Arc::new(AgentService {
            config,
            containers: Table::default(),
            oom_tx,
            oom_rx: AsyncMutex::new(oom_rx),
            network_set: AtomicBool::new(false),
        })
    }

    /// The uniform preamble: trace, validate, run, map errors.
    async fn call<Resp, F>(
        &self,
        name: &'static str,
        checked: Result<(), ValidationError>,
        run: F,
    ) -> ttrpc::Result<Resp>
    where
        F: Future<Output = Result<Resp, RpcError>>,
    {
        tracing::debug!(rpc = name, "request");
        if let Err(err) = checked {
            tracing::warn!(rpc = name, "invalid request: {err}");
            return Err(status(Code::INVALID_ARGUMENT, format!("{name}: {err}")));
        }
        match run.await {
            Ok(resp) => Ok(resp),
            Err(err) => {
                tracing::warn!(rpc = name, "{err}");
                Err(status(err.code, err.msg))
            }
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<ContainerEntry>, RpcError> {
        self.containers
            .get(id)
            .ok_or_else(|| RpcError::not_found(id, "container"))
    }

    fn proc_entry(&self, id: &str, exec_id: &str) -> Result<Arc<ProcEntry>, RpcError> {
        let entry = self.entry(id)?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&entry.init));
        }
        entry
            .execs
            .get(exec_id)
            .ok_or_else(|| RpcError::not_found(id, &format!("exec {exec_id}")))
    }

    async fn do_create(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, RpcError> {
        let id = req.container_id.clone();
        let mut spec: Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| RpcError::invalid(&id, format!("oci spec: {e}")))?;
        let rootfs = mapping::rootfs_in_share(&self.config.share_dir, &req.rootfs_path)
            .ok_or_else(|| RpcError::invalid(&id, "rootfs path leaves the share"))?;
        if !rootfs.is_dir() {
            return Err(RpcError::invalid(
                &id,
                format!("rootfs {} is not a directory in the share", req.rootfs_path),
            ));
        }
        if let Some(init) = &self.config.init_binary {
            mapping::wrap_init(&mut spec, init).map_err(|e| RpcError::invalid(&id, e))?;
        }
        let stdio_flags = req.stdio.clone().unwrap_or_default();
        let requested = StreamSet::requested(
            stdio_flags.stdin,
            stdio_flags.stdout,
            stdio_flags.stderr,
            req.terminal,
        );
        let (stdio, ends) = if req.terminal {
            (Stdio::Terminal, Default::default())
        } else {
            mapping::pipes(requested).map_err(|e| RpcError::internal(&id, format!("pipes: {e}")))?
        };
        let reservation =
            self.containers
                .reserve(&id)
                .map_err(|TableError::AlreadyExists(_)| {
                    RpcError::new(
                        Code::ALREADY_EXISTS,
                        format!("container {id} already exists"),
                    )
                })?;
        let opts = CreateOptions {
            id: id.clone(),
            spec,
            rootfs,
            stdio,
            run_dir: self.config.run_dir.clone(),
            spare_netns: self.config.spare_netns.clone(),
        };
        let container = blocking(&id, move || Container::create(opts))
            .await?
            .map_err(RpcError::from)?;
        let container = Arc::new(container);
        let init = Arc::new(ProcEntry::new(requested, ends));
        init.set_tty(match container.take_terminal() {
            Some(master) => TtyState::Ready(Arc::new(master)),
            None => TtyState::Gone,
        });
        init.set_process(Arc::clone(container.init()));
        watch_exit(Arc::clone(&init), Arc::clone(container.init()));
        let stop_oom_watch = Arc::new(AtomicBool::new(false));
        watch_oom(
            Arc::clone(&container),
            self.oom_tx.clone(),
            Arc::clone(&stop_oom_watch),
        );
        let pid = container.pid().as_raw();
        reservation.fill(Arc::new(ContainerEntry {
            container,
            init,
            execs: Table::default(),
            started: AtomicBool::new(false),
            stop_oom_watch,
        }));
        tracing::debug!("container {id} created, init pid {pid}");
        let mut resp = CreateContainerResponse::new();
        resp.pid = u32::try_from(pid).unwrap_or(0);
        Ok(resp)
    }

    async fn do_start(
        &self,
        req: StartContainerRequest,
    ) -> Result<StartContainerResponse, RpcError> {
        let id = req.container_id;
        let entry = self.entry(&id)?;
        if entry.started.swap(true, Ordering::SeqCst) {
            return Err(RpcError::precondition(&id, "already started"));
        }
        if tokio::time::timeout(ATTACH_TIMEOUT, entry.init.all_attached())
            .await
            .is_err()
        {
            entry.started.store(false, Ordering::SeqCst);
            return Err(RpcError::precondition(
                &id,
                format!(
                    "the stdio streams {:?} were not attached within {} s",
                    entry.init.missing_streams(),
                    ATTACH_TIMEOUT.as_secs()
                ),
            ));
        }
        let container = Arc::clone(&entry.container);
        let started = blocking(&id, move || container.start()).await?;
        if let Err(err) = started {
            entry.started.store(false, Ordering::SeqCst);
            return Err(err.into());
        }
        tracing::debug!("container {id} started");
        Ok(StartContainerResponse::new())
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> Result<ExecProcessResponse, RpcError> {
        let id = req.container_id.clone();
        let exec_id = req.exec_id.clone();
        let entry = self.entry(&id)?;
        if !entry.started.load(Ordering::SeqCst) || entry.init.exit_now().is_some() {
            return Err(RpcError::precondition(&id, "is not running"));
        }
        let process: OciProcess = serde_json::from_slice(&req.process_json)
            .map_err(|e| RpcError::invalid(&id, format!("exec {exec_id}: process: {e}")))?;
        let flags = req.stdio.clone().unwrap_or_default();
        let requested = StreamSet::requested(flags.stdin, flags.stdout, flags.stderr, req.terminal);
        let (stdio, ends) = if req.terminal {
            (Stdio::Terminal, Default::default())
        } else {
            mapping::pipes(requested)
                .map_err(|e| RpcError::internal(&id, format!("exec {exec_id}: pipes: {e}")))?
        };
        let reservation = entry.execs.reserve(&exec_id).map_err(|_| {
            RpcError::new(
                Code::ALREADY_EXISTS,
                format!("container {id}: exec {exec_id} already exists"),
            )
        })?;
        let proc_entry = reservation.fill(Arc::new(ProcEntry::new(requested, ends)));
        // The process starts only once the host's streams are attached (they
        // are opened while this call is outstanding).
        let attached = tokio::time::timeout(ATTACH_TIMEOUT, proc_entry.all_attached()).await;
        let fail = |err: RpcError| {
            proc_entry.set_tty(TtyState::Gone);
            entry.execs.remove(&exec_id);
            err
        };
        if attached.is_err() {
            return Err(fail(RpcError::precondition(
                &id,
                format!(
                    "exec {exec_id}: the stdio streams {:?} were not attached within {} s",
                    proc_entry.missing_streams(),
                    ATTACH_TIMEOUT.as_secs()
                ),
            )));
        }
        let container = Arc::clone(&entry.container);
        let eid = exec_id.clone();
        let exec = match blocking(&id, move || container.exec(&eid, process, stdio)).await {
            Ok(Ok(exec)) => exec,
            Ok(Err(err)) => return Err(fail(err.into())),
            Err(err) => return Err(fail(err)),
        };
        proc_entry.set_tty(match exec.terminal {
            Some(master) => TtyState::Ready(Arc::new(master)),
            None => TtyState::Gone,
        });
        proc_entry.set_process(Arc::clone(&exec.process));
        watch_exit(Arc::clone(&proc_entry), Arc::clone(&exec.process));
        let mut resp = ExecProcessResponse::new();
        resp.pid = u32::try_from(exec.process.pid().as_raw()).unwrap_or(0);
        Ok(resp)
    }

    async fn do_signal(
        &self,
        req: SignalProcessRequest,
    ) -> Result<SignalProcessResponse, RpcError> {
        let id = req.container_id.clone();
        let signal = i32::try_from(req.signal).map_err(|_| RpcError::invalid(&id, "bad signal"))?;
        let entry = self.entry(&id)?;
        if req.all {
            let container = Arc::clone(&entry.container);
            blocking(&id, move || container.signal(signal, true)).await??;
        } else {
            let proc_entry = self.proc_entry(&id, &req.exec_id)?;
            let process = proc_entry.process().ok_or_else(|| {
                RpcError::precondition(&id, format!("exec {} has not started", req.exec_id))
            })?;
            process
                .signal(signal)
                .map_err(|e| RpcError::internal(&id, format!("signal {signal}: {e}")))?;
        }
        Ok(SignalProcessResponse::new())
    }

    async fn do_wait(&self, req: WaitProcessRequest) -> Result<WaitProcessResponse, RpcError> {
        let proc_entry = self.proc_entry(&req.container_id, &req.exec_id)?;
        Ok(mapping::wait_response(proc_entry.wait().await))
    }

    async fn do_resize(&self, req: ResizeTtyRequest) -> Result<ResizeTtyResponse, RpcError> {
        let id = &req.container_id;
        let proc_entry = self.proc_entry(id, &req.exec_id)?;
        let master = proc_entry
            .tty_now()
            .ok_or_else(|| RpcError::precondition(id, "the process has no terminal"))?;
        let rows = u16::try_from(req.rows).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.cols).unwrap_or(u16::MAX);
        streams::resize(&master, rows, cols)
            .map_err(|e| RpcError::internal(id, format!("resizing the terminal: {e}")))?;
        Ok(ResizeTtyResponse::new())
    }

    async fn do_close_stdin(&self, req: CloseStdinRequest) -> Result<CloseStdinResponse, RpcError> {
        self.proc_entry(&req.container_id, &req.exec_id)?
            .close_stdin();
        Ok(CloseStdinResponse::new())
    }

    async fn do_remove(
        &self,
        req: RemoveContainerRequest,
    ) -> Result<RemoveContainerResponse, RpcError> {
        let id = req.container_id;
        let entry = self.entry(&id)?;
        // A created container that never started runs nothing of the user's
        // yet: removing it kills its waiting init (like `runc delete`). A
        // started one must have exited.
        let started = entry.started.load(Ordering::SeqCst);
        if started && entry.init.exit_now().is_none() && entry.container.init().is_running() {
            return Err(RpcError::precondition(
                &id,
                "is still running; stop it first",
            ));
        }
        entry.stop_oom_watch.store(true, Ordering::SeqCst);
        let container = Arc::clone(&entry.container);
        blocking(&id, move || container.delete(!started)).await??;
        self.containers.remove(&id);
        tracing::debug!("container {id} removed");
        Ok(RemoveContainerResponse::new())
    }

    async fn do_stats(
        &self,
        req: StatsContainerRequest,
    ) -> Result<StatsContainerResponse, RpcError> {
        let id = req.container_id;
        let container = Arc::clone(&self.entry(&id)?.container);
        let stats = blocking(&id, move || container.stats()).await??;
        Ok(mapping::stats_response(&stats))
    }

    async fn do_update(
        &self,
        req: UpdateContainerRequest,
    ) -> Result<UpdateContainerResponse, RpcError> {
        let id = req.container_id;
        let resources: LinuxResources = serde_json::from_slice(&req.resources_json)
            .map_err(|e| RpcError::invalid(&id, format!("resources: {e}")))?;
        let container = Arc::clone(&self.entry(&id)?.container);
        blocking(&id, move || container.update(&resources)).await??;
        Ok(UpdateContainerResponse::new())
    }

    async fn do_pause(
        &self,
        req: PauseContainerRequest,
    ) -> Result<PauseContainerResponse, RpcError> {
        let id = req.container_id;
        let container = Arc::clone(&self.entry(&id)?.container);
        blocking(&id, move || container.pause()).await??;
        Ok(PauseContainerResponse::new())
    }

    async fn do_resume(
        &self,
        req: ResumeContainerRequest,
    ) -> Result<ResumeContainerResponse, RpcError> {
        let id = req.container_id;
        let container = Arc::clone(&self.entry(&id)?.container);
        blocking(&id, move || container.resume()).await??;
        Ok(ResumeContainerResponse::new())
    }

    async fn do_list(&self, req: ListProcessesRequest) -> Result<ListProcessesResponse, RpcError> {
        let id = req.container_id;
        let container = Arc::clone(&self.entry(&id)?.container);
        let pids = blocking(&id, move || container.pids()).await??;
        let mut resp = ListProcessesResponse::new();
        resp.pids = pids
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok().filter(|p| *p > 0))
            .take(bulkhead_protocol::limits::MAX_PIDS)
            .collect();
        Ok(resp)
    }

    async fn do_oom(&self) -> Result<GetOomEventResponse, RpcError> {
        let mut rx = self.oom_rx.lock().await;
        let id = rx
            .recv()
            .await
            .ok_or_else(|| RpcError::new(Code::UNAVAILABLE, "the OOM event queue closed"))?;
        let mut resp = GetOomEventResponse::new();
        resp.container_id = id;
        Ok(resp)
    }

    async fn do_configure_network(
        &self,
        req: ConfigureNetworkRequest,
    ) -> Result<ConfigureNetworkResponse, RpcError> {
        let precondition = |msg: &str| RpcError::new(Code::FAILED_PRECONDITION, msg.to_owned());
        let net = GuestNetwork::from_request(&req)
            .map_err(|e| RpcError::new(Code::INVALID_ARGUMENT, e.to_string()))?;
        let netns = self
            .config
            .spare_netns
            .as_ref()
            .map(|s| s.path().to_owned())
            .ok_or_else(|| precondition("the VM has no sandbox network namespace"))?;
        if self.network_set.swap(true, Ordering::AcqRel) {
            return Err(precondition("the network is already configured"));
        }
        tokio::task::spawn_blocking(move || crate::network::configure(&net, &netns))
            .await
            .map_err(|e| RpcError::new(Code::INTERNAL, format!("network task: {e}")))?
            .map_err(|e| RpcError::new(Code::INTERNAL, format!("configuring the network: {e}")))?;
        Ok(ConfigureNetworkResponse::new())
    }

    fn do_check(&self) -> CheckResponse {
        let mut resp = CheckResponse::new();
        resp.version = env!("CARGO_PKG_VERSION").to_string();
        resp.ready = true;
        resp.api_version = bulkhead_protocol::API_VERSION;
        resp
    }

    /// Kills every container and flushes every file system before answering,
    /// so the answer tells the host that the share holds all the guest wrote
    /// and the VM may be ended; then powers off by itself, in case the host
    /// does not end it.
    async fn do_shutdown(&self) -> ShutdownResponse {
        for entry in self.containers.all() {
            let _ = entry.container.signal(libc::SIGKILL, true);
        }
        let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
        tokio::spawn(async {
            // Let the reply leave first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tokio::task::spawn_blocking(power_off).await;
        });
        ShutdownResponse::new()
    }
}

/// Flushes every filesystem (the share's writes reach the host) and resets the
/// VM, which the VMM takes as a clean stop.
pub fn power_off() {
    nix::unistd::sync();
    tracing::info!("powering off");
    let Err(err) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    tracing::error!("reboot: {err}");
}

impl Lookup for AgentService {
    fn process(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcEntry>> {
        self.proc_entry(container_id, exec_id).ok()
    }
}

/// A ttrpc status error.
fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// Runs blocking container work off the async threads.
async fn blocking<T, F>(id: &str, f: F) -> Result<T, RpcError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RpcError::internal(id, format!("worker failed: {e}")))
}

/// Publishes the process's exit in its entry once it ends.
fn watch_exit(entry: Arc<ProcEntry>, process: Arc<Process>) {
    tokio::spawn(async move {
        if let Ok(status) = tokio::task::spawn_blocking(move || process.wait()).await {
            entry.set_exit(ExitInfo {
                status,
                at: SystemTime::now(),
            });
        }
    });
}

/// Watches the container's `memory.events` and queues its id on every new OOM
/// kill, until `stop` is set.
fn watch_oom(container: Arc<Container>, tx: mpsc::UnboundedSender<String>, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name(format!("oom-{}", container.id()))
        .spawn(move || {
            let mut seen = container.oom_kills().unwrap_or(0);
            while !stop.load(Ordering::SeqCst) {
                match container.wait_for_oom(seen, Duration::from_secs(1)) {
                    Ok(count) if count > seen => {
                        seen = count;
                        tracing::info!("container {}: OOM kill", container.id());
                        if tx.send(container.id().to_string()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_secs(1)),
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot watch OOM kills: {err}");
    }
}

#[async_trait]
impl Agent for AgentService {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let checked = req.validate();
        self.call("CreateContainer", checked, self.do_create(req))
            .await
    }
    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let checked = req.validate();
        self.call("StartContainer", checked, self.do_start(req))
            .await
    }
    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let checked = req.validate();
        self.call("ExecProcess", checked, self.do_exec(req)).await
    }
    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<SignalProcessResponse> {
        let checked = req.validate();
        self.call("SignalProcess", checked, self.do_signal(req))
            .await
    }
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let checked = req.validate();
        self.call("WaitProcess", checked, self.do_wait(req)).await
    }
    async fn resize_tty(
        &self,
        _: &TtrpcContext,
        req: ResizeTtyRequest,
    ) -> ttrpc::Result<ResizeTtyResponse> {
        let checked = req.validate();
        self.call("ResizeTty", checked, self.do_resize(req)).await
    }
    async fn close_stdin(
        &self,
        _: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<CloseStdinResponse> {
        let checked = req.validate();
        self.call("CloseStdin", checked, self.do_close_stdin(req))
            .await
    }
    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<RemoveContainerResponse> {
        let checked = req.validate();
        self.call("RemoveContainer", checked, self.do_remove(req))
            .await
    }
    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let checked = req.validate();
        self.call("StatsContainer", checked, self.do_stats(req))
            .await
    }
    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<PauseContainerResponse> {
        let checked = req.validate();
        self.call("PauseContainer", checked, self.do_pause(req))
            .await
    }
    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<ResumeContainerResponse> {
        let checked = req.validate();
        self.call("ResumeContainer", checked, self.do_resume(req))
            .await
    }
    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        let checked = req.validate();
        self.call("UpdateContainer", checked, self.do_update(req))
            .await
    }
    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let checked = req.validate();
        self.call("ListProcesses", checked, self.do_list(req)).await
    }
    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        req: GetOomEventRequest,
    ) -> ttrpc::Result<GetOomEventResponse> {
        self.call("GetOomEvent", req.validate(), self.do_oom())
            .await
    }
    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<ConfigureNetworkResponse> {
        let checked = req.validate();
        self.call("ConfigureNetwork", checked, self.do_configure_network(req))
            .await
    }
    async fn check(&self, _: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        self.call("Check", req.validate(), async { Ok(self.do_check()) })
            .await
    }
    async fn shutdown(
        &self,
        _: &TtrpcContext,
        req: ShutdownRequest,
    ) -> ttrpc::Result<ShutdownResponse> {
        self.call("Shutdown", req.validate(), async {
            Ok(self.do_shutdown().await)
        })
        .await
    }
}
