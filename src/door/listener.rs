//! Listeners: bind, accept, admit within the connection limits, sniff, and dispatch each
//! connection to raw RTMP, RTMPE or the RTMPT tunnel, inside TLS on TLS listeners.
//!
//! The `listening on SCHEME://ADDR` line logged for each bound socket is an interface: tests
//! bind port 0 and read the real port from it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::net::tls::TlsServer;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::door::admit::{ConnLimiter, IpGuard, PeerLines};
use crate::door::rtmpe;
use crate::door::rtmpt::Tunnel;
use crate::door::sniff::{self, Kind};
use crate::limits::Limits;
use crate::live::Live;
use crate::metrics::{self, Refusal};
use crate::net::addr::Cidr;
use crate::net::proxy_protocol;
use crate::net::short_hex;
use crate::net::socket::{bind_listener, defer_accept, tune_accepted};
use crate::net::tls_stream::TlsStream;
use crate::net::url::{RtmpUrl, Scheme};
use crate::stream::{ByteStream, ClientStream, Prefixed, StreamHandler, Transport};

/// How the door treats connections, beyond the listener list.
#[derive(Clone)]
pub struct DoorOptions {
    pub limits: Arc<Limits>,
    /// Required when any listener is rtmps:// or rtmpts://.
    pub tls: Option<TlsServer>,
    /// Serve RTMPE handshakes (false: refuse them).
    pub rtmpe: bool,
    /// Expect a PROXY protocol header from a load balancer on every connection.
    pub accept_proxy_protocol: bool,
    /// With `accept_proxy_protocol`: the only sources allowed to connect (and so to name a
    /// client address); empty: any.
    pub trusted_proxies: Vec<Cidr>,
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {url}: {source}{hint}")]
    Bind {
        url: String,
        source: io::Error,
        hint: String,
    },
    #[error("cannot listen on {url}: host does not resolve ({source})")]
    Resolve { url: String, source: io::Error },
    #[error("cannot listen on {url}: TLS listener without a TLS configuration")]
    NoTls { url: String },
}

fn bind_hint(e: &io::Error, addr: SocketAddr, scheme: Scheme) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            let alt = if scheme.is_tls() { 8443 } else { 8080 };
            format!(
                "; port {} needs privileges: run as root, grant CAP_NET_BIND_SERVICE \
                 (sudo setcap cap_net_bind_service=+ep $(which rtmpgate)), or listen on {alt}",
                addr.port()
            )
        }
        io::ErrorKind::AddrInUse => format!(
            "; another program (another rtmpgate, an RTMP or web server) already listens on port {}: \
             stop it or pick another port",
            addr.port()
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "; no network interface here has the address {}: use 0.0.0.0, [::] or one of this host's addresses",
            addr.ip()
        ),
        _ => String::new(),
    }
}

/// What every connection task shares.
struct Ctx {
    /// Read once when a connection is accepted (a reload replaces it for later ones).
    opts: Arc<Live<DoorOptions>>,
    handler: StreamHandler,
    conns: Arc<ConnLimiter>,
    tunnel: Arc<Tunnel>,
    /// RTMPE handshakes per second per address, shared with the tunnel's RTMPTE sessions.
    rtmpe_rates: Arc<rtmpe::HandshakeRates>,
}

/// One bound socket and what it was asked to be.
struct Bound {
    /// The listener as configured (what a reload compares).
    url: RtmpUrl,
    scheme: Scheme,
    listener: TcpListener,
    local: SocketAddr,
}

/// The front door: bound listeners, ready to accept.
pub struct Door {
    bound: Vec<Bound>,
    ctx: Arc<Ctx>,
}

impl Door {
    /// Binds every listener (a host name binds each address it resolves to).
    pub async fn bind(
        urls: &[RtmpUrl],
        opts: DoorOptions,
        handler: StreamHandler,
    ) -> Result<Door, BindError> {
        let bound = bind_all(urls, urls, opts.tls.is_some()).await?;
        // Shared with the tunnel: its sessions count against the same limits.
        let conns = ConnLimiter::new(&opts.limits);
        let rtmpe_rates = Arc::new(rtmpe::HandshakeRates::new(&opts.limits));
        let tunnel_limits = opts.limits.clone();
        let opts = Arc::new(Live::new(opts));
        // One tunnel for every listener, so a session may move between connections.
        let tunnel = Tunnel::with_limiter(
            tunnel_limits,
            tunnel_sessions(
                handler.clone(),
                opts.clone(),
                rtmpe_rates.clone(),
                conns.clone(),
            ),
            conns.clone(),
        );
        Ok(Door {
            bound,
            ctx: Arc::new(Ctx {
                opts,
                handler,
                conns,
                tunnel,
                rtmpe_rates,
            }),
        })
    }

    /// The RTMPT tunnel shared by the listeners (for its shutdown and session count).
    pub fn tunnel(&self) -> Arc<Tunnel> {
        self.ctx.tunnel.clone()
    }

    /// The bound addresses, in listener order.
    pub fn local_addrs(&self) -> Vec<(Scheme, SocketAddr)> {
        self.bound.iter().map(|b| (b.scheme, b.local)).collect()
    }

