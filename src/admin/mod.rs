//! The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz`, the JSON API under
//! `/api/v1/` and the status page at `/`, served with hyper.
//!
//! It runs on a thread and runtime of its own, with its own socket, so a flood of clients on
//! the client listeners (which keeps the main runtime's workers busy) cannot starve the
//! operator's view of it. Every connection is bounded: at most [`MAX_CONNECTIONS`] at once,
//! request heads of at most [`MAX_HEAD`] bytes within [`HEAD_TIMEOUT`], and no request body
//! read except `POST /api/v1/restream`'s (at most [`restream::MAX_BODY`] bytes, within
//! [`HEAD_TIMEOUT`], after the token checked out). A bearer token, when set, guards
//! `/metrics` and `/api/`; the page, `/healthz` and `/readyz` stay open (load balancers
//! probe them, and the page holds no data: it asks for the token and sends it with its API
//! calls).

pub mod api;
pub mod prom;
mod restream;
mod settings;

pub use settings::{AdminSettings, AdminSettingsError, FileAdmin, DEFAULT_ADMIN};

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::door::rtmpt::Tunnel;
use crate::engine::Engine;
use crate::live::Live;
use crate::net::tls::{self, SniResolver};
use crate::sessions::Sessions;
use crate::upstream::UpstreamSettings;

/// How often the status page's bandwidth history is sampled, and how many samples are kept
/// (five minutes).
pub const HISTORY_EVERY: Duration = Duration::from_secs(2);
pub const HISTORY_LEN: usize = 150;

/// Admin connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 32;
/// Largest request head (request line and headers) read from an admin client.
pub const MAX_HEAD: usize = 16 * 1024;
/// Time an admin client has to send its request head (and its TLS handshake).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin listener reports on: shared with the gateway, read on each request.
pub struct State {
    pub sessions: Arc<Sessions>,
    pub engine: Option<Arc<Engine>>,
    /// Reloadable (the probe and `/readyz` follow the upstream new sessions use).
    upstream: Live<Option<UpstreamSettings>>,
    tunnel: OnceLock<Arc<Tunnel>>,
    draining: AtomicBool,
    /// Reloadable.
    token: Live<Option<String>>,
    started: Instant,
    reloader: OnceLock<Reload>,
    /// Total bytes in and out every [`HISTORY_EVERY`] over the last [`HISTORY_LEN`] samples
    /// (uptime seconds, received, sent), for the status page's chart.
    history: Mutex<std::collections::VecDeque<(f64, u64, u64)>>,
    /// The previous sample per stream, for bitrates (touched by API requests only).
    rates: Mutex<HashMap<(String, String), api::RateSample>>,
}

impl State {
    pub fn new(
        sessions: Arc<Sessions>,
        engine: Option<Arc<Engine>>,
        upstream: Option<UpstreamSettings>,
        token: Option<String>,
    ) -> Arc<State> {
        Arc::new(State {
            sessions,
            engine,
            upstream: Live::new(upstream),
            tunnel: OnceLock::new(),
            reloader: OnceLock::new(),
            history: Mutex::new(std::collections::VecDeque::with_capacity(HISTORY_LEN)),
            draining: AtomicBool::new(false),
            token: Live::new(token),
            started: Instant::now(),
            rates: Mutex::new(HashMap::new()),
        })
    }

    /// The upstream new sessions are relayed to (None: the built-in engine).
    pub fn upstream(&self) -> Option<UpstreamSettings> {
        (*self.upstream.get()).clone()
    }

    /// A reload changed the upstream or the admin token.
    pub fn set_upstream(&self, upstream: Option<UpstreamSettings>) {
        self.upstream.set(Arc::new(upstream));
    }

    pub fn set_token(&self, token: Option<String>) {
        self.token.set(Arc::new(token));
    }

    /// Every client listener is bound (the gateway can take clients from now on).
    pub fn set_bound(&self, tunnel: Arc<Tunnel>) {
        let _ = self.tunnel.set(tunnel);
    }

    /// What `POST /api/v1/reload` runs (the same as SIGHUP); its argument names who asked.
    pub fn set_reloader(&self, reload: Reload) {
        let _ = self.reloader.set(reload);
    }

