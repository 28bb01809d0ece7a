//! The tunnel's own HTTP/1.1 server: keep-alive connections that hold no buffer while they
//! wait for their next request.
//!
//! Why not hyper here (it still serves the admin API and the cluster link): an RTMPT
//! connection spends most of its life between requests (a client polls a few times a second
//! at most when idle), and hyper's HTTP/1 connection holds, for its whole life, a write
//! buffer of 8 KiB (its header `Vec` is made with that capacity and keeps it), a read buffer
//! of 8 KiB or more (`max_buf_size` cannot go below 8192), its cached header map and a boxed
//! slot sized for the service future: heaptrack of 1,000 idle RTMPT sessions through the
//! relay counted 19 KiB of the 33 KiB each session held there. This server reads the first
//! bytes of each request onto the stack, allocates once a request arrives (sized by what
//! arrived and what the head declares, within the limits), and frees every buffer once the
//! request is answered.
//!
//! What it speaks is what RTMPT clients send (ffmpeg, librtmp, Flash, curl): HTTP/1.0 and
//! 1.1 requests, bodies framed by Content-Length or chunked (a request with neither has no
//! body), `Expect: 100-continue`, pipelined requests (answered in order), keep-alive unless
//! the client says `Connection: close` (HTTP/1.1) or does not say `keep-alive` (HTTP/1.0).
//! Replies are `HTTP/1.1` with Title-Case headers, always a Content-Length, never chunked,
//! each one flushed as soon as it is written. A framing error is answered with its status,
//! then the connection closes; so is a request whose body was not read (refused early).
//!
//! Bounds, from [`Limits`]: the head (`max_http_header` bytes, then 431; at most
//! [`MAX_HEADERS`](crate::net::http::MAX_HEADERS) lines, then 431) within `http_header_timeout_secs` of the moment the
//! connection starts waiting for it (408 if bytes came, else a silent close: this also
//! bounds an idle keep-alive connection, as hyper's header timeout did); the body
//! (`max_http_body` bytes, then 413, declared lengths checked before anything is read)
//! within `idle_timeout_secs` (408), charged to the memory budget before its buffers are
//! allocated; a chunk-size line ([`MAX_CHUNK_LINE`] bytes) and trailers (counted against
//! `max_http_header`); writing a reply (`idle_timeout_secs`, then the connection closes).

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::BodyExt as _;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, trace, warn};

use super::ack::EagerAck;
use super::path;
use super::{loggable, short, text, too_large, Reply, Tunnel, SHUTDOWN_GRACE};
use crate::budget::{self, Charge, OverBudget};
use crate::limits::Limits;
use crate::net::http::{parse_request, HeadError};
use crate::stream::{ByteStream, Transport};

/// Bytes read onto the stack while a connection waits for its next request: a poll, a
/// command `/send` and the 3,073-byte handshake `/send` arrive whole in one read; a larger
/// body continues straight into its own buffers.
const FIRST_READ: usize = 4096;

/// The largest buffer a body is read into at once: a body declared larger is read into
/// several, each allocated when the previous one is full, so a body that is declared but
/// never sent holds at most this much.
const BODY_CHUNK: usize = 64 * 1024;

/// Longest chunk-size line of a chunked body (the size, and extensions we ignore).
pub(super) const MAX_CHUNK_LINE: usize = 1024;

/// A body up to this size, refused before it was read, is read and dropped so that the
/// connection goes on; a larger one closes the connection after the answer.
const DISCARD_MAX: u64 = 64 * 1024;

/// A body up to this size is copied behind the reply head and sent in one write; a larger
/// one is sent from where it is, in one vectored write with the head.
const COPY_BODY: usize = 4096;

/// The most a reply's head takes: the status line and the headers a tunnel reply carries
/// (Content-Type, Cache-Control, Allow, Content-Length, Date, Connection; about 200 bytes).
/// A unit test keeps the largest one under it.
const REPLY_HEAD_MAX: usize = 512;

