//! The header that opens a stdio stream.
//!
//! Process stdio does not travel over ttrpc: each stream of each process has
//! its own vsock connection to the agent's [`AGENT_STREAM_PORT`], opened by
//! the host. The host writes one [`StreamHeader`] first, naming the container,
//! the exec id (empty for the init process) and the stream; after it, the
//! connection is raw bytes in the stream's direction:
//!
//! | kind | bytes flow | end of stream |
//! | --- | --- | --- |
//! | [`StreamKind::Stdin`] | host → guest | host shuts down its write half (or `CloseStdin`) |
//! | [`StreamKind::Stdout`] | guest → host | agent closes when the process's stdout is closed |
//! | [`StreamKind::Stderr`] | guest → host | same, for stderr |
//! | [`StreamKind::Tty`] | both: host → guest is terminal input, guest → host is terminal output | each side shuts down its write half |
//!
//! Wire format (version 1), all integers big-endian:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BHST"
//! 4       1     version (1)
//! 5       1     stream kind (1 stdin, 2 stdout, 3 stderr, 4 tty)
//! 6       2     container id length (1..=128)
//! 8       2     exec id length (0..=128; 0 = the init process)
//! 10      n     container id, then exec id: ASCII [A-Za-z0-9._-]
//! ```
//!
//! Decoding reads exactly the header's bytes and no more (fixed part first,
//! then the ids once their lengths are checked), so the stream's first data
//! byte stays in the connection. The agent should bound the time it waits
//! for a header (e.g. `tokio::time::timeout`): a decoder waits as long as the
//! reader does.
//!
//! [`AGENT_STREAM_PORT`]: crate::limits::AGENT_STREAM_PORT

use std::io::{self, Read, Write};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::{check_id_bytes, ValidationError, MAX_ID_LEN};

/// The first four bytes of every stream header: `"BHST"` (BulkHead STream).
pub const STREAM_MAGIC: [u8; 4] = *b"BHST";

/// The header format version this crate writes and reads.
pub const STREAM_HEADER_VERSION: u8 = 1;

/// Length of the header's fixed part (magic, version, kind, two lengths), in
/// bytes.
pub const STREAM_HEADER_FIXED_LEN: usize = 10;

/// Longest possible header, in bytes: the fixed part and two ids of
/// [`MAX_ID_LEN`] bytes.
pub const STREAM_HEADER_MAX_LEN: usize = STREAM_HEADER_FIXED_LEN + 2 * MAX_ID_LEN;

/// The agent's one-byte answer to a stream header, so the host knows whether
/// its stream is attached before it sends or waits for bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamAck {
    /// The stream is attached; raw bytes follow.
    Attached = 0,
    /// No such container or exec id.
    UnknownProcess = 1,
    /// That stream of that process is already attached.
    AlreadyAttached = 2,
    /// The process was created without that stream.
    NotRequested = 3,
}

impl StreamAck {
    /// Decodes the byte; unknown values are refusals the host reports as such.
    pub fn from_u8(byte: u8) -> Option<StreamAck> {
        Some(match byte {
            0 => StreamAck::Attached,
            1 => StreamAck::UnknownProcess,
            2 => StreamAck::AlreadyAttached,
            3 => StreamAck::NotRequested,
            _ => return None,
        })
    }
}

/// The first line the agent writes on its connection to [`crate::HOST_READY_PORT`]:
/// `bulkhead-agent <version>\n`. The agent keeps that connection open for its
/// whole life, so the host sees the agent die as end-of-file on it.
pub const READY_LINE_PREFIX: &str = "bulkhead-agent ";

/// The host's answer to the hello: `boot <unix seconds>.<nanoseconds> <seed>\n`.
/// The agent sets the guest's wall clock from it and stirs the seed (32 bytes,
/// hex) into the guest kernel's random pool, then answers [`BOOT_ACK_LINE`]:
/// a VM resumed from a template would otherwise run on the template's clock
/// and on the very random state every other copy of that template has.
pub const BOOT_LINE_PREFIX: &str = "boot ";

/// The agent's answer once it applied the boot line.
pub const BOOT_ACK_LINE: &str = "ok\n";

/// What the boot line carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFacts {
    /// The host's wall-clock time, since the Unix epoch.
    pub unix_time: std::time::Duration,
    /// Fresh randomness from the host.
    pub seed: [u8; 32],
}

