//! The boot GDT and the KVM segment descriptors derived from it.
//!
//! The 64-bit boot protocol wants flat `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18)
//! selectors; the kernel replaces the table early, so it only has to be correct.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from its flags (access byte and granularity nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Index of `__BOOT_CS` in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 2;
/// Index of `__BOOT_DS` in [`BOOT_GDT`].
pub const DATA_INDEX: u8 = 3;
/// Index of the TSS in [`BOOT_GDT`].
pub const TSS_INDEX: u8 = 4;

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit set the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM segment register contents for GDT entry `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_64_bit() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.l, seg.present, seg.s, seg.type_), (1, 1, 1, 0xb));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_segment_is_flat_read_write() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.db, seg.l, seg.type_), (1, 0, 0x3));
    }

    #[test]
    fn entry_round_trips_base_and_byte_limit() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        assert_eq!(base(entry), 0x1234_5678);
        assert_eq!(limit(entry), 0xabcde);
    }
}
