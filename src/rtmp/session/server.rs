//! The server side of an RTMP connection after the handshake, without IO.
//!
//! Feed it what the client sent ([`ServerSession::poll`] with the read buffer and `now`),
//! take what it wants sent ([`ServerSession::take_output`]), and answer its requests. It
//! decodes chunks, answers the commands that need no decision (createStream, FC*, ping,
//! unknown calls), and turns connect, publish and play into requests: the replies a client
//! waits for are queued when the application calls [`ServerSession::accept`] or
//! [`ServerSession::reject`], so a decision taken elsewhere (a hub, an authorization
//! check) still yields the exact FMS sequences ffmpeg, librtmp and OBS rely on.
//!
//! Everything it queues goes through one chunk encoder, in order. Media for players is
//! not encoded here: the engine writes frames chunked once for all players, at
//! [`ServerSession::out_chunk_size`], after taking this session's output, so a reply such
//! as Play.Start always precedes the media it announces.
//!
//! Bounds: messages per second (decoding pauses and says for how long), malformed messages
//! (past the limit the session ends), replies queued and not yet written (decoding stops
//! until [`ServerSession::flushed`]), the AMF limits on every payload, and the chunk
//! decoder's own limits and memory charge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::command::{self as cmd, CSID_COMMAND, CSID_CONTROL};
use super::{leading_amf0_string, name_and_query, MessageRate, SessionLimits};
use crate::amf0::Amf0Value;
use crate::chunk::{ChunkDecoder, ChunkEncoder, ChunkError};
use crate::message::{self, LimitType, Message, UserControl, AUDIO, DATA_AMF0, DATA_AMF3, VIDEO};

/// How the server presents itself; the engine builds it from its configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub limits: SessionLimits,
    /// Chunk size announced (Set Chunk Size) and used for everything sent.
    pub chunk_size: u32,
    /// Window Acknowledgement Size announced on connect.
    pub window_ack_size: u32,
    /// Set Peer Bandwidth announced on connect.
    pub peer_bandwidth: u32,
    /// Message streams (createStream) one connection may open.
    pub max_streams: u32,
    /// Announce the large chunk size on connect; when false (RTMPE), only when the client
    /// plays: ffmpeg's RTMPE writer encrypts its buffer in place, and when publishing it
    /// echoes a Set Chunk Size and then reads the new size from the now-encrypted bytes
    /// ("Incorrect chunk size"), so an RTMPE publisher must never be sent one.
    pub chunk_size_on_connect: bool,
    /// How long a player waits for a publisher (before the first, or after one leaves)
    /// before it is told NetStream.Play.Stop and the session ends.
    pub player_wait: Duration,
    /// getStreamLength is the application's to answer ([`ServerEvent::StreamLength`], then
    /// [`ServerSession::stream_length`]): the engine with a VOD directory knows files'
    /// durations. Otherwise it is answered at once with 0 (live streams have no length).
    pub stream_length_by_app: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: SessionLimits::default(),
            chunk_size: 4096,
            window_ack_size: 5_000_000,
            peer_bandwidth: 5_000_000,
            max_streams: 16,
            chunk_size_on_connect: true,
            player_wait: Duration::from_secs(60),
            stream_length_by_app: false,
        }
    }
}

/// Names a request the application must answer with [`ServerSession::accept`] or
/// [`ServerSession::reject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// A publish or play request: where and what.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRequest {
    pub request_id: RequestId,
    /// The message stream the command came on.
    pub stream_id: u32,
    /// The application name accepted at connect.
    pub app: String,
    /// The stream name, without its query.
    pub name: String,
    /// What followed `?` in the name (tokens, auth parameters), or empty.
    pub query: String,
}

/// What a client's connect asked for (boxed in [`ServerEvent`], which stays small: one is
/// moved per media message).
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectRequest {
    pub request_id: RequestId,
    /// The application name, without its query.
    pub app: String,
    /// What followed `?` in the app name, or empty.
    pub query: String,
    pub tc_url: Option<String>,
    pub flash_ver: Option<String>,
    pub swf_url: Option<String>,
    pub page_url: Option<String>,
    pub object_encoding: f64,
}

