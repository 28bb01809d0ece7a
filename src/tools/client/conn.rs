//! One client RTMP connection: handshake, chunked messages both ways, and the command
//! sequences of a publisher (as ffmpeg sends them) and of a player.

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{open_transport, PollHint, RtmpUrl};
use rtmpgate::limits::Limits;
use rtmpgate::stream::ByteStream;
use rtmpgate_proto::amf0::Amf0Value;
use rtmpgate_proto::chunk::ChunkDecoder;
use rtmpgate_proto::handshake::{ClientHandshake, HandshakeError, S0S1S2_LEN};
use rtmpgate_proto::message::{self, Message, UserControl};
use rtmpgate_proto::session::client::{player_props, publisher_props, Call};
use rtmpgate_proto::session::{ClientConfig, ClientEvent, ClientSession};

/// Chunk streams for audio and video, as ffmpeg uses them (the protocol session's).
pub use rtmpgate_proto::session::client::{AUDIO_CSID, VIDEO_CSID};
/// Chunk size a publisher announces (ffmpeg uses 4096 as well).
pub const PUBLISH_CHUNK_SIZE: u32 = 4096;
/// Messages read while waiting for a reply or a status before giving up.
const MAX_UNRELATED: usize = 10_000;
/// Media messages kept while a player waits for `NetStream.Play.Start`.
const MAX_EARLY_MEDIA: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("TLS: {what}: {source}")]
    Tls {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A TLS set-up that is wrong with no underlying error (a CA file without certificates).
    #[error("TLS: {0}")]
    TlsSetup(String),
    #[error("RTMPT tunnel: {0}")]
    Tunnel(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Session(#[from] rtmpgate_proto::session::ClientError),
    #[error("the server refused {command}: {detail}")]
    Refused { command: String, detail: String },
}

impl ClientError {
    /// A TLS step that failed: what was being done, and the error underneath.
    pub fn tls(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ClientError::Tls {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// A connected (handshaken) RTMP client connection: the protocol crate's [`ClientSession`]
/// (chunking, transactions, acknowledgements, pings) over a transport.
pub struct RtmpConnection {
    io: Box<dyn ByteStream>,
    session: ClientSession,
    rbuf: BytesMut,
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
        let cfg = ClientConfig {
            amf: (&limits).into(),
            publish_chunk_size: PUBLISH_CHUNK_SIZE,
            flash_ver: "FMLE/3.0 (compatible; rtmpgate-bench)".into(),
            ..ClientConfig::default()
        };
        // Charged to the process budget, like every buffer a peer makes us grow.
        let decoder = ChunkDecoder::with_charge(&limits, rtmpgate::budget::Charge::global());
        Ok(RtmpConnection {
            io,
            session: ClientSession::new(cfg, decoder),
            rbuf: BytesMut::with_capacity(64 * 1024),
            hint,
            bytes_in: S0S1S2_LEN as u64,
            bytes_out: (1 + 2 * 1536) as u64,
        })
    }

    /// Whether a tunnel should poll eagerly (see [`PollHint`]).
    pub fn set_eager_poll(&self, eager: bool) {
        self.hint.set_eager(eager);
    }

    /// Queues one audio, video or data message on `stream_id` (audio on its own chunk
    /// stream, the rest on the video one, as ffmpeg does); [`RtmpConnection::flush`] sends it.
    pub fn queue_media(
        &mut self,
        stream_id: u32,
        msg_type: u8,
        timestamp: u32,
        payload: bytes::Bytes,
    ) {
        self.session
            .send_media(stream_id, msg_type, timestamp, payload);
    }

    /// Writes every queued byte.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if let Some(out) = self.session.take_output() {
            self.io.write_all(&out).await?;
            self.bytes_out = self.bytes_out.saturating_add(out.len() as u64);
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Sets our outgoing chunk size (sends Set Chunk Size).
    pub async fn set_chunk_size(&mut self, n: u32) -> Result<(), ClientError> {
        self.session.set_chunk_size(n);
        self.flush().await
    }

    /// The next event from the server. Protocol control is handled by the session (chunk
    /// size, acknowledgements, pings; the replies go out here) and still reported.
    pub async fn recv(&mut self) -> Result<ClientEvent, ClientError> {
        loop {
            if let Some(ev) = self.session.poll(&mut self.rbuf)? {
                self.flush_replies().await?;
                return Ok(ev);
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
            while self.session.poll(&mut self.rbuf)?.is_some() {}
            self.rbuf.reserve(16 * 1024);
            match self.io.read_buf(&mut self.rbuf).now_or_never() {
                Some(Ok(0)) => return Err(ClientError::Closed),
                Some(Ok(n)) => self.bytes_in = self.bytes_in.saturating_add(n as u64),
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            }
        }
    }

    /// Sends what the session queued on its own (acknowledgements, ping responses).
    async fn flush_replies(&mut self) -> Result<(), ClientError> {
        if let Some(out) = self.session.take_output() {
            self.io.write_all(&out).await?;
            self.io.flush().await?;
            self.bytes_out = self.bytes_out.saturating_add(out.len() as u64);
        }
        Ok(())
    }

    /// Waits for the reply to transaction `txn`, skipping everything else; `command` names
    /// it in errors. Returns createStream's stream id, or 0 for other calls.
    async fn reply(&mut self, txn: f64, command: &str) -> Result<u32, ClientError> {
        for _ in 0..MAX_UNRELATED {
            match self.recv().await? {
                ClientEvent::StreamCreated { txn: t, stream_id } if t == txn => {
                    return Ok(stream_id)
                }
                ClientEvent::Reply {
                    txn: t,
                    ok,
                    call,
                    values,
                } if t == txn => {
                    let detail = match (ok, call) {
                        (true, Call::CreateStream) => "_result without a stream id".to_owned(),
                        (true, _) => return Ok(0),
                        (false, _) => describe_reply(false, &values),
                    };
                    return Err(ClientError::Refused {
                        command: command.to_owned(),
                        detail,
                    });
                }
                _ => {}
            }
        }
        Err(ClientError::Refused {
            command: command.to_owned(),
            detail: "no reply".into(),
        })
    }

    /// Sends a command and waits for its `_result` (or `_error`), skipping anything else.
    pub async fn call(
        &mut self,
        stream_id: u32,
        name: &str,
        values: &[Amf0Value],
    ) -> Result<(), ClientError> {
        let txn = self.session.call(stream_id, name, values)?;
        self.flush().await?;
        self.reply(txn, name).await.map(|_| ())
    }

    /// Sends a command that expects no reply.
    pub async fn notify(
        &mut self,
        stream_id: u32,
        name: &str,
        values: &[Amf0Value],
    ) -> Result<(), ClientError> {
        self.session.notify(stream_id, name, values);
        self.flush().await
    }

    /// `connect` to the URL's application, with a publisher's or a player's properties.
    pub async fn connect(&mut self, url: &RtmpUrl, publisher: bool) -> Result<(), ClientError> {
        let props = if publisher {
            publisher_props()
        } else {
            player_props()
        };
        let txn = self.session.connect(&url.app, &url.tc_url(), props)?;
        self.flush().await?;
        self.reply(txn, "connect").await.map(|_| ())
    }

    /// `createStream`; returns the new message stream id.
    pub async fn create_stream(&mut self) -> Result<u32, ClientError> {
        let txn = self.session.create_stream()?;
        self.flush().await?;
        self.reply(txn, "createStream").await
    }

    /// ffmpeg's publish sequence: releaseStream, FCPublish, createStream, publish, then
    /// wait for `NetStream.Publish.Start`. Returns the message stream id to send media on.
    pub async fn publish(&mut self, name: &str) -> Result<u32, ClientError> {
        let n = Amf0Value::string(name);
        // Their replies (if any) are skipped while createStream's is awaited.
        self.session
            .call(0, "releaseStream", &[Amf0Value::Null, n.clone()])?;
        self.session.call(0, "FCPublish", &[Amf0Value::Null, n])?;
        let sid = self.create_stream().await?;
        self.session.publish(sid, name);
        self.flush().await?;
        self.await_status("publish", "NetStream.Publish.Start")
            .await?;
        Ok(sid)
    }

    /// createStream, a buffer length, then play (from the live point, -1000 as librtmp
    /// sends it); waits for `NetStream.Play.Start`. Media may arrive before that status; it
    /// is returned in the vector, in order.
    pub async fn play(&mut self, name: &str) -> Result<(u32, Vec<Message>), ClientError> {
        let sid = self.create_stream().await?;
        let buf = UserControl::SetBufferLength {
            stream_id: sid,
            ms: 1000,
        };
        self.session.send(message::CONTROL_CSID, &buf.to_message());
        let args = [
            Amf0Value::Null,
            Amf0Value::string(name),
            Amf0Value::Number(-1000.0),
        ];
        self.session.notify(sid, "play", &args);
        self.flush().await?;
        let early = self.await_status("play", "NetStream.Play.Start").await?;
        Ok((sid, early))
    }

    /// Waits for an `onStatus` with `code`; an `_error` or an error-level status fails.
    /// Media messages seen meanwhile are kept (bounded) and returned.
    async fn await_status(
        &mut self,
        command: &str,
        code: &str,
    ) -> Result<Vec<Message>, ClientError> {
        let mut kept = Vec::new();
        for _ in 0..MAX_UNRELATED {
            match self.recv().await? {
                // Past the bound, early media is dropped (counted as lost by the caller).
                ClientEvent::Media(m) if kept.len() < MAX_EARLY_MEDIA => kept.push(m),
                ClientEvent::Reply {
                    ok: false, values, ..
                } => {
                    return Err(ClientError::Refused {
                        command: command.to_owned(),
                        detail: describe_reply(false, &values),
                    })
                }
                ClientEvent::Status {
                    code: got,
                    level,
                    description,
                    ..
                } => {
                    if got == code {
                        return Ok(kept);
                    }
                    if level == "error" {
                        return Err(ClientError::Refused {
                            command: command.to_owned(),
                            detail: format!("onStatus {got}: {description}"),
                        });
                    }
                }
                _ => {}
            }
        }
        Err(ClientError::Refused {
            command: command.to_owned(),
            detail: format!("no {code}"),
        })
    }
}

/// `_result`/`_error code: description` of a reply (its values after the transaction id:
/// the command object, then the information object), for messages.
fn describe_reply(ok: bool, values: &[Amf0Value]) -> String {
    let info = values.get(1).or(values.first());
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Amf0Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let name = if ok { "_result" } else { "_error" };
    format!("{name} {}: {}", field("code"), field("description"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use rtmpgate::engine::{Engine, EngineConfig};
    use rtmpgate::stream::{ClientStream, Transport};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use super::*;

    /// The gateway's own engine on a loopback port (plain RTMP).
    async fn engine() -> u16 {
        let engine = Engine::new(Limits::default(), EngineConfig::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let local = tcp.local_addr().unwrap();
                let client = ClientStream::new(Box::new(tcp), Transport::Rtmp, peer, local);
                tokio::spawn(engine.clone().serve(client));
            }
        });
        port
    }

    async fn open(port: u16, url: &RtmpUrl, publisher: bool) -> RtmpConnection {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut conn = RtmpConnection::over_tcp(tcp).await.unwrap();
        if publisher {
            conn.set_chunk_size(PUBLISH_CHUNK_SIZE).await.unwrap();
        }
        conn.connect(url, publisher).await.unwrap();
        conn
    }

    /// A video tag body of `len` bytes: AVC keyframe or inter frame, numbered.
    fn frame(i: u32, key: bool, len: usize) -> Bytes {
        let mut b = vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0];
        b.extend_from_slice(&i.to_be_bytes());
        b.resize(len, (i % 251) as u8);
        Bytes::from(b)
    }

    #[tokio::test]
    async fn publishes_and_plays_every_frame_through_the_engine() {
        let port = engine().await;
        let url = RtmpUrl::parse(&format!("rtmp://127.0.0.1:{port}/live/t")).unwrap();
        let mut publisher = open(port, &url, true).await;
        let sid = publisher.publish("t").await.unwrap();
        let mut player = open(port, &url, false).await;
        let (_, early) = player.play("t").await.unwrap();
        assert!(early.is_empty(), "nothing was published yet");

        // Frames larger than the chunk size, so each crosses several chunks both ways.
        let header = Bytes::from_static(&[0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1e]);
        publisher.queue_media(sid, message::VIDEO, 0, header);
        let sent: Vec<Bytes> = (0..30).map(|i| frame(i, i % 10 == 0, 10_000)).collect();
        for (i, f) in sent.iter().enumerate() {
            publisher.queue_media(sid, message::VIDEO, i as u32 * 33, f.clone());
        }
        publisher.flush().await.unwrap();

        let mut got = Vec::new();
        let wait = timeout(Duration::from_secs(10), async {
            while got.len() < sent.len() {
                if let ClientEvent::Media(m) = player.recv().await.unwrap() {
                    // The AVC sequence header (packet type 0) is not one of the frames.
                    if m.msg_type == message::VIDEO && m.payload.get(1) != Some(&0) {
                        got.push(m.payload);
                    }
                }
            }
        })
        .await;
        assert!(
            wait.is_ok(),
            "{} of {} frames within 10 s",
            got.len(),
            sent.len()
        );
        assert!(got == sent, "the frames differ from what was published");
        assert!(player.bytes_in > 300_000 && publisher.bytes_out > 300_000);
    }

    #[tokio::test]
    async fn a_refused_publish_says_why() {
        let port = engine().await;
        let url = RtmpUrl::parse(&format!("rtmp://127.0.0.1:{port}/live/k")).unwrap();
        let mut first = open(port, &url, true).await;
        first.publish("k").await.unwrap();
        let mut second = open(port, &url, true).await;
        let err = timeout(Duration::from_secs(10), second.publish("k"))
            .await
            .expect("an answer within 10 s")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("refused publish") && text.contains("NetStream.Publish.BadName"),
            "{text}"
        );
    }
}
