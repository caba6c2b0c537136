//! Where the serial console's bytes go: to the chosen destination, into a tail
//! of recent lines (for error reports), and past two scanners (the ready marker
//! and the kernel's panic message).
//!
//! Everything the guest writes is untrusted: lines are capped in length and the
//! tail in line count, so a chatty or hostile guest cannot grow VMM memory.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use crate::events::VmEvent;

/// Lines kept for error reports.
pub const TAIL_LINES: usize = 20;
/// Longest line kept, in bytes; the rest of a longer line is dropped.
const MAX_LINE_BYTES: usize = 512;
/// What Linux prints when it panics.
const PANIC_MESSAGE: &[u8] = b"Kernel panic - not syncing";

/// The last [`TAIL_LINES`] lines of console output.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl ConsoleTail {
    /// Adds console bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => self.end_line(),
                b'\r' => {}
                _ if self.partial.len() < MAX_LINE_BYTES => self.partial.push(b),
                _ => {}
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The kept lines, plus the unfinished last line if any, joined by newlines.
    pub fn text(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        let skip = lines.len().saturating_sub(TAIL_LINES);
        lines[skip..].join("\n")
    }
}

/// The console tail, shared between the serial device and whoever reports errors.
pub type SharedTail = Arc<Mutex<ConsoleTail>>;

/// Reads the tail of a [`SharedTail`], even if a writer panicked while holding it.
pub fn tail_text(tail: &SharedTail) -> String {
    tail.lock().unwrap_or_else(PoisonError::into_inner).text()
}

/// Finds a byte string in a stream that arrives in pieces.
#[derive(Debug)]
pub struct StreamMatcher {
    needle: Vec<u8>,
    window: Vec<u8>,
    found: bool,
}

impl StreamMatcher {
    /// A matcher for `needle` (non-empty).
    pub fn new(needle: &[u8]) -> Self {
        StreamMatcher {
            needle: needle.to_vec(),
            window: Vec::new(),
            found: false,
        }
    }

    /// Feeds bytes; true the first time the needle has been seen.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        if self.found || self.needle.is_empty() {
            return false;
        }
        for &b in bytes {
            self.window.push(b);
            if self.window.len() > self.needle.len() {
                self.window.remove(0);
            }
            if self.window == self.needle {
                self.found = true;
                return true;
            }
        }
        false
    }

    /// Whether the needle has been seen.
    pub fn found(&self) -> bool {
        self.found
    }
}

/// The serial device's output: implements `Write` for vm-superio's `Serial`.
pub struct ConsoleSink {
    dest: Option<Box<dyn Write + Send>>,
    tail: SharedTail,
    ready: Option<StreamMatcher>,
    panic: StreamMatcher,
    panicked: Arc<std::sync::atomic::AtomicBool>,
    /// A template boot's snapshot marker, and the flag that pauses the vCPUs.
    snapshot: Option<(StreamMatcher, Arc<std::sync::atomic::AtomicBool>)>,
    events: Sender<VmEvent>,
}

impl ConsoleSink {
    /// A sink writing to `dest` (if any) that reports the ready marker on `events`.
    pub fn new(
        dest: Option<Box<dyn Write + Send>>,
        ready_marker: Option<&str>,
        events: Sender<VmEvent>,
    ) -> Self {
        ConsoleSink {
            dest,
            tail: SharedTail::default(),
            ready: ready_marker.map(|m| StreamMatcher::new(m.as_bytes())),
            panic: StreamMatcher::new(PANIC_MESSAGE),
            panicked: Arc::default(),
            snapshot: None,
            events,
        }
    }

    /// Makes the sink raise `pause` (and report it) when the guest prints
    /// `marker`: the vCPU that wrote the last byte then stops before it runs
    /// another instruction.
    pub fn pause_on(mut self, marker: &str, pause: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.snapshot = Some((StreamMatcher::new(marker.as_bytes()), pause));
        self
    }

    /// The shared tail, for error reports.
    pub fn tail(&self) -> SharedTail {
        Arc::clone(&self.tail)
    }

    /// A flag raised once the guest kernel has printed its panic message.
    pub fn panicked(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.panicked)
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(dest) = self.dest.as_mut() {
            // A console destination that fails (closed pipe, full disk) must not
            // stop the guest: drop the destination and keep going.
            if dest.write_all(buf).and_then(|()| dest.flush()).is_err() {
                tracing::warn!("console destination failed; discarding further console output");
                self.dest = None;
            }
        }
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
        if self.ready.as_mut().is_some_and(|m| m.feed(buf)) {
            let _ = self.events.send(VmEvent::Ready);
        }
        if self.panic.feed(buf) {
            self.panicked
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some((marker, pause)) = self.snapshot.as_mut() {
            if marker.feed(buf) {
                pause.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = self.events.send(VmEvent::SnapshotRequested);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn tail_keeps_the_last_lines_only() {
        let mut t = ConsoleTail::default();
        for i in 0..50 {
            t.push(format!("line {i}\r\n").as_bytes());
        }
        t.push(b"partial");
        let text = t.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(*lines.last().unwrap(), "partial");
        assert_eq!(lines[0], "line 31");
    }

    #[test]
    fn tail_caps_line_length() {
        let mut t = ConsoleTail::default();
        t.push(&vec![b'x'; 100_000]);
        t.push(b"\n");
        assert_eq!(t.text().len(), MAX_LINE_BYTES);
    }

    #[test]
    fn marker_is_found_across_writes_once() {
        let mut m = StreamMatcher::new(b"READY");
        assert!(!m.feed(b"xxRE"));
        assert!(m.feed(b"ADYyy"));
        assert!(!m.feed(b"READY"));
        assert!(m.found());
    }

    #[test]
    fn snapshot_marker_raises_the_pause_flag_once() {
        let (tx, rx) = channel();
        let pause = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut sink = ConsoleSink::new(None, None, tx).pause_on("SAVE ME", Arc::clone(&pause));
        sink.write_all(b"SAVE").unwrap();
        assert!(!pause.load(std::sync::atomic::Ordering::SeqCst));
        sink.write_all(b" ME\n").unwrap();
        assert!(pause.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(rx.try_recv(), Ok(VmEvent::SnapshotRequested)));
        sink.write_all(b"SAVE ME").unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn sink_reports_ready_and_panic() {
        let (tx, rx) = channel();
        let mut sink = ConsoleSink::new(None, Some("UP"), tx);
        let panicked = sink.panicked();
        sink.write_all(b"booting\nU").unwrap();
        assert!(rx.try_recv().is_err());
        sink.write_all(b"P\nKernel panic - not syncing: boom\n")
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Ready)));
        assert!(panicked.load(std::sync::atomic::Ordering::SeqCst));
        assert!(tail_text(&sink.tail()).contains("boom"));
    }
}
