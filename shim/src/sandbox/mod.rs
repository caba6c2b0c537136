//! One sandbox: a microVM with its agent, the virtiofsd that serves its share,
//! and the host directory that holds their sockets and logs.
//!
//! [`Sandbox::start`] makes `/run/bulkhead/<id>/` (0700), bind-mounts the
//! requested directories into its share, starts virtiofsd and bulkhead-vmm, and
//! waits, with a deadline, for the agent to dial the host's ready port (no
//! polling). [`Sandbox::stop`] asks the agent to shut the VM down and removes
//! every process, mount, socket and file the sandbox made; dropping a
//! [`Sandbox`] does the same without the polite part.

pub mod artifacts;
pub mod bundle;
pub mod container_log;
mod dir;
pub mod guest_spec;
pub mod host_hooks;
pub mod network;
pub mod process_io;
mod processes;
pub mod sizing;
pub mod templates;
mod vsock;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_protocol::agent::{CheckRequest, ShutdownRequest};
use bulkhead_protocol::agent_ttrpc::AgentClient;
use bulkhead_protocol::stream::{
    BootFacts, StreamAck, StreamHeader, BOOT_ACK_LINE, READY_LINE_PREFIX,
};
use bulkhead_protocol::{ttrpc, AGENT_STREAM_PORT, AGENT_TTRPC_PORT, HOST_READY_PORT};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

use bulkhead_protocol::network::GuestNetwork;
pub use dir::{first_mount_under, force_remove, mounts_under, SandboxDir};
use network::NetworkAttachment;
pub use processes::process_start_ticks;
use processes::{start_virtiofsd, tail, HostProcess};

/// The virtio-fs tag of the sandbox share; the agent mounts it.
pub const SHARE_TAG: &str = "bulkhead";
/// Where the guest mounts the share (the agent's `SHARE_DIR`).
pub const GUEST_SHARE_DIR: &str = "/run/bulkhead/share";

/// The guest path of `shared/<name>`.
pub fn guest_share_path(name: &str) -> PathBuf {
    Path::new(GUEST_SHARE_DIR).join(name)
}
/// The guest's vsock CID (any value >= 3 works: each VM has its own vsock device).
const GUEST_CID: u32 = 3;

/// The descriptor number bulkhead-vmm finds its vsock socket at.
const VMM_VSOCK_LISTENER_FD: i32 = 3;
/// The descriptor number bulkhead-vmm finds the sandbox's tap at.
const VMM_TAP_FD: i32 = 4;
/// The MAC of a VM with no network (and of templates): locally
/// administered; a networked VM's agent sets the real one.
const UNPLUGGED_MAC: &str = "02:00:00:00:00:01";
/// Deadline for one RPC that should answer at once.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of console and logs quoted in errors.
const TAIL_LINES: usize = 20;

