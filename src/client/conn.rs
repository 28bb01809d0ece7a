//! One client RTMP connection: handshake, chunked messages both ways, and the command
//! sequences of a publisher (as ffmpeg sends them) and of a player.

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{open_transport, PollHint, RtmpUrl};
use crate::limits::Limits;
use crate::rtmp::amf0::{Amf0Value, AmfLimits};
use crate::rtmp::chunk::{ChunkDecoder, ChunkEncoder, ChunkError};
use crate::rtmp::handshake::{ClientHandshake, HandshakeError, S0S1S2_LEN};
use crate::rtmp::message::{self, Command, Message, MessageError, UserControl};
use crate::stream::ByteStream;

/// Chunk stream for commands, as ffmpeg uses it.
pub const COMMAND_CSID: u32 = 3;
/// Chunk stream for audio.
pub const AUDIO_CSID: u32 = 4;
/// Chunk stream for video (ffmpeg's RTMP_SOURCE_CHANNEL).
pub const VIDEO_CSID: u32 = 6;
/// Chunk stream for stream-level commands (publish, play), like ffmpeg's source channel.
pub const STREAM_CSID: u32 = 8;
/// Chunk size a publisher announces (ffmpeg uses 4096 as well).
pub const PUBLISH_CHUNK_SIZE: u32 = 4096;
/// Commands ignored while waiting for a reply before giving up.
const MAX_UNRELATED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0}")]
    Url(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("RTMPT tunnel: {0}")]
    Tunnel(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("chunk stream: {0}")]
    Chunk(#[from] ChunkError),
    #[error("message: {0}")]
    Message(#[from] MessageError),
    #[error("the server refused {command}: {detail}")]
    Refused { command: String, detail: String },
}

/// A connected (handshaken) RTMP client connection.
pub struct RtmpConnection {
    io: Box<dyn ByteStream>,
    dec: ChunkDecoder,
    enc: ChunkEncoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
    amf: AmfLimits,
    txn: f64,
    /// Window Acknowledgement Size the server asked for (0 = none).
    window: u32,
    /// `bytes_received` when the last Acknowledgement went out.
    acked: u64,
    hint: PollHint,
    /// Bytes read from and written to the transport (RTMP level).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl RtmpConnection {
    /// Opens the transport for `url` and performs the plain RTMP handshake.
    pub async fn open(
        url: &RtmpUrl,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> Result<Self, ClientError> {
        let hint = PollHint::default();
        hint.set_eager(true);
        let io = open_transport(url, tls, hint.clone()).await?;
        Self::handshake(io, hint).await
    }

    /// Handshakes over an already open plain TCP stream.
    pub async fn over_tcp(tcp: TcpStream) -> Result<Self, ClientError> {
        Self::handshake(Box::new(tcp), PollHint::default()).await
    }

    async fn handshake(mut io: Box<dyn ByteStream>, hint: PollHint) -> Result<Self, ClientError> {
        let hs = ClientHandshake::new(true);
        io.write_all(&hs.c0c1()).await?;
        io.flush().await?;
        let mut s = vec![0u8; S0S1S2_LEN];
        io.read_exact(&mut s).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ClientError::Closed
            } else {
                ClientError::Io(e)
            }
        })?;
        let c2 = hs.c2(&s)?;
        io.write_all(&c2).await?;
        io.flush().await?;
        let limits = Limits::default();
        Ok(RtmpConnection {
            io,
            // Charged to the process budget, as before the codec became its own crate.
            dec: ChunkDecoder::with_charge(&limits, crate::budget::Charge::global()),
            enc: ChunkEncoder::new(),
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            amf: AmfLimits::from(&limits),
            txn: 0.0,
            window: 0,
            acked: 0,
            hint,
            bytes_in: S0S1S2_LEN as u64,
            bytes_out: (1 + 2 * 1536) as u64,
        })
    }

    /// Whether a tunnel should poll eagerly (see [`PollHint`]).
    pub fn set_eager_poll(&self, eager: bool) {
        self.hint.set_eager(eager);
    }

    /// Queues `msg` on chunk stream `csid`; [`RtmpConnection::flush`] sends it.
    pub fn queue(&mut self, csid: u32, msg: &Message) {
        self.enc.write(csid, msg, &mut self.wbuf);
    }

    /// Writes every queued byte.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            self.io.write_all(&self.wbuf).await?;
            self.bytes_out = self.bytes_out.saturating_add(self.wbuf.len() as u64);
            self.wbuf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Queues and sends one message.
    pub async fn send(&mut self, csid: u32, msg: &Message) -> Result<(), ClientError> {
        self.queue(csid, msg);
        self.flush().await
    }

    /// Sets our outgoing chunk size (sends Set Chunk Size).
    pub async fn set_chunk_size(&mut self, n: u32) -> Result<(), ClientError> {
        self.send(message::CONTROL_CSID, &message::set_chunk_size(n))
            .await
    }

    /// The next message from the server. Protocol control is handled here (chunk size by
    /// the decoder, acknowledgements, pings) and still returned for the caller to see.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        loop {
            if let Some(msg) = self.dec.decode(&mut self.rbuf)? {
                self.control(&msg)?;
                if !self.wbuf.is_empty() {
                    self.flush().await?;
                }
                return Ok(msg);
            }
            self.rbuf.reserve(64 * 1024);
            let n = self.io.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.bytes_in = self.bytes_in.saturating_add(n as u64);
        }
    }

    /// Handles every message already readable without waiting (a publisher's way of
    /// keeping up with acknowledgements and pings); replies go out with the next flush.
    pub fn drain_available(&mut self) -> Result<(), ClientError> {
        loop {
            while let Some(msg) = self.dec.decode(&mut self.rbuf)? {
                self.control(&msg)?;
            }
            self.rbuf.reserve(16 * 1024);
            match self.io.read_buf(&mut self.rbuf).now_or_never() {
                Some(Ok(0)) => return Err(ClientError::Closed),
                Some(Ok(n)) => self.bytes_in = self.bytes_in.saturating_add(n as u64),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            }
        }
    }

    /// Queues the replies protocol control asks for.
    fn control(&mut self, msg: &Message) -> Result<(), ClientError> {
        match msg.msg_type {
            message::WINDOW_ACK_SIZE => {
                self.window = message::parse_window_ack_size(&msg.payload)?;
            }
            message::USER_CONTROL => {
                if let Ok(UserControl::PingRequest(t)) = UserControl::decode(&msg.payload) {
                    let pong = UserControl::PingResponse(t).to_message();
                    self.queue(message::CONTROL_CSID, &pong);
                }
            }
            _ => {}
        }
        let received = self.dec.bytes_received();
        if self.window > 0 && received.saturating_sub(self.acked) >= u64::from(self.window) {
            self.acked = received;
            // The sequence number is the byte count modulo 2^32.
            let ack = message::acknowledgement(received as u32);
            self.queue(message::CONTROL_CSID, &ack);
        }
        Ok(())
    }

    fn next_txn(&mut self) -> f64 {
        self.txn += 1.0;
        self.txn
    }

    /// Sends a command and waits for its `_result` (or `_error`), skipping anything else.
    pub async fn call(
        &mut self,
        stream_id: u32,
        name: &str,
        values: &[Amf0Value],
    ) -> Result<Command, ClientError> {
        let txn = self.next_txn();
        let msg = message::command_message(stream_id, name, txn, values);
        self.send(COMMAND_CSID, &msg).await?;
        for _ in 0..MAX_UNRELATED {
            let msg = self.recv().await?;
            if !matches!(msg.msg_type, message::COMMAND_AMF0 | message::COMMAND_AMF3) {
                continue;
            }
            let cmd = message::decode_command(&msg, &self.amf)?;
            if cmd.txn != txn {
                continue;
            }
            return match cmd.name.as_str() {
                "_result" => Ok(cmd),
                _ => Err(ClientError::Refused {
                    command: name.to_owned(),
                    detail: describe_status(&cmd),
                }),
            };
        }
        Err(ClientError::Refused {
            command: name.to_owned(),
            detail: "no reply".into(),
        })
    }

    /// Sends a command that expects no reply.
    pub async fn notify(
        &mut self,
        stream_id: u32,
        name: &str,
        values: &[Amf0Value],
    ) -> Result<(), ClientError> {
        let msg = message::command_message(stream_id, name, 0.0, values);
        self.send(COMMAND_CSID, &msg).await
    }

    /// `connect` to the URL's application.
    pub async fn connect(&mut self, url: &RtmpUrl, publisher: bool) -> Result<(), ClientError> {
        let mut props = vec![
            ("app", Amf0Value::string(url.app.clone())),
            (
                "flashVer",
                Amf0Value::string("FMLE/3.0 (compatible; rtmpgate-bench)"),
            ),
            ("tcUrl", Amf0Value::string(url.tc_url())),
        ];
        if publisher {
            props.push(("type", Amf0Value::string("nonprivate")));
        } else {
            props.extend([
                ("fpad", Amf0Value::Boolean(false)),
                ("capabilities", Amf0Value::Number(15.0)),
                ("audioCodecs", Amf0Value::Number(4071.0)),
                ("videoCodecs", Amf0Value::Number(252.0)),
                ("videoFunction", Amf0Value::Number(1.0)),
            ]);
        }
        self.call(0, "connect", &[Amf0Value::object(props)]).await?;
        Ok(())
    }

    /// `createStream`; returns the new message stream id.
    pub async fn create_stream(&mut self) -> Result<u32, ClientError> {
        let r = self.call(0, "createStream", &[Amf0Value::Null]).await?;
        let id = r.arg(0).and_then(Amf0Value::as_f64).unwrap_or(1.0);
        Ok(id as u32)
    }

    /// ffmpeg's publish sequence: releaseStream, FCPublish, createStream, publish, then
    /// wait for `NetStream.Publish.Start`. Returns the message stream id to send media on.
    pub async fn publish(&mut self, name: &str) -> Result<u32, ClientError> {
        let n = Amf0Value::string(name);
        let txn = self.next_txn();
        let release =
            message::command_message(0, "releaseStream", txn, &[Amf0Value::Null, n.clone()]);
        self.queue(COMMAND_CSID, &release);
        let txn = self.next_txn();
        let fc = message::command_message(0, "FCPublish", txn, &[Amf0Value::Null, n.clone()]);
        self.queue(COMMAND_CSID, &fc);
        let sid = self.create_stream().await?;
        let txn = self.next_txn();
        let publish = message::command_message(
            sid,
            "publish",
            txn,
            &[Amf0Value::Null, n, Amf0Value::string("live")],
        );
        self.send(STREAM_CSID, &publish).await?;
        self.await_status("publish", "NetStream.Publish.Start")
            .await?;
        Ok(sid)
    }

    /// createStream, a buffer length, then play; waits for `NetStream.Play.Start`.
    /// Media may arrive before that status; it is returned in the vector, in order.
    pub async fn play(&mut self, name: &str) -> Result<(u32, Vec<Message>), ClientError> {
        let sid = self.create_stream().await?;
        let buf = UserControl::SetBufferLength {
            stream_id: sid,
            ms: 1000,
        };
        self.queue(message::CONTROL_CSID, &buf.to_message());
        let play = message::command_message(
            sid,
            "play",
            0.0,
            &[
                Amf0Value::Null,
                Amf0Value::string(name),
                Amf0Value::Number(-1000.0),
            ],
        );
        self.send(STREAM_CSID, &play).await?;
        let early = self
            .await_status_keep("play", "NetStream.Play.Start")
            .await?;
        Ok((sid, early))
    }

    async fn await_status(&mut self, command: &str, code: &str) -> Result<(), ClientError> {
        self.await_status_keep(command, code).await.map(|_| ())
    }

    /// Waits for an `onStatus` with `code`; an error-level status fails. Media messages
    /// seen meanwhile are kept (bounded) and returned.
    async fn await_status_keep(
        &mut self,
        command: &str,
        code: &str,
    ) -> Result<Vec<Message>, ClientError> {
        let mut kept = Vec::new();
        for _ in 0..MAX_UNRELATED {
            let msg = self.recv().await?;
            match msg.msg_type {
                message::AUDIO | message::VIDEO | message::DATA_AMF0 => {
                    if kept.len() < 1024 {
                        kept.push(msg);
                    }
                    continue;
                }
                message::COMMAND_AMF0 | message::COMMAND_AMF3 => {}
                _ => continue,
            }
            let cmd = message::decode_command(&msg, &self.amf)?;
            if cmd.name == "_error" {
                return Err(ClientError::Refused {
                    command: command.to_owned(),
                    detail: describe_status(&cmd),
                });
            }
            if cmd.name != "onStatus" {
                continue;
            }
            let info = cmd.arg(0);
            let got = info.and_then(|i| i.get("code")).and_then(Amf0Value::as_str);
            let level = info
                .and_then(|i| i.get("level"))
                .and_then(Amf0Value::as_str);
            if got == Some(code) {
                return Ok(kept);
            }
            if level == Some("error") {
                return Err(ClientError::Refused {
                    command: command.to_owned(),
                    detail: describe_status(&cmd),
                });
            }
        }
        Err(ClientError::Refused {
            command: command.to_owned(),
            detail: format!("no {code}"),
        })
    }
}

/// `code: description` of a status or error reply, for messages.
fn describe_status(cmd: &Command) -> String {
    let info = cmd.arg(0).or(cmd.object());
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Amf0Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    format!("{} {}: {}", cmd.name, field("code"), field("description"))
}
