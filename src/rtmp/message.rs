//! RTMP messages: types, protocol control messages and user control events.
//!
//! Protocol control messages (types 1-6) travel on chunk stream 2, message stream 0,
//! timestamp 0; the builders here fill those in. Parsers check the payload length before
//! reading, and every error says which message was malformed.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::amf0::{self, Amf0Value, AmfError, AmfLimits};

pub const SET_CHUNK_SIZE: u8 = 1;
pub const ABORT: u8 = 2;
pub const ACK: u8 = 3;
pub const USER_CONTROL: u8 = 4;
pub const WINDOW_ACK_SIZE: u8 = 5;
pub const SET_PEER_BANDWIDTH: u8 = 6;
pub const AUDIO: u8 = 8;
pub const VIDEO: u8 = 9;
pub const DATA_AMF3: u8 = 15;
pub const SHARED_OBJECT_AMF3: u8 = 16;
pub const COMMAND_AMF3: u8 = 17;
pub const DATA_AMF0: u8 = 18;
pub const SHARED_OBJECT_AMF0: u8 = 19;
pub const COMMAND_AMF0: u8 = 20;
pub const AGGREGATE: u8 = 22;

/// The chunk stream protocol control messages are sent on.
pub const CONTROL_CSID: u32 = 2;

/// One RTMP message, as reassembled from chunks or about to be chunked.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Message {
    pub msg_type: u8,
    /// Absolute timestamp in milliseconds (wraps at 2^32).
    pub timestamp: u32,
    /// Message stream id (0 for the connection, else a stream from createStream).
    pub stream_id: u32,
    pub payload: Bytes,
}

impl Message {
    pub fn new(msg_type: u8, timestamp: u32, stream_id: u32, payload: impl Into<Bytes>) -> Self {
        Message {
            msg_type,
            timestamp,
            stream_id,
            payload: payload.into(),
        }
    }

    /// A protocol control message: stream 0, timestamp 0.
    fn control(msg_type: u8, payload: &[u8]) -> Self {
        Message::new(msg_type, 0, 0, Bytes::copy_from_slice(payload))
    }
}

/// Why a message could not be interpreted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    #[error("RTMP {what} message has {len} payload bytes, needs at least {need}")]
    TooShort {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("RTMP Set Peer Bandwidth limit type {0} is not 0 (hard), 1 (soft) or 2 (dynamic)")]
    BadLimitType(u8),
    #[error("RTMP message type {0} is not a command (expected 17 or 20)")]
    NotACommand(u8),
    #[error("RTMP command does not start with a name string and a transaction number")]
    BadCommand,
    #[error("RTMP command payload: {0}")]
    Amf(#[from] AmfError),
    #[error("RTMP aggregate message: sub-message at offset {at} {why}")]
    BadAggregate { at: usize, why: &'static str },
}

fn need(what: &'static str, p: &[u8], n: usize) -> Result<(), MessageError> {
    if p.len() < n {
        return Err(MessageError::TooShort {
            what,
            len: p.len(),
            need: n,
        });
    }
    Ok(())
}

fn be32(what: &'static str, p: &[u8]) -> Result<u32, MessageError> {
    need(what, p, 4)?;
    Ok(u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
}

/// Set Chunk Size: the most significant bit must be zero, so it is masked off.
pub fn set_chunk_size(n: u32) -> Message {
    Message::control(SET_CHUNK_SIZE, &(n & 0x7fff_ffff).to_be_bytes())
}
/// The chunk size in a Set Chunk Size payload (top bit ignored).
pub fn parse_set_chunk_size(payload: &[u8]) -> Result<u32, MessageError> {
    Ok(be32("Set Chunk Size", payload)? & 0x7fff_ffff)
}

/// Abort: drop the partially received message on chunk stream `csid`.
pub fn abort(csid: u32) -> Message {
    Message::control(ABORT, &csid.to_be_bytes())
}
pub fn parse_abort(payload: &[u8]) -> Result<u32, MessageError> {
    be32("Abort", payload)
}

/// Acknowledgement: total bytes received so far (wrapping).
pub fn acknowledgement(seq: u32) -> Message {
    Message::control(ACK, &seq.to_be_bytes())
}
pub fn parse_acknowledgement(payload: &[u8]) -> Result<u32, MessageError> {
    be32("Acknowledgement", payload)
}

/// Window Acknowledgement Size: send an Acknowledgement every `n` bytes.
pub fn window_ack_size(n: u32) -> Message {
    Message::control(WINDOW_ACK_SIZE, &n.to_be_bytes())
}
pub fn parse_window_ack_size(payload: &[u8]) -> Result<u32, MessageError> {
    be32("Window Acknowledgement Size", payload)
}

/// Limit type of Set Peer Bandwidth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitType {
    Hard = 0,
    Soft = 1,
    Dynamic = 2,
}

pub fn set_peer_bandwidth(n: u32, limit_type: LimitType) -> Message {
    let mut p = [0u8; 5];
    p[..4].copy_from_slice(&n.to_be_bytes());
    p[4] = limit_type as u8;
    Message::control(SET_PEER_BANDWIDTH, &p)
}
pub fn parse_set_peer_bandwidth(payload: &[u8]) -> Result<(u32, LimitType), MessageError> {
    need("Set Peer Bandwidth", payload, 5)?;
    let n = be32("Set Peer Bandwidth", payload)?;
    let t = match payload[4] {
        0 => LimitType::Hard,
        1 => LimitType::Soft,
        2 => LimitType::Dynamic,
        other => return Err(MessageError::BadLimitType(other)),
    };
    Ok((n, t))
}

/// User Control events (message type 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserControl {
    StreamBegin(u32),
    StreamEof(u32),
    StreamDry(u32),
    SetBufferLength {
        stream_id: u32,
        ms: u32,
    },
    StreamIsRecorded(u32),
    PingRequest(u32),
    PingResponse(u32),
    /// An event this crate does not interpret (e.g. 0x1a SWF verification).
    Other {
        event: u16,
        data: Bytes,
    },
}

