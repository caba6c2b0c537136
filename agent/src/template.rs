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
    match tokio::task::spawn_blocking(scrub_free_memory).await {
        Ok(Ok(bytes)) => eprintln!(
            "bulkhead-agent: {} MiB of free memory zeroed for the template",
            bytes >> 20
        ),
        Ok(Err(err)) => eprintln!("bulkhead-agent: zeroing free memory: {err}"),
        Err(err) => eprintln!("bulkhead-agent: zeroing free memory: {err}"),
    }
    let shared = match crate::shared_pages::report(std::path::Path::new("/proc/self/exe")) {
        Ok(Some(line)) => format!("{line}\n"),
        Ok(None) => String::new(),
        Err(err) => {
            eprintln!("bulkhead-agent: the agent's pages cannot be shared: {err}");
            String::new()
        }
    };
    // One write, so that no other console output splits the lines.
    let _ = io::Write::write_all(&mut io::stderr(), format!("{shared}{MARKER}\n").as_bytes());
    let (_go, _) = listener.accept().await?;
    Ok(())
}

/// What stays free while scrubbing, so the guest never reclaims what it
/// needs or wakes the OOM killer.
const SCRUB_RESERVE_KIB: u64 = 16 * 1024;

/// The most memory scrubbed. The dirty free pages are the ones boot freed
/// last (the initrd, the kernel's init code: under 10 MiB), and the page
/// allocator hands out the most recently freed pages first; pages never used
/// since boot are zero already. Without a cap, a template of a large VM
/// would make the host back all of its memory and make saving it read it
/// all.
const SCRUB_MAX_KIB: u64 = 64 * 1024;

/// Writes zeros over the guest's free memory, so that the snapshot, which
/// keeps only pages that are not zero, holds what the guest uses and not what
/// it has freed. The kernel frees the unpacked initrd and its own init code
/// filled with 0xcc poison, and boot leaves other freed pages dirty: without
/// this, every copy of the template restores those megabytes (7 of 34 MiB).
/// With them gone, several 2 MiB blocks of the snapshot hold only a few pages,
/// which bulkhead-vmm restores as small pages instead of whole huge pages.
///
/// Populating an anonymous mapping makes the kernel zero each page it hands
/// out; unmapping it gives the pages back, still zero.
fn scrub_free_memory() -> io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let free_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| io::Error::other("no MemFree in /proc/meminfo"))?;
    let len = scrub_bytes(free_kib);
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a new private anonymous mapping that nothing else refers to;
    // it is unmapped below and never read or written through a pointer.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: exactly the mapping made above.
    if unsafe { libc::munmap(addr, len as usize) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len)
}

/// How much of `free_kib` KiB of free memory to scrub, in bytes.
fn scrub_bytes(free_kib: u64) -> u64 {
    free_kib
        .saturating_sub(SCRUB_RESERVE_KIB)
        .min(SCRUB_MAX_KIB)
        * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_leaves_a_reserve_and_stops_at_the_cap() {
        assert_eq!(scrub_bytes(8 * 1024), 0);
        assert_eq!(scrub_bytes(48 * 1024), 32 << 20);
        assert_eq!(scrub_bytes(4 << 20), SCRUB_MAX_KIB * 1024);
    }

    #[test]
    fn template_boots_are_told_by_the_command_line() {
        assert!(is_template_boot("console=ttyS0 bulkhead.template=1 quiet"));
        assert!(!is_template_boot("console=ttyS0 quiet"));
        assert!(!is_template_boot("bulkhead.template=10"));
    }
}
