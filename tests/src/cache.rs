//! The on-disk cache for heavy test artifacts (kernel, modules, initramfs).
//!
//! Fetching and unpacking a kernel package takes seconds and network; doing it once
//! per machine instead of once per test run keeps the end-to-end tests quick. Entries
//! are directories named by a hash of their inputs, and are made atomically: built in
//! a temporary directory beside the final one and renamed into place, so an
//! interrupted run never leaves a half-made entry behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::IoContext;

/// The directory holding all cached artifacts.
///
/// `$BULKHEAD_CACHE` if set, else `$XDG_CACHE_HOME/bulkhead`, else
/// `$HOME/.cache/bulkhead` (falling back to the system temp dir if even `$HOME` is
/// unset). Exists so every tool of the project agrees on one location.
pub fn cache_root() -> PathBuf {
    root_from(|name| std::env::var_os(name))
}

fn root_from(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    // An empty variable counts as unset.
    let var = |name: &str| get(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("BULKHEAD_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("bulkhead");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("bulkhead"),
        None => std::env::temp_dir().join("bulkhead-cache"),
    }
}

/// Hex SHA-256 of a sequence of byte strings, each length-prefixed so that
/// `["ab", "c"]` and `["a", "bc"]` hash differently.
///
/// Exists to name cache entries after their inputs.
pub fn hash_key<I, B>(parts: I) -> String
where
    I: IntoIterator<Item = B>,
    B: AsRef<[u8]>,
{
    let mut hasher = Sha256::new();
    for part in parts {
        let part = part.as_ref();
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Return the cache directory `dir`, building it first with `build` if missing.
///
/// `build` fills a fresh temporary directory next to `dir`; only when it succeeds is
/// that directory renamed to `dir`. If another process finished the same entry
/// first, its result is kept and ours is discarded. Exists so that no caller has to
/// get atomic cache writes right by itself.
pub fn get_or_build<F, E>(dir: &Path, build: F) -> std::result::Result<PathBuf, E>
where
    F: FnOnce(&Path) -> std::result::Result<(), E>,
    E: From<crate::Error>,
{
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at("creating cache directory", parent)?;
    let tmp = temp_sibling(dir);
    std::fs::create_dir(&tmp).at("creating cache directory", &tmp)?;
    let guard = RemoveOnDrop(tmp.clone());
    build(&tmp)?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => {
            std::mem::forget(guard);
            Ok(dir.to_path_buf())
        }
        // Lost a race with another process building the same entry: use theirs.
        Err(_) if dir.is_dir() => Ok(dir.to_path_buf()),
        Err(e) => Err(crate::Error::Io {
            action: "renaming cache entry into place",
            path: dir.to_path_buf(),
            source: e,
        }
        .into()),
    }
}

/// A unique temporary name in the same directory as `dir` (so `rename` is atomic).
fn temp_sibling(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    dir.with_file_name(unique)
}

/// Removes a half-built cache directory when the build fails or panics.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use std::ffi::OsString;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn root_precedence() {
        assert_eq!(
            root_from(vars(&[("BULKHEAD_CACHE", "/c"), ("HOME", "/h")])),
            PathBuf::from("/c")
        );
        assert_eq!(
            root_from(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            PathBuf::from("/x/bulkhead")
        );
        assert_eq!(
            root_from(vars(&[("HOME", "/h")])),
            PathBuf::from("/h/.cache/bulkhead")
        );
        assert_eq!(
            root_from(vars(&[("BULKHEAD_CACHE", ""), ("HOME", "/h")])),
            PathBuf::from("/h/.cache/bulkhead")
        );
    }

    #[test]
    fn hash_key_is_length_prefixed() {
        assert_ne!(hash_key(["ab", "c"]), hash_key(["a", "bc"]));
        assert_eq!(hash_key(["ab", "c"]), hash_key(["ab", "c"]));
        assert_eq!(hash_key(["x"]).len(), 64);
    }

    #[test]
    fn build_failure_leaves_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let entry = root.path().join("entry");
        let result: Result<PathBuf> = get_or_build(&entry, |tmp| {
            std::fs::write(tmp.join("half"), b"x").at("writing", tmp)?;
            Err(crate::Error::InvalidCommand("boom".into()))
        });
        assert!(result.is_err());
        assert_eq!(std::fs::read_dir(root.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn builds_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let entry = root.path().join("a").join("entry");
        let built: Result<PathBuf> = get_or_build(&entry, |tmp| {
            std::fs::write(tmp.join("f"), b"1").at("writing", tmp)
        });
        assert_eq!(built.expect("build"), entry);
        let again: Result<PathBuf> = get_or_build(&entry, |_| panic!("must not rebuild"));
        assert_eq!(again.expect("cached"), entry);
        assert_eq!(std::fs::read(entry.join("f")).expect("read"), b"1");
    }
}
