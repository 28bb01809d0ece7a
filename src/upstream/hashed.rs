//! `balance = "hash"` in the connect-aware relay: the gateway answers the client itself
//! (the proto crate's [`ServerSession`]) until `publish` or `play` names the stream, picks
//! the backend from app and stream name, replays the client's bytes to it, and re-chunks
//! what the backend sends back so the client sees one consistent server.
//!
//! Why re-chunk: the client has already been told `connect` succeeded, its `createStream`
//! got a stream id and its chunk size was set by the gateway; the backend answers the
//! same replayed commands again. Dropping those duplicate answers from the backend's raw
//! bytes would break its later compressed chunk headers (a fmt 1-3 header leans on the
//! previous message of its chunk stream), and the backend's Set Chunk Size would fight
//! the gateway's. So the backend->client direction is decoded ([`ChunkDecoder`], the
//! usual limits and memory charge) and re-encoded with the gateway's own [`ChunkEncoder`]
//! at the chunk size the client was given ([`Rechunk`]); the answers to transactions the
//! gateway already answered, the backend's Set Chunk Size and its connect-time window
//! and bandwidth messages are dropped, and message stream ids are mapped from the
//! backend's `createStream` ids to the gateway's. The client->backend direction stays a
//! raw copy through the relay's command watch (the backend sees the client's exact chunk
//! stream), which is right as long as the backend gives the same stream ids as the
//! gateway (1 for the first `createStream` on a connection: nginx-rtmp, SRS, rtmpgate's
//! engine do); a backend that gives others is logged and its replies are still mapped.
//!
//! Cost: every byte a backend sends to a client of a hash group is decoded and chunked
//! again (README, "balance = hash"), where other groups copy bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::guard::Action;
use super::pool::stream_key;
use crate::budget::{Charge, PeerBudget};
use crate::limits::Limits;
use crate::rtmp::amf0::{Amf0Value, AmfLimits};
use crate::rtmp::chunk::{ChunkDecoder, ChunkEncoder};
use crate::rtmp::message::{self, Message, UserControl};
use crate::rtmp::session::command as cmd;
use crate::rtmp::session::{self as proto, ServerConfig, ServerEvent, ServerSession};

/// Bytes read from the client per read while the gateway answers it.
const READ_STEP: usize = 4096;
/// Bytes read from the backend per read when re-chunking.
const BACKEND_READ: usize = 16 * 1024;
/// Commands with a transaction the gateway answers before publish/play (connect,
/// releaseStream, FCPublish, createStream, _checkbw, getStreamLength...: a handful).
const MAX_EARLY_COMMANDS: usize = 32;

/// What the gateway answered before the stream was named, and the stream.
#[derive(Debug, Clone)]
pub struct Early {
    /// `app/stream`, queries stripped: what the hash is of.
    pub key: String,
    pub action: Action,
    /// The stream name as the client sent it (for logs, bounded by max_name_len).
    pub name: String,
    /// The message stream the publish/play came on.
    pub stream_id: u32,
    pub connect_txn: f64,
    /// Every transaction the gateway answered (connect's included).
    pub answered: Vec<f64>,
    /// createStream transactions in order: the k-th got stream id k from the gateway.
    pub create_txns: Vec<f64>,
    /// The gateway sent onFCPublish (the backend's would be a duplicate).
    pub fc_publish: bool,
    /// The chunk size the client was told.
    pub chunk_size: u32,
    /// RTMPE: the large chunk size was not announced on connect (see
    /// [`ServerConfig::chunk_size_on_connect`]); a player is sent it before the backend's
    /// replies.
    pub rtmpe: bool,
}

/// The session settings the gateway answers with: the engine's defaults.
fn server_config(limits: &Limits, rtmpe: bool) -> ServerConfig {
    ServerConfig {
        limits: limits.into(),
        chunk_size_on_connect: !rtmpe,
        ..ServerConfig::default()
    }
}

