//! Puts the kernel, the initrd and the command line into guest memory.
//!
//! Kernel parsing is linux-loader's job; here we decide the format, place the
//! initrd, and turn loader failures into errors that name the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::setup_header;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, INITRD_ADDR_MAX_DEFAULT,
};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the "HdrS" magic in a bzImage's real-mode header.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const PAGE_SIZE: u64 = 4096;

/// Kernel image formats we boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`: no decompression at boot.
    Elf,
    /// Compressed bzImage, booted through its 64-bit entry point.
    BzImage,
}

/// Where the kernel landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The format that was loaded.
    pub format: KernelFormat,
    /// The 64-bit entry point.
    pub entry: u64,
    /// First address past the kernel image.
    pub end: u64,
    /// A bzImage's setup header, which seeds the zero page.
    pub setup_header: Option<setup_header>,
}

/// Why the kernel, initrd or command line could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("Cannot read {what} {path}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("{0} is not a kernel image: expected an ELF vmlinux or a bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader refused the kernel.
    #[error("Cannot load kernel {path} into {memory_mib} MiB of guest memory")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// Guest memory size, often the culprit.
        memory_mib: u64,
        /// linux-loader's reason.
        #[source]
        source: loader::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error(
        "The initrd {path} ({size_mib} MiB) does not fit in guest memory: {available_mib} MiB \
         free above the kernel; give the VM more memory or use a smaller initrd"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_mib: u64,
        /// Room there was.
        available_mib: u64,
    },
    /// The command line is too long or has characters the kernel cannot take.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure into guest memory failed.
    #[error("Cannot write {what} into guest memory")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LoadError + 'a {
    move |source| LoadError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_format(path: &Path) -> Result<KernelFormat, LoadError> {
    let mut f = File::open(path).map_err(io_err("kernel", path))?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut hdrs = [0u8; 4];
    let is_bzimage = f.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET)).is_ok()
        && f.read_exact(&mut hdrs).is_ok()
        && hdrs == *b"HdrS";
    if is_bzimage {
        Ok(KernelFormat::BzImage)
    } else {
        Err(LoadError::NotAKernel(path.to_owned()))
    }
}

/// Whether the kernel looks like a PVM guest kernel (built with CONFIG_PVM_GUEST).
///
/// A heuristic, used only on PVM hosts: an unstripped vmlinux of a PVM guest has
/// `pvm_*` symbols in its string table. A stripped image or a bzImage cannot be
/// told apart, hence `--assume-pvm-guest`.
pub fn looks_like_pvm_guest(path: &Path) -> Result<bool, LoadError> {
    let bytes = std::fs::read(path).map_err(io_err("kernel", path))?;
    const NEEDLE: &[u8] = b"\0pvm_";
    Ok(bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE))
}

/// Loads the kernel at its preferred address.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoadError> {
    let format = detect_format(path)?;
    let mut file = File::open(path).map_err(io_err("kernel", path))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| LoadError::Kernel {
        path: path.to_owned(),
        memory_mib: vm_memory::GuestMemoryBackend::last_addr(mem)
            .0
            .div_ceil(1 << 20),
        source,
    })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel {
        format,
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

/// Where an initrd of `size` bytes goes: as high as allowed, page aligned, above
/// the kernel. `low_ram_end` is the end of RAM below the MMIO gap.
pub fn initrd_address(
    size: u64,
    kernel_end: u64,
    low_ram_end: u64,
    initrd_addr_max: u64,
) -> Option<u64> {
    let ceiling = low_ram_end.min(initrd_addr_max.saturating_add(1));
    let addr = ceiling.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE_SIZE)).then_some(addr)
}

/// Loads the initrd high in low memory; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u32), LoadError> {
    let mut file = File::open(path).map_err(io_err("initrd", path))?;
    let size = file.metadata().map_err(io_err("initrd", path))?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(INITRD_ADDR_MAX_DEFAULT);
    let too_large = || LoadError::InitrdTooLarge {
        path: path.to_owned(),
        size_mib: size.div_ceil(1 << 20),
        available_mib: low_ram_end.min(addr_max + 1).saturating_sub(kernel.end) >> 20,
    };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let addr = initrd_address(size, kernel.end, low_ram_end, addr_max).ok_or_else(too_large)?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|source| LoadError::GuestMemory {
            what: "the initrd",
            source,
        })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| LoadError::Io {
            what: "initrd",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size32))
}

/// Writes the command line; returns its length without the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, LoadError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() as u32)
}

/// Writes `bytes` at `addr`, naming `what` on failure.
pub fn write_guest(
    mem: &GuestMemoryMmap,
    addr: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), LoadError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| LoadError::GuestMemory { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr = initrd_address(10_000, 0x200_0000, 128 << 20, INITRD_ADDR_MAX_DEFAULT).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 10_000 <= 128 << 20);
        assert!(addr > (128 << 20) - 20_000);
    }

    #[test]
    fn initrd_never_overlaps_the_kernel() {
        assert_eq!(
            initrd_address(100 << 20, 0x200_0000, 64 << 20, INITRD_ADDR_MAX_DEFAULT),
            None
        );
        assert_eq!(
            initrd_address(u64::MAX, 0, 64 << 20, INITRD_ADDR_MAX_DEFAULT),
            None
        );
    }

    #[test]
    fn initrd_respects_addr_max() {
        let addr = initrd_address(4096, 0x200_0000, 2 << 30, INITRD_ADDR_MAX_DEFAULT).unwrap();
        assert!(addr + 4096 <= INITRD_ADDR_MAX_DEFAULT + 1);
    }

    #[test]
    fn formats_are_told_apart_and_junk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        File::create(&elf)
            .unwrap()
            .write_all(b"\x7fELF\x02\x01\x01")
            .unwrap();
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::Elf);

        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.path().join("bzImage");
        std::fs::write(&bzp, bz).unwrap();
        assert_eq!(detect_format(&bzp).unwrap(), KernelFormat::BzImage);

        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"#!/bin/sh\necho not a kernel\n").unwrap();
        assert!(matches!(
            detect_format(&junk),
            Err(LoadError::NotAKernel(_))
        ));
    }

    #[test]
    fn pvm_guest_symbols_are_spotted() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"\x7fELF....\0start_kernel\0pvm_early_setup\0").unwrap();
        assert!(looks_like_pvm_guest(&k).unwrap());
        std::fs::write(&k, b"\x7fELF....\0start_kernel\0kvm_guest_init\0").unwrap();
        assert!(!looks_like_pvm_guest(&k).unwrap());
    }
}
