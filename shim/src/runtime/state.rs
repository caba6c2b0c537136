//! What `bulkhead-runtime` keeps of each container under `--root`: one
//! directory per container with its record (`state.json`), the keeper's
//! control socket and the keeper's log. It outlives the engine (podman and
//! Docker restart and ask `state` again), so everything an engine may ask
//! later is in the record, and liveness is checked against the keeper's
//! pid *and* start time, never the pid alone.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sandbox::process_start_ticks;

/// Where state lives when `--root` is not given (runc's is `/run/runc`).
pub const DEFAULT_ROOT: &str = "/run/bulkhead-runtime";
/// The OCI runtime spec version `state` reports.
pub const OCI_VERSION: &str = "1.0.2";

/// A container's lifecycle status, as the runtime spec names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is still booting the microVM.
    Creating,
    /// Created in the guest, not started.
    Created,
    /// Its init runs.
    Running,
    /// Its cgroup in the guest is frozen.
    Paused,
    /// Its init exited (or the keeper died).
    Stopped,
}

impl Status {
    /// The name the runtime spec (and `runc state`) gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// One container's record, written by `create` and the keeper.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The engine's container id.
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The rootfs on the host (absolute).
    pub rootfs: PathBuf,
    /// When `create` was called, RFC 3339.
    pub created: String,
    /// The spec's annotations, reported by `state`.
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// The keeper's pid and its start time (ticks since boot).
    pub keeper: Option<(u32, u64)>,
    /// The status the keeper last wrote.
    pub status: Status,
    /// The init's exit code, once stopped.
    pub exit_code: Option<i32>,
    /// The sandbox run root the VM's directory is under.
    pub run_root: PathBuf,
    /// The spec asked for a network namespace it did not name, so one was
    /// made under the run root (removed by `delete` if the keeper could not).
    #[serde(default)]
    pub owns_netns: bool,
    /// The host cgroup the keeper joined (see [`super::host_cgroup`]),
    /// removed by `delete`.
    #[serde(default)]
    pub host_cgroup: Option<PathBuf>,
}

impl Record {
    /// The keeper's pid while it is alive (the same process, not a reuse of
    /// its pid).
    pub fn live_keeper(&self) -> Option<u32> {
        let (pid, ticks) = self.keeper?;
        (process_start_ticks(pid) == Some(ticks)).then_some(pid)
    }

    /// The status as it is now: a record that says running but whose keeper
    /// is gone is stopped.
    pub fn effective_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            s if self.live_keeper().is_some() => s,
            _ => Status::Stopped,
        }
    }

    /// The runtime-spec state document (`runc state`'s shape).
    pub fn oci_state(&self) -> serde_json::Value {
        let status = self.effective_status();
        let pid = match status {
            Status::Stopped => 0,
            _ => self.live_keeper().unwrap_or(0),
        };
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": pid,
            "status": status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
            "annotations": self.annotations,
        })
    }
}

/// Why a state operation failed; each names runc's wording where engines
/// match on it.
#[derive(Debug, Error)]
pub enum StateError {
    /// No such container.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// The id is taken.
    #[error("container with id exists: {0}")]
    Exists(String),
    /// Ids become directory names.
    #[error(
        "invalid container id {0:?}: use letters, digits, '_', '-', '.' and '+' (not starting with '.')"
    )]
    BadId(String),
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What we tried.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The state directory (`--root`).
#[derive(Clone, Debug)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// The state under `dir`.
    pub fn new(dir: PathBuf) -> Root {
        Root { dir }
    }

    /// Container `id`'s directory.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The keeper's control socket of container `id`: its real path, which
    /// may be too long for a socket address (Docker's root and a 64-hex id
    /// come to more than 108 bytes); bind and connect through
    /// [`ShortPath`].
    pub fn control_socket(&self, id: &str) -> PathBuf {
        self.dir(id).join("keeper.sock")
    }

    /// The keeper's log of container `id` (when `--log` names none).
    pub fn keeper_log(&self, id: &str) -> PathBuf {
        self.dir(id).join("runtime.log")
    }

    /// Makes container `id`'s directory; an existing one is runc's "exists".
    pub fn claim(&self, id: &str) -> Result<PathBuf, StateError> {
        check_id(id)?;
        let io_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let dir = self.dir(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id.to_owned()))
            }
            Err(e) => return Err(io_err("creating", &dir)(e)),
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting", &dir))?;
        Ok(dir)
    }

    /// Container `id`'s record.
    pub fn load(&self, id: &str) -> Result<Record, StateError> {
        check_id(id)?;
        let path = self.dir(id).join("state.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.to_owned()))
            }
            Err(source) => {
                return Err(StateError::Io {
                    what: "reading",
                    path,
                    source,
                })
            }
        };
        serde_json::from_slice(&text).map_err(|e| StateError::Io {
            what: "parsing",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }

    /// Writes `record` atomically (a reader sees the old or the new one).
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let dir = self.dir(&record.id);
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join("state.json");
        let text = serde_json::to_vec_pretty(record).expect("a record always serializes");
        std::fs::write(&tmp, text).map_err(|source| StateError::Io {
            what: "writing",
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| StateError::Io {
            what: "replacing",
            path,
            source,
        })
    }

    /// Updates the status (and exit code) in the record on disk.
    pub fn set_status(&self, id: &str, status: Status, exit_code: Option<i32>) {
        match self.load(id) {
            Ok(mut r) => {
                r.status = status;
                if exit_code.is_some() {
                    r.exit_code = exit_code;
                }
                if let Err(e) = self.save(&r) {
                    tracing::warn!(container = id, "recording status {}: {e}", status.as_str());
                }
            }
            Err(e) => tracing::warn!(container = id, "recording status {}: {e}", status.as_str()),
        }
    }

    /// Removes container `id`'s directory.
    pub fn forget(&self, id: &str) -> Result<(), StateError> {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                what: "removing",
                path: dir,
                source,
            }),
        }
    }

    /// Every container id with a record.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        ids
    }
}

