//! VM templates: a whole VM saved at one instant and started again from there.
//!
//! A template boot (its kernel command line carries [`TEMPLATE_PARAM`]) runs
//! the kernel and the agent's setup once; the agent then prints [`MARKER`] on
//! the console and waits for a host connection that only copies will get. The
//! vCPU that wrote the marker's last byte stops right there, the others are
//! kicked out, and the VMM writes the VM here: `state.json` (vCPUs, the
//! in-kernel irqchip, PIT and clock, the serial port, the virtio transports) and
//! `memory` (guest RAM as a sparse file: only pages that are not zero). A
//! restore builds the same VM, reads both back, and the guest resumes where it
//! stopped as if nothing happened. This is what makes a sandbox start in a
//! fraction of a boot. The kernel's code and read-only data, and the pages
//! of the agent's binary, are not copied but mapped copy-on-write from
//! `memory`, shared by every copy (see [`crate::kernel_image`] and
//! [`crate::agent_pages`]); so the file must never change once saved.
//!
//! Everything read back is checked like guest input: a snapshot file is only
//! trusted as far as the device and memory checks allow.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestAddress;

use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::kernel_image::GuestRange;
use crate::kvm::{VcpuState, VmState};
use crate::memory::GuestRam;

/// The kernel parameter that makes a boot a template boot (the agent reads it).
pub const TEMPLATE_PARAM: &str = "bulkhead.template=1";

/// What the guest prints on the console when it is ready to be saved (the
/// agent's `template::MARKER`). Only template boots look for it, and their
/// guest has run nothing but our kernel and agent.
pub const MARKER: &str = "bulkhead-agent: template ready, save me";

/// Bumped whenever the saved state's meaning changes.
const FORMAT_VERSION: u32 = 2;
const STATE_FILE: &str = "state.json";
/// The saved guest RAM, in a snapshot directory. Restored VMs map part of it
/// (see [`VmSnapshot::shared`]), so it also names mappings of their memory.
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;
/// A transparent huge page: the unit memory is saved in, and restored by.
const HUGE_PAGE: u64 = 2 << 20;

/// Why a snapshot could not be saved or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be read or written.
    #[error("snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `state.json` is not a snapshot of this format.
    #[error("snapshot state {path} is unreadable: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The snapshot is of a different VM shape.
    #[error("the snapshot in {dir} was taken of {found}, this VM is {expected}")]
    Mismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// This VM.
        expected: String,
        /// The snapshot's VM.
        found: String,
    },
}

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    version: u32,
    /// Guest RAM size in bytes.
    pub memory_bytes: u64,
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// The console UART.
    pub serial: SerialSnapshot,
    /// The virtio transports, in MMIO address order.
    pub devices: Vec<TransportState>,
    /// Guest-physical ranges that restores map copy-on-write from the memory
    /// file instead of copying: the kernel's code and read-only data (see
    /// [`crate::kernel_image`]) and the agent's binary (see
    /// [`crate::agent_pages`]). Sorted, page-aligned, not overlapping.
    pub shared: Vec<GuestRange>,
}

impl VmSnapshot {
    /// Puts the parts together.
    pub fn new(
        memory_bytes: u64,
        vcpus: Vec<VcpuState>,
        vm: VmState,
        serial: SerialSnapshot,
        devices: Vec<TransportState>,
        shared: Vec<GuestRange>,
    ) -> Self {
        VmSnapshot {
            version: FORMAT_VERSION,
            memory_bytes,
            vcpus,
            vm,
            serial,
            devices,
            shared,
        }
    }

