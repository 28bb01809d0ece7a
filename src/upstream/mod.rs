//! Backend connector: forwards each client stream to an rtmp:// or rtmps:// server, byte for byte.
//!
//! One TCP (or TLS) connection to the backend per client, an optional PROXY protocol header
//! first, then a two-way copy through one fixed buffer per direction. When one side ends, the
//! other is flushed and shut down; the remaining direction gets a short grace period to
//! deliver what is in flight, then both are closed.

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

use crate::door::proxy_protocol::{self, ProxyVersion};
use crate::door::tls::{self, TlsError};
use crate::limits::Limits;
use crate::net::url::{UpstreamScheme, UpstreamUrl};
use crate::stream::{ClientStream, StreamHandler};

/// Each direction starts with a small buffer (a player's side only ever carries acks) and
/// doubles it, up to [`PUMP_BUF_MAX`], whenever a read fills it (a media stream), so ten
/// thousand idle players cost little and a busy stream moves a video frame in one read.
const PUMP_BUF_MIN: usize = 4 * 1024;
/// Largest buffer per direction.
const PUMP_BUF_MAX: usize = 64 * 1024;
/// How long the other direction may run on after one side has closed.
const LINGER: Duration = Duration::from_secs(5);

/// Upstream settings: the backend's URL and how to reach it (`--upstream*`, `[upstream]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub url: UpstreamUrl,
    /// Extra CA certificates trusted for an rtmps:// backend.
    pub ca: Option<PathBuf>,
    pub proxy_protocol: Option<ProxyVersion>,
    pub connect_timeout: Duration,
}

/// Why a client could not be forwarded, or how the forwarding ended badly.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve upstream host {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("upstream host {0} resolved to no address")]
    NoAddress(String),
    #[error("cannot connect to upstream {url} ({addr}): {source}; is the backend running and reachable?")]
    Connect {
        url: UpstreamUrl,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("connecting to upstream {url} timed out after {secs} s")]
    ConnectTimeout { url: UpstreamUrl, secs: u64 },
    #[error("TLS handshake with upstream {url} failed: {source}; if the backend uses a private CA pass it with --upstream-ca")]
    Tls { url: UpstreamUrl, source: io::Error },
    #[error("upstream host {0} is not a valid TLS server name")]
    ServerName(String),
    #[error("sending the PROXY protocol header to upstream {url}: {source}")]
    ProxyHeader { url: UpstreamUrl, source: io::Error },
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
}

/// The backend and how to reach it.
pub struct Upstream {
    url: UpstreamUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    proxy_protocol: Option<ProxyVersion>,
    connect_timeout: Duration,
    /// Close a relayed session after this long without a byte either way (None: never).
    idle_timeout: Option<Duration>,
    /// Backend unreachable: every client would log a line; at most one a second.
    connect_failures: crate::throttle::LogThrottle,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .field("proxy_protocol", &self.proxy_protocol)
            .finish()
    }
}

/// Either leg of the backend connection.
enum Leg {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Upstream {
    /// Prepares the connector; for rtmps:// this loads the trusted roots (and the extra CA).
    pub fn new(settings: &UpstreamSettings, limits: &Limits) -> Result<Upstream, UpstreamError> {
        let tls = match settings.url.scheme {
            UpstreamScheme::Rtmp => None,
            UpstreamScheme::Rtmps => {
                let config = tls::client_config(settings.ca.as_deref())?;
                let name = ServerName::try_from(settings.url.host.clone())
                    .map_err(|_| UpstreamError::ServerName(settings.url.host.clone()))?;
                Some((TlsConnector::from(config), name))
            }
        };
        Ok(Upstream {
            url: settings.url.clone(),
            tls,
            proxy_protocol: settings.proxy_protocol,
            connect_timeout: settings.connect_timeout,
            idle_timeout: limits.relay_idle_timeout(),
            connect_failures: crate::throttle::LogThrottle::new(),
        })
    }

    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// The handler the front door calls for every client.
    pub fn handler(self: Arc<Self>) -> StreamHandler {
        Arc::new(move |client: ClientStream| {
            let this = self.clone();
            Box::pin(async move { this.serve(client).await })
        })
    }

    /// Forwards one client until either side is done. Failures are logged here.
    pub async fn serve(&self, mut client: ClientStream) {
        let label = client.label();
        let url = self.url.to_string();
        crate::door::sessions::tag_current(|t| {
            t.role = Some(crate::door::sessions::Role::Relay);
            t.upstream = Some(url);
        });
        let began = std::time::Instant::now();
        let connected = tokio::time::timeout(
            self.connect_timeout,
            self.connect(client.peer, client.local),
        )
        .await;
        crate::metrics::global().upstream_connect(began.elapsed(), matches!(connected, Ok(Ok(_))));
        let leg = match connected {
            Ok(Ok(leg)) => leg,
            Ok(Err(e)) => {
                if let Some(also) = self.connect_failures.should_log("clients closed so") {
                    tracing::warn!("{label}: closing client, {e}{also}");
                }
                let _ = client.shutdown().await;
                return;
            }
            Err(_) => {
                let e = UpstreamError::ConnectTimeout {
                    url: self.url.clone(),
                    secs: self.connect_timeout.as_secs(),
                };
                if let Some(also) = self.connect_failures.should_log("clients closed so") {
                    tracing::warn!("{label}: closing client, {e}{also}");
                }
                let _ = client.shutdown().await;
                return;
            }
        };
        let result = match leg {
            Leg::Tcp(mut up) => pump(&mut client, &mut up, self.idle_timeout).await,
            Leg::Tls(mut up) => pump(&mut client, &mut *up, self.idle_timeout).await,
        };
        if let Err(e) = result {
            tracing::debug!("{label}: forwarding to {} ended: {e}", self.url);
        }
    }

    async fn connect(&self, peer: SocketAddr, local: SocketAddr) -> Result<Leg, UpstreamError> {
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
        crate::door::listener::tune_socket(&tcp);
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
}

impl OneWay {
    fn new() -> Self {
        OneWay {
            grow: false,
            buf: vec![0u8; PUMP_BUF_MIN].into_boxed_slice(),
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
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.read_done {
                if self.grow {
                    let len = self.buf.len().saturating_mul(2).min(PUMP_BUF_MAX);
                    self.buf = vec![0u8; len].into_boxed_slice();
                    self.grow = false;
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written (TLS buffers).
                        if self.need_flush {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    // A TLS peer that closes without close_notify has still ended its stream.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.read_done = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.start = 0;
                            self.end = n;
                            self.grow = n == self.buf.len() && n < PUMP_BUF_MAX;
                        }
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                // An AsyncWrite never reports more than it was given; do not trust it with
                // the slice bounds anyway.
                self.start = self.start.saturating_add(n).min(self.end);
                self.total += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(self.total));
            }
        }
    }
}

/// Copies both ways between `a` (the client) and `b` (the backend) until both are done, one
/// fails, one is done and the other has not finished within [`LINGER`], or (with `idle`)
/// no byte has moved either way for that long. Returns (bytes a->b, bytes b->a).
pub async fn pump<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = OneWay::new();
    let mut b_to_a = OneWay::new();
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
    async fn pump_gives_up_on_a_side_that_never_closes() {
        let (client, mut gw_client) = tokio::io::duplex(1024);
        let (mut gw_backend, _backend) = tokio::io::duplex(1024);
        drop(client);
        let r = pump(&mut gw_client, &mut gw_backend, None).await.unwrap();
        assert_eq!(r, (0, 0));
    }
}
