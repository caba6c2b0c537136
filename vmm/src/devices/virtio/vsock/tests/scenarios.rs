//! Protocol stories: host- and guest-initiated streams, shutdowns, credit, refusals.

use super::*;

#[test]
fn host_initiated_stream_both_ways_then_shutdown() {
    let mut g = Guest::new();
    let (mut c, hp) = host_connect(&mut g, 52);

    c.write_all(b"hello").unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Rw as u16);
    assert_eq!(data_of(&pkts), b"hello");
    let h = pkts.last().unwrap().0;
    assert_eq!((h.src_port, h.dst_port), (hp, 52));

    for layout in [
        Layout::Single,
        Layout::HeaderThenData,
        Layout::Split(10, 3),
        Layout::Split(0, 1),
        Layout::Split(43, 1000),
    ] {
        let msg = format!("world {layout:?}");
        g.send_with(rw(52, hp, msg.as_bytes()), msg.as_bytes(), layout);
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }

    // The guest closes: both directions, answered with RST; the client sees EOF.
    let mut sd = guest_hdr(Op::Shutdown, 52, hp);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, Op::Rst as u16);
    assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn data_sent_right_after_connect_line_is_kept() {
    let mut g = Guest::new();
    let mut c = client(&g);
    c.write_all(b"CONNECT 7\nearly bytes").unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Request as u16);
    let hp = pkts.last().unwrap().0.src_port;
    g.send(guest_hdr(Op::Response, 7, hp), &[]);
    let pkts = g.wait_for(|h| h.op == Op::Rw as u16);
    assert_eq!(data_of(&pkts), b"early bytes");
}

