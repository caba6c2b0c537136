//! The hypervisor boundary: the only module that names KVM.
//!
//! The rest of the VMM sees [`Vm`], [`Vcpu`] and [`VcpuExit`]; another backend
//! (Hypervisor.framework, WHP) would provide the same shapes.

mod state;
mod vcpu;
mod vm;

use std::fmt;
use std::path::Path;

use thiserror::Error;

pub use state::{VcpuState, VmState};
pub use vcpu::{Vcpu, VcpuExit};
pub use vm::Vm;

/// What kind of KVM this host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKvm {
    /// KVM on VT-x or AMD-V (or a nested equivalent): boots stock kernels.
    Hardware,
    /// The PVM hypervisor (`kvm_pvm`): runs only kernels built with CONFIG_PVM_GUEST.
    Pvm,
    /// No usable /dev/kvm.
    Absent(String),
}

impl HostKvm {
    /// Looks at this host.
    pub fn detect() -> HostKvm {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return HostKvm::Pvm;
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => HostKvm::Hardware,
            Err(e) => HostKvm::Absent(e.to_string()),
        }
    }
}

impl fmt::Display for HostKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKvm::Hardware => write!(f, "hardware-assisted KVM"),
            HostKvm::Pvm => write!(f, "the PVM hypervisor (kvm_pvm)"),
            HostKvm::Absent(why) => write!(f, "no usable /dev/kvm ({why})"),
        }
    }
}

/// A KVM operation that failed, naming the operation.
#[derive(Debug, Error)]
#[error("KVM: cannot {op}")]
pub struct KvmError {
    op: String,
    #[source]
    source: kvm_ioctls::Error,
}

impl KvmError {
    fn new(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        let op = op.into();
        move |source| KvmError { op, source }
    }

    /// The errno KVM returned.
    pub fn errno(&self) -> i32 {
        self.source.errno()
    }
}
