//! Finding and removing what a private containerd may leave behind: shims and
//! their children, runc containers, mounts, empty cgroups and directories.
//!
//! All of it works from what the kernel shows (`/proc`, mountinfo, cgroupfs) and
//! what runc records, so it still works when the daemon crashed or was killed.
//! Each function only touches things proven to be ours (the `-address` of a shim,
//! the bundle path runc recorded, a path under our directory, a cgroup directory
//! that did not exist before we started).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::SYSTEM_STATE_DIR;
use crate::process;

/// How long killed processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Deadline of a `runc delete`.
const RUNC_TIMEOUT: Duration = Duration::from_secs(30);
/// Where cgroupfs is mounted (v1 controllers below it, or the v2 root itself).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A running shim of one daemon, from its command line.
#[derive(Debug, Clone)]
pub(super) struct Shim {
    pub(super) pid: u32,
    namespace: String,
    id: String,
}

/// Processes whose program is a `containerd-shim*` and whose `-address` is `socket`.
pub(super) fn find_shims(socket: &Path) -> Vec<Shim> {
    let mut shims = Vec::new();
    for pid in all_pids() {
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
        let is_shim = args.first().is_some_and(|a| {
            Path::new(OsStr::from_bytes(a))
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b"containerd-shim"))
        });
        let value = |flag: &[u8]| {
            args.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| String::from_utf8_lossy(w[1]).into_owned())
        };
        if is_shim && value(b"-address").as_deref().map(Path::new) == Some(socket) {
            shims.push(Shim {
                pid,
                namespace: value(b"-namespace").unwrap_or_default(),
                id: value(b"-id").unwrap_or_default(),
            });
        }
    }
    shims
}

/// Where containerd 1.6 tells a shim to listen: `/run/containerd/s/<sha256 of
/// "<address>/<namespace>/<id>">` (see containerd's `shim.SocketAddress`).
fn shim_socket(address: &Path, namespace: &str, id: &str) -> PathBuf {
    let key = address.join(namespace).join(id);
    let digest = Sha256::digest(key.as_os_str().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SYSTEM_STATE_DIR).join("s").join(hex)
}

fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Parent pid and state letter from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

/// A process that exists and is not a zombie (zombies are someone else's to reap).
fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z')
}

