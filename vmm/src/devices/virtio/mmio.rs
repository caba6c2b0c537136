//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! The guest drives it with 32-bit register accesses at fixed offsets; device
//! configuration space follows at 0x100. Everything the guest writes here is
//! validated before it is used: the queue index, queue sizes (power of two, at
//! most the device's maximum), features (only offered ones), and the queue
//! addresses, which are checked against guest memory before activation.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::suppression::VIRTIO_RING_F_EVENT_IDX;
use super::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Bytes of MMIO space per device.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: KVM turns guest writes here into eventfd signals.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b48_4c42; // "BLHK"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// A virtio device as seen through its MMIO window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    activated: bool,
    /// The queues as the driver set them up, kept at activation (the queues
    /// themselves move to the device) for a snapshot.
    activated_queues: Vec<QueueState>,
}

/// One queue in a snapshot: the driver's setup and the ring positions.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    event_idx: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            event_idx: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            event_idx_enabled: q.event_idx,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

/// A transport's registers and queues in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    /// The device's name: a snapshot restores onto the same device layout.
    pub device: String,
    status: u32,
    acked_features: u64,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    interrupt_status: u32,
    activated: bool,
    queues: Vec<QueueSnapshot>,
}

/// Why a transport could not be snapshotted or restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    /// The snapshot was taken of a different device.
    #[error("the snapshot has device {found:?} where this VM has {expected:?}")]
    WrongDevice {
        /// This VM's device.
        expected: &'static str,
        /// The snapshot's.
        found: String,
    },
    /// A queue in the snapshot is not valid for this device or memory.
    #[error("virtio {device}: queue {queue} of the snapshot is not valid: {reason}")]
    BadQueue {
        /// The device.
        device: &'static str,
        /// The queue index.
        queue: usize,
        /// Why.
        reason: String,
    },
    /// The used ring could not be read from guest memory.
    #[error("virtio {device}: cannot read the used ring of queue {queue}")]
    UsedRing {
        /// The device.
        device: &'static str,
        /// The queue index.
        queue: usize,
    },
    /// Re-activating the device on restore failed.
    #[error("virtio {device}: the restored device did not start")]
    Activate {
        /// The device.
        device: &'static str,
    },
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` raises its GSI.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let queues = sizes
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| std::io::Error::other(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            activated: false,
            activated_queues: Vec::new(),
        })
    }

    /// Makes an active device stop touching guest memory and its queues, for
    /// a snapshot (see [`VirtioDevice::quiesce`]). Final.
    pub fn quiesce(&mut self) {
        if self.activated {
            self.device.quiesce();
        }
    }

    /// The transport's state for a snapshot. The device must be quiescent:
    /// every buffer it took from a queue already returned (true of our
    /// devices between requests, of the vsock device with no connection, and
    /// of the net device after [`MmioTransport::quiesce`]), so that the used
    /// ring's index is where both ring positions stand.
    pub fn state(&self) -> Result<TransportState, TransportStateError> {
        let device = self.name();
        let queues = if self.activated {
            self.activated_queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    // The used ring's idx field follows its 16-bit flags.
                    let used_idx: u16 = self
                        .mem
                        .read_obj(GuestAddress(q.used_ring + 2))
                        .map_err(|_| TransportStateError::UsedRing { device, queue: i })?;
                    let mut q = QueueSnapshot::from(*q);
                    q.next_avail = used_idx;
                    q.next_used = used_idx;
                    Ok(q)
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        Ok(TransportState {
            device: device.to_owned(),
            status: self.status,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
        })
    }

    /// Puts a fresh transport into a snapshot's `state`, and starts its device
    /// if it was running then. Everything in `state` is checked as if the guest
    /// had written it (a snapshot file is input like any other).
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        let device = self.name();
        if state.device != device {
            return Err(TransportStateError::WrongDevice {
                expected: device,
                found: state.device.clone(),
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(TransportStateError::BadQueue {
                device,
                queue: state.queues.len(),
                reason: format!("the device has {} queues", self.queues.len()),
            });
        }
        let max_sizes = self.device.queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (q, max)) in state.queues.iter().zip(max_sizes).enumerate() {
            let bad = |reason: String| TransportStateError::BadQueue {
                device,
                queue: i,
                reason,
            };
            if q.max_size != max {
                return Err(bad(format!("max size {} is not {max}", q.max_size)));
            }
            let queue = Queue::try_from(QueueState::from(*q)).map_err(|e| bad(e.to_string()))?;
            if state.activated && !queue.is_valid(&self.mem) {
                return Err(bad("its rings are not in guest memory".into()));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.status = state.status;
        self.acked_features = state.acked_features & self.device.features();
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.interrupt.ack(u32::MAX);
        self.interrupt.set(state.interrupt_status);
        if state.activated {
            self.activate();
            if !self.activated {
                return Err(TransportStateError::Activate { device });
            }
            // A request the guest queued just before the snapshot was notified
            // to the old VMM; let the device look at every queue once.
            for evt in &self.queue_events {
                let _ = evt.write(1);
            }
        }
        Ok(())
    }

    /// The device's name, for logs.
    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    /// The eventfd per queue that a QueueNotify write signals, to register with
    /// KVM as ioeventfds (datamatch = queue index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Handles a guest read at `offset` within the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let value = match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => 0, // ConfigGeneration: our config never changes under the driver
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    /// Handles a guest write at `offset` within the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => self.write_driver_features(value),
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 => {
                // The queue checks the size (non-zero power of two, at most max).
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            NOTIFY_REG_OFFSET => {
                // Normally caught by the ioeventfd; this is the fallback path.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.write_status(value),
            0x80 => self.set_queue_address(|q, v| q.set_desc_table_address(Some(v), None), value),
            0x84 => self.set_queue_address(|q, v| q.set_desc_table_address(None, Some(v)), value),
            0x90 => self.set_queue_address(|q, v| q.set_avail_ring_address(Some(v), None), value),
            0x94 => self.set_queue_address(|q, v| q.set_avail_ring_address(None, Some(v)), value),
            0xa0 => self.set_queue_address(|q, v| q.set_used_ring_address(Some(v), None), value),
            0xa4 => self.set_queue_address(|q, v| q.set_used_ring_address(None, Some(v)), value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if self.status & STATUS_DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.selected_queue() {
            set(q, value);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 || self.driver_features_select > 1 {
            return;
        }
        let shift = 32 * self.driver_features_select;
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | (u64::from(value) << shift);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.acked_features & !offered != 0 || self.acked_features & version_1 == 0 {
                tracing::warn!(
                    device = self.name(),
                    acked = format_args!("{:#x}", self.acked_features),
                    "driver accepted features we did not offer; refusing FEATURES_OK"
                );
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        let name = self.name();
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            tracing::warn!(device = name, queue = i, "driver set up an invalid queue");
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            return;
        }
        let queue_events = match self.queue_events.iter().map(EventFd::try_clone).collect() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(device = name, "cannot clone queue eventfds: {e}");
                self.status |= STATUS_FAILED;
                return;
            }
        };
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        self.activated_queues = self.queues.iter().map(Queue::state).collect();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: std::mem::take(&mut self.queues),
            queue_events,
            interrupt: Arc::clone(&self.interrupt),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(device = name, "activated");
            }
            Err(e) => {
                tracing::error!(device = name, "activation failed: {e}");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
            }
        }
    }

    /// A reset before activation returns to the initial state. After activation
    /// the device's worker keeps its queues (we do not support re-initialising a
    /// running device yet): the driver sees the reset complete but the device
    /// stays as it was; Linux only resets devices like this when it shuts down.
    fn reset(&mut self) {
        if self.activated {
            tracing::debug!(device = self.name(), "reset of an active device ignored");
            self.status = 0;
            return;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::mpsc::{channel, Sender};
    use vm_memory::GuestAddress;

    const STATUS_ACKNOWLEDGE: u32 = 1;
    const STATUS_DRIVER: u32 = 2;

    struct Dummy {
        activated: Sender<usize>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "dummy"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.activated.send(ctx.queues.len()).unwrap();
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, std::sync::mpsc::Receiver<usize>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tx, rx) = channel();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(Box::new(Dummy { activated: tx }), mem, irq).unwrap(),
            rx,
        )
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
        w(t, 0x30, index);
        w(t, 0x38, 16);
        w(t, 0x80, base);
        w(t, 0x90, base + 0x1000);
        w(t, 0xa0, base + 0x2000);
        w(t, 0x44, 1);
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0x00), MAGIC_VALUE);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), 42);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1); // VERSION_1 is bit 32
    }

    #[test]
    fn full_handshake_activates_the_device() {
        let (mut t, rx) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(rx.try_recv().unwrap(), 2);
    }

    #[test]
    fn unoffered_features_are_refused() {
        let (mut t, _) = transport();
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5); // not offered
        w(&mut t, 0x70, STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queues_outside_guest_memory_do_not_activate() {
        let (mut t, rx) = transport();
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, STATUS_FEATURES_OK);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0xf000_0000); // far outside the 1 MiB of RAM
        w(&mut t, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(rx.try_recv().is_err());
        assert_ne!(r(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn hostile_register_values_are_harmless() {
        let (mut t, _) = transport();
        w(&mut t, 0x30, u32::MAX); // select a queue that does not exist
        w(&mut t, 0x38, 1000);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x80, 0xdead_beef);
        assert_eq!(r(&mut t, 0x34), 0);
        w(&mut t, 0x50, u32::MAX);
        let mut odd = [0u8; 3];
        t.read(0x00, &mut odd);
        assert_eq!(odd, [0; 3]);
        t.write(0x70, &[1, 2]);
        assert_eq!(r(&mut t, 0x70), 0);
    }
}
