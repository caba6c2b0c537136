//! A private containerd daemon owned by one test, and torn down without a trace.
//!
//! bulkhead's shim (`containerd-shim-bulkhead-v2`) is driven by containerd, so its
//! end-to-end tests need a containerd that loads the shim under test, not whatever
//! the machine's containerd is configured with. [`PrivateContainerd::start`] runs
//! one in a fresh temp directory:
//!
//! ```text
//! <tmp>/bulkhead-containerd-XXXXXX/
//!   config.toml        written from ContainerdOptions (see the config submodule)
//!   containerd.log     the daemon's stdout and stderr
//!   containerd.sock    gRPC (plus containerd.sock.ttrpc)
//!   root/ state/       containerd's --root and --state (snapshots, bundles, netns)
//!   cni/net.d/         a loopback-only CNI config for the CRI plugin
//!   opt/               the opt plugin's directory (default /opt/containerd)
//! ```
//!
//! Shim binaries are found by containerd on its `PATH` (`io.containerd.X.v2` runs
//! `containerd-shim-X-v2`), so the caller's shim directories are put first there;
//! shims inherit the daemon's environment, which [`ContainerdOptions::env`] adds to.
//!
//! Stopping (explicitly with [`PrivateContainerd::stop`], or on drop) removes pods
//! and tasks through the APIs, stops the daemon, then mops up whatever a failed
//! test left: runc containers whose bundle is ours, shims still pointing at our
//! socket (and their children), ctr's FIFOs they held, the `/<namespace>` cgroups
//! runc made, mounts under the temp directory (snapshots, shm, netns), the
//! directory itself, and `/run/containerd` if it was not there before.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::cri::CriClient;
use crate::error::{Error, IoContext, Result};
use crate::process;

mod config;
mod leftovers;

pub use config::{CNI_CONFLIST, CNI_GATEWAY};
pub use leftovers::mounts_under;

/// The runtime type of runc's shim (`containerd-shim-runc-v2`), the reference.
pub const RUNC_RUNTIME_TYPE: &str = "io.containerd.runc.v2";
/// The runtime type of bulkhead's shim, `containerd-shim-bulkhead-v2` on `PATH`.
pub const BULKHEAD_RUNTIME_TYPE: &str = "io.containerd.bulkhead.v2";
/// The containerd namespace the CRI plugin works in (images for pods go here).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const DEBIAN_CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Where containerd 1.6 puts some state whatever `--state` says: shim sockets
/// (`s/`), runc's default root (`runc/`) and ctr's FIFOs (`fifo/`).
pub const SYSTEM_STATE_DIR: &str = "/run/containerd";

/// Lines of the daemon log put into errors and printed when a test panics.
const LOG_TAIL_LINES: usize = 40;
/// Deadline of the `ctr` calls made while tearing down.
const CTR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long leftover shims get to exit on their own once the daemon is gone.
const SHIM_GRACE: Duration = Duration::from_secs(2);

/// A value in a runtime's `options` table of containerd's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionValue {
    /// A TOML string.
    Str(String),
    /// A TOML boolean.
    Bool(bool),
    /// A TOML integer.
    Int(i64),
}

impl From<&str> for OptionValue {
    fn from(value: &str) -> Self {
        OptionValue::Str(value.into())
    }
}

impl From<String> for OptionValue {
    fn from(value: String) -> Self {
        OptionValue::Str(value)
    }
}

impl From<bool> for OptionValue {
    fn from(value: bool) -> Self {
        OptionValue::Bool(value)
    }
}

impl From<i64> for OptionValue {
    fn from(value: i64) -> Self {
        OptionValue::Int(value)
    }
}

/// One runtime the CRI plugin offers, i.e. a `runtimes.<handler>` table: pods ask
/// for it by handler name (Kubernetes RuntimeClass), and containerd runs the shim
/// named by the runtime type. (`ctr run --runtime <type>` needs no entry.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// The CRI runtime handler, e.g. `bulkhead` or `runc`.
    pub handler: String,
    /// The containerd runtime type, e.g. [`BULKHEAD_RUNTIME_TYPE`].
    pub runtime_type: String,
    /// The `options` table handed to the shim. For runc-type runtimes without a
    /// `Root`, one under the private state dir is added, so runc state never mixes
    /// with a system containerd's in `/run/containerd/runc`.
    pub options: Vec<(String, OptionValue)>,
    /// Pod annotation patterns passed to the shim (e.g. `io.bulkhead.*`).
    pub pod_annotations: Vec<String>,
    /// Container annotation patterns passed to the shim.
    pub container_annotations: Vec<String>,
}

