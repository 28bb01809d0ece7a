//! A pass-through chunk-stream parser for the relay: follows a client's chunk headers
//! without copying media, and hands out only the messages the relay must read.
//!
//! The connect-aware relay forwards the client's bytes unchanged, so it does not need
//! [`crate::rtmp::chunk::ChunkDecoder`]'s reassembly of every message (a copy of every
//! media byte). [`ChunkScanner`] parses each chunk header exactly as that decoder does
//! (the same fmt 3 extended-timestamp rule, Set Chunk Size, Abort and limits, so the two
//! never disagree on where a chunk ends), skips the payload of audio, video and data
//! messages, and keeps the bodies of command messages (types 17 and 20) and of the
//! protocol control messages it must apply (Set Chunk Size, Abort). Those bodies are
//! bounded by `limits.max_message_len` and charged to the memory budget before they grow.
//!
//! Cost per chunk: one header parse (at most 18 bytes); per media byte: nothing but an
//! index advance.

use crate::budget::Charge;
use crate::limits::Limits;
use crate::rtmp::chunk::{
    apply_abort, parse_chunk_header, ChunkError, ChunkHeader, ChunkLimits, ChunkStreamHead,
    ChunkStreamState, HeaderLimits, PeerChunkSize,
};
use crate::rtmp::message::{Message, ABORT, COMMAND_AMF0, COMMAND_AMF3, SET_CHUNK_SIZE};

/// The longest chunk header: 3 basic + 11 message + 4 extended timestamp bytes.
const MAX_HEADER: usize = 18;

/// Whether the relay keeps a message's body.
fn wanted(msg_type: u8) -> bool {
    matches!(
        msg_type,
        COMMAND_AMF0 | COMMAND_AMF3 | SET_CHUNK_SIZE | ABORT
    )
}

#[derive(Debug)]
struct Cs {
    head: ChunkStreamHead,
    /// Payload bytes of the message in progress still due.
    due: u32,
    /// The body of a wanted message in progress.
    body: Vec<u8>,
}

impl ChunkStreamState for Cs {
    fn head(&self) -> &ChunkStreamHead {
        &self.head
    }
    fn head_mut(&mut self) -> &mut ChunkStreamHead {
        &mut self.head
    }
    fn received(&self) -> usize {
        self.head.msg_len.saturating_sub(self.due) as usize
    }
    fn take_body(&mut self) -> Vec<u8> {
        self.due = 0;
        std::mem::take(&mut self.body)
    }
}

type Header = ChunkHeader;

/// Follows one direction of a chunk stream; see the module documentation.
#[derive(Debug)]
pub struct ChunkScanner {
    chunk_size: PeerChunkSize,
    header_limits: HeaderLimits,
    streams: Vec<Cs>,
    /// The chunk whose payload is passing: stream index, payload bytes left in the chunk.
    current: Option<(usize, u32)>,
    /// The start of a header split across reads.
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// Capacity of the kept bodies, held from the memory budget.
    charge: Charge,
    bytes: u64,
}

impl ChunkScanner {
    /// A scanner whose kept bodies are charged to `charge` (a connection's charge).
    pub fn new(limits: &Limits, charge: Charge) -> Self {
        let limits = ChunkLimits::from(limits);
        ChunkScanner {
            chunk_size: PeerChunkSize::new(&limits),
            header_limits: HeaderLimits::from(&limits),
            streams: Vec::new(),
            current: None,
            head: [0; MAX_HEADER],
            head_len: 0,
            charge,
            bytes: 0,
        }
    }

