//! A writer for uncompressed "newc" cpio archives, the format of Linux initramfs.
//!
//! Written here rather than taken from a crate: the format is a few dozen lines
//! (a fixed ASCII-hex header, the name, the data, 4-byte padding), and the crates
//! on crates.io either lack device nodes and symlinks, or are not kept up. Owning
//! it also lets us make archives byte-for-byte reproducible (mtime 0, inode numbers
//! in order), which the cache relies on.

use std::io::{self, Write};
use std::path::Path;

use crate::error::{IoContext, Result};

/// File-type bits of `st_mode`, as stored in the cpio header.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `W`.
///
/// Paths are archive-relative: a leading `/` is dropped, as the kernel expects.
/// Call [`CpioWriter::finish`] to write the trailer; an archive without it is
/// invalid. Parents must be added before their children.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive written to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Add a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), b"")
    }

    /// Add a regular file with contents `data` and permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Add a regular file whose contents are read from `host_path` on this machine.
    pub fn file_from_host(&mut self, path: &str, perm: u32, host_path: &Path) -> Result<()> {
        let data = std::fs::read(host_path).at("reading", host_path)?;
        self.file(path, perm, &data)
            .at("writing archive entry for", host_path)
    }

    /// Add a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Add a character device node, e.g. `/dev/console` as 5:1.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), b"")
    }

    /// Write the `TRAILER!!!` entry and return the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.next_ino = 0;
        self.raw_entry("TRAILER!!!", 0, 1, (0, 0), b"")?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {path:?}"),
            ));
        }
        self.raw_entry(name, mode, nlink, rdev, data)
    }

    fn raw_entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        (rmajor, rminor): (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, for reproducible archives
            size,
            0, // dev major
            0, // dev minor
            rmajor,
            rminor,
            name.len() as u32 + 1, // name size, including the NUL
            0,                     // check (unused by newc)
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.put(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).expect("dir");
        w.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("file");
        w.symlink("/bin/sh", "hello").expect("symlink");
        w.dir("dev", 0o755).expect("dir");
        w.char_device("/dev/console", 0o600, 5, 1).expect("dev");
        w.finish().expect("finish")
    }

    /// A parsed header: (name, mode, size, rdev major, rdev minor).
    fn parse(archive: &[u8]) -> Vec<(String, u32, usize, u32, u32)> {
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(&archive[at..at + 6], b"070701", "magic at {at}");
            let field = |i: usize| {
                let s =
                    std::str::from_utf8(&archive[at + 6 + i * 8..at + 14 + i * 8]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name_start = at + 110;
            let name = std::str::from_utf8(&archive[name_start..name_start + namesize - 1])
                .expect("name")
                .to_string();
            assert_eq!(archive[name_start + namesize - 1], 0);
            let data_start = (name_start + namesize).next_multiple_of(4);
            at = (data_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len());
                return entries;
            }
            entries.push((name, mode, size, rmaj, rmin));
        }
    }

    #[test]
    fn headers_parse_back() {
        let entries = parse(&sample());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "bin/sh", "dev", "dev/console"]);
        assert_eq!(entries[1].1, 0o100_755);
        assert_eq!(entries[1].2, 18);
        assert_eq!(entries[2].1, 0o120_777);
        assert_eq!(
            (entries[4].1, entries[4].3, entries[4].4),
            (0o020_600, 5, 1)
        );
    }

    #[test]
    fn reproducible() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_empty_name() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.dir("/", 0o755).is_err());
    }

    /// Cross-check with the system's `cpio`, when it is installed.
    #[test]
    fn system_cpio_lists_it() {
        let child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("cpio not installed; skipping");
            return;
        };
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&sample()).expect("write to cpio");
        drop(stdin);
        let out = child.wait_with_output().expect("cpio output");
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(lines[1].starts_with("-rwxr-xr-x") && lines[1].ends_with("bin/hello"));
        assert!(lines[2].starts_with('l') && lines[2].ends_with("bin/sh -> hello"));
        assert!(lines[4].starts_with("crw-------") && lines[4].contains("5,"));
    }
}
