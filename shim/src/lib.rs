//! `bulkhead`: the host side of bulkhead's sandboxes.
//!
//! [`sandbox`] starts and stops one microVM with its agent and virtiofsd; the
//! CLI (`bulkhead run`) and the containerd shim ([`containerd`]) are built on it.

pub mod cli;
pub mod config;
pub mod containerd;
pub mod random;
pub mod runtime;
pub mod sandbox;
