//! The sandbox's host processes: virtiofsd and bulkhead-vmm, each started with
//! its output in the sandbox directory, killed and reaped when dropped, and
//! killed by the kernel when their owner dies without dropping them (`kill
//! -9` of the CLI's monitor or of the shim): a sandbox never outlives the
//! process that reports on it.

use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::SandboxError;

/// The descriptor number virtiofsd finds its listening socket at.
const VIRTIOFSD_LISTENER_FD: i32 = 3;

/// A host process owned by the sandbox.
#[derive(Debug)]
pub struct HostProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl HostProcess {
    /// Starts `cmd` with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<HostProcess, SandboxError> {
        let io = |what| {
            move |source| SandboxError::Io {
                what,
                path: log.to_owned(),
                source,
            }
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("open the log"))?;
        let err_file = file.try_clone().map_err(io("open the log"))?;
        cmd.stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|source| SandboxError::Spawn { name, source })?;
        Ok(HostProcess {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// Records its pid in `path`, so that a later process can stop it after we
    /// crashed ([`super::force_remove`]). Best effort: a missing pid file only
    /// weakens that cleanup.
    pub fn write_pid_file(&self, path: &Path) {
        if let Some(pid) = self.child.id() {
            if let Err(e) = std::fs::write(path, pid.to_string()) {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills it at once and reaps it.
    pub async fn kill(&mut self) {
        if let Err(e) = self.child.kill().await {
            tracing::debug!("killing {}: {e}", self.name);
        }
    }

    /// Waits up to `patience` for it to exit by itself, then kills it; always reaps.
    pub async fn stop(&mut self, patience: Duration) {
        if tokio::time::timeout(patience, self.child.wait())
            .await
            .is_err()
        {
            tracing::debug!("{} did not exit in {patience:?}; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// The last `lines` lines of a text file ("" if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Has the kernel SIGKILL the child of `cmd` when the thread that spawns it
/// ends, which for the runtime's worker threads (where sandboxes are started;
/// never from `spawn_blocking` or `block_in_place`, whose threads come and
/// go) is when this process dies. A parent that died between fork and the
/// prctl is caught by comparing the parent pid, and the spawn fails.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2) and getppid(2), both async-signal-safe; it touches no memory
    // of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "the sandbox's owner died while starting it",
                ));
            }
            Ok(())
        });
    }
}

/// Makes the child of `cmd` find our descriptor `fd` as its descriptor
/// `target` (which must be 3 or more, above its stdio). The caller keeps `fd`
/// open until the child is spawned.
pub fn pass_descriptor(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // dup2, which is async-signal-safe; dup2 clears close-on-exec on the copy.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the child of `cmd` join the network namespace open as `fd` before
/// it runs. The caller keeps `fd` open until the child is spawned.
pub fn enter_netns(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setns(2), which is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts virtiofsd serving `shared` on the vhost-user socket `socket`.
///
/// The socket is bound and listening before virtiofsd runs (it gets the
/// listener as fd 3 through `--fd`), so bulkhead-vmm can be started at once
/// and connect while virtiofsd is still coming up: the two start in parallel
/// instead of one after the other.
pub fn start_virtiofsd(
    binary: &Path,
    shared: &Path,
    socket: &Path,
    log: &Path,
    cache: &str,
) -> Result<HostProcess, SandboxError> {
    let listener =
        std::os::unix::net::UnixListener::bind(socket).map_err(|source| SandboxError::Io {
            what: "listen on",
            path: socket.to_owned(),
            source,
        })?;
    let listener_fd = listener.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.arg("--shared-dir")
        .arg(shared)
        .arg("--fd")
        .arg(VIRTIOFSD_LISTENER_FD.to_string());
    // virtiofsd's default sandbox (its own mount namespace, pivoted into the
    // share) confines it to the share; mounts made in the share later reach it
    // through the share's shared propagation. Submounts are announced so the
    // guest sees each bind mount as its own file system.
    cmd.args([
        "--sandbox",
        "namespace",
        "--announce-submounts",
        "--cache",
        cache,
    ]);
    pass_descriptor(&mut cmd, listener_fd, VIRTIOFSD_LISTENER_FD);
    let process = HostProcess::spawn("virtiofsd", cmd, log)?;
    // The child has its copy; ours closes here.
    drop(listener);
    Ok(process)
}

/// A process's start time (field 22 of /proc/PID/stat), to tell it from a
/// later process given the same pid.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
