//! The sandbox's host processes: virtiofsd and bulkhead-vmm, each started with
//! its output in the sandbox directory, killed and reaped when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::SandboxError;

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
        let child = cmd
            .spawn()
            .map_err(|source| SandboxError::Spawn { name, source })?;
        Ok(HostProcess {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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

/// Starts virtiofsd sharing `shared` on `socket` and waits for the socket.
pub async fn start_virtiofsd(
    binary: &Path,
    shared: &Path,
    socket: &Path,
    log: &Path,
) -> Result<HostProcess, SandboxError> {
    let mut cmd = Command::new(binary);
    cmd.arg("--shared-dir")
        .arg(shared)
        .arg("--socket-path")
        .arg(socket);
    // virtiofsd's default sandbox (its own mount namespace, pivoted into the
    // share) confines it to the share; the bind mounts are made before it starts
    // so they are in its namespace. "auto" caching keeps host-side changes
    // visible in the guest; submounts are announced so the guest sees each
    // bind mount as its own file system.
    cmd.args([
        "--sandbox",
        "namespace",
        "--cache",
        "auto",
        "--announce-submounts",
    ]);
    let mut process = HostProcess::spawn("virtiofsd", cmd, log)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = process.try_exit() {
            return Err(SandboxError::Exited {
                name: "virtiofsd",
                status,
                log_tail: process.log_tail(20),
            });
        }
        if Instant::now() > deadline {
            return Err(SandboxError::NoSocket {
                name: "virtiofsd",
                socket: socket.to_owned(),
                log_tail: process.log_tail(20),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(process)
}
