//! Walking the RX queue: one frame from the backend (header first) into one
//! or, with VIRTIO_NET_F_MRG_RXBUF, several of the guest's buffers. Plain
//! functions over guest memory and a queue, testable without a VM.
//!
//! A frame is placed only once enough buffers are there for all of it: the
//! chains are looked at first, and if they are too few they are put back
//! (the queue's next position moved back) and the frame waits for the guest
//! to post more. So the device never holds a chain between calls, and the
//! used ring is always where a snapshot expects it.
//!
//! The chains of one merged frame become visible to the driver together:
//! Linux reads `num_buffers` from the first and takes the others from the
//! used ring at once, dropping the frame if they are not all there yet.

use std::io::Write;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueT, Writer};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::ratelimit::WarnLimiter;
use super::NET_HDR_LEN;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Offset of `flags` in `virtio_net_hdr_v1`.
const FLAGS_OFFSET: usize = 0;

/// What [`deliver_frame`] did with the frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Written into this many chains, now in the used ring.
    Delivered(u16),
    /// Not enough buffers yet: the frame must wait for the guest to post more.
    NoBuffers,
    /// The frame can never fit; it is dropped (the chains stay available).
    Dropped,
}

/// Fixes the header the backend wrote for what the guest accepted: without
/// VIRTIO_NET_F_GUEST_CSUM the device must set `flags` to zero (virtio 1.2,
/// 5.1.6.4.1), yet a tap marks checksummed frames DATA_VALID regardless.
pub fn fix_header(frame: &mut [u8], guest_csum: bool) {
    if !guest_csum {
        if let Some(flags) = frame.get_mut(FLAGS_OFFSET) {
            *flags = 0;
        }
    }
}

/// A writer over a RX chain, or `None` for a chain that cannot take a frame:
/// one with a device-readable part, outside guest memory, or smaller than the
/// header (which the spec requires of every receive buffer).
fn rx_writer<'m>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
) -> Option<Writer<'m>> {
    if chain.clone().any(|d| !d.is_write_only()) {
        return None;
    }
    let writer = chain.writer(mem).ok()?;
    (writer.available_bytes() >= NET_HDR_LEN).then_some(writer)
}

/// Writes `frame` (header included) into the guest's RX buffers and returns
/// them. Without `mergeable` the frame must fit one chain; with it, it takes
/// as many as needed and `num_buffers` says how many.
pub fn deliver_frame(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    frame: &mut [u8],
    mergeable: bool,
    warn: &mut WarnLimiter,
) -> Result<Delivery, virtio_queue::Error> {
    let len = frame.len();
    if len < NET_HDR_LEN {
        warn.warn(format_args!(
            "RX frame of {len} bytes has no header; dropped"
        ));
        return Ok(Delivery::Dropped);
    }
    // The guest can never have more chains out than the queue size: a frame
    // that does not fit in that many can never be delivered.
    let max_chains = if mergeable {
        usize::from(queue.size())
    } else {
        1
    };
    // Bounds the work when a guest keeps posting broken chains.
    let mut pops_left = 2 * usize::from(queue.size());
    let mut start = queue.next_avail();
    let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
    let mut room = 0usize;
    while room < len {
        if chains.len() == max_chains {
            queue.set_next_avail(start);
            warn.warn(format_args!(
                "RX frame of {len} bytes does not fit in {max_chains} buffer(s) of {room} bytes; \
                 dropped"
            ));
            return Ok(Delivery::Dropped);
        }
        if pops_left == 0 {
            queue.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        }
        pops_left -= 1;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        match rx_writer(mem, chain) {
            Some(writer) => {
                room += writer.available_bytes();
                chains.push((head, writer));
            }
            None => {
                // Putting the good chains back would put this one back too;
                // return them all, empty and in order, and start afresh
                // after it. Linux drops empty buffers as runt frames.
                warn.warn(format_args!("RX chain {head} is unusable; returned empty"));
                for (h, _) in chains.drain(..) {
                    queue.add_used(mem, h, 0)?;
                }
                queue.add_used(mem, head, 0)?;
                room = 0;
                start = queue.next_avail();
            }
        }
    }
    // At most the queue size (a u16) of chains.
    let count = chains.len() as u16;
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&count.to_le_bytes());
    let mut offset = 0;
    let mut used = Vec::with_capacity(chains.len());
    for (head, mut writer) in chains {
        let take = (len - offset).min(writer.available_bytes());
        // The writer's slices were checked against guest memory; writing
        // into them cannot fail, and if it did the guest would get only
        // what was written.
        let written = match writer.write_all(&frame[offset..offset + take]) {
            Ok(()) => take,
            Err(_) => writer.bytes_written(),
        };
        offset += take;
        // At most the frame's length, well below 4 GiB.
        used.push((head, written as u32));
    }
    publish_used(mem, queue, &used)?;
    Ok(Delivery::Delivered(count))
}