    /// Shutdown began: no new clients, `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The bandwidth samples, oldest first.
    pub fn history(&self) -> Vec<(f64, u64, u64)> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.iter().copied().collect()
    }

    fn sample(&self) {
        let (mut rx, mut tx) = (0u64, 0u64);
        for (r, t) in self.sessions.bytes_by_transport() {
            rx = rx.saturating_add(r);
            tx = tx.saturating_add(t);
        }
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() >= HISTORY_LEN {
            h.pop_front();
        }
        h.push_back((self.uptime().as_secs_f64(), rx, tx));
    }

    pub fn tunnel(&self) -> Option<&Arc<Tunnel>> {
        self.tunnel.get()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ok when the gateway should get clients, or why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.draining() {
            return Err("draining: shutting down, not accepting new clients");
        }
        if self.tunnel.get().is_none() {
            return Err("client listeners not bound yet");
        }
        if self.upstream.get().is_some()
            && crate::metrics::global().upstream_up.load(Ordering::Relaxed) == 0
        {
            return Err("upstream unreachable at the last connect");
        }
        Ok(())
    }
}

/// Re-reads and applies the configuration: Ok(what was applied), Err(why it was refused).
pub type Reload = Box<dyn Fn(&str) -> Result<serde_json::Value, String> + Send + Sync>;

/// The running admin listener.
#[derive(Debug)]
pub struct Admin {
    pub addr: SocketAddr,
}

/// Binds and starts the admin listener on its own thread. Ok(None) when it is off, or when
/// the *default* address is taken (logged as a warning: a second gateway on one machine, or
/// tests running in parallel, should not fail to start over an optional listener). A bind
/// failure on a configured address is an error.
pub fn start(settings: &AdminSettings, state: Arc<State>) -> anyhow::Result<Option<Admin>> {
    let Some(want) = settings.listen else {
        tracing::info!("admin listener off");
        return Ok(None);
    };
    let tls = match &settings.tls {
        Some(source) => {
            let key = tls::load_certified_key(source)
                .with_context(|| format!("admin listener certificate ({source})"))?;
            Some(tls::server_config(SniResolver::new(key))?)
        }
        None => None,
    };
    let listener = match bind(want) {
        Ok(l) => l,
        Err(e) if !settings.explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(
                "admin listener not started: {want} is already in use (another rtmpgate?); \
                 set --admin ADDR or [admin] listen to another port, or --admin off"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot bind the admin listener on {want} (--admin / [admin] listen; use another port, or off)")
            })
        }
    };
    let addr = listener.local_addr().unwrap_or(want);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        "admin listener on {scheme}://{addr}: status page /, /metrics, /healthz, /readyz, /api/v1/{}",
        if settings.token.is_some() {
            " (bearer token required on /metrics and /api/)"
        } else {
            ""
        }
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the admin listener's runtime")?;
    std::thread::Builder::new()
        .name("rtmpgate-admin".into())
        .spawn(move || runtime.block_on(serve(listener, tls, state)))
        .context("cannot start the admin listener's thread")?;
    Ok(Some(Admin { addr }))
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::net::socket::bind_listener(addr, None, 128)
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Option<crate::net::tls::TlsServer>,
    state: Arc<State>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin listener stopped: {e}");
            return;
        }
    };
    tokio::spawn(probe_upstream(state.clone()));
    let sampled = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HISTORY_EVERY);
        loop {
            tick.tick().await;
            sampled.sample();
        }
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let registry = Arc::new(prom::registry(state.clone()));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("admin listener: accepting failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let registry = registry.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let registry = registry.clone();
                async move {
                    // The one request with a body: read (bounded) before answering.
                    if req.method() == Method::POST && req.uri().path() == "/api/v1/restream" {
                        if let Some(refused) = unauthorized(&req, &state) {
                            return Ok::<_, Infallible>(refused);
                        }
                        return Ok(restream::add(req, &state, peer).await);
                    }
                    Ok::<_, Infallible>(route(req, &state, &registry, peer))
                }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD);
            let result = match tls {
                None => http.serve_connection(TokioIo::new(tcp), service).await,
                Some(config) => {
                    let handshake = crate::net::tls_stream::TlsStream::accept(tcp, &[], &config);
                    match tokio::time::timeout(HEAD_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(
                                "admin listener: TLS handshake with {peer} failed: {e}"
                            );
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!("admin listener: connection from {peer} ended: {e}");
            }
        });
    }
}

/// While the last upstream connect failed, tries a TCP connect every [`PROBE_EVERY`], so
/// `/readyz` recovers when the backend is back even if no client comes (a load balancer
/// that took the gateway out of rotation sends none).
async fn probe_upstream(state: Arc<State>) {
    let up_flag = &crate::metrics::global().upstream_up;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if up_flag.load(Ordering::Relaxed) != 0 {
            continue;
        }
        // Read each time: a reload may have changed it.
        let Some(up) = state.upstream() else {
            continue;
        };
        let target = (up.url.host.as_str(), up.url.port);
        let ok = matches!(
            tokio::time::timeout(up.connect_timeout, tokio::net::TcpStream::connect(target)).await,
            Ok(Ok(_))
        );
        if ok {
            up_flag.store(1, Ordering::Relaxed);
            tracing::info!("upstream {} reachable again (admin probe)", up.url);
        }
    }
}

