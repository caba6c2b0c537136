//! Routes guest MMIO accesses to the virtio-mmio device whose window holds them.

use std::sync::{Mutex, PoisonError};

use super::virtio::mmio::{MmioTransport, TransportState, TransportStateError, MMIO_DEVICE_SIZE};

/// The virtio-mmio devices, one window each, in address order.
#[derive(Default)]
pub struct MmioBus {
    slots: Vec<(u64, Mutex<MmioTransport>)>,
}

impl MmioBus {
    /// Adds a device at `base`; windows must not overlap (the caller allocates
    /// them from [`crate::arch::x86_64::layout::MMIO_DEVICES_START`] upwards).
    pub fn insert(&mut self, base: u64, transport: MmioTransport) {
        self.slots.push((base, Mutex::new(transport)));
        self.slots.sort_by_key(|(b, _)| *b);
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&Mutex<MmioTransport>, u64)> {
        let (base, slot) = self
            .slots
            .iter()
            .find(|(base, _)| addr >= *base && addr - base < MMIO_DEVICE_SIZE)?;
        let offset = addr - base;
        // An access that runs past the window belongs to no device.
        (offset + len as u64 <= MMIO_DEVICE_SIZE).then_some((slot, offset))
    }

    /// Stops every device's work on guest memory before a snapshot (the vCPUs
    /// are paused already): after this, guest memory, the interrupt state and
    /// the transports stay as they are. Final.
    pub fn quiesce(&self) {
        for (_, t) in &self.slots {
            t.lock().unwrap_or_else(PoisonError::into_inner).quiesce();
        }
    }

    /// Every transport's state, in address order, for a snapshot.
    pub fn states(&self) -> Result<Vec<TransportState>, TransportStateError> {
        self.slots
            .iter()
            .map(|(_, t)| t.lock().unwrap_or_else(PoisonError::into_inner).state())
            .collect()
    }

    /// Puts every transport into a snapshot's state (same devices, same order).
    pub fn restore(&self, states: &[TransportState]) -> Result<(), TransportStateError> {
        if states.len() != self.slots.len() {
            return Err(TransportStateError::WrongDevice {
                expected: "the same number of devices",
                found: format!("{} devices", states.len()),
            });
        }
        for ((_, t), state) in self.slots.iter().zip(states) {
            t.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .restore(state)?;
        }
        Ok(())
    }

    /// Handles a guest read; unclaimed addresses read as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((slot, offset)) => slot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(offset, data),
            None => data.fill(0),
        }
    }

    /// Handles a guest write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.find(addr, data.len()) {
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(offset, data);
        }
    }
}
