//! Process-wide counters for `/metrics`: plain atomics bumped where the data is (listeners,
//! the session accounting, the tunnel, the upstream connector), read by the admin listener
//! when it is scraped.
//!
//! Events pay one relaxed atomic add and never take a lock; encoding into the Prometheus text
//! format happens only at scrape time (`admin::prom`). Bytes cost the data path nothing more
//! than before: each session already counted its own bytes, and the per-transport totals are
//! summed from the open sessions plus the closed ones when scraped. Gauges that can be read
//! from the live state (engine streams, tunnel sessions, the memory budget) are not counted
//! here at all: the scrape reads them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::stream::Transport;

/// Every transport, in the order the per-transport counters are kept and printed.
pub const TRANSPORTS: [Transport; 8] = [
    Transport::Rtmp,
    Transport::Rtmps,
    Transport::Rtmpt,
    Transport::Rtmpts,
    Transport::Rtmpe,
    Transport::Rtmpte,
    Transport::Http,
    Transport::Https,
];

/// The position of `t` in [`TRANSPORTS`].
pub fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Rtmp => 0,
        Transport::Rtmps => 1,
        Transport::Rtmpt => 2,
        Transport::Rtmpts => 3,
        Transport::Rtmpe => 4,
        Transport::Rtmpte => 5,
        Transport::Http => 6,
        Transport::Https => 7,
    }
}

/// Why a connection (or tunnel session) was turned away before it became a session.
/// The label values of `rtmpgate_refused_total{reason=...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` reached.
    MaxConnections,
    /// `limits.max_connections_per_ip` reached.
    MaxConnectionsPerIp,
    /// `limits.max_tunnel_sessions` reached.
    MaxTunnelSessions,
    /// Nothing recognisable within `limits.first_bytes_timeout_secs`.
    FirstBytesTimeout,
    /// Neither RTMP, RTMPE, TLS nor HTTP.
    UnknownProtocol,
    /// TLS on a plain listener, plain bytes on a TLS listener, RTMPE inside TLS.
    WrongListener,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
    /// RTMPE handshake while RTMPE is off.
    RtmpeDisabled,
    /// The RTMPE handshake failed or timed out.
    RtmpeHandshake,
    /// RTMPE hellos from one address faster than `limits.rtmpe_handshakes_per_ip_per_sec`.
    RtmpeRateLimit,
    /// A tunnel session sent no RTMP handshake in time.
    HandshakeTimeout,
    /// A missing or malformed PROXY protocol header.
    ProxyProtocol,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::MaxConnections,
        Refusal::MaxConnectionsPerIp,
        Refusal::MaxTunnelSessions,
        Refusal::FirstBytesTimeout,
        Refusal::UnknownProtocol,
        Refusal::WrongListener,
        Refusal::TlsHandshake,
        Refusal::RtmpeDisabled,
        Refusal::RtmpeHandshake,
        Refusal::RtmpeRateLimit,
        Refusal::HandshakeTimeout,
        Refusal::ProxyProtocol,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
            Refusal::MaxTunnelSessions => "max_tunnel_sessions",
            Refusal::FirstBytesTimeout => "first_bytes_timeout",
            Refusal::UnknownProtocol => "unknown_protocol",
            Refusal::WrongListener => "wrong_listener",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::RtmpeDisabled => "rtmpe_disabled",
            Refusal::RtmpeHandshake => "rtmpe_handshake",
            Refusal::RtmpeRateLimit => "rtmpe_rate_limit",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::ProxyProtocol => "proxy_protocol",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one transport, alone on their cache lines.
#[repr(align(128))]
pub struct PerTransport {
    pub sessions_open: AtomicI64,
    pub sessions_total: AtomicU64,
    /// Bytes of the sessions that have closed (open ones keep their own counts).
    pub closed_received: AtomicU64,
    pub closed_sent: AtomicU64,
    /// The largest totals reported so far (see [`PerTransport::totals`]).
    reported_received: AtomicU64,
    reported_sent: AtomicU64,
}

impl PerTransport {
    const fn new() -> Self {
        PerTransport {
            sessions_open: AtomicI64::new(0),
            sessions_total: AtomicU64::new(0),
            closed_received: AtomicU64::new(0),
            closed_sent: AtomicU64::new(0),
            reported_received: AtomicU64::new(0),
            reported_sent: AtomicU64::new(0),
        }
    }

    /// Bytes received and sent over this transport in total, given the open sessions'
    /// counts: the closed sessions' plus those, never below a total reported before (a
    /// session moving from open to closed while this is computed could otherwise make it
    /// dip, which Prometheus would take for a counter reset).
    pub fn totals(&self, open_received: u64, open_sent: u64) -> (u64, u64) {
        let rx = self
            .closed_received
            .load(Relaxed)
            .saturating_add(open_received);
        let tx = self.closed_sent.load(Relaxed).saturating_add(open_sent);
        (
            self.reported_received.fetch_max(rx, Relaxed).max(rx),
            self.reported_sent.fetch_max(tx, Relaxed).max(tx),
        )
    }
}

