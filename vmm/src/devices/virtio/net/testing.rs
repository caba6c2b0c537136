//! Test helpers: guest memory, a driver's side of a queue, and backends.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::backend::Backend;

/// 4 MiB of guest memory: queues low, buffers from 1 MiB.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

const NEXT: u16 = 1; // VRING_DESC_F_NEXT
const WRITE: u16 = 2; // VRING_DESC_F_WRITE

/// The driver's side of one split queue: posts chains, reads the used ring.
/// (virtio-queue's MockSplitQueue lays the used ring over the end of the
/// available ring, so the layout is computed here.)
pub struct TestQueue<'m> {
    mem: &'m GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'m> TestQueue<'m> {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(mem: &'m GuestMemoryMmap, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        // flags, idx, ring, used_event; then aligned to 4.
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            mem,
            desc: base,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's side, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let (desc, avail, used) = self.addresses();
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Posts a chain of `(address, length, device-writable)` descriptors;
    /// returns its head.
    pub fn add(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = i + 1 == descs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let desc = Descriptor::new(addr, len, flags, self.next_desc);
            self.mem
                .write_obj(desc, GuestAddress(self.desc + 16 * u64::from(index)))
                .unwrap();
        }
        let slot = 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Where the driver put the rings: descriptor table, available, used.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used entry `i`: the chain's head and the length the device wrote.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY is bit 0).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }

    /// The available ring's flags (VRING_AVAIL_F_NO_INTERRUPT is bit 0).
    pub fn set_avail_flags(&self, flags: u16) {
        self.mem.write_obj(flags, GuestAddress(self.avail)).unwrap();
    }

    /// With EVENT_IDX: interrupt once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    /// With EVENT_IDX: the available index after which the device wants a
    /// notification.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// An in-memory backend: frames to read, frames sent, and injected refusals.
pub struct FakeBackend {
    /// Frames `read_frame` hands out, in order.
    pub incoming: VecDeque<Vec<u8>>,
    /// Frames written.
    pub sent: Vec<Vec<u8>>,
    /// This many writes fail with `WouldBlock` first.
    pub busy: usize,
    /// Then this many fail for good.
    pub refuse: usize,
    /// The last offloads set.
    pub offloads: Option<libc::c_uint>,
    /// Some descriptor to satisfy [`AsFd`] (never polled).
    pub fd: File,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend {
            incoming: VecDeque::new(),
            sent: Vec::new(),
            busy: 0,
            refuse: 0,
            offloads: None,
            fd: File::open("/dev/null").unwrap(),
        }
    }
}

impl AsFd for FakeBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Backend for FakeBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.busy > 0 {
            self.busy -= 1;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.refuse > 0 {
            self.refuse -= 1;
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.sent.push(frame.to_vec());
        Ok(())
    }

    fn set_guest_offloads(&mut self, tun_flags: libc::c_uint) -> io::Result<()> {
        self.offloads = Some(tun_flags);
        Ok(())
    }
}

/// One end of a SOCK_SEQPACKET pair: message boundaries like a tap's
/// frames, and a real descriptor for the worker's epoll. Counts reads and
/// keeps the offloads, for the test to look at from outside the worker.
pub struct SeqpacketBackend {
    sock: File,
    /// How many times the worker called `read_frame`.
    pub reads: Arc<AtomicUsize>,
    /// The last offloads the device set.
    pub offloads: Arc<Mutex<Option<libc::c_uint>>>,
}

/// A backend for the device and the other end, both non-blocking, for the
/// test to play the host network.
pub fn seqpacket_pair() -> (SeqpacketBackend, File) {
    let (a, b): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let backend = SeqpacketBackend {
        sock: File::from(a),
        reads: Arc::default(),
        offloads: Arc::default(),
    };
    (backend, File::from(b))
}

impl AsFd for SeqpacketBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl Backend for SeqpacketBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.sock.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.write(frame).map(drop)
    }

    fn set_guest_offloads(&mut self, tun_flags: libc::c_uint) -> io::Result<()> {
        *self.offloads.lock().unwrap() = Some(tun_flags);
        Ok(())
    }
}

/// Polls `done` for up to 5 s (the worker runs on its own thread).
pub fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done()
}