/// What one tunnel HTTP connection can hold at once under `limits`, part by part: the
/// figures README's worst-case table states (`tests/limits_worst_case.rs` reads them from
/// here, and this module's tests hold the code to them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionBound {
    /// The read buffer, uncharged: a head (`max_http_header`), or a chunk-size line or the
    /// trailers (`max(max_http_header, MAX_CHUNK_LINE)`) and its CRLF, plus the rest of one
    /// read ([`FIRST_READ`]). It grows by doubling, capped there; it is freed between
    /// requests.
    pub read_buffer: usize,
    /// The request body being read, charged to the memory budget (and the address's share)
    /// before each buffer is made: buffers of at most [`BODY_CHUNK`], or a chunked body's one
    /// buffer, whose capacity is what is charged.
    pub body: usize,
    /// The reply being written, uncharged once the session handed it over: the session's
    /// bytes (`max_tunnel_pending` and the polling byte), its head, and the copy of a body of
    /// up to [`COPY_BODY`] bytes sent behind the head in one write.
    pub reply: usize,
}

impl ConnectionBound {
    /// Everything at once (an upper bound: the body is handed to its session before the
    /// reply is made).
    pub fn total(&self) -> usize {
        self.read_buffer + self.body + self.reply
    }
}

/// What one tunnel HTTP connection can hold at once (see [`ConnectionBound`]).
pub fn connection_bound(limits: &Limits) -> ConnectionBound {
    ConnectionBound {
        read_buffer: read_buffer_max(limits),
        body: limits.max_http_body,
        reply: limits.max_tunnel_pending.max(1) + 1 + REPLY_HEAD_MAX + COPY_BODY,
    }
}

fn read_buffer_max(limits: &Limits) -> usize {
    limits.max_http_header.max(MAX_CHUNK_LINE) + 2 + FIRST_READ
}

/// Makes room in `buf` for `more` bytes: doubling, as `BytesMut` grows, but never past
/// `cap` (or what it must hold), so a buffer fed in small pieces stays within its bound
/// rather than at up to twice it. Returns how much the capacity grew (what to charge).
fn grow_within(buf: &mut BytesMut, more: usize, cap: usize) -> usize {
    let need = buf.len().saturating_add(more);
    let had = buf.capacity();
    if need <= had {
        return 0;
    }
    let grown = had.saturating_mul(2).max(need).min(cap.max(need));
    let mut next = BytesMut::with_capacity(grown);
    next.extend_from_slice(buf);
    *buf = next;
    grown.saturating_sub(had)
}

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No Content-Length and no Transfer-Encoding: no body.
    Empty,
    Length(u64),
    Chunked,
}

/// What the tunnel needs of a request head.
#[derive(Debug)]
struct Head {
    method: Method,
    /// The path of the request target, without a query (and without scheme and authority
    /// when the target was an absolute URL).
    path: String,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    http11: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Post,
    Head,
    Other,
}

/// Why a request's body was not read whole; each has its answer.
#[derive(Debug)]
enum BodyError {
    TooLarge,
    OverBudget(OverBudget),
    /// Chunked framing we cannot read.
    Malformed(&'static str),
    /// The client closed, or reading failed: nobody to answer.
    Gone,
}

impl From<io::Error> for BodyError {
    fn from(_: io::Error) -> Self {
        BodyError::Gone
    }
}

/// Parses a complete head from `buf`: `Ok(None)` when more bytes are needed, else the head
/// and the bytes it took.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    parse_request(buf, |req| {
        let method = match req.method.unwrap_or_default() {
            "POST" => Method::Post,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        let http11 = req.version.unwrap_or(0) >= 1;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut close = false;
        let mut keep_alive_token = false;
        let mut expect_continue = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case(CONTENT_LENGTH.as_str()) {
                // Several Content-Length headers must agree (RFC 9112 6.3), digits only.
                let v = std::str::from_utf8(h.value).unwrap_or_default().trim();
                let n = (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| v.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| HeadError::Malformed("bad Content-Length".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length".into()));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case(TRANSFER_ENCODING.as_str()) {
                // Only chunked as the last coding frames a request body we can read.
                let last = tokens(h.value).last().unwrap_or_default();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(HeadError::Malformed(
                        "Transfer-Encoding other than chunked".into(),
                    ));
                }
                chunked = true;
            } else if h.name.eq_ignore_ascii_case(CONNECTION.as_str()) {
                for t in tokens(h.value) {
                    close |= t.eq_ignore_ascii_case("close");
                    keep_alive_token |= t.eq_ignore_ascii_case("keep-alive");
                }
            } else if h.name.eq_ignore_ascii_case("expect") {
                expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
            }
        }
        let framing = match (chunked, length) {
            // Both framings at once is how requests are smuggled past a proxy: refused.
            (true, Some(_)) => {
                return Err(HeadError::Malformed(
                    "both Content-Length and Transfer-Encoding".into(),
                ))
            }
            (true, None) if !http11 => {
                return Err(HeadError::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request".into(),
                ))
            }
            (true, None) => Framing::Chunked,
            (false, Some(n)) => Framing::Length(n),
            (false, None) => Framing::Empty,
        };
        Ok(Head {
            method,
            path: target_path(req.path.unwrap_or_default()).to_owned(),
            framing,
            keep_alive: !close && (http11 || keep_alive_token),
            expect_continue,
            http11,
        })
    })
}

