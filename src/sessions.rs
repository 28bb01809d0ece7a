//! Session bookkeeping around a [`StreamHandler`]: one log line when a session opens and one
//! when it closes (transport, peer, bytes each way, duration), and a live count the graceful
//! shutdown waits on.
//!
//! It wraps the handler rather than the listeners so tunnels, whose sessions span many TCP
//! connections, are counted exactly like raw connections.
//!
//! It also keeps the table of open sessions the admin API lists and kicks (one entry per
//! session, touched at open and close, never per byte), and feeds the per-transport counters
//! of [`crate::metrics`] (one relaxed atomic add per read or write).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use futures_util::future::{AbortHandle, Abortable};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::metrics::{self, PerTransport};
use crate::stream::{ByteStream, ClientStream, StreamHandler, Transport};

/// SessionEntry session count and table, shared by the wrapper, the shutdown code and the admin API.
#[derive(Debug, Default)]
pub struct Sessions {
    active: AtomicUsize,
    opened: AtomicU64,
    idle: Notify,
    table: DashMap<u64, Arc<SessionEntry>>,
}

/// What a session is doing, as far as the engine or the relay has told (admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Publisher,
    Player,
    Relay,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Player => "player",
            Role::Relay => "relay",
        }
    }
}

/// Details the handler learns after the session opened (app and stream name, role, upstream).
#[derive(Clone, Debug, Default)]
pub struct Tag {
    pub role: Option<Role>,
    pub app: Option<String>,
    pub name: Option<String>,
    pub upstream: Option<String>,
    /// When the role began (publish or play accepted).
    pub since: Option<Instant>,
}

/// One open session, as the admin API shows it.
#[derive(Debug)]
pub struct SessionEntry {
    pub id: u64,
    pub transport: Transport,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The listener that accepted it (`SCHEME://ADDR`, as logged), or "other".
    pub listener: Arc<str>,
    pub started: Instant,
    pub started_at: SystemTime,
    counters: Arc<Counters>,
    /// Aborts the session's handler (admin API). Lock-free: each poll of a pending session
    /// costs an atomic load and a waker registration, no mutex.
    kick: AbortHandle,
    /// Boxed: set once the session publishes or plays (an idle connection has none, and
    /// inline it would be 96 bytes of every connection's entry).
    tag: Mutex<Option<Box<Tag>>>,
}

impl SessionEntry {
    /// Bytes read from the client so far.
    pub fn bytes_received(&self) -> u64 {
        self.counters.from_client.load(Ordering::Relaxed)
    }

    /// Bytes written to the client so far.
    pub fn bytes_sent(&self) -> u64 {
        self.counters.to_client.load(Ordering::Relaxed)
    }

    pub fn tag(&self) -> Tag {
        self.tag
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .cloned()
            .unwrap_or_default()
    }
}

tokio::task_local! {
    /// The session the current task serves (set by [`accounted`]), so the engine and the
    /// relay can describe it without a handle being threaded through them.
    static CURRENT: Arc<SessionEntry>;
}

/// Records that the current task's session publishes or plays stream `name` of `app`
/// (called by the engine).
pub fn tag_stream(role: Role, app: &str, name: &str) {
    tag_current(|t| {
        t.role = Some(role);
        t.app = Some(app.to_owned());
        t.name = Some(name.to_owned());
        t.since = Some(Instant::now());
    });
}

/// Updates the current task's session details (no-op outside an accounted session).
pub fn tag_current(f: impl FnOnce(&mut Tag)) {
    let _ = CURRENT.try_with(|live| {
        let mut tag = live.tag.lock().unwrap_or_else(|e| e.into_inner());
        f(tag.get_or_insert_with(Box::default))
    });
}

impl Sessions {
    pub fn new() -> Arc<Self> {
        Arc::new(Sessions::default())
    }

    /// Sessions running now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Sessions opened since start.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Up to `limit` open sessions with an id above `after`, lowest id first (a cursor that
    /// stays valid while sessions come and go), and how many are open in total.
    pub fn list(&self, after: u64, limit: usize) -> (Vec<Arc<SessionEntry>>, usize) {
        let mut ids: Vec<u64> = self
            .table
            .iter()
            .map(|e| *e.key())
            .filter(|id| *id > after)
            .collect();
        ids.sort_unstable();
        let page = ids
            .into_iter()
            .filter_map(|id| self.table.get(&id).map(|e| e.value().clone()))
            .take(limit)
            .collect();
        (page, self.table.len())
    }

