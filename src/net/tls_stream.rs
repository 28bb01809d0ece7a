//! The server side of TLS over rustls's unbuffered API: a stream that owns its buffers and
//! holds none while its connection is idle (the door's RTMPS and RTMPTS, the admin and
//! cluster listeners).
//!
//! rustls's buffered `ServerConnection` (what tokio-rustls drives) keeps a 4 KiB read buffer
//! for the life of every connection, resized before each read and never shrunk: a third of
//! an idle RTMPS connection through the relay (bench/RESULTS.md, seventh session). Here each
//! buffer exists only while it holds bytes:
//! - `incoming`, ciphertext read from the socket: allocated for a read (up to the records
//!   that fill the reader's buffer, so a bulk stream takes one read per 64 KiB, not one per
//!   record), kept only while it holds part of a record (or of a handshake message) or whole
//!   records the reader's buffer had no room for, freed when every byte is processed;
//! - `plain`, decrypted bytes the reader has not taken yet (a record larger than its buffer);
//! - `outgoing`, records encrypted and not yet written: freed once the socket has them all.
//!
//! Every size is bounded here, before anything is allocated: a record is at most
//! [`MAX_RECORD`] bytes (rustls refuses a header declaring more, and that refusal is worded
//! below), at most [`INCOMING_MAX`] received bytes are held (a handshake message joined
//! across records), a write takes at most [`WRITE_BATCH`] bytes and the next write waits
//! until the socket took them (backpressure), and at most [`OUTGOING_MAX`] bytes wait to be
//! sent (a certificate chain, or key updates answered to a peer that does not read).
//!
//! The cipher suite policy is [`crate::net::tls::config_for_client`]'s, decided on the
//! ClientHello's list of cipher suites: read in place from the first record ([`peek_suites`]),
//! and the connection then starts on the configuration chosen, reading the same bytes. Only a
//! ClientHello laid out otherwise (split into records before its suites) goes through rustls's
//! `Acceptor`, which parsed every ClientHello a second time before (3 % of a full RSA 2048
//! handshake's server CPU, bench/RESULTS.md, ninth session).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{Acceptor, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
    WriteTraffic,
};
use rustls::ServerConfig;

use crate::net::key_work::{self, KeyWork};
use crate::net::tls::TlsServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest TLS record on the wire: a 5-byte header, then at most 2^14 bytes of data and
/// 2,048 of cipher expansion (RFC 5246 section 6.2.3; TLS 1.3 allows less). rustls refuses a
/// header declaring more before the record's bytes arrive.
pub const MAX_RECORD: usize = RECORD_HEADER + 16_384 + 2_048;
/// A TLS record's header: type, legacy_record_version, length (RFC 8446 section 5.1).
const RECORD_HEADER: usize = 5;
/// The most received bytes held at once. More than one record only while a handshake message
/// spanning records is joined in place (rustls allows them up to 64 KiB; a ClientHello is
/// 0.5-2 KiB).
pub const INCOMING_MAX: usize = 4 * MAX_RECORD;
/// The most plaintext one write takes: four full records, encrypted and written in one go
/// (rustls's buffered stream took up to 64 KiB per write too).
pub const WRITE_BATCH: usize = 64 * 1024;
/// The most encrypted bytes waiting for the socket: a write's batch, plus what the
/// connection adds on its own (the handshake's flight, key updates, alerts).
pub const OUTGOING_MAX: usize = WRITE_BATCH + 4 * MAX_RECORD;
/// Plaintext per record.
const MAX_FRAGMENT: usize = 16_384;
/// Room per record beyond its plaintext when sizing a buffer to encrypt into (the header,
/// an explicit nonce, the tag and TLS 1.3's content type take 21 to 29 bytes); a connection
/// needing more says so and the buffer is sized again.
const RECORD_ROOM: usize = 64;

/// A record's ciphertext beyond its plaintext, at least, in TLS 1.3 (the content type byte
/// and a 16-byte AEAD tag) and in TLS 1.2 (ChaCha20-Poly1305's tag; AES-GCM adds an 8-byte
/// nonce too): what [`records_that_fit`] subtracts from a record's length.
const TLS13_MIN_OVERHEAD: usize = 17;
const AEAD_MIN_OVERHEAD: usize = 16;

/// What the caller wants from a turn of the connection.
enum Want<'a, 'b> {
    /// Only to move the handshake on.
    Drive,
    /// Plaintext, into this buffer.
    Read(&'a mut ReadBuf<'b>),
    /// To send these bytes (at most one batch).
    Write(&'a [u8]),
    /// To send close_notify.
    Close,
}

/// Where a turn of the connection stopped.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Nothing more without more bytes from the peer.
    NeedInput,
    /// Plaintext went into the reader's buffer (or waits in `plain`).
    Delivered,
    /// The bytes to write are encrypted into `outgoing`.
    Wrote,
    /// close_notify was queued, or both sides have sent theirs.
    Closed,
}

/// A TLS server connection over `IO` (the door's TCP socket).
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received bytes not processed yet (part of a record); no allocation when empty.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet, from `plain_pos`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Encrypted records the socket has not taken yet, from `out_pos`.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer's close_notify came: reads end once `plain` is empty.
    peer_closed: bool,
    /// The socket reached its end.
    io_eof: bool,
    /// Our close_notify is queued: no more writes.
    write_closed: bool,
    /// The connection failed (the error went to the caller then): everything fails after.
    failed: bool,
}

/// A rustls error as the stream's I/O error, worded for a log line.
fn tls_error(e: rustls::Error) -> io::Error {
    match e {
        rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the peer declared a TLS record longer than TLS allows ({MAX_RECORD} bytes with \
                 its header): not a TLS client, or a broken one"
            ),
        ),
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

/// Marks the connection failed and passes its error on.
fn fail(failed: &mut bool, e: io::Error) -> io::Error {
    *failed = true;
    e
}

fn failed_before() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the TLS connection failed earlier (the error was returned then): close it",
    )
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsStream<IO> {
    /// The server's TLS handshake on `io`, whose first bytes (already read from it, e.g. by
    /// the door's sniff) are `head`: reads the ClientHello, chooses the configuration for it
    /// from `server` ([`crate::net::tls::config_for_client`]), and completes the handshake,
    /// session tickets sent. The caller bounds the time it takes.
    pub async fn accept(mut io: IO, head: &[u8], server: &TlsServer) -> io::Result<Self> {
        if head.len() > INCOMING_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS: {} bytes before the ClientHello was read", head.len()),
            ));
        }
        let mut incoming = Vec::with_capacity(MAX_RECORD.max(head.len()));
        incoming.extend_from_slice(head);
        let chosen = read_client_hello(&mut io, &mut incoming, &server.config).await?;
        // Counted from its ClientHello on: a connection that sends nothing (a port scanner,
        // a slow client) has no signature coming and is no company for the rule.
        let _under_way = server.handshake_begins();
        let stream = TlsStream {
            io,
            conn: UnbufferedServerConnection::new(chosen).map_err(tls_error)?,
            incoming,
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            peer_closed: false,
            io_eof: false,
            write_closed: false,
            failed: false,
        };
        stream.handshake(server).await
    }

    /// Runs the handshake to its end: every flight written, the peer's Finished read, the
    /// session tickets sent. When `server` says so ([`TlsServer::sign_off_executor`]: an RSA
    /// key, 1-3 ms of CPU per signature on the machines measured, and other handshakes under
    /// way) the steps that answer a ClientHello (or take TLS 1.2's client key exchange) run
    /// on the blocking pool, within the [`key_work`] budget (one per core, shared with RTMPE), and the rest here (each
    /// move to the pool costs two thread wake-ups): on an executor thread, a burst of such
    /// handshakes held every stream behind it (bench/RESULTS.md: a player's p99 latency 76 ms
    /// alone, 226-250 ms while 580 RSA handshakes a second arrived).
    async fn handshake(mut self, server: &TlsServer) -> io::Result<Self> {
        // A client that gets an ECDSA (or Ed25519) chain beside the RSA one signs cheaply:
        // nothing to move. Read from the ClientHello before the first step; a hello that is
        // not whole in its first record counts as costly.
        let cheap = server.signs_slowly()
            && hello_offer(&self.incoming).is_some_and(|o| server.signs_cheaply_for(&o));
        loop {
            let step =
                if server.sign_off_executor() && !cheap && holds_handshake_record(&self.incoming) {
                    let (stream, step) = self.drive_off_executor().await?;
                    self = stream;
                    step
                } else {
                    self.process(Want::Drive)
                };
            let progress = match step {
                Ok(p) => p,
                Err(e) => {
                    self.send_once();
                    return Err(e);
                }
            };
            poll_fn(|cx| self.poll_send(cx)).await?;
            if !self.conn.is_handshaking() {
                return Ok(self);
            }
            if progress == Progress::Closed || self.peer_closed {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer sent close_notify during the TLS handshake",
                ));
            }
            let n = poll_fn(|cx| self.poll_fill(cx, 0)).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
    }

    /// One handshake step on a blocking-pool thread, once a slot is free; the socket waits
    /// here meanwhile.
    async fn drive_off_executor(self) -> io::Result<(Self, io::Result<Progress>)> {
        let (mut bare, io) = self.with_io(());
        let (bare, step) = key_work::budget()
            .run(KeyWork::TlsSignature, move || {
                crate::metrics::global().tls_step_offloaded();
                let step = bare.process(Want::Drive);
                (bare, step)
            })
            .await
            .map_err(|e| io::Error::other(format!("TLS handshake's signing step: {e}")))?;
        let (stream, ()) = bare.with_io(io);
        Ok((stream, step))
    }
}

impl<IO> TlsStream<IO> {
    /// The same connection over `io`, and the socket it had: a handshake step moves to
    /// another thread without the socket (`TlsStream<()>`).
    fn with_io<T>(self, io: T) -> (TlsStream<T>, IO) {
        let TlsStream {
            io: had,
            conn,
            incoming,
            plain,
            plain_pos,
            outgoing,
            out_pos,
            peer_closed,
            io_eof,
            write_closed,
            failed,
        } = self;
        let stream = TlsStream {
            io,
            conn,
            incoming,
            plain,
            plain_pos,
            outgoing,
            out_pos,
            peer_closed,
            io_eof,
            write_closed,
            failed,
        };
        (stream, had)
    }

