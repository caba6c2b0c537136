//! Which guest pages of a loaded `vmlinux` every copy of a template can share.
//!
//! A kernel's code (`.text`) and read-only data (`.rodata`) are the same in
//! every copy of a template, and the kernel never gives their pages to its
//! page allocator (only the init sections and the alignment gaps around
//! `.rodata` are freed after boot). So no page cache page, socket buffer or
//! virtqueue ever lives there: nothing a device back end such as virtiofsd
//! must see. A restore maps these pages copy-on-write from the template's
//! memory file instead of copying them (see [`crate::snapshot`]): all copies
//! share one set of host pages, and a restore has megabytes less to copy.
//! The kernel still patches its code now and then (static keys); such a write
//! gets the copy its own private page, like any copy-on-write mapping.

use std::fs::File;
use std::path::{Path, PathBuf};

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{elf::PT_LOAD, Endianness, Object, ObjectSection};
use thiserror::Error;

const PAGE: u64 = 4096;

/// The sections shared, by name.
const SHARED_SECTIONS: [&str; 2] = [".text", ".rodata"];

/// A `[start, end)` range of guest-physical addresses.
pub type GuestRange = (u64, u64);

/// Why the kernel's sections could not be read.
#[derive(Debug, Error)]
#[error("Cannot read the section table of kernel {path}: {reason}")]
pub struct KernelImageError {
    /// The kernel file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The page-aligned guest-physical ranges of `.text` and `.rodata` of the ELF
/// kernel at `path`, as the loader places it (each segment at its physical
/// address), sorted and with touching ranges merged. A section that is
/// missing (a stripped or unusual image) is simply not shared.
pub fn shared_ranges(path: &Path) -> Result<Vec<GuestRange>, KernelImageError> {
    let failed = |reason: String| KernelImageError {
        path: path.to_owned(),
        reason,
    };
    let file = File::open(path).map_err(|e| failed(e.to_string()))?;
    // Reads only the headers it needs, not the whole (tens of MiB) image.
    let cache = object::ReadCache::new(file);
    let elf = ElfFile64::<Endianness, _>::parse(&cache).map_err(|e| failed(e.to_string()))?;
    let endian = elf.endian();
    let segments: Vec<Segment> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == PT_LOAD)
        .map(|ph| Segment {
            vaddr: ph.p_vaddr(endian),
            paddr: ph.p_paddr(endian),
            memsz: ph.p_memsz(endian),
        })
        .collect();
    let mut ranges = Vec::new();
    for name in SHARED_SECTIONS {
        let Some(section) = elf.section_by_name(name) else {
            continue;
        };
        if let Some(range) = physical_pages(&segments, section.address(), section.size()) {
            ranges.push(range);
        }
    }
    Ok(merge(ranges))
}

/// A loadable segment of the image.
#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    paddr: u64,
    memsz: u64,
}

/// The whole pages of guest-physical memory that hold the `size` bytes at
/// virtual address `vaddr`, if one segment holds all of them.
fn physical_pages(segments: &[Segment], vaddr: u64, size: u64) -> Option<GuestRange> {
    let vend = vaddr.checked_add(size)?;
    let segment = segments
        .iter()
        .find(|s| vaddr >= s.vaddr && s.vaddr.checked_add(s.memsz).is_some_and(|e| vend <= e))?;
    let start = segment.paddr.checked_add(vaddr - segment.vaddr)?;
    let end = start.checked_add(size)?;
    let (start, end) = (start.checked_next_multiple_of(PAGE)?, end / PAGE * PAGE);
    (start < end).then_some((start, end))
}

/// Sorts `ranges` and merges those that touch or overlap.
pub fn merge(mut ranges: Vec<GuestRange>) -> Vec<GuestRange> {
    ranges.sort_unstable();
    let mut merged: Vec<GuestRange> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: Segment = Segment {
        vaddr: 0xffff_ffff_8100_0000,
        paddr: 0x100_0000,
        memsz: 0x92_0820,
    };

    #[test]
    fn sections_map_to_whole_physical_pages_of_their_segment() {
        // .text fills 8 MiB exactly; .rodata ends mid-page.
        assert_eq!(
            physical_pages(&[TEXT], 0xffff_ffff_8100_0000, 0x80_0000),
            Some((0x100_0000, 0x180_0000))
        );
        assert_eq!(
            physical_pages(&[TEXT], 0xffff_ffff_8180_0000, 0x11_cbc8),
            Some((0x180_0000, 0x191_c000))
        );
        // Not page-aligned at either end: only the whole pages inside.
        assert_eq!(
            physical_pages(&[TEXT], 0xffff_ffff_8100_0010, 0x2000),
            Some((0x100_1000, 0x100_2000))
        );
    }

    #[test]
    fn sections_outside_one_segment_or_smaller_than_a_page_are_not_shared() {
        assert_eq!(
            physical_pages(&[TEXT], 0xffff_ffff_8100_0000, 0x100_0000),
            None
        );
        assert_eq!(physical_pages(&[TEXT], 0xffff_ffff_8000_0000, 0x1000), None);
        assert_eq!(physical_pages(&[TEXT], 0xffff_ffff_8100_0010, 0x1000), None);
        assert_eq!(physical_pages(&[TEXT], u64::MAX - 10, 100), None);
    }

    #[test]
    fn touching_ranges_merge() {
        assert_eq!(
            merge(vec![
                (0x180_0000, 0x191_c000),
                (0x100_0000, 0x180_0000),
                (0x200_0000, 0x200_1000)
            ]),
            vec![(0x100_0000, 0x191_c000), (0x200_0000, 0x200_1000)]
        );
    }

    #[test]
    fn an_elf_file_yields_its_code_pages() {
        // The test binary itself is an ELF with .text and .rodata.
        let exe = std::env::current_exe().unwrap();
        let ranges = shared_ranges(&exe).unwrap();
        assert!(!ranges.is_empty());
        for (start, end) in &ranges {
            assert!(
                start % PAGE == 0 && end % PAGE == 0 && start < end,
                "{ranges:x?}"
            );
        }
    }

    #[test]
    fn a_file_that_is_not_elf_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bzImage");
        std::fs::write(&path, b"not an ELF file at all").unwrap();
        let err = shared_ranges(&path).unwrap_err();
        assert!(err.to_string().contains("bzImage"), "{err}");
    }
}
