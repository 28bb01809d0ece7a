//! Edge mode (`[upstream] mode = "edge"`): players are served by this node's engine, and
//! the players of one stream share ONE pull from the origin; publishers are forwarded to it.
//!
//! The first player of a key starts a pull ([`pull`]): an RTMP client connection to the
//! origin (connect, createStream, play) whose media is published into the local hub, so the
//! hub's ring and GOP cache fan it out. The pull ends `idle` after the key's last player has
//! left, and reconnects with exponential backoff when the origin drops it; the players stay
//! attached and resume at the next keyframe. A publisher's media goes to the origin over a
//! connection of its own ([`push`]), through a bounded queue.
//!
//! With several origins each stream goes to one chosen by rendezvous hashing of
//! `app/name` over the origins' URLs ([`Edge::ranked`]): every edge configured with the same
//! origins picks the same one without talking to the others, and when that origin fails,
//! the stream moves to the next in its own ranking (the others keep theirs).

pub(crate) mod conn;
mod pull;
mod push;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::hub::{Hub, StreamKey};
use crate::limits::Limits;
use crate::net::url::RtmpUrl;

pub use push::{Forward, ForwardError};

/// One origin and its weight (its share of the streams).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginSettings {
    pub url: RtmpUrl,
    pub weight: u32,
}

/// Edge mode's settings: the origins (the default upstream group), and the pull's timing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Origins ranked per stream by rendezvous hashing.
    pub origins: Vec<OriginSettings>,
    /// Tried, in order, after every origin of `origins` (the group's `backup`).
    pub backup: Vec<RtmpUrl>,
    /// How long a pull stays after its stream's last player has left.
    pub idle: Duration,
    /// The longest wait between two reconnects of a pull (the wait doubles from 250 ms).
    pub reconnect_max: Duration,
    /// TCP, TLS and RTMP connect (up to createStream's reply) with one origin.
    pub connect_timeout: Duration,
    /// Extra CA certificates trusted for an rtmps:// origin.
    pub ca: Option<PathBuf>,
}

impl EdgeSettings {
    /// Default seconds a pull outlives its last player.
    pub const DEFAULT_IDLE_SECS: u64 = 10;
    /// Default longest wait between reconnects.
    pub const DEFAULT_RECONNECT_MAX_SECS: u64 = 8;
}

/// `[upstream] mode`: relay clients to backends, or serve them as an edge of origins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    #[default]
    Relay,
    Edge,
}

/// The edge keys as read from `--edge` and `[upstream]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EdgeKeys {
    pub on: bool,
    pub mode: Option<UpstreamMode>,
    pub idle_secs: Option<u64>,
    pub reconnect_max_secs: Option<u64>,
}

/// A wrong edge setting: the key at fault and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct EdgeSettingsError {
    pub key: String,
    pub message: String,
}

/// The upstream settings edge mode takes its origins from (filled by `config` from the
/// default group: `--upstream`, `upstream.url`, or the `[[upstreams]]` group without apps).
#[derive(Clone, Debug, Default)]
pub struct OriginList {
    pub origins: Vec<OriginSettings>,
    pub backup: Vec<RtmpUrl>,
    pub connect_timeout: Duration,
    pub ca: Option<PathBuf>,
}

/// Edge mode's settings from its keys and the upstream's origins (None: not in edge mode;
/// `upstream` None: no upstream configured; `Some` with no origins: no default group).
pub fn settings(
    keys: EdgeKeys,
    upstream: Option<OriginList>,
) -> Result<Option<EdgeSettings>, EdgeSettingsError> {
    let err = |key: &str, message: String| EdgeSettingsError {
        key: key.to_owned(),
        message,
    };
    let on = keys.on || keys.mode == Some(UpstreamMode::Edge);
    if !on {
        if keys.idle_secs.is_some() || keys.reconnect_max_secs.is_some() {
            return Err(err(
                "upstream.edge_idle_secs",
                "edge_* keys are set but edge mode is not; add mode = \"edge\" to [upstream] (or --edge)".into(),
            ));
        }
        return Ok(None);
    }
    let Some(up) = upstream else {
        return Err(err(
            "upstream.mode",
            "edge mode needs origins: add --upstream rtmp://ORIGIN:1935 (repeatable) or upstream.url".into(),
        ));
    };
    if up.origins.is_empty() {
        return Err(err(
            "upstream.mode",
            "edge mode takes its origins from the default group (--upstream, upstream.url, or an [[upstreams]] table without apps); routing origins by app is not supported".into(),
        ));
    }
    let idle = keys.idle_secs.unwrap_or(EdgeSettings::DEFAULT_IDLE_SECS);
    let max = keys
        .reconnect_max_secs
        .unwrap_or(EdgeSettings::DEFAULT_RECONNECT_MAX_SECS);
    if max == 0 {
        return Err(err(
            "upstream.edge_reconnect_max_secs",
            "must be at least 1 second".into(),
        ));
    }
    Ok(Some(EdgeSettings {
        origins: up.origins,
        backup: up.backup,
        idle: Duration::from_secs(idle),
        reconnect_max: Duration::from_secs(max),
        connect_timeout: up.connect_timeout,
        ca: up.ca,
    }))
}