impl UserControl {
    pub const STREAM_BEGIN: u16 = 0;
    pub const STREAM_EOF: u16 = 1;
    pub const STREAM_DRY: u16 = 2;
    pub const SET_BUFFER_LENGTH: u16 = 3;
    pub const STREAM_IS_RECORDED: u16 = 4;
    pub const PING_REQUEST: u16 = 6;
    pub const PING_RESPONSE: u16 = 7;

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(10);
        let one = |b: &mut BytesMut, ev: u16, v: u32| {
            b.put_u16(ev);
            b.put_u32(v);
        };
        match self {
            UserControl::StreamBegin(s) => one(&mut b, Self::STREAM_BEGIN, *s),
            UserControl::StreamEof(s) => one(&mut b, Self::STREAM_EOF, *s),
            UserControl::StreamDry(s) => one(&mut b, Self::STREAM_DRY, *s),
            UserControl::SetBufferLength { stream_id, ms } => {
                one(&mut b, Self::SET_BUFFER_LENGTH, *stream_id);
                b.put_u32(*ms);
            }
            UserControl::StreamIsRecorded(s) => one(&mut b, Self::STREAM_IS_RECORDED, *s),
            UserControl::PingRequest(t) => one(&mut b, Self::PING_REQUEST, *t),
            UserControl::PingResponse(t) => one(&mut b, Self::PING_RESPONSE, *t),
            UserControl::Other { event, data } => {
                b.put_u16(*event);
                b.put_slice(data);
            }
        }
        b.freeze()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, MessageError> {
        need("User Control", payload, 2)?;
        let event = u16::from_be_bytes([payload[0], payload[1]]);
        let data = &payload[2..];
        let v = |d: &[u8]| be32("User Control", d);
        Ok(match event {
            Self::STREAM_BEGIN => UserControl::StreamBegin(v(data)?),
            Self::STREAM_EOF => UserControl::StreamEof(v(data)?),
            Self::STREAM_DRY => UserControl::StreamDry(v(data)?),
            Self::SET_BUFFER_LENGTH => {
                need("User Control SetBufferLength", data, 8)?;
                UserControl::SetBufferLength {
                    stream_id: v(data)?,
                    ms: v(&data[4..])?,
                }
            }
            Self::STREAM_IS_RECORDED => UserControl::StreamIsRecorded(v(data)?),
            Self::PING_REQUEST => UserControl::PingRequest(v(data)?),
            Self::PING_RESPONSE => UserControl::PingResponse(v(data)?),
            _ => UserControl::Other {
                event,
                data: Bytes::copy_from_slice(data),
            },
        })
    }

