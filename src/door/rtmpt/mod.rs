//! RTMPT/RTMPTS: the HTTP tunnel (open, send, idle, close) turned into one byte stream per session.
//!
//! Served by the tunnel's own HTTP/1.1 server (`http1`: no buffer held between requests;
//! hyper held ~19 KiB per connection), speaking what real clients need (read from ffmpeg's
//! rtmphttp.c and librtmp's rtmp.c, and checked against both): `HTTP/1.1 200 OK`, Title-Case
//! `Content-Length`, keep-alive, never chunked, never an empty send/idle body. A session lives in a table, not on a TCP
//! connection: its requests may come over several connections, and their bodies are applied
//! in sequence-number order. Each session becomes a [`ClientStream`] over a [`TunnelPipe`]
//! handed to the stream handler, exactly like a raw RTMP connection.
//!
//! A session ends in one of these ways, each giving the consumer EOF (and failing its
//! writes): the client's `/close` (applied in sequence order); the reaper, for no request
//! within `limits.tunnel_reap_secs` (ffmpeg killed by a signal never sends `/close`), for no
//! complete RTMP handshake (3073 bytes each way) within `limits.handshake_timeout_secs`, or
//! for last bytes nobody came for; the consumer ending (the session is removed at once, or
//! after the next poll collects its last bytes, then 404); a refused memory-budget charge;
//! or [`Tunnel::shutdown`].
//!
//! A session is a client like a raw connection: it takes a place in the door's
//! `max_connections` and its opening client's `max_connections_per_ip` (the PROXY-protocol
//! address when there is one) for as long as it or its handler lives, so pipelining `/open`
//! over one keep-alive connection cannot outgrow an address's share (nor, with `--upstream`,
//! its share of backend connections).
//!
//! Bounds, all from [`Limits`]: sessions (`max_tunnel_sessions`, then 503), bytes queued each
//! way per session (`max_tunnel_pending`; a full reply queue makes the consumer's writes
//! wait, a full inbound queue delays the `/send` reply), out-of-order bodies held
//! (`max_tunnel_reorder` bodies, `max_tunnel_reorder_bytes` bytes), request head
//! (`max_http_header`, `http_header_timeout_secs`) and body (`max_http_body` then 413,
//! `idle_timeout_secs` then 408), the idle long-poll (`tunnel_idle_hold_ms`) and the wait for
//! a request's turn in sequence order (`tunnel_order_wait_ms`). Request bodies and every
//! session buffer are charged to the process's memory budget (`crate::budget`).
//!
//! Every reply is flushed as soon as it is written, even with a pipelined request already
//! read: librtmp's send reply must not wait behind a held idle. TCP_QUICKACK is set after each read (see `ack`): without it every ffmpeg request waits
//! ~40 ms for its body.

mod ack;
mod http1;
pub mod path;
mod session;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use rand::RngCore;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use self::http1::{connection_bound, ConnectionBound};
use self::path::Command;
pub use self::session::TunnelPipe;
use self::session::{Bounds, Op, PlaceError, Placed, TunnelSession};
use crate::budget;
use crate::door::admit::{Admission, ConnLimiter};
use crate::limits::Limits;
use crate::live::Live;
use crate::stream::{ByteStream, ClientStream, StreamHandler, Transport};

/// The content type every RTMPT reply carries.
const FCS: HeaderValue = HeaderValue::from_static("application/x-fcs");

/// A `/send` body this small is command traffic (handshake, connect, play), not media.
const SMALL_SEND: usize = 4096;

/// How long a small `/send` with nothing to return waits for the backend's answer, so the
/// answer rides on the send reply: ffmpeg sleeps 50 ms before polling after an empty reply,
/// which cost ~200 ms per connect. Capped by `limits.tunnel_idle_hold_ms`.
const SEND_HOLD: Duration = Duration::from_millis(20);

/// How long a connection may take to finish its current request after shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a session whose consumer has ended keeps its last server bytes for the
/// client's next poll (a polling client asks within a second) before it is removed.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// An answer to an RTMPT request.
pub type Reply = Response<Full<Bytes>>;

