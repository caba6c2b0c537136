//! The device as a whole, without a VM: activated by hand or through the
//! MMIO transport, its worker thread moving frames between queues in guest
//! memory and a socket pair that plays the tap.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::features::{self, OFFERED, VIRTIO_NET_F_MRG_RXBUF};
use super::testing::{guest_memory, seqpacket_pair, wait_until, SeqpacketBackend, TestQueue};
use super::{MacAddr, Net, NET_HDR_LEN};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::suppression::VIRTIO_RING_F_EVENT_IDX;
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice};

const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;

fn mac() -> MacAddr {
    "02:00:00:00:00:2a".parse().unwrap()
}

/// A frame with a zeroed header and recognisable bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f[..NET_HDR_LEN].fill(0);
    f
}

/// An active device: the queues' driver sides, kick eventfds, the irqfd.
struct Running<'m> {
    net: Net,
    rx: TestQueue<'m>,
    tx: TestQueue<'m>,
    kick: [EventFd; 2],
    irq: Arc<Interrupt>,
    irqfd: EventFd,
}

fn activate(mem: &GuestMemoryMmap, backend: Option<SeqpacketBackend>, acked: u64) -> Running<'_> {
    let rx = TestQueue::new(mem, RX_BASE, QUEUE_SIZE);
    let tx = TestQueue::new(mem, TX_BASE, QUEUE_SIZE);
    let kick = [
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ];
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
    let mut net = Net::new(mac(), backend.map(|b| Box::new(b) as _));
    net.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![rx.queue(), tx.queue()],
        queue_events: kick.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: Arc::clone(&irq),
        acked_features: acked,
    })
    .unwrap();
    Running {
        net,
        rx,
        tx,
        kick,
        irq,
        irqfd,
    }
}

fn recv(peer: &mut File) -> Option<Vec<u8>> {
    let mut buf = vec![0; 70_000];
    let mut got = None;
    wait_until(|| match peer.read(&mut buf) {
        Ok(n) => {
            got = Some(buf[..n].to_vec());
            true
        }
        Err(_) => false,
    });
    got
}

/// CPU time the device's worker thread has used so far.
fn worker_cpu_time(net: &Net) -> Duration {
    let handle = net.worker_thread().unwrap();
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is alive (the device holds its handle, and it only
    // ends when killed); the call writes one clockid_t to a local.
    let r = unsafe { libc::pthread_getcpuclockid(handle.as_pthread_t(), &mut clock) };
    assert_eq!(r, 0);
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec to a local.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn frames_flow_both_ways() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let offloads = Arc::clone(&backend.offloads);
    let mut dev = activate(&mem, Some(backend), OFFERED);
    assert_eq!(
        *offloads.lock().unwrap(),
        Some(features::tap_offloads(OFFERED))
    );

    dev.rx.add(&[(0x10_0000, 2048, true)]);
    dev.rx.add(&[(0x10_1000, 2048, true)]);
    dev.kick[0].write(1).unwrap();
    let incoming = frame(NET_HDR_LEN + 300, 1);
    peer.write_all(&incoming).unwrap();
    assert!(wait_until(|| dev.rx.used_idx() == 1));
    assert_eq!(dev.rx.used(0), (0, incoming.len() as u32));
    let mut expected = incoming.clone();
    expected[10] = 1; // num_buffers
    assert_eq!(dev.rx.read(0x10_0000, incoming.len()), expected);
    assert!(wait_until(|| dev.irqfd.read().is_ok()));
    assert_ne!(dev.irq.status() & 1, 0);
    // With buffers to spare, refilling them needs no notification.
    assert_eq!(
        dev.rx.used_flags() & VRING_USED_F_NO_NOTIFY,
        VRING_USED_F_NO_NOTIFY
    );

    let outgoing = frame(NET_HDR_LEN + 1000, 2);
    dev.tx.write(0x20_0000, &outgoing[..NET_HDR_LEN]);
    dev.tx.write(0x20_1000, &outgoing[NET_HDR_LEN..]);
    dev.tx
        .add(&[(0x20_0000, 12, false), (0x20_1000, 1000, false)]);
    dev.kick[1].write(1).unwrap();
    assert_eq!(recv(&mut peer).unwrap(), outgoing);
    assert!(wait_until(|| dev.tx.used_idx() == 1));
}

#[test]
fn a_frame_waits_for_rx_buffers_without_spinning() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let reads = Arc::clone(&backend.reads);
    let mut dev = activate(&mem, Some(backend), 1 << VIRTIO_NET_F_MRG_RXBUF | OFFERED);
    let (first, second) = (frame(NET_HDR_LEN + 3000, 3), frame(NET_HDR_LEN + 60, 4));
    peer.write_all(&first).unwrap();
    peer.write_all(&second).unwrap();
    // The first frame is read and kept; the second stays in the socket.
    assert!(wait_until(|| reads.load(Ordering::SeqCst) >= 1));
    let cpu_before = worker_cpu_time(&dev.net);
    std::thread::sleep(Duration::from_millis(300));
    let spent = worker_cpu_time(&dev.net) - cpu_before;
    assert!(
        spent < Duration::from_millis(50),
        "worker spun for {spent:?}"
    );
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    assert_eq!(dev.rx.used_idx(), 0);
    // Waiting for buffers, the device wants to hear of them.
    assert_eq!(dev.rx.used_flags() & VRING_USED_F_NO_NOTIFY, 0);

    // Buffers arrive: both frames are delivered, the first over two buffers.
    for i in 0..3u64 {
        dev.rx.add(&[(0x10_0000 + i * 0x1000, 2048, true)]);
    }
    dev.kick[0].write(1).unwrap();
    assert!(wait_until(|| dev.rx.used_idx() == 3));
    assert_eq!(dev.rx.used(0), (0, 2048));
    assert_eq!(dev.rx.used(1), (1, first.len() as u32 - 2048));
    assert_eq!(dev.rx.used(2), (2, second.len() as u32));
    assert_eq!(dev.rx.read(0x10_1000, first.len() - 2048), first[2048..]);
    assert_eq!(dev.rx.read(0x10_2000 + 12, 60), second[12..]);
    assert!(wait_until(
        || dev.rx.used_flags() & VRING_USED_F_NO_NOTIFY != 0
    ));
}

