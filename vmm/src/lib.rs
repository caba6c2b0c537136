//! bulkhead-vmm: bulkhead's microVM monitor, one KVM microVM per process.
//!
//! Boots an uncompressed `vmlinux` (or a bzImage) straight into 64-bit mode: no
//! firmware, no PCI, no ACPI. The guest sees RAM, an MP table, an in-kernel
//! irqchip and PIT, an 8250 console, and an i8042 whose reset stops the VM.
//!
//! Layout: `config` (plain data), `arch` (boot tables and vCPU state, pure),
//! `kvm` (the only module that names KVM), `memory`, `loader`, `devices`,
//! `vcpu` (threads), `snapshot` (templates: save and restore a whole VM),
//! `machine` (puts it together).

pub mod agent_pages;
pub mod arch;
pub mod config;
pub mod devices;
pub mod events;
pub mod inherited_socket;
pub mod kernel_image;
pub mod kvm;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod snapshot;
pub mod vcpu;

pub use config::{ConsoleSpec, VmConfig};
pub use events::StopReason;
pub use machine::{run, Outcome, VmmError};

/// Exit status: the guest stopped itself (reboot).
pub const EXIT_OK: i32 = 0;
/// Exit status: bad configuration or input, or the VM could not be built.
pub const EXIT_SETUP_FAILED: i32 = 1;
/// Exit status: the guest did not print the ready marker in time.
pub const EXIT_BOOT_TIMEOUT: i32 = 3;
/// Exit status: the guest crashed (kernel panic, triple fault).
pub const EXIT_GUEST_CRASHED: i32 = 4;
/// Exit status: KVM or a vCPU thread failed.
pub const EXIT_HYPERVISOR_FAILED: i32 = 5;
