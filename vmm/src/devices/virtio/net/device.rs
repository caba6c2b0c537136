//! The virtio-net device: the MAC in config space, the backend until
//! activation, and the worker thread it starts then.

use std::thread::{self, JoinHandle};

use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::features::{self, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use super::mac::MacAddr;
use super::worker::{Worker, WorkerSetup};
use crate::devices::virtio::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice};

const VIRTIO_ID_NET: u32 = 1;
/// RX and TX, in that order (virtio 1.2, 5.1.2); no control queue.
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// The network device. Its frames go to and come from a [`Backend`] (the
/// tap); without one it takes the guest's frames and discards them, and
/// never receives any.
pub struct Net {
    /// The config space: the MAC, and nothing else we offer.
    config: [u8; 6],
    /// Until activation; then the worker owns it.
    backend: Option<Box<dyn Backend>>,
    activated: bool,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl Net {
    /// A device with address `mac`, moving frames through `backend`.
    pub fn new(mac: MacAddr, backend: Option<Box<dyn Backend>>) -> Self {
        Net {
            config: mac.octets(),
            backend,
            activated: false,
            worker: None,
        }
    }

    /// The worker thread, for tests that watch it.
    #[cfg(test)]
    pub(super) fn worker_thread(&self) -> Option<&JoinHandle<()>> {
        self.worker.as_ref().map(|(_, handle)| handle)
    }

    /// Ends the worker and waits for it: it finishes the wake-up it is in, so
    /// every chain it took is back in the used ring, and then touches neither
    /// guest memory nor the queues again.
    fn stop_worker(&mut self) {
        if let Some((kill, handle)) = self.worker.take() {
            let _ = kill.write(1);
            let _ = handle.join();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        // The same with or without a backend: a template saved without a
        // network is restored with one, and the driver does not negotiate again.
        features::OFFERED
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // The MAC is read-only: VIRTIO_NET_F_CTRL_MAC_ADDR is not offered, and
    // without it the driver must not write it (virtio 1.2, 5.1.4.2).

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io = |source| ActivateError::Io {
            device: "net",
            source,
        };
        if self.activated {
            return Err(io(std::io::Error::other("already activated")));
        }
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            acked_features,
        } = ctx;
        let (Ok([rxq, txq]), Ok([rx_event, tx_event])) =
            (<[_; 2]>::try_from(queues), <[_; 2]>::try_from(queue_events))
        else {
            return Err(ActivateError::InvalidQueue {
                device: "net",
                queue: 0,
            });
        };
        let mut backend = self.backend.take();
        if let Some(backend) = backend.as_deref_mut() {
            // What the guest can receive is only known now (and, on restore,
            // the restoring VMM's tap learns it from the saved features).
            let offloads = features::tap_offloads(acked_features);
            if let Err(e) = backend.set_guest_offloads(offloads) {
                // The tap keeps the no-offload setting it was taken with,
                // which every guest can receive: slower, not broken.
                tracing::warn!("virtio-net: cannot set tap offloads {offloads:#x}: {e}");
            }
        }
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let worker = Worker::new(WorkerSetup {
            mem,
            rxq,
            txq,
            rx_event,
            tx_event,
            interrupt,
            backend,
            mergeable: features::has(acked_features, VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: features::has(acked_features, VIRTIO_NET_F_GUEST_CSUM),
            kill: kill.try_clone().map_err(io)?,
        })
        .map_err(io)?;
        let handle = thread::Builder::new()
            .name("virtio-net".into())
            .stack_size(256 << 10)
            .spawn(move || worker.run())
            .map_err(io)?;
        self.worker = Some((kill, handle));
        self.activated = true;
        Ok(())
    }

    fn quiesce(&mut self) {
        // A frame waiting for RX buffers or for the tap is lost: a dropped
        // packet, which the guest's TCP resends.
        self.stop_worker();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
