//! Throttles for what peers can make us do per byte: log lines and messages per second.
//!
//! A peer must never turn its bytes into our log lines one for one (a flood of refusals, a
//! stream of malformed messages), so every line a peer can cause goes through a
//! [`LogThrottle`]: at most one line per second, the next one saying how many were skipped.
//! [`RateLimit`] is a token bucket for messages per connection: a peer past it is paused
//! (its bytes wait in the kernel), not served faster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Seconds since the first throttle was consulted, plus one (so second 0 is never mistaken
/// for "just logged"). One process-wide epoch keeps each throttle at two words.
fn now_secs() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH
        .get_or_init(Instant::now)
        .elapsed()
        .as_secs()
        .saturating_add(1)
}

/// At most one log line per second; shared freely (atomics, no lock).
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// [`now_secs`] when the last line was written.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub const fn new() -> Self {
        LogThrottle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(skipped)` when a line may be written now (`skipped` lines were held back since
    /// the last one); `None` when this one must be skipped (it is counted).
    pub fn allow(&self) -> Option<u64> {
        let now = now_secs();
        let last = self.last.load(Ordering::Relaxed);
        if now > last
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Like [`LogThrottle::allow`], as a suffix for the line: "" or " (N more WHAT in the
    /// last seconds)".
    pub fn should_log(&self, what: &str) -> Option<String> {
        self.allow().map(|skipped| {
            if skipped > 0 {
                format!(" ({skipped} more {what} in the last seconds)")
            } else {
                String::new()
            }
        })
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Not shared (one per
/// connection), so plain fields.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: u32,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// `rate` per second with one second's worth as the burst; 0 turns the limit off.
    pub fn per_second(rate: u32, now: Instant) -> Self {
        let burst = f64::from(rate);
        RateLimit {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Refills for the time since the last call.
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * f64::from(self.rate)).min(self.burst);
    }

    /// Ok when a token is there (take it with [`RateLimit::spend`] once it is used), else
    /// how long until one is.
    pub fn ready(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / f64::from(self.rate);
        Err(Duration::from_secs_f64(wait.max(0.001)))
    }

    /// Uses one token (the bucket may go below zero, to be paid back before the next).
    pub fn spend(&mut self) {
        if self.rate > 0 {
            self.tokens -= 1.0;
        }
    }

    /// [`RateLimit::ready`], then [`RateLimit::spend`].
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.ready(now)?;
        self.spend();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn one_line_then_silence_with_a_count() {
        let t = LogThrottle::new();
        assert_eq!(t.should_log("refused").as_deref(), Some(""));
        assert!(t.should_log("refused").is_none());
        assert!(t.allow().is_none());
        // A second later the next line carries the count.
        t.last.store(0, Ordering::Relaxed);
        assert_eq!(
            t.should_log("refused").as_deref(),
            Some(" (2 more refused in the last seconds)")
        );
    }

    #[test]
    fn bucket_gives_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::per_second(100, t0);
        for _ in 0..100 {
            assert!(r.take(t0).is_ok());
        }
        let wait = r.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(11), "{wait:?}");
        // 50 ms later: 5 more.
        let t1 = t0 + Duration::from_millis(50);
        let got = (0..20).filter(|_| r.take(t1).is_ok()).count();
        assert!((4..=5).contains(&got), "{got}");
        // Off.
        let mut off = RateLimit::per_second(0, t0);
        assert!((0..10_000).all(|_| off.take(t0).is_ok()));
    }
}
