//! The process's working directory, made when the rootfs lacks it, as runc
//! and Docker do (`docker run -w /new/dir` works on any image).
//!
//! The rootfs is the container's, so untrusted: each parent is opened with
//! `openat2(RESOLVE_IN_ROOT)`, which resolves `..` and symlinks as if the
//! rootfs were `/`, so a symlink in the image cannot make us create
//! directories elsewhere in the guest.

use std::io;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, Mode};
use oci_spec::runtime::Mount;

/// Creates `cwd` where the container will see it: in the source of the bind
/// mount that will cover it (`-v /h:/data -w /data/sub` makes `/h/sub`, as
/// runc does by creating it after the mounts), else in `rootfs`. Under any
/// other mount (a tmpfs) it cannot be made beforehand and is left alone.
pub fn ensure_for(rootfs: &Path, mounts: &[Mount], cwd: &Path) -> io::Result<()> {
    let covering = mounts
        .iter()
        .filter(|m| cwd.starts_with(m.destination()))
        .max_by_key(|m| m.destination().components().count());
    let Some(mount) = covering else {
        return ensure(rootfs, cwd);
    };
    let is_bind = mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
    match (is_bind, mount.source()) {
        (true, Some(source)) if source.is_dir() => {
            let rest = cwd.strip_prefix(mount.destination()).unwrap_or(cwd);
            ensure(source, &Path::new("/").join(rest))
        }
        _ => Ok(()),
    }
}

/// Creates `cwd` (absolute, as the container sees it) under `rootfs`, with
/// mode 0755 for each missing component.
pub fn ensure(rootfs: &Path, cwd: &Path) -> io::Result<()> {
    let root = std::fs::File::open(rootfs)?;
    let mut partial = PathBuf::from(".");
    for component in cwd.components() {
        let name = match component {
            Component::Normal(name) => name,
            Component::RootDir | Component::CurDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the working directory {} has `..` in it", cwd.display()),
                ))
            }
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT);
        let parent = openat2(&root, &partial, how).map_err(io::Error::from)?;
        match mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        partial.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_components_are_made_and_symlinks_stay_inside() {
        let root = tempfile::tempdir().unwrap();
        ensure(root.path(), Path::new("/a/b/c")).unwrap();
        assert!(root.path().join("a/b/c").is_dir());
        ensure(root.path(), Path::new("/a/b/c")).unwrap();
        // A symlink pointing out of the rootfs resolves inside it: its target
        // does not exist there, so this fails, and nothing is made outside.
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        assert!(ensure(root.path(), Path::new("/escape/x")).is_err());
        assert!(!outside.path().join("x").exists());
        // Once the target exists inside the rootfs, the directory goes there.
        let inside = root.path().join(outside.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        ensure(root.path(), Path::new("/escape/x")).unwrap();
        assert!(inside.join("x").is_dir());
        assert!(!outside.path().join("x").exists());
        assert!(ensure(root.path(), Path::new("/a/../b")).is_err());
    }

    #[test]
    fn a_working_directory_under_a_bind_mount_is_made_in_its_source() {
        let root = tempfile::tempdir().unwrap();
        let volume = tempfile::tempdir().unwrap();
        let bind = oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source(volume.path())
            .options(vec!["rbind".to_string()])
            .build()
            .unwrap();
        let tmpfs = oci_spec::runtime::MountBuilder::default()
            .destination("/scratch")
            .typ("tmpfs")
            .source("tmpfs")
            .build()
            .unwrap();
        let mounts = [bind, tmpfs];
        ensure_for(root.path(), &mounts, Path::new("/data/sub/dir")).unwrap();
        assert!(volume.path().join("sub/dir").is_dir());
        assert!(!root.path().join("data").exists());
        ensure_for(root.path(), &mounts, Path::new("/scratch/x")).unwrap();
        assert!(!root.path().join("scratch").exists());
        ensure_for(root.path(), &mounts, Path::new("/database")).unwrap();
        assert!(
            root.path().join("database").is_dir(),
            "/database is not under /data"
        );
    }
}
