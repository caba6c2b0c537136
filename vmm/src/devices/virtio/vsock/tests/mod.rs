//! Whole-device tests without a VM: a simulated guest driver posts chains on
//! `MockSplitQueue`s, the host side uses real Unix sockets in a temp dir.
//! This module is the simulated guest; `scenarios` plays protocol stories
//! through it, `fuzz` throws random chains at the queue code.

mod fuzz;
mod scenarios;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EpollEvent;

use super::connection::{CONNECT_TIMEOUT, TX_BUF_SIZE};
use super::muxer::Muxer;
use super::packet::{
    Header, Op, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::queue::{process_rx, process_tx, SCRATCH_LEN};

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 0x40_0000;
const QSIZE: u16 = 256;
const TXQ_ADDR: u64 = 0;
const RXQ_ADDR: u64 = 0x1_0000;
const TX_AREA: u64 = 0x10_0000;
const RX_AREA: u64 = 0x20_0000;
const RX_SLOTS: u64 = 32;
const RX_SLOT_SIZE: u64 = 0x1_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where a queue's parts are. The mock zeroes the rings each time one is
/// created, so it is made once and these addresses are kept.
#[derive(Clone, Copy)]
struct Ring {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

impl Ring {
    /// Lays out a queue at `start` and returns it, ready, with its addresses.
    /// The used ring is moved to its own page: the mock places it right
    /// after half of the avail ring, so that past 128 entries they overlap.
    fn create(mem: &GuestMemoryMmap, start: u64) -> (Queue, Ring) {
        let vq = MockSplitQueue::create(mem, GuestAddress(start), QSIZE);
        let used = GuestAddress(start + 0x2000);
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        mem.write_slice(&[0u8; 0x1000], used).unwrap();
        let ring = Ring {
            desc: vq.desc_table_addr(),
            avail: vq.avail_addr(),
            used,
        };
        (q, ring)
    }
}

/// Stores `raw` at descriptor index `at` and makes `at` available.
fn add_raw_chain(mem: &GuestMemoryMmap, ring: Ring, at: u16, raw: &[RawDescriptor]) {
    for (i, d) in raw.iter().enumerate() {
        let slot = u64::from((at + i as u16) % QSIZE);
        mem.write_obj(*d, ring.desc.unchecked_add(16 * slot))
            .unwrap();
    }
    let idx: u16 = mem.read_obj(ring.avail.unchecked_add(2)).unwrap();
    mem.write_obj(at, ring.avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
        .unwrap();
    mem.write_obj(idx.wrapping_add(1), ring.avail.unchecked_add(2))
        .unwrap();
}

/// Writes `descs` (addr, len, flags; NEXT and next filled in) as one chain at
/// descriptor index `at` and makes it available.
fn add_chain(mem: &GuestMemoryMmap, ring: Ring, at: u16, descs: &[(u64, u32, u16)]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags & !F_NEXT
            } else {
                flags | F_NEXT
            };
            RawDescriptor::from(Descriptor::new(addr, len, flags, at + i as u16 + 1))
        })
        .collect();
    add_raw_chain(mem, ring, at, &raw);
}

fn used_idx(mem: &GuestMemoryMmap, ring: Ring) -> u16 {
    mem.read_obj::<u16>(ring.used.unchecked_add(2)).unwrap()
}

fn used_elem(mem: &GuestMemoryMmap, ring: Ring, i: u16) -> (u32, u32) {
    let at = ring.used.unchecked_add(4 + 8 * u64::from(i % QSIZE));
    (
        mem.read_obj::<u32>(at).unwrap(),
        mem.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
    )
}

/// How a packet is laid out over TX descriptors.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Header and data in one descriptor.
    Single,
    /// Header in one descriptor, data in the next (the classic layout).
    HeaderThenData,
    /// The header itself split at `.0`, data in pieces of `.1` bytes.
    Split(usize, usize),
}

/// A simulated guest driver and the device's host side.
struct Guest {
    mem: GuestMemoryMmap,
    txq: Queue,
    rxq: Queue,
    tx_ring: Ring,
    rx_ring: Ring,
    muxer: Muxer,
    scratch: Vec<u8>,
    rx_next_desc: u16,
    rx_chains: u64,
    rx_used_seen: u16,
    rx_posted: HashMap<u16, Vec<(u64, u32)>>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    fn new() -> Guest {
        Guest::with_rx_buffers(8)
    }

    /// A guest that posted `n` RX buffers of a header plus 4 KiB.
    fn with_rx_buffers(n: usize) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let muxer = Muxer::new(GUEST_CID, listener, path.clone()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (txq, tx_ring) = Ring::create(&mem, TXQ_ADDR);
        let (rxq, rx_ring) = Ring::create(&mem, RXQ_ADDR);
        let mut g = Guest {
            mem,
            txq,
            rxq,
            tx_ring,
            rx_ring,
            muxer,
            scratch: vec![0; SCRATCH_LEN],
            rx_next_desc: 0,
            rx_chains: 0,
            rx_used_seen: 0,
            rx_posted: HashMap::new(),
            path,
            _dir: dir,
        };
        for _ in 0..n {
            g.post_rx(&[4096 + HDR_LEN as u32]);
        }
        g
    }

