//! One process's stdio as containerd hands it over: FIFOs it created (`ctr`,
//! CRI), `file://` paths, or a `binary://` logging program, joined to the
//! process's vsock streams in the guest.
//!
//! Output is copied until the guest closes the stream, which the agent does
//! only after the process exited and everything it wrote was sent; the exit is
//! reported only after these copies end ([`ProcessIo::drain`]), so output
//! written just before exit is never lost.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_protocol::agent::StdioStreams;
use bulkhead_protocol::stream::{StreamHeader, StreamKind};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::unix::OwnedWriteHalf;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::sandbox::{AgentConnection, SandboxError};

/// How long output may keep arriving after the process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where containerd wants a process's stdio (`CreateTaskRequest`,
/// `ExecProcessRequest`): empty means "not wanted".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StdioSpec {
    /// The stdin FIFO.
    pub stdin: String,
    /// The stdout FIFO or log URI.
    pub stdout: String,
    /// The stderr FIFO or log URI.
    pub stderr: String,
    /// The process has a pty (stdout carries it; stderr is unused).
    pub terminal: bool,
}

impl StdioSpec {
    /// The streams the agent should expect.
    pub fn streams(&self) -> StdioStreams {
        let mut s = StdioStreams::new();
        s.stdin = !self.stdin.is_empty();
        s.stdout = !self.stdout.is_empty() || (self.terminal && s.stdin);
        s.stderr = !self.stderr.is_empty() && !self.terminal;
        s
    }
}

/// The open vsock streams of one process.
pub struct Streams {
    output: Option<tokio::net::UnixStream>,
    stderr: Option<tokio::net::UnixStream>,
    stdin: Option<tokio::net::UnixStream>,
}

/// Opens the streams `spec` asks for, naming `container`/`exec`.
pub async fn open_streams(
    conn: &AgentConnection,
    container: &str,
    exec: &str,
    spec: &StdioSpec,
) -> Result<Streams, SandboxError> {
    let wanted = spec.streams();
    let header = |kind| {
        StreamHeader::new(kind, container, exec)
            .map_err(|e| SandboxError::Agent(format!("stream header: {e}")))
    };
    let mut streams = Streams {
        output: None,
        stderr: None,
        stdin: None,
    };
    if spec.terminal {
        if wanted.stdout || wanted.stdin {
            streams.output = Some(conn.open_stream(&header(StreamKind::Tty)?).await?);
        }
        return Ok(streams);
    }
    if wanted.stdout {
        streams.output = Some(conn.open_stream(&header(StreamKind::Stdout)?).await?);
    }
    if wanted.stderr {
        streams.stderr = Some(conn.open_stream(&header(StreamKind::Stderr)?).await?);
    }
    if wanted.stdin {
        streams.stdin = Some(conn.open_stream(&header(StreamKind::Stdin)?).await?);
    }
    Ok(streams)
}

