//! Image manifests and indexes (OCI and Docker schema 2), from a registry or an
//! archive: telling them apart, refusing schema 1, picking linux/amd64 out of an
//! index, and listing the layers with how each is compressed.

use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest, Versioned,
    IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};

use crate::digest::sha256_hex;
use crate::error::{Result, StoreError};
use crate::layer::Compression;

/// The OCI image config media type.
const OCI_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The manifest media types bulkhead asks registries for, best first. Schema 1
/// is not among them, so registries that can convert do.
pub(crate) const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

/// A parsed manifest blob.
#[derive(Debug)]
pub(crate) enum Manifest {
    /// An index (manifest list): one manifest per platform.
    Index(OciImageIndex),
    /// One image: config and layers.
    Image(Box<OciImageManifest>),
}

/// One layer of an image manifest, checked to be unpackable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layer {
    /// `sha256:<hex>` of the blob as stored.
    pub(crate) digest: String,
    /// The blob's size as the manifest says.
    pub(crate) size: u64,
    /// How the tar stream is compressed.
    pub(crate) compression: Compression,
}

/// Parse manifest `bytes` of image `reference` (`digest` for messages).
pub(crate) fn parse(bytes: &[u8], reference: &str, digest: &str) -> Result<Manifest> {
    let invalid = |reason: String| StoreError::InvalidManifest {
        reference: reference.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    let versioned: Versioned =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
    match versioned.schema_version {
        2 => {}
        1 => {
            return Err(StoreError::SchemaV1 {
                reference: reference.to_owned(),
            })
        }
        v => return Err(invalid(format!("unknown schemaVersion {v}"))),
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let is_index = match versioned.media_type.as_deref() {
        Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE) => true,
        Some(OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE) => false,
        // The OCI spec makes mediaType optional: tell them apart by shape.
        None => value.get("manifests").is_some(),
        Some(other) => {
            return Err(invalid(format!(
                "media type {other} is not an image manifest or index"
            )))
        }
    };
    if is_index {
        let index: OciImageIndex =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        Ok(Manifest::Index(index))
    } else {
        let manifest: OciImageManifest =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        check_config(&manifest.config, reference, digest)?;
        Ok(Manifest::Image(Box::new(manifest)))
    }
}

/// Refuse artifacts that are not container images (Helm charts, signatures...).
fn check_config(config: &OciDescriptor, reference: &str, digest: &str) -> Result<()> {
    let invalid = |reason: String| StoreError::InvalidManifest {
        reference: reference.to_owned(),
        digest: digest.to_owned(),
        reason,
    };
    if !matches!(
        config.media_type.as_str(),
        OCI_CONFIG_MEDIA_TYPE | IMAGE_DOCKER_CONFIG_MEDIA_TYPE
    ) {
        return Err(invalid(format!(
            "its config has media type {}, so it is not a container image",
            config.media_type
        )));
    }
    if sha256_hex(&config.digest).is_none() {
        return Err(invalid(format!(
            "config digest {:?} is not a sha256 digest",
            config.digest
        )));
    }
    Ok(())
}

/// The digest of the linux/amd64 manifest of `index` (oci-client's resolver),
/// or an error listing the platforms it has.
pub(crate) fn choose_platform(index: &OciImageIndex, reference: &str) -> Result<String> {
    if let Some(digest) = oci_client::client::linux_amd64_resolver(&index.manifests) {
        return Ok(digest);
    }
    Err(StoreError::NoMatchingPlatform {
        reference: reference.to_owned(),
        platforms: platforms(&index.manifests),
    })
}

/// `os/arch[/variant]` of each entry, for messages.
fn platforms(entries: &[ImageIndexEntry]) -> String {
    let list: Vec<String> = entries
        .iter()
        .map(|e| match &e.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => "unknown platform".to_owned(),
        })
        .collect();
    if list.is_empty() {
        "nothing (the index is empty)".into()
    } else {
        list.join(", ")
    }
}

/// The layers of `manifest`, each checked to be a layer bulkhead can unpack.
pub(crate) fn layers(manifest: &OciImageManifest, reference: &str) -> Result<Vec<Layer>> {
    manifest
        .layers
        .iter()
        .map(|layer| {
            let refuse = |reason| StoreError::UnsupportedLayer {
                reference: reference.to_owned(),
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                reason,
            };
            let compression = Compression::from_media_type(&layer.media_type).map_err(refuse)?;
            if sha256_hex(&layer.digest).is_none() {
                return Err(refuse("its digest is not a sha256 digest"));
            }
            let size = u64::try_from(layer.size).map_err(|_| refuse("its size is negative"))?;
            Ok(Layer {
                digest: layer.digest.clone(),
                size,
                compression,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn manifest_json(layer_type: &str) -> Vec<u8> {
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_IMAGE_MEDIA_TYPE,
            "config": {"mediaType": OCI_CONFIG_MEDIA_TYPE, "digest": digest('c'), "size": 2},
            "layers": [{"mediaType": layer_type, "digest": digest('e'), "size": 10}]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn image_manifest_and_layers() {
        let bytes = manifest_json("application/vnd.oci.image.layer.v1.tar+zstd");
        let Manifest::Image(m) = parse(&bytes, "img", "d").unwrap() else {
            panic!("not an image")
        };
        let layers = layers(&m, "img").unwrap();
        assert_eq!(layers[0].compression, Compression::Zstd);
        assert_eq!(layers[0].size, 10);
    }

    #[test]
    fn foreign_layers_refused() {
        for media_type in [
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        ] {
            let Manifest::Image(m) = parse(&manifest_json(media_type), "img", "d").unwrap() else {
                panic!()
            };
            let err = layers(&m, "img").unwrap_err().to_string();
            assert!(
                err.contains("foreign") || err.contains("non-distributable"),
                "{err}"
            );
            assert!(err.contains(media_type), "{err}");
        }
    }

    #[test]
    fn schema1_and_artifacts_refused() {
        let v1 = json!({"schemaVersion": 1, "name": "x", "fsLayers": []}).to_string();
        let err = parse(v1.as_bytes(), "docker.io/library/old:1", "d").unwrap_err();
        assert!(matches!(err, StoreError::SchemaV1 { .. }), "{err}");
        assert!(err.to_string().contains("schema 1"));
        let helm = json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": digest('c'), "size": 1},
            "layers": []
        })
        .to_string();
        let err = parse(helm.as_bytes(), "chart", "d")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a container image"), "{err}");
    }

    #[test]
    fn index_picks_amd64_or_lists_platforms() {
        let entry = |c, arch: &str| {
            json!({"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": digest(c), "size": 1,
                   "platform": {"os": "linux", "architecture": arch}})
        };
        let index =
            json!({"schemaVersion": 2, "manifests": [entry('a', "arm64"), entry('b', "amd64")]});
        let Manifest::Index(index) = parse(index.to_string().as_bytes(), "img", "d").unwrap()
        else {
            panic!("not an index")
        };
        assert_eq!(choose_platform(&index, "img").unwrap(), digest('b'));
        let arm_only = json!({"schemaVersion": 2, "manifests": [entry('a', "arm64")]});
        let Manifest::Index(arm_only) = parse(arm_only.to_string().as_bytes(), "img", "d").unwrap()
        else {
            panic!()
        };
        let err = choose_platform(&arm_only, "img").unwrap_err().to_string();
        assert!(
            err.contains("linux/arm64") && err.contains("linux/amd64"),
            "{err}"
        );
    }
}