/// Plays refused a pull by `limits.max_edge_pulls`: one line a second.
static FULL: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new();

/// How long an origin that failed is tried after the others.
const ORIGIN_DOWN: Duration = Duration::from_secs(10);
/// The first wait before a pull reconnects.
const RECONNECT_MIN: Duration = Duration::from_millis(250);

/// Counters for `/metrics` (relaxed atomics, process-wide: one edge per process).
#[derive(Default)]
struct EdgeMetrics {
    pulls_active: AtomicU64,
    pull_connects: AtomicU64,
    pull_failures: AtomicU64,
    bytes_pulled: AtomicU64,
    forwards_active: AtomicU64,
    forward_connects: AtomicU64,
    forward_failures: AtomicU64,
    bytes_forwarded: AtomicU64,
}

fn metrics() -> &'static EdgeMetrics {
    static M: std::sync::OnceLock<EdgeMetrics> = std::sync::OnceLock::new();
    M.get_or_init(EdgeMetrics::default)
}

/// One origin and whether it failed lately.
struct Origin {
    url: RtmpUrl,
    /// What the rendezvous score hashes: the URL as written, the same on every edge.
    id: String,
    weight: u32,
    backup: bool,
    down_until: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Origin {
    fn is_down(&self, now: Instant) -> bool {
        lock(&self.down_until).is_some_and(|t| t > now)
    }

    fn mark(&self, ok: bool) {
        *lock(&self.down_until) = if ok {
            None
        } else {
            Instant::now().checked_add(ORIGIN_DOWN)
        };
    }
}

/// The rendezvous score of `origin` for `key` ([`crate::net::rendezvous`]): the same as a
/// relay's `balance = "hash"` group gives the same URL, so relays and edges in front of
/// the same servers send a stream to the same one.
fn score(origin: &Origin, key: &StreamKey) -> f64 {
    let k = crate::net::rendezvous::stream_key(&key.app, &key.name);
    crate::net::rendezvous::hrw_score(&k, &origin.id, origin.weight)
}

/// The edge: origins, the running pulls, and what every pull and forward needs.
pub struct Edge {
    settings: EdgeSettings,
    limits: Limits,
    origins: Vec<Origin>,
    hub: Arc<Hub>,
    /// A key's pull, while it runs (its task removes it, under this lock, when it ends).
    pulls: Mutex<HashMap<StreamKey, u64>>,
    next_pull: AtomicU64,
    /// How long the hub keeps a pulled stream's publisher while the origin sends nothing
    /// (the engine's `player_wait`): players then hear the stream stopped.
    hold: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Edge {
    /// The edge for `hub`. Loads the trusted roots when an origin is rtmps://.
    pub fn new(
        settings: EdgeSettings,
        limits: Limits,
        hub: Arc<Hub>,
        hold: Duration,
    ) -> Result<Arc<Edge>, crate::net::tls::TlsError> {
        let origins: Vec<Origin> = settings
            .origins
            .iter()
            .map(|o| (&o.url, o.weight, false))
            .chain(settings.backup.iter().map(|u| (u, 1, true)))
            .map(|(u, weight, backup)| Origin {
                url: u.clone(),
                id: u.to_string(),
                weight,
                backup,
                down_until: Mutex::new(None),
            })
            .collect();
        let tls = if origins.iter().any(|o| o.url.scheme.is_tls()) {
            Some(crate::net::tls::client_config(settings.ca.as_deref())?)
        } else {
            None
        };
        Ok(Arc::new(Edge {
            settings,
            limits,
            origins,
            hub,
            pulls: Mutex::new(HashMap::new()),
            next_pull: AtomicU64::new(1),
            hold,
            tls,
        }))
    }

    pub fn settings(&self) -> &EdgeSettings {
        &self.settings
    }

    /// One line for the start log.
    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.origins.iter().map(|o| o.id.clone()).collect();
        format!(
            "edge mode: one pull per stream from [{}] (rendezvous hashing by app/stream), pulls end {} s after the last player",
            urls.join(", "),
            self.settings.idle.as_secs()
        )
    }

