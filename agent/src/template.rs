//! A template boot: the agent's half of the VMM's snapshots.
//!
//! When the kernel command line carries `bulkhead.template=1`, the VMM is
//! making a template: the agent does everything that is the same for every
//! sandbox (kernel filesystems, cgroups, its RPC listeners), then prints
//! [`MARKER`] on the console and waits for a connection on
//! [`AGENT_RESUME_PORT`]. The VMM stops the VM at the marker and saves it;
//! the template VM never gets the connection. Every sandbox started from the
//! template resumes in that wait, gets the host's connection, and goes on with
//! what differs per sandbox: the shared folder, the clock, fresh randomness
//! (see [`crate::ready`]).

use std::io;

use bulkhead_protocol::AGENT_RESUME_PORT;
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// The kernel parameter the VMM adds to a template boot's command line.
pub const TEMPLATE_PARAM: &str = "bulkhead.template=1";

/// What the VMM waits for on the console (bulkhead-vmm's `snapshot::MARKER`).
pub const MARKER: &str = "bulkhead-agent: template ready, save me";

/// Whether `cmdline` (the contents of /proc/cmdline) is a template boot's.
pub fn is_template_boot(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == TEMPLATE_PARAM)
}

/// Asks to be saved and waits until this VM is a copy that the host resumed.
pub async fn save_and_wait_for_resume() -> io::Result<()> {
    // Listening first: the copies must find the port open the moment they run.
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, AGENT_RESUME_PORT))?;
    // One write, so that no other console output splits the marker.
    eprintln!("{MARKER}");
    let (_go, _) = listener.accept().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_boots_are_told_by_the_command_line() {
        assert!(is_template_boot("console=ttyS0 bulkhead.template=1 quiet"));
        assert!(!is_template_boot("console=ttyS0 quiet"));
        assert!(!is_template_boot("bulkhead.template=10"));
    }
}
