//! `cargo test`'s output, echoed live and kept per test target, so that what a
//! failing target printed is shown again at the very end of the run.
//!
//! A CI log is often read from its tail, and with a dozen targets the failing
//! one's messages can sit thousands of lines above it. libtest names the
//! failure, but only where the target ran.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How many of a target's last lines the summary repeats.
const KEPT_LINES: usize = 120;

/// Longer lines (a guest console dump, a JSON spec) are cut to this many bytes.
const MAX_LINE: usize = 400;

/// How long to wait for the output pipes to close once cargo has exited. A
/// test that leaked a process holding them must not hang the summary.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One test target's output: the lines since cargo said it was running it.
struct Section {
    /// What cargo called it: `tests/run.rs (target/debug/deps/run-…)`.
    name: String,
    lines: VecDeque<String>,
    failed: bool,
}

impl Section {
    fn new(name: String) -> Self {
        Section {
            name,
            lines: VecDeque::with_capacity(KEPT_LINES),
            failed: false,
        }
    }

    fn push(&mut self, line: &str) {
        if self.lines.len() == KEPT_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(cut(line).to_owned());
        if marks_failure(line) {
            self.failed = true;
        }
    }
}

/// Output of one `cargo test` run, split by test target.
#[derive(Clone)]
pub struct TestLog {
    sections: Arc<Mutex<Vec<Section>>>,
}

impl TestLog {
    /// An empty log; lines before cargo's first `Running` count as the build.
    pub fn new() -> Self {
        TestLog {
            sections: Arc::new(Mutex::new(vec![Section::new("(build)".into())])),
        }
    }

    /// Echoes `pipe` to stdout or stderr line by line while keeping it; the
    /// returned receiver gets a message when the pipe is closed.
    pub fn tee(&self, pipe: impl Read + Send + 'static, to_stderr: bool) -> mpsc::Receiver<()> {
        let (done, finished) = mpsc::channel();
        let log = self.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                // Echo the bytes as they came (a test may print non-UTF-8).
                if to_stderr {
                    let _ = std::io::stderr().write_all(&raw);
                } else {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&raw);
                    let _ = out.flush();
                }
                log.record(String::from_utf8_lossy(&raw).trim_end());
            }
            let _ = done.send(());
        });
        finished
    }

    fn record(&self, line: &str) {
        let mut sections = self.sections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = target_started(line) {
            sections.push(Section::new(name.to_owned()));
        }
        if let Some(current) = sections.last_mut() {
            current.push(line);
        }
    }

    /// Waits (bounded) for the pipes behind `finished` to close.
    pub fn drain(finished: &[mpsc::Receiver<()>]) {
        for rx in finished {
            let _ = rx.recv_timeout(DRAIN_TIMEOUT);
        }
    }

    /// The names of the targets that failed, and a summary repeating the
    /// last lines each printed; empty when none did.
    pub fn failure_summary(&self) -> (Vec<String>, String) {
        let sections = self.sections.lock().unwrap_or_else(|e| e.into_inner());
        let mut names = Vec::new();
        let mut text = String::new();
        for section in sections.iter().filter(|s| s.failed) {
            names.push(section.name.clone());
            text.push_str(&format!(
                "\n==== FAILED: {} — its last {} lines ====\n",
                section.name,
                section.lines.len()
            ));
            for line in &section.lines {
                text.push_str(line);
                text.push('\n');
            }
        }
        (names, text)
    }
}

/// The target named by cargo's `Running …` or `Doc-tests …` line.
fn target_started(line: &str) -> Option<&str> {
    let line = line.trim_start();
    line.strip_prefix("Running ")
        .or_else(|| line.strip_prefix("Doc-tests "))
        .map(str::trim)
}

/// Lines by which libtest, our harness or cargo say a target failed.
fn marks_failure(line: &str) -> bool {
    line.starts_with("test result: FAILED")
        || line.contains("e2e: the tests inside the emulated host exited with status")
        || line.contains("e2e: cannot run the tests in the emulated KVM host")
        || line.starts_with("error: test failed")
}

fn cut(line: &str) -> &str {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_kept_per_target_and_only_failed_ones_are_summarised() {
        let log = TestLog::new();
        for line in [
            "     Running tests/ok.rs (target/debug/deps/ok-1)",
            "test a ... ok",
            "test result: ok. 1 passed; 0 failed",
            "     Running tests/run.rs (target/debug/deps/run-2)",
            "test b ... FAILED",
            "failures:",
            "    b: the container printed nothing",
            "test result: FAILED. 0 passed; 1 failed",
            "   Doc-tests bulkhead",
            "test result: ok. 0 passed; 0 failed",
        ] {
            log.record(line);
        }
        let (names, text) = log.failure_summary();
        assert_eq!(names, ["tests/run.rs (target/debug/deps/run-2)"]);
        assert!(text.contains("b: the container printed nothing"));
        assert!(!text.contains("test a ... ok"));
        assert!(!text.contains("Doc-tests"));
    }

    #[test]
    fn only_the_last_lines_are_kept_and_long_ones_are_cut() {
        let log = TestLog::new();
        log.record("     Running tests/run.rs (x)");
        for i in 0..KEPT_LINES * 2 {
            log.record(&format!("line {i}"));
        }
        log.record(&"é".repeat(MAX_LINE));
        log.record("e2e: the tests inside the emulated host exited with status 101");
        let (_, text) = log.failure_summary();
        assert!(!text.contains("line 0\n"));
        assert!(text.contains(&format!("line {}\n", KEPT_LINES * 2 - 1)));
        assert!(text.lines().all(|l| l.len() <= MAX_LINE + 100));
    }

    #[test]
    fn a_clean_run_has_no_summary() {
        let log = TestLog::new();
        log.record("     Running tests/ok.rs (x)");
        log.record("test result: ok. 3 passed; 0 failed");
        let (names, text) = log.failure_summary();
        assert!(names.is_empty() && text.is_empty());
    }
}