    /// The socket (for socket options; reading or writing it directly breaks the stream).
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether this session was resumed (a ticket) or ran a full handshake.
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// The cipher suite agreed on.
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.conn.negotiated_cipher_suite().map(|s| s.suite())
    }

    /// Bytes of heap the stream's own buffers hold now (their capacity): zero when idle.
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Runs the connection over what `incoming` holds until it needs more bytes or has done
    /// what `want` asks; handshake records go into `outgoing`, plaintext to the reader or
    /// into `plain`. Processed bytes leave `incoming`, which is freed once empty.
    fn process(&mut self, mut want: Want<'_, '_>) -> io::Result<Progress> {
        if self.failed {
            return Err(failed_before());
        }
        // Bytes at the front of `incoming` already processed: the next turn starts after
        // them (rustls's "discard"), and they are removed once at the end.
        let mut start = 0;
        let mut delivered = false;
        // Where the records a reader's buffer can take end, in `incoming` ([`records_that_fit`]).
        let mut cut: Option<usize> = None;
        let result =
            'turns: loop {
                if let Want::Read(buf) = &want {
                    if !self.conn.is_handshaking() && !matches!(cut, Some(c) if start < c) {
                        // Whole records only while their plaintext surely fits the reader's
                        // buffer: the next one waits here for the next read rather than being
                        // decrypted into `plain` (and handed on as a short read of its own).
                        // One record at least, when none was delivered yet. rustls takes one
                        // record per turn: the cut is walked to once, and again only when the
                        // turns reach it, so each header is read about once per call.
                        let overhead = match self.conn.protocol_version() {
                            Some(rustls::ProtocolVersion::TLSv1_3) => TLS13_MIN_OVERHEAD,
                            _ => AEAD_MIN_OVERHEAD,
                        };
                        let held = self.incoming.get(start..).unwrap_or_default();
                        match records_that_fit(held, buf.remaining(), overhead, !delivered) {
                            // The next record waits: this read is done.
                            Some(0) if delivered => break Ok(Progress::Delivered),
                            Some(n) => cut = Some(start + n),
                            None => cut = Some(self.incoming.len()),
                        }
                    }
                }
                let end = cut.unwrap_or(self.incoming.len()).max(start);
                let input = self.incoming.get_mut(start..end).unwrap_or_default();
                let UnbufferedStatus { discard, state } = self.conn.process_tls_records(input);
                let state = match state {
                    Ok(state) => state,
                    Err(e) => {
                        start += discard;
                        break Err(e);
                    }
                };
                match state {
                    ConnectionState::ReadTraffic(mut traffic) => {
                        let mut extra = 0;
                        while let Some(record) = traffic.next_record() {
                            let record = match record {
                                Ok(r) => r,
                                Err(e) => {
                                    start += discard + extra;
                                    break 'turns Err(e);
                                }
                            };
                            extra += record.discard;
                            let mut rest = record.payload;
                            if let Want::Read(buf) = &mut want {
                                if self.plain_pos >= self.plain.len() {
                                    let n = rest.len().min(buf.remaining());
                                    let (now, later) = rest.split_at(n);
                                    buf.put_slice(now);
                                    rest = later;
                                    delivered = true;
                                }
                            }
                            if !rest.is_empty() {
                                // A record larger than the reader's buffer, or decrypted while
                                // driving or writing: kept for the next read (bounded by what
                                // `incoming` held).
                                if self.plain.len() - self.plain_pos + rest.len() > INCOMING_MAX {
                                    return Err(fail(&mut self.failed, io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "TLS: more decrypted bytes waiting than were ever received",
                                )));
                                }
                                self.plain.extend_from_slice(rest);
                                delivered = true;
                            }
                        }
                        start += discard + extra;
                        if let Want::Read(buf) = &want {
                            if buf.remaining() == 0 || self.plain_pos < self.plain.len() {
                                break Ok(Progress::Delivered);
                            }
                        }
                    }
                    ConnectionState::EncodeTlsData(mut encode) => {
                        start += discard;
                        // Ask the size first (an empty buffer), then encode into exactly that.
                        let required = match encode.encode(&mut []) {
                            Ok(_) => 0,
                            Err(EncodeError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => required_size,
                            Err(EncodeError::AlreadyEncoded) => continue,
                        };
                        let have = self.outgoing.len();
                        if have + required > OUTGOING_MAX {
                            return Err(fail(&mut self.failed, too_much_to_send(have + required)));
                        }
                        self.outgoing.resize(have + required, 0);
                        let out = self.outgoing.get_mut(have..).unwrap_or_default();
                        match encode.encode(out) {
                            Ok(n) => self.outgoing.truncate(have + n),
                            Err(e) => {
                                self.outgoing.truncate(have);
                                return Err(fail(
                                    &mut self.failed,
                                    io::Error::other(format!(
                                        "TLS: encoding a handshake record failed: {e}"
                                    )),
                                ));
                            }
                        }
                    }
                    ConnectionState::TransmitTlsData(transmit) => {
                        // `outgoing` keeps the records in order and the socket gets them before
                        // anything encrypted later: as good as sent for rustls.
                        transmit.done();
                        start += discard;
                    }
                    ConnectionState::BlockedHandshake => {
                        start += discard;
                        break Ok(if delivered {
                            Progress::Delivered
                        } else {
                            Progress::NeedInput
                        });
                    }
                    ConnectionState::WriteTraffic(mut traffic) => {
                        start += discard;
                        match &want {
                            Want::Write(data) => {
                                if let Err(e) = encrypt_into(&mut traffic, data, &mut self.outgoing)
                                {
                                    return Err(fail(&mut self.failed, e));
                                }
                                break Ok(Progress::Wrote);
                            }
                            Want::Close => {
                                if let Err(e) = close_into(&mut traffic, &mut self.outgoing) {
                                    return Err(fail(&mut self.failed, e));
                                }
                                break Ok(Progress::Closed);
                            }
                            Want::Read(_) | Want::Drive => {
                                break Ok(if delivered {
                                    Progress::Delivered
                                } else {
                                    Progress::NeedInput
                                });
                            }
                        }
                    }
                    ConnectionState::PeerClosed => {
                        start += discard;
                        self.peer_closed = true;
                    }
                    ConnectionState::Closed => {
                        start += discard;
                        self.peer_closed = true;
                        break Ok(Progress::Closed);
                    }
                    ConnectionState::ReadEarlyData(_) => {
                        start += discard;
                        break Err(rustls::Error::General(
                            "early data, which this server does not accept".into(),
                        ));
                    }
                    other => {
                        start += discard;
                        break Err(rustls::Error::General(format!(
                            "unexpected TLS connection state {other:?}"
                        )));
                    }
                }
            };
        if start >= self.incoming.len() {
            self.incoming = Vec::new();
        } else if start > 0 {
            self.incoming.drain(..start);
        }
        match result {
            Ok(progress) => Ok(progress),
            Err(e) => {
                self.queue_alert();
                Err(self.fail(tls_error(e)))
            }
        }
    }

    /// After an error: the alert rustls queued for the peer, into `outgoing`.
    fn queue_alert(&mut self) {
        let input = self.incoming.as_mut_slice();
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(input);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            if let Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) =
                encode.encode(&mut [])
            {
                let have = self.outgoing.len();
                if have + required_size <= OUTGOING_MAX {
                    self.outgoing.resize(have + required_size, 0);
                    let out = self.outgoing.get_mut(have..).unwrap_or_default();
                    match encode.encode(out) {
                        Ok(n) => self.outgoing.truncate(have + n),
                        Err(_) => self.outgoing.truncate(have),
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.failed = true;
        e
    }

    /// Plaintext kept from an earlier record into `buf`; false when there is none.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let Some(rest) = self.plain.get(self.plain_pos..).filter(|r| !r.is_empty()) else {
            return false;
        };
        let n = rest.len().min(buf.remaining());
        buf.put_slice(rest.get(..n).unwrap_or_default());
        self.plain_pos += n;
        if self.plain_pos >= self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let r = poll_fill(&mut self.io, &mut self.incoming, cx, want);
        if let Poll::Ready(Err(_)) = &r {
            self.failed = true;
        }
        r
    }

    /// Writes `outgoing` to the socket; Ready once all of it went (the buffer then freed).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.outgoing.get(self.out_pos..).filter(|r| !r.is_empty()) {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket took no bytes of a TLS record",
                )));
            }
            self.out_pos += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// One attempt to write `outgoing` (an alert, a reply from the read side), registering
    /// no waker: a writer waiting for the socket keeps its own, and sends these bytes first.
    fn send_once(&mut self) {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let _ = self.poll_send(&mut cx);
    }

    /// Encrypts and queues `data` (at most one batch): the caller flushed `outgoing` first.
    fn queue_write(&mut self, data: &[u8]) -> io::Result<()> {
        match self.process(Want::Write(data))? {
            Progress::Wrote => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS: application data written before the handshake finished",
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.failed {
            return Err(failed_before());
        }
        if self.write_closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write on a TLS stream after its shutdown (close_notify sent)",
            ));
        }
        Ok(())
    }
}

/// Reads until the ClientHello's cipher suites are in (the bytes stay in `incoming` for the
/// connection) and returns the configuration for them.
async fn read_client_hello<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    incoming: &mut Vec<u8>,
    config: &Arc<ServerConfig>,
) -> io::Result<Arc<ServerConfig>> {
    loop {
        match peek_suites(incoming) {
            HelloPeek::Suites(suites) => {
                let suites = suites
                    .chunks_exact(2)
                    .filter_map(|pair| <[u8; 2]>::try_from(pair).ok())
                    .map(|pair| rustls::CipherSuite::from(u16::from_be_bytes(pair)));
                return Ok(crate::net::tls::config_for_suites(config, suites));
            }
            HelloPeek::Other => return accept_client_hello(io, incoming, config).await,
            HelloPeek::NeedMore => {}
        }
        let n = poll_fn(|cx| poll_fill(io, incoming, cx, 0)).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection before its TLS ClientHello was complete",
            ));
        }
    }
}