    /// Starts accepting. Each listener logs `listening on SCHEME://ADDR` and stops accepting
    /// when `shutdown` turns true.
    pub fn start(self, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        self.bound
            .into_iter()
            .map(|b| {
                let label: Arc<str> = format!("{}://{}", b.scheme.as_str(), b.local).into();
                tracing::info!("listening on {label}");
                tokio::spawn(accept_loop(self.ctx.clone(), b, label, shutdown.clone()))
            })
            .collect()
    }
}

/// One accepting socket of the live listener set.
struct Running {
    url: RtmpUrl,
    local: SocketAddr,
    label: Arc<str>,
    task: JoinHandle<()>,
}

/// What a reload did to the listeners (labels as logged: `SCHEME://ADDR`).
#[derive(Debug, Default, serde::Serialize)]
pub struct ListenerChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Every listener accepting after the change.
    pub listening: Vec<String>,
}

/// The listeners accepting now. A reload ([`Listening::apply`]) binds the added ones and
/// stops the removed ones; connections already accepted on a removed listener carry on
/// (they are tasks of their own, not the accept loop's).
pub struct Listening {
    ctx: Arc<Ctx>,
    shutdown: watch::Receiver<bool>,
    running: std::sync::Mutex<Vec<Running>>,
}

impl Door {
    /// Starts accepting, as [`Door::start`], in a set a reload can change.
    pub fn start_live(self, shutdown: watch::Receiver<bool>) -> Arc<Listening> {
        let live = Arc::new(Listening {
            ctx: self.ctx,
            shutdown,
            running: std::sync::Mutex::new(Vec::new()),
        });
        let started: Vec<Running> = self.bound.into_iter().map(|b| live.spawn(b)).collect();
        live.lock().extend(started);
        live.publish_names();
        live
    }
}

impl Listening {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn(&self, b: Bound) -> Running {
        let label: Arc<str> = format!("{}://{}", b.scheme.as_str(), b.local).into();
        tracing::info!("listening on {label}");
        Running {
            url: b.url.clone(),
            local: b.local,
            label: label.clone(),
            task: tokio::spawn(accept_loop(
                self.ctx.clone(),
                b,
                label,
                self.shutdown.clone(),
            )),
        }
    }

    /// Tells the session accounting which listener owns which local address (the
    /// `listener` label of the metrics).
    fn publish_names(&self) {
        let names = self
            .lock()
            .iter()
            .map(|r| {
                // Every configured listener shows in /metrics from the start, at 0.
                crate::metrics::listener(&r.label);
                (r.local, r.label.clone())
            })
            .collect();
        crate::sessions::set_listener_names(names);
    }

    /// The listeners accepting now.
    pub fn labels(&self) -> Vec<String> {
        self.lock().iter().map(|r| r.label.to_string()).collect()
    }

    /// The options new connections get (limits, TLS, RTMPE, PROXY protocol).
    pub fn options(&self) -> Arc<DoorOptions> {
        self.ctx.opts.get()
    }

    /// Makes `urls` the listener set and `opts` the options of new connections. Listeners
    /// in both the old and the new list keep their sockets; new ones are bound first, and if
    /// any fails to bind nothing changes (the error says which and why). A listener whose
    /// address a removed one holds (a scheme changed on the same port) is bound after the
    /// removed one closed; if that fails, the removed one is bound again and the error
    /// returned.
    pub async fn apply(
        &self,
        urls: &[RtmpUrl],
        opts: DoorOptions,
    ) -> Result<ListenerChange, BindError> {
        let (current, removed_locals): (Vec<RtmpUrl>, Vec<SocketAddr>) = {
            let running = self.lock();
            (
                running.iter().map(|r| r.url.clone()).collect(),
                running
                    .iter()
                    .filter(|r| !urls.contains(&r.url))
                    .map(|r| r.local)
                    .collect(),
            )
        };
        let mut added: Vec<&RtmpUrl> = Vec::new();
        for url in urls {
            if !current.contains(url) && !added.contains(&url) {
                added.push(url);
            }
        }
        let have_tls = opts.tls.is_some();
        let mut bound = Vec::new();
        let mut after_removal = Vec::new();
        for url in &added {
            match bind_all(std::slice::from_ref(*url), urls, have_tls).await {
                Ok(b) => bound.extend(b),
                Err(BindError::Bind { source, .. })
                    if source.kind() == io::ErrorKind::AddrInUse
                        && removed_locals.iter().any(|l| l.port() == url.port) =>
                {
                    after_removal.push(*url)
                }
                // `bound` is dropped: the sockets bound so far close again.
                Err(e) => return Err(e),
            }
        }
        let removed: Vec<Running> = {
            let mut running = self.lock();
            let (keep, gone) = std::mem::take(&mut *running)
                .into_iter()
                .partition(|r| urls.contains(&r.url));
            *running = keep;
            gone
        };
        let mut change = ListenerChange::default();
        for r in &removed {
            r.task.abort();
        }
        let mut removed_urls = Vec::new();
        for r in removed {
            let _ = r.task.await;
            tracing::info!(
                "stopped accepting on {}: removed from the configuration (its open sessions carry on)",
                r.label
            );
            change.removed.push(r.label.to_string());
            if !removed_urls.contains(&r.url) {
                removed_urls.push(r.url);
            }
        }
        for url in after_removal {
            match bind_all(std::slice::from_ref(url), urls, have_tls).await {
                Ok(b) => bound.extend(b),
                Err(e) => {
                    self.restore(&removed_urls, urls).await;
                    return Err(e);
                }
            }
        }
        self.ctx.conns.set_limits(&opts.limits);
        self.ctx.tunnel.set_limits(opts.limits.clone());
        self.ctx
            .rtmpe_rates
            .set_rate(opts.limits.rtmpe_handshakes_per_ip_per_sec);
        self.ctx.opts.set(Arc::new(opts));
        let started: Vec<Running> = bound.into_iter().map(|b| self.spawn(b)).collect();
        change.added = started.iter().map(|r| r.label.to_string()).collect();
        self.lock().extend(started);
        self.publish_names();
        change.listening = self.labels();
        Ok(change)
    }

