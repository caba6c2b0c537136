//! The `bulkhead` CLI's containers on this host: what each was asked to run,
//! where it stands, its name. Kept as files under `<state_root>/containers` so
//! that they outlive the CLI process that made them, and any later `bulkhead`
//! command (`ps`, `logs`, `exec`, `stop`, `rm`) finds them.
//!
//! ```text
//! containers/<id>/record.json   what was asked (never changes after create)
//! containers/<id>/state.json    created / running / exited, exit code, monitor pid
//! containers/<id>/log           the output (see container_log)
//! containers/<id>/upper, work   the overlay's writable layer over the image
//! names/<name> -> <id>          symlink: creating it is how a name is claimed
//! ```
//!
//! Every file is replaced by write-to-temp-and-rename, so a reader never sees
//! half of one; a name is claimed by `symlink(2)`, which fails if it exists, so
//! two concurrent `run --name x` cannot both get it.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::flags::Volume;
use super::spec::ProcessOptions;

/// What went wrong with the container records.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container has that name or id (prefix).
    #[error("no container named or with an id starting {0:?} (see `bulkhead ps -a`)")]
    NotFound(String),
    /// An id prefix matched more than one container.
    #[error("the id prefix {0:?} matches more than one container: give more of it, or the name")]
    Ambiguous(String),
    /// `--name` asked for a name another container has.
    #[error("the name {name:?} is already used by container {id}: remove it (`bulkhead rm {name}`) or choose another --name")]
    NameInUse {
        /// The name.
        name: String,
        /// Short id of its holder.
        id: String,
    },
    /// A name Docker would refuse too.
    #[error("invalid container name {0:?}: use letters, digits, `_`, `.` and `-`, starting with a letter or digit")]
    BadName(String),
    /// A file under the state root.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A record or state file that does not parse.
    #[error("{path} is damaged ({source}): remove the container with `bulkhead rm -f`")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, ContainerError>;

/// Everything a container was created with; written once, read by the
/// monitor that runs it and by `inspect`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex digits, as Docker's ids.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Unix seconds.
    pub created: u64,
    /// The image as the user named it (or `rootfs:DIR` for `--rootfs`).
    pub image: String,
    /// The image's id (its config digest); none for `--rootfs`.
    pub image_id: Option<String>,
    /// The read-only lower layer: an image's unpacked rootfs. None for `--rootfs`.
    pub image_rootfs: Option<PathBuf>,
    /// `--rootfs DIR`: the container runs on that directory itself, read-write.
    pub rootfs: Option<PathBuf>,
    /// The process, with the image's defaults already applied.
    pub process: ProcessOptions,
    /// The signal `stop` sends first (the image's StopSignal, else SIGTERM).
    pub stop_signal: i32,
    /// Memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// CPU limit (`--cpus`), in CPUs.
    pub cpus: Option<f64>,
    /// `-v` mounts.
    pub volumes: Vec<Volume>,
    /// `--rm`: delete the container when it exits.
    pub auto_remove: bool,
    /// `-i`: the process's stdin is our stdin.
    pub interactive: bool,
    /// `--boot-timeout`: overrides the config's.
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
    /// `--network`, `-p`, `--dns`, `--add-host`.
    #[serde(default)]
    pub network: super::network::NetworkOptions,
    /// `--hostname`; the short id otherwise.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl ContainerRecord {
    /// The first 12 digits: what `ps` shows, and the sandbox's id (short
    /// enough for the Unix socket paths under the run root).
    pub fn short_id(&self) -> &str {
        short(&self.id)
    }
}

/// The first 12 characters of an id.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded; its microVM is being started.
    #[default]
    Created,
    /// Its process runs.
    Running,
    /// Its process ended (or it never started: see `error`).
    Exited,
}

/// How a container stands; rewritten by its monitor at each step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ContainerState {
    /// Created, running or exited.
    pub status: Status,
    /// The process holding the sandbox (the foreground CLI or the detached
    /// monitor), and its start time in clock ticks since boot, so a recycled
    /// pid is not mistaken for it.
    pub monitor: Option<(u32, u64)>,
    /// Unix milliseconds.
    pub started_at: Option<u64>,
    /// Unix milliseconds.
    pub finished_at: Option<u64>,
    /// The exit code, 128+N for a signal.
    pub exit_code: Option<i32>,
    /// The kernel's OOM killer killed a process of it.
    pub oom_killed: bool,
    /// Why it could not start or ended abnormally.
    pub error: Option<String>,
}

