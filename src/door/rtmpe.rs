//! RTMPE at the door: runs the encrypted handshake and presents the client as plain RTMP.
//!
//! [`accept`] answers the client's RTMPE C0+C1 itself, reads its C2, and returns a
//! [`ClientStream`] that looks to its consumer like a fresh plain RTMP client:
//!
//! - reading yields a synthetic C0+C1 (C0 = 3, C1 version 0, so the consumer answers with the
//!   simple handshake), then a synthetic C2 that echoes the S1 the consumer wrote, then the
//!   client's bytes, RC4-decrypted;
//! - writing swallows the consumer's first 3073 bytes (its S0+S1+S2) and RC4-encrypts
//!   everything after them to the client.
//!
//! So the core engine and a plain backend behind the upstream pump both serve RTMPE clients
//! without knowing it. RTMPE is legacy compatibility, not security (see `rtmp::rtmpe`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::limits::Limits;
use crate::net::addr::group;
use crate::net::key_work::{self, KeyWork, RunError};
use crate::rtmp::handshake::{C0C1_LEN, PACKET_LEN, S0S1S2_LEN, VERSION_PLAIN};
use crate::rtmp::rtmpe::{server_respond, Rc4Pair, RtmpeClient, RtmpeError as CryptoError};
use crate::stream::ClientStream;
use crate::throttle::{LogThrottle, RateLimit};

pub use crate::rtmp::rtmpe::AnswerPolicy;

/// Encrypted bytes held for a slow client before a write waits; one per RTMPE connection.
const OUT_CAP: usize = 32 * 1024;

#[derive(Debug, Error)]
pub enum RtmpeError {
    #[error("rtmpe handshake with {peer}: not finished within {secs} s (limits.handshake_timeout_secs); the client stalled or is not speaking RTMPE")]
    Timeout {
        peer: std::net::SocketAddr,
        secs: u64,
    },
    #[error("rtmpe handshake with {peer}: {source}")]
    Io {
        peer: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("rtmpe handshake with {peer}: {source}")]
    Crypto {
        peer: std::net::SocketAddr,
        #[source]
        source: CryptoError,
    },
    #[error("rtmpe handshake with {peer} refused: more than {rate} RTMPE handshakes a second from this address (limits.rtmpe_handshakes_per_ip_per_sec)")]
    RateLimited {
        peer: std::net::SocketAddr,
        rate: u32,
    },
    #[error("rtmpe handshake with {peer}: the key-exchange worker failed ({source}); a bug, or the runtime is shutting down")]
    Worker {
        peer: std::net::SocketAddr,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl RtmpeError {
    /// The client the handshake was with.
    pub fn peer(&self) -> std::net::SocketAddr {
        match self {
            RtmpeError::Timeout { peer, .. }
            | RtmpeError::Io { peer, .. }
            | RtmpeError::Crypto { peer, .. }
            | RtmpeError::RateLimited { peer, .. }
            | RtmpeError::Worker { peer, .. } => *peer,
        }
    }
}

/// Addresses tracked at once by [`HandshakeRates`]; past it, addresses idle for a second
/// (whose bucket is full again, so forgetting them changes nothing) are dropped.
const MAX_TRACKED: usize = 65_536;

/// RTMPE handshakes per second per client address (group), a token bucket each: one
/// address cannot keep the key-exchange workers busy for everyone else.
pub struct HandshakeRates {
    /// Reloadable ([`HandshakeRates::set_rate`]).
    rate: std::sync::atomic::AtomicU32,
    v6_prefix: u8,
    buckets: dashmap::DashMap<std::net::IpAddr, (RateLimit, std::time::Instant)>,
    /// One refusal line a second.
    pub refusals: LogThrottle,
}

impl HandshakeRates {
    pub fn new(limits: &Limits) -> Self {
        HandshakeRates {
            rate: std::sync::atomic::AtomicU32::new(limits.rtmpe_handshakes_per_ip_per_sec),
            v6_prefix: limits.ipv6_prefix_len,
            buckets: dashmap::DashMap::new(),
            refusals: LogThrottle::new(),
        }
    }

    /// A new rate (a reload). Every address starts again with a full bucket at that rate.
    pub fn set_rate(&self, rate: u32) {
        use std::sync::atomic::Ordering;
        if self.rate.swap(rate, Ordering::Relaxed) != rate {
            self.buckets.clear();
        }
    }

    /// Takes a handshake token for `ip`; false when its address has none left.
    pub fn admit(&self, ip: std::net::IpAddr) -> bool {
        let rate = self.rate.load(std::sync::atomic::Ordering::Relaxed);
        if rate == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        if self.buckets.len() >= MAX_TRACKED {
            self.buckets
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen).as_secs() < 1);
        }
        let key = group(ip, self.v6_prefix);
        let mut entry = self
            .buckets
            .entry(key)
            .or_insert_with(|| (RateLimit::per_second(rate, now), now));
        entry.1 = now;
        entry.0.take(now).is_ok()
    }
}

