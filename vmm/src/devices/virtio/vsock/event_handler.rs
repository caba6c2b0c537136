//! The vsock worker thread: one epoll set for the queue notifications, the
//! stop signal and every host socket; each wake-up takes the guest's packets
//! off TX, services host sockets and deadlines, then fills RX.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, FIRST_MUXER_TOKEN};
use super::queue::{process_rx, process_tx, SCRATCH_LEN};
use crate::devices::virtio::Interrupt;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const TOKEN_KILL: u64 = 3;
const _: () = assert!(TOKEN_KILL < FIRST_MUXER_TOKEN);

/// Everything the worker thread owns.
pub struct Worker {
    mem: GuestMemoryMmap,
    /// RX, TX, event. The event queue is never used: we send no transport
    /// events (those are for migration), but the driver sets it up.
    queues: [Queue; 3],
    queue_events: [EventFd; 3],
    interrupt: Arc<Interrupt>,
    muxer: Muxer,
    guest_cid: u64,
    kill: EventFd,
    scratch: Vec<u8>,
}

impl Worker {
    /// Registers the queue eventfds and `kill` in the muxer's epoll set.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: [Queue; 3],
        queue_events: [EventFd; 3],
        interrupt: Arc<Interrupt>,
        muxer: Muxer,
        guest_cid: u64,
        kill: EventFd,
    ) -> io::Result<Worker> {
        let fds = queue_events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), i as u64))
            .chain([(kill.as_raw_fd(), TOKEN_KILL)]);
        for (fd, token) in fds {
            muxer.epoll().ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Worker {
            mem,
            queues,
            queue_events,
            interrupt,
            muxer,
            guest_cid,
            kill,
            scratch: vec![0; SCRATCH_LEN],
        })
    }

    /// Runs until the device is dropped or the guest breaks a queue. Dropping
    /// the worker closes every host socket.
    pub fn run(mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let timeout = self.muxer.timeout_ms(Instant::now());
            let n = match self.muxer.epoll().wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll failed, device stopped: {e}");
                    return;
                }
            };
            let mut tx_kicked = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        return;
                    }
                    t if t == TXQ as u64 => {
                        let _ = self.queue_events[TXQ].read();
                        tx_kicked = true;
                    }
                    t if t == RXQ as u64 || t == EVQ as u64 => {
                        // New RX buffers: filled below.
                        let _ = self.queue_events[t as usize].read();
                    }
                    t => self.muxer.handle_event(t, ev.event_set(), Instant::now()),
                }
            }
            self.muxer.handle_timeouts(Instant::now());
            if let Err(e) = self.process_queues(tx_kicked) {
                // The guest broke its own queue; its vsock stops, the VMM does not.
                tracing::warn!("virtio-vsock: queue error, device stopped: {e}");
                return;
            }
        }
    }

    fn process_queues(&mut self, tx_kicked: bool) -> Result<(), virtio_queue::Error> {
        let [rxq, txq, _] = &mut self.queues;
        let mut notify = false;
        if tx_kicked {
            notify |= process_tx(
                &self.mem,
                txq,
                &mut self.muxer,
                self.guest_cid,
                &mut self.scratch,
            )?;
        }
        notify |= process_rx(&self.mem, rxq, &mut self.muxer, &mut self.scratch)?;
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!("virtio-vsock: cannot interrupt the guest: {e}");
            }
        }
        Ok(())
    }
}