/// What the client did that the application handles.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerEvent {
    /// connect: answer with accept (Connect.Success) or reject (Connect.Rejected; the
    /// session then ends).
    ConnectRequested(Box<ConnectRequest>),
    /// publish: accept (StreamBegin, Publish.Start; media events follow) or reject
    /// (Publish.BadName, the connection stays).
    PublishRequested {
        request: Box<StreamRequest>,
        /// "live", "record" or "append" as the client asked.
        publish_type: String,
    },
    /// play (or play2): the previous play on this connection is over. Accept (StreamBegin,
    /// Play.Reset, Play.Start, |RtmpSampleAccess, Data.Start) or reject (Play.Failed).
    PlayRequested {
        request: Box<StreamRequest>,
        /// Start position as sent (-2: live or recorded, -1: live only), if any.
        start: Option<f64>,
        /// play2 with transition "switch": move the current play to this name at the new
        /// rendition's next keyframe (accept answers NetStream.Play.Transition; then
        /// [`ServerSession::transition_complete`]). A refusal leaves the play as it was.
        switch: bool,
    },
    /// deleteStream or closeStream: whatever was published or played on it is over.
    StreamDeleted {
        stream_id: u32,
    },
    /// FCUnpublish: the client says it stops publishing `name` (it may delete the stream
    /// next, or not).
    FcUnpublish {
        name: String,
    },
    /// releaseStream and FCPublish, announced before a publish (answered already).
    ReleaseStream {
        name: String,
    },
    FcPublish {
        name: String,
    },
    /// pause / unpause of the accepted play (Notify already queued).
    Pause {
        stream_id: u32,
        paused: bool,
    },
    /// seek on a play accepted with [`ServerSession::accept_recorded`] (a live play is
    /// answered without one): the application moves the play and calls
    /// [`ServerSession::seeked`]. `ms` is the position asked for (finite, not negative).
    Seek {
        stream_id: u32,
        ms: f64,
    },
    /// getStreamLength, when [`ServerConfig::stream_length_by_app`]: answer with
    /// [`ServerSession::stream_length`]. `name` is as the client sent it.
    StreamLength {
        txn: f64,
        name: String,
    },
    /// receiveAudio / receiveVideo on the accepted play.
    ReceiveAudio {
        stream_id: u32,
        on: bool,
    },
    ReceiveVideo {
        stream_id: u32,
        on: bool,
    },
    /// Audio or video from an accepted publisher (the decoder's buffer, not a copy).
    Media(Message),
    /// Data (`onMetaData`...) from an accepted publisher, as a type 18 body: the AMF3
    /// format byte and a leading `@setDataFrame` are removed.
    Data {
        timestamp: u32,
        payload: Bytes,
    },
    /// Every command decoded, before what it leads to (for the application's debug log).
    Command {
        stream_id: u32,
        name: String,
        txn: f64,
    },
    /// A malformed message the session skipped (the next ones past
    /// `max_protocol_errors` end it): for the application's log.
    Malformed(String),
}

/// What [`ServerSession::poll`] stopped at.
#[derive(Debug, PartialEq)]
pub enum Poll {
    Event(ServerEvent),
    /// Every complete message in the buffer is handled.
    NeedInput,
    /// Past `max_messages_per_sec`: poll again after this long.
    RateLimited(Duration),
    /// Replies over `max_reply_queue` wait to be written: poll again after
    /// [`ServerSession::flushed`].
    RepliesFull,
    /// A request waits for accept or reject.
    AwaitingDecision,
}

/// Why the session ended.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bad chunk stream from the client: {0}")]
    Chunk(#[from] ChunkError),
    #[error("connect refused: {0}")]
    Rejected(String),
    #[error(
        "closed after {count} malformed messages (limits.max_protocol_errors); the last: {last}"
    )]
    ProtocolErrors { count: u32, last: String },
    #[error("no publisher came within {0:?}")]
    NoPublisher(Duration),
}

/// The events one message raises, in order. The first is held inline (a media message
/// raises one, so a publisher allocates nothing per message); a second (a command and what
/// it requests) goes to `more`, which is freed once drained: an idle connection holds no
/// allocation for them, and a second inline slot would be 56 bytes of every connection.
#[derive(Debug, Default)]
pub(super) struct Events {
    first: Option<ServerEvent>,
    more: VecDeque<ServerEvent>,
}

