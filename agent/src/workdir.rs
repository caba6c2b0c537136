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
}
