//! How `create` (and a detached `exec`) leave a process behind that engines
//! then watch: runc's model, where the pid in `--pid-file` is a real host
//! process that lives as long as the container's process and exits with its
//! status. We start ourselves again as that process, with a socket on which
//! it reports once it is ready ("ok PID") or why it is not ("error ...");
//! the caller writes the pid file and exits, and the engine (a subreaper,
//! like conmon and containerd's shim) inherits the process.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// The started process reported that it failed (and cleaned up after
/// itself): what it said.
#[derive(Debug)]
pub struct Reported(pub String);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reported {}

/// A started process that has not reported yet.
pub struct Pending {
    /// The process.
    pub child: Child,
    report: UnixStream,
}

/// Starts this binary with `before`, `--ready-fd N` (the report socket's
/// descriptor) and `after` as its arguments, its stdio inherited.
pub fn spawn(before: &[OsString], after: &[OsString]) -> Result<Pending> {
    let (ours, theirs) = UnixStream::pair().context("making the report socket")?;
    // The child inherits only this end: std makes every descriptor close on
    // exec, so clear that on this one alone.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).context("passing the report socket")?;
    let exe = std::env::current_exe().context("finding this program")?;
    let child = Command::new(exe)
        .args(before)
        .arg("--ready-fd")
        .arg(theirs.as_raw_fd().to_string())
        .args(after)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the container's process")?;
    drop(theirs);
    Ok(Pending {
        child,
        report: ours,
    })
}

impl Pending {
    /// Waits up to `timeout` for the report. On an error, a timeout or an
    /// exit without a report, the process is killed and reaped.
    pub fn wait_ready(mut self, timeout: Duration) -> Result<u32> {
        self.report
            .set_read_timeout(Some(timeout))
            .context("setting the report timeout")?;
        let mut line = String::new();
        let read = BufReader::new(&self.report).read_line(&mut line);
        let outcome = match read {
            Ok(_) if line.starts_with("ok ") => match line[3..].trim().parse::<u32>() {
                Ok(pid) => return Ok(pid),
                Err(_) => Err(anyhow::anyhow!("a malformed report: {line:?}")),
            },
            Ok(_) if line.starts_with("error ") => Err(anyhow::Error::new(Reported(
                line[6..].trim_end().replace("\\n", "\n"),
            ))),
            Ok(_) => Err(anyhow::anyhow!(
                "the container's process exited before it was ready"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(anyhow::anyhow!(
                "the container's process was not ready within {} s",
                timeout.as_secs()
            )),
            Err(e) => Err(anyhow::Error::from(e).context("reading the report")),
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        outcome
    }
}

/// The reporting end, in the started process.
pub struct Reporter(Option<UnixStream>);

impl Reporter {
    /// Takes the descriptor `fd` given as `--ready-fd`.
    pub fn from_fd(fd: i32) -> Result<Reporter> {
        if fd < 3 {
            bail!("--ready-fd {fd} is not a report socket");
        }
        // SAFETY: the parent passed this descriptor to us for this purpose
        // only; nothing else in this process owns it.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        // Not for the VMM and virtiofsd we start.
        fcntl(&stream, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .context("keeping the report socket to ourselves")?;
        Ok(Reporter(Some(stream)))
    }

    /// Reports success: the parent writes `pid` to its pid file. False if
    /// the parent is gone (killed, or gave up at its deadline): nobody will
    /// learn our pid, so nobody will start or delete us.
    pub fn ready(&mut self, pid: u32) -> bool {
        self.send(&format!("ok {pid}\n"))
    }

    /// Reports failure with `error`'s whole chain.
    pub fn failed(&mut self, error: &anyhow::Error) {
        let text = format!("{error:#}").replace('\n', "\\n");
        let _ = self.send(&format!("error {text}\n"));
    }

    fn send(&mut self, line: &str) -> bool {
        match self.0.take() {
            Some(mut s) => s.write_all(line.as_bytes()).is_ok(),
            None => false,
        }
    }
}

/// Writes `pid` to `path` atomically, as runc does (engines read it as soon
/// as the command returns).
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("bulkhead-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing the pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the pid file {}", path.display()))
}