impl Runtime {
    /// A runtime with no options and no annotations passed through.
    pub fn new(handler: &str, runtime_type: &str) -> Self {
        Runtime {
            handler: handler.into(),
            runtime_type: runtime_type.into(),
            options: Vec::new(),
            pod_annotations: Vec::new(),
            container_annotations: Vec::new(),
        }
    }

    /// The reference: handler `runc`, type [`RUNC_RUNTIME_TYPE`].
    pub fn runc() -> Self {
        Runtime::new("runc", RUNC_RUNTIME_TYPE)
    }

    /// bulkhead: handler `bulkhead`, type [`BULKHEAD_RUNTIME_TYPE`].
    pub fn bulkhead() -> Self {
        Runtime::new("bulkhead", BULKHEAD_RUNTIME_TYPE)
    }

    /// Add `key = value` to the runtime's `options` table.
    pub fn option(mut self, key: &str, value: impl Into<OptionValue>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }
}

/// How to run a [`PrivateContainerd`].
///
/// Exists so each test states what its daemon offers (runtimes, shim binaries,
/// the pod sandbox image) in one value; the config file is derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdOptions {
    /// The CRI plugin's `sandbox_image` (the "pause" image). There is no network:
    /// the test imports an image under this name into [`CRI_NAMESPACE`].
    pub sandbox_image: String,
    /// The CRI runtimes; the first is the default handler. [`Self::new`] puts
    /// [`Runtime::runc`] first.
    pub runtimes: Vec<Runtime>,
    /// Directories put first on the daemon's `PATH`, where containerd finds
    /// `containerd-shim-*-v2` binaries under test.
    pub shim_dirs: Vec<PathBuf>,
    /// Extra environment of the daemon, which shims inherit.
    pub env: Vec<(OsString, OsString)>,
    /// Whether to run the CRI plugin (off makes start-up quicker for ctr-only tests).
    pub cri: bool,
    /// The daemon's log level (`debug`, `info`, ...).
    pub log_level: String,
    /// Where the CNI plugins are ([`DEBIAN_CNI_BIN_DIR`]).
    pub cni_bin_dir: PathBuf,
    /// The containerd binary (looked up on `PATH` if not a path).
    pub containerd: PathBuf,
    /// The `ctr` binary.
    pub ctr: PathBuf,
    /// Where to make the temp directory; the system temp dir if `None`.
    pub temp_parent: Option<PathBuf>,
    /// How long the daemon (and its CRI plugin) may take to answer.
    pub start_timeout: Duration,
    /// How long the daemon may take to exit on SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// More directories swept for mounts on stop, after the shims are gone: where
    /// a shim keeps state outside containerd's (e.g. bulkhead's `run_root`, which a
    /// test should point into a temp directory of its own). They are not removed.
    pub unmount_dirs: Vec<PathBuf>,
}

impl ContainerdOptions {
    /// CRI on with the runc runtime, `sandbox_image` as the pause image, no shim
    /// directories, log level `info`.
    pub fn new(sandbox_image: &str) -> Self {
        ContainerdOptions {
            sandbox_image: sandbox_image.into(),
            runtimes: vec![Runtime::runc()],
            shim_dirs: Vec::new(),
            env: Vec::new(),
            cri: true,
            log_level: "info".into(),
            cni_bin_dir: DEBIAN_CNI_BIN_DIR.into(),
            containerd: "containerd".into(),
            ctr: "ctr".into(),
            temp_parent: None,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            unmount_dirs: Vec::new(),
        }
    }

    /// Add a CRI runtime.
    pub fn runtime(mut self, runtime: Runtime) -> Self {
        self.runtimes.push(runtime);
        self
    }

