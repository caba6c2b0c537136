//! Test support for bulkhead's end-to-end tests: the emulated KVM host and friends.
//!
//! The development machines' `/dev/kvm` is the PVM hypervisor, which cannot boot a
//! stock guest kernel, so end-to-end tests run inside an emulated hardware-KVM host
//! ([`testhost`]). The pieces it is made of are useful on their own: KVM detection
//! ([`kvm`]), an artifact cache ([`cache`]), initramfs building ([`initramfs`]),
//! shell quoting ([`shell`]) and deadline-bound helper processes ([`process`]).
//!
//! For tests through containerd: OCI image archives made from a rootfs directory
//! ([`oci_image`]), a private containerd daemon owned by the test ([`containerd`])
//! and a blocking CRI client ([`cri`]).

#![warn(missing_docs)]

pub mod cache;
pub mod containerd;
pub mod cri;
pub mod error;
pub mod initramfs;
pub mod kvm;
pub mod oci_image;
pub mod process;
pub mod registry;
pub mod shell;
pub mod testhost;

pub use error::{Error, Result};
pub use testhost::{ensure_assets, Assets, Outcome, TestHost, TestHostBuilder};
