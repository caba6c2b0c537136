//! `bulkhead load`: images from an OCI image layout (a directory, or a tar of
//! one, as `skopeo copy ... oci-archive:` or `docker save` of Docker 25+ writes)
//! or a legacy `docker save` tarball (`manifest.json` with `RepoTags`).
//!
//! Every blob is checked against its digest while being copied into the load's
//! work directory, and layers against the config's diff ids while unpacking;
//! each image is committed on its own, as a pull is.

use std::path::{Path, PathBuf};

use oci_client::manifest::{OciImageIndex, OciImageManifest};
use serde::Deserialize;
use serde_json::json;

use crate::archive::Archive;
use crate::blobs::Staging;
use crate::digest::{sha256_hex, sha256_of};
use crate::error::{IoContext, Result, StoreError};
use crate::index::StoredImage;
use crate::layer::sniff_reader;
use crate::manifest::{self, Layer, Manifest};
use crate::progress::Progress;
use crate::pull::check_layer_count;
use crate::record::ImageRecord;
use crate::reference::normalize;
use crate::{config, Store};

/// The annotation containerd and Docker put the full image name in.
const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The OCI annotation naming a manifest in a layout: usually just a tag.
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// buildx marks attestation manifests in an index with this annotation.
const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

/// How to load.
///
/// Exists so the CLI's `load` flags map onto one value.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The name to give an image the archive does not name (with several unnamed
    /// images in the archive, this is an error).
    pub tag: Option<String>,
    /// Per-layer progress bars on stderr.
    pub progress: bool,
}

/// One `docker save` manifest.json entry.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image found in the archive, before import.
struct Candidate {
    names: Vec<String>,
    source: Source,
}

enum Source {
    /// An OCI manifest (or index) blob of the layout.
    Oci { digest: String },
    /// A legacy `docker save` entry.
    DockerSave { config: String, layers: Vec<String> },
}

impl Store {
    /// Loads every linux/amd64 image of the archive at `path` (an OCI image layout
    /// directory, a tar of one, or a `docker save` tarball; gzip or zstd
    /// compression is fine) and returns them as stored.
    pub fn load(&self, path: &Path, opts: &LoadOptions) -> Result<Vec<ImageRecord>> {
        let work = self.work_dir("load")?;
        let archive = Archive::open(path, work.path())?;
        let mut candidates = if archive.contains("index.json") {
            oci_candidates(&archive, path)?
        } else if archive.contains("manifest.json") {
            docker_save_candidates(&archive, path)?
        } else {
            return Err(StoreError::NotAnImage {
                path: path.to_path_buf(),
                reason: "it has neither index.json (an OCI image layout) nor manifest.json \
                         (a `docker save` tarball)"
                    .into(),
            });
        };
        if candidates.is_empty() {
            return Err(StoreError::InvalidArchive {
                path: path.to_path_buf(),
                reason: "it holds no linux/amd64 container image".into(),
            });
        }
        name_unnamed(&mut candidates, opts.tag.as_deref(), path)?;

        let progress = Progress::new(opts.progress);
        let mut loaded = Vec::new();
        for candidate in candidates {
            let record = self.load_one(&archive, path, candidate, &progress)?;
            tracing::info!(id = %record.id, names = ?record.names, "loaded");
            loaded.push(record);
        }
        Ok(loaded)
    }

    fn load_one(
        &self,
        archive: &Archive,
        path: &Path,
        candidate: Candidate,
        progress: &Progress,
    ) -> Result<ImageRecord> {
        let work = self.work_dir("load")?;
        let staging = Staging::new(work.path())?;
        let label = candidate
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| path.display().to_string());
        let read = |name: &str| -> Result<Vec<u8>> {
            archive
                .read(name)
                .at("read from the archive", path.join(name))?
                .ok_or_else(|| StoreError::InvalidArchive {
                    path: path.to_path_buf(),
                    reason: format!("it lacks {name}, which its manifest names"),
                })
        };

