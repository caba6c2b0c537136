//! The one error type of the image store.
//!
//! The CLI prints these to a person who typed `bulkhead pull` or `bulkhead load`,
//! so each message names the thing involved (image, registry, blob, file) and,
//! where there is one, what to do about it. Source errors are chained, not pasted.

use std::path::PathBuf;

/// Everything that can go wrong in the image store.
///
/// Exists so the CLI gets one error type whose messages already carry the image,
/// registry, blob or file involved and say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("Cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "create directory".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An image reference that does not follow Docker's naming rules.
    #[error("Invalid image reference {reference:?}: {reason} (expected e.g. `busybox`, `busybox:1.36`, `registry.example.com:5000/team/app@sha256:<64 hex digits>`)")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No image in the store has this name or id.
    #[error("No such image: {reference} (`bulkhead images` lists the store; `bulkhead pull {reference}` fetches it)")]
    NotFound {
        /// The name or id as given.
        reference: String,
    },

    /// An id prefix that matches several images.
    #[error("Image id prefix {prefix} is ambiguous: it matches {}; give more digits", candidates.join(", "))]
    AmbiguousId {
        /// The prefix as given.
        prefix: String,
        /// The ids it matches.
        candidates: Vec<String>,
    },

    /// The registry could not be connected to (down, wrong port, DNS, TLS).
    #[error("Could not reach registry {registry} while pulling {reference}: {detail}. Check that the registry is running and reachable{hint}")]
    RegistryUnreachable {
        /// The registry host\[:port\].
        registry: String,
        /// The image being pulled.
        reference: String,
        /// The transport error, flattened with its causes.
        detail: String,
        /// A hint about plain HTTP, or empty.
        hint: String,
    },

    /// The registry says the repository, tag or digest does not exist.
    #[error(
        "Image {reference} not found in registry {registry}: {detail}. Check the name and tag"
    )]
    RemoteNotFound {
        /// The image being pulled.
        reference: String,
        /// The registry host\[:port\].
        registry: String,
        /// What the registry answered.
        detail: String,
    },

    /// The registry wants credentials, or refused the ones given.
    #[error("Registry {registry} denied access to {reference} ({detail}). If the repository exists and is private, log in (`docker login {registry}`) so that {config} holds credentials for it")]
    Unauthorized {
        /// The image being pulled.
        reference: String,
        /// The registry host\[:port\].
        registry: String,
        /// What the registry answered.
        detail: String,
        /// The Docker config file credentials are read from.
        config: String,
    },

    /// Any other failure of a registry request.
    #[error("Registry {registry} failed while {action} for {reference}: {detail}")]
    Registry {
        /// The registry host\[:port\].
        registry: String,
        /// What was being fetched, e.g. "fetching the manifest".
        action: String,
        /// The image being pulled.
        reference: String,
        /// The error, flattened with its causes.
        detail: String,
    },

    /// Content did not match its digest: corrupt in the registry, in transit or in
    /// the archive. Nothing was stored.
    #[error("Digest mismatch for {what} {blob}: expected {expected}, got {actual}. The source holds corrupt or tampered data; nothing was stored")]
    DigestMismatch {
        /// What was checked, e.g. "blob" or "uncompressed layer".
        what: &'static str,
        /// The blob (or layer) involved.
        blob: String,
        /// The digest the manifest or config promises.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },

    /// Content did not have the size its descriptor promises. Nothing was stored.
    #[error("Size mismatch for blob {blob}: the manifest says {expected} bytes, {actual} arrived; nothing was stored")]
    SizeMismatch {
        /// The blob involved.
        blob: String,
        /// The size from the descriptor.
        expected: u64,
        /// The size that arrived.
        actual: u64,
    },

    /// A Docker image manifest of schema 1, which is deprecated and unsupported.
    #[error("{reference} has a Docker schema 1 manifest, which bulkhead does not support (Docker dropped it too); re-push the image with a current Docker, buildah or skopeo")]
    SchemaV1 {
        /// The image involved.
        reference: String,
    },

    /// A manifest bulkhead cannot use (unknown media type, malformed JSON, ...).
    #[error("Unusable manifest {digest} of {reference}: {reason}")]
    InvalidManifest {
        /// The image involved.
        reference: String,
        /// The manifest's digest, or "(tag)" when not known.
        digest: String,
        /// What is wrong.
        reason: String,
    },

    /// A multi-platform image without a linux/amd64 variant.
    #[error("{reference} has no linux/amd64 image (bulkhead runs linux/amd64 VMs); it offers: {platforms}")]
    NoMatchingPlatform {
        /// The image involved.
        reference: String,
        /// The platforms the index lists.
        platforms: String,
    },

    /// A layer media type bulkhead refuses (foreign, non-distributable, unknown).
    #[error("Layer {digest} of {reference} has media type {media_type}: {reason}")]
    UnsupportedLayer {
        /// The image involved.
        reference: String,
        /// The layer's digest.
        digest: String,
        /// Its media type.
        media_type: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// An image config that is not valid JSON or lacks what bulkhead needs.
    #[error("Image config {digest} of {reference} is invalid: {reason}")]
    InvalidConfig {
        /// The image involved.
        reference: String,
        /// The config blob's digest.
        digest: String,
        /// What is wrong.
        reason: String,
    },

    /// A layer entry that would write outside the root file system, or that the
    /// unpacker cannot represent safely. Nothing was stored.
    #[error("Layer {layer} has an unsafe entry {entry:?}: {reason}; refusing the image, nothing was stored")]
    UnsafeEntry {
        /// The layer's digest.
        layer: String,
        /// The entry's path as stored in the layer.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Applying a layer entry to the root file system failed.
    #[error("Unpacking layer {layer}: cannot {action} {entry:?}: {source}")]
    Unpack {
        /// The layer's digest.
        layer: String,
        /// The entry's path inside the layer.
        entry: String,
        /// What was being done, e.g. "create file".
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A layer that is not a readable (compressed) tar stream.
    #[error("Layer {layer} is not a valid {format} tar stream: {source}")]
    CorruptLayer {
        /// The layer's digest.
        layer: String,
        /// "plain", "gzip" or "zstd".
        format: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file given to `load` that is not an image archive at all.
    #[error("{path} is not an image archive: {reason}. `bulkhead load` takes an OCI image layout (a directory or a tar of one) or a `docker save` tarball")]
    NotAnImage {
        /// The file or directory given.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },

    /// An image archive whose structure is broken (missing blobs, bad JSON, ...).
    #[error("Invalid image archive {path}: {reason}")]
    InvalidArchive {
        /// The file or directory given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// `LoadOptions::tag` given for an archive with several unnamed images.
    #[error("{path} holds {count} images without a name; a tag can name only one, so load it without one and tag by id")]
    AmbiguousTag {
        /// The archive.
        path: PathBuf,
        /// How many unnamed images it holds.
        count: usize,
    },

    /// The Docker config file with registry credentials cannot be used.
    #[error("Docker config {path} is invalid: {reason}; fix or remove it (it holds registry credentials, as written by `docker login`)")]
    DockerConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A credential helper named in the Docker config failed.
    #[error("Credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    CredentialHelper {
        /// The helper's suffix, e.g. "pass".
        helper: String,
        /// The registry credentials were asked for.
        registry: String,
        /// What went wrong.
        reason: String,
    },

    /// The store's index of images is unreadable.
    #[error("The image index {path} is corrupt: {reason}; move it away to start an empty store (the blobs and root file systems next to it are then garbage)")]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The kernel lacks openat2(2) (Linux 5.6), which unpacking relies on to
    /// keep layer entries inside the root file system.
    #[error("Unpacking needs openat2(2) with RESOLVE_IN_ROOT (Linux 5.6 or later); this kernel does not have it: {source}")]
    KernelTooOld {
        /// The error openat2 returned.
        #[source]
        source: std::io::Error,
    },

    /// A background task (unpacking) panicked or was cancelled.
    #[error("The {what} task failed: {detail}")]
    Task {
        /// Which task.
        what: &'static str,
        /// How it failed.
        detail: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Extension to turn an [`std::io::Result`] into a [`StoreError::Io`] naming a path.
pub(crate) trait IoContext<T> {
    /// Attach the action and the path to an I/O error.
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            action,
            path: path.into(),
            source,
        })
    }
}

/// An error and all its sources on one line, for messages that flatten them.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
