//! Applying layers, in order, to one directory: the image's root file system.
//!
//! Each layer is a tar stream of changes. Entries add or replace files;
//! `.wh.<name>` deletes `<name>` as lower layers left it, and `.wh..wh..opq`
//! hides everything lower layers put in its directory (the OCI image spec's
//! whiteouts, resolved by deletion since the result is one plain directory).
//! Hard links (also to files of earlier layers), symlinks, device nodes, fifos,
//! modes with setuid/setgid/sticky, owners, mtimes and `SCHILY.xattr.*` extended
//! attributes (best effort) are kept.
//!
//! The tar crate only parses; every file-system change goes through [`scoped`],
//! so entries with absolute paths stay inside, entries with `..` are refused, and
//! symlinks (from this or earlier layers) can never lead a write out of the root.
//! While applying, the uncompressed stream is hashed and checked against the
//! config's diff id.

mod scoped;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, FileTimes, Permissions};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmodat, makedev, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, symlinkat, Gid, Uid};
use tar::EntryType;

use crate::digest::HashingReader;
use crate::error::{Result, StoreError};
use crate::layer::Compression;

use scoped::Root;

/// The prefix of whiteout files.
const WHITEOUT_PREFIX: &str = ".wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Applies layers to one root file system directory.
#[derive(Debug)]
pub(crate) struct Unpacker {
    root: Root,
    /// Whether we may chown and make device nodes (we run as root in production;
    /// unprivileged, e.g. in a developer's test run, those are skipped).
    privileged: bool,
}

/// One layer to apply.
pub(crate) struct LayerInput<'a, R> {
    /// The layer blob's digest, for messages.
    pub(crate) digest: &'a str,
    /// The compressed stream.
    pub(crate) reader: R,
    /// How it is compressed.
    pub(crate) compression: Compression,
    /// The diff id the uncompressed stream must have.
    pub(crate) diff_id: &'a str,
}

/// The metadata a tar entry carries, with PAX overrides applied.
#[derive(Debug, Default)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Option<(i64, i64)>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// A directory whose mode and mtime are set once its layer is done (creating
/// children would change the mtime, and a read-only mode could stop them).
#[derive(Debug)]
struct DeferredDir {
    rel: PathBuf,
    mode: u32,
    mtime: Option<(i64, i64)>,
}

/// What one layer has written so far: whiteouts apply to lower layers only.
#[derive(Debug, Default)]
struct LayerState {
    written: HashSet<PathBuf>,
    ancestors: HashSet<PathBuf>,
    dirs: Vec<DeferredDir>,
}

impl LayerState {
    fn note(&mut self, rel: &Path) {
        for ancestor in rel.ancestors().skip(1) {
            if !self.ancestors.insert(ancestor.to_path_buf()) {
                break;
            }
        }
        self.written.insert(rel.to_path_buf());
    }

    /// Whether this layer wrote `rel` or something below it.
    fn touched(&self, rel: &Path) -> bool {
        self.written.contains(rel) || self.ancestors.contains(rel)
    }
}

impl Unpacker {
    /// An unpacker for the (existing, usually empty) directory `rootfs`.
    pub(crate) fn new(rootfs: &Path) -> Result<Unpacker> {
        let root = Root::open(rootfs).map_err(|source| match source.raw_os_error() {
            Some(libc::ENOSYS) => StoreError::KernelTooOld { source },
            _ => StoreError::Io {
                action: "open root file system",
                path: rootfs.to_path_buf(),
                source,
            },
        })?;
        Ok(Unpacker {
            root,
            privileged: nix::unistd::geteuid().is_root(),
        })
    }

