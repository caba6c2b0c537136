//! The Intel MultiProcessor table that tells a firmware-less, ACPI-less Linux how
//! many CPUs there are and how the IOAPIC is wired.
//!
//! Written by hand: no maintained crate provides it, and the format (MP spec 1.4)
//! is a few fixed-size little-endian records. We build it as bytes rather than
//! through `#[repr(C, packed)]` structs so that no unsafe code is needed.

use thiserror::Error;

use super::layout::{APIC_DEFAULT_PHYS_BASE, IO_APIC_DEFAULT_PHYS_BASE};

/// Most vCPUs an MP table can describe: xAPIC ids are 8 bits, 0xff is the
/// broadcast id, and the IOAPIC needs one id after the CPUs.
pub const MAX_VCPUS: u8 = 254;

/// IOAPIC input pins; Linux routes legacy IRQs 0-15 and virtio-mmio GSIs above.
pub const IOAPIC_PINS: u8 = 24;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and FPU|APIC feature flags: informational only, Linux reads
/// the real values from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Why an MP table could not be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MptableError {
    /// The vCPU count is outside what the table can describe.
    #[error("An MP table describes 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
}

/// Builds the floating pointer followed by the configuration table, for
/// placement at guest physical address `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming polarity/trigger), source bus, source irq,
        // destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_IOINT, IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    // Floating pointer: signature, physical pointer, length in 16-byte units, revision,
    // checksum, then five feature bytes (zero: a configuration table is present).
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum_fix(&out[..FLOATING_POINTER_LEN]);

    let header_start = out.len();
    out.extend_from_slice(b"PCMP");
    out.extend_from_slice(&(table_len as u16).to_le_bytes());
    out.extend_from_slice(&[MPC_SPEC_REV, 0]);
    out.extend_from_slice(b"BULKHEAD");
    out.extend_from_slice(b"MICROVM     ");
    out.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    out.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(out.len() - header_start, HEADER_LEN);
    out.extend_from_slice(&entries);
    out[header_start + 7] = checksum_fix(&out[header_start..]);
    Ok(out)
}

/// The byte that makes `bytes` (with that byte still zero) sum to zero mod 256.
fn checksum_fix(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    #[test]
    fn checksums_hold_and_pointer_points_at_table() {
        let base = 0x9fc00;
        let t = build(base, 4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, base + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let t = build(0, 3).unwrap();
        let entries = &t[16 + HEADER_LEN..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(3).collect();
        for (i, e) in cpus.iter().enumerate() {
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1] as usize, i);
        }
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(cpus[1][3], CPU_ENABLED);
        let count = u16::from_le_bytes(t[16 + 34..16 + 36].try_into().unwrap());
        assert_eq!(count, 3 + 1 + 1 + u16::from(IOAPIC_PINS) + 2);
    }

    #[test]
    fn table_fits_below_high_memory_for_the_largest_vm() {
        // From the EBDA up to 1 MiB the e820 map says "reserved", so the table may
        // run past the EBDA's single KiB but must stay under HIMEM_START.
        use super::super::layout::{EBDA_START, HIMEM_START};
        let t = build(EBDA_START, MAX_VCPUS).unwrap();
        assert!(
            EBDA_START + t.len() as u64 <= HIMEM_START,
            "{} bytes",
            t.len()
        );
    }

    #[test]
    fn rejects_zero_and_too_many_vcpus() {
        assert_eq!(build(0, 0), Err(MptableError::VcpuCount(0)));
        assert_eq!(build(0, 255), Err(MptableError::VcpuCount(255)));
    }
}