/// `VRING_USED_F_NO_NOTIFY`: the driver need not notify for new buffers.
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// A driver polling its rings (NAPI) with callbacks off gets no interrupt
/// for what it will find anyway; once it turns them on, it does.
#[test]
fn no_interrupt_while_the_driver_polls() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let dev = activate(
        &mem,
        Some(backend),
        OFFERED & !(1 << VIRTIO_RING_F_EVENT_IDX),
    );
    let mut rx = dev.rx;
    rx.set_avail_flags(1); // VRING_AVAIL_F_NO_INTERRUPT
    for i in 0..2u64 {
        rx.add(&[(0x10_0000 + i * 0x1000, 2048, true)]);
    }
    dev.kick[0].write(1).unwrap();
    peer.write_all(&frame(NET_HDR_LEN + 100, 8)).unwrap();
    assert!(wait_until(|| rx.used_idx() == 1));
    std::thread::sleep(Duration::from_millis(50));
    assert!(dev.irqfd.read().is_err(), "interrupted a polling driver");

    rx.set_avail_flags(0);
    peer.write_all(&frame(NET_HDR_LEN + 100, 9)).unwrap();
    assert!(wait_until(|| rx.used_idx() == 2));
    assert!(wait_until(|| dev.irqfd.read().is_ok()));
}

/// With EVENT_IDX, a frame that needs more buffers than the guest posted
/// asks to hear of the next buffer posted, not of the first one it put
/// back: the guest passed that index already and would never kick for it.
#[test]
fn event_idx_a_frame_short_of_buffers_asks_for_the_next_one() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let net = Net::new(mac(), Some(Box::new(backend)));
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
    let mut rx = TestQueue::new(&mem, RX_BASE, QUEUE_SIZE);
    let tx = TestQueue::new(&mem, TX_BASE, QUEUE_SIZE);
    handshake(&mut t, [&rx, &tx], OFFERED);
    assert!(features::has(OFFERED, VIRTIO_NET_F_MRG_RXBUF));

    rx.add(&[(0x10_0000, 2048, true)]);
    reg(&mut t, 0x50, 0);
    let big = frame(NET_HDR_LEN + 3000, 13);
    peer.write_all(&big).unwrap();
    // Buffer 0 is too small alone; the device waits for buffer 1.
    assert!(wait_until(|| rx.avail_event() == 1));
    assert_eq!(rx.used_idx(), 0);
    rx.add(&[(0x10_1000, 2048, true)]);
    reg(&mut t, 0x50, 0);
    assert!(wait_until(|| rx.used_idx() == 2));
    assert_eq!(rx.read(0x10_1000, big.len() - 2048), big[2048..]);
}