    /// Bytes scanned so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Scans `input` until a kept command message completes or the input ends. Returns how
    /// many bytes were consumed (the command, if any, ends exactly there) and the command.
    /// Set Chunk Size and Abort are applied and not returned.
    pub fn scan(&mut self, input: &[u8]) -> Result<(usize, Option<Message>), ChunkError> {
        let mut pos = 0usize;
        loop {
            if let Some((idx, left)) = self.current {
                let rest = input.get(pos..).unwrap_or_default();
                if rest.is_empty() {
                    break;
                }
                let n = (left as usize).min(rest.len());
                let Some(s) = self.streams.get_mut(idx) else {
                    self.current = None;
                    continue;
                };
                if wanted(s.head.msg_type) {
                    let grow = (s.body.len() + n).saturating_sub(s.body.capacity());
                    if grow > 0 {
                        // Bodies grow to exactly what arrived (commands are small).
                        self.charge
                            .try_grow(grow)
                            .map_err(|budget| ChunkError::OverBudget {
                                csid: s.head.csid,
                                len: s.head.msg_len,
                                budget,
                            })?;
                        s.body.reserve_exact(grow);
                    }
                    s.body.extend_from_slice(rest.get(..n).unwrap_or_default());
                }
                pos += n;
                s.due = s.due.saturating_sub(n as u32);
                let left = left - n as u32;
                if left > 0 {
                    self.current = Some((idx, left));
                    break;
                }
                self.current = None;
                if s.due == 0 {
                    if let Some(m) = self.complete(idx)? {
                        self.bytes += pos as u64;
                        return Ok((pos, Some(m)));
                    }
                }
                continue;
            }
            // A header: finish the one split across reads, or parse a new one in place.
            let rest = input.get(pos..).unwrap_or_default();
            let h = if self.head_len > 0 {
                let had = self.head_len;
                let take = (MAX_HEADER - had).min(rest.len());
                let mut tmp = self.head;
                tmp[had..had + take].copy_from_slice(&rest[..take]);
                match parse_chunk_header(&tmp[..had + take], &self.streams, self.header_limits)? {
                    Some(h) => {
                        self.head_len = 0;
                        pos += h.len - had;
                        h
                    }
                    None => {
                        self.head = tmp;
                        self.head_len = had + take;
                        pos += take;
                        break;
                    }
                }
            } else {
                if rest.is_empty() {
                    break;
                }
                match parse_chunk_header(rest, &self.streams, self.header_limits)? {
                    Some(h) => {
                        pos += h.len;
                        h
                    }
                    None => {
                        // Shorter than MAX_HEADER, or the parse would have decided.
                        let n = rest.len().min(MAX_HEADER);
                        self.head[..n].copy_from_slice(&rest[..n]);
                        self.head_len = n;
                        pos += n;
                        break;
                    }
                }
            };
            let idx = self.apply_header(h);
            let Some(s) = self.streams.get(idx) else {
                continue;
            };
            if s.due == 0 {
                if let Some(m) = self.complete(idx)? {
                    self.bytes += pos as u64;
                    return Ok((pos, Some(m)));
                }
                continue;
            }
            let chunk = s.due.min(self.chunk_size.get());
            self.current = Some((idx, chunk));
        }
        self.bytes += pos as u64;
        Ok((pos, None))
    }

    fn apply_header(&mut self, h: Header) -> usize {
        let idx = match h.idx {
            Some(i) => i,
            None => {
                self.streams.push(Cs {
                    head: ChunkStreamHead::new(h.csid),
                    due: 0,
                    body: Vec::new(),
                });
                self.streams.len() - 1
            }
        };
        let Some(s) = self.streams.get_mut(idx) else {
            return idx;
        };
        if s.head.apply(&h) {
            s.due = h.msg_len;
        }
        idx
    }

