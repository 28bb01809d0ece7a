//! Session bookkeeping around a [`StreamHandler`]: one log line when a session opens and one
//! when it closes (transport, peer, bytes each way, duration), and a live count the graceful
//! shutdown waits on.
//!
//! It wraps the handler rather than the listeners so tunnels, whose sessions span many TCP
//! connections, are counted exactly like raw connections.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::stream::{ByteStream, ClientStream, StreamHandler};

/// Live session count, shared by the wrapper and the shutdown code.
#[derive(Debug, Default)]
pub struct Sessions {
    active: AtomicUsize,
    opened: AtomicU64,
    idle: Notify,
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

/// Bytes seen by one session, updated as they flow.
#[derive(Debug, Default)]
struct Counters {
    from_client: AtomicU64,
    to_client: AtomicU64,
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
            self.counters
                .from_client
                .fetch_add(n as u64, Ordering::Relaxed);
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
            self.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
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
            self.counters
                .to_client
                .fetch_add(n as u64, Ordering::Relaxed);
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
    started: Instant,
    counters: Arc<Counters>,
    sessions: Arc<Sessions>,
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            "session closed: {}, {} bytes in, {} bytes out, {secs:.1} s",
            self.label,
            self.counters.from_client.load(Ordering::Relaxed),
            self.counters.to_client.load(Ordering::Relaxed),
        );
        if self.sessions.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.sessions.idle.notify_waiters();
        }
    }
}

/// Wraps `inner` so every session is counted and logged.
pub fn accounted(inner: StreamHandler, sessions: Arc<Sessions>) -> StreamHandler {
    Arc::new(move |stream: ClientStream| {
        let label = stream.label();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let stream = stream.map_io(move |io| Box::new(Counted { io, counters: c }));
        sessions.active.fetch_add(1, Ordering::AcqRel);
        sessions.opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!("session opened: {label}");
        let guard = OpenSession {
            label,
            started: Instant::now(),
            counters,
            sessions: sessions.clone(),
        };
        let fut = inner(stream);
        Box::pin(async move {
            fut.await;
            drop(guard);
        })
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
