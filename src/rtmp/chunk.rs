//! Chunk stream: splits messages into chunks and reassembles chunks into messages.
//!
//! [`ChunkDecoder`] is sans-IO: it is handed the bytes read so far and consumes whole
//! chunk headers (never part of one) and whatever chunk payload has arrived, returning
//! each message once its last byte is in. It applies Set Chunk Size and Abort itself,
//! at the moment each completes, and still returns them.
//!
//! Hostile peers. Every declared length is checked against the limits before use, and
//! nothing is allocated for what was declared: a message body grows only as its bytes
//! arrive (doubling, capped at the declared length), so a 16 MiB message that is
//! declared and never sent costs nothing. Work is linear in the bytes consumed: each
//! chunk costs one header parse (at most 18 bytes) and one copy of its payload, with no
//! per-chunk allocation or rescanning, so chunk size 1 costs at most a small constant
//! factor (a 1-byte header per payload byte) over a large chunk size, and that factor
//! is paid for in bytes the peer must send. The bodies of messages in progress are
//! charged to the process-wide memory budget (a [`BufferCharge`], rtmpgate's process-wide budget) before they grow; a
//! refused charge is a decode error ([`ChunkError::OverBudget`]), so the session closes. `limits.min_chunk_size` (default 128, RTMP's
//! initial size) keeps that factor small; [`ChunkDecoder::chunks_received`] lets a session
//! apply a rate limit on chunks as well.
//!
//! Extended timestamps on fmt 3 chunks. ffmpeg (rtmppkt.c keeps the last 24-bit field
//! per chunk stream and reads 4 more bytes whenever it is 0xFFFFFF) and librtmp 2.4
//! (which stores 0xFFFFFF back into the channel header) send and expect the 4-byte
//! extended timestamp again on every fmt 3 chunk of such a stream; librtmp 2.3 and some
//! older servers omit it on continuation chunks. This decoder always reads it on a fmt 3
//! chunk that starts a new message, and on a continuation chunk it consumes the 4 bytes
//! only when they equal the extended timestamp of the message's first chunk (the
//! approach SRS takes); otherwise they are payload. It waits for more input only while
//! the bytes in hand are a prefix of that timestamp. A continuation chunk whose payload
//! happens to start with those same 4 bytes is misread; no rule can tell them apart.
//! The encoder always repeats it, as ffmpeg and librtmp 2.4 do.
//!
//! A fmt 3 chunk that starts a new message reuses the previous timestamp field as a
//! delta, even after a fmt 0 header (RTMP specification 5.3.1.2.4, ffmpeg, librtmp).
//! nginx-rtmp instead adds 0 after a fmt 0, so the encoder never sends a fmt 3 header
//! for a new message right after a fmt 0 one.

use bytes::{Buf, BufMut, BytesMut};

use crate::budget::{BufferCharge, OverBudget, Unmetered};
use crate::message::{self, Message, MessageError};

/// Chunk size every RTMP connection starts with, in both directions.
pub const DEFAULT_CHUNK_SIZE: u32 = 128;
/// Lowest and highest chunk stream ids: 2 (protocol control) to 65599 (3-byte form).
pub const MIN_CSID: u32 = 2;
pub const MAX_CSID: u32 = 65599;
/// Largest message length a chunk header can carry.
pub const MAX_MESSAGE_LEN: u32 = 0xFF_FFFF;
/// A 24-bit timestamp field with this value is followed by a 32-bit one.
const EXTENDED: u32 = 0xFF_FFFF;

/// Why the chunk stream was refused. After any error the decoder's state is undefined
/// and the connection should be closed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChunkError {
    #[error("RTMP chunk stream {csid}: fmt {fmt} chunk on a chunk stream never opened with a fmt 0 header")]
    UnopenedChunkStream { csid: u32, fmt: u8 },
    #[error(
        "RTMP chunk stream {csid}: more than {limit} chunk streams open (limits.max_chunk_streams)"
    )]
    TooManyChunkStreams { csid: u32, limit: usize },
    #[error(
        "RTMP chunk stream {csid}: message of {len} bytes exceeds limits.max_message_len ({limit})"
    )]
    MessageTooLong { csid: u32, len: u32, limit: u32 },
    #[error("RTMP partially received messages exceed limits.max_partial_bytes ({limit} bytes)")]
    PartialBytesExceeded { limit: usize },
    #[error("RTMP peer set chunk size {size}, outside the accepted {min}..={max} (limits.min_chunk_size, limits.max_chunk_size)")]
    ChunkSizeOutOfRange { size: u32, min: u32, max: u32 },
    #[error("RTMP chunk stream {csid}: fmt {fmt} header in the middle of a {len}-byte message ({received} bytes received); only fmt 3 may continue a message")]
    HeaderInsideMessage {
        csid: u32,
        fmt: u8,
        len: u32,
        received: usize,
    },
    #[error("RTMP protocol control message: {0}")]
    BadControl(#[from] MessageError),
    #[error("RTMP chunk stream {csid}: no memory for the rest of a {len}-byte message: {budget}")]
    OverBudget {
        csid: u32,
        len: u32,
        budget: OverBudget,
    },
}

#[derive(Debug)]
struct InStream {
    head: ChunkStreamHead,
    /// Absolute timestamp of the message in progress, or of the last one.
    timestamp: u32,
    /// Body of the message in progress. A Vec, for exact control of its capacity.
    body: Vec<u8>,
}

impl ChunkStreamState for InStream {
    fn head(&self) -> &ChunkStreamHead {
        &self.head
    }
    fn head_mut(&mut self) -> &mut ChunkStreamHead {
        &mut self.head
    }
    fn received(&self) -> usize {
        self.body.len()
    }
    fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }
}

/// A fully available chunk header, parsed but not yet applied.
#[derive(Clone, Copy, Debug)]
pub struct ChunkHeader {
    /// Bytes the header takes (basic + message header + extended timestamp).
    pub len: usize,
    pub fmt: u8,
    pub csid: u32,
    /// Index of the open chunk stream (as `find` named it), or None for a fmt 0 header
    /// opening a new one.
    pub idx: Option<usize>,
    /// The timestamp field this header carries (None for fmt 3 without a repeat).
    pub ts_field: Option<u32>,
    pub extended: bool,
    pub msg_len: u32,
    pub msg_type: u8,
    pub stream_id: u32,
}
type Header = ChunkHeader;

/// A chunk stream's state as its headers left it, kept alike by both readers of chunk
/// streams ([`ChunkDecoder`], and the relay's pass-through scanner, which keeps no media):
/// what a later header on the chunk stream may leave out, and is checked against.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkStreamHead {
    pub csid: u32,
    pub msg_type: u8,
    pub stream_id: u32,
    pub msg_len: u32,
    /// Last timestamp field (absolute after fmt 0, else a delta), reused by fmt 3 (and
    /// repeated by an extended continuation).
    pub ts_field: u32,
    /// The last header that set `ts_field` used the 32-bit extended form.
    pub extended: bool,
    /// A message is in progress on this chunk stream.
    pub in_progress: bool,
}

impl ChunkStreamHead {
    /// A chunk stream a fmt 0 header opens; that header is applied next.
    pub fn new(csid: u32) -> Self {
        ChunkStreamHead {
            csid,
            ..ChunkStreamHead::default()
        }
    }