/// Why a sandbox could not be started, used or stopped.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// A file-system operation failed.
    #[error("Cannot {what} {path}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The id is taken.
    #[error("A sandbox with id {id} exists already ({path}); pick another id or remove it")]
    InUse {
        /// The id.
        id: String,
        /// Its directory.
        path: PathBuf,
    },
    /// A bind mount failed.
    #[error("Cannot bind-mount {source_path} at {target}: {errno}")]
    Mount {
        /// What was to be mounted.
        source_path: PathBuf,
        /// Where.
        target: PathBuf,
        /// Why.
        errno: nix::Error,
    },
    /// Cleanup found a mount it could not remove.
    #[error("{0} is still mounted; refusing to delete files under it")]
    StillMounted(PathBuf),
    /// A host program could not be started.
    #[error("Cannot start {name}")]
    Spawn {
        /// Which.
        name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host program exited early.
    #[error("{name} exited ({status}) before the sandbox was up. Its last output:\n{log_tail}")]
    Exited {
        /// Which.
        name: &'static str,
        /// How.
        status: std::process::ExitStatus,
        /// Its log's tail.
        log_tail: String,
    },
    /// The agent did not report in time.
    #[error(
        "The guest agent did not report ready within {secs} s. Last console lines:\n{console_tail}"
    )]
    BootTimeout {
        /// The deadline.
        secs: u64,
        /// The console's last lines.
        console_tail: String,
    },
    /// The guest VM stopped on its own.
    #[error("The microVM stopped ({status}). bulkhead-vmm said:\n{vmm_tail}\nLast console lines:\n{console_tail}")]
    VmGone {
        /// bulkhead-vmm's exit status.
        status: std::process::ExitStatus,
        /// bulkhead-vmm's log.
        vmm_tail: String,
        /// The guest console.
        console_tail: String,
    },
    /// The sandbox's network could not be set up.
    #[error("The sandbox's network: {0}")]
    Network(#[from] network::NetworkError),
    /// A vsock connection to the guest failed.
    #[error("Cannot connect to guest vsock port {port}")]
    Vsock {
        /// The port.
        port: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No sandbox by that id is running.
    #[error("No running sandbox named {id}")]
    NotRunning {
        /// The id.
        id: String,
    },
    /// The agent answered something it must not.
    #[error("The guest agent misbehaved: {0}")]
    Agent(String),
    /// An RPC failed.
    #[error("Agent call {call} failed")]
    Rpc {
        /// Which call.
        call: &'static str,
        /// Why.
        #[source]
        source: ttrpc::Error,
    },
}

/// What a sandbox is made of.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// The sandbox id: a directory name under `run_root`.
    pub id: String,
    /// Where sandbox directories live (`/run/bulkhead`).
    pub run_root: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initrd (the agent).
    pub initrd: PathBuf,
    /// The bulkhead-vmm binary.
    pub vmm: PathBuf,
    /// The virtiofsd binary.
    pub virtiofsd: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u16,
    /// How long the agent has to report ready.
    pub boot_timeout: Duration,
    /// virtiofsd's `--cache` mode (`auto`, `always`, `never`, `metadata`).
    pub virtiofsd_cache: &'static str,
    /// The guest kernel logs verbosely to the console log.
    pub debug_console: bool,
    /// Start from a VM template (see [`templates`]) rather than a kernel boot.
    pub vm_templates: bool,
}

/// A connection to a sandbox's agent: its RPC client and the hybrid vsock
/// socket through which stdio streams are opened. The process that started the
/// sandbox has one inside its [`Sandbox`]; others (`bulkhead exec`) attach.
/// Clones share the RPC connection.
#[derive(Clone)]
pub struct AgentConnection {
    vsock_uds: PathBuf,
    agent: AgentClient,
}

impl AgentConnection {
    /// Connects to the agent behind the hybrid vsock socket `vsock_uds` and
    /// checks that it answers.
    pub async fn connect(vsock_uds: &Path) -> Result<AgentConnection, SandboxError> {
        let connection = Self::open(vsock_uds).await?;
        connection
            .agent
            .check(
                ttrpc::context::with_duration(RPC_TIMEOUT),
                &CheckRequest::new(),
            )
            .await
            .map_err(|source| SandboxError::Rpc {
                call: "Check",
                source,
            })?;
        Ok(connection)
    }