    /// The User Control message carrying this event.
    pub fn to_message(&self) -> Message {
        Message::new(USER_CONTROL, 0, 0, self.encode())
    }
}

/// A protocol control message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    SetChunkSize(u32),
    Abort(u32),
    Ack(u32),
    WindowAckSize(u32),
    SetPeerBandwidth { size: u32, limit: LimitType },
    UserControl(UserControl),
}

impl Control {
    /// Decodes types 1-6; `Ok(None)` for any other message type.
    pub fn decode(msg: &Message) -> Result<Option<Control>, MessageError> {
        let p = &msg.payload[..];
        Ok(Some(match msg.msg_type {
            SET_CHUNK_SIZE => Control::SetChunkSize(parse_set_chunk_size(p)?),
            ABORT => Control::Abort(parse_abort(p)?),
            ACK => Control::Ack(parse_acknowledgement(p)?),
            WINDOW_ACK_SIZE => Control::WindowAckSize(parse_window_ack_size(p)?),
            SET_PEER_BANDWIDTH => {
                let (size, limit) = parse_set_peer_bandwidth(p)?;
                Control::SetPeerBandwidth { size, limit }
            }
            USER_CONTROL => Control::UserControl(UserControl::decode(p)?),
            _ => return Ok(None),
        }))
    }

    pub fn to_message(&self) -> Message {
        match self {
            Control::SetChunkSize(n) => set_chunk_size(*n),
            Control::Abort(c) => abort(*c),
            Control::Ack(s) => acknowledgement(*s),
            Control::WindowAckSize(n) => window_ack_size(*n),
            Control::SetPeerBandwidth { size, limit } => set_peer_bandwidth(*size, *limit),
            Control::UserControl(u) => u.to_message(),
        }
    }
}

/// A decoded command (type 20, or type 17 with its leading format byte).
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub name: String,
    /// Transaction id; 0 for commands that expect no reply.
    pub txn: f64,
    /// Everything after the transaction id: the command object (usually Null or an
    /// Object) first, then the arguments. AMF3 values are converted to AMF0 where an
    /// equivalent exists ([`crate::amf3::Amf3Value::to_amf0`]).
    pub args: Vec<Amf0Value>,
}

impl Command {
    /// The command object (first value after the transaction id), if any.
    pub fn object(&self) -> Option<&Amf0Value> {
        self.args.first()
    }
    /// The `i`th argument after the command object.
    pub fn arg(&self, i: usize) -> Option<&Amf0Value> {
        self.args.get(i.checked_add(1)?)
    }
}

/// The body of a type 20 command: name, transaction id, then `values`.
pub fn command_payload(name: &str, txn: f64, values: &[Amf0Value]) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + name.len());
    Amf0Value::String(name.to_owned()).encode(&mut out);
    Amf0Value::Number(txn).encode(&mut out);
    for v in values {
        v.encode(&mut out);
    }
    out.freeze()
}

/// A type 20 command message on `stream_id`.
pub fn command_message(stream_id: u32, name: &str, txn: f64, values: &[Amf0Value]) -> Message {
    Message::new(
        COMMAND_AMF0,
        0,
        stream_id,
        command_payload(name, txn, values),
    )
}

/// Converts a value behind the AMF3 switch to AMF0, unless it holds object references,
/// which only resolve within the AMF3 value they came in.
fn unwrap_amf3(v: Amf0Value) -> Amf0Value {
    match v {
        Amf0Value::Amf3(a) if !a.has_reference() => a.to_amf0(),
        other => other,
    }
}

/// The AMF0 values of a type 17 or 18/20 body; type 15 and 17 bodies start with a format
/// byte (0 = AMF0), which is skipped.
pub fn decode_amf_payload(
    msg: &Message,
    limits: &AmfLimits,
) -> Result<Vec<Amf0Value>, MessageError> {
    let mut p = &msg.payload[..];
    if matches!(msg.msg_type, COMMAND_AMF3 | DATA_AMF3 | SHARED_OBJECT_AMF3)
        && p.first() == Some(&0)
    {
        p.advance(1);
    }
    let values = amf0::decode_all(p, limits)?;
    Ok(values.into_iter().map(unwrap_amf3).collect())
}

