//! The terminal an engine gets for a `terminal: true` process: runc's
//! `--console-socket` protocol. We make a host pty, send its master to the
//! engine's socket (SCM_RIGHTS, the pty's name as the payload, as runc does),
//! and make the slave this process's controlling terminal and stdio. The
//! guest has the real pty; ours only carries bytes (raw mode) and the window
//! size: when the engine resizes the master, the kernel sends us SIGWINCH and
//! the size goes to the guest's pty.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use nix::pty::openpty;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{self, SetArg};

/// Makes a pty, sends its master to the engine's `console_socket`, and
/// returns the slave (the caller makes it its terminal with
/// [`become_terminal`]).
pub fn send_new_pty(console_socket: &Path) -> Result<OwnedFd> {
    let pty = openpty(None, None).context("opening a pty")?;
    // Bytes pass as they are: the guest's pty does echo, line editing and
    // newline translation; doing them twice would show every key twice.
    let mut attrs = termios::tcgetattr(&pty.slave).context("reading the pty's attributes")?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, SetArg::TCSANOW, &attrs).context("making the pty raw")?;
    let socket = UnixStream::connect(console_socket).with_context(|| {
        format!(
            "connecting to the console socket {}",
            console_socket.display()
        )
    })?;
    let fds = [pty.master.as_raw_fd()];
    let name = b"/dev/ptmx";
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_context(|| {
        format!(
            "sending the pty to the console socket {}",
            console_socket.display()
        )
    })?;
    // The engine holds the master now; ours closes when `pty.master` drops.
    Ok(pty.slave)
}

/// Makes `slave` this process's controlling terminal and its stdin, stdout
/// and stderr. The caller must be a session leader with no terminal yet.
pub fn become_terminal(slave: OwnedFd) -> Result<()> {
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); the fd is
    // the pty slave we own, open for the duration of the call.
    let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("making the pty the controlling terminal");
    }
    for target in 0..=2 {
        // SAFETY: dup2 onto our own stdio descriptors; `slave` is open.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("making the pty descriptor {target}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::IoSliceMut;
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_arrives_on_the_console_socket_and_carries_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let slave = send_new_pty(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .expect("a descriptor");
        // SAFETY: the descriptor just arrived by SCM_RIGHTS and is ours alone.
        let master = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut master = std::fs::File::from(master);
        let mut slave = std::fs::File::from(slave);
        use std::io::{Read, Write};
        master.write_all(b"abc\n").unwrap();
        let mut got = [0u8; 4];
        slave.read_exact(&mut got).unwrap();
        // Raw: no echo, no translation of the newline.
        assert_eq!(&got, b"abc\n");
    }
}
