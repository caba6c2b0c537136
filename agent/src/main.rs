//! `bulkhead-agent`, the guest's PID 1.
//!
//! As PID 1 it mounts the kernel filesystems, enables the cgroup controllers and
//! forks the agent off a reaper ([`bulkhead_agent::pid1`]). The agent's RPC service
//! (ttrpc over vsock) is not wired in yet: until then the agent child only reports
//! that it is up.

use std::path::Path;

use bulkhead_agent::{init, pid1};

fn main() {
    if std::process::id() != 1 {
        eprintln!("bulkhead-agent: must run as the guest's PID 1 (/init)");
        std::process::exit(2);
    }
    // libcontainer chdirs to its state directory and back; start from a directory
    // that always exists.
    let _ = std::env::set_current_dir("/");
    if let Err(err) = init::mount_kernel_filesystems(Path::new("/")) {
        fatal(&format!("early setup: {err}"));
    }
    match init::enable_cgroup_controllers(Path::new("/sys/fs/cgroup")) {
        Ok(enabled) => eprintln!("bulkhead-agent: cgroup controllers: {}", enabled.join(" ")),
        Err(err) => fatal(&format!("cgroup controllers: {err}")),
    }
    let status = pid1::run_agent_under_reaper(|| {
        eprintln!("bulkhead-agent: agent service not built yet");
        1
    });
    match status {
        Ok(status) => fatal(&format!("the agent ended: {status}")),
        Err(err) => fatal(&format!("starting the agent: {err}")),
    }
}

/// PID 1 must not exit (the kernel would panic without saying why): report on the
/// console and reset the VM, which the VMM sees as the guest stopping.
fn fatal(msg: &str) -> ! {
    eprintln!("bulkhead-agent: {msg}");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    std::process::exit(1);
}