    /// Put `dir` on the daemon's `PATH` (before the inherited one).
    pub fn shim_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shim_dirs.push(dir.into());
        self
    }

    /// Set an environment variable of the daemon and its shims.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// The paths of one private containerd.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    root: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    config: PathBuf,
    log: PathBuf,
    cni_conf_dir: PathBuf,
    opt: PathBuf,
    runc_root: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Self {
        let state = dir.join("state");
        Layout {
            root: dir.join("root"),
            runc_root: state.join("runc"),
            state,
            socket: dir.join("containerd.sock"),
            config: dir.join("config.toml"),
            log: dir.join("containerd.log"),
            cni_conf_dir: dir.join("cni").join("net.d"),
            opt: dir.join("opt"),
            dir,
        }
    }
}

/// A containerd daemon owned by the test, in its own temp directory.
///
/// Exists so end-to-end tests can run bulkhead's shim through real containerd
/// (ctr and CRI) without touching the machine's containerd, and leave nothing
/// behind whatever happens in the test. Needs root. Two can run at once, but a
/// teardown prunes shared empty directories (`/run/containerd/s`, the `/<ns>`
/// cgroups) the other may be about to use, so tests should run them one at a time.
#[derive(Debug)]
pub struct PrivateContainerd {
    child: Option<Child>,
    layout: Layout,
    cri: bool,
    ctr: PathBuf,
    path_env: OsString,
    stop_timeout: Duration,
    /// [`ContainerdOptions::unmount_dirs`], canonical.
    unmount_dirs: Vec<PathBuf>,
    /// Whether [`SYSTEM_STATE_DIR`] existed before we started.
    system_state_existed: bool,
    /// The top-level cgroups that existed before we started.
    cgroups_before: HashSet<PathBuf>,
    /// Set once torn down, so drop does nothing more.
    stopped: bool,
}

impl PrivateContainerd {
    /// Start a daemon as `opts` say and wait until it (and CRI, if on) answers.
    ///
    /// Must run as root. Fails with the daemon's log tail if it exits or does not
    /// answer within `opts.start_timeout`; everything made so far is removed then.
    pub fn start(opts: ContainerdOptions) -> Result<Self> {
        let path_env = daemon_path(&opts.shim_dirs)?;
        let parent = opts.temp_parent.clone().unwrap_or_else(std::env::temp_dir);
        // Mount points in /proc/self/mountinfo are canonical paths, so is ours.
        let parent = fs::canonicalize(&parent).at("resolving temp directory", &parent)?;
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-containerd-")
            .tempdir_in(&parent)
            .at("creating temp directory in", &parent)?
            .keep();
        let mut daemon = PrivateContainerd {
            child: None,
            layout: Layout::new(dir),
            cri: opts.cri,
            ctr: opts.ctr.clone(),
            path_env,
            stop_timeout: opts.stop_timeout,
            unmount_dirs: opts
                .unmount_dirs
                .iter()
                .map(|d| fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
                .collect(),
            system_state_existed: Path::new(SYSTEM_STATE_DIR).exists(),
            cgroups_before: leftovers::top_cgroups(),
            stopped: false,
        };
        // From here on, drop cleans up whatever fails.
        daemon.prepare(&opts)?;
        daemon.spawn(&opts)?;
        daemon.wait_ready(opts.start_timeout)?;
        Ok(daemon)
    }

    fn prepare(&self, opts: &ContainerdOptions) -> Result<()> {
        let l = &self.layout;
        // sockaddr_un holds 108 bytes; containerd also appends ".ttrpc".
        if l.socket.as_os_str().len() + ".ttrpc".len() >= 108 {
            return Err(Error::ContainerdStart {
                detail: format!(
                    "socket path {} is too long for a unix socket; use a shorter temp_parent",
                    l.socket.display()
                ),
                log_tail: String::new(),
            });
        }
        for dir in [&l.root, &l.state, &l.cni_conf_dir, &l.opt] {
            fs::create_dir_all(dir).at("creating directory", dir)?;
        }
        let conflist = l.cni_conf_dir.join("10-bulkhead-test.conflist");
        fs::write(&conflist, CNI_CONFLIST).at("writing", &conflist)?;
        fs::write(&l.config, config::config_toml(opts, l)).at("writing", &l.config)
    }

    fn spawn(&mut self, opts: &ContainerdOptions) -> Result<()> {
        let l = &self.layout;
        let log = fs::File::create(&l.log).at("creating", &l.log)?;
        let log2 = log.try_clone().at("duplicating handle of", &l.log)?;
        let mut cmd = Command::new(&opts.containerd);
        cmd.arg("--config")
            .arg(&l.config)
            .env("PATH", &self.path_env)
            // Not a systemd service: do not let it notify one we run under.
            .env_remove("NOTIFY_SOCKET")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&l.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            command: process::describe(&cmd),
            source,
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Poll until `ctr version` (and CRI `Version`) succeed, the daemon exits, or
    /// the deadline passes.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("socket not created yet");
        let mut ctr_ok = false;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(self.start_error(format!("it exited ({status})")));
            }
            if !ctr_ok && self.layout.socket.exists() {
                let left = deadline.saturating_duration_since(Instant::now());
                match process::run(&mut self.ctr(["version"]), left.min(CTR_TIMEOUT)) {
                    Ok(_) => ctr_ok = true,
                    Err(e) => last = e.to_string(),
                }
            }
            if ctr_ok && !self.cri {
                return Ok(());
            }
            if ctr_ok {
                // The CRI plugin initializes after the socket serves; until then
                // it answers "server is not initialized yet".
                match CriClient::connect(&self.layout.socket).and_then(|c| c.version()) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "no answer within {timeout:?}; last attempt: {last}"
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_error(&self, detail: String) -> Error {
        Error::ContainerdStart {
            detail: format!("{detail} (config {})", self.layout.config.display()),
            log_tail: self.log_tail(),
        }
    }

    /// The daemon's pid while it runs (tests use it to simulate a crash).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The gRPC socket, for `--address` and CRI clients.
    pub fn address(&self) -> &Path {
        &self.layout.socket
    }

    /// The temp directory everything of this daemon lives in.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// containerd's `--root` (content, snapshots, metadata).
    pub fn root(&self) -> &Path {
        &self.layout.root
    }

    /// containerd's `--state` (task bundles, netns and shm mounts).
    pub fn state(&self) -> &Path {
        &self.layout.state
    }

    /// The runc root the CRI runc runtime uses; pass it as `ctr run --runc-root`
    /// to keep ctr's runc containers out of the shared `/run/containerd/runc`.
    pub fn runc_root(&self) -> &Path {
        &self.layout.runc_root
    }

    /// The config file the daemon runs with.
    pub fn config_path(&self) -> &Path {
        &self.layout.config
    }

    /// The daemon's log file (removed on stop: read it before).
    pub fn log_path(&self) -> &Path {
        &self.layout.log
    }

    /// A `ctr` command talking to this daemon (`ctr --address <socket> ARGS`), with
    /// the daemon's `PATH`. Global flags like `-n <namespace>` go first in `args`.
    pub fn ctr<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.ctr);
        cmd.env("PATH", &self.path_env)
            .arg("--address")
            .arg(&self.layout.socket)
            .args(args);
        cmd
    }

