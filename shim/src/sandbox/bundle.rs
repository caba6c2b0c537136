//! A microVM booted for an engine's OCI bundle: the one lifecycle behind the
//! containerd shim and `bulkhead-runtime` (runc's command line).
//!
//! An engine (containerd, podman, Docker) hands us a spec written for a host
//! runtime. Its network namespace is where the engine (or CNI) wired the
//! container's interface, so the VM's tap is made there and joined to it;
//! a spec that asks for a new, unnamed network namespace gets one pinned
//! under the run root, removed with the VM; a spec with no network namespace
//! (the host's network, which a VM cannot share) gets no NIC.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use thiserror::Error;

use super::network::egress::EgressPolicy;
use super::network::{self, netns};
use super::{AgentConnection, Sandbox, SandboxConfig, SandboxError};

/// The interface the engine's network makes in the container's namespace
/// (CNI's, netavark's and Docker's all name it so).
pub const GUEST_IFNAME: &str = "eth0";

/// The annotation that gives a sandbox an egress policy (the values of
/// `bulkhead run --egress`). For a Kubernetes pod, containerd passes it on
/// when the runtime's `pod_annotations` lists it (e.g. `["io.bulkhead.*"]`).
pub const EGRESS_ANNOTATION: &str = "io.bulkhead.egress";

/// Why a bundle's microVM could not be booted or joined to its network.
#[derive(Debug, Error)]
pub enum BundleVmError {
    /// The egress annotation does not parse.
    #[error("annotation {EGRESS_ANNOTATION}: {0}")]
    Egress(String),
    /// The VM's own network namespace could not be made.
    #[error("making the network namespace {path}: {source}")]
    Netns {
        /// Where it was to be pinned.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The tap could not be made in the engine's namespace.
    #[error("the network of microVM {vm_id}: {source}")]
    Network {
        /// The VM.
        vm_id: String,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VM did not start.
    #[error("starting the microVM of {vm_id}: {source}")]
    Start {
        /// The VM.
        vm_id: String,
        /// Why.
        source: SandboxError,
    },
}

/// A running microVM for a bundle, with what must go when it goes.
pub struct BundleVm {
    /// The VM's id (its run directory's name).
    pub id: String,
    /// The VM, its agent and virtiofsd.
    pub sandbox: Sandbox,
    /// A connection to its agent.
    pub conn: AgentConnection,
    /// The network namespace made for this VM (the spec asked for a new one
    /// and named none), removed with it.
    owned_netns: Option<PathBuf>,
    /// The spec's egress policy, applied at every join.
    egress: EgressPolicy,
}

/// Where the network namespace of VM `vm_id` is pinned when it is made for
/// the VM (see [`BundleVm`]).
pub fn owned_netns_path(run_root: &Path, vm_id: &str) -> PathBuf {
    run_root.join("netns").join(vm_id)
}

/// The egress policy `spec` asks for; a malformed one is an error.
pub fn spec_egress(spec: &Spec) -> Result<EgressPolicy, BundleVmError> {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(EGRESS_ANNOTATION))
    {
        Some(v) => v
            .parse()
            .map_err(|e: String| BundleVmError::Egress(e.replace("--egress ", ""))),
        None => Ok(EgressPolicy::Open),
    }
}

/// The network namespace `spec` puts its container in: the one it names
/// (the engine's), a new one (`None` path: made here), or none at all (the
/// host's network: no NIC then).
pub fn spec_netns(spec: &Spec) -> Option<Option<PathBuf>> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
        .map(|n| n.path().clone())
}

impl BundleVm {
    /// Boots the VM described by `config` on the network `spec` names, and
    /// joins it to the interface found there (if any yet). On failure
    /// nothing is left: no process, tap or namespace.
    pub async fn boot(config: &SandboxConfig, spec: &Spec) -> Result<BundleVm, BundleVmError> {
        let vm_id = config.id.clone();
        let egress = spec_egress(spec)?;
        let (ns_path, owned_netns) = match spec_netns(spec) {
            Some(Some(path)) => (Some(path), None),
            Some(None) => {
                let path = owned_netns_path(&config.run_root, &vm_id);
                netns::create(&path).map_err(|source| BundleVmError::Netns {
                    path: path.clone(),
                    source,
                })?;
                (Some(path.clone()), Some(path))
            }
            None => (None, None),
        };
        let remove_owned = || {
            if let Some(ns) = &owned_netns {
                let _ = netns::remove(ns);
            }
        };
        let attachment = match &ns_path {
            Some(ns) => match network::prepare(ns) {
                Ok(a) => Some(a),
                Err(e) => {
                    remove_owned();
                    return Err(BundleVmError::Network {
                        vm_id,
                        source: Box::new(e),
                    });
                }
            },
            None => None,
        };
        let started = async {
            let mut sandbox = Sandbox::start_on_network(config, &[], attachment.as_ref())
                .await
                .map_err(|source| BundleVmError::Start {
                    vm_id: vm_id.clone(),
                    source,
                })?;
            // The engine's namespace may have its interface already; a new
            // one gets it (if at all) before the container starts.
            if let Err(e) = sandbox.join_network(GUEST_IFNAME, &egress).await {
                let _ = sandbox.stop().await;
                return Err(BundleVmError::Network {
                    vm_id: vm_id.clone(),
                    source: Box::new(e),
                });
            }
            Ok(sandbox)
        }
        .await;
        drop(attachment);
        let sandbox = match started {
            Ok(s) => s,
            Err(e) => {
                remove_owned();
                return Err(e);
            }
        };
        let conn = sandbox.connection().clone();
        Ok(BundleVm {
            id: vm_id,
            sandbox,
            conn,
            owned_netns,
            egress,
        })
    }

    /// Joins the VM to the engine's interface if it appeared since boot
    /// (`ctr run --cni` wires the namespace between create and start); a
    /// no-op when joined already or when there is none.
    pub async fn join_network(&mut self) -> Result<(), SandboxError> {
        self.sandbox
            .join_network(GUEST_IFNAME, &self.egress)
            .await
            .map(|_| ())
    }

    /// Stops the VM and removes the namespace made for it.
    pub async fn stop(self) {
        if let Err(e) = self.sandbox.stop().await {
            tracing::error!(sandbox = %self.id, "stopping the microVM: {e}");
        }
        if let Some(ns) = &self.owned_netns {
            if let Err(e) = netns::remove(ns) {
                tracing::error!(sandbox = %self.id, "removing network namespace {}: {e}", ns.display());
            }
        }
    }
}
