//! Private work directories under `<root>/tmp`, named after the owning process.
//!
//! Everything an operation writes (downloaded blobs, the root file system being
//! unpacked, the next index) goes into its own `tmp/<kind>-<pid>-<random>`
//! first, and is renamed into place only when complete, so nothing half-written is
//! ever visible. The pid in the name lets [`clean_leftovers`] remove what a killed
//! process left, without touching the work of processes still running.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::error::{IoContext, Result};

/// A work directory, removed with everything in it on drop.
#[derive(Debug)]
pub(crate) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Make `tmp_dir/<kind>-<pid>-<random>`.
    pub(crate) fn new(tmp_dir: &Path, kind: &str) -> Result<WorkDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{kind}-{}-", std::process::id()))
            .tempdir_in(tmp_dir)
            .at("create work directory in", tmp_dir)?;
        Ok(WorkDir { path: dir.keep() })
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = remove_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), "cannot remove work directory: {e}");
        }
    }
}

/// Remove `path` whatever it is (a missing one is fine). Never follows symlinks.
pub(crate) fn remove_all(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The pid in a work entry's name `<kind>-<pid>-<rest>`.
fn owner_pid(name: &str) -> Option<i32> {
    let mut parts = name.splitn(3, '-');
    let (_kind, pid, _rest) = (parts.next()?, parts.next()?, parts.next()?);
    pid.parse().ok().filter(|pid| *pid > 0)
}

/// Whether process `pid` exists (on this machine's pid namespace).
fn alive(pid: i32) -> bool {
    // Signal 0 checks existence and permission only; EPERM means it exists.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// Remove the entries of `tmp_dir` whose owning process is gone: the leftovers of
/// interrupted pulls, loads and removals. Returns what was removed; what cannot
/// be removed is logged and left for the next time.
pub(crate) fn clean_leftovers(tmp_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(tmp_dir).at("read directory", tmp_dir)? {
        let entry = entry.at("read directory", tmp_dir)?;
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else {
            tracing::debug!(entry = ?name, "leaving unknown entry in the store's tmp");
            continue;
        };
        if pid == std::process::id() as i32 || alive(pid) {
            continue;
        }
        let path = entry.path();
        tracing::info!(path = %path.display(), pid, "removing leftover of an interrupted operation");
        // Not fatal: the leftover is invisible anyway, and a later open retries.
        match remove_all(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove leftover: {e}"),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_from_name() {
        assert_eq!(owner_pid("pull-1234-abcd"), Some(1234));
        assert_eq!(owner_pid("index-77-x.json"), Some(77));
        assert_eq!(owner_pid("pull-abc-x"), None);
        assert_eq!(owner_pid("pull-12"), None);
        assert_eq!(owner_pid("pull-0-x"), None);
    }

    #[test]
    fn leftovers_of_dead_processes_only() {
        let tmp = tempfile::tempdir().unwrap();
        // A child that has exited and been reaped: its pid is dead.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_dir = tmp.path().join(format!("pull-{dead}-x"));
        fs::create_dir_all(dead_dir.join("rootfs/etc")).unwrap();
        fs::write(dead_dir.join("rootfs/etc/f"), b"x").unwrap();
        let dead_file = tmp.path().join(format!("index-{dead}-y.json"));
        fs::write(&dead_file, b"{}").unwrap();
        let ours = WorkDir::new(tmp.path(), "pull").unwrap();
        let live = tmp.path().join("load-1-z"); // pid 1 is always alive
        fs::create_dir(&live).unwrap();
        let odd = tmp.path().join("something-else");
        fs::create_dir(&odd).unwrap();

        let removed = clean_leftovers(tmp.path()).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead_dir.exists() && !dead_file.exists());
        assert!(ours.path().exists() && live.exists() && odd.exists());
        let path = ours.path().to_path_buf();
        drop(ours);
        assert!(!path.exists());
    }
}