    /// Import the image archive `archive` into containerd namespace `namespace`
    /// (unpacked for the default snapshotter, as `ctr images import` does).
    pub fn import_image(&self, namespace: &str, archive: &Path) -> Result<()> {
        let mut cmd = self.ctr([OsStr::new("-n"), namespace.as_ref()]);
        cmd.args(["images", "import"]).arg(archive);
        process::run(&mut cmd, Duration::from_secs(120)).map(drop)
    }

    /// A CRI client connected to this daemon.
    pub fn cri(&self) -> Result<CriClient> {
        CriClient::connect(&self.layout.socket)
    }

    /// The whole daemon log so far.
    pub fn log(&self) -> String {
        fs::read(&self.layout.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the daemon log, for error messages.
    pub fn log_tail(&self) -> String {
        process::tail_lines(&self.log(), LOG_TAIL_LINES)
    }

    /// Pids of the shims (any `containerd-shim-*`) started for this daemon.
    pub fn shim_pids(&self) -> Vec<u32> {
        leftovers::find_shims(&self.layout.socket)
            .into_iter()
            .map(|s| s.pid)
            .collect()
    }

    /// Stop everything and remove the temp directory; fails listing what could not
    /// be cleaned up (left processes, mounts, files).
    pub fn stop(mut self) -> Result<()> {
        let problems = self.teardown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::ContainerdCleanup {
                dir: self.layout.dir.clone(),
                problems,
            })
        }
    }