/// A comma-separated header value's tokens, trimmed (invalid UTF-8 gives none).
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The path of a request target: origin form as it is, absolute form without its scheme
/// and authority; the query cut off.
fn target_path(target: &str) -> &str {
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|s| {
            target
                .get(..s.len())
                .filter(|p| p.eq_ignore_ascii_case(s))
                .map(|_| &target[s.len()..])
        })
        .map(|after| after.find('/').map_or("/", |i| &after[i..]));
    let path = rest.unwrap_or(target);
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// The value of a chunk-size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Result<usize, BodyError> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex)
        .map_err(|_| BodyError::Malformed("bad chunk size"))?
        .trim_matches(|c| c == ' ' || c == '\t');
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BodyError::Malformed("bad chunk size"));
    }
    let n = u64::from_str_radix(hex, 16).map_err(|_| BodyError::Malformed("bad chunk size"))?;
    usize::try_from(n).map_err(|_| BodyError::TooLarge)
}

/// One tunnel connection: the stream and the bytes read past the last request (a pipelined
/// next request), which is empty and unallocated between requests otherwise.
struct Conn<I> {
    io: EagerAck<I>,
    buf: BytesMut,
    /// What `buf` may grow to ([`ConnectionBound::read_buffer`]).
    read_cap: usize,
}

