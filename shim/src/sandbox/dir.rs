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
        let mut dir = dir;
        let shared = dir.shared();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&shared)
            .map_err(io("create the share directory", &shared))?;
        // The share is a mount of its own with shared propagation: virtiofsd's
        // mount namespace holds a slave copy of it, so what is mounted here
        // after virtiofsd started (a pod's next container) still reaches it.
        let mount_err = |errno| SandboxError::Mount {
            source_path: shared.clone(),
            target: shared.clone(),
            errno,
        };
        mount(
            Some(&shared),
            &shared,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err)?;
        dir.mounts.push(shared.clone());
        // Private first: a bind of a shared mount joins its peer group, and
        // then everything mounted in the share would also be propagated to
        // the host's /run peers. A peer group of its own is what we want.
        for flag in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            mount(None::<&str>, &shared, None::<&str>, flag, None::<&str>).map_err(mount_err)?;
        }
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

    /// Bind-mounts `source` (a directory or a file) at `shared/<name>`
    /// (read-write), remembered for cleanup.
    pub fn bind_into_share(&mut self, source: &Path, name: &str) -> Result<PathBuf, SandboxError> {
        let target = self.shared().join(name);
        let made = if source.is_dir() {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::File::create(&target).map(drop))
        };
        made.map_err(|source| SandboxError::Io {
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

    /// Mounts a file system at `shared/<name>` with `mount` (given the target,
    /// which exists as a directory), remembered for cleanup.
    pub fn mount_into_share(
        &mut self,
        name: &str,
        mount: impl FnOnce(&Path) -> Result<(), SandboxError>,
    ) -> Result<PathBuf, SandboxError> {
        let target = self.shared().join(name);
        std::fs::create_dir_all(&target).map_err(|source| SandboxError::Io {
            what: "create a mount point",
            path: target.clone(),
            source,
        })?;
        mount(&target)?;
        self.mounts.push(target.clone());
        Ok(target)
    }

    /// Unmounts everything at or under `shared/<name>` and removes it.
    pub fn remove_from_share(&mut self, name: &str) -> Result<(), SandboxError> {
        let top = self.shared().join(name);
        for target in mounts_under(&top) {
            if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                tracing::warn!("cannot unmount {}: {e}", target.display());
            }
        }
        self.mounts.retain(|m| !m.starts_with(&top));
        if let Some(busy) = first_mount_under(&top) {
            return Err(SandboxError::StillMounted(busy));
        }
        match std::fs::remove_dir_all(&top) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Io {
                what: "remove",
                path: top,
                source,
            }),
        }
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
    mounts_under(dir).into_iter().next()
}

/// Every mount point at or under `dir`, deepest (most recent) first, so they
/// can be unmounted in this order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// Removes the sandbox directory `<root>/<id>` left by a process that died
/// without cleaning up (a SIGKILLed shim or CLI): stops the bulkhead-vmm and
/// virtiofsd it recorded (only if they still run from that directory, so a
/// reused pid is never hit), unmounts everything under it and deletes it.
/// Does nothing if the directory does not exist.
pub fn force_remove(root: &Path, id: &str) -> Result<(), SandboxError> {
    let path = root.join(id);
    if !path.exists() {
        return Ok(());
    }
    for name in ["vmm.pid", "virtiofsd.pid"] {
        let Ok(text) = std::fs::read_to_string(path.join(name)) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*path.to_string_lossy());
        if ours {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // Not our child: wait for it to vanish rather than reap it.
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    for target in mounts_under(&path) {
        if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
            tracing::warn!("cannot unmount {}: {e}", target.display());
        }
    }
    if let Some(busy) = first_mount_under(&path) {
        return Err(SandboxError::StillMounted(busy));
    }
    std::fs::remove_dir_all(&path).map_err(|source| SandboxError::Io {
        what: "remove",
        path,
        source,
    })
}
