//! File-system operations confined to one directory, the root file system being
//! unpacked.
//!
//! Layers are untrusted: an entry `evil/passwd` under a symlink `evil -> /etc`
//! (or `-> ../../../etc`) must land in the rootfs's own `/etc`, never the host's.
//! Parent directories are therefore resolved by the kernel with openat2(2)'s
//! `RESOLVE_IN_ROOT`, which follows symlinks as if the rootfs were `/` (as
//! containerd resolves them), so no path can leave it, and there is no window
//! between checking a path and using it. The last component is then always
//! handled by the `*at` calls on the parent's descriptor without following it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// How often to retry openat2 when it says EAGAIN (a concurrent rename somewhere
/// on the file system made the kernel unsure the walk stayed inside).
const RESOLVE_RETRIES: usize = 16;

/// The open root directory of a root file system.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Open directory `path` as the root everything else is resolved in.
    pub(crate) fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let root = Root { fd };
        // Fail early, with a clear cause, on kernels without openat2.
        root.resolve(Path::new(""), OFlag::empty())?;
        Ok(root)
    }

    /// The root's own descriptor.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Open `rel` (a relative path without `..`) as a directory, resolving every
    /// component inside the root. `extra` is added to the open flags (e.g.
    /// `O_NOFOLLOW` so a final symlink is not followed).
    pub(crate) fn resolve(&self, rel: &Path, extra: OFlag) -> io::Result<OwnedFd> {
        let path: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | extra)
            .resolve(
                ResolveFlag::RESOLVE_IN_ROOT
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        let mut tries = 0;
        loop {
            match openat2(self.fd.as_fd(), path, how) {
                Err(Errno::EAGAIN) if tries < RESOLVE_RETRIES => tries += 1,
                result => return result.map_err(io::Error::from),
            }
        }
    }

    /// Open directory `rel`, creating missing components (mode 0755, owned by us),
    /// as `mkdir -p` inside the root.
    pub(crate) fn make_dirs(&self, rel: &Path) -> io::Result<OwnedFd> {
        match self.resolve(rel, OFlag::empty()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => return other,
        }
        let mut prefix = std::path::PathBuf::new();
        let mut dir = self.resolve(&prefix, OFlag::empty())?;
        for component in rel.iter() {
            prefix.push(component);
            dir = match self.resolve(&prefix, OFlag::empty()) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match mkdirat(dir.as_fd(), component, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    // A dangling symlink in the way fails here, with ENOENT.
                    let made = self.resolve(&prefix, OFlag::empty())?;
                    // Whatever the umask: parents a layer did not list are 0755.
                    fchmod(made.as_fd(), Mode::from_bits_truncate(0o755))?;
                    made
                }
                other => other?,
            };
        }
        Ok(dir)
    }
}

/// The metadata of `name` in `dir`, not following a symlink; `None` if absent.
pub(crate) fn lstat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Option<FileStat>> {
    match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether `stat` is of a directory.
pub(crate) fn is_dir(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

/// Open subdirectory `name` of `dir` without following a symlink.
pub(crate) fn open_subdir(dir: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names in directory `dir` (without `.` and `..`).
pub(crate) fn list(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    // A fresh open file description, so listing never depends on `dir`'s offset.
    let mut listing = Dir::openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_owned());
        }
    }
    Ok(names)
}

/// Remove `name` from `dir` whatever it is, a directory with everything below
/// it included, never following symlinks. An absent `name` is fine.
pub(crate) fn remove_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let Some(stat) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if is_dir(&stat) {
        let sub = open_subdir(dir, name)?;
        for child in list(&sub)? {
            remove_at(&sub, &child)?;
        }
        unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir)?;
    } else {
        unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

/// Make room for a new `name` in `dir`: remove what is there, unless both it
/// and the newcomer are directories (then they merge). Returns whether a
/// directory was kept.
pub(crate) fn make_room(dir: &OwnedFd, name: &OsStr, new_is_dir: bool) -> io::Result<bool> {
    match lstat_at(dir, name)? {
        Some(stat) if is_dir(&stat) && new_is_dir => Ok(true),
        Some(_) => remove_at(dir, name).map(|()| false),
        None => Ok(false),
    }
}

/// `dir`'s descriptor as a [`File`], for std's metadata calls on it.
pub(crate) fn as_file(fd: OwnedFd) -> File {
    File::from(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolution_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(dir.path().join("outside")).unwrap();
        symlink("/etc", rootfs.join("abs")).unwrap();
        symlink("../../../../outside", rootfs.join("rel")).unwrap();
        let root = Root::open(&rootfs).unwrap();

        // Both symlinks resolve inside: /etc is the rootfs's etc, `..` stops at root.
        let abs = root.resolve(Path::new("abs"), OFlag::empty()).unwrap();
        mkdirat(abs.as_fd(), "made-via-abs", Mode::from_bits_truncate(0o755)).unwrap();
        assert!(rootfs.join("etc/made-via-abs").is_dir());
        let err = root.resolve(Path::new("rel"), OFlag::empty()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
        // Through a dangling symlink nothing is made, least of all outside.
        assert!(root.make_dirs(Path::new("rel/x/y")).is_err());
        assert!(!dir.path().join("outside/x").exists());
        fs::create_dir(rootfs.join("outside")).unwrap();
        let made = root.make_dirs(Path::new("rel/x/y")).unwrap();
        mkdirat(made.as_fd(), "z", Mode::from_bits_truncate(0o755)).unwrap();
        assert!(rootfs.join("outside/x/y/z").is_dir());
        assert!(!dir.path().join("outside/x").exists());

        let nofollow = root.resolve(Path::new("abs"), OFlag::O_NOFOLLOW);
        assert!(nofollow.is_err());
    }

    #[test]
    fn remove_at_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let victim = dir.path().join("victim");
        fs::create_dir_all(rootfs.join("d/sub")).unwrap();
        fs::create_dir_all(&victim).unwrap();
        fs::write(victim.join("precious"), b"x").unwrap();
        symlink(&victim, rootfs.join("d/sub/link")).unwrap();
        fs::write(rootfs.join("d/file"), b"y").unwrap();
        let root = Root::open(&rootfs).unwrap();
        remove_at(root.fd(), OsStr::new("d")).unwrap();
        assert!(!rootfs.join("d").exists());
        assert!(victim.join("precious").exists());
        remove_at(root.fd(), OsStr::new("absent")).unwrap();
    }
}