impl Events {
    pub(super) fn push_back(&mut self, ev: ServerEvent) {
        // `first` is empty only when `more` is (see `pop_front`).
        if self.first.is_none() {
            self.first = Some(ev);
        } else {
            self.more.push_back(ev);
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<ServerEvent> {
        let ev = self.first.take()?;
        self.first = self.more.pop_front();
        if self.more.is_empty() && self.more.capacity() > 0 {
            self.more = VecDeque::new();
        }
        Some(ev)
    }
}

/// A request waiting for the application's answer.
#[derive(Debug)]
enum Pending {
    Connect {
        id: RequestId,
        txn: f64,
        app: String,
        object_encoding: f64,
    },
    Publish {
        id: RequestId,
        stream_id: u32,
        name: String,
    },
    Play {
        id: RequestId,
        stream_id: u32,
        name: String,
        /// A play2 switch: the play goes on, under the new name, once accepted.
        switch: bool,
    },
}

/// The accepted play: what pause, seek and the publisher notices refer to.
#[derive(Debug)]
struct Playing {
    stream_id: u32,
    name: String,
    /// A recorded stream (a file): seek is the application's, and notices say so.
    recorded: bool,
    /// When the wait for a publisher ends (Play.Stop), while there is none.
    wait_until: Option<Instant>,
}

/// One client connection's protocol state on the server side.
#[derive(Debug)]
pub struct ServerSession {
    /// Shared: every connection of one engine generation has the same settings, and a copy
    /// would be 96 bytes of every connection.
    cfg: Arc<ServerConfig>,
    decoder: ChunkDecoder,
    encoder: ChunkEncoder,
    /// Encoded messages not yet taken by the application.
    out: BytesMut,
    /// Bytes queued since the application last said the output was written.
    unflushed: usize,
    out_chunk_size: u32,
    bytes_in: u64,
    last_ack: u64,
    ack_window: u64,
    rate: MessageRate,
    protocol_errors: u32,
    events: Events,
    /// The parts of an aggregate message still to be handled, one per poll step (boxed:
    /// only a publisher sending aggregates has any).
    aggregate: Option<Box<std::vec::IntoIter<Message>>>,
    /// Boxed (as `closing`): only a connection with a request being decided holds one, and
    /// inline every idle connection would carry its size.
    pending: Option<Box<Pending>>,
    /// Set while [`ServerSession::accept_recorded`] runs `accept`.
    accepting_recorded: bool,
    next_request: u64,
    /// The session ends with this at the next poll (a refused connect). Boxed: rare.
    closing: Option<Box<ServerError>>,
    app: Option<String>,
    streams_created: u32,
    publishing: Option<u32>,
    /// Boxed: only a player has one.
    playing: Option<Box<Playing>>,
}

impl ServerSession {
    /// A session whose peer's chunks `decoder` reassembles (built with the caller's limits
    /// and memory charge); `now` starts the message-rate clock.
    pub fn new(cfg: impl Into<Arc<ServerConfig>>, decoder: ChunkDecoder, now: Instant) -> Self {
        let cfg = cfg.into();
        let rate = MessageRate::per_second(cfg.limits.max_messages_per_sec, now);
        let ack_window = u64::from(cfg.window_ack_size);
        ServerSession {
            cfg,
            decoder,
            encoder: ChunkEncoder::new(),
            out: BytesMut::new(),
            unflushed: 0,
            out_chunk_size: crate::chunk::DEFAULT_CHUNK_SIZE,
            bytes_in: 0,
            last_ack: 0,
            ack_window,
            rate,
            protocol_errors: 0,
            events: Events::default(),
            aggregate: None,
            pending: None,
            accepting_recorded: false,
            next_request: 1,
            closing: None,
            app: None,
            streams_created: 0,
            publishing: None,
            playing: None,
        }
    }

    /// The chunk size everything sent to this client uses (frames chunked elsewhere too).
    pub fn out_chunk_size(&self) -> u32 {
        self.out_chunk_size
    }

    /// The application name accepted at connect.
    pub fn app(&self) -> Option<&str> {
        self.app.as_deref()
    }

    /// Counts `n` bytes read from the client (handshake included), for Acknowledgements.
    pub fn received(&mut self, n: usize) {
        self.bytes_in = self.bytes_in.saturating_add(n as u64);
    }

    /// Bytes to write to the client, in order, if any.
    pub fn take_output(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            return None;
        }
        // The whole buffer goes: `split` would leave `out` sharing the allocation (its
        // spare capacity), keeping the last replies' bytes alive for as long as the
        // connection is idle.
        Some(std::mem::take(&mut self.out).freeze())
    }

    /// Everything taken so far is written: the reply bound starts again.
    pub fn flushed(&mut self) {
        self.unflushed = 0;
    }

    /// Decodes what `buf` holds until something needs the application: an event, a
    /// decision, the rate or reply bound, or more input. Consumed bytes leave `buf`.
    pub fn poll(&mut self, buf: &mut BytesMut, now: Instant) -> Result<Poll, ServerError> {
        loop {
            if let Some(e) = self.closing.take() {
                return Err(*e);
            }
            if let Some(ev) = self.events.pop_front() {
                return Ok(Poll::Event(ev));
            }
            if let Some(parts) = &mut self.aggregate {
                match parts.next() {
                    Some(part) => {
                        self.on_message(part)?;
                        continue;
                    }
                    None => self.aggregate = None,
                }
            }
            if self.pending.is_some() {
                self.ack();
                return Ok(Poll::AwaitingDecision);
            }
            if self.unflushed >= self.cfg.limits.max_reply_queue {
                // Write the replies before decoding more (and reading more) of this client.
                self.ack();
                return Ok(Poll::RepliesFull);
            }
            if let Err(wait) = self.rate.ready(now) {
                self.ack();
                return Ok(Poll::RateLimited(wait));
            }
            match self.decoder.decode(buf)? {
                Some(msg) => {
                    self.rate.spend();
                    self.on_message(msg)?;
                }
                None => {
                    self.ack();
                    return Ok(Poll::NeedInput);
                }
            }
        }
    }

    /// When [`ServerSession::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.playing.as_ref().and_then(|p| p.wait_until)
    }

