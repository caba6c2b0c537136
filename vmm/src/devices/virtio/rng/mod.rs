//! virtio-rng: entropy for the guest, so that nothing in it (the agent's TLS,
//! getrandom() at boot) ever stalls waiting for the entropy pool.
//!
//! `device.rs` is the device (no config, one queue) and its worker thread;
//! `queue.rs` walks the queue, testable without a VM.

mod device;
mod queue;

pub use device::Rng;
