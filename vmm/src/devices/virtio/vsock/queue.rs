//! Walking the vsock queues: guest packets off TX, device packets into RX.
//! Plain functions over guest memory, a queue and the muxer, testable
//! without a VM.
//!
//! Any descriptor layout is accepted: the header may share a descriptor with
//! data, be split itself, and data may span many descriptors. The header is
//! copied out of guest memory before it is checked, so the guest cannot
//! change it between the check and the use.

use std::io::{Read, Write};
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{Header, Op, PacketError, HDR_LEN, MAX_PAYLOAD};
use crate::devices::virtio::suppression::driver_wants_interrupt;

/// Scratch space one packet's payload is copied through.
pub const SCRATCH_LEN: usize = MAX_PAYLOAD as usize;

/// A checked guest packet; `payload` is the RW data, empty for other ops.
struct GuestPacket<'s> {
    hdr: Header,
    op: Op,
    payload: &'s [u8],
}

/// A packet that failed its checks, with its header when one could be read.
struct Rejected {
    hdr: Option<Header>,
    error: PacketError,
}

/// Reads one packet out of a chain's readable part: the header, checked,
/// and for RW its payload copied into `scratch`.
fn read_packet<'s>(
    reader: &mut impl Read,
    available: usize,
    guest_cid: u64,
    scratch: &'s mut [u8],
) -> Result<GuestPacket<'s>, Rejected> {
    let short = || Rejected {
        hdr: None,
        error: PacketError::ShortHeader(available),
    };
    if available < HDR_LEN {
        return Err(short());
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(|_| short())?;
    let hdr = Header::from_le_bytes(&raw);
    let op = hdr
        .validate(guest_cid, available - HDR_LEN)
        .map_err(|error| Rejected {
            hdr: Some(hdr),
            error,
        })?;
    if op != Op::Rw {
        // Control packets carry no data we use.
        return Ok(GuestPacket {
            hdr,
            op,
            payload: &[],
        });
    }
    let payload = &mut scratch[..hdr.len as usize];
    reader.read_exact(payload).map_err(|_| Rejected {
        hdr: Some(hdr),
        error: PacketError::Truncated {
            len: hdr.len,
            available: available - HDR_LEN,
        },
    })?;
    Ok(GuestPacket { hdr, op, payload })
}

/// Takes every packet the guest queued on TX and hands it to the muxer.
/// Returns whether the driver must be interrupted.
pub fn process_tx(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    guest_cid: u64,
    scratch: &mut [u8],
) -> Result<bool, virtio_queue::Error> {
    let old_used = queue.next_used();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match chain.reader(mem) {
            Ok(mut reader) => {
                let available = reader.available_bytes();
                match read_packet(&mut reader, available, guest_cid, scratch) {
                    Ok(p) => muxer.on_guest_packet(&p.hdr, p.op, p.payload, Instant::now()),
                    Err(Rejected { hdr, error }) => {
                        tracing::debug!("vsock: guest packet dropped: {error}");
                        if let Some(hdr) = hdr.filter(|_| error.wants_rst()) {
                            muxer.reject(&hdr);
                        }
                    }
                }
            }
            Err(e) => tracing::debug!("vsock: unreadable TX chain dropped: {e}"),
        }
        queue.add_used(mem, head, 0)?;
    }
    driver_wants_interrupt(mem, queue, old_used)
}

/// Fills the guest's RX buffers with the muxer's packets, as long as both
/// last. Returns whether the driver must be interrupted.
pub fn process_rx(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    muxer: &mut Muxer,
    scratch: &mut [u8],
) -> Result<bool, virtio_queue::Error> {
    let old_used = queue.next_used();
    while muxer.has_pending_rx() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!("vsock: unwritable RX chain returned empty: {e}");
                queue.add_used(mem, head, 0)?;
                continue;
            }
        };
        let room = writer.available_bytes();
        if room <= HDR_LEN {
            // Too small for any packet with data; Linux never posts these.
            queue.add_used(mem, head, 0)?;
            continue;
        }
        let max = (room - HDR_LEN).min(scratch.len());
        let Some((hdr, len)) = muxer.next_rx(&mut scratch[..max], Instant::now()) else {
            // Nothing after all (a socket had no data): keep the buffer.
            queue.go_to_previous_position();
            break;
        };
        let written = writer
            .write_all(&hdr.to_le_bytes())
            .and_then(|()| writer.write_all(&scratch[..len]))
            .map(|()| (HDR_LEN + len) as u32)
            .unwrap_or(0);
        queue.add_used(mem, head, written)?;
    }
    driver_wants_interrupt(mem, queue, old_used)
}