/// Run the RTMPE handshake on `stream` (whose next byte is C0 = 6, 8 or 9) and return it as
/// a plain-RTMP-looking stream. Bounded by `limits.handshake_timeout()`.
pub async fn accept(stream: ClientStream, limits: &Limits) -> Result<ClientStream, RtmpeError> {
    accept_with(stream, limits, AnswerPolicy::default()).await
}

/// [`accept`] for a client that must first get a token from `rates` (its address's
/// handshakes per second); refused without any key-exchange work when there is none.
pub async fn accept_rated(
    stream: ClientStream,
    limits: &Limits,
    rates: &HandshakeRates,
) -> Result<ClientStream, RtmpeError> {
    if !rates.admit(stream.peer.ip()) {
        return Err(RtmpeError::RateLimited {
            peer: stream.peer,
            rate: rates.rate.load(std::sync::atomic::Ordering::Relaxed),
        });
    }
    accept_with(stream, limits, AnswerPolicy::default()).await
}

/// [`accept`] with a chosen S0 policy (tests use it to make clients check XTEA/Blowfish).
pub async fn accept_with(
    mut stream: ClientStream,
    limits: &Limits,
    policy: AnswerPolicy,
) -> Result<ClientStream, RtmpeError> {
    let peer = stream.peer;
    let io_err = |source| RtmpeError::Io { peer, source };
    let handshake = async {
        let mut c0c1 = vec![0u8; C0C1_LEN];
        stream.read_exact(&mut c0c1).await.map_err(io_err)?;
        // Two to four 1024-bit exponentiations: keep them off the executor threads, on at
        // most half the cores at once and within the key-work budget TLS signatures share,
        // so a flood of RTMPE hellos queues (within the handshake timeout) instead of
        // starving everything else.
        let reply = key_work::budget()
            .run(KeyWork::RtmpeKeyExchange, move || {
                // On a blocking-pool thread of its own, so wall time here is CPU time.
                let began = std::time::Instant::now();
                let reply = server_respond(&c0c1, policy);
                crate::metrics::global().rtmpe_cpu(began.elapsed());
                reply
            })
            .await
            .map_err(|e| match e {
                RunError::Worker(source) => RtmpeError::Worker { peer, source },
                RunError::Closed(closed) => RtmpeError::Io {
                    peer,
                    source: io::Error::other(closed),
                },
            })?
            .map_err(|source| RtmpeError::Crypto { peer, source })?;
        stream.write_all(&reply.s0s1s2).await.map_err(io_err)?;
        stream.flush().await.map_err(io_err)?;
        // C2 is read exactly, so an encrypted connect in the same segment stays in the socket
        // for the cipher. Its content is not checked: clients disagree on it.
        let mut c2 = [0u8; PACKET_LEN];
        stream.read_exact(&mut c2).await.map_err(io_err)?;
        tracing::debug!(
            client = %peer,
            c0 = reply.client_type,
            s0 = reply.server_type,
            layout = ?reply.client_layout,
            "rtmpe handshake done"
        );
        Ok::<_, RtmpeError>(reply.keys)
    };
    let keys = tokio::time::timeout(limits.handshake_timeout(), handshake)
        .await
        .map_err(|_| RtmpeError::Timeout {
            peer,
            secs: limits.handshake_timeout_secs,
        })??;
    let mut stream = stream.map_io(|io| Box::new(RtmpeIo::new(io, keys)));
    stream.transport = stream.transport.with_rtmpe();
    Ok(stream)
}

