//! Guest RAM, backed by a memfd so that other processes (virtiofsd, through
//! vhost-user) can map the very same pages.

use std::fs::File;

use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::memory::{ram_ranges, RamRange};

/// The memfd's name, visible in /proc/<pid>/maps (benchmarks find guest pages by it).
pub const GUEST_MEMFD_NAME: &str = "bulkhead-guest-ram";

/// Why guest memory could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("Cannot create {size_mib} MiB of guest memory (memfd)")]
    Memfd {
        /// Requested size.
        size_mib: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("Cannot map {size_mib} MiB of guest memory")]
    Map {
        /// Requested size.
        size_mib: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest RAM and the ranges it covers.
pub struct GuestRam {
    /// The mapped memory.
    pub mem: GuestMemoryMmap,
    /// Where RAM is in the guest's physical address space.
    pub ranges: Vec<RamRange>,
    /// The memfd behind all of it, RAM ranges laid out one after another
    /// (what a snapshot saves and restores).
    pub memfd: File,
}

impl GuestRam {
    /// End of RAM below the 32-bit MMIO gap (where the initrd must go).
    pub fn low_end(&self) -> u64 {
        self.ranges[0].end()
    }

    /// The guest-physical address of byte `offset` of the memfd, whose RAM
    /// ranges are laid out one after another.
    pub fn guest_address(&self, offset: u64) -> Option<GuestAddress> {
        let mut base = 0;
        for r in &self.ranges {
            if offset < base + r.len {
                return Some(GuestAddress(r.start + (offset - base)));
            }
            base += r.len;
        }
        None
    }

    /// The memfd offset of guest-physical address `addr`: the inverse of
    /// [`GuestRam::guest_address`].
    pub fn file_offset(&self, addr: GuestAddress) -> Option<u64> {
        let mut base = 0;
        for r in &self.ranges {
            if addr.0 >= r.start && addr.0 - r.start < r.len {
                return Some(base + (addr.0 - r.start));
            }
            base += r.len;
        }
        None
    }

    /// The memfd offset of guest-physical `[start, end)`, if one RAM range
    /// holds all of it (so that it is one piece of the memfd too).
    pub fn file_offset_of_range(&self, start: u64, end: u64) -> Option<u64> {
        let last = end.checked_sub(1).filter(|&last| last >= start)?;
        let offset = self.file_offset(GuestAddress(start))?;
        (self.file_offset(GuestAddress(last)) == Some(offset + (last - start))).then_some(offset)
    }

    /// Maps `len` bytes of `file` at `offset` copy-on-write over guest RAM at
    /// `addr`, in place of the memfd's pages.
    ///
    /// The guest sees the file's bytes, and its writes stay in this process:
    /// the file never changes and the memfd keeps a hole there. Only for
    /// memory that no device back end needs to see (processes that map the
    /// memfd, such as virtiofsd, see the hole), before the vCPUs run.
    pub fn map_file_private(
        &self,
        addr: GuestAddress,
        len: usize,
        file: &File,
        offset: u64,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len:#x} bytes at guest address {:#x}: {what}", addr.0),
            )
        };
        let page = 4096;
        let whole_pages = addr.0.is_multiple_of(page)
            && (len as u64).is_multiple_of(page)
            && offset.is_multiple_of(page);
        if !whole_pages || len == 0 {
            return Err(bad("not whole pages"));
        }
        // One region must hold the whole range: the new mapping replaces part
        // of that region's mapping and nothing else.
        self.mem
            .get_slice(addr, len)
            .map_err(|_| bad("not inside one RAM region"))?;
        let host = self
            .mem
            .get_host_address(addr)
            .map_err(|_| bad("not in guest RAM"))?;
        let offset = libc::off_t::try_from(offset).map_err(|_| bad("file offset too large"))?;
        // SAFETY: [host, host + len) lies inside a mapping owned by `self.mem`
        // (checked above), which outlives this call and unmaps the whole
        // region, this part included, when dropped. MAP_FIXED replaces those
        // pages atomically; guest memory is only ever accessed through
        // volatile slices and by KVM (which follows the change through its MMU
        // notifier), so no Rust reference to the old pages exists.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates `size` bytes of memfd-backed guest RAM, mapped shared.
pub fn create(size: u64) -> Result<GuestRam, MemoryError> {
    let size_mib = size >> 20;
    let memfd_err = |source| MemoryError::Memfd { size_mib, source };
    let fd = memfd_create(GUEST_MEMFD_NAME, MFdFlags::MFD_CLOEXEC)
        .map_err(|e| memfd_err(std::io::Error::from(e)))?;
    let file = File::from(fd);
    file.set_len(size).map_err(memfd_err)?;

    let ranges = ram_ranges(size);
    let mut offset = 0;
    let mut regions = Vec::with_capacity(ranges.len());
    for r in &ranges {
        let file = file.try_clone().map_err(memfd_err)?;
        regions.push((
            GuestAddress(r.start),
            r.len as usize,
            Some(FileOffset::new(file, offset)),
        ));
        offset += r.len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(regions)
        .map_err(|source| MemoryError::Map { size_mib, source })?;
    for region in mem.iter() {
        advise_huge_pages(region.as_ptr(), region.len() as usize);
    }
    Ok(GuestRam {
        mem,
        ranges,
        memfd: file,
    })
}

/// Asks for transparent huge pages on guest RAM.
///
/// Every guest page the VM touches first costs a fault in the host and in KVM's
/// nested page tables; 2 MiB pages make that 512 times rarer, which shortens
/// boot measurably (about 15 % under emulation). For memfd (shmem) memory this
/// takes effect where the host allows it
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = `advise` or `always`);
/// elsewhere it is a no-op, so failure is only logged.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: madvise only changes paging policy for [addr, addr+len), a live
    // mapping owned by the guest memory object; it reads or writes no memory.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_usable_and_sized() {
        let ram = create(64 << 20).unwrap();
        assert_eq!(ram.mem.last_addr().0 + 1, 64 << 20);
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(ram.low_end(), 64 << 20);
        assert_eq!(ram.guest_address(0x1000), Some(GuestAddress(0x1000)));
        assert_eq!(ram.guest_address(64 << 20), None);
    }

    #[test]
    fn memfd_offsets_past_the_mmio_gap_map_above_4_gib() {
        let ram = create(4 << 30).unwrap();
        let low = ram.low_end();
        assert!(low < 4 << 30);
        assert_eq!(
            ram.guest_address(low),
            Some(GuestAddress(ram.ranges[1].start))
        );
        assert_eq!(ram.guest_address(low - 1), Some(GuestAddress(low - 1)));
        // The inverse, and ranges that would span the gap.
        let high = ram.ranges[1].start;
        assert_eq!(ram.file_offset(GuestAddress(high)), Some(low));
        assert_eq!(ram.file_offset(GuestAddress(low)), None);
        assert_eq!(ram.file_offset_of_range(0x1000, 0x3000), Some(0x1000));
        assert_eq!(ram.file_offset_of_range(high, high + 0x1000), Some(low));
        assert_eq!(ram.file_offset_of_range(low - 0x1000, high + 0x1000), None);
        assert_eq!(ram.file_offset_of_range(0x2000, 0x2000), None);
    }
}
