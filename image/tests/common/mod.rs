//! Fixtures for the store's integration tests: layer tars built entry by entry,
//! OCI image layouts (also multi-platform) and legacy `docker save` tarballs.

#![allow(dead_code)] // each test file uses its own part

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// One layer tar, built entry by entry.
pub struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_size(size);
    header
}

impl Tar {
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    /// `.wh.<name>` in `dir` ("" for the root).
    pub fn whiteout(self, dir: &str, name: &str) -> Self {
        let path = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&path, b"")
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

impl Comp {
    pub fn apply(self, tar: &[u8]) -> (Vec<u8>, &'static str) {
        match self {
            Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Comp::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar).unwrap();
                (
                    gz.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Comp::Zstd => (
                zstd::stream::encode_all(tar, 1).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        }
    }
}

/// An image written into a layout.
#[derive(Debug, Clone)]
pub struct Built {
    pub manifest_digest: String,
    pub manifest_size: usize,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
}

impl Built {
    /// Its descriptor for an index, with `platform` and `annotations`.
    pub fn descriptor(&self, arch: &str, annotations: Value) -> Value {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": self.manifest_digest,
            "size": self.manifest_size,
            "platform": {"os": "linux", "architecture": arch},
            "annotations": annotations,
        })
    }
}

/// What an image looks like.
pub struct Spec<'a> {
    pub layers: Vec<(Vec<u8>, Comp)>,
    pub arch: &'a str,
    /// The config's `config` object (Entrypoint, Env, ...).
    pub run: Value,
    /// Override of the diff ids (to make a lying config).
    pub diff_ids: Option<Vec<String>>,
}

impl<'a> Spec<'a> {
    pub fn new(layers: Vec<(Vec<u8>, Comp)>) -> Self {
        Spec {
            layers,
            arch: "amd64",
            run: json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
            diff_ids: None,
        }
    }
}

/// An OCI image layout directory being written.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    /// Store `bytes` as a blob; its digest and size.
    pub fn blob(&self, bytes: &[u8]) -> (String, usize) {
        let digest = sha256(bytes);
        fs::write(self.blob_path(&digest), bytes).unwrap();
        (digest, bytes.len())
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Write the layers, config and manifest of `spec`.
    pub fn image(&self, spec: &Spec) -> Built {
        let mut layer_descs = Vec::new();
        let mut layer_digests = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, comp) in &spec.layers {
            diff_ids.push(sha256(tar));
            let (blob, media_type) = comp.apply(tar);
            let (digest, size) = self.blob(&blob);
            layer_descs.push(json!({"mediaType": media_type, "digest": digest, "size": size}));
            layer_digests.push(digest);
        }
        let config = json!({
            "created": "2024-05-06T07:08:09Z",
            "architecture": spec.arch,
            "os": "linux",
            "config": spec.run,
            "rootfs": {"type": "layers", "diff_ids": spec.diff_ids.clone().unwrap_or(diff_ids.clone())},
        });
        let (config_digest, config_size) = self.blob(&serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": layer_descs,
        });
        let (manifest_digest, manifest_size) = self.blob(&serde_json::to_vec(&manifest).unwrap());
        Built {
            manifest_digest,
            manifest_size,
            config_digest,
            layer_digests,
            diff_ids,
        }
    }

    /// An index blob of `manifests` (descriptors); its descriptor.
    pub fn index_blob(&self, manifests: Vec<Value>, annotations: Value) -> Value {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        let (digest, size) = self.blob(&serde_json::to_vec(&index).unwrap());
        json!({"mediaType": OCI_INDEX, "digest": digest, "size": size, "annotations": annotations})
    }

    /// Write index.json listing `manifests`.
    pub fn finish(&self, manifests: Vec<Value>) {
        let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// The layout as a tar at `out`.
    pub fn tar(&self, out: &Path) {
        tar_dir(&self.dir, out);
    }
}

/// Tar the contents of `dir` (paths relative to it) into `out`.
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut builder = tar::Builder::new(fs::File::create(out).unwrap());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir).unwrap();
    builder.into_inner().unwrap().flush().unwrap();
}

/// A one-file layer: `path` holding `data`.
pub fn one_file_layer(path: &str, data: &[u8]) -> Vec<u8> {
    Tar::default().file(path, data).finish()
}

/// The entries of `dir` (sorted), or an empty list if it is missing.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Assert `root` holds no image, blob, root file system or work in progress.
pub fn assert_store_empty(store: &bulkhead_image::Store) {
    let root = store.root();
    assert!(
        store.list().unwrap().is_empty(),
        "images: {:?}",
        store.list()
    );
    assert!(names(&root.join("blobs/sha256")).is_empty(), "blobs left");
    assert!(
        names(&root.join("rootfs")).is_empty(),
        "root file systems left"
    );
    assert!(names(&root.join("tmp")).is_empty(), "work directories left");
}
