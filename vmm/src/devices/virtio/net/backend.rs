//! Where the device's frames go: a tap in production, a socket pair or a
//! fake in tests, so the queue walking and the worker can be tested without
//! a network interface.

use std::io;
use std::os::fd::AsFd;

/// One frame at a time, each starting with the `virtio_net_hdr_v1`.
///
/// The descriptor (from [`AsFd`]) must be non-blocking: the worker waits on
/// it with epoll and expects `WouldBlock` when nothing is ready.
pub trait Backend: AsFd + Send {
    /// Reads the next frame into `buf`, returning its length; a frame longer
    /// than `buf` is truncated. `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one whole frame. `WouldBlock` when it cannot take one now (the
    /// descriptor turns writable when it can).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Says which offloaded frames the guest can take (TUN_F_* flags): the
    /// backend must hand over no frame needing more.
    fn set_guest_offloads(&mut self, tun_flags: libc::c_uint) -> io::Result<()>;
}
