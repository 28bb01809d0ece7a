//! Several rtmpgate nodes behind one load balancer: tunnel sessions any node can serve.
//!
//! With `[cluster] node_id` set, every RTMPT/RTMPTS session id this node issues reads
//! `NODE-` followed by 128 random bits in hex. A `/send`, `/idle` or `/close` that arrives
//! here for another node's session is forwarded over the internal link ([`link`], signed
//! with the shared secret, [`auth`]) to that node's cluster listener ([`server`]), which
//! applies it to the session in sequence order exactly as a direct request, and the answer
//! is relayed back unchanged. So a balancer may spread a session's requests over every
//! node.
//!
//! Which node is where: the directory maps node ids to link addresses. It is filled by
//! asking every configured peer (`peers`, or every address `peers_dns` resolves to)
//! `GET /cluster/v1/node`, every [`REFRESH_EVERY`] and at once (at most once per
//! [`REFRESH_MIN_GAP`]) when a request names a node not in it. A node that is gone: its
//! link refuses (or does not answer within `connect_timeout_ms`), and the request is
//! answered 404, which tells the client its session is over, so it opens a new one.

pub mod auth;
pub mod link;
pub mod metrics;
pub mod server;
mod settings;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response};
use tokio::time::Instant;

pub use self::settings::{
    valid_node_id, ClusterFlags, ClusterSettings, ClusterSettingsError, FileCluster, PeerUrl,
    MAX_NODE_ID,
};
use crate::door::rtmpt::{unknown_session, Forwarder, Reply, Tunnel};
use crate::limits::Limits;
use crate::throttle::LogThrottle;
use link::{Link, PeerAddr};

/// How often the directory is refreshed in the background.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// The least time between two refreshes a request for an unknown node can cause.
/// A request arriving sooner waits for the gap to pass (the node it names may have just
/// started), so a request never waits much more than this plus one round of asks.
pub const REFRESH_MIN_GAP: Duration = Duration::from_millis(250);

static FORWARD_FAILED: LogThrottle = LogThrottle::new();

/// This node's place in the cluster.
pub struct Cluster {
    node_id: String,
    settings: ClusterSettings,
    link: Link,
    limits: Arc<Limits>,
    directory: Mutex<HashMap<String, PeerAddr>>,
    /// Held while refreshing; holds the last refresh's start.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
}

