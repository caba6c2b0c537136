//! The VM file descriptor: memory slots, the in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{KvmError, Vcpu};
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Capabilities we rely on; a KVM without them cannot run our guests.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory slots"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::ExtCpuid, "extended CPUID"),
];

/// One KVM virtual machine.
pub struct Vm {
    pub(super) kvm: Kvm,
    pub(super) fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm, checks its capabilities, and creates a VM with an in-kernel
    /// irqchip (PIC, IOAPIC, LAPICs) and PIT.
    pub fn new() -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::new("open /dev/kvm"))?;
        for (cap, what) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(KvmError::new(format!("run here: /dev/kvm lacks {what}"))(
                    kvm_ioctls::Error::new(libc::ENOTSUP),
                ));
            }
        }
        let fd = kvm.create_vm().map_err(KvmError::new("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(KvmError::new("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(KvmError::new("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(KvmError::new("create the in-kernel PIT"))?;
        Ok(Vm { kvm, fd })
    }

    /// Most vCPUs this KVM supports in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Hands every region of guest memory to KVM as a memory slot.
    pub fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the caller
            // keeps alive for as long as the VM runs (it is moved into the VM's
            // owner and only dropped at process exit); the slot does not overlap others.
            unsafe { self.fd.set_user_memory_region(slot_region) }
                .map_err(KvmError::new(format!("map guest memory slot {slot}")))?;
        }
        Ok(())
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(KvmError::new(format!("register an irqfd for GSI {gsi}")))
    }

    /// Makes a 32-bit guest write of `datamatch` to MMIO address `addr` signal
    /// `evt` inside KVM, without an exit to the VMM (virtio queue notifications).
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(KvmError::new(format!("register an ioeventfd at {addr:#x}")))
    }

    /// Creates vCPU `id` (also its APIC id) with KVM's supported CPUID adjusted
    /// for a VM of `vcpus` vCPUs.
    pub fn create_vcpu(&self, id: u8, vcpus: u8) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(KvmError::new(format!("create vCPU {id}")))?;
        let mut cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::new("read the supported CPUID"))?;
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        crate::arch::x86_64::cpuid::patch_for_vcpu(cpuid.as_mut_slice(), id, vcpus, tsc_deadline);
        fd.set_cpuid2(&cpuid)
            .map_err(KvmError::new(format!("set CPUID of vCPU {id}")))?;
        Vcpu::new(fd, id)
    }
}
