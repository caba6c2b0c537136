//! The shim's lifecycle as containerd drives it: `start` (spawn or reuse the
//! shim process of a sandbox), `delete` (clean up after a shim that died), and
//! the daemon that serves the Task service.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::{api, Config as ShimConfig, Error, Flags, StartOpts};
use oci_spec::runtime::Spec;

use super::record::BundleRecord;
use super::task::TaskService;
use crate::config::Config;
use crate::sandbox::force_remove;
use crate::sandbox::guest_spec::Role;

/// Exit status reported for a container whose shim died under it (SIGKILL).
const KILLED_STATUS: u32 = 128 + 9;

/// The shim as containerd's `start`/`delete`/serve entry points see it.
pub struct Service {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// The shim process a container belongs to: one per pod (all its containers
/// share the VM), one per standalone container.
pub fn grouping(bundle: &Path, id: &str) -> String {
    match Spec::load(bundle.join("config.json")) {
        Ok(spec) => match Role::of(&spec, id) {
            Role::PodMember { sandbox_id } => sandbox_id,
            _ => id.to_owned(),
        },
        Err(_) => id.to_owned(),
    }
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the container's bundle.
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        let group = grouping(&bundle, &opts.id);
        spawn(opts, &group, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        // The shim that served this container is gone (containerd only runs
        // `delete` then): remove what it left behind, from the bundle record.
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        if let Some(record) = BundleRecord::read(&bundle) {
            let result = if record.owns_vm {
                let ns = crate::sandbox::bundle::owned_netns_path(&record.run_root, &record.vm_id);
                force_remove(&record.run_root, &record.vm_id)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        crate::sandbox::network::netns::remove(&ns).map_err(|e| e.to_string())
                    })
            } else {
                let share = record
                    .run_root
                    .join(&record.vm_id)
                    .join("shared")
                    .join(&self.id);
                remove_share_entry(&share).map_err(|e| e.to_string())
            };
            if let Err(e) = result {
                eprintln!("bulkhead: cleaning up after container {}: {e}", self.id);
            }
        }
        // containerd mounts nothing for us, but its rootfs may still be mounted
        // at <bundle>/rootfs by a client that passed no mounts.
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = KILLED_STATUS;
        resp.exited_at = Some(Timestamp::from(SystemTime::now())).into();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let config = match Config::load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}; using the defaults");
                Config::default()
            }
        };
        super::logging::init(&config.log_level);
        tracing::info!(id = %self.id, namespace = %self.namespace, "shim serving");
        TaskService::new(&self.namespace, publisher, self.exit.clone(), config)
    }
}

/// Unmounts and removes a pod member's part of the share.
fn remove_share_entry(path: &Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut under: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(path))
        .collect();
    under.reverse();
    for target in under {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    }
    std::fs::remove_dir_all(path)
}