/// Answers the client (connect, createStream, releaseStream, FCPublish, ...) from `raw`
/// (every byte after the handshake, connect included) and what it reads next, until the
/// first publish or play. Every byte read is appended to `raw` for the replay (bounded
/// by `limits.max_connect_bytes`, charged to `charge`); the copy the session decodes is
/// charged to the peer's budget too.
pub async fn answer_until_stream<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    raw: &mut BytesMut,
    charge: &mut Charge,
    limits: &Limits,
    budget: &PeerBudget,
    rtmpe: bool,
) -> Result<Early, String> {
    let cfg = server_config(limits, rtmpe);
    let max_name = cfg.limits.max_name_len;
    let decoder = ChunkDecoder::with_charge(limits, budget.charge());
    let mut session = ServerSession::new(cfg, decoder, Instant::now());
    let mut feed = BytesMut::new();
    let mut feed_charge = budget.charge();
    let mut fed = 0usize;
    let mut connect_txn = None;
    let mut answered = Vec::new();
    let mut create_txns = Vec::new();
    let mut fc_publish = false;
    loop {
        if let Some(new) = raw.get(fed..).filter(|n| !n.is_empty()) {
            // The feed never holds more than `raw` does (max_connect_bytes).
            feed_charge
                .try_grow(new.len())
                .map_err(|e| format!("closed to keep the process within its memory: {e}"))?;
            feed.extend_from_slice(new);
            fed = raw.len();
        }
        let polled = session
            .poll(&mut feed, Instant::now())
            .map_err(|e| e.to_string())?;
        match polled {
            proto::Poll::Event(ServerEvent::ConnectRequested(r)) => session.accept(r.request_id),
            proto::Poll::Event(ServerEvent::Command { name, txn, .. }) => {
                if name == "connect" {
                    connect_txn = Some(txn);
                }
                let stream_cmd = matches!(name.as_str(), "publish" | "play" | "play2");
                if txn != 0.0 && !stream_cmd {
                    if answered.len() >= MAX_EARLY_COMMANDS {
                        return Err(format!(
                            "more than {MAX_EARLY_COMMANDS} commands before publish or play"
                        ));
                    }
                    answered.push(txn);
                    match name.as_str() {
                        "createStream" => create_txns.push(txn),
                        "FCPublish" => fc_publish = true,
                        _ => {}
                    }
                }
            }
            proto::Poll::Event(
                ev @ (ServerEvent::PublishRequested { .. } | ServerEvent::PlayRequested { .. }),
            ) => {
                let (action, request) = match ev {
                    ServerEvent::PublishRequested { request, .. } => (Action::Publish, request),
                    ServerEvent::PlayRequested { request, .. } => (Action::Play, request),
                    _ => return Err("unreachable event".to_string()),
                };
                write_output(s, &mut session).await?;
                let connect_txn = connect_txn.ok_or("publish or play before connect")?;
                let name: String = request.name.chars().take(max_name).collect();
                return Ok(Early {
                    key: stream_key(&request.app, &request.name),
                    action,
                    name,
                    stream_id: request.stream_id,
                    connect_txn,
                    answered,
                    create_txns,
                    fc_publish,
                    chunk_size: session.out_chunk_size(),
                    rtmpe,
                });
            }
            proto::Poll::Event(_) => {}
            proto::Poll::NeedInput => {
                write_output(s, &mut session).await?;
                read_more(s, raw, charge, limits, "a publish or play").await?;
            }
            proto::Poll::RateLimited(wait) => {
                write_output(s, &mut session).await?;
                tokio::time::sleep(wait).await;
            }
            proto::Poll::RepliesFull => write_output(s, &mut session).await?,
            proto::Poll::AwaitingDecision => {
                return Err("the gateway's session waits on a decision it never asked for".into())
            }
        }
    }
}

/// Writes what the session queued for the client.
async fn write_output<S: AsyncWrite + Unpin>(
    s: &mut S,
    session: &mut ServerSession,
) -> Result<(), String> {
    if let Some(out) = session.take_output() {
        s.write_all(&out)
            .await
            .map_err(|e| format!("answering the client: {e}"))?;
        s.flush()
            .await
            .map_err(|e| format!("answering the client: {e}"))?;
    }
    session.flushed();
    Ok(())
}

