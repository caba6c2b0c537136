//! What the VM's threads tell the main thread: the guest is ready, or the VM must stop.

use std::fmt;

/// A message from a vCPU or device thread to the thread that runs the VM.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest printed the ready marker.
    Ready,
    /// The guest rang the snapshot doorbell (a template boot); its vCPU stopped.
    SnapshotRequested,
    /// The VM must stop, for this reason.
    Stop(StopReason),
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset itself through the i8042 (Linux `reboot`): a clean stop.
    GuestReset,
    /// The guest asked KVM to power off or reset (KVM_EXIT_SYSTEM_EVENT).
    GuestSystemEvent(u32),
    /// The guest kernel panicked (seen on the console) and then reset.
    GuestPanic,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        cpu: u8,
    },
    /// KVM reported an internal error or a failed VM entry.
    Hypervisor {
        /// The vCPU.
        cpu: u8,
        /// What KVM said.
        detail: String,
    },
    /// A template boot saved its snapshot and stopped.
    SnapshotSaved,
    /// A vCPU thread failed outside the guest's control.
    VcpuFailed {
        /// The vCPU.
        cpu: u8,
        /// What went wrong.
        detail: String,
    },
}

impl StopReason {
    /// The guest stopped itself on purpose.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            StopReason::GuestReset | StopReason::GuestSystemEvent(_) | StopReason::SnapshotSaved
        )
    }

    /// The VMM's exit status for this stop (0 only for a clean stop; see `--help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestReset
            | StopReason::GuestSystemEvent(_)
            | StopReason::SnapshotSaved => 0,
            StopReason::GuestPanic | StopReason::TripleFault { .. } => crate::EXIT_GUEST_CRASHED,
            StopReason::Hypervisor { .. } | StopReason::VcpuFailed { .. } => {
                crate::EXIT_HYPERVISOR_FAILED
            }
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "the guest reset itself (reboot)"),
            StopReason::GuestSystemEvent(t) => write!(f, "the guest requested system event {t}"),
            StopReason::GuestPanic => write!(f, "the guest kernel panicked"),
            StopReason::SnapshotSaved => write!(f, "the snapshot was saved"),
            StopReason::TripleFault { cpu } => write!(f, "vCPU {cpu} triple-faulted"),
            StopReason::Hypervisor { cpu, detail } => {
                write!(f, "KVM failed on vCPU {cpu}: {detail}")
            }
            StopReason::VcpuFailed { cpu, detail } => write!(f, "vCPU {cpu} failed: {detail}"),
        }
    }
}