/// Serves requests for tunnel sessions that other nodes own (`crate::cluster`'s link).
/// Session ids then read `NODE-RANDOM`; a request whose NODE is not ours goes to
/// [`Forwarder::forward`], whose answer is relayed as it is.
pub trait Forwarder: Send + Sync + 'static {
    /// This node's id: the prefix of every session id it issues.
    fn node_id(&self) -> &str;
    /// Forward `path` (`/send|idle|close/ID/SEQ`) and its body to node `owner`.
    fn forward<'a>(
        &'a self,
        owner: &'a str,
        path: &'a str,
        body: Vec<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;
}

/// The node a session id names, if it has the `NODE-` prefix.
pub fn session_owner(id: &str) -> Option<&str> {
    id.split_once('-').map(|(node, _)| node)
}

/// A table entry: the session and what is needed to log about it.
struct Entry {
    session: Arc<TunnelSession>,
    label: String,
    opened: Instant,
    /// The session's place in the connection limits, shared with its handler task: it is
    /// released when both the table entry and the handler are gone.
    _admission: Arc<Admission>,
}

/// The RTMPT tunnel: the session table, the reaper, and the HTTP handling.
pub struct Tunnel {
    /// Reloadable ([`Tunnel::set_limits`]): read per request and at each session's start.
    limits: Live<Limits>,
    handler: StreamHandler,
    /// Connections and sessions per address and in total, shared with the listeners.
    conns: Arc<ConnLimiter>,
    sessions: DashMap<String, Entry>,
    shutting_down: AtomicBool,
    shutdown_tx: watch::Sender<bool>,
    reaper_stop: Arc<Notify>,
    /// Set once when this node is part of a cluster.
    forwarder: OnceLock<Arc<dyn Forwarder>>,
}

impl Tunnel {
    /// A tunnel handing each new session to `handler`. Starts the reaper, so it must be
    /// called inside a tokio runtime; the reaper ends with [`Tunnel::shutdown`] or when the
    /// last `Arc<Tunnel>` is dropped.
    pub fn new(limits: Arc<Limits>, handler: StreamHandler) -> Arc<Tunnel> {
        let conns = ConnLimiter::new(&limits);
        Tunnel::with_limiter(limits, handler, conns)
    }

    /// A tunnel whose sessions count against `conns`, the listeners' connection limits
    /// (each session takes one place for its opening client's address).
    pub fn with_limiter(
        limits: Arc<Limits>,
        handler: StreamHandler,
        conns: Arc<ConnLimiter>,
    ) -> Arc<Tunnel> {
        let (shutdown_tx, _) = watch::channel(false);
        let tunnel = Arc::new(Tunnel {
            limits: Live::from_arc(limits),
            handler,
            conns,
            sessions: DashMap::new(),
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            reaper_stop: Arc::new(Notify::new()),
            forwarder: OnceLock::new(),
        });
        let every = (tunnel
            .limits()
            .tunnel_reap()
            .min(tunnel.limits().handshake_timeout())
            .min(LEFTOVER_GRACE)
            / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(run_reaper(
            Arc::downgrade(&tunnel),
            Arc::clone(&tunnel.reaper_stop),
            every,
        ));
        tunnel
    }

    /// The limits requests and new sessions get now.
    fn limits(&self) -> Arc<Limits> {
        self.limits.get()
    }

    /// New limits for later requests and sessions (a configuration reload); an open
    /// session keeps the buffer bounds it started with.
    pub fn set_limits(&self, limits: Arc<Limits>) {
        self.limits.set(limits);
    }

    /// Joins a cluster: session ids carry `forwarder`'s node id from now on, and requests
    /// for other nodes' sessions go to it. Only the first call counts.
    pub fn set_forwarder(&self, forwarder: Arc<dyn Forwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// The forwarder and the owning node, for a request about another node's session.
    fn remote<'c>(&self, command: Command<'c>) -> Option<(Arc<dyn Forwarder>, &'c str)> {
        let fwd = self.forwarder.get()?;
        let (Command::Send { id, .. } | Command::Idle { id, .. } | Command::Close { id, .. }) =
            command
        else {
            return None;
        };
        let owner = session_owner(id)?;
        (owner != fwd.node_id()).then(|| (Arc::clone(fwd), owner))
    }

    /// A request another node forwarded for a session this node owns; `path` is the
    /// RTMPT path (`/send|idle|close/ID/SEQ`). Never forwarded again.
    pub async fn serve_forwarded(self: &Arc<Self>, path: &str, body: Vec<Bytes>) -> Reply {
        match path::parse(path) {
            Ok(c @ (Command::Send { .. } | Command::Idle { .. } | Command::Close { .. }))
                if self.remote(c).is_none() =>
            {
                self.session_request(c, body).await
            }
            _ => unknown_session(),
        }
    }

    /// Sessions open right now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Close every session (consumers see EOF), refuse new ones with 503, stop the reaper
    /// and ask every connection to finish its current request and close.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown_tx.send_replace(true);
        self.reaper_stop.notify_one();
        let ids: Vec<String> = self.sessions.iter().map(|e| e.key().clone()).collect();
        for id in ids {
            self.end_session(&id, "gateway shutdown");
        }
    }

