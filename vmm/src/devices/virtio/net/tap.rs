//! Taking over the tap descriptor the parent opened, and the tap ioctls.
//!
//! The parent creates the interface (it alone knows which network namespace
//! and bridge the sandbox belongs to) with IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, and passes the descriptor down. Here it is checked, set to
//! our header size, and made non-blocking and close-on-exec. The VMM never
//! opens /dev/net/tun itself.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

use super::backend::Backend;
use super::NET_HDR_LEN;

/// Why a descriptor cannot be the net device's tap.
#[derive(Debug, Error)]
pub enum TapError {
    /// 0, 1 or 2 (or negative): not something the parent passed.
    #[error(
        "net.tap_fd {fd} is not a passed descriptor (0-2 are stdin, stdout and stderr); pass \
         the tap as descriptor 3 or above"
    )]
    StdStream {
        /// The descriptor.
        fd: RawFd,
    },
    /// Nothing is open at that number in this process.
    #[error(
        "net.tap_fd {fd} is not open in bulkhead-vmm: the parent must pass the tap descriptor \
         without close-on-exec"
    )]
    NotOpen {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// TUNGETIFF failed: not /dev/net/tun, or not attached to an interface.
    #[error(
        "net.tap_fd {fd} is not a tun/tap descriptor attached to an interface (open /dev/net/tun \
         and TUNSETIFF it first)"
    )]
    NotTun {
        /// The descriptor.
        fd: RawFd,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// A tun/tap set up with other flags than the device needs.
    #[error(
        "net.tap_fd {fd} (interface {name}) lacks {missing}: create the tap with IFF_TAP | \
         IFF_NO_PI | IFF_VNET_HDR"
    )]
    WrongFlags {
        /// The descriptor.
        fd: RawFd,
        /// The interface's name.
        name: String,
        /// The missing flags.
        missing: String,
    },
    /// Setting up the descriptor failed.
    #[error("net.tap_fd {fd} (interface {name}): {what} failed")]
    Setup {
        /// The descriptor.
        fd: RawFd,
        /// The interface's name.
        name: String,
        /// The call.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A tap interface's descriptor, ready for the device: vnet header of
/// [`NET_HDR_LEN`] bytes, non-blocking, close-on-exec.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Takes ownership of descriptor `fd`, which must be a tap opened with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and sets it up. Call it once per
    /// descriptor: the returned `Tap` owns it (and closes it on error).
    ///
    /// Offloads start off: until the driver says what it can receive, the tap
    /// must only queue plain, fully checksummed frames.
    pub fn take(fd: RawFd) -> Result<Tap, TapError> {
        if fd < 3 {
            return Err(TapError::StdStream { fd });
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; any number is safe to ask about.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotOpen {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open, and the parent passed it for the tap alone;
        // the caller takes it once, so this OwnedFd is its only owner.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let (name, flags) =
            interface(owned.as_fd()).map_err(|source| TapError::NotTun { fd, source })?;
        let missing: Vec<&str> = [
            (libc::IFF_TAP, "IFF_TAP"),
            (libc::IFF_NO_PI, "IFF_NO_PI"),
            (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
        ]
        .into_iter()
        .filter(|(flag, _)| flags & flag == 0)
        .map(|(_, flag)| flag)
        .collect();
        if !missing.is_empty() {
            return Err(TapError::WrongFlags {
                fd,
                name,
                missing: missing.join(" and "),
            });
        }
        let setup = |what, source| TapError::Setup {
            fd,
            name: name.clone(),
            what,
            source,
        };
        set_vnet_hdr_size(owned.as_fd()).map_err(|e| setup("TUNSETVNETHDRSZ", e))?;
        set_offloads(owned.as_fd(), 0).map_err(|e| setup("TUNSETOFFLOAD", e))?;
        set_nonblocking_cloexec(owned.as_fd()).map_err(|e| setup("fcntl", e))?;
        tracing::debug!(fd, interface = %name, "tap taken over");
        Ok(Tap {
            file: File::from(owned),
            name,
        })
    }

    /// The interface's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a frame whole or not at all.
        self.file.write(frame).map(drop)
    }

    fn set_guest_offloads(&mut self, tun_flags: libc::c_uint) -> io::Result<()> {
        set_offloads(self.file.as_fd(), tun_flags)
    }
}

/// The interface name and the IFF_* flags of a tun/tap descriptor.
fn interface(fd: BorrowedFd<'_>) -> io::Result<(String, libc::c_int)> {
    // SAFETY: ifreq is plain data (a name and a union of integers, addresses
    // and a pointer); all zeros is a valid value of each.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq through the pointer, which points to
    // one we own, alive for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNGETIFF,
            &mut ifr as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF filled `ifru_flags`; every bit pattern is a valid c_short.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    // The flags are a c_short on the wire; IFF_VNET_HDR (0x4000) fits its sign.
    Ok((
        String::from_utf8_lossy(&name).into_owned(),
        libc::c_int::from(flags as u16),
    ))
}

/// Makes the tap read and write [`NET_HDR_LEN`]-byte headers, the size of
/// the guest's `virtio_net_hdr_v1`, so frames need no conversion. The fields
/// are little-endian on both sides: the tap uses the host's byte order, and
/// the VMM runs on x86_64 only.
fn set_vnet_hdr_size(fd: BorrowedFd<'_>) -> io::Result<()> {
    let size = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which
    // points to a local alive for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &size as *const libc::c_int,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TUNSETOFFLOAD: which offloaded frames (partial checksum, TSO) the tap
/// may hand us.
fn set_offloads(fd: BorrowedFd<'_>, tun_flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is involved.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(tun_flags),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The worker waits on the tap with epoll and must never block in read or
/// write; and children of the VMM (none today) must not inherit the tap.
fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL only reads the file status flags of an open descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD only changes the descriptor flags of an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn anything_but_a_tap_is_refused_with_the_reason() {
        let err = |fd| Tap::take(fd).unwrap_err().to_string();
        assert!(err(1).contains("not a passed descriptor"));
        assert!(err(-1).contains("not a passed descriptor"));
        // Far above any descriptor a test could have open.
        assert!(err(1 << 20).contains("is not open"));
        let file = File::open("/proc/self/stat").unwrap().into_raw_fd();
        let message = err(file);
        assert!(message.contains("not a tun/tap"), "{message}");
    }

    /// Opens /dev/net/tun and creates a non-persistent interface (gone when
    /// its descriptor closes); `None`, with the reason printed, where the
    /// test cannot (not root, no tun module, no CAP_NET_ADMIN).
    fn create_tun(flags: libc::c_int) -> Option<RawFd> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipped: creating a tap needs root");
            return None;
        }
        let tun = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
        {
            Ok(f) => f,
            Err(e) => {
                println!("skipped: cannot open /dev/net/tun: {e}");
                return None;
            }
        };
        // SAFETY: as in `interface`, all zeros is a valid ifreq.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"bhtest%d\0") {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq we own, alive for the call.
        if unsafe {
            libc::ioctl(
                tun.as_raw_fd(),
                libc::TUNSETIFF,
                &mut ifr as *mut libc::ifreq,
            )
        } < 0
        {
            println!("skipped: TUNSETIFF failed: {}", io::Error::last_os_error());
            return None;
        }
        Some(tun.into_raw_fd())
    }

    #[test]
    fn a_real_tap_is_taken_and_set_up() {
        let Some(fd) = create_tun(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) else {
            return;
        };
        let mut tap = Tap::take(fd).unwrap();
        assert!(tap.name().starts_with("bhtest"), "{}", tap.name());
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one c_int to a local alive for the call.
        let r = unsafe { libc::ioctl(fd, libc::TUNGETVNETHDRSZ, &mut size as *mut libc::c_int) };
        assert_eq!((r, size), (0, NET_HDR_LEN as libc::c_int));
        // SAFETY: F_GETFL/F_GETFD only read the flags of a descriptor the tap owns.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
        for acked in [0, super::super::features::OFFERED] {
            let flags = super::super::features::tap_offloads(acked);
            tap.set_guest_offloads(flags).unwrap();
        }
        // The interface is down: nothing to read, and no blocking either.
        let mut buf = [0u8; 64];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_tun_or_a_tap_without_vnet_header_is_refused() {
        let Some(fd) = create_tun(libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) else {
            return;
        };
        let message = Tap::take(fd).unwrap_err().to_string();
        assert!(message.contains("lacks IFF_TAP"), "{message}");
        let Some(fd) = create_tun(libc::IFF_TAP | libc::IFF_NO_PI) else {
            return;
        };
        let message = Tap::take(fd).unwrap_err().to_string();
        assert!(message.contains("lacks IFF_VNET_HDR"), "{message}");
    }
}