    /// Reads `dir/state.json` and checks it describes a VM of `memory_bytes`
    /// and `vcpus`.
    pub fn read(dir: &Path, memory_bytes: u64, vcpus: usize) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        })?;
        let snapshot: VmSnapshot =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::State {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if snapshot.version != FORMAT_VERSION {
            return Err(SnapshotError::State {
                path,
                reason: format!(
                    "format {} where this VMM reads {FORMAT_VERSION}",
                    snapshot.version
                ),
            });
        }
        let shape = |bytes: u64, n: usize| format!("{} MiB with {n} vCPUs", bytes >> 20);
        let ids_in_order = snapshot
            .vcpus
            .iter()
            .enumerate()
            .all(|(i, v)| usize::from(v.id) == i);
        if snapshot.memory_bytes != memory_bytes || snapshot.vcpus.len() != vcpus || !ids_in_order {
            return Err(SnapshotError::Mismatch {
                dir: dir.to_owned(),
                expected: shape(memory_bytes, vcpus),
                found: shape(snapshot.memory_bytes, snapshot.vcpus.len()),
            });
        }
        if let Err(reason) = check_ranges(&snapshot.shared) {
            return Err(SnapshotError::State {
                path,
                reason: format!("shared memory ranges: {reason}"),
            });
        }
        Ok(snapshot)
    }

    /// Writes `dir/state.json` and `dir/memory` (the directory must exist).
    pub fn write(&self, dir: &Path, ram: &GuestRam) -> Result<(), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let json = serde_json::to_vec(self).map_err(|e| SnapshotError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut file = File::create(&path).map_err(io(&path))?;
        file.write_all(&json).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        save_memory(&ram.memfd, &dir.join(MEMORY_FILE))
    }
}

/// Copies the pages of `memfd` that hold anything but zeros into a sparse
/// file at `path`, at the same offsets. Unallocated ranges of the memfd are
/// skipped without reading them (SEEK_DATA), so a mostly empty guest costs
/// little to save.
fn save_memory(memfd: &File, path: &Path) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let size = memfd.metadata().map_err(io)?.len();
    let out = File::create(path).map_err(io)?;
    out.set_len(size).map_err(io)?;
    let mut buf = vec![0u8; HUGE_PAGE as usize];
    for (start, end) in data_extents(memfd, size).map_err(io)? {
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(HUGE_PAGE) as usize;
            memfd.read_exact_at(&mut buf[..len], offset).map_err(io)?;
            for (i, page) in buf[..len].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    out.write_all_at(page, offset + (i * PAGE) as u64)
                        .map_err(io)?;
                }
            }
            offset += len as u64;
        }
    }
    out.sync_all().map_err(io)
}

/// Checks that `ranges` are whole pages, in order and apart (where they lie
/// in guest RAM is checked when they are mapped).
fn check_ranges(ranges: &[GuestRange]) -> Result<(), String> {
    let page = PAGE as u64;
    let mut previous_end = 0;
    for &(start, end) in ranges {
        if !start.is_multiple_of(page)
            || !end.is_multiple_of(page)
            || start >= end
            || start < previous_end
        {
            return Err(format!(
                "{start:#x}..{end:#x} is not a page-aligned range after {previous_end:#x}"
            ));
        }
        previous_end = end;
    }
    Ok(())
}

