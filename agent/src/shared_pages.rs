//! Which guest pages the copies of a template may share: those holding the
//! agent's own binary.
//!
//! The agent (and its init mode in every container) runs from `/init` on the
//! guest's tmpfs root, whose pages are the same in every copy of a template.
//! Before the template is saved, the agent tells bulkhead-vmm where they are
//! (one console line, [`PREFIX`]); restores then map them copy-on-write from
//! the template instead of copying them, as they do the kernel's code. So the
//! copies share one set of host pages for the agent.
//!
//! That is only right for pages that stay where they are: a tmpfs file's pages
//! are never written back or evicted, and without compaction or transparent
//! huge pages (our guest kernel has neither; [`sharing_is_safe`] checks) the
//! kernel never moves them. Nothing writes `/init`; should something truncate
//! it, only this guest could be confused (a freed page reused as a virtio-fs
//! buffer), never the host or another sandbox.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The start of the console line that lists the pages (bulkhead-vmm's
/// `agent_pages::AGENT_PREFIX`).
pub const PREFIX: &str = "bulkhead-agent: pages to share:";

/// At most this many ranges are reported (bulkhead-vmm keeps 512 bytes of a
/// console line); the largest are kept.
const MAX_RANGES: usize = 24;

const PAGE: u64 = 4096;

/// The console line that reports the pages of `binary`, or `None` when this
/// kernel might move them.
pub fn report(binary: &Path) -> io::Result<Option<String>> {
    if !sharing_is_safe() {
        return Ok(None);
    }
    let ranges = largest(physical_ranges(binary)?, MAX_RANGES);
    let mut line = String::from(PREFIX);
    for (start, end) in ranges {
        line.push_str(&format!(" {start:x}-{end:x}"));
    }
    Ok(Some(line))
}

/// Whether this kernel never moves page cache pages: it has neither
/// compaction nor transparent huge pages (whose collapsing moves them).
fn sharing_is_safe() -> bool {
    !Path::new("/proc/sys/vm/compact_memory").exists()
        && !Path::new("/sys/kernel/mm/transparent_hugepage").exists()
}

/// The guest-physical `[start, end)` ranges that hold `path`'s pages, in
/// address order.
fn physical_ranges(path: &Path) -> io::Result<Vec<(u64, u64)>> {
    let file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a new read-only shared mapping of a file we opened; populated
    // so that every page is mapped, never dereferenced, unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let pages = (len as u64).div_ceil(PAGE) as usize;
    let mut entries = vec![0u8; pages * 8];
    let read = File::open("/proc/self/pagemap")
        .and_then(|map| map.read_exact_at(&mut entries, addr as u64 / PAGE * 8));
    // SAFETY: exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    read?;
    let mut frames = Vec::with_capacity(pages);
    for entry in entries.chunks_exact(8) {
        let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
        let frame = entry & ((1 << 55) - 1);
        // Not present, or a frame number hidden (no CAP_SYS_ADMIN): then
        // nothing is known, and nothing is shared.
        if entry >> 63 == 0 || frame == 0 {
            return Err(io::Error::other(format!(
                "no page frame for a page of {}",
                path.display()
            )));
        }
        frames.push(frame);
    }
    Ok(coalesce(frames))
}

/// Turns page frame numbers into sorted `[start, end)` byte ranges.
fn coalesce(mut frames: Vec<u64>) -> Vec<(u64, u64)> {
    frames.sort_unstable();
    frames.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for frame in frames {
        let start = frame * PAGE;
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 += PAGE,
            _ => ranges.push((start, start + PAGE)),
        }
    }
    ranges
}

/// The `n` largest of `ranges`, in address order.
fn largest(mut ranges: Vec<(u64, u64)>, n: usize) -> Vec<(u64, u64)> {
    ranges.sort_by_key(|&(start, end)| std::cmp::Reverse(end - start));
    ranges.truncate(n);
    ranges.sort_unstable();
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_coalesce_into_ranges() {
        assert_eq!(
            coalesce(vec![0x102, 0x100, 0x101, 0x200, 0x101]),
            vec![(0x100_000, 0x103_000), (0x200_000, 0x201_000)]
        );
        assert_eq!(coalesce(vec![]), vec![]);
    }

    #[test]
    fn only_the_largest_ranges_are_kept_in_address_order() {
        let ranges = vec![(0, 0x1000), (0x10_000, 0x20_000), (0x30_000, 0x32_000)];
        assert_eq!(
            largest(ranges, 2),
            vec![(0x10_000, 0x20_000), (0x30_000, 0x32_000)]
        );
    }
}
