//! The virtio-rng device and its worker thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::thread;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::queue::fill_requests;
use crate::devices::virtio::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [256];

/// The entropy device. Its bytes come from the host's /dev/urandom.
#[derive(Default)]
pub struct Rng;

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io = |source| ActivateError::Io {
            device: "rng",
            source,
        };
        let mut source = File::open("/dev/urandom").map_err(io)?;
        let ActivateContext {
            mem,
            mut queues,
            mut queue_events,
            interrupt,
            ..
        } = ctx;
        let (Some(mut queue), Some(event)) = (queues.pop(), queue_events.pop()) else {
            return Err(ActivateError::InvalidQueue {
                device: "rng",
                queue: 0,
            });
        };
        let epoll = Epoll::new().map_err(io)?;
        epoll
            .ctl(
                ControlOperation::Add,
                event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(io)?;
        thread::Builder::new()
            .name("virtio-rng".into())
            .stack_size(128 << 10)
            .spawn(move || loop {
                let mut ready = [EpollEvent::default()];
                if epoll.wait(-1, &mut ready).is_err() {
                    continue;
                }
                let _ = event.read();
                match fill_requests(&mem, &mut queue, &mut source) {
                    Ok(true) => {
                        if let Err(e) = interrupt.signal_used_queue() {
                            tracing::warn!("virtio-rng: cannot interrupt the guest: {e}");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // The guest broke its own queue; it gets no more entropy.
                        tracing::warn!("virtio-rng: queue error, device stopped: {e}");
                        return;
                    }
                }
            })
            .map_err(io)?;
        Ok(())
    }
}