    /// After a failed change: binds the removed listeners again (best effort, logged).
    async fn restore(&self, removed: &[RtmpUrl], all: &[RtmpUrl]) {
        let opts = self.ctx.opts.get();
        for url in removed {
            match bind_all(std::slice::from_ref(url), all, opts.tls.is_some()).await {
                Ok(b) => {
                    let started: Vec<Running> = b.into_iter().map(|b| self.spawn(b)).collect();
                    self.lock().extend(started);
                }
                Err(e) => tracing::error!("could not restore the listener {url}: {e}"),
            }
        }
        self.publish_names();
    }

    /// Waits until every accept loop has ended (after the shutdown signal).
    pub async fn stopped(&self) {
        let tasks: Vec<Running> = std::mem::take(&mut *self.lock());
        for r in tasks {
            let _ = r.task.await;
        }
    }
}

/// Binds each of `urls` (a host name binds each address it resolves to). `all` is the whole
/// listener list they belong to: an IPv6 wildcard listener is dual-stack by default on
/// Linux, which would collide with an IPv4 listener on the same port, so when the list has
/// both, the IPv6 one takes IPv6 only (as nginx does).
async fn bind_all(
    urls: &[RtmpUrl],
    all: &[RtmpUrl],
    have_tls: bool,
) -> Result<Vec<Bound>, BindError> {
    let mut bound = Vec::with_capacity(urls.len());
    let v4_ports: Vec<u16> = all
        .iter()
        .filter(|u| u.host.parse::<std::net::Ipv4Addr>().is_ok())
        .map(|u| u.port)
        .filter(|p| *p != 0)
        .collect();
    for url in urls {
        if url.scheme.is_tls() && !have_tls {
            return Err(BindError::NoTls {
                url: url.to_string(),
            });
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| BindError::Resolve {
                url: url.to_string(),
                source,
            })?
            .collect();
        for addr in addrs {
            let v6_only = addr.is_ipv6() && v4_ports.contains(&addr.port());
            let listener = bind_listener(addr, Some(v6_only), 1024)
                .and_then(|l| defer_accept(&l).map(|()| l))
                .and_then(TcpListener::from_std)
                .map_err(|source| BindError::Bind {
                    url: url.to_string(),
                    hint: bind_hint(&source, addr, url.scheme),
                    source,
                })?;
            let local = listener.local_addr().unwrap_or(addr);
            bound.push(Bound {
                url: url.clone(),
                scheme: url.scheme,
                listener,
                local,
            });
        }
    }
    Ok(bound)
}

/// Shortest and longest pause after a failed `accept` (out of file descriptors, most often).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

async fn accept_loop(
    ctx: Arc<Ctx>,
    bound: Bound,
    label: Arc<str>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let failures = crate::throttle::LogThrottle::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = bound.listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                // A listener bound to one address hands out connections to that address:
                // ask the kernel (getsockname) only on a wildcard one.
                let local = if bound.local.ip().is_unspecified() {
                    tcp.local_addr().unwrap_or(bound.local)
                } else {
                    bound.local
                };
                tokio::spawn(handle(
                    ctx.clone(),
                    tcp,
                    peer,
                    local,
                    bound.scheme,
                    label.clone(),
                ));
            }
            // The client gave up before we took it: nothing to wait for.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // EMFILE/ENFILE and the like: the pending connection stays in the backlog, so
                // retrying at once would spin. Back off (10 ms doubling to 100 ms) until an
                // accept succeeds, with one log line a second at most.
                if let Some(also) = failures.should_log("failures") {
                    let hint = match e.raw_os_error() {
                        Some(code) if code == libc::EMFILE || code == libc::ENFILE => {
                            "; out of file descriptors: raise the open-file limit \
                             (ulimit -n, LimitNOFILE=) or lower limits.max_connections"
                        }
                        _ => "",
                    };
                    tracing::warn!(
                        "accepting on {label} failed: {e}{hint}; retrying in {} ms{also}",
                        backoff.as_millis()
                    );
                }
                tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    tracing::info!("stopped accepting on {label}");
}

