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

/// Memory left alone when scrubbing: what the kernel and the agent may still
/// need while the scrub holds the rest.
const SCRUB_RESERVE_KIB: u64 = 16 << 10;

/// Zeroes the guest's free memory. The VMM saves only pages that are not zero,
/// and every copy of the template reads all of those back at its start; free
/// pages still hold whatever they held (the unpacked initrd, the agent's first
/// copy of itself), so scrubbing them here makes every start cheaper. Taking
/// the pages as fresh anonymous memory makes the kernel zero them; giving them
/// back leaves them zero. Best effort: on failure the template is just bigger.
pub fn scrub_free_memory() {
    let free_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemFree:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let Some(kib) = free_kib.checked_sub(SCRUB_RESERVE_KIB).filter(|k| *k > 0) else {
        return;
    };
    let len = (kib << 10) as usize;
    // SAFETY: a fresh private anonymous mapping that nothing else refers to;
    // MAP_POPULATE faults every page in (zero-filled) before it returns, and
    // the mapping is unmapped right after without being read or written.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if addr != libc::MAP_FAILED {
            libc::munmap(addr, len);
        }
    }
}

/// Asks to be saved and waits until this VM is a copy that the host resumed.
pub async fn save_and_wait_for_resume() -> io::Result<()> {
    scrub_free_memory();
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