    /// Opens the RPC connection without a Check: for a sandbox whose agent
    /// has just said hello (the hello carries what Check would tell).
    async fn open(vsock_uds: &Path) -> Result<AgentConnection, SandboxError> {
        let stream = vsock::connect(vsock_uds, AGENT_TTRPC_PORT, RPC_TIMEOUT).await?;
        let client =
            ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream));
        Ok(AgentConnection {
            vsock_uds: vsock_uds.to_owned(),
            agent: AgentClient::new(client),
        })
    }

    /// Attaches to the running sandbox `id` under `run_root`.
    pub async fn attach(run_root: &Path, id: &str) -> Result<AgentConnection, SandboxError> {
        bulkhead_protocol::validate_id(id)
            .map_err(|e| SandboxError::Agent(format!("invalid sandbox id: {e}")))?;
        let socket = run_root.join(id).join("vsock.sock");
        if !socket.exists() {
            return Err(SandboxError::NotRunning { id: id.to_owned() });
        }
        AgentConnection::connect(&socket).await
    }

    /// The agent's RPC client.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Opens one stdio stream of a process in the guest.
    pub async fn open_stream(&self, header: &StreamHeader) -> Result<UnixStream, SandboxError> {
        let mut stream = vsock::connect(&self.vsock_uds, AGENT_STREAM_PORT, RPC_TIMEOUT).await?;
        let agent_err =
            |e: &dyn std::fmt::Display| SandboxError::Agent(format!("stream header: {e}"));
        header
            .write_to_async(&mut stream)
            .await
            .map_err(|e| agent_err(&e))?;
        let ack = tokio::time::timeout(RPC_TIMEOUT, stream.read_u8())
            .await
            .map_err(|_| agent_err(&"no answer in time"))?
            .map_err(|e| agent_err(&e))?;
        match StreamAck::from_u8(ack) {
            Some(StreamAck::Attached) => Ok(stream),
            other => Err(SandboxError::Agent(format!(
                "the agent refused stream {:?} of {}/{}: {other:?}",
                header.kind, header.container_id, header.exec_id
            ))),
        }
    }

    /// Like [`AgentConnection::open_stream`], taking the header by value (for closures).
    pub async fn open_stream_owned(
        &self,
        header: StreamHeader,
    ) -> Result<UnixStream, SandboxError> {
        self.open_stream(&header).await
    }
}

/// A running sandbox.
pub struct Sandbox {
    id: String,
    dir: SandboxDir,
    vmm: HostProcess,
    virtiofsd: HostProcess,
    /// The agent's ready connection, held open: end-of-file on it means the agent died.
    _ready: UnixStream,
    connection: AgentConnection,
    agent_version: String,
    /// The network namespace the VM's tap is in, while its interface is not
    /// configured in the guest yet.
    unjoined_netns: Option<PathBuf>,
}

impl Sandbox {
    /// Starts a sandbox whose share holds `shares` (name inside the share,
    /// host directory), bind-mounted read-write: from a VM template when the
    /// config allows it (made first if missing), else by booting the kernel.
    /// A template that fails to resume is discarded and the kernel booted.
    pub async fn start(
        config: &SandboxConfig,
        shares: &[(&str, &Path)],
    ) -> Result<Sandbox, SandboxError> {
        Self::start_on_network(config, shares, None).await
    }