/// With EVENT_IDX (negotiated through the transport), TX completions
/// interrupt only once the used index passes the driver's `used_event`, and
/// a device waiting for RX buffers asks for the next one through
/// `avail_event`.
#[test]
fn event_idx_spaces_out_interrupts() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::new(irqfd.try_clone().unwrap()));
    let net = Net::new(mac(), Some(Box::new(backend)));
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap();
    let mut rx = TestQueue::new(&mem, RX_BASE, QUEUE_SIZE);
    let mut tx = TestQueue::new(&mem, TX_BASE, QUEUE_SIZE);
    handshake(&mut t, [&rx, &tx], OFFERED);
    assert!(features::has(OFFERED, VIRTIO_RING_F_EVENT_IDX));

    // Tell me after the third frame is sent (used index 3, so passing 2).
    tx.set_used_event(2);
    let outgoing = frame(NET_HDR_LEN + 64, 10);
    for i in 0..2u64 {
        tx.write(0x20_0000 + i * 0x1000, &outgoing);
        tx.add(&[(0x20_0000 + i * 0x1000, outgoing.len() as u32, false)]);
        reg(&mut t, 0x50, 1);
        assert_eq!(recv(&mut peer).unwrap(), outgoing);
        assert!(wait_until(|| tx.used_idx() == i as u16 + 1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(irqfd.read().is_err(), "interrupted before used_event");
    tx.write(0x20_2000, &outgoing);
    tx.add(&[(0x20_2000, outgoing.len() as u32, false)]);
    reg(&mut t, 0x50, 1);
    assert!(wait_until(|| tx.used_idx() == 3));
    assert!(wait_until(|| irqfd.read().is_ok()));

    // One RX buffer, used by the first frame; the second finds none, and
    // the device asks to hear of the buffer after it (avail index 1).
    rx.add(&[(0x10_0000, 2048, true)]);
    reg(&mut t, 0x50, 0);
    peer.write_all(&frame(NET_HDR_LEN + 100, 11)).unwrap();
    assert!(wait_until(|| rx.used_idx() == 1));
    assert!(wait_until(|| irqfd.read().is_ok()));
    peer.write_all(&frame(NET_HDR_LEN + 100, 12)).unwrap();
    assert!(wait_until(|| rx.avail_event() == 1));
    rx.set_used_event(1);
    rx.add(&[(0x10_1000, 2048, true)]);
    reg(&mut t, 0x50, 0);
    assert!(wait_until(|| rx.used_idx() == 2));
    assert!(wait_until(|| irqfd.read().is_ok()));
}

#[test]
fn without_a_tap_tx_is_discarded_and_rx_stays_empty() {
    let mem = guest_memory();
    let mut dev = activate(&mem, None, OFFERED);
    dev.rx.add(&[(0x10_0000, 2048, true)]);
    dev.tx.add(&[(0x20_0000, 100, false)]);
    dev.tx.add(&[(0x20_1000, 100, false)]);
    dev.kick[0].write(1).unwrap();
    dev.kick[1].write(1).unwrap();
    assert!(wait_until(|| dev.tx.used_idx() == 2));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.rx.used_idx(), 0);
}

#[test]
fn a_closed_tap_leaves_a_device_that_discards() {
    let mem = guest_memory();
    let (backend, peer) = seqpacket_pair();
    let mut dev = activate(&mem, Some(backend), OFFERED);
    drop(peer);
    let cpu_before = worker_cpu_time(&dev.net);
    std::thread::sleep(Duration::from_millis(200));
    let spent = worker_cpu_time(&dev.net) - cpu_before;
    assert!(
        spent < Duration::from_millis(50),
        "worker spun for {spent:?}"
    );
    dev.tx.add(&[(0x20_0000, 100, false)]);
    dev.kick[1].write(1).unwrap();
    assert!(wait_until(|| dev.tx.used_idx() == 1));
}

#[test]
fn quiesce_stops_the_worker_and_closes_the_tap() {
    let mem = guest_memory();
    let (backend, mut peer) = seqpacket_pair();
    let mut dev = activate(&mem, Some(backend), OFFERED);
    dev.rx.add(&[(0x10_0000, 2048, true)]);
    dev.net.quiesce();
    let _ = peer.write_all(&frame(100, 5));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.rx.used_idx(), 0);
    // The worker owned the tap; with it gone, the other end sees end of file.
    let mut buf = [0u8; 16];
    assert_eq!(peer.read(&mut buf).unwrap(), 0);
}

