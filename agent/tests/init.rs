//! PID 1's mounts, done on a scratch directory (the same code mounts `/` in the
//! guest). Needs root and cgroup v2; elsewhere prints SKIPPED and passes. Run in
//! the emulated host on the development machines (see containers.rs).

use std::fs;
use std::path::Path;

use bulkhead_agent::init;
use nix::mount::{umount2, MntFlags};

fn can_run() -> bool {
    nix::unistd::Uid::effective().is_root()
        && Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[test]
fn kernel_filesystems_and_controllers() {
    if !can_run() {
        // `cargo xtask test` runs this again where it can run; a skip there fails.
        if std::env::var_os("BULKHEAD_AGENT_TESTS_REQUIRED").is_some() {
            panic!("needs root and cgroup v2 at /sys/fs/cgroup, which this host lacks");
        }
        // Straight to fd 2: the test harness captures eprintln!.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"\n!!!!!!!! SKIPPED: needs root and cgroup v2 at /sys/fs/cgroup !!!!!!!!\n",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init::mount_kernel_filesystems(root).unwrap();

    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let fstype_at = |sub: &str| {
        let target = root.join(sub);
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (Path::new(f[1]) == target).then(|| (f[2].to_string(), f[3].to_string()))
        })
    };
    for (sub, fstype) in [
        ("proc", "proc"),
        ("sys", "sysfs"),
        ("dev", "devtmpfs"),
        ("dev/pts", "devpts"),
        ("dev/shm", "tmpfs"),
        ("run", "tmpfs"),
        ("sys/fs/cgroup", "cgroup2"),
    ] {
        let (found, _) = fstype_at(sub).unwrap_or_else(|| panic!("{sub} not mounted"));
        assert_eq!(found, fstype, "{sub}");
    }
    let (_, pts_opts) = fstype_at("dev/pts").unwrap();
    assert!(pts_opts.contains("ptmxmode=666"), "{pts_opts}");
    assert_eq!(
        fs::read_link(root.join("dev/ptmx")).unwrap(),
        Path::new("pts/ptmx")
    );
    assert!(root.join("proc/self/status").exists());
    assert!(root.join("dev/null").exists());

    let enabled = init::enable_cgroup_controllers(&root.join("sys/fs/cgroup")).unwrap();
    let subtree = fs::read_to_string(root.join("sys/fs/cgroup/cgroup.subtree_control")).unwrap();
    for c in ["memory", "pids", "cpu"] {
        assert!(
            enabled.iter().any(|e| e == c),
            "{c} not enabled: {enabled:?}"
        );
        assert!(subtree.split_whitespace().any(|s| s == c), "{subtree}");
    }

    // No virtio-fs device here: the error names the tag and the target.
    let err = init::mount_virtiofs("nosuchtag", &root.join("run/share")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("virtiofs (nosuchtag)") && text.contains("run/share"),
        "{text}"
    );

    for sub in [
        "sys/fs/cgroup",
        "run",
        "dev/shm",
        "dev/pts",
        "dev",
        "sys",
        "proc",
    ] {
        umount2(&root.join(sub), MntFlags::MNT_DETACH).unwrap();
    }
}