impl Default for PerTransport {
    fn default() -> Self {
        PerTransport::new()
    }
}

/// Per-listener counters (the same fields as per transport), one entry per listener label
/// ever configured: a handful, chosen by the operator, never by a peer.
static LISTENERS: std::sync::Mutex<Vec<(std::sync::Arc<str>, std::sync::Arc<PerTransport>)>> =
    std::sync::Mutex::new(Vec::new());

/// The counters of the listener labelled `name` (created on first use).
pub fn listener(name: &std::sync::Arc<str>) -> std::sync::Arc<PerTransport> {
    let mut all = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
        return c.clone();
    }
    let c = std::sync::Arc::new(PerTransport::new());
    all.push((name.clone(), c.clone()));
    c
}

/// Every listener's counters, in the order they were first used.
pub fn listeners() -> Vec<(std::sync::Arc<str>, std::sync::Arc<PerTransport>)> {
    LISTENERS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Upper bounds (seconds) of the upstream connect latency histogram: loopback to a slow WAN.
pub const CONNECT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A fixed-bucket histogram of durations; each observation is two atomic adds and a search
/// of twelve bounds.
pub struct Histogram {
    /// Observations per bucket (not cumulative; the last slot is +Inf).
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; CONNECT_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = CONNECT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(CONNECT_BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (sum in seconds, count, cumulative (upper bound, count) for each finite bucket).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut acc = 0u64;
        let mut out = Vec::with_capacity(CONNECT_BUCKETS.len() + 1);
        for (bound, n) in CONNECT_BUCKETS.iter().zip(&self.buckets) {
            acc = acc.saturating_add(n.load(Relaxed));
            out.push((*bound, acc));
        }
        let count = self.count.load(Relaxed);
        // +Inf holds every observation.
        out.push((f64::INFINITY, count));
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        (sum, count, out)
    }
}

/// The kind of key of a certificate chain served (`rtmpgate_tls_certificates_chosen_total`'s
/// `key` label): with an RSA and an ECDSA chain for the same names, the share of `rsa` says
/// how many clients still cannot take ECDSA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainKey {
    Ecdsa = 0,
    Rsa = 1,
    /// Ed25519 or a kind rustls may add.
    Other = 2,
}

impl ChainKey {
    pub const ALL: [ChainKey; 3] = [ChainKey::Ecdsa, ChainKey::Rsa, ChainKey::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            ChainKey::Ecdsa => "ecdsa",
            ChainKey::Rsa => "rsa",
            ChainKey::Other => "other",
        }
    }
}