/// The client side, for the load generator: run the RTMPE handshake with C0 = `c0` over
/// `io` (to the server at `server`, named in errors) and return the RC4 stream on which the
/// RTMP chunk stream (connect, play...) follows. No plain handshake comes after RTMPE's.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    server: std::net::SocketAddr,
    c0: u8,
    limit: std::time::Duration,
) -> Result<RtmpeIo<S>, RtmpeError> {
    let peer = server;
    let io_err = |source| RtmpeError::Io { peer, source };
    let crypto_err = |source| RtmpeError::Crypto { peer, source };
    let handshake = async {
        let client = tokio::task::spawn_blocking(move || RtmpeClient::new(c0))
            .await
            .map_err(|source| RtmpeError::Worker { peer, source })?;
        io.write_all(&client.c0c1()).await.map_err(io_err)?;
        io.flush().await.map_err(io_err)?;
        let mut s0s1s2 = vec![0u8; S0S1S2_LEN];
        io.read_exact(&mut s0s1s2).await.map_err(io_err)?;
        let (c2, keys) = tokio::task::spawn_blocking(move || client.finish(&s0s1s2))
            .await
            .map_err(|source| RtmpeError::Worker { peer, source })?
            .map_err(crypto_err)?;
        io.write_all(&c2).await.map_err(io_err)?;
        Ok::<_, RtmpeError>(keys)
    };
    let keys =
        tokio::time::timeout(limit, handshake)
            .await
            .map_err(|_| RtmpeError::Timeout {
                peer,
                secs: limit.as_secs(),
            })??;
    Ok(RtmpeIo::encrypted(io, keys))
}

/// Where the read side is in presenting a plain handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadPhase {
    /// Serving the synthetic C0+C1; the number is bytes served so far.
    C0C1(usize),
    /// Serving the echo of the consumer's S1 as C2.
    C2(usize),
    /// Decrypting the client's bytes.
    Data,
}

