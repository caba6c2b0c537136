//! `containerd-shim-bulkhead-v2`: containerd's runtime v2 shim, so that
//! containerd (and Kubernetes through CRI, nerdctl, Docker with `--runtime`)
//! runs containers in bulkhead microVMs.
//!
//! - [`service`]: the shim's `start`/`delete` lifecycle and pod grouping;
//! - [`task`]: the Task service on top of the guest agent;
//! - [`guest_spec`]: containerd's OCI spec rewritten for the guest;
//! - [`io`]: containerd's FIFOs and log URIs joined to the guest's streams;
//! - [`metrics`]: the agent's cgroup statistics in containerd's types;
//! - [`record`]: what `delete` needs after a shim crash;
//! - [`sizing`]: the VM's vCPUs and memory from the pod's requests;
//! - [`logging`]: the shim's log to containerd.

pub mod guest_spec;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod record;
pub mod service;
pub mod sizing;
pub mod task;

/// The runtime name containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.bulkhead.v2";

/// The shim binary's whole `main`.
pub async fn main() {
    let config = containerd_shim::Config {
        // We log through `tracing` to containerd's log FIFO ourselves.
        no_setup_logger: true,
        // tokio reaps our children (bulkhead-vmm, virtiofsd); a blanket
        // waitpid(-1) would steal their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME_ID, Some(config)).await;
}