/// One connection, from accept to the end of its session.
///
/// A plain fn returning an `async move` block rather than an `async fn`: this future lives
/// in the connection's task for the connection's whole life, and an async fn's state keeps
/// its arguments twice (where they were passed, and where the body moves them), which put
/// the task one 128-byte step of tokio's task cell higher for every connection.
// Not an async fn on purpose (see above): clippy's rewrite would bring the copy back.
#[allow(clippy::manual_async_fn)]
fn handle(
    ctx: Arc<Ctx>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    scheme: Scheme,
    label: Arc<str>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _open = metrics::global().connection();
        let opts = ctx.opts.get();
        let Some(_total) = ctx.conns.admit_total() else {
            metrics::refused(Refusal::MaxConnections);
            if let Some(also) = ctx.conns.refusals.should_log("refused") {
                tracing::warn!(
                "refusing {peer} on {label}: {} connections open (limits.max_connections){also}",
                opts.limits.max_connections
            );
            }
            return;
        };
        tune_accepted(&tcp);
        let first = opts.limits.first_bytes_timeout();
        // The PROXY header, the per-address admission and the sniff run in their own boxed
        // future, freed once they are done: their timers and reads would otherwise be part of
        // this task, which lives as long as the connection (several hundred bytes for each
        // idle connection).
        let Some((peer, _per_ip, kind, head)) =
            Box::pin(admit_and_sniff(&ctx, &opts, &mut tcp, peer, first, &label)).await
        else {
            return;
        };
        drop(opts);
        if !scheme.is_tls() {
            if kind == Kind::Tls {
                metrics::refused(Refusal::WrongListener);
                ctx.conns.lines.info(peer.ip(), "tls on plain", || {
                    format!(
                        "closing {peer} on {label}: a TLS handshake on a plain listener; TLS \
                     clients (rtmps://, rtmpts://) need an rtmps:// listener"
                    )
                });
                return;
            }
            let post = head.starts_with(b"POST ");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
            let io = Prefixed::new(head, tcp);
            if kind == Kind::Rtmp {
                // The common case, awaited here: only the handler's boxed future is held across
                // it. Through `dispatch` its arguments and state would be part of this task for
                // the whole session; the other kinds go there boxed.
                (ctx.handler)(rtmp_stream(io, peer, local, Some(fd))).await;
                return;
            }
            Box::pin(dispatch(
                &ctx,
                io,
                kind,
                post,
                peer,
                local,
                Some(fd),
                &label,
            ))
            .await;
            return;
        }

        if kind != Kind::Tls {
            metrics::refused(Refusal::WrongListener);
            ctx.conns.lines.info(peer.ip(), "plain on tls", || {
                format!(
                    "closing {peer} on {label}: {} on a TLS listener (first bytes {}); connect \
                 with rtmps:// or rtmpts://, or add a plain rtmp:// listener",
                    describe(kind),
                    short_hex(&head)
                )
            });
            return;
        }
        // The TLS path (and below, the tunnel and RTMPE paths) runs in its own boxed future:
        // an async fn's state is as large as its largest branch and is held for the whole
        // connection, so inlining them would cost every plain RTMP connection several KiB.
        Box::pin(serve_tls(&ctx, tcp, head, peer, local, first, &label)).await;
    }
}

/// A connection's PROXY protocol header (when expected), its admission against the
/// per-address limit, and the sniff of its first bytes: the client's address, the
/// per-address slot (held for the connection's life), what the bytes are and the bytes
/// read. None when the connection was refused or closed (logged here).
async fn admit_and_sniff(
    ctx: &Ctx,
    opts: &DoorOptions,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    first: Duration,
    label: &str,
) -> Option<(SocketAddr, IpGuard, Kind, bytes::Bytes)> {
    let (peer, head) = if opts.accept_proxy_protocol {
        let trusted = &opts.trusted_proxies;
        if !trusted.is_empty() && !trusted.iter().any(|c| c.contains(peer.ip())) {
            // Only a load balancer may say who the client is; anyone else could claim any
            // address (and with it another address's limits).
            metrics::refused(Refusal::ProxyProtocol);
            if let Some(also) = ctx.conns.refusals.should_log("refused") {
                tracing::warn!(
                    "refusing {peer} on {label}: not a trusted proxy (trusted_proxies); with \
                     accept_proxy_protocol every connection must come through a listed load \
                     balancer{also}"
                );
            }
            return None;
        }
        match tokio::time::timeout(first, proxy_protocol::read_header(tcp)).await {
            Ok(Ok((client, rest))) => (client.unwrap_or(peer), rest),
            Ok(Err(e)) => {
                metrics::refused(Refusal::ProxyProtocol);
                ctx.conns.lines.info(peer.ip(), "proxy header", || {
                    format!("closing {peer} on {label}: {e}")
                });
                return None;
            }
            Err(_) => {
                metrics::refused(Refusal::ProxyProtocol);
                ctx.conns.lines.info(peer.ip(), "no proxy header", || {
                    format!(
                        "dropping {peer} on {label}: no PROXY protocol header within {} s",
                        first.as_secs()
                    )
                });
                return None;
            }
        }
    } else {
        (peer, BytesMut::new())
    };
    let Some(per_ip) = ctx.conns.admit_ip(peer.ip()) else {
        metrics::refused(Refusal::MaxConnectionsPerIp);
        if let Some(also) = ctx.conns.refusals.should_log("refused") {
            tracing::warn!(
                "refusing {peer} on {label}: {} connections from this address already open \
                 (limits.max_connections_per_ip){also}",
                opts.limits.max_connections_per_ip
            );
        }
        return None;
    };

    let lines = &ctx.conns.lines;
    let (kind, head) = sniff_in_time(tcp, head, first, peer, label, lines).await?;
    if kind == Kind::Unknown {
        log_unknown(peer, label, &head, lines);
        return None;
    }
    Some((peer, per_ip, kind, head))
}

