//! x86_64 boot: memory layout, boot tables and initial vCPU state.
//!
//! Everything here is plain data built from the VM's shape; nothing touches KVM.

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;
