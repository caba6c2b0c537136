//! The Docker-style values of `bulkhead run`'s flags: memory sizes (`256m`),
//! fractional CPUs (`1.5`), volumes (`HOST:CTR[:ro]`) and env files, parsed
//! the way `docker run` reads them so scripts written for Docker work as they are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// `--memory`: a byte count with an optional unit, `b`, `k`, `m` or `g`
/// (powers of 1024, case-insensitive, an optional trailing `b` as in `256mb`).
/// A bare number is bytes, as in Docker.
pub fn parse_memory(value: &str) -> Result<u64> {
    let v = value.trim().to_ascii_lowercase();
    let v = v
        .strip_suffix('b')
        .filter(|rest| rest.ends_with(['k', 'm', 'g']))
        .unwrap_or(&v);
    let (number, shift) = match v.chars().last() {
        Some('k') => (&v[..v.len() - 1], 10),
        Some('m') => (&v[..v.len() - 1], 20),
        Some('g') => (&v[..v.len() - 1], 30),
        Some('b') => (&v[..v.len() - 1], 0),
        _ => (v, 0),
    };
    let n: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .with_context(|| {
            format!("--memory {value:?}: expected a size such as 256m, 1g or 134217728 (bytes)")
        })?;
    let bytes = n * f64::from(1u32 << shift);
    if bytes > (1u64 << 50) as f64 {
        bail!("--memory {value:?} is more than any microVM can have");
    }
    Ok(bytes as u64)
}

/// `--cpus`: how much CPU the container may use, as in Docker (`1.5` is one
/// and a half CPUs). The microVM gets that many vCPUs rounded up, and the
/// container a CPU quota of exactly that much.
pub fn parse_cpus(value: &str) -> Result<f64> {
    let cpus: f64 = value
        .trim()
        .parse()
        .ok()
        .filter(|c: &f64| c.is_finite() && *c > 0.0)
        .with_context(|| {
            format!("--cpus {value:?}: expected a positive number such as 1, 2 or 0.5")
        })?;
    Ok(cpus)
}

/// One `-v`: a host directory or file, where it appears in the container,
/// and whether the container may write to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Absolute path on the host.
    pub host: PathBuf,
    /// Absolute path in the container.
    pub container: String,
    /// Mounted read-only (`:ro`).
    pub read_only: bool,
}

/// `-v HOST:CTR[:ro|rw]`. Only host paths: named volumes are a Docker
/// daemon feature bulkhead does not have, and saying so beats guessing.
pub fn parse_volume(value: &str) -> Result<Volume> {
    let parts: Vec<&str> = value.split(':').collect();
    let (host, container, mode) = match parts.as_slice() {
        [h, c] => (*h, *c, ""),
        [h, c, m] => (*h, *c, *m),
        _ => bail!("-v {value:?}: expected HOST_PATH:CONTAINER_PATH[:ro]"),
    };
    if !host.starts_with('/') {
        bail!("-v {value:?}: the host side must be an absolute path (named volumes are not supported; use a directory, e.g. -v \"$PWD/data:/data\")");
    }
    if !container.starts_with('/') || container.split('/').any(|c| c == "..") {
        bail!("-v {value:?}: the container side must be an absolute path without `..`");
    }
    if container == "/" {
        bail!("-v {value:?}: a volume cannot replace the container's root");
    }
    let mut read_only = false;
    for option in mode.split(',').filter(|o| !o.is_empty()) {
        match option {
            "ro" => read_only = true,
            "rw" => read_only = false,
            // SELinux relabelling and propagation modes have no meaning here.
            "z" | "Z" | "rprivate" | "private" => {}
            other => bail!("-v {value:?}: unknown option {other:?} (expected ro or rw)"),
        }
    }
    Ok(Volume {
        host: PathBuf::from(host),
        container: container.trim_end_matches('/').to_owned(),
        read_only,
    })
}

/// `--env-file F`: one `KEY=VALUE` per line; blank lines and `#` comments are
/// skipped, and a bare `KEY` takes the value from our own environment (or is
/// left out when we have none), as in Docker.
pub fn read_env_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--env-file {}: cannot read it", path.display()))?;
    let mut env = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some(("", _)) => bail!(
                "--env-file {} line {}: a variable needs a name before `=`",
                path.display(),
                n + 1
            ),
            Some(_) => env.push(line.to_owned()),
            None => {
                let key = line.trim_end();
                if let Ok(value) = std::env::var(key) {
                    env.push(format!("{key}={value}"));
                }
            }
        }
    }
    Ok(env)
}

/// A signal as Docker accepts it: `SIGKILL`, `KILL`, `kill` or `9`.
pub fn parse_signal(value: &str) -> Result<i32> {
    let v = value.trim();
    if let Ok(n) = v.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("signal {value:?}: a signal number is 1 to 64");
    }
    let upper = v.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| {
            anyhow::anyhow!(
                "unknown signal {value:?} (use a name such as SIGTERM or KILL, or a number)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_like_docker() {
        assert_eq!(parse_memory("256m").unwrap(), 256 << 20);
        assert_eq!(parse_memory("256MB").unwrap(), 256 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("64k").unwrap(), 64 << 10);
        assert_eq!(parse_memory("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_memory("100b").unwrap(), 100);
        for bad in ["", "m", "-1m", "lots", "12x", "0"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert_eq!(parse_signal("10").unwrap(), 10);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
    }

    #[test]
    fn cpus_are_positive_numbers() {
        assert_eq!(parse_cpus("1.5").unwrap(), 1.5);
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("two").is_err());
    }

    #[test]
    fn volumes_need_absolute_paths_and_know_ro() {
        let v = parse_volume("/srv/data:/data:ro").unwrap();
        assert_eq!(v.host, PathBuf::from("/srv/data"));
        assert_eq!(v.container, "/data");
        assert!(v.read_only);
        assert!(!parse_volume("/a:/b/").unwrap().read_only);
        assert_eq!(parse_volume("/a:/b/").unwrap().container, "/b");
        let named = parse_volume("data:/data").unwrap_err().to_string();
        assert!(named.contains("named volumes"), "{named}");
        assert!(parse_volume("/a").is_err());
        assert!(parse_volume("/a:rel").is_err());
        assert!(parse_volume("/a:/b/../etc").is_err());
        assert!(parse_volume("/a:/").is_err());
        assert!(parse_volume("/a:/b:rx").is_err());
    }

    #[test]
    fn env_files_skip_comments_and_take_bare_names_from_here() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("env");
        std::fs::write(&f, "# c\n\nA=1\nB = x=y\nPATH\nBULKHEAD_SURELY_UNSET_VAR\n").unwrap();
        let env = read_env_file(&f).unwrap();
        assert_eq!(env[0], "A=1");
        assert_eq!(env[1], "B = x=y");
        assert!(env[2].starts_with("PATH="));
        assert_eq!(env.len(), 3);
        std::fs::write(&f, "=x\n").unwrap();
        assert!(read_env_file(&f)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert!(read_env_file(&dir.path().join("missing")).is_err());
    }
}