    /// Bytes (received, sent) per transport since start, in [`metrics::TRANSPORTS`] order:
    /// the open sessions' counts plus the closed sessions' totals.
    pub fn bytes_by_transport(&self) -> [(u64, u64); metrics::TRANSPORTS.len()] {
        let mut open = [(0u64, 0u64); metrics::TRANSPORTS.len()];
        for e in self.table.iter() {
            if let Some(slot) = open.get_mut(metrics::transport_index(e.transport)) {
                slot.0 = slot.0.saturating_add(e.bytes_received());
                slot.1 = slot.1.saturating_add(e.bytes_sent());
            }
        }
        let m = metrics::global();
        let mut out = [(0u64, 0u64); metrics::TRANSPORTS.len()];
        for ((t, o), slot) in metrics::TRANSPORTS.iter().zip(open).zip(out.iter_mut()) {
            *slot = m.transport(*t).totals(o.0, o.1);
        }
        out
    }

    /// Every open session (for per-stream and per-transport summaries).
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        self.table.iter().map(|e| e.value().clone()).collect()
    }

    /// Closes session `id` (its handler is dropped, which closes the client's connection).
    /// Returns false if no such session is open.
    pub fn kick(&self, id: u64) -> bool {
        match self.table.get(&id) {
            Some(live) => {
                live.kick.abort();
                true
            }
            None => false,
        }
    }

    /// Waits until no session is running, or `limit` has passed. Returns how many are left.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let now = tokio::time::Instant::now();
        // A drain time too large to add means "wait for the sessions".
        let deadline = now
            .checked_add(limit)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        loop {
            let notified = self.idle.notified();
            let n = self.active();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

/// Bytes seen by one session, updated as they flow (one relaxed add on the session's own
/// counter: the per-transport totals are summed from these when scraped).
#[derive(Debug)]
struct Counters {
    from_client: AtomicU64,
    to_client: AtomicU64,
    transport: &'static PerTransport,
    listener: Arc<PerTransport>,
}

impl crate::stream::CountSent for Counters {
    fn count_sent(&self, n: usize) {
        self.sent(n);
    }
}

impl Counters {
    fn received(&self, n: usize) {
        self.from_client.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn sent(&self, n: usize) {
        self.to_client.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerTransport")
    }
}

/// The client's byte stream with its traffic counted.
struct Counted {
    io: Box<dyn ByteStream>,
    counters: Arc<Counters>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.counters.received(n);
        }
        res
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.counters.sent(n);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.counters.sent(n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Logs the close line and releases the count, even if the session's future is dropped
/// (at the end of a shutdown drain).
struct OpenSession {
    label: String,
    live: Arc<SessionEntry>,
    sessions: Arc<Sessions>,
    kicked: bool,
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let live = &self.live;
        let secs = live.started.elapsed().as_secs_f64();
        let tag = live.tag();
        // What the session was for, where the engine or the relay said.
        let what = match (&tag.role, &tag.app, &tag.name, &tag.upstream) {
            (Some(role), Some(app), Some(name), _) => format!(", {} {app}/{name}", role.as_str()),
            (_, _, _, Some(up)) => format!(", relay to {up}"),
            _ => String::new(),
        };
        tracing::info!(
            session = live.id,
            "session closed: {}, {} bytes in, {} bytes out, {secs:.1} s{what}",
            self.label,
            live.bytes_received(),
            live.bytes_sent(),
        );
        if crate::access::enabled() {
            crate::access::record(crate::access::Entry {
                time: crate::access::rfc3339(SystemTime::now()),
                id: live.id,
                transport: live.transport.scheme(),
                peer: live.peer.to_string(),
                listener: live.local.to_string(),
                app: tag.app.as_deref(),
                name: tag.name.as_deref(),
                role: tag.role.map(Role::as_str),
                upstream: tag.upstream.as_deref(),
                bytes_received: live.bytes_received(),
                bytes_sent: live.bytes_sent(),
                duration_secs: (secs * 1000.0).round() / 1000.0,
                end: if self.kicked { "kicked" } else { "closed" },
                dropped_before: None,
            });
        }
        // Out of the table first, then into the closed totals: a scrape in between sees the
        // total dip, which `PerTransport::totals` never reports.
        self.sessions.table.remove(&live.id);
        for t in [live.counters.transport, &*live.counters.listener] {
            t.closed_received
                .fetch_add(live.bytes_received(), Ordering::Relaxed);
            t.closed_sent
                .fetch_add(live.bytes_sent(), Ordering::Relaxed);
            t.sessions_open.fetch_sub(1, Ordering::Relaxed);
        }
        if self.sessions.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sessions.idle.notify_waiters();
        }
    }
}

/// The listeners' local addresses and labels, set by the door when its listener set
/// changes (read once per session open).
static LISTENER_NAMES: std::sync::RwLock<Vec<(SocketAddr, Arc<str>)>> =
    std::sync::RwLock::new(Vec::new());

/// Replaces the table [`listener_name`] reads.
pub fn set_listener_names(names: Vec<(SocketAddr, Arc<str>)>) {
    *LISTENER_NAMES.write().unwrap_or_else(|e| e.into_inner()) = names;
}

/// The label of the listener that accepted a connection on `local`: the one bound to that
/// exact address, else a wildcard one (0.0.0.0, [::]) on its port; "other" when none is
/// known (a listener removed since, or a door started without a live set).
pub fn listener_name(local: SocketAddr) -> Arc<str> {
    let names = LISTENER_NAMES.read().unwrap_or_else(|e| e.into_inner());
    let exact = names.iter().find(|(a, _)| *a == local);
    let wildcard = || {
        names
            .iter()
            .find(|(a, _)| a.port() == local.port() && a.ip().is_unspecified())
    };
    match exact.or_else(wildcard) {
        Some((_, name)) => name.clone(),
        None => Arc::from("other"),
    }
}

/// Wraps `inner` so every session is counted and logged.
pub fn accounted(inner: StreamHandler, sessions: Arc<Sessions>) -> StreamHandler {
    Arc::new(move |stream: ClientStream| {
        let label = stream.label();
        let per_transport = metrics::global().transport(stream.transport);
        let listener = listener_name(stream.local);
        let per_listener = metrics::listener(&listener);
        let counters = Arc::new(Counters {
            from_client: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            transport: per_transport,
            listener: per_listener.clone(),
        });
        let id = sessions.opened.fetch_add(1, Ordering::Relaxed) + 1;
        let (kick_handle, kick) = AbortHandle::new_pair();
        let live = Arc::new(SessionEntry {
            id,
            transport: stream.transport,
            peer: stream.peer,
            local: stream.local,
            listener,
            started: Instant::now(),
            started_at: SystemTime::now(),
            counters: counters.clone(),
            kick: kick_handle,
            tag: Mutex::new(None),
        });
        let direct = counters.clone();
        let mut stream = stream.map_reads(move |io| Box::new(Counted { io, counters }));
        // The engine's fan-out lane writes some players' media to their sockets directly.
        stream.sent = Some(direct);
        sessions.active.fetch_add(1, Ordering::AcqRel);
        sessions.table.insert(id, live.clone());
        for t in [per_transport, &*per_listener] {
            t.sessions_open.fetch_add(1, Ordering::Relaxed);
            t.sessions_total.fetch_add(1, Ordering::Relaxed);
        }
        tracing::info!("session opened: {label} (id {id})");
        let mut guard = OpenSession {
            label,
            live: live.clone(),
            sessions: sessions.clone(),
            kicked: false,
        };
        let fut = Abortable::new(inner(stream), kick);
        Box::pin(CURRENT.scope(live, async move {
            if fut.await.is_err() {
                guard.kicked = true;
                tracing::info!("session {id} closed: kicked through the admin API");
            }
            drop(guard);
        }))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::stream::Transport;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_and_releases() {
        let sessions = Sessions::new();
        let inner: StreamHandler = Arc::new(|mut s: ClientStream| {
            Box::pin(async move {
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(b"hello").await.unwrap();
            })
        });
        let handler = accounted(inner, sessions.clone());
        let (mut client, server) = tokio::io::duplex(64);
        let addr = "127.0.0.1:1".parse().unwrap();
        let stream = ClientStream::new(Box::new(server), Transport::Rtmp, addr, addr);
        let task = tokio::spawn(handler(stream));
        client.write_all(b"ping").await.unwrap();
        let mut out = [0u8; 5];
        client.read_exact(&mut out).await.unwrap();
        task.await.unwrap();
        assert_eq!(sessions.active(), 0);
        assert_eq!(sessions.opened(), 1);
        assert_eq!(sessions.wait_idle(Duration::from_millis(10)).await, 0);
    }
}
