//! Rate limiting for log lines that a failing backing store could otherwise repeat once per
//! request (thousands per second).
//!
//! Owns: the decision whether a line may be written now, and the count of the ones that were
//! not. The caller passes the time, so tests need no clock. Must not touch: the logger itself,
//! the counters in [`crate::metrics`] (they count every failure, logged or not).

use std::time::{Duration, Instant};

/// At most one line per `interval`; the lines in between are counted, and the next line
/// that may be written says how many there were.
#[derive(Debug, Clone)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// A limit of one line per `interval`; the first line is always allowed.
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// One more event at `now`: `Some(n)` if a line may be written, with `n` the events
    /// suppressed since the previous line; `None` if this one is suppressed (and counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = match self.last {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.interval,
        };
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// The events suppressed since the last allowed line, reset to zero (for a final line
    /// when the reporter goes away).
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = RateLimit::new(Duration::from_secs(1));
        assert_eq!(r.allow(ms(0)), Some(0), "the first event is logged");
        // 99 more within the same second: none logged, all counted.
        for i in 1..100 {
            assert_eq!(r.allow(ms(i * 9)), None, "event at {} ms", i * 9);
        }
        assert_eq!(r.allow(ms(999)), None);
        // The next second: one line that carries the count.
        assert_eq!(r.allow(ms(1000)), Some(100));
        assert_eq!(r.allow(ms(1500)), None);
        assert_eq!(r.take_suppressed(), 1);
        assert_eq!(r.take_suppressed(), 0, "taking resets the count");
        // Quiet for a long time: logged at once, nothing was suppressed meanwhile.
        assert_eq!(r.allow(ms(60_000)), Some(0));
    }

    #[test]
    fn a_clock_going_backwards_suppresses_rather_than_floods() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut r = RateLimit::new(Duration::from_secs(1));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0 - Duration::from_secs(5)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), Some(1));
    }
}
