//! `bulkhead pull`: an image from an OCI/Docker registry, through oci-client.
//!
//! The manifest (the linux/amd64 one of an index) and config come first; if the
//! store already has the image, only its new name is recorded. Otherwise the
//! layers are downloaded (three at a time, skipping blobs the store has) into the
//! pull's work directory, hashed as they stream in, then unpacked and committed.
//! Any failure drops the work directory: the store is left as it was.

use std::path::PathBuf;

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use crate::blobs::Staging;
use crate::digest::{sha256_of, Hasher};
use crate::error::{chain, IoContext, Result, StoreError};
use crate::index::StoredImage;
use crate::manifest::{self, Manifest, ACCEPTED_MANIFEST_TYPES};
use crate::progress::{Bar, Progress};
use crate::record::ImageRecord;
use crate::reference::{self, allows_plain_http};
use crate::{auth, config, Store};

/// Layers downloaded at once.
const CONCURRENT_DOWNLOADS: usize = 3;
/// How long connecting to a registry may take before it counts as unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a registry may stay silent mid-transfer.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How to pull.
///
/// Exists so the CLI's flags and config file map onto one value.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host:port`, or `host` for any port) that may be spoken to over
    /// plain HTTP. `localhost`, 127.0.0.0/8 and `[::1]` always may, on any port.
    pub insecure_registries: Vec<String>,
    /// The Docker config file with credentials; default
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Per-layer progress bars on stderr (the CLI passes `stderr.is_terminal()`).
    pub progress: bool,
}

/// One pull's connection to its registry, and what error messages need.
struct Remote {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    /// The normalized name, for messages.
    name: String,
    registry: String,
    config_path: PathBuf,
    plain_http: bool,
}

impl Store {
    /// Pulls `reference` from its registry and returns the stored image.
    ///
    /// Needs a Tokio runtime (unpacking runs on its blocking pool). Fails with
    /// a message naming the registry if it cannot be reached, the image if it does
    /// not exist, and the blob with both digests if content does not match.
    pub async fn pull(&self, reference: &str, opts: &PullOptions) -> Result<ImageRecord> {
        let remote = Remote::new(reference, opts)?;
        tracing::info!(image = %remote.name, "pulling");
        let progress = Progress::new(opts.progress);
        let work = self.work_dir("pull")?;
        let staging = Staging::new(work.path())?;

        // The manifest, resolving an index to its linux/amd64 entry.
        let (top_bytes, top_digest) = remote.manifest(&remote.reference).await?;
        let mut blobs = vec![top_digest.clone()];
        staging.write_bytes(&top_bytes, &top_digest, Some(&top_digest))?;
        let (image_manifest, manifest_digest) =
            match manifest::parse(&top_bytes, &remote.name, &top_digest)? {
                Manifest::Image(m) => (*m, top_digest.clone()),
                Manifest::Index(index) => {
                    let chosen = manifest::choose_platform(&index, &remote.name)?;
                    tracing::debug!(index = %top_digest, manifest = %chosen, "chose linux/amd64");
                    let by_digest = remote.reference.clone_with_digest(chosen.clone());
                    let (bytes, digest) = remote.manifest(&by_digest).await?;
                    staging.write_bytes(&bytes, &digest, Some(&chosen))?;
                    blobs.push(digest.clone());
                    match manifest::parse(&bytes, &remote.name, &digest)? {
                        Manifest::Image(m) => (*m, digest),
                        Manifest::Index(_) => {
                            return Err(StoreError::InvalidManifest {
                                reference: remote.name.clone(),
                                digest,
                                reason: "an index entry for linux/amd64 is itself an index".into(),
                            })
                        }
                    }
                }
            };

        // The config: the image id, run defaults and diff ids.
        let config_desc = &image_manifest.config;
        remote
            .fetch_blob(
                config_desc,
                &staging,
                &Bar::none(),
                "fetching the image config",
            )
            .await?;
        let config_bytes = staging.read(&config_desc.digest)?;
        let id = config_desc.digest.clone();
        let config = config::parse(&config_bytes, &remote.name, &id)?;
        config.check_platform(&remote.name, &id)?;
        let layers = manifest::layers(&image_manifest, &remote.name)?;
        check_layer_count(layers.len(), &config.diff_ids, &remote.name, &id)?;
        blobs.push(id.clone());
        blobs.extend(layers.iter().map(|l| l.digest.clone()));

        let image = StoredImage {
            record: ImageRecord {
                id: id.clone(),
                names: vec![remote.name.clone()],
                repo_digests: vec![format!(
                    "{}@{top_digest}",
                    reference::repository_name(&remote.reference)
                )],
                manifest_digest,
                size: 0,
                created: config.created.clone(),
                config: config.run.clone(),
            },
            blobs,
        };
        if self.index()?.by_id(&id).is_some() {
            if let Some(record) = self.commit(&staging, None, image.clone())? {
                tracing::info!(image = %remote.name, id = %id, "image already in the store");
                return Ok(record);
            }
        }

        // The layers, then unpack and commit off the async threads.
        futures_util::stream::iter(&layers)
            .map(|layer| {
                let desc = OciDescriptor {
                    digest: layer.digest.clone(),
                    size: layer.size as i64,
                    ..Default::default()
                };
                let bar = progress.bar(&layer.digest, "downloading", Some(layer.size));
                let (remote, staging) = (&remote, &staging);
                async move {
                    if self.blobs.hold(&desc.digest, staging)? {
                        bar.finish("exists");
                        return Ok(());
                    }
                    remote
                        .fetch_blob(&desc, staging, &bar, "downloading a layer")
                        .await?;
                    bar.finish("downloaded");
                    Ok::<_, StoreError>(())
                }
            })
            .buffer_unordered(CONCURRENT_DOWNLOADS)
            .try_collect::<Vec<()>>()
            .await?;

        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let (rootfs, size) =
                store.unpack(&work, &staging, &layers, &config.diff_ids, &progress)?;
            let mut image = image;
            image.record.size = size;
            let record = store.commit(&staging, Some(&rootfs), image)?;
            Ok(record.expect("committing with an unpacked root file system stores the image"))
        })
        .await
        .map_err(|e| StoreError::Task {
            what: "unpacking",
            detail: e.to_string(),
        })?
    }
}