    /// A player that waited `player_wait` with no publisher is told Play.Stop, and the
    /// session ends.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ServerError> {
        let due = self
            .playing
            .as_ref()
            .and_then(|p| p.wait_until)
            .is_some_and(|w| w <= now);
        if !due {
            return Ok(());
        }
        let wait = self.cfg.player_wait;
        if let Some(p) = self.playing.take() {
            let key = format!("{}/{}", self.app.as_deref().unwrap_or_default(), p.name);
            let m = cmd::on_status(
                p.stream_id,
                "status",
                "NetStream.Play.Stop",
                &format!("No publisher on {key} within {wait:?}."),
                Some(&p.name),
            );
            self.send(CSID_COMMAND, &m);
        }
        Err(ServerError::NoPublisher(wait))
    }

    /// Grants a request: queues the replies the client waits for.
    pub fn accept(&mut self, id: RequestId) {
        let Some(p) = self.take_pending(id) else {
            return;
        };
        match p {
            Pending::Connect {
                txn,
                app,
                object_encoding,
                ..
            } => {
                self.send_control(&message::window_ack_size(self.cfg.window_ack_size));
                self.send_control(&message::set_peer_bandwidth(
                    self.cfg.peer_bandwidth,
                    LimitType::Dynamic,
                ));
                if self.cfg.chunk_size_on_connect {
                    self.raise_chunk_size();
                }
                self.send(CSID_COMMAND, &cmd::connect_result(txn, object_encoding));
                self.send(CSID_COMMAND, &cmd::on_bw_done());
                self.app = Some(app);
            }
            Pending::Publish {
                stream_id, name, ..
            } => {
                self.publishing = Some(stream_id);
                self.send_control(&UserControl::StreamBegin(stream_id).to_message());
                let m = cmd::on_status(
                    stream_id,
                    "status",
                    "NetStream.Publish.Start",
                    &format!("{name} is now published."),
                    Some(&name),
                );
                self.send(CSID_COMMAND, &m);
            }
            Pending::Play {
                stream_id,
                name,
                switch: true,
                ..
            } => {
                // play2 "switch": the play goes on; the application moves it to the new
                // rendition at its next keyframe and then calls `transition_complete`.
                let desc = format!("Transition to {name}.");
                let m = cmd::on_status(
                    stream_id,
                    "status",
                    "NetStream.Play.Transition",
                    &desc,
                    Some(&name),
                );
                self.send(CSID_COMMAND, &m);
                let recorded = std::mem::take(&mut self.accepting_recorded);
                self.playing = Some(Box::new(Playing {
                    stream_id,
                    name,
                    recorded,
                    wait_until: None,
                }));
            }
            Pending::Play {
                stream_id, name, ..
            } => {
                self.raise_chunk_size();
                if self.accepting_recorded {
                    // FMS and nginx-rtmp announce a file this way; Flash shows its duration.
                    self.send_control(&UserControl::StreamIsRecorded(stream_id).to_message());
                }
                self.send_control(&UserControl::StreamBegin(stream_id).to_message());
                let desc = format!("Started playing {name}.");
                for code in ["NetStream.Play.Reset", "NetStream.Play.Start"] {
                    let m = cmd::on_status(stream_id, "status", code, &desc, Some(&name));
                    self.send(CSID_COMMAND, &m);
                }
                self.send(CSID_COMMAND, &cmd::sample_access(stream_id));
                self.send(CSID_COMMAND, &cmd::data_start(stream_id));
                let recorded = std::mem::take(&mut self.accepting_recorded);
                self.playing = Some(Box::new(Playing {
                    stream_id,
                    name,
                    recorded,
                    wait_until: None,
                }));
            }
        }
    }

    /// Grants a play of a recorded stream (a file): as [`ServerSession::accept`], with
    /// StreamIsRecorded first, and seek raised as [`ServerEvent::Seek`] from then on.
    pub fn accept_recorded(&mut self, id: RequestId) {
        self.accepting_recorded = true;
        self.accept(id);
        self.accepting_recorded = false;
    }

    /// The recorded play moved to `ms` (the keyframe at or before what seek asked): the
    /// old position's StreamEOF, StreamIsRecorded and StreamBegin, Seek.Notify, Play.Start.
    pub fn seeked(&mut self, ms: u32) {
        let Some(p) = &self.playing else {
            return;
        };
        let (sid, name) = (p.stream_id, p.name.clone());
        self.send_control(&UserControl::StreamEof(sid).to_message());
        self.send_control(&UserControl::StreamIsRecorded(sid).to_message());
        self.send_control(&UserControl::StreamBegin(sid).to_message());
        let desc = format!("Seeking {ms} ms (stream ID: {sid}).");
        let m = cmd::on_status(sid, "status", "NetStream.Seek.Notify", &desc, Some(&name));
        self.send(CSID_COMMAND, &m);
        let desc = format!("Started playing {name}.");
        let m = cmd::on_status(sid, "status", "NetStream.Play.Start", &desc, Some(&name));
        self.send(CSID_COMMAND, &m);
    }

    /// The recorded play reached the end of its file: StreamEOF, onPlayStatus
    /// NetStream.Play.Complete (Flash, librtmp) and onStatus NetStream.Play.Stop (ffmpeg
    /// stops on it). The play stays (a seek may restart it).
    pub fn play_complete(&mut self, duration_ms: u64, bytes: u64) {
        let Some(p) = &self.playing else {
            return;
        };
        let (sid, name) = (p.stream_id, p.name.clone());
        self.send_control(&UserControl::StreamEof(sid).to_message());
        self.send(CSID_COMMAND, &cmd::play_complete(sid, duration_ms, bytes));
        let desc = format!("Stopped playing {name}.");
        let m = cmd::on_status(sid, "status", "NetStream.Play.Stop", &desc, Some(&name));
        self.send(CSID_COMMAND, &m);
    }

    /// The accepted play cannot go on (an unreadable file): NetStream.Play.Failed with
    /// `description`, then StreamEOF. The play is over; the connection stays.
    pub fn play_failed(&mut self, description: &str) {
        let Some(p) = self.playing.take() else {
            return;
        };
        let m = cmd::on_status(
            p.stream_id,
            "error",
            "NetStream.Play.Failed",
            description,
            Some(&p.name),
        );
        self.send(CSID_COMMAND, &m);
        self.send_control(&UserControl::StreamEof(p.stream_id).to_message());
    }

    /// The play moved to the rendition a play2 switch asked for (its first keyframe is
    /// next): onPlayStatus NetStream.Play.TransitionComplete, as Flash's dynamic streaming
    /// waits for.
    pub fn transition_complete(&mut self) {
        let Some(p) = &self.playing else {
            return;
        };
        let m = cmd::transition_complete(p.stream_id, &p.name);
        self.send(CSID_COMMAND, &m);
    }

    /// Answers getStreamLength (see [`ServerConfig::stream_length_by_app`]): `secs`, 0 for
    /// a live stream or an unknown name.
    pub fn stream_length(&mut self, txn: f64, secs: f64) {
        self.send(
            CSID_COMMAND,
            &cmd::result(txn, vec![Amf0Value::Number(secs)]),
        );
    }

    /// Refuses a request with the protocol's code for it (Connect.Rejected,
    /// Publish.BadName, Play.Failed) and `description` for the person behind the client.
    pub fn reject(&mut self, id: RequestId, description: &str) {
        let code = match self.pending.as_deref() {
            Some(Pending::Connect { .. }) => "NetConnection.Connect.Rejected",
            Some(Pending::Publish { .. }) => "NetStream.Publish.BadName",
            Some(Pending::Play { .. }) => "NetStream.Play.Failed",
            None => return,
        };
        self.reject_with(id, code, description);
    }

    /// Refuses a request with a status code of the application's choice (for example
    /// `NetStream.Publish.Unauthorized`).
    pub fn reject_with(&mut self, id: RequestId, code: &str, description: &str) {
        let Some(p) = self.take_pending(id) else {
            return;
        };
        match p {
            Pending::Connect { txn, .. } => {
                // FMS answers a refused connect with `_error` carrying Connect.Rejected.
                self.send(CSID_COMMAND, &cmd::error(txn, code, description));
                self.closing = Some(Box::new(ServerError::Rejected(description.to_owned())));
            }
            Pending::Publish {
                stream_id, name, ..
            }
            | Pending::Play {
                stream_id, name, ..
            } => {
                let m = cmd::on_status(stream_id, "error", code, description, Some(&name));
                self.send(CSID_COMMAND, &m);
            }
        }
    }

    /// Serves a pending publish or play under another stream name (`raw`, a query after
    /// `?` dropped), as an authorization callback may ask; the replies carry the new name.
    /// Returns the new name; a name that is not a valid one refuses the request as an
    /// invalid name from the client would be, and returns `None`.
    pub fn rename(&mut self, id: RequestId, raw: &str) -> Option<String> {
        let max = self.cfg.limits.max_name_len;
        let Some(Pending::Publish { id: p, name, .. } | Pending::Play { id: p, name, .. }) =
            self.pending.as_deref_mut()
        else {
            return None;
        };
        if *p != id {
            return None;
        }
        if let Some(clean) = cmd::clean_name(raw, max) {
            name.clone_from(&clean);
            return Some(clean);
        }
        match self.pending.take().map(|p| *p) {
            Some(Pending::Publish { stream_id, .. }) => self.bad_publish_name(stream_id, raw),
            Some(Pending::Play { stream_id, .. }) => self.bad_play_name(stream_id, raw),
            _ => {}
        }
        None
    }

    /// The accepted play's stream has no publisher now (the play started before one came):
    /// the wait for one starts (Play.Stop at its end).
    pub fn wait_for_publisher(&mut self, now: Instant) {
        let until = now.checked_add(self.cfg.player_wait);
        if let Some(p) = &mut self.playing {
            p.wait_until = Some(until.unwrap_or(now + Duration::from_secs(86_400 * 365)));
        }
    }

    /// A publisher started on the accepted play's stream: StreamBegin, and
    /// Play.PublishNotify when `notify` (the play saw an earlier publisher leave).
    pub fn publisher_started(&mut self, notify: bool) {
        let Some(p) = &mut self.playing else {
            return;
        };
        p.wait_until = None;
        let (sid, name) = (p.stream_id, p.name.clone());
        self.send_control(&UserControl::StreamBegin(sid).to_message());
        if notify {
            let m = cmd::on_status(
                sid,
                "status",
                "NetStream.Play.PublishNotify",
                &format!("{name} is now published."),
                Some(&name),
            );
            self.send(CSID_COMMAND, &m);
        }
    }

    /// The publisher of the accepted play's stream left: Play.UnpublishNotify, StreamEOF,
    /// and the wait for the next one starts.
    pub fn publisher_stopped(&mut self, now: Instant) {
        let Some(p) = &self.playing else {
            return;
        };
        let (sid, name) = (p.stream_id, p.name.clone());
        let m = cmd::on_status(
            sid,
            "status",
            "NetStream.Play.UnpublishNotify",
            &format!("{name} is now unpublished."),
            Some(&name),
        );
        self.send(CSID_COMMAND, &m);
        self.send_control(&UserControl::StreamEof(sid).to_message());
        self.wait_for_publisher(now);
    }

    fn take_pending(&mut self, id: RequestId) -> Option<Pending> {
        let matches = match self.pending.as_deref() {
            Some(Pending::Connect { id: p, .. })
            | Some(Pending::Publish { id: p, .. })
            | Some(Pending::Play { id: p, .. }) => *p == id,
            None => false,
        };
        if matches {
            self.pending.take().map(|p| *p)
        } else {
            None
        }
    }

    fn request_id(&mut self) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request = self.next_request.wrapping_add(1);
        id
    }

    /// Acknowledge each window of bytes received, as the peer's Window Ack Size asks.
    fn ack(&mut self) {
        if self.ack_window > 0 && self.bytes_in.saturating_sub(self.last_ack) >= self.ack_window {
            self.last_ack = self.bytes_in;
            // The sequence number wraps at 32 bits by definition.
            let seq = (self.bytes_in & 0xffff_ffff) as u32;
            self.send_control(&message::acknowledgement(seq));
        }
    }

    fn send(&mut self, csid: u32, msg: &Message) {
        let before = self.out.len();
        self.encoder.write(csid, msg, &mut self.out);
        self.unflushed = self
            .unflushed
            .saturating_add(self.out.len().saturating_sub(before));
    }

    fn send_control(&mut self, msg: &Message) {
        self.send(CSID_CONTROL, msg);
    }

    fn raise_chunk_size(&mut self) {
        let cs = self.cfg.chunk_size;
        if self.out_chunk_size == cs {
            return;
        }
        self.send_control(&message::set_chunk_size(cs));
        self.encoder.set_chunk_size(cs);
        self.out_chunk_size = cs;
    }

    /// A malformed message: reported, and past `max_protocol_errors` the end.
    fn protocol_error(&mut self, what: String) -> Result<(), ServerError> {
        self.protocol_errors = self.protocol_errors.saturating_add(1);
        if self.protocol_errors > self.cfg.limits.max_protocol_errors {
            return Err(ServerError::ProtocolErrors {
                count: self.protocol_errors,
                last: what,
            });
        }
        self.events.push_back(ServerEvent::Malformed(what));
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), ServerError> {
        match msg.msg_type {
            AUDIO | VIDEO if self.publishing.is_some() => {
                self.events.push_back(ServerEvent::Media(msg));
            }
            // Media before an accepted publish (or after it ended) goes nowhere.
            AUDIO | VIDEO => {}
            DATA_AMF0 | DATA_AMF3 => self.on_data(msg),
            message::COMMAND_AMF0 | message::COMMAND_AMF3 => {
                match message::decode_command(&msg, &self.cfg.limits.amf) {
                    Ok(c) => self.on_command(msg.stream_id, &c.name, c.txn, &c.args)?,
                    Err(e) => self.protocol_error(format!("undecodable command: {e}"))?,
                }
            }
            // Its parts are handled one by one by `poll` (split_aggregate refuses nested ones).
            message::AGGREGATE => match message::split_aggregate(&msg) {
                Ok(parts) => self.aggregate = Some(Box::new(parts.into_iter())),
                Err(e) => self.protocol_error(format!("bad aggregate message: {e}"))?,
            },
            message::WINDOW_ACK_SIZE => {
                if let Ok(w) = message::parse_window_ack_size(&msg.payload) {
                    if w > 0 {
                        self.ack_window = u64::from(w);
                    }
                }
            }
            message::USER_CONTROL => {
                if let Ok(UserControl::PingRequest(t)) = UserControl::decode(&msg.payload) {
                    self.send_control(&UserControl::PingResponse(t).to_message());
                }
            }
            // Set Chunk Size and Abort were applied by the decoder; acks need no answer.
            _ => {}
        }
        Ok(())
    }

    /// Data from a publisher: `@setDataFrame` metadata is passed on as plain `onMetaData`.
    fn on_data(&mut self, msg: Message) {
        if self.publishing.is_none() {
            return;
        }
        let mut payload = msg.payload;
        if msg.msg_type == DATA_AMF3 && payload.first() == Some(&0) {
            // AMF3 data messages start with a 0 byte, then AMF0 values.
            let _ = payload.split_to(1);
        }
        if let Some(("@setDataFrame", used)) = leading_amf0_string(&payload) {
            let _ = payload.split_to(used);
        }
        self.events.push_back(ServerEvent::Data {
            timestamp: msg.timestamp,
            payload,
        });
    }

    fn on_command(
        &mut self,
        stream_id: u32,
        name: &str,
        txn: f64,
        args: &[Amf0Value],
    ) -> Result<(), ServerError> {
        // args[0] is the command object (null after connect); the call's own arguments follow.
        let arg = |i: usize| args.get(i);
        let arg_str = |i: usize| args.get(i).and_then(Amf0Value::as_str).unwrap_or_default();
        self.events.push_back(ServerEvent::Command {
            stream_id,
            name: name.to_owned(),
            txn,
        });
        match name {
            "connect" => self.on_connect(txn, arg(0))?,
            "createStream" => self.on_create_stream(txn),
            "releaseStream" | "_checkbw" => {
                self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Undefined]));
                if name == "releaseStream" {
                    let name = arg_str(1).to_owned();
                    self.events.push_back(ServerEvent::ReleaseStream { name });
                }
            }
            "FCPublish" | "FCUnpublish" | "FCSubscribe" | "FCUnsubscribe" => {
                self.on_fc(name, txn, arg_str(1))
            }
            "publish" => {
                let kind = arg_str(2);
                let kind = if kind.is_empty() { "live" } else { kind }.to_owned();
                self.on_publish(stream_id, arg_str(1), kind);
            }
            "play" => {
                let start = arg(2).and_then(Amf0Value::as_f64);
                self.on_play(stream_id, arg_str(1), start);
            }
            "play2" => self.on_play2(stream_id, arg(1)),
            "pause" | "pauseRaw" => {
                self.on_pause(arg(1).and_then(Amf0Value::as_bool).unwrap_or(true))
            }
            "seek" => self.on_seek(arg(1).and_then(Amf0Value::as_f64)),
            "deleteStream" => {
                let sid = arg(1).and_then(Amf0Value::as_f64).unwrap_or(0.0);
                self.close_stream(sid as u32);
            }
            "closeStream" => self.close_stream(stream_id),
            "getStreamLength" if self.cfg.stream_length_by_app => {
                let name = arg_str(1).to_owned();
                self.events
                    .push_back(ServerEvent::StreamLength { txn, name });
            }
            "getStreamLength" => {
                self.send(
                    CSID_COMMAND,
                    &cmd::result(txn, vec![Amf0Value::Number(0.0)]),
                );
            }
            "receiveAudio" | "receiveVideo" => {
                self.on_receive(name, arg(1).and_then(Amf0Value::as_bool).unwrap_or(true))
            }
            // Replies to what we sent (onBWDone...), and FMS bandwidth-check chatter.
            "_result" | "_error" | "onStatus" | "onBWDone" | "_onbwcheck" | "_onbwdone" => {}
            _ => self.send(CSID_COMMAND, &cmd::call_failed(txn, name)),
        }
        Ok(())
    }

    /// createStream: the next stream id, or `_error` past `max_streams`.
    fn on_create_stream(&mut self, txn: f64) {
        if self.streams_created >= self.cfg.max_streams {
            self.send(CSID_COMMAND, &cmd::call_failed(txn, "createStream"));
        } else {
            self.streams_created += 1;
            let id = f64::from(self.streams_created);
            self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Number(id)]));
        }
    }

    /// FCPublish, FCUnpublish, FCSubscribe (FMLE's and Akamai's calls around publish and
    /// play): the `onFC*` notice clients wait for, a `_result` where one is expected, and an
    /// event for the publish pair. FCUnsubscribe needs nothing.
    fn on_fc(&mut self, command: &str, txn: f64, stream: &str) {
        let (notice, code) = match command {
            "FCPublish" => ("onFCPublish", "NetStream.Publish.Start"),
            "FCUnpublish" => ("onFCUnpublish", "NetStream.Unpublish.Success"),
            "FCSubscribe" => ("onFCSubscribe", "NetStream.Play.Start"),
            _ => return,
        };
        self.send(CSID_COMMAND, &cmd::on_fc(notice, code, stream));
        let name = stream.to_owned();
        let event = match command {
            "FCPublish" => ServerEvent::FcPublish { name },
            "FCUnpublish" => ServerEvent::FcUnpublish { name },
            _ => return,
        };
        self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Undefined]));
        self.events.push_back(event);
    }

    /// play2 (NetStreamPlayOptions): transition "switch" or "swap" while playing moves the
    /// play to `streamName` (dynamic streaming between renditions); anything else, when
    /// not playing yet, starts a play of `streamName` from `start`.
    fn on_play2(&mut self, stream_id: u32, params: Option<&Amf0Value>) {
        let field = |k: &str| params.and_then(|o| o.get(k));
        let name = field("streamName")
            .and_then(Amf0Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let transition = field("transition")
            .and_then(Amf0Value::as_str)
            .unwrap_or_default();
        if name.is_empty() {
            return;
        }
        let playing = self
            .playing
            .as_ref()
            .is_some_and(|p| p.stream_id == stream_id);
        if playing && matches!(transition, "switch" | "swap") {
            self.on_play_switch(stream_id, &name);
        } else if self.playing.is_none() {
            let start = field("start").and_then(Amf0Value::as_f64);
            self.on_play(stream_id, &name, start);
        }
    }

    /// pause / pauseRaw while playing: the Pause/Unpause notice, and an event.
    fn on_pause(&mut self, paused: bool) {
        let Some(p) = &self.playing else {
            return;
        };
        let (sid, pname) = (p.stream_id, p.name.clone());
        let (code, desc) = if paused {
            ("NetStream.Pause.Notify", "Paused live stream.")
        } else {
            ("NetStream.Unpause.Notify", "Unpaused live stream.")
        };
        self.send(
            CSID_COMMAND,
            &cmd::on_status(sid, "status", code, desc, Some(&pname)),
        );
        self.events.push_back(ServerEvent::Pause {
            stream_id: sid,
            paused,
        });
    }

    /// seek while playing: a recorded play's is the application's; a live stream cannot
    /// seek, so say so and play on.
    fn on_seek(&mut self, ms: Option<f64>) {
        if let Some(p) = self.playing.as_ref().filter(|p| p.recorded) {
            let ms = ms.filter(|m| m.is_finite()).unwrap_or(0.0).max(0.0);
            let stream_id = p.stream_id;
            self.events.push_back(ServerEvent::Seek { stream_id, ms });
            return;
        }
        if let Some(sid) = self.playing.as_ref().map(|p| p.stream_id) {
            let m = cmd::on_status(
                sid,
                "status",
                "NetStream.Seek.Notify",
                "Seeking is not possible on a live stream; playing on.",
                None,
            );
            self.send(CSID_COMMAND, &m);
        }
    }

    /// receiveAudio / receiveVideo while playing: an event for the application.
    fn on_receive(&mut self, command: &str, on: bool) {
        if let Some(sid) = self.playing.as_ref().map(|p| p.stream_id) {
            self.events.push_back(if command == "receiveAudio" {
                ServerEvent::ReceiveAudio { stream_id: sid, on }
            } else {
                ServerEvent::ReceiveVideo { stream_id: sid, on }
            });
        }
    }

    fn on_connect(&mut self, txn: f64, object: Option<&Amf0Value>) -> Result<(), ServerError> {
        let field = |k: &str| {
            object
                .and_then(|o| o.get(k))
                .and_then(Amf0Value::as_str)
                .map(str::to_owned)
        };
        let raw_app = field("app").unwrap_or_default();
        let object_encoding = object
            .and_then(|o| o.get("objectEncoding"))
            .and_then(Amf0Value::as_f64)
            .unwrap_or(0.0);
        let Some((app, query)) = name_and_query(&raw_app, self.cfg.limits.max_name_len) else {
            let m = cmd::on_status(
                0,
                "error",
                "NetConnection.Connect.Rejected",
                "connect needs an application name, as in rtmp://host/live/key.",
                None,
            );
            self.send(CSID_COMMAND, &m);
            return Err(ServerError::Rejected(format!("bad app name {raw_app:?}")));
        };
        let request_id = self.request_id();
        self.pending = Some(Box::new(Pending::Connect {
            id: request_id,
            txn,
            app: app.clone(),
            object_encoding,
        }));
        let request = ConnectRequest {
            request_id,
            app,
            query,
            tc_url: field("tcUrl"),
            flash_ver: field("flashVer"),
            swf_url: field("swfUrl"),
            page_url: field("pageUrl"),
            object_encoding,
        };
        self.events
            .push_back(ServerEvent::ConnectRequested(Box::new(request)));
        Ok(())
    }

    /// The request for `raw` on `stream_id`, if the connection has an app and the name
    /// is a valid one.
    fn stream_request(&mut self, stream_id: u32, raw: &str) -> Option<StreamRequest> {
        let app = self.app.clone()?;
        let (name, query) = name_and_query(raw, self.cfg.limits.max_name_len)?;
        Some(StreamRequest {
            request_id: self.request_id(),
            stream_id,
            app,
            name,
            query,
        })
    }

    fn on_publish(&mut self, stream_id: u32, raw: &str, publish_type: String) {
        let Some(request) = self.stream_request(stream_id, raw) else {
            self.bad_publish_name(stream_id, raw);
            return;
        };
        if self.publishing.is_some() {
            let m = cmd::on_status(
                stream_id,
                "error",
                "NetStream.Publish.BadName",
                "This connection is already publishing.",
                Some(&request.name),
            );
            self.send(CSID_COMMAND, &m);
            return;
        }
        self.pending = Some(Box::new(Pending::Publish {
            id: request.request_id,
            stream_id,
            name: request.name.clone(),
        }));
        self.events.push_back(ServerEvent::PublishRequested {
            request: Box::new(request),
            publish_type,
        });
    }

    fn on_play(&mut self, stream_id: u32, raw: &str, start: Option<f64>) {
        self.request_play(stream_id, raw, start, false);
    }

    /// play2 with transition "switch" (or "swap") while playing: a request to move the play
    /// to `raw`; the play goes on as it is until the application accepts.
    fn on_play_switch(&mut self, stream_id: u32, raw: &str) {
        self.request_play(stream_id, raw, None, true);
    }

    /// Raises `PlayRequested` for `raw` (or answers a bad name); the application's answer
    /// settles the pending play.
    fn request_play(&mut self, stream_id: u32, raw: &str, start: Option<f64>, switch: bool) {
        let Some(request) = self.stream_request(stream_id, raw) else {
            self.bad_play_name(stream_id, raw);
            return;
        };
        if !switch {
            // A second play on the connection replaces the first.
            self.playing = None;
        }
        self.pending = Some(Box::new(Pending::Play {
            id: request.request_id,
            stream_id,
            name: request.name.clone(),
            switch,
        }));
        self.events.push_back(ServerEvent::PlayRequested {
            request: Box::new(request),
            start,
            switch,
        });
    }

    fn bad_publish_name(&mut self, stream_id: u32, raw: &str) {
        let m = cmd::on_status(
            stream_id,
            "error",
            "NetStream.Publish.BadName",
            "publish needs connect first and a stream name, as in rtmp://host/live/key.",
            Some(raw),
        );
        self.send(CSID_COMMAND, &m);
    }

    fn bad_play_name(&mut self, stream_id: u32, raw: &str) {
        let m = cmd::on_status(
            stream_id,
            "error",
            "NetStream.Play.StreamNotFound",
            "play needs connect first and a stream name, as in rtmp://host/live/key.",
            Some(raw),
        );
        self.send(CSID_COMMAND, &m);
    }

    fn close_stream(&mut self, stream_id: u32) {
        if self.publishing == Some(stream_id) {
            self.publishing = None;
        }
        if self.playing.as_ref().map(|p| p.stream_id) == Some(stream_id) {
            self.playing = None;
        }
        self.events
            .push_back(ServerEvent::StreamDeleted { stream_id });
    }
}