/// Why stdio could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A FIFO or file could not be opened.
    #[error("cannot open {path} for the process's {what}")]
    Open {
        /// stdin, stdout or stderr.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `binary://` logger could not be started or did not get ready.
    #[error("the logging binary {path}: {reason}")]
    Logger {
        /// The program.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A URI we do not know.
    #[error("unsupported stdio URI {0:?} (expected a FIFO path, file:// or binary://)")]
    Unsupported(String),
}

type Sink = Box<dyn AsyncWrite + Unpin + Send>;

/// The copies running for one process.
pub struct ProcessIo {
    /// Our end of the process's stdin, until CloseIO or end of input.
    stdin: Arc<Mutex<Option<OwnedWriteHalf>>>,
    /// The stdin FIFO, to unblock a reader still waiting for a writer.
    stdin_fifo: Option<String>,
    outputs: Vec<JoinHandle<()>>,
    logger: Option<Child>,
}

impl ProcessIo {
    /// Starts copying between `streams` and where `spec` says.
    pub async fn wire(
        streams: Streams,
        spec: &StdioSpec,
        container: &str,
        namespace: &str,
    ) -> Result<ProcessIo, IoError> {
        let mut io = ProcessIo {
            stdin: Arc::new(Mutex::new(None)),
            stdin_fifo: None,
            outputs: Vec::new(),
            logger: None,
        };
        let (out_sink, err_sink) = io.open_outputs(spec, container, namespace).await?;
        let stdin_source = (!spec.stdin.is_empty()).then(|| spec.stdin.clone());

        let Streams {
            output,
            stderr,
            stdin,
        } = streams;
        // With a pty the output stream also carries the keystrokes.
        let (output_read, tty_write) = match output {
            Some(s) => {
                let (r, w) = s.into_split();
                (Some(r), Some(w))
            }
            None => (None, None),
        };
        let stdin_write = if spec.terminal {
            tty_write
        } else {
            drop(tty_write);
            stdin.map(|s| s.into_split().1)
        };
        if let (Some(read), Some(sink)) = (output_read, out_sink) {
            io.outputs.push(tokio::spawn(copy_out(read, sink)));
        }
        if let (Some(s), Some(sink)) = (stderr, err_sink) {
            io.outputs
                .push(tokio::spawn(copy_out(s.into_split().0, sink)));
        }
        if let (Some(fifo), Some(write)) = (stdin_source, stdin_write) {
            *io.stdin.lock().await = Some(write);
            let slot = io.stdin.clone();
            io.stdin_fifo = Some(fifo.clone());
            tokio::spawn(copy_in(fifo, slot));
        }
        Ok(io)
    }

    async fn open_outputs(
        &mut self,
        spec: &StdioSpec,
        container: &str,
        namespace: &str,
    ) -> Result<(Option<Sink>, Option<Sink>), IoError> {
        if let Some(rest) = spec.stdout.strip_prefix("binary://") {
            let (out, err, child) = start_logger(rest, container, namespace).await?;
            self.logger = Some(child);
            let err = (!spec.terminal).then_some(err);
            return Ok((Some(out), err));
        }
        let open = |uri: &str, what| -> Result<Option<Sink>, IoError> {
            if uri.is_empty() {
                return Ok(None);
            }
            if let Some(path) = uri.strip_prefix("file://") {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| IoError::Open {
                        what,
                        path: path.into(),
                        source,
                    })?;
                return Ok(Some(Box::new(tokio::fs::File::from_std(file))));
            }
            if uri.contains("://") {
                return Err(IoError::Unsupported(uri.to_owned()));
            }
            // Read-write, so opening never fails for want of a reader yet;
            // containerd's side reads until we close.
            let sender = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(uri)
                .map_err(|source| IoError::Open {
                    what,
                    path: uri.into(),
                    source,
                })?;
            Ok(Some(Box::new(sender)))
        };
        let out = open(&spec.stdout, "stdout")?;
        let err = if spec.terminal {
            None
        } else {
            open(&spec.stderr, "stderr")?
        };
        Ok((out, err))
    }

    /// Closes the process's stdin (containerd's CloseIO): it reads end-of-file.
    pub async fn close_stdin(&self) {
        if let Some(mut w) = self.stdin.lock().await.take() {
            let _ = w.shutdown().await;
        }
    }

    /// Waits (bounded) for the output copies to end after the process exited.
    pub async fn drain(&mut self) {
        let outputs = std::mem::take(&mut self.outputs);
        let all = futures_join(outputs);
        if tokio::time::timeout(DRAIN_TIMEOUT, all).await.is_err() {
            tracing::warn!("output still open {DRAIN_TIMEOUT:?} after the process exited");
        }
        self.close_stdin().await;
        if let Some(fifo) = self.stdin_fifo.take() {
            // A copy still waiting for a writer to open the FIFO: open one, so
            // its open returns (and reads end-of-file at once).
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
        }
        if let Some(mut logger) = self.logger.take() {
            // It sees end-of-file on its pipes and exits by itself.
            if tokio::time::timeout(DRAIN_TIMEOUT, logger.wait())
                .await
                .is_err()
            {
                let _ = logger.kill().await;
            }
        }
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

async fn copy_out(mut from: impl AsyncRead + Unpin, mut to: Sink) {
    if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
        tracing::debug!("output copy ended: {e}");
    }
    let _ = to.shutdown().await;
}

/// Copies the stdin FIFO into the process until the client closes its end
/// (end-of-file, e.g. `echo hi | ctr run ...`) or CloseIO takes our writer.
/// The FIFO is opened read-only, which blocks until the client opens its end:
/// only then does end-of-file mean the client is done.
async fn copy_in(fifo: String, slot: Arc<Mutex<Option<OwnedWriteHalf>>>) {
    let opened = tokio::task::spawn_blocking(move || std::fs::File::open(fifo)).await;
    let Ok(Ok(file)) = opened else { return };
    let Ok(mut from) = pipe::Receiver::from_file(file) else {
        return;
    };
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = match tokio::io::AsyncReadExt::read(&mut from, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut guard = slot.lock().await;
        let Some(w) = guard.as_mut() else { return };
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if let Some(mut w) = slot.lock().await.take() {
        let _ = w.shutdown().await;
    }
}

/// Starts containerd's `binary://` logger: the program gets the process's
/// stdout on fd 3 and stderr on fd 4, and closes (or writes to) fd 5 once it
/// is ready; CONTAINER_ID and CONTAINER_NAMESPACE tell it whose logs these are.
async fn start_logger(
    uri_rest: &str,
    container: &str,
    namespace: &str,
) -> Result<(Sink, Sink, Child), IoError> {
    let (path, query) = uri_rest.split_once('?').unwrap_or((uri_rest, ""));
    let path = PathBuf::from(path);
    let fail = |reason: String| IoError::Logger {
        path: path.clone(),
        reason,
    };
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(percent_decode(k));
        if !v.is_empty() {
            args.push(percent_decode(v));
        }
    }
    let pipe_pair =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("pipe: {e}")));
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let (ready_r, ready_w) = pipe_pair()?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(&path);
    cmd.args(&args)
        .env("CONTAINER_ID", container)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: runs in the forked child before exec and only calls dup2 (async-
    // signal-safe); each copy at 3, 4, 5 has close-on-exec cleared by dup2. The
    // sources are above 5 or already in place, so no copy clobbers another.
    unsafe {
        cmd.pre_exec(move || {
            for (target, fd) in (3..).zip(fds) {
                if fd != target && libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if fd == target {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    drop((out_r, err_r, ready_w));
    // Ready when it writes a byte or closes fd 5.
    let ready = tokio::task::spawn_blocking(move || {
        let mut b = [0u8; 1];
        nix::unistd::read(&ready_r, &mut b)
    });
    match tokio::time::timeout(Duration::from_secs(10), ready).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => return Err(fail(format!("reading its ready pipe: {e}"))),
        Ok(Err(e)) => return Err(fail(format!("waiting for it: {e}"))),
        Err(_) => return Err(fail("it did not get ready within 10 s".into())),
    }
    let sender = |fd: OwnedFd| -> Result<Sink, IoError> {
        Ok(Box::new(
            pipe::Sender::from_owned_fd(fd).map_err(|e| fail(format!("pipe: {e}")))?,
        ))
    };
    Ok((sender(out_w)?, sender(err_w)?, child))
}

/// Decodes `%XX` escapes and `+` of a URI query (containerd's `url.Values`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path of a FIFO or file given as a plain string.
pub fn is_plain_path(uri: &str) -> bool {
    !uri.is_empty() && !uri.contains("://") && Path::new(uri).is_absolute()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_follow_what_containerd_gave() {
        let mut spec = StdioSpec {
            stdin: String::new(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: false,
        };
        let s = spec.streams();
        assert!(!s.stdin && s.stdout && s.stderr);
        spec.terminal = true;
        spec.stdin = "/f/in".into();
        let s = spec.streams();
        assert!(s.stdin && s.stdout && !s.stderr, "a pty merges stderr");
        let none = StdioSpec::default().streams();
        assert!(!none.stdin && !none.stdout && !none.stderr);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert!(is_plain_path("/run/containerd/fifo/x-stdout"));
        assert!(!is_plain_path("binary:///usr/bin/logger"));
    }

    #[tokio::test]
    async fn fifo_output_reaches_the_reader_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let spec = StdioSpec {
            stdout: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let (mut guest, host) = tokio::net::UnixStream::pair().unwrap();
        let streams = Streams {
            output: Some(host),
            stderr: None,
            stdin: None,
        };
        // The reader opens its end before the task is created, as containerd
        // does; a reader opening only after the writer closed would wait for
        // a writer forever.
        // It reads only once the writer is there: a FIFO without writers
        // reads as end-of-file.
        let reader = pipe::OpenOptions::new().open_receiver(&fifo).unwrap();
        let mut io = ProcessIo::wire(streams, &spec, "c1", "default")
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut reader = reader;
            let mut got = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut got)
                .await
                .unwrap();
            got
        });
        guest.write_all(b"last words\n").await.unwrap();
        drop(guest);
        io.drain().await;
        drop(io);
        let got = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the FIFO reader saw end-of-file once the copy ended");
        assert_eq!(got.unwrap(), "last words\n");
    }
}
