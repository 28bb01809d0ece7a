//! `ClientStream`: the one byte stream every transport becomes, plus what it came over.
//!
//! Everything after the front door (the upstream pump, the core engine) sees only this type,
//! so it never needs to know about TLS, HTTP tunnels or RTMPE.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a client reached us. Names follow the URL schemes clients use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// RTMP over plain TCP (`rtmp://`).
    Rtmp,
    /// RTMP inside TLS (`rtmps://`).
    Rtmps,
    /// RTMP tunnelled through HTTP POSTs (`rtmpt://`).
    Rtmpt,
    /// The HTTP tunnel inside TLS (`rtmpts://`).
    Rtmpts,
    /// RTMP with the legacy Diffie-Hellman/RC4 handshake (`rtmpe://`).
    Rtmpe,
    /// RTMPE inside the HTTP tunnel (`rtmpte://`).
    Rtmpte,
    /// A plain HTTP request that is not the tunnel (`http://HOST/APP/STREAM.flv`: HTTP-FLV).
    Http,
    /// The same inside TLS (`https://`).
    Https,
}

impl Transport {
    /// The URL scheme, as it appears in logs and configuration.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Rtmp => "rtmp",
            Transport::Rtmps => "rtmps",
            Transport::Rtmpt => "rtmpt",
            Transport::Rtmpts => "rtmpts",
            Transport::Rtmpe => "rtmpe",
            Transport::Rtmpte => "rtmpte",
            Transport::Http => "http",
            Transport::Https => "https",
        }
    }

    /// True when the bytes crossed the network inside TLS.
    pub fn is_tls(self) -> bool {
        matches!(
            self,
            Transport::Rtmps | Transport::Rtmpts | Transport::Https
        )
    }

    /// True for a plain HTTP request (HTTP-FLV), not RTMP in any form.
    pub fn is_http(self) -> bool {
        matches!(self, Transport::Http | Transport::Https)
    }

    /// True when the bytes came through the HTTP tunnel.
    pub fn is_tunnel(self) -> bool {
        matches!(
            self,
            Transport::Rtmpt | Transport::Rtmpts | Transport::Rtmpte
        )
    }

    /// The RTMPE form of this transport, once an RTMPE handshake has been seen on it.
    pub fn with_rtmpe(self) -> Transport {
        if self.is_tunnel() {
            Transport::Rtmpte
        } else {
            Transport::Rtmpe
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// Anything that can carry a client's bytes both ways.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

/// One client's byte stream, whatever it came over.
pub struct ClientStream {
    io: Box<dyn ByteStream>,
    /// The transport the client used.
    pub transport: Transport,
    /// The client's address as seen by the listener.
    pub peer: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// For tunnels: a short, loggable prefix of the session id (never the whole id).
    pub session: Option<String>,
    /// For [`Transport::Http`]/[`Transport::Https`]: the request head the door read.
    pub http: Option<Box<crate::net::http::RequestHead>>,
    /// A plain TCP client (`rtmp://`): the socket's descriptor, owned by `io` (see
    /// [`ClientStream::with_socket_fd`]), so the engine can write media to it directly.
    socket_fd: Option<RawFd>,
    /// Counts bytes written to the client other than through `io` (the session table's
    /// counters, when the door counts this stream).
    pub sent: Option<SentHook>,
}

/// Adds bytes written to a client outside its counted stream to its session's counters.
/// A trait object rather than a closure, so the session table's counters can be the hook
/// themselves (a closure around them was one more allocation for every connection).
pub type SentHook = Arc<dyn CountSent>;

/// Counts bytes written to a client (see [`SentHook`]).
pub trait CountSent: Send + Sync {
    fn count_sent(&self, n: usize);
}

impl<F: Fn(usize) + Send + Sync> CountSent for F {
    fn count_sent(&self, n: usize) {
        self(n)
    }
}

impl ClientStream {
    pub fn new(
        io: Box<dyn ByteStream>,
        transport: Transport,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        ClientStream {
            io,
            transport,
            peer,
            local,
            session: None,
            http: None,
            socket_fd: None,
            sent: None,
        }
    }

    /// A plain `rtmp://` client on `tcp` (whose media the engine may write to the socket
    /// directly, see [`ClientStream::socket_fd`]).
    pub fn tcp(tcp: tokio::net::TcpStream, peer: SocketAddr, local: SocketAddr) -> Self {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
        ClientStream::new(Box::new(tcp), Transport::Rtmp, peer, local).with_socket_fd(fd)
    }

    /// Records that `io` is (a wrapper that only changes reads around) the plain TCP socket
    /// `fd`: the door says so for `rtmp://` clients, passing the descriptor of the socket it
    /// moved into `io`, which stays open for as long as this stream lives.
    pub(crate) fn with_socket_fd(mut self, fd: RawFd) -> Self {
        self.socket_fd = Some(fd);
        self
    }

    /// The descriptor of the plain TCP socket under `io` (None for TLS, tunnels, RTMPE): open
    /// for as long as this stream lives, so whoever writes to it must stop before the stream
    /// is dropped (the engine's lane: see `engine::lane::Seat`).
    pub(crate) fn socket_fd(&self) -> Option<RawFd> {
        self.socket_fd
    }

    /// Attach the loggable tunnel session label.
    pub fn with_session(mut self, label: String) -> Self {
        self.session = Some(label);
        self
    }

    /// Attach the HTTP request head the door read (HTTP-FLV).
    pub fn with_http(mut self, head: crate::net::http::RequestHead) -> Self {
        self.http = Some(Box::new(head));
        self
    }

    /// Replace the inner byte stream, keeping the labels (used by the RTMPE layer). The new
    /// stream may change what is written (RTMPE encrypts), so the socket is no longer
    /// written to directly: use [`ClientStream::map_reads`] for a wrapper that writes through.
    pub fn map_io(self, f: impl FnOnce(Box<dyn ByteStream>) -> Box<dyn ByteStream>) -> Self {
        ClientStream {
            io: f(self.io),
            socket_fd: None,
            ..self
        }
    }

    /// As [`ClientStream::map_io`], for a wrapper that writes every byte through unchanged (it
    /// counts them, or puts bytes back in front of the reads): the socket can still be written
    /// to directly.
    pub fn map_reads(self, f: impl FnOnce(Box<dyn ByteStream>) -> Box<dyn ByteStream>) -> Self {
        ClientStream {
            io: f(self.io),
            ..self
        }
    }

    /// A label for log lines: `rtmpt 127.0.0.1:5000 [ab12cd34]`.
    pub fn label(&self) -> String {
        match &self.session {
            Some(s) => format!("{} {} [{}]", self.transport, self.peer, s),
            None => format!("{} {}", self.transport, self.peer),
        }
    }
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("transport", &self.transport)
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("session", &self.session)
            .finish()
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

/// The methods of an `AsyncWrite` impl that hands every call, unchanged, to the field named:
/// for wrappers that only change how bytes are read (or nothing at all).
macro_rules! forward_async_write {
    ($field:ident) => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }

        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.$field).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
        }
    };
}
pub(crate) use forward_async_write;

impl AsyncWrite for ClientStream {
    forward_async_write!(io);
}

/// What the front door hands each finished stream to: the upstream pump or the engine.
/// The future runs in its own task and ends when the client's session is over.
pub type StreamHandler =
    Arc<dyn Fn(ClientStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A stream with bytes already read from it (by the sniffer, or a tunnel's first body) put
/// back in front, so the next reader sees the connection from its first byte.
pub struct Prefixed<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    /// The inner stream, once the prefix has been consumed (or to discard it).
    pub fn into_inner(self) -> (bytes::Bytes, S) {
        (self.prefix, self.inner)
    }

    /// The inner stream (for socket options; reading it directly would skip the prefix).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            if self.prefix.is_empty() {
                // An empty slice of the sniff buffer would still keep its whole allocation
                // (4 KiB) alive for the rest of the connection.
                self.prefix = bytes::Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    forward_async_write!(inner);
}