impl ContainerState {
    /// The status, corrected for a monitor that died without saying so
    /// (killed, or the host rebooted): such a container is not running.
    pub fn effective_status(&self) -> Status {
        match (self.status, self.monitor) {
            (Status::Exited, _) => Status::Exited,
            (_, Some((pid, started))) if process_start_ticks(pid) == Some(started) => self.status,
            _ => Status::Exited,
        }
    }

    /// Whether its monitor process is alive.
    pub fn monitor_alive(&self) -> bool {
        matches!(self.monitor, Some((pid, started)) if process_start_ticks(pid) == Some(started))
    }
}

pub use crate::sandbox::process_start_ticks;

/// This process and its start time, for [`ContainerState::monitor`].
pub fn this_monitor() -> Option<(u32, u64)> {
    let pid = std::process::id();
    process_start_ticks(pid).map(|t| (pid, t))
}

/// Unix milliseconds now.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The containers under one state root.
#[derive(Clone, Debug)]
pub struct Containers {
    dir: PathBuf,
    names: PathBuf,
}

impl Containers {
    /// Opens (creating, mode 0700) `<state_root>/containers` and `names`.
    pub fn open(state_root: &Path) -> Result<Containers> {
        let c = Containers {
            dir: state_root.join("containers"),
            names: state_root.join("names"),
        };
        for d in [&c.dir, &c.names] {
            create_private_dir(d)?;
        }
        Ok(c)
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Records a new container: claims its name, then writes its record and a
    /// `created` state. On failure nothing of it is left.
    pub fn create(&self, record: &ContainerRecord) -> Result<()> {
        validate_name(&record.name)?;
        let link = self.names.join(&record.name);
        if let Err(source) = std::os::unix::fs::symlink(&record.id, &link) {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                let holder = std::fs::read_link(&link)
                    .map(|t| short(&t.to_string_lossy()).to_owned())
                    .unwrap_or_default();
                return Err(ContainerError::NameInUse {
                    name: record.name.clone(),
                    id: holder,
                });
            }
            return Err(ContainerError::Io {
                what: "cannot claim the name",
                path: link,
                source,
            });
        }
        let made = (|| {
            let dir = self.dir(&record.id);
            // Not recursive: an id that somehow exists already is an error,
            // never a record overwritten.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|source| ContainerError::Io {
                    what: "cannot create",
                    path: dir.clone(),
                    source,
                })?;
            write_json(&dir.join("record.json"), record)?;
            write_json(&dir.join("state.json"), &ContainerState::default())
        })();
        if let Err(ContainerError::Io { source, .. }) = &made {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(&link);
                return made;
            }
        }
        if made.is_err() {
            let _ = std::fs::remove_dir_all(self.dir(&record.id));
            let _ = std::fs::remove_file(&link);
        }
        made
    }

    /// The id of the container with this name, full id or unique id prefix.
    pub fn lookup(&self, name_or_id: &str) -> Result<String> {
        if validate_name(name_or_id).is_ok() {
            if let Ok(target) = std::fs::read_link(self.names.join(name_or_id)) {
                let id = target.to_string_lossy().into_owned();
                if self.dir(&id).is_dir() {
                    return Ok(id);
                }
            }
        }
        if name_or_id.is_empty() || !name_or_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ContainerError::NotFound(name_or_id.to_owned()));
        }
        let mut found = self
            .ids()?
            .into_iter()
            .filter(|id| id.starts_with(name_or_id));
        match (found.next(), found.next()) {
            (Some(id), None) => Ok(id),
            (Some(_), Some(_)) => Err(ContainerError::Ambiguous(name_or_id.to_owned())),
            _ => Err(ContainerError::NotFound(name_or_id.to_owned())),
        }
    }

    /// Every container's id, oldest directory order not guaranteed.
    pub fn ids(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| ContainerError::Io {
            what: "cannot list",
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter(|e| e.path().join("record.json").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// The record of container `id`.
    pub fn record(&self, id: &str) -> Result<ContainerRecord> {
        read_json(&self.dir(id).join("record.json"))
    }

    /// The state of container `id`.
    pub fn state(&self, id: &str) -> Result<ContainerState> {
        read_json(&self.dir(id).join("state.json"))
    }

    /// Replaces the state of container `id`.
    pub fn set_state(&self, id: &str, state: &ContainerState) -> Result<()> {
        write_json(&self.dir(id).join("state.json"), state)
    }

    /// Deletes container `id`: its name, then its directory. The caller makes
    /// sure nothing runs and nothing is mounted there.
    pub fn remove(&self, id: &str) -> Result<()> {
        if let Ok(record) = self.record(id) {
            let link = self.names.join(&record.name);
            if std::fs::read_link(&link).is_ok_and(|t| t.as_os_str() == id) {
                let _ = std::fs::remove_file(&link);
            }
        }
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ContainerError::Io {
                what: "cannot remove",
                path: dir,
                source,
            }),
        }
    }
}