/// All descendants of `pids` (not `pids` themselves).
fn descendants(pids: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| stat(p).map(|(ppid, _)| (p, ppid)))
        .collect();
    let mut found: Vec<u32> = Vec::new();
    let mut frontier: Vec<u32> = pids.to_vec();
    while let Some(parent) = frontier.pop() {
        for (pid, ppid) in &parents {
            if *ppid == parent && !found.contains(pid) && !pids.contains(pid) {
                found.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    found
}

/// `(runc root, container id)` of runc containers under `roots` (laid out as
/// `<root>/<namespace>/<id>/state.json`) whose bundle is inside `dir`: runc
/// records it as the label `bundle=<path>` in its state.
fn runc_containers_of(roots: &[PathBuf], dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    for root in roots {
        let Ok(namespaces) = fs::read_dir(root) else {
            continue;
        };
        for ns in namespaces.flatten() {
            let Ok(containers) = fs::read_dir(ns.path()) else {
                continue;
            };
            for container in containers.flatten() {
                let Ok(text) = fs::read(container.path().join("state.json")) else {
                    continue;
                };
                let Ok(state) = serde_json::from_slice::<serde_json::Value>(&text) else {
                    continue;
                };
                let ours = state["config"]["labels"].as_array().is_some_and(|labels| {
                    labels.iter().filter_map(|l| l.as_str()).any(|l| {
                        l.strip_prefix("bundle=")
                            .is_some_and(|b| Path::new(b).starts_with(dir))
                    })
                });
                if ours {
                    let id = container.file_name().to_string_lossy().into_owned();
                    found.push((ns.path(), id));
                }
            }
        }
    }
    found
}

/// Mount points at or below `dir` in this mount namespace, deepest first.
///
/// Public so tests can assert that nothing stays mounted after a teardown.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape_mountinfo(field))))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|o| {
            let s = std::str::from_utf8(o).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Lazily unmount everything at or below `dir`, deepest first, a few rounds (a
/// mount may hide another); returns the mounts that would not go.
pub(super) fn unmount_all_under(dir: &Path) -> Vec<String> {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Vec::new();
        }
        for mount in mounts {
            let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: umount2 with a NUL-terminated path; MNT_DETACH only detaches.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    mounts_under(dir)
        .into_iter()
        .map(|m| format!("cannot unmount {}", m.display()))
        .collect()
}

/// Remove `dir` and its subdirectories if (and as far as) they are empty
/// directories; files and non-empty directories stay.
pub(super) fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// SIGKILL the shims pointing at `socket` and all their descendants (container
/// processes, VMMs, ...), wait until they are gone and remove the sockets the
/// shims leave in `/run/containerd/s`; returns what survived.
pub(super) fn kill_shims(socket: &Path) -> Vec<String> {
    let shims = find_shims(socket);
    if shims.is_empty() {
        return Vec::new();
    }
    let mut pids: Vec<u32> = shims.iter().map(|s| s.pid).collect();
    pids.extend(descendants(&pids));
    eprintln!("private containerd teardown: killing leftover shims and children {pids:?}");

    let mut problems = Vec::new();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        // Again each round: a shim may have forked meanwhile.
        let mut alive: Vec<u32> = pids.iter().copied().filter(|p| is_alive(*p)).collect();
        alive.extend(
            descendants(&alive)
                .into_iter()
                .filter(|p| !pids.contains(p)),
        );
        if alive.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            problems.push(format!("processes {alive:?} survived SIGKILL"));
            break;
        }
        for pid in &alive {
            // SAFETY: kill(2) on a pid found as one of our shims or its descendant.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        pids.extend(alive);
        thread::sleep(Duration::from_millis(50));
    }
    for shim in shims {
        let _ = fs::remove_file(shim_socket(socket, &shim.namespace, &shim.id));
        // A bulkhead shim killed mid-way leaves its sandbox directory (named
        // by the shim's id) with the share mounted; its processes died above.
        let sandbox = Path::new(BULKHEAD_RUN_ROOT).join(&shim.id);
        if sandbox.is_dir() {
            problems.extend(unmount_all_under(&sandbox));
            if let Err(e) = fs::remove_dir_all(&sandbox) {
                problems.push(format!("cannot remove {}: {e}", sandbox.display()));
            }
        }
    }
    problems
}

/// Where bulkhead's shims make their sandbox directories (its default run root).
const BULKHEAD_RUN_ROOT: &str = "/run/bulkhead";

/// The stdio FIFOs the shims of `socket` and their children hold open in
/// `/run/containerd/fifo/<n>/`: ctr makes them there and removes them only when
/// it deletes the task, so a crash leaves them. Taken while the processes live.
pub(super) fn shim_fifos(socket: &Path) -> Vec<PathBuf> {
    let fifo_dir = Path::new(SYSTEM_STATE_DIR).join("fifo");
    let mut pids: Vec<u32> = find_shims(socket).iter().map(|s| s.pid).collect();
    pids.extend(descendants(&pids));
    let mut fifos: Vec<PathBuf> = pids
        .iter()
        .flat_map(|pid| open_files(*pid))
        .filter(|f| f.starts_with(&fifo_dir))
        .collect();
    fifos.sort();
    fifos.dedup();
    fifos
}

/// Remove `fifos` and their directories once empty.
pub(super) fn remove_fifos(fifos: &[PathBuf]) {
    for fifo in fifos {
        let _ = fs::remove_file(fifo);
        if let Some(dir) = fifo.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The files process `pid` has open (the targets of `/proc/<pid>/fd/*`).
fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .collect()
}

/// `runc delete --force` every runc container under `roots` whose bundle is in
/// `dir` (kills its processes, removes its cgroups and state); returns failures.
pub(super) fn delete_runc_containers(
    roots: &[PathBuf],
    dir: &Path,
    path_env: &OsStr,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (root, id) in runc_containers_of(roots, dir) {
        eprintln!("private containerd teardown: deleting leftover runc container {id}");
        let mut cmd = Command::new("runc");
        cmd.env("PATH", path_env)
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &id]);
        if let Err(e) = process::run(&mut cmd, RUNC_TIMEOUT) {
            problems.push(e.to_string());
        }
    }
    problems
}

/// The cgroup directories at the top of each hierarchy, to tell later which ones
/// we made. runc makes `/<namespace>` parents (ctr's `/<ns>/<id>`, CRI's
/// `/k8s.io/<id>`) and removes only the leaves.
pub(super) fn top_cgroups() -> HashSet<PathBuf> {
    let mut found = HashSet::new();
    for hierarchy in cgroup_hierarchies() {
        if let Ok(entries) = fs::read_dir(&hierarchy) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    found.insert(entry.path());
                }
            }
        }
    }
    found
}

/// Remove the empty top-level cgroups named like `namespaces` that are not in
/// `before` (rmdir fails on a cgroup still in use, which then stays).
pub(super) fn remove_namespace_cgroups(namespaces: &HashSet<String>, before: &HashSet<PathBuf>) {
    for hierarchy in cgroup_hierarchies() {
        for ns in namespaces {
            let dir = hierarchy.join(ns);
            if !before.contains(&dir) && dir.is_dir() {
                let _ = fs::remove_dir(&dir);
            }
        }
    }
}

/// `/sys/fs/cgroup` itself (cgroup v2, or the v1 tmpfs) and each directory below it
/// (the v1 controllers, or v2 top cgroups: harmless, nothing is named like a namespace).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = PathBuf::from(CGROUP_ROOT);
    let mut all = vec![root.clone()];
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                all.push(entry.path());
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_socket_matches_containerd() {
        // The formula of containerd 1.6's SocketAddress, computed independently.
        let p = shim_socket(Path::new("/x/containerd.sock"), "k8s.io", "abc");
        let hex: String = Sha256::digest(b"/x/containerd.sock/k8s.io/abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(p, Path::new("/run/containerd/s").join(hex));
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo("/plain\\"), b"/plain\\");
    }

    #[test]
    fn process_tree() {
        let me = std::process::id();
        let (ppid, state) = stat(me).unwrap();
        assert!(ppid > 0 && state != 'Z');
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(descendants(&[me]).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_alive(child.id()));
    }

    #[test]
    fn runc_state_ownership() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("runc");
        let ours = tmp.path().join("ours");
        for (id, bundle) in [
            ("a", ours.join("state/x/a")),
            ("b", PathBuf::from("/elsewhere/b")),
        ] {
            let dir = root.join("default").join(id);
            fs::create_dir_all(&dir).unwrap();
            let state =
                serde_json::json!({"config": {"labels": [format!("bundle={}", bundle.display())]}});
            fs::write(dir.join("state.json"), state.to_string()).unwrap();
        }
        let found = runc_containers_of(std::slice::from_ref(&root), &ours);
        assert_eq!(found, vec![(root.join("default"), "a".to_owned())]);
    }
}