/// The process's counters; [`global()`] is the one the gateway uses.
pub struct Metrics {
    pub connections_accepted: AtomicU64,
    pub connections_open: AtomicI64,
    transports: [PerTransport; TRANSPORTS.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Of `tls_handshakes`, those resumed with a session ticket (no certificate, no signature).
    pub tls_resumed: AtomicU64,
    /// ClientHellos answered, by the kind of key of the chain chosen ([`ChainKey`]).
    tls_chains: [AtomicU64; ChainKey::ALL.len()],
    /// TLS handshake steps that signed on the blocking pool instead of the executor.
    pub tls_steps_offloaded: AtomicU64,
    pub rtmpe_handshakes: AtomicU64,
    pub rtmpe_failures: AtomicU64,
    /// Time spent in the RTMPE Diffie-Hellman work (on the blocking pool: CPU time).
    pub rtmpe_cpu_nanos: AtomicU64,
    pub rtmpt_opened: AtomicU64,
    pub rtmpt_reaped: AtomicU64,
    pub rtmpt_not_found: AtomicU64,
    pub upstream_attempts: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub upstream_connect: Histogram,
    /// 1 if the last upstream connect succeeded (or none was tried), 0 if it failed.
    pub upstream_up: AtomicU64,
    /// Times a player fell behind and skipped to the next keyframe.
    pub player_skips: AtomicU64,
    /// Sessions closed through `DELETE /api/v1/sessions/{id}`.
    pub sessions_kicked: AtomicU64,
}

static GLOBAL: Metrics = Metrics::new();

/// The process's counters.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// Counts a refusal (one atomic add).
pub fn refused(why: Refusal) {
    global().refuse(why);
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            connections_accepted: AtomicU64::new(0),
            connections_open: AtomicI64::new(0),
            transports: [const { PerTransport::new() }; TRANSPORTS.len()],
            refused: [const { AtomicU64::new(0) }; Refusal::ALL.len()],
            tls_handshakes: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            tls_resumed: AtomicU64::new(0),
            tls_chains: [const { AtomicU64::new(0) }; ChainKey::ALL.len()],
            tls_steps_offloaded: AtomicU64::new(0),
            rtmpe_handshakes: AtomicU64::new(0),
            rtmpe_failures: AtomicU64::new(0),
            rtmpe_cpu_nanos: AtomicU64::new(0),
            rtmpt_opened: AtomicU64::new(0),
            rtmpt_reaped: AtomicU64::new(0),
            rtmpt_not_found: AtomicU64::new(0),
            upstream_attempts: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            upstream_connect: Histogram::new(),
            upstream_up: AtomicU64::new(1),
            player_skips: AtomicU64::new(0),
            sessions_kicked: AtomicU64::new(0),
        }
    }

    pub fn transport(&self, t: Transport) -> &PerTransport {
        // transport_index covers every variant and the array has one slot per variant.
        &self.transports[transport_index(t)]
    }

    pub fn refuse(&self, why: Refusal) {
        if let Some(c) = self.refused.get(why.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused.get(why.index()).map_or(0, |c| c.load(Relaxed))
    }

    /// A connection was accepted; the guard keeps it in `connections_open` until dropped.
    pub fn connection(&'static self) -> ConnectionGuard {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
        ConnectionGuard(self)
    }

    /// The outcome of one upstream connect (TCP, and TLS for rtmps://).
    pub fn upstream_connect(&self, took: Duration, ok: bool) {
        self.upstream_attempts.fetch_add(1, Relaxed);
        if ok {
            self.upstream_connect.observe(took);
        } else {
            self.upstream_failures.fetch_add(1, Relaxed);
        }
        self.upstream_up.store(u64::from(ok), Relaxed);
    }

    /// One TLS handshake on a client listener finished (or failed).
    pub fn tls_handshake(&self, ok: bool) {
        if ok {
            self.tls_handshakes.fetch_add(1, Relaxed);
        } else {
            self.tls_failures.fetch_add(1, Relaxed);
            self.refuse(Refusal::TlsHandshake);
        }
    }

    /// Of the TLS handshakes that finished, one was resumed with a ticket.
    pub fn tls_resumed(&self) {
        self.tls_resumed.fetch_add(1, Relaxed);
    }

    /// A ClientHello was answered with a chain whose key is of this kind.
    pub fn tls_chain_chosen(&self, key: ChainKey) {
        self.tls_chains[key as usize].fetch_add(1, Relaxed);
    }

    /// ClientHellos answered with a chain of this kind so far.
    pub fn tls_chains_chosen(&self, key: ChainKey) -> u64 {
        self.tls_chains[key as usize].load(Relaxed)
    }

    /// A TLS handshake step ran on the blocking pool.
    pub fn tls_step_offloaded(&self) {
        self.tls_steps_offloaded.fetch_add(1, Relaxed);
    }

    /// One RTMPE handshake finished (or failed).
    pub fn rtmpe_handshake(&self, ok: bool) {
        if ok {
            self.rtmpe_handshakes.fetch_add(1, Relaxed);
        } else {
            self.rtmpe_failures.fetch_add(1, Relaxed);
            self.refuse(Refusal::RtmpeHandshake);
        }
    }

    pub fn player_skipped(&self) {
        self.player_skips.fetch_add(1, Relaxed);
    }

    pub fn rtmpe_cpu(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.rtmpe_cpu_nanos.fetch_add(nanos, Relaxed);
    }
}

/// Holds one accepted connection in `rtmpgate_connections_open`.
pub struct ConnectionGuard(&'static Metrics);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0033).abs() < 1e-6, "{sum}");
        assert_eq!(buckets.first(), Some(&(0.0005, 1)));
        assert_eq!(buckets.iter().find(|b| b.0 == 0.005).map(|b| b.1), Some(2));
        assert_eq!(buckets.iter().find(|b| b.0 == 5.0).map(|b| b.1), Some(2));
        assert_eq!(buckets.last().map(|b| b.1), Some(3));
    }

    #[test]
    fn byte_totals_never_dip() {
        let p = PerTransport::new();
        assert_eq!(p.totals(10, 5), (10, 5));
        // The session left the table but is not in the closed totals yet.
        assert_eq!(p.totals(0, 0), (10, 5));
        p.closed_received.fetch_add(10, Relaxed);
        p.closed_sent.fetch_add(5, Relaxed);
        assert_eq!(p.totals(3, 4), (13, 9));
    }

    #[test]
    fn refusal_labels_are_distinct_and_indexed_in_order() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut names: Vec<_> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Refusal::ALL.len());
    }
}
