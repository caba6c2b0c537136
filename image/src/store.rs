//! The store itself: its directory layout, lookups, removal with garbage
//! collection, and the commit step that pulls and loads end with.
//!
//! ```text
//! <root>/
//!   index.json          names -> images, and each image's blobs (see index.rs)
//!   lock                flock'ed by whoever changes the store (see lock.rs)
//!   blobs/sha256/<hex>  manifests, configs and layers as fetched (see blobs.rs)
//!   rootfs/<hex>/       each image's unpacked root file system, by config digest
//!   tmp/<op>-<pid>-*/   work in progress (see workdir.rs)
//! ```
//!
//! Invariant, true whenever the lock is free: every image in the index has its
//! `rootfs/<hex>` and all its blobs. Commits make it so before they name the image
//! in the index; removals take the image out of the index before deleting.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use crate::blobs::{sync_dir, Blobs, Staging};
use crate::error::{IoContext, Result, StoreError};
use crate::index::{Index, StoredImage};
use crate::lock::StoreLock;
use crate::manifest::Layer;
use crate::progress::Progress;
use crate::record::{ImageRecord, Removed};
use crate::reference::{is_full_hex_id, is_lower_hex, normalize};
use crate::unpack::{content_size, LayerInput, Unpacker};
use crate::workdir::{clean_leftovers, WorkDir};

/// The image store under one root directory.
///
/// Exists so the CLI has one handle for everything about images: it pulls and
/// loads them, lists and removes them, and gives the directory each image's
/// containers mount. Several processes may use one root at once.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    pub(crate) blobs: Blobs,
}

/// Where a name or id given by a user leads.
enum Target {
    /// A name (or repo digest) of image `id`.
    Name { name: String, id: String },
    /// Image `id` itself.
    Id(String),
}