/// Reads the next bytes of the client into `raw`, charged to `charge` and bounded by
/// `limits.max_connect_bytes`; `awaited` names what the gateway is waiting for (the connect,
/// or a hash group's publish or play), for the errors. Used by both relay modes.
pub(super) async fn read_more<S: AsyncRead + Unpin>(
    s: &mut S,
    raw: &mut BytesMut,
    charge: &mut Charge,
    limits: &Limits,
    awaited: &str,
) -> Result<(), String> {
    if raw.len() >= limits.max_connect_bytes {
        return Err(format!(
            "{} bytes without {awaited} (limits.max_connect_bytes bounds what a client may send before it)",
            raw.len()
        ));
    }
    let room = READ_STEP.min(limits.max_connect_bytes - raw.len());
    charge
        .try_grow(room)
        .map_err(|e| format!("closed to keep the process within its memory: {e}"))?;
    raw.reserve(room);
    let n = s
        .read_buf(&mut bytes::BufMut::limit(&mut *raw, room))
        .await
        .map_err(|e| format!("reading: {e}"))?;
    // Charge what the buffer holds, not each read's room.
    charge.shrink(room.saturating_sub(n));
    if n == 0 {
        return Err(format!("the client closed before {awaited}"));
    }
    Ok(())
}

/// The backend's side of a hash-group client, re-chunked: reads decode the backend's
/// messages, drop and rewrite as the module documentation says, and yield the gateway's
/// chunking of the rest; writes go to the backend unchanged.
pub struct Rechunk<L> {
    inner: L,
    decoder: ChunkDecoder,
    encoder: ChunkEncoder,
    /// Bytes read from the backend not yet decoded (at most a partial chunk header).
    inbuf: BytesMut,
    /// Re-chunked bytes not yet handed to the reader.
    out: BytesMut,
    read: Box<[u8]>,
    early: Early,
    amf: AmfLimits,
    /// The backend's reply to connect has been seen: its window and bandwidth messages
    /// before it were for the connect the gateway answered.
    setup_done: bool,
    /// (backend's id, gateway's id) for each createStream answered by the backend.
    ids: Vec<(u32, u32)>,
    /// The backend refused what the gateway had accepted: the status is queued, then EOF.
    ending: bool,
    label: String,
}

impl<L> Rechunk<L> {
    /// The chunk size the client reads at once a [`Rechunk`] for `early` has started.
    pub fn client_chunk_size(early: &Early) -> u32 {
        let want = ServerConfig::default().chunk_size;
        if early.action == Action::Play && early.chunk_size < want {
            want
        } else {
            early.chunk_size
        }
    }

    pub fn new(inner: L, early: Early, limits: &Limits, budget: &PeerBudget, label: &str) -> Self {
        let mut encoder = ChunkEncoder::new();
        encoder.set_chunk_size(early.chunk_size);
        let mut out = BytesMut::new();
        let size = Self::client_chunk_size(&early);
        if size != early.chunk_size {
            // RTMPE: the large chunk size is safe for a player (see `Early::rtmpe`).
            encoder.write(cmd::CSID_CONTROL, &message::set_chunk_size(size), &mut out);
        }
        Rechunk {
            inner,
            decoder: ChunkDecoder::with_charge(limits, budget.charge()),
            encoder,
            inbuf: BytesMut::new(),
            out,
            read: vec![0u8; BACKEND_READ].into_boxed_slice(),
            early,
            amf: AmfLimits::from(limits),
            setup_done: false,
            ids: Vec::new(),
            ending: false,
            label: label.to_string(),
        }
    }

    /// The backend's id for a message stream, as the client knows it. A backend that gives
    /// the same id to several createStreams (nginx-rtmp answers 1 to each) is taken to mean
    /// the latest of the gateway's: a client plays or publishes on the stream it created last.
    fn map_id(&self, id: u32) -> u32 {
        self.ids
            .iter()
            .rev()
            .find(|(b, _)| *b == id)
            .map_or(id, |(_, g)| *g)
    }

    /// The chunk stream a message goes out on (the engine's and nginx-rtmp's layout).
    fn csid(msg_type: u8) -> u32 {
        match msg_type {
            message::SET_CHUNK_SIZE..=message::SET_PEER_BANDWIDTH => cmd::CSID_CONTROL,
            message::AUDIO => 6,
            message::VIDEO => 7,
            message::DATA_AMF0 | message::DATA_AMF3 | message::AGGREGATE => 5,
            _ => cmd::CSID_COMMAND,
        }
    }

