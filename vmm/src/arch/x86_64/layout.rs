//! Where things live in guest physical memory at boot.
//!
//! One place for every fixed address, so that overlaps are visible at a glance.
//! Low memory follows the PC conventions Linux expects (EBDA below 640 KiB, the
//! 64-bit boot protocol's zero page and command line below 1 MiB); devices sit in
//! the 32-bit MMIO gap under 4 GiB.

/// GDT used for the 64-bit boot protocol (the kernel loads its own right away).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: interrupts stay disabled until the kernel installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// The boot_params ("zero page") whose address the kernel takes in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer; the kernel switches stacks almost at once.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we hand over (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table goes; Linux scans
/// the last KiB of base memory (639 KiB) for the MP floating pointer.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory: kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (devices, IOAPIC, LAPIC); RAM above it moves to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, inside the gap.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// Default local APIC base (architectural).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Default IOAPIC base.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// KVM needs three pages for the TSS somewhere the guest will not use: just
/// below the IOAPIC, in the MMIO gap, as other VMMs do.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The highest address an initrd may reach when the kernel does not say
/// (boot protocol default for `initrd_addr_max`).
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