/// A connection on a TLS listener: the TLS handshake, then the same sniff and dispatch as a
/// plain one.
async fn serve_tls(
    ctx: &Arc<Ctx>,
    tcp: TcpStream,
    head: bytes::Bytes,
    peer: SocketAddr,
    local: SocketAddr,
    first: Duration,
    label: &str,
) {
    // The handshake and the sniff run in their own boxed future, freed once they are done,
    // and hand over the TLS stream boxed: rustls's connection is about 1.2 KiB inline, and an
    // async fn keeps a slot for every value it holds across an await for as long as it runs,
    // so holding it by value here (during the handshake, the sniff, and as dispatch's
    // argument) kept two or three such slots alive for the whole session (heaptrack, 1,000
    // idle RTMPS relay connections: 2.9 KiB per connection in this future).
    let Some((kind, post, io)) =
        Box::pin(accept_and_sniff(ctx, tcp, head, peer, first, label)).await
    else {
        return;
    };
    dispatch(ctx, io, kind, post, peer, local, None, label).await;
}

/// The stream a TLS listener hands on: the sniffed bytes replayed in front of the TLS stream,
/// boxed (see [`serve_tls`]).
pub(crate) type TlsIo = Box<Prefixed<TlsStream<TcpStream>>>;

/// The TLS handshake and the sniff of the first decrypted bytes (and whether they start a
/// POST: the tunnel); None when the connection is closed (logged here).
async fn accept_and_sniff(
    ctx: &Arc<Ctx>,
    tcp: TcpStream,
    head: bytes::Bytes,
    peer: SocketAddr,
    first: Duration,
    label: &str,
) -> Option<(Kind, bool, TlsIo)> {
    let config = ctx.opts.get().tls.clone()?;
    // The bytes the door already read start the ClientHello; the configuration is chosen
    // on it (clients that prefer ChaCha20 get their own order: net::tls::config_for_client).
    let handshake = TlsStream::accept(tcp, &head, &config);
    let mut tls = match tokio::time::timeout(first, handshake).await {
        Ok(Ok(tls)) => {
            metrics::global().tls_handshake(true);
            if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                metrics::global().tls_resumed();
            }
            tls
        }
        Ok(Err(e)) => {
            metrics::global().tls_handshake(false);
            ctx.conns.lines.info(peer.ip(), "tls failed", || {
                format!("closing {peer} on {label}: TLS handshake failed: {e}")
            });
            return None;
        }
        Err(_) => {
            metrics::global().tls_handshake(false);
            ctx.conns.lines.info(peer.ip(), "tls slow", || {
                format!(
                    "dropping {peer} on {label}: TLS handshake not finished within {} s",
                    first.as_secs()
                )
            });
            return None;
        }
    };
    let lines = &ctx.conns.lines;
    let (kind, head) = sniff_in_time(&mut tls, BytesMut::new(), first, peer, label, lines).await?;
    if kind == Kind::Unknown {
        log_unknown(peer, label, &head, lines);
        return None;
    }
    let post = head.starts_with(b"POST ");
    Some((kind, post, Box::new(Prefixed::new(head, tls))))
}

fn log_unknown(peer: SocketAddr, label: &str, head: &[u8], lines: &PeerLines) {
    metrics::refused(Refusal::UnknownProtocol);
    lines.info(peer.ip(), "unknown", || {
        format!(
            "closing {peer} on {label}: neither RTMP nor HTTP (first bytes {})",
            short_hex(head)
        )
    });
}

fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::Rtmp => "plain RTMP",
        Kind::Rtmpe => "RTMPE",
        Kind::Tls => "TLS",
        Kind::Http => "plain HTTP",
        Kind::Unknown => "an unknown protocol",
    }
}

/// Sniffs within the first-bytes timeout; logs and returns None when the peer sent nothing.
async fn sniff_in_time<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    head: BytesMut,
    limit: Duration,
    peer: SocketAddr,
    label: &str,
    lines: &PeerLines,
) -> Option<(Kind, bytes::Bytes)> {
    match tokio::time::timeout(limit, sniff::sniff_with(io, head)).await {
        Ok(Ok((Kind::Unknown, head))) if head.is_empty() => {
            tracing::debug!("{peer} on {label} closed without sending anything");
            None
        }
        Ok(Ok(found)) => Some(found),
        Ok(Err(e)) => {
            lines.info(peer.ip(), "read failed", || {
                format!("closing {peer} on {label}: reading its first bytes failed: {e}")
            });
            None
        }
        Err(_) => {
            metrics::refused(Refusal::FirstBytesTimeout);
            lines.info(peer.ip(), "silent", || {
                format!(
                    "dropping {peer} on {label}: sent nothing recognisable within {} s",
                    limit.as_secs()
                )
            });
            None
        }
    }
}

/// An RTMP client's stream: rtmps:// unless `plain` names its socket (rtmp://).
fn rtmp_stream<I: ByteStream + 'static>(
    io: I,
    peer: SocketAddr,
    local: SocketAddr,
    plain: Option<std::os::fd::RawFd>,
) -> ClientStream {
    let transport = if plain.is_none() {
        Transport::Rtmps
    } else {
        Transport::Rtmp
    };
    let mut stream = ClientStream::new(Box::new(io), transport, peer, local);
    if let Some(fd) = plain {
        // `io` owns this socket and writes go straight to it (the engine's lane).
        stream = stream.with_socket_fd(fd);
    }
    stream
}

