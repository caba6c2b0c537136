//! The store's lock: one exclusive `flock` on `<root>/lock`.
//!
//! Every change to what the store shows (the index, `rootfs/`, `blobs/`) is made
//! while holding it, so two `bulkhead` processes never interleave commits or
//! collect garbage another is about to reference. Downloads and unpacking happen
//! outside it, in private work directories, so they run concurrently.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{IoContext, Result};

/// Held while the store is being changed; the lock is released on drop (and by
/// the kernel if the process dies).
pub(crate) struct StoreLock {
    _flock: Flock<File>,
}

impl StoreLock {
    /// Block until the exclusive lock on `path` (created if missing) is ours.
    pub(crate) fn exclusive(path: &Path) -> Result<StoreLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .at("open lock file", path)?;
        tracing::trace!(lock = %path.display(), "waiting for the store lock");
        let flock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))
            .at("lock", PathBuf::from(path))?;
        Ok(StoreLock { _flock: flock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn excludes_another_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = StoreLock::exclusive(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                // A second open file description: flock excludes it like another process.
                let _lock = StoreLock::exclusive(&path).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(held);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
    }
}
