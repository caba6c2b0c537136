//! `containerd-shim-bulkhead-v2`: containerd's runtime v2 shim, so that
//! containerd (and Kubernetes through CRI, nerdctl, Docker with `--runtime`)
//! runs containers in bulkhead microVMs.
//!
//! - [`service`]: the shim's `start`/`delete` lifecycle and pod grouping;
//! - [`task`]: the Task service on top of the guest agent;
//! - [`io`]: containerd's FIFOs and log URIs joined to the guest's streams;
//! - [`metrics`]: the agent's cgroup statistics in containerd's types;
//! - [`record`]: what `delete` needs after a shim crash;
//! - [`logging`]: the shim's log to containerd.

pub mod io;
pub mod logging;
pub mod metrics;
pub mod record;
pub mod service;
pub mod task;

/// The runtime name containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.bulkhead.v2";

/// What `containerd-shim-bulkhead-v2 -v` (or `--version`) prints, in the shape
/// of containerd's own shims, which ops tooling reads.
pub fn version_text() -> String {
    format!(
        "containerd-shim-bulkhead-v2:\n  Runtime:  {RUNTIME_ID}\n  Version:  {}\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether the command line asks for the version (`-v`, `-version`,
/// `--version`, as Go's flag package spells them), parsed with the same
/// parser the shim library uses for its other flags.
fn asks_for_version(args: &[std::ffi::OsString]) -> bool {
    containerd_shim::parse(args).is_ok_and(|flags| flags.version)
}

/// The shim binary's whole `main`.
pub async fn main() {
    // The shim library would first demand containerd's environment
    // (TTRPC_ADDRESS) and fail with `Env(NotPresent)`; a version query needs
    // none of it.
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if asks_for_version(&args) {
        print!("{}", version_text());
        return;
    }
    // A panic in a request handler only closes containerd's connection
    // ("ttrpc: closed"); say where it was, in containerd's log.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("shim panic: {info}");
        eprintln!("containerd-shim-bulkhead-v2: panic: {info}");
    }));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
        list.iter().map(Into::into).collect()
    }

    #[test]
    fn every_spelling_of_the_version_flag_is_recognised() {
        for flag in ["-v", "--v", "-version", "--version"] {
            assert!(asks_for_version(&args(&[flag])), "{flag}");
        }
        assert!(!asks_for_version(&args(&["-namespace", "k8s.io", "start"])));
        assert!(!asks_for_version(&args(&["delete"])));
    }

    #[test]
    fn the_version_names_the_binary_runtime_and_version() {
        let text = version_text();
        assert!(text.starts_with("containerd-shim-bulkhead-v2:\n"), "{text}");
        assert!(text.contains(RUNTIME_ID), "{text}");
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    }
}
