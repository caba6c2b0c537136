//! One vsock stream between the guest and a host Unix socket: its state
//! machine and both directions' credit flow control.
//!
//! Guest to host: guest data goes straight to the host socket; what the socket
//! does not take waits in `tx_buf`, which is exactly as large as the receive
//! buffer we advertise (`buf_alloc`). `fwd_cnt` counts the bytes handed to the
//! host socket, so a guest that respects its credit can never overflow
//! `tx_buf`, and one that does not is reset.
//!
//! Host to guest: nothing is buffered. Data stays in the host socket until the
//! guest has both credit (its `buf_alloc` minus what is in flight) and an RX
//! buffer, then it is read straight into the packet.
//!
//! The connection never touches guest memory or the epoll set itself: the
//! muxer feeds it guest packets and host readiness, asks it for the next
//! packet for the guest, and (re)registers its socket with the interest it
//! reports.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{send, MsgFlags};
use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Our receive buffer per connection (the `buf_alloc` we advertise): the most
/// guest data we hold for a host client that is slow to read.
pub const TX_BUF_SIZE: u32 = 256 << 10;
/// We tell the guest about freed buffer space at least every this many bytes,
/// so its view of our free space never lags by more than a quarter buffer.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;
/// How long the guest has to answer our REQUEST before the host client is dropped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to RST after we told it the host side closed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: our REQUEST is pending or sent; waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected; our RESPONSE is pending.
    PeerInit,
    /// Data flows (subject to each side's SHUTDOWN).
    Established,
    /// The host client is gone; we sent (or will send) SHUTDOWN and wait for the guest's RST.
    LocalClosed,
    /// Over: an RST may still be pending, then the connection is removed.
    Dead,
}

/// Control packets waiting for an RX buffer.
#[derive(Clone, Copy, Debug, Default)]
struct Pending {
    rst: bool,
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    /// SHUTDOWN flags to send (0: none).
    shutdown: u32,
}

impl Pending {
    fn any(&self) -> bool {
        self.rst
            || self.request
            || self.response
            || self.credit_update
            || self.credit_request
            || self.shutdown != 0
    }
}