#[test]
fn host_connect_to_closed_guest_port_is_closed() {
    let mut g = Guest::new();
    let mut c = client(&g);
    c.write_all(b"CONNECT 9\n").unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Request as u16);
    let hp = pkts.last().unwrap().0.src_port;
    g.send(guest_hdr(Op::Rst, 9, hp), &[]);
    assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn bad_handshakes_are_closed() {
    let mut g = Guest::new();
    let mut bad = client(&g);
    bad.write_all(b"HELLO 1\n").unwrap();
    let mut long = client(&g);
    long.write_all(&[b'1'; 40]).unwrap();
    let mut huge_port = client(&g);
    huge_port.write_all(b"CONNECT 4294967296\n").unwrap();
    for _ in 0..5 {
        g.pump(20);
    }
    for c in [&mut bad, &mut long, &mut huge_port] {
        // Closed with unread bytes in it, a socket may report a reset instead of EOF.
        match c.read(&mut [0u8; 8]) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn silent_guest_and_silent_client_time_out() {
    let mut g = Guest::new();
    let mut silent_client = client(&g);
    let mut c = client(&g);
    c.write_all(b"CONNECT 5\n").unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Request as u16);
    assert_eq!(pkts.len(), 1);
    // Time passes: neither the guest nor the first client said anything.
    g.muxer
        .handle_timeouts(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1));
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, Op::Rst as u16);
    assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(silent_client.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn guest_connects_to_host_listener_and_host_closes() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_1024", g.path.display())).unwrap();
    g.send(guest_hdr(Op::Request, 5000, 1024), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    let resp = pkts[0].0;
    assert_eq!(resp.op, Op::Response as u16);
    assert_eq!((resp.src_port, resp.dst_port), (1024, 5000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    for chunk in big.chunks(MAX_PAYLOAD as usize) {
        g.send_with(rw(5000, 1024, chunk), chunk, Layout::Split(20, 4096));
    }
    let mut got = vec![0u8; big.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, big);

    host.write_all(b"reply").unwrap();
    drop(host);
    // Data first, then SHUTDOWN for both directions.
    let pkts = g.wait_for(|h| h.op == Op::Shutdown as u16);
    assert_eq!(data_of(&pkts), b"reply");
    let sd = pkts.last().unwrap().0;
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    g.send(guest_hdr(Op::Rst, 5000, 1024), &[]);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn host_half_close_reaches_guest_as_eof_and_guest_can_still_send() {
    let mut g = Guest::new();
    let (mut c, hp) = host_connect(&mut g, 60);
    c.write_all(b"stdin").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Shutdown as u16);
    assert_eq!(data_of(&pkts), b"stdin");
    assert_eq!(pkts.last().unwrap().0.flags, SHUTDOWN_SEND);
    g.send(rw(60, hp, b"answer"), b"answer");
    let mut sd = guest_hdr(Op::Shutdown, 60, hp);
    sd.flags = SHUTDOWN_SEND;
    g.send(sd, &[]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"answer");
    let pkts = g.recv();
    assert_eq!(pkts.last().unwrap().0.op, Op::Rst as u16);
}

#[test]
fn guest_request_without_listener_gets_rst() {
    let mut g = Guest::new();
    g.send(guest_hdr(Op::Request, 5001, 4242), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, Op::Rst as u16);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (4242, 5001));
    // Packets for connections that do not exist get RST too, RSTs get nothing.
    g.send(rw(5001, 4242, b"x"), b"x");
    g.send(guest_hdr(Op::Rst, 5001, 4242), &[]);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, Op::Rst as u16);
}

#[test]
fn seqpacket_and_lying_lengths_are_refused() {
    let mut g = Guest::new();
    let mut seq = guest_hdr(Op::Request, 1, 2);
    seq.type_ = 2;
    g.send(seq, &[]);
    let mut lie = rw(1, 2, b"abc");
    lie.len = 1000;
    g.send_with(lie, b"abc", Layout::Single);
    let mut foreign = guest_hdr(Op::Request, 1, 2);
    foreign.src_cid = 99;
    g.send(foreign, &[]);
    let pkts = g.recv();
    let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
    assert_eq!(ops, [Op::Rst as u16, Op::Rst as u16]);
}

#[test]
fn credit_limits_host_to_guest_flow() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_77", g.path.display())).unwrap();
    let mut req = guest_hdr(Op::Request, 6000, 77);
    req.buf_alloc = 1000;
    g.send(req, &[]);
    assert_eq!(g.recv()[0].0.op, Op::Response as u16);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[5u8; 3000]).unwrap();
    let pkts = g.wait_for(|h| h.op == Op::CreditRequest as u16);
    assert_eq!(data_of(&pkts).len(), 1000);
    // Nothing more until the guest frees space.
    assert!(data_of(&g.pump(50)).is_empty());
    let mut upd = guest_hdr(Op::CreditUpdate, 6000, 77);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    g.send(upd, &[]);
    let pkts = g.recv();
    assert_eq!(data_of(&pkts).len(), 1000);

    // The guest asks for our credit: it gets an update.
    g.send(guest_hdr(Op::CreditRequest, 6000, 77), &[]);
    let pkts = g.recv();
    let upd = pkts
        .iter()
        .find(|p| p.0.op == Op::CreditUpdate as u16)
        .unwrap();
    assert_eq!(upd.0.buf_alloc, TX_BUF_SIZE);
}

#[test]
fn rx_packets_fill_any_buffer_layout() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_88", g.path.display())).unwrap();
    g.send(guest_hdr(Op::Request, 7000, 88), &[]);
    assert_eq!(g.recv()[0].0.op, Op::Response as u16);
    let (mut host, _) = listener.accept().unwrap();
    // Post a chain whose header is split 10 + 34 and whose data is in pieces.
    g.post_rx(&[10, 34, 7, 7, 100]);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    host.write_all(&payload).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < payload.len() && Instant::now() < deadline {
        got.extend(data_of(&g.pump(20)));
    }
    assert_eq!(got, payload);
}

