//! Filling the guest's entropy requests.

use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// Most bytes handed out per request: bounds the work one guest notification
/// can cause (Linux asks for at most 64 bytes at a time anyway).
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// Fills every available request on `queue` with bytes from `source`.
/// Returns whether the driver must be interrupted.
pub fn fill_requests(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    source: &mut impl Read,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        // A chain with readable parts or bad addresses gets an empty reply.
        let written = match chain.writer(mem) {
            Ok(mut writer) => {
                let want = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
                std::io::copy(&mut source.take(want as u64), &mut writer).unwrap_or(0) as u32
            }
            Err(_) => 0,
        };
        queue.add_used(mem, head, written)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    #[test]
    fn requests_are_filled_across_descriptors() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, WRITE, 0)),
            RawDescriptor::from(Descriptor::new(0x11_0000, 8, WRITE, 0)),
        ];
        vq.build_desc_chain(&descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut source = std::io::repeat(0xab);
        fill_requests(&mem, &mut queue, &mut source).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_000f)).unwrap(), 0xab);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11_0007)).unwrap(), 0xab);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11_0008)).unwrap(), 0);
        let used_len = mem
            .read_obj::<u32>(vq.used_addr().unchecked_add(8))
            .unwrap();
        assert_eq!(used_len, 24);
    }

    #[test]
    fn buffers_outside_memory_get_an_empty_reply() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(Descriptor::new(
            0x1f_fff0, 0x100, WRITE, 0,
        ))];
        vq.build_desc_chain(&descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        fill_requests(&mem, &mut queue, &mut std::io::repeat(1)).unwrap();
        let used_len = mem
            .read_obj::<u32>(vq.used_addr().unchecked_add(8))
            .unwrap();
        assert!(used_len <= 0x10, "wrote {used_len} bytes past guest memory");
    }
}