        // Manifest and config first: the image may be in the store already.
        let (manifest_digest, config_bytes, layer_sources, mut blobs) = match &candidate.source {
            Source::Oci { digest } => {
                let (manifest, manifest_digest, blobs) =
                    oci_image_manifest(archive, path, digest, &label, &staging)?;
                let config_digest = manifest.config.digest.clone();
                let bytes = read(&blob_name(&config_digest))?;
                staging.write_bytes(&bytes, &config_digest, Some(&config_digest))?;
                let layers = manifest::layers(&manifest, &label)?;
                let sources: Vec<(String, Option<Layer>)> = layers
                    .into_iter()
                    .map(|l| (blob_name(&l.digest), Some(l)))
                    .collect();
                (manifest_digest, bytes, sources, blobs)
            }
            Source::DockerSave { config, layers } => {
                let bytes = read(config)?;
                let digest = sha256_of(&bytes);
                staging.write_bytes(&bytes, &digest, expected_from_name(config).as_deref())?;
                let sources = layers.iter().map(|l| (l.clone(), None)).collect();
                (String::new(), bytes, sources, Vec::new())
            }
        };
        let id = sha256_of(&config_bytes);
        let config = config::parse(&config_bytes, &label, &id)?;
        config.check_platform(&label, &id)?;
        check_layer_count(layer_sources.len(), &config.diff_ids, &label, &id)?;

        let mut image = StoredImage {
            record: ImageRecord {
                id: id.clone(),
                names: candidate.names.clone(),
                repo_digests: Vec::new(),
                manifest_digest,
                size: 0,
                created: config.created.clone(),
                config: config.run.clone(),
            },
            blobs: Vec::new(),
        };
        if self.index()?.by_id(&id).is_some() {
            // Same config, same layers: only the names (and manifest) are new.
            let mut known = image.clone();
            known.blobs = blobs.iter().chain([&id]).cloned().collect();
            if let Some(record) = self.commit(&staging, None, known)? {
                return Ok(record);
            }
        }

        // Layers, copied into the work directory and checked.
        let mut layers = Vec::new();
        for (name, known) in layer_sources {
            let layer = match known {
                Some(layer) => {
                    if !self.blobs.hold(&layer.digest, &staging)? {
                        let reader = archive
                            .open_member(&name)
                            .at("read from the archive", path.join(&name))?
                            .ok_or_else(|| StoreError::InvalidArchive {
                                path: path.to_path_buf(),
                                reason: format!("it lacks layer {name}"),
                            })?;
                        staging.write_from(
                            reader,
                            &layer.digest,
                            Some(&layer.digest),
                            Some(layer.size),
                        )?;
                    }
                    layer
                }
                None => self.stage_docker_layer(archive, path, &name, &staging)?,
            };
            layers.push(layer);
        }
        if image.record.manifest_digest.is_empty() {
            let manifest = synthesized_manifest(&id, config_bytes.len(), &layers);
            let digest = sha256_of(&manifest);
            staging.write_bytes(&manifest, &digest, Some(&digest))?;
            image.record.manifest_digest = digest.clone();
            blobs.push(digest);
        }
        blobs.push(id.clone());
        blobs.extend(layers.iter().map(|l| l.digest.clone()));
        image.blobs = blobs;

        let (rootfs, size) = self.unpack(&work, &staging, &layers, &config.diff_ids, progress)?;
        image.record.size = size;
        let record = self.commit(&staging, Some(&rootfs), image)?;
        Ok(record.expect("committing with an unpacked root file system stores the image"))
    }

    /// Stage a `docker save` layer (a tar, maybe compressed, no digest given),
    /// learning its digest and compression.
    fn stage_docker_layer(
        &self,
        archive: &Archive,
        path: &Path,
        name: &str,
        staging: &Staging,
    ) -> Result<Layer> {
        let open = || -> Result<_> {
            archive
                .open_member(name)
                .at("read from the archive", path.join(name))?
                .ok_or_else(|| StoreError::InvalidArchive {
                    path: path.to_path_buf(),
                    reason: format!("it lacks layer {name}, which manifest.json names"),
                })
        };
        let (compression, _) =
            sniff_reader(open()?).at("read from the archive", path.join(name))?;
        let expected = expected_from_name(name);
        let (digest, size) = staging.write_from(open()?, name, expected.as_deref(), None)?;
        Ok(Layer {
            digest,
            size,
            compression,
        })
    }
}