/// Docker's rule for names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, and not too long
/// for a file name.
fn validate_name(name: &str) -> Result<()> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if first_ok && rest_ok && name.len() <= 128 {
        Ok(())
    } else {
        Err(ContainerError::BadName(name.to_owned()))
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ContainerError::Io {
            what: "cannot create",
            path: dir.to_owned(),
            source,
        })
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| ContainerError::Io {
        what: "cannot read",
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ContainerError::Damaged {
        path: path.to_owned(),
        source,
    })
}

/// Writes `value` as JSON to a temporary file beside `path`, then renames it
/// over `path`.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let io = |what, source| ContainerError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| io("cannot encode", e.into()))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot write", e))?;
    f.write_all(&bytes).map_err(|e| io("cannot write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("cannot replace", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, name: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            name: name.into(),
            created: 1,
            image: "busybox".into(),
            image_id: None,
            image_rootfs: None,
            rootfs: None,
            process: ProcessOptions::default(),
            stop_signal: libc::SIGTERM,
            memory_limit: None,
            cpus: None,
            volumes: vec![],
            auto_remove: false,
            interactive: false,
            boot_timeout_secs: None,
            network: Default::default(),
            hostname: None,
        }
    }

    #[test]
    fn names_are_unique_and_found_like_ids() {
        let root = tempfile::tempdir().unwrap();
        let c = Containers::open(root.path()).unwrap();
        c.create(&record("aaaa1111", "web")).unwrap();
        c.create(&record("aaaa2222", "db")).unwrap();
        let taken = c.create(&record("bbbb", "web")).unwrap_err().to_string();
        assert!(
            taken.contains("already used by container aaaa1111"),
            "{taken}"
        );
        assert!(!c.dir("bbbb").exists(), "a refused create leaves nothing");
        assert_eq!(c.lookup("web").unwrap(), "aaaa1111");
        assert_eq!(c.lookup("aaaa2").unwrap(), "aaaa2222");
        assert!(matches!(
            c.lookup("aaaa"),
            Err(ContainerError::Ambiguous(_))
        ));
        assert!(matches!(c.lookup("nope"), Err(ContainerError::NotFound(_))));
        assert!(matches!(
            c.create(&record("cc", "-bad")),
            Err(ContainerError::BadName(_))
        ));
        c.remove("aaaa1111").unwrap();
        assert!(c.lookup("web").is_err());
        c.create(&record("dddd", "web")).unwrap();
        assert_eq!(c.ids().unwrap().len(), 2);
    }

    #[test]
    fn state_round_trips_and_a_dead_monitor_means_exited() {
        let root = tempfile::tempdir().unwrap();
        let c = Containers::open(root.path()).unwrap();
        c.create(&record("abc", "x")).unwrap();
        assert_eq!(c.state("abc").unwrap().status, Status::Created);
        let mut s = ContainerState {
            status: Status::Running,
            monitor: this_monitor(),
            ..Default::default()
        };
        c.set_state("abc", &s).unwrap();
        assert_eq!(c.state("abc").unwrap().effective_status(), Status::Running);
        s.monitor = s.monitor.map(|(pid, t)| (pid, t + 1));
        assert_eq!(s.effective_status(), Status::Exited, "a recycled pid");
        std::fs::write(c.dir("abc").join("state.json"), "{").unwrap();
        assert!(matches!(
            c.state("abc"),
            Err(ContainerError::Damaged { .. })
        ));
    }
}