/// The encrypted byte stream, presented as plain RTMP.
///
/// Writes are encrypted into a buffer of at most 32 KiB and sent from there; a write waits
/// only while that buffer is still full. Held bytes go out on the next write, flush or read.
pub struct RtmpeIo<S> {
    inner: S,
    keys: Rc4Pair,
    read_phase: ReadPhase,
    /// Waiting for the consumer to write S1 before C2 can be served.
    read_waker: Option<Waker>,
    /// Bytes of the consumer's S0+S1+S2 swallowed so far (up to 3073).
    swallowed: usize,
    /// The consumer's S1, echoed back as C2; dropped once served.
    s1: Option<Box<[u8; PACKET_LEN]>>,
    /// Encrypted bytes accepted from the consumer but not yet taken by the client's socket.
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> RtmpeIo<S> {
    /// Wrap a stream whose RTMPE handshake (through C2) is done.
    pub fn new(inner: S, keys: Rc4Pair) -> Self {
        RtmpeIo {
            inner,
            keys,
            read_phase: ReadPhase::C0C1(0),
            read_waker: None,
            swallowed: 0,
            s1: Some(Box::new([0u8; PACKET_LEN])),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Wrap a stream that carries nothing but RC4 from now on (the client side).
    pub fn encrypted(inner: S, keys: Rc4Pair) -> Self {
        RtmpeIo {
            inner,
            keys,
            read_phase: ReadPhase::Data,
            read_waker: None,
            swallowed: S0S1S2_LEN,
            s1: None,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Take the part of the consumer's S0+S1+S2 in `buf`; returns how much was taken.
    fn swallow(&mut self, buf: &[u8]) -> usize {
        let n = buf.len().min(S0S1S2_LEN - self.swallowed);
        let start = self.swallowed;
        let end = start + n;
        // S1 is bytes 1..1537 of what the consumer writes.
        let lo = start.max(1);
        let hi = end.min(1 + PACKET_LEN);
        if lo < hi {
            if let Some(s1) = self.s1.as_mut() {
                s1[lo - 1..hi - 1].copy_from_slice(&buf[lo - start..hi - start]);
            }
        }
        self.swallowed = end;
        if start <= PACKET_LEN && end > PACKET_LEN {
            if let Some(w) = self.read_waker.take() {
                w.wake();
            }
        }
        n
    }
}

/// Zeros for the synthetic C1 (time 0, version 0, zero "random" bytes).
static ZEROS: [u8; PACKET_LEN] = [0u8; PACKET_LEN];

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RtmpeIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A consumer that writes and then only reads (no flush, as is common over TCP)
        // must not leave held bytes behind: reading moves them on too. A write error shows
        // up on the next write or flush.
        if this.out_pos < this.out.len() {
            let _ = this.poll_drain(cx);
        }
        loop {
            match this.read_phase {
                ReadPhase::C0C1(served) => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let mut served = served;
                    if served == 0 {
                        buf.put_slice(&[VERSION_PLAIN]);
                        served = 1;
                    }
                    let n = buf.remaining().min(C0C1_LEN - served);
                    buf.put_slice(&ZEROS[..n]);
                    served += n;
                    this.read_phase = if served == C0C1_LEN {
                        ReadPhase::C2(0)
                    } else {
                        ReadPhase::C0C1(served)
                    };
                    return Poll::Ready(Ok(()));
                }
                ReadPhase::C2(served) => {
                    if this.swallowed <= PACKET_LEN {
                        // The consumer has not written its whole S1 yet.
                        this.read_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let Some(s1) = this.s1.as_ref() else {
                        this.read_phase = ReadPhase::Data;
                        continue;
                    };
                    let n = buf.remaining().min(PACKET_LEN - served);
                    buf.put_slice(&s1[served..served + n]);
                    let served = served + n;
                    if served == PACKET_LEN {
                        this.s1 = None;
                        this.read_phase = ReadPhase::Data;
                    } else {
                        this.read_phase = ReadPhase::C2(served);
                    }
                    return Poll::Ready(Ok(()));
                }
                ReadPhase::Data => {
                    let before = buf.filled().len();
                    let res = Pin::new(&mut this.inner).poll_read(cx, buf);
                    if let Poll::Ready(Ok(())) = res {
                        this.keys.inbound.apply(&mut buf.filled_mut()[before..]);
                    }
                    return res;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> RtmpeIo<S> {
    /// Write out the held encrypted bytes; Ready(Ok) once none are left.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "rtmpe: the client's socket accepted no bytes",
                )));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RtmpeIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.swallowed < S0S1S2_LEN {
            return Poll::Ready(Ok(this.swallow(buf)));
        }
        // Bounded: take new bytes only once the previous batch is out.
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = buf.len().min(OUT_CAP);
        this.out.extend_from_slice(&buf[..n]);
        this.keys.outbound.apply(&mut this.out);
        // Start sending now; what the socket does not take is sent on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::handshake::server_reply;
    use crate::rtmp::rtmpe::{TYPE_BLOWFISH, TYPE_PLAIN, TYPE_XTEA};
    use crate::stream::Transport;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn addr() -> std::net::SocketAddr {
        "127.0.0.1:1935".parse().unwrap()
    }

    /// Client side over a duplex pipe: handshake, then C2 and `payload` in one write.
    async fn run_client(
        mut io: tokio::io::DuplexStream,
        c0: u8,
        payload: Vec<u8>,
        expect_back: usize,
    ) -> Vec<u8> {
        let client = RtmpeClient::new(c0);
        io.write_all(&client.c0c1()).await.unwrap();
        let mut s = vec![0u8; S0S1S2_LEN];
        io.read_exact(&mut s).await.unwrap();
        let (c2, mut keys) = client.finish(&s).unwrap();
        let mut enc = payload.clone();
        keys.outbound.apply(&mut enc);
        let mut first = c2;
        first.extend_from_slice(&enc);
        io.write_all(&first).await.unwrap();
        let mut back = vec![0u8; expect_back];
        io.read_exact(&mut back).await.unwrap();
        keys.inbound.apply(&mut back);
        back
    }

    #[tokio::test]
    async fn presents_plain_rtmp_and_pipes_rc4_both_ways() {
        for c0 in [TYPE_PLAIN, TYPE_XTEA, TYPE_BLOWFISH] {
            // Small pipe: forces partial reads and writes.
            let (client_io, server_io) = duplex(97);
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
            let reply_data: Vec<u8> = (0..70_000u32).map(|i| (i % 239) as u8).collect();
            let expect = reply_data.clone();
            let client = tokio::spawn(run_client(client_io, c0, payload.clone(), expect.len()));

            let stream = ClientStream::new(Box::new(server_io), Transport::Rtmp, addr(), addr());
            let mut s = accept(stream, &Limits::default()).await.unwrap();
            assert_eq!(s.transport, Transport::Rtmpe);
            // The consumer sees a plain, version-0 C0+C1 ...
            let mut c0c1 = vec![0u8; C0C1_LEN];
            s.read_exact(&mut c0c1).await.unwrap();
            assert_eq!(c0c1[0], 3);
            assert_eq!(&c0c1[5..9], &[0, 0, 0, 0]);
            // ... answers it; its S0S1S2 must be swallowed, in odd-sized pieces.
            let reply = server_reply(&c0c1).unwrap();
            for piece in reply.s0s1s2.chunks(1000) {
                s.write_all(piece).await.unwrap();
            }
            // C2 is an echo of the S1 it wrote.
            let mut c2 = vec![0u8; PACKET_LEN];
            s.read_exact(&mut c2).await.unwrap();
            assert_eq!(&c2[..], &reply.s0s1s2[1..1537]);
            // Then the client's bytes, decrypted.
            let mut got = vec![0u8; payload.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, payload);
            // And what the consumer writes reaches the client encrypted.
            for piece in reply_data.chunks(5000) {
                s.write_all(piece).await.unwrap();
            }
            s.flush().await.unwrap();
            let back = client.await.unwrap();
            assert_eq!(back, expect);
        }
    }

    #[tokio::test]
    async fn c2_waits_for_s1() {
        let (client_io, server_io) = duplex(8192);
        let client = tokio::spawn(run_client(client_io, TYPE_PLAIN, b"abc".to_vec(), 3));
        let stream = ClientStream::new(Box::new(server_io), Transport::Rtmpt, addr(), addr());
        let s = accept(stream, &Limits::default()).await.unwrap();
        assert_eq!(s.transport, Transport::Rtmpte);
        let (mut r, mut w) = tokio::io::split(s);
        let mut c0c1 = vec![0u8; C0C1_LEN];
        r.read_exact(&mut c0c1).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut c2 = vec![0u8; PACKET_LEN + 3];
            r.read_exact(&mut c2).await.unwrap();
            c2
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!reader.is_finished(), "C2 must wait for the consumer's S1");
        let reply = server_reply(&c0c1).unwrap();
        w.write_all(&reply.s0s1s2).await.unwrap();
        w.write_all(b"xyz").await.unwrap();
        w.flush().await.unwrap();
        let c2 = reader.await.unwrap();
        assert_eq!(&c2[..PACKET_LEN], &reply.s0s1s2[1..1537]);
        assert_eq!(&c2[PACKET_LEN..], b"abc");
        assert_eq!(client.await.unwrap(), b"xyz");
    }

    #[tokio::test]
    async fn async_client_meets_door() {
        let (client_io, server_io) = duplex(300);
        let client = tokio::spawn(async move {
            let mut s = connect(client_io, addr(), TYPE_BLOWFISH, Duration::from_secs(10))
                .await
                .unwrap();
            let msg: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
            s.write_all(&msg).await.unwrap();
            s.flush().await.unwrap();
            let mut back = vec![0u8; 5];
            s.read_exact(&mut back).await.unwrap();
            back
        });
        let stream = ClientStream::new(Box::new(server_io), Transport::Rtmp, addr(), addr());
        let mut s = accept(stream, &Limits::default()).await.unwrap();
        let mut c0c1 = vec![0u8; C0C1_LEN];
        s.read_exact(&mut c0c1).await.unwrap();
        s.write_all(&server_reply(&c0c1).unwrap().s0s1s2)
            .await
            .unwrap();
        let mut c2_and_msg = vec![0u8; PACKET_LEN + 10_000];
        s.read_exact(&mut c2_and_msg).await.unwrap();
        let want: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        assert_eq!(&c2_and_msg[PACKET_LEN..], &want[..]);
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(client.await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn held_bytes_move_on_while_the_consumer_only_reads() {
        // A tiny pipe, so most of the reply is held in our buffer when write returns.
        let (client_io, server_io) = duplex(64);
        let client = tokio::spawn(async move {
            let mut s = connect(client_io, addr(), TYPE_PLAIN, Duration::from_secs(10))
                .await
                .unwrap();
            let mut got = vec![0u8; 3000];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(b"ack").await.unwrap();
            s.flush().await.unwrap();
            got
        });
        let stream = ClientStream::new(Box::new(server_io), Transport::Rtmp, addr(), addr());
        let mut s = accept(stream, &Limits::default()).await.unwrap();
        let mut c0c1 = vec![0u8; C0C1_LEN];
        s.read_exact(&mut c0c1).await.unwrap();
        s.write_all(&server_reply(&c0c1).unwrap().s0s1s2)
            .await
            .unwrap();
        let mut c2 = vec![0u8; PACKET_LEN];
        s.read_exact(&mut c2).await.unwrap();
        let reply = vec![0x5a; 3000];
        s.write_all(&reply).await.unwrap();
        // No flush: the ack only comes once every byte has reached the client.
        let mut ack = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
            .await
            .expect("held bytes must move on while the consumer reads")
            .unwrap();
        assert_eq!(&ack, b"ack");
        assert_eq!(client.await.unwrap(), reply);
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let (mut client_io, server_io) = duplex(8192);
        // Half a C1, then silence.
        client_io.write_all(&[6u8; 700]).await.unwrap();
        let stream = ClientStream::new(Box::new(server_io), Transport::Rtmp, addr(), addr());
        let limits = Limits {
            handshake_timeout_secs: 1,
            ..Limits::default()
        };
        let err = accept(stream, &limits).await.unwrap_err();
        assert!(matches!(err, RtmpeError::Timeout { secs: 1, .. }), "{err}");
    }

    #[tokio::test]
    async fn plain_c0_is_refused() {
        let (mut client_io, server_io) = duplex(8192);
        let mut hello = vec![3u8];
        hello.extend_from_slice(&[0u8; PACKET_LEN]);
        client_io.write_all(&hello).await.unwrap();
        let stream = ClientStream::new(Box::new(server_io), Transport::Rtmp, addr(), addr());
        let err = accept(stream, &Limits::default()).await.unwrap_err();
        assert!(matches!(err, RtmpeError::Crypto { .. }), "{err}");
    }

    #[test]
    fn a_reloaded_rate_applies_at_once() {
        let rates = HandshakeRates::new(&Limits {
            rtmpe_handshakes_per_ip_per_sec: 1,
            ..Limits::default()
        });
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        assert!(rates.admit(ip));
        assert!(!rates.admit(ip), "one a second");
        rates.set_rate(5);
        for i in 0..5 {
            assert!(rates.admit(ip), "handshake {i} at the new rate");
        }
    }
}