    /// The origins to try for `key`, best first: the primaries by rendezvous score, those
    /// that failed in the last [`ORIGIN_DOWN`] after the others, then the backups.
    fn ranked(&self, key: &StreamKey) -> Vec<&Origin> {
        let now = Instant::now();
        let mut v: Vec<(bool, bool, f64, &Origin)> = self
            .origins
            .iter()
            .map(|o| {
                let s = if o.backup { 0.0 } else { score(o, key) };
                (o.backup, o.is_down(now), s, o)
            })
            .collect();
        // Backups keep their configured order (the sort is stable, their scores equal).
        v.sort_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| b.2.total_cmp(&a.2))
        });
        v.into_iter().map(|(_, _, _, o)| o).collect()
    }

    /// The origin `key` goes to when every origin is up (for tests and the admin API).
    pub fn origin_for(&self, app: &str, name: &str) -> Option<RtmpUrl> {
        let key = StreamKey::new(app, name);
        self.origins
            .iter()
            .filter(|o| !o.backup)
            .max_by(|a, b| score(a, &key).total_cmp(&score(b, &key)))
            .map(|o| o.url.clone())
    }

    /// A player joined `key` (after it subscribed in the hub): start the key's pull unless
    /// one runs.
    pub fn want(self: &Arc<Self>, key: &StreamKey) {
        let mut pulls = lock(&self.pulls);
        if pulls.contains_key(key) {
            return;
        }
        if pulls.len() >= self.limits.max_edge_pulls {
            drop(pulls);
            if let Some(also) = FULL.should_log("like it") {
                tracing::warn!(
                    "edge: {} streams are pulled already (limits.max_edge_pulls); {key} is not pulled, its player waits{also}",
                    self.limits.max_edge_pulls
                );
            }
            return;
        }
        let id = self.next_pull.fetch_add(1, Ordering::Relaxed);
        pulls.insert(key.clone(), id);
        drop(pulls);
        tokio::spawn(pull::run(self.clone(), key.clone(), id));
    }

    /// Ends pull `id` of `key` if the key has no player (checked under the pulls' lock, so
    /// a player arriving meanwhile either finds this pull running or starts a new one).
    fn finish_if_unwatched(&self, key: &StreamKey, id: u64) -> bool {
        let mut pulls = lock(&self.pulls);
        if self.hub.players(key) > 0 {
            return false;
        }
        if pulls.get(key) == Some(&id) {
            pulls.remove(key);
        }
        true
    }

    /// Pulls running now.
    pub fn pulls(&self) -> usize {
        lock(&self.pulls).len()
    }

    /// Starts forwarding a publisher of `app`/`name` (`query` passed on) to its origin.
    pub fn forward(self: &Arc<Self>, app: &str, name: &str, query: &str) -> Forward {
        push::start(self.clone(), app, name, query)
    }
}