impl<I: ByteStream + 'static> Conn<I> {
    /// Reads once, onto the stack, at most `max` bytes (and [`FIRST_READ`]), and appends
    /// what came to `buf`: a connection waiting for its next request holds no buffer, and
    /// gets one the size of what arrived. Returns the bytes read (0: the client closed).
    async fn read_more(&mut self, max: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut stack = [MaybeUninit::<u8>::uninit(); FIRST_READ];
            let room = max.clamp(1, FIRST_READ);
            let mut rb = ReadBuf::uninit(&mut stack[..room]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            grow_within(&mut self.buf, rb.filled().len(), self.read_cap);
            self.buf.extend_from_slice(rb.filled());
            Poll::Ready(Ok(rb.filled().len()))
        })
        .await
    }

    /// [`Conn::read_more`] where the client closing is an error.
    async fn fill(&mut self) -> io::Result<()> {
        if self.read_more(FIRST_READ).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Reads a whole head, holding at most `max` bytes of it.
    async fn read_head(&mut self, max: usize) -> Result<Head, HeadError> {
        loop {
            if let Some((head, used)) = parse_head(&self.buf)? {
                self.buf.advance(used);
                return Ok(head);
            }
            if self.buf.len() >= max {
                return Err(HeadError::TooLarge(max));
            }
            // Never more than `max` held.
            let room = max.saturating_sub(self.buf.len());
            let n = self
                .read_more(room)
                .await
                .map_err(|e| HeadError::Io(e.to_string()))?;
            if n == 0 {
                return Err(HeadError::Closed);
            }
        }
    }

    /// Reads a body of `framing`, at most `max` bytes, each buffer charged to `charge`
    /// before it is allocated. Bytes already read come first, without a copy.
    async fn read_body(
        &mut self,
        framing: Framing,
        max: usize,
        trailers_max: usize,
        charge: &mut Charge,
    ) -> Result<Vec<Bytes>, BodyError> {
        match framing {
            Framing::Empty => Ok(Vec::new()),
            Framing::Length(n) => {
                let mut left = usize::try_from(n)
                    .ok()
                    .filter(|&n| n <= max)
                    .ok_or(BodyError::TooLarge)?;
                let mut frames = Vec::new();
                if left > 0 && !self.buf.is_empty() {
                    let k = left.min(self.buf.len());
                    charge.try_grow(k).map_err(BodyError::OverBudget)?;
                    // Copied (at most a read buffer's worth, once per request): a frame split
                    // off the read buffer would keep its whole allocation alive, uncharged,
                    // for as long as the session holds the body.
                    frames.push(Bytes::copy_from_slice(&self.buf[..k]));
                    self.buf.advance(k);
                    left -= k;
                }
                while left > 0 {
                    let want = left.min(BODY_CHUNK);
                    charge.try_grow(want).map_err(BodyError::OverBudget)?;
                    let mut chunk = BytesMut::with_capacity(want);
                    while chunk.len() < want {
                        // Reads into the spare capacity only: never past this body.
                        if self.io.read_buf(&mut chunk).await? == 0 {
                            return Err(BodyError::Gone);
                        }
                    }
                    frames.push(chunk.freeze());
                    left -= want;
                }
                Ok(frames)
            }
            Framing::Chunked => self.read_chunked(max, trailers_max, charge).await,
        }
    }

    /// A chunked body, joined into one buffer (a body of many tiny chunks must not become
    /// as many `Bytes` handles); trailers are read and ignored.
    async fn read_chunked(
        &mut self,
        max: usize,
        trailers_max: usize,
        charge: &mut Charge,
    ) -> Result<Vec<Bytes>, BodyError> {
        let mut body = BytesMut::new();
        loop {
            let line = self.line(MAX_CHUNK_LINE).await?;
            let size = chunk_size(&self.buf[..line])?;
            self.buf.advance(line + 2);
            if size == 0 {
                let mut trailers = 0usize;
                loop {
                    let line = self.line(MAX_CHUNK_LINE.max(trailers_max)).await?;
                    self.buf.advance(line + 2);
                    trailers = trailers.saturating_add(line + 2);
                    if trailers > trailers_max {
                        return Err(BodyError::Malformed("trailers too large"));
                    }
                    if line == 0 {
                        break;
                    }
                }
                break;
            }
            if body.len().saturating_add(size) > max {
                return Err(BodyError::TooLarge);
            }
            // Charged and stored as the bytes come, not as declared: a chunk announced but
            // never sent holds nothing.
            let mut left = size;
            while left > 0 {
                if self.buf.is_empty() {
                    self.fill().await?;
                }
                let k = left.min(self.buf.len());
                // What is charged is the buffer's capacity, which grows by doubling up to
                // `max` (checked above: the body fits).
                let need = body.len().saturating_add(k);
                if need > body.capacity() {
                    let had = body.capacity();
                    let grown = had.saturating_mul(2).max(need).min(max.max(need));
                    charge
                        .try_grow(grown - had)
                        .map_err(BodyError::OverBudget)?;
                    grow_within(&mut body, k, grown);
                }
                body.extend_from_slice(&self.buf[..k]);
                self.buf.advance(k);
                left -= k;
            }
            while self.buf.len() < 2 {
                self.fill().await?;
            }
            if &self.buf[..2] != b"\r\n" {
                return Err(BodyError::Malformed("chunk not followed by CRLF"));
            }
            self.buf.advance(2);
        }
        Ok(if body.is_empty() {
            Vec::new()
        } else {
            vec![body.freeze()]
        })
    }

    /// Reads until `buf` holds a CRLF within its first `max` bytes; returns where it starts.
    async fn line(&mut self, max: usize) -> Result<usize, BodyError> {
        loop {
            let seen = self.buf.len().min(max.saturating_add(2));
            if let Some(i) = self.buf[..seen].windows(2).position(|w| w == b"\r\n") {
                return Ok(i);
            }
            if self.buf.len() >= max.saturating_add(2) {
                return Err(BodyError::Malformed("chunk line too long"));
            }
            self.fill().await?;
        }
    }

    /// Reads and drops a body of `n` bytes (one refused before it was read), so the
    /// connection can go on.
    async fn discard(&mut self, n: u64) -> io::Result<()> {
        let mut left = usize::try_from(n).unwrap_or(usize::MAX);
        loop {
            let k = left.min(self.buf.len());
            self.buf.advance(k);
            left -= k;
            if left == 0 {
                return Ok(());
            }
            self.release();
            if self.read_more(left).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Writes a reply: `head` then `body`, flushed; false if the client is gone.
    async fn write(&mut self, mut head: Vec<u8>, body: &[u8], within: Duration) -> bool {
        let write = async {
            if body.len() <= COPY_BODY {
                // Exactly: the head and this copy stay within REPLY_HEAD_MAX + COPY_BODY.
                head.reserve_exact(body.len());
                head.extend_from_slice(body);
                self.io.write_all(&head).await?;
            } else {
                let (mut h, mut b) = (&head[..], body);
                while !h.is_empty() || !b.is_empty() {
                    let n = self
                        .io
                        .write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(b)])
                        .await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    let from_head = n.min(h.len());
                    h = &h[from_head..];
                    b = &b[(n - from_head).min(b.len())..];
                }
            }
            self.io.flush().await
        };
        matches!(timeout(within, write).await, Ok(Ok(())))
    }

    /// Drops what the buffer holds past the last request's bytes once it is empty, so an
    /// idle connection holds none.
    fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

/// How a reply ends its connection.
#[derive(Clone, Copy)]
struct KeepAlive {
    keep: bool,
    /// An HTTP/1.0 client is told `Connection: keep-alive` (it asked for it).
    http10: bool,
}

/// The reply's bytes: its head (Title-Case names, our Content-Length, Date and
/// Connection) and its body.
fn serialize(reply: Reply, head_only: bool, ka: KeepAlive) -> (Vec<u8>, Bytes) {
    let (parts, body) = reply.into_parts();
    // A `Full` body is ready at once; nothing else is ever in a Reply.
    let body = body
        .collect()
        .now_or_never()
        .and_then(Result::ok)
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let status = parts.status;
    let mut head = Vec::with_capacity(192);
    let _ = write!(
        Fmt(&mut head),
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in parts.headers.iter() {
        if [CONTENT_LENGTH, CONNECTION, DATE, TRANSFER_ENCODING].contains(name) {
            continue;
        }
        title_case(&mut head, name.as_str());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let _ = write!(Fmt(&mut head), "Content-Length: {}\r\n", body.len());
    head.extend_from_slice(b"Date: ");
    head.extend_from_slice(&http_date(SystemTime::now()));
    head.extend_from_slice(b"\r\n");
    if !ka.keep {
        head.extend_from_slice(b"Connection: close\r\n");
    } else if ka.http10 {
        head.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    head.extend_from_slice(b"\r\n");
    (head, if head_only { Bytes::new() } else { body })
}

/// `fmt::Write` into a byte vector (status lines and numbers).
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `content-type` as `Content-Type`: librtmp and ffmpeg look for the Title-Case name.
fn title_case(out: &mut Vec<u8>, name: &str) {
    let mut upper = true;
    for b in name.bytes() {
        out.push(if upper { b.to_ascii_uppercase() } else { b });
        upper = b == b'-';
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for the Date header, formatted once a
/// second per thread.
fn http_date(now: SystemTime) -> [u8; 29] {
    thread_local! {
        static CACHE: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let text = format_date(secs);
        c.set((secs, text));
        text
    })
}

fn format_date(secs: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = [b' '; 29];
    let text = format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS.get((days % 7) as usize).unwrap_or(&"Thu"),
        d,
        MONTHS.get(m.saturating_sub(1) as usize).unwrap_or(&"Jan"),
        y % 10_000,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    for (o, b) in out.iter_mut().zip(text.bytes()) {
        *o = b;
    }
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01: (year, month 1-12, day
/// 1-31), by counting 400-year eras of 146,097 days from 0000-03-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Serves one tunnel connection until the client closes it, a request ends it, or the
/// tunnel shuts down (an idle connection closes at once, a request in progress gets
/// [`SHUTDOWN_GRACE`]).
pub(super) async fn serve<I: ByteStream + 'static>(
    tunnel: &Arc<Tunnel>,
    io: I,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) {
    let io = EagerAck::new(io);
    if !io.has_socket() {
        debug!(%peer, "RTMPT connection: TCP socket not reachable, ACKs stay delayed");
    }
    let mut conn = Conn {
        io,
        buf: BytesMut::new(),
        read_cap: read_buffer_max(&tunnel.limits()),
    };
    let mut shutdown = tunnel.shutdown_tx.subscribe();
    loop {
        // The head must be complete this long after the connection starts waiting for it.
        let deadline = Instant::now() + tunnel.limits().http_header_timeout();
        if conn.buf.is_empty() {
            let first = tokio::select! {
                r = timeout_at(deadline, conn.read_more(FIRST_READ)) => r,
                _ = shutdown.wait_for(|down| *down) => return,
            };
            // Closed, failed, or idle past the header timeout: nothing to answer.
            if !matches!(first, Ok(Ok(n)) if n > 0) {
                return;
            }
        }
        // Boxed: the request's state (the session's waits, the reply) exists only while a
        // request is in progress, not in every idle connection's future.
        let request = Box::pin(serve_request(
            &mut conn, tunnel, peer, local, transport, deadline,
        ));
        let keep = tokio::select! {
            keep = request => keep,
            _ = async {
                drop(shutdown.wait_for(|down| *down).await);
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => false,
        };
        if !keep || tunnel.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        conn.release();
    }
}

/// Reads, answers and replies to one request; true when the connection goes on.
async fn serve_request<I: ByteStream + 'static>(
    conn: &mut Conn<I>,
    tunnel: &Arc<Tunnel>,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
    deadline: Instant,
) -> bool {
    let limits = tunnel.limits();
    let within = limits.idle_timeout();
    let head = match timeout_at(deadline, conn.read_head(limits.max_http_header)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            debug!(%peer, "RTMPT request head refused: {e}");
            if let Some((status, _)) = e.status() {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                let msg = match status {
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                        "request head larger than limits.max_http_header\n"
                    }
                    _ => "malformed HTTP request\n",
                };
                refuse_closing(conn, text(status, msg), within).await;
            }
            return false;
        }
        Err(_) => {
            debug!(%peer, "RTMPT request head not received within limits.http_header_timeout_secs");
            let reply = text(
                StatusCode::REQUEST_TIMEOUT,
                "request head not received in time\n",
            );
            return refuse_closing(conn, reply, within).await;
        }
    };
    let started = Instant::now();
    let head_only = head.method == Method::Head;
    let mut ka = KeepAlive {
        keep: head.keep_alive,
        http10: !head.http11,
    };
    // Refused before the body is read: the connection goes on if there is none, or once a
    // short one is read and dropped (as hyper did); otherwise it closes after the answer.
    let no_body = matches!(head.framing, Framing::Empty | Framing::Length(0));
    let discardable = match head.framing {
        Framing::Empty => Some(0),
        Framing::Length(n) if n <= DISCARD_MAX => Some(n),
        _ => None,
    };
    let command = if head.method != Method::Post {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "RTMPT requests must be POST\n",
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
        Err(r)
    } else {
        match path::parse(&head.path) {
            Ok(c) => match head.framing {
                // Checked before the body is read, from what the client declared.
                Framing::Length(n) if n > limits.max_http_body as u64 => Err(too_large()),
                _ => Ok(c),
            },
            Err(e) => {
                debug!(%peer, path = %short(&head.path), "RTMPT request refused: {e}");
                Err(text(StatusCode::NOT_FOUND, "not an RTMPT request\n"))
            }
        }
    };
    let command = match command {
        Ok(c) => c,
        Err(reply) => {
            let drained = match discardable {
                Some(n) if reply.status() != StatusCode::PAYLOAD_TOO_LARGE => {
                    matches!(timeout(within, conn.discard(n)).await, Ok(Ok(())))
                }
                _ => false,
            };
            ka.keep &= drained && !tunnel.shutting_down.load(Ordering::SeqCst);
            return refuse(conn, reply, head_only, ka, within).await && ka.keep;
        }
    };
    if head.expect_continue && head.http11 && !no_body {
        let go_on = async {
            conn.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            conn.io.flush().await
        };
        if !matches!(timeout(within, go_on).await, Ok(Ok(()))) {
            return false;
        }
    }
    // The body is charged to the memory budget (and the client address's share) as its
    // buffers are made, until it is answered. hyper's header timeout never covered the
    // body; a trickled body is cut off by this one.
    let mut charge = budget::PeerBudget::for_peer(peer.ip()).charge();
    let read = conn.read_body(
        head.framing,
        limits.max_http_body,
        limits.max_http_header,
        &mut charge,
    );
    let body = match timeout(within, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(BodyError::TooLarge)) => return refuse_closing(conn, too_large(), within).await,
        Ok(Err(BodyError::OverBudget(e))) => {
            if let Some(also) = tunnel.conns.refusals.should_log("refused") {
                warn!(%peer, "RTMPT request refused: {e}{also}");
            }
            let reply = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway memory budget spent; retry later\n",
            );
            return refuse_closing(conn, reply, within).await;
        }
        Ok(Err(BodyError::Malformed(why))) => {
            debug!(%peer, "RTMPT request body could not be read: {why}");
            let reply = text(StatusCode::BAD_REQUEST, "request body could not be read\n");
            return refuse_closing(conn, reply, within).await;
        }
        Ok(Err(BodyError::Gone)) => return false,
        Err(_) => {
            debug!(%peer, "RTMPT request body not received within limits.idle_timeout_secs");
            let reply = text(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time\n",
            );
            return refuse_closing(conn, reply, within).await;
        }
    };
    // Nothing of this request stays in the connection's buffer while it is answered.
    conn.release();
    let body_read = Instant::now();
    let reply = tunnel
        .answer(command, &head.path, body, transport, peer, local)
        .await;
    drop(charge);
    trace!(
        %peer,
        request = %loggable(command),
        status = reply.status().as_u16(),
        reply_len = hyper::body::Body::size_hint(reply.body()).exact().unwrap_or(0),
        body_wait_us = body_read.saturating_duration_since(started).as_micros() as u64,
        answer_us = body_read.elapsed().as_micros() as u64,
        "RTMPT request"
    );
    ka.keep &= !tunnel.shutting_down.load(Ordering::SeqCst);
    let (bytes, body) = serialize(reply, head_only, ka);
    conn.write(bytes, &body, within).await && ka.keep
}

/// Answers with `reply`, telling the client whether the connection goes on (`ka`); false
/// when it could not be written.
async fn refuse<I: ByteStream + 'static>(
    conn: &mut Conn<I>,
    reply: Reply,
    head_only: bool,
    ka: KeepAlive,
    within: Duration,
) -> bool {
    let (head, body) = serialize(reply, head_only, ka);
    conn.write(head, &body, within).await
}

/// Answers with `reply` and closes (a framing error, or a body not read whole).
async fn refuse_closing<I: ByteStream + 'static>(
    conn: &mut Conn<I>,
    reply: Reply,
    within: Duration,
) -> bool {
    refuse(conn, reply, false, CLOSE, within).await;
    false
}