/// Hands a sniffed connection to the right layer. `post`: an HTTP request that opens with
/// POST (the RTMPT tunnel's only method); any other HTTP request is a plain one (HTTP-FLV).
/// `plain`: the TCP socket's descriptor when `io` is that socket with the sniffed bytes put
/// back in front of its reads (None on a TLS listener).
#[allow(clippy::too_many_arguments)]
async fn dispatch<I: ByteStream + 'static>(
    ctx: &Arc<Ctx>,
    io: I,
    kind: Kind,
    post: bool,
    peer: SocketAddr,
    local: SocketAddr,
    plain: Option<std::os::fd::RawFd>,
    label: &str,
) {
    let tls = plain.is_none();
    match kind {
        Kind::Rtmp => (ctx.handler)(rtmp_stream(io, peer, local, plain)).await,
        Kind::Http if post => Box::pin(ctx.tunnel.serve_connection(io, peer, local, tls)).await,
        Kind::Http => Box::pin(serve_http(ctx, io, peer, local, tls, label)).await,
        Kind::Rtmpe if tls => {
            metrics::refused(Refusal::WrongListener);
            ctx.conns.lines.info(peer.ip(), "rtmpe in tls", || {
                format!(
                    "closing {peer} on {label}: RTMPE inside TLS is not supported; use \
                     rtmps:// or rtmpe:// on a plain listener"
                )
            });
        }
        Kind::Rtmpe if !ctx.opts.get().rtmpe => {
            metrics::refused(Refusal::RtmpeDisabled);
            ctx.conns.lines.info(peer.ip(), "rtmpe off", || {
                format!(
                    "refusing RTMPE from {peer} on {label}: RTMPE is disabled (--no-rtmpe / \
                     rtmpe = false)"
                )
            });
        }
        Kind::Rtmpe => Box::pin(serve_rtmpe(ctx, io, peer, local, label)).await,
        Kind::Tls => {
            ctx.conns.lines.info(peer.ip(), "tls in tls", || {
                format!("closing {peer} on {label}: TLS inside TLS")
            });
        }
        Kind::Unknown => {
            ctx.conns.lines.info(peer.ip(), "unknown", || {
                format!("closing {peer} on {label}: neither RTMP nor HTTP")
            });
        }
    }
}

/// A plain HTTP request (GET, HEAD, OPTIONS...; not the tunnel): its head is read within
/// `limits.max_http_header` bytes and `limits.http_header_timeout_secs`, then the stream goes
/// to the same handler as RTMP clients, as transport `http`/`https` with the head attached
/// (the engine serves HTTP-FLV; the relay answers that it cannot). A malformed or oversized
/// head, and an RTMPT path asked with another method than POST, are answered here.
async fn serve_http<I: ByteStream + 'static>(
    ctx: &Arc<Ctx>,
    mut io: I,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    label: &str,
) {
    use crate::net::http;
    let limits = ctx.opts.get().limits.clone();
    let reply_within = limits.http_header_timeout();
    let head = match http::read_head(
        &mut io,
        Vec::new(),
        limits.max_http_header,
        limits.http_header_timeout(),
    )
    .await
    {
        Ok(head) => head,
        Err(e) => {
            ctx.conns.lines.info(peer.ip(), "bad http", || {
                format!("closing {peer} on {label}: {e}")
            });
            if let Some((status, reason)) = e.status() {
                let body = format!("{e}\n");
                http::answer(
                    &mut io,
                    &http::response(status, reason, &[], &body, false),
                    reply_within,
                )
                .await;
            }
            return;
        }
    };
    if crate::door::rtmpt::path::parse(&head.path).is_ok() {
        // An RTMPT path with another method: a confused tunnel client, told what to use.
        let reply = http::response(
            405,
            "Method Not Allowed",
            &[("Allow", "POST")],
            "RTMPT requests must be POST\n",
            head.method == http::Method::Head,
        );
        http::answer(&mut io, &reply, reply_within).await;
        return;
    }
    let transport = if tls {
        Transport::Https
    } else {
        Transport::Http
    };
    let stream = ClientStream::new(Box::new(io), transport, peer, local).with_http(head);
    (ctx.handler)(stream).await;
}