/// What the bytes received so far say about the ClientHello's cipher suites.
#[derive(Debug, PartialEq, Eq)]
enum HelloPeek<'a> {
    /// The cipher_suites field's bytes (two per suite, in the client's order).
    Suites(&'a [u8]),
    /// The first record does not hold them yet: read more.
    NeedMore,
    /// Not where a ClientHello in one record has them (a hello split into small records, a
    /// malformed one, not a handshake record at all): rustls's `Acceptor` reads it instead,
    /// and says what is wrong when something is.
    Other,
}

/// The cipher suites of the ClientHello at the start of `head`, read in place from its first
/// record (RFC 8446 section 4.1.2: record header, handshake header, legacy_version, random,
/// legacy_session_id, then cipher_suites). Only a choice of configuration rests on it: rustls
/// parses and checks the whole ClientHello (this one included) when the connection starts.
/// Every index is checked (`get`), so no input panics.
fn peek_suites(head: &[u8]) -> HelloPeek<'_> {
    const HANDSHAKE: u8 = 0x16;
    const CLIENT_HELLO: u8 = 0x01;
    /// Handshake header (type, 24-bit length), legacy_version, random.
    const BEFORE_SESSION_ID: usize = 4 + 2 + 32;
    match head.first() {
        Some(&HANDSHAKE) => {}
        Some(_) => return HelloPeek::Other,
        None => return HelloPeek::NeedMore,
    }
    let Some(&[_, _, _, hi, lo]) = head.get(..RECORD_HEADER) else {
        return HelloPeek::NeedMore;
    };
    let record_len = usize::from(u16::from_be_bytes([hi, lo]));
    if RECORD_HEADER + record_len > MAX_RECORD {
        // rustls refuses it with its own message.
        return HelloPeek::Other;
    }
    let rest = head.get(RECORD_HEADER..).unwrap_or_default();
    let body = rest.get(..record_len).unwrap_or(rest);
    // The record's first `end` bytes are needed and not all here: read more while the record
    // has them coming, or leave it to rustls when they lie beyond it (the hello goes on in
    // another record).
    let need = |end: usize| {
        if end > record_len {
            HelloPeek::Other
        } else {
            HelloPeek::NeedMore
        }
    };
    match body.first() {
        Some(&CLIENT_HELLO) => {}
        Some(_) => return HelloPeek::Other,
        None => return need(1),
    }
    let Some(&sid_len) = body.get(BEFORE_SESSION_ID) else {
        return need(BEFORE_SESSION_ID + 1);
    };
    let at = BEFORE_SESSION_ID + 1 + usize::from(sid_len);
    let Some(&[hi, lo]) = body.get(at..at + 2) else {
        return need(at + 2);
    };
    let suites_len = usize::from(u16::from_be_bytes([hi, lo]));
    let start = at + 2;
    if suites_len % 2 != 0 {
        return HelloPeek::Other;
    }
    match body.get(start..start + suites_len) {
        Some(suites) => HelloPeek::Suites(suites),
        None => need(start + suites_len),
    }
}

/// [`read_client_hello`] through rustls's Acceptor, fed a copy of what came: for a
/// ClientHello [`peek_suites`] does not read.
async fn accept_client_hello<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
    incoming: &mut Vec<u8>,
    config: &Arc<ServerConfig>,
) -> io::Result<Arc<ServerConfig>> {
    let mut acceptor = Acceptor::default();
    let mut fed = 0;
    loop {
        while let Some(mut rest) = incoming.get(fed..).filter(|r| !r.is_empty()) {
            let n = acceptor.read_tls(&mut rest)?;
            if n == 0 {
                break;
            }
            fed += n;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let suites = accepted.client_hello().cipher_suites().to_vec();
                return Ok(crate::net::tls::config_for_client(config, &suites));
            }
            Ok(None) => {}
            Err((e, mut alert)) => {
                // Tell the peer why (best effort: its socket may not take it).
                let mut wire = Vec::new();
                if alert.write_all(&mut wire).is_ok() && !wire.is_empty() {
                    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
                    let _ = Pin::new(&mut *io).poll_write(&mut cx, &wire);
                }
                return Err(tls_error(e));
            }
        }
        let n = poll_fn(|cx| poll_fill(io, incoming, cx, 0)).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection before its TLS ClientHello was complete",
            ));
        }
    }
}

/// Reads what the socket has into `incoming` (allocated for the read; freed again when
/// nothing came and nothing was held): the number of bytes, 0 at the socket's end. `want`
/// is the plaintext the reader takes at once (0 while handshaking): a read takes up to the
/// records that carry that much, beyond the part of a record already held, at least a
/// record's room and at most [`INCOMING_MAX`] in all. Records read beyond what the reader's
/// buffer takes wait in `incoming` ([`records_that_fit`]).
fn poll_fill<IO: AsyncRead + Unpin>(
    io: &mut IO,
    incoming: &mut Vec<u8>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    let len = incoming.len();
    if len >= INCOMING_MAX {
        return Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "TLS: {len} bytes received without a complete record or handshake message \
                 (a record is at most {MAX_RECORD} bytes): not a TLS client, or a broken one"
            ),
        )));
    }
    // One record's room at least: the rest of any partial record fits, and a read takes up
    // to a full record (rustls's own stream read 4 KiB at a time); more when the reader takes
    // more, so a bulk stream is read in fewer, larger reads (and written on in fewer writes).
    let target = if len < MAX_RECORD {
        // `want` bytes of plaintext come in full records of MAX_FRAGMENT, each RECORD_ROOM
        // larger on the wire at most: room for all of them after the part already held.
        let wire = want.saturating_add((want / MAX_FRAGMENT + 1) * RECORD_ROOM);
        len.saturating_add(wire).clamp(MAX_RECORD, INCOMING_MAX)
    } else {
        (len + MAX_RECORD).min(INCOMING_MAX)
    };
    incoming.reserve_exact(target - len);
    let spare = incoming.spare_capacity_mut();
    let room = spare.len().min(target - len);
    let spare = spare.get_mut(..room).unwrap_or_default();
    let start = spare.as_ptr().cast::<u8>();
    let mut rb = ReadBuf::uninit(spare);
    let polled = Pin::new(io).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    let same_buffer = rb.filled().as_ptr() == start;
    match polled {
        Poll::Ready(Ok(())) if n > 0 => {
            if !same_buffer || n > room {
                return Poll::Ready(Err(io::Error::other(
                    "TLS: the socket under the stream filled a buffer other than the one given",
                )));
            }
            // SAFETY: `ReadBuf` guarantees its first `filled().len()` bytes are initialised,
            // and they are `incoming`'s spare capacity from `len` on (checked just above),
            // within its `room` bytes.
            unsafe { incoming.set_len(len + n) };
            Poll::Ready(Ok(n))
        }
        other => {
            if len == 0 {
                // Waiting for the peer, or nothing more: hold no buffer meanwhile.
                *incoming = Vec::new();
            } else if incoming.capacity() > MAX_RECORD.max(len) {
                // Waiting with part of a record after a larger read: one record's room is
                // all it needs meanwhile.
                incoming.shrink_to(MAX_RECORD.max(len));
            }
            other.map_ok(|()| 0)
        }
    }
}

/// How many bytes at the front of `held` are whole records whose plaintext (at most their
/// length less `overhead`) fits in `room`, when a whole record after them does not (the
/// first record counts as fitting when `take_one`, so a reader with a small buffer still
/// gets it, through `plain`): `None` when every whole record fits. Only headers are read,
/// where they lie; a header declaring more than a record may hold is rustls's to refuse,
/// and it sees that record: whatever the cut, rustls gets it next.
fn records_that_fit(
    held: &[u8],
    mut room: usize,
    overhead: usize,
    take_one: bool,
) -> Option<usize> {
    let mut at = 0;
    while let Some(&[_, _, _, hi, lo]) = held.get(at..at + RECORD_HEADER) {
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let next = at + RECORD_HEADER + len;
        if next > held.len() {
            // The record is not all here yet: rustls leaves it for later either way.
            return None;
        }
        let plain = len.saturating_sub(overhead);
        if plain > room && !(take_one && at == 0) {
            return Some(at);
        }
        room = room.saturating_sub(plain);
        at = next;
    }
    None
}

/// TLS's handshake content type (RFC 8446 section 5.1).
const HANDSHAKE: u8 = 22;

/// Whether `held` has a record of the handshake content type, whole or begun: a ClientHello
/// (answering it signs and runs the key exchange), or TLS 1.2's client flight (its key
/// exchange). TLS 1.3's Finished comes as an encrypted record (type 23) and its step is cheap.
/// Only headers are read.
fn holds_handshake_record(held: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&[kind, _, _, hi, lo]) = held.get(at..at + RECORD_HEADER) {
        if kind == HANDSHAKE {
            return true;
        }
        at += RECORD_HEADER + usize::from(u16::from_be_bytes([hi, lo]));
    }
    false
}

/// What a ClientHello offers that decides which certificate chain it gets (RFC 8446 section
/// 4.1.2): the name it asks for, its cipher suites, signature schemes
/// (`signature_algorithms`) and versions (`supported_versions`), the last three as the raw
/// two-byte entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HelloOffer<'a> {
    pub server_name: HelloName<'a>,
    pub suites: &'a [u8],
    pub signature_schemes: &'a [u8],
    pub versions: &'a [u8],
}

/// The name a ClientHello asks for (`server_name`, RFC 6066 section 3), read as rustls reads
/// it, so that the chains looked at before the handshake are the ones rustls resolves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HelloName<'a> {
    /// No `server_name`, or an IP address in it (rustls ignores one): the default chains.
    #[default]
    Absent,
    /// A DNS name.
    Dns(&'a str),
    /// What rustls refuses (no host name, two of them, one that is not a DNS name): that
    /// handshake fails whatever chain it would have got.
    Unusable,
}

/// [`HelloName`] of a `server_name` extension's data.
fn hello_name(data: &[u8]) -> HelloName<'_> {
    const HOST_NAME: u8 = 0;
    let Some((mut list, _)) = vector16(data) else {
        return HelloName::Unusable;
    };
    let mut found = None;
    while let Some((&kind, rest)) = list.split_first() {
        if kind != HOST_NAME {
            // Another type's length is not known: rustls stops reading there, as here.
            break;
        }
        let Some((name, rest)) = vector16(rest) else {
            return HelloName::Unusable;
        };
        if found.is_some() {
            return HelloName::Unusable;
        }
        found = Some(name);
        list = rest;
    }
    let Some(name) = found else {
        return HelloName::Unusable;
    };
    match rustls::pki_types::ServerName::try_from(name) {
        // A DNS name is ASCII, so it reads as text in place.
        Ok(rustls::pki_types::ServerName::DnsName(_)) => {
            std::str::from_utf8(name).map_or(HelloName::Unusable, HelloName::Dns)
        }
        Ok(rustls::pki_types::ServerName::IpAddress(_)) => HelloName::Absent,
        _ => HelloName::Unusable,
    }
}

