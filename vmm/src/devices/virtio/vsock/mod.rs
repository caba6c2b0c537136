//! virtio-vsock with Firecracker's hybrid host side, so the shim and the
//! guest agent talk over sockets without any vsock support on the host.
//!
//! - Host to guest: a host client connects to the device's Unix socket,
//!   writes `CONNECT <guest port>\n`, and reads `OK <host port>\n` once the
//!   guest accepted; then the socket is the stream.
//! - Guest to host: a guest connection to CID 2, port P, is forwarded to the
//!   Unix socket `<path>_<P>`.
//!
//! Modules, one job each: `packet` (the header and its checks, pure),
//! `connection` (one stream's state machine and credit), `muxer` (listener,
//! handshakes, connections, port allocation), `queue` (walking TX and RX),
//! `event_handler` (the worker thread), `device` (the virtio device).

mod connection;
mod device;
mod event_handler;
mod muxer;
mod packet;
mod queue;
#[cfg(test)]
mod tests;

pub use device::Vsock;
