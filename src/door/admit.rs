//! Admission: connections and tunnel sessions open at once, in total and per client address,
//! and the throttle that keeps refusal lines from becoming a flood of their own.
//!
//! A raw connection and an RTMPT session are both "one client" here: a session counts
//! against its opening client's address (or the PROXY-protocol address) exactly like a
//! connection, so pipelining `/open` requests over one keep-alive connection cannot hold
//! more than `max_connections_per_ip` of them. IPv6 addresses are grouped by their
//! `ipv6_prefix_len` prefix (a /64 is one subscriber's network; counting each of its 2^64
//! addresses apart would make the per-address limit meaningless).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::limits::Limits;
use crate::net::addr::group;
pub use crate::throttle::LogThrottle;

/// Connections (and tunnel sessions) open now, in total and per address group.
pub struct ConnLimiter {
    total: AtomicUsize,
    per_ip: DashMap<IpAddr, usize>,
    /// Reloadable: a reload changes them for the next admissions.
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    v6_prefix: u8,
    /// One refusal line per second at most.
    pub refusals: LogThrottle,
    /// Per-address lines about closed connections.
    pub lines: PeerLines,
}

/// Why a client was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_connections` reached.
    Total,
    /// `limits.max_connections_per_ip` reached for this address group.
    PerAddress,
}

impl Refused {
    /// What was exceeded, for a log line.
    pub fn describe(self, limits: &Limits) -> String {
        match self {
            Refused::Total => format!(
                "{} connections and tunnel sessions open (limits.max_connections)",
                limits.max_connections
            ),
            Refused::PerAddress => format!(
                "{} connections and tunnel sessions from this address already open \
                 (limits.max_connections_per_ip)",
                limits.max_connections_per_ip
            ),
        }
    }
}

/// Holds one place in the total count; released on drop.
pub struct TotalGuard(Arc<ConnLimiter>);

impl Drop for TotalGuard {
    fn drop(&mut self) {
        self.0.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one place in an address group's count; released on drop.
pub struct IpGuard(Arc<ConnLimiter>, IpAddr);

impl Drop for IpGuard {
    fn drop(&mut self) {
        self.0.per_ip.remove_if_mut(&self.1, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// Both places: what a tunnel session holds for its whole life.
pub struct Admission {
    _total: TotalGuard,
    _ip: IpGuard,
}

impl ConnLimiter {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(ConnLimiter {
            total: AtomicUsize::new(0),
            per_ip: DashMap::new(),
            max_total: AtomicUsize::new(limits.max_connections),
            max_per_ip: AtomicUsize::new(limits.max_connections_per_ip),
            v6_prefix: limits.ipv6_prefix_len.min(128),
            refusals: LogThrottle::default(),
            lines: PeerLines::new(limits.ipv6_prefix_len),
        })
    }

    /// New limits for later admissions (a reload); places already held stay held, so a
    /// lowered limit refuses new clients until enough have gone.
    pub fn set_limits(&self, limits: &Limits) {
        self.max_total
            .store(limits.max_connections, Ordering::Relaxed);
        self.max_per_ip
            .store(limits.max_connections_per_ip, Ordering::Relaxed);
    }

    /// Takes a place in the total count, or None when it is full.
    pub fn admit_total(self: &Arc<Self>) -> Option<TotalGuard> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        let guard = TotalGuard(self.clone());
        (before < self.max_total.load(Ordering::Relaxed)).then_some(guard)
    }

    /// Takes a place in `ip`'s address group, or None when it is full.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        let key = group(ip, self.v6_prefix);
        let mut n = self.per_ip.entry(key).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        drop(n);
        Some(IpGuard(self.clone(), key))
    }

    /// Both places at once (a tunnel session).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refused> {
        let total = self.admit_total().ok_or(Refused::Total)?;
        let ip = self.admit_ip(ip).ok_or(Refused::PerAddress)?;
        Ok(Admission {
            _total: total,
            _ip: ip,
        })
    }

    /// Places held by `ip`'s address group now.
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.per_ip
            .get(&group(ip, self.v6_prefix))
            .map_or(0, |n| *n)
    }

    /// Places held in total now.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// Address-reason pairs remembered by [`PeerLines`]; past it, pairs not seen this second
/// (which would be allowed a line anyway) are forgotten.
const MAX_LINE_KEYS: usize = 16_384;

/// One line per second per address group and reason for connections the door closes
/// (unknown protocol, silent client, failed TLS or RTMPE handshake...): a connection costs
/// an attacker a TCP handshake and no payload, so one line for each would let a connection
/// flood write the log at the accept rate. The next line says how many were skipped.
pub struct PeerLines {
    epoch: Instant,
    v6_prefix: u8,
    /// (address group, reason) -> (second of the last line, lines skipped since).
    seen: DashMap<(IpAddr, &'static str), (u64, u64)>,
}

impl PeerLines {
    pub fn new(v6_prefix: u8) -> Self {
        PeerLines {
            epoch: Instant::now(),
            v6_prefix,
            seen: DashMap::new(),
        }
    }

    /// Some(suffix) when a line about `ip` for `reason` may be written now.
    pub fn should_log(&self, ip: IpAddr, reason: &'static str) -> Option<String> {
        let now = self.epoch.elapsed().as_secs().saturating_add(1);
        if self.seen.len() >= MAX_LINE_KEYS {
            self.seen.retain(|_, (last, _)| *last == now);
        }
        let mut e = self
            .seen
            .entry((group(ip, self.v6_prefix), reason))
            .or_insert((0, 0));
        let (last, skipped) = *e;
        if now > last {
            *e = (now, 0);
            return Some(if skipped > 0 {
                format!(" ({skipped} more like it from this address in the last seconds)")
            } else {
                String::new()
            });
        }
        e.1 = skipped.saturating_add(1);
        None
    }

    /// Writes `line()` at info level when [`PeerLines::should_log`] allows it.
    pub fn info(&self, ip: IpAddr, reason: &'static str, line: impl FnOnce() -> String) {
        if let Some(also) = self.should_log(ip, reason) {
            tracing::info!("{}{also}", line());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn peer_lines_are_one_a_second_per_address_and_reason() {
        let l = PeerLines::new(64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(l.should_log(a, "unknown").as_deref(), Some(""));
        assert!(l.should_log(a, "unknown").is_none());
        assert!(l.should_log(a, "unknown").is_none());
        assert!(l.should_log(a, "silent").is_some(), "another reason");
        assert!(l.should_log(b, "unknown").is_some(), "another address");
        // A second later the line carries the count.
        l.seen.alter(&(a, "unknown"), |_, (_, n)| (0, n));
        let next = l.should_log(a, "unknown").unwrap();
        assert!(next.contains("2 more"), "{next}");
    }

    #[test]
    fn one_64_shares_one_per_address_count() {
        let limits = Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let l = ConnLimiter::new(&limits);
        let a = l.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _b = l.admit("2001:db8::2".parse().unwrap()).unwrap();
        assert_eq!(
            l.admit("2001:db8::3".parse().unwrap()).err(),
            Some(Refused::PerAddress)
        );
        assert!(l.admit("2001:db8:0:1::3".parse().unwrap()).is_ok());
        drop(a);
        assert!(l.admit("2001:db8::3".parse().unwrap()).is_ok());
        assert_eq!(l.held(), 1, "only _b is still held");
    }
}