    /// Applies a header [`parse_chunk_header`] found for this chunk stream: it starts a
    /// message (true), or continues the one in progress (false; a fmt 3 continuation
    /// changes nothing).
    pub fn apply(&mut self, h: &ChunkHeader) -> bool {
        if self.in_progress {
            return false;
        }
        self.msg_len = h.msg_len;
        self.msg_type = h.msg_type;
        self.stream_id = h.stream_id;
        if h.fmt < 3 {
            self.extended = h.extended;
        }
        self.ts_field = h.ts_field.unwrap_or(self.ts_field);
        self.in_progress = true;
        true
    }
}

/// The limits a chunk-header parse checks before anything is allocated.
#[derive(Clone, Copy, Debug)]
pub struct HeaderLimits {
    pub max_message_len: u32,
    pub max_chunk_streams: usize,
}

impl From<&ChunkLimits> for HeaderLimits {
    fn from(l: &ChunkLimits) -> Self {
        HeaderLimits {
            // No header can declare more than its 24-bit field holds.
            max_message_len: l.max_message_len.min(MAX_MESSAGE_LEN),
            max_chunk_streams: l.max_chunk_streams,
        }
    }
}

/// A chunk stream as its reader keeps it ([`ChunkDecoder`]'s, or the relay's pass-through
/// scanner's): its header state, and how much of the message in progress has arrived.
pub trait ChunkStreamState {
    fn head(&self) -> &ChunkStreamHead;
    fn head_mut(&mut self) -> &mut ChunkStreamHead;
    /// Payload bytes of the message in progress received so far (for the error message).
    fn received(&self) -> usize;
    /// Takes what the reader kept of the message in progress's body, leaving its own count
    /// of that message at nothing ([`apply_abort`]).
    fn take_body(&mut self) -> Vec<u8>;
}

/// Applies the body of the peer's Abort Message (type 2): the message in progress on the
/// chunk stream it names is dropped, and the chunk stream stays open with its header state
/// (the next message on it may leave out what its last header set). The one handling of
/// Abort for both readers of a chunk stream, so they drop the same messages.
///
/// The dropped body's capacity is given back to `charge`; returns its length, payload bytes
/// no longer held in part. An Abort naming a chunk stream that is not open, or that has no
/// message in progress, changes nothing.
pub fn apply_abort<S: ChunkStreamState>(
    payload: &[u8],
    streams: &mut [S],
    charge: &mut dyn BufferCharge,
) -> Result<usize, ChunkError> {
    let csid = message::parse_abort(payload)?;
    let Some(s) = streams
        .iter_mut()
        .find(|s| s.head().csid == csid && s.head().in_progress)
    else {
        return Ok(0);
    };
    s.head_mut().in_progress = false;
    let body = s.take_body();
    charge.shrink(body.capacity());
    Ok(body.len())
}

/// Parses one chunk header at the start of `buf`: `Ok(None)` when more bytes are needed.
/// `streams` are the chunk streams open so far (the header's `idx` is an index into them).
/// The one header parser of the project: [`ChunkDecoder`] uses it, and so does the relay's
/// pass-through scanner, so the two can never disagree on where a chunk ends (the same
/// errors, the same fmt 3 extended-timestamp rule).
pub fn parse_chunk_header<S: ChunkStreamState>(
    buf: &[u8],
    streams: &[S],
    limits: HeaderLimits,
) -> Result<Option<ChunkHeader>, ChunkError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    let fmt = b0 >> 6;
    let (basic, csid) = match b0 & 0x3f {
        0 => match buf.get(1) {
            Some(&b1) => (2, 64 + u32::from(b1)),
            None => return Ok(None),
        },
        1 => match (buf.get(1), buf.get(2)) {
            (Some(&b1), Some(&b2)) => (3, 64 + u32::from(b1) + 256 * u32::from(b2)),
            _ => return Ok(None),
        },
        low => (1, u32::from(low)),
    };
    let mh = [11usize, 7, 3, 0][usize::from(fmt & 3)];
    let Some(m) = buf.get(basic..basic + mh) else {
        return Ok(None);
    };
    let idx = streams.iter().position(|s| s.head().csid == csid);
    let open = idx.and_then(|i| streams.get(i));
    let stream = open.map(S::head);
    match (fmt, stream) {
        (1..=3, None) => return Err(ChunkError::UnopenedChunkStream { csid, fmt }),
        (0, None) if streams.len() >= limits.max_chunk_streams => {
            return Err(ChunkError::TooManyChunkStreams {
                csid,
                limit: limits.max_chunk_streams,
            })
        }
        (0..=2, Some(s)) if s.in_progress => {
            return Err(ChunkError::HeaderInsideMessage {
                csid,
                fmt,
                len: s.msg_len,
                received: open.map_or(0, S::received),
            })
        }
        _ => {}
    }
    let be24 = |b: &[u8]| u32::from_be_bytes([0, b[0], b[1], b[2]]);
    let mut h = Header {
        len: basic + mh,
        fmt,
        csid,
        idx,
        ts_field: None,
        extended: false,
        msg_len: stream.map_or(0, |s| s.msg_len),
        msg_type: stream.map_or(0, |s| s.msg_type),
        stream_id: stream.map_or(0, |s| s.stream_id),
    };
    if fmt < 3 {
        let field = be24(&m[0..3]);
        h.extended = field == EXTENDED;
        h.ts_field = Some(field);
        if fmt < 2 {
            h.msg_len = be24(&m[3..6]);
            h.msg_type = m[6];
            if h.msg_len > limits.max_message_len {
                return Err(ChunkError::MessageTooLong {
                    csid,
                    len: h.msg_len,
                    limit: limits.max_message_len,
                });
            }
        }
        if fmt == 0 {
            h.stream_id = u32::from_le_bytes([m[7], m[8], m[9], m[10]]);
        }
    } else if let Some(s) = stream {
        h.extended = s.extended;
    }
    if h.extended {
        if let Some(s) = stream.filter(|s| s.in_progress) {
            // A continuation: consume 4 bytes only if they repeat the extended
            // timestamp. Bytes that already differ from it settle the question
            // without waiting for all 4.
            let want = s.ts_field.to_be_bytes();
            let have = buf.get(h.len..).unwrap_or_default();
            let n = have.len().min(4);
            if have[..n] == want[..n] {
                if n < 4 {
                    return Ok(None);
                }
                h.len += 4;
            }
            return Ok(Some(h));
        }
        let Some(e) = buf.get(h.len..h.len + 4) else {
            return Ok(None);
        };
        let ext = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        h.ts_field = Some(ext);
        h.len += 4;
    }
    Ok(Some(h))
}

/// What a [`ChunkDecoder`] accepts from a peer: the protocol core's own limits, built from
/// `limits.*` by the caller (`From<&Limits>` in `src/limits.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Smallest Set Chunk Size accepted (tiny chunks cost a header each).
    pub min_chunk_size: u32,
    pub max_chunk_size: u32,
    /// Largest message body (capped at the 24-bit field's [`MAX_MESSAGE_LEN`]).
    pub max_message_len: u32,
    /// Chunk streams one peer may open.
    pub max_chunk_streams: usize,
    /// Bytes of partially received messages held at once.
    pub max_partial_bytes: usize,
}

