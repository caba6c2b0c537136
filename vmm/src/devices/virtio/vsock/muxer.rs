//! The host side of hybrid vsock: the Unix listener with its `CONNECT <port>`
//! handshakes, the connections keyed by (host port, guest port), host port
//! allocation, and the order in which packets go to the guest.
//!
//! Every socket lives in the muxer's epoll set, under a token the device's
//! event loop hands back to [`Muxer::handle_event`]; the device registers its
//! own eventfds in the same set with tokens below [`FIRST_MUXER_TOKEN`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, Connection};
use super::packet::{Header, Op};

/// Epoll tokens from here up belong to the muxer.
pub const FIRST_MUXER_TOKEN: u64 = 16;
const TOKEN_LISTENER: u64 = FIRST_MUXER_TOKEN;
/// Socket tokens are this plus the fd (fds are unique while open).
const TOKEN_FD_BASE: u64 = 1 << 32;

/// Most connections at once: bounds fds and buffer memory a guest (or a
/// host client) can make us hold.
pub const MAX_CONNECTIONS: usize = 512;
/// Most host clients still writing their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line we wait for.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a host client has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most RSTs waiting for RX buffers; more are dropped (the guest is flooding us).
const MAX_CONTROL_PACKETS: usize = 1024;
/// Host ports we hand out for host-initiated connections: [2^30, 2^31), far
/// from the low ports host services listen on.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// A host client that has not finished its `CONNECT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Everything on the host side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    /// Which connection a connected socket belongs to.
    conn_fds: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// Connections with something for the guest, in turn order.
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    /// RSTs for packets that belong to no connection.
    control: VecDeque<Header>,
    last_local_port: u32,
}