const CLOSE: KeepAlive = KeepAlive {
    keep: false,
    http10: false,
};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        parse_head(raw.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn heads_say_framing_and_keep_alive() {
        let h = head("POST /idle/abc/1 HTTP/1.1\r\nContent-Length: 1\r\n\r\n\0");
        assert_eq!(
            (h.method, h.path.as_str(), h.framing, h.keep_alive),
            (Method::Post, "/idle/abc/1", Framing::Length(1), true)
        );
        let h = head("POST /open/1 HTTP/1.0\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, false));
        let h = head("POST /open/1 HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive && !h.http11);
        let h = head("POST /open/1 HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        let h = head(
            "POST http://host:80/send/x/2?y=1 HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\
             Expect: 100-continue\r\n\r\n",
        );
        assert_eq!(
            (h.path.as_str(), h.framing, h.expect_continue),
            ("/send/x/2", Framing::Chunked, true)
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nHost: x\r\n")
                .unwrap()
                .map(|h| h.1),
            None
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(raw.as_bytes()), Err(HeadError::Malformed(_))),
                "{raw}"
            );
        }
        // Agreeing repeats are one length.
        let h = head("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
    }

    /// Without the cap, a buffer fed in pieces doubles past its bound (to 32,000 bytes
    /// here).
    #[test]
    fn buffers_grow_within_their_cap() {
        let cap = 20_000;
        let mut buf = BytesMut::new();
        let mut grown = 0;
        while buf.len() < cap {
            let k = 1000.min(cap - buf.len());
            grown += grow_within(&mut buf, k, cap);
            buf.extend_from_slice(&[7u8; 1000][..k]);
            assert!(buf.capacity() <= cap, "{} > {cap}", buf.capacity());
        }
        assert_eq!(grown, buf.capacity());
    }

    /// A connection fed in small pieces: a head of `max_http_header` bytes read as
    /// `read_head` reads it, then a chunked body of `max_http_body` (less than a chunk) in
    /// 1,000-byte chunks. The read buffer stays within the README's figure
    /// (`connection_bound`: 32,000 bytes without the cap), and the body's buffer, whose
    /// capacity is what is charged, within `max_http_body` (8,192,000 by plain doubling).
    #[tokio::test]
    async fn a_connection_holds_what_its_bound_says() {
        let limits = Limits::default();
        let bound = connection_bound(&limits);
        let mut raw = vec![b'x'; limits.max_http_header];
        raw.extend_from_slice(b"\r\n");
        let chunks = limits.max_http_body / 1000;
        for _ in 0..chunks {
            raw.extend_from_slice(b"3e8\r\n");
            raw.extend_from_slice(&[b'a'; 1000]);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            for piece in raw.chunks(1000) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut conn = Conn {
            io: EagerAck::new(server),
            buf: BytesMut::new(),
            read_cap: read_buffer_max(&limits),
        };
        // As `read_head` reads (never more than the head's bound held).
        while conn.buf.len() < limits.max_http_header {
            let room = limits.max_http_header - conn.buf.len();
            assert!(conn.read_more(room).await.unwrap() > 0);
            assert!(
                conn.buf.capacity() <= bound.read_buffer,
                "read buffer {} > {}",
                conn.buf.capacity(),
                bound.read_buffer
            );
        }
        conn.buf.advance(limits.max_http_header);
        let line = conn.line(MAX_CHUNK_LINE).await.unwrap();
        assert_eq!(line, 0);
        conn.buf.advance(2);
        let mut charge = budget::PeerBudget::for_peer(addr().ip()).charge();
        let body = conn
            .read_body(
                Framing::Chunked,
                limits.max_http_body,
                limits.max_http_header,
                &mut charge,
            )
            .await
            .unwrap();
        let len: usize = body.iter().map(Bytes::len).sum();
        assert_eq!(len, chunks * 1000);
        assert!(
            charge.bytes() >= len && charge.bytes() <= bound.body,
            "{} charged for a body of {len}",
            charge.bytes()
        );
        drop(writer.await.unwrap());
    }

    /// The largest head a tunnel reply gets stays within `REPLY_HEAD_MAX`, which the
    /// README's per-connection figure counts.
    #[test]
    fn reply_heads_fit_their_bound() {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "RTMPT requests must be POST\n",
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
        let ka = KeepAlive {
            keep: false,
            http10: false,
        };
        let (head, _) = serialize(r, false, ka);
        assert!(head.len() <= REPLY_HEAD_MAX, "{} bytes", head.len());
        let mut r = Reply::new(http_body_util::Full::new(Bytes::from(vec![1u8; COPY_BODY])));
        *r.status_mut() = StatusCode::OK;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-fcs"),
        );
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-cache"),
        );
        let (head, _) = serialize(r, false, ka);
        assert!(head.len() <= REPLY_HEAD_MAX, "{} bytes", head.len());
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"0;ext=1").unwrap(), 0);
        for bad in [&b""[..], b"x", b"11111111111111111", b"-1"] {
            assert!(matches!(chunk_size(bad), Err(BodyError::Malformed(_))));
        }
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&format_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&format_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        // 2000-02-29 (a leap day of a century year divisible by 400), then 2100-03-01.
        assert_eq!(&format_date(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &format_date(4_107_542_400),
            b"Mon, 01 Mar 2100 00:00:00 GMT"
        );
    }

    #[test]
    fn replies_are_title_case_with_length_and_connection() {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "no\n");
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("POST"));
        let (head, body) = serialize(
            r,
            false,
            KeepAlive {
                keep: false,
                http10: false,
            },
        );
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nContent-Type: text/plain\r\n"), "{head}");
        assert!(head.contains("\r\nCache-Control: no-cache\r\n"), "{head}");
        assert!(head.contains("\r\nAllow: POST\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 3\r\n"), "{head}");
        assert!(head.contains("\r\nDate: "), "{head}");
        assert!(head.ends_with("\r\nConnection: close\r\n\r\n"), "{head}");
        assert_eq!(&body[..], b"no\n");
        let (head, body) = serialize(
            text(StatusCode::OK, "x"),
            true,
            KeepAlive {
                keep: true,
                http10: true,
            },
        );
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("\r\nContent-Length: 1\r\n"), "{head}");
        assert!(
            head.ends_with("\r\nConnection: keep-alive\r\n\r\n"),
            "{head}"
        );
        assert!(body.is_empty());
    }
}