/// Decodes a command message (type 20, or type 17).
pub fn decode_command(msg: &Message, limits: &AmfLimits) -> Result<Command, MessageError> {
    if !matches!(msg.msg_type, COMMAND_AMF0 | COMMAND_AMF3) {
        return Err(MessageError::NotACommand(msg.msg_type));
    }
    let mut values = decode_amf_payload(msg, limits)?.into_iter();
    let name = match values.next() {
        Some(Amf0Value::String(s)) | Some(Amf0Value::LongString(s)) => s,
        _ => return Err(MessageError::BadCommand),
    };
    // Some clients omit the transaction id on notifications; treat it as 0.
    let txn = match values.next() {
        Some(Amf0Value::Number(n)) => n,
        None => 0.0,
        Some(_) => return Err(MessageError::BadCommand),
    };
    Ok(Command {
        name,
        txn,
        args: values.collect(),
    })
}

/// FLV tag header size inside an aggregate message.
const TAG_HEADER: usize = 11;

/// Splits an aggregate message (type 22) into its audio, video and data messages.
///
/// The body is a run of FLV tags (type, 24-bit size, 24+8-bit timestamp, 24-bit stream
/// id, data, 32-bit back pointer). Like ffmpeg and nginx-rtmp, timestamps are rebased:
/// the first tag takes the aggregate's timestamp and later tags keep their offset from
/// the first. The back pointer may be missing after the last tag.
pub fn split_aggregate(msg: &Message) -> Result<Vec<Message>, MessageError> {
    let p = &msg.payload;
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut first_ts: Option<u32> = None;
    while at < p.len() {
        let bad = |why| MessageError::BadAggregate { at, why };
        let h = p
            .get(at..at.saturating_add(TAG_HEADER))
            .ok_or(bad("has a truncated tag header"))?;
        let msg_type = h[0];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        if !matches!(msg_type, AUDIO | VIDEO | DATA_AMF0 | DATA_AMF3) {
            return Err(bad("is not audio, video or data"));
        }
        let start = at + TAG_HEADER;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= p.len())
            .ok_or(bad("is longer than the aggregate"))?;
        let base = *first_ts.get_or_insert(ts);
        out.push(Message {
            msg_type,
            timestamp: msg.timestamp.wrapping_add(ts.wrapping_sub(base)),
            stream_id: msg.stream_id,
            payload: p.slice(start..end),
        });
        // Skip the back pointer, tolerating its absence after the last tag.
        at = end.saturating_add(4).min(p.len());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::amf3::Amf3Value;

    #[test]
    fn control_builders_hand_checked() {
        let m = set_chunk_size(4096);
        assert_eq!((m.msg_type, m.stream_id, m.timestamp), (1, 0, 0));
        assert_eq!(&m.payload[..], &[0, 0, 0x10, 0]);
        assert_eq!(
            &set_chunk_size(u32::MAX).payload[..],
            &[0x7f, 0xff, 0xff, 0xff]
        );
        assert_eq!(&abort(5).payload[..], &[0, 0, 0, 5]);
        assert_eq!(&acknowledgement(0x01020304).payload[..], &[1, 2, 3, 4]);
        assert_eq!(
            &window_ack_size(2_500_000).payload[..],
            &[0, 0x26, 0x25, 0xa0]
        );
        let m = set_peer_bandwidth(2_500_000, LimitType::Dynamic);
        assert_eq!(&m.payload[..], &[0, 0x26, 0x25, 0xa0, 2]);
        for c in [
            Control::SetChunkSize(60000),
            Control::Abort(3),
            Control::Ack(9),
            Control::WindowAckSize(5_000_000),
            Control::SetPeerBandwidth {
                size: 1,
                limit: LimitType::Soft,
            },
            Control::UserControl(UserControl::PingRequest(77)),
        ] {
            assert_eq!(Control::decode(&c.to_message()).unwrap(), Some(c));
        }
        assert!(parse_set_chunk_size(&[0, 0, 1]).is_err());
        assert_eq!(
            parse_set_peer_bandwidth(&[0, 0, 0, 1, 3]),
            Err(MessageError::BadLimitType(3))
        );
    }

    #[test]
    fn user_control_hand_checked() {
        let u = UserControl::StreamBegin(1);
        assert_eq!(&u.encode()[..], &[0, 0, 0, 0, 0, 1]);
        let u = UserControl::SetBufferLength {
            stream_id: 1,
            ms: 3000,
        };
        assert_eq!(&u.encode()[..], &[0, 3, 0, 0, 0, 1, 0, 0, 0x0b, 0xb8]);
        for u in [
            UserControl::StreamBegin(1),
            UserControl::StreamEof(2),
            UserControl::StreamDry(3),
            UserControl::SetBufferLength {
                stream_id: 4,
                ms: 5,
            },
            UserControl::StreamIsRecorded(6),
            UserControl::PingRequest(7),
            UserControl::PingResponse(8),
            UserControl::Other {
                event: 0x1a,
                data: Bytes::from_static(&[1, 2]),
            },
        ] {
            assert_eq!(UserControl::decode(&u.encode()).unwrap(), u);
        }
        assert!(UserControl::decode(&[0]).is_err());
        assert!(UserControl::decode(&[0, 3, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn commands_amf0_and_amf3() {
        let limits = AmfLimits::default();
        let body = command_payload(
            "publish",
            5.0,
            &[
                Amf0Value::Null,
                Amf0Value::string("key"),
                Amf0Value::string("live"),
            ],
        );
        let m = Message::new(COMMAND_AMF0, 0, 1, body.clone());
        let c = decode_command(&m, &limits).unwrap();
        assert_eq!(c.name, "publish");
        assert_eq!(c.txn, 5.0);
        assert_eq!(c.arg(0).and_then(Amf0Value::as_str), Some("key"));
        assert_eq!(c.object(), Some(&Amf0Value::Null));
        // Type 17: a format byte, then AMF0 with an AMF3 switch for one argument.
        let mut b = BytesMut::new();
        b.put_u8(0);
        b.put_slice(&body[..body.len() - 7]); // drop the "live" string
        Amf0Value::Amf3(Amf3Value::String("live".into())).encode(&mut b);
        let m = Message::new(COMMAND_AMF3, 0, 1, b.freeze());
        assert_eq!(decode_command(&m, &limits).unwrap(), c);
        // Garbage and wrong types.
        let m = Message::new(COMMAND_AMF0, 0, 0, Bytes::from_static(&[0, 0, 0]));
        assert!(decode_command(&m, &limits).is_err());
        let m = Message::new(AUDIO, 0, 0, body);
        assert_eq!(
            decode_command(&m, &limits),
            Err(MessageError::NotACommand(8))
        );
    }

    fn tag(t: u8, ts: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        v.extend_from_slice(&ts.to_be_bytes()[1..]);
        v.push((ts >> 24) as u8);
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(data);
        v.extend_from_slice(&((data.len() + TAG_HEADER) as u32).to_be_bytes());
        v
    }

    #[test]
    fn aggregate_rebases_timestamps() {
        let mut p = tag(VIDEO, 0x0100_0010, b"abc");
        p.extend(tag(AUDIO, 0x0100_0030, b"de"));
        let mut last = tag(VIDEO, 0x0100_0050, b"f");
        last.truncate(last.len() - 4); // no back pointer after the last tag
        p.extend(last);
        let m = Message::new(AGGREGATE, 1000, 1, p);
        let v = split_aggregate(&m).unwrap();
        let got: Vec<(u8, u32, u32, &[u8])> = v
            .iter()
            .map(|m| (m.msg_type, m.timestamp, m.stream_id, &m.payload[..]))
            .collect();
        assert_eq!(
            got,
            vec![
                (VIDEO, 1000, 1, &b"abc"[..]),
                (AUDIO, 1032, 1, &b"de"[..]),
                (VIDEO, 1064, 1, &b"f"[..])
            ]
        );
        // Truncations and nested aggregates are refused.
        let full = tag(VIDEO, 0, b"abc");
        for cut in 1..full.len() - 4 {
            let m = Message::new(AGGREGATE, 0, 1, full[..cut].to_vec());
            assert!(split_aggregate(&m).is_err(), "cut {cut}");
        }
        let m = Message::new(AGGREGATE, 0, 1, tag(AGGREGATE, 0, b""));
        assert!(split_aggregate(&m).is_err());
    }
}