/// Parses a host client's handshake line (without its `\n`): `CONNECT <port>`.
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut words = line.split(' ');
    let (verb, port) = (words.next()?, words.next()?);
    if words.next().is_some() || !verb.eq_ignore_ascii_case("connect") {
        return None;
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to a host listener without blocking: a listener with a full
/// backlog is a refusal, never a stall of the device thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    /// A muxer serving `listener` (bound at `uds_path`) for the guest `guest_cid`.
    pub fn new(guest_cid: u64, listener: UnixListener, uds_path: PathBuf) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            conn_fds: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            control: VecDeque::new(),
            last_local_port: LOCAL_PORT_BASE - 1,
        })
    }

    /// The epoll set; the device adds its eventfds with tokens below
    /// [`FIRST_MUXER_TOKEN`].
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Number of open connections, for tests.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Milliseconds until the next deadline, for `epoll_wait` (-1: none).
    pub fn timeout_ms(&self, now: Instant) -> i32 {
        let next = self
            .conns
            .values()
            .filter_map(Connection::deadline)
            .chain(self.handshakes.values().map(|h| h.deadline))
            .min();
        match next {
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis();
                // Round up so we do not wake just before the deadline.
                i32::try_from(ms + 1).unwrap_or(i32::MAX)
            }
        }
    }

    /// Acts on every deadline that has passed.
    pub fn handle_timeouts(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            tracing::debug!("vsock: host client sent no CONNECT line in time");
            self.drop_handshake(fd);
        }
        let late: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline().is_some_and(|d| d <= now))
            .map(Connection::key)
            .collect();
        for key in late {
            if let Some(c) = self.conns.get_mut(&key) {
                c.on_timeout(now);
            }
            self.after_change(key);
        }
    }

    /// An epoll event with a muxer token.
    pub fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        if token == TOKEN_LISTENER {
            self.accept_all(now);
            return;
        }
        let Some(fd) = token
            .checked_sub(TOKEN_FD_BASE)
            .and_then(|fd| RawFd::try_from(fd).ok())
        else {
            return;
        };
        if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd, now);
        } else if let Some(&key) = self.conn_fds.get(&fd) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.on_host_event(events, now);
            }
            self.after_change(key);
        }
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Typically out of fds; the client stays in the backlog.
                    tracing::warn!("vsock: cannot accept a host client: {e}");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                tracing::debug!("vsock: too many pending host handshakes, client dropped");
                continue;
            }
            let fd = stream.as_raw_fd();
            let registered = stream.set_nonblocking(true).and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_FD_BASE + fd as u64),
                )
            });
            if let Err(e) = registered {
                tracing::warn!("vsock: cannot watch a host client: {e}");
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
                    deadline: now + HANDSHAKE_TIMEOUT,
                },
            );
            // Data may already be waiting.
            self.read_handshake(fd, now);
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if let Some(h) = self.handshakes.remove(&fd) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::empty(), 0),
            );
            drop(h.stream);
        }
    }

    /// Reads the `CONNECT` line one byte at a time: whatever the client sends
    /// after the newline is stream data and must stay in the socket.
    fn read_handshake(&mut self, fd: RawFd, now: Instant) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match (&h.stream).read(&mut byte) {
                Ok(0) => return self.drop_handshake(fd),
                Ok(_) if byte[0] == b'\n' => match parse_connect_line(&h.line) {
                    Some(port) => break port,
                    None => {
                        tracing::debug!("vsock: bad handshake line from a host client");
                        return self.drop_handshake(fd);
                    }
                },
                Ok(_) if h.line.len() + 1 >= MAX_HANDSHAKE_LINE => {
                    tracing::debug!("vsock: handshake line too long");
                    return self.drop_handshake(fd);
                }
                Ok(_) => h.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return self.drop_handshake(fd),
            }
        };
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("vsock: connection limit reached, host client dropped");
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::empty(), 0),
            );
            return;
        }
        let local_port = self.alloc_local_port();
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::host_initiated(h.stream, key, self.guest_cid, now);
        // Still registered from the handshake: record that so it is modified, not re-added.
        conn.registered = Some(EventSet::IN);
        self.conn_fds.insert(fd, key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let port = ((self.last_local_port.wrapping_add(1)) & !(1 << 31)) | LOCAL_PORT_BASE;
            self.last_local_port = port;
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// A validated guest packet (`payload`: the RW data, else empty).
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8], now: Instant) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            if op == Op::Request {
                // A second REQUEST for a live connection: both are confused.
                conn.kill();
            } else {
                conn.on_guest_packet(hdr, op, payload, now);
            }
            self.after_change(key);
            return;
        }
        match op {
            Op::Request => self.connect_for_guest(hdr, key),
            Op::Rst => {}
            _ => self.push_control(hdr.rst_reply()),
        }
    }

    /// A guest packet that failed validation but deserves an RST: kills the
    /// connection it names, if any, so its stream never silently loses data.
    pub fn reject(&mut self, hdr: &Header) {
        if hdr.op == Op::Rst as u16 {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.kill();
            self.after_change(key);
        } else {
            self.push_control(hdr.rst_reply());
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() < MAX_CONTROL_PACKETS {
            self.control.push_back(hdr);
        }
    }

    /// The guest dials host port P: forwarded to the Unix socket `<uds_path>_<P>`.
    fn connect_for_guest(&mut self, req: &Header, key: ConnKey) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::debug!("vsock: connection limit reached, guest REQUEST refused");
            return self.push_control(req.rst_reply());
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(port = key.local_port, "vsock: no host listener: {e}");
                return self.push_control(req.rst_reply());
            }
        };
        let conn = Connection::guest_initiated(stream, key, self.guest_cid, req);
        self.conn_fds.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    /// After anything happened to a connection: drops it if it is over,
    /// otherwise brings its epoll interest and RX turn up to date.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.fd();
        if conn.is_dead() {
            if conn.registered.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                );
            }
            self.conn_fds.remove(&fd);
            self.conns.remove(&key);
            return;
        }
        let want = conn.interest();
        if want != conn.registered {
            let token = TOKEN_FD_BASE + fd as u64;
            let result = match (conn.registered, want) {
                (None, Some(set)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
                }
                (Some(_), Some(set)) => {
                    self.epoll
                        .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, token))
                }
                (Some(_), None) => self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                ),
                (None, None) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    tracing::warn!("vsock: cannot watch a host socket: {e}");
                    conn.kill();
                }
            }
        }
        if conn.wants_rx() && self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    /// Whether a packet waits for an RX buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.control.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest, payload read into `buf` (which bounds
    /// it). Connections take turns, one packet each.
    pub fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            self.in_rxq.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.next_rx(buf, now);
            self.after_change(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 1024\r"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
            b"CONNECT  1",
            b"OPEN 1",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn local_ports_skip_ones_in_use_and_stay_in_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut m = Muxer::new(3, listener, path).unwrap();
        m.last_local_port = u32::MAX - 1;
        let p = m.alloc_local_port();
        assert!((LOCAL_PORT_BASE..1 << 31).contains(&p), "{p:#x}");
        let a = m.alloc_local_port();
        let b = m.alloc_local_port();
        assert_ne!(a, b);
    }
}
