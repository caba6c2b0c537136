//! containerd's Task service, served by the shim for every container of one
//! sandbox (a standalone container, or a whole pod): each call is mapped onto
//! the guest agent's API, and the events containerd expects are published.
//!
//! The first container that needs a VM (a standalone one, or a pod's sandbox
//! container) boots it; pod members join it; the VM is stopped when the last
//! container is deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bulkhead_protocol::agent::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest as AgentExec, GetOomEventRequest,
    ListProcessesRequest, PauseContainerRequest, RemoveContainerRequest, ResizeTtyRequest,
    ResumeContainerRequest, SignalProcessRequest, StartContainerRequest, StatsContainerRequest,
    UpdateContainerRequest, WaitProcessRequest,
};
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self as shim_ttrpc, r#async::TtrpcContext};
use containerd_shim::{ExitSignal, TtrpcResult};
use oci_spec::runtime::Spec;
use tokio::sync::{watch, Mutex};

use super::io::{self as pio, ProcessIo, StdioSpec};
use super::metrics;
use super::record::BundleRecord;
use crate::config::Config;
use crate::sandbox::artifacts::Artifacts;
use crate::sandbox::bundle::BundleVm;
use crate::sandbox::guest_spec::{self, Role};
use crate::sandbox::{AgentConnection, Sandbox, SandboxError, RPC_TIMEOUT};

/// How a process ended.
#[derive(Clone, Copy, Debug)]
struct Exit {
    code: u32,
    at: SystemTime,
}

/// One process (a container's init, or an exec) as containerd sees it.
struct Process {
    stdio: StdioSpec,
    /// The process's pid in the guest: for joining its namespaces there.
    pid: u32,
    /// The pid containerd is told: bulkhead-vmm's. A guest pid names some
    /// unrelated process on the host, and host tools act on this one
    /// (`ctr run --cni` configures /proc/PID/ns/net), as with Kata.
    host_pid: u32,
    status: api::Status,
    /// The OCI process of an exec, until it starts.
    exec_spec: Option<Vec<u8>>,
    io: Option<Arc<Mutex<ProcessIo>>>,
    exit: watch::Receiver<Option<Exit>>,
    exit_tx: Option<watch::Sender<Option<Exit>>>,
}

impl Process {
    fn new(stdio: StdioSpec) -> Process {
        let (tx, rx) = watch::channel(None);
        Process {
            stdio,
            pid: 0,
            host_pid: 0,
            status: api::Status::CREATED,
            exec_spec: None,
            io: None,
            exit: rx,
            exit_tx: Some(tx),
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// One container of this shim.
struct Container {
    bundle: PathBuf,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| not_found(format!("exec {exec_id} not found")))
    }

    fn process_mut(&mut self, exec_id: &str) -> TtrpcResult<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| not_found(format!("exec {exec_id} not found")))
    }
}

#[derive(Default)]
struct State {
    vm: Option<BundleVm>,
    containers: HashMap<String, Container>,
}

impl State {
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    fn container_mut(&mut self, id: &str) -> TtrpcResult<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    /// The agent connection of the VM.
    fn conn(&self) -> TtrpcResult<AgentConnection> {
        self.vm
            .as_ref()
            .map(|v| v.conn.clone())
            .ok_or_else(|| failed("no microVM"))
    }
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    config: Config,
    state: Mutex<State>,
}

/// The Task service of one shim process.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    /// A service publishing events for `namespace` through `publisher`;
    /// `exit` is signalled when containerd shuts the shim down.
    pub fn new(
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        config: Config,
    ) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                publisher,
                exit,
                config,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

fn status(code: shim_ttrpc::Code, msg: impl Into<String>) -> shim_ttrpc::Error {
    shim_ttrpc::Error::RpcStatus(shim_ttrpc::get_status(code, msg.into()))
}
fn not_found(msg: impl Into<String>) -> shim_ttrpc::Error {
    status(shim_ttrpc::Code::NOT_FOUND, msg)
}
fn failed(msg: impl Into<String>) -> shim_ttrpc::Error {
    status(shim_ttrpc::Code::FAILED_PRECONDITION, msg)
}
fn internal(msg: impl Into<String>) -> shim_ttrpc::Error {
    status(shim_ttrpc::Code::INTERNAL, msg)
}
fn agent_err(what: &str, id: &str, e: impl std::fmt::Display) -> shim_ttrpc::Error {
    internal(format!("{what} of container {id} in the microVM: {e}"))
}

fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from(t)
}

fn ctx() -> bulkhead_protocol::ttrpc::context::Context {
    bulkhead_protocol::ttrpc::context::with_duration(RPC_TIMEOUT)
}

impl Inner {
    async fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        if let Err(e) = self
            .publisher
            .publish(
                shim_ttrpc::context::Context::default(),
                &topic,
                &self.namespace,
                Box::new(event),
            )
            .await
        {
            tracing::warn!("publishing {topic}: {e}");
        }
    }

    /// Boots the VM `vm_id` sized from `spec`.
    async fn boot(&self, vm_id: &str, spec: &Spec) -> TtrpcResult<BundleVm> {
        let artifacts = Artifacts::resolve(&self.config).map_err(|e| failed(e.to_string()))?;
        let (vcpus, memory_mib) =
            crate::sandbox::sizing::vm_size(spec, self.config.vcpus, self.config.memory_mib);
        let config = artifacts.sandbox_config(
            &self.config,
            vm_id.to_owned(),
            vcpus,
            memory_mib,
            self.config.boot_timeout(),
        );
        tracing::info!(sandbox = vm_id, vcpus, memory_mib, "booting the microVM");
        let vm = BundleVm::boot(&config, spec)
            .await
            .map_err(|e| failed(format!("microVM of {vm_id}: {e}")))?;
        tracing::info!(
            sandbox = vm_id,
            agent = vm.sandbox.agent_version(),
            "microVM ready"
        );
        Ok(vm)
    }

    /// Follows the guest's OOM kills for as long as the VM lives.
    fn watch_oom(self: &Arc<Self>, conn: AgentConnection) {
        let inner = self.clone();
        tokio::spawn(async move {
            loop {
                let ctx = bulkhead_protocol::ttrpc::context::Context::default();
                match conn
                    .agent()
                    .get_oom_event(ctx, &GetOomEventRequest::new())
                    .await
                {
                    Ok(ev) => {
                        tracing::warn!(container = %ev.container_id, "OOM kill in the guest");
                        let mut oom = TaskOOM::new();
                        oom.container_id = ev.container_id.clone();
                        inner.publish(oom).await;
                    }
                    Err(_) => break,
                }
            }
        });
    }

    /// Waits for a process in the guest to end, lets its output drain, and
    /// reports the exit to containerd.
    fn watch_exit(
        self: &Arc<Self>,
        conn: AgentConnection,
        container: String,
        exec_id: String,
        pid: u32,
        io: Option<Arc<Mutex<ProcessIo>>>,
        tx: watch::Sender<Option<Exit>>,
    ) {
        let inner = self.clone();
        tokio::spawn(async move {
            let mut req = WaitProcessRequest::new();
            req.container_id = container.clone();
            req.exec_id = exec_id.clone();
            let ctx = bulkhead_protocol::ttrpc::context::Context::default();
            let code = match conn.agent().wait_process(ctx, &req).await {
                Ok(r) => r.shell_status().unwrap_or(255),
                Err(e) => {
                    let report = inner.vm_report().await;
                    tracing::error!(
                        container = %container,
                        exec = %exec_id,
                        "lost the process in the microVM ({e}); {report}"
                    );
                    255
                }
            };
            if let Some(io) = io {
                io.lock().await.drain().await;
            }
            let exit = Exit {
                code,
                at: SystemTime::now(),
            };
            {
                let mut state = inner.state.lock().await;
                if let Some(c) = state.containers.get_mut(&container) {
                    if let Ok(p) = c.process_mut(&exec_id) {
                        p.status = api::Status::STOPPED;
                    }
                }
            }
            let _ = tx.send(Some(exit));
            let mut ev = TaskExit::new();
            ev.container_id = container.clone();
            ev.id = if exec_id.is_empty() {
                container.clone()
            } else {
                exec_id.clone()
            };
            ev.pid = pid;
            ev.exit_status = code;
            ev.exited_at = Some(timestamp(exit.at)).into();
            inner.publish(ev).await;
        });
    }

    /// What the VMM said if the VM stopped, with the console tail: the cause
    /// of a lost connection.
    async fn vm_report(&self) -> String {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut state = self.state.lock().await;
        match state.vm.as_mut() {
            Some(vm) => match vm.sandbox.vm_exit_report() {
                Some(report) => format!(
                    "{report}\nlast guest console lines:\n{}",
                    vm.sandbox.console_tail()
                ),
                None => "the microVM is still running".into(),
            },
            None => "no microVM".into(),
        }
    }

    /// Deletes container `id` from the guest and the share; stops the VM when
    /// it was the last container.
    async fn remove_container(&self, state: &mut State, id: &str) {
        state.containers.remove(id);
        if let Some(vm) = state.vm.as_mut() {
            let mut req = RemoveContainerRequest::new();
            req.container_id = id.to_owned();
            if let Err(e) = vm.conn.agent().remove_container(ctx(), &req).await {
                tracing::warn!(container = id, "RemoveContainer: {e}");
            }
            if let Err(e) = vm.sandbox.remove_from_share(id) {
                tracing::error!(container = id, "removing its rootfs from the share: {e}");
            }
        }
        if state.containers.is_empty() {
            if let Some(vm) = state.vm.take() {
                tracing::info!(sandbox = %vm.id, "last container deleted: stopping the microVM");
                vm.stop().await;
            }
        }
    }
}