/// Fills `ram` from the snapshot's memory file; the holes are already zero in
/// a fresh memfd. The `shared` guest ranges are mapped copy-on-write from the
/// file instead (see [`VmSnapshot::shared`]).
///
/// The data are read through the guest's mapping, which asks for transparent
/// huge pages: each 2 MiB block that holds data is then one huge page, which
/// KVM maps with one nested page table entry. Written into the memfd instead,
/// the data would land in 4 KiB pages, and the resumed guest would take a
/// nested page fault, a full VM exit, the first time it touched each of them
/// (about 1100 more exits per sandbox start, and 30 % slower container
/// creation, under emulation). Guests keep their data in a few dense blocks
/// (the kernel, the agent), so the extra memory is small; blocks with only a
/// few pages of data get small pages instead (see [`SPARSE_BLOCK_DIVISOR`]).
/// The copy is split between two threads: it is most of a resume.
pub fn restore_memory(
    dir: &Path,
    ram: &GuestRam,
    shared: &[GuestRange],
) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let io = |source| SnapshotError::Io {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let ram_size = ram.memfd.metadata().map_err(io)?.len();
    if size != ram_size {
        return Err(SnapshotError::Mismatch {
            dir: dir.to_owned(),
            expected: format!("{} MiB of memory", ram_size >> 20),
            found: format!("a memory file of {size} bytes"),
        });
    }
    let mut mapped = Vec::with_capacity(shared.len());
    for &(start, end) in shared {
        let len = end - start;
        let offset = ram
            .file_offset_of_range(start, end)
            .ok_or_else(|| SnapshotError::State {
                path: dir.join(STATE_FILE),
                reason: format!("shared range {start:#x}..{end:#x} is not in one range of RAM"),
            })?;
        ram.map_file_private(GuestAddress(start), len as usize, &file, offset)
            .map_err(io)?;
        mapped.push((offset, offset + len));
    }
    let data = subtract(&data_extents(&file, size).map_err(io)?, &mapped);
    tracing::debug!(
        shared_kib = mapped.iter().map(|(s, e)| e - s).sum::<u64>() >> 10,
        copied_kib = data.iter().map(|(s, e)| e - s).sum::<u64>() >> 10,
        "restoring guest memory"
    );
    let pieces = split_at_blocks(&data);
    let (dense, sparse) = by_block_density(&pieces);
    let (first, second) = split_evenly(&dense);
    std::thread::scope(|scope| {
        let helper = scope.spawn(|| copy_pieces(&path, ram, second));
        let mine = copy_pieces(&path, ram, first)
            .and_then(|()| copy_small_pages(&file, &ram.memfd, &sparse));
        let theirs = helper
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the memory copy thread panicked")));
        mine.and(theirs)
    })
    .map_err(io)
}

/// Below this share of data, a 2 MiB block is restored page by page.
///
/// A huge page costs the host zeroing 2 MiB before the copy (most of a
/// resume's time under emulation) and 2 MiB of RAM per sandbox; small pages
/// cost a nested page fault for each page the guest then touches. A block
/// with a quarter of its pages in use is where the two are about even.
const SPARSE_BLOCK_DIVISOR: u64 = 4;

/// Splits `pieces` (from [`split_at_blocks`]) into those in blocks dense
/// enough for a huge page and those in sparse blocks.
fn by_block_density(pieces: &[Extent]) -> (Vec<Extent>, Vec<Extent>) {
    let mut per_block = std::collections::HashMap::<u64, u64>::new();
    for (start, end) in pieces {
        *per_block.entry(start / HUGE_PAGE).or_default() += end - start;
    }
    pieces
        .iter()
        .partition(|(start, _)| per_block[&(start / HUGE_PAGE)] * SPARSE_BLOCK_DIVISOR >= HUGE_PAGE)
}

/// Copies `pieces` of `file` into the memfd at the same offsets. Written
/// this way, not through the huge-page mapping, they land in small pages: a
/// block's huge page cannot be allocated once it holds any, so the guest's
/// later faults there get small pages too.
fn copy_small_pages(file: &File, memfd: &File, pieces: &[Extent]) -> std::io::Result<()> {
    let mut buf = vec![0u8; HUGE_PAGE as usize];
    for &(start, end) in pieces {
        let piece = &mut buf[..(end - start) as usize];
        file.read_exact_at(piece, start)?;
        memfd.write_all_at(piece, start)?;
    }
    Ok(())
}

/// A `[start, end)` byte range of the memory file (and of the memfd: the same
/// offsets).
type Extent = (u64, u64);

/// The parts of `extents` outside `holes` (both sorted, neither overlapping
/// itself).
fn subtract(extents: &[Extent], holes: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(extents.len());
    for &(start, end) in extents {
        let mut from = start;
        for &(hole_start, hole_end) in holes {
            if hole_end <= from || hole_start >= end {
                continue;
            }
            if hole_start > from {
                out.push((from, hole_start));
            }
            from = from.max(hole_end);
        }
        if from < end {
            out.push((from, end));
        }
    }
    out
}

/// Splits `extents` at 2 MiB boundaries: a piece never spans two RAM ranges
/// (they start and end on such boundaries) and is at most one huge page.
fn split_at_blocks(extents: &[Extent]) -> Vec<Extent> {
    let mut pieces = Vec::new();
    for &(start, end) in extents {
        let mut offset = start;
        while offset < end {
            let piece_end = end.min((offset / HUGE_PAGE + 1) * HUGE_PAGE);
            pieces.push((offset, piece_end));
            offset = piece_end;
        }
    }
    pieces
}