impl BootFacts {
    /// The line, newline included.
    pub fn to_line(&self) -> String {
        let seed: String = self.seed.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{BOOT_LINE_PREFIX}{}.{:09} {seed}\n",
            self.unix_time.as_secs(),
            self.unix_time.subsec_nanos()
        )
    }

    /// Parses a line made by [`BootFacts::to_line`] (trailing newline optional);
    /// anything else is `None`.
    pub fn parse(line: &str) -> Option<BootFacts> {
        let rest = line.strip_suffix('\n').unwrap_or(line);
        let (time, seed_hex) = rest.strip_prefix(BOOT_LINE_PREFIX)?.split_once(' ')?;
        let (secs, nanos) = time.split_once('.')?;
        if nanos.len() != 9 || seed_hex.len() != 64 {
            return None;
        }
        let secs: u64 = secs.parse().ok()?;
        let nanos: u32 = nanos.parse().ok()?;
        let mut seed = [0u8; 32];
        for (i, byte) in seed.iter_mut().enumerate() {
            *byte = u8::from_str_radix(seed_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(BootFacts {
            unix_time: std::time::Duration::new(secs, nanos),
            seed,
        })
    }
}

/// Which stdio stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// The process's standard input (host → guest).
    Stdin = 1,
    /// The process's standard output (guest → host).
    Stdout = 2,
    /// The process's standard error (guest → host).
    Stderr = 3,
    /// The process's pty, both ways: input host → guest, output guest → host.
    Tty = 4,
}

impl StreamKind {
    /// The kind's byte on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The kind for a wire byte, or `None` for an unknown one.
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Stdin),
            2 => Some(Self::Stdout),
            3 => Some(Self::Stderr),
            4 => Some(Self::Tty),
            _ => None,
        }
    }
}

/// Why a stream header could not be read or made.
#[derive(Debug, Error)]
pub enum StreamHeaderError {
    /// The connection ended before the whole header arrived.
    #[error("stream header truncated: the connection ended inside the {part}")]
    Truncated {
        /// Which part was being read: "fixed part" or "ids".
        part: &'static str,
    },
    /// Reading or writing failed.
    #[error("stream header I/O failed: {0}")]
    Io(#[source] io::Error),
    /// The first four bytes are not [`STREAM_MAGIC`].
    #[error(
        "bad stream header magic {found:02x?} (expected {:02x?}, \"BHST\")",
        STREAM_MAGIC
    )]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The version is not [`STREAM_HEADER_VERSION`].
    #[error(
        "unsupported stream header version {found} (this side speaks {STREAM_HEADER_VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The stream kind byte is not one of [`StreamKind`].
    #[error("unknown stream kind {found} (expected 1 stdin, 2 stdout, 3 stderr or 4 tty)")]
    UnknownKind {
        /// The byte found.
        found: u8,
    },
    /// An id is empty where it may not be, too long, or has a forbidden
    /// character.
    #[error("invalid stream header: {0}")]
    Invalid(#[from] ValidationError),
}

/// The header that opens one stdio stream connection: which container,
/// which process, which stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// Which stream this connection carries.
    pub kind: StreamKind,
    /// The container, as in `CreateContainer`.
    pub container_id: String,
    /// The process's exec id; empty for the container's init process.
    pub exec_id: String,
}

impl StreamHeader {
    /// A header, after checking the ids ([`crate::limits::validate_id`] for
    /// the container, [`crate::limits::validate_exec_id`] for the exec id).
    pub fn new(
        kind: StreamKind,
        container_id: impl Into<String>,
        exec_id: impl Into<String>,
    ) -> Result<Self, StreamHeaderError> {
        let header = Self {
            kind,
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks the ids, as decoding does.
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::limits::check_id("container id", &self.container_id)?;
        if !self.exec_id.is_empty() {
            crate::limits::check_id("exec id", &self.exec_id)?;
        }
        Ok(())
    }

    /// The header's bytes. Fails only if the ids are invalid (a header built
    /// by hand with public fields), so that nothing invalid goes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, StreamHeaderError> {
        self.validate()?;
        let (c, e) = (self.container_id.as_bytes(), self.exec_id.as_bytes());
        let mut buf = Vec::with_capacity(STREAM_HEADER_FIXED_LEN + c.len() + e.len());
        buf.extend_from_slice(&STREAM_MAGIC);
        buf.push(STREAM_HEADER_VERSION);
        buf.push(self.kind.as_u8());
        // Both lengths are at most MAX_ID_LEN (128), checked above.
        buf.extend_from_slice(&(c.len() as u16).to_be_bytes());
        buf.extend_from_slice(&(e.len() as u16).to_be_bytes());
        buf.extend_from_slice(c);
        buf.extend_from_slice(e);
        Ok(buf)
    }

