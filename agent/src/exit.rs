//! How a container process ended, reported the way runc and Docker report it.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

/// The end of a process: its exit code, or the signal that killed it.
///
/// Kept as the two cases (rather than one number) so that the RPC layer can report
/// the killing signal by name, while [`ExitStatus::code`] gives the single number
/// a shell, runc and Docker print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The process called `exit(code)` (or returned from `main`).
    Exited(i32),
    /// A signal killed the process (`core_dumped` when it left a core).
    Signaled {
        /// The raw signal number.
        signal: i32,
        /// Whether the kernel dumped core.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The runc-style exit code: the process's own code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }

    /// The killing signal, if a signal ended the process.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Exited(_) => None,
            ExitStatus::Signaled { signal, .. } => Some(signal),
        }
    }

    /// Converts a terminal [`WaitStatus`]; `None` for stops, continues and
    /// `StillAlive`, which do not end a process.
    pub fn from_wait_status(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(ExitStatus::Exited(code)),
            WaitStatus::Signaled(_, signal, core_dumped) => Some(ExitStatus::Signaled {
                signal: signal as i32,
                core_dumped,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exit code {code}"),
            ExitStatus::Signaled { signal, .. } => match Signal::try_from(signal) {
                Ok(sig) => write!(f, "killed by {sig} (code {})", self.code()),
                Err(_) => write!(f, "killed by signal {signal} (code {})", self.code()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    #[test]
    fn codes_follow_runc() {
        assert_eq!(ExitStatus::Exited(7).code(), 7);
        let term = ExitStatus::from_wait_status(WaitStatus::Signaled(
            Pid::from_raw(1),
            Signal::SIGTERM,
            false,
        ))
        .unwrap();
        assert_eq!(term.code(), 143);
        assert_eq!(term.signal(), Some(15));
        assert_eq!(term.to_string(), "killed by SIGTERM (code 143)");
        assert!(ExitStatus::from_wait_status(WaitStatus::StillAlive).is_none());
    }
}