/// `rtmpgate_edge_*` for `/metrics`.
pub fn encode_metrics(e: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
    use prometheus_client::encoding::NoLabelSet;
    use prometheus_client::metrics::MetricType;
    let m = metrics();
    let v = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
    let rows: [(&str, &str, MetricType, &AtomicU64); 8] = [
        ("rtmpgate_edge_pulls_active", "Streams pulled from an origin right now (one connection each, shared by the stream's players on this node).", MetricType::Gauge, &m.pulls_active),
        ("rtmpgate_edge_pull_connects", "Pull connections made to origins (the first and every reconnect).", MetricType::Counter, &m.pull_connects),
        ("rtmpgate_edge_pull_failures", "Pull connections that failed or were dropped by the origin.", MetricType::Counter, &m.pull_failures),
        ("rtmpgate_edge_pulled_bytes", "Bytes received from origins by pulls.", MetricType::Counter, &m.bytes_pulled),
        ("rtmpgate_edge_forwards_active", "Publishers forwarded to an origin right now.", MetricType::Gauge, &m.forwards_active),
        ("rtmpgate_edge_forward_connects", "Publisher connections made to origins.", MetricType::Counter, &m.forward_connects),
        ("rtmpgate_edge_forward_failures", "Publisher connections to origins that failed or were dropped.", MetricType::Counter, &m.forward_failures),
        ("rtmpgate_edge_forwarded_bytes", "Bytes sent to origins for forwarded publishers.", MetricType::Counter, &m.bytes_forwarded),
    ];
    for (name, help, kind, a) in rows {
        let mut d = e.encode_descriptor(name, help, None, kind)?;
        match kind {
            MetricType::Counter => {
                let n = a.load(Ordering::Relaxed);
                d.encode_counter::<NoLabelSet, _, u64>(&n, None)?
            }
            _ => d.encode_gauge(&v(a))?,
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::engine::hub::HubConfig;
    use crate::net::url::parse_upstream;

    fn edge(urls: &[&str]) -> Arc<Edge> {
        let origins = urls
            .iter()
            .map(|u| OriginSettings {
                url: parse_upstream("k", u).unwrap(),
                weight: 1,
            })
            .collect();
        let s = EdgeSettings {
            origins,
            backup: vec![parse_upstream("k", "rtmp://backup:1935").unwrap()],
            idle: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ca: None,
        };
        Edge::new(
            s,
            Limits::default(),
            Hub::new(HubConfig::default()),
            Duration::from_secs(1),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn pulls_are_bounded_and_an_unwatched_pull_without_media_ends_at_once() {
        let limits = Limits {
            max_edge_pulls: 2,
            ..Limits::default()
        };
        let s = EdgeSettings {
            // Nothing listens on port 1: every connect is refused at once.
            origins: vec![OriginSettings {
                url: parse_upstream("k", "rtmp://127.0.0.1:1").unwrap(),
                weight: 1,
            }],
            backup: Vec::new(),
            idle: Duration::from_secs(3600),
            reconnect_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ca: None,
        };
        let hub = Hub::new(HubConfig::default());
        let e = Edge::new(s, limits, hub.clone(), Duration::from_secs(60)).unwrap();
        let players: Vec<_> = (0..3)
            .map(|i| hub.play(&StreamKey::new("live", &format!("k{i}"))))
            .collect();
        for i in 0..3 {
            e.want(&StreamKey::new("live", &format!("k{i}")));
        }
        assert_eq!(e.pulls(), 2, "limits.max_edge_pulls");
        // The players leave: the pulls never had media, so they end without edge_idle_secs.
        drop(players);
        let t = tokio::time::Instant::now();
        while e.pulls() > 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            e.pulls(),
            0,
            "pulls left {:?} after their players",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_slow_origin_fills_the_forward_queue_and_the_publisher_is_told() {
        // An origin that completes TCP connects (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("rtmp://{}", silent.local_addr().unwrap());
        let limits = Limits {
            max_edge_forward_queue: 4,
            ..Limits::default()
        };
        let s = EdgeSettings {
            origins: vec![OriginSettings {
                url: parse_upstream("k", &url).unwrap(),
                weight: 1,
            }],
            backup: Vec::new(),
            idle: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(30),
            ca: None,
        };
        let e = Edge::new(
            s,
            limits,
            Hub::new(HubConfig::default()),
            Duration::from_secs(1),
        )
        .unwrap();
        let f = e.forward("live", "slow", "");
        let budget = crate::budget::PeerBudget::global_only();
        let mut sent = 0;
        let err = loop {
            match f.send(
                &budget,
                crate::rtmp::message::VIDEO,
                sent,
                bytes::Bytes::from_static(&[0x17, 1, 0, 0, 0]),
            ) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(
                sent <= 4,
                "the queue took more than limits.max_edge_forward_queue"
            );
        };
        assert_eq!(sent, 4);
        assert!(matches!(err, ForwardError::Full(_, 4)), "{err}");
    }

    #[test]
    fn rendezvous_agrees_whatever_the_order_and_moves_only_a_dead_origins_streams() {
        let a = edge(&["rtmp://o1:1935", "rtmp://o2:1935", "rtmp://o3:1935"]);
        let b = edge(&["rtmp://o3:1935", "rtmp://o1:1935", "rtmp://o2:1935"]);
        let mut per = HashMap::new();
        for i in 0..300 {
            let key = StreamKey::new("live", &format!("s{i}"));
            let ra: Vec<String> = a.ranked(&key).iter().map(|o| o.id.clone()).collect();
            let rb: Vec<String> = b.ranked(&key).iter().map(|o| o.id.clone()).collect();
            assert_eq!(ra, rb);
            assert_eq!(ra.last().map(String::as_str), Some("rtmp://backup:1935"));
            *per.entry(ra[0].clone()).or_insert(0) += 1;
        }
        // Spread: each origin gets a fair share of 300 streams (expected 100).
        assert_eq!(per.len(), 3);
        assert!(per.values().all(|&n| n > 60), "{per:?}");
        // o2 fails: its streams move to their second choice, nobody else's move.
        let before: Vec<String> = (0..300)
            .map(|i| {
                a.ranked(&StreamKey::new("live", &format!("s{i}")))[0]
                    .id
                    .clone()
            })
            .collect();
        a.origins[1].mark(false);
        for (i, was) in before.iter().enumerate() {
            let now = a.ranked(&StreamKey::new("live", &format!("s{i}")))[0]
                .id
                .clone();
            if was == "rtmp://o2:1935" {
                assert_ne!(&now, was);
            } else {
                assert_eq!(&now, was);
            }
        }
        a.origins[1].mark(true);
        assert_eq!(
            a.origin_for("live", "s0").map(|u| u.to_string()),
            Some(before[0].clone())
        );
    }
}
