//! Wiring a guest process's stdio to this terminal: open its vsock streams,
//! copy bytes both ways, forward signals and window size changes, wait for it,
//! and make sure output written just before it exited is not lost.
//!
//! Shared by `bulkhead run` (the container's init), `bulkhead exec` and
//! `bulkhead-runtime`'s processes (whose stdio is the engine's).

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context, Result};
use bulkhead_protocol::agent::{
    ExecProcessRequest, ResizeTtyRequest, SignalProcessRequest, StdioStreams, WaitProcessRequest,
};
use bulkhead_protocol::stream::{StreamHeader, StreamKind};
use bulkhead_protocol::ttrpc;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use super::container_log::{LogStream, LogWriter};
use super::{AgentConnection, RPC_TIMEOUT};

/// How long output may keep arriving after the process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which process, and how its stdio is wired.
#[derive(Clone, Debug)]
pub struct ProcessRef {
    /// The container.
    pub container_id: String,
    /// The exec id; empty for the container's init process.
    pub exec_id: String,
    /// Pass our stdin through.
    pub interactive: bool,
    /// The process has a pty.
    pub terminal: bool,
}

impl ProcessRef {
    /// The streams the agent should expect.
    pub fn streams(&self) -> StdioStreams {
        let mut s = StdioStreams::new();
        s.stdin = self.interactive;
        s.stdout = true;
        s.stderr = !self.terminal;
        s
    }

    fn header(&self, kind: StreamKind) -> Result<StreamHeader> {
        StreamHeader::new(kind, &self.container_id, &self.exec_id)
            .context("building a stream header")
    }
}

/// The process's open streams.
pub struct Streams {
    /// stdout, or the pty (both directions) with a terminal.
    output: UnixStream,
    stderr: Option<UnixStream>,
    stdin: Option<UnixStream>,
}

/// Opens every stream `process` asked for, all at once: each is a vsock
/// handshake with the agent, and a run waits for them before it starts.
pub async fn open_streams(conn: &AgentConnection, process: &ProcessRef) -> Result<Streams> {
    let output_kind = if process.terminal {
        StreamKind::Tty
    } else {
        StreamKind::Stdout
    };
    let (output_header, stderr_header, stdin_header) = (
        process.header(output_kind)?,
        (!process.terminal)
            .then(|| process.header(StreamKind::Stderr))
            .transpose()?,
        (process.interactive && !process.terminal)
            .then(|| process.header(StreamKind::Stdin))
            .transpose()?,
    );
    let optional = |header: Option<StreamHeader>| async move {
        match header {
            Some(h) => conn.open_stream(&h).await.map(Some),
            None => Ok(None),
        }
    };
    let (output, stderr, stdin) = tokio::try_join!(
        conn.open_stream(&output_header),
        optional(stderr_header),
        optional(stdin_header),
    )?;
    Ok(Streams {
        output,
        stderr,
        stdin,
    })
}

/// Copies of bytes in flight; awaited (bounded) after the process exits.
pub struct Pumps {
    output: JoinHandle<()>,
    stderr: Option<JoinHandle<()>>,
    _raw: Option<RawTerminal>,
}

/// Where a process's output goes besides the vsock streams.
#[derive(Clone, Debug)]
pub struct OutputSinks {
    /// Copy to our own stdout and stderr (a foreground run or exec).
    pub terminal: bool,
    /// Record in the container's log (`bulkhead logs`).
    pub log: Option<LogWriter>,
}

/// Starts copying: process output to `sinks`, our stdin to the process.
pub fn pump(streams: Streams, process: &ProcessRef, sinks: &OutputSinks) -> Pumps {
    let (out_read, mut out_write) = streams.output.into_split();
    let raw = if process.terminal && sinks.terminal {
        RawTerminal::enter()
    } else {
        None
    };
    if process.terminal && process.interactive {
        // The pty stream carries keystrokes the other way.
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut out_write).await;
        });
    }
    let output = tokio::spawn(copy_output(out_read, LogStream::Stdout, sinks.clone()));
    let stderr = streams.stderr.map(|s| {
        let (read, write) = s.into_split();
        let sinks = sinks.clone();
        tokio::spawn(async move {
            // Hold the write half: dropping it would half-close the stream.
            let _write = write;
            copy_output(read, LogStream::Stderr, sinks).await
        })
    });
    if let Some(s) = streams.stdin {
        tokio::spawn(async move {
            let (_read, mut write) = s.into_split();
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut write).await;
            // EOF on our stdin: half-close; the agent closes the process's stdin.
            let _ = write.shutdown().await;
        });
    }
    Pumps {
        output,
        stderr,
        _raw: raw,
    }
}

/// Copies one output stream until the guest closes it, to our stdout or
/// stderr and/or the log.
async fn copy_output(
    mut from: impl tokio::io::AsyncRead + Unpin,
    stream: LogStream,
    sinks: OutputSinks,
) {
    use tokio::io::AsyncReadExt;
    let mut out: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> =
        match (sinks.terminal, stream) {
            (false, _) => None,
            (true, LogStream::Stdout) => Some(Box::new(tokio::io::stdout())),
            (true, LogStream::Stderr) => Some(Box::new(tokio::io::stderr())),
        };
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(log) = &sinks.log {
            if let Err(e) = log.append(stream, &buf[..n]) {
                tracing::warn!("cannot write the container log: {e}");
            }
        }
        if let Some(w) = out.as_mut() {
            if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
                // Our terminal went away: keep logging, stop echoing.
                out = None;
            }
        }
    }
}

