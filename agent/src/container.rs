//! One OCI container in the guest, made and driven with youki's `libcontainer`.
//!
//! libcontainer does the OCI runtime work (namespaces, cgroups, capabilities,
//! seccomp, mounts, pivot_root, ...); this module gives it a bundle, the stdio,
//! and owns what libcontainer leaves to its caller: waiting for the processes
//! (by pidfd, see [`crate::process`]), their exit statuses, terminals, statistics
//! and cleanup. State lives under [`DEFAULT_RUN_DIR`]: libcontainer's state in
//! `containers/<id>`, the bundle (config.json, exec process files) in
//! `bundles/<id>`.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, LinuxSeccomp, Process as OciProcess, RootBuilder, Spec};

use crate::cgroup::{Cgroup, CgroupStats, CGROUP_ROOT};
use crate::exec_seccomp::SeccompExecutor;
use crate::exit::ExitStatus;
use crate::oom;
use crate::process::Process;
use crate::spare_netns::SpareNetns;
use crate::stdio::{ConsoleSocket, Stdio};

/// Where the agent keeps container state in the guest.
pub const DEFAULT_RUN_DIR: &str = "/run/bulkhead-agent";

/// The cgroup parent of containers whose spec names no `cgroupsPath`.
pub const DEFAULT_CGROUP_PARENT: &str = "/bulkhead";

/// Serializes the libcontainer calls that change the process-wide working
/// directory: its notify socket and console socket code `chdir`s into the
/// container's state directory (for short socket paths) and back. Two of them at
/// once in different threads would bind or connect in the wrong directory. So
/// build, exec and start take this lock; nothing in the agent uses relative paths.
static CWD_LOCK: Mutex<()> = Mutex::new(());

/// Boxed cause of a [`ContainerError`].
pub type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// A failed container operation, naming the container and the step.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The request itself is wrong (bad id, missing process, wrong state).
    #[error("container {id}: {reason}")]
    Invalid {
        /// The container.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The command is not in the rootfs (runc's and Docker's exit code 127).
    #[error("container {id}: {detail}")]
    CommandNotFound {
        /// The container.
        id: String,
        /// libcontainer's message, naming the executable.
        detail: String,
    },
    /// A step failed.
    #[error("container {id}: {op}: {source}")]
    Op {
        /// The container.
        id: String,
        /// The step, e.g. "creating", "exec ls-1".
        op: String,
        /// Why (libcontainer, libcgroups or an I/O error).
        #[source]
        source: Cause,
    },
}

impl ContainerError {
    /// The exit code a CLI should report for this failure: 127 for a command not
    /// found (like runc and Docker), 125 for everything else (Docker's "the
    /// runtime failed").
    pub fn exit_code(&self) -> i32 {
        match self {
            ContainerError::CommandNotFound { .. } => 127,
            _ => 125,
        }
    }
}

/// libcontainer's init checks the executable before `exec` and sends back a
/// message; there is no typed error for it, so recognise the message (pinned
/// libcontainer 0.7; a test covers it).
fn classify_build_error(
    id: &str,
    op: &str,
    err: libcontainer::error::LibcontainerError,
) -> ContainerError {
    let text = err.to_string();
    if text.contains("not found in $PATH") || text.contains("executable file not found") {
        let detail = text
            .rsplit(" : ")
            .next()
            .unwrap_or(&text)
            .trim()
            .to_string();
        return ContainerError::CommandNotFound {
            id: id.to_string(),
            detail,
        };
    }
    ContainerError::Op {
        id: id.to_string(),
        op: op.to_string(),
        source: err.into(),
    }
}

/// Everything needed to create a container.
#[derive(Debug)]
pub struct CreateOptions {
    /// The container id (letters, digits, `_+-.`).
    pub id: String,
    /// The OCI runtime spec. Its `root.path` is replaced by `rootfs`; a missing
    /// `linux.cgroupsPath` becomes `/bulkhead/<id>`; `process.terminal` is set from
    /// `stdio`.
    pub spec: Spec,
    /// The container's root filesystem (e.g. inside the virtio-fs share).
    pub rootfs: PathBuf,
    /// The init process's stdio.
    pub stdio: Stdio,
    /// The agent's state directory ([`DEFAULT_RUN_DIR`] in the guest).
    pub run_dir: PathBuf,
    /// A network namespace made ahead of time, which the container joins
    /// instead of making one when it can (see [`crate::spare_netns`]).
    pub spare_netns: Option<Arc<SpareNetns>>,
}

