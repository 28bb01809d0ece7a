//! Immediate ACKs for tunnel connections, so small requests are not stalled by Nagle.
//!
//! ffmpeg writes a request's headers and body in two writes without TCP_NODELAY, so its
//! kernel holds the body until the headers are ACKed, and ours delays that ACK by ~40 ms
//! (measured: every /send and /idle waited 41-47 ms for its body; a 6 s publish took 2.9 s
//! instead of 0.6 s). Setting TCP_QUICKACK after each read that returned data sends the
//! pending ACK at once. The option is not sticky in Linux, hence once per read.
//!
//! `serve_connection` takes any byte stream; the socket is found by looking through the
//! stream types the door builds (plain or TLS, with or without replayed sniffed bytes).

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::net::tls_stream::TlsStream;
use crate::stream::Prefixed;

/// The TCP socket under `io`, if it is one of the shapes the door produces.
pub(crate) fn tcp_of<I: Any>(io: &I) -> Option<&TcpStream> {
    let any = io as &dyn Any;
    if let Some(t) = any.downcast_ref::<TcpStream>() {
        return Some(t);
    }
    if let Some(p) = any.downcast_ref::<Prefixed<TcpStream>>() {
        return Some(p.get_ref());
    }
    if let Some(t) = any.downcast_ref::<TlsStream<TcpStream>>() {
        return Some(t.get_ref());
    }
    if let Some(p) = any.downcast_ref::<Prefixed<TlsStream<TcpStream>>>() {
        return Some(p.get_ref().get_ref());
    }
    // What a TLS listener hands on (boxed, door::listener::serve_tls says why).
    if let Some(p) = any.downcast_ref::<Box<Prefixed<TlsStream<TcpStream>>>>() {
        return Some(p.get_ref().get_ref());
    }
    None
}

fn quickack(tcp: &TcpStream) {
    #[cfg(target_os = "linux")]
    {
        // Best effort: failing only brings the delayed ACK back.
        let _ = socket2::SockRef::from(tcp).set_quickack(true);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
}

/// A stream that ACKs received data at once (when its TCP socket can be reached).
pub(crate) struct EagerAck<I> {
    io: I,
    has_socket: bool,
}

impl<I: Any> EagerAck<I> {
    pub(crate) fn new(io: I) -> Self {
        let has_socket = tcp_of(&io).is_some();
        EagerAck { io, has_socket }
    }

    /// False when no TCP socket was found under the stream (requests may then stall).
    pub(crate) fn has_socket(&self) -> bool {
        self.has_socket
    }
}

impl<I: AsyncRead + Unpin + Any> AsyncRead for EagerAck<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.has_socket && matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if let Some(tcp) = tcp_of(&self.io) {
                quickack(tcp);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for EagerAck<I> {
    crate::stream::forward_async_write!(io);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_the_socket_under_the_door_shapes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(EagerAck::new(Prefixed::new(bytes::Bytes::new(), s)).has_socket());
        assert!(EagerAck::new(c).has_socket());
        assert!(!EagerAck::new(tokio::io::duplex(8).0).has_socket());
    }
}
