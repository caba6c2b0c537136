//! The tap the VMM's virtio-net device reads and writes: made here, in the
//! sandbox's network namespace, and handed to bulkhead-vmm as a descriptor,
//! so the VMM needs no privilege over host interfaces and opens none by name.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF` from `<linux/if_tun.h>`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Ethernet frames, not IP packets.
const IFF_TAP: libc::c_short = 0x0002;
/// No extra packet-information header in front of each frame.
const IFF_NO_PI: libc::c_short = 0x1000;
/// Each frame starts with a virtio-net header: how checksum and segmentation
/// offloads travel between the guest and the host stack.
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Makes tap `name` in the calling thread's network namespace and returns
/// its descriptor. The tap is not persistent: it goes away with the last
/// descriptor, so a VMM that dies (even by `kill -9`) takes it along.
pub fn create(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 bytes"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening /dev/net/tun (is the tun module loaded?): {e}"),
            )
        })?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which is valid and lives
    // across the call; the descriptor is the tun device just opened.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("creating tap {name}: {e}"),
        ));
    }
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_made() {
        assert!(create("").is_err());
        assert!(create("a-name-that-is-too-long").is_err());
    }
}
