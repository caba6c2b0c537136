//! The sandbox's host directory, `/run/bulkhead/<id>/`: sockets, logs and the
//! virtio-fs share live here, 0700, and all of it goes when the sandbox goes.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::SandboxError;

/// The sandbox directory and the mounts made under it.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
    mounts: Vec<PathBuf>,
}

impl SandboxDir {
    /// Creates `<root>/<id>` (and `root` if needed), refusing an id in use.
    pub fn create(root: &Path, id: &str) -> Result<SandboxDir, SandboxError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| SandboxError::Io { what, path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(io("create the run directory", root))?;
        let path = root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::InUse {
                    id: id.to_owned(),
                    path,
                });
            }
            Err(e) => return Err(io("create the sandbox directory", &path)(e)),
        }
        // The mode passed to mkdir is masked by the umask; make sure of 0700.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions on", &path))?;
        let dir = SandboxDir {
            path,
            mounts: Vec::new(),
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.shared())
            .map_err(io("create the share directory", &dir.shared()))?;
        Ok(dir)
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root of the virtio-fs share.
    pub fn shared(&self) -> PathBuf {
        self.path.join("shared")
    }

    /// A file in the sandbox directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Bind-mounts `source` at `shared/<name>` (read-write), remembered for cleanup.
    pub fn bind_into_share(&mut self, source: &Path, name: &str) -> Result<PathBuf, SandboxError> {
        let target = self.shared().join(name);
        std::fs::create_dir_all(&target).map_err(|source| SandboxError::Io {
            what: "create a mount point",
            path: target.clone(),
            source,
        })?;
        mount(
            Some(source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::Mount {
            source_path: source.to_owned(),
            target: target.clone(),
            errno: e,
        })?;
        self.mounts.push(target.clone());
        Ok(target)
    }

    /// Unmounts everything mounted here and removes the directory. Lazy unmounts
    /// (MNT_DETACH) so a busy mount still goes away once its users are gone.
    pub fn remove(mut self) -> Result<(), SandboxError> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<(), SandboxError> {
        for target in self.mounts.drain(..).rev() {
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                tracing::warn!("cannot unmount {}: {e}", target.display());
            }
        }
        if self.path.as_os_str().is_empty() || !self.path.exists() {
            return Ok(());
        }
        // Refuse to recurse into a directory that still holds a mount: removing
        // files through a bind mount would delete the user's rootfs.
        if let Some(busy) = first_mount_under(&self.path) {
            return Err(SandboxError::StillMounted(busy));
        }
        let path = std::mem::take(&mut self.path);
        std::fs::remove_dir_all(&path).map_err(|source| SandboxError::Io {
            what: "remove",
            path,
            source,
        })
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::error!("sandbox directory cleanup: {e}");
        }
    }
}

/// The first mount point at or under `dir`, from /proc/self/mountinfo.
pub fn first_mount_under(dir: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .find(|p| p.starts_with(dir))
}
