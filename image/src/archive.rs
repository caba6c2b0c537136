//! Reading files out of an image archive given to `load`: a directory, or a tar
//! (optionally gzip- or zstd-compressed) of one.
//!
//! A tar is indexed once (member name -> offset and size) and members are then
//! read in place with positional reads, so a multi-gigabyte `docker save` is not
//! copied before import; only a compressed tar is decompressed into the load's
//! work directory first. Member names are only looked up, never written to disk,
//! and names with `..` are ignored, so a hostile archive cannot point outside.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Result, StoreError};
use crate::layer::{sniff_reader, Compression};

/// Symlink hops followed inside an archive before giving up.
const MAX_LINK_HOPS: usize = 16;

/// An image archive's files.
#[derive(Debug)]
pub(crate) enum Archive {
    /// An unpacked layout on disk.
    Dir(PathBuf),
    /// A tar file, indexed.
    Tar {
        /// The (decompressed) tar.
        file: File,
        /// Members by normalized name.
        members: HashMap<String, Member>,
    },
}

/// One tar member.
#[derive(Debug, Clone)]
pub(crate) enum Member {
    /// A file's data at `offset`, `size` bytes.
    File { offset: u64, size: u64 },
    /// A symlink or hard link to another member (normalized name).
    Link(String),
}

impl Archive {
    /// Open `path`, a directory or a (compressed) tar; `work` may receive the
    /// decompressed tar.
    pub(crate) fn open(path: &Path, work: &Path) -> Result<Archive> {
        let meta = fs::metadata(path).at("read", path)?;
        if meta.is_dir() {
            return Ok(Archive::Dir(path.to_path_buf()));
        }
        let file = File::open(path).at("open", path)?;
        let (compression, reader) = sniff_reader(file).at("read", path)?;
        let file = match compression {
            Compression::None => {
                let mut file = reader.into_inner();
                // Sniffing read ahead: the tar is indexed from its start.
                file.seek(io::SeekFrom::Start(0)).at("read", path)?;
                file
            }
            other => {
                let target = work.join("archive.tar");
                let mut out = File::create(&target).at("create", &target)?;
                let mut decoder = other.decoder(reader).at("read", path)?;
                io::copy(&mut decoder, &mut out).map_err(|e| StoreError::NotAnImage {
                    path: path.to_path_buf(),
                    reason: format!(
                        "it looks {}-compressed but does not decompress: {e}",
                        other.name()
                    ),
                })?;
                File::open(&target).at("open", &target)?
            }
        };
        let members = index_tar(&file).map_err(|e| StoreError::NotAnImage {
            path: path.to_path_buf(),
            reason: format!("it is neither a directory nor a tar archive ({e})"),
        })?;
        if members.is_empty() {
            return Err(StoreError::NotAnImage {
                path: path.to_path_buf(),
                reason: "it is an empty tar archive, or not a tar archive at all".into(),
            });
        }
        Ok(Archive::Tar { file, members })
    }

    /// Whether the archive has file `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        match self {
            Archive::Dir(dir) => clean(name).is_some_and(|n| dir.join(n).is_file()),
            Archive::Tar { members, .. } => self.resolve(members, name).is_some(),
        }
    }

    /// A reader of file `name`, `None` if the archive has no such file.
    pub(crate) fn open_member(&self, name: &str) -> io::Result<Option<Box<dyn Read + '_>>> {
        match self {
            Archive::Dir(dir) => {
                let Some(name) = clean(name) else {
                    return Ok(None);
                };
                match File::open(dir.join(name)) {
                    Ok(file) => Ok(Some(Box::new(file))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Archive::Tar { file, members } => {
                Ok(self.resolve(members, name).map(|(offset, size)| {
                    Box::new(ReadAt {
                        file,
                        pos: offset,
                        end: offset + size,
                    }) as Box<dyn Read>
                }))
            }
        }
    }

    /// The whole of file `name`, `None` if absent.
    pub(crate) fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let Some(mut reader) = self.open_member(name)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Offset and size of member `name`, following links.
    fn resolve(&self, members: &HashMap<String, Member>, name: &str) -> Option<(u64, u64)> {
        let mut name = clean(name)?;
        for _ in 0..MAX_LINK_HOPS {
            match members.get(&name)? {
                Member::File { offset, size } => return Some((*offset, *size)),
                Member::Link(target) => name = target.clone(),
            }
        }
        None
    }
}

/// `name` relative and without `.` components; `None` if it has `..` or is empty.
fn clean(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// `target` of a symlink at `link` (both archive names), as an archive name.
fn link_target(link: &str, target: &str) -> Option<String> {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        link.split('/').collect::<Vec<_>>()
    };
    if !target.starts_with('/') {
        parts.pop(); // the link's own name
    }
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Every file and link of tar `file`, by normalized name.
fn index_tar(file: &File) -> io::Result<HashMap<String, Member>> {
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        let raw = entry.path_bytes();
        let Some(name) = std::str::from_utf8(&raw).ok().and_then(clean) else {
            continue;
        };
        let link = || {
            entry
                .link_name_bytes()
                .and_then(|l| std::str::from_utf8(&l).ok().map(str::to_owned))
        };
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            tar::EntryType::Symlink => match link().and_then(|t| link_target(&name, &t)) {
                Some(target) => Member::Link(target),
                None => continue,
            },
            tar::EntryType::Link => match link().as_deref().and_then(clean) {
                Some(target) => Member::Link(target),
                None => continue,
            },
            _ => continue,
        };
        members.insert(name, member);
    }
    Ok(members)
}

/// Reads `file` from `pos` to `end` with positional reads (no shared offset).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = (self.end - self.pos).min(buf.len() as u64) as usize;
        if left == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..left], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a member",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_links() {
        assert_eq!(clean("./a/b").as_deref(), Some("a/b"));
        assert_eq!(clean("/a").as_deref(), Some("a"));
        assert_eq!(clean("a/../b"), None);
        assert_eq!(clean("."), None);
        assert_eq!(
            link_target("x/layer.tar", "../y/layer.tar").as_deref(),
            Some("y/layer.tar")
        );
        assert_eq!(link_target("x/a", "b").as_deref(), Some("x/b"));
        assert_eq!(link_target("x/a", "/b").as_deref(), Some("b"));
        assert_eq!(link_target("a", "../../etc/passwd"), None);
    }

    #[test]
    fn tar_members_read_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "./x/data", &b"hello"[..])
            .unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "y/alias", "../x/data")
            .unwrap();
        builder.into_inner().unwrap();

        let archive = Archive::open(&path, dir.path()).unwrap();
        assert_eq!(archive.read("x/data").unwrap().unwrap(), b"hello");
        assert_eq!(archive.read("y/alias").unwrap().unwrap(), b"hello");
        assert!(archive.read("missing").unwrap().is_none());
        assert!(archive.contains("x/data") && !archive.contains("x"));

        let junk = dir.path().join("junk");
        fs::write(&junk, b"definitely not a tar archive").unwrap();
        let err = Archive::open(&junk, dir.path()).unwrap_err().to_string();
        assert!(err.contains("not an image archive"), "{err}");
    }
}