/// One stream and its host socket.
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    guest_cid: u64,
    state: State,
    deadline: Option<Instant>,
    pending: Pending,
    /// The interest the muxer registered the socket with (`None`: not registered).
    pub(super) registered: Option<EventSet>,

    // Host to guest.
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    peer_shut_rcv: bool,

    // Guest to host.
    preamble: Vec<u8>,
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shut_send: bool,
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, guest_cid: u64, state: State) -> Connection {
        Connection {
            stream,
            key,
            guest_cid,
            state,
            deadline: None,
            pending: Pending::default(),
            registered: None,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            peer_shut_rcv: false,
            preamble: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shut_send: false,
            host_write_shut: false,
        }
    }

    /// A host client asked (`CONNECT <peer_port>`) for a guest port: a REQUEST
    /// goes to the guest, which must answer by `now + CONNECT_TIMEOUT`.
    pub fn host_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        now: Instant,
    ) -> Connection {
        let mut c = Connection::new(stream, key, guest_cid, State::LocalInit);
        c.pending.request = true;
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// The guest's REQUEST `req` reached a host listener through `stream`: a
    /// RESPONSE goes back and the stream is open.
    pub fn guest_initiated(
        stream: UnixStream,
        key: ConnKey,
        guest_cid: u64,
        req: &Header,
    ) -> Connection {
        let mut c = Connection::new(stream, key, guest_cid, State::PeerInit);
        c.pending.response = true;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    /// The connection's key.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The host socket's fd, for epoll.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The state, for tests.
    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// When `on_timeout` must be called next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the connection is over and may be dropped (no RST left to send).
    pub fn is_dead(&self) -> bool {
        self.state == State::Dead && !self.pending.rst
    }

    /// Aborts the connection: an RST goes to the guest. The host client sees
    /// EOF now, not when the RST finds an RX buffer (the guest may never post one).
    pub fn kill(&mut self) {
        if self.state != State::Dead {
            let _ = self.stream.shutdown(Shutdown::Both);
            self.state = State::Dead;
            self.pending = Pending {
                rst: true,
                ..Pending::default()
            };
            self.deadline = None;
        }
    }

    /// The host side is gone for good: tell the guest (SHUTDOWN, both
    /// directions) and wait a little for its RST.
    fn local_close(&mut self, now: Instant) {
        match self.state {
            State::Established => {
                self.state = State::LocalClosed;
                self.pending.shutdown = SHUTDOWN_RCV | SHUTDOWN_SEND;
                self.pending.credit_request = false;
                self.tx_buf = VecDeque::new();
                self.preamble.clear();
                self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            }
            State::LocalInit | State::PeerInit => self.kill(),
            State::LocalClosed | State::Dead => {}
        }
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.peer_shut_rcv
    }

    /// How many more bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the connection has a packet for the guest (given an RX buffer).
    pub fn wants_rx(&self) -> bool {
        if self.pending.any() {
            return true;
        }
        self.can_read_host()
            && self.host_readable
            && (self.peer_credit() > 0 || !self.credit_requested)
    }

    /// The epoll interest for the host socket; `None` once the peer hung up
    /// (a level-triggered HUP would fire forever; what is left to read does
    /// not need readiness any more).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup || self.state == State::Dead {
            return None;
        }
        let mut set = EventSet::empty();
        if self.can_read_host() && !self.host_readable {
            set |= EventSet::IN;
        }
        if !self.preamble.is_empty() || !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Readiness of the host socket.
    pub fn on_host_event(&mut self, events: EventSet, now: Instant) {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            self.host_hup = true;
            self.host_readable = true;
            // Writes can only fail from now on: what waits for the host is lost.
            self.tx_buf = VecDeque::new();
            self.preamble.clear();
            if self.can_read_host() {
                // Deliver what is still buffered; the EOF after it closes.
                return;
            }
            self.local_close(now);
            return;
        }
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host(now);
        }
    }

    /// The guest's deadline passed: give up on it.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.deadline = None;
            if matches!(self.state, State::LocalInit | State::LocalClosed) {
                self.kill();
            }
        }
    }

    /// A validated guest packet for this connection (`payload` is the RW data,
    /// exactly `hdr.len` bytes, empty for other operations).
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8], now: Instant) {
        if op == Op::Rst {
            // The guest is done (or nobody listened): close without answering.
            self.state = State::Dead;
            self.pending = Pending::default();
            self.deadline = None;
            return;
        }
        if self.state == State::Dead {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, op) {
            (State::LocalInit, Op::Response) => {
                self.state = State::Established;
                self.deadline = None;
                self.preamble = format!("OK {}\n", self.key.local_port).into_bytes();
                self.flush_to_host(now);
            }
            (State::Established, Op::Rw) => self.guest_data(payload, now),
            (State::Established, Op::Shutdown) => {
                self.peer_shut_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                self.peer_shut_send |= hdr.flags & SHUTDOWN_SEND != 0;
                self.flush_to_host(now);
            }
            (State::LocalInit | State::PeerInit | State::Established, Op::CreditUpdate) => {}
            (State::LocalInit | State::PeerInit | State::Established, Op::CreditRequest) => {
                self.pending.credit_update = true;
            }
            // The host is gone; the guest's data and credit talk have nowhere
            // to go. Its own SHUTDOWN means it is done too.
            (State::LocalClosed, Op::Shutdown) => self.kill(),
            (State::LocalClosed, _) => {}
            // Anything else breaks the protocol (RW before RESPONSE, a second
            // REQUEST or RESPONSE, ...).
            _ => self.kill(),
        }
        self.maybe_finish();
    }

    fn guest_data(&mut self, data: &[u8], now: Instant) {
        if self.peer_shut_send || self.host_write_shut {
            self.kill();
            return;
        }
        if self.host_hup {
            // The host client is gone; its data has nowhere to go.
            return;
        }
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            // The guest ignored its credit; bounded memory beats its data.
            tracing::debug!(key = ?self.key, "vsock: guest overran its credit, reset");
            self.kill();
            return;
        }
        let mut rest = data;
        if self.tx_buf.is_empty() && self.preamble.is_empty() {
            match write_nosignal(&self.stream, data) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.host_write_failed(now);
                    return;
                }
            }
        }
        self.tx_buf.extend(rest);
        self.check_credit_update();
    }

    /// Writes what waits for the host; called when the socket may take more.
    fn flush_to_host(&mut self, now: Instant) {
        if matches!(self.state, State::LocalClosed | State::Dead) {
            return;
        }
        while !self.preamble.is_empty() {
            match write_nosignal(&self.stream, &self.preamble) {
                Ok(n) => {
                    self.preamble.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.host_write_failed(now),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match write_nosignal(&self.stream, front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return self.host_write_failed(now),
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > (64 << 10) {
            // An idle connection keeps little memory.
            self.tx_buf = VecDeque::new();
        }
        self.check_credit_update();
        if self.tx_buf.is_empty() && self.peer_shut_send && !self.host_write_shut {
            // The guest will send no more: the host client sees EOF.
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.maybe_finish();
    }

    fn host_write_failed(&mut self, now: Instant) {
        if self.host_hup {
            self.local_close(now);
        } else {
            self.kill();
        }
    }

    fn check_credit_update(&mut self) {
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// Both directions are finished: end with RST (what Linux expects after
    /// a full shutdown) once everything for the host has been written.
    fn maybe_finish(&mut self) {
        if self.state != State::Established || !self.tx_buf.is_empty() {
            return;
        }
        if self.peer_shut_send && (self.peer_shut_rcv || self.host_eof) {
            self.kill();
        }
    }

    fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload (if any) read from the host
    /// socket into `buf`, which also bounds the payload. Returns the header
    /// and the payload length, or `None` when there is nothing to send now.
    pub fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if self.pending.rst {
            self.pending.rst = false;
            return Some((self.header(Op::Rst, 0, 0), 0));
        }
        if self.state == State::Dead {
            return None;
        }
        if self.pending.request {
            self.pending.request = false;
            return Some((self.header(Op::Request, 0, 0), 0));
        }
        if self.pending.response {
            self.pending.response = false;
            self.state = State::Established;
            return Some((self.header(Op::Response, 0, 0), 0));
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            return Some((self.header(Op::CreditUpdate, 0, 0), 0));
        }
        if self.pending.shutdown != 0 {
            let flags = std::mem::take(&mut self.pending.shutdown);
            return Some((self.header(Op::Shutdown, 0, flags), 0));
        }
        if !self.can_read_host() || !self.host_readable {
            return None;
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some((self.header(Op::CreditRequest, 0, 0), 0));
        }
        let max = buf.len().min(credit);
        if max == 0 {
            return None;
        }
        loop {
            return match (&self.stream).read(&mut buf[..max]) {
                Ok(0) => {
                    self.host_eof = true;
                    if self.host_hup {
                        self.local_close(now);
                        let flags = std::mem::take(&mut self.pending.shutdown);
                        Some((self.header(Op::Shutdown, 0, flags), 0))
                    } else {
                        // Half-close: the guest reads EOF and may still send.
                        self.maybe_finish();
                        if self.state == State::Dead {
                            return self.next_rx(buf, now);
                        }
                        Some((self.header(Op::Shutdown, 0, SHUTDOWN_SEND), 0))
                    }
                }
                Ok(n) => {
                    self.rx_cnt += Wrapping(n as u32);
                    Some((self.header(Op::Rw, n as u32, 0), n))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    None
                }
                Err(_) => {
                    self.kill();
                    self.next_rx(buf, now)
                }
            };
        }
    }
}

/// `write` without SIGPIPE: a host client that went away must be an error we
/// handle, not a signal that kills the VMM.
fn write_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        match send(stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GUEST: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 52,
    };

    fn guest_hdr(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// A guest-initiated connection, already Established, and the host's end.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let now = Instant::now();
        let mut c =
            Connection::guest_initiated(ours, KEY, GUEST, &guest_hdr(Op::Request, 0, buf_alloc, 0));
        let (h, _) = c.next_rx(&mut [0; 16], now).unwrap();
        assert_eq!(h.op, Op::Response as u16);
        assert_eq!(c.state(), State::Established);
        (c, host)
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let (mut c, mut host) = established(10);
        host.write_all(&[7u8; 25]).unwrap();
        c.on_host_event(EventSet::IN, Instant::now());
        let mut buf = [0u8; 64];
        let (h, n) = c.next_rx(&mut buf, Instant::now()).unwrap();
        assert_eq!((h.op, n, h.len), (Op::Rw as u16, 10, 10));
        // No credit left: one CREDIT_REQUEST, then silence.
        let (h, _) = c.next_rx(&mut buf, Instant::now()).unwrap();
        assert_eq!(h.op, Op::CreditRequest as u16);
        assert!(c.next_rx(&mut buf, Instant::now()).is_none());
        assert!(!c.wants_rx());
        // The guest consumed 10 bytes.
        c.on_guest_packet(
            &guest_hdr(Op::CreditUpdate, 0, 10, 10),
            Op::CreditUpdate,
            &[],
            Instant::now(),
        );
        assert!(c.wants_rx());
        let (_, n) = c.next_rx(&mut buf, Instant::now()).unwrap();
        assert_eq!(n, 10);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut c, _host) = established(4096);
        // The host never reads: a socketpair takes some, tx_buf the rest.
        let chunk = vec![1u8; 32 << 10];
        let now = Instant::now();
        let mut sent = 0usize;
        while c.state() == State::Established {
            c.on_guest_packet(
                &guest_hdr(Op::Rw, chunk.len() as u32, 4096, 0),
                Op::Rw,
                &chunk,
                now,
            );
            sent += chunk.len();
            assert!(sent < 16 << 20, "never reset");
        }
        assert!(c.tx_buf.len() <= TX_BUF_SIZE as usize);
        let (h, _) = c.next_rx(&mut [0; 8], now).unwrap();
        assert_eq!(h.op, Op::Rst as u16);
        assert!(c.is_dead());
    }

    #[test]
    fn credit_updates_follow_host_progress() {
        let (mut c, mut host) = established(4096);
        let chunk = vec![1u8; CREDIT_UPDATE_THRESHOLD as usize];
        c.on_guest_packet(
            &guest_hdr(Op::Rw, chunk.len() as u32, 4096, 0),
            Op::Rw,
            &chunk,
            Instant::now(),
        );
        // Drain the host side so everything gets forwarded.
        let mut got = vec![0u8; chunk.len()];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut read = 0;
        while read < got.len() {
            read += host.read(&mut got[read..]).unwrap();
            c.on_host_event(EventSet::OUT, Instant::now());
        }
        let (h, _) = c.next_rx(&mut [0; 8], Instant::now()).unwrap();
        assert_eq!(h.op, Op::CreditUpdate as u16);
        assert_eq!(h.fwd_cnt, CREDIT_UPDATE_THRESHOLD);
        assert_eq!(h.buf_alloc, TX_BUF_SIZE);
    }

    #[test]
    fn host_half_close_then_guest_shutdown_ends_with_rst() {
        let (mut c, host) = established(4096);
        host.shutdown(Shutdown::Write).unwrap();
        c.on_host_event(EventSet::IN, Instant::now());
        let (h, _) = c.next_rx(&mut [0; 8], Instant::now()).unwrap();
        assert_eq!((h.op, h.flags), (Op::Shutdown as u16, SHUTDOWN_SEND));
        assert_eq!(c.state(), State::Established);
        let mut sd = guest_hdr(Op::Shutdown, 0, 4096, 0);
        sd.flags = SHUTDOWN_SEND;
        c.on_guest_packet(&sd, Op::Shutdown, &[], Instant::now());
        let (h, _) = c.next_rx(&mut [0; 8], Instant::now()).unwrap();
        assert_eq!(h.op, Op::Rst as u16);
        assert!(c.is_dead());
    }

    #[test]
    fn host_hangup_waits_for_guest_rst_or_times_out() {
        let (mut c, host) = established(4096);
        drop(host);
        let now = Instant::now();
        c.on_host_event(EventSet::IN | EventSet::HANG_UP, now);
        let (h, _) = c.next_rx(&mut [0; 8], now).unwrap();
        assert_eq!(h.op, Op::Shutdown as u16);
        assert_eq!(h.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
        assert_eq!(c.state(), State::LocalClosed);
        assert_eq!(c.interest(), None);
        c.on_timeout(now + SHUTDOWN_TIMEOUT);
        let (h, _) = c.next_rx(&mut [0; 8], now).unwrap();
        assert_eq!(h.op, Op::Rst as u16);
        assert!(c.is_dead());
    }

    #[test]
    fn protocol_violations_reset() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Connection::host_initiated(ours, KEY, GUEST, now);
        let (h, _) = c.next_rx(&mut [0; 8], now).unwrap();
        assert_eq!(h.op, Op::Request as u16);
        // Data before the RESPONSE.
        c.on_guest_packet(&guest_hdr(Op::Rw, 1, 4096, 0), Op::Rw, &[1], now);
        let (h, _) = c.next_rx(&mut [0; 8], now).unwrap();
        assert_eq!(h.op, Op::Rst as u16);
    }
}