    fn emit(&mut self, mut msg: Message) {
        msg.stream_id = self.map_id(msg.stream_id);
        self.encoder
            .write(Self::csid(msg.msg_type), &msg, &mut self.out);
    }

    /// One message from the backend: dropped, rewritten or passed on.
    fn handle(&mut self, msg: Message) {
        match msg.msg_type {
            // Applied by the decoder; the gateway keeps the chunk size it gave the client.
            message::SET_CHUNK_SIZE | message::ABORT => {}
            message::WINDOW_ACK_SIZE | message::SET_PEER_BANDWIDTH if !self.setup_done => {}
            message::USER_CONTROL => self.user_control(msg),
            message::COMMAND_AMF0 | message::COMMAND_AMF3 => self.command(msg),
            _ => self.emit(msg),
        }
    }

    fn user_control(&mut self, msg: Message) {
        if !self.setup_done {
            // Stream 0's StreamBegin and pings of the connect the gateway answered.
            return;
        }
        let remapped = match UserControl::decode(&msg.payload) {
            Ok(UserControl::StreamBegin(id)) => Some(UserControl::StreamBegin(self.map_id(id))),
            Ok(UserControl::StreamEof(id)) => Some(UserControl::StreamEof(self.map_id(id))),
            Ok(UserControl::StreamDry(id)) => Some(UserControl::StreamDry(self.map_id(id))),
            Ok(UserControl::StreamIsRecorded(id)) => {
                Some(UserControl::StreamIsRecorded(self.map_id(id)))
            }
            _ => None,
        };
        match remapped {
            Some(uc) => {
                let mut m = uc.to_message();
                m.timestamp = msg.timestamp;
                self.emit(m);
            }
            None => self.emit(msg),
        }
    }

    fn command(&mut self, msg: Message) {
        let Ok(c) = message::decode_command(&msg, &self.amf) else {
            // Not ours to judge: the client reads it as it would from the backend.
            self.emit(msg);
            return;
        };
        match c.name.as_str() {
            "_result" | "_error" => {
                let Some(i) = self.early.answered.iter().position(|t| *t == c.txn) else {
                    self.emit(msg);
                    return;
                };
                self.early.answered.swap_remove(i);
                let refused = c.name == "_error";
                if c.txn == self.early.connect_txn {
                    self.setup_done = true;
                    if refused {
                        self.refused("connect", &c);
                    }
                } else if let Some(k) = self.early.create_txns.iter().position(|t| *t == c.txn) {
                    if refused {
                        self.refused("createStream", &c);
                        return;
                    }
                    let gateway = u32::try_from(k).map_or(u32::MAX, |k| k.saturating_add(1));
                    let backend = c.arg(0).and_then(Amf0Value::as_f64).unwrap_or(0.0);
                    // Stream ids are small integers; anything else maps to nothing.
                    let backend = if (1.0..=f64::from(u32::MAX)).contains(&backend) {
                        backend as u32
                    } else {
                        0
                    };
                    if backend != gateway {
                        tracing::info!(
                            "{}: the backend gave stream id {backend} where the gateway gave {gateway}; its replies are mapped, the client's messages go unchanged",
                            self.label
                        );
                    }
                    if self.ids.len() < MAX_EARLY_COMMANDS {
                        self.ids.push((backend, gateway));
                    }
                }
            }
            // The gateway sent its own after connect (and onFCPublish after FCPublish).
            "onBWDone" => {}
            "onFCPublish" if self.early.fc_publish => self.early.fc_publish = false,
            _ => self.emit(msg),
        }
    }

    /// The backend refused a command the gateway had already accepted: the client is told
    /// its publish or play failed, with the backend's reason, and the session ends.
    fn refused(&mut self, what: &str, c: &message::Command) {
        let why = c
            .arg(0)
            .and_then(|i| i.get("description").or_else(|| i.get("code")))
            .and_then(Amf0Value::as_str)
            .unwrap_or("no reason given");
        let why: String = why.chars().take(200).collect();
        tracing::info!(
            "{}: the backend refused the replayed {what} of '{}': {}",
            self.label,
            self.early.name,
            why.escape_default()
        );
        let code = match self.early.action {
            Action::Publish => "NetStream.Publish.BadName",
            _ => "NetStream.Play.Failed",
        };
        let m = cmd::on_status(
            self.early.stream_id,
            "error",
            code,
            &format!("The backend refused the {what}: {why}"),
            Some(&self.early.name),
        );
        self.encoder.write(cmd::CSID_COMMAND, &m, &mut self.out);
        self.ending = true;
    }
}

