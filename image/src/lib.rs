//! The image store of the `bulkhead` CLI: pull from registries, load archives,
//! list, look up and remove images, each unpacked once into a root file system.
//!
//! bulkhead runs containers from a plain directory (`bulkhead run --rootfs DIR`);
//! this crate turns images into such directories without containerd or Docker:
//!
//! - [`Store::pull`] fetches from an OCI/Docker registry (oci-client), choosing
//!   linux/amd64 from multi-platform indexes;
//! - [`Store::load`] reads OCI image layouts and `docker save` tarballs;
//! - [`Store::rootfs`] is the unpacked, immutable root file system of an image,
//!   which the CLI mounts read-only as an overlay's lower directory.
//!
//! Every blob is verified against its digest while streaming and every layer
//! against the config's diff id while unpacking. Work happens in private
//! directories under the store's `tmp/` and becomes visible only by renames under
//! an exclusive lock, the index last: an interrupted or failed operation leaves
//! the store as it was, and several processes can share one store.

#![warn(missing_docs)]

mod archive;
mod auth;
mod blobs;
mod config;
mod digest;
mod error;
mod index;
mod layer;
mod load;
mod lock;
mod manifest;
mod progress;
mod pull;
mod record;
mod reference;
mod store;
mod unpack;
mod workdir;

pub use error::{Result, StoreError};
pub use load::LoadOptions;
pub use pull::PullOptions;
pub use record::{ImageRecord, Removed, RunConfig};
pub use reference::{familiar, normalize};
pub use store::Store;
