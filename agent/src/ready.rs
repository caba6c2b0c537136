//! The agent's hello to the host: once it takes requests it dials the host's
//! ready port and writes `bulkhead-agent <version>\n`. The connection then stays
//! open for the agent's whole life: the host reads end-of-file on it as the
//! agent's death.

use std::io;

use bulkhead_protocol::stream::READY_LINE_PREFIX;
use tokio::io::AsyncWriteExt;
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// The hello line for this agent version.
pub fn ready_line(version: &str) -> String {
    format!("{READY_LINE_PREFIX}{version}\n")
}

/// Dials the host (CID 2) on `port` and says hello; keep the returned stream
/// open for as long as the agent lives.
pub async fn announce(port: u32) -> io::Result<VsockStream> {
    let mut stream = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await?;
    stream
        .write_all(ready_line(env!("CARGO_PKG_VERSION")).as_bytes())
        .await?;
    stream.flush().await?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_line() {
        let line = ready_line("0.1.0");
        assert_eq!(line, "bulkhead-agent 0.1.0\n");
        assert!(line.starts_with(READY_LINE_PREFIX));
    }
}