/// Mounts containerd's rootfs mounts (or binds the bundle's rootfs) at
/// `shared/<id>/rootfs`.
fn mount_rootfs(
    sandbox: &mut Sandbox,
    id: &str,
    bundle: &Path,
    spec: &Spec,
    mounts: &[containerd_shim::protos::types::mount::Mount],
) -> Result<(), String> {
    let name = format!("{id}/rootfs");
    if mounts.is_empty() {
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        sandbox
            .bind_into_share(&root, &name)
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    for m in mounts {
        sandbox
            .mount_into_share(&name, |target| {
                let options = m.options.to_vec();
                let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                // The crate's helper handles overlay option lists longer than a
                // page, as containerd's own shims do.
                containerd_shim::mount::mount_rootfs(
                    non_empty(&m.type_).as_deref(),
                    non_empty(&m.source).as_deref(),
                    &options,
                    target,
                )
                .map_err(|e| SandboxError::Agent(format!("mounting the {} rootfs: {e}", m.type_)))
            })
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let inner = &self.inner;
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json"))
            .map_err(|e| failed(format!("reading {}/config.json: {e}", bundle.display())))?;
        let role = Role::of(&spec, &id);
        if let Some(why) = guest_spec::refused_host_namespaces(&spec, &role) {
            return Err(status(
                shim_ttrpc::Code::INVALID_ARGUMENT,
                format!("pod {id}: {why}"),
            ));
        }
        let mut state = inner.state.lock().await;
        if state.containers.contains_key(&id) {
            return Err(status(
                shim_ttrpc::Code::ALREADY_EXISTS,
                format!("container {id} exists already"),
            ));
        }
        let sandbox_pid = match &role {
            Role::PodMember { sandbox_id } => {
                let sandbox = state.containers.get(sandbox_id).ok_or_else(|| {
                    failed(format!(
                        "container {id} belongs to pod {sandbox_id}, which this shim does not run"
                    ))
                })?;
                Some(sandbox.init.pid)
            }
            _ => None,
        };
        let vm_id = role.vm_id(&id).to_owned();
        let booted_here = state.vm.is_none();
        if booted_here {
            if matches!(role, Role::PodMember { .. }) {
                return Err(failed(format!("the microVM of pod {vm_id} is not running")));
            }
            let vm = inner.boot(&vm_id, &spec).await?;
            inner.watch_oom(vm.conn.clone());
            state.vm = Some(vm);
        }
        let record = BundleRecord {
            vm_id: vm_id.clone(),
            run_root: inner.config.run_root.clone(),
            owns_vm: booted_here,
        };
        if let Err(e) = record.write(&bundle) {
            tracing::warn!(container = %id, "writing the bundle record: {e}");
        }

        let result = async {
            let vm = state.vm.as_mut().ok_or_else(|| failed("no microVM"))?;
            mount_rootfs(&mut vm.sandbox, &id, &bundle, &spec, &req.rootfs)
                .map_err(|e| failed(format!("container {id}: {e}")))?;
            let guest = guest_spec::for_guest(spec, &id, &role, sandbox_pid);
            for note in &guest.notes {
                tracing::info!(container = %id, "{note}");
            }
            for bind in &guest.binds {
                vm.sandbox
                    .bind_into_share(&bind.source, &bind.share_name)
                    .map_err(|e| failed(format!("container {id}: {e}")))?;
            }
            let stdio = StdioSpec {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            let mut create = CreateContainerRequest::new();
            create.container_id = id.clone();
            create.oci_spec_json = serde_json::to_vec(&guest.spec)
                .map_err(|e| internal(format!("encoding the spec: {e}")))?;
            create.rootfs_path = format!("{id}/rootfs");
            create.stdio = Some(stdio.streams()).into();
            create.terminal = req.terminal;
            let reply = vm
                .conn
                .agent()
                .create_container(ctx(), &create)
                .await
                .map_err(|e| agent_err("creation", &id, e))?;
            let streams = pio::open_streams(&vm.conn, &id, "", &stdio)
                .await
                .map_err(|e| agent_err("stdio", &id, e))?;
            let io = ProcessIo::wire(streams, &stdio, &id, &inner.namespace)
                .await
                .map_err(|e| failed(format!("container {id}: {e}")))?;
            let mut init = Process::new(stdio);
            init.pid = reply.pid;
            init.host_pid = vm.sandbox.vmm_pid().unwrap_or(0);
            init.io = Some(Arc::new(Mutex::new(io)));
            Ok::<_, shim_ttrpc::Error>(init)
        }
        .await;

        let init = match result {
            Ok(init) => init,
            Err(e) => {
                tracing::error!(container = %id, "create failed: {e:?}");
                inner.remove_container(&mut state, &id).await;
                return Err(e);
            }
        };
        let pid = init.host_pid;
        state.containers.insert(
            id.clone(),
            Container {
                bundle: bundle.clone(),
                init,
                execs: HashMap::new(),
            },
        );
        drop(state);

        let mut ev = TaskCreate::new();
        ev.container_id = id.clone();
        ev.bundle = req.bundle.clone();
        ev.rootfs = req.rootfs.clone();
        let mut tio = TaskIO::new();
        tio.stdin = req.stdin.clone();
        tio.stdout = req.stdout.clone();
        tio.stderr = req.stderr.clone();
        tio.terminal = req.terminal;
        ev.io = Some(tio).into();
        ev.pid = pid;
        inner.publish(ev).await;
        tracing::info!(container = %id, pid, "created");
        let mut resp = api::CreateTaskResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let conn = state.conn()?;
        if state.container(&req.id)?.process(&req.exec_id)?.status != api::Status::CREATED {
            return Err(failed(format!(
                "{}/{} is not in the created state",
                req.id, req.exec_id
            )));
        }
        if req.exec_id.is_empty() {
            // `ctr run --cni` puts the interface in the namespace between
            // create and start.
            if let Some(vm) = state.vm.as_mut() {
                vm.join_network()
                    .await
                    .map_err(|e| failed(format!("container {}: {e}", req.id)))?;
            }
        }
        let host_pid = state
            .vm
            .as_ref()
            .and_then(|vm| vm.sandbox.vmm_pid())
            .unwrap_or(0);
        let container = state.container_mut(&req.id)?;
        let process = container.process_mut(&req.exec_id)?;
        if req.exec_id.is_empty() {
            let mut start = StartContainerRequest::new();
            start.container_id = req.id.clone();
            conn.agent()
                .start_container(ctx(), &start)
                .await
                .map_err(|e| agent_err("start", &req.id, e))?;
        } else {
            let mut exec = AgentExec::new();
            exec.container_id = req.id.clone();
            exec.exec_id = req.exec_id.clone();
            exec.process_json = process.exec_spec.take().unwrap_or_default();
            exec.stdio = Some(process.stdio.streams()).into();
            exec.terminal = process.stdio.terminal;
            // The agent starts the process once its streams are attached,
            // which happens while the call is outstanding.
            let call = conn.agent().exec_process(ctx(), &exec);
            let streams = pio::open_streams(&conn, &req.id, &req.exec_id, &process.stdio);
            let (reply, streams) = tokio::join!(call, streams);
            let reply = reply.map_err(|e| agent_err("exec", &req.id, e))?;
            let streams = streams.map_err(|e| agent_err("exec stdio", &req.id, e))?;
            let io = ProcessIo::wire(streams, &process.stdio, &req.id, &inner.namespace)
                .await
                .map_err(|e| failed(format!("exec {}: {e}", req.exec_id)))?;
            process.pid = reply.pid;
            process.host_pid = host_pid;
            process.io = Some(Arc::new(Mutex::new(io)));
        }
        process.status = api::Status::RUNNING;
        let pid = process.host_pid;
        let io = process.io.clone();
        let tx = process
            .exit_tx
            .take()
            .ok_or_else(|| failed("started twice"))?;
        drop(state);
        inner.watch_exit(conn, req.id.clone(), req.exec_id.clone(), pid, io, tx);

        if req.exec_id.is_empty() {
            let mut ev = TaskStart::new();
            ev.container_id = req.id.clone();
            ev.pid = pid;
            inner.publish(ev).await;
        } else {
            let mut ev = TaskExecStarted::new();
            ev.container_id = req.id.clone();
            ev.exec_id = req.exec_id.clone();
            ev.pid = pid;
            inner.publish(ev).await;
        }
        let mut resp = api::StartResponse::new();
        resp.pid = pid;
        Ok(resp)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.inner.state.lock().await;
        let container = state.container(&req.id)?;
        let p = container.process(&req.exec_id)?;
        let mut resp = api::StateResponse::new();
        resp.id = req.id.clone();
        resp.exec_id = req.exec_id.clone();
        resp.bundle = container.bundle.to_string_lossy().into_owned();
        resp.pid = p.host_pid;
        resp.stdin = p.stdio.stdin.clone();
        resp.stdout = p.stdio.stdout.clone();
        resp.stderr = p.stdio.stderr.clone();
        resp.terminal = p.stdio.terminal;
        let st = match p.exited() {
            Some(exit) => {
                resp.exit_status = exit.code;
                resp.exited_at = Some(timestamp(exit.at)).into();
                api::Status::STOPPED
            }
            None => p.status,
        };
        resp.status = st.into();
        Ok(resp)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let mut state = self.inner.state.lock().await;
        let container = state.container(&req.id)?;
        let p = container.process(&req.exec_id)?;
        if p.exited().is_some() && !req.all {
            return Err(not_found("process already finished"));
        }
        let conn = state.conn()?;
        // A process that never started has no watcher to report its end:
        // killing it ends it here, so `Wait` (and `ctr task delete -f`)
        // returns instead of waiting forever.
        let never_started = {
            let p = state.container_mut(&req.id)?.process_mut(&req.exec_id)?;
            match (p.status == api::Status::CREATED, p.exit_tx.take()) {
                (true, Some(tx)) => {
                    p.status = api::Status::STOPPED;
                    Some((tx, p.host_pid))
                }
                (_, tx) => {
                    p.exit_tx = tx;
                    None
                }
            }
        };
        drop(state);
        let never_started_exit = never_started.is_some();
        if let Some((tx, pid)) = never_started {
            let exit = Exit {
                code: 128 + req.signal,
                at: SystemTime::now(),
            };
            let _ = tx.send(Some(exit));
            let mut ev = TaskExit::new();
            ev.container_id = req.id.clone();
            ev.id = if req.exec_id.is_empty() {
                req.id.clone()
            } else {
                req.exec_id.clone()
            };
            ev.pid = pid;
            ev.exit_status = exit.code;
            ev.exited_at = Some(timestamp(exit.at)).into();
            self.inner.publish(ev).await;
        }
        let mut sig = SignalProcessRequest::new();
        sig.container_id = req.id.clone();
        sig.exec_id = req.exec_id.clone();
        sig.signal = req.signal;
        sig.all = req.all;
        let signalled = conn.agent().signal_process(ctx(), &sig).await;
        match signalled {
            // The guest's created process is removed with the container.
            Err(e) if never_started_exit => {
                tracing::debug!(container = %req.id, "signal to a process that never started: {e}");
            }
            Err(e) => return Err(agent_err("signal", &req.id, e)),
            Ok(_) => {}
        }
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let container = state.container_mut(&req.id)?;
        let p = container.process(&req.exec_id)?;
        let exit = match p.exited() {
            Some(exit) => exit,
            None if p.status == api::Status::CREATED => Exit {
                code: 0,
                at: SystemTime::now(),
            },
            None => {
                return Err(failed(format!(
                    "{} {} is still running; kill it first",
                    req.id, req.exec_id
                )))
            }
        };
        let pid = p.host_pid;
        if req.exec_id.is_empty() {
            inner.remove_container(&mut state, &req.id).await;
            let empty = state.containers.is_empty();
            drop(state);
            let mut ev = TaskDelete::new();
            ev.container_id = req.id.clone();
            ev.id = req.id.clone();
            ev.pid = pid;
            ev.exit_status = exit.code;
            ev.exited_at = Some(timestamp(exit.at)).into();
            inner.publish(ev).await;
            tracing::info!(container = %req.id, last = empty, "deleted");
        } else {
            container.execs.remove(&req.exec_id);
        }
        let mut resp = api::DeleteResponse::new();
        resp.pid = pid;
        resp.exit_status = exit.code;
        resp.exited_at = Some(timestamp(exit.at)).into();
        Ok(resp)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let state = self.inner.state.lock().await;
            let container = state.container(&req.id)?;
            container.process(&req.exec_id)?.exit.clone()
        };
        let exit = loop {
            if let Some(exit) = *rx.borrow_and_update() {
                break exit;
            }
            if rx.changed().await.is_err() {
                // The process was deleted before it was started.
                break Exit {
                    code: 255,
                    at: SystemTime::now(),
                };
            }
        };
        let mut resp = api::WaitResponse::new();
        resp.exit_status = exit.code;
        resp.exited_at = Some(timestamp(exit.at)).into();
        Ok(resp)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        bulkhead_protocol::validate_exec_id(&req.exec_id)
            .map_err(|e| status(shim_ttrpc::Code::INVALID_ARGUMENT, format!("exec id: {e}")))?;
        let mut state = self.inner.state.lock().await;
        let container = state.container_mut(&req.id)?;
        if container.execs.contains_key(&req.exec_id) {
            return Err(status(
                shim_ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} exists already", req.exec_id),
            ));
        }
        let mut p = Process::new(StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.exec_spec = req.spec.as_ref().map(|any| any.value.clone());
        container.execs.insert(req.exec_id.clone(), p);
        drop(state);
        let mut ev = TaskExecAdded::new();
        ev.container_id = req.id.clone();
        ev.exec_id = req.exec_id.clone();
        self.inner.publish(ev).await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let conn = self.conn_for(&req.id).await?;
        let mut r = ResizeTtyRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.cols = req.width;
        r.rows = req.height;
        conn.agent()
            .resize_tty(ctx(), &r)
            .await
            .map_err(|e| agent_err("resize", &req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let (io, conn) = {
            let state = self.inner.state.lock().await;
            let container = state.container(&req.id)?;
            let io = container.process(&req.exec_id)?.io.clone();
            (io, state.vm.as_ref().map(|v| v.conn.clone()))
        };
        if let Some(io) = io {
            io.lock().await.close_stdin().await;
        }
        if let Some(conn) = conn {
            let mut r = CloseStdinRequest::new();
            r.container_id = req.id.clone();
            r.exec_id = req.exec_id.clone();
            if let Err(e) = conn.agent().close_stdin(ctx(), &r).await {
                tracing::debug!(container = %req.id, "CloseStdin: {e}");
            }
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let conn = self.conn_for(&req.id).await?;
        let mut r = ListProcessesRequest::new();
        r.container_id = req.id.clone();
        let reply = conn
            .agent()
            .list_processes(ctx(), &r)
            .await
            .map_err(|e| agent_err("process list", &req.id, e))?;
        let mut resp = api::PidsResponse::new();
        resp.processes = reply
            .pids
            .iter()
            .map(|pid| {
                let mut info = containerd_shim::protos::types::task::ProcessInfo::new();
                info.pid = *pid;
                info
            })
            .collect();
        Ok(resp)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let conn = self.conn_for(&req.id).await?;
        let mut r = StatsContainerRequest::new();
        r.container_id = req.id.clone();
        let stats = conn
            .agent()
            .stats_container(ctx(), &r)
            .await
            .map_err(|e| agent_err("statistics", &req.id, e))?;
        let mut resp = api::StatsResponse::new();
        resp.stats = Some(metrics::to_any(&stats).map_err(internal)?).into();
        Ok(resp)
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let conn = self.conn_for(&req.id).await?;
        let mut r = UpdateContainerRequest::new();
        r.container_id = req.id.clone();
        r.resources_json = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        conn.agent()
            .update_container(ctx(), &r)
            .await
            .map_err(|e| agent_err("update", &req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, false).await
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let state = self.inner.state.lock().await;
        let mut resp = api::ConnectResponse::new();
        resp.shim_pid = std::process::id();
        resp.task_pid = state.containers.get(&req.id).map_or(0, |c| c.init.host_pid);
        resp.version = env!("CARGO_PKG_VERSION").to_owned();
        Ok(resp)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        if state.containers.is_empty() {
            tracing::info!("no containers left: the shim exits");
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

impl TaskService {
    /// Pauses (`frozen`) or resumes container `id`: its cgroup in the guest
    /// is frozen, as runc does on the host; the VM and the container's
    /// neighbours in a pod run on. Its live processes report PAUSED meanwhile.
    async fn freeze(&self, id: &str, frozen: bool) -> TtrpcResult<api::Empty> {
        let (what, from, to) = if frozen {
            ("pause", api::Status::RUNNING, api::Status::PAUSED)
        } else {
            ("resume", api::Status::PAUSED, api::Status::RUNNING)
        };
        // Held throughout, so a state or exec between the agent's answer and
        // the new status sees one or the other, never a mix.
        let mut state = self.inner.state.lock().await;
        let conn = state.conn()?;
        let container = state.container_mut(id)?;
        if container.init.exited().is_some() || container.init.status != from {
            return Err(failed(format!(
                "cannot {what} container {id}: it is {}",
                format!("{:?}", container.init.status).to_lowercase()
            )));
        }
        let agent = conn.agent();
        if frozen {
            let mut r = PauseContainerRequest::new();
            r.container_id = id.to_owned();
            agent.pause_container(ctx(), &r).await.map(drop)
        } else {
            let mut r = ResumeContainerRequest::new();
            r.container_id = id.to_owned();
            agent.resume_container(ctx(), &r).await.map(drop)
        }
        .map_err(|e| agent_err(what, id, e))?;
        for p in std::iter::once(&mut container.init).chain(container.execs.values_mut()) {
            if p.status == from && p.exited().is_none() {
                p.status = to;
            }
        }
        drop(state);
        if frozen {
            let mut ev = TaskPaused::new();
            ev.container_id = id.to_owned();
            self.inner.publish(ev).await;
        } else {
            let mut ev = TaskResumed::new();
            ev.container_id = id.to_owned();
            self.inner.publish(ev).await;
        }
        Ok(api::Empty::new())
    }

    async fn conn_for(&self, id: &str) -> TtrpcResult<AgentConnection> {
        let state = self.inner.state.lock().await;
        state.container(id)?;
        state.conn()
    }
}