/// What a tunnel session's byte stream goes through before the handler: its first byte
/// (C0, in the first /send) says plain RTMP or RTMPTE, exactly as on a raw socket.
fn tunnel_sessions(
    handler: StreamHandler,
    opts: Arc<Live<DoorOptions>>,
    rtmpe_rates: Arc<rtmpe::HandshakeRates>,
    conns: Arc<ConnLimiter>,
) -> StreamHandler {
    Arc::new(move |mut stream: ClientStream| {
        let handler = handler.clone();
        let opts = opts.get();
        let limits = opts.limits.clone();
        let rtmpe_allowed = opts.rtmpe;
        let rates = rtmpe_rates.clone();
        let conns = conns.clone();
        Box::pin(async move {
            let mut c0 = [0u8; 1];
            let label = stream.label();
            match tokio::time::timeout(limits.handshake_timeout(), stream.read_exact(&mut c0)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    metrics::refused(Refusal::HandshakeTimeout);
                    tracing::info!(
                        "closing {label}: no RTMP handshake within {:?}",
                        limits.handshake_timeout()
                    );
                    return;
                }
            }
            let prefix = bytes::Bytes::copy_from_slice(&c0);
            let stream = stream.map_io(|io| Box::new(Prefixed::new(prefix, io)));
            let is_rtmpe = sniff::classify(&c0) == sniff::Verdict::Is(Kind::Rtmpe);
            match is_rtmpe {
                true if !rtmpe_allowed => {
                    metrics::refused(Refusal::RtmpeDisabled);
                    tracing::info!("refusing RTMPTE from {label}: RTMPE is disabled (--no-rtmpe / rtmpe = false)");
                }
                // Boxed: the RTMPE handshake's state would otherwise size every tunnel
                // session's future, RTMPTE or not, for the session's whole life (heaptrack
                // counted 3.2 KiB in this future per idle RTMPT session through the relay).
                true => match Box::pin(rtmpe::accept_rated(stream, &limits, &rates)).await {
                    Ok(stream) => {
                        metrics::global().rtmpe_handshake(true);
                        handler(stream).await
                    }
                    Err(e) => rtmpe_failed(&e, &label, &rates, &conns),
                },
                false => handler(stream).await,
            }
        })
    })
}

/// RTMPE: the encrypted handshake, then the same handler as plain RTMP.
async fn serve_rtmpe<I: ByteStream + 'static>(
    ctx: &Arc<Ctx>,
    io: I,
    peer: SocketAddr,
    local: SocketAddr,
    label: &str,
) {
    let stream = ClientStream::new(Box::new(io), Transport::Rtmpe, peer, local);
    let limits = ctx.opts.get().limits.clone();
    match rtmpe::accept_rated(stream, &limits, &ctx.rtmpe_rates).await {
        Ok(stream) => {
            metrics::global().rtmpe_handshake(true);
            (ctx.handler)(stream).await
        }
        Err(e) => rtmpe_failed(
            &e,
            &format!("{peer} on {label}"),
            &ctx.rtmpe_rates,
            &ctx.conns,
        ),
    }
}