impl CreateOptions {
    /// Options with the default state directory and /dev/null stdio.
    pub fn new(id: impl Into<String>, spec: Spec, rootfs: impl Into<PathBuf>) -> Self {
        CreateOptions {
            id: id.into(),
            spec,
            rootfs: rootfs.into(),
            stdio: Stdio::Null,
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            spare_netns: None,
        }
    }
}

/// A created container: its init process waits for [`Container::start`].
#[derive(Debug)]
pub struct Container {
    id: String,
    state_root: PathBuf,
    bundle: PathBuf,
    cgroup: Cgroup,
    init: Arc<Process>,
    terminal: Mutex<Option<OwnedFd>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Where console sockets are bound (see [`console_socket_path`]).
    console_dir: PathBuf,
    /// The container's seccomp profile, for exec'd processes too.
    seccomp: Option<LinuxSeccomp>,
}

/// A process started by [`Container::exec`].
#[derive(Debug)]
pub struct Exec {
    /// The process; wait or signal it.
    pub process: Arc<Process>,
    /// The pty master when the exec asked for a terminal.
    pub terminal: Option<OwnedFd>,
}

impl Container {
    /// Creates the container (namespaces, cgroup, mounts, stdio) with its init
    /// process stopped before `exec`, like `runc create`.
    pub fn create(opts: CreateOptions) -> Result<Self, ContainerError> {
        let CreateOptions {
            id,
            mut spec,
            rootfs,
            stdio,
            run_dir,
            spare_netns,
        } = opts;
        validate_name(&id, &id, "container id")?;
        let state_root = run_dir.join("containers");
        let console_dir = run_dir.join("consoles");
        let bundle = run_dir.join("bundles").join(&id);
        if bundle.exists() || state_root.join(&id).exists() {
            return Err(invalid(&id, "a container with this id already exists"));
        }
        let terminal = matches!(stdio, Stdio::Terminal);
        let cgroup_path = prepare_spec(&id, &mut spec, &rootfs, terminal)?;
        if let Some(spare) = spare_netns.as_deref() {
            spare.lend_to(&mut spec);
        }
        let op = |step: &str| {
            let id = id.clone();
            let step = step.to_string();
            move |source: Cause| ContainerError::Op {
                id,
                op: step,
                source,
            }
        };
        let new_netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
                })
            });
        for dir in [&state_root, &console_dir] {
            fs::create_dir_all(dir).map_err(|e| op("creating the state directory")(e.into()))?;
        }
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        fs::create_dir_all(&bundle).map_err(|e| op("creating the bundle")(e.into()))?;

        let built = (|| {
            spec.save(bundle.join("config.json"))
                .map_err(|e| op("writing config.json")(e.into()))?;
            let (builder, console) = base_builder(&id, &state_root, &console_dir, "init", stdio)?;
            let _cwd = lock(&CWD_LOCK);
            let lc = builder
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| classify_build_error(&id, "creating", e))?;
            let pid = lc
                .pid()
                .ok_or_else(|| invalid(&id, "libcontainer reported no init pid"))?;
            let init = Process::adopt(Pid::from_raw(pid.as_raw()))
                .map_err(|e| op("watching the init process")(e.into()))?;
            if new_netns {
                crate::netns::loopback_up(pid.as_raw())
                    .map_err(|e| op("bringing up lo in its network namespace")(e.into()))?;
            }
            let master = match console {
                Some(console) => Some(
                    console
                        .receive_master()
                        .map_err(|e| op("receiving the pty")(e.into()))?,
                ),
                None => None,
            };
            Ok((init, master))
        })();
        let (init, master) = match built {
            Ok(parts) => parts,
            Err(err) => {
                cleanup_failed_create(&id, &state_root, &bundle);
                return Err(err);
            }
        };
        Ok(Container {
            cgroup: Cgroup::new(Path::new(CGROUP_ROOT), &cgroup_path),
            id,
            state_root,
            bundle,
            init: Arc::new(init),
            terminal: Mutex::new(master),
            execs: Mutex::new(HashMap::new()),
            console_dir,
            seccomp,
        })
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init process's pid in the agent's pid namespace.
    pub fn pid(&self) -> Pid {
        self.init.pid()
    }

    /// The init process.
    pub fn init(&self) -> &Arc<Process> {
        &self.init
    }

    /// The pty master of the init process, if it has a terminal (once).
    pub fn take_terminal(&self) -> Option<OwnedFd> {
        lock(&self.terminal).take()
    }

    /// The container's cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Lets the init process `exec` the user's command, like `runc start`.
    pub fn start(&self) -> Result<(), ContainerError> {
        let _cwd = lock(&CWD_LOCK);
        self.load()?
            .start()
            .map_err(|e| self.op("starting", e.into()))
    }

    /// Blocks until the init process ends.
    pub fn wait(&self) -> ExitStatus {
        self.init.wait()
    }

    /// Waits up to `timeout` for the init process.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        self.init.wait_timeout(timeout)
    }

    /// Sends `signal` to the init process, or with `all` to every process in the
    /// container's cgroup (frozen meanwhile, so that none escapes by forking).
    pub fn signal(&self, signal: i32, all: bool) -> Result<(), ContainerError> {
        if all {
            let sig = libcontainer::signal::Signal::try_from(signal)
                .map_err(|e| self.op("signalling", e.into()))?;
            self.load()?
                .kill(sig, true)
                .map_err(|e| self.op("signalling all processes", e.into()))
        } else {
            self.init
                .signal(signal)
                .map_err(|e| self.op("signalling the init process", e.into()))
        }
    }

    /// Starts `process` inside the running container (its namespaces, cgroup,
    /// capabilities, ...), like `runc exec`. `exec_id` names it for
    /// [`Container::exec_process`].
    pub fn exec(
        &self,
        exec_id: &str,
        mut process: OciProcess,
        stdio: Stdio,
    ) -> Result<Exec, ContainerError> {
        validate_name(&self.id, exec_id, "exec id")?;
        if lock(&self.execs).contains_key(exec_id) {
            return Err(invalid(&self.id, format!("exec {exec_id} already exists")));
        }
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(invalid(&self.id, format!("exec {exec_id}: empty command")));
        }
        let op = format!("exec {exec_id}");
        let terminal = matches!(stdio, Stdio::Terminal);
        process.set_terminal(Some(terminal));
        let executor = match &self.seccomp {
            Some(profile) => Some(
                SeccompExecutor::prepare(&mut process, profile)
                    .map_err(|e| invalid(&self.id, format!("{op}: {e}")))?,
            ),
            None => None,
        };
        let process_file = self.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process).map_err(|e| self.op(&op, e.into()))?;
        fs::write(&process_file, json).map_err(|e| self.op(&op, e.into()))?;

        let result = (|| {
            let (mut builder, console) = base_builder(
                &self.id,
                &self.state_root,
                &self.console_dir,
                exec_id,
                stdio,
            )?;
            if let Some(executor) = executor {
                builder = builder.with_executor(executor);
            }
            let _cwd = lock(&CWD_LOCK);
            let pid = builder
                .as_tenant()
                .with_process(Some(&process_file))
                .with_detach(true)
                .build()
                .map_err(|e| classify_build_error(&self.id, &op, e))?;
            let proc =
                Process::adopt(Pid::from_raw(pid.as_raw())).map_err(|e| self.op(&op, e.into()))?;
            let terminal = match console {
                Some(c) => Some(c.receive_master().map_err(|e| self.op(&op, e.into()))?),
                None => None,
            };
            Ok((proc, terminal))
        })();
        let _ = fs::remove_file(&process_file);
        let (proc, terminal) = result?;
        let proc = Arc::new(proc);
        lock(&self.execs).insert(exec_id.to_string(), Arc::clone(&proc));
        Ok(Exec {
            process: proc,
            terminal,
        })
    }

    /// An exec'd process by its id.
    pub fn exec_process(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).get(exec_id).cloned()
    }

    /// Forgets an exec'd process that has ended (after its status was reported).
    pub fn remove_exec(&self, exec_id: &str) -> Option<Arc<Process>> {
        lock(&self.execs).remove(exec_id)
    }

    /// The pids of every process in the container (agent's pid namespace).
    pub fn pids(&self) -> Result<Vec<i32>, ContainerError> {
        self.cgroup
            .pids()
            .map_err(|e| self.op("listing processes", e.into()))
    }

    /// cgroup v2 statistics (cpu, memory, pids, io).
    pub fn stats(&self) -> Result<CgroupStats, ContainerError> {
        self.cgroup
            .stats()
            .map_err(|e| self.op("reading statistics", e.into()))
    }

    /// How many processes the OOM killer has killed in this container so far.
    pub fn oom_kills(&self) -> Result<u64, ContainerError> {
        self.cgroup
            .memory_events()
            .map(|e| e.oom_kill)
            .map_err(|e| self.op("reading memory.events", e.into()))
    }

    /// Blocks until the OOM-kill count exceeds `seen` (or `timeout` passes) and
    /// returns the new count; for the OOM event stream.
    pub fn wait_for_oom(&self, seen: u64, timeout: Duration) -> Result<u64, ContainerError> {
        oom::wait_for_oom_kill(&self.cgroup, seen, timeout)
            .map_err(|e| self.op("watching memory.events", e.into()))
    }

    /// Applies new resource limits to the running container.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        let manager = libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
            cgroup_path: self.cgroup_path(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|e| self.op("updating resources", e.into()))?;
        manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| self.op("updating resources", e.into()))
    }

    /// Removes the container: its processes (only with `force` if the init still
    /// runs), its cgroup, libcontainer's state and the bundle. A refused delete
    /// leaves the container as it was.
    pub fn delete(&self, force: bool) -> Result<(), ContainerError> {
        if self.init.is_running() {
            if !force {
                return Err(invalid(&self.id, "still running (delete needs force)"));
            }
            self.signal(libc::SIGKILL, true)?;
            self.init.wait();
        }
        // Any exec'd process left (possible without a pid namespace) dies with it.
        if !self.pids()?.is_empty() {
            self.signal(libc::SIGKILL, true)?;
        }
        for proc in lock(&self.execs).values() {
            proc.signal(libc::SIGKILL)
                .map_err(|e| self.op("killing exec processes", e.into()))?;
            proc.wait();
        }
        if self.state_root.join(&self.id).exists() {
            self.load()?
                .delete(true)
                .map_err(|e| self.op("deleting", e.into()))?;
        }
        match fs::remove_dir_all(&self.bundle) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(self.op("removing the bundle", err.into())),
        }
    }

    fn cgroup_path(&self) -> PathBuf {
        let rel = self
            .cgroup
            .dir()
            .strip_prefix(CGROUP_ROOT)
            .unwrap_or(self.cgroup.dir());
        Path::new("/").join(rel)
    }

    /// Freezes every process of the container, like `runc pause`.
    pub fn pause(&self) -> Result<(), ContainerError> {
        self.load()?
            .pause()
            .map_err(|e| self.state_error("pausing", e))
    }

    /// Thaws a paused container, like `runc resume`.
    pub fn resume(&self) -> Result<(), ContainerError> {
        self.load()?
            .resume()
            .map_err(|e| self.state_error("resuming", e))
    }

    /// A libcontainer error of `op`: a wrong state (pausing what is not
    /// running, resuming what is not paused) is the caller's mistake.
    fn state_error(&self, op: &str, e: libcontainer::error::LibcontainerError) -> ContainerError {
        match e {
            libcontainer::error::LibcontainerError::IncorrectStatus(status) => invalid(
                &self.id,
                format!(
                    "{op}: the container is {}",
                    status.to_string().to_lowercase()
                ),
            ),
            e => self.op(op, e.into()),
        }
    }

    fn load(&self) -> Result<LcContainer, ContainerError> {
        LcContainer::load(self.state_root.join(&self.id))
            .map_err(|e| self.op("loading state", e.into()))
    }

    fn op(&self, op: &str, source: Cause) -> ContainerError {
        ContainerError::Op {
            id: self.id.clone(),
            op: op.to_string(),
            source,
        }
    }
}

