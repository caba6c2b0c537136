//! Reading a container's cgroup v2 statistics straight from its control files.
//!
//! The files are the kernel's own interface (cpu.stat, memory.*, pids.*,
//! io.stat); reading them directly keeps the numbers exactly what the kernel says,
//! including the `oom_kill` counter that OOM detection is built on.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The cgroup v2 mount point in the guest.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// All statistics of one cgroup. Counters a kernel lacks (a controller not
/// enabled) are left at their defaults rather than failing the whole read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// `cpu.stat`.
    pub cpu: CpuStats,
    /// `memory.current`, `memory.max`, `memory.stat`, `memory.events`.
    pub memory: MemoryStats,
    /// `pids.current`, `pids.max`.
    pub pids: PidsStats,
    /// `io.stat`, one entry per device.
    pub io: Vec<IoDeviceStats>,
}

/// CPU time, in microseconds, and throttling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time.
    pub usage_usec: u64,
    /// Time in user mode.
    pub user_usec: u64,
    /// Time in kernel mode.
    pub system_usec: u64,
    /// Enforcement periods elapsed (with a cpu.max quota).
    pub nr_periods: u64,
    /// Periods in which the cgroup was throttled.
    pub nr_throttled: u64,
    /// Total time throttled.
    pub throttled_usec: u64,
}

/// Memory use and limit events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in use now (`memory.current`).
    pub current: u64,
    /// The hard limit in bytes, `None` for "max" (unlimited).
    pub limit: Option<u64>,
    /// `memory.stat`, every key as the kernel names it (anon, file, ...).
    pub stat: BTreeMap<String, u64>,
    /// `memory.events`.
    pub events: MemoryEvents,
}

/// The counters of `memory.events` (the whole subtree, not only this cgroup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Reclaims below memory.low.
    pub low: u64,
    /// Throttles above memory.high.
    pub high: u64,
    /// Times usage hit memory.max.
    pub max: u64,
    /// Times the OOM killer was invoked.
    pub oom: u64,
    /// Processes the OOM killer killed: the counter OOM detection watches.
    pub oom_kill: u64,
}

/// Process counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PidsStats {
    /// Tasks now in the cgroup.
    pub current: u64,
    /// The limit, `None` for "max".
    pub limit: Option<u64>,
}

/// I/O done on one block device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoDeviceStats {
    /// Device major number.
    pub major: u64,
    /// Device minor number.
    pub minor: u64,
    /// Bytes read.
    pub rbytes: u64,
    /// Bytes written.
    pub wbytes: u64,
    /// Read operations.
    pub rios: u64,
    /// Write operations.
    pub wios: u64,
    /// Bytes discarded.
    pub dbytes: u64,
    /// Discard operations.
    pub dios: u64,
}

