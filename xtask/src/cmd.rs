//! Running external commands with errors that say what ran and why it failed.
//!
//! xtask drives `apt-get`, `tar`, `make` and `cargo`. Their output goes to a log
//! file; when one of them fails, the error names the command line and the log and
//! shows the log's tail, without flooding the terminal when everything goes well.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How many lines of a failed command's log an error shows.
pub const TAIL_LINES: usize = 40;

/// The command line of `cmd` as a shell-like string, for messages.
///
/// Exists so that every error and progress line names the exact command, including
/// the environment variables set on it, the way a user would retype it.
pub fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(s, " (in {})", dir.display());
    }
    s
}

/// Runs `cmd` with stdout and stderr appended to `log`, printing
/// `"{label}: <elapsed> s, <last log line>"` every `every` so that a long step is
/// visibly alive. On failure the error names the command and the log, and shows
/// the log's last [`TAIL_LINES`] lines.
///
/// Exists for the long steps (kernel build, `cargo install`) whose output is too
/// long to print but must be at hand when they fail.
pub fn run_logged(cmd: &mut Command, log: &Path, label: &str, every: Duration) -> Result<()> {
    let what = describe(cmd);
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open log file {}", log.display()))?;
    let file2 = file
        .try_clone()
        .with_context(|| format!("cannot duplicate log file handle {}", log.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file2)
        .spawn()
        .with_context(|| format!("cannot start `{what}`"))?;
    let mut next_report = every;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for `{what}`"))?
        {
            break status;
        }
        if start.elapsed() >= next_report {
            let secs = start.elapsed().as_secs();
            match tail_of_file(log, 1).trim() {
                "" => println!("{label}: {secs} s"),
                last => println!("{label}: {secs} s, {last}"),
            }
            next_report += every;
        }
        thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!(
            "`{what}` failed ({status}) after {} s; full log: {}; last lines:\n{}",
            start.elapsed().as_secs(),
            log.display(),
            tail_of_file(log, TAIL_LINES)
        );
    }
    Ok(())
}

/// The last `n` lines of the file at `path`, or a note saying why it could not be read
/// (used inside error messages, where a second error would hide the first).
pub fn tail_of_file(path: &Path, n: usize) -> String {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let mut ring = std::collections::VecDeque::with_capacity(n + 1);
    for line in BufReader::new(file).split(b'\n') {
        match line {
            Ok(l) => {
                ring.push_back(String::from_utf8_lossy(&l).into_owned());
                if ring.len() > n {
                    ring.pop_front();
                }
            }
            Err(e) => return format!("(cannot read {}: {e})", path.display()),
        }
    }
    Vec::from(ring).join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_env_args_and_dir() {
        let mut c = Command::new("make");
        c.arg("-j2").env("ARCH", "x86_64").current_dir("src");
        assert_eq!(describe(&c), "ARCH=x86_64 make -j2 (in src)");
    }

    #[test]
    fn run_logged_shows_log_tail_on_failure() {
        let dir = std::env::temp_dir().join(format!("xtask-cmd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let err = run_logged(
            Command::new("sh").args(["-c", "seq 1 100; echo bad >&2; exit 1"]),
            &log,
            "test",
            Duration::from_secs(60),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad"), "{err}");
        assert!(err.contains("\n100\n") || err.contains("100\nbad"), "{err}");
        assert!(!err.contains("\n50\n"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