    /// Serve one HTTP connection (plain, or already inside TLS when `tls`). `io` must
    /// replay any bytes the sniffer read. Returns when the connection is closed.
    pub async fn serve_connection<I: ByteStream + 'static>(
        self: &Arc<Self>,
        io: I,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
    ) {
        let transport = if tls {
            Transport::Rtmpts
        } else {
            Transport::Rtmpt
        };
        http1::serve(self, io, peer, local, transport).await;
    }

    /// The answer to a POST whose path is an RTMPT `command` and whose body was read
    /// (`path` is forwarded as it is when another node owns the session).
    async fn answer(
        self: &Arc<Self>,
        command: Command<'_>,
        path: &str,
        body: Vec<Bytes>,
        transport: Transport,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Reply {
        match command {
            // Red5 answers 404; clients ignore the answer and go on to /open/1.
            Command::Ident => text(StatusCode::NOT_FOUND, "\n"),
            Command::Open => self.open(transport, peer, local),
            _ => match self.remote(command) {
                Some((fwd, owner)) => fwd.forward(owner, path, body).await,
                None => self.session_request(command, body).await,
            },
        }
    }

    /// `/send`, `/idle` and `/close` for a session of this node.
    async fn session_request(&self, command: Command<'_>, body: Vec<Bytes>) -> Reply {
        match command {
            Command::Ident | Command::Open => text(StatusCode::NOT_FOUND, "\n"),
            Command::Send { id, seq } => {
                let len: usize = body.iter().map(Bytes::len).sum();
                let hold = if len <= SMALL_SEND {
                    SEND_HOLD.min(self.limits().tunnel_idle_hold())
                } else {
                    Duration::ZERO
                };
                self.poll(id, seq, Op::Send(body), hold).await
            }
            Command::Idle { id, seq } => {
                let hold = self.limits().tunnel_idle_hold();
                self.poll(id, seq, Op::Idle, hold).await
            }
            Command::Close { id, seq } => self.close(id, seq).await,
        }
    }

    fn open(self: &Arc<Self>, transport: Transport, peer: SocketAddr, local: SocketAddr) -> Reply {
        if self.shutting_down.load(Ordering::SeqCst) {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway is shutting down\n",
            );
        }
        if self.sessions.len() >= self.limits().max_tunnel_sessions {
            crate::metrics::refused(crate::metrics::Refusal::MaxTunnelSessions);
            if let Some(also) = self.conns.refusals.should_log("refused") {
                warn!(
                    %peer,
                    limit = self.limits().max_tunnel_sessions,
                    "RTMPT session refused: too many tunnel sessions (raise limits.max_tunnel_sessions){also}"
                );
            }
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many tunnel sessions\n",
            );
        }
        // A session is a client like a connection: it takes a place for its address.
        let admission = match self.conns.admit(peer.ip()) {
            Ok(a) => Arc::new(a),
            Err(why) => {
                crate::metrics::refused(match why {
                    crate::door::admit::Refused::Total => crate::metrics::Refusal::MaxConnections,
                    crate::door::admit::Refused::PerAddress => {
                        crate::metrics::Refusal::MaxConnectionsPerIp
                    }
                });
                if let Some(also) = self.conns.refusals.should_log("refused") {
                    warn!(%peer, "RTMPT session refused: {}{also}", why.describe(&self.limits()));
                }
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many connections and tunnel sessions from this address\n",
                );
            }
        };
        let id = match self.forwarder.get() {
            Some(fwd) => format!("{}-{}", fwd.node_id(), new_session_id()),
            None => new_session_id(),
        };
        let label = session_label(&id);
        let session = TunnelSession::new(Bounds::from_limits(&self.limits()));
        // Its buffers count against the opening client's address's share, like a connection's.
        session.charge_to(&budget::PeerBudget::for_peer(peer.ip()));
        let stream = ClientStream::new(Box::new(session.pipe()), transport, peer, local)
            .with_session(label.clone());
        self.sessions.insert(
            id.clone(),
            Entry {
                session,
                label: label.clone(),
                opened: Instant::now(),
                _admission: Arc::clone(&admission),
            },
        );
        info!(%transport, %peer, session = %label, "RTMPT session opened");
        crate::metrics::global()
            .rtmpt_opened
            .fetch_add(1, Ordering::Relaxed);
        let handler = (self.handler)(stream);
        let tunnel = Arc::downgrade(self);
        let key = id.clone();
        tokio::spawn(async move {
            handler.await;
            // The consumer (and any backend connection) is gone: the session goes with it.
            if let Some(t) = tunnel.upgrade() {
                t.handler_ended(&key);
            }
            drop(admission);
        });
        let mut body = id;
        body.push('\n');
        fcs(Bytes::from(body))
    }

    fn find(&self, id: &str) -> Option<Arc<TunnelSession>> {
        self.sessions.get(id).map(|e| Arc::clone(&e.session))
    }

    /// `/send` and `/idle`: place the body in order, then answer with the polling byte and
    /// every pending server byte, waiting up to `hold` when there is nothing yet.
    async fn poll(&self, id: &str, seq: u64, op: Op, hold: Duration) -> Reply {
        let Some(session) = self.find(id) else {
            return unknown_session();
        };
        let _active = Active::begin(&session);
        let deadline = Instant::now() + self.limits().tunnel_order_wait();
        if let Err(refused) = self.place(id, &session, seq, op, deadline).await {
            return refused;
        }
        self.await_turn(&session, seq, deadline).await;
        if !hold.is_zero() {
            let hold = Instant::now() + hold;
            session
                .wait_until(hold, |st| {
                    (st.pending() > 0 || st.client_closed || st.backend_gone).then_some(())
                })
                .await;
        }
        self.reply(id, &session)
    }

    /// Places request `seq`'s operation in the session's order (waiting, until `deadline`,
    /// for room in the reorder window) and charges it to the memory budget; the error is the
    /// reply that refuses it.
    async fn place(
        &self,
        id: &str,
        session: &TunnelSession,
        seq: u64,
        op: Op,
        deadline: Instant,
    ) -> Result<(), Reply> {
        let bounds = session.bounds;
        let mut op = Some(op);
        let mut over_budget = None;
        let placed = session
            .wait_until(deadline, |st| {
                if st.client_closed {
                    return Some(Err(StatusCode::NOT_FOUND));
                }
                let this_op = op.take()?;
                let r = match st.order.place(seq, this_op, &bounds) {
                    Ok(p) => match st.account() {
                        Ok(()) => Ok(p),
                        Err(e) => {
                            over_budget = Some(e);
                            Err(StatusCode::SERVICE_UNAVAILABLE)
                        }
                    },
                    Err(PlaceError::Full(back)) => {
                        op = Some(back);
                        return None;
                    }
                    Err(PlaceError::TooFar { next }) => {
                        debug!(seq, ?next, "RTMPT request out of the sequence window");
                        Err(StatusCode::BAD_REQUEST)
                    }
                };
                st.drain(&bounds);
                Some(r)
            })
            .await;
        session.notify();
        if let Some(e) = over_budget {
            self.end_session(id, &format!("request body refused: {e}"));
            return Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway memory budget spent; session closed\n",
            ));
        }
        match placed {
            Some(Ok(Placed::Queued | Placed::Duplicate)) => Ok(()),
            Some(Err(StatusCode::NOT_FOUND)) => Err(unknown_session()),
            Some(Err(status)) => Err(text(status, "RTMPT sequence number out of range\n")),
            None => Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "RTMPT session is not taking data; retry later\n",
            )),
        }
    }

    /// Waits (until `deadline`) for request `seq` to be applied: this is the backpressure
    /// towards a fast client. A consumer blocked on a full reply queue must not wait for us,
    /// so that ends the wait too.
    async fn await_turn(&self, session: &TunnelSession, seq: u64, deadline: Instant) {
        let bounds = session.bounds;
        let our_turn = |st: &mut session::State| {
            (st.order.applied(seq)
                || st.client_closed
                || st.backend_gone
                || st.writer_blocked(&bounds))
            .then_some(())
        };
        let grace = deadline.min(Instant::now() + self.limits().tunnel_idle_hold());
        if session.wait_until(grace, our_turn).await.is_none() {
            // Still waiting for sequence number 0 of a fresh session: start at 1.
            {
                let mut st = session.lock();
                st.order.start_late();
                st.drain(&bounds);
            }
            session.notify();
            session.wait_until(deadline, our_turn).await;
        }
    }

    /// The reply to a poll: the polling byte and every pending server byte; the session
    /// ends with it when the backend is gone and this was its last data.
    fn reply(&self, id: &str, session: &TunnelSession) -> Reply {
        let (reply, finished) = {
            let mut st = session.lock();
            if st.client_closed {
                (None, false)
            } else if st.backend_gone && st.pending() == 0 {
                (None, true)
            } else {
                let body = st.take_reply();
                st.release();
                // The backend's last bytes are out: the session ends with this reply.
                (Some(body), st.backend_gone)
            }
        };
        if finished {
            self.end_session(id, "backend closed");
        }
        match reply {
            Some(body) => fcs(body),
            None => unknown_session(),
        }
    }

    /// `/close`: apply it in order (bounded wait), end the session, answer one 0x00.
    async fn close(&self, id: &str, seq: u64) -> Reply {
        let Some(session) = self.find(id) else {
            return unknown_session();
        };
        let _active = Active::begin(&session);
        let bounds = session.bounds;
        let deadline = Instant::now() + self.limits().tunnel_order_wait();
        let mut op = Some(Op::Close);
        session
            .wait_until(deadline, |st| {
                let this_op = op.take()?;
                match st.order.place(seq, this_op, &bounds) {
                    Err(PlaceError::Full(back)) => {
                        op = Some(back);
                        None
                    }
                    _ => {
                        st.drain(&bounds);
                        Some(())
                    }
                }
            })
            .await;
        let grace = deadline.min(Instant::now() + self.limits().tunnel_idle_hold());
        let applied = |st: &mut session::State| {
            (st.order.applied(seq) || st.client_closed || st.backend_gone).then_some(())
        };
        if session.wait_until(grace, applied).await.is_none() {
            {
                let mut st = session.lock();
                st.order.start_late();
                st.drain(&bounds);
            }
            session.wait_until(deadline, applied).await;
        }
        self.end_session(id, "client closed");
        fcs(Bytes::from_static(&[0]))
    }

    /// Remove a session from the table and end its client side. Safe to call twice.
    fn end_session(&self, id: &str, why: &str) {
        let Some((_, entry)) = self.sessions.remove(id) else {
            return;
        };
        let (bytes_in, bytes_out) = {
            let mut st = entry.session.lock();
            st.close();
            (st.bytes_in, st.bytes_out)
        };
        entry.session.notify();
        info!(
            session = %entry.label,
            bytes_in,
            bytes_out,
            secs = entry.opened.elapsed().as_secs_f64(),
            "RTMPT session ended: {why}"
        );
    }

    /// The session's handler returned: remove the session now, unless its last server
    /// bytes still wait for the client's next poll (then the poll or the reaper, after
    /// `LEFTOVER_GRACE`, removes it).
    fn handler_ended(&self, id: &str) {
        let leftover = self
            .sessions
            .get(id)
            .is_some_and(|e| e.session.lock().pending() > 0);
        if !leftover {
            self.end_session(id, "session ended");
        }
    }

    /// Reap sessions that have had no request for `limits.tunnel_reap()`, that have not
    /// completed the RTMP handshake within `limits.handshake_timeout()`, or whose
    /// consumer ended and whose client did not come for the last bytes.
    fn reap(&self) {
        let now = Instant::now();
        let max_idle = self.limits().tunnel_reap();
        let handshake = self.limits().handshake_timeout();
        let stale: Vec<(String, &'static str)> = self
            .sessions
            .iter()
            .filter_map(|e| {
                let st = e.session.lock();
                let quiet = now.saturating_duration_since(st.last_request);
                let why = if !st.handshake_done()
                    && now.saturating_duration_since(e.opened) >= handshake
                {
                    "no RTMP handshake within limits.handshake_timeout_secs"
                } else if st.active_requests > 0 {
                    return None;
                } else if quiet >= max_idle {
                    "no request within limits.tunnel_reap_secs (client gone?)"
                } else if st.backend_gone && quiet >= LEFTOVER_GRACE {
                    "session ended (last bytes not collected)"
                } else {
                    return None;
                };
                Some((e.key().clone(), why))
            })
            .collect();
        for (id, why) in stale {
            crate::metrics::global()
                .rtmpt_reaped
                .fetch_add(1, Ordering::Relaxed);
            self.end_session(&id, why);
        }
    }

    /// Places in the connection limits held now by `ip`'s address group (connections and
    /// tunnel sessions together).
    pub fn held_by(&self, ip: std::net::IpAddr) -> usize {
        self.conns.held_by(ip)
    }
}

