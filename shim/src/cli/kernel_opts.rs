//! The flags that set up the container's view of its kernel, as Docker's do:
//! `--sysctl` (namespaced parameters only), `--tmpfs` and `--shm-size`, and
//! the paths Docker masks.

use anyhow::{bail, Result};
use oci_spec::runtime::{Mount, MountBuilder};

/// The paths Docker masks (bind-mounts over with nothing), a superset of
/// oci-spec's default list.
pub const MASKED_PATHS: [&str; 12] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The IPC sysctls that belong to the container's IPC namespace.
const IPC_SYSCTLS: [&str; 8] = [
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// Parses `--sysctl KEY=VALUE`. Only parameters of the container's own
/// namespaces (IPC, the POSIX queues, its network), as Docker allows: the
/// others are the whole guest kernel's, which a pod's containers share.
pub fn sysctl(value: &str) -> Result<(String, String)> {
    let Some((key, val)) = value.split_once('=') else {
        bail!("--sysctl {value}: expected KEY=VALUE, e.g. net.ipv4.ip_forward=1");
    };
    let key = key.trim().replace('/', ".");
    let namespaced = IPC_SYSCTLS.contains(&key.as_str())
        || key.starts_with("fs.mqueue.")
        || key.starts_with("net.");
    if !namespaced {
        bail!(
            "--sysctl {value}: {key} is not in the container's namespaces (only kernel.msg*, \
             kernel.sem, kernel.shm*, fs.mqueue.* and net.* are), so it would change the \
             whole guest kernel"
        );
    }
    Ok((key, val.to_owned()))
}

/// Parses `--shm-size SIZE` (bytes, or with k, m or g) into tmpfs's `size=`.
pub fn shm_size(value: &str) -> Result<u64> {
    let v = value.trim().to_ascii_lowercase();
    let (digits, unit) = match v.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => v.split_at(i),
        None => (v.as_str(), ""),
    };
    let scale = match unit.trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => bail!("--shm-size {value}: expected a size such as 64m or 1g"),
    };
    match digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => bail!("--shm-size {value}: expected a size above zero, such as 64m or 1g"),
    }
}

/// Parses `--tmpfs DIR[:OPTIONS]` into a tmpfs mount, with Docker's default
/// options (noexec, nosuid, nodev) before the given ones.
pub fn tmpfs(value: &str) -> Result<Mount> {
    let (dir, options) = match value.split_once(':') {
        Some((d, o)) => (d, Some(o)),
        None => (value, None),
    };
    if !dir.starts_with('/') || dir == "/" {
        bail!("--tmpfs {value}: the directory must be absolute and not /, e.g. /run:size=64m");
    }
    let mut opts: Vec<String> = ["noexec", "nosuid", "nodev"].map(String::from).to_vec();
    opts.extend(
        options
            .into_iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
            .map(String::from),
    );
    Ok(MountBuilder::default()
        .destination(dir)
        .typ("tmpfs")
        .source("tmpfs")
        .options(opts)
        .build()?)
}

/// `mounts` with `/dev/shm`'s size set to `bytes`.
pub fn with_shm_size(mounts: &mut [Mount], bytes: u64) {
    for m in mounts.iter_mut() {
        if m.destination() == std::path::Path::new("/dev/shm") {
            let mut opts: Vec<String> = m
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| !o.starts_with("size="))
                .collect();
            opts.push(format!("size={}k", bytes.div_ceil(1024)));
            m.set_options(Some(opts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaced_sysctls_pass() {
        assert_eq!(
            sysctl("net.ipv4.ip_forward=1").unwrap(),
            ("net.ipv4.ip_forward".into(), "1".into())
        );
        assert_eq!(sysctl("kernel/shmmni=100").unwrap().0, "kernel.shmmni");
        assert!(sysctl("fs.mqueue.msg_max=20").is_ok());
        let err = sysctl("vm.swappiness=10").unwrap_err().to_string();
        assert!(
            err.contains("vm.swappiness") && err.contains("whole guest kernel"),
            "{err}"
        );
        assert!(sysctl("kernel.hostname=x").is_err());
        assert!(sysctl("net.ipv4.ip_forward")
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
    }

    #[test]
    fn shm_sizes() {
        assert_eq!(shm_size("64m").unwrap(), 64 << 20);
        assert_eq!(shm_size("1G").unwrap(), 1 << 30);
        assert_eq!(shm_size("512kb").unwrap(), 512 << 10);
        assert_eq!(shm_size("4096").unwrap(), 4096);
        for bad in ["", "0", "m", "12x", "99999999999999999g"] {
            assert!(shm_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tmpfs_mounts_take_dockers_defaults_first() {
        let m = tmpfs("/scratch:size=1m,exec").unwrap();
        assert_eq!(m.destination(), std::path::Path::new("/scratch"));
        assert_eq!(m.typ().as_deref(), Some("tmpfs"));
        let opts = m.options().clone().unwrap();
        assert_eq!(opts, ["noexec", "nosuid", "nodev", "size=1m", "exec"]);
        assert!(tmpfs("relative").is_err());
        assert!(tmpfs("/").is_err());
    }

    #[test]
    fn shm_size_replaces_the_size_option() {
        let mut mounts = vec![MountBuilder::default()
            .destination("/dev/shm")
            .typ("tmpfs")
            .source("shm")
            .options(vec!["nosuid".to_string(), "size=65536k".to_string()])
            .build()
            .unwrap()];
        with_shm_size(&mut mounts, 8 << 20);
        assert_eq!(
            mounts[0].options().clone().unwrap(),
            ["nosuid".to_string(), "size=8192k".to_string()]
        );
    }
}
