//! Running helper programs (apt, dpkg-deb, depmod, ...) with a deadline.
//!
//! The harness must never hang, so every child it waits for has a deadline after
//! which it is killed and reaped.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// What a finished helper program printed.
#[derive(Debug)]
pub struct Output {
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

/// A command line rendered for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Run `cmd` to completion within `timeout`, capturing stdout and stderr.
///
/// Fails if it cannot start, exits unsuccessfully (the message carries the tail of
/// its stderr) or outlives `timeout` (it is then killed and reaped).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let (status, output) = run_status(cmd, timeout)?;
    if !status.success() {
        return Err(Error::CommandFailed {
            command: describe(cmd),
            status,
            stderr: tail_lines(&output.stderr, 20),
        });
    }
    Ok(output)
}

/// Like [`run`], but an unsuccessful exit is returned rather than an error.
pub fn run_status(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, Output)> {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_deadline(&mut child, Instant::now() + timeout);
    let Some(status) = status else {
        return Err(Error::CommandTimedOut { command, timeout });
    };
    let output = Output {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    Ok((status, output))
}

/// Read a pipe to its end on a thread, so the child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Wait for `child` until `deadline`; on expiry kill and reap it and return `None`.
pub fn wait_deadline(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            // Deadline passed, or try_wait failed: do not wait any longer.
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(10),
        )
        .expect("sh runs");
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn failure_names_command() {
        let err = run(
            Command::new("sh").args(["-c", "echo bad >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("bad"), "{text}");
    }

    #[test]
    fn deadline_kills() {
        let start = Instant::now();
        let err = run(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .expect_err("must time out");
        assert!(matches!(err, Error::CommandTimedOut { .. }));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn tail() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
    }
}
