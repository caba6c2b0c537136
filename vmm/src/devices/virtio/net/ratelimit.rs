//! Warnings the guest can trigger at will (a bad chain per frame, thousands a
//! second), limited so that a hostile guest cannot flood the VMM's log.

use std::fmt;
use std::time::{Duration, Instant};

/// Lets one warning through per interval and counts the ones it holds back,
/// so the next one says how many were left out.
pub struct WarnLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// At most one warning per `interval`.
    pub fn new(interval: Duration) -> Self {
        WarnLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether a warning at `now` may be logged; if so, how many were held
    /// back since the last one.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Logs `message` as a virtio-net warning, unless one was logged within
    /// the interval.
    pub fn warn(&mut self, message: fmt::Arguments<'_>) {
        if let Some(suppressed) = self.check(Instant::now()) {
            tracing::warn!(suppressed, "virtio-net: {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_with_the_count_left_out() {
        let mut limiter = WarnLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.check(t0), Some(0));
        for ms in 1..=5 {
            assert_eq!(limiter.check(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limiter.check(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(limiter.check(t0 + Duration::from_millis(1500)), None);
    }
}