/// The archive path of blob `digest` in an OCI layout.
fn blob_name(digest: &str) -> String {
    format!(
        "blobs/sha256/{}",
        sha256_hex(digest).unwrap_or("invalid-digest")
    )
}

/// The digest a content-addressed member name (`blobs/sha256/<hex>`, or
/// `<hex>.json` as legacy `docker save` names configs) promises.
fn expected_from_name(name: &str) -> Option<String> {
    let file = name.rsplit('/').next()?;
    let hex = file.strip_suffix(".json").unwrap_or(file);
    let digest = format!("sha256:{hex}");
    let content_addressed = name.starts_with("blobs/sha256/") || file.ends_with(".json");
    (content_addressed && sha256_hex(&digest).is_some()).then_some(digest)
}

/// The image manifest of layout blob `digest` (resolving an index to its
/// linux/amd64 entry), with the blobs read so far staged; returns it, its digest
/// and the digests of the manifest blobs to keep.
fn oci_image_manifest(
    archive: &Archive,
    path: &Path,
    digest: &str,
    label: &str,
    staging: &Staging,
) -> Result<(OciImageManifest, String, Vec<String>)> {
    let mut digest = digest.to_owned();
    let mut kept = Vec::new();
    // An index may point at an index (docker save of Docker 25+ does): a few levels.
    for _ in 0..4 {
        let bytes = archive
            .read(&blob_name(&digest))
            .at("read from the archive", path.join(blob_name(&digest)))?
            .ok_or_else(|| StoreError::InvalidArchive {
                path: path.to_path_buf(),
                reason: format!("it lacks manifest blob {digest}"),
            })?;
        staging.write_bytes(&bytes, &digest, Some(&digest))?;
        kept.push(digest.clone());
        match manifest::parse(&bytes, label, &digest)? {
            Manifest::Image(m) => return Ok((*m, digest, kept)),
            Manifest::Index(index) => digest = manifest::choose_platform(&index, label)?,
        }
    }
    Err(StoreError::InvalidArchive {
        path: path.to_path_buf(),
        reason: "its indexes nest too deeply".into(),
    })
}

/// The images of an OCI layout's index.json, with the names its annotations
/// (or a `docker save` manifest.json beside it) give.
fn oci_candidates(archive: &Archive, path: &Path) -> Result<Vec<Candidate>> {
    let invalid = |reason: String| StoreError::InvalidArchive {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = archive
        .read("index.json")
        .at("read from the archive", path.join("index.json"))?
        .unwrap_or_default();
    let index: OciImageIndex = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("its index.json is not an OCI image index: {e}")))?;
    if !archive.contains("oci-layout") {
        tracing::warn!(archive = %path.display(), "no oci-layout file; reading index.json anyway");
    }
    let docker_tags = docker_save_tags(archive);
    let mut candidates = Vec::new();
    for entry in &index.manifests {
        let annotations = entry.annotations.clone().unwrap_or_default();
        if annotations.contains_key(ANNOTATION_REFERENCE_TYPE) {
            continue; // an attestation, not an image
        }
        if let Some(platform) = &entry.platform {
            let (os, arch) = (platform.os.to_string(), platform.architecture.to_string());
            if os != "linux" || arch != "amd64" {
                tracing::info!(digest = %entry.digest, "skipping {os}/{arch} image");
                continue;
            }
        }
        let mut names = Vec::new();
        if let Some(name) = annotations.get(ANNOTATION_IMAGE_NAME) {
            names.extend(normalize_or_warn(name));
        }
        if let Some(name) = annotations.get(ANNOTATION_REF_NAME) {
            // A bare tag names no repository: only full references count.
            if name.contains('/') || name.contains(':') || name.contains('@') {
                names.extend(normalize_or_warn(name));
            }
        }
        for (config_path, tags) in &docker_tags {
            // Docker 25+ saves both; its manifest.json names the config blob.
            if manifest_config(archive, &entry.digest)
                .is_some_and(|c| blob_name(&c) == *config_path)
            {
                names.extend(tags.iter().filter_map(|t| normalize_or_warn(t)));
            }
        }
        names.dedup();
        candidates.push(Candidate {
            names,
            source: Source::Oci {
                digest: entry.digest.clone(),
            },
        });
    }
    Ok(candidates)
}