/// [`HelloOffer`] of the ClientHello at the start of `head`, read in place, every length
/// checked against what holds it. None unless the first record holds a whole ClientHello
/// that parses (a hello split over records, or a malformed one): the caller then assumes the
/// costly chain; rustls parses and checks the hello itself either way.
fn hello_offer(head: &[u8]) -> Option<HelloOffer<'_>> {
    const CLIENT_HELLO: u8 = 0x01;
    /// legacy_version and random.
    const BEFORE_SESSION_ID: usize = 2 + 32;
    /// The extensions' numbers (RFC 8446 section 4.2).
    const SERVER_NAME: u16 = 0;
    const SIGNATURE_ALGORITHMS: u16 = 13;
    const SUPPORTED_VERSIONS: u16 = 43;
    let (header, rest) = head.split_at_checked(RECORD_HEADER)?;
    let &[kind, _, _, hi, lo] = header else {
        return None;
    };
    if kind != HANDSHAKE {
        return None;
    }
    let (record, _) = rest.split_at_checked(usize::from(u16::from_be_bytes([hi, lo])))?;
    let (&msg, record) = record.split_first()?;
    let (len, record) = record.split_at_checked(3)?;
    let &[l0, l1, l2] = len else {
        return None;
    };
    if msg != CLIENT_HELLO {
        return None;
    }
    let (hello, _) =
        record.split_at_checked(usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2))?;
    let (_, rest) = hello.split_at_checked(BEFORE_SESSION_ID)?;
    let (_session_id, rest) = vector8(rest)?;
    let (suites, rest) = vector16(rest)?;
    let (_compression, rest) = vector8(rest)?;
    let (mut extensions, _) = vector16(rest)?;
    let mut offer = HelloOffer {
        suites,
        ..HelloOffer::default()
    };
    while !extensions.is_empty() {
        let (kind, rest) = extensions.split_at_checked(2)?;
        let &[k0, k1] = kind else {
            return None;
        };
        let (data, rest) = vector16(rest)?;
        match u16::from_be_bytes([k0, k1]) {
            SERVER_NAME => offer.server_name = hello_name(data),
            SIGNATURE_ALGORITHMS => offer.signature_schemes = vector16(data)?.0,
            SUPPORTED_VERSIONS => offer.versions = vector8(data)?.0,
            _ => {}
        }
        extensions = rest;
    }
    Some(offer)
}

/// A TLS vector with a one-byte length, and what follows it.
fn vector8(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&len, rest) = b.split_first()?;
    rest.split_at_checked(usize::from(len))
}

/// A TLS vector with a two-byte length, and what follows it.
fn vector16(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = b.split_at_checked(2)?;
    let &[hi, lo] = len else {
        return None;
    };
    rest.split_at_checked(usize::from(u16::from_be_bytes([hi, lo])))
}

