//! The net worker thread: one epoll set for the two queue notifications, the
//! backend's descriptor and the stop signal. Each wake-up sends what the
//! guest queued on TX, then fills RX from the backend, then interrupts the
//! guest once if either queue has used buffers.
//!
//! Everything is level-triggered, so a batch limit never loses an event:
//! what is left over wakes the thread again at once. To not spin, the
//! backend is watched for readability only while no received frame waits for
//! RX buffers (the guest's RX notification wakes us instead), and for
//! writability only while a TX frame waits for it.
//!
//! The guest's RX notifications are wanted only then too: the rest of the
//! time they are turned off in the ring (with EVENT_IDX, not asked for
//! again), so that refilling its buffers does not cost the guest an exit
//! (and this thread a wake-up) each time. Interrupts go only where the
//! driver asked for them (see [`crate::devices::virtio::suppression`]): its
//! NAPI poll finds what arrives while it runs without one.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::ratelimit::WarnLimiter;
use super::rx::{deliver_frame, fix_header, Delivery};
use super::tx::{process_tx, TxProgress, TxState};
use super::{MAX_FRAME_LEN, NET_HDR_LEN};
use crate::devices::virtio::suppression::{driver_wants_interrupt, notify_on_next_buffer};
use crate::devices::virtio::Interrupt;

const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_KILL: u64 = 3;

/// Most frames moved in each direction per wake-up: neither direction can
/// starve the other, and the guest hears of its buffers at least this often.
pub const BATCH: usize = 64;

/// What the worker is told at start.
pub struct WorkerSetup {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The RX queue (0).
    pub rxq: Queue,
    /// The TX queue (1).
    pub txq: Queue,
    /// RX notifications: the guest posted receive buffers.
    pub rx_event: EventFd,
    /// TX notifications: the guest queued frames.
    pub tx_event: EventFd,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The backend, if the VM has a network.
    pub backend: Option<Box<dyn Backend>>,
    /// The guest accepted VIRTIO_NET_F_MRG_RXBUF.
    pub mergeable: bool,
    /// The guest accepted VIRTIO_NET_F_GUEST_CSUM.
    pub guest_csum: bool,
    /// Ends the thread when written.
    pub kill: EventFd,
}

/// Everything the worker thread owns.
pub struct Worker {
    s: WorkerSetup,
    epoll: Epoll,
    /// What the backend is registered for in `epoll`.
    backend_interest: EventSet,
    rx_buf: Vec<u8>,
    /// The length of a received frame in `rx_buf` waiting for RX buffers.
    rx_pending: Option<usize>,
    /// Whether the RX ring asks the guest for notifications (it does at
    /// first: the ring's flags start at zero).
    rx_notifications: bool,
    tx: TxState,
    warn: WarnLimiter,
}

/// Why the worker stops on its own.
enum Stop {
    Killed,
    Queue(virtio_queue::Error),
    Epoll(io::Error),
}

