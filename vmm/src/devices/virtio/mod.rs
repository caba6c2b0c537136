//! virtio devices over the MMIO transport.
//!
//! Every device implements [`VirtioDevice`]; [`mmio::MmioTransport`] turns the
//! guest's register accesses into feature negotiation, queue setup and, once
//! the driver is ready, [`VirtioDevice::activate`], which hands the device its
//! queues, their notification eventfds and an [`Interrupt`]. From then on the
//! device works on its own thread; the vCPUs never block on it.
//!
//! Queue walking is done with `virtio-queue`, which bounds-checks every
//! descriptor against guest memory: a hostile guest can make a device fail, not
//! make it touch memory outside the guest.

pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod suppression;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bit: the device follows virtio 1.x (required by the MMIO v2 transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// InterruptStatus bit: a queue has new used buffers.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Why a device could not start.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver set up a queue that does not fit guest memory.
    #[error("virtio {device}: queue {queue} is not valid in guest memory")]
    InvalidQueue {
        /// The device.
        device: &'static str,
        /// The queue.
        queue: usize,
    },
    /// The device's worker thread or its resources could not be set up.
    #[error("virtio {device}: cannot start")]
    Io {
        /// The device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The guest-visible interrupt of one device: a status word the driver reads
/// and acknowledges through the transport, and an irqfd that raises its GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt that raises the GSI `irqfd` is registered for.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged these bits (InterruptACK register).
    /// Sets status bits without raising the interrupt line (a restored
    /// snapshot's pending bits: the restored irqchip holds the line's state).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver has finished setting it up.
pub struct ActivateContext {
    /// Guest memory, to walk the queues.
    pub mem: GuestMemoryMmap,
    /// The queues, in index order, as the driver configured them.
    pub queues: Vec<Queue>,
    /// For each queue, the eventfd KVM signals when the guest notifies it.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// One virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (4 for rng, 19 for vsock, 26 for fs, ...).
    fn device_type(&self) -> u32;
    /// A short name for logs and errors.
    fn name(&self) -> &'static str;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`; out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes device configuration space; ignored unless the device has writable config.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts the device with its queues. Called once, when the driver sets DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Called on an active device before a snapshot saves its transport and
    /// guest memory: from then on the device must leave guest memory and its
    /// queues alone, with every chain it took back in the used ring. Final:
    /// a VMM that saved a snapshot exits. Devices that only work when the
    /// guest asks (which it cannot while its vCPUs are paused) need nothing;
    /// devices with a host side that can write into the guest at any time
    /// stop their worker.
    fn quiesce(&mut self) {}
}

/// Reads `data.len()` bytes at `offset` out of a device's config bytes, with
/// bytes past the end reading as zero (shared by devices with static config).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut buf = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut buf);
        assert_eq!(buf, [3, 4, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), 0);
    }
}
