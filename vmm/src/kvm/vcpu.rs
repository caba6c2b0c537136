//! One vCPU: its boot state and its run loop's single step.

use kvm_bindings::Msrs;
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};

use super::KvmError;
use crate::arch::x86_64::regs;

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why KVM_RUN returned, without KVM's types.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port read: fill the buffer.
    IoIn(u16, &'a mut [u8]),
    /// Port write.
    IoOut(u16, &'a [u8]),
    /// MMIO read: fill the buffer.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write.
    MmioWrite(u64, &'a [u8]),
    /// The vCPU halted (only with a userspace irqchip; ours is in the kernel).
    Halted,
    /// Triple fault.
    Shutdown,
    /// The guest asked for a system event (KVM_SYSTEM_EVENT_*).
    SystemEvent(u32),
    /// KVM could not handle an exit.
    InternalError,
    /// KVM could not enter the guest, with the hardware reason.
    FailEntry(u64),
    /// A signal interrupted KVM_RUN.
    Interrupted,
    /// Something we do not handle.
    Unexpected(String),
}

/// A vCPU file descriptor and its id.
pub struct Vcpu {
    pub(super) fd: VcpuFd,
    pub(super) id: u8,
}

impl Vcpu {
    pub(super) fn new(fd: VcpuFd, id: u8) -> Result<Vcpu, KvmError> {
        let vcpu = Vcpu { fd, id };
        vcpu.set_boot_msrs()?;
        vcpu.set_lint()?;
        Ok(vcpu)
    }

    /// This vCPU's id (its APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    pub(super) fn op(&self, what: &str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        KvmError::new(format!("{what} of vCPU {}", self.id))
    }

    fn set_boot_msrs(&self) -> Result<(), KvmError> {
        self.set_msrs(&regs::boot_msrs())
    }

    /// Writes `entries` (at most KVM_MAX_MSR_ENTRIES), failing on the first
    /// one KVM refuses, which the error names.
    pub(super) fn set_msrs(&self, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<(), KvmError> {
        let msrs = Msrs::from_entries(entries)
            .map_err(|_| self.op("build the MSR list")(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let written = self.fd.set_msrs(&msrs).map_err(self.op("set MSRs"))?;
        if written != entries.len() {
            let index = entries[written].index;
            return Err(self.op(&format!("set MSR {index:#x}"))(
                kvm_ioctls::Error::new(libc::EINVAL),
            ));
        }
        Ok(())
    }

    /// LINT0 takes the PIC's ExtINT, LINT1 takes NMIs, as on a PC.
    fn set_lint(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(self.op("read the LAPIC"))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: Vec<u8> = lapic.regs[offset..offset + 4]
                .iter()
                .map(|&b| b as u8)
                .collect();
            let mut value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            value = (value & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[offset + i] = *b as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(self.op("set the LAPIC"))
    }

    /// Puts the boot vCPU at the kernel's 64-bit entry. The others wait for the
    /// kernel's INIT/SIPI, which sets their state.
    pub fn set_boot_state(&self, entry: u64) -> Result<(), KvmError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.op("read special registers"))?;
        self.fd
            .set_sregs(&regs::boot_sregs(&sregs))
            .map_err(self.op("set special registers"))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(self.op("set registers"))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.op("set the FPU"))
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Result<VcpuExit<'_>, KvmError> {
        let id = self.id;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                KvmExit::IoIn(port, data) => VcpuExit::IoIn(port, data),
                KvmExit::IoOut(port, data) => VcpuExit::IoOut(port, data),
                KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
                KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
                KvmExit::Hlt => VcpuExit::Halted,
                KvmExit::Shutdown => VcpuExit::Shutdown,
                KvmExit::SystemEvent(kind, _) => VcpuExit::SystemEvent(kind),
                KvmExit::InternalError => VcpuExit::InternalError,
                KvmExit::FailEntry(reason, _) => VcpuExit::FailEntry(reason),
                KvmExit::Intr => VcpuExit::Interrupted,
                other => VcpuExit::Unexpected(format!("{other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(KvmError::new(format!("run vCPU {id}"))(e)),
        }
    }
}
