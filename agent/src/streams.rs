//! The stdio stream listener (vsock port 1025).
//!
//! Each connection carries one stream of one process. It starts with a
//! [`StreamHeader`] (read with a deadline), the agent answers one [`StreamAck`]
//! byte, and then the bytes flow:
//! - `Stdout`/`Stderr`: from the process's pipe to the socket; the socket is
//!   closed at the pipe's end-of-file, so the host sees EOF only after the last
//!   byte the process (and its children) wrote;
//! - `Stdin`: from the socket to the process's stdin pipe; the host's EOF (or a
//!   `CloseStdin` call) closes the pipe, so the process reads EOF;
//! - `Tty`: both ways on the pty master.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_protocol::stream::{StreamAck, StreamHeader, StreamKind};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

use crate::registry::{Attached, ProcEntry};

/// How long a new connection has to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds the process a stream header names.
pub trait Lookup: Send + Sync + 'static {
    /// The process `exec_id` (`""`: the init) of container `container_id`.
    fn process(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcEntry>>;
}

/// Binds the stream port on any CID.
pub fn bind(port: u32) -> io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
}

/// Accepts stream connections forever, each handled in its own task.
pub async fn serve(listener: VsockListener, lookup: Arc<dyn Lookup>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let lookup = Arc::clone(&lookup);
                tokio::spawn(async move {
                    if let Err(err) = handle(stream, lookup.as_ref()).await {
                        tracing::warn!("stdio stream: {err}");
                    }
                });
            }
            Err(err) => {
                tracing::warn!("stdio stream accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: VsockStream, lookup: &dyn Lookup) -> io::Result<()> {
    let header = match tokio::time::timeout(
        HEADER_TIMEOUT,
        StreamHeader::read_from_async(&mut stream),
    )
    .await
    {
        Ok(Ok(header)) => header,
        Ok(Err(err)) => return Err(io::Error::other(format!("bad header: {err}"))),
        Err(_) => return Err(io::Error::other("no header within 5 s")),
    };
    let name = format!(
        "{:?} of {}/{}",
        header.kind, header.container_id, header.exec_id
    );
    let attached = match lookup.process(&header.container_id, &header.exec_id) {
        None => Err(StreamAck::UnknownProcess),
        Some(entry) => entry.attach(header.kind).map(|a| (entry, a)),
    };
    let (entry, attached) = match attached {
        Ok(ok) => ok,
        Err(ack) => {
            stream.write_all(&[ack as u8]).await?;
            return Err(io::Error::other(format!("{name} refused: {ack:?}")));
        }
    };
    stream.write_all(&[StreamAck::Attached as u8]).await?;
    tracing::debug!("stream {name} attached");
    match (header.kind, attached) {
        (StreamKind::Stdout | StreamKind::Stderr, Attached::Pipe(fd)) => {
            let mut pipe = pipe::Receiver::from_owned_fd(fd)?;
            let copied = tokio::io::copy(&mut pipe, &mut stream).await;
            let _ = stream.shutdown(std::net::Shutdown::Both);
            copied.map(drop)
        }
        (StreamKind::Stdin, Attached::Pipe(fd)) => {
            let mut pipe = pipe::Sender::from_owned_fd(fd)?;
            let (mut read, _write) = stream.into_split();
            tokio::select! {
                copied = copy_until_eof(&mut read, &mut pipe) => copied,
                () = entry.stdin_closed() => Ok(()),
            }
            // The pipe end drops here: the process reads EOF.
        }
        (StreamKind::Tty, Attached::Tty) => match entry.tty().await {
            Some(master) => tty(stream, &master).await,
            None => Ok(()),
        },
        _ => Err(io::Error::other(format!("{name}: mismatched attachment"))),
    }
}

/// Copies until `from` ends; a process that stopped reading its stdin (EPIPE)
/// ends the copy quietly.
async fn copy_until_eof<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match tokio::io::copy(from, to).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
    }
}

/// Wires a terminal: master to socket until the pty closes (EIO once every
/// slave is closed), socket to master until the host's EOF.
async fn tty(stream: VsockStream, master: &OwnedFd) -> io::Result<()> {
    let fd = master.try_clone()?;
    set_nonblocking(&fd)?;
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open and
    // names the same file description until the AsyncFd drops it.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
    let fd = Arc::new(fd);
    let (mut read, mut write) = stream.into_split();
    let input = {
        let fd = Arc::clone(&fd);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut off = 0;
                while off < n {
                    match write_fd(&fd, &buf[off..n]).await {
                        Ok(w) => off += w,
                        Err(_) => return,
                    }
                }
            }
        })
    };
    let mut buf = vec![0u8; 16 << 10];
    let result = loop {
        match read_fd(&fd, &mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = write.write_all(&buf[..n]).await {
                    break Err(e);
                }
            }
            // EIO: the last slave closed (the process ended).
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let _ = write.shutdown().await;
    input.abort();
    result
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

async fn read_fd(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref().as_fd(), buf).map_err(io::Error::from)
        }) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, buf: &[u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), buf).map_err(io::Error::from))
        {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Sets the window size of the terminal whose master is `master`.
pub fn resize(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which
    // points at a live, initialized local for the whole call; the fd is owned.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