/// Encrypts `data` as application records after what `out` holds.
fn encrypt_into(
    traffic: &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let have = out.len();
    let records = data.len().div_ceil(MAX_FRAGMENT).max(1);
    let mut room = data.len() + records * RECORD_ROOM;
    // The second pass has the size the connection asked for (records it queued itself, such
    // as a key update, come first).
    for _ in 0..2 {
        if have + room > OUTGOING_MAX {
            return Err(too_much_to_send(have + room));
        }
        out.resize(have + room, 0);
        let dest = out.get_mut(have..).unwrap_or_default();
        match traffic.encrypt(data, dest) {
            Ok(n) => {
                out.truncate(have + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.truncate(have);
                room = required_size;
            }
            Err(e) => {
                out.truncate(have);
                return Err(io::Error::other(format!("TLS: encrypting failed: {e}")));
            }
        }
    }
    Err(io::Error::other(
        "TLS: encrypting failed: the connection kept asking for a larger buffer",
    ))
}

/// Queues close_notify after what `out` holds.
fn close_into(
    traffic: &mut WriteTraffic<'_, rustls::server::ServerConnectionData>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let have = out.len();
    let mut room = RECORD_ROOM;
    for _ in 0..2 {
        if have + room > OUTGOING_MAX {
            return Err(too_much_to_send(have + room));
        }
        out.resize(have + room, 0);
        let dest = out.get_mut(have..).unwrap_or_default();
        match traffic.queue_close_notify(dest) {
            Ok(n) => {
                out.truncate(have + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.truncate(have);
                room = required_size;
            }
            Err(e) => {
                out.truncate(have);
                return Err(io::Error::other(format!(
                    "TLS: queueing close_notify failed: {e}"
                )));
            }
        }
    }
    Err(io::Error::other(
        "TLS: queueing close_notify failed: the connection kept asking for a larger buffer",
    ))
}

fn too_much_to_send(n: usize) -> io::Error {
    io::Error::other(format!(
        "TLS: {n} bytes would wait to be sent, more than {OUTGOING_MAX}: the peer is not \
         reading (or a certificate chain is larger than any real one)"
    ))
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.take_plain(buf) || this.peer_closed {
                // Data, or the end after the peer's close_notify.
                return Poll::Ready(Ok(()));
            }
            let had_outgoing = this.out_pos < this.outgoing.len();
            let progress = match this.process(Want::Read(&mut *buf)) {
                Ok(p) => p,
                Err(e) => {
                    if !had_outgoing {
                        this.send_once();
                    }
                    return Poll::Ready(Err(e));
                }
            };
            if !had_outgoing && this.out_pos < this.outgoing.len() {
                // The connection answered something (a key update): send it now if the
                // socket takes it; if not, the next write or flush does.
                this.send_once();
            }
            match progress {
                Progress::Delivered | Progress::Closed => return Poll::Ready(Ok(())),
                Progress::NeedInput | Progress::Wrote => {}
            }
            if this.peer_closed {
                continue;
            }
            if this.io_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending TLS close_notify",
                )));
            }
            // Up to what the reader's buffer takes (a relay's pump reading a bulk stream
            // offers 64 KiB): records read together are decrypted into it in one call.
            if ready!(this.poll_fill(cx, buf.remaining()))? == 0 {
                this.io_eof = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_writable()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Backpressure: nothing new is taken until the socket has what was taken before.
        ready!(this.poll_send(cx))?;
        let n = buf.len().min(WRITE_BATCH);
        this.queue_write(buf.get(..n).unwrap_or_default())?;
        // Send at once; what the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    /// Many small buffers (an RTMP session's chunks) make full records, gathered 16 KiB at a
    /// time into a buffer made for this call, no larger than what the call gathers and never
    /// zeroed (a zeroed 16 KiB stack array cost a memset of 16 KiB per write, for writes that
    /// are mostly a few hundred bytes); a buffer of a record or more is encrypted where it is.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_writable()?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_send(cx))?;
        let total = bufs
            .iter()
            .fold(0usize, |sum, b| sum.saturating_add(b.len()))
            .min(WRITE_BATCH);
        let mut stage: Vec<u8> = Vec::new();
        let mut taken = 0;
        'bufs: for b in bufs {
            let mut rest: &[u8] = b;
            while !rest.is_empty() {
                let budget = WRITE_BATCH - taken - stage.len();
                if budget == 0 {
                    break 'bufs;
                }
                if stage.is_empty() && rest.len() >= MAX_FRAGMENT {
                    // Whole records straight from the caller's buffer.
                    let n = (rest.len().min(budget) / MAX_FRAGMENT) * MAX_FRAGMENT;
                    if n > 0 {
                        let (now, later) = rest.split_at(n);
                        this.queue_write(now)?;
                        taken += n;
                        rest = later;
                        continue;
                    }
                }
                let n = rest.len().min(MAX_FRAGMENT - stage.len()).min(budget);
                let (now, later) = rest.split_at(n);
                if stage.capacity() == 0 {
                    // What is left of this call's bytes, at most one record.
                    stage.reserve_exact(total.saturating_sub(taken).max(n).min(MAX_FRAGMENT));
                }
                stage.extend_from_slice(now);
                rest = later;
                if stage.len() == MAX_FRAGMENT {
                    this.queue_write(&stage)?;
                    taken += stage.len();
                    stage.clear();
                }
            }
        }
        if !stage.is_empty() {
            this.queue_write(&stage)?;
            taken += stage.len();
        }
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify (once), then shuts the socket's write side down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed && !this.failed {
            this.write_closed = true;
            // A connection that cannot say close_notify any more still has its socket
            // closed below.
            let _ = this.process(Want::Close);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Duration;

    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;

    use crate::metrics::ChainKey;
    use crate::net::tls::{self, CertSource, SniResolver};
    use std::sync::atomic::Ordering::Relaxed;

    /// Every wait in these tests.
    const WAIT: Duration = Duration::from_secs(5);
    /// Long enough for a loopback write to reach the other side's socket before the next.
    const APART: Duration = Duration::from_millis(150);

    /// The server's socket, noting the size of every read that returned bytes.
    struct Recorded {
        tcp: TcpStream,
        reads: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            if n > 0 {
                self.reads.lock().unwrap().push(n);
            }
            r
        }
    }

    impl AsyncWrite for Recorded {
        crate::stream::forward_async_write!(tcp);
    }

    fn server_config() -> TlsServer {
        let dev = tls::load_certified_key(&CertSource::EmbeddedDev).unwrap();
        tls::server_config(SniResolver::new(dev)).unwrap()
    }

    fn client_config(
        versions: &[&'static rustls::SupportedProtocolVersion],
        suites: Option<Vec<rustls::SupportedCipherSuite>>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        let ca = include_bytes!("../../certs/ca.pem");
        for cert in tls::certs_from_pem(ca, std::path::Path::new("ca")).unwrap() {
            roots.add(cert).unwrap();
        }
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if let Some(suites) = suites {
            provider.cipher_suites = suites;
        }
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    fn localhost() -> rustls_pki_types::ServerName<'static> {
        rustls_pki_types::ServerName::try_from("localhost").unwrap()
    }

    /// A listener on a port chosen now.
    async fn listen() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// Writes what the client has to send.
    async fn flush_client(tcp: &mut TcpStream, c: &mut ClientConnection) {
        while c.wants_write() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            timeout(WAIT, tcp.write_all(&wire)).await.unwrap().unwrap();
        }
    }

    /// Feeds the client what came from the server: the plaintext in it.
    fn feed_client(c: &mut ClientConnection, mut wire: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        while !wire.is_empty() {
            c.read_tls(&mut wire).unwrap();
            c.process_new_packets().unwrap();
            // WouldBlock when all is taken; Ok(0) after close_notify.
            let _ = c.reader().read_to_end(&mut plain);
        }
        plain
    }

    /// A rustls client driven by hand over TCP, so the tests choose where records split.
    async fn manual_client(addr: SocketAddr) -> (ClientConnection, TcpStream) {
        let config = client_config(&[&rustls::version::TLS13], None);
        let mut c = ClientConnection::new(config, localhost()).unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            flush_client(&mut tcp, &mut c).await;
            if !c.is_handshaking() {
                break;
            }
            let n = timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the server closed during the handshake");
            feed_client(&mut c, &buf[..n]);
        }
        (c, tcp)
    }

    /// `data` as the client's records.
    fn seal(c: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
        c.writer().write_all(data).unwrap();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// A server stream (reads recorded) and a hand-driven client, handshake done.
    async fn pair() -> (
        TlsStream<Recorded>,
        Arc<Mutex<Vec<usize>>>,
        ClientConnection,
        TcpStream,
    ) {
        let (l, addr) = listen().await;
        let config = server_config();
        let reads = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let reads = reads.clone();
            async move {
                let (tcp, _) = l.accept().await.unwrap();
                TlsStream::accept(Recorded { tcp, reads }, &[], &config).await
            }
        };
        let (server, (c, tcp)) = tokio::join!(timeout(WAIT, server), manual_client(addr));
        let server = server.unwrap().unwrap();
        let (mut c, mut tcp) = (c, tcp);
        // The session tickets the server sent after the handshake: taken now, so each test
        // sees only its own records.
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = timeout(APART, tcp.read(&mut buf)).await {
            let n = n.unwrap();
            assert!(n > 0, "the server closed after the handshake");
            feed_client(&mut c, &buf[..n]);
        }
        reads.lock().unwrap().clear();
        (server, reads, c, tcp)
    }

    #[tokio::test]
    async fn a_record_split_across_reads() {
        let (mut server, reads, mut c, mut tcp) = pair().await;
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let wire = seal(&mut c, &data);
        assert!(wire.len() > 10_000 && wire.len() < MAX_RECORD, "one record");
        // The header alone and a bit, then the middle, then the rest, each read apart.
        let mut got = vec![0u8; data.len()];
        let reader = async {
            timeout(WAIT, server.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
        };
        let writer = async {
            for part in [&wire[..3], &wire[3..4000], &wire[4000..]] {
                tcp.write_all(part).await.unwrap();
                tokio::time::sleep(APART).await;
            }
        };
        tokio::join!(reader, writer);
        assert_eq!(got, data);
        assert_eq!(*reads.lock().unwrap(), vec![3, 3997, wire.len() - 4000]);
        assert_eq!(
            server.buffered_capacity(),
            0,
            "nothing held once the record is read"
        );
    }

    #[tokio::test]
    async fn several_records_in_one_read() {
        let (mut server, reads, mut c, mut tcp) = pair().await;
        let mut wire = Vec::new();
        let mut data = Vec::new();
        for part in [&b"first record"[..], b"second", b"and a third one"] {
            wire.extend_from_slice(&seal(&mut c, part));
            data.extend_from_slice(part);
        }
        tcp.write_all(&wire).await.unwrap();
        let mut got = vec![0u8; data.len()];
        timeout(WAIT, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, data);
        assert_eq!(
            *reads.lock().unwrap(),
            vec![wire.len()],
            "all three in one read"
        );
        // A reader taking a byte at a time gets the same bytes (kept between reads).
        let wire = seal(&mut c, b"one byte at a time");
        tcp.write_all(&wire).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 18 {
            let mut one = [0u8; 1];
            timeout(WAIT, server.read_exact(&mut one))
                .await
                .unwrap()
                .unwrap();
            got.push(one[0]);
        }
        assert_eq!(got, b"one byte at a time");
        assert_eq!(server.buffered_capacity(), 0);
    }

    /// `count` records of `size` bytes sealed by the client and all in the server's socket:
    /// (their bytes on the wire, their plaintext).
    async fn records_in_socket(
        c: &mut ClientConnection,
        tcp: &mut TcpStream,
        count: u8,
        size: usize,
    ) -> (usize, Vec<u8>) {
        let mut wire = Vec::new();
        let mut data = Vec::new();
        for i in 0..count {
            let part = vec![i; size];
            wire.extend_from_slice(&seal(c, &part));
            data.extend_from_slice(&part);
        }
        tcp.write_all(&wire).await.unwrap();
        tokio::time::sleep(APART).await;
        (wire.len(), data)
    }

    /// Reads `total` bytes with a buffer of `piece` bytes per read: (the bytes, each read's
    /// size), checking that no read decrypted anything beyond the reader's buffer.
    async fn read_in_pieces(
        server: &mut TlsStream<Recorded>,
        piece: usize,
        total: usize,
    ) -> (Vec<u8>, Vec<usize>) {
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while got.len() < total {
            let mut buf = vec![0u8; piece];
            let n = timeout(WAIT, server.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the stream ended early");
            sizes.push(n);
            got.extend_from_slice(&buf[..n]);
            assert_eq!(server.plain.capacity(), 0, "nothing decrypted ahead");
        }
        (got, sizes)
    }

    #[tokio::test]
    async fn a_bulk_reader_gets_whole_records_and_the_next_waits_for_its_next_read() {
        let (mut server, reads, mut c, mut tcp) = pair().await;
        let (_, data) = records_in_socket(&mut c, &mut tcp, 5, MAX_FRAGMENT).await;
        // A relay's pump reads into 64 KiB: four records' plaintext in one read (the socket
        // read for all four at once), and the fifth whole in the next.
        let (got, sizes) = read_in_pieces(&mut server, 4 * MAX_FRAGMENT, data.len()).await;
        assert_eq!(got, data);
        assert_eq!(
            sizes,
            vec![4 * MAX_FRAGMENT, MAX_FRAGMENT],
            "whole records per read (socket reads {:?})",
            reads.lock().unwrap()
        );
        assert!(
            reads.lock().unwrap().len() <= 2,
            "a read per 64 KiB, not per record: {:?}",
            reads.lock().unwrap()
        );
        assert_eq!(server.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn a_record_the_readers_buffer_cannot_take_waits_whole_for_the_next_read() {
        let (mut server, reads, mut c, mut tcp) = pair().await;
        let (wire_len, data) = records_in_socket(&mut c, &mut tcp, 3, 1000).await;
        // One socket read takes all three; each read of 1,500 bytes gets one whole record
        // (not a record and a half, the half decrypted into a buffer of its own and then
        // handed on alone).
        let (got, sizes) = read_in_pieces(&mut server, 1500, data.len()).await;
        assert_eq!(got, data);
        assert_eq!(sizes, vec![1000, 1000, 1000]);
        assert_eq!(*reads.lock().unwrap(), vec![wire_len], "one socket read");
        assert_eq!(server.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn many_small_records_fill_each_read_to_the_readers_buffer() {
        let (mut server, reads, mut c, mut tcp) = pair().await;
        let (wire_len, data) = records_in_socket(&mut c, &mut tcp, 200, 1).await;
        let (got, sizes) = read_in_pieces(&mut server, 50, data.len()).await;
        assert_eq!(got, data);
        assert_eq!(sizes, vec![50; 4], "each read filled by whole records");
        assert_eq!(*reads.lock().unwrap(), vec![wire_len], "one socket read");
        assert_eq!(server.buffered_capacity(), 0);
    }

    /// The steps moved off the executor are the ones with a handshake record in: a
    /// ClientHello (after a change_cipher_spec too), not TLS 1.3's encrypted Finished.
    #[test]
    fn handshake_records_are_told_from_their_headers() {
        let record = |kind: u8, len: u16| {
            let mut r = vec![kind, 0x03, 0x03];
            r.extend_from_slice(&len.to_be_bytes());
            r.resize(5 + usize::from(len), 0);
            r
        };
        let hello = record(22, 300);
        let ccs = record(20, 1);
        let finished = record(23, 53);
        assert!(holds_handshake_record(&hello));
        assert!(
            !holds_handshake_record(&hello[..3]),
            "a header not all here"
        );
        assert!(holds_handshake_record(&hello[..5]), "a record begun");
        assert!(holds_handshake_record(&[ccs.clone(), hello].concat()));
        assert!(!holds_handshake_record(&[ccs, finished.clone()].concat()));
        assert!(!holds_handshake_record(&finished));
        assert!(!holds_handshake_record(&[]));
    }

    #[test]
    fn records_that_fit_cuts_before_the_first_record_the_room_cannot_take() {
        // Three records with 100, 200 and 50 bytes of plaintext (TLS 1.3: 17 bytes more).
        let record = |plain: usize| {
            let len = (plain + TLS13_MIN_OVERHEAD) as u16;
            let mut r = vec![0x17, 0x03, 0x03];
            r.extend_from_slice(&len.to_be_bytes());
            r.resize(5 + usize::from(len), 0);
            r
        };
        let (a, b, c) = (record(100), record(200), record(50));
        let held = [a.clone(), b.clone(), c.clone()].concat();
        let fit = |room, take_one| records_that_fit(&held, room, TLS13_MIN_OVERHEAD, take_one);
        assert_eq!(fit(350, false), None, "all fit");
        assert_eq!(fit(349, false), Some(a.len() + b.len()));
        assert_eq!(fit(299, false), Some(a.len()));
        assert_eq!(fit(99, false), Some(0));
        assert_eq!(fit(99, true), Some(a.len()), "the first record at least");
        assert_eq!(fit(0, true), Some(a.len()));
        // A record not all here yet, or a header not all here: rustls waits for it anyway.
        let partial = [a.clone(), b[..50].to_vec()].concat();
        assert_eq!(
            records_that_fit(&partial, 100, TLS13_MIN_OVERHEAD, false),
            None
        );
        assert_eq!(
            records_that_fit(&partial, 99, TLS13_MIN_OVERHEAD, false),
            Some(0)
        );
        assert_eq!(
            records_that_fit(&b[..3], 0, TLS13_MIN_OVERHEAD, false),
            None
        );
        assert_eq!(records_that_fit(&[], 0, TLS13_MIN_OVERHEAD, false), None);
        // A header declaring more than a record may hold is left whole to rustls.
        let huge = [0x17, 0x03, 0x03, 0xff, 0xff, 0, 0];
        assert_eq!(records_that_fit(&huge, 0, TLS13_MIN_OVERHEAD, false), None);
    }

    #[tokio::test]
    async fn a_record_declared_longer_than_tls_allows_is_refused() {
        let (mut server, _, _c, mut tcp) = pair().await;
        // Application data, TLS 1.2 on the wire, one byte longer than any record may be.
        let len = (MAX_RECORD - 5 + 1) as u16;
        let [hi, lo] = len.to_be_bytes();
        tcp.write_all(&[0x17, 0x03, 0x03, hi, lo]).await.unwrap();
        let mut buf = [0u8; 16];
        let err = timeout(WAIT, server.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("longer than TLS allows"), "{err}");
        assert!(server.buffered_capacity() <= MAX_RECORD);
        // The same as the first bytes of a connection.
        let (l, addr) = listen().await;
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff])
            .await
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let config = server_config();
        let err = timeout(WAIT, TlsStream::accept(tcp, &[], &config))
            .await
            .unwrap()
            .err()
            .unwrap();
        assert!(err.to_string().contains("longer than TLS allows"), "{err}");
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_and_shutdown_sends_one() {
        let (mut server, _, mut c, mut tcp) = pair().await;
        let mut wire = seal(&mut c, b"last words");
        c.send_close_notify();
        let mut tail = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut tail).unwrap();
        }
        wire.extend_from_slice(&tail);
        tcp.write_all(&wire).await.unwrap();
        let mut got = Vec::new();
        timeout(WAIT, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"last words", "the data, then a clean end");
        // Our side: data, then close_notify, then the socket's end.
        timeout(WAIT, server.write_all(b"goodbye"))
            .await
            .unwrap()
            .unwrap();
        timeout(WAIT, server.shutdown()).await.unwrap().unwrap();
        let mut wire = Vec::new();
        timeout(WAIT, tcp.read_to_end(&mut wire))
            .await
            .unwrap()
            .unwrap();
        let plain = feed_client(&mut c, &wire);
        assert_eq!(plain, b"goodbye");
        // rustls's reader: Ok(0) after close_notify (an error, UnexpectedEof, without one).
        assert_eq!(
            c.reader().read(&mut [0u8; 8]).unwrap(),
            0,
            "close_notify came"
        );
        assert!(
            server.write_all(b"more").await.is_err(),
            "no writes after shutdown"
        );
    }

    #[tokio::test]
    async fn the_end_of_the_socket_without_close_notify_is_an_error() {
        let (mut server, _, mut c, mut tcp) = pair().await;
        tcp.write_all(&seal(&mut c, b"cut")).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let err = timeout(WAIT, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(got, b"cut");
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_after_traffic() {
        let (mut server, _, mut c, mut tcp) = pair().await;
        // Half a record held: the buffer exists while it has to.
        let wire = seal(&mut c, &[7u8; 3000]);
        tcp.write_all(&wire[..1000]).await.unwrap();
        let mut got = vec![0u8; 3000];
        let short = timeout(APART, server.read_exact(&mut got)).await;
        assert!(short.is_err(), "half a record cannot be read");
        assert!(
            server.buffered_capacity() >= MAX_RECORD,
            "the partial record is held"
        );
        tcp.write_all(&wire[1000..]).await.unwrap();
        // The read was cancelled with nothing returned: the whole message is there again.
        timeout(WAIT, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![7u8; 3000]);
        // A large write, taken and flushed.
        let big = vec![9u8; 200_000];
        let drain = async {
            let mut wire = vec![0u8; 64 * 1024];
            let mut plain = Vec::new();
            while plain.len() < big.len() {
                let n = timeout(WAIT, tcp.read(&mut wire)).await.unwrap().unwrap();
                assert!(n > 0);
                plain.extend_from_slice(&feed_client(&mut c, &wire[..n]));
            }
            plain
        };
        let send = async {
            timeout(WAIT, server.write_all(&big))
                .await
                .unwrap()
                .unwrap();
            timeout(WAIT, server.flush()).await.unwrap().unwrap();
        };
        let (plain, ()) = tokio::join!(drain, send);
        assert_eq!(plain.len(), big.len());
        // Idle: waiting for the next record, after traffic both ways.
        let mut one = [0u8; 1];
        assert!(
            timeout(APART, server.read(&mut one)).await.is_err(),
            "nothing to read"
        );
        assert_eq!(
            server.buffered_capacity(),
            0,
            "an idle connection holds no buffer"
        );
    }

    #[tokio::test]
    async fn writes_wait_for_a_peer_that_does_not_read() {
        let (mut server, _, _c, _tcp) = pair().await;
        let chunk = vec![1u8; WRITE_BATCH];
        let mut taken = 0usize;
        // The client never reads: the socket buffers fill, then writes must stop.
        loop {
            match timeout(Duration::from_millis(300), server.write(&chunk)).await {
                Ok(Ok(n)) => {
                    assert!(n <= WRITE_BATCH);
                    taken += n;
                    assert!(taken < 256 * 1024 * 1024, "writes never stopped");
                }
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break,
            }
        }
        assert!(
            server.buffered_capacity() <= OUTGOING_MAX,
            "{}",
            server.buffered_capacity()
        );
    }

    #[tokio::test]
    async fn vectored_writes_gather_small_buffers_into_full_records() {
        let (mut server, _, mut c, mut tcp) = pair().await;
        let big = vec![3u8; 40_000];
        let mut bufs = vec![io::IoSlice::new(b"ab"); 1000];
        bufs.push(io::IoSlice::new(&big));
        bufs.extend(vec![io::IoSlice::new(b"cd"); 1000]);
        let mut want = b"ab".repeat(1000);
        want.extend_from_slice(&big);
        want.extend_from_slice(&b"cd".repeat(1000));
        let n = timeout(WAIT, server.write_vectored(&bufs))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, want.len(), "under one batch: all taken");
        timeout(WAIT, server.flush()).await.unwrap().unwrap();
        let mut wire = Vec::new();
        let mut plain = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while plain.len() < want.len() {
            let n = timeout(WAIT, tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0);
            wire.extend_from_slice(&buf[..n]);
            plain.extend_from_slice(&feed_client(&mut c, &buf[..n]));
        }
        assert_eq!(plain, want);
        // 2,000 + 40,000 + 2,000 bytes: 16 KiB gathered, 16 KiB straight from the large
        // buffer, the rest gathered; not one record per buffer.
        let mut records = 0;
        let mut at = 0;
        while let Some(h) = wire.get(at..at + 5) {
            records += 1;
            at += 5 + usize::from(u16::from_be_bytes([h[3], h[4]]));
        }
        assert_eq!(records, 3);
    }

    /// One handshake: the server's stream once `client` (given the listener's address) has
    /// done its side; the client's end is dropped after.
    async fn accepted<F: std::future::Future>(
        client: impl FnOnce(SocketAddr) -> F,
    ) -> TlsStream<TcpStream> {
        accepted_by(server_config(), client).await
    }

    /// [`accepted`] by `config`.
    async fn accepted_by<F: std::future::Future>(
        config: TlsServer,
        client: impl FnOnce(SocketAddr) -> F,
    ) -> TlsStream<TcpStream> {
        let (l, addr) = listen().await;
        let server = async move {
            let (tcp, _) = l.accept().await.unwrap();
            TlsStream::accept(tcp, &[], &config).await.unwrap()
        };
        let (server, _client) = timeout(WAIT, async { tokio::join!(server, client(addr)) })
            .await
            .unwrap();
        server
    }

    /// The dev key, saying it is an RSA key when `says_rsa` (so that handshakes treat it as
    /// one: [`TlsServer::signs_slowly`]), and noting the thread each signature is made on.
    #[derive(Debug)]
    struct NotingKey {
        key: Arc<dyn rustls::sign::SigningKey>,
        says_rsa: bool,
        threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    }

    #[derive(Debug)]
    struct NotingSigner {
        signer: Box<dyn rustls::sign::Signer>,
        threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    }

    impl rustls::sign::SigningKey for NotingKey {
        fn choose_scheme(
            &self,
            offered: &[rustls::SignatureScheme],
        ) -> Option<Box<dyn rustls::sign::Signer>> {
            let signer = self.key.choose_scheme(offered)?;
            let threads = self.threads.clone();
            Some(Box::new(NotingSigner { signer, threads }))
        }

        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            match self.says_rsa {
                true => rustls::SignatureAlgorithm::RSA,
                false => self.key.algorithm(),
            }
        }
    }

    impl rustls::sign::Signer for NotingSigner {
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            self.signer.sign(message)
        }

        fn scheme(&self) -> rustls::SignatureScheme {
            self.signer.scheme()
        }
    }

    /// The dev certificate with a [`NotingKey`].
    fn noting(
        says_rsa: bool,
        threads: &Arc<Mutex<Vec<std::thread::ThreadId>>>,
    ) -> Arc<rustls::sign::CertifiedKey> {
        let dev = tls::load_certified_key(&CertSource::EmbeddedDev).unwrap();
        let key = Arc::new(NotingKey {
            key: dev.key.clone(),
            says_rsa,
            threads: threads.clone(),
        });
        Arc::new(rustls::sign::CertifiedKey::new(dev.cert.clone(), key))
    }

    /// Whether handshakes sign off the executor follows the certificates served: any RSA
    /// key (the default or one for a name) makes it so, and a reload changes it.
    #[test]
    fn an_rsa_key_anywhere_in_the_certificates_served_signs_off_the_executor() {
        let threads = Arc::new(Mutex::new(Vec::new()));
        let ecdsa = || SniResolver::new(noting(false, &threads));
        let mut named = ecdsa();
        named.add("*.example.com", noting(true, &threads));
        assert!(!ecdsa().signs_slowly());
        assert!(named.signs_slowly());
        let running = tls::Reloadable::new(ecdsa());
        let config = tls::server_config_with(running.clone()).unwrap();
        assert!(!config.signs_slowly());
        running.replace(named);
        assert!(config.signs_slowly(), "after a reload to an RSA key");
        running.replace(ecdsa());
        assert!(!config.signs_slowly(), "after a reload back");
    }

    /// The test runs on one thread, the executor's only one. With an RSA key and another
    /// handshake under way the signature is made on another thread (the blocking pool), so
    /// the streams the executor runs are not held behind a queue of signatures; a lone RSA
    /// handshake, and an ECDSA one (a twentieth of the cost) in company, sign on the
    /// executor, where moving would cost more than it spares. Every handshake completes, its
    /// stream carries data, and the count of handshakes under way goes back down.
    #[tokio::test]
    async fn rsa_handshakes_in_company_sign_off_the_executor() {
        let executor = std::thread::current().id();
        for (says_rsa, company, off) in [
            (true, true, true),
            (true, false, false),
            (false, true, false),
        ] {
            let threads = Arc::new(Mutex::new(Vec::new()));
            let config = tls::server_config(SniResolver::new(noting(says_rsa, &threads))).unwrap();
            assert_eq!(config.signs_slowly(), says_rsa);
            // Another handshake under way (one whose client is still on its way).
            let other = company.then(|| config.handshake_begins());
            let counted = config.clone();
            let moved_before = crate::metrics::global().tls_steps_offloaded.load(Relaxed);
            let rsa_before = crate::metrics::global().tls_chains_chosen(ChainKey::Rsa);
            let mut server = accepted_by(config, |addr| async move {
                let connector = tokio_rustls::TlsConnector::from(client_config(
                    &[&rustls::version::TLS13],
                    None,
                ));
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut c = connector.connect(localhost(), tcp).await.unwrap();
                c.write_all(b"after the handshake").await.unwrap();
                c.flush().await.unwrap();
            })
            .await;
            let mut got = [0u8; 19];
            timeout(WAIT, server.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got, b"after the handshake");
            let threads = threads.lock().unwrap().clone();
            assert_eq!(threads.len(), 1, "one signature per full handshake");
            assert_eq!(
                threads[0] != executor,
                off,
                "RSA {says_rsa}, in company {company}: signed on the executor's thread: {}",
                threads[0] == executor
            );
            // The metrics say the same (other tests may add to these process-wide counts,
            // never take from them).
            let m = crate::metrics::global();
            if off {
                assert!(
                    m.tls_steps_offloaded.load(Relaxed) > moved_before,
                    "a step offloaded"
                );
            }
            if says_rsa {
                assert!(
                    m.tls_chains_chosen(ChainKey::Rsa) > rsa_before,
                    "an RSA chain chosen"
                );
            }
            assert_eq!(counted.handshakes_under_way(), usize::from(company));
            drop(other);
            assert_eq!(counted.handshakes_under_way(), 0);
        }
    }

    /// A client offering `suites` in that order: the suite the server's stream settled on.
    async fn suite_for(suites: Vec<rustls::SupportedCipherSuite>) -> rustls::CipherSuite {
        let server = accepted(|addr| async move {
            let connector = tokio_rustls::TlsConnector::from(client_config(
                &[&rustls::version::TLS13, &rustls::version::TLS12],
                Some(suites),
            ));
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector.connect(localhost(), tcp).await.unwrap()
        })
        .await;
        server.cipher_suite().unwrap()
    }

    #[tokio::test]
    async fn the_server_order_unless_the_client_prefers_chacha() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        use rustls::CipherSuite as Cs;
        let openssl = vec![
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(suite_for(openssl).await, Cs::TLS13_AES_128_GCM_SHA256);
        let no_aes = vec![
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(suite_for(no_aes).await, Cs::TLS13_CHACHA20_POLY1305_SHA256);
    }

    #[tokio::test]
    async fn sessions_resume_with_the_tickets_sent() {
        let config = server_config();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let connector = tokio_rustls::TlsConnector::from(client_config(&[version], None));
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (l, addr) = listen().await;
                let config = config.clone();
                let server = async move {
                    let (tcp, _) = l.accept().await.unwrap();
                    let mut s = TlsStream::accept(tcp, &[], &config).await.unwrap();
                    s.write_all(b"hi").await.unwrap();
                    s.flush().await.unwrap();
                    s
                };
                let connector = connector.clone();
                let client = async move {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    let mut t = connector.connect(localhost(), tcp).await.unwrap();
                    // Reading takes the tickets that came after the handshake.
                    let mut hi = [0u8; 2];
                    t.read_exact(&mut hi).await.unwrap();
                    t
                };
                let (server, _client) = timeout(WAIT, async { tokio::join!(server, client) })
                    .await
                    .unwrap();
                kinds.push(server.handshake_kind());
            }
            assert_eq!(
                kinds,
                vec![
                    Some(rustls::HandshakeKind::Full),
                    Some(rustls::HandshakeKind::Resumed)
                ],
                "{version:?}"
            );
        }
    }

    /// The first flight of a rustls client offering `suites` (one record: its ClientHello).
    fn client_hello(suites: Vec<rustls::SupportedCipherSuite>) -> Vec<u8> {
        let config = client_config(
            &[&rustls::version::TLS13, &rustls::version::TLS12],
            Some(suites),
        );
        let mut c = ClientConnection::new(config, localhost()).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        wire
    }

    /// The handshake records in `wire` again, their payload cut into records of at most
    /// `size` bytes (TLS lets a client split its ClientHello so).
    fn reframe(wire: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = wire.get(at..at + 5) {
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            for piece in wire[at + 5..at + 5 + len].chunks(size) {
                out.extend_from_slice(&[h[0], h[1], h[2]]);
                out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
                out.extend_from_slice(piece);
            }
            at += 5 + len;
        }
        out
    }

    /// The two-byte entries of a vector, as numbers.
    fn numbers(b: &[u8]) -> Vec<u16> {
        b.chunks(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .collect()
    }

    #[test]
    fn what_a_client_hello_offers_is_read_in_place() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let suites = vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ];
        let hello = client_hello(suites.clone());
        let offer = hello_offer(&hello).expect("a whole ClientHello");
        let mut want: Vec<u16> = suites.iter().map(|s| u16::from(s.suite())).collect();
        // rustls adds the renegotiation-info signalling suite (0x00ff) to TLS 1.2 hellos.
        let got = numbers(offer.suites);
        want.retain(|s| !got.contains(s));
        assert!(want.is_empty(), "suites missing: {want:x?} from {got:x?}");
        let schemes = numbers(offer.signature_schemes);
        assert!(
            schemes.contains(&0x0403) && schemes.contains(&0x0804),
            "{schemes:x?}"
        );
        assert_eq!(numbers(offer.versions), [0x0304, 0x0303]);
        assert_eq!(offer.server_name, HelloName::Dns("localhost"));
        // TLS 1.2 alone: 1.3 not among its versions.
        let config = client_config(&[&rustls::version::TLS12], None);
        let mut c = ClientConnection::new(config, localhost()).unwrap();
        let mut tls12 = Vec::new();
        c.write_tls(&mut tls12).unwrap();
        let offer = hello_offer(&tls12).unwrap();
        assert!(
            !numbers(offer.versions).contains(&0x0304),
            "{:x?}",
            offer.versions
        );
        assert!(!offer.signature_schemes.is_empty());
        // A client asking for an IP address sends no server_name: the default chains.
        let config = client_config(&[&rustls::version::TLS13], None);
        let ip = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut c = ClientConnection::new(config, ip).unwrap();
        let mut by_ip = Vec::new();
        c.write_tls(&mut by_ip).unwrap();
        assert_eq!(hello_offer(&by_ip).unwrap().server_name, HelloName::Absent);
        // Anything short of the whole hello, a hello in small records, bytes after it, and
        // other records: each index checked, nothing read beyond the hello.
        for cut in 0..hello.len() {
            assert_eq!(hello_offer(&hello[..cut]), None, "{cut} bytes");
        }
        assert_eq!(hello_offer(&reframe(&hello, 100)), None);
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert!(hello_offer(&more).is_some());
        assert_eq!(hello_offer(b"\x17\x03\x03\x00\x00"), None);
        // A length that claims more than its holder: refused, not read past.
        let mut bent = hello.clone();
        let last = bent.len() - 1;
        bent[last - 1] = 0xff;
        let _ = hello_offer(&bent);
    }

    /// The `server_name` extension read as rustls reads it: one host name that is a DNS name;
    /// an IP address counts as none; anything rustls refuses is unusable.
    #[test]
    fn the_name_a_client_hello_asks_is_read_as_rustls_reads_it() {
        /// A server_name extension's data holding `entries` (type, name).
        fn sni(entries: &[(u8, &[u8])]) -> Vec<u8> {
            let mut list = Vec::new();
            for (kind, name) in entries {
                list.push(*kind);
                list.extend_from_slice(&(name.len() as u16).to_be_bytes());
                list.extend_from_slice(name);
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            data
        }
        let name = sni(&[(0, b"live.example.com")]);
        assert_eq!(hello_name(&name), HelloName::Dns("live.example.com"));
        assert_eq!(
            hello_name(&sni(&[(0, b"Live.Example.com.")])),
            HelloName::Dns("Live.Example.com.")
        );
        // rustls ignores an IP address (and serves the default chains).
        assert_eq!(hello_name(&sni(&[(0, b"127.0.0.1")])), HelloName::Absent);
        assert_eq!(hello_name(&sni(&[(0, b"::1")])), HelloName::Absent);
        // Refused by rustls: two host names, none, not a DNS name, an empty one, an empty
        // list, a length past the data.
        for bad in [
            sni(&[(0, b"a.example.com"), (0, b"b.example.com")]),
            sni(&[(1, b"a.example.com")]),
            sni(&[(0, b"not a name")]),
            sni(&[(0, b"caf\xc3\xa9.example.com")]),
            sni(&[(0, b"")]),
            sni(&[]),
            name[..name.len() - 1].to_vec(),
            Vec::new(),
        ] {
            assert_eq!(hello_name(&bad), HelloName::Unusable, "{bad:x?}");
        }
        // A host name, then another type: rustls stops reading at the other type.
        assert_eq!(
            hello_name(&sni(&[(0, b"a.example.com"), (7, b"x")])),
            HelloName::Dns("a.example.com")
        );
        // The same through rustls: a ClientHello naming live.example.com.
        let config = client_config(&[&rustls::version::TLS13], None);
        let live = rustls_pki_types::ServerName::try_from("live.example.com").unwrap();
        let mut c = ClientConnection::new(config, live).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        assert_eq!(
            hello_offer(&wire).unwrap().server_name,
            HelloName::Dns("live.example.com")
        );
    }

    proptest::proptest! {
        /// A real ClientHello with bytes changed anywhere, or cut anywhere: the offer is read
        /// or refused, never read past its holder (no panic), and what it returns lies inside
        /// the input.
        #[test]
        fn a_bent_client_hello_never_reads_past_its_bytes(
            edits in proptest::collection::vec((0usize..2048, proptest::num::u8::ANY), 0..8),
            cut in 0usize..2048,
        ) {
            use rustls::crypto::aws_lc_rs::cipher_suite as cs;
            let mut hello = client_hello(vec![cs::TLS13_AES_128_GCM_SHA256]);
            for (at, byte) in edits {
                let n = hello.len();
                hello[at % n] = byte;
            }
            hello.truncate(cut.max(1));
            let range = hello.as_ptr_range();
            if let Some(o) = hello_offer(&hello) {
                // (An extension the hello lacks reads as an empty slice from elsewhere.)
                let name = match o.server_name {
                    HelloName::Dns(name) => name.as_bytes(),
                    _ => &[],
                };
                for part in [name, o.suites, o.signature_schemes, o.versions].into_iter().filter(|p| !p.is_empty()) {
                    let r = part.as_ptr_range();
                    proptest::prop_assert!(range.start <= r.start && r.end <= range.end);
                }
            }
        }
    }

    /// A connection that has sent no ClientHello is not a handshake under way (no company for
    /// the burst rule); once its hello is in, it is until the handshake ends.
    #[tokio::test]
    async fn a_handshake_counts_from_its_client_hello() {
        let config = tls::server_config(SniResolver::new(
            tls::load_certified_key(&CertSource::EmbeddedDev).unwrap(),
        ))
        .unwrap();
        let (l, addr) = listen().await;
        let counted = config.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            TlsStream::accept(tcp, &[], &config).await
        });
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            counted.handshakes_under_way(),
            0,
            "a silent connection counted"
        );
        // The first bytes of a ClientHello: still nothing whole to answer.
        silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(counted.handshakes_under_way(), 0, "a partial hello counted");
        // The whole hello: under way until the handshake fails (this client says no more).
        let hello = client_hello(vec![
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ]);
        silent.write_all(&hello[3..]).await.unwrap();
        let mut counted_once = false;
        for _ in 0..100 {
            counted_once |= counted.handshakes_under_way() == 1;
            if counted_once {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            counted_once,
            "the handshake with its hello in was not counted"
        );
        drop(silent);
        assert!(timeout(WAIT, server).await.unwrap().unwrap().is_err());
        assert_eq!(counted.handshakes_under_way(), 0);
    }

    /// A TLS 1.3 client asking for `name` completes a handshake with `config`, another
    /// handshake under way beside it, and sends five bytes the server reads: the threads the
    /// server's signatures were noted on ([`noting`]).
    async fn signed_in_company_on(
        config: TlsServer,
        name: &'static str,
        threads: &Arc<Mutex<Vec<std::thread::ThreadId>>>,
    ) -> Vec<std::thread::ThreadId> {
        let _other = config.handshake_begins();
        let mut server = accepted_by(config, |addr| async move {
            let connector =
                tokio_rustls::TlsConnector::from(client_config(&[&rustls::version::TLS13], None));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let asked = rustls_pki_types::ServerName::try_from(name).unwrap();
            let mut c = connector.connect(asked, tcp).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            c.flush().await.unwrap();
        })
        .await;
        let mut got = [0u8; 5];
        timeout(WAIT, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        let threads = threads.lock().unwrap().clone();
        threads
    }

    /// With an ECDSA chain beside the RSA one, a client that takes ECDSA signs where it is
    /// even in company (its signature costs tens of microseconds); the RSA chain alone in
    /// company moves (rsa_handshakes_in_company_sign_off_the_executor).
    #[tokio::test]
    async fn a_client_taking_the_ecdsa_chain_beside_an_rsa_one_signs_on_the_executor() {
        let executor = std::thread::current().id();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let mut resolver = SniResolver::new(noting(true, &threads));
        resolver.add_default(noting(false, &threads));
        let config = tls::server_config(resolver).unwrap();
        assert!(config.signs_slowly());
        let signed = signed_in_company_on(config, "localhost", &threads).await;
        assert_eq!(signed, [executor], "signed once, on the executor's thread");
    }

    /// The rule follows the name a client asks: with the default chain RSA alone and an ECDSA
    /// chain beside the RSA one for `localhost`, a client asking `localhost` signs where it is
    /// in company, and a client asking no name (an IP address) gets the RSA chain and moves.
    #[tokio::test]
    async fn the_burst_rule_looks_at_the_chains_of_the_name_asked() {
        let executor = std::thread::current().id();
        for (name, moved) in [("localhost", false), ("127.0.0.1", true)] {
            let threads = Arc::new(Mutex::new(Vec::new()));
            let mut resolver = SniResolver::new(noting(true, &threads));
            resolver.add("localhost", noting(true, &threads));
            resolver.add("localhost", noting(false, &threads));
            let config = tls::server_config(resolver).unwrap();
            let signed = signed_in_company_on(config, name, &threads).await;
            assert_eq!(signed.len(), 1, "{name}: signed once");
            assert_eq!(
                signed[0] != executor,
                moved,
                "{name}: signed on {:?} (the executor is {executor:?})",
                signed[0]
            );
        }
    }

    fn peeked(head: &[u8]) -> Option<Vec<rustls::CipherSuite>> {
        match peek_suites(head) {
            HelloPeek::Suites(s) => Some(
                s.chunks(2)
                    .map(|p| rustls::CipherSuite::from(u16::from_be_bytes([p[0], p[1]])))
                    .collect(),
            ),
            _ => None,
        }
    }

    #[test]
    fn the_suites_are_read_in_place_from_a_client_hello() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let offered = vec![
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        let wire = client_hello(offered);
        // What rustls's own parser reads from the same bytes.
        let mut acceptor = Acceptor::default();
        acceptor.read_tls(&mut wire.as_slice()).unwrap();
        let accepted = acceptor.accept().map_err(|(e, _)| e).unwrap().unwrap();
        let theirs = accepted.client_hello().cipher_suites().to_vec();
        assert!(theirs.len() >= 3, "{theirs:?}");
        assert_eq!(peeked(&wire), Some(theirs.clone()));
        // Every shorter prefix either asks for more or already holds the suites (the bytes
        // after them do not matter).
        for n in 0..wire.len() {
            match peek_suites(&wire[..n]) {
                HelloPeek::NeedMore => {}
                HelloPeek::Suites(_) => assert_eq!(peeked(&wire[..n]).as_ref(), Some(&theirs)),
                HelloPeek::Other => panic!("a prefix of {n} bytes read as not a ClientHello"),
            }
        }
        assert_eq!(peek_suites(&wire[..40]), HelloPeek::NeedMore);
    }

    #[test]
    fn what_the_peek_does_not_read_is_left_to_rustls() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let wire = client_hello(vec![cs::TLS13_AES_128_GCM_SHA256]);
        // The hello split into records before its suites.
        assert_eq!(peek_suites(&reframe(&wire, 20)), HelloPeek::Other);
        assert_eq!(peek_suites(&reframe(&wire, 20)[..30]), HelloPeek::Other);
        // Not a handshake record; not a ClientHello.
        let mut other = wire.clone();
        other[0] = 0x17;
        assert_eq!(peek_suites(&other), HelloPeek::Other);
        let mut other = wire.clone();
        other[5] = 0x02;
        assert_eq!(peek_suites(&other), HelloPeek::Other);
        // A record longer than TLS allows.
        assert_eq!(peek_suites(&[0x16, 3, 1, 0xff, 0xff]), HelloPeek::Other);
        // An odd length for the suites (after a 32-byte session id: 5 + 4 + 2 + 32 + 1 + 32).
        let mut odd = wire.clone();
        assert_eq!(odd[43], 32, "rustls sends a 32-byte legacy session id");
        odd[77] ^= 1;
        assert_eq!(peek_suites(&odd), HelloPeek::Other);
        // A session id running past the record.
        let mut long = wire.clone();
        long[43] = 255;
        long[3..5].copy_from_slice(&200u16.to_be_bytes());
        assert_eq!(peek_suites(&long[..205]), HelloPeek::Other);
        // Nothing yet, a record header cut short.
        assert_eq!(peek_suites(&[]), HelloPeek::NeedMore);
        assert_eq!(peek_suites(&[0x16, 3]), HelloPeek::NeedMore);
    }

    /// A ClientHello cut into small records still gets the configuration chosen for it
    /// (through rustls's Acceptor): a client preferring ChaCha20 keeps it.
    #[tokio::test]
    async fn a_client_hello_in_small_records_is_read_by_rustls() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let server = accepted(|addr| async move {
            let config = client_config(
                &[&rustls::version::TLS13],
                Some(vec![
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_128_GCM_SHA256,
                ]),
            );
            let mut c = ClientConnection::new(config, localhost()).unwrap();
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let mut hello = Vec::new();
            c.write_tls(&mut hello).unwrap();
            tcp.write_all(&reframe(&hello, 16)).await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            while c.is_handshaking() {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "the server closed during the handshake");
                feed_client(&mut c, &buf[..n]);
                flush_client(&mut tcp, &mut c).await;
            }
            (c, tcp)
        })
        .await;
        assert_eq!(
            server.cipher_suite(),
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
    }

    #[test]
    fn the_stream_is_small() {
        // What an idle connection keeps inline (its box in the door): rustls's connection
        // state (about 1.1 KiB of it, as its buffered connection was) and three empty
        // buffers; no buffer inline.
        let size = std::mem::size_of::<TlsStream<TcpStream>>();
        assert!(size <= 1280, "{size} bytes");
    }
}