/// A cgroup v2 directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// The cgroup at `path` relative to the hierarchy root (an OCI `cgroupsPath`
    /// such as `/bulkhead/ctr1`), under `root` (normally [`CGROUP_ROOT`]).
    pub fn new(root: &Path, path: &Path) -> Self {
        let rel = path.strip_prefix("/").unwrap_or(path);
        Cgroup {
            dir: root.join(rel),
        }
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every statistic.
    pub fn stats(&self) -> io::Result<CgroupStats> {
        let cpu = self.flat_keyed("cpu.stat")?;
        let memory_events = self.memory_events()?;
        let io = match self.read_optional("io.stat")? {
            Some(text) => parse_io_stat(&text),
            None => Vec::new(),
        };
        Ok(CgroupStats {
            cpu: CpuStats {
                usage_usec: get(&cpu, "usage_usec"),
                user_usec: get(&cpu, "user_usec"),
                system_usec: get(&cpu, "system_usec"),
                nr_periods: get(&cpu, "nr_periods"),
                nr_throttled: get(&cpu, "nr_throttled"),
                throttled_usec: get(&cpu, "throttled_usec"),
            },
            memory: MemoryStats {
                current: self.single("memory.current")?.flatten().unwrap_or(0),
                limit: self.single("memory.max")?.flatten(),
                stat: self.flat_keyed("memory.stat")?,
                events: memory_events,
            },
            pids: PidsStats {
                current: self.single("pids.current")?.flatten().unwrap_or(0),
                limit: self.single("pids.max")?.flatten(),
            },
            io,
        })
    }

    /// Reads `memory.events`; the OOM-kill count is [`MemoryEvents::oom_kill`].
    pub fn memory_events(&self) -> io::Result<MemoryEvents> {
        let ev = self.flat_keyed("memory.events")?;
        Ok(MemoryEvents {
            low: get(&ev, "low"),
            high: get(&ev, "high"),
            max: get(&ev, "max"),
            oom: get(&ev, "oom"),
            oom_kill: get(&ev, "oom_kill"),
        })
    }

    /// The pids of every process in the cgroup and its descendants.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        collect_pids(&self.dir, &mut pids)?;
        Ok(pids)
    }

    fn read_optional(&self, file: &str) -> io::Result<Option<String>> {
        match fs::read_to_string(self.dir.join(file)) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!("reading {}: {err}", self.dir.join(file).display()),
            )),
        }
    }

    /// A one-value file: `Some(None)` for "max", `None` when the file is absent.
    fn single(&self, file: &str) -> io::Result<Option<Option<u64>>> {
        Ok(self
            .read_optional(file)?
            .map(|text| parse_limit(text.trim())))
    }

    fn flat_keyed(&self, file: &str) -> io::Result<BTreeMap<String, u64>> {
        Ok(self
            .read_optional(file)?
            .map(|t| parse_flat_keyed(&t))
            .unwrap_or_default())
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) -> io::Result<()> {
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

fn get(map: &BTreeMap<String, u64>, key: &str) -> u64 {
    map.get(key).copied().unwrap_or(0)
}

/// `max` is `None`; a number is `Some`.
fn parse_limit(text: &str) -> Option<u64> {
    if text == "max" {
        None
    } else {
        text.parse().ok()
    }
}

/// Parses "key value" lines (cpu.stat, memory.stat, memory.events).
fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Parses io.stat: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N".
fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (major, minor) = fields.next()?.split_once(':')?;
            let mut dev = IoDeviceStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..Default::default()
            };
            for field in fields {
                let Some((key, value)) = field.split_once('=') else {
                    continue;
                };
                let value = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => dev.rbytes = value,
                    "wbytes" => dev.wbytes = value,
                    "rios" => dev.rios = value,
                    "wios" => dev.wios = value,
                    "dbytes" => dev.dbytes = value,
                    "dios" => dev.dios = value,
                    _ => {}
                }
            }
            Some(dev)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_formats() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, t: &str| fs::write(dir.path().join(f), t).unwrap();
        w(
            "cpu.stat",
            "usage_usec 120\nuser_usec 100\nsystem_usec 20\n",
        );
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 1024\nfile 2048\n");
        w(
            "memory.events",
            "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        w("pids.current", "3\n");
        w("pids.max", "64\n");
        w(
            "io.stat",
            "254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        w("cgroup.procs", "10\n11\n");
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/cgroup.procs"), "12\n").unwrap();

        let cg = Cgroup::new(dir.path(), Path::new("/"));
        let s = cg.stats().unwrap();
        assert_eq!(s.cpu.usage_usec, 120);
        assert_eq!(s.cpu.system_usec, 20);
        assert_eq!(s.memory.current, 4096);
        assert_eq!(s.memory.limit, None);
        assert_eq!(s.memory.stat["file"], 2048);
        assert_eq!(s.memory.events.oom_kill, 1);
        assert_eq!(s.memory.events.max, 5);
        assert_eq!(s.pids.limit, Some(64));
        assert_eq!(s.io[0].major, 254);
        assert_eq!(s.io[0].wbytes, 1024);
        let mut pids = cg.pids().unwrap();
        pids.sort();
        assert_eq!(pids, vec![10, 11, 12]);
    }
}
