//! Relaying clients to backend RTMP servers (rtmp:// or rtmps://).
//!
//! [`Upstream`] is the stream handler: it picks a backend group and, in it, the backends to
//! try in order ([`pool`]), connects (TCP or TLS, an optional PROXY protocol header first),
//! and relays. Two modes ([`settings::RelayMode`]): `bytes` copies the client's bytes,
//! handshake included, to the first backend that accepts the TCP connect; `connect`
//! ([`relay`]) runs the RTMP handshake itself, reads `connect`, routes by app, runs its own
//! handshake with the backend and then forwards the client's chunk stream unchanged while
//! watching its commands ([`scan`], [`guard`]). The copy ([`pump`]) uses one buffer per
//! direction; when one side ends, the other is flushed and shut down; the remaining
//! direction gets a short grace period to deliver what is in flight, then both are closed.
//! Once media flows from the backend, that direction reads on shared ticks
//! (`[upstream] write_batch_ms`, [`PumpTimes`]): one read and one write per window instead
//! of one per message the backend wrote; while it waits, a plain backend socket's
//! SO_RCVLOWAT is raised, so the backend's messages wake no thread before the tick.

pub mod guard;
pub mod hashed;
pub mod health;
pub mod pool;
pub mod relay;
pub mod scan;
pub mod settings;
pub mod state;

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::limits::Limits;
use crate::net::proxy_protocol::{self, ProxyVersion};
use crate::net::tls::{self, TlsError};
use crate::net::url::{RtmpUrl, Scheme};
use crate::stream::{ClientStream, StreamHandler};
use guard::RelayGuard;
use pool::{Backend, Group, Pools};
use settings::{HealthSettings, RelayMode};

/// Each direction starts with no buffer, reads its first bytes into the stack and then into a
/// buffer of this size (a player's side only ever carries acks), doubled, up to
/// [`PUMP_BUF_MAX`], whenever a read fills it (a media stream), so ten thousand idle players
/// cost little and a busy stream moves a video frame in one read. While the direction is
/// still starting up (less than [`STARTUP_BYTES`] carried) its buffer is freed whenever it
/// has nothing to read: an idle connection holds no pump buffer.
const PUMP_BUF_MIN: usize = 512;
/// Largest buffer per direction.
const PUMP_BUF_MAX: usize = 64 * 1024;
/// How long the other direction may run on after one side has closed.
const LINGER: Duration = Duration::from_secs(5);
/// A direction that has carried less than this is starting up (the handshake, the replies to
/// connect, createStream and play: a few kB). Its reads never wait for the merge window's
/// tick, and its buffer shrinks back to [`PUMP_BUF_MIN`] whenever it has nothing to read.
const STARTUP_BYTES: u64 = 64 * 1024;
/// SO_RCVLOWAT of a plain backend socket while its direction waits for the merge window's
/// tick ([`OneWay::raise_lowat`]): above what a stream brings in one window (8 kB at
/// 1.6 Mb/s and 40 ms, 40 kB at 8 Mb/s), so its messages raise no readiness before the
/// tick reads them; at most half the default receive buffer (128 KiB), so the kernel
/// neither grows the buffer nor clamps the window for it.
const TICK_LOWAT: i32 = 32 * 1024;
/// Reads after a tick's read, for what its ACK released ([`OneWay::read_released`]).
const RELEASED_READS: usize = 1;
/// `[upstream] write_batch_ms` when it is not set.
pub const DEFAULT_WRITE_BATCH: Duration = Duration::from_millis(40);
/// A merge window that carried this much (four full buffers) belongs to a bulk transfer: its
/// reads are already full-sized, so waiting for the next tick saves no read or write and only
/// stalls the backend (a 40 ms wait at gigabit rates is more than the socket buffers hold, and
/// nginx-rtmp drops what its queue for the player cannot take). Such a direction reads as soon
/// as bytes arrive until a whole window carries less again. At 40 ms this is 52 Mb/s per
/// player; a 1.6-8 Mb/s stream carries 8-40 kB per window and keeps the window.
const BULK_WINDOW_BYTES: u64 = 4 * PUMP_BUF_MAX as u64;

/// The pump's clocks: when an idle session is closed, and the merge window of the
/// backend-to-client direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PumpTimes {
    /// Close the session after this long without a byte either way (None: never).
    pub idle: Option<Duration>,
    /// Once media flows from the backend, read it (and write it to the client) once per
    /// window of this length, on ticks shared by the whole process, instead of once per
    /// message: fewer reads, writes and wake-ups per player, at the cost of at most one
    /// window of added latency (half of one on average). Zero: read as soon as bytes arrive.
    pub write_batch: Duration,
}

impl From<Option<Duration>> for PumpTimes {
    fn from(idle: Option<Duration>) -> Self {
        PumpTimes {
            idle,
            write_batch: Duration::ZERO,
        }
    }
}

/// Upstream settings: the backend's URL and how to reach it (`--upstream*`, `[upstream]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// The first backend (of the default group if there is one), for status lines.
    pub url: RtmpUrl,
    /// Every group (the `--upstream` URLs form the one named `default`).
    pub groups: Vec<settings::GroupSettings>,
    pub relay: RelayMode,
    pub health: HealthSettings,
    /// `[auth]`, checked at each connect, publish and play (connect mode only).
    pub auth: Option<AuthHandle>,
    /// Extra CA certificates trusted for an rtmps:// backend.
    pub ca: Option<PathBuf>,
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout: Duration,
    /// `[upstream] write_batch_ms`: the backend-to-client merge window ([`PumpTimes`]).
    pub write_batch: Duration,
}

/// The shared authorizer; two settings are equal when they hold the same one (a reload
/// builds a new one, so a reload with `[auth]` rebuilds the relay).
#[derive(Clone, Debug)]
pub struct AuthHandle(pub Arc<crate::auth::Auth>);

impl PartialEq for AuthHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for AuthHandle {}

