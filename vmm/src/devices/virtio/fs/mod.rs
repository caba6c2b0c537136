//! virtio-fs through vhost-user: the guest's FUSE requests go straight from the
//! queues to a `virtiofsd` process, which maps guest memory (our memfd) itself;
//! the VMM only sets the device up and relays interrupts.
//!
//! `config.rs` is the tag and device config space, `device.rs` the vhost-user
//! frontend and the interrupt relay.

mod config;
mod device;

pub use config::{FsTag, FsTagError};
pub use device::{FsError, VhostUserFs};
