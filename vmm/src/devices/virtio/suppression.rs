//! Whether the driver wants an interrupt for the used buffers a device just
//! published: the two suppression mechanisms of a split queue (virtio 1.2,
//! 2.7.7 and 2.7.10).
//!
//! `virtio_queue::Queue::needs_notification` honours `used_event` but ignores
//! `VRING_AVAIL_F_NO_INTERRUPT`, so without EVENT_IDX every published buffer
//! costs the guest an interrupt even while its driver polls the ring with
//! callbacks off (Linux's NAPI does exactly that). It also counts buffers by
//! `add_used` calls, which the net device's RX path bypasses to publish a
//! merged frame in one store. So the decision is made here from the used
//! index before and after, which every device knows.
//!
//! Both hints are racy by design; the driver re-checks the ring after turning
//! callbacks back on, so an interrupt skipped here is never a lost one.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Feature bit: `used_event` and `avail_event` replace the ring flags.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// `flags` of the available ring: the driver polls and wants no interrupt.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Whether to interrupt the driver now that `queue`'s used index has moved
/// from `old_used` to `queue.next_used()` (false if it has not moved).
pub fn driver_wants_interrupt(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    old_used: u16,
) -> Result<bool, virtio_queue::Error> {
    let new_used = queue.next_used();
    if new_used == old_used {
        return Ok(false);
    }
    // The used index must be visible before the driver's hint is read, or
    // a driver turning callbacks on meanwhile could miss both.
    fence(Ordering::SeqCst);
    let avail = GuestAddress(queue.avail_ring());
    if queue.event_idx_enabled() {
        // used_event follows the ring's flags, idx and `size` entries.
        let at = avail
            .checked_add(4 + 2 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let used_event = u16::from_le(
            mem.load(at, Ordering::Relaxed)
                .map_err(virtio_queue::Error::GuestMemory)?,
        );
        Ok(need_event(used_event, new_used, old_used))
    } else {
        let flags = u16::from_le(
            mem.load(avail, Ordering::Relaxed)
                .map_err(virtio_queue::Error::GuestMemory)?,
        );
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

/// Asks the driver to notify once it adds a buffer after those in the
/// available ring now, and returns the ring's index as it was then.
///
/// Unlike `Queue::enable_notification`, which asks for the buffer after the
/// last one the device took, this suits a device that looked at the buffers
/// there and put them back as too few: with EVENT_IDX, an `avail_event` the
/// driver has already passed would never be notified for again. The caller
/// must check the index again afterwards (buffers added meanwhile were not
/// notified for).
pub fn notify_on_next_buffer(
    mem: &GuestMemoryMmap,
    queue: &Queue,
) -> Result<u16, virtio_queue::Error> {
    let seen = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let used = GuestAddress(queue.used_ring());
    if queue.event_idx_enabled() {
        // avail_event follows the used ring's flags, idx and `size` entries.
        let at = used
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        mem.store(seen.to_le(), at, Ordering::Relaxed)
    } else {
        mem.store(0u16, used, Ordering::Relaxed)
    }
    .map_err(virtio_queue::Error::GuestMemory)?;
    // The request must be visible before the caller looks at the index again.
    fence(Ordering::SeqCst);
    Ok(seen)
}

/// Whether moving an index from `old` to `new` passed `event`, the index
/// after which the other side asked to hear (the ring's `vring_need_event`).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x1000;

    fn setup(event_idx: bool) -> (GuestMemoryMmap, Queue) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_event_idx(event_idx);
        (mem, q)
    }

    fn set_flags(mem: &GuestMemoryMmap, flags: u16) {
        mem.write_obj(flags.to_le(), GuestAddress(AVAIL)).unwrap();
    }

    fn set_used_event(mem: &GuestMemoryMmap, event: u16) {
        let at = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        mem.write_obj(event.to_le(), at).unwrap();
    }

    #[test]
    fn nothing_published_is_no_interrupt() {
        let (mem, mut q) = setup(false);
        q.set_next_used(5);
        assert!(!driver_wants_interrupt(&mem, &q, 5).unwrap());
    }

    #[test]
    fn without_event_idx_the_flag_decides() {
        let (mem, mut q) = setup(false);
        q.set_next_used(3);
        assert!(driver_wants_interrupt(&mem, &q, 1).unwrap());
        set_flags(&mem, VRING_AVAIL_F_NO_INTERRUPT);
        assert!(!driver_wants_interrupt(&mem, &q, 1).unwrap());
        // The used_event field means nothing then.
        set_flags(&mem, 0);
        set_used_event(&mem, 100);
        assert!(driver_wants_interrupt(&mem, &q, 1).unwrap());
    }

    #[test]
    fn with_event_idx_used_event_decides() {
        let (mem, mut q) = setup(true);
        // The flag means nothing then.
        set_flags(&mem, VRING_AVAIL_F_NO_INTERRUPT);
        set_used_event(&mem, 4);
        q.set_next_used(4);
        // 2..4 does not pass entry 4 (the driver wants to hear once 5 is used).
        assert!(!driver_wants_interrupt(&mem, &q, 2).unwrap());
        q.set_next_used(5);
        assert!(driver_wants_interrupt(&mem, &q, 2).unwrap());
        assert!(driver_wants_interrupt(&mem, &q, 4).unwrap());
        // Already past it before this batch: the driver was told then.
        q.set_next_used(9);
        assert!(!driver_wants_interrupt(&mem, &q, 6).unwrap());
    }

    #[test]
    fn the_next_buffer_is_the_one_after_those_there_now() {
        const USED: u64 = 0x2000;
        for event_idx in [false, true] {
            let (mem, mut q) = setup(event_idx);
            q.set_used_ring_address(Some(USED as u32), Some(0));
            mem.write_obj(7u16.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
            mem.write_obj(1u16.to_le(), GuestAddress(USED)).unwrap(); // NO_NOTIFY
                                                                      // The device took 3 and put them back: it must not ask for 3.
            q.set_next_avail(3);
            assert_eq!(notify_on_next_buffer(&mem, &q).unwrap(), 7);
            let flags: u16 = mem.read_obj(GuestAddress(USED)).unwrap();
            let avail_event: u16 = mem
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
                .unwrap();
            if event_idx {
                assert_eq!(avail_event, 7);
            } else {
                assert_eq!(flags, 0);
            }
        }
    }

    #[test]
    fn indices_wrap() {
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(need_event(0, 1, u16::MAX));
        assert!(!need_event(2, 1, u16::MAX));
        assert!(!need_event(u16::MAX - 3, 1, u16::MAX));
    }

    #[test]
    fn a_ring_at_the_top_of_the_address_space_is_an_error() {
        let (mem, mut q) = setup(true);
        q.set_avail_ring_address(Some(u32::MAX - 1), Some(u32::MAX));
        q.set_next_used(1);
        assert!(driver_wants_interrupt(&mem, &q, 0).is_err());
    }
}