/// The part of the libcontainer builder shared by create and exec: state root,
/// stdio, console socket. Returns the console socket to receive the pty from.
fn base_builder(
    id: &str,
    state_root: &Path,
    console_dir: &Path,
    name: &str,
    stdio: Stdio,
) -> Result<(ContainerBuilder, Option<ConsoleSocket>), ContainerError> {
    let op = |source: Cause| ContainerError::Op {
        id: id.to_string(),
        op: format!("preparing {name}"),
        source,
    };
    let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(state_root)
        .map_err(|e| op(e.into()))?
        .validate_id()
        .map_err(|e| op(e.into()))?;
    let mut console = None;
    match stdio.into_fds().map_err(|e| op(e.into()))? {
        Some([stdin, stdout, stderr]) => {
            builder = builder
                .with_stdin(stdin)
                .with_stdout(stdout)
                .with_stderr(stderr);
        }
        None => {
            let socket =
                ConsoleSocket::bind(&console_socket_path(console_dir)).map_err(|e| op(e.into()))?;
            builder = builder.with_console_socket(Some(socket.path()));
            console = Some(socket);
        }
    }
    Ok((builder, console))
}

/// A fresh path for a console socket in `console_dir`. Not named after the
/// container and the exec: Kubernetes' ids are 64 characters each, and a
/// path with both passes the 108 bytes of `sun_path`.
fn console_socket_path(console_dir: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    console_dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Fills in what the agent decides in the spec; returns the cgroup path.
fn prepare_spec(
    id: &str,
    spec: &mut Spec,
    rootfs: &Path,
    terminal: bool,
) -> Result<PathBuf, ContainerError> {
    if !rootfs.is_absolute() {
        return Err(invalid(
            id,
            format!("rootfs {} is not absolute", rootfs.display()),
        ));
    }
    if !rootfs.is_dir() {
        return Err(invalid(
            id,
            format!("rootfs {} is not a directory", rootfs.display()),
        ));
    }
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(readonly)
        .build()
        .map_err(|e| invalid(id, format!("root: {e}")))?;
    spec.set_root(Some(root));

    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| invalid(id, "the spec has no process"))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid(id, "empty command"));
    }
    process.set_terminal(Some(terminal));
    let cwd = process.cwd().clone();
    let mounts = spec.mounts().clone().unwrap_or_default();
    crate::workdir::ensure_for(rootfs, &mounts, &cwd).map_err(|e| {
        invalid(
            id,
            format!("cannot make the working directory {}: {e}", cwd.display()),
        )
    })?;

    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| invalid(id, "the spec has no linux section"))?;
    let cgroup_path = match linux.cgroups_path() {
        Some(path) => path.clone(),
        None => Path::new(DEFAULT_CGROUP_PARENT).join(id),
    };
    if !cgroup_path.is_absolute() || cgroup_path.components().any(|c| c.as_os_str() == "..") {
        return Err(invalid(
            id,
            format!("cgroupsPath {} must be absolute", cgroup_path.display()),
        ));
    }
    linux.set_cgroups_path(Some(cgroup_path.clone()));
    Ok(cgroup_path)
}

/// Best-effort removal after a failed create, so the id can be used again.
fn cleanup_failed_create(id: &str, state_root: &Path, bundle: &Path) {
    if let Ok(mut lc) = LcContainer::load(state_root.join(id)) {
        if let Err(err) = lc.delete(true) {
            tracing::warn!("container {id}: cleaning up after a failed create: {err}");
        }
    }
    let _ = fs::remove_dir_all(state_root.join(id));
    let _ = fs::remove_dir_all(bundle);
}

/// Ids become file names: the same rule as libcontainer's, checked up front.
fn validate_name(id: &str, name: &str, what: &str) -> Result<(), ContainerError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(id, format!("invalid {what} {name:?}")))
    }
}

fn invalid(id: &str, reason: impl Into<String>) -> ContainerError {
    ContainerError::Invalid {
        id: id.to_string(),
        reason: reason.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
