//! Walking the TX queue: each chain is one frame (header first) for the
//! backend. Plain functions over guest memory, a queue and a backend,
//! testable without a VM.
//!
//! Each chain is copied whole into a bounce buffer and returned to the guest
//! at once, before the frame is sent: every chain taken from the queue is
//! back in the used ring by the end of each call, as a snapshot needs (see
//! [`crate::devices::virtio::mmio::MmioTransport::state`]). A frame the
//! backend cannot take yet stays in the bounce buffer, and no further chain
//! is taken until it is sent: the guest's ring fills up and its driver stops
//! its queue, which is the backpressure.

use std::io::{self, Read};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::backend::Backend;
use super::ratelimit::WarnLimiter;
use super::{MAX_FRAME_LEN, NET_HDR_LEN};

/// The shortest chain that is a frame: the header and an Ethernet header
/// (the tap refuses anything shorter anyway).
pub const MIN_TX_LEN: usize = NET_HDR_LEN + 14;

/// Why a TX chain was dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxChainError {
    /// TX chains are read by the device only.
    #[error("TX chain {head} has a device-writable descriptor")]
    Writable {
        /// The chain's head descriptor.
        head: u16,
    },
    /// A descriptor is outside guest memory, or the lengths overflow.
    #[error("TX chain {head} is not in guest memory")]
    Unreadable {
        /// The chain's head descriptor.
        head: u16,
    },
    /// Not even the headers.
    #[error(
        "TX chain {head} holds {len} bytes, less than a {NET_HDR_LEN}-byte header and an \
         Ethernet header"
    )]
    Short {
        /// The chain's head descriptor.
        head: u16,
        /// Its readable bytes.
        len: usize,
    },
    /// Larger than any frame.
    #[error("TX chain {head} holds {len} bytes, more than the largest frame ({MAX_FRAME_LEN})")]
    TooLong {
        /// The chain's head descriptor.
        head: u16,
        /// Its readable bytes.
        len: usize,
    },
}

/// The TX side's state between wake-ups.
pub struct TxState {
    buf: Vec<u8>,
    /// The length of a frame in `buf` the backend has not taken yet.
    pending: Option<usize>,
}

impl TxState {
    /// An empty state with its bounce buffer.
    pub fn new() -> Self {
        TxState {
            buf: vec![0; MAX_FRAME_LEN],
            pending: None,
        }
    }

    /// Whether a frame waits for the backend to turn writable.
    pub fn is_blocked(&self) -> bool {
        self.pending.is_some()
    }

    /// Forgets a waiting frame (the backend is gone).
    pub fn drop_pending(&mut self) {
        self.pending = None;
    }
}

/// Where [`process_tx`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum TxProgress {
    /// The queue is empty and notifications are on again.
    Drained,
    /// The backend cannot take the pending frame now; retry once it is writable.
    Blocked,
    /// `budget` chains were taken; more may be waiting (notifications stay off).
    Budget,
}

/// Copies the header and frame of a TX chain into `buf` after checking it.
/// Returns the length.
pub fn gather_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, TxChainError> {
    let head = chain.head_index();
    if chain.clone().any(|d| d.is_write_only()) {
        return Err(TxChainError::Writable { head });
    }
    let mut reader = chain
        .reader(mem)
        .map_err(|_| TxChainError::Unreadable { head })?;
    let len = reader.available_bytes();
    if len < MIN_TX_LEN {
        return Err(TxChainError::Short { head, len });
    }
    if len > MAX_FRAME_LEN || len > buf.len() {
        return Err(TxChainError::TooLong { head, len });
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|_| TxChainError::Unreadable { head })?;
    Ok(len)
}

/// What became of one frame handed to the backend.
enum Sent {
    Done,
    Later,
}

