//! `bulkhead-agent`, the guest's PID 1, and, bind-mounted into containers, their
//! tiny init ([`bulkhead_agent::init_mode`]).
//!
//! As PID 1 it leaves the initramfs for a tmpfs root (so that containers can
//! `pivot_root`), mounts the kernel filesystems, enables the cgroup controllers,
//! mounts the virtio-fs share, and forks the agent off a reaper
//! ([`bulkhead_agent::pid1`]). The agent serves ttrpc on vsock port 1024 and the
//! stdio streams on port 1025, and only then dials the host's ready port.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulkhead_agent::container::DEFAULT_RUN_DIR;
use bulkhead_agent::init::SHARE_READAHEAD_KIB;
use bulkhead_agent::mapping::{SHARE_DIR, SHARE_TAG};
use bulkhead_agent::rpc::{AgentService, Config};
use bulkhead_agent::spare_netns::{SpareNetns, SPARE_NETNS_PATH};
use bulkhead_agent::streams::{self, Lookup};
use bulkhead_agent::{init, init_mode, pid1, ready, rootfs, template};
use bulkhead_protocol::agent_ttrpc::{create_agent, Agent};
use bulkhead_protocol::ttrpc::asynchronous::Server;
use bulkhead_protocol::{AGENT_STREAM_PORT, AGENT_TTRPC_PORT, HOST_READY_PORT};

fn main() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(code) = init_mode::run_if_selected(&args) {
        std::process::exit(code);
    }
    if std::process::id() != 1 {
        eprintln!("bulkhead-agent: must run as the guest's PID 1 (/init)");
        std::process::exit(2);
    }
    if !Path::new(rootfs::MARKER).exists() {
        eprintln!("bulkhead-agent: started at {}", since_boot());
    }
    match rootfs::leave_initramfs(&args) {
        Ok(()) => {}
        Err(err) => eprintln!("bulkhead-agent: staying on the initramfs root: {err}"),
    }
    // libcontainer chdirs to its state directory and back; start from a directory
    // that always exists.
    let _ = std::env::set_current_dir("/");
    if let Err(err) = init::mount_kernel_filesystems(Path::new("/")) {
        fatal(&format!("early setup: {err}"));
    }
    match init::enable_cgroup_controllers(Path::new("/sys/fs/cgroup")) {
        Ok(enabled) => eprintln!(
            "bulkhead-agent: cgroup controllers: {} at {}",
            enabled.join(" "),
            since_boot()
        ),
        Err(err) => fatal(&format!("cgroup controllers: {err}")),
    }
    // Without the share no container can be made, but Check and Shutdown still
    // work, and the host gets a clear error from CreateContainer.
    let status = pid1::run_agent_under_reaper(agent_main);
    match status {
        Ok(status) => fatal(&format!("the agent ended: {status}")),
        Err(err) => fatal(&format!("starting the agent: {err}")),
    }
}

/// The agent process: a tokio runtime serving the API until the VM stops.
fn agent_main() -> i32 {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        // The log goes to the serial console, where every byte is a VM exit
        // (about 75 us each under nested emulation): per-container steps are
        // debug, and libcontainer says only what went wrong.
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,libcontainer=warn"))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agent")
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("bulkhead-agent: tokio runtime: {err}");
            return 1;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("bulkhead-agent: {err}");
            1
        }
    }
}

async fn serve() -> Result<(), String> {
    let init_binary = std::env::current_exe()
        .ok()
        .or_else(|| Some(PathBuf::from("/init")))
        .filter(|p| p.is_file());
    // Made before a template boot is saved, so that every copy has one.
    let spare_netns = match SpareNetns::prepare(Path::new(SPARE_NETNS_PATH)) {
        Ok(spare) => Some(Arc::new(spare)),
        Err(err) => {
            eprintln!("bulkhead-agent: no spare network namespace: {err}");
            None
        }
    };
    let service = AgentService::new(Config {
        share_dir: PathBuf::from(SHARE_DIR),
        run_dir: PathBuf::from(DEFAULT_RUN_DIR),
        init_binary,
        spare_netns,
    });
    let agent: Arc<dyn Agent + Send + Sync> = service.clone();
    let mut server = Server::new()
        .bind(&format!("vsock://-1:{AGENT_TTRPC_PORT}"))
        .map_err(|e| format!("ttrpc on vsock port {AGENT_TTRPC_PORT}: {e}"))?
        .register_service(create_agent(agent));
    server
        .start()
        .await
        .map_err(|e| format!("starting the ttrpc server: {e}"))?;
    let listener = streams::bind(AGENT_STREAM_PORT)
        .map_err(|e| format!("stream listener on vsock port {AGENT_STREAM_PORT}: {e}"))?;
    let lookup: Arc<dyn Lookup> = service;
    tokio::spawn(streams::serve(listener, lookup));
    // Everything above is the same in every sandbox: a template boot is
    // saved here, and its copies resume here.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if template::is_template_boot(&cmdline) {
        eprintln!("bulkhead-agent: template set up at {}", since_boot());
        template::save_and_wait_for_resume()
            .await
            .map_err(|e| format!("waiting to be resumed from the template: {e}"))?;
    }
    match init::mount_virtiofs(SHARE_TAG, Path::new(SHARE_DIR)) {
        Ok(()) => {
            if let Err(err) = init::set_readahead(Path::new(SHARE_DIR), SHARE_READAHEAD_KIB) {
                eprintln!("bulkhead-agent: shared folder read-ahead: {err}");
            }
        }
        Err(err) => eprintln!("bulkhead-agent: no shared folder: {err}"),
    }
    // Only now can the host's requests be served: say so.
    let _hello = ready::announce(HOST_READY_PORT)
        .await
        .map_err(|e| format!("dialing the host's ready port {HOST_READY_PORT}: {e}"))?;
    eprintln!("bulkhead-agent: ready at {}", since_boot());
    // The hello connection stays open for the agent's whole life.
    std::future::pending::<()>().await;
    Ok(())
}

/// The guest's time since boot, for the console lines that let a slow boot be
/// read off the console log (kernel, then each agent step).
fn since_boot() -> String {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(t) => format!("{}.{:03} s", t.tv_sec(), t.tv_nsec() / 1_000_000),
        Err(_) => "an unknown time".to_owned(),
    }
}

/// PID 1 must not exit (the kernel would panic without saying why): report on the
/// console and reset the VM, which the VMM sees as the guest stopping.
fn fatal(msg: &str) -> ! {
    eprintln!("bulkhead-agent: {msg}");
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(1);
}
