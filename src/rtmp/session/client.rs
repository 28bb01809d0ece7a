//! The client side of an RTMP connection after the handshake, without IO: the mirror of
//! [`super::server::ServerSession`].
//!
//! It queues the commands a publisher or player sends (connect, createStream, publish,
//! play, and any other call), tracks their transaction ids, acknowledges the server's
//! window and answers its pings on its own, and reports every message it receives as a
//! [`ClientEvent`], the replies to its own calls named as such. Feed it bytes with
//! [`ClientSession::poll`], take what it wants sent with [`ClientSession::take_output`].

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::command::{CSID_COMMAND, CSID_CONTROL};
use crate::amf::AmfLimits;
use crate::amf0::{self, Amf0Value};
use crate::chunk::{ChunkDecoder, ChunkEncoder, ChunkError};
use crate::message::{self, Command, Control, Message, MessageError, UserControl, AUDIO, VIDEO};

/// Chunk streams for audio, video and stream-level commands, as ffmpeg uses them.
pub const AUDIO_CSID: u32 = 4;
pub const VIDEO_CSID: u32 = 6;
pub const STREAM_CSID: u32 = 8;

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub amf: AmfLimits,
    /// Chunk size announced before publishing (ffmpeg: 4096); 0 keeps 128.
    pub publish_chunk_size: u32,
    /// Calls awaiting a reply at once (a server that never answers cannot grow the list).
    pub max_calls: usize,
    /// `flashVer` sent with connect (servers log it: name the tool).
    pub flash_ver: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            amf: AmfLimits::default(),
            publish_chunk_size: 4096,
            max_calls: 64,
            flash_ver: "FMLE/3.0 (compatible; rtmpgate)".into(),
        }
    }
}

/// What a reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Connect,
    CreateStream,
    Other,
}

/// A message from the server, interpreted.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    /// `_result` or `_error` of one of our calls.
    Reply {
        call: Call,
        txn: f64,
        ok: bool,
        /// The values after the transaction id.
        values: Vec<Amf0Value>,
    },
    /// The stream id createStream's `_result` carried.
    StreamCreated {
        txn: f64,
        stream_id: u32,
    },
    /// `onStatus` on a message stream (or 0).
    Status {
        stream_id: u32,
        level: String,
        code: String,
        description: String,
    },
    /// Any other command (onBWDone, onFCPublish...).
    Command {
        stream_id: u32,
        command: Command,
    },
    /// A data message (|RtmpSampleAccess, onMetaData, Data.Start...): its AMF0 values.
    Data {
        stream_id: u32,
        values: Vec<Amf0Value>,
    },
    /// A protocol control message (already acted on: chunk size, window, pings).
    Control(Control),
    Media(Message),
    /// A message that could not be decoded (skipped).
    Malformed(String),
}

impl ClientEvent {
    /// A short name, the way tests compare sequences: `onStatus NetStream.Play.Start`,
    /// `_result`, `|RtmpSampleAccess`, `StreamBegin(1)`...
    pub fn describe(&self) -> String {
        match self {
            ClientEvent::Reply { ok: true, .. } | ClientEvent::StreamCreated { .. } => {
                "_result".into()
            }
            ClientEvent::Reply { ok: false, .. } => "_error".into(),
            ClientEvent::Status { code, .. } => format!("onStatus {code}"),
            ClientEvent::Command { command, .. } => {
                let code = command
                    .arg(0)
                    .and_then(|o| o.get("code"))
                    .and_then(Amf0Value::as_str);
                match code {
                    Some(c) => format!("{} {c}", command.name),
                    None => command.name.clone(),
                }
            }
            ClientEvent::Data { values, .. } => {
                let first = values.first().and_then(Amf0Value::as_str).unwrap_or("?");
                let code = values
                    .get(1)
                    .and_then(|o| o.get("code"))
                    .and_then(Amf0Value::as_str);
                match code {
                    Some(c) => format!("{first} {c}"),
                    None => first.to_owned(),
                }
            }
            ClientEvent::Control(Control::UserControl(u)) => format!("{u:?}"),
            ClientEvent::Control(c) => format!("{c:?}"),
            ClientEvent::Media(m) => format!("media type {}", m.msg_type),
            ClientEvent::Malformed(e) => format!("malformed: {e}"),
        }
    }
}