/// How often an unreachable upstream is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// A response body.
pub type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

/// A JSON answer already serialized.
pub fn json_bytes(status: StatusCode, body: serde_json::Result<Vec<u8>>) -> Reply {
    match body {
        Ok(b) => reply(status, "application/json", b),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the answer failed",
        ),
    }
}

/// The 401 for a request without the token (None: it may go on).
fn unauthorized<B>(req: &Request<B>, state: &State) -> Option<Reply> {
    if authorized(req, state.token.get().as_deref()) {
        return None;
    }
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this admin listener needs its token: send `Authorization: Bearer TOKEN` ([admin] token)",
    );
    r.headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    Some(r)
}

fn error(status: StatusCode, message: &str) -> Reply {
    json(status, &serde_json::json!({ "error": message }))
}

/// The status page: one file, no external resources.
const STATUS_PAGE: &str = include_str!("status.html");

fn route(
    req: Request<Incoming>,
    state: &State,
    registry: &prom::Registry,
    peer: SocketAddr,
) -> Reply {
    let path = req.uri().path();
    let method = req.method();
    let open = matches!(path, "/" | "/healthz" | "/readyz");
    if !open {
        if let Some(refused) = unauthorized(&req, state) {
            return refused;
        }
    }
    if method == Method::POST && path == "/api/v1/reload" {
        let Some(reload) = state.reloader.get() else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "reload is not available");
        };
        return match reload(&format!("reload requested through the admin API by {peer}")) {
            Ok(v) => json(StatusCode::OK, &v),
            // The request was fine; the configuration file it names is not.
            Err(why) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({"error": why, "kept": "the running configuration"}),
            ),
        };
    }
    if method == Method::DELETE {
        if let Some(id) = path.strip_prefix("/api/v1/sessions/") {
            return api::kick(state, id, peer);
        }
        if let Some(id) = path.strip_prefix("/api/v1/restream/") {
            return restream::remove(state, id, peer);
        }
    }
    match (method, path) {
        (&Method::GET, "/") => {
            let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
            r.headers_mut().insert(
                "content-security-policy",
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src data:",
                ),
            );
            r
        }
        (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"status": "alive"})),
        (&Method::GET, "/readyz") => match state.readiness() {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({"ready": true})),
            Err(why) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"ready": false, "reason": why}),
            ),
        },
        (&Method::GET, "/metrics") => match prom::encode(registry) {
            Ok(text) => reply(StatusCode::OK, prom::CONTENT_TYPE, text),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed"),
        },
        (&Method::GET, "/api/v1/summary") => json(StatusCode::OK, &api::summary(state)),
        (&Method::GET, "/api/v1/sessions") => api::sessions(state, req.uri().query()),
        (&Method::GET, "/api/v1/streams") => json(StatusCode::OK, &api::streams(state)),
        (&Method::GET, "/api/v1/recordings") => {
            json(StatusCode::OK, &crate::engine::record::snapshot())
        }
        (&Method::GET, "/api/v1/restream") => restream::list(state),
        (_, "/api/v1/restream") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET lists the destinations, POST adds one; DELETE /api/v1/restream/ID removes one",
        ),
        (_, "/" | "/healthz" | "/readyz" | "/metrics" | "/api/v1/summary" | "/api/v1/streams"
            | "/api/v1/recordings") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such admin endpoint; see /, /metrics, /healthz, /readyz, /api/v1/sessions, /api/v1/streams, /api/v1/restream, /api/v1/recordings",
        ),
    }
}

/// True when no token is set, or the request carries it as a bearer token.
fn authorized<B>(req: &Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Compares without an early exit, so response timing does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        let y = b.get(i % b.len().max(1)).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn token_check() {
        let req = |auth: Option<&str>| {
            let mut b = Request::builder().uri("/metrics");
            if let Some(a) = auth {
                b = b.header(AUTHORIZATION, a);
            }
            b.body(()).unwrap()
        };
        assert!(authorized(&req(None), None));
        assert!(!authorized(&req(None), Some("abc")));
        assert!(!authorized(&req(Some("Bearer abd")), Some("abc")));
        assert!(!authorized(&req(Some("Bearer ab")), Some("abc")));
        assert!(!authorized(&req(Some("Basic abc")), Some("abc")));
        assert!(authorized(&req(Some("Bearer abc")), Some("abc")));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b""));
    }
}