/// Splits `pieces` in two runs of about the same number of bytes.
fn split_evenly(pieces: &[Extent]) -> (&[Extent], &[Extent]) {
    let total: u64 = pieces.iter().map(|(s, e)| e - s).sum();
    let mut sum = 0;
    let mid = pieces
        .iter()
        .position(|(s, e)| {
            sum += e - s;
            sum * 2 >= total
        })
        .map_or(pieces.len(), |i| i + 1);
    pieces.split_at(mid)
}

/// Reads `pieces` of the memory file at `path` into guest RAM through the
/// VMM's mapping (with a file of its own: reads move its position).
fn copy_pieces(path: &Path, ram: &GuestRam, pieces: &[Extent]) -> std::io::Result<()> {
    use vm_memory::{GuestMemoryBackend, ReadVolatile};
    let mut file = File::open(path)?;
    for &(start, end) in pieces {
        let mut slice = ram
            .guest_address(start)
            .and_then(|addr| ram.mem.get_slice(addr, (end - start) as usize).ok())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "bytes {start:#x}..{end:#x} of the memory file are not in one range of guest RAM"
                ))
            })?;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact_volatile(&mut slice)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// The [start, end) ranges of `file` (of `size` bytes) that hold data.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<Extent>> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let Some(start) = seek(offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_round_trips_and_zero_pages_stay_holes() {
        let ram = crate::memory::create(32 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = vm_memory::GuestAddress(0x10_0000);
        let b = vm_memory::GuestAddress(0x123_4000);
        ram.mem.write_slice(b"template", a).unwrap();
        ram.mem.write_slice(&[0xab; 5000], b).unwrap();
        // A page that was touched but holds zeros is not worth saving.
        ram.mem
            .write_slice(&[0; PAGE], vm_memory::GuestAddress(0x40_0000))
            .unwrap();
        save_memory(&ram.memfd, &dir.path().join(MEMORY_FILE)).unwrap();

        let file = File::open(dir.path().join(MEMORY_FILE)).unwrap();
        let extents = data_extents(&file, 32 << 20).unwrap();
        let saved: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(saved <= 4 * PAGE as u64, "{extents:x?}");

        let restored = crate::memory::create(32 << 20).unwrap();
        restore_memory(dir.path(), &restored, &[]).unwrap();
        let mut got = [0u8; 8];
        restored.mem.read_slice(&mut got, a).unwrap();
        assert_eq!(&got, b"template");
        let mut got = vec![0u8; 5000];
        restored.mem.read_slice(&mut got, b).unwrap();
        assert!(got.iter().all(|&x| x == 0xab));
    }

    #[test]
    fn extents_are_split_at_huge_page_boundaries_and_shared_evenly() {
        const M: u64 = HUGE_PAGE;
        let pieces = split_at_blocks(&[(0, 4096), (M + M / 2, 3 * M), (5 * M, 5 * M + 8192)]);
        assert_eq!(
            pieces,
            vec![
                (0, 4096),
                (M + M / 2, 2 * M),
                (2 * M, 3 * M),
                (5 * M, 5 * M + 8192)
            ]
        );
        let (a, b) = split_evenly(&pieces);
        assert_eq!(a.len() + b.len(), pieces.len());
        // The piece that crosses the half goes to the first run.
        assert_eq!(b, &[(5 * M, 5 * M + 8192)][..]);
        assert_eq!(split_evenly(&[]), (&[][..], &[][..]));
    }

    #[test]
    fn a_block_of_data_round_trips_through_the_mapping() {
        let ram = crate::memory::create(8 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8 + 1).collect();
        ram.mem
            .write_slice(&data, vm_memory::GuestAddress(1 << 20))
            .unwrap();
        save_memory(&ram.memfd, &dir.path().join(MEMORY_FILE)).unwrap();
        let restored = crate::memory::create(8 << 20).unwrap();
        restore_memory(dir.path(), &restored, &[]).unwrap();
        let mut got = vec![0u8; data.len() + 2 * PAGE];
        restored
            .mem
            .read_slice(&mut got, vm_memory::GuestAddress((1 << 20) - PAGE as u64))
            .unwrap();
        assert!(got[..PAGE].iter().all(|&b| b == 0));
        assert_eq!(&got[PAGE..PAGE + data.len()], &data[..]);
        assert!(got[PAGE + data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn blocks_with_a_quarter_of_data_or_more_get_huge_pages() {
        const M: u64 = HUGE_PAGE;
        let pieces = split_at_blocks(&[
            (0, M / 4),
            (M, M + 4096),
            (M + M / 2, M + M / 2 + M / 8),
            (2 * M, 3 * M),
        ]);
        let (dense, sparse) = by_block_density(&pieces);
        assert_eq!(dense, vec![(0, M / 4), (2 * M, 3 * M)]);
        assert_eq!(sparse, vec![(M, M + 4096), (M + M / 2, M + M / 2 + M / 8)]);
    }

    #[test]
    fn shared_ranges_are_mapped_from_the_file_not_copied() {
        let ram = crate::memory::create(8 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8 + 1).collect();
        ram.mem.write_slice(&data, GuestAddress(1 << 20)).unwrap();
        save_memory(&ram.memfd, &dir.path().join(MEMORY_FILE)).unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let before = std::fs::read(&path).unwrap();

        let shared = (2 << 20, (3 << 20) + 8 * PAGE as u64);
        let restored = crate::memory::create(8 << 20).unwrap();
        restore_memory(dir.path(), &restored, &[shared]).unwrap();
        // The guest sees every byte, shared or copied.
        let mut got = vec![0u8; data.len()];
        restored
            .mem
            .read_slice(&mut got, GuestAddress(1 << 20))
            .unwrap();
        assert_eq!(got, data);
        // The memfd (what virtiofsd maps) holds the copied part only.
        let mut copied = vec![0u8; PAGE];
        restored.memfd.read_exact_at(&mut copied, 1 << 20).unwrap();
        assert_eq!(copied, data[..PAGE]);
        let mut hole = vec![0xffu8; PAGE];
        restored.memfd.read_exact_at(&mut hole, 2 << 20).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        // A guest write to a shared page stays in this VM.
        restored
            .mem
            .write_slice(b"mine", GuestAddress(2 << 20))
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn shared_ranges_outside_ram_or_out_of_order_are_refused() {
        let ram = crate::memory::create(8 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_memory(&ram.memfd, &dir.path().join(MEMORY_FILE)).unwrap();
        let restored = crate::memory::create(8 << 20).unwrap();
        let err = restore_memory(dir.path(), &restored, &[(6 << 20, 10 << 20)]).unwrap_err();
        assert!(err.to_string().contains("not in one range of RAM"), "{err}");
        assert!(check_ranges(&[(0, 0x2000), (0x3000, 0x4000)]).is_ok());
        assert!(check_ranges(&[(0x3000, 0x4000), (0, 0x2000)]).is_err());
        assert!(check_ranges(&[(0, 0x1800)]).is_err());
        assert!(check_ranges(&[(0x1000, 0x1000)]).is_err());
    }

    #[test]
    fn subtracting_holes_keeps_the_rest_of_each_extent() {
        let extents = [(0, 100), (200, 300), (400, 500)];
        assert_eq!(
            subtract(&extents, &[(50, 250), (420, 430), (480, 600)]),
            vec![(0, 50), (250, 300), (400, 420), (430, 480)]
        );
        assert_eq!(subtract(&extents, &[]), extents.to_vec());
        assert_eq!(subtract(&extents, &[(0, 1000)]), vec![]);
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let ram = crate::memory::create(32 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_memory(&ram.memfd, &dir.path().join(MEMORY_FILE)).unwrap();
        let bigger = crate::memory::create(64 << 20).unwrap();
        let err = restore_memory(dir.path(), &bigger, &[]).unwrap_err();
        assert!(matches!(err, SnapshotError::Mismatch { .. }), "{err}");
    }
}