    /// The whole teardown; returns what could not be cleaned up.
    fn teardown(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let l = &self.layout;
        let mut problems = Vec::new();
        let mut namespaces: HashSet<String> = ["default", CRI_NAMESPACE].map(String::from).into();
        let mut graceful = false;
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                namespaces.extend(self.remove_workloads());
                graceful = true;
            }
            problems.extend(stop_daemon(&mut child, self.stop_timeout));
        }

        // What a crashed daemon or a misbehaving shim left: runc containers first
        // (so their processes and cgroups go properly), then the shims.
        let fifos = leftovers::shim_fifos(&l.socket);
        let runc_roots = [
            l.runc_root.clone(),
            Path::new(SYSTEM_STATE_DIR).join("runc"),
        ];
        problems.extend(leftovers::delete_runc_containers(
            &runc_roots,
            &l.dir,
            &self.path_env,
        ));
        // Shims whose tasks were deleted through the API exit by themselves, shortly.
        let grace = Instant::now() + if graceful { SHIM_GRACE } else { Duration::ZERO };
        while !self.shim_pids().is_empty() && Instant::now() < grace {
            thread::sleep(Duration::from_millis(50));
        }
        problems.extend(leftovers::kill_shims(&l.socket));
        leftovers::remove_fifos(&fifos);

        if let Ok(entries) = fs::read_dir(l.state.join("io.containerd.runtime.v2.task")) {
            namespaces.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        leftovers::remove_namespace_cgroups(&namespaces, &self.cgroups_before);
        for dir in &self.unmount_dirs {
            problems.extend(leftovers::unmount_all_under(dir));
        }
        problems.extend(leftovers::unmount_all_under(&l.dir));
        if mounts_under(&l.dir).is_empty() {
            if let Err(e) = fs::remove_dir_all(&l.dir) {
                problems.push(format!("removing {}: {e}", l.dir.display()));
            }
        } else {
            // Never delete through a mount point: it could reach far outside.
            problems.push(format!(
                "left {} in place: mounts remain under it",
                l.dir.display()
            ));
        }
        if !self.system_state_existed {
            leftovers::remove_empty_dirs(Path::new(SYSTEM_STATE_DIR));
        }
        problems
    }

    /// Best effort through the APIs, so shims shut down as in production: CRI pods
    /// and containers, then every task and container of every namespace. Returns
    /// the namespaces seen.
    fn remove_workloads(&self) -> Vec<String> {
        let note = |what: String| eprintln!("private containerd teardown: {what}");
        if self.cri {
            match self.cri() {
                Ok(cri) => cri.remove_everything().into_iter().for_each(note),
                Err(e) => note(e.to_string()),
            }
        }
        let lines = |args: &[&str]| -> Vec<String> {
            match process::run(&mut self.ctr(args), CTR_TIMEOUT) {
                Ok(out) => out.stdout.lines().map(str::to_owned).collect(),
                Err(e) => {
                    note(e.to_string());
                    Vec::new()
                }
            }
        };
        let namespaces = lines(&["namespaces", "ls", "-q"]);
        for ns in &namespaces {
            for task in lines(&["-n", ns, "tasks", "ls", "-q"]) {
                lines(&["-n", ns, "tasks", "delete", "--force", &task]);
            }
            for container in lines(&["-n", ns, "containers", "ls", "-q"]) {
                lines(&["-n", ns, "containers", "rm", &container]);
            }
        }
        namespaces
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if thread::panicking() {
            eprintln!(
                "private containerd in {}: log tail:\n{}",
                self.layout.dir.display(),
                self.log_tail()
            );
        }
        // A panic here while a failed test unwinds would abort the whole run.
        let teardown = std::panic::AssertUnwindSafe(|| self.teardown());
        match std::panic::catch_unwind(teardown) {
            Ok(problems) => {
                for problem in problems {
                    eprintln!("private containerd teardown: {problem}");
                }
            }
            Err(_) => eprintln!("private containerd teardown panicked; things may be left behind"),
        }
    }
}

/// The daemon's `PATH`: the shim directories (absolute), then ours, then the sbin
/// directories if missing (runc lives in /usr/sbin, not on every user's PATH).
fn daemon_path(shim_dirs: &[PathBuf]) -> Result<OsString> {
    let mut dirs = Vec::new();
    for dir in shim_dirs {
        dirs.push(std::path::absolute(dir).at("resolving shim directory", dir)?);
    }
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    dirs.extend(std::env::split_paths(&inherited));
    for sbin in ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|d| d == Path::new(sbin)) {
            dirs.push(sbin.into());
        }
    }
    std::env::join_paths(dirs).map_err(|e| Error::Io {
        action: "building PATH with shim directory",
        path: shim_dirs.first().cloned().unwrap_or_default(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })
}

