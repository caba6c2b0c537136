//! virtio-net over a tap: the guest's Ethernet frames go to a tap descriptor
//! the parent process opened and passed down, and the tap's frames come back
//! into the guest's receive buffers.
//!
//! The VMM never opens or creates an interface: the parent decides which
//! network the sandbox is on and hands over one tap file descriptor (see
//! [`Tap::take`]). Without one the device still exists, with the same
//! features, so that every VM has the same device list: a template saved with
//! no network can be restored with one.
//!
//! Modules, one job each: `features` (feature bits and the tap offloads they
//! imply, pure), `mac` (the MAC address and its checks), `backend` (what the
//! worker reads frames from and writes them to), `tap` (taking over the tap
//! descriptor, its ioctls), `tx` and `rx` (walking the queues, testable
//! without a VM), `ratelimit` (guest-triggered warnings), `worker` (the
//! thread and its epoll set), `device` (the virtio device).

mod backend;
mod device;
mod features;
mod mac;
mod ratelimit;
mod rx;
mod tap;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tx;
mod worker;

pub use backend::Backend;
pub use device::Net;
pub use mac::{MacAddr, MacError};
pub use tap::{Tap, TapError};

/// Bytes of `virtio_net_hdr_v1` in front of every frame, both ways: with
/// VIRTIO_F_VERSION_1 the header always has `num_buffers` (virtio 1.2, 5.1.6),
/// and the tap is set to the same size so frames pass through unchanged.
pub const NET_HDR_LEN: usize = 12;

/// The largest frame after the header: a 64 KiB GSO packet plus its 14-byte
/// Ethernet header (the bound Firecracker and crosvm use too).
pub const MAX_FRAME_PAYLOAD: usize = 65_550;

/// The largest header-plus-frame the device moves in either direction; the
/// size of each bounce buffer.
pub const MAX_FRAME_LEN: usize = NET_HDR_LEN + MAX_FRAME_PAYLOAD;
