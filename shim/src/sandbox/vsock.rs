//! The host side of the VMM's hybrid vsock: connect to a guest port through the
//! VMM's Unix socket (`CONNECT <port>\n`, answered `OK <hostport>\n`).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::SandboxError;

/// Longest handshake answer we read (`OK 4294967295\n` is 14 bytes).
const MAX_ANSWER: usize = 32;

/// Connects to guest vsock `port` through the hybrid socket at `uds`; after the
/// handshake the stream is a plain byte stream to the guest program.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, SandboxError> {
    let attempt = async {
        let mut stream = UnixStream::connect(uds).await?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        // Byte by byte: whatever follows the newline belongs to the guest program.
        let mut answer = Vec::with_capacity(MAX_ANSWER);
        loop {
            let byte = stream.read_u8().await?;
            if byte == b'\n' {
                break;
            }
            answer.push(byte);
            if answer.len() > MAX_ANSWER {
                return Err(std::io::Error::other("overlong handshake answer"));
            }
        }
        if !answer.starts_with(b"OK ") {
            return Err(std::io::Error::other(format!(
                "refused: {:?}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(stream)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(SandboxError::Vsock { port, source }),
        Err(_) => Err(SandboxError::Vsock {
            port,
            source: std::io::Error::other("timed out"),
        }),
    }
}
