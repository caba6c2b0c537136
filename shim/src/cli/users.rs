//! `--user NAME[:GROUP]` resolved the way Docker does: against the
//! container's own `/etc/passwd` and `/etc/group`, read on the host from the
//! rootfs before the container starts.
//!
//! The rootfs comes from an image, so it is untrusted: a `/etc/passwd` that is
//! a symlink (which would be followed on the host, outside the rootfs) is
//! refused rather than read.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The ids a process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups the user is a member of in /etc/group.
    pub additional_gids: Vec<u32>,
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
            (f.len() >= 4 && (f[0] == name_or_id || f[2] == name_or_id))
                .then(|| (f[0].to_owned(), f[2], f[3]))
        })
    };
    let (name, uid, mut gid) = if u.is_empty() {
        ("root".to_owned(), 0, 0)
    } else if let Ok(uid) = u.parse::<u32>() {
        match entry(u) {
            Some((name, _, gid)) => (name, uid, gid.parse().unwrap_or(0)),
            None => (String::new(), uid, 0),
        }
    } else {
        let Some((name, uid, gid)) = entry(u) else {
            bail!("--user {user:?}: no user {u:?} in the container's /etc/passwd (use a numeric UID, or one of its users)");
        };
        let uid = uid
            .parse()
            .with_context(|| format!("the container's /etc/passwd has a bad uid for {u:?}"))?;
        (name, uid, gid.parse().unwrap_or(0))
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
                    format!("--user {user:?}: no group {g:?} in the container's /etc/group")
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
    })
}

/// The rootfs's `/etc/<name>`, or "" when there is none. Refuses symlinks
/// (at `etc` or the file), which could point at the host's files.
fn read_etc(rootfs: &Path, name: &str) -> Result<String> {
    for p in [rootfs.join("etc"), rootfs.join("etc").join(name)] {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                bail!("the container's /etc/{name} is reached through a symlink; use a numeric --user")
            }
            Ok(_) => {}
            Err(_) => return Ok(String::new()),
        }
    }
    let path = rootfs.join("etc").join(name);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
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
        assert_eq!(
            ids(""),
            Ids {
                uid: 0,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            ids("bob"),
            Ids {
                uid: 1000,
                gid: 100,
                additional_gids: vec![10, 29]
            }
        );
        assert_eq!(ids("1000").gid, 100, "a uid with an entry takes its group");
        assert_eq!(
            ids("4242"),
            Ids {
                uid: 4242,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(ids("www:users").gid, 100);
        assert_eq!(ids("www:7").gid, 7);
        let err = resolve(r.path(), "nobody").unwrap_err().to_string();
        assert!(err.contains("no user \"nobody\""), "{err}");
        assert!(resolve(r.path(), "bob:nogroup").is_err());
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let r = rootfs();
        std::fs::remove_file(r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.path().join("etc/passwd")).unwrap();
        assert!(resolve(r.path(), "root").is_err());
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(resolve(empty.path(), "0:0").unwrap().uid, 0);
    }
}
