//! The merge window's clock: players that batch their writes (`write_batch`) drain their ring
//! and write on ticks shared by the whole process, so one timer-wheel slot wakes them all at
//! once and the worker runs them back to back (no park and wake-up per player per frame).
//!
//! A tick is a multiple of the window since a process-wide origin. A frame waits at most one
//! window for its tick (on average half of one), which is the latency the window adds.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The first tick of a `window`-long period strictly after `now` (`now` itself when the
/// window is zero, or when the clock would overflow).
pub fn next_after(now: Instant, window: Duration) -> Instant {
    let w = window.as_nanos();
    if w == 0 {
        return now;
    }
    let origin = origin();
    let since = now.saturating_duration_since(origin).as_nanos();
    let ticks = since / w + 1;
    let Some(at) = ticks.checked_mul(w).and_then(|n| u64::try_from(n).ok()) else {
        return now;
    };
    origin.checked_add(Duration::from_nanos(at)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_shared_and_within_one_window() {
        let w = Duration::from_millis(40);
        let _ = origin();
        let now = Instant::now();
        let t = next_after(now, w);
        assert!(t > now && t <= now + w);
        // A later instant before the same tick gets the same tick: players wake together.
        let later = now + (t - now) / 2;
        assert_eq!(next_after(later, w), t);
        // At the tick itself, the next one.
        assert_eq!(next_after(t, w), t + w);
        assert_eq!(next_after(now, Duration::ZERO), now);
    }
}