/// The manifest's layers and the config's diff ids must pair up.
pub(crate) fn check_layer_count(
    layers: usize,
    diff_ids: &[String],
    reference: &str,
    config_digest: &str,
) -> Result<()> {
    if layers == diff_ids.len() {
        return Ok(());
    }
    Err(StoreError::InvalidConfig {
        reference: reference.to_owned(),
        digest: config_digest.to_owned(),
        reason: format!(
            "the manifest has {layers} layers but the config lists {} diff ids",
            diff_ids.len()
        ),
    })
}

impl Remote {
    fn new(reference: &str, opts: &PullOptions) -> Result<Remote> {
        let parsed = reference::parse(reference)?;
        let registry = parsed.registry().to_owned();
        let plain_http = allows_plain_http(&registry, &opts.insecure_registries);
        // oci-client compares the registry it resolves (index.docker.io for
        // Docker Hub) against this list.
        let mut http_registries = opts.insecure_registries.clone();
        if plain_http {
            http_registries.push(parsed.resolve_registry().to_owned());
        }
        // reqwest is built without a default TLS provider (see Cargo.toml).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(http_registries),
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| StoreError::Registry {
            registry: registry.clone(),
            action: "setting up the HTTP client".into(),
            reference: parsed.whole(),
            detail: chain(&e),
        })?;
        let config_path = auth::config_path(opts.docker_config.as_deref());
        let auth = auth::credentials(&registry, &config_path)?;
        Ok(Remote {
            client,
            auth,
            name: parsed.whole(),
            reference: parsed,
            registry,
            config_path,
            plain_http,
        })
    }

    /// The manifest `reference` points at: its bytes and digest, verified.
    async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String)> {
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|e| self.error("fetching the manifest", e))?;
        // oci-client checked the body against the registry's digest header and a
        // digest in the reference; check ourselves too, it is what we store.
        let actual = sha256_of(&bytes);
        let expected = reference.digest().unwrap_or(&digest);
        if actual != expected {
            return Err(StoreError::DigestMismatch {
                what: "manifest",
                blob: format!("of {}", self.name),
                expected: expected.to_owned(),
                actual,
            });
        }
        Ok((bytes.to_vec(), actual))
    }

    /// Download blob `desc` into `staging`, hashing as it streams in; staged only
    /// if digest and size match.
    async fn fetch_blob(
        &self,
        desc: &OciDescriptor,
        staging: &Staging,
        bar: &Bar,
        action: &str,
    ) -> Result<()> {
        if staging.contains(&desc.digest) {
            return Ok(());
        }
        let action = format!("{action} {}", desc.digest);
        // The client authenticates on the first request of a pull; blobs may be
        // the first when the manifest came from elsewhere, so make sure.
        self.client
            .store_auth_if_needed(self.reference.resolve_registry(), &self.auth)
            .await;
        let sized = self
            .client
            .pull_blob_stream(&self.reference, desc)
            .await
            .map_err(|e| self.error(&action, e))?;
        if let Some(length) = sized.content_length {
            bar.set_length(length);
        }
        let incoming = staging.incoming_path();
        let mut file = tokio::fs::File::create(&incoming)
            .await
            .at("create", &incoming)?;
        let mut hasher = Hasher::default();
        let mut stream = sized.stream;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    hasher.update(&bytes);
                    file.write_all(&bytes).await.at("write", &incoming)?;
                    bar.inc(bytes.len() as u64);
                }
                // oci-client's own check at the end; ours below names the blob.
                Err(e) if is_digest_error(&e) => break,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&incoming).await;
                    return Err(StoreError::Registry {
                        registry: self.registry.clone(),
                        action,
                        reference: self.name.clone(),
                        detail: chain(&e),
                    });
                }
            }
        }
        file.sync_all().await.at("fsync", &incoming)?;
        drop(file);
        let size = hasher.len();
        staging.accept(
            &incoming,
            &desc.digest,
            hasher.finish(),
            size,
            Some(&desc.digest),
            u64::try_from(desc.size).ok(),
        )?;
        Ok(())
    }

    /// A registry error in words: unreachable, not found, denied, or otherwise.
    fn error(&self, action: &str, error: OciDistributionError) -> StoreError {
        let registry = self.registry.clone();
        let reference = self.name.clone();
        let detail = chain(&error);
        let denied = || StoreError::Unauthorized {
            reference: reference.clone(),
            registry: registry.clone(),
            detail: detail.clone(),
            config: self.config_path.display().to_string(),
        };
        let not_found = || StoreError::RemoteNotFound {
            reference: reference.clone(),
            registry: registry.clone(),
            detail: detail.clone(),
        };
        match &error {
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                StoreError::RegistryUnreachable {
                    registry: registry.clone(),
                    reference: reference.clone(),
                    detail: detail.clone(),
                    hint: if self.plain_http {
                        String::new()
                    } else {
                        format!(
                            " over HTTPS (if it serves plain HTTP, list {registry} in the insecure registries)"
                        )
                    },
                }
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => denied(),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    denied()
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    not_found()
                } else {
                    self.other(action, detail)
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => not_found(),
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => denied(),
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => StoreError::DigestMismatch {
                what: "manifest",
                blob: format!("of {reference}"),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            OciDistributionError::UnsupportedSchemaVersionError(1) => {
                StoreError::SchemaV1 { reference }
            }
            _ => self.other(action, detail),
        }
    }

    fn other(&self, action: &str, detail: String) -> StoreError {
        StoreError::Registry {
            registry: self.registry.clone(),
            action: action.to_owned(),
            reference: self.name.clone(),
            detail,
        }
    }
}

/// Whether a stream error is oci-client's digest verification failing.
fn is_digest_error(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some())
}
