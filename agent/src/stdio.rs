//! What a container process's stdin, stdout and stderr are connected to.
//!
//! Either three file descriptors the caller owns (pipes or vsock streams), or a
//! pseudo-terminal. For a terminal, libcontainer opens the pty inside the
//! container (its devpts) and sends the master end over a "console socket"; this
//! module listens on that socket and receives the master.

use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// The stdio of a process to be created.
#[derive(Debug, Default)]
pub enum Stdio {
    /// Each stream given is used as is; a missing one is connected to /dev/null
    /// (never to the agent's own stdio, which is the guest console).
    Fds {
        /// The process's stdin.
        stdin: Option<OwnedFd>,
        /// The process's stdout.
        stdout: Option<OwnedFd>,
        /// The process's stderr.
        stderr: Option<OwnedFd>,
    },
    /// A new pseudo-terminal; its master is returned by the create/exec call.
    /// The OCI process must have `terminal: true`.
    Terminal,
    /// All three on /dev/null.
    #[default]
    Null,
}

impl Stdio {
    /// The three streams for a non-terminal process, /dev/null filling the gaps.
    /// `None` for [`Stdio::Terminal`].
    pub(crate) fn into_fds(self) -> io::Result<Option<[OwnedFd; 3]>> {
        let (stdin, stdout, stderr) = match self {
            Stdio::Terminal => return Ok(None),
            Stdio::Null => (None, None, None),
            Stdio::Fds {
                stdin,
                stdout,
                stderr,
            } => (stdin, stdout, stderr),
        };
        let null = |fd: Option<OwnedFd>, write: bool| -> io::Result<OwnedFd> {
            match fd {
                Some(fd) => Ok(fd),
                None => Ok(File::options()
                    .read(!write)
                    .write(write)
                    .open("/dev/null")?
                    .into()),
            }
        };
        Ok(Some([
            null(stdin, false)?,
            null(stdout, true)?,
            null(stderr, true)?,
        ]))
    }
}

/// A listening console socket that receives one pty master.
pub(crate) struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens at `path` (removed again on drop).
    pub(crate) fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        Ok(ConsoleSocket {
            path: path.to_path_buf(),
            listener,
        })
    }

    /// The socket's path, for libcontainer's `with_console_socket`.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts libcontainer's connection and receives the pty master. Call it after
    /// the container process was built: it connected and sent the fd already (the
    /// listen backlog holds the connection until now).
    pub(crate) fn receive_master(&self) -> io::Result<OwnedFd> {
        let (stream, _) = self.listener.accept()?;
        let mut buf = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                let mut fds = fds.into_iter();
                if let Some(fd) = fds.next() {
                    for extra in fds {
                        // SAFETY: received fds are new and ours; close the unexpected ones.
                        drop(unsafe { OwnedFd::from_raw_fd(extra) });
                    }
                    // SAFETY: SCM_RIGHTS installed this fd in our table just now and
                    // nothing else owns it.
                    return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        Err(io::Error::other("console socket: no pty master received"))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