    /// Posts one RX chain whose descriptors have the given lengths.
    fn post_rx(&mut self, lens: &[u32]) {
        let n = lens.len() as u16;
        if self.rx_next_desc + n > QSIZE {
            self.rx_next_desc = 0;
        }
        let mut addr = RX_AREA + (self.rx_chains % RX_SLOTS) * RX_SLOT_SIZE;
        self.rx_chains += 1;
        let mut descs = Vec::new();
        for &len in lens {
            descs.push((addr, len, F_WRITE));
            addr += u64::from(len);
        }
        let at = self.rx_next_desc;
        add_chain(&self.mem, self.rx_ring, at, &descs);
        self.rx_posted
            .insert(at, descs.iter().map(|&(a, l, _)| (a, l)).collect());
        self.rx_next_desc += n;
    }

    /// Sends one packet with the given descriptor layout.
    fn send_with(&mut self, hdr: Header, payload: &[u8], layout: Layout) {
        let mut bytes = hdr.to_le_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.mem.write_slice(&bytes, GuestAddress(TX_AREA)).unwrap();
        let cuts: Vec<usize> = match layout {
            Layout::Single => vec![bytes.len()],
            Layout::HeaderThenData => vec![HDR_LEN, bytes.len()],
            Layout::Split(h, piece) => {
                let mut v = vec![h];
                let mut at = HDR_LEN;
                while at < bytes.len() {
                    at = (at + piece).min(bytes.len());
                    v.push(at);
                }
                if *v.last().unwrap() != bytes.len() {
                    v.push(bytes.len());
                }
                v
            }
        };
        let mut start = 0;
        let mut descs = Vec::new();
        for end in cuts {
            // Descriptors are spread out so adjacency cannot hide a bug.
            let addr = TX_AREA + 0x8_0000 + descs.len() as u64 * 0x1_0000;
            let piece = &bytes[start..end];
            self.mem.write_slice(piece, GuestAddress(addr)).unwrap();
            descs.push((addr, piece.len() as u32, 0));
            start = end;
        }
        add_chain(&self.mem, self.tx_ring, 0, &descs);
        process_tx(
            &self.mem,
            &mut self.txq,
            &mut self.muxer,
            GUEST_CID,
            &mut self.scratch,
        )
        .unwrap();
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.send_with(hdr, payload, Layout::HeaderThenData);
    }

    /// Fills RX and returns the packets the device put there, refilling
    /// each consumed buffer like Linux does.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        process_rx(&self.mem, &mut self.rxq, &mut self.muxer, &mut self.scratch).unwrap();
        let mut out = Vec::new();
        let end = used_idx(&self.mem, self.rx_ring);
        while self.rx_used_seen != end {
            let (id, len) = used_elem(&self.mem, self.rx_ring, self.rx_used_seen);
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let segs = self
                .rx_posted
                .remove(&(id as u16))
                .unwrap_or_else(|| panic!("used id {id} (len {len}) was never posted"));
            let mut bytes = Vec::new();
            for &(addr, l) in &segs {
                let mut b = vec![0u8; l as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                bytes.extend(b);
            }
            assert!(len as usize <= bytes.len());
            bytes.truncate(len as usize);
            let lens: Vec<u32> = segs.iter().map(|s| s.1).collect();
            self.post_rx(&lens);
            if bytes.len() < HDR_LEN {
                continue;
            }
            let hdr = Header::from_le_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Runs host events for up to `ms` and returns what reached the guest.
    fn pump(&mut self, ms: i32) -> Vec<(Header, Vec<u8>)> {
        let mut events = [EpollEvent::default(); 16];
        let n = self.muxer.epoll().wait(ms, &mut events).unwrap();
        for ev in &events[..n] {
            self.muxer
                .handle_event(ev.data(), ev.event_set(), Instant::now());
        }
        self.muxer.handle_timeouts(Instant::now());
        self.recv()
    }

    /// Pumps until a packet matching `f` arrives; returns everything seen.
    fn wait_for(&mut self, f: impl Fn(&Header) -> bool) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let got = self.pump(50);
            let done = got.iter().any(|(h, _)| f(h));
            seen.extend(got);
            if done {
                return seen;
            }
        }
        panic!("timed out; saw {seen:?}");
    }
}

fn guest_hdr(op: Op, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc: 256 << 10,
        fwd_cnt: 0,
    }
}

fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> Header {
    Header {
        len: data.len() as u32,
        ..guest_hdr(Op::Rw, src_port, dst_port)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn client(g: &Guest) -> UnixStream {
    let s = UnixStream::connect(&g.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn data_of(pkts: &[(Header, Vec<u8>)]) -> Vec<u8> {
    pkts.iter()
        .filter(|(h, _)| h.op == Op::Rw as u16)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

/// Host CONNECT, guest RESPONSE; returns the client and the host port.
fn host_connect(g: &mut Guest, guest_port: u32) -> (UnixStream, u32) {
    let mut c = client(g);
    c.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Request as u16);
    let req = pkts.last().unwrap().0;
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, guest_port);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, TX_BUF_SIZE);
    g.send(guest_hdr(Op::Response, guest_port, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    (c, req.src_port)
}
