//! Reading the emulated host's serial console: line splitting, the tail kept for
//! error messages, and the marker lines the guest prints to report progress.
//!
//! The guest writes the command's own output and its status markers to the same
//! console. A marker is `BULKHEAD-TESTHOST:<nonce>:<event>`, where the nonce is
//! fresh for every run, so output of the command cannot be mistaken for a marker.

use std::collections::VecDeque;

/// Prefix of every marker line.
pub const MARKER_PREFIX: &str = "BULKHEAD-TESTHOST:";

/// Number of console lines kept for error messages.
pub const TAIL_LINES: usize = 30;

/// Something the guest reported through a marker line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Setup finished; the command is about to start.
    Ready,
    /// The command exited with this status.
    Exit(i32),
    /// Setup failed; the guest says why.
    Error(String),
}

/// The marker text for `event` with `nonce`, as the guest prints it.
pub fn marker(nonce: &str, event: &str) -> String {
    format!("{MARKER_PREFIX}{nonce}:{event}")
}

/// Parse one console line (without its line ending) for a marker with `nonce`.
///
/// The marker may be preceded by other text (a kernel message that interrupted the
/// line); anything unrecognised after the nonce is ignored.
pub fn parse_marker(line: &str, nonce: &str) -> Option<Event> {
    let prefix = format!("{MARKER_PREFIX}{nonce}:");
    let at = line.find(&prefix)?;
    let event = line[at + prefix.len()..].trim_end();
    if event == "ready" {
        Some(Event::Ready)
    } else if let Some(code) = event.strip_prefix("exit=") {
        code.parse().ok().map(Event::Exit)
    } else {
        event
            .strip_prefix("error=")
            .map(|msg| Event::Error(msg.to_string()))
    }
}

/// Splits console bytes into lines and remembers the last [`TAIL_LINES`] of them.
#[derive(Debug, Default)]
pub struct Console {
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl Console {
    /// Feed raw console bytes; returns the lines they completed, without `\r\n`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                self.remember(line.clone());
                lines.push(line);
            } else {
                self.partial.push(b);
            }
        }
        lines
    }

    fn remember(&mut self, line: String) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The last lines seen, including an unfinished last line, joined with `\n`.
    pub fn tail(&self) -> String {
        let mut lines: Vec<String> = self.tail.iter().cloned().collect();
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            if lines.len() > TAIL_LINES {
                lines.remove(0);
            }
        }
        lines.join("\n")
    }
}

/// How long a CPU of the emulated host may be reported stuck before the host
/// counts as stalled. Its kernel's soft-lockup warnings keep the console busy
/// while it is wedged (QEMU's TCG emulation of nested SVM can leave a vCPU in
/// the nested guest for good), so silence alone does not reveal that.
pub const LOCKUP_GIVE_UP_SECS: u64 = 120;

/// The seconds of a soft-lockup warning line (`watchdog: BUG: soft lockup -
/// CPU#0 stuck for 705s! [...]`), if `line` is one.
pub fn soft_lockup_secs(line: &str) -> Option<u64> {
    let rest = line.split("soft lockup - CPU#").nth(1)?;
    let secs = rest.split("stuck for ").nth(1)?;
    secs.split('s').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn soft_lockups_are_read() {
        let line =
            "[  764.532506] watchdog: BUG: soft lockup - CPU#0 stuck for 705s! [bulkhead-vmm:152]";
        assert_eq!(super::soft_lockup_secs(line), Some(705));
        assert_eq!(
            super::soft_lockup_secs("rcu: INFO: rcu_preempt detected stalls"),
            None
        );
        assert_eq!(super::soft_lockup_secs("stuck for 9s"), None);
    }

    use super::*;

    #[test]
    fn parses_markers() {
        let n = "abc123";
        assert_eq!(
            parse_marker("BULKHEAD-TESTHOST:abc123:ready", n),
            Some(Event::Ready)
        );
        assert_eq!(
            parse_marker("BULKHEAD-TESTHOST:abc123:exit=3", n),
            Some(Event::Exit(3))
        );
        assert_eq!(
            parse_marker("[  1.0] x BULKHEAD-TESTHOST:abc123:exit=0  ", n),
            Some(Event::Exit(0))
        );
        assert_eq!(
            parse_marker("BULKHEAD-TESTHOST:abc123:error=no /dev/kvm", n),
            Some(Event::Error("no /dev/kvm".into()))
        );
    }

    #[test]
    fn ignores_other_nonces_and_garbage() {
        let n = "abc123";
        assert_eq!(parse_marker("BULKHEAD-TESTHOST:other:exit=3", n), None);
        assert_eq!(parse_marker("BULKHEAD-TESTHOST:abc123:exit=x", n), None);
        assert_eq!(parse_marker("BULKHEAD-TESTHOST:abc123:what", n), None);
        assert_eq!(parse_marker("hello", n), None);
    }

    #[test]
    fn marker_round_trips() {
        assert_eq!(
            parse_marker(&marker("n1", "exit=42"), "n1"),
            Some(Event::Exit(42))
        );
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut c = Console::default();
        assert!(c.feed(b"hel").is_empty());
        assert_eq!(c.feed(b"lo\r\nworld\n"), ["hello", "world"]);
        assert_eq!(c.feed(b"part"), Vec::<String>::new());
        assert_eq!(c.tail(), "hello\nworld\npart");
    }

    #[test]
    fn keeps_only_the_tail() {
        let mut c = Console::default();
        for i in 0..100 {
            c.feed(format!("line {i}\n").as_bytes());
        }
        let tail = c.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.starts_with("line 70\n") && tail.ends_with("line 99"));
    }
}