/// Hands `frame` to `backend` (or discards it without one). Errors other
/// than "not now" drop the frame: it is the guest's (a GSO header the tap
/// refuses) or the host network's business, and TX must go on.
fn send(backend: Option<&mut (dyn Backend + '_)>, frame: &[u8], warn: &mut WarnLimiter) -> Sent {
    let Some(backend) = backend else {
        return Sent::Done;
    };
    match backend.write_frame(frame) {
        Ok(()) => Sent::Done,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Sent::Later
        }
        Err(e) => {
            warn.warn(format_args!(
                "TX frame of {} bytes dropped: {e}",
                frame.len()
            ));
            Sent::Done
        }
    }
}

/// Sends the pending frame, then every frame the guest queued, up to
/// `budget` chains. Without a backend frames are taken and discarded.
pub fn process_tx(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut backend: Option<&mut (dyn Backend + '_)>,
    state: &mut TxState,
    budget: usize,
    warn: &mut WarnLimiter,
) -> Result<TxProgress, virtio_queue::Error> {
    if let Some(len) = state.pending {
        if let Sent::Later = send(backend.as_deref_mut(), &state.buf[..len], warn) {
            return Ok(TxProgress::Blocked);
        }
        state.pending = None;
    }
    // The worker looks at the whole ring now; kicks meanwhile are wasted exits.
    queue.disable_notification(mem)?;
    let mut taken = 0;
    loop {
        if taken == budget {
            return Ok(TxProgress::Budget);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Whatever the guest added before it saw notifications on again
            // must be taken now: it will not kick for it.
            if queue.enable_notification(mem)? {
                continue;
            }
            return Ok(TxProgress::Drained);
        };
        let head = chain.head_index();
        let gathered = gather_frame(mem, chain, &mut state.buf);
        queue.add_used(mem, head, 0)?;
        taken += 1;
        match gathered {
            Ok(len) => {
                if let Sent::Later = send(backend.as_deref_mut(), &state.buf[..len], warn) {
                    state.pending = Some(len);
                    return Ok(TxProgress::Blocked);
                }
            }
            Err(e) => warn.warn(format_args!("{e}; dropped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{guest_memory, FakeBackend, TestQueue};
    use super::*;
    use std::time::Duration;

    fn warn() -> WarnLimiter {
        WarnLimiter::new(Duration::from_secs(1))
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn a_chain_of_many_descriptors_is_one_frame() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let data = frame(12 + 1500);
        // The header split across two descriptors, the payload across three.
        let parts = [
            (0x10_0000, 5),
            (0x10_1000, 9),
            (0x10_2000, 400),
            (0x10_3000, 1),
            (0x10_4000, 1097),
        ];
        let mut off = 0;
        for &(addr, len) in &parts {
            tq.write(addr, &data[off..off + len as usize]);
            off += len as usize;
        }
        let descs: Vec<_> = parts.iter().map(|&(a, l)| (a, l, false)).collect();
        tq.add(&descs);
        let mut queue = tq.queue();
        let mut backend = FakeBackend::default();
        let mut state = TxState::new();
        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            64,
            &mut warn(),
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Drained);
        assert_eq!(backend.sent, vec![data]);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 0));
    }

    #[test]
    fn bad_chains_are_returned_empty_and_nothing_is_sent() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        // A writable descriptor after the header.
        tq.add(&[(0x10_0000, 12, false), (0x10_1000, 100, true)]);
        // Short of a header, and a header alone.
        tq.add(&[(0x10_2000, 8, false)]);
        tq.add(&[(0x10_2000, 12, false)]);
        // Longer than any frame: two descriptors of 40000 bytes.
        tq.add(&[(0x10_0000, 40_000, false), (0x12_0000, 40_000, false)]);
        // Past the end of guest memory.
        tq.add(&[(0x3f_fff0, 0x100, false)]);
        // A header and a descriptor with an absurd length: virtio-queue ends
        // the chain where its total passes 4 GiB, leaving a header alone.
        tq.add(&[(0x10_0000, 12, false), (0x10_1000, u32::MAX, false)]);
        let mut queue = tq.queue();
        let mut backend = FakeBackend::default();
        let mut state = TxState::new();
        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            64,
            &mut warn(),
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Drained);
        assert!(backend.sent.is_empty());
        assert_eq!(tq.used_idx(), 6);
        for i in 0..6 {
            assert_eq!(tq.used(i).1, 0);
        }
    }

    #[test]
    fn the_checks_name_the_reason() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 12, false), (0x10_1000, 100, true)]);
        tq.add(&[(0x10_2000, 8, false)]);
        tq.add(&[(0x10_0000, 40_000, false), (0x12_0000, 40_000, false)]);
        tq.add(&[(0x3f_fff0, 0x100, false)]);
        let mut queue = tq.queue();
        let mut buf = vec![0; MAX_FRAME_LEN];
        let mut next = || {
            let chain = queue.pop_descriptor_chain(&mem).unwrap();
            gather_frame(&mem, chain, &mut buf)
        };
        assert_eq!(next(), Err(TxChainError::Writable { head: 0 }));
        assert_eq!(next(), Err(TxChainError::Short { head: 2, len: 8 }));
        assert_eq!(
            next(),
            Err(TxChainError::TooLong {
                head: 3,
                len: 80_000
            })
        );
        assert_eq!(next(), Err(TxChainError::Unreadable { head: 5 }));
    }

    #[test]
    fn a_busy_backend_keeps_the_frame_and_stops_taking_chains() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.write(0x10_0000, &frame(60));
        tq.write(0x11_0000, &frame(70));
        tq.add(&[(0x10_0000, 60, false)]);
        tq.add(&[(0x11_0000, 70, false)]);
        let mut queue = tq.queue();
        let mut backend = FakeBackend {
            busy: 1,
            ..FakeBackend::default()
        };
        let mut state = TxState::new();
        let mut warn = warn();
        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            64,
            &mut warn,
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Blocked);
        assert!(state.is_blocked());
        // No kicks wanted while the backend is busy: it says when to go on.
        assert_eq!(tq.used_flags(), 1);
        // The first chain is already the guest's again; the second is untouched.
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(queue.next_avail(), 1);
        assert!(backend.sent.is_empty());

        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            64,
            &mut warn,
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Drained);
        assert_eq!(backend.sent, vec![frame(60), frame(70)]);
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(tq.used_flags(), 0);
    }

    #[test]
    fn without_a_backend_frames_are_taken_and_discarded() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 60, false)]);
        tq.add(&[(0x11_0000, 70, false)]);
        let mut queue = tq.queue();
        let mut state = TxState::new();
        let progress = process_tx(&mem, &mut queue, None, &mut state, 64, &mut warn()).unwrap();
        assert_eq!(progress, TxProgress::Drained);
        assert_eq!(tq.used_idx(), 2);
    }

    #[test]
    fn the_budget_bounds_one_call() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        for _ in 0..3 {
            tq.add(&[(0x10_0000, 60, false)]);
        }
        let mut queue = tq.queue();
        let mut backend = FakeBackend::default();
        let mut state = TxState::new();
        let mut warn = warn();
        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            2,
            &mut warn,
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Budget);
        assert_eq!(backend.sent.len(), 2);
        let progress = process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            2,
            &mut warn,
        )
        .unwrap();
        assert_eq!(progress, TxProgress::Drained);
        assert_eq!(backend.sent.len(), 3);
    }

    #[test]
    fn refused_frames_are_dropped_and_tx_goes_on() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 60, false)]);
        tq.add(&[(0x11_0000, 70, false)]);
        let mut queue = tq.queue();
        let mut backend = FakeBackend {
            refuse: 1,
            ..FakeBackend::default()
        };
        let mut state = TxState::new();
        process_tx(
            &mem,
            &mut queue,
            Some(&mut backend),
            &mut state,
            64,
            &mut warn(),
        )
        .unwrap();
        assert_eq!(backend.sent.len(), 1);
        assert_eq!(tq.used_idx(), 2);
        assert!(!state.is_blocked());
    }
}