/// Why a client could not be forwarded, or how the forwarding ended badly.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve upstream host {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("upstream host {0} resolved to no address")]
    NoAddress(String),
    #[error("cannot connect to upstream {url} ({addr}): {source}; is the backend running and reachable?")]
    Connect {
        url: RtmpUrl,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("connecting to upstream {url} timed out after {secs} s")]
    ConnectTimeout { url: RtmpUrl, secs: u64 },
    #[error("TLS handshake with upstream {url} failed: {source}; if the backend uses a private CA pass it with --upstream-ca")]
    Tls { url: RtmpUrl, source: io::Error },
    #[error("upstream host {0} is not a valid TLS server name")]
    ServerName(String),
    #[error("sending the PROXY protocol header to upstream {url}: {source}")]
    ProxyHeader { url: RtmpUrl, source: io::Error },
    #[error("RTMP handshake with upstream {url} failed: {detail}; is it an RTMP server?")]
    Handshake { url: RtmpUrl, detail: String },
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
}

/// How to reach one backend.
pub struct Connector {
    pub url: RtmpUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    proxy_protocol: Option<ProxyVersion>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

/// Either leg of the backend connection.
pub enum Leg {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Leg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Leg::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Leg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Leg::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Leg::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(s) => Pin::new(s).poll_flush(cx),
            Leg::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Leg::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A side of the pump that may be a plain TCP socket underneath. The backend-to-client
/// direction tunes the backend's socket while it waits for the merge window's tick (see
/// [`OneWay::raise_lowat`]); anything else (TLS, a re-chunker, a client stream) is left as it is.
pub trait PlainTcp {
    /// The socket, when reading it directly reads exactly the bytes `poll_read` would.
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl PlainTcp for Leg {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        match self {
            Leg::Tcp(s) => Some(s),
            Leg::Tls(_) => None,
        }
    }
}

// The client's side is never read on ticks (and the session layer counts its bytes as
// they are read), so it offers no socket.
impl PlainTcp for ClientStream {}
impl<S> PlainTcp for crate::stream::Prefixed<S> {}
impl<L> PlainTcp for hashed::Rechunk<L> {}
impl PlainTcp for tokio::io::DuplexStream {}

impl PlainTcp for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Connector {
    /// Prepares the connector; for rtmps:// this loads the trusted roots (and the extra CA).
    pub fn new(
        url: &RtmpUrl,
        ca: Option<&std::path::Path>,
        proxy_protocol: Option<ProxyVersion>,
    ) -> Result<Connector, UpstreamError> {
        // rtmps:// (parse_upstream accepts rtmp and rtmps only).
        let tls = if url.scheme.is_tls() {
            let config = tls::client_config(ca)?;
            let name = ServerName::try_from(url.host.clone())
                .map_err(|_| UpstreamError::ServerName(url.host.clone()))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Connector {
            url: url.clone(),
            tls,
            proxy_protocol,
        })
    }

    /// TCP connect (first address that answers), PROXY header, TLS handshake.
    pub async fn connect(&self, peer: SocketAddr, local: SocketAddr) -> Result<Leg, UpstreamError> {
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|source| UpstreamError::Resolve {
                    host: self.url.host.clone(),
                    source,
                })?
                .collect();
        let mut last = None;
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(source) => {
                    last = Some(UpstreamError::Connect {
                        url: self.url.clone(),
                        addr,
                        source,
                    })
                }
            }
        }
        let Some(mut tcp) = tcp else {
            return Err(last.unwrap_or_else(|| UpstreamError::NoAddress(self.url.host.clone())));
        };
        crate::net::socket::tune_socket(&tcp);
        if let Some(version) = self.proxy_protocol {
            // The header goes outside TLS, as PROXY-aware servers read it before the handshake.
            let header = proxy_protocol::encode(version, peer, local);
            tcp.write_all(&header)
                .await
                .map_err(|source| UpstreamError::ProxyHeader {
                    url: self.url.clone(),
                    source,
                })?;
        }
        match &self.tls {
            None => Ok(Leg::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| UpstreamError::Tls {
                        url: self.url.clone(),
                        source,
                    })?;
                Ok(Leg::Tls(Box::new(tls)))
            }
        }
    }
}