/// Counts and logs a failed or refused RTMPE handshake; refusals over the rate limit are
/// logged once a second at most (a flood of them is the attack the limit answers).
fn rtmpe_failed(
    e: &rtmpe::RtmpeError,
    who: &str,
    rates: &rtmpe::HandshakeRates,
    conns: &ConnLimiter,
) {
    if matches!(e, rtmpe::RtmpeError::RateLimited { .. }) {
        metrics::refused(Refusal::RtmpeRateLimit);
        if let Some(also) = rates.refusals.should_log("refused") {
            tracing::warn!("closing {who}: {e}{also}");
        }
    } else {
        metrics::global().rtmpe_handshake(false);
        conns.lines.info(e.peer().ip(), "rtmpe failed", || {
            format!("closing {who}: {e}")
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::net::tls::{self as dtls, CertSource, SniResolver};
    use crate::net::url::parse_listen;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// A handler that reports each stream's transport and peer, echoes its first 4 bytes,
    /// then holds the connection until the client closes.
    fn echo_handler(seen: mpsc::UnboundedSender<(Transport, SocketAddr)>) -> StreamHandler {
        Arc::new(move |mut s: ClientStream| {
            let seen = seen.clone();
            Box::pin(async move {
                let _ = seen.send((s.transport, s.peer));
                let mut head = [0u8; 4];
                if s.read_exact(&mut head).await.is_ok() {
                    let _ = s.write_all(&head).await;
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                }
            })
        })
    }

    async fn door(
        urls: &[&str],
        limits: Limits,
        accept_proxy_protocol: bool,
    ) -> (
        Vec<(Scheme, SocketAddr)>,
        mpsc::UnboundedReceiver<(Transport, SocketAddr)>,
        watch::Sender<bool>,
    ) {
        let urls: Vec<RtmpUrl> = urls.iter().map(|u| parse_listen("t", u).unwrap()).collect();
        let key = dtls::load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let tls = dtls::server_config(SniResolver::new(key)).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let door = Door::bind(
            &urls,
            DoorOptions {
                limits: Arc::new(limits),
                tls: Some(tls),
                rtmpe: true,
                accept_proxy_protocol,
                trusted_proxies: Vec::new(),
            },
            echo_handler(tx),
        )
        .await
        .unwrap();
        let addrs = door.local_addrs();
        let (stop, stop_rx) = watch::channel(false);
        door.start(stop_rx);
        (addrs, rx, stop)
    }

    /// Every connection's task holds `handle`'s future for the connection's whole life, in
    /// tokio's task cell: a 32-byte header, the future and 24 bytes of core, a 48-byte
    /// trailer, rounded up to 128 bytes. 280 bytes of future or less keeps the cell at 384
    /// bytes (it was 512 with the async fn's arguments held twice); a larger one costs every
    /// connection another 128.
    #[tokio::test]
    async fn a_connection_task_stays_within_three_cache_lines() {
        let urls = [parse_listen("t", "rtmp://127.0.0.1:0").unwrap()];
        let (tx, _rx) = mpsc::unbounded_channel();
        let door = Door::bind(
            &urls,
            DoorOptions {
                limits: Arc::new(Limits::default()),
                tls: None,
                rtmpe: true,
                accept_proxy_protocol: false,
                trusted_proxies: Vec::new(),
            },
            echo_handler(tx),
        )
        .await
        .unwrap();
        let local = door.bound[0].local;
        let tcp = TcpStream::connect(local).await.unwrap();
        let peer = tcp.local_addr().unwrap();
        let fut = handle(
            door.ctx.clone(),
            tcp,
            peer,
            local,
            Scheme::Rtmp,
            Arc::from("t"),
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 280, "a connection's handle future is {size} bytes");
    }

    #[tokio::test]
    async fn plain_rtmp_is_replayed_from_its_first_byte() {
        let (addrs, mut seen, _stop) =
            door(&["rtmp://127.0.0.1:0"], Limits::default(), false).await;
        let mut c = TcpStream::connect(addrs[0].1).await.unwrap();
        c.write_all(&[3, 1, 2, 3]).await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [3, 1, 2, 3]);
        let (transport, peer) = seen.recv().await.unwrap();
        assert_eq!(transport, Transport::Rtmp);
        assert_eq!(peer, c.local_addr().unwrap());
    }

    #[tokio::test]
    async fn rtmps_after_the_tls_handshake() {
        let (addrs, mut seen, _stop) =
            door(&["rtmps://127.0.0.1:0"], Limits::default(), false).await;
        let mut roots = rustls::RootCertStore::empty();
        for cert in dtls::certs_from_pem(
            include_bytes!("../../certs/ca.pem"),
            std::path::Path::new("ca.pem"),
        )
        .unwrap()
        {
            roots.add(cert).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(dtls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addrs[0].1).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = connector.connect(name, tcp).await.unwrap();
        c.write_all(&[3, 9, 8, 7]).await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [3, 9, 8, 7]);
        assert_eq!(seen.recv().await.unwrap().0, Transport::Rtmps);
    }

    #[tokio::test]
    async fn per_ip_limit_refuses_the_extra_connection() {
        let limits = Limits {
            max_connections_per_ip: 1,
            ..Limits::default()
        };
        let (addrs, mut seen, _stop) = door(&["rtmp://127.0.0.1:0"], limits, false).await;
        let mut first = TcpStream::connect(addrs[0].1).await.unwrap();
        first.write_all(&[3, 0, 0, 0]).await.unwrap();
        let mut back = [0u8; 4];
        first.read_exact(&mut back).await.unwrap();
        seen.recv().await.unwrap();
        let mut second = TcpStream::connect(addrs[0].1).await.unwrap();
        let _ = second.write_all(&[3, 0, 0, 0]).await;
        let mut buf = [0u8; 4];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the second connection from one IP is closed");
        // Once the first is gone, the address may connect again.
        drop(first);
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let mut c = TcpStream::connect(addrs[0].1).await.unwrap();
                let _ = c.write_all(&[3, 0, 0, 0]).await;
                if c.read_exact(&mut buf).await.is_ok() {
                    return;
                }
            }
        })
        .await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn proxy_header_sets_the_peer() {
        let (addrs, mut seen, _stop) = door(&["rtmp://127.0.0.1:0"], Limits::default(), true).await;
        let mut c = TcpStream::connect(addrs[0].1).await.unwrap();
        let mut bytes = proxy_protocol::encode(
            proxy_protocol::ProxyVersion::V2,
            "[2001:db8::7]:4242".parse().unwrap(),
            "[2001:db8::1]:1935".parse().unwrap(),
        );
        bytes.extend_from_slice(&[3, 4, 5, 6]);
        c.write_all(&bytes).await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [3, 4, 5, 6]);
        let (_, peer) = seen.recv().await.unwrap();
        assert_eq!(peer, "[2001:db8::7]:4242".parse::<SocketAddr>().unwrap());
    }

    #[tokio::test]
    async fn stops_accepting_on_shutdown() {
        let (addrs, _seen, stop) = door(&["rtmp://127.0.0.1:0"], Limits::default(), false).await;
        stop.send(true).unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if TcpStream::connect(addrs[0].1).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "the listener is closed after shutdown");
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_wildcards_share_a_port() {
        // Find a port free on both families, then bind it twice.
        let probe = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let urls = [
            parse_listen("t", &format!("rtmp://0.0.0.0:{port}")).unwrap(),
            parse_listen("t", &format!("rtmp://[::]:{port}")).unwrap(),
        ];
        let (tx, _rx) = mpsc::unbounded_channel();
        let opts = DoorOptions {
            limits: Arc::new(Limits::default()),
            tls: None,
            rtmpe: true,
            accept_proxy_protocol: false,
            trusted_proxies: Vec::new(),
        };
        match Door::bind(&urls, opts, echo_handler(tx)).await {
            Ok(door) => assert_eq!(door.local_addrs().len(), 2),
            // A host without IPv6 cannot bind [::]; that is not what this test is about.
            Err(BindError::Bind { source, .. })
                if source.kind() == io::ErrorKind::AddrNotAvailable
                    || source.raw_os_error() == Some(97) => {}
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bind_hints() {
        let addr: SocketAddr = "0.0.0.0:443".parse().unwrap();
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let hint = bind_hint(&denied, addr, Scheme::Rtmps);
        assert!(
            hint.contains("CAP_NET_BIND_SERVICE") && hint.contains("8443"),
            "{hint}"
        );
        let used = io::Error::from(io::ErrorKind::AddrInUse);
        assert!(bind_hint(&used, addr, Scheme::Rtmp).contains("port 443"));
    }
}