/// Waits for the process to exit while forwarding signals and window size
/// changes, then lets the output drain. Returns its status like a shell does.
pub async fn wait(conn: &AgentConnection, process: &ProcessRef, pumps: Pumps) -> Result<i32> {
    let mut request = WaitProcessRequest::new();
    request.container_id = process.container_id.clone();
    request.exec_id = process.exec_id.clone();
    let status = tokio::select! {
        status = conn.agent().wait_process(ttrpc::context::Context::default(), &request) => {
            status.with_context(|| format!("waiting for {}", describe(process)))?
        }
        err = forward_signals(conn, process) => return Err(err),
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, pumps.output).await;
    if let Some(p) = pumps.stderr {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, p).await;
    }
    drop(pumps._raw);
    let code = status.shell_status().ok_or_else(|| {
        anyhow::anyhow!(
            "the agent reported no exit status for {}",
            describe(process)
        )
    })?;
    Ok(code as i32)
}

fn describe(process: &ProcessRef) -> String {
    if process.exec_id.is_empty() {
        format!("container {}", process.container_id)
    } else {
        format!(
            "exec {} in container {}",
            process.exec_id, process.container_id
        )
    }
}

/// The signals passed on to the guest process: what a user or an engine may
/// send the host process that stands for it (runc's init would get them
/// all); SIGCHLD, SIGWINCH (a resize) and the job-control ones stay ours,
/// and so does SIGPIPE (ours comes from our own writes to a closed output).
const FORWARDED_SIGNALS: [i32; 7] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
];

/// Takes over [`FORWARDED_SIGNALS`] for this process now, so none of them
/// kills it by default action before [`wait`] forwards them (tokio keeps a
/// handler once registered). For a process that stands for a guest process
/// from before that process starts.
pub fn catch_forwarded_signals() -> std::io::Result<()> {
    for number in FORWARDED_SIGNALS {
        drop(signal(SignalKind::from_raw(number))?);
    }
    Ok(())
}

/// Forwards [`FORWARDED_SIGNALS`] to the process, and the window size (now
/// and on SIGWINCH) to its pty. Only returns on failure.
async fn forward_signals(conn: &AgentConnection, process: &ProcessRef) -> anyhow::Error {
    // Each forwarded signal's stream feeds one channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
    for number in FORWARDED_SIGNALS {
        let mut stream = match signal(SignalKind::from_raw(number)) {
            Ok(s) => s,
            Err(e) => return anyhow::anyhow!("cannot handle signal {number}: {e}"),
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(number).is_err() {
                    break;
                }
            }
        });
    }
    let mut winch = match signal(SignalKind::window_change()) {
        Ok(s) => s,
        Err(e) => return anyhow::anyhow!("cannot handle SIGWINCH: {e}"),
    };
    if process.terminal {
        resize(conn, process).await;
    }
    loop {
        let number = tokio::select! {
            Some(number) = rx.recv() => number,
            _ = winch.recv() => {
                if process.terminal {
                    resize(conn, process).await;
                }
                continue;
            }
        };
        let mut req = SignalProcessRequest::new();
        req.container_id = process.container_id.clone();
        req.exec_id = process.exec_id.clone();
        req.signal = number as u32;
        if let Err(e) = conn
            .agent()
            .signal_process(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
        {
            return anyhow::anyhow!("forwarding signal {number} to {}: {e}", describe(process));
        }
    }
}

/// Sends our terminal's size to the process's pty (nothing if we have none).
async fn resize(conn: &AgentConnection, process: &ProcessRef) {
    let Some((rows, cols)) = window_size() else {
        return;
    };
    let mut req = ResizeTtyRequest::new();
    req.container_id = process.container_id.clone();
    req.exec_id = process.exec_id.clone();
    req.rows = u32::from(rows);
    req.cols = u32::from(cols);
    if let Err(e) = conn
        .agent()
        .resize_tty(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
    {
        tracing::debug!("ResizeTty: {e}");
    }
}

/// Our stdout's terminal size, if it is a terminal.
fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; the fd is
    // our stdout, valid for the process's life.
    let rc = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// Our terminal in raw mode (keystrokes go to the guest's pty as they are),
/// restored when dropped.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// Runs a new process in a running container, as `target`, from its OCI
/// `Process` as JSON: starts it with its stdio attached, calls `started`
/// once it runs, carries its stdio to `sinks` and returns its status (see
/// [`wait`]). Shared by `bulkhead exec` and `bulkhead-runtime exec`.
pub async fn exec(
    conn: &AgentConnection,
    target: &ProcessRef,
    process_json: Vec<u8>,
    sinks: &OutputSinks,
    started: impl FnOnce() -> Result<()>,
) -> Result<i32> {
    let mut req = ExecProcessRequest::new();
    req.container_id = target.container_id.clone();
    req.exec_id = target.exec_id.clone();
    req.process_json = process_json;
    req.stdio = Some(target.streams()).into();
    req.terminal = target.terminal;
    // The agent starts the process once its streams are attached, and
    // answers ExecProcess then: the call is outstanding while they open.
    let call = conn
        .agent()
        .exec_process(ttrpc::context::with_duration(RPC_TIMEOUT * 2), &req);
    let (reply, streams) = tokio::join!(call, open_streams(conn, target));
    reply.with_context(|| format!("exec in container {}", target.container_id))?;
    let streams = streams?;
    started()?;
    let pumps = pump(streams, target, sinks);
    wait(conn, target, pumps).await
}
