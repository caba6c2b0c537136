//! Emulated devices. Each faces the guest, so each treats guest input as hostile.

pub mod console;
pub mod legacy;
pub mod mmio_bus;
pub mod virtio;