    /// Writes the header to `w` in one `write_all`.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<(), StreamHeaderError> {
        w.write_all(&self.encode()?).map_err(StreamHeaderError::Io)
    }

    /// Writes the header to an async writer in one `write_all`.
    pub async fn write_to_async<W: AsyncWrite + Unpin>(
        &self,
        mut w: W,
    ) -> Result<(), StreamHeaderError> {
        w.write_all(&self.encode()?)
            .await
            .map_err(StreamHeaderError::Io)
    }

    /// Reads and checks one header from `r`, consuming exactly its bytes.
    pub fn read_from<R: Read>(mut r: R) -> Result<Self, StreamHeaderError> {
        let mut fixed = [0u8; STREAM_HEADER_FIXED_LEN];
        r.read_exact(&mut fixed)
            .map_err(|e| io_error(e, "fixed part"))?;
        let (kind, container_len, exec_len) = parse_fixed(&fixed)?;
        let mut ids = [0u8; 2 * MAX_ID_LEN];
        let ids = &mut ids[..container_len + exec_len];
        r.read_exact(ids).map_err(|e| io_error(e, "ids"))?;
        parse_ids(kind, ids, container_len)
    }

    /// Reads and checks one header from an async reader, consuming exactly
    /// its bytes.
    pub async fn read_from_async<R: AsyncRead + Unpin>(
        mut r: R,
    ) -> Result<Self, StreamHeaderError> {
        let mut fixed = [0u8; STREAM_HEADER_FIXED_LEN];
        r.read_exact(&mut fixed)
            .await
            .map_err(|e| io_error(e, "fixed part"))?;
        let (kind, container_len, exec_len) = parse_fixed(&fixed)?;
        let mut ids = [0u8; 2 * MAX_ID_LEN];
        let ids = &mut ids[..container_len + exec_len];
        r.read_exact(ids).await.map_err(|e| io_error(e, "ids"))?;
        parse_ids(kind, ids, container_len)
    }

    /// Decodes a header from the start of `bytes`, returning it and the
    /// number of bytes it took (the rest of `bytes` is stream data).
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), StreamHeaderError> {
        let mut cursor = io::Cursor::new(bytes);
        let header = Self::read_from(&mut cursor)?;
        // The cursor's position is at most bytes.len().
        Ok((header, cursor.position() as usize))
    }
}

fn io_error(e: io::Error, part: &'static str) -> StreamHeaderError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        StreamHeaderError::Truncated { part }
    } else {
        StreamHeaderError::Io(e)
    }
}

/// Checks the fixed part; returns the kind and the two id lengths, each at
/// most [`MAX_ID_LEN`], the container's at least 1.
fn parse_fixed(
    fixed: &[u8; STREAM_HEADER_FIXED_LEN],
) -> Result<(StreamKind, usize, usize), StreamHeaderError> {
    let magic = [fixed[0], fixed[1], fixed[2], fixed[3]];
    if magic != STREAM_MAGIC {
        return Err(StreamHeaderError::BadMagic { found: magic });
    }
    if fixed[4] != STREAM_HEADER_VERSION {
        return Err(StreamHeaderError::UnsupportedVersion { found: fixed[4] });
    }
    let kind =
        StreamKind::from_u8(fixed[5]).ok_or(StreamHeaderError::UnknownKind { found: fixed[5] })?;
    let container_len = usize::from(u16::from_be_bytes([fixed[6], fixed[7]]));
    let exec_len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    if container_len == 0 {
        return Err(ValidationError::Empty {
            field: "container id",
        }
        .into());
    }
    crate::limits::check_len("container id", container_len, MAX_ID_LEN)?;
    crate::limits::check_len("exec id", exec_len, MAX_ID_LEN)?;
    Ok((kind, container_len, exec_len))
}

fn parse_ids(
    kind: StreamKind,
    ids: &[u8],
    container_len: usize,
) -> Result<StreamHeader, StreamHeaderError> {
    let (container, exec) = ids.split_at(container_len);
    check_id_bytes("container id", container)?;
    check_id_bytes("exec id", exec)?;
    // Only ASCII passed the checks above, so both are valid UTF-8.
    let header = StreamHeader {
        kind,
        container_id: String::from_utf8_lossy(container).into_owned(),
        exec_id: String::from_utf8_lossy(exec).into_owned(),
    };
    // The remaining rules ("." and "..").
    header.validate()?;
    Ok(header)
}