/// SIGTERM the daemon, SIGKILL it after `timeout`; a message if it needed SIGKILL
/// or could not be reaped.
fn stop_daemon(child: &mut Child, timeout: Duration) -> Option<String> {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return None;
    }
    // SAFETY: kill(2) on our own child, which is not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    match process::wait_deadline(child, Instant::now() + timeout) {
        Some(status) if status.signal() == Some(libc::SIGKILL) => {
            Some("containerd was killed by SIGKILL".into())
        }
        Some(_) => None,
        None => Some(format!(
            "containerd ignored SIGTERM for {timeout:?} and was killed"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::{ContainerSpec, PodSpec};
    use crate::initramfs::BUSYBOX_PATH;
    use crate::oci_image::{write_image_archive, ImageConfig, LayerCompression};

    const IMAGE: &str = "docker.io/library/bulkhead-busybox:test";
    const PAUSE: &str = "registry.k8s.io/pause:bulkhead-test";

    /// Writes the busybox image and a pause image (busybox `sleep` as entrypoint:
    /// it ignores SIGTERM as PID 1, but CRI stops sandboxes with SIGKILL) to `dir`.
    fn busybox_images(dir: &Path) -> (PathBuf, PathBuf) {
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy(BUSYBOX_PATH, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "echo", "cat", "sleep", "true"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        let (image, pause) = (dir.join("busybox.tar"), dir.join("pause.tar"));
        let config = ImageConfig::default();
        write_image_archive(&rootfs, IMAGE, &config, LayerCompression::Gzip, &image).unwrap();
        let config = ImageConfig {
            entrypoint: vec!["/bin/sleep".into(), "2147483647".into()],
            cmd: Vec::new(),
            ..ImageConfig::default()
        };
        write_image_archive(&rootfs, PAUSE, &config, LayerCompression::None, &pause).unwrap();
        (image, pause)
    }

    /// The whole harness against the real thing with runc: ctr run, then a CRI pod
    /// with two containers and ExecSync, then a teardown that leaves nothing.
    #[test]
    #[ignore = "needs root, containerd 1.6, runc, CNI plugins and busybox-static (about 2 s)"]
    fn runc_through_ctr_and_cri() {
        let work = tempfile::tempdir().unwrap();
        let (image, pause) = busybox_images(work.path());
        let daemon = PrivateContainerd::start(ContainerdOptions::new(PAUSE)).unwrap();
        daemon.import_image("default", &image).unwrap();
        daemon.import_image(CRI_NAMESPACE, &image).unwrap();
        daemon.import_image(CRI_NAMESPACE, &pause).unwrap();

        let mut ctr = daemon.ctr(["run", "--rm", "--runtime", RUNC_RUNTIME_TYPE]);
        ctr.args([IMAGE, "t1", "echo", "hi"]);
        let out = process::run(&mut ctr, Duration::from_secs(60)).unwrap();
        assert_eq!(out.stdout, "hi\n");

        let cri = daemon.cri().unwrap();
        assert!(cri.image_status(PAUSE).unwrap().is_some());
        let pod = PodSpec::new("pod", "default", "uid-1", "runc");
        let pod_id = cri.run_pod_sandbox(&pod).unwrap();
        for name in ["c1", "c2"] {
            let spec = ContainerSpec::new(name, IMAGE, &["sleep", "100000"]);
            let id = cri.create_container(&pod_id, &pod, &spec).unwrap();
            cri.start_container(&id).unwrap();
            let out = cri.exec_sync(&id, &["echo", "hi"], Duration::from_secs(10));
            assert_eq!(out.unwrap().stdout, "hi\n");
        }
        assert!(!mounts_under(daemon.dir()).is_empty());
        cri.stop_pod_sandbox(&pod_id).unwrap();
        cri.remove_pod_sandbox(&pod_id).unwrap();

        let socket = daemon.address().to_path_buf();
        let dir = daemon.dir().to_path_buf();
        daemon.stop().unwrap();
        assert!(leftovers::find_shims(&socket).is_empty());
        assert!(mounts_under(&dir).is_empty());
        assert!(!dir.exists());
    }
}
