//! Content-addressed blobs: `<root>/blobs/sha256/<hex>`, and the staging area an
//! operation fills before it commits.
//!
//! A blob reaches `blobs/` only through [`Blobs::publish`], under the store lock,
//! as a hard link of a file that was fully written, fsynced and verified against
//! its digest in the operation's work directory. An operation that reuses a stored
//! blob first hard-links it into its staging area ([`Blobs::hold`]), so a
//! concurrent removal collecting garbage cannot pull it away mid-pull.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{sha256_hex, Hasher};
use crate::error::{IoContext, Result, StoreError};

/// The store's blob directory.
#[derive(Debug, Clone)]
pub(crate) struct Blobs {
    dir: PathBuf,
}

impl Blobs {
    /// The blobs under `dir` (`<root>/blobs/sha256`), which must exist.
    pub(crate) fn new(dir: PathBuf) -> Blobs {
        Blobs { dir }
    }

    /// Where blob `digest` lives (whether or not it is there).
    pub(crate) fn path(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|hex| self.dir.join(hex))
    }

    /// The digests of every stored blob.
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        let mut digests = Vec::new();
        for entry in fs::read_dir(&self.dir).at("read directory", &self.dir)? {
            let name = entry.at("read directory", &self.dir)?.file_name();
            if let Some(name) = name.to_str() {
                let digest = format!("sha256:{name}");
                if sha256_hex(&digest).is_some() {
                    digests.push(digest);
                }
            }
        }
        Ok(digests)
    }

    /// Delete blob `digest` (a missing one is fine). Call with the store lock held.
    pub(crate) fn remove(&self, digest: &str) -> Result<()> {
        let Some(path) = self.path(digest) else {
            return Ok(());
        };
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at("remove blob", path),
            _ => Ok(()),
        }
    }

    /// Hard-link stored blob `digest` into `staging`; `false` if it is not stored.
    pub(crate) fn hold(&self, digest: &str, staging: &Staging) -> Result<bool> {
        let (Some(from), Some(to)) = (self.path(digest), staging.path(digest)) else {
            return Ok(false);
        };
        match fs::hard_link(&from, &to) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at("link stored blob into", to),
        }
    }

    /// Make every blob of `staging` visible in the store (those already there are
    /// kept), then fsync the directory. Call with the store lock held.
    pub(crate) fn publish(&self, staging: &Staging) -> Result<()> {
        for digest in staging.list()? {
            let (Some(from), Some(to)) = (staging.path(&digest), self.path(&digest)) else {
                continue;
            };
            match fs::hard_link(&from, &to) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(e).at("publish blob", to);
                }
                _ => {}
            }
        }
        sync_dir(&self.dir)
    }
}

/// An operation's blobs, verified and fsynced, not yet in the store:
/// `<work>/blobs/<hex>`, with incoming downloads beside them until verified.
#[derive(Debug)]
pub(crate) struct Staging {
    dir: PathBuf,
    incoming: std::sync::atomic::AtomicU64,
}

impl Staging {
    /// A staging area in `work_dir`.
    pub(crate) fn new(work_dir: &Path) -> Result<Staging> {
        let dir = work_dir.join("blobs");
        fs::create_dir(&dir).at("create directory", &dir)?;
        Ok(Staging {
            dir,
            incoming: Default::default(),
        })
    }

    /// Where staged blob `digest` is (whether or not it is there).
    pub(crate) fn path(&self, digest: &str) -> Option<PathBuf> {
        sha256_hex(digest).map(|hex| self.dir.join(hex))
    }

    /// Whether blob `digest` is staged.
    pub(crate) fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// The staged blob `digest`, which must be there.
    pub(crate) fn open(&self, digest: &str) -> Result<File> {
        let path = self
            .path(digest)
            .unwrap_or_else(|| self.dir.join("invalid"));
        File::open(&path).at("open staged blob", path)
    }

    /// The whole of staged blob `digest`.
    pub(crate) fn read(&self, digest: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let path = self
            .path(digest)
            .unwrap_or_else(|| self.dir.join("invalid"));
        self.open(digest)?
            .read_to_end(&mut bytes)
            .at("read staged blob", path)?;
        Ok(bytes)
    }

    /// The digests of the staged blobs.
    fn list(&self) -> Result<Vec<String>> {
        let mut digests = Vec::new();
        for entry in fs::read_dir(&self.dir).at("read directory", &self.dir)? {
            let name = entry.at("read directory", &self.dir)?.file_name();
            if let Some(name) = name.to_str().filter(|n| !n.starts_with("incoming-")) {
                digests.push(format!("sha256:{name}"));
            }
        }
        Ok(digests)
    }