#[cfg(test)]
mod tests {

    #[test]
    fn boot_line_round_trips_and_rejects_garbage() {
        let facts = BootFacts {
            unix_time: std::time::Duration::new(1_795_000_000, 42),
            seed: [0xa5; 32],
        };
        let line = facts.to_line();
        assert!(line.starts_with("boot 1795000000.000000042 a5a5"), "{line}");
        assert_eq!(BootFacts::parse(&line), Some(facts));
        for bad in [
            "",
            "boot",
            "boot 1.5 00",
            "boot x.000000000 a5",
            &line.replace("a5a5", "zzzz"),
            &line.replace("boot ", "bo0t "),
        ] {
            assert_eq!(BootFacts::parse(bad), None, "{bad:?}");
        }
    }

    use super::*;

    fn raw(magic: &[u8; 4], version: u8, kind: u8, c: &[u8], e: &[u8]) -> Vec<u8> {
        let mut v = magic.to_vec();
        v.push(version);
        v.push(kind);
        v.extend_from_slice(&(c.len() as u16).to_be_bytes());
        v.extend_from_slice(&(e.len() as u16).to_be_bytes());
        v.extend_from_slice(c);
        v.extend_from_slice(e);
        v
    }

    #[test]
    fn round_trips_every_kind() {
        for kind in [
            StreamKind::Stdin,
            StreamKind::Stdout,
            StreamKind::Stderr,
            StreamKind::Tty,
        ] {
            for exec in ["", "exec-1", &"e".repeat(MAX_ID_LEN)] {
                let h = StreamHeader::new(kind, "c0ffee.ctr_1-x", exec).unwrap();
                let bytes = h.encode().unwrap();
                assert_eq!(bytes.len(), STREAM_HEADER_FIXED_LEN + 14 + exec.len());
                assert!(bytes.len() <= STREAM_HEADER_MAX_LEN);
                assert_eq!(StreamHeader::read_from(&bytes[..]).unwrap(), h);
                assert_eq!(StreamHeader::decode(&bytes).unwrap(), (h, bytes.len()));
            }
        }
    }

    #[test]
    fn exact_wire_bytes() {
        let h = StreamHeader::new(StreamKind::Stdout, "ab", "x").unwrap();
        assert_eq!(
            h.encode().unwrap(),
            b"BHST\x01\x02\x00\x02\x00\x01abx".to_vec()
        );
    }

    #[test]
    fn leaves_stream_data_unread() {
        let h = StreamHeader::new(StreamKind::Stdin, "ctr", "").unwrap();
        let mut bytes = h.encode().unwrap();
        bytes.extend_from_slice(b"hello");
        let mut r = &bytes[..];
        assert_eq!(StreamHeader::read_from(&mut r).unwrap(), h);
        assert_eq!(r, b"hello");
        let (_, used) = StreamHeader::decode(&bytes).unwrap();
        assert_eq!(&bytes[used..], b"hello");
    }