/// Writes `entries` (head, length) into the used ring and then moves its
/// index past all of them in one store, so the driver sees all or none.
/// (`Queue::add_used` moves the index once per entry.)
///
/// This bypasses the count `Queue::needs_notification` keeps for
/// VIRTIO_RING_F_EVENT_IDX, so the worker decides on interrupts with
/// [`crate::devices::virtio::suppression`] instead.
fn publish_used(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let start = queue.next_used();
    for (i, &(head, len)) in (0u16..).zip(entries) {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(start.wrapping_add(i) % size);
        // flags and idx (4 bytes), then 8-byte elements: id, len.
        let at = ring
            .checked_add(4 + 8 * slot)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, at)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // Entries are at most the queue size, a u16.
    let next = start.wrapping_add(entries.len() as u16);
    let idx = ring
        .checked_add(2)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    // Release: the elements are visible before the index that covers them.
    mem.store(next.to_le(), idx, Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)?;
    queue.set_next_used(next);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{guest_memory, TestQueue};
    use super::*;
    use std::time::Duration;

    fn warn() -> WarnLimiter {
        WarnLimiter::new(Duration::from_secs(1))
    }

    /// A frame whose header says nothing (no offload) and whose bytes are
    /// recognisable.
    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
        f[..NET_HDR_LEN].fill(0);
        f
    }

    fn num_buffers(tq: &TestQueue<'_>, addr: u64) -> u16 {
        let b = tq.read(addr + NUM_BUFFERS_OFFSET as u64, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    #[test]
    fn a_frame_fills_one_chain() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 12, true), (0x10_1000, 1514, true)]);
        let mut queue = tq.queue();
        let mut f = frame(12 + 100);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, false, &mut warn()).unwrap();
        assert_eq!(delivery, Delivery::Delivered(1));
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 112));
        assert_eq!(num_buffers(&tq, 0x10_0000), 1);
        assert_eq!(tq.read(0x10_1000, 100), f[12..]);
        // Nothing past the frame.
        assert_eq!(tq.read(0x10_1000 + 100, 1), [0]);
    }

    #[test]
    fn a_large_frame_spreads_over_merged_buffers() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        for i in 0..4u64 {
            tq.add(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        let mut queue = tq.queue();
        let mut f = frame(5000);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn()).unwrap();
        assert_eq!(delivery, Delivery::Delivered(3));
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(tq.used(0), (0, 2048));
        assert_eq!(tq.used(1), (1, 2048));
        assert_eq!(tq.used(2), (2, 5000 - 4096));
        assert_eq!(num_buffers(&tq, 0x10_0000), 3);
        assert_eq!(tq.read(0x10_0000 + 12, 2036), f[12..2048]);
        assert_eq!(tq.read(0x10_1000, 2048), f[2048..4096]);
        assert_eq!(tq.read(0x10_2000, 904), f[4096..]);
        // The fourth buffer is still the device's, for the next frame.
        assert_eq!(queue.next_avail(), 3);
    }

    #[test]
    fn a_frame_waits_for_buffers_and_is_delivered_once_they_come() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue();
        let mut f = frame(3000);
        let mut warn = warn();
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::NoBuffers);
        // One buffer is not enough: it is looked at and put back.
        tq.add(&[(0x10_0000, 2048, true)]);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::NoBuffers);
        assert_eq!((queue.next_avail(), tq.used_idx()), (0, 0));
        tq.add(&[(0x10_1000, 2048, true)]);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::Delivered(2));
        assert_eq!(tq.used(0), (0, 2048));
        assert_eq!(tq.used(1), (1, 3000 - 2048));
        assert_eq!(tq.read(0x10_1000, 952), f[2048..]);
    }

    #[test]
    fn without_merged_buffers_one_chain_must_hold_the_frame() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 1526, true)]);
        let mut queue = tq.queue();
        let mut warn = warn();
        let mut big = frame(3000);
        let delivery = deliver_frame(&mem, &mut queue, &mut big, false, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::Dropped);
        // The buffer is kept for a frame that fits.
        assert_eq!((queue.next_avail(), tq.used_idx()), (0, 0));
        let mut small = frame(600);
        let delivery = deliver_frame(&mem, &mut queue, &mut small, false, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::Delivered(1));
        assert_eq!(tq.used(0), (0, 600));
    }

    #[test]
    fn a_frame_larger_than_the_whole_queue_is_dropped() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 4);
        for i in 0..4u64 {
            tq.add(&[(0x10_0000 + i * 0x1000, 64, true)]);
        }
        let mut queue = tq.queue();
        let mut f = frame(1000);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn()).unwrap();
        assert_eq!(delivery, Delivery::Dropped);
        assert_eq!((queue.next_avail(), tq.used_idx()), (0, 0));
    }

    #[test]
    fn buffers_outside_guest_memory_are_returned_empty() {
        let mem = guest_memory();
        let end = 0x40_0000u64;
        let mut tq = TestQueue::new(&mem, 0, 16);
        // Straddles the end of guest memory.
        tq.add(&[(end - 0x10, 0x1000, true)]);
        // Wholly outside it.
        tq.add(&[(0x1_0000_0000, 0x1000, true)]);
        // A device-readable part, and one too small for the header.
        tq.add(&[(0x10_0000, 100, false), (0x10_1000, 2048, true)]);
        tq.add(&[(0x10_2000, 8, true)]);
        tq.add(&[(0x11_0000, 2048, true)]);
        let mut queue = tq.queue();
        let mut f = frame(500);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn()).unwrap();
        assert_eq!(delivery, Delivery::Delivered(1));
        assert_eq!(tq.used_idx(), 5);
        for i in 0..4 {
            assert_eq!(tq.used(i).1, 0, "used entry {i}");
        }
        assert_eq!(tq.used(4).1, 500);
        // The last 16 bytes of memory were not touched.
        assert_eq!(tq.read(end - 0x10, 0x10), [0; 0x10]);
        assert_eq!(tq.read(0x10_1000, 4), [0; 4]);
    }

    #[test]
    fn a_broken_chain_amid_a_frame_returns_the_ones_before_it() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add(&[(0x10_0000, 2048, true)]);
        tq.add(&[(0x1_0000_0000, 2048, true)]);
        tq.add(&[(0x11_0000, 2048, true)]);
        let mut queue = tq.queue();
        let mut f = frame(3000);
        let mut warn = warn();
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::NoBuffers);
        assert_eq!((tq.used(0), tq.used(1)), ((0, 0), (1, 0)));
        // The third chain was looked at and put back.
        assert_eq!(queue.next_avail(), 2);
        tq.add(&[(0x12_0000, 2048, true)]);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::Delivered(2));
        assert_eq!(tq.used(2), (2, 2048));
        assert_eq!(tq.used(3), (3, 3000 - 2048));
    }

    #[test]
    fn merged_entries_wrap_around_the_used_ring() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 4);
        let mut queue = tq.queue();
        let mut warn = warn();
        // Three single-chain frames move the ring to position 3.
        for i in 0..3u64 {
            tq.add(&[(0x10_0000 + i * 0x1000, 2048, true)]);
            let mut f = frame(100);
            let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
            assert_eq!(delivery, Delivery::Delivered(1));
        }
        tq.add(&[(0x11_0000, 2048, true)]);
        tq.add(&[(0x12_0000, 2048, true)]);
        let mut f = frame(3000);
        let delivery = deliver_frame(&mem, &mut queue, &mut f, true, &mut warn).unwrap();
        assert_eq!(delivery, Delivery::Delivered(2));
        assert_eq!(tq.used_idx(), 5);
        assert_eq!(queue.next_used(), 5);
        let (h3, h4) = (tq.used(3), tq.used(4));
        assert_eq!((h3.1, h4.1), (2048, 3000 - 2048));
        assert_eq!(num_buffers(&tq, 0x11_0000), 2);
    }

    #[test]
    fn checksum_flags_are_cleared_unless_the_guest_takes_them() {
        let mut f = frame(64);
        f[FLAGS_OFFSET] = 2; // VIRTIO_NET_HDR_F_DATA_VALID
        fix_header(&mut f, true);
        assert_eq!(f[FLAGS_OFFSET], 2);
        fix_header(&mut f, false);
        assert_eq!(f[FLAGS_OFFSET], 0);
    }
}
