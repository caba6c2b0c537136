//! The virtio-vsock packet header (virtio 1.2, 5.10.6): decoding, encoding and
//! the checks every guest packet passes before the device acts on it.
//!
//! We do not use the `virtio-vsock` crate's `VsockPacket`: it wants the header
//! in one descriptor and the payload in the next, and Linux 6.x guests also put
//! header and data in one descriptor or spread data over several. Instead the
//! queue code copies the 44 header bytes out of guest memory (any layout) into
//! a plain [`Header`], so the guest cannot change them while we check them.

use thiserror::Error;

/// Bytes of a header on the wire.
pub const HDR_LEN: usize = 44;
/// The host's CID: where every guest packet must go and every device packet comes from.
pub const HOST_CID: u64 = 2;
/// The only socket type we carry (SOCK_STREAM); SEQPACKET is refused with RST.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted in or produced for one packet. Linux never sends
/// more than 64 KiB per packet; the bound keeps one packet's copy small.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet operation, as the `op` field carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Open a connection.
    Request = 1,
    /// Accept a connection.
    Response = 2,
    /// Refuse or abort a connection.
    Rst = 3,
    /// Half- or full-close of a connection (flags say which directions).
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// Unsolicited credit (buf_alloc/fwd_cnt) information.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation for a wire value, `None` for unknown ones.
    pub fn from_u16(op: u16) -> Option<Op> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A packet header, decoded from its little-endian wire form. Plain data: it
/// is a copy, never a view into guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Sender's context id.
    pub src_cid: u64,
    /// Receiver's context id.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation, see [`Op`].
    pub op: u16,
    /// Operation flags (SHUTDOWN's directions).
    pub flags: u32,
    /// Sender's receive buffer size, for credit.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, for credit.
    pub fwd_cnt: u32,
}

/// Why a guest packet was not acted on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain's readable part cannot even hold a header.
    #[error("Packet chain holds {0} readable bytes, less than a header")]
    ShortHeader(usize),
    /// The guest claims to be someone else.
    #[error("Packet source CID {0} is not the guest's")]
    BadSrcCid(u64),
    /// The guest addresses something other than the host.
    #[error("Packet destination CID {0} is not the host")]
    BadDstCid(u64),
    /// Not a stream packet.
    #[error("Packet type {0} is not supported (stream only)")]
    UnsupportedType(u16),
    /// The op field holds no known operation.
    #[error("Packet op {0} is unknown")]
    UnknownOp(u16),
    /// More payload than one packet may carry.
    #[error("Packet payload of {len} bytes is over the {max} byte limit")]
    TooLong {
        /// Claimed payload length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The header claims more payload than the chain holds.
    #[error("Packet claims {len} payload bytes but its chain holds {available}")]
    Truncated {
        /// Claimed payload length.
        len: u32,
        /// Readable bytes after the header.
        available: usize,
    },
}

impl PacketError {
    /// Whether the guest gets an RST for this packet. Addressing errors are
    /// dropped (there is no one to answer); a well-addressed packet we cannot
    /// carry is answered with RST so the guest's socket fails fast instead of
    /// a stream silently losing bytes. An RST itself is never answered.
    pub fn wants_rst(&self) -> bool {
        matches!(
            self,
            PacketError::UnsupportedType(_)
                | PacketError::TooLong { .. }
                | PacketError::Truncated { .. }
        )
    }
}

impl Header {
    /// Decodes the wire form.
    pub fn from_le_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire form.
    pub fn to_le_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest sent, `available` being the readable bytes
    /// its chain holds after the header. On success returns the operation;
    /// only then may the device act on the packet.
    pub fn validate(&self, guest_cid: u64, available: usize) -> Result<Op, PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(self.dst_cid));
        }
        let op = Op::from_u16(self.op).ok_or(PacketError::UnknownOp(self.op))?;
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::UnsupportedType(self.type_));
        }
        if self.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong {
                len: self.len,
                max: MAX_PAYLOAD,
            });
        }
        if self.len as usize > available {
            return Err(PacketError::Truncated {
                len: self.len,
                available,
            });
        }
        Ok(op)
    }

    /// The RST answering this packet: addresses swapped, no payload. Used for
    /// packets that belong to no connection or cannot be carried.
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn hdr(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn wire_form_round_trips_at_spec_offsets() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 9,
            len: 10,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1000,
            fwd_cnt: 0xffff_ffff,
        };
        let b = h.to_le_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[24], 10);
        assert_eq!(b[28], 1);
        assert_eq!(b[30], 5);
        assert_eq!(b[32], 3);
        assert_eq!(&b[36..40], &[0, 0x10, 0, 0]);
        assert_eq!(Header::from_le_bytes(&b), h);
    }

    #[test]
    fn good_packets_validate() {
        assert_eq!(hdr(Op::Rw, 10).validate(GUEST, 10), Ok(Op::Rw));
        assert_eq!(hdr(Op::Request, 0).validate(GUEST, 0), Ok(Op::Request));
        assert_eq!(
            hdr(Op::Rw, MAX_PAYLOAD).validate(GUEST, usize::MAX),
            Ok(Op::Rw)
        );
    }

    #[test]
    fn bad_packets_are_refused() {
        let mut h = hdr(Op::Rw, 0);
        h.src_cid = 4;
        assert_eq!(h.validate(GUEST, 0), Err(PacketError::BadSrcCid(4)));
        let mut h = hdr(Op::Rw, 0);
        h.dst_cid = 1;
        assert_eq!(h.validate(GUEST, 0), Err(PacketError::BadDstCid(1)));
        let mut h = hdr(Op::Rw, 0);
        h.op = 0;
        assert_eq!(h.validate(GUEST, 0), Err(PacketError::UnknownOp(0)));
        h.op = 8;
        assert_eq!(h.validate(GUEST, 0), Err(PacketError::UnknownOp(8)));
        let mut h = hdr(Op::Request, 0);
        h.type_ = 2;
        let e = h.validate(GUEST, 0).unwrap_err();
        assert!(e.wants_rst());
        let e = hdr(Op::Rw, MAX_PAYLOAD + 1)
            .validate(GUEST, usize::MAX)
            .unwrap_err();
        assert!(e.wants_rst());
        let e = hdr(Op::Rw, 11).validate(GUEST, 10).unwrap_err();
        assert_eq!(
            e,
            PacketError::Truncated {
                len: 11,
                available: 10
            }
        );
        assert!(!PacketError::BadSrcCid(9).wants_rst());
    }

    #[test]
    fn rst_reply_swaps_addresses() {
        let r = hdr(Op::Request, 0).rst_reply();
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST));
        assert_eq!((r.src_port, r.dst_port), (52, 1000));
        assert_eq!(r.op, Op::Rst as u16);
        assert_eq!(r.len, 0);
    }
}