/// Sweeps the table every `every`. Holds the tunnel only during a sweep, so dropping the
/// last `Arc<Tunnel>` ends it too.
async fn run_reaper(tunnel: Weak<Tunnel>, stop: Arc<Notify>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.notified() => return,
        }
        match tunnel.upgrade() {
            Some(t) => t.reap(),
            None => return,
        }
    }
}

/// Marks a request in progress on a session (so the reaper leaves it alone), and records
/// its start and end as activity.
struct Active<'a>(&'a TunnelSession);

impl<'a> Active<'a> {
    fn begin(session: &'a TunnelSession) -> Self {
        let mut st = session.lock();
        st.active_requests = st.active_requests.saturating_add(1);
        st.last_request = Instant::now();
        Active(session)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.active_requests = st.active_requests.saturating_sub(1);
        st.last_request = Instant::now();
    }
}

/// 128 random bits from the OS-seeded CSPRNG, as 32 lowercase hex digits (URL-safe).
fn new_session_id() -> String {
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    let mut id = String::with_capacity(32);
    for b in raw {
        let _ = write!(id, "{b:02x}");
    }
    id
}

fn fcs(body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(CONTENT_TYPE, FCS);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn text(status: StatusCode, msg: &'static str) -> Reply {
    let mut r = fcs(Bytes::from_static(msg.as_bytes()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// 404 for an unknown or ended session (also what a client gets for a session whose node
/// is gone).
pub fn unknown_session() -> Reply {
    crate::metrics::global()
        .rtmpt_not_found
        .fetch_add(1, Ordering::Relaxed);
    text(
        StatusCode::NOT_FOUND,
        "unknown or ended RTMPT session; open a new one with /open/1\n",
    )
}

fn too_large() -> Reply {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RTMPT request body larger than limits.max_http_body\n",
    )
}

/// A request for a log line, with only the loggable prefix of the session id.
fn loggable(c: Command<'_>) -> String {
    let label = session_label;
    match c {
        Command::Ident => "/fcs/ident2".to_string(),
        Command::Open => "/open/1".to_string(),
        Command::Send { id, seq } => format!("send [{}] {seq}", label(id)),
        Command::Idle { id, seq } => format!("idle [{}] {seq}", label(id)),
        Command::Close { id, seq } => format!("close [{}] {seq}", label(id)),
    }
}

/// The loggable part of a session id: its node prefix, if any, and 8 random characters.
fn session_label(id: &str) -> String {
    let prefix = session_owner(id).map_or(0, |n| n.len() + 1);
    id.chars().take(prefix + 8).collect()
}

/// A path shortened for a log line.
fn short(p: &str) -> String {
    p.chars().take(16).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
