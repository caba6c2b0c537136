//! Progress bars on stderr (one per layer, in bytes) when asked for; nothing at
//! all otherwise, so scripts and tests see clean output.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

const TEMPLATE: &str =
    "{prefix:.bold} {msg:<11} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec}";

/// The bars of one pull or load; cheap to clone, disabled when not wanted.
#[derive(Clone, Default)]
pub(crate) struct Progress {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

/// One bar, or nothing.
#[derive(Clone)]
pub(crate) struct Bar(Option<ProgressBar>);

impl Progress {
    /// Bars on stderr if `enabled`, else a no-op.
    pub(crate) fn new(enabled: bool) -> Progress {
        Progress {
            inner: enabled.then(|| {
                Arc::new(Inner {
                    multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                    bars: Mutex::default(),
                })
            }),
        }
    }

    /// The bar of blob `digest` (made on first use), reset to show `message`
    /// over `total` bytes.
    pub(crate) fn bar(&self, digest: &str, message: &'static str, total: Option<u64>) -> Bar {
        let Some(inner) = &self.inner else {
            return Bar(None);
        };
        let mut bars = inner.bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bars
            .entry(digest.to_owned())
            .or_insert_with(|| {
                let bar = inner.multi.add(ProgressBar::new(0));
                if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
                    bar.set_style(style.progress_chars("=> "));
                }
                let short = digest.strip_prefix("sha256:").unwrap_or(digest);
                bar.set_prefix(short.chars().take(12).collect::<String>());
                bar
            })
            .clone();
        bar.reset();
        bar.set_length(total.unwrap_or(0));
        bar.set_message(message);
        Bar(Some(bar))
    }
}

impl Bar {
    /// A bar that shows nothing (for blobs too small to report).
    pub(crate) fn none() -> Bar {
        Bar(None)
    }

    /// Set the total once it is known.
    pub(crate) fn set_length(&self, total: u64) {
        if let Some(bar) = &self.0 {
            bar.set_length(total);
        }
    }

    /// `n` more bytes done.
    pub(crate) fn inc(&self, n: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(n);
        }
    }

    /// Done, showing `message`.
    pub(crate) fn finish(&self, message: &'static str) {
        if let Some(bar) = &self.0 {
            bar.set_position(bar.length().unwrap_or(0));
            bar.abandon_with_message(message);
        }
    }

    /// `reader`, advancing the bar as it is read.
    pub(crate) fn reader<R: Read>(&self, reader: R) -> BarReader<R> {
        BarReader {
            inner: reader,
            bar: self.clone(),
        }
    }
}

/// A reader that advances a [`Bar`].
pub(crate) struct BarReader<R> {
    inner: R,
    bar: Bar,
}

impl<R: Read> Read for BarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
