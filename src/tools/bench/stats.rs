//! rtmpgate-bench's figures: counters shared by every task, the latency histogram and its
//! percentiles, and the helpers that turn them into rates and JSON numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Latency histogram: 10 us buckets to 100 ms, then 1 ms buckets to 10 s, then overflow.
pub struct Histogram {
    pub buckets: Vec<AtomicU64>,
}

pub const FINE_US: u64 = 10;
pub const FINE_BUCKETS: u64 = 10_000;
pub const COARSE_US: u64 = 1_000;
pub const COARSE_BUCKETS: u64 = 9_900;

impl Histogram {
    pub fn new() -> Self {
        let n = (FINE_BUCKETS + COARSE_BUCKETS + 1) as usize;
        Histogram {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn index(us: u64) -> usize {
        let fine_end = FINE_US * FINE_BUCKETS;
        let i = if us < fine_end {
            us / FINE_US
        } else {
            (FINE_BUCKETS + (us - fine_end) / COARSE_US).min(FINE_BUCKETS + COARSE_BUCKETS)
        };
        i as usize
    }
    pub fn upper_us(i: usize) -> u64 {
        let i = i as u64;
        if i < FINE_BUCKETS {
            (i + 1) * FINE_US
        } else {
            FINE_US * FINE_BUCKETS + (i - FINE_BUCKETS + 1) * COARSE_US
        }
    }
    pub fn record(&self, us: u64) {
        if let Some(b) = self.buckets.get(Self::index(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// Percentiles (ms) of a histogram snapshot, or of the difference of two.
pub fn percentiles(now: &[u64], before: Option<&[u64]>, qs: &[f64]) -> (u64, Vec<f64>) {
    let counts: Vec<u64> = match before {
        Some(b) => now
            .iter()
            .zip(b)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        None => now.to_vec(),
    };
    let total: u64 = counts.iter().sum();
    let mut out = Vec::with_capacity(qs.len());
    for &q in qs {
        if total == 0 {
            out.push(f64::NAN);
            continue;
        }
        let want = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut acc = 0;
        let mut at = counts.len().saturating_sub(1);
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                at = i;
                break;
            }
        }
        out.push(Histogram::upper_us(at) as f64 / 1000.0);
    }
    (total, out)
}

#[derive(Default)]
pub struct Counters {
    pub bytes_out: AtomicU64,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_lost: AtomicU64,
    pub frames_corrupted: AtomicU64,
    pub frames_reordered: AtomicU64,
    pub publishers_live: AtomicU64,
    pub players_live: AtomicU64,
    pub players_started: AtomicU64,
    pub idle_connected: AtomicU64,
    pub connect_errors: AtomicU64,
    pub disconnects: AtomicU64,
}

/// One player's media bytes read since its play started, written only by that player.
/// Its own cache line: a player's store after each message never contends with another
/// player's, so exact counts cost the players no more than a plain store.
#[repr(align(64))]
#[derive(Default)]
pub struct PlayerBytes(pub AtomicU64);

pub struct Stats {
    pub c: Counters,
    /// Per player (by index), so a snapshot sums what every player has read at that instant:
    /// a shared counter fed in steps (a fetch_add per read would make every player contend
    /// for one cache line) leaves up to a step per player out of each snapshot, which at
    /// 64 KiB steps was a few per cent of the scale section's 7.5 s window at 1.6 Mb/s.
    pub players_bytes_in: Vec<PlayerBytes>,
    pub latency: Histogram,
    /// Per player: connect start to first frame, and play command to first frame (ms).
    pub ttff: Mutex<Vec<(f64, f64)>>,
    pub errors: Mutex<Vec<String>>,
}

impl Stats {
    /// Media bytes every player has read so far.
    pub fn bytes_in(&self) -> u64 {
        self.players_bytes_in
            .iter()
            .map(|b| b.0.load(Ordering::Relaxed))
            .sum()
    }

    pub fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        let line = format!("{what}: {e}");
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 8 && !v.contains(&line) {
                eprintln!("error: {line}");
                v.push(line);
            }
        }
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Counter values at one instant, for rates.
#[derive(Clone, Copy, Default)]
pub struct Snap {
    pub at: f64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
}

pub fn snap(stats: &Stats, at: f64) -> Snap {
    let c = &stats.c;
    Snap {
        at,
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
        bytes_in: stats.bytes_in(),
        frames_sent: c.frames_sent.load(Ordering::Relaxed),
        frames_received: c.frames_received.load(Ordering::Relaxed),
    }
}

pub fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

pub fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

pub fn fmt_ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let h = Histogram::new();
        for us in 1..=1000 {
            h.record(us * 100);
        }
        let (n, p) = percentiles(&h.snapshot(), None, &[0.5, 0.99]);
        assert_eq!(n, 1000);
        assert!((p[0] - 50.0).abs() < 0.1, "{p:?}");
        assert!((p[1] - 99.0).abs() < 0.1, "{p:?}");
        h.record(1_000_000_000);
        assert_eq!(Histogram::index(1_000_000_000), 19_900);
    }
}