/// The config digest of the image manifest at layout blob `digest`, if it is one.
fn manifest_config(archive: &Archive, digest: &str) -> Option<String> {
    let bytes = archive.read(&blob_name(digest)).ok()??;
    let manifest: OciImageManifest = serde_json::from_slice(&bytes).ok()?;
    Some(manifest.config.digest)
}

/// `Config` path -> `RepoTags` of a `docker save` manifest.json, if there is one.
fn docker_save_tags(archive: &Archive) -> Vec<(String, Vec<String>)> {
    let Ok(Some(bytes)) = archive.read("manifest.json") else {
        return Vec::new();
    };
    let entries: Vec<DockerSaveEntry> = serde_json::from_slice(&bytes).unwrap_or_default();
    entries
        .into_iter()
        .map(|e| (e.config, e.repo_tags.unwrap_or_default()))
        .collect()
}

/// The images of a legacy `docker save` manifest.json.
fn docker_save_candidates(archive: &Archive, path: &Path) -> Result<Vec<Candidate>> {
    let bytes = archive
        .read("manifest.json")
        .at("read from the archive", path.join("manifest.json"))?
        .unwrap_or_default();
    let entries: Vec<DockerSaveEntry> =
        serde_json::from_slice(&bytes).map_err(|e| StoreError::InvalidArchive {
            path: path.to_path_buf(),
            reason: format!("its manifest.json is not a `docker save` manifest: {e}"),
        })?;
    Ok(entries
        .into_iter()
        .map(|e| Candidate {
            names: e
                .repo_tags
                .unwrap_or_default()
                .iter()
                .filter_map(|t| normalize_or_warn(t))
                .collect(),
            source: Source::DockerSave {
                config: e.config,
                layers: e.layers,
            },
        })
        .collect())
}

fn normalize_or_warn(name: &str) -> Option<String> {
    match normalize(name) {
        Ok(name) => Some(name),
        Err(e) => {
            tracing::warn!("ignoring the archive's image name: {e}");
            None
        }
    }
}

/// Give `tag` to the one image without a name.
fn name_unnamed(candidates: &mut [Candidate], tag: Option<&str>, path: &Path) -> Result<()> {
    let Some(tag) = tag else {
        return Ok(());
    };
    let name = normalize(tag)?;
    let mut unnamed: Vec<&mut Candidate> = candidates
        .iter_mut()
        .filter(|c| c.names.is_empty())
        .collect();
    match unnamed.as_mut_slice() {
        [] => tracing::info!(tag, "every image of the archive has a name; not tagging"),
        [one] => one.names.push(name),
        many => {
            return Err(StoreError::AmbiguousTag {
                path: PathBuf::from(path),
                count: many.len(),
            })
        }
    }
    Ok(())
}

/// An OCI manifest for an image from a legacy `docker save`, which has none.
fn synthesized_manifest(config_digest: &str, config_size: usize, layers: &[Layer]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| {
            json!({
                "mediaType": l.compression.oci_media_type(),
                "digest": l.digest,
                "size": l.size,
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }))
    .expect("a serde_json::Value always serializes")
}
