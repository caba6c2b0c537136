//! What the store tells its users about an image: [`ImageRecord`], [`RunConfig`]
//! and what a removal did ([`Removed`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One image in the store.
///
/// Exists so the CLI can list images, resolve a name to the root file system it
/// mounts and know the image's run defaults without reading any blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<hex>` of the image config blob: the image id, as in Docker.
    pub id: String,
    /// Normalized names pointing at this image (e.g.
    /// `docker.io/library/busybox:latest`); empty for a dangling image.
    pub names: Vec<String>,
    /// `repository@sha256:<digest>` of the manifest (or index) it was pulled by.
    pub repo_digests: Vec<String>,
    /// `sha256:<hex>` of the image manifest (the linux/amd64 one of an index).
    pub manifest_digest: String,
    /// Bytes of the unpacked root file system (regular files, each inode once).
    pub size: u64,
    /// When the image was built (the config's `created`), RFC 3339.
    pub created: Option<String>,
    /// The image's run defaults.
    pub config: RunConfig,
}

/// The run defaults of an image: the `config` object of its image config.
///
/// Exists so `bulkhead run IMAGE` can start what `docker run IMAGE` would, with
/// the same environment, working directory and user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `Entrypoint`: the program and its leading arguments; empty for none.
    pub entrypoint: Vec<String>,
    /// `Cmd`: default arguments, or the command when there is no entrypoint.
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// `WorkingDir`: empty means `/`.
    pub working_dir: String,
    /// `User`: `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
    /// `StopSignal`, e.g. `SIGQUIT`; `None` means SIGTERM.
    pub stop_signal: Option<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
}

/// What [`crate::Store::remove`] did.
///
/// Exists so `bulkhead rmi` can print `Untagged:` and `Deleted:` lines as Docker does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Names taken off their image.
    pub untagged: Vec<String>,
    /// Ids of the images deleted (with their root file system and unshared blobs).
    pub deleted: Vec<String>,
}
