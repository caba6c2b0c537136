//! The host cgroup of a container: runc puts the container's processes in
//! the spec's `linux.cgroupsPath` on the host, and engines read it (podman
//! and Docker's stats, the runc shim's OOM and memory events). Here those
//! processes are the keeper, the VMM and virtiofsd, so the keeper joins
//! that cgroup before it starts them and they inherit it.
//!
//! Only the placement is the host's: the container's limits are enforced by
//! the guest kernel, on the container's cgroup in the guest, and the VM is
//! sized for them plus the guest's own overhead. Setting the same limits on
//! the host cgroup would kill the VM when the guest is merely full.

use std::path::{Path, PathBuf};

/// Where the unified (v2) hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The host directory of `cgroups_path`, or why it is not used: not a
/// cgroup v2 host, or a systemd-style path (`slice:prefix:name`, which
/// only systemd may create), or a relative path.
pub fn host_dir(cgroup_root: &Path, cgroups_path: &Path) -> Result<PathBuf, &'static str> {
    if !cgroup_root.join("cgroup.controllers").exists() {
        return Err("the host has no unified (v2) cgroup hierarchy");
    }
    let text = cgroups_path.to_string_lossy();
    if text.contains(':') {
        return Err("a systemd cgroup path: systemd makes those units");
    }
    if !cgroups_path.is_absolute() {
        return Err("a relative cgroup path");
    }
    let relative = cgroups_path
        .strip_prefix("/")
        .map_err(|_| "a relative cgroup path")?;
    if relative
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err("a cgroup path with '..' or '.'");
    }
    Ok(cgroup_root.join(relative))
}

/// Moves this process into the host cgroup `cgroups_path` names, making
/// it; returns the directory to remove at delete, `None` when the path is
/// not one to use here (logged).
pub fn join(cgroups_path: &Path) -> std::io::Result<Option<PathBuf>> {
    let dir = match host_dir(Path::new(CGROUP_ROOT), cgroups_path) {
        Ok(d) => d,
        Err(why) => {
            tracing::info!(path = %cgroups_path.display(), "not joining the spec's host cgroup: {why}");
            return Ok(None);
        }
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cgroup.procs"), "0")?;
    Ok(Some(dir))
}

/// Removes a host cgroup made by [`join`] once nothing is in it.
pub fn remove(dir: &Path) {
    if !dir.starts_with(CGROUP_ROOT) {
        return;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(cgroup = %dir.display(), "removing the host cgroup: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_cgroupfs_paths_on_a_v2_host_are_used() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let path = Path::new("/libpod_parent/libpod-abc");
        assert!(host_dir(root, path).unwrap_err().contains("v2"));
        std::fs::write(root.join("cgroup.controllers"), "memory pids").unwrap();
        assert_eq!(
            host_dir(root, path).unwrap(),
            root.join("libpod_parent/libpod-abc")
        );
        assert!(host_dir(root, Path::new("system.slice:docker:abc"))
            .unwrap_err()
            .contains("systemd"));
        assert!(host_dir(root, Path::new("docker/abc")).is_err());
        assert!(host_dir(root, Path::new("/docker/../../etc")).is_err());
    }
}
