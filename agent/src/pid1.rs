//! PID 1's reaping duty, kept apart from the agent's own process waits.
//!
//! The choice: PID 1 forks once, early, before any thread exists. The child runs
//! the agent; PID 1 itself does nothing but `wait()` in a loop. Every orphan of the
//! guest (a daemon that double-forked in a container without its own pid
//! namespace, a process whose container init died) is re-parented to PID 1 and
//! reaped there. The agent's *own* children (container inits and exec'd
//! processes, which libcontainer makes with `CLONE_PARENT` so they are children of
//! the agent) stay the agent's, and the agent reaps each by pidfd
//! ([`crate::process::Process`]). So no status is ever stolen: the reaper that
//! calls `wait(-1)` is a different process from the one that needs precise
//! statuses, and `std::process::Command::wait` and libcontainer's
//! `waitpid(intermediate)` keep working inside the agent.
//!
//! A SIGCHLD reaper inside a single process would have to race the container code
//! for every status (and libcontainer's inits exit with no SIGCHLD until they
//! exec). `PR_SET_CHILD_SUBREAPER` on the agent would pull orphans into the agent,
//! which is what this design avoids. A bonus: when the agent dies, PID 1 sees it
//! and can stop the VM with a message on the console instead of the kernel
//! panicking with "Attempted to kill init".

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::exit::ExitStatus;

/// Forks the agent off PID 1 and reaps orphans until the agent ends.
///
/// In the child, calls `agent` and exits with its return value. In the parent
/// (PID 1) returns the agent's [`ExitStatus`] once it ends, having reaped every
/// other process that ended meanwhile.
///
/// Must be called while the process is single-threaded (fork only copies the
/// calling thread).
pub fn run_agent_under_reaper(agent: impl FnOnce() -> i32) -> nix::Result<ExitStatus> {
    // SAFETY: called before any thread is started (documented contract), so the
    // child is a full copy of a single-threaded process and may allocate freely.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let code = agent();
            std::process::exit(code);
        }
        ForkResult::Parent { child } => Ok(reap_until(child)),
    }
}

/// Reaps every child (and orphan) until `agent` ends; returns its status.
fn reap_until(agent: Pid) -> ExitStatus {
    loop {
        match waitpid(None, Some(WaitPidFlag::__WALL)) {
            Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid == agent =>
            {
                if let Some(exit) = ExitStatus::from_wait_status(status) {
                    return exit;
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => {
                // ECHILD cannot happen while the agent lives; never spin on it.
                tracing::error!("pid 1: wait failed: {err}");
                return ExitStatus::Exited(255);
            }
        }
    }
}
