//! A container's new network namespace starts with its loopback interface
//! down; runc's callers bring it up (CNI's loopback plugin), and inside the
//! guest that job is ours, or `127.0.0.1` would not work between a pod's
//! containers.

use std::fs::File;
use std::io;

use nix::sched::{setns, CloneFlags};

/// Sets `lo` up in the network namespace of process `pid`. Runs on a thread
/// of its own: `setns` changes the calling thread's namespace, which must not
/// happen to a thread of the agent's runtime.
pub fn loopback_up(pid: i32) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || -> io::Result<()> {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        set_up("lo")
    })
    .join()
    .map_err(|_| io::Error::other("the loopback thread panicked"))?
}

/// Sets interface `name` up in the calling thread's network namespace.
pub(crate) fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: a plain socket(2) call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let _sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into req, which is a valid ifreq.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union's flags member is what SIOCGIFFLAGS filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads req, a valid ifreq naming the interface.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