/// Why the client session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("chunk stream from the server: {0}")]
    Chunk(#[from] ChunkError),
    #[error("message from the server: {0}")]
    Message(#[from] MessageError),
    #[error("more than {0} calls await a reply")]
    TooManyCalls(usize),
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct ClientSession {
    cfg: ClientConfig,
    decoder: ChunkDecoder,
    encoder: ChunkEncoder,
    out: BytesMut,
    next_txn: f64,
    calls: Vec<(f64, Call)>,
    events: VecDeque<ClientEvent>,
    bytes_in: u64,
    window: u64,
    acked: u64,
}

impl ClientSession {
    /// A session reading the server's chunks with `decoder`.
    pub fn new(cfg: ClientConfig, decoder: ChunkDecoder) -> Self {
        ClientSession {
            cfg,
            decoder,
            encoder: ChunkEncoder::new(),
            out: BytesMut::new(),
            next_txn: 1.0,
            calls: Vec::new(),
            events: VecDeque::new(),
            bytes_in: 0,
            window: 0,
            acked: 0,
        }
    }

    /// Bytes to write to the server, if any.
    pub fn take_output(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            return None;
        }
        Some(self.out.split().freeze())
    }

    /// Queues any message on chunk stream `csid` (media, control, a hand-made command).
    pub fn send(&mut self, csid: u32, msg: &Message) {
        self.encoder.write(csid, msg, &mut self.out);
    }

    /// Announces and starts using chunk size `n`.
    pub fn set_chunk_size(&mut self, n: u32) {
        self.send(CSID_CONTROL, &message::set_chunk_size(n));
        self.encoder.set_chunk_size(n);
    }

    /// Queues a call on `stream_id` expecting `_result`/`_error`; returns its transaction.
    pub fn call(
        &mut self,
        stream_id: u32,
        name: &str,
        args: &[Amf0Value],
    ) -> Result<f64, ClientError> {
        self.call_as(Call::Other, stream_id, name, args)
    }

    /// Queues a command that expects no reply (transaction 0).
    pub fn notify(&mut self, stream_id: u32, name: &str, args: &[Amf0Value]) {
        let csid = if stream_id == 0 {
            CSID_COMMAND
        } else {
            STREAM_CSID
        };
        self.send(csid, &message::command_message(stream_id, name, 0.0, args));
    }

    /// connect to `app`: `app`, `flashVer` (the config's) and `tcUrl`, then `extra`
    /// ([`publisher_props`] or [`player_props`], plus anything the caller adds).
    pub fn connect(
        &mut self,
        app: &str,
        tc_url: &str,
        extra: Vec<(&str, Amf0Value)>,
    ) -> Result<f64, ClientError> {
        let mut props = vec![
            ("app", Amf0Value::string(app)),
            ("flashVer", Amf0Value::string(self.cfg.flash_ver.clone())),
            ("tcUrl", Amf0Value::string(tc_url)),
        ];
        props.extend(extra);
        self.call_as(Call::Connect, 0, "connect", &[Amf0Value::object(props)])
    }

    /// createStream; the reply comes as [`ClientEvent::StreamCreated`].
    pub fn create_stream(&mut self) -> Result<f64, ClientError> {
        self.call_as(Call::CreateStream, 0, "createStream", &[Amf0Value::Null])
    }

    /// publish `name` on `stream_id` (live), announcing the publish chunk size first.
    pub fn publish(&mut self, stream_id: u32, name: &str) {
        if self.cfg.publish_chunk_size > 0
            && self.encoder.chunk_size() != self.cfg.publish_chunk_size
        {
            self.set_chunk_size(self.cfg.publish_chunk_size);
        }
        let args = [
            Amf0Value::Null,
            Amf0Value::string(name),
            Amf0Value::string("live"),
        ];
        self.notify(stream_id, "publish", &args);
    }

    /// play `name` on `stream_id` from the live point (start -2, as ffmpeg sends it).
    pub fn play(&mut self, stream_id: u32, name: &str) {
        let args = [
            Amf0Value::Null,
            Amf0Value::string(name),
            Amf0Value::Number(-2.0),
        ];
        self.notify(stream_id, "play", &args);
    }

    /// deleteStream `stream_id`.
    pub fn delete_stream(&mut self, stream_id: u32) {
        let args = [Amf0Value::Null, Amf0Value::Number(f64::from(stream_id))];
        self.notify(0, "deleteStream", &args);
    }

    /// Queues one audio or video message on `stream_id`.
    pub fn send_media(&mut self, stream_id: u32, msg_type: u8, timestamp: u32, payload: Bytes) {
        let csid = if msg_type == AUDIO {
            AUDIO_CSID
        } else {
            VIDEO_CSID
        };
        self.send(csid, &Message::new(msg_type, timestamp, stream_id, payload));
    }

    /// Decodes what `buf` holds; the next event, or `None` when more bytes are needed.
    /// Acknowledgements and ping responses are queued on the way.
    pub fn poll(&mut self, buf: &mut BytesMut) -> Result<Option<ClientEvent>, ClientError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(Some(ev));
            }
            let before = self.decoder.bytes_received();
            let msg = self.decoder.decode(buf)?;
            let used = self.decoder.bytes_received().saturating_sub(before);
            self.bytes_in = self.bytes_in.saturating_add(used);
            if self.window > 0 && self.bytes_in.saturating_sub(self.acked) >= self.window {
                self.acked = self.bytes_in;
                let seq = (self.bytes_in & 0xffff_ffff) as u32;
                self.send(CSID_CONTROL, &message::acknowledgement(seq));
            }
            let Some(msg) = msg else {
                return Ok(None);
            };
            self.on_message(msg);
        }
    }

    fn call_as(
        &mut self,
        call: Call,
        stream_id: u32,
        name: &str,
        args: &[Amf0Value],
    ) -> Result<f64, ClientError> {
        if self.calls.len() >= self.cfg.max_calls {
            return Err(ClientError::TooManyCalls(self.cfg.max_calls));
        }
        let txn = self.next_txn;
        self.next_txn += 1.0;
        self.calls.push((txn, call));
        let csid = if stream_id == 0 {
            CSID_COMMAND
        } else {
            STREAM_CSID
        };
        self.send(csid, &message::command_message(stream_id, name, txn, args));
        Ok(txn)
    }

    fn on_message(&mut self, msg: Message) {
        match msg.msg_type {
            AUDIO | VIDEO => self.events.push_back(ClientEvent::Media(msg)),
            message::COMMAND_AMF0 | message::COMMAND_AMF3 => {
                match message::decode_command(&msg, &self.cfg.amf) {
                    Ok(c) => self.on_command(msg.stream_id, c),
                    Err(e) => self.events.push_back(ClientEvent::Malformed(e.to_string())),
                }
            }
            message::DATA_AMF0 | message::DATA_AMF3 => {
                match message::decode_amf_payload(&msg, &self.cfg.amf) {
                    Ok(values) => self.events.push_back(ClientEvent::Data {
                        stream_id: msg.stream_id,
                        values,
                    }),
                    Err(e) => self.events.push_back(ClientEvent::Malformed(e.to_string())),
                }
            }
            _ => match Control::decode(&msg) {
                Ok(Some(c)) => {
                    match &c {
                        Control::WindowAckSize(w) => self.window = u64::from(*w),
                        Control::UserControl(UserControl::PingRequest(t)) => {
                            let pong = UserControl::PingResponse(*t).to_message();
                            self.send(CSID_CONTROL, &pong);
                        }
                        _ => {}
                    }
                    self.events.push_back(ClientEvent::Control(c));
                }
                Ok(None) => {}
                Err(e) => self.events.push_back(ClientEvent::Malformed(e.to_string())),
            },
        }
    }

    fn on_command(&mut self, stream_id: u32, c: Command) {
        let ok = match c.name.as_str() {
            "_result" => true,
            "_error" => false,
            "onStatus" => {
                let info = c.arg(0);
                let field = |k: &str| {
                    info.and_then(|o| o.get(k))
                        .and_then(Amf0Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                self.events.push_back(ClientEvent::Status {
                    stream_id,
                    level: field("level"),
                    code: field("code"),
                    description: field("description"),
                });
                return;
            }
            _ => {
                self.events.push_back(ClientEvent::Command {
                    stream_id,
                    command: c,
                });
                return;
            }
        };
        let call = match self.calls.iter().position(|(t, _)| *t == c.txn) {
            Some(i) => self.calls.swap_remove(i).1,
            None => Call::Other,
        };
        let txn = c.txn;
        if ok && call == Call::CreateStream {
            if let Some(id) = c.arg(0).and_then(Amf0Value::as_f64) {
                if id >= 0.0 && id <= f64::from(u32::MAX) {
                    self.events.push_back(ClientEvent::StreamCreated {
                        txn,
                        stream_id: id as u32,
                    });
                    return;
                }
            }
        }
        self.events.push_back(ClientEvent::Reply {
            call,
            txn,
            ok,
            values: c.args,
        });
    }
}

/// The connect properties a publisher adds, as FMLE and ffmpeg send them.
pub fn publisher_props() -> Vec<(&'static str, Amf0Value)> {
    vec![("type", Amf0Value::string("nonprivate"))]
}

/// The connect properties a player adds, as ffmpeg sends them (what it can decode).
pub fn player_props() -> Vec<(&'static str, Amf0Value)> {
    vec![
        ("fpad", Amf0Value::Boolean(false)),
        ("capabilities", Amf0Value::Number(15.0)),
        ("audioCodecs", Amf0Value::Number(4071.0)),
        ("videoCodecs", Amf0Value::Number(252.0)),
        ("videoFunction", Amf0Value::Number(1.0)),
    ]
}

/// The AMF0 values of a data or command body, for tests and tools that look inside.
pub fn values_of(msg: &Message, limits: &AmfLimits) -> Option<Vec<Amf0Value>> {
    message::decode_amf_payload(msg, limits).ok()
}

/// Encodes `values` as the body of a type 18 data message.
pub fn data_payload(values: &[Amf0Value]) -> Bytes {
    amf0::encode_all(values)
}
