//! Random descriptor chains and headers, from a fixed seed: the queue code
//! must never panic, and never write guest memory outside the chains.

use super::*;

/// Guest addresses whose byte differs (pages compared whole first: fast in debug builds).
fn changed_bytes(before: &[u8], after: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    for (page, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if a != b {
            let base = page as u64 * 4096;
            out.extend(
                (0..a.len())
                    .filter(|&i| a[i] != b[i])
                    .map(|i| base + i as u64),
            );
        }
    }
    out
}

/// xorshift64: deterministic, so a failure reproduces.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A header that is often almost right, so the fuzz reaches deep paths.
fn random_header(r: &mut Rand, avail: u32) -> Header {
    let ports = [1024, 5000, 77, 1 << 30, u32::MAX];
    Header {
        src_cid: if r.chance(85) { GUEST_CID } else { r.next() },
        dst_cid: if r.chance(85) { HOST_CID } else { r.below(5) },
        src_port: ports[r.below(5) as usize],
        dst_port: if r.chance(70) {
            1024
        } else {
            ports[r.below(5) as usize]
        },
        len: match r.below(4) {
            0 => avail,
            1 => r.below(u64::from(avail) + 1) as u32,
            2 => r.next() as u32,
            _ => 0,
        },
        type_: if r.chance(90) {
            TYPE_STREAM
        } else {
            r.next() as u16
        },
        op: if r.chance(90) {
            1 + r.below(7) as u16
        } else {
            r.next() as u16
        },
        flags: r.below(4) as u32,
        buf_alloc: r.next() as u32,
        fwd_cnt: r.next() as u32,
    }
}

fn random_desc(r: &mut Rand) -> (u64, u32, u16) {
    let addr = match r.below(10) {
        0 => r.next(),
        1 => MEM_SIZE - r.below(64),
        2 => TXQ_ADDR + r.below(0x1000),
        _ => TX_AREA + r.below(0x1_0000),
    };
    let len = match r.below(6) {
        0 => r.next() as u32,
        1 => r.below(4) as u32,
        2 => HDR_LEN as u32,
        _ => r.below(0x2000) as u32,
    };
    let mut flags = 0;
    if r.chance(10) {
        flags |= F_WRITE;
    }
    if r.chance(3) {
        flags |= F_INDIRECT;
    }
    (addr, len, flags)
}