    /// [`Sandbox::start`], with the VM on `network`: bulkhead-vmm gets its
    /// tap, and the agent configures the guest's interface before this
    /// returns, so the first container finds it in its network namespace.
    pub async fn start_on_network(
        config: &SandboxConfig,
        shares: &[(&str, &Path)],
        network: Option<&NetworkAttachment>,
    ) -> Result<Sandbox, SandboxError> {
        bulkhead_protocol::validate_id(&config.id)
            .map_err(|e| SandboxError::Agent(format!("invalid sandbox id: {e}")))?;
        if config.vm_templates {
            match templates::ensure(config).await {
                Ok(template) => {
                    match Self::launch(config, shares, Some(&template), network).await {
                        Ok(sandbox) => return Ok(sandbox),
                        Err(
                            e @ (SandboxError::VmGone { .. }
                            | SandboxError::Vsock { .. }
                            | SandboxError::BootTimeout { .. }
                            | SandboxError::Agent(_)),
                        ) => {
                            tracing::warn!(
                                sandbox = %config.id,
                                template = %template.display(),
                                "the VM template did not resume, so it is discarded and the kernel booted: {e}"
                            );
                            templates::discard(&template);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => tracing::warn!(
                    sandbox = %config.id,
                    "no VM template, booting the kernel: {e}"
                ),
            }
        }
        Self::launch(config, shares, None, network).await
    }

    /// Makes the sandbox directory, starts virtiofsd and the VMM (resuming
    /// `template` if given) and waits for the agent.
    async fn launch(
        config: &SandboxConfig,
        shares: &[(&str, &Path)],
        template: Option<&Path>,
        network: Option<&NetworkAttachment>,
    ) -> Result<Sandbox, SandboxError> {
        let started = std::time::Instant::now();
        let step = |what: &str| tracing::info!(sandbox = %config.id, ms = started.elapsed().as_millis() as u64, "{what}");
        let mut dir = SandboxDir::create(&config.run_root, &config.id)?;
        for (name, source) in shares {
            dir.bind_into_share(source, name)?;
        }
        let mut vm = VmProcesses::start(config, &dir, network, |vm_config| {
            if let Some(template) = template {
                vm_config["restore_snapshot"] = template.to_string_lossy().into_owned().into();
            }
        })?;
        if template.is_some() {
            step("virtiofsd and bulkhead-vmm started, resuming a VM template");
            let patience = config.boot_timeout.min(templates::RESUME_TIMEOUT);
            if let Err(e) = templates::resume(&mut vm, &dir, patience).await {
                vm.stop().await;
                return Err(e);
            }
            step("VM resumed");
        } else {
            step("virtiofsd and bulkhead-vmm started, booting");
        }
        let ready = wait_ready(
            &vm.ready_listener,
            &mut vm.vmm,
            &mut vm.virtiofsd,
            &dir,
            config.boot_timeout,
        )
        .await;
        // The RPC connection is opened while the agent applies the boot facts;
        // no request goes out before it has acknowledged them.
        let ready = match ready {
            Ok((mut stream, version)) => {
                let (facts, connection) = tokio::join!(
                    send_boot_facts(&mut stream),
                    AgentConnection::open(&vm.vsock_uds)
                );
                facts.and(connection).map(|c| (stream, version, c))
            }
            Err(e) => Err(e),
        };
        let (ready, agent_version, connection) = match ready {
            Ok(r) => r,
            Err(e) => {
                vm.stop().await;
                return Err(e);
            }
        };
        step("agent ready and connected");
        let mut unjoined_netns = None;
        match network {
            Some(NetworkAttachment {
                guest: Some(guest), ..
            }) => {
                if let Err(e) = configure_network(&connection, guest).await {
                    vm.stop().await;
                    return Err(e);
                }
                step("guest network configured");
            }
            Some(network) => unjoined_netns = Some(network.netns.clone()),
            None => {}
        }
        Ok(Sandbox {
            id: config.id.clone(),
            dir,
            vmm: vm.vmm,
            virtiofsd: vm.virtiofsd,
            _ready: ready,
            connection,
            agent_version,
            unjoined_netns,
        })
    }

    /// Joins the VM's tap to interface `ifname` of the sandbox's network
    /// namespace and configures the guest's NIC, if the VM was started on a
    /// namespace whose interface was not there yet and now is (`ctr run
    /// --cni` adds it between create and start). Returns the settings the
    /// guest took, or `None` if there was nothing (yet) to join.
    pub async fn join_network(
        &mut self,
        ifname: &str,
        policy: &network::egress::EgressPolicy,
    ) -> Result<Option<GuestNetwork>, SandboxError> {
        let Some(netns) = self.unjoined_netns.clone() else {
            return Ok(None);
        };
        let joined = {
            let (netns, ifname, policy) = (netns.clone(), ifname.to_owned(), policy.clone());
            tokio::task::spawn_blocking(move || network::join(&netns, &ifname, &policy))
                .await
                .map_err(|e| SandboxError::Network(network::NetworkError::Cni(e.to_string())))?
                .map_err(SandboxError::Network)?
        };
        let Some(guest) = joined else {
            return Ok(None);
        };
        configure_network(&self.connection, &guest).await?;
        tracing::info!(sandbox = %self.id, netns = %netns.display(), "guest network configured");
        self.unjoined_netns = None;
        Ok(Some(guest))
    }

    /// bulkhead-vmm's process id: what a host tool may look at for the
    /// sandbox (it runs in the sandbox's network namespace), never a guest
    /// pid, which means nothing on the host.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.pid()
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent's version, as it announced itself.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// The connection to the agent.
    pub fn connection(&self) -> &AgentConnection {
        &self.connection
    }

    /// The sandbox's host directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Bind-mounts `source` (a directory or a file) at `shared/<name>` while
    /// the sandbox runs; the guest sees it at [`guest_share_path`]`(name)`.
    pub fn bind_into_share(&mut self, source: &Path, name: &str) -> Result<PathBuf, SandboxError> {
        self.dir.bind_into_share(source, name)
    }

    /// Mounts a file system (e.g. containerd's overlay rootfs) at
    /// `shared/<name>` while the sandbox runs.
    pub fn mount_into_share(
        &mut self,
        name: &str,
        mount: impl FnOnce(&Path) -> Result<(), SandboxError>,
    ) -> Result<PathBuf, SandboxError> {
        self.dir.mount_into_share(name, mount)
    }

    /// Unmounts everything at or under `shared/<name>` and removes what is left
    /// of it (a container's rootfs and volumes when it is deleted).
    pub fn remove_from_share(&mut self, name: &str) -> Result<(), SandboxError> {
        self.dir.remove_from_share(name)
    }

    /// The last lines of the guest console, for error reports.
    pub fn console_tail(&self) -> String {
        tail(&self.dir.file("console.log"), TAIL_LINES)
    }

    /// If the VM has stopped: how, in bulkhead-vmm's words (its exit status and
    /// the last lines of its log, e.g. "vCPU 0 triple-faulted" or a kernel panic).
    /// Lets errors name the real cause instead of a closed connection.
    pub fn vm_exit_report(&mut self) -> Option<String> {
        let status = self.vmm.try_exit()?;
        Some(format!(
            "the microVM stopped ({status}); bulkhead-vmm said:\n{}",
            self.vmm.log_tail(TAIL_LINES)
        ))
    }

    /// Asks the agent to shut the VM down, then makes sure every process is gone
    /// and removes the sandbox directory with its mounts.
    ///
    /// The agent answers Shutdown once its containers are killed and every
    /// guest file system is flushed (the share's writes are on the host). From
    /// then on nothing in the guest matters, so bulkhead-vmm is killed at once
    /// rather than waiting for the guest kernel's own power-off (about 200 ms
    /// under emulation). Without that answer, the VM gets 5 s to stop by
    /// itself.
    pub async fn stop(mut self) -> Result<(), SandboxError> {
        let started = std::time::Instant::now();
        let ms = || started.elapsed().as_millis() as u64;
        let polite = self
            .connection
            .agent
            .shutdown(
                ttrpc::context::with_duration(Duration::from_secs(2)),
                &ShutdownRequest::new(),
            )
            .await;
        match polite {
            Ok(_) => {
                tracing::debug!(sandbox = %self.id, ms = ms(), "the agent flushed the guest");
                self.vmm.kill().await;
            }
            Err(e) => {
                tracing::debug!(sandbox = %self.id, ms = ms(), "Shutdown RPC: {e}");
                self.vmm.stop(Duration::from_secs(5)).await;
            }
        }
        tracing::debug!(sandbox = %self.id, ms = ms(), "bulkhead-vmm stopped");
        self.virtiofsd.stop(Duration::from_secs(2)).await;
        tracing::debug!(sandbox = %self.id, ms = ms(), "virtiofsd stopped");
        let removed = self.dir.remove();
        tracing::debug!(sandbox = %self.id, ms = ms(), "sandbox directory removed");
        removed
    }
}

/// A sandbox's two host processes and the sockets between them, just started.
struct VmProcesses {
    vmm: HostProcess,
    virtiofsd: HostProcess,
    vsock_uds: PathBuf,
    ready_listener: UnixListener,
}

impl VmProcesses {
    /// Starts virtiofsd on `dir`'s share and bulkhead-vmm with the VM config
    /// that `config` describes, after `adjust` had its say on it (a template
    /// boot or a resume add their field).
    fn start(
        config: &SandboxConfig,
        dir: &SandboxDir,
        network: Option<&NetworkAttachment>,
        adjust: impl FnOnce(&mut serde_json::Value),
    ) -> Result<VmProcesses, SandboxError> {
        let virtiofsd_socket = dir.file("virtiofsd.sock");
        let virtiofsd = start_virtiofsd(
            &config.virtiofsd,
            &dir.shared(),
            &virtiofsd_socket,
            &dir.file("virtiofsd.log"),
            config.virtiofsd_cache,
        )?;
        let vsock_uds = dir.file("vsock.sock");
        // Bound here and passed down, so the host can connect to the guest
        // (a template's resume) as soon as the VMM runs, without polling for
        // the VMM to create the socket.
        let vsock_listener = std::os::unix::net::UnixListener::bind(&vsock_uds)
            .and_then(|listener| {
                std::fs::set_permissions(&vsock_uds, std::fs::Permissions::from_mode(0o600))?;
                Ok(listener)
            })
            .map_err(|source| SandboxError::Io {
                what: "listen on",
                path: vsock_uds.clone(),
                source,
            })?;
        let ready_path = PathBuf::from(format!("{}_{HOST_READY_PORT}", vsock_uds.display()));
        let ready_listener =
            UnixListener::bind(&ready_path).map_err(|source| SandboxError::Io {
                what: "listen on",
                path: ready_path.clone(),
                source,
            })?;
        let mut vm_config = serde_json::json!({
            "kernel": config.kernel,
            "initrd": config.initrd,
            "memory": config.memory_mib,
            "vcpus": config.vcpus,
            "console": dir.file("console.log"),
            "debug_console": config.debug_console,
            "fs": [{"tag": SHARE_TAG, "socket": virtiofsd_socket}],
            "vsock": {"cid": GUEST_CID, "uds_path": vsock_uds, "listener_fd": VMM_VSOCK_LISTENER_FD},
        });
        // Every VM has the NIC, networked or not, so that every VM of a shape
        // has the same devices and one template serves them all; without a
        // tap it carries nothing.
        let tap = match network {
            Some(n) => Some(dup_above_stdio(&n.tap).map_err(|source| SandboxError::Io {
                what: "duplicate the tap of",
                path: dir.path().to_owned(),
                source,
            })?),
            None => None,
        };
        vm_config["net"] = match (&tap, network) {
            // Without the interface's MAC yet, the agent sets it on join.
            (Some(_), Some(n)) => serde_json::json!({
                "mac": n.guest.as_ref().map_or(UNPLUGGED_MAC.to_owned(), |g| g.mac.to_string()),
                "tap_fd": VMM_TAP_FD,
            }),
            _ => serde_json::json!({"mac": UNPLUGGED_MAC}),
        };
        // The VMM runs in the sandbox's namespace: host tools that look at
        // the task's process (`ctr run --cni` sets up /proc/PID/ns/net)
        // find the sandbox's network there.
        let netns = match network {
            Some(n) => Some(
                std::fs::File::open(&n.netns).map_err(|source| SandboxError::Io {
                    what: "open",
                    path: n.netns.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        adjust(&mut vm_config);
        let vm_config_path = dir.file("vm.json");
        // On any error below, dropping `virtiofsd` kills it.
        std::fs::write(&vm_config_path, vm_config.to_string()).map_err(|source| {
            SandboxError::Io {
                what: "write",
                path: vm_config_path.clone(),
                source,
            }
        })?;
        let mut cmd = Command::new(&config.vmm);
        cmd.arg("--config").arg(&vm_config_path);
        processes::pass_descriptor(&mut cmd, vsock_listener.as_raw_fd(), VMM_VSOCK_LISTENER_FD);
        if let Some(tap) = &tap {
            processes::pass_descriptor(&mut cmd, tap.as_raw_fd(), VMM_TAP_FD);
        }
        if let Some(ns) = &netns {
            processes::enter_netns(&mut cmd, ns.as_raw_fd());
        }
        let vmm = HostProcess::spawn("bulkhead-vmm", cmd, &dir.file("vmm.log"))?;
        // The VMM has its copy; a connection now waits in the backlog until
        // the VMM serves it, or fails when the VMM is gone.
        drop(vsock_listener);
        drop(tap);
        drop(netns);
        // For `force_remove` after a crash of this process.
        vmm.write_pid_file(&dir.file("vmm.pid"));
        virtiofsd.write_pid_file(&dir.file("virtiofsd.pid"));
        Ok(VmProcesses {
            vmm,
            virtiofsd,
            vsock_uds,
            ready_listener,
        })
    }

    /// Stops a VM that will not be used: the VMM at once, then virtiofsd
    /// (which ends by itself when the VMM hangs up).
    async fn stop(&mut self) {
        self.vmm.kill().await;
        self.virtiofsd.stop(Duration::from_secs(2)).await;
    }
}

/// Has the agent move the guest NIC into the sandbox's network namespace and
/// configure it as the host interface it stands for.
async fn configure_network(
    connection: &AgentConnection,
    guest: &GuestNetwork,
) -> Result<(), SandboxError> {
    connection
        .agent
        .configure_network(
            ttrpc::context::with_duration(RPC_TIMEOUT),
            &guest.to_request(),
        )
        .await
        .map(|_| ())
        .map_err(|source| SandboxError::Rpc {
            call: "ConfigureNetwork",
            source,
        })
}

/// A copy of `fd` numbered 10 or more, so passing it to the VMM as
/// [`VMM_TAP_FD`] cannot be clobbered by (or clobber) the other passed
/// descriptor.
fn dup_above_stdio(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    fd.as_fd().try_clone_to_owned().and_then(|copy| {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into the
        // lowest free number >= 10; the result is owned below.
        let raw = unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    })
}

/// Sends the agent the host's clock and a fresh seed, and waits for it to
/// have applied them: a resumed template must not run a single request on the
/// template's clock and random state.
async fn send_boot_facts(stream: &mut UnixStream) -> Result<(), SandboxError> {
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let facts = BootFacts {
        unix_time,
        seed: crate::random::bytes::<32>(),
    };
    let exchange = async {
        stream.write_all(facts.to_line().as_bytes()).await?;
        let mut ack = [0u8; BOOT_ACK_LINE.len()];
        stream.read_exact(&mut ack).await?;
        Ok::<_, std::io::Error>(ack)
    };
    match tokio::time::timeout(RPC_TIMEOUT, exchange).await {
        Ok(Ok(ack)) if ack == BOOT_ACK_LINE.as_bytes() => Ok(()),
        Ok(Ok(ack)) => Err(SandboxError::Agent(format!(
            "bad answer to the boot line: {:?}",
            String::from_utf8_lossy(&ack)
        ))),
        Ok(Err(e)) => Err(SandboxError::Agent(format!(
            "the agent did not take the boot line: {e}"
        ))),
        Err(_) => Err(SandboxError::Agent(
            "the agent did not acknowledge the boot line in time".into(),
        )),
    }
}

/// Waits for the agent's connection on the ready port and its hello line,
/// failing early if the VMM exits and late if the deadline passes. The caller
/// then sends the boot facts on that connection.
async fn wait_ready(
    listener: &UnixListener,
    vmm: &mut HostProcess,
    virtiofsd: &mut HostProcess,
    dir: &SandboxDir,
    timeout: Duration,
) -> Result<(UnixStream, String), SandboxError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let console_tail = || tail(&dir.file("console.log"), TAIL_LINES);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted
                    .map_err(|source| SandboxError::Io { what: "accept on", path: dir.file("vsock.sock"), source })?;
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let read = tokio::time::timeout(RPC_TIMEOUT, (&mut reader).take(256).read_line(&mut line)).await;
                if !matches!(read, Ok(Ok(n)) if n > 0) || !line.starts_with(READY_LINE_PREFIX) {
                    return Err(SandboxError::Agent(format!("bad hello on the ready port: {line:?}")));
                }
                let version = line[READY_LINE_PREFIX.len()..].trim().to_owned();
                return Ok((reader.into_inner(), version));
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                // virtiofsd first: when it fails the VMM follows, and its own
                // log says why. (It exits with success when the VMM hangs up.)
                if let Some(status) = virtiofsd.try_exit().filter(|s| !s.success()) {
                    return Err(SandboxError::Exited { name: "virtiofsd", status, log_tail: virtiofsd.log_tail(TAIL_LINES) });
                }
                if let Some(status) = vmm.try_exit() {
                    return Err(SandboxError::VmGone { status, vmm_tail: vmm.log_tail(TAIL_LINES), console_tail: console_tail() });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(SandboxError::BootTimeout { secs: timeout.as_secs(), console_tail: console_tail() });
                }
            }
        }
    }
}
