//! Size limits on every message of the agent API, the id rules, and the vsock
//! ports.
//!
//! Why limits: the guest is untrusted. A compromised agent can answer anything,
//! so the host (shim) must bound what it accepts before it allocates, logs or
//! acts on it; and the agent, in turn, must not let a malformed request grow
//! its memory in a VM that may have only a few tens of MiB. Both sides use the
//! same numbers from here, through [`validate_id`], [`validate_exec_id`] and
//! [`crate::Validate`], so a message one side accepts is never refused by the
//! other.

use thiserror::Error;

/// Largest ttrpc message payload (one encoded request or reply), in bytes:
/// 4 MiB.
///
/// It is ttrpc's own frame limit (`ttrpc::proto::MESSAGE_LENGTH_MAX`), which
/// the runtime enforces on both sides when reading and writing; restated here
/// so that the JSON limits below can be checked to fit inside it. The largest
/// message is `CreateContainer` with its OCI spec.
pub const MAX_MESSAGE_SIZE: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

/// Longest container or exec id, in bytes: 128.
///
/// Ids become file names and cgroup names in the guest and appear in logs;
/// containerd's ids are 64-hex-digit hashes or short names, well below this.
pub const MAX_ID_LEN: usize = 128;

/// Largest OCI runtime spec (`config.json`) in `CreateContainer`, in bytes:
/// 2 MiB.
///
/// Real specs are a few KiB; one with thousands of env vars, mounts or a big
/// seccomp profile stays under 1 MiB. Half the message limit leaves room for
/// the other fields and the encoding.
pub const MAX_OCI_SPEC_JSON_SIZE: usize = 2 << 20;

/// Largest OCI `Process` JSON in `ExecProcess`, in bytes: 1 MiB.
///
/// A process is args, env, cwd, user, capabilities and rlimits: a few KiB in
/// practice.
pub const MAX_PROCESS_JSON_SIZE: usize = 1 << 20;

/// Largest OCI `LinuxResources` JSON in `UpdateContainer`, in bytes: 256 KiB.
///
/// Resources are a handful of numbers plus device rules.
pub const MAX_RESOURCES_JSON_SIZE: usize = 256 << 10;

/// Longest `rootfs_path` in `CreateContainer`, in bytes: 4095 (Linux
/// `PATH_MAX` less its NUL).
pub const MAX_ROOTFS_PATH_LEN: usize = 4095;

/// Longest agent version string in `Check`, in bytes: 128.
pub const MAX_VERSION_LEN: usize = 128;

/// Most pids in one `ListProcesses` reply: 65536.
///
/// A guest's container has far fewer processes; the bound keeps a hostile
/// reply small (at most about 320 KiB of varints).
pub const MAX_PIDS: usize = 65_536;

/// Most devices in one `StatsContainer` reply's `io.devices`: 256.
///
/// A microVM has a few virtio-blk devices at most.
pub const MAX_IO_DEVICES: usize = 256;

/// Highest signal number (Linux's `SIGRTMAX`): 64. Signal 0 is refused too:
/// it only probes for existence, which `ListProcesses` does.
pub const MAX_SIGNAL: u32 = 64;

/// Highest exit code a process can report: 255.
pub const MAX_EXIT_CODE: u32 = 255;

/// Largest terminal dimension in `ResizeTty` (rows or columns): 65535, the
/// width of the kernel's `struct winsize` fields.
pub const MAX_TTY_DIMENSION: u32 = u16::MAX as u32;

/// The vsock port on which the agent serves the ttrpc API: 1024.
///
/// The agent binds `vsock://-1:1024` (any CID). The host reaches it through
/// the VMM's hybrid vsock Unix socket with `CONNECT 1024\n`.
pub const AGENT_TTRPC_PORT: u32 = 1024;

/// The vsock port on which the agent accepts stdio stream connections: 1025.
///
/// Each connection carries one stream of one process: it starts with a
/// [`crate::stream::StreamHeader`], then raw bytes. The host opens them with
/// `CONNECT 1025\n` on the hybrid vsock socket.
pub const AGENT_STREAM_PORT: u32 = 1025;

/// The host vsock port the agent dials (CID 2, the host) once it takes
/// requests: 1026.
///
/// With the VMM's hybrid vsock, the guest's connection to host port P arrives
/// on the host Unix socket `<vsock socket path>_<P>`, so the shim listens on
/// `<path>_1026` before it starts the VM and waits for this connection (with
/// a deadline) instead of polling the agent.
pub const HOST_READY_PORT: u32 = 1026;

/// The vsock port on which an agent resumed from a VM template waits for the
/// host's go: 1027. The template was saved while the agent waited here, so
/// only its copies ever get the connection; the agent then mounts the share
/// and dials [`HOST_READY_PORT`] as after a boot.
pub const AGENT_RESUME_PORT: u32 = 1027;