impl Default for ChunkLimits {
    /// The values `limits.rs` defaults to (a test there keeps the two equal).
    fn default() -> Self {
        ChunkLimits {
            min_chunk_size: 128,
            max_chunk_size: 16 * 1024 * 1024,
            max_message_len: 16 * 1024 * 1024,
            max_chunk_streams: 64,
            max_partial_bytes: 32 * 1024 * 1024,
        }
    }
}

impl From<&ChunkLimits> for ChunkLimits {
    fn from(l: &ChunkLimits) -> Self {
        *l
    }
}

/// The peer's chunk size as both readers of its chunk stream follow it ([`ChunkDecoder`], and
/// the relay's pass-through scanner): RTMP's initial size until the peer's Set Chunk Size,
/// which must fall in the accepted range.
#[derive(Clone, Copy, Debug)]
pub struct PeerChunkSize {
    size: u32,
    min: u32,
    max: u32,
}

impl PeerChunkSize {
    pub fn new(limits: &ChunkLimits) -> Self {
        // Never 0: a chunk of 0 payload bytes would never move a reader forward.
        let min = limits.min_chunk_size.max(1);
        PeerChunkSize {
            size: DEFAULT_CHUNK_SIZE,
            min,
            max: limits.max_chunk_size.max(min),
        }
    }

    /// The peer's current chunk size.
    pub fn get(&self) -> u32 {
        self.size
    }

    /// Applies the body of the peer's Set Chunk Size message; a size outside
    /// `limits.min_chunk_size..=limits.max_chunk_size` is an error (the session closes).
    pub fn set(&mut self, payload: &[u8]) -> Result<(), ChunkError> {
        let size = message::parse_set_chunk_size(payload)?;
        if size < self.min || size > self.max {
            return Err(ChunkError::ChunkSizeOutOfRange {
                size,
                min: self.min,
                max: self.max,
            });
        }
        self.size = size;
        Ok(())
    }
}

/// Reassembles messages from the chunks a peer sends.
#[derive(Debug)]
pub struct ChunkDecoder {
    chunk_size: PeerChunkSize,
    header_limits: HeaderLimits,
    max_partial_bytes: usize,
    streams: Vec<InStream>,
    /// Chunk whose payload is arriving: index into `streams`, payload bytes still due.
    current: Option<(usize, u32)>,
    partial_bytes: usize,
    /// The capacity of every body in progress, held from the memory budget.
    charge: Box<dyn BufferCharge>,
    bytes_received: u64,
    chunks_received: u64,
}

impl ChunkDecoder {
    /// A decoder whose partial messages are counted but charged to no budget (tools, tests,
    /// fuzzing); whatever a peer reaches uses [`ChunkDecoder::with_charge`].
    pub fn new(limits: impl Into<ChunkLimits>) -> Self {
        Self::with_charge(limits, Unmetered::default())
    }

    /// A decoder charging its partial messages to `charge` (empty): a connection's charge,
    /// which also counts against its address's share of the budget.
    pub fn with_charge(
        limits: impl Into<ChunkLimits>,
        charge: impl BufferCharge + 'static,
    ) -> Self {
        let limits = limits.into();
        ChunkDecoder {
            chunk_size: PeerChunkSize::new(&limits),
            header_limits: HeaderLimits::from(&limits),
            max_partial_bytes: limits.max_partial_bytes,
            streams: Vec::new(),
            current: None,
            partial_bytes: 0,
            charge: Box::new(charge),
            bytes_received: 0,
            chunks_received: 0,
        }
    }

    /// The peer's current chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size.get()
    }

    /// Bytes consumed so far (chunk headers and payload), for Acknowledgements.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Chunk headers consumed so far.
    pub fn chunks_received(&self) -> u64 {
        self.chunks_received
    }

    /// Bytes of partially received messages held right now.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes
    }

    /// Consumes complete chunk headers and available payload from `buf`; returns the
    /// next complete message, or `None` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ChunkError> {
        loop {
            if let Some((idx, left)) = self.current {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (left as usize).min(buf.len());
                let total = self.partial_bytes.saturating_add(n);
                if total > self.max_partial_bytes {
                    return Err(ChunkError::PartialBytesExceeded {
                        limit: self.max_partial_bytes,
                    });
                }
                let Some(s) = self.streams.get_mut(idx) else {
                    // Unreachable: `current` always names an existing stream.
                    self.current = None;
                    continue;
                };
                let (csid, msg_len) = (s.head.csid, s.head.msg_len);
                if let Err(budget) = append(&mut s.body, &buf[..n], msg_len, self.charge.as_mut()) {
                    return Err(ChunkError::OverBudget {
                        csid,
                        len: msg_len,
                        budget,
                    });
                }
                buf.advance(n);
                self.partial_bytes = total;
                self.bytes_received = self.bytes_received.saturating_add(n as u64);
                let left = left - n as u32;
                if left > 0 {
                    self.current = Some((idx, left));
                    return Ok(None);
                }
                self.current = None;
                if s.body.len() >= s.head.msg_len as usize {
                    return self.complete(idx).map(Some);
                }
                continue;
            }
            let Some(h) = parse_chunk_header(buf, &self.streams, self.header_limits)? else {
                return Ok(None);
            };
            buf.advance(h.len);
            self.bytes_received = self.bytes_received.saturating_add(h.len as u64);
            self.chunks_received = self.chunks_received.saturating_add(1);
            let idx = self.apply_header(h);
            let Some(s) = self.streams.get(idx) else {
                continue;
            };
            let due = (s.head.msg_len as usize).saturating_sub(s.body.len());
            if due == 0 {
                return self.complete(idx).map(Some);
            }
            let chunk = due.min(self.chunk_size.get() as usize) as u32;
            self.current = Some((idx, chunk));
        }
    }

    /// Applies a parsed header to its chunk stream; returns the stream's index.
    fn apply_header(&mut self, h: Header) -> usize {
        let idx = match h.idx {
            Some(i) => i,
            None => {
                // Exactly one more: a client uses two or three chunk streams for as long as
                // it is connected, and a Vec's doubling would hold room for four (a new
                // chunk stream is rare, and bounded by max_chunk_streams).
                self.streams.reserve_exact(1);
                self.streams.push(InStream {
                    head: ChunkStreamHead::new(h.csid),
                    timestamp: 0,
                    body: Vec::new(),
                });
                self.streams.len() - 1
            }
        };
        let Some(s) = self.streams.get_mut(idx) else {
            return idx;
        };
        if s.head.apply(&h) {
            let field = s.head.ts_field;
            s.timestamp = if h.fmt == 0 {
                field
            } else {
                s.timestamp.wrapping_add(field)
            };
        }
        idx
    }

    /// Hands out the finished message on stream `idx`, applying Set Chunk Size and Abort.
    fn complete(&mut self, idx: usize) -> Result<Message, ChunkError> {
        let Some(s) = self.streams.get_mut(idx) else {
            return Err(ChunkError::UnopenedChunkStream { csid: 0, fmt: 3 });
        };
        let body = std::mem::take(&mut s.body);
        // The body leaves the decoder: whoever keeps it charges it (the hub's ring, say).
        self.charge.shrink(body.capacity());
        let payload = bytes::Bytes::from(body);
        s.head.in_progress = false;
        self.partial_bytes = self.partial_bytes.saturating_sub(payload.len());
        let msg = Message {
            msg_type: s.head.msg_type,
            timestamp: s.timestamp,
            stream_id: s.head.stream_id,
            payload,
        };
        match msg.msg_type {
            message::SET_CHUNK_SIZE => self.chunk_size.set(&msg.payload)?,
            message::ABORT => {
                let dropped = apply_abort(&msg.payload, &mut self.streams, self.charge.as_mut())?;
                self.partial_bytes = self.partial_bytes.saturating_sub(dropped);
            }
            _ => {}
        }
        Ok(msg)
    }
}

