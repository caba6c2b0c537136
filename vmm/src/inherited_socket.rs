//! Taking over a listening Unix socket that the parent bound and passed down.
//!
//! The parent (the bulkhead sandbox) binds the vsock device's host socket
//! before it starts bulkhead-vmm, so it can connect at once: its connection
//! waits in the backlog until the device runs, instead of the parent polling
//! for the socket file to appear while this process starts (each poll a
//! wake-up that takes the CPU from the VMM it waits for).

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};

/// Takes ownership of descriptor `fd`, which must be a listening Unix socket
/// bound at `path`, and makes it close on exec.
///
/// Call it once per descriptor: the returned listener owns it.
pub fn take_unix_listener(fd: RawFd, path: &Path) -> io::Result<UnixListener> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    if fd < 3 {
        return Err(invalid(format!(
            "descriptor {fd} is stdin, stdout or stderr, not a passed socket"
        )));
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; any number is safe to ask about.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(invalid(format!(
            "descriptor {fd} is not open: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is open, and the parent passed it for this socket alone;
    // the caller takes it once, so this OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = getsockname::<UnixAddr>(fd)
        .map_err(|e| invalid(format!("descriptor {fd} is not a Unix socket: {e}")))?;
    if addr.path() != Some(path) {
        return Err(invalid(format!(
            "descriptor {fd} is bound at {:?}, not at {}",
            addr.path(),
            path.display()
        )));
    }
    if !getsockopt(&owned.as_fd(), sockopt::AcceptConn)? {
        return Err(invalid(format!("descriptor {fd} is not listening")));
    }
    // SAFETY: F_SETFD on a descriptor this function owns; no memory involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixListener::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_passed_listener_is_taken_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let listener = take_unix_listener(fd, &path).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        // SAFETY: F_GETFD only reads the flags of a descriptor the listener owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn anything_else_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let err = |fd, path: &Path| take_unix_listener(fd, path).unwrap_err().to_string();

        assert!(err(1, &path).contains("stdin, stdout or stderr"));
        // Far above any descriptor a test could have open.
        assert!(err(1 << 20, &path).contains("is not open"));

        let elsewhere = UnixListener::bind(dir.path().join("other.sock"))
            .unwrap()
            .into_raw_fd();
        assert!(err(elsewhere, &path).contains("not at"));

        let datagram = UnixDatagram::bind(&path).unwrap().into_raw_fd();
        assert!(err(datagram, &path).contains("not listening"));

        let file = std::fs::File::open("/proc/self/stat")
            .unwrap()
            .into_raw_fd();
        assert!(err(file, &path).contains("not a Unix socket"));
    }
}