impl Store {
    /// Opens the store at `root` (the CLI's default is `/var/lib/bulkhead/images`),
    /// creating it if needed, and removes what interrupted operations of processes
    /// that are gone left in its `tmp/`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        if !root.exists() {
            fs::create_dir_all(&root).at("create image store", &root)?;
            // Root file systems hold setuid binaries: not for other users to reach.
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .at("set mode of", &root)?;
        }
        let store = Store {
            blobs: Blobs::new(root.join("blobs").join("sha256")),
            root,
        };
        for dir in [store.blobs_dir(), store.rootfs_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).at("create directory", &dir)?;
        }
        clean_leftovers(&store.tmp_dir())?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every image in the store, oldest first.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.index()?.images.into_iter().map(|i| i.record).collect())
    }

    /// The image a name (`busybox`, `busybox:1.36`, `localhost:5000/x/y@sha256:...`,
    /// normalized as Docker does) or an id / unique id prefix (with or without
    /// `sha256:`) refers to.
    pub fn get(&self, reference_or_id: &str) -> Result<ImageRecord> {
        let index = self.index()?;
        let id = match resolve(&index, reference_or_id)? {
            Target::Name { id, .. } | Target::Id(id) => id,
        };
        Ok(index
            .by_id(&id)
            .expect("resolve finds indexed images")
            .record
            .clone())
    }

    /// `rmi`: by name, takes the name off its image, and deletes the image once
    /// no name is left; by id, deletes the image with all its names. Deleting
    /// removes the image's root file system and every blob no other image uses.
    ///
    /// The caller must make sure no container still uses the image's root file
    /// system (Docker refuses such a removal without `--force`).
    pub fn remove(&self, reference_or_id: &str) -> Result<Removed> {
        let lock = self.lock()?;
        let mut index = self.index()?;
        let mut removed = Removed::default();
        let delete = match resolve(&index, reference_or_id)? {
            Target::Name { name, id } => {
                let image = index
                    .images
                    .iter_mut()
                    .find(|i| i.record.id == id)
                    .expect("resolve finds indexed images");
                image.record.names.retain(|n| *n != name);
                image.record.repo_digests.retain(|d| *d != name);
                removed.untagged.push(name);
                image.record.names.is_empty().then_some(id)
            }
            Target::Id(id) => Some(id),
        };
        if let Some(id) = delete {
            let image = index.remove(&id).expect("resolve finds indexed images");
            for name in image.record.names.iter().chain(&image.record.repo_digests) {
                if !removed.untagged.contains(name) {
                    removed.untagged.push(name.clone());
                }
            }
            removed.deleted.push(id);
        }
        index.save(&self.index_path(), &self.tmp_dir())?;
        let trash = self.collect_garbage(&index)?;
        drop(lock);
        // The big deletions happen after the lock is released.
        drop(trash);
        tracing::info!(untagged = ?removed.untagged, deleted = ?removed.deleted, "removed");
        Ok(removed)
    }

    /// The image's unpacked root file system: one directory with every layer
    /// applied in order. It never changes once the image is in the store, so it
    /// can be an overlay's lower directory as is.
    pub fn rootfs(&self, image: &ImageRecord) -> PathBuf {
        self.rootfs_dir()
            .join(image.id.strip_prefix("sha256:").unwrap_or(&image.id))
    }

    /// The index as it is now (no lock needed: it is replaced atomically).
    pub(crate) fn index(&self) -> Result<Index> {
        Index::load(&self.index_path())
    }

    /// A new work directory for operation `kind`.
    pub(crate) fn work_dir(&self, kind: &str) -> Result<WorkDir> {
        WorkDir::new(&self.tmp_dir(), kind)
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn lock(&self) -> Result<StoreLock> {
        StoreLock::exclusive(&self.root.join("lock"))
    }

    /// Make `image` part of the store: its staged blobs, its root file system
    /// `unpacked` (unless the store has the image already) and its names, under
    /// the lock. Returns `None` when the image is not in the store and nothing
    /// was unpacked (someone removed it since it was seen): the caller unpacks.
    pub(crate) fn commit(
        &self,
        staging: &Staging,
        unpacked: Option<&Path>,
        image: StoredImage,
    ) -> Result<Option<ImageRecord>> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let id = image.record.id.clone();
        if index.by_id(&id).is_none() {
            let Some(unpacked) = unpacked else {
                return Ok(None);
            };
            let target = self.rootfs(&image.record);
            match renameat2(
                AT_FDCWD,
                unpacked,
                AT_FDCWD,
                &target,
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => sync_dir(&self.rootfs_dir())?,
                // Left complete by an interrupted commit: identical, keep it.
                Err(Errno::EEXIST | Errno::ENOTEMPTY) => {
                    tracing::debug!(rootfs = %target.display(), "root file system already in place")
                }
                Err(e) => {
                    return Err(std::io::Error::from(e)).at("move root file system to", target)
                }
            }
        }
        self.blobs.publish(staging)?;
        index.add(image);
        index.save(&self.index_path(), &self.tmp_dir())?;
        let record = index.by_id(&id).expect("just added").record.clone();
        tracing::info!(id = %record.id, names = ?record.names, "image stored");
        Ok(Some(record))
    }

    /// Delete the blobs and root file systems no image in `index` uses. The root
    /// file systems are moved into work directories, deleted when those drop.
    /// Call with the lock held.
    fn collect_garbage(&self, index: &Index) -> Result<Vec<WorkDir>> {
        let used = index.referenced_blobs();
        for digest in self.blobs.list()? {
            if !used.contains(digest.as_str()) {
                tracing::debug!(blob = %digest, "deleting unused blob");
                self.blobs.remove(&digest)?;
            }
        }
        let mut trash = Vec::new();
        let dir = self.rootfs_dir();
        for entry in fs::read_dir(&dir).at("read directory", &dir)? {
            let entry = entry.at("read directory", &dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if index.by_id(&format!("sha256:{name}")).is_some() {
                continue;
            }
            tracing::debug!(rootfs = %name, "deleting unused root file system");
            let bin = self.work_dir("trash")?;
            let to = bin.path().join("rootfs");
            fs::rename(entry.path(), &to).at("move away unused root file system", entry.path())?;
            trash.push(bin);
        }
        Ok(trash)
    }

    /// Apply `layers` (staged) into a new root file system in `work`, checking
    /// each against its diff id; returns the directory and its size.
    pub(crate) fn unpack(
        &self,
        work: &WorkDir,
        staging: &Staging,
        layers: &[Layer],
        diff_ids: &[String],
        progress: &Progress,
    ) -> Result<(PathBuf, u64)> {
        let dir = work.path().join("rootfs");
        fs::create_dir(&dir).at("create directory", &dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).at("set mode of", &dir)?;
        let unpacker = Unpacker::new(&dir)?;
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            tracing::debug!(layer = %layer.digest, "unpacking");
            let bar = progress.bar(&layer.digest, "extracting", Some(layer.size));
            unpacker.apply(LayerInput {
                digest: &layer.digest,
                reader: bar.reader(staging.open(&layer.digest)?),
                compression: layer.compression,
                diff_id,
            })?;
            bar.finish("extracted");
        }
        unpacker.sync().at("sync", &dir)?;
        let size = content_size(&dir).at("measure", &dir)?;
        Ok((dir, size))
    }
}

