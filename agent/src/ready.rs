//! The agent's hello to the host: once it takes requests it dials the host's
//! ready port and writes `bulkhead-agent <version>\n`. The host answers with the
//! boot line (its wall clock and a random seed), which the agent applies before
//! it acknowledges: the guest may have been resumed from a template, with the
//! template's clock and random state. The connection then stays open for the
//! agent's whole life: the host reads end-of-file on it as the agent's death.

use std::io;
use std::time::Duration;

use bulkhead_protocol::stream::{BootFacts, BOOT_ACK_LINE, READY_LINE_PREFIX};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// How long the host has to send the boot line.
const BOOT_LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// RNDADDENTROPY: _IOW('R', 0x03, int[2]).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// RNDRESEEDCRNG: _IO('R', 0x07).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// The hello line for this agent version.
pub fn ready_line(version: &str) -> String {
    format!("{READY_LINE_PREFIX}{version}\n")
}

/// Dials the host (CID 2) on `port`, says hello, applies the host's boot line
/// and acknowledges it; keep the returned stream open for as long as the agent
/// lives.
pub async fn announce(port: u32) -> io::Result<VsockStream> {
    let mut stream = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await?;
    stream
        .write_all(ready_line(env!("CARGO_PKG_VERSION")).as_bytes())
        .await?;
    stream.flush().await?;
    let mut line = String::new();
    {
        // The host sends nothing after the boot line until it has the ack, so
        // the reader buffers nothing that is lost when it goes.
        let mut reader = BufReader::new(&mut stream).take(256);
        match tokio::time::timeout(BOOT_LINE_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("the host sent no boot line")),
        }
    }
    let facts = BootFacts::parse(&line)
        .ok_or_else(|| io::Error::other(format!("bad boot line from the host: {line:?}")))?;
    apply(&facts)?;
    stream.write_all(BOOT_ACK_LINE.as_bytes()).await?;
    stream.flush().await?;
    Ok(stream)
}

/// Sets the wall clock and reseeds the kernel's random generator.
fn apply(facts: &BootFacts) -> io::Result<()> {
    let now = nix::sys::time::TimeSpec::from_duration(facts.unix_time);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .map_err(|e| io::Error::other(format!("setting the clock: {e}")))?;
    reseed(&facts.seed)
}

/// Credits `seed` to the kernel's input pool and forces the generator to
/// reseed from it at once, so no output after this depends only on state a
/// template's other copies share.
fn reseed(seed: &[u8; 32]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of buf_size bytes of data,
    // which `info` holds in full; the descriptor is ours.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::other(format!(
            "adding the host's seed: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::other(format!(
            "reseeding: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
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