    /// Ends the message on stream `idx`: applies Set Chunk Size and Abort, hands out a
    /// command.
    fn complete(&mut self, idx: usize) -> Result<Option<Message>, ChunkError> {
        let Some(s) = self.streams.get_mut(idx) else {
            return Ok(None);
        };
        s.head.in_progress = false;
        if !wanted(s.head.msg_type) {
            return Ok(None);
        }
        let body = std::mem::take(&mut s.body);
        self.charge.shrink(body.capacity());
        let msg = Message::new(s.head.msg_type, 0, s.head.stream_id, body);
        match msg.msg_type {
            SET_CHUNK_SIZE => {
                self.chunk_size.set(&msg.payload)?;
                Ok(None)
            }
            ABORT => {
                apply_abort(&msg.payload, &mut self.streams, &mut self.charge)?;
                Ok(None)
            }
            _ => Ok(Some(msg)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::amf0::Amf0Value;
    use crate::rtmp::chunk::{ChunkDecoder, ChunkEncoder};
    use crate::rtmp::message::{self, command_message, set_chunk_size, AUDIO, VIDEO};
    use bytes::BytesMut;
    use rand::{Rng, SeedableRng};

    /// A client's chunk stream: connect, chunk size changes, media with extended
    /// timestamps, commands between the media, an empty message.
    fn sample() -> (Vec<u8>, Vec<Message>) {
        let mut enc = ChunkEncoder::new();
        let mut out = BytesMut::new();
        let mut msgs = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let connect = command_message(
            0,
            "connect",
            1.0,
            &[Amf0Value::object([("app", Amf0Value::string("live"))])],
        );
        enc.write(3, &connect, &mut out);
        msgs.push(connect);
        let scs = set_chunk_size(4096);
        enc.write(2, &scs, &mut out);
        enc.set_chunk_size(4096);
        for i in 0..200u32 {
            // Past 2^24 ms the timestamps need the extended field.
            let ts = 0xFF_FF00u32.wrapping_add(i * 40);
            let len = rng.gen_range(0..20_000);
            let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let kind = if i % 3 == 0 { AUDIO } else { VIDEO };
            enc.write(
                if kind == AUDIO { 4 } else { 6 },
                &Message::new(kind, ts, 1, payload),
                &mut out,
            );
            if i % 50 == 7 {
                let play =
                    command_message(1, "play", 0.0, &[Amf0Value::Null, Amf0Value::string("s")]);
                enc.write(8, &play, &mut out);
                msgs.push(play);
            }
        }
        (out.to_vec(), msgs)
    }

    fn commands_by_decoder(bytes: &[u8]) -> Vec<Message> {
        let mut d = ChunkDecoder::new(&Limits::default());
        let mut buf = BytesMut::from(bytes);
        let mut got = Vec::new();
        while let Some(m) = d.decode(&mut buf).unwrap() {
            if matches!(m.msg_type, COMMAND_AMF0 | COMMAND_AMF3) {
                got.push(Message::new(m.msg_type, 0, m.stream_id, m.payload));
            }
        }
        assert!(buf.is_empty());
        got
    }

    #[test]
    fn finds_the_commands_the_decoder_finds_whatever_the_read_sizes() {
        let (bytes, _) = sample();
        let want = commands_by_decoder(&bytes);
        assert_eq!(want.len(), 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..20 {
            let mut s = ChunkScanner::new(&Limits::default(), crate::budget::Charge::global());
            let mut got = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let n = if round == 0 {
                    1
                } else {
                    rng.gen_range(1..3000)
                };
                let end = (at + n).min(bytes.len());
                let mut piece = &bytes[at..end];
                while !piece.is_empty() {
                    let (used, m) = s.scan(piece).unwrap();
                    assert!(used <= piece.len());
                    if let Some(m) = m {
                        got.push(m);
                    } else {
                        assert_eq!(used, piece.len(), "stopped without a command");
                    }
                    piece = &piece[used..];
                }
                at = end;
            }
            assert_eq!(got, want, "round {round}");
            assert_eq!(s.bytes(), bytes.len() as u64);
        }
    }

    #[test]
    fn a_command_ends_exactly_where_it_is_returned() {
        let (bytes, _) = sample();
        let mut s = ChunkScanner::new(&Limits::default(), crate::budget::Charge::global());
        let (used, m) = s.scan(&bytes).unwrap();
        let m = m.unwrap();
        // The connect is the first message: the decoder needs exactly those bytes for it.
        let mut d = ChunkDecoder::new(&Limits::default());
        let mut buf = BytesMut::from(&bytes[..used]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap().payload, m.payload);
        assert!(buf.is_empty());
    }

    #[test]
    fn abort_drops_the_command_in_progress_as_the_decoder_does() {
        // A play cut off after its first chunk on chunk stream 8, aborted, then a pause on the
        // same chunk stream whose fmt 1 header leaves out the stream id the aborted one set.
        let long = "s".repeat(300);
        let play = command_message(1, "play", 0.0, &[Amf0Value::Null, Amf0Value::string(&long)]);
        let mut whole = BytesMut::new();
        ChunkEncoder::new().write(8, &play, &mut whole);
        let mut bytes = whole[..12 + 128].to_vec();
        let mut abort = BytesMut::new();
        ChunkEncoder::new().write(2, &message::abort(8), &mut abort);
        bytes.extend_from_slice(&abort);
        let aborted_at = bytes.len();
        let pause = command_message(1, "pause", 0.0, &[Amf0Value::Null]);
        let len = u32::try_from(pause.payload.len()).unwrap().to_be_bytes();
        bytes.extend_from_slice(&[0x48, 0, 0, 0, len[1], len[2], len[3], COMMAND_AMF0]);
        bytes.extend_from_slice(&pause.payload);
        let want = commands_by_decoder(&bytes);
        assert_eq!(want.len(), 1);
        assert_eq!(want[0].payload, pause.payload);
        let mut s = ChunkScanner::new(&Limits::default(), crate::budget::Charge::global());
        assert_eq!(s.scan(&bytes[..aborted_at]).unwrap(), (aborted_at, None));
        assert_eq!(s.charge.bytes(), 0, "the aborted body is given back");
        let (used, got) = s.scan(&bytes[aborted_at..]).unwrap();
        assert_eq!(used, bytes.len() - aborted_at);
        assert_eq!(got.as_ref(), want.first());
    }

    #[test]
    fn refuses_what_the_decoder_refuses() {
        let limits = Limits::default();
        // A fmt 1 chunk on a chunk stream never opened.
        let mut s = ChunkScanner::new(&limits, crate::budget::Charge::global());
        assert!(s.scan(&[0x43, 0, 0, 0, 0, 0, 4, 20]).is_err());
        // A message longer than limits.max_message_len.
        let small = Limits {
            max_message_len: 1000,
            ..Limits::default()
        };
        let mut s = ChunkScanner::new(&small, crate::budget::Charge::global());
        let mut h = vec![0x03, 0, 0, 0, 0xff, 0xff, 0xff, 20, 0, 0, 0, 0];
        h.truncate(12);
        let e = s.scan(&h).unwrap_err();
        assert!(matches!(e, ChunkError::MessageTooLong { .. }), "{e}");
        // A chunk size below limits.min_chunk_size.
        let mut s = ChunkScanner::new(&limits, crate::budget::Charge::global());
        let mut out = BytesMut::new();
        ChunkEncoder::new().write(2, &set_chunk_size(1), &mut out);
        assert!(matches!(
            s.scan(&out).unwrap_err(),
            ChunkError::ChunkSizeOutOfRange { .. }
        ));
    }
}