#[test]
fn fuzz_tx_chains_never_panic_nor_write_guest_memory() {
    let mut g = Guest::new();
    let _listener = UnixListener::bind(format!("{}_1024", g.path.display())).unwrap();
    let mut r = Rand(0x9e37_79b9_7f4a_7c15);
    let tx_used_start = g.tx_ring.used.raw_value();
    let tx_used_end = tx_used_start + 4 + 8 * u64::from(QSIZE) + 2;
    let mut before = vec![0u8; MEM_SIZE as usize];
    let mut after = vec![0u8; MEM_SIZE as usize];
    let mut chains = 0;
    let mut most_conns = 0;
    for round in 0..2000 {
        // Fresh random bytes where descriptors point, with a plausible header.
        let mut area = vec![0u8; 0x1_0000];
        for b in area.iter_mut() {
            *b = r.next() as u8;
        }
        let avail = r.below(0x3000) as u32;
        let hdr = random_header(&mut r, avail);
        let off = r.below(0x1_0000 - HDR_LEN as u64) as usize;
        area[off..off + HDR_LEN].copy_from_slice(&hdr.to_le_bytes());
        area[..HDR_LEN].copy_from_slice(&random_header(&mut r, 100).to_le_bytes());
        g.mem.write_slice(&area, GuestAddress(TX_AREA)).unwrap();

        let n_chains = 1 + r.below(16);
        let mut at = 0u16;
        for _ in 0..n_chains {
            let n = 1 + r.below(6) as u16;
            let mut descs: Vec<_> = (0..n).map(|_| random_desc(&mut r)).collect();
            if r.chance(60) {
                // Make it start right at a header.
                descs[0].0 = TX_AREA + if r.chance(50) { off as u64 } else { 0 };
            }
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(a, l, f))| {
                    let last = i + 1 == descs.len();
                    let (f, next) = if !last {
                        (f | F_NEXT, at + i as u16 + 1)
                    } else if r.chance(5) {
                        (f | F_NEXT, r.below(u64::from(QSIZE) + 4) as u16)
                    } else {
                        (f, 0)
                    };
                    RawDescriptor::from(Descriptor::new(a, l, f, next))
                })
                .collect();
            add_raw_chain(&g.mem, g.tx_ring, at, &raw);
            at += n;
            chains += 1;
        }
        g.mem.read_slice(&mut before, GuestAddress(0)).unwrap();
        // A broken queue may be reported as an error; it must never panic.
        let _ = process_tx(&g.mem, &mut g.txq, &mut g.muxer, GUEST_CID, &mut g.scratch);
        g.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        for i in changed_bytes(&before, &after) {
            if !(tx_used_start..tx_used_end).contains(&i) {
                panic!("round {round}: TX processing wrote guest memory at {i:#x}");
            }
        }
        // Whatever the fuzz caused goes back through well-formed RX buffers.
        for (h, d) in g.pump(0) {
            assert_eq!(h.src_cid, HOST_CID);
            assert_eq!(h.dst_cid, GUEST_CID);
            assert!(d.len() <= MAX_PAYLOAD as usize);
        }
        most_conns = most_conns.max(g.muxer.connection_count());
    }
    assert!(chains > 10_000, "only {chains} chains");
    assert!(most_conns > 0, "the fuzz never opened a connection");
}

#[test]
fn fuzz_rx_chains_only_write_inside_their_buffers() {
    let mut g = Guest::with_rx_buffers(0);
    let mut r = Rand(0x1234_5678_9abc_def1);
    let rx_used_start = g.rx_ring.used.raw_value();
    let rx_used_end = rx_used_start + 4 + 8 * u64::from(QSIZE) + 2;
    let mut before = vec![0u8; MEM_SIZE as usize];
    let mut after = vec![0u8; MEM_SIZE as usize];
    let mut at = g.rx_next_desc;
    for round in 0..2000 {
        // Something to deliver: RSTs for packets without a connection.
        for p in 0..1 + r.below(4) as u32 {
            g.send(guest_hdr(Op::Rw, 100 + p, 4242), &[]);
        }
        let mut allowed: Vec<(u64, u64)> = vec![(rx_used_start, rx_used_end)];
        let n = 1 + r.below(4) as u16;
        if at + n > QSIZE {
            at = 0;
        }
        let descs: Vec<(u64, u32, u16)> = (0..n)
            .map(|_| {
                let addr = match r.below(8) {
                    0 => r.next(),
                    1 => MEM_SIZE - r.below(64),
                    _ => RX_AREA + r.below(0x1_0000),
                };
                let len = match r.below(5) {
                    0 => r.next() as u32,
                    _ => r.below(200) as u32,
                };
                let flags = if r.chance(85) { F_WRITE } else { 0 };
                (addr, len, flags)
            })
            .collect();
        for &(a, l, f) in &descs {
            if f & F_WRITE != 0 {
                allowed.push((a, a.saturating_add(u64::from(l))));
            }
        }
        add_chain(&g.mem, g.rx_ring, at, &descs);
        at += n;
        g.mem.read_slice(&mut before, GuestAddress(0)).unwrap();
        let _ = process_rx(&g.mem, &mut g.rxq, &mut g.muxer, &mut g.scratch);
        g.mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        for i in changed_bytes(&before, &after) {
            if !allowed.iter().any(|&(s, e)| (s..e).contains(&i)) {
                panic!("round {round}: RX wrote outside its buffers at {i:#x}");
            }
        }
    }
}
