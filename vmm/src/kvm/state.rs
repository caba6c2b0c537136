//! What KVM holds of a running VM, read out and written back: the material of a
//! snapshot (see `crate::snapshot`).
//!
//! The order of the writes on restore follows what KVM needs: the MP state and
//! the registers before the LAPIC (whose timer is armed relative to the TSC),
//! the MSRs (which include the TSC) before the pending events.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::{KvmError, Vcpu, Vm};

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU (and APIC) id it belongs to.
    pub id: u8,
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    /// (index, value) of every MSR KVM would read back.
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
}

/// The VM-wide state that lives in KVM: interrupt controllers, PIT and clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// KVM_GET_MSRS reads at most this many at once (KVM_MAX_MSR_ENTRIES).
const MSR_BATCH: usize = 255;

impl Vcpu {
    /// Runs KVM_RUN once with `immediate_exit`, which completes an I/O exit the
    /// VMM has just handled (the guest's instruction retires) without running
    /// any further guest code: the registers are then final.
    pub fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // EINTR is the expected answer; anything else leaves the state as it was.
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Reads this vCPU's state; `msr_indices` is the host's list of MSRs
    /// (`Vm::msr_indices`). The vCPU must not be running.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, KvmError> {
        Ok(VcpuState {
            id: self.id,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.op("read the MP state"))?,
            regs: self.fd.get_regs().map_err(self.op("read registers"))?,
            sregs: self
                .fd
                .get_sregs()
                .map_err(self.op("read special registers"))?,
            xsave: self
                .fd
                .get_xsave()
                .map_err(self.op("read the XSAVE area"))?,
            xcrs: self.fd.get_xcrs().map_err(self.op("read the XCRs"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.op("read debug registers"))?,
            lapic: self.fd.get_lapic().map_err(self.op("read the LAPIC"))?,
            msrs: self.read_msrs(msr_indices)?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.op("read pending events"))?,
        })
    }

    /// Reads every MSR of `indices` that KVM can read: KVM stops a batch at the
    /// first one it refuses (host-dependent feature MSRs), which is then skipped.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, KvmError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSR_BATCH)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| self.op("build the MSR list")(kvm_ioctls::Error::new(libc::EINVAL)))?;
            let read = self.fd.get_msrs(&mut msrs).map_err(self.op("read MSRs"))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
            // `read` entries succeeded; if the batch stopped short, the next one
            // was refused: skip it.
            let consumed = if read < batch.len() { read + 1 } else { read };
            rest = &rest[consumed..];
        }
        Ok(out)
    }

    /// Writes back a state read by [`Vcpu::save_state`] on the same host.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), KvmError> {
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.op("set the MP state"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.op("set registers"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.op("set special registers"))?;
        // SAFETY: the XSAVE area was read from KVM on this host by `get_xsave`,
        // so its layout is the one KVM_SET_XSAVE expects (4 KiB, legacy size).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.op("set the XSAVE area"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.op("set the XCRs"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(self.op("set debug registers"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.op("set the LAPIC"))?;
        for chunk in state.msrs.chunks(MSR_BATCH) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            self.set_msrs(&entries)?;
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.op("set pending events"))
    }
}

impl Vm {
    /// The MSRs a snapshot saves: every one KVM lists as saveable.
    pub fn msr_indices(&self) -> Result<Vec<u32>, KvmError> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(KvmError::new("read the MSR index list"))?;
        Ok(list.as_slice().to_vec())
    }

    /// Reads the in-kernel irqchip, PIT and clock. The vCPUs must be stopped.
    pub fn save_state(&self) -> Result<VmState, KvmError> {
        let chip = |id: u32| -> Result<kvm_irqchip, KvmError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(KvmError::new(format!("read irqchip {id}")))?;
            Ok(chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(KvmError::new("read the PIT"))?,
            clock: self
                .fd
                .get_clock()
                .map_err(KvmError::new("read the clock"))?,
        })
    }

    /// Writes back a state read by [`Vm::save_state`]. The guest's kvm-clock
    /// continues from where it was saved, so its monotonic time never jumps.
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(KvmError::new(format!("set irqchip {}", chip.chip_id)))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(KvmError::new("set the PIT"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(KvmError::new("set the clock"))
    }
}