impl<L: AsyncRead + Unpin> AsyncRead for Rechunk<L> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Fills `buf` for as long as the backend has bytes ready: a read shorter than `buf`
        // must mean the backend's socket is empty, because the pump's merge window waits for
        // its next tick after a short read (returning one backend read per call capped a
        // hash group's player at one read per window, ~13 Mb/s with the 40 ms default).
        let mut put_any = false;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(this.out.get(..n).unwrap_or_default());
                this.out.advance(n);
                put_any = true;
                if buf.remaining() == 0 || !this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            if this.ending {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.read);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending if put_any => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        // The backend closed: so does the client's side.
                        return Poll::Ready(Ok(()));
                    }
                    this.inbuf.extend_from_slice(rb.filled());
                }
            }
            while !this.ending {
                match this.decoder.decode(&mut this.inbuf) {
                    Ok(Some(msg)) => this.handle(msg),
                    Ok(None) => break,
                    Err(e) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("bad chunk stream from the backend: {e}"),
                        )))
                    }
                }
            }
        }
    }
}

impl<L: AsyncWrite + Unpin> AsyncWrite for Rechunk<L> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::message::command_message;

    fn early(action: Action) -> Early {
        Early {
            key: "live/x".into(),
            action,
            name: "x".into(),
            stream_id: 1,
            connect_txn: 1.0,
            answered: vec![1.0, 2.0, 4.0],
            create_txns: vec![4.0],
            fc_publish: true,
            chunk_size: 4096,
            rtmpe: false,
        }
    }

    /// What the client decodes from `bytes` (it was told chunk size 4096 already).
    fn client_reads(bytes: &[u8]) -> Vec<Message> {
        let mut dec = ChunkDecoder::new(&Limits::default());
        let mut buf = BytesMut::new();
        ChunkEncoder::new().write(2, &message::set_chunk_size(4096), &mut buf);
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            if m.msg_type != message::SET_CHUNK_SIZE || !out.is_empty() {
                out.push(m);
            }
        }
        assert!(buf.is_empty(), "a partial chunk left over");
        // The leading Set Chunk Size is the test's own.
        out
    }

    /// Runs `backend` (chunked as the backend does) through [`Rechunk`] to its end.
    async fn rechunk(e: Early, backend: &[Message]) -> Vec<u8> {
        let mut bytes = BytesMut::new();
        let mut enc = ChunkEncoder::new();
        for m in backend {
            let csid = if m.msg_type <= message::SET_PEER_BANDWIDTH {
                2
            } else {
                3
            };
            enc.write(csid, m, &mut bytes);
        }
        let (mut far, near) = tokio::io::duplex(1 << 20);
        far.write_all(&bytes).await.unwrap();
        drop(far);
        let limits = Limits::default();
        let budget = PeerBudget::global_only();
        let mut r = Rechunk::new(near, e, &limits, &budget, "test");
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    fn name(m: &Message) -> String {
        message::decode_command(m, &AmfLimits::default())
            .map(|c| format!("{} {}", c.name, c.txn))
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn drops_answered_replies_and_maps_stream_ids() {
        let video = Message::new(message::VIDEO, 40, 7, vec![9u8; 10_000]);
        let backend = [
            message::window_ack_size(2_500_000),
            message::set_peer_bandwidth(2_500_000, message::LimitType::Dynamic),
            message::set_chunk_size(1000),
            command_message(0, "_result", 1.0, &[Amf0Value::Null, Amf0Value::Null]),
            command_message(0, "onBWDone", 0.0, &[Amf0Value::Null]),
            command_message(
                0,
                "_result",
                4.0,
                &[Amf0Value::Null, Amf0Value::Number(7.0)],
            ),
            command_message(0, "onFCPublish", 0.0, &[Amf0Value::Null]),
            UserControl::StreamBegin(7).to_message(),
            command_message(7, "onStatus", 0.0, &[Amf0Value::Null]),
            video.clone(),
            command_message(0, "_result", 9.0, &[Amf0Value::Null]),
        ];
        let got = client_reads(&rechunk(early(Action::Play), &backend).await);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(
            UserControl::decode(&got[0].payload).unwrap(),
            UserControl::StreamBegin(1)
        );
        assert_eq!((name(&got[1]), got[1].stream_id), ("onStatus 0".into(), 1));
        assert_eq!(got[2].payload, video.payload);
        assert_eq!((got[2].stream_id, got[2].timestamp), (1, 40));
        assert_eq!(name(&got[3]), "_result 9");
    }

    #[tokio::test]
    async fn a_backend_numbering_every_stream_1_maps_to_the_latest() {
        let mut e = early(Action::Play);
        e.answered = vec![1.0, 2.0, 3.0];
        e.create_txns = vec![2.0, 3.0];
        e.stream_id = 2;
        let one = || Amf0Value::Number(1.0);
        let backend = [
            command_message(0, "_result", 1.0, &[Amf0Value::Null, Amf0Value::Null]),
            command_message(0, "_result", 2.0, &[Amf0Value::Null, one()]),
            command_message(0, "_result", 3.0, &[Amf0Value::Null, one()]),
            command_message(1, "onStatus", 0.0, &[Amf0Value::Null]),
        ];
        let got = client_reads(&rechunk(e, &backend).await);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].stream_id, 2);
    }

    #[tokio::test]
    async fn a_backend_refusing_connect_fails_the_stream() {
        let backend = [
            command_message(0, "_error", 1.0, &[Amf0Value::Null, status()]),
            command_message(1, "onStatus", 0.0, &[Amf0Value::Null]),
        ];
        let got = client_reads(&rechunk(early(Action::Publish), &backend).await);
        assert_eq!(got.len(), 1, "{got:?}");
        let c = message::decode_command(&got[0], &AmfLimits::default()).unwrap();
        let info = c.arg(0).unwrap();
        assert_eq!(
            info.get("code").and_then(Amf0Value::as_str),
            Some("NetStream.Publish.BadName")
        );
        let desc = info.get("description").and_then(Amf0Value::as_str).unwrap();
        assert!(desc.contains("no such app"), "{desc}");
    }

    fn status() -> Amf0Value {
        Amf0Value::object([
            ("level", Amf0Value::string("error")),
            ("description", Amf0Value::string("no such app")),
        ])
    }

    #[tokio::test]
    async fn answers_until_play_and_keeps_every_byte() {
        let mut bytes = BytesMut::new();
        let mut enc = ChunkEncoder::new();
        let connect = command_message(
            0,
            "connect",
            1.0,
            &[Amf0Value::object([("app", Amf0Value::string("live"))])],
        );
        enc.write(3, &connect, &mut bytes);
        enc.write(
            3,
            &command_message(0, "createStream", 2.0, &[Amf0Value::Null]),
            &mut bytes,
        );
        let play = [Amf0Value::Null, Amf0Value::string("x?token=1")];
        enc.write(8, &command_message(1, "play", 0.0, &play), &mut bytes);
        let (mut client, mut gw) = tokio::io::duplex(1 << 16);
        client.write_all(&bytes).await.unwrap();
        let limits = Limits::default();
        let budget = PeerBudget::global_only();
        let mut raw = BytesMut::new();
        let mut charge = Charge::global();
        let e = answer_until_stream(&mut gw, &mut raw, &mut charge, &limits, &budget, false)
            .await
            .unwrap();
        assert_eq!(e.key, "live/x");
        assert_eq!(e.action, Action::Play);
        assert_eq!((e.stream_id, e.connect_txn), (1, 1.0));
        assert_eq!(e.answered, [1.0, 2.0]);
        assert_eq!(e.create_txns, [2.0]);
        assert_eq!(e.chunk_size, 4096);
        assert_eq!(&raw[..], &bytes[..], "every byte kept for the replay");
        drop(gw);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let mut dec = ChunkDecoder::new(&limits);
        let mut buf = BytesMut::from(&answer[..]);
        let mut names = Vec::new();
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            names.push(name(&m));
        }
        let names: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names, ["_result 1", "onBWDone 0", "_result 2"]);
    }
}