#[test]
fn device_binds_early_serves_after_activation_and_cleans_up() {
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.vsock");
    assert!(Vsock::new(2, path.clone()).is_err());
    assert!(Vsock::new(u64::from(u32::MAX), path.clone()).is_err());
    let mut dev = Vsock::new(GUEST_CID, path.clone()).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);

    // The host connects before the guest driver is up.
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let (rxq, rx_ring) = Ring::create(&mem, RXQ_ADDR);
    let (txq, _) = Ring::create(&mem, TXQ_ADDR);
    let (evq, _) = Ring::create(&mem, 0x2_0000);
    add_chain(&mem, rx_ring, 0, &[(RX_AREA, 4096, F_WRITE)]);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![rxq, txq, evq],
        queue_events: (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt,
        acked_features: dev.features(),
    })
    .unwrap();
    // The worker delivers the REQUEST and interrupts the guest.
    let deadline = Instant::now() + Duration::from_secs(5);
    while irq.read().is_err() {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(used_idx(&mem, rx_ring), 1);
    let mut raw = [0u8; HDR_LEN];
    mem.read_slice(&mut raw, GuestAddress(RX_AREA)).unwrap();
    let req = Header::from_le_bytes(&raw);
    assert_eq!((req.op, req.dst_port), (Op::Request as u16, 52));

    // Teardown closes the client and removes the socket file.
    drop(dev);
    assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0);
    assert!(!path.exists());
}

/// The `bulkhead run` stdout path at scale: a guest that respects its credit
/// streams far more than one buffer (8 KiB packets, like the agent's copy) to a
/// host client that reads slowly and has half-closed its write side, while a
/// second, idle connection (the ttrpc one) stays open. Every byte must arrive in
/// order, credit updates must keep the guest going whenever the host drained
/// enough, and neither connection may be reset or touched.
#[test]
fn long_guest_stream_to_slow_reader_keeps_credit_flowing() {
    const TOTAL: usize = 8 << 20;
    const PKT: usize = 8 << 10;
    const READ: usize = 24 << 10;
    let pattern = |i: usize| (i % 251) as u8;

    let mut g = Guest::new();
    let (mut rpc, rpc_port) = host_connect(&mut g, 1024);
    let (mut out, out_port) = host_connect(&mut g, 1025);
    out.shutdown(std::net::Shutdown::Write).unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Shutdown as u16);
    assert_eq!(pkts.last().unwrap().0.flags, SHUTDOWN_SEND);
    out.set_nonblocking(true).unwrap();

    let (mut sent, mut got) = (0usize, 0usize);
    let (mut peer_fwd, mut peer_alloc) = (0u32, TX_BUF_SIZE);
    let mut buf = vec![0u8; READ];
    let mut idle_rounds = 0;
    while got < TOTAL {
        // The guest sends what its view of our credit allows.
        let mut credit = peer_alloc as usize - (sent - peer_fwd as usize);
        let mut progressed = false;
        while credit > 0 && sent < TOTAL {
            let n = PKT.min(credit).min(TOTAL - sent);
            let data: Vec<u8> = (sent..sent + n).map(pattern).collect();
            g.send(rw(1025, out_port, &data), &data);
            sent += n;
            credit -= n;
            progressed = true;
        }
        // The host client reads a little.
        match out.read(&mut buf) {
            Ok(0) => panic!("stdout stream closed after {got} bytes"),
            Ok(n) => {
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(got + k), "byte {}", got + k);
                }
                got += n;
                progressed = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("stdout read after {got} bytes: {e}"),
        }
        // The device flushes to the host and tells the guest about freed space.
        for (h, _) in g.pump(0) {
            assert_ne!(h.op, Op::Rst as u16, "reset after {got} bytes: {h:?}");
            assert_eq!(h.dst_port, 1025, "unexpected packet {h:?}");
            assert_eq!(h.src_port, out_port);
            // fwd_cnt never runs ahead of what the guest sent.
            assert!(h.fwd_cnt as usize <= sent);
            peer_fwd = h.fwd_cnt;
            peer_alloc = h.buf_alloc;
            progressed = true;
        }
        idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
        assert!(
            idle_rounds < 1000,
            "stalled: sent {sent}, host got {got}, guest credit view fwd_cnt {peer_fwd}"
        );
    }
    assert_eq!(sent, TOTAL);
    // The idle ttrpc connection is still alive, both ways.
    rpc.write_all(b"ping").unwrap();
    let pkts = g.wait_for(|h| h.op == Op::Rw as u16);
    assert_eq!(data_of(&pkts), b"ping");
    assert_eq!(pkts.last().unwrap().0.src_port, rpc_port);
    g.send(rw(1024, rpc_port, b"pong"), b"pong");
    let mut pong = [0u8; 4];
    rpc.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");
    assert_eq!(g.muxer.connection_count(), 2);
}