#[test]
fn the_mac_is_the_config_space() {
    let mut net = Net::new(mac(), None);
    let mut buf = [0u8; 8];
    net.read_config(0, &mut buf);
    assert_eq!(buf, [2, 0, 0, 0, 0, 0x2a, 0, 0]);
    net.write_config(0, &[0xff; 6]);
    let mut byte = [0u8];
    net.read_config(5, &mut byte);
    assert_eq!(byte, [0x2a]);
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
}

/// The MMIO registers a driver writes.
fn reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn status(t: &mut MmioTransport) -> u32 {
    let mut b = [0u8; 4];
    t.read(0x70, &mut b);
    u32::from_le_bytes(b)
}

/// Sets up the device the way Linux does: features, both queues, DRIVER_OK.
fn handshake(t: &mut MmioTransport, queues: [&TestQueue<'_>; 2], acked: u64) {
    reg(t, 0x70, 1 | 2);
    for sel in 0..2u32 {
        reg(t, 0x24, sel);
        reg(t, 0x20, (acked >> (32 * sel)) as u32);
    }
    reg(t, 0x70, 1 | 2 | 8);
    assert_ne!(status(t) & 8, 0, "FEATURES_OK refused");
    for (i, q) in queues.iter().enumerate() {
        let (desc, avail, used) = q.addresses();
        reg(t, 0x30, i as u32);
        reg(t, 0x38, u32::from(QUEUE_SIZE));
        for (offset, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            reg(t, offset, addr as u32);
            reg(t, offset + 4, (addr >> 32) as u32);
        }
        reg(t, 0x44, 1);
    }
    reg(t, 0x70, 1 | 2 | 8 | 4);
}

fn transport(mem: &GuestMemoryMmap, backend: Option<SeqpacketBackend>) -> MmioTransport {
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let net = Net::new(mac(), backend.map(|b| Box::new(b) as _));
    MmioTransport::new(Box::new(net), mem.clone(), irq).unwrap()
}

/// A template saved without a tap and restored, in a new transport, with
/// one: the restored device goes on from the saved ring positions.
#[test]
fn a_snapshot_without_a_tap_restores_with_one() {
    let mem = guest_memory();
    let mut rx = TestQueue::new(&mem, RX_BASE, QUEUE_SIZE);
    let mut tx = TestQueue::new(&mem, TX_BASE, QUEUE_SIZE);
    let acked = OFFERED;
    let mut template = transport(&mem, None);
    handshake(&mut template, [&rx, &tx], acked);
    rx.add(&[(0x10_0000, 2048, true)]);
    rx.add(&[(0x10_1000, 2048, true)]);
    tx.add(&[(0x20_0000, 100, false)]);
    reg(&mut template, 0x50, 1); // QueueNotify, TX
    assert!(wait_until(|| tx.used_idx() == 1));
    template.quiesce();
    let state = template.state().unwrap();
    drop(template);

    let (backend, mut peer) = seqpacket_pair();
    let offloads = Arc::clone(&backend.offloads);
    let mut copy = transport(&mem, Some(backend));
    copy.restore(&state).unwrap();
    assert_eq!(
        *offloads.lock().unwrap(),
        Some(features::tap_offloads(acked))
    );
    let incoming = frame(NET_HDR_LEN + 500, 6);
    peer.write_all(&incoming).unwrap();
    assert!(wait_until(|| rx.used_idx() == 1));
    assert_eq!(rx.used(0), (0, incoming.len() as u32));
    assert_eq!(rx.read(0x10_0000 + 12, 500), incoming[12..]);
    let outgoing = frame(NET_HDR_LEN + 64, 7);
    tx.write(0x20_1000, &outgoing);
    tx.add(&[(0x20_1000, outgoing.len() as u32, false)]);
    reg(&mut copy, 0x50, 1);
    assert_eq!(recv(&mut peer).unwrap(), outgoing);
    assert!(wait_until(|| tx.used_idx() == 2));
}