    /// Apply `layer` on top of what is there, and check its diff id.
    pub(crate) fn apply<R: Read>(&self, layer: LayerInput<'_, R>) -> Result<()> {
        let corrupt = |source: io::Error| StoreError::CorruptLayer {
            layer: layer.digest.to_owned(),
            format: layer.compression.name(),
            source,
        };
        let decoder = layer.compression.decoder(layer.reader).map_err(corrupt)?;
        let mut hashing = HashingReader::new(decoder);
        let mut state = LayerState::default();
        {
            let mut archive = tar::Archive::new(&mut hashing);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                self.apply_entry(&mut entry, &mut state, layer.digest)?;
            }
        }
        self.finish_dirs(&state, layer.digest)?;
        // The diff id covers the whole stream, end-of-archive padding included.
        let (actual, _) = hashing.drain().map_err(corrupt)?;
        if actual != layer.diff_id {
            return Err(StoreError::DigestMismatch {
                what: "uncompressed layer",
                blob: layer.digest.to_owned(),
                expected: layer.diff_id.to_owned(),
                actual,
            });
        }
        Ok(())
    }

    /// Flush everything unpacked to disk (one syncfs for the whole tree).
    pub(crate) fn sync(&self) -> io::Result<()> {
        nix::unistd::syncfs(self.root.fd().as_fd()).map_err(io::Error::from)
    }

    fn apply_entry<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        state: &mut LayerState,
        layer: &str,
    ) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let unsafe_entry = |reason| StoreError::UnsafeEntry {
            layer: layer.to_owned(),
            entry: shown.clone(),
            reason,
        };
        let fail = |action: &'static str| {
            let entry = shown.clone();
            move |source: io::Error| StoreError::Unpack {
                layer: layer.to_owned(),
                entry,
                action,
                source,
            }
        };
        let rel = clean_path(Path::new(OsStr::from_bytes(&raw))).map_err(unsafe_entry)?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let meta = read_meta(entry).map_err(fail("read the header of"))?;

        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            // The layer's `./` entry: the root's own mode and times.
            if kind == EntryType::Directory {
                self.chown(self.root.fd(), OsStr::new("."), &meta)
                    .map_err(fail("set owner of"))?;
                state.dirs.push(DeferredDir {
                    rel,
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self
                .whiteout(&parent_rel, OsStr::from_bytes(hidden), &name, state)
                .map_err(fail("apply whiteout"));
        }

        let parent = self
            .root
            .make_dirs(&parent_rel)
            .map_err(fail("create the parent directory of"))?;
        match kind {
            EntryType::Directory => {
                let kept = scoped::make_room(&parent, &name, true).map_err(fail("replace"))?;
                if !kept {
                    mkdirat(
                        parent.as_fd(),
                        name.as_os_str(),
                        Mode::from_bits_truncate(0o700),
                    )
                    .map_err(|e| fail("create directory")(e.into()))?;
                }
                self.chown(&parent, &name, &meta)
                    .map_err(fail("set owner of"))?;
                if !meta.xattrs.is_empty() {
                    let dir = scoped::open_subdir(&parent, &name).map_err(fail("open"))?;
                    set_xattrs(&scoped::as_file(dir), &meta.xattrs, &shown);
                }
                state.dirs.push(DeferredDir {
                    rel: rel.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                scoped::make_room(&parent, &name, false).map_err(fail("replace"))?;
                let fd = openat(
                    parent.as_fd(),
                    name.as_os_str(),
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| fail("create file")(e.into()))?;
                let mut file = scoped::as_file(fd);
                io::copy(entry, &mut file).map_err(fail("write"))?;
                if self.privileged {
                    std::os::unix::fs::fchown(&file, Some(meta.uid as u32), Some(meta.gid as u32))
                        .map_err(fail("set owner of"))?;
                }
                // After chown, which clears setuid/setgid.
                file.set_permissions(Permissions::from_mode(meta.mode))
                    .map_err(fail("set mode of"))?;
                set_xattrs(&file, &meta.xattrs, &shown);
                if let Some(mtime) = meta.mtime {
                    file.set_times(file_times(mtime))
                        .map_err(fail("set times of"))?;
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("a symlink without a target"))?
                    .into_owned();
                scoped::make_room(&parent, &name, false).map_err(fail("replace"))?;
                symlinkat(OsStr::from_bytes(&target), parent.as_fd(), name.as_os_str())
                    .map_err(|e| fail("create symlink")(e.into()))?;
                self.chown(&parent, &name, &meta)
                    .map_err(fail("set owner of"))?;
                set_times_at(&parent, &name, meta.mtime).map_err(fail("set times of"))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("a hard link without a target"))?
                    .into_owned();
                let target = clean_path(Path::new(OsStr::from_bytes(&target)))
                    .map_err(|_| unsafe_entry("a hard link whose target contains `..`"))?;
                let Some(target_name) = target.file_name() else {
                    return Err(unsafe_entry("a hard link to the root directory"));
                };
                if target != rel {
                    let target_dir = self
                        .root
                        .resolve(target.parent().unwrap_or(Path::new("")), OFlag::empty())
                        .map_err(fail("find the hard link target of"))?;
                    scoped::make_room(&parent, &name, false).map_err(fail("replace"))?;
                    // Without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
                    linkat(
                        target_dir.as_fd(),
                        target_name,
                        parent.as_fd(),
                        name.as_os_str(),
                        AtFlags::empty(),
                    )
                    .map_err(|e| fail("create hard link")(e.into()))?;
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (sflag, device) = match kind {
                    EntryType::Char => (SFlag::S_IFCHR, true),
                    EntryType::Block => (SFlag::S_IFBLK, true),
                    _ => (SFlag::S_IFIFO, false),
                };
                if device && !self.privileged {
                    tracing::warn!(layer, entry = %shown, "skipping device node: not running as root");
                    return Ok(());
                }
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                scoped::make_room(&parent, &name, false).map_err(fail("replace"))?;
                mknodat(
                    parent.as_fd(),
                    name.as_os_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|e| fail("create device node")(e.into()))?;
                self.chown(&parent, &name, &meta)
                    .map_err(fail("set owner of"))?;
                // The node was just made by us, so following it is following nothing.
                fchmodat(
                    parent.as_fd(),
                    name.as_os_str(),
                    Mode::from_bits_truncate(meta.mode),
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| fail("set mode of")(e.into()))?;
                set_times_at(&parent, &name, meta.mtime).map_err(fail("set times of"))?;
            }
            other => {
                tracing::warn!(layer, entry = %shown, kind = ?other, "skipping tar entry of unsupported type");
                return Ok(());
            }
        }
        state.note(&rel);
        Ok(())
    }

    /// `.wh.<hidden>` in `parent_rel`: delete `<hidden>` as lower layers left it;
    /// `.wh..wh..opq`: hide all lower content of `parent_rel`.
    fn whiteout(
        &self,
        parent_rel: &Path,
        hidden: &OsStr,
        marker: &OsStr,
        state: &LayerState,
    ) -> io::Result<()> {
        let parent = match self.root.resolve(parent_rel, OFlag::O_NOFOLLOW) {
            Ok(fd) => fd,
            // Nothing below to hide.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if marker == OPAQUE_MARKER {
            for child in scoped::list(&parent)? {
                hide_lower(&parent, parent_rel, &child, state)?;
            }
        } else if hidden.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // `.wh..wh.*` other than the opaque marker: aufs bookkeeping, ignored.
        } else {
            hide_lower(&parent, parent_rel, hidden, state)?;
        }
        Ok(())
    }

    fn chown(&self, dir: &OwnedFd, name: &OsStr, meta: &Meta) -> io::Result<()> {
        if !self.privileged {
            return Ok(());
        }
        fchownat(
            dir.as_fd(),
            name,
            Some(Uid::from_raw(meta.uid as u32)),
            Some(Gid::from_raw(meta.gid as u32)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)
    }

    /// Set the deferred modes and mtimes of the layer's directories, deepest first.
    fn finish_dirs(&self, state: &LayerState, layer: &str) -> Result<()> {
        for dir in state.dirs.iter().rev() {
            let fail = |action, source| StoreError::Unpack {
                layer: layer.to_owned(),
                entry: dir.rel.display().to_string(),
                action,
                source,
            };
            // Replaced or removed later in the layer: nothing to finish.
            let Ok(fd) = self.root.resolve(&dir.rel, OFlag::O_NOFOLLOW) else {
                continue;
            };
            let file = scoped::as_file(fd);
            file.set_permissions(Permissions::from_mode(dir.mode))
                .map_err(|e| fail("set mode of", e))?;
            if let Some(mtime) = dir.mtime {
                file.set_times(file_times(mtime))
                    .map_err(|e| fail("set times of", e))?;
            }
        }
        Ok(())
    }
}

/// Delete what lower layers put at `parent_rel/name`, keeping what this layer
/// wrote there (and below).
fn hide_lower(
    parent: &OwnedFd,
    parent_rel: &Path,
    name: &OsStr,
    state: &LayerState,
) -> io::Result<()> {
    let rel = parent_rel.join(name);
    if !state.touched(&rel) {
        return scoped::remove_at(parent, name);
    }
    match scoped::lstat_at(parent, name)? {
        Some(stat) if scoped::is_dir(&stat) => {
            let dir = scoped::open_subdir(parent, name)?;
            for child in scoped::list(&dir)? {
                hide_lower(&dir, &rel, &child, state)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `raw` made relative to the root: leading `/` and `.` components dropped;
/// `..` refused (no legitimate layer has one, and it could only mean escape).
fn clean_path(raw: &Path) -> std::result::Result<PathBuf, &'static str> {
    let mut clean = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("its path contains `..`"),
            Component::Prefix(_) => return Err("its path has a Windows prefix"),
        }
    }
    Ok(clean)
}

/// Mode, owner, mtime and xattrs of `entry`, PAX records overriding the header.
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut meta = Meta {
        mode: header.mode()? & 0o7777,
        uid: header.uid()?,
        gid: header.gid()?,
        mtime: Some((header.mtime()? as i64, 0)),
        xattrs: Vec::new(),
    };
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions {
            let extension = extension?;
            let Ok(key) = extension.key() else { continue };
            let value = extension.value_bytes();
            let number = || std::str::from_utf8(value).ok().map(str::trim);
            match key {
                "uid" => meta.uid = number().and_then(|v| v.parse().ok()).unwrap_or(meta.uid),
                "gid" => meta.gid = number().and_then(|v| v.parse().ok()).unwrap_or(meta.gid),
                "mtime" => meta.mtime = number().and_then(parse_pax_time).or(meta.mtime),
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        meta.xattrs.push((name.into(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}

/// A PAX time, `seconds[.fraction]`, as (seconds, nanoseconds).
fn parse_pax_time(text: &str) -> Option<(i64, i64)> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some((secs, if secs < 0 { -nanos } else { nanos }))
}

fn system_time((secs, nanos): (i64, i64)) -> SystemTime {
    let nanos = nanos.unsigned_abs() as u32;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nanos)
    }
}

fn file_times(mtime: (i64, i64)) -> FileTimes {
    let time = system_time(mtime);
    FileTimes::new().set_accessed(time).set_modified(time)
}

/// Set atime and mtime of `name` in `dir` without following a symlink.
fn set_times_at(dir: &OwnedFd, name: &OsStr, mtime: Option<(i64, i64)>) -> io::Result<()> {
    let Some((secs, nanos)) = mtime else {
        return Ok(());
    };
    let time = TimeSpec::new(secs, nanos);
    utimensat(
        dir.as_fd(),
        name,
        &time,
        &time,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Set extended attributes on `file`, best effort (the file system or our
/// privileges may not allow some, e.g. `trusted.*`).
fn set_xattrs(file: &fs::File, xattrs: &[(OsString, Vec<u8>)], entry: &str) {
    use xattr::FileExt;
    for (name, value) in xattrs {
        if let Err(e) = file.set_xattr(name, value) {
            tracing::debug!(entry, xattr = ?name, "cannot set extended attribute: {e}");
        }
    }
}

/// Bytes of the regular files under `root`, each inode counted once: the size of
/// an unpacked image.
pub(crate) fn content_size(root: &Path) -> io::Result<u64> {
    let mut seen: HashMap<(u64, u64), ()> = HashMap::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino()), ()).is_none() {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
