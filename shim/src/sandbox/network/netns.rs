//! Network namespaces by path: made and pinned for a container the CLI
//! networks itself, and entered (on a thread of their own) to set up the tap
//! in a namespace CNI or an engine made.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Runs `work` on a new thread inside the network namespace at `netns`.
///
/// `setns` moves only the calling thread, and a netlink socket or a tap
/// belongs to the namespace of the thread that opened it; a thread of its
/// own, which ends right after, keeps every other thread where it was.
pub fn run_in<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(netns).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", netns.display()),
        )
    })?;
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("entering the network namespace: {e}")))?;
        work()
    })
    .join()
    .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// Makes a new network namespace and pins it at `path` (a bind mount of it,
/// which keeps it alive with no process inside), as `ip netns add` does.
pub fn create(path: &Path) -> io::Result<()> {
    // The directory goes when its last namespace does (see [`remove`]): a
    // removal racing this one is undone by a second try.
    let mut tries = 0;
    loop {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match File::create(path) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 => tries += 1,
            Err(e) => return Err(e),
        }
    }
    let target = path.to_owned();
    let made = std::thread::spawn(move || -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(io::Error::new(
            e.kind(),
            format!("making network namespace {}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// Unpins and removes a namespace made by [`create`], and its directory if
/// it was the last; a missing one is fine (removal is retried after crashes).
pub fn remove(path: &Path) -> io::Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(io::Error::other(format!(
                "unpinning network namespace {}: {e}",
                path.display()
            )))
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The last one out takes the directory (fails harmlessly while others
    // are in it), so nothing of ours stays under the run directory.
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_namespace_is_made_entered_and_removed() {
        if !root() {
            eprintln!("skipped: making network namespaces needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns");
        create(&path).unwrap();
        let inside = run_in(&path, || std::fs::read_link("/proc/thread-self/ns/net")).unwrap();
        let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, outside);
        remove(&path).unwrap();
        assert!(!path.exists());
        remove(&path).unwrap();
    }
}