/// Why a field of a message, an id or a stream header was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// A field that must have a value is empty.
    #[error("{field} is empty")]
    Empty {
        /// The field, e.g. "container id".
        field: &'static str,
    },
    /// A field is longer than its limit.
    #[error("{field} is {len} bytes long, more than the {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length, in bytes (or entries, for lists).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An id has a character outside `[A-Za-z0-9._-]`.
    #[error(
        "{field} has the byte {byte:#04x} at offset {offset}; \
         only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
    )]
    BadCharacter {
        /// The field.
        field: &'static str,
        /// The offending byte (the first byte of a non-ASCII character).
        byte: u8,
        /// Its offset in the id, in bytes.
        offset: usize,
    },
    /// A number is outside its range.
    #[error("{field} is {value}, outside {min}..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The lowest allowed value.
        min: u64,
        /// The highest allowed value.
        max: u64,
    },
    /// A field breaks another rule, told by `reason`.
    #[error("{field} {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong, as the end of a sentence ("must be relative").
        reason: &'static str,
    },
}

/// Checks a container id (or a non-empty exec id): 1 to [`MAX_ID_LEN`] bytes
/// of `[A-Za-z0-9._-]`, and neither `.` nor `..` (ids become path
/// components in the guest).
///
/// These are the ids OCI runtimes accept in practice (runc's rule, without
/// `+`), so every id containerd or the CLI makes passes.
pub fn validate_id(id: &str) -> Result<(), ValidationError> {
    check_id("id", id)
}

/// Checks an exec id where empty means the container's init process: either
/// empty, or an id that [`validate_id`] accepts.
pub fn validate_exec_id(exec_id: &str) -> Result<(), ValidationError> {
    if exec_id.is_empty() {
        return Ok(());
    }
    check_id("exec id", exec_id)
}

/// [`validate_id`] with the field's name in the error.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    check_id_bytes(field, id.as_bytes())?;
    if id == "." || id == ".." {
        return Err(ValidationError::Invalid {
            field,
            reason: "must not be \".\" or \"..\"",
        });
    }
    Ok(())
}

/// Length and character checks on raw id bytes (also used before the bytes
/// are known to be UTF-8: accepted bytes are ASCII, hence valid UTF-8).
pub(crate) fn check_id_bytes(field: &'static str, id: &[u8]) -> Result<(), ValidationError> {
    check_len(field, id.len(), MAX_ID_LEN)?;
    match id
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        Some(offset) => Err(ValidationError::BadCharacter {
            field,
            byte: id[offset],
            offset,
        }),
        None => Ok(()),
    }
}

/// Checks that `len <= max`.
pub(crate) fn check_len(
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<(), ValidationError> {
    if len > max {
        Err(ValidationError::TooLong { field, len, max })
    } else {
        Ok(())
    }
}

/// Checks that `min <= value <= max`.
pub(crate) fn check_range(
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ValidationError> {
    if value < min || value > max {
        Err(ValidationError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_limits_fit_in_a_message() {
        const {
            assert!(
                MAX_OCI_SPEC_JSON_SIZE + MAX_ROOTFS_PATH_LEN + 2 * MAX_ID_LEN < MAX_MESSAGE_SIZE
            );
            assert!(MAX_PROCESS_JSON_SIZE < MAX_MESSAGE_SIZE);
            assert!(MAX_RESOURCES_JSON_SIZE < MAX_MESSAGE_SIZE);
        }
        assert_eq!(MAX_MESSAGE_SIZE, 4 << 20);
    }

    #[test]
    fn ids() {
        for ok in [
            "a",
            "abc-DEF_012.x",
            "..a",
            &"f".repeat(64),
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(validate_id(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_id(""), Err(ValidationError::Empty { field: "id" }));
        assert_eq!(
            validate_id(&"x".repeat(MAX_ID_LEN + 1)),
            Err(ValidationError::TooLong {
                field: "id",
                len: MAX_ID_LEN + 1,
                max: MAX_ID_LEN
            })
        );
        for (bad, offset) in [("a/b", 1), ("a b", 1), ("é", 0), ("x\0", 1), ("+", 0)] {
            match validate_id(bad) {
                Err(ValidationError::BadCharacter { offset: o, .. }) => {
                    assert_eq!(o, offset, "{bad}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(
            validate_id("."),
            Err(ValidationError::Invalid { .. })
        ));
        assert!(matches!(
            validate_id(".."),
            Err(ValidationError::Invalid { .. })
        ));
        assert_eq!(validate_exec_id(""), Ok(()));
        assert_eq!(validate_exec_id("exec-1"), Ok(()));
        assert!(validate_exec_id("a/b").is_err());
        let msg = validate_id("a/b").unwrap_err().to_string();
        assert!(msg.contains("0x2f") && msg.contains("offset 1"), "{msg}");
    }
}
