//! The feature bits the net device offers, and what the guest's choice means
//! for the tap.

use crate::devices::virtio::suppression::VIRTIO_RING_F_EVENT_IDX;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// The device accepts frames with a partial checksum (host side checksums).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// The driver accepts frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// The config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// The driver can receive TCP/IPv4 GSO frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// The driver can receive TCP/IPv6 GSO frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// The driver can receive GSO frames with the ECN bit.
pub const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
/// The device accepts TCP/IPv4 GSO frames.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// The device accepts TCP/IPv6 GSO frames.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// The device accepts GSO frames with the ECN bit.
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// The driver can take one received frame in several buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;

/// Everything the device offers. Not VIRTIO_NET_F_STATUS: without it the
/// driver assumes the link is always up, which it is; with it, a template
/// saved without a tap and restored with one would have to announce a link
/// change. Not the UFO bits: Linux stopped sending UFO in 4.14 and the tap
/// only passes it for compatibility. VIRTIO_RING_F_EVENT_IDX, so that the
/// driver can ask to hear of TX completions only every so often, and of new
/// frames only once per NAPI poll; each interrupt costs it two MMIO exits.
pub const OFFERED: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Whether `bit` is in `features`.
pub fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// The TUNSETOFFLOAD flags for a guest that accepted `acked`: the GUEST_*
/// bits say what the guest can receive, so what the tap may hand us.
///
/// The tap refuses TSO without checksum offload (EINVAL), as the spec
/// forbids GUEST_TSO without GUEST_CSUM; so a driver that acked them anyway
/// gets neither TSO nor ECN.
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    let tso = flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0;
    if tso && has(acked, VIRTIO_NET_F_GUEST_ECN) {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_status_is_not_offered() {
        assert!(!has(OFFERED, 16)); // VIRTIO_NET_F_STATUS
        assert!(!has(OFFERED, 17)); // VIRTIO_NET_F_CTRL_VQ
        assert!(has(OFFERED, VIRTIO_F_VERSION_1));
    }

    #[test]
    fn offloads_follow_what_the_guest_can_receive() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_CSUM), 0);
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(OFFERED),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // TSO or ECN without checksum offload would make the tap refuse the call.
        let no_csum = OFFERED & !(1 << VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(tap_offloads(no_csum), 0);
        let ecn_only = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN;
        assert_eq!(tap_offloads(ecn_only), libc::TUN_F_CSUM);
    }
}
