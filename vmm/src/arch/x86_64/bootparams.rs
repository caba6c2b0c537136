//! The Linux "zero page" (struct boot_params) for the 64-bit boot protocol.
//!
//! See Documentation/arch/x86/boot.rst. We fill only what a direct-booted kernel
//! reads: the setup header (loader type, command line, initrd) and the e820 map.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START};
use super::memory::RamRange;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id: we have none registered.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The kernel's default physical alignment (CONFIG_PHYSICAL_ALIGN).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;

/// What goes into the zero page besides the memory map.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// The bzImage's own setup header, to start from; `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    /// Length of the command line, without its terminating NUL.
    pub cmdline_len: u32,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u32)>,
}

/// Builds the zero page for a kernel booted with `info` on `ram`.
pub fn build(info: &BootInfo, ram: &[RamRange]) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }

    let mut e820 = Vec::with_capacity(ram.len() + 1);
    for range in ram {
        if range.start == 0 {
            // Base memory stops at the EBDA (where the MP table lives); the legacy
            // hole up to 1 MiB is left out, which Linux treats as reserved.
            e820.push((0, EBDA_START));
            if range.end() > HIMEM_START {
                e820.push((HIMEM_START, range.end() - HIMEM_START));
            }
        } else {
            e820.push((range.start, range.len));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
        params.e820_entries = (i + 1) as u8;
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::memory::ram_ranges;

    #[test]
    fn e820_skips_the_legacy_hole() {
        let p = build(&BootInfo::default(), &ram_ranges(128 << 20));
        assert_eq!(p.e820_entries, 2);
        let (a, b) = (p.e820_table[0], p.e820_table[1]);
        assert_eq!({ a.addr }, 0);
        assert_eq!({ a.size }, EBDA_START);
        assert_eq!({ b.addr }, HIMEM_START);
        assert_eq!({ b.size }, (128 << 20) - HIMEM_START);
    }

    #[test]
    fn header_carries_cmdline_and_initrd() {
        let info = BootInfo {
            setup_header: None,
            cmdline_len: 42,
            initrd: Some((0x400_0000, 1234)),
        };
        let p = build(&info, &ram_ranges(256 << 20));
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x400_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
    }

    #[test]
    fn high_memory_gets_its_own_entry() {
        let p = build(&BootInfo::default(), &ram_ranges(4 << 30));
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, 1 << 32);
    }
}