/// The relay: every backend group, the mode, and the hook that authorizes commands.
pub struct Upstream {
    pools: Arc<Pools>,
    mode: RelayMode,
    health: HealthSettings,
    connect_timeout: Duration,
    /// Close a relayed session after this long without a byte either way (None: never).
    idle_timeout: Option<Duration>,
    /// The backend-to-client merge window ([`PumpTimes::write_batch`]).
    write_batch: Duration,
    limits: Limits,
    guard: Arc<dyn RelayGuard>,
    /// No backend reachable: every client would log a line; at most one a second.
    connect_failures: crate::throttle::LogThrottle,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("pools", &self.pools)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Upstream {
    /// Prepares every backend's connector; for rtmps:// this loads the trusted roots.
    pub fn new(settings: &UpstreamSettings, limits: &Limits) -> Result<Upstream, UpstreamError> {
        let mut groups = Vec::new();
        for g in &settings.groups {
            let mut connectors = Vec::new();
            for (b, backup) in g
                .backends
                .iter()
                .map(|u| (u, false))
                .chain(g.backup.iter().map(|u| (u, true)))
            {
                let proxy = b.proxy(settings.proxy_protocol);
                let c = Connector::new(&b.url, settings.ca.as_deref(), proxy)?;
                connectors.push((c, backup, b.weight));
            }
            groups.push(Group::new(g, connectors));
        }
        let mut pools = Pools {
            groups,
            rise: settings.health.rise,
            fall: settings.health.fall,
        };
        // A reload: backends it keeps keep their health state.
        if let Some(running) = pool::current() {
            let kept = pools.inherit(&running);
            if kept > 0 {
                tracing::info!("upstream: {kept} backend(s) keep their up/down state and counters across the reload");
            }
        }
        let pools = Arc::new(pools);
        Ok(Upstream {
            pools,
            mode: settings.relay,
            health: settings.health,
            connect_timeout: settings.connect_timeout,
            idle_timeout: limits.relay_idle_timeout(),
            write_batch: settings.write_batch,
            limits: limits.clone(),
            guard: match &settings.auth {
                Some(a) => Arc::new(guard::AuthGuard {
                    auth: a.0.clone(),
                    max_name_len: limits.max_name_len,
                }),
                None => Arc::new(guard::AllowAll),
            },
            connect_failures: crate::throttle::LogThrottle::new(),
        })
    }

    /// Installs the authorization hook (the relay then checks connect, publish and play).
    pub fn with_guard(mut self, guard: Arc<dyn RelayGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// The pump's idle timeout and merge window, for every relayed session.
    pub(crate) fn pump_times(&self) -> PumpTimes {
        PumpTimes {
            idle: self.idle_timeout,
            write_batch: self.write_batch,
        }
    }

    /// The first backend of the default group (for status lines).
    pub fn url(&self) -> &RtmpUrl {
        match self.pools.default_group().and_then(|g| g.backends.first()) {
            Some(b) => &b.connector.url,
            None => unreachable_url(),
        }
    }

    /// One line on where clients go, for the start log.
    pub fn describe(&self) -> String {
        let groups: Vec<String> = self
            .pools
            .groups
            .iter()
            .map(|g| {
                let urls: Vec<String> = g
                    .backends
                    .iter()
                    .map(|b| match b.weight {
                        1 => b.connector.url.to_string(),
                        w => format!("{} weight {w}", b.connector.url),
                    })
                    .collect();
                format!("{} {} [{}]", g.name, g.balance.as_str(), urls.join(", "))
            })
            .collect();
        format!("relay = {}: {}", self.mode.as_str(), groups.join("; "))
    }

    /// The handler the front door calls for every client. Starts the health checks (they
    /// stop once the handler and every client it serves are gone).
    pub fn handler(self: Arc<Self>) -> StreamHandler {
        pool::set_current(&self.pools);
        health::spawn(&self.pools, self.health, self.connect_timeout, &self.limits);
        Arc::new(move |client: ClientStream| {
            let this = self.clone();
            Box::pin(async move { this.serve(client).await })
        })
    }

    /// Serves one client until either side is done. Failures are logged here.
    pub async fn serve(&self, client: ClientStream) {
        if client.transport.is_http() {
            return not_relayed(client).await;
        }
        match self.mode {
            RelayMode::Bytes => self.serve_bytes(client).await,
            // Boxed: a future is as large as its largest branch and is held for the whole
            // session, so the connect-aware relay's state would cost every byte-relayed client.
            RelayMode::Connect => Box::pin(relay::serve(self, client)).await,
        }
    }

    /// Connects to the first backend of `group` that accepts, in the group's order, marking
    /// each failure; `None` when none does (each failure was logged, throttled).
    async fn open(
        &self,
        group: &Group,
        (peer, local, label): (SocketAddr, SocketAddr, &str),
        handshake: Option<relay::BackendHandshake>,
        key: &str,
    ) -> Option<(Leg, Arc<Backend>)> {
        for backend in group.candidates_for(key) {
            let url = backend.connector.url.to_string();
            crate::sessions::tag_current(|t| t.upstream = Some(url));
            let began = std::time::Instant::now();
            let attempt = async {
                let mut leg = backend.connector.connect(peer, local).await?;
                if let Some(h) = handshake {
                    relay::backend_handshake(&mut leg, &backend.connector.url, h).await?;
                }
                Ok::<_, UpstreamError>(leg)
            };
            // Boxed: the TCP, TLS and RTMP handshake state lives on the heap only while
            // connecting, not in the session's future for as long as the session lasts.
            let r = match tokio::time::timeout(self.connect_timeout, Box::pin(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::ConnectTimeout {
                    url: backend.connector.url.clone(),
                    secs: self.connect_timeout.as_secs(),
                }),
            };
            crate::metrics::global().upstream_connect(began.elapsed(), r.is_ok());
            match r {
                Ok(leg) => {
                    backend.connected(true, "");
                    return Some((leg, backend));
                }
                Err(e) => {
                    backend.connected(false, &e.to_string());
                    if let Some(also) = self.connect_failures.should_log("failed connects so") {
                        tracing::warn!("{label}: {e}; trying the group's next backend{also}");
                    }
                }
            }
        }
        if let Some(also) = self.connect_failures.should_log("clients closed so") {
            tracing::warn!(
                "{label}: closing client, no backend of upstream group {} accepted the connect{also}",
                group.name
            );
        }
        None
    }

    /// `relay = "bytes"`: the first backend of the default group that accepts the TCP (TLS)
    /// connect gets the client's bytes, handshake included.
    async fn serve_bytes(&self, mut client: ClientStream) {
        let label = client.label();
        crate::sessions::tag_current(|t| {
            t.role = Some(crate::sessions::Role::Relay);
        });
        let Some(group) = self.pools.default_group() else {
            let _ = client.shutdown().await;
            return;
        };
        let Some((mut leg, backend)) = self
            .open(group, (client.peer, client.local, &label), None, "")
            .await
        else {
            let _ = client.shutdown().await;
            return;
        };
        let _active = backend.hold();
        if let Err(e) = pump(&mut client, &mut leg, self.pump_times()).await {
            tracing::debug!(
                "{label}: forwarding to {} ended: {e}",
                backend.connector.url
            );
        }
    }
}

/// Never used: a relay always has a group with a backend (the config guarantees it).
fn unreachable_url() -> &'static RtmpUrl {
    static NONE: std::sync::OnceLock<RtmpUrl> = std::sync::OnceLock::new();
    NONE.get_or_init(|| RtmpUrl {
        scheme: Scheme::Rtmp,
        host: "none".to_string(),
        port: 1935,
        app: String::new(),
        stream: String::new(),
    })
}

/// One direction of the copy: a fixed buffer and where it stands.
struct OneWay {
    buf: Box<[u8]>,
    /// The last read filled the buffer: enlarge it once it has been written out.
    grow: bool,
    start: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
    total: u64,
    /// The connect-aware relay's command watch on the client's bytes: only what it has
    /// scanned and allowed is written.
    watch: Option<Box<relay::Watch>>,
    /// The merge window (zero: none) and, once media flows, the tick the next read waits
    /// for (allocated the first time, then reset: one timer per direction).
    batch: Duration,
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The next read waits for `tick`.
    wait_tick: bool,
    /// Which window (counted on the shared ticks) the last read fell in, the bytes read in
    /// it, and in the window before it: a direction whose window carried
    /// [`BULK_WINDOW_BYTES`] does not wait for ticks.
    window_no: u128,
    window_bytes: u64,
    prev_window_bytes: u64,
    /// The reader's socket has SO_RCVLOWAT raised while this direction waits for a tick
    /// ([`OneWay::raise_lowat`]); the read after the tick then goes to the socket directly.
    lowat_raised: bool,
    /// The windows in which the last two reads right after a tick filled the largest buffer
    /// (more than a buffer arrived while waiting). Two ticks in a row like that make the
    /// window after the second one bulk: the sockets may hold less than
    /// [`BULK_WINDOW_BYTES`], so windows spent waiting could never show it otherwise. One
    /// alone is a burst (a key frame), not a rate.
    tick_full: [Option<u128>; 2],
}

impl OneWay {
    fn new(watch: Option<Box<relay::Watch>>, batch: Duration) -> Self {
        OneWay {
            watch,
            batch,
            tick: None,
            wait_tick: false,
            window_no: 0,
            window_bytes: 0,
            prev_window_bytes: 0,
            lowat_raised: false,
            tick_full: [None, None],
            grow: false,
            buf: Box::default(),
            start: 0,
            end: 0,
            read_done: false,
            need_flush: false,
            total: 0,
        }
    }