    #[test]
    fn truncated_input_at_every_length() {
        let bytes = StreamHeader::new(StreamKind::Stderr, "ctr", "exec")
            .unwrap()
            .encode()
            .unwrap();
        for n in 0..bytes.len() {
            let part = if n < STREAM_HEADER_FIXED_LEN {
                "fixed part"
            } else {
                "ids"
            };
            match StreamHeader::read_from(&bytes[..n]) {
                Err(StreamHeaderError::Truncated { part: p }) => assert_eq!(p, part, "at {n}"),
                other => panic!("at {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_magic_version_kind() {
        let e = StreamHeader::read_from(&raw(b"HTTP", 1, 1, b"c", b"")[..]).unwrap_err();
        assert!(matches!(e, StreamHeaderError::BadMagic { found } if &found == b"HTTP"));
        assert!(e.to_string().contains("magic"), "{e}");
        let e = StreamHeader::read_from(&raw(b"BHST", 2, 1, b"c", b"")[..]).unwrap_err();
        assert!(matches!(
            e,
            StreamHeaderError::UnsupportedVersion { found: 2 }
        ));
        for kind in [0, 5, 255] {
            let e = StreamHeader::read_from(&raw(b"BHST", 1, kind, b"c", b"")[..]).unwrap_err();
            assert!(matches!(e, StreamHeaderError::UnknownKind { found } if found == kind));
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_reading_ids() {
        // Only the fixed part: a length over the limit must be refused from
        // it alone, without waiting for (or allocating) the ids.
        let mut fixed = b"BHST\x01\x01".to_vec();
        fixed.extend_from_slice(&u16::MAX.to_be_bytes());
        fixed.extend_from_slice(&0u16.to_be_bytes());
        let e = StreamHeader::read_from(&fixed[..]).unwrap_err();
        assert!(
            matches!(
                e,
                StreamHeaderError::Invalid(ValidationError::TooLong {
                    field: "container id",
                    len: 65535,
                    max: MAX_ID_LEN
                })
            ),
            "{e:?}"
        );
        let mut fixed = b"BHST\x01\x01\x00\x01".to_vec();
        fixed.extend_from_slice(&((MAX_ID_LEN + 1) as u16).to_be_bytes());
        let e = StreamHeader::read_from(&fixed[..]).unwrap_err();
        assert!(e.to_string().contains("exec id"), "{e}");
        // An empty container id is refused too.
        let e = StreamHeader::read_from(&raw(b"BHST", 1, 1, b"", b"x")[..]).unwrap_err();
        assert!(matches!(
            e,
            StreamHeaderError::Invalid(ValidationError::Empty { .. })
        ));
    }

    #[test]
    fn invalid_characters() {
        for (c, e, field) in [
            (&b"a/b"[..], &b""[..], "container id"),
            (b"ok", b"../x", "exec id"),
            (b"ok", b"a\0", "exec id"),
            (b"\xff\xfe", b"", "container id"),
            (b"caf\xc3\xa9", b"", "container id"),
            (b"..", b"", "container id"),
            (b"ok", b".", "exec id"),
        ] {
            let err = StreamHeader::read_from(&raw(b"BHST", 1, 2, c, e)[..]).unwrap_err();
            assert!(err.to_string().contains(field), "{c:?} {e:?}: {err}");
            assert!(matches!(err, StreamHeaderError::Invalid(_)));
        }
        assert!(StreamHeader::new(StreamKind::Stdin, "a b", "").is_err());
        assert!(StreamHeader::new(StreamKind::Stdin, "", "").is_err());
        let bad = StreamHeader {
            kind: StreamKind::Stdin,
            container_id: "x".repeat(MAX_ID_LEN + 1),
            exec_id: String::new(),
        };
        assert!(bad.encode().is_err());
    }

    #[test]
    fn io_errors_are_not_truncation() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::ConnectionReset))
            }
        }
        assert!(matches!(
            StreamHeader::read_from(Failing),
            Err(StreamHeaderError::Io(_))
        ));
    }

    #[tokio::test]
    async fn async_round_trip_over_a_socket() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let h = StreamHeader::new(StreamKind::Tty, "ctr", "e1").unwrap();
        h.write_to_async(&mut a).await.unwrap();
        a.write_all(b"data").await.unwrap();
        drop(a);
        assert_eq!(StreamHeader::read_from_async(&mut b).await.unwrap(), h);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"data");
    }

    #[tokio::test]
    async fn async_errors() {
        let bytes = StreamHeader::new(StreamKind::Stdout, "ctr", "")
            .unwrap()
            .encode()
            .unwrap();
        let e = StreamHeader::read_from_async(&bytes[..bytes.len() - 1])
            .await
            .unwrap_err();
        assert!(matches!(e, StreamHeaderError::Truncated { part: "ids" }));
        let e = StreamHeader::read_from_async(&raw(b"XXXX", 1, 1, b"c", b"")[..])
            .await
            .unwrap_err();
        assert!(matches!(e, StreamHeaderError::BadMagic { .. }));
        let e = StreamHeader::read_from_async(&raw(b"BHST", 1, 1, b"c;", b"")[..])
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            StreamHeaderError::Invalid(ValidationError::BadCharacter {
                byte: b';',
                offset: 1,
                ..
            })
        ));
    }

    #[test]
    fn sync_write_to() {
        let h = StreamHeader::new(StreamKind::Stdin, "c", "").unwrap();
        let mut out = Vec::new();
        h.write_to(&mut out).unwrap();
        assert_eq!(out, h.encode().unwrap());
    }
}