/// Appends chunk payload, growing the body geometrically (amortised copying) but never
/// past the declared length, so memory follows what arrived rather than what was
/// announced, and a finished body is never larger than its message. Growth is charged to
/// `charge` first; refused, nothing is appended.
fn append(
    body: &mut Vec<u8>,
    data: &[u8],
    declared: u32,
    charge: &mut dyn BufferCharge,
) -> Result<(), OverBudget> {
    let spare = body.capacity() - body.len();
    if spare < data.len() {
        let due = (declared as usize).saturating_sub(body.len());
        let extra = data.len().max(body.len().min(due));
        // reserve_exact makes the capacity exactly len + extra (a Vec never reports an
        // allocator's rounding), which is what the charge tracks.
        charge.try_grow((body.len() + extra).saturating_sub(body.capacity()))?;
        body.reserve_exact(extra);
    }
    body.extend_from_slice(data);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct OutStream {
    csid: u32,
    msg_type: u8,
    stream_id: u32,
    msg_len: u32,
    timestamp: u32,
    ts_field: u32,
    /// The last header was fmt 0, whose field fmt 3 would reuse inconsistently.
    after_fmt0: bool,
}

/// Splits messages into chunks, compressing headers per chunk stream.
#[derive(Debug)]
pub struct ChunkEncoder {
    chunk_size: u32,
    streams: Vec<OutStream>,
}

impl Default for ChunkEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkEncoder {
    pub fn new() -> Self {
        ChunkEncoder {
            chunk_size: DEFAULT_CHUNK_SIZE,
            streams: Vec::new(),
        }
    }

    /// Sets the outgoing chunk size (clamped to 1..=2^31-1). [`ChunkEncoder::write`] does
    /// this by itself after writing a Set Chunk Size message.
    pub fn set_chunk_size(&mut self, n: u32) {
        self.chunk_size = n.clamp(1, 0x7fff_ffff);
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Chunks `msg` onto chunk stream `csid` (2..=65599; others are clamped), choosing
    /// the smallest header the previous message on that chunk stream allows. Payloads
    /// past 16 MiB - 1 bytes cannot be expressed and are cut.
    pub fn write(&mut self, csid: u32, msg: &Message, out: &mut BytesMut) {
        self.write_with(csid, msg, out, |_| {});
    }

    /// Like [`ChunkEncoder::write`], calling `chunk_end(offset)` after each chunk.
    fn write_with(
        &mut self,
        csid: u32,
        msg: &Message,
        out: &mut BytesMut,
        chunk_end: impl FnMut(usize),
    ) {
        let csid = clamp_csid(csid);
        let len = msg.payload.len().min(MAX_MESSAGE_LEN as usize) as u32;
        let prev = self.streams.iter().position(|s| s.csid == csid);
        let (fmt, field) = match prev.and_then(|i| self.streams.get(i)) {
            Some(p) if p.stream_id == msg.stream_id && msg.timestamp >= p.timestamp => {
                let delta = msg.timestamp - p.timestamp;
                if p.msg_type != msg.msg_type || p.msg_len != len {
                    (1, delta)
                } else if delta == p.ts_field && !p.after_fmt0 {
                    (3, delta)
                } else {
                    (2, delta)
                }
            }
            _ => (0, msg.timestamp),
        };
        write_chunks(
            out,
            csid,
            fmt,
            field,
            msg,
            &msg.payload[..len as usize],
            self.chunk_size,
            chunk_end,
        );
        let state = OutStream {
            csid,
            msg_type: msg.msg_type,
            stream_id: msg.stream_id,
            msg_len: len,
            timestamp: msg.timestamp,
            ts_field: field,
            after_fmt0: fmt == 0,
        };
        match prev.and_then(|i| self.streams.get_mut(i)) {
            Some(s) => *s = state,
            None => {
                // Exactly one more, as the decoder's (held for the connection's life).
                self.streams.reserve_exact(1);
                self.streams.push(state);
            }
        }
        if msg.msg_type == message::SET_CHUNK_SIZE {
            if let Ok(n) = message::parse_set_chunk_size(&msg.payload) {
                self.set_chunk_size(n);
            }
        }
    }

    /// Records that a fmt 0 chunking of `msg` (from [`encode_fmt0`]) was sent on `csid`,
    /// so later compressed headers on that chunk stream stay consistent with it.
    pub fn record_fmt0(&mut self, csid: u32, msg: &Message) {
        let csid = clamp_csid(csid);
        let state = OutStream {
            csid,
            msg_type: msg.msg_type,
            stream_id: msg.stream_id,
            msg_len: msg.payload.len().min(MAX_MESSAGE_LEN as usize) as u32,
            timestamp: msg.timestamp,
            ts_field: msg.timestamp,
            after_fmt0: true,
        };
        match self.streams.iter_mut().find(|s| s.csid == csid) {
            Some(s) => *s = state,
            None => {
                // Exactly one more, as the decoder's (held for the connection's life).
                self.streams.reserve_exact(1);
                self.streams.push(state);
            }
        }
    }
}

fn clamp_csid(csid: u32) -> u32 {
    debug_assert!(
        (MIN_CSID..=MAX_CSID).contains(&csid),
        "csid {csid} out of range"
    );
    csid.clamp(MIN_CSID, MAX_CSID)
}

/// Basic header bytes for `fmt` and `csid` (1, 2 or 3 bytes).
fn basic_header(fmt: u8, csid: u32) -> ([u8; 3], usize) {
    let f = fmt << 6;
    if csid < 64 {
        ([f | csid as u8, 0, 0], 1)
    } else if csid < 64 + 256 {
        ([f, (csid - 64) as u8, 0], 2)
    } else {
        let c = csid - 64;
        ([f | 1, c as u8, (c >> 8) as u8], 3)
    }
}

#[allow(clippy::too_many_arguments)]
fn write_chunks(
    out: &mut BytesMut,
    csid: u32,
    fmt: u8,
    field: u32,
    msg: &Message,
    payload: &[u8],
    chunk_size: u32,
    mut chunk_end: impl FnMut(usize),
) {
    let chunk_size = (chunk_size as usize).max(1);
    let extended = field >= EXTENDED;
    let (basic, blen) = basic_header(fmt, csid);
    // The fmt 3 header that precedes every continuation chunk, built once.
    let (cont_basic, clen) = basic_header(3, csid);
    let mut cont = [0u8; 7];
    cont[..clen].copy_from_slice(&cont_basic[..clen]);
    let mut cont_len = clen;
    if extended {
        cont[clen..clen + 4].copy_from_slice(&field.to_be_bytes());
        cont_len += 4;
    }
    let mh = [11usize, 7, 3, 0][usize::from(fmt)];
    let chunks = payload.len().div_ceil(chunk_size).max(1);
    let ext_len = if extended { 4 } else { 0 };
    out.reserve(blen + mh + ext_len + payload.len() + (chunks - 1) * cont_len);
    out.put_slice(&basic[..blen]);
    if fmt < 3 {
        let f = field.min(EXTENDED).to_be_bytes();
        out.put_slice(&f[1..]);
        if fmt < 2 {
            out.put_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            out.put_u8(msg.msg_type);
            if fmt == 0 {
                out.put_u32_le(msg.stream_id);
            }
        }
    }
    if extended {
        out.put_u32(field);
    }
    let mut first = true;
    for c in payload.chunks(chunk_size) {
        if !first {
            out.put_slice(&cont[..cont_len]);
        }
        first = false;
        out.put_slice(c);
        chunk_end(out.len());
    }
    if payload.is_empty() {
        chunk_end(out.len());
    }
}

/// Chunks `msg` with a full fmt 0 header (absolute timestamp) and no per-connection
/// state, so one media message can be chunked once and the resulting bytes shared by
/// every player with the same chunk size. A session that also uses a [`ChunkEncoder`]
/// on the same `csid` must call [`ChunkEncoder::record_fmt0`] after sending these bytes.
pub fn encode_fmt0(csid: u32, msg: &Message, chunk_size: u32, out: &mut BytesMut) {
    let len = msg.payload.len().min(MAX_MESSAGE_LEN as usize);
    write_chunks(
        out,
        clamp_csid(csid),
        0,
        msg.timestamp,
        msg,
        &msg.payload[..len],
        chunk_size,
        |_| {},
    );
}

/// [`encode_fmt0`] into a fresh buffer sized exactly, ready to share between players.
pub fn encode_fmt0_bytes(csid: u32, msg: &Message, chunk_size: u32) -> bytes::Bytes {
    let mut out = BytesMut::new();
    encode_fmt0(csid, msg, chunk_size, &mut out);
    out.freeze()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The defaults, but accepting any chunk size: these tests exercise sizes below the
    /// default floor of 128 on purpose.
    fn small_chunks() -> ChunkLimits {
        ChunkLimits {
            min_chunk_size: 1,
            ..ChunkLimits::default()
        }
    }
    use crate::message::Control;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn dec() -> ChunkDecoder {
        ChunkDecoder::new(small_chunks())
    }

    fn drain(d: &mut ChunkDecoder, buf: &mut BytesMut) -> Result<Vec<Message>, ChunkError> {
        let mut v = Vec::new();
        while let Some(m) = d.decode(buf)? {
            v.push(m);
        }
        Ok(v)
    }

    fn msg(t: u8, ts: u32, sid: u32, p: &[u8]) -> Message {
        Message::new(t, ts, sid, Bytes::copy_from_slice(p))
    }

    /// A budget of its own for one test: a limit, and what its charges hold and were refused.
    #[derive(Debug, Clone)]
    struct TestBudget {
        limit: usize,
        used: Arc<AtomicUsize>,
        refused: Arc<AtomicUsize>,
    }

    impl TestBudget {
        fn used(&self) -> usize {
            self.used.load(Ordering::Relaxed)
        }
        fn refused(&self) -> usize {
            self.refused.load(Ordering::Relaxed)
        }
        fn empty(&self) -> TestCharge {
            TestCharge {
                budget: self.clone(),
                bytes: 0,
            }
        }
    }

    #[derive(Debug)]
    struct TestCharge {
        budget: TestBudget,
        bytes: usize,
    }

    impl BufferCharge for TestCharge {
        fn try_grow(&mut self, more: usize) -> Result<(), OverBudget> {
            let used = self.budget.used();
            if used.saturating_add(more) > self.budget.limit {
                self.budget.refused.fetch_add(1, Ordering::Relaxed);
                return Err(OverBudget {
                    requested: more,
                    used,
                    limit: self.budget.limit,
                    per_address: false,
                    remedy: "raise the test's budget",
                });
            }
            self.budget.used.fetch_add(more, Ordering::Relaxed);
            self.bytes += more;
            Ok(())
        }
        fn shrink(&mut self, less: usize) {
            let less = less.min(self.bytes);
            self.bytes -= less;
            self.budget.used.fetch_sub(less, Ordering::Relaxed);
        }
        fn bytes(&self) -> usize {
            self.bytes
        }
    }

    impl Drop for TestCharge {
        fn drop(&mut self) {
            self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }

    fn budget(limit: usize) -> TestBudget {
        TestBudget {
            limit,
            used: Arc::default(),
            refused: Arc::default(),
        }
    }

    #[test]
    fn partial_messages_are_charged_and_refused_past_the_budget() {
        let b = budget(10_000);
        let mut d = ChunkDecoder::with_charge(ChunkLimits::default(), b.empty());
        // A 6,000-byte message, half sent: its body is charged while it is in progress.
        let whole = encode_fmt0_bytes(4, &msg(9, 0, 1, &[7u8; 6000]), 128);
        let mut first = BytesMut::from(&whole[..3100]);
        assert_eq!(drain(&mut d, &mut first).unwrap(), vec![]);
        let held = b.used();
        assert!((3000..=6000).contains(&held), "{held}");
        assert_eq!(held, d.charge.bytes());
        // The rest completes it; the body leaves the decoder and the charge is returned.
        let mut rest = BytesMut::from(&whole[3100..]);
        assert_eq!(drain(&mut d, &mut rest).unwrap().len(), 1);
        assert_eq!(b.used(), 0);

        // Two messages in progress on two chunk streams, 6,000 bytes each: the second one's
        // growth is refused with a clear error, and nothing is held once the decoder goes.
        // (Cut at a chunk boundary: a 12-byte header and 128 bytes, then 1 + 128 each.)
        let cut = 140 + 129 * 40;
        let other = encode_fmt0_bytes(5, &msg(8, 0, 1, &[1u8; 6000]), 128);
        let mut buf = BytesMut::from(&whole[..cut]);
        assert_eq!(drain(&mut d, &mut buf).unwrap(), vec![]);
        let mut buf = BytesMut::from(&other[..cut]);
        let err = drain(&mut d, &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkError::OverBudget {
                    csid: 5,
                    len: 6000,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        // The application's remedy, not a configuration key this crate cannot know.
        assert!(
            text.contains("memory budget spent") && text.ends_with("(raise the test's budget)"),
            "{text}"
        );
        assert!(b.refused() >= 1);
        drop(d);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn abort_returns_the_charge() {
        let b = budget(1 << 20);
        let mut d = ChunkDecoder::with_charge(ChunkLimits::default(), b.empty());
        let whole = encode_fmt0_bytes(4, &msg(9, 0, 1, &[7u8; 6000]), 128);
        let mut buf = BytesMut::from(&whole[..140 + 129 * 6]);
        assert_eq!(drain(&mut d, &mut buf).unwrap(), vec![]);
        assert!(b.used() > 0);
        let mut buf =
            BytesMut::from(&encode_fmt0_bytes(2, &Control::Abort(4).to_message(), 128)[..]);
        drain(&mut d, &mut buf).unwrap();
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn fmt0_hand_checked() {
        let mut out = BytesMut::new();
        encode_fmt0(3, &msg(20, 0x010203, 1, b"abc"), 128, &mut out);
        assert_eq!(
            &out[..],
            &[0x03, 1, 2, 3, 0, 0, 3, 20, 1, 0, 0, 0, b'a', b'b', b'c']
        );
        // Two chunks at chunk size 2, extended timestamp repeated on the continuation.
        let mut out = BytesMut::new();
        encode_fmt0(4, &msg(9, 0x0100_0000, 0, b"xyz"), 2, &mut out);
        assert_eq!(
            &out[..],
            &[
                0x04, 0xff, 0xff, 0xff, 0, 0, 3, 9, 0, 0, 0, 0, 1, 0, 0, 0, b'x', b'y', 0xc4, 1, 0,
                0, 0, b'z'
            ]
        );
        let mut d = dec();
        d.chunk_size.size = 2;
        let m = drain(&mut d, &mut out).unwrap();
        assert_eq!(m, vec![msg(9, 0x0100_0000, 0, b"xyz")]);
        assert!(out.is_empty());
    }

    #[test]
    fn basic_header_forms() {
        assert_eq!(basic_header(0, 63), ([63, 0, 0], 1));
        assert_eq!(basic_header(1, 64), ([0x40, 0, 0], 2));
        assert_eq!(basic_header(0, 319), ([0, 255, 0], 2));
        assert_eq!(basic_header(3, 320), ([0xc1, 0, 1], 3));
        assert_eq!(basic_header(0, 65599), ([1, 255, 255], 3));
        // csid 65599 round-trips through the decoder.
        let mut out = BytesMut::new();
        let m = msg(8, 5, 1, &[7; 300]);
        let mut e = ChunkEncoder::new();
        e.write(65599, &m, &mut out);
        e.write(65599, &m, &mut out);
        assert_eq!(drain(&mut dec(), &mut out).unwrap(), vec![m.clone(), m]);
    }

    #[test]
    fn header_compression() {
        let mut e = ChunkEncoder::new();
        let mut out = BytesMut::new();
        e.write(6, &msg(9, 100, 1, b"aa"), &mut out);
        assert_eq!(out[0] >> 6, 0);
        out.clear();
        e.write(6, &msg(9, 140, 1, b"bbb"), &mut out);
        assert_eq!(out[0] >> 6, 1, "length changed");
        out.clear();
        e.write(6, &msg(9, 180, 1, b"ccc"), &mut out);
        assert_eq!(out[0] >> 6, 3, "same delta, length, type");
        out.clear();
        e.write(6, &msg(9, 200, 1, b"ddd"), &mut out);
        assert_eq!(
            &out[..],
            &[0x86, 0, 0, 20, b'd', b'd', b'd'],
            "delta changed"
        );
        out.clear();
        e.write(6, &msg(9, 100, 1, b"ddd"), &mut out);
        assert_eq!(out[0] >> 6, 0, "timestamp went backwards");
        out.clear();
        e.write(6, &msg(9, 200, 2, b"ddd"), &mut out);
        assert_eq!(out[0] >> 6, 0, "stream id changed");
        out.clear();
        e.write(6, &msg(9, 300, 2, b"ddd"), &mut out);
        assert_eq!(out[0] >> 6, 2, "no fmt 3 right after fmt 0");
    }

    #[test]
    fn fmt3_after_fmt0_adds_the_absolute_timestamp() {
        // fmt 0 ts 10, then fmt 3 (new message): timestamp 20, as ffmpeg/librtmp decode.
        let mut b = BytesMut::from(&[0x03, 0, 0, 10, 0, 0, 1, 8, 0, 0, 0, 0, b'a', 0xc3, b'b'][..]);
        let m = drain(&mut dec(), &mut b).unwrap();
        assert_eq!(m, vec![msg(8, 10, 0, b"a"), msg(8, 20, 0, b"b")]);
    }

    #[test]
    fn unopened_chunk_stream_is_refused() {
        for fmt in 1..=3u8 {
            let mut b = BytesMut::from(&[(fmt << 6) | 5, 0, 0, 0, 0, 0, 1, 8, b'x'][..]);
            let e = dec().decode(&mut b).unwrap_err();
            assert_eq!(e, ChunkError::UnopenedChunkStream { csid: 5, fmt });
        }
    }

    #[test]
    fn partial_headers_are_not_consumed() {
        let mut full = BytesMut::new();
        let mut e = ChunkEncoder::new();
        e.write(400, &msg(20, 0x0100_0000, 1, &[1; 200]), &mut full);
        let mut d = dec();
        // Offer every prefix shorter than the first header: nothing is consumed.
        for n in 0..18 {
            let mut b = BytesMut::from(&full[..n]);
            assert_eq!(d.decode(&mut b).unwrap(), None);
            assert_eq!(b.len(), n, "prefix {n}");
        }
        assert_eq!(d.bytes_received(), 0);
        let got = drain(&mut d, &mut full).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(d.bytes_received(), 3 + 11 + 4 + 200 + 3 + 4);
    }

    #[test]
    fn extended_timestamp_on_continuation_with_and_without_repeat() {
        let body: Vec<u8> = (0..=255).collect();
        let with = {
            let mut b = BytesMut::new();
            encode_fmt0(3, &msg(9, 0xff_ffff, 1, &body), 128, &mut b);
            b
        };
        // The same message as librtmp 2.3 sends it: no repeat on the continuation.
        let mut without = BytesMut::new();
        without.extend_from_slice(&with[..12 + 4 + 128]);
        without.put_u8(0xc3);
        without.extend_from_slice(&body[128..]);
        for mut b in [with, without] {
            let m = drain(&mut dec(), &mut b).unwrap();
            assert_eq!(m, vec![msg(9, 0xff_ffff, 1, &body)]);
        }
    }

    #[test]
    fn timestamp_deltas_wrap() {
        let mut b = BytesMut::new();
        b.put_slice(&[0x04, 0xff, 0xff, 0xff, 0, 0, 1, 8, 1, 0, 0, 0]);
        b.put_u32(0xffff_fff0);
        b.put_u8(b'a');
        // fmt 2, delta 0x20 -> wraps to 0x10.
        b.put_slice(&[0x84, 0, 0, 0x20, b'b']);
        // fmt 2 with an extended delta of 0xffff_ffff -> 0x0f.
        b.put_slice(&[0x84, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, b'c']);
        // fmt 3 new message reuses the extended delta (4 bytes read again).
        b.put_slice(&[0xc4, 0xff, 0xff, 0xff, 0xff, b'd']);
        let m = drain(&mut dec(), &mut b).unwrap();
        let ts: Vec<u32> = m.iter().map(|m| m.timestamp).collect();
        assert_eq!(ts, vec![0xffff_fff0, 0x10, 0x0f, 0x0e]);
        assert!(b.is_empty());
    }

    /// A 200-byte message on csid 4, its first 128-byte chunk, then Set Chunk Size
    /// on csid 2, then the rest in chunks of the new size.
    fn chunk_size_change_mid_message(new_size: u32) -> Vec<Message> {
        let body = [0x5a; 200];
        let mut b = BytesMut::new();
        b.put_slice(&[0x04, 0, 0, 0, 0, 0, 200, 9, 1, 0, 0, 0]);
        b.put_slice(&body[..128]);
        encode_fmt0(2, &message::set_chunk_size(new_size), 128, &mut b);
        for c in body[128..].chunks(new_size as usize) {
            b.put_u8(0xc4);
            b.put_slice(c);
        }
        let mut d = dec();
        let v = drain(&mut d, &mut b).unwrap();
        assert!(b.is_empty());
        assert_eq!(d.chunk_size(), new_size);
        assert_eq!(v[1], msg(9, 0, 1, &body));
        v
    }

    #[test]
    fn chunk_size_change_while_partial_message_buffered() {
        for size in [1, 7, 64, 4096, 16 * 1024 * 1024] {
            let v = chunk_size_change_mid_message(size);
            assert_eq!(
                v[0].msg_type,
                message::SET_CHUNK_SIZE,
                "returned to the caller"
            );
        }
    }

    #[test]
    fn chunk_size_out_of_range() {
        for size in [0, 16 * 1024 * 1024 + 1, 0x7fff_ffff] {
            let mut b = BytesMut::new();
            encode_fmt0(2, &message::set_chunk_size(size), 128, &mut b);
            let e = dec().decode(&mut b).unwrap_err();
            assert!(matches!(e, ChunkError::ChunkSizeOutOfRange { .. }), "{e}");
        }
    }

    #[test]
    fn abort_discards_partial_message() {
        let mut b = BytesMut::new();
        b.put_slice(&[0x05, 0, 0, 0, 0, 1, 0, 9, 1, 0, 0, 0]); // 256 bytes declared
        b.put_slice(&[1; 128]);
        encode_fmt0(2, &message::abort(5), 128, &mut b);
        b.put_slice(&[0x05, 0, 0, 1, 0, 0, 1, 8, 1, 0, 0, 0, b'z']);
        let mut d = dec();
        let v = drain(&mut d, &mut b).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].msg_type, message::ABORT);
        assert_eq!(v[1], msg(8, 1, 1, b"z"));
        assert_eq!(d.partial_bytes(), 0);
    }

    #[test]
    fn declared_16mib_never_sent_allocates_nothing() {
        let mut b = BytesMut::from(&[0x04, 0, 0, 0, 0xff, 0xff, 0xff, 9, 1, 0, 0, 0, 1, 2, 3][..]);
        let mut d = dec();
        assert_eq!(d.decode(&mut b).unwrap(), None);
        let s = &d.streams[0];
        assert_eq!(s.head.msg_len, 0xff_ffff);
        assert!(s.body.capacity() < 1024, "capacity {}", s.body.capacity());
        assert_eq!(d.partial_bytes(), 3);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = ChunkLimits {
            max_message_len: 1000,
            max_chunk_streams: 2,
            max_partial_bytes: 300,
            ..small_chunks()
        };
        let mut b = BytesMut::from(&[0x04, 0, 0, 0, 0, 0x03, 0xe9, 9, 1, 0, 0, 0][..]);
        let e = ChunkDecoder::new(limits).decode(&mut b).unwrap_err();
        assert!(
            matches!(e, ChunkError::MessageTooLong { len: 1001, .. }),
            "{e}"
        );
        let mut b = BytesMut::new();
        for csid in 3..6 {
            b.put_slice(&[csid, 0, 0, 0, 0, 0, 200, 9, 1, 0, 0, 0]);
            b.put_slice(&[0; 128]);
        }
        let mut d = ChunkDecoder::new(ChunkLimits {
            max_partial_bytes: 300,
            ..small_chunks()
        });
        let e = drain(&mut d, &mut b).unwrap_err();
        assert!(
            matches!(e, ChunkError::PartialBytesExceeded { limit: 300 }),
            "{e}"
        );
        let mut b = BytesMut::new();
        for csid in 3..6 {
            b.put_slice(&[csid, 0, 0, 0, 0, 0, 1, 9, 1, 0, 0, 0, 0]);
        }
        let e = drain(&mut ChunkDecoder::new(limits), &mut b).unwrap_err();
        assert!(
            matches!(e, ChunkError::TooManyChunkStreams { csid: 5, .. }),
            "{e}"
        );
    }

    #[test]
    fn new_header_inside_message_is_refused() {
        let mut b = BytesMut::from(&[0x04, 0, 0, 0, 0, 1, 0, 9, 1, 0, 0, 0][..]);
        b.put_slice(&[0; 128]);
        b.put_slice(&[0x84, 0, 0, 0]);
        let e = drain(&mut dec(), &mut b).unwrap_err();
        assert!(matches!(e, ChunkError::HeaderInsideMessage { .. }), "{e}");
    }

    #[test]
    fn body_capacity_never_exceeds_declared_length() {
        for len in [1usize, 127, 128, 129, 1000, 100_000, 1 << 20] {
            let mut body = Vec::new();
            let mut charge = budget(usize::MAX).empty();
            let data = vec![1u8; len];
            for c in data.chunks(128) {
                append(&mut body, c, len as u32, &mut charge).unwrap();
                assert_eq!(charge.bytes(), body.capacity());
                assert!(
                    body.capacity() <= len,
                    "len {len}: capacity {}",
                    body.capacity()
                );
                assert!(body.capacity() <= 2 * body.len().max(128), "len {len}");
            }
            assert_eq!(body.len(), len);
        }
    }

    #[test]
    fn zero_length_messages() {
        let mut e = ChunkEncoder::new();
        let mut b = BytesMut::new();
        for ts in [0, 10, 20, 30] {
            e.write(3, &msg(18, ts, 1, b""), &mut b);
        }
        let v = drain(&mut dec(), &mut b).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3].timestamp, 30);
    }

    #[test]
    fn chunk_size_one_is_linear() {
        // A 1 MiB message at chunk size 1: 2 MiB on the wire, one pass, one message.
        let big = vec![9u8; 1 << 20];
        let mut b = BytesMut::new();
        encode_fmt0(2, &message::set_chunk_size(1), 128, &mut b);
        encode_fmt0(4, &msg(9, 0, 1, &big), 1, &mut b);
        let mut d = dec();
        let v = drain(&mut d, &mut b).unwrap();
        assert_eq!(v[1].payload.len(), 1 << 20);
        assert_eq!(d.chunks_received(), 1 + (1 << 20));
    }

    /// Decodes a captured chunk stream in pieces of every size from 1 to 64 bytes and
    /// checks that each split yields the same messages as decoding it whole.
    fn decode_capture(bytes: &[u8]) -> Vec<Message> {
        let mut whole = BytesMut::from(bytes);
        let mut d = dec();
        let msgs = drain(&mut d, &mut whole).unwrap();
        for step in 1..=64 {
            let mut d = dec();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in bytes.chunks(step) {
                buf.extend_from_slice(piece);
                got.extend(drain(&mut d, &mut buf).unwrap());
            }
            assert_eq!(got, msgs, "step {step}");
        }
        msgs
    }

    #[test]
    fn captured_ffmpeg_publish() {
        // ffmpeg 5.1 publishing to nginx-rtmp: the first 8 KiB after the handshake.
        let msgs = decode_capture(include_bytes!("../../fuzz/corpus/chunk/ffmpeg-publish-c2s"));
        let limits = crate::amf0::AmfLimits::default();
        let names: Vec<String> = msgs
            .iter()
            .filter_map(|m| message::decode_command(m, &limits).ok())
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            [
                "connect",
                "releaseStream",
                "FCPublish",
                "createStream",
                "publish"
            ]
        );
        assert!(msgs.iter().any(|m| m.msg_type == message::SET_CHUNK_SIZE));
        let meta = msgs
            .iter()
            .find(|m| m.msg_type == message::DATA_AMF0)
            .unwrap();
        let v = message::decode_amf_payload(meta, &limits).unwrap();
        assert_eq!(v[0].as_str(), Some("@setDataFrame"));
        assert_eq!(v[1].as_str(), Some("onMetaData"));
        assert!(msgs
            .iter()
            .any(|m| m.msg_type == message::VIDEO && m.stream_id == 1));
    }

    #[test]
    fn captured_nginx_play() {
        // nginx-rtmp answering and streaming to rtmpdump (chunk size 4000 on its side).
        let msgs = decode_capture(include_bytes!(
            "../../fuzz/corpus/chunk/nginx-to-rtmpdump-s2c"
        ));
        let limits = crate::amf0::AmfLimits::default();
        let codes: Vec<String> = msgs
            .iter()
            .filter_map(|m| message::decode_command(m, &limits).ok())
            .filter_map(|c| {
                c.arg(0)
                    .and_then(|a| a.get("code"))
                    .and_then(|c| c.as_str())
                    .map(str::to_owned)
            })
            .collect();
        assert!(
            codes.iter().any(|c| c == "NetConnection.Connect.Success"),
            "{codes:?}"
        );
        assert!(
            codes.iter().any(|c| c == "NetStream.Play.Start"),
            "{codes:?}"
        );
        assert!(msgs.iter().any(|m| Control::decode(m)
            == Ok(Some(Control::UserControl(
                message::UserControl::StreamBegin(1)
            )))));
    }

    // ---- property tests ----

    #[derive(Debug, Clone)]
    struct Case {
        chunk_sizes: Vec<u32>,
        rounds: Vec<Vec<(u32, Message)>>,
        splits: Vec<usize>,
        interleave_seed: u64,
    }

    fn arb_ts() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..5000,
            0xff_fff0u32..0x100_0010,
            any::<u32>(),
            Just(0xff_ffff),
        ]
    }

    fn arb_msg() -> impl Strategy<Value = Message> {
        (
            prop::sample::select(vec![8u8, 9, 18, 20, 15]),
            arb_ts(),
            0u32..3,
            prop::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(|(t, ts, sid, p)| Message::new(t, ts, sid, p))
    }

    fn arb_case() -> impl Strategy<Value = Case> {
        let csid = prop::sample::select(vec![3u32, 4, 5, 63, 64, 319, 320, 65599]);
        (
            prop::collection::vec(1u32..700, 1..4),
            prop::collection::vec(
                prop::collection::btree_map(csid, arb_msg(), 1..4)
                    .prop_map(|m| m.into_iter().collect::<Vec<_>>()),
                1..6,
            ),
            prop::collection::vec(1usize..300, 0..40),
            any::<u64>(),
        )
            .prop_map(|(chunk_sizes, rounds, splits, interleave_seed)| Case {
                chunk_sizes,
                rounds,
                splits,
                interleave_seed,
            })
    }

    /// Encodes the case: per round, a Set Chunk Size, then the round's messages (on
    /// distinct chunk streams) with their chunks interleaved pseudo-randomly.
    fn encode_case(c: &Case) -> (Bytes, Vec<Message>) {
        let mut enc = ChunkEncoder::new();
        let mut out = BytesMut::new();
        let mut expected = Vec::new();
        let mut seed = c.interleave_seed | 1;
        for (i, round) in c.rounds.iter().enumerate() {
            let size = c.chunk_sizes[i % c.chunk_sizes.len()];
            let scs = message::set_chunk_size(size);
            enc.write(2, &scs, &mut out);
            expected.push(scs);
            // Each message's chunks, split at the encoder's chunk boundaries.
            let mut lists: Vec<Vec<Bytes>> = Vec::new();
            for (csid, m) in round {
                let mut tmp = BytesMut::new();
                let mut ends = Vec::new();
                enc.write_with(*csid, m, &mut tmp, |e| ends.push(e));
                let tmp = tmp.freeze();
                let mut start = 0;
                let mut pieces = Vec::new();
                for e in ends {
                    pieces.push(tmp.slice(start..e));
                    start = e;
                }
                lists.push(pieces);
            }
            let mut pos = vec![0usize; lists.len()];
            let mut done = vec![false; lists.len()];
            while pos.iter().zip(&lists).any(|(p, l)| *p < l.len()) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let live: Vec<usize> = (0..lists.len())
                    .filter(|&k| pos[k] < lists[k].len())
                    .collect();
                let k = live[(seed % live.len() as u64) as usize];
                out.put_slice(&lists[k][pos[k]]);
                pos[k] += 1;
                if pos[k] == lists[k].len() && !done[k] {
                    done[k] = true;
                    expected.push(round[k].1.clone());
                }
            }
        }
        (out.freeze(), expected)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn chunk_roundtrip(c in arb_case()) {
            let (bytes, expected) = encode_case(&c);
            let mut d = dec();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            let mut splits = c.splits.iter().cycle();
            while at < bytes.len() {
                let n = (*splits.next().unwrap_or(&bytes.len())).min(bytes.len() - at);
                buf.put_slice(&bytes[at..at + n]);
                at += n;
                while let Some(m) = d.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(d.bytes_received(), bytes.len() as u64);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(d.partial_bytes(), 0);
        }

        #[test]
        fn fmt0_shared_bytes_decode(m in arb_msg(), size in 1u32..1000) {
            let mut b = BytesMut::new();
            encode_fmt0(2, &message::set_chunk_size(size), 128, &mut b);
            encode_fmt0(6, &m, size, &mut b);
            let v = drain(&mut dec(), &mut b).unwrap();
            prop_assert_eq!(&v[1], &m);
        }

        /// Extended timestamps with and without the 4 bytes repeated on continuation
        /// chunks (librtmp 2.3 style) decode the same, whatever the split points.
        #[test]
        fn extended_timestamp_without_repeat(
            ts in 0xff_ffffu32..,
            payload in prop::collection::vec(any::<u8>(), 1..1000),
            size in 1u32..300,
            step in 1usize..50,
        ) {
            let ext = ts.to_be_bytes();
            // A continuation whose next 4 bytes equal the timestamp itself is ambiguous.
            let m = Message::new(9, ts, 1, payload.clone());
            let mut with = BytesMut::new();
            encode_fmt0(2, &message::set_chunk_size(size), 128, &mut with);
            let mut without = with.clone();
            encode_fmt0(5, &m, size, &mut with);
            without.put_slice(&[0x05, 0xff, 0xff, 0xff]);
            without.put_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            without.put_slice(&[9, 1, 0, 0, 0]);
            without.put_slice(&ext);
            let mut after_headers = Vec::new();
            for (i, c) in payload.chunks(size as usize).enumerate() {
                if i > 0 {
                    without.put_u8(0xc5);
                    after_headers.push(without.len());
                }
                without.put_slice(c);
            }
            // A short message on another chunk stream follows, as media would.
            let next = Message::new(8, 0, 1, vec![0xaf]);
            encode_fmt0(7, &next, size, &mut with);
            encode_fmt0(7, &next, size, &mut without);
            prop_assume!(after_headers.iter().all(|&at| without[at..].get(..4) != Some(&ext[..])));
            for bytes in [with, without] {
                let mut d = dec();
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for piece in bytes.chunks(step) {
                    buf.put_slice(piece);
                    got.extend(drain(&mut d, &mut buf).unwrap());
                }
                prop_assert_eq!(got.len(), 3);
                prop_assert_eq!(&got[1], &m);
                prop_assert_eq!(&got[2], &next);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..2048)) {
            let limits = ChunkLimits { max_partial_bytes: 4096, ..small_chunks() };
            let mut d = ChunkDecoder::new(limits);
            let mut buf = BytesMut::from(&b[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }
}