    /// Copies from `r` to `w` until `r` ends, then flushes and shuts `w` down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + PlainTcp + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.read_done {
                ready!(self.poll_fill(cx, r.as_mut(), w.as_mut()))?;
            }
            let limit = self.allowed(cx)?;
            ready!(self.poll_write_until(cx, w.as_mut(), limit))?;
            if self.start < self.end {
                // Held for a verdict (the watch's future will wake us): push out what
                // was written before it.
                ready!(self.poll_flush_written(cx, w.as_mut()))?;
                return Poll::Pending;
            }
            if self.read_done {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.total));
            }
        }
    }

    /// Refills the empty buffer from `r` (after the merge window's tick, once media flows),
    /// or notes that `r` has ended. Pending (after flushing what was written to `w`) when
    /// there is nothing to read yet.
    fn poll_fill<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + PlainTcp + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut after_tick = false;
        if self.wait_tick {
            if let Some(tick) = &mut self.tick {
                if tick.as_mut().poll(cx).is_pending() {
                    ready!(self.poll_flush_written(cx, w))?;
                    return Poll::Pending;
                }
            }
            self.wait_tick = false;
            after_tick = true;
        }
        if self.grow {
            let len = self.buf.len().saturating_mul(2).min(PUMP_BUF_MAX);
            self.buf = vec![0u8; len].into_boxed_slice();
            self.grow = false;
        }
        if after_tick && self.lowat_raised && !self.buf.is_empty() {
            // The socket raised no readiness for what arrived during the window (that was
            // the point), so tokio's readiness says nothing: ask the socket itself.
            if let Some(tcp) = r.plain_tcp() {
                use std::io::Read;
                let sock = socket2::SockRef::from(tcp);
                match (&*sock).read(&mut self.buf) {
                    Ok(0) => {
                        self.read_done = true;
                        return Poll::Ready(Ok(()));
                    }
                    Ok(n) => {
                        let n = self.read_released(&sock, n);
                        self.took(n, Some(tcp), true)?;
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing came in a whole window: wait for the next byte through
                        // tokio as usual, with the threshold back at one byte.
                        self.lower_lowat(tcp)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        cx.waker().wake_by_ref();
                        self.wait_tick = true;
                        return Poll::Pending;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        // A direction with no buffer (idle while starting up) reads into the stack first and
        // allocates only once bytes arrive, so an idle connection holds no pump buffer at all.
        let mut probe = [0u8; PUMP_BUF_MIN];
        let probing = self.buf.is_empty();
        let mut rb = if probing {
            ReadBuf::new(&mut probe)
        } else {
            ReadBuf::new(&mut self.buf)
        };
        match r.as_mut().poll_read(cx, &mut rb) {
            Poll::Pending => {
                if self.total < STARTUP_BYTES && !self.buf.is_empty() {
                    self.buf = Box::default();
                    self.grow = false;
                }
                // Nothing more to read now: push out what was written (TLS buffers).
                ready!(self.poll_flush_written(cx, w))?;
                Poll::Pending
            }
            // A TLS peer that closes without close_notify has still ended its stream.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.read_done = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n > 0 && probing {
                    let mut buf = vec![0u8; PUMP_BUF_MIN].into_boxed_slice();
                    if let (Some(to), Some(from)) = (buf.get_mut(..n), probe.get(..n)) {
                        to.copy_from_slice(from);
                    }
                    self.buf = buf;
                }
                if n == 0 {
                    self.read_done = true;
                } else {
                    self.took(n, r.plain_tcp(), after_tick)?;
                }
                Poll::Ready(Ok(()))
            }
        }
    }

    /// After the tick's read of `n` bytes: read again what that read's ACK released.
    ///
    /// A backend that sends without TCP_NODELAY (nginx-rtmp) holds each message while an
    /// earlier small one is unacknowledged (Nagle). While this direction waits for its tick
    /// it reads nothing, so nothing is acknowledged (the kernel delays an ACK by 40 ms), and
    /// everything the backend wrote in the window sits in the backend's send queue. The
    /// tick's read acknowledges what had arrived; from a backend on the same host the held
    /// bytes are back before that read returns, and reading them now forwards them on this
    /// tick rather than the next one: the window then adds at most its own length instead of
    /// about one and a half times it on average (a backend on another host answers a round
    /// trip later, too late for this read). The backend sends all it held in one go, so one
    /// more read is enough ([`RELEASED_READS`]; a third would find only what the backend
    /// wrote in the microseconds between, for a syscall per tick), and only while the buffer
    /// has room. Bounded by the buffer already allocated: nothing new is allocated.
    fn read_released(&mut self, sock: &socket2::SockRef<'_>, mut n: usize) -> usize {
        use std::io::Read;
        for _ in 0..RELEASED_READS {
            let Some(rest) = self.buf.get_mut(n..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            match (&**sock).read(rest) {
                // The end of the stream or an error: the next read reports it.
                Ok(0) | Err(_) => break,
                Ok(m) => n = n.saturating_add(m).min(self.buf.len()),
            }
        }
        n
    }

    /// `n` bytes were read into the buffer: set it up for writing and decide when the next
    /// read happens.
    fn took(&mut self, n: usize, tcp: Option<&TcpStream>, after_tick: bool) -> io::Result<()> {
        self.start = 0;
        self.end = n;
        if let Some(w) = &mut self.watch {
            w.rewind();
        }
        let full = n == self.buf.len();
        self.grow = full && n < PUMP_BUF_MAX;
        // A short read emptied the socket: with a window, media that follows is
        // read on the next tick, unless the direction is a bulk transfer. A full
        // one reads on at once.
        let mut waits = false;
        if !self.batch.is_zero() && self.total >= STARTUP_BYTES {
            let mut bulk = self.count_window(n);
            if after_tick && full && n == PUMP_BUF_MAX {
                self.tick_full = [self.tick_full[1], Some(self.window_no)];
            }
            if let [Some(a), Some(b)] = self.tick_full {
                // The two ticks were consecutive, and this is their window or the next.
                bulk |= b <= a.saturating_add(2) && self.window_no <= b.saturating_add(1);
            }
            if !full && !bulk {
                self.arm_tick();
                waits = true;
            }
        }
        if let Some(tcp) = tcp {
            if waits && !self.lowat_raised {
                self.raise_lowat(tcp);
            } else if !waits && self.lowat_raised {
                self.lower_lowat(tcp)?;
            }
        }
        Ok(())
    }

    /// While this direction waits for a tick, the reader's socket should not report each
    /// message the backend writes: every report wakes the worker thread (epoll), only for
    /// it to find that no task wants the bytes yet. SO_RCVLOWAT makes the socket report
    /// readable only once that much is buffered (or on FIN, or when its receive window runs
    /// low), so a stream's messages wake no one until the tick reads them all in one call.
    fn raise_lowat(&mut self, tcp: &TcpStream) {
        if set_rcvlowat(tcp, TICK_LOWAT).is_ok() {
            #[cfg(test)]
            LOWAT_RAISED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.lowat_raised = true;
        }
    }

    /// Back to reporting every byte (before waiting on tokio's readiness again).
    fn lower_lowat(&mut self, tcp: &TcpStream) -> io::Result<()> {
        set_rcvlowat(tcp, 1)?;
        self.lowat_raised = false;
        Ok(())
    }

    /// How far into the buffer may be written: all of it, or what the command watch has
    /// scanned and allowed.
    fn allowed(&mut self, cx: &mut Context<'_>) -> io::Result<usize> {
        Ok(match &mut self.watch {
            None => self.end,
            Some(watch) => {
                watch.advance(cx, self.buf.get(..self.end).unwrap_or_default())?;
                watch.allowed().min(self.end)
            }
        })
    }

    /// Writes the buffer from `start` up to `limit`.
    fn poll_write_until<W>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
        limit: usize,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        while self.start < limit {
            let chunk = self.buf.get(self.start..limit).unwrap_or_default();
            let n = ready!(w.as_mut().poll_write(cx, chunk))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            // An AsyncWrite never reports more than it was given; do not trust it with the
            // slice bounds anyway.
            self.start = self.start.saturating_add(n).min(limit);
            self.total += n as u64;
            self.need_flush = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes `w` if something was written since the last flush.
    fn poll_flush_written<W>(
        &mut self,
        cx: &mut Context<'_>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + ?Sized,
    {
        if self.need_flush {
            ready!(w.poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl OneWay {
    /// Counts a read of `n` bytes in the current window; true when this window or the one
    /// before it carried [`BULK_WINDOW_BYTES`] (a bulk transfer: do not wait for ticks).
    fn count_window(&mut self, n: usize) -> bool {
        let now = window_index(tokio::time::Instant::now(), self.batch);
        if now != self.window_no {
            // The window before this one, if the last read fell in it; else it carried nothing.
            self.prev_window_bytes = if now == self.window_no.saturating_add(1) {
                self.window_bytes
            } else {
                0
            };
            self.window_no = now;
            self.window_bytes = 0;
        }
        self.window_bytes = self.window_bytes.saturating_add(n as u64);
        self.window_bytes.max(self.prev_window_bytes) >= BULK_WINDOW_BYTES
    }

    /// The next read waits for the first shared tick after now.
    fn arm_tick(&mut self) {
        let at = next_tick(tokio::time::Instant::now(), self.batch);
        match &mut self.tick {
            Some(t) => t.as_mut().reset(at),
            None => self.tick = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.wait_tick = true;
    }
}

/// Times a socket's SO_RCVLOWAT was raised, for the tests.
#[cfg(test)]
static LOWAT_RAISED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets SO_RCVLOWAT on a TCP socket.
#[cfg(target_os = "linux")]
fn set_rcvlowat(tcp: &TcpStream, bytes: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = bytes;
    // SAFETY: the fd is the live socket `tcp` borrows for the call; the option value is a
    // c_int passed with its own size.
    let r = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_rcvlowat(_tcp: &TcpStream, _bytes: i32) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// The first tick of a `window`-long period strictly after `now`, counted from one
/// process-wide origin, so every relayed session's tick falls in the same timer slot and the
/// worker runs them back to back (the engine's merge window keeps its own clock the same
/// way, `engine::tick`). `now` itself when the window is zero or the clock would overflow.
fn next_tick(now: tokio::time::Instant, window: Duration) -> tokio::time::Instant {
    let w = window.as_nanos();
    if w == 0 {
        return now;
    }
    let ticks = window_index(now, window).saturating_add(1);
    let Some(at) = ticks.checked_mul(w).and_then(|n| u64::try_from(n).ok()) else {
        return now;
    };
    tick_origin(now)
        .checked_add(Duration::from_nanos(at))
        .unwrap_or(now)
}

/// The process-wide origin of the merge window's ticks (the first time anyone asked).
fn tick_origin(now: tokio::time::Instant) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(|| now)
}

/// Which `window`-long period of the shared ticks `now` falls in (0 for a zero window).
fn window_index(now: tokio::time::Instant, window: Duration) -> u128 {
    let w = window.as_nanos();
    if w == 0 {
        return 0;
    }
    now.saturating_duration_since(tick_origin(now)).as_nanos() / w
}

/// Copies both ways between `a` (the client) and `b` (the backend) until both are done, one
/// fails, one is done and the other has not finished within [`LINGER`], or (with `idle`)
/// no byte has moved either way for that long. The direction from `b` to `a` reads on the
/// merge window's ticks once media flows ([`PumpTimes::write_batch`]). Returns (bytes a->b,
/// bytes b->a).
pub async fn pump<A, B>(a: &mut A, b: &mut B, times: impl Into<PumpTimes>) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
{
    pump_watched(a, b, times, None).await
}

/// [`pump`], with the bytes from `a` to `b` passing through a command watch.
pub(crate) async fn pump_watched<A, B>(
    a: &mut A,
    b: &mut B,
    times: impl Into<PumpTimes>,
    watch: Option<Box<relay::Watch>>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + PlainTcp + Unpin + ?Sized,
{
    let times = times.into();
    let idle = times.idle;
    let mut a_to_b = OneWay::new(watch, Duration::ZERO);
    let mut b_to_a = OneWay::new(None, times.write_batch);
    let mut ab_done = false;
    let mut ba_done = false;
    // Bytes moved either way so far, for the idle check.
    // (An atomic only because the future must be Sync; it is never contended.)
    let moved = std::sync::atomic::AtomicU64::new(0);
    // Polls each unfinished direction; Ready(true) once both are done, Ready(false) once
    // at least one is.
    let mut step = |cx: &mut Context<'_>| -> Poll<io::Result<bool>> {
        if !ab_done {
            if let Poll::Ready(r) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                r?;
                ab_done = true;
            }
        }
        if !ba_done {
            if let Poll::Ready(r) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                r?;
                ba_done = true;
            }
        }
        moved.store(
            a_to_b.total.wrapping_add(b_to_a.total),
            std::sync::atomic::Ordering::Relaxed,
        );
        if ab_done || ba_done {
            Poll::Ready(Ok(ab_done && ba_done))
        } else {
            Poll::Pending
        }
    };
    // Until one side finishes (or the session goes idle)...
    let both = match idle {
        None => poll_fn(&mut step).await?,
        Some(idle) => {
            // The timer is re-armed only when it fires and bytes have moved since the last
            // time, so a busy stream pays nothing per read.
            let mut timer = Box::pin(tokio::time::sleep(idle));
            let mut seen = 0u64;
            poll_fn(|cx| {
                if let Poll::Ready(r) = step(cx) {
                    return Poll::Ready(r);
                }
                while timer.as_mut().poll(cx).is_ready() {
                    let now = moved.load(std::sync::atomic::Ordering::Relaxed);
                    if now == seen {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no byte either way for {idle:?} (limits.relay_idle_timeout_secs)"
                            ),
                        )));
                    }
                    seen = now;
                    timer.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                Poll::Pending
            })
            .await?
        }
    };
    // ...then the other may run on briefly.
    if !both {
        let rest = tokio::time::timeout(
            LINGER,
            poll_fn(|cx| match ready!(step(cx)) {
                Ok(true) => Poll::Ready(Ok(())),
                Ok(false) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            }),
        )
        .await;
        match rest {
            Ok(r) => r?,
            Err(_) => {
                tracing::debug!("one side closed; the other did not finish within {LINGER:?}")
            }
        }
    }
    Ok((a_to_b.total, b_to_a.total))
}

/// A plain HTTP request (HTTP-FLV's `GET /APP/STREAM.flv`) reached a relaying gateway: the
/// backend speaks RTMP, so there is nothing to relay it to. Answered at once with 501 and
/// why, never left hanging.
async fn not_relayed(mut client: ClientStream) {
    use crate::net::http;
    let head_only = client
        .http
        .as_ref()
        .is_some_and(|h| h.method == http::Method::Head);
    tracing::info!(
        "{}: HTTP request answered 501: HTTP-FLV needs the built-in engine (this gateway relays to --upstream)",
        client.label()
    );
    let reply = http::response(
        501,
        "Not Implemented",
        &[],
        "HTTP-FLV playback needs rtmpgate's built-in engine; this gateway relays RTMP to a \
         backend (--upstream / [upstream]), which HTTP cannot be relayed to. Play the stream \
         over rtmp:// instead, or serve it from a gateway without an upstream.\n",
        head_only,
    );
    http::answer(&mut client, &reply, std::time::Duration::from_secs(5)).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pump_copies_both_ways_and_closes() {
        let (mut client, mut gw_client) = tokio::io::duplex(1024);
        let (mut gw_backend, mut backend) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(async move { pump(&mut gw_client, &mut gw_backend, None).await.unwrap() });
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        backend.write_all(b"bye").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
        assert_eq!(task.await.unwrap(), (300_000, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn pump_closes_a_session_idle_both_ways() {
        let (mut client, mut gw_client) = tokio::io::duplex(1024);
        let (mut gw_backend, mut backend) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(180);
        let started = tokio::time::Instant::now();
        let task =
            tokio::spawn(async move { pump(&mut gw_client, &mut gw_backend, Some(idle)).await });
        // Traffic every 100 s keeps it open past one idle period...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(100)).await;
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            backend.read_exact(&mut got).await.unwrap();
        }
        // ...then silence closes it within two idle periods of the last byte.
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(300 + 180),
            "closed too early: {took:?}"
        );
        assert!(
            took <= Duration::from_secs(300 + 2 * 180),
            "closed too late: {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pump_batches_the_backend_side_only_once_media_flows() {
        let (mut client, mut gw_client) = tokio::io::duplex(256 * 1024);
        let (mut gw_backend, mut backend) = tokio::io::duplex(256 * 1024);
        let window = Duration::from_millis(80);
        let times = PumpTimes {
            idle: None,
            write_batch: window,
        };
        let task = tokio::spawn(async move { pump(&mut gw_client, &mut gw_backend, times).await });
        // Starting up (handshake, replies): every reply is passed on at once, no tick waited
        // for (with paused time, any wait on a timer would advance the clock).
        let t0 = tokio::time::Instant::now();
        for _ in 0..3 {
            backend.write_all(&[7u8; 1500]).await.unwrap();
            let mut got = [0u8; 1500];
            client.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "a startup reply waited for a tick"
        );
        // Media: past STARTUP_BYTES, a message waits for the next shared tick, at most one
        // window, and several messages written within a window arrive together.
        let media = vec![9u8; STARTUP_BYTES as usize];
        backend.write_all(&media).await.unwrap();
        let mut got = vec![0u8; media.len()];
        client.read_exact(&mut got).await.unwrap();
        let t1 = tokio::time::Instant::now();
        backend.write_all(b"frame one").await.unwrap();
        backend.write_all(b"frame two").await.unwrap();
        let mut two = [0u8; 18];
        client.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"frame oneframe two");
        let waited = t1.elapsed();
        assert!(waited > Duration::ZERO, "media did not wait for the tick");
        assert!(
            waited <= window,
            "media waited {waited:?}, more than one window"
        );
        // The client's side is never held back.
        let t2 = tokio::time::Instant::now();
        client.write_all(b"ack").await.unwrap();
        let mut ack = [0u8; 3];
        backend.read_exact(&mut ack).await.unwrap();
        assert_eq!(t2.elapsed(), Duration::ZERO);
        drop(client);
        drop(backend);
        // Ends (the result of writing to a dropped peer does not matter here).
        let _ = task.await.unwrap();
    }

    /// A backend that sends faster than one window can hold (as fast as it goes, 16 KiB at a
    /// time) is read as soon as bytes arrive once a window carried BULK_WINDOW_BYTES: the
    /// merge window must not cap a bulk transfer at what the sockets hold per tick. With every
    /// short read waiting for a tick (the behaviour before), 4 MiB through this 256 KiB pipe
    /// takes at least 16 windows; the bound allows 4.
    #[tokio::test(start_paused = true)]
    async fn pump_does_not_hold_back_a_bulk_transfer() {
        let (mut client, mut gw_client) = tokio::io::duplex(256 * 1024);
        let (mut gw_backend, mut backend) = tokio::io::duplex(256 * 1024);
        let window = Duration::from_millis(40);
        let times = PumpTimes {
            idle: None,
            write_batch: window,
        };
        let task = tokio::spawn(async move { pump(&mut gw_client, &mut gw_backend, times).await });
        let total = 4 * 1024 * 1024 + STARTUP_BYTES as usize;
        let sender = tokio::spawn(async move {
            let piece = vec![5u8; 16 * 1024];
            let mut sent = 0;
            while sent < total {
                backend.write_all(&piece).await.unwrap();
                sent += piece.len();
                // One piece per write the gateway can see (nginx-rtmp writes message by
                // message): without the yield the pipe would only ever hold full reads.
                tokio::task::yield_now().await;
            }
            backend
        });
        let t0 = tokio::time::Instant::now();
        let mut got = vec![0u8; total];
        client.read_exact(&mut got).await.unwrap();
        let took = t0.elapsed();
        assert!(got.iter().all(|&b| b == 5));
        assert!(
            took <= 4 * window,
            "a bulk transfer waited {took:?} for ticks ({} windows)",
            took.as_millis() / window.as_millis()
        );
        // Slow again (one small message per two windows): back to one read per tick, so
        // a window that carries little still merges.
        let mut backend = sender.await.unwrap();
        for _ in 0..3 {
            tokio::time::sleep(2 * window).await;
        }
        // The first message after the pause is read at once (the read was waiting); it
        // empties the socket, so what follows waits for the tick again.
        backend.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        client.read_exact(&mut x).await.unwrap();
        let t1 = tokio::time::Instant::now();
        backend.write_all(b"slow one").await.unwrap();
        backend.write_all(b"slow two").await.unwrap();
        let mut two = [0u8; 16];
        client.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"slow oneslow two");
        let waited = t1.elapsed();
        assert!(
            waited > Duration::ZERO && waited <= window,
            "a slow stream's message waited {waited:?} (expected: until the next tick)"
        );
        drop(client);
        drop(backend);
        let _ = task.await.unwrap();
    }

    /// The same with sockets that hold less than BULK_WINDOW_BYTES between them: a window
    /// spent waiting for a tick can then never carry enough to count as bulk, so the rule
    /// must also take a read right after a tick that fills the largest buffer as bulk.
    /// Before that, this transfer moved one pipe-full per window (64 windows).
    #[tokio::test(start_paused = true)]
    async fn pump_does_not_cap_a_bulk_transfer_at_what_the_sockets_hold() {
        let (mut client, mut gw_client) = tokio::io::duplex(64 * 1024);
        let (mut gw_backend, mut backend) = tokio::io::duplex(64 * 1024);
        let window = Duration::from_millis(40);
        let times = PumpTimes {
            idle: None,
            write_batch: window,
        };
        let task = tokio::spawn(async move { pump(&mut gw_client, &mut gw_backend, times).await });
        let total = 4 * 1024 * 1024 + STARTUP_BYTES as usize;
        let sender = tokio::spawn(async move {
            let piece = vec![5u8; 16 * 1024];
            let mut sent = 0;
            while sent < total {
                backend.write_all(&piece).await.unwrap();
                sent += piece.len();
                tokio::task::yield_now().await;
            }
            backend
        });
        let t0 = tokio::time::Instant::now();
        let mut got = vec![0u8; total];
        client.read_exact(&mut got).await.unwrap();
        let took = t0.elapsed();
        assert!(
            took <= 8 * window,
            "a bulk transfer waited {took:?} for ticks ({} windows)",
            took.as_millis() / window.as_millis()
        );
        let backend = sender.await.unwrap();
        drop(client);
        drop(backend);
        let _ = task.await.unwrap();
    }

    /// Two connected loopback sockets: (ours, theirs).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (theirs, ours) = tokio::join!(TcpStream::connect(addr), l.accept());
        (ours.unwrap().0, theirs.unwrap())
    }

    /// With a plain backend socket, the direction waiting for a tick raises the socket's
    /// SO_RCVLOWAT (so the backend's messages wake no one) and reads it directly at the
    /// tick: a message far below the mark still arrives by the next tick, a window with
    /// nothing in it puts the mark back (the next message is read when it comes), and the
    /// backend closing while the mark is raised ends the stream.
    #[tokio::test]
    async fn pump_reads_a_raised_low_water_mark_socket_at_each_tick() {
        let (mut gw_client, mut client) = tcp_pair().await;
        let (mut gw_backend, mut backend) = tcp_pair().await;
        let times = PumpTimes {
            idle: None,
            write_batch: Duration::from_millis(40),
        };
        let raised = LOWAT_RAISED.load(std::sync::atomic::Ordering::Relaxed);
        let task = tokio::spawn(async move {
            let r = pump(&mut gw_client, &mut gw_backend, times).await;
            (r, gw_client, gw_backend)
        });
        // Liveness bound only (not a speed check): a message held by the mark would never come.
        let bound = Duration::from_secs(10);
        let startup = vec![3u8; STARTUP_BYTES as usize];
        backend.write_all(&startup).await.unwrap();
        let mut got = vec![0u8; startup.len()];
        client.read_exact(&mut got).await.unwrap();
        for i in 0..5u8 {
            backend.write_all(&[i; 10]).await.unwrap();
            let mut m = [0u8; 10];
            tokio::time::timeout(bound, client.read_exact(&mut m))
                .await
                .expect("a small message was held back")
                .unwrap();
            assert_eq!(m, [i; 10]);
        }
        assert!(
            LOWAT_RAISED.load(std::sync::atomic::Ordering::Relaxed) > raised,
            "the backend socket's low-water mark was never raised"
        );
        // Three windows without a byte, then one message.
        tokio::time::sleep(Duration::from_millis(150)).await;
        backend.write_all(b"after a pause").await.unwrap();
        let mut m = [0u8; 13];
        tokio::time::timeout(bound, client.read_exact(&mut m))
            .await
            .expect("the message after a pause was held back")
            .unwrap();
        assert_eq!(&m, b"after a pause");
        // A message, then the backend closes while the mark is up again.
        backend.write_all(b"last").await.unwrap();
        drop(backend);
        let mut rest = Vec::new();
        tokio::time::timeout(bound, client.read_to_end(&mut rest))
            .await
            .expect("the backend's close was not passed on")
            .unwrap();
        assert_eq!(&rest, b"last");
        drop(client);
        let (r, _, _) = task.await.unwrap();
        assert_eq!(r.unwrap().1, STARTUP_BYTES + 50 + 13 + 4);
    }

    /// A backend that sends with Nagle's algorithm (no TCP_NODELAY, as nginx-rtmp) holds each
    /// small message while the one before is unacknowledged, and the relay, waiting for its
    /// tick, acknowledges nothing: what the backend wrote in a window only leaves it when the
    /// tick's read sends the ACK. The tick must then read again and forward those bytes on
    /// the same tick; when it did not, every message waited one to two windows (median about
    /// 1.5 windows, 56-60 ms behind nginx-rtmp at 40 ms) instead of at most one. Not a speed
    /// check: the median of 60 messages against one window, where the two behaviours sit at
    /// half a window and one and a half; up to three rounds, so that a round slowed by a busy
    /// machine does not fail it, while the old behaviour fails every round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pump_forwards_what_the_ticks_ack_releases_on_the_same_tick() {
        let window = Duration::from_millis(40);
        let mut rounds = Vec::new();
        for _ in 0..3 {
            let waited = waits_behind_a_nagle_backend(window).await;
            let median = waited[waited.len() / 2];
            if median < window {
                return;
            }
            rounds.push((median, waited));
        }
        panic!(
            "messages waited more than one {window:?} window (median) behind a Nagle backend \
             in every round: {rounds:?}"
        );
    }

    /// One round of the test above: how long each of 60 messages, one every 5 ms, waited
    /// between the backend's write and the client's read, sorted.
    async fn waits_behind_a_nagle_backend(window: Duration) -> Vec<Duration> {
        let (mut gw_client, mut client) = tcp_pair().await;
        let (mut gw_backend, mut backend) = tcp_pair().await;
        let times = PumpTimes {
            idle: None,
            write_batch: window,
        };
        let task = tokio::spawn(async move {
            let r = pump(&mut gw_client, &mut gw_backend, times).await;
            (r, gw_client, gw_backend)
        });
        let startup = vec![3u8; STARTUP_BYTES as usize];
        backend.write_all(&startup).await.unwrap();
        let mut got = vec![0u8; startup.len()];
        client.read_exact(&mut got).await.unwrap();
        // One 100-byte message every 5 ms, each carrying its index.
        const MESSAGES: usize = 60;
        let t0 = std::time::Instant::now();
        let sender = tokio::spawn(async move {
            let mut sent_at = Vec::with_capacity(MESSAGES);
            for i in 0..MESSAGES {
                let mut m = [0u8; 100];
                m[0] = i as u8;
                sent_at.push(t0.elapsed());
                backend.write_all(&m).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (sent_at, backend)
        });
        let mut arrived = Vec::with_capacity(MESSAGES);
        for i in 0..MESSAGES {
            let mut m = [0u8; 100];
            tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut m))
                .await
                .expect("a message was held back")
                .unwrap();
            assert_eq!(m[0] as usize, i);
            arrived.push(t0.elapsed());
        }
        let (sent_at, backend) = sender.await.unwrap();
        let mut waited: Vec<Duration> = arrived
            .iter()
            .zip(&sent_at)
            .map(|(a, s)| a.saturating_sub(*s))
            .collect();
        waited.sort();
        drop(client);
        drop(backend);
        let _ = task.await.unwrap();
        waited
    }

    #[tokio::test(start_paused = true)]
    async fn pump_gives_up_on_a_side_that_never_closes() {
        let (client, mut gw_client) = tokio::io::duplex(1024);
        let (mut gw_backend, _backend) = tokio::io::duplex(1024);
        drop(client);
        let r = pump(&mut gw_client, &mut gw_backend, None).await.unwrap();
        assert_eq!(r, (0, 0));
    }
}