/// A short name for a path whose directory may be too deep for a unix
/// socket address: `/proc/self/fd/N/NAME`, through an open descriptor of
/// the directory, valid while this lives.
pub struct ShortPath {
    _dir: std::fs::File,
    path: PathBuf,
}

impl ShortPath {
    /// The short name of `path`.
    pub fn new(path: &Path) -> io::Result<ShortPath> {
        use std::os::fd::AsRawFd;
        let parent = path.parent().unwrap_or(Path::new("/"));
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let dir = std::fs::File::open(parent)?;
        let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        Ok(ShortPath {
            _dir: dir,
            path: short,
        })
    }

    /// The name to bind or connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Ids become directory and VM names: what runc allows, and not `.`/`..`.
pub fn check_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId(id.to_owned()))
    }
}

/// Now as RFC 3339 with nanoseconds, as runc reports `created`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: now_rfc3339(),
            annotations: HashMap::new(),
            keeper: None,
            status: Status::Running,
            exit_code: None,
            run_root: "/run/bulkhead".into(),
            owns_netns: false,
            host_cgroup: None,
        }
    }

    #[test]
    fn ids_that_would_escape_the_root_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "0123abcdef", "my_ctr-1.2+3"] {
            assert!(check_id(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_second_claim_of_one_id_is_runcs_exists_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::new(tmp.path().join("root"));
        root.claim("c1").unwrap();
        let err = root.claim("c1").unwrap_err();
        assert_eq!(err.to_string(), "container with id exists: c1");
    }

    #[test]
    fn a_running_record_without_its_keeper_is_stopped() {
        let mut r = record("c1");
        r.keeper = None;
        assert_eq!(r.effective_status(), Status::Stopped);
        // This process stands in for a live keeper.
        let me = std::process::id();
        r.keeper = Some((me, process_start_ticks(me).unwrap()));
        assert_eq!(r.effective_status(), Status::Running);
        assert_eq!(r.oci_state()["pid"], me);
        // Same pid, other start time: a reused pid is not our keeper.
        r.keeper = Some((me, process_start_ticks(me).unwrap() + 1));
        assert_eq!(r.effective_status(), Status::Stopped);
        assert_eq!(r.oci_state()["pid"], 0);
    }

    #[test]
    fn a_socket_deeper_than_an_address_allows_binds_and_connects() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(100)).join("e".repeat(64));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("keeper.sock");
        assert!(path.as_os_str().len() > 108);
        let short = ShortPath::new(&path).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(short.path()).unwrap();
        assert!(path.exists());
        let other = ShortPath::new(&path).unwrap();
        std::os::unix::net::UnixStream::connect(other.path()).unwrap();
        listener.accept().unwrap();
    }

    #[test]
    fn records_round_trip_and_list() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::new(tmp.path().to_owned());
        root.claim("b").unwrap();
        root.claim("a").unwrap();
        root.save(&record("b")).unwrap();
        root.save(&record("a")).unwrap();
        root.set_status("a", Status::Stopped, Some(3));
        let a = root.load("a").unwrap();
        assert_eq!((a.status, a.exit_code), (Status::Stopped, Some(3)));
        assert_eq!(root.ids(), ["a", "b"]);
        root.forget("a").unwrap();
        assert!(matches!(root.load("a"), Err(StateError::NotFound(_))));
    }
}