impl Worker {
    /// Sets up the epoll set.
    pub fn new(s: WorkerSetup) -> io::Result<Worker> {
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (s.rx_event.as_raw_fd(), TOKEN_RXQ),
            (s.tx_event.as_raw_fd(), TOKEN_TXQ),
            (s.kill.as_raw_fd(), TOKEN_KILL),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        if let Some(fd) = s.backend.as_deref().map(backend_fd) {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
            )?;
        }
        Ok(Worker {
            s,
            epoll,
            backend_interest: EventSet::IN,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            rx_notifications: true,
            tx: TxState::new(),
            warn: WarnLimiter::new(Duration::from_secs(5)),
        })
    }

    /// Runs until killed or the guest breaks a queue.
    pub fn run(mut self) {
        match self.run_until_stopped() {
            Stop::Killed => {
                if self.rx_pending.is_some() || self.tx.is_blocked() {
                    tracing::debug!("virtio-net: stopped with a frame in flight, dropped");
                }
            }
            Stop::Queue(e) => {
                // The guest broke its own queue; its network stops, the VMM does not.
                tracing::warn!("virtio-net: queue error, device stopped: {e}");
            }
            Stop::Epoll(e) => tracing::error!("virtio-net: epoll failed, device stopped: {e}"),
        }
    }

    fn run_until_stopped(&mut self) -> Stop {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Stop::Epoll(e),
            };
            let (mut rx_work, mut tx_work) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Stop::Killed,
                    TOKEN_RXQ => {
                        let _ = self.s.rx_event.read();
                        rx_work = true;
                    }
                    TOKEN_TXQ => {
                        let _ = self.s.tx_event.read();
                        tx_work = true;
                    }
                    TOKEN_BACKEND => {
                        let set = ev.event_set();
                        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                            self.detach_backend();
                            // TX may have stopped on the backend with the
                            // guest's kicks off; drain it now.
                            tx_work = true;
                            continue;
                        }
                        rx_work |= set.contains(EventSet::IN);
                        tx_work |= set.contains(EventSet::OUT);
                    }
                    _ => {}
                }
            }
            if let Err(e) = self.wake(rx_work, tx_work) {
                return Stop::Queue(e);
            }
            if let Err(e) = self.update_backend_interest() {
                return Stop::Epoll(e);
            }
        }
    }

    /// One wake-up's work, and at most one interrupt for it.
    fn wake(&mut self, rx_work: bool, tx_work: bool) -> Result<(), virtio_queue::Error> {
        let mem = &self.s.mem;
        let (rx_used, tx_used) = (self.s.rxq.next_used(), self.s.txq.next_used());
        if tx_work {
            let progress = process_tx(
                mem,
                &mut self.s.txq,
                self.s.backend.as_deref_mut(),
                &mut self.tx,
                BATCH,
                &mut self.warn,
            )?;
            if progress == TxProgress::Budget {
                // Come back after RX has had its turn.
                let _ = self.s.tx_event.write(1);
            }
        }
        if rx_work {
            self.process_rx()?;
        }
        let mem = &self.s.mem;
        let rx_notify = driver_wants_interrupt(mem, &self.s.rxq, rx_used)?;
        let tx_notify = driver_wants_interrupt(mem, &self.s.txq, tx_used)?;
        if rx_notify || tx_notify {
            if let Err(e) = self.s.interrupt.signal_used_queue() {
                tracing::warn!("virtio-net: cannot interrupt the guest: {e}");
            }
        }
        Ok(())
    }

    /// Moves up to [`BATCH`] frames from the backend into RX buffers. A frame
    /// read is never dropped for want of buffers: it waits in `rx_buf`, and
    /// nothing more is read until it is delivered.
    fn process_rx(&mut self) -> Result<(), virtio_queue::Error> {
        let result = self.fill_rx();
        if result.is_ok() && self.rx_pending.is_none() && self.rx_notifications {
            self.s.rxq.disable_notification(&self.s.mem)?;
            self.rx_notifications = false;
        }
        result
    }

    fn fill_rx(&mut self) -> Result<(), virtio_queue::Error> {
        for _ in 0..BATCH {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.read_frame() {
                    Some(len) => len,
                    None => return Ok(()),
                },
            };
            let frame = &mut self.rx_buf[..len];
            fix_header(frame, self.s.guest_csum);
            let delivery = deliver_frame(
                &self.s.mem,
                &mut self.s.rxq,
                frame,
                self.s.mergeable,
                &mut self.warn,
            )?;
            if delivery == Delivery::NoBuffers {
                self.rx_pending = Some(len);
                // Hear of the guest's next buffer; any it added before
                // seeing the request will not be kicked for, so look again.
                self.rx_notifications = true;
                let seen = notify_on_next_buffer(&self.s.mem, &self.s.rxq)?;
                if self.s.rxq.avail_idx(&self.s.mem, Ordering::Acquire)?.0 != seen {
                    continue;
                }
                return Ok(());
            }
            self.rx_pending = None;
        }
        Ok(())
    }

    /// The next frame from the backend, or `None` when it has none now.
    fn read_frame(&mut self) -> Option<usize> {
        let backend = self.s.backend.as_deref_mut()?;
        // Bounded in case a broken backend keeps returning runts.
        for _ in 0..BATCH {
            match backend.read_frame(&mut self.rx_buf) {
                Ok(len) if len >= NET_HDR_LEN => return Some(len),
                Ok(len) => self.warn.warn(format_args!(
                    "the tap gave a frame of {len} bytes, shorter than the header; dropped"
                )),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return None
                }
                Err(e) => {
                    self.warn
                        .warn(format_args!("cannot read from the tap: {e}"));
                    return None;
                }
            }
        }
        None
    }

    /// Watches the backend for what the worker waits on now (see the module
    /// comment). Errors and hang-ups are reported even with no interest.
    fn update_backend_interest(&mut self) -> io::Result<()> {
        let Some(fd) = self.s.backend.as_deref().map(backend_fd) else {
            return Ok(());
        };
        let mut want = EventSet::empty();
        if self.rx_pending.is_none() {
            want |= EventSet::IN;
        }
        if self.tx.is_blocked() {
            want |= EventSet::OUT;
        }
        if want != self.backend_interest {
            self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, TOKEN_BACKEND),
            )?;
            self.backend_interest = want;
        }
        Ok(())
    }

    /// The backend failed for good (a tap whose interface was deleted reports
    /// EPOLLERR forever): carry on without it, discarding TX like a VM with
    /// no network, instead of spinning on the error.
    fn detach_backend(&mut self) {
        if let Some(backend) = self.s.backend.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                backend_fd(backend.as_ref()),
                EpollEvent::default(),
            );
            tracing::warn!(
                "virtio-net: the tap reported an error or hang-up; the guest's frames are \
                 discarded from now on"
            );
        }
        self.rx_pending = None;
        self.tx.drop_pending();
    }
}

fn backend_fd(backend: &dyn Backend) -> RawFd {
    backend.as_fd().as_raw_fd()
}
