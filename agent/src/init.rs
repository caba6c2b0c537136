//! PID 1's first duty: the guest's kernel filesystems and cgroup v2 controllers.
//!
//! The initrd has nothing mounted when the kernel starts `/init`; these mounts are
//! what libcontainer and the containers' own mounts expect to find. Every function
//! takes the root to mount under, so the same code is tested on a scratch
//! directory and used on `/` in the guest.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// The cgroup v2 controllers the agent delegates to containers.
pub const CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids"];

/// A failed step of the guest's early setup, naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mounting {fstype} on {target}: {source}")]
    Mount {
        /// The filesystem type.
        fstype: String,
        /// Where it was to be mounted.
        target: PathBuf,
        /// The kernel's answer.
        source: nix::Error,
    },
    /// Making a mount point or writing a control file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// One kernel filesystem to mount.
struct KernelMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// The mounts of [`mount_kernel_filesystems`], in order (parents first).
fn kernel_mounts() -> Vec<KernelMount> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    vec![
        KernelMount {
            fstype: "proc",
            target: "proc",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        KernelMount {
            fstype: "sysfs",
            target: "sys",
            flags: nosuid_noexec_nodev,
            data: None,
        },
        KernelMount {
            fstype: "devtmpfs",
            target: "dev",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        KernelMount {
            fstype: "devpts",
            target: "dev/pts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        },
        KernelMount {
            fstype: "tmpfs",
            target: "dev/shm",
            flags: nosuid_noexec_nodev,
            data: Some("mode=1777"),
        },
        KernelMount {
            fstype: "tmpfs",
            target: "run",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
        },
        KernelMount {
            fstype: "cgroup2",
            target: "sys/fs/cgroup",
            flags: nosuid_noexec_nodev,
            data: Some("nsdelegate"),
        },
    ]
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts (a new devpts instance with a
/// 0666 ptmx, so /dev/ptmx works for everyone), /dev/shm, /run and the cgroup v2
/// hierarchy at /sys/fs/cgroup, all under `root` (`/` in the guest).
pub fn mount_kernel_filesystems(root: &Path) -> Result<(), InitError> {
    for m in kernel_mounts() {
        let target = root.join(m.target);
        create_dir(&target)?;
        match mount(Some(m.fstype), &target, Some(m.fstype), m.flags, m.data) {
            Ok(()) => {}
            // The same filesystem is already mounted there (a kernel that
            // automounts devtmpfs, or an agent started twice): nothing to do.
            Err(nix::Error::EBUSY) => {}
            Err(source) => {
                return Err(InitError::Mount {
                    fstype: m.fstype.to_string(),
                    target,
                    source,
                })
            }
        }
    }
    // The devpts instance brings its own ptmx; /dev/ptmx must point at it.
    let ptmx = root.join("dev/ptmx");
    let _ = fs::remove_file(&ptmx);
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(|source| InitError::Io {
        what: "linking",
        path: ptmx,
        source,
    })?;
    Ok(())
}

/// Enables [`CONTROLLERS`] (those this kernel has) for the children of the cgroup
/// v2 root at `cgroup_root`, so that container cgroups can be limited. Returns the
/// controllers enabled.
pub fn enable_cgroup_controllers(cgroup_root: &Path) -> Result<Vec<String>, InitError> {
    let available_path = cgroup_root.join("cgroup.controllers");
    let available = fs::read_to_string(&available_path).map_err(|source| InitError::Io {
        what: "reading",
        path: available_path,
        source,
    })?;
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|c| CONTROLLERS.contains(c))
        .map(str::to_string)
        .collect();
    if wanted.is_empty() {
        return Ok(wanted);
    }
    let line = wanted
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let control = cgroup_root.join("cgroup.subtree_control");
    fs::write(&control, line).map_err(|source| InitError::Io {
        what: "writing",
        path: control,
        source,
    })?;
    Ok(wanted)
}

/// Mounts the virtio-fs share called `tag` (the host's shared folder) on `target`,
/// the equivalent of `mount -t virtiofs <tag> <target>`.
pub fn mount_virtiofs(tag: &str, target: &Path) -> Result<(), InitError> {
    create_dir(target)?;
    mount(
        Some(tag),
        target,
        Some("virtiofs"),
        MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|source| InitError::Mount {
        fstype: format!("virtiofs ({tag})"),
        target: target.to_path_buf(),
        source,
    })
}

/// Read-ahead for the shared folder, in KiB.
///
/// FUSE starts every mount at 128 KiB, so the kernel reads a 2 MiB binary it
/// execs over virtio-fs in 17 requests, one after the other, each a VM exit
/// and a wake-up of virtiofsd. With 2 MiB it is one or two requests (FUSE
/// splits a read-ahead into requests of at most `max_pages`, 1 MiB with
/// virtiofsd and our 1024-entry queues). Only what is read sits in the page
/// cache, and the guest reclaims it like any other cache.
pub const SHARE_READAHEAD_KIB: u32 = 2048;

/// Sets the read-ahead of the file system mounted at `mount` (its backing
/// device's `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`). virtio-fs submounts
/// share their parent's, so one call covers every container's rootfs.
pub fn set_readahead(mount: &Path, kib: u32) -> Result<(), InitError> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(mount)
        .map_err(|source| InitError::Io {
            what: "stat",
            path: mount.to_path_buf(),
            source,
        })?
        .dev();
    let control = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    ));
    fs::write(&control, format!("{kib}\n")).map_err(|source| InitError::Io {
        what: "writing",
        path: control,
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), InitError> {
    fs::create_dir_all(path).map_err(|source| InitError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}