    /// A fresh path for a blob being received; hand it to [`Self::accept`] once
    /// written and fsynced.
    pub(crate) fn incoming_path(&self) -> PathBuf {
        let n = self
            .incoming
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("incoming-{n}"))
    }

    /// Check the received file `incoming` (digest `actual`, `actual_size` bytes)
    /// against what was `expected`, and stage it under its digest. On a mismatch
    /// the file is removed and the error names `blob`, expected and actual.
    pub(crate) fn accept(
        &self,
        incoming: &Path,
        blob: &str,
        actual: String,
        actual_size: u64,
        expected: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<String> {
        let mismatch = if expected.is_some_and(|e| e != actual) {
            Some(StoreError::DigestMismatch {
                what: "blob",
                blob: blob.to_owned(),
                expected: expected.unwrap_or_default().to_owned(),
                actual: actual.clone(),
            })
        } else if expected_size.is_some_and(|s| s != actual_size) {
            Some(StoreError::SizeMismatch {
                blob: blob.to_owned(),
                expected: expected_size.unwrap_or_default(),
                actual: actual_size,
            })
        } else {
            None
        };
        if let Some(error) = mismatch {
            let _ = fs::remove_file(incoming);
            return Err(error);
        }
        let target = self
            .path(&actual)
            .expect("a computed sha256 digest is well-formed");
        fs::rename(incoming, &target).at("stage blob", &target)?;
        Ok(actual)
    }

    /// Stage what `reader` yields, verifying it against `expected` (digest and
    /// size) if given; returns the digest and size. `blob` names it in errors.
    pub(crate) fn write_from(
        &self,
        mut reader: impl Read,
        blob: &str,
        expected: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<(String, u64)> {
        let incoming = self.incoming_path();
        let mut file = File::create(&incoming).at("create", &incoming)?;
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).at("read blob from the source for", &incoming),
            };
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).at("write", &incoming)?;
        }
        file.sync_all().at("fsync", &incoming)?;
        let size = hasher.len();
        let digest = self.accept(
            &incoming,
            blob,
            hasher.finish(),
            size,
            expected,
            expected_size,
        )?;
        Ok((digest, size))
    }

    /// Stage `bytes`, verified against `expected` if given; returns the digest.
    pub(crate) fn write_bytes(
        &self,
        bytes: &[u8],
        blob: &str,
        expected: Option<&str>,
    ) -> Result<String> {
        Ok(self.write_from(bytes, blob, expected, None)?.0)
    }
}

/// fsync directory `dir`, so renames and links into it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at("fsync directory", dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_of;

    fn setup() -> (tempfile::TempDir, Blobs, Staging) {
        let root = tempfile::tempdir().unwrap();
        let store_dir = root.path().join("store");
        fs::create_dir_all(&store_dir).unwrap();
        let work = root.path().join("work");
        fs::create_dir_all(&work).unwrap();
        let staging = Staging::new(&work).unwrap();
        (root, Blobs::new(store_dir), staging)
    }

    #[test]
    fn verified_blob_is_staged_then_published() {
        let (_root, blobs, staging) = setup();
        let digest = sha256_of(b"hello");
        let got = staging
            .write_bytes(b"hello", "test", Some(&digest))
            .unwrap();
        assert_eq!(got, digest);
        assert!(staging.contains(&digest));
        assert!(
            !blobs.list().unwrap().contains(&digest),
            "not visible before publish"
        );
        blobs.publish(&staging).unwrap();
        assert!(blobs.list().unwrap().contains(&digest));
        assert_eq!(blobs.list().unwrap(), vec![digest.clone()]);
        // Publishing again (another operation staging the same blob) is fine.
        blobs.publish(&staging).unwrap();
        blobs.remove(&digest).unwrap();
        blobs.remove(&digest).unwrap();
        assert!(blobs.list().unwrap().is_empty());
    }

    #[test]
    fn digest_mismatch_names_both_and_leaves_nothing() {
        let (_root, blobs, staging) = setup();
        let expected = sha256_of(b"good");
        let err = staging
            .write_from(&b"evil"[..], "sha256:layer", Some(&expected), None)
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&expected), "{text}");
        assert!(text.contains(&sha256_of(b"evil")), "{text}");
        assert!(text.contains("sha256:layer"), "{text}");
        assert_eq!(fs::read_dir(&staging.dir).unwrap().count(), 0);
        blobs.publish(&staging).unwrap();
        assert!(blobs.list().unwrap().is_empty());
    }

    #[test]
    fn size_mismatch() {
        let (_root, _blobs, staging) = setup();
        let digest = sha256_of(b"abc");
        let err = staging
            .write_from(&b"abc"[..], "b", Some(&digest), Some(4))
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::SizeMismatch {
                expected: 4,
                actual: 3,
                ..
            }
        ));
    }

    #[test]
    fn held_blob_survives_removal_from_the_store() {
        let (root, blobs, staging) = setup();
        let other_work = root.path().join("other");
        fs::create_dir_all(&other_work).unwrap();
        let other = Staging::new(&other_work).unwrap();
        let digest = other.write_bytes(b"layer", "l", None).unwrap();
        blobs.publish(&other).unwrap();

        assert!(blobs.hold(&digest, &staging).unwrap());
        blobs.remove(&digest).unwrap(); // garbage collection by someone else
        assert_eq!(staging.read(&digest).unwrap(), b"layer");
        blobs.publish(&staging).unwrap();
        assert!(blobs.list().unwrap().contains(&digest));
        assert!(!blobs.hold(&sha256_of(b"absent"), &staging).unwrap());
    }
}