/// What `input` (a name, an id or an id prefix) refers to in `index`.
fn resolve(index: &Index, input: &str) -> Result<Target> {
    let not_found = || StoreError::NotFound {
        reference: input.to_owned(),
    };
    let by_prefix = |hex: &str| -> Result<Target> {
        match index.by_id_prefix(hex).as_slice() {
            [] => Err(not_found()),
            [one] => Ok(Target::Id(one.record.id.clone())),
            many => Err(StoreError::AmbiguousId {
                prefix: input.to_owned(),
                candidates: many.iter().map(|i| i.record.id.clone()).collect(),
            }),
        }
    };
    if let Some(hex) = input.strip_prefix("sha256:") {
        return if is_lower_hex(hex) {
            by_prefix(hex)
        } else {
            Err(not_found())
        };
    }
    if is_full_hex_id(input) {
        return by_prefix(input);
    }
    match normalize(input) {
        Ok(name) => match index.by_name(&name) {
            Some(image) => Ok(Target::Name {
                name,
                id: image.record.id.clone(),
            }),
            None if is_lower_hex(input) => by_prefix(input),
            None => Err(not_found()),
        },
        Err(_) if is_lower_hex(input) => by_prefix(input),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(ids: &[&str], names: &[&str]) -> Index {
        let mut index = Index::default();
        for (i, hex) in ids.iter().enumerate() {
            let id = format!("sha256:{hex}");
            index.add(StoredImage {
                record: ImageRecord {
                    id: id.clone(),
                    names: names
                        .get(i)
                        .map(|n| vec![n.to_string()])
                        .unwrap_or_default(),
                    repo_digests: Vec::new(),
                    manifest_digest: String::new(),
                    size: 0,
                    created: None,
                    config: Default::default(),
                },
                blobs: vec![id],
            });
        }
        index
    }

    #[test]
    fn names_before_prefixes_and_ambiguity() {
        let a = format!("abc{}", "0".repeat(61));
        let b = format!("abd{}", "0".repeat(61));
        // An image *named* like a hex prefix: the name wins, as in Docker.
        let index = index_of(&[&a, &b], &["docker.io/library/abd:latest"]);
        let id = |input: &str| match resolve(&index, input) {
            Ok(Target::Id(id)) => Ok(id),
            Ok(Target::Name { id, .. }) => Ok(format!("name:{id}")),
            Err(e) => Err(e),
        };
        assert_eq!(id("abc").unwrap(), format!("sha256:{a}"));
        assert_eq!(id("sha256:abc").unwrap(), format!("sha256:{a}"));
        assert_eq!(id(&b).unwrap(), format!("sha256:{b}"));
        assert_eq!(id("abd").unwrap(), format!("name:sha256:{a}"));
        match id("ab") {
            Err(StoreError::AmbiguousId { candidates, .. }) => assert_eq!(candidates.len(), 2),
            other => panic!("{other:?}"),
        }
        assert!(matches!(id("sha256:"), Err(StoreError::NotFound { .. })));
        assert!(matches!(id("sha256:xyz"), Err(StoreError::NotFound { .. })));
        assert!(matches!(id("abe"), Err(StoreError::NotFound { .. })));
    }
}
