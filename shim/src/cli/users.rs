//! `--user NAME[:GROUP]` resolved the way Docker does: against the
//! container's own `/etc/passwd` and `/etc/group`, read on the host from the
//! rootfs before the container starts.
//!
//! The rootfs comes from an image, or is a running container's (`exec -u`),
//! so it is untrusted: the files are opened with `openat2(RESOLVE_IN_ROOT)`
//! (symlinks resolve inside the rootfs, never to the host's files),
//! non-blocking (a FIFO there cannot hang us), must be regular files, and are
//! read up to a bound.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

/// The most of /etc/passwd or /etc/group we read.
const MAX_ETC_FILE: u64 = 4 << 20;

/// The ids a process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups the user is a member of in /etc/group.
    pub additional_gids: Vec<u32>,
    /// The home directory from /etc/passwd (`/` when there is none), for `HOME`.
    pub home: String,
}

/// Resolves `user` (`""` for root, `NAME`, `UID`, `NAME:GROUP`, `UID:GID`...)
/// against `rootfs`. A numeric user needs no entry, as in Docker.
pub fn resolve(rootfs: &Path, user: &str) -> Result<Ids> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_etc(rootfs, "passwd")?;
    let entry = |name_or_id: &str| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && (f[0] == name_or_id || f[2] == name_or_id)).then(|| {
                let home = f.get(5).filter(|h| !h.is_empty()).unwrap_or(&"/");
                (f[0].to_owned(), f[2], f[3], home.to_string())
            })
        })
    };
    let lookup = if u.is_empty() { "0" } else { u };
    let (name, uid, mut gid, home) = if let Ok(uid) = lookup.parse::<u32>() {
        match entry(lookup) {
            Some((name, _, gid, home)) => (name, uid, gid.parse().unwrap_or(0), home),
            None => (String::new(), uid, 0, "/".to_owned()),
        }
    } else {
        let Some((name, uid, gid, home)) = entry(u) else {
            bail!("user {user:?}: no user {u:?} in the container's /etc/passwd (use a numeric UID, or one of its users)");
        };
        let uid = uid
            .parse()
            .with_context(|| format!("the container's /etc/passwd has a bad uid for {u:?}"))?;
        (name, uid, gid.parse().unwrap_or(0), home)
    };
    let groups = read_etc(rootfs, "group")?;
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .lines()
                .find_map(|line| {
                    let f: Vec<&str> = line.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
                .with_context(|| {
                    format!("user {user:?}: no group {g:?} in the container's /etc/group")
                })?,
        };
    }
    let mut additional_gids = Vec::new();
    if !name.is_empty() {
        for line in groups.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(id) = f[2].parse::<u32>() {
                    if id != gid && !additional_gids.contains(&id) {
                        additional_gids.push(id);
                    }
                }
            }
        }
    }
    Ok(Ids {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// The rootfs's `/etc/<name>`, or "" when there is none (or it is not a
/// regular file, as Docker ignores an unusable one).
fn read_etc(rootfs: &Path, name: &str) -> Result<String> {
    let root = match std::fs::File::open(rootfs) {
        Ok(f) => f,
        Err(e) => {
            return Err(e).with_context(|| format!("opening the rootfs {}", rootfs.display()))
        }
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let fd = match openat2(&root, format!("etc/{name}").as_str(), how) {
        Ok(fd) => fd,
        Err(_) => return Ok(String::new()),
    };
    let file = std::fs::File::from(fd);
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(String::new());
    }
    let mut bytes = Vec::new();
    file.take(MAX_ETC_FILE)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the container's /etc/{name}"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\nbob:x:1000:100::/home/bob:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nusers:x:100:\nwww:x:33:\nwheel:x:10:bob,www\naudio:x:29:bob\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_and_numbers_resolve_like_docker() {
        let r = rootfs();
        let ids = |u| resolve(r.path(), u).unwrap();
        let root = ids("");
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        assert!(root.additional_gids.is_empty());
        let bob = ids("bob");
        assert_eq!(
            (bob.uid, bob.gid, bob.additional_gids.clone()),
            (1000, 100, vec![10, 29])
        );
        assert_eq!(bob.home, "/home/bob");
        assert_eq!(ids("1000").gid, 100, "a uid with an entry takes its group");
        let unknown = ids("4242");
        assert_eq!(
            (unknown.uid, unknown.gid, unknown.home.as_str()),
            (4242, 0, "/")
        );
        assert_eq!(ids("www:users").gid, 100);
        assert_eq!(ids("www:7").gid, 7);
        let err = resolve(r.path(), "nobody").unwrap_err().to_string();
        assert!(err.contains("no user \"nobody\""), "{err}");
        assert!(resolve(r.path(), "bob:nogroup").is_err());
    }

    #[test]
    fn symlinks_resolve_inside_the_rootfs_and_fifos_are_skipped() {
        let r = rootfs();
        // An absolute symlink means the rootfs's own file, not the host's.
        std::fs::rename(
            r.path().join("etc/passwd"),
            r.path().join("etc/passwd.real"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd.real", r.path().join("etc/passwd")).unwrap();
        assert_eq!(resolve(r.path(), "bob").unwrap().uid, 1000);
        std::fs::remove_file(r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/passwd", r.path().join("etc/passwd"))
            .unwrap();
        assert!(
            resolve(r.path(), "bob").is_err(),
            "the host's passwd was read"
        );
        // A FIFO would block a plain open: it is ignored.
        std::fs::remove_file(r.path().join("etc/passwd")).unwrap();
        nix::unistd::mkfifo(
            &r.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert_eq!(resolve(r.path(), "0:0").unwrap().uid, 0);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(resolve(empty.path(), "0:0").unwrap().uid, 0);
    }
}