impl Cluster {
    /// Binds the cluster listener (if `listen` is set), starts the directory refresh, and
    /// makes `tunnel` issue prefixed session ids and forward other nodes' requests.
    /// Returns the cluster and the listener's bound address.
    pub async fn start(
        settings: ClusterSettings,
        limits: Arc<Limits>,
        tunnel: &Arc<Tunnel>,
    ) -> anyhow::Result<(Arc<Cluster>, Option<SocketAddr>)> {
        metrics::started();
        let secret = settings.secret.clone().unwrap_or_default().into_bytes();
        let needs_tls = settings.peers.iter().any(|p| p.tls)
            || (settings.peers_dns.is_some() && settings.tls.is_some());
        let tls = if needs_tls {
            let connector = link::tls_connector(settings.ca.as_deref())
                .context("cluster: the TLS client for https:// peers")?;
            Some(connector)
        } else {
            None
        };
        let cluster = Arc::new(Cluster {
            node_id: settings.node_id.clone(),
            link: Link::new(
                settings.node_id.clone(),
                secret.clone(),
                tls,
                settings.connect_timeout,
            ),
            limits: Arc::clone(&limits),
            directory: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(None),
            settings,
        });
        let mut bound = None;
        if let Some(addr) = cluster.settings.listen {
            let acceptor = match &cluster.settings.tls {
                Some(source) => {
                    let key = crate::net::tls::load_certified_key(source)
                        .context("cluster link certificate (cluster.cert, cluster.key)")?;
                    let config =
                        crate::net::tls::server_config(crate::net::tls::SniResolver::new(key))?;
                    Some(config)
                }
                None => None,
            };
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cluster link: cannot listen on {addr} (cluster.listen): is another \
                     process on that port?"
                )
            })?;
            let local = listener.local_addr().unwrap_or(addr);
            let server = Arc::new(server::Server {
                node_id: cluster.node_id.clone(),
                secret,
                limits,
                tunnel: Arc::downgrade(tunnel),
                tls: acceptor.clone(),
            });
            tokio::spawn(server.run(listener));
            tracing::info!(
                "cluster node {}: link served on {}://{local}",
                cluster.node_id,
                if acceptor.is_some() { "https" } else { "http" }
            );
            bound = Some(local);
        }
        tunnel.set_forwarder(cluster.clone());
        tokio::spawn(refresh_loop(Arc::downgrade(&cluster)));
        Ok((cluster, bound))
    }

    /// Node ids known now, with their link addresses (for tests and the log).
    pub fn known(&self) -> Vec<(String, String)> {
        let dir = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<(String, String)> = dir
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        v.sort();
        v
    }

    fn lookup_now(&self, node: &str) -> Option<PeerAddr> {
        let dir = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        dir.get(node).cloned()
    }

    /// Where `node` is; refreshes the directory first if it is unknown and the last
    /// refresh is older than [`REFRESH_MIN_GAP`].
    async fn lookup(&self, node: &str) -> Option<PeerAddr> {
        if let Some(p) = self.lookup_now(node) {
            return Some(p);
        }
        let before = self.refreshing.lock().await.unwrap_or_else(Instant::now);
        if before.elapsed() < REFRESH_MIN_GAP {
            tokio::time::sleep_until(before + REFRESH_MIN_GAP).await;
        }
        if let Some(p) = self.lookup_now(node) {
            return Some(p);
        }
        self.refresh(REFRESH_MIN_GAP).await;
        self.lookup_now(node)
    }

    /// Every address the peers configuration names now.
    async fn candidates(&self) -> Vec<PeerAddr> {
        let mut out = Vec::new();
        let mut names: Vec<(bool, String, u16)> = self
            .settings
            .peers
            .iter()
            .map(|p| (p.tls, p.host.clone(), p.port))
            .collect();
        if let Some((name, port)) = &self.settings.peers_dns {
            names.push((self.settings.tls.is_some(), name.clone(), *port));
        }
        for (tls, host, port) in names {
            match tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(addrs)) => {
                    for addr in addrs {
                        let p = PeerAddr {
                            tls,
                            host: host.clone(),
                            addr,
                        };
                        if !out.contains(&p) {
                            out.push(p);
                        }
                    }
                }
                _ => {
                    if let Some(also) = FORWARD_FAILED.should_log("like it") {
                        tracing::warn!("cluster: cannot resolve peer {host}:{port}{also}");
                    }
                }
            }
        }
        out
    }

    /// Asks every candidate address for its node id, unless a refresh started less than
    /// `gap` ago. An address that does not answer keeps its previous entry (a dead node's
    /// requests then fail fast at connect).
    async fn refresh(&self, gap: Duration) {
        let mut last = self.refreshing.lock().await;
        if last.is_some_and(|t| t.elapsed() < gap) {
            return;
        }
        *last = Some(Instant::now());
        let candidates = self.candidates().await;
        let timeout = self.settings.connect_timeout + Duration::from_secs(1);
        let asks = candidates.iter().map(|p| async move {
            let answer = self
                .link
                .request(p, Method::GET, server::NODE_PATH, Vec::new(), timeout, 64)
                .await;
            (p, answer)
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut dir = self
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (peer, answer) in answers {
            match answer {
                Ok(a) if a.status.is_success() => {
                    let id = String::from_utf8_lossy(&a.body).trim().to_string();
                    if !valid_node_id(&id) || id == self.node_id {
                        continue;
                    }
                    // A node's address changed: its old entry goes.
                    dir.retain(|k, v| v != peer || *k == id);
                    if dir.get(&id) != Some(peer) {
                        tracing::info!("cluster: node {id} is at {peer}");
                        dir.insert(id, peer.clone());
                    }
                }
                Ok(a) => {
                    if let Some(also) = FORWARD_FAILED.should_log("like it") {
                        tracing::warn!(
                            "cluster: peer {peer} answered {} to {}: check that \
                             cluster.secret is the same on every node{also}",
                            a.status,
                            server::NODE_PATH
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!("cluster: peer {peer} did not answer: {e}");
                    self.link.forget(peer);
                }
            }
        }
    }

    /// The longest a forwarded request may take: the owner may wait for the request's
    /// turn in sequence order, then hold an idle poll.
    fn forward_timeout(&self) -> Duration {
        self.limits.tunnel_order_wait() + self.limits.tunnel_idle_hold() + Duration::from_secs(2)
    }

    async fn forward_to(&self, owner: &str, path: &str, body: Vec<Bytes>) -> Reply {
        let arrived = Instant::now();
        let Some(peer) = self.lookup(owner).await else {
            metrics::unknown_node();
            tracing::debug!("cluster: a request for a session of unknown node {owner}: 404");
            return unknown_session();
        };
        let linked = format!("{}{path}", server::RTMPT_PREFIX);
        // A reply carries at most the owner's pending bytes and the polling byte; the
        // nodes share their [limits], and the margin covers a difference.
        let max = self
            .limits
            .max_tunnel_pending
            .saturating_mul(2)
            .saturating_add(4096);
        let answer = self
            .link
            .request(
                &peer,
                Method::POST,
                &linked,
                body,
                self.forward_timeout(),
                max,
            )
            .await;
        match answer {
            Ok(a) => {
                metrics::forwarded(path, arrived.elapsed());
                tracing::debug!(
                    status = a.status.as_u16(),
                    "cluster: forwarded {} to node {owner}",
                    loggable(path)
                );
                let mut r = Response::new(Full::new(a.body));
                *r.status_mut() = a.status;
                let h = r.headers_mut();
                h.insert(
                    CONTENT_TYPE,
                    a.content_type
                        .unwrap_or(HeaderValue::from_static("application/x-fcs")),
                );
                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                r
            }
            Err(e) => {
                metrics::failed();
                self.link.forget(&peer);
                if let Some(also) = FORWARD_FAILED.should_log("like it") {
                    tracing::warn!(
                        "cluster: forwarding a tunnel request to node {owner} at {peer} \
                         failed ({e}); answered 404 so the client opens a new session{also}"
                    );
                }
                unknown_session()
            }
        }
    }
}

impl Forwarder for Cluster {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn forward<'a>(
        &'a self,
        owner: &'a str,
        path: &'a str,
        body: Vec<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'a>> {
        Box::pin(self.forward_to(owner, path, body))
    }
}

/// An RTMPT path for a log line: the verb, the session's node and 8 random characters.
fn loggable(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').split('/');
    let verb = parts.next().unwrap_or("");
    let id: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .take(MAX_NODE_ID + 9)
        .collect();
    let label = match id.split_once('-') {
        Some((node, rest)) => format!("{node}-{}", rest.chars().take(8).collect::<String>()),
        None => id.chars().take(8).collect(),
    };
    format!("{verb} [{label}]")
}

async fn refresh_loop(cluster: Weak<Cluster>) {
    loop {
        match cluster.upgrade() {
            Some(c) => c.refresh(Duration::ZERO).await,
            None => return,
        }
        tokio::time::sleep(REFRESH_EVERY).await;
    }
}
