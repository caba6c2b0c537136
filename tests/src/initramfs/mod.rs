//! Building initramfs images: a newc cpio writer and busybox-based initrds.
//!
//! Used for the emulated host's own initramfs and, later, for the test initrds of
//! guests booted inside it.

pub mod busybox;
pub mod cpio;

pub use busybox::{busybox_archive, busybox_initrd, is_static_elf, Busybox, BUSYBOX_PATH};
pub use cpio::CpioWriter;
