//! The one error type of the harness.
//!
//! Every variant names the file or command involved, so that a failing end-to-end
//! run says what to look at without a debugger.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while preparing or running the emulated host.
///
/// It exists so that callers (xtask, the end-to-end tests, `testhost-run`) get one
/// error type whose messages already carry the path, command or console tail that
/// explains the failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation on `path` failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading" or "creating directory".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program could not be started (not installed, not executable, ...).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, for the message.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program ran but exited unsuccessfully.
    #[error("`{command}` failed ({status}); its stderr ends with:\n{stderr}")]
    CommandFailed {
        /// The command line, for the message.
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The tail of what it wrote to stderr.
        stderr: String,
    },

    /// A helper program did not finish within its deadline and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    CommandTimedOut {
        /// The command line, for the message.
        command: String,
        /// The deadline it missed.
        timeout: Duration,
    },

    /// A helper program's output could not be understood.
    #[error("cannot understand the output of `{command}`: {detail}")]
    UnexpectedOutput {
        /// The command line, for the message.
        command: String,
        /// What was expected and what was found.
        detail: String,
    },

    /// The busybox binary found is dynamically linked, so it cannot run in an initrd.
    #[error("{path} is not a statically linked executable; install the busybox-static package")]
    BusyboxNotStatic {
        /// The binary that was checked.
        path: PathBuf,
    },

    /// A kernel module the emulated host needs is missing from the kernel package.
    #[error("kernel module `{module}` not found in {tree} (`{command}` said: {detail})")]
    ModuleMissing {
        /// The module name as given to modprobe.
        module: String,
        /// The unpacked module tree that was searched.
        tree: PathBuf,
        /// The modprobe command used.
        command: String,
        /// What modprobe printed.
        detail: String,
    },

    /// The argv, env or cwd given to [`crate::testhost::TestHost::run`] cannot be
    /// passed into the guest (empty argv, NUL bytes, `=` in a variable name, ...).
    #[error("invalid command for the emulated host: {0}")]
    InvalidCommand(String),

    /// QEMU printed nothing on the console for too long, or its kernel reported
    /// a CPU stuck in a soft lockup for too long; it was killed.
    #[error("emulated host made no progress for {silent_for:?} (silent, or a CPU stuck in a soft lockup) and was killed; last console lines:\n{console_tail}")]
    Stalled {
        /// How long it had made no progress.
        silent_for: Duration,
        /// The last console lines.
        console_tail: String,
    },

    /// The whole run took longer than its overall timeout; QEMU was killed.
    #[error("emulated host run exceeded its timeout of {timeout:?} and was killed; last console lines:\n{console_tail}")]
    TimedOut {
        /// The overall timeout.
        timeout: Duration,
        /// The last console lines.
        console_tail: String,
    },

    /// QEMU exited before the guest reported the command's exit status.
    #[error("QEMU exited ({status}) before the command finished; QEMU stderr:\n{qemu_stderr}\nlast console lines:\n{console_tail}")]
    QemuExited {
        /// How QEMU exited.
        status: std::process::ExitStatus,
        /// The tail of QEMU's stderr.
        qemu_stderr: String,
        /// The last console lines.
        console_tail: String,
    },

    /// The guest's init reported that it could not set up the host or run the
    /// command (modules failed to load, `/dev/kvm` unusable, cwd missing, ...).
    #[error("emulated host setup failed: {message}; last console lines:\n{console_tail}")]
    Guest {
        /// The message the guest printed.
        message: String,
        /// The last console lines.
        console_tail: String,
    },
    /// An image name given to [`crate::oci_image`] that containerd would refuse.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidImageName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A private containerd ([`crate::containerd`]) did not come up.
    #[error("containerd did not start: {detail}; its log ends with:\n{log_tail}")]
    ContainerdStart {
        /// What went wrong (exited, socket never answered, ...).
        detail: String,
        /// The last lines of the daemon's log.
        log_tail: String,
    },

    /// Stopping a private containerd left something behind or could not undo it.
    #[error("cleaning up the private containerd in {dir}: {}", problems.join("; "))]
    ContainerdCleanup {
        /// The directory the daemon lived in.
        dir: PathBuf,
        /// Each thing that could not be cleaned up, with why.
        problems: Vec<String>,
    },

    /// Connecting to a CRI socket ([`crate::cri`]) failed.
    #[error("cannot connect to the CRI service at {socket}: {source}")]
    CriConnect {
        /// The unix socket.
        socket: PathBuf,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },

    /// A CRI call returned an error status.
    #[error("CRI {call} failed: {} ({:?})", source.message(), source.code())]
    Cri {
        /// The call and its main argument, e.g. `StartContainer(ab12...)`.
        call: String,
        /// The gRPC status (boxed: it is large).
        #[source]
        source: Box<tonic::Status>,
    },

    /// A CRI call did not answer within its deadline.
    #[error("CRI {call} did not answer within {timeout:?}")]
    CriTimedOut {
        /// The call and its main argument.
        call: String,
        /// The deadline it missed.
        timeout: Duration,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Extension to turn an [`std::io::Result`] into an [`Error::Io`] naming a path.
pub(crate) trait IoContext<T> {
    /// Attach the action and path to an I/O error.
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.into(),
            source,
        })
    }
}
