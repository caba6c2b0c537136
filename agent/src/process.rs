//! A handle on one child process that waits for it without racing anyone else.
//!
//! The agent waits for container processes by *pidfd*, never by `waitpid(-1)`:
//! a pidfd names exactly one process for its whole life, so a signal can never hit a
//! recycled pid, and waiting on it reaps exactly that child and steals no other
//! waiter's status (libcontainer's own `waitpid(intermediate)`, `std::process`
//! children). Orphans are PID 1's job, see [`crate::pid1`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

use crate::exit::ExitStatus;

/// Where the waiter thread leaves the exit status for every reader.
#[derive(Default)]
struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

/// One process of a container (its init, or an exec'd process).
///
/// Created with [`Process::adopt`] right after the process was made, while it is
/// still our unreaped child. A background thread reaps it and publishes its
/// [`ExitStatus`]; any number of callers can [`wait`](Process::wait) for it.
pub struct Process {
    pid: Pid,
    pidfd: Arc<OwnedFd>,
    exit: Arc<ExitCell>,
}

impl Process {
    /// Takes charge of `pid`, which must be a child of this process that nobody
    /// else reaps: opens a pidfd on it and starts the thread that waits for it.
    pub fn adopt(pid: Pid) -> io::Result<Self> {
        let pidfd = Arc::new(pidfd_open(pid)?);
        let exit = Arc::new(ExitCell::default());
        let (fd, cell) = (Arc::clone(&pidfd), Arc::clone(&exit));
        thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let status = reap(&fd);
                *cell.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                cell.changed.notify_all();
            })?;
        Ok(Process { pid, pidfd, exit })
    }

    /// The process id, as seen from the agent's pid namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The exit status if the process has ended, without blocking.
    pub fn try_status(&self) -> Option<ExitStatus> {
        *self.exit.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the process is still running (not yet reaped).
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Blocks until the process ends.
    pub fn wait(&self) -> ExitStatus {
        let mut guard = self.exit.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = *guard {
                return status;
            }
            guard = self
                .exit
                .changed
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the process ends or `timeout` passes (`None` then).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.exit.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(status) = *guard {
                return Some(status);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = self
                .exit
                .changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `signal` to this process through its pidfd. A process that has already
    /// exited is not an error (the signal had nothing left to do).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes a valid pidfd (owned by self for the whole
        // call), a signal number, a null siginfo pointer (allowed: the kernel fills
        // in a kill()-style siginfo) and flags 0. No memory is handed over.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::ESRCH => Ok(()),
            errno => Err(io::Error::from(errno)),
        }
    }
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("status", &self.try_status())
            .finish()
    }
}

fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps the process behind `pidfd`. `__WALL` because libcontainer makes container
/// processes with `CLONE_PARENT` and no exit signal: until they `execve` (which
/// resets the exit signal to SIGCHLD) a plain wait does not see them.
fn reap(pidfd: &OwnedFd) -> ExitStatus {
    loop {
        match waitid(
            Id::PIDFd(pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::__WALL,
        ) {
            Ok(status) => {
                if let Some(exit) = ExitStatus::from_wait_status(status) {
                    return exit;
                }
            }
            Err(Errno::EINTR) => continue,
            Err(err) => {
                // ECHILD: someone else reaped it (a bug elsewhere). Report it as a
                // failure rather than hanging every waiter forever.
                tracing::error!("waiting for a container process failed: {err}");
                return ExitStatus::Exited(255);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn waits_for_exit_code_and_signal() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let proc = Process::adopt(Pid::from_raw(child.id() as i32)).unwrap();
        assert_eq!(proc.wait(), ExitStatus::Exited(7));
        std::mem::forget(child); // reaped by Process, not by std

        let child = std::process::Command::new("sleep")
            .arg("100")
            .process_group(0)
            .spawn()
            .unwrap();
        let proc = Process::adopt(Pid::from_raw(child.id() as i32)).unwrap();
        assert!(proc.wait_timeout(Duration::from_millis(50)).is_none());
        proc.signal(libc::SIGTERM).unwrap();
        assert_eq!(proc.wait().code(), 143);
        // Signalling a reaped process is harmless thanks to the pidfd.
        proc.signal(libc::SIGKILL).unwrap();
        std::mem::forget(child);
    }
}
