//! `bulkhead`: the host side of bulkhead's sandboxes.
//!
//! [`sandbox`] starts and stops one microVM with its agent and virtiofsd; the
//! CLI (`bulkhead run`) and, later, the containerd shim are built on it.

pub mod cli;
pub mod sandbox;
