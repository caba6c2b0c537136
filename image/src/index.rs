//! The image index, `<root>/index.json`: which images the store holds, under
//! which names, and which blobs each one uses.
//!
//! It is the last thing an operation changes: read, changed and written back as a
//! whole (temp file, fsync, rename, fsync of the directory) under the store lock,
//! so readers, which take no lock, always see one complete version.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::blobs::sync_dir;
use crate::error::{IoContext, Result, StoreError};
use crate::record::ImageRecord;

/// The version of the index format written.
const FORMAT_VERSION: u32 = 1;

/// One image as the index keeps it: the record and the blobs it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredImage {
    /// What users see.
    #[serde(flatten)]
    pub(crate) record: ImageRecord,
    /// Every blob of the image (index, manifest, config, layers), kept until no
    /// image needs it.
    pub(crate) blobs: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: Vec<StoredImage>,
}

/// The images of the store, in the order they were added.
#[derive(Debug, Default, Clone)]
pub(crate) struct Index {
    pub(crate) images: Vec<StoredImage>,
}

impl Index {
    /// Read the index at `path`; a missing file is an empty store.
    pub(crate) fn load(path: &Path) -> Result<Index> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Index::default()),
            Err(e) => return Err(e).at("read image index", path),
        };
        let corrupt = |reason: String| StoreError::CorruptIndex {
            path: path.to_path_buf(),
            reason,
        };
        let file: IndexFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} is not the {FORMAT_VERSION} this bulkhead knows",
                file.version
            )));
        }
        Ok(Index {
            images: file.images,
        })
    }

    /// Write the index to `path` atomically, through a temp file in `tmp_dir`.
    pub(crate) fn save(&self, path: &Path, tmp_dir: &Path) -> Result<()> {
        let file = IndexFile {
            version: FORMAT_VERSION,
            images: self.images.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("the index always serializes");
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!("index-{}-", std::process::id()))
            .suffix(".json")
            .tempfile_in(tmp_dir)
            .at("create temp file in", tmp_dir)?;
        tmp.write_all(&bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .at("write", tmp.path().to_path_buf())?;
        tmp.persist(path).map_err(|e| StoreError::Io {
            action: "replace image index",
            path: path.to_path_buf(),
            source: e.error,
        })?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    }

    /// The image with id `id` (`sha256:<hex>`).
    pub(crate) fn by_id(&self, id: &str) -> Option<&StoredImage> {
        self.images.iter().find(|i| i.record.id == id)
    }

    /// The image a normalized name or repo digest points at.
    pub(crate) fn by_name(&self, name: &str) -> Option<&StoredImage> {
        self.images.iter().find(|i| {
            i.record.names.iter().any(|n| n == name)
                || i.record.repo_digests.iter().any(|d| d == name)
        })
    }

    /// The images whose id's hex starts with `hex_prefix`.
    pub(crate) fn by_id_prefix(&self, hex_prefix: &str) -> Vec<&StoredImage> {
        self.images
            .iter()
            .filter(|i| {
                i.record
                    .id
                    .strip_prefix("sha256:")
                    .is_some_and(|hex| hex.starts_with(hex_prefix))
            })
            .collect()
    }

    /// Add `image`, or merge it into the image with its id (names, repo digests
    /// and blobs are united). Its names are taken off any other image first, as a
    /// tag points at one image only.
    pub(crate) fn add(&mut self, image: StoredImage) {
        for other in &mut self.images {
            if other.record.id != image.record.id {
                other
                    .record
                    .names
                    .retain(|n| !image.record.names.contains(n));
            }
        }
        match self
            .images
            .iter_mut()
            .find(|i| i.record.id == image.record.id)
        {
            Some(existing) => {
                let r = &mut existing.record;
                push_new(&mut r.names, &image.record.names);
                push_new(&mut r.repo_digests, &image.record.repo_digests);
                push_new(&mut existing.blobs, &image.blobs);
            }
            None => self.images.push(image),
        }
    }

    /// Take image `id` out of the index.
    pub(crate) fn remove(&mut self, id: &str) -> Option<StoredImage> {
        let at = self.images.iter().position(|i| i.record.id == id)?;
        Some(self.images.remove(at))
    }

    /// Every blob some image needs.
    pub(crate) fn referenced_blobs(&self) -> HashSet<&str> {
        self.images
            .iter()
            .flat_map(|i| i.blobs.iter().map(String::as_str))
            .collect()
    }
}

/// Append the items of `new` missing from `list`.
fn push_new(list: &mut Vec<String>, new: &[String]) {
    for item in new {
        if !list.contains(item) {
            list.push(item.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id_char: char, names: &[&str]) -> StoredImage {
        let id = format!("sha256:{}", id_char.to_string().repeat(64));
        StoredImage {
            record: ImageRecord {
                id: id.clone(),
                names: names.iter().map(|n| n.to_string()).collect(),
                repo_digests: Vec::new(),
                manifest_digest: String::new(),
                size: 1,
                created: None,
                config: Default::default(),
            },
            blobs: vec![id],
        }
    }

    #[test]
    fn names_move_and_merge() {
        let mut index = Index::default();
        index.add(image('a', &["x:1", "x:2"]));
        index.add(image('b', &["x:2"]));
        assert_eq!(
            index.by_name("x:2").unwrap().record.id,
            image('b', &[]).record.id
        );
        assert_eq!(index.by_name("x:1").unwrap().record.names, vec!["x:1"]);
        index.add(image('b', &["y:1"]));
        assert_eq!(index.images.len(), 2);
        assert_eq!(index.images[1].record.names, vec!["x:2", "y:1"]);
        assert_eq!(index.by_id_prefix("a").len(), 1);
        assert_eq!(index.by_id_prefix("").len(), 2);
        assert!(index.remove(&image('a', &[]).record.id).is_some());
        assert_eq!(index.referenced_blobs().len(), 1);
    }

    #[test]
    fn save_load_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        assert!(Index::load(&path).unwrap().images.is_empty());
        let mut index = Index::default();
        index.add(image('c', &["docker.io/library/busybox:latest"]));
        index.save(&path, dir.path()).unwrap();
        assert_eq!(Index::load(&path).unwrap().images, index.images);
        // Only the index is left: the temp file was renamed.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

        fs::write(&path, b"{not json").unwrap();
        let err = Index::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("corrupt") && err.contains("index.json"),
            "{err}"
        );
    }
}
