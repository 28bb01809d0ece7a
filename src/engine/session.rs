//! One engine session per client stream: the IO loop and the hub glue around the protocol.
//!
//! A session is a single task. The handshake is read here; after it, the sans-IO
//! [`ServerSession`] decodes the client's chunks, answers the commands that need no
//! decision, and raises connect, publish and play as requests, which this file grants or
//! refuses against the hub. As a publisher the session hands media to the hub; as a player
//! it drains its ring from the hub and writes the prechunked frames with vectored writes, in
//! batches. Everything it sends goes through one ordered queue (`pending`): the protocol's
//! output is taken into it after every call, so replies such as Play.Start always precede
//! the media they announce.
//!
//! The queue is bounded: media is shared with the hub (reference-counted, never copied per
//! player) and taken from the hub at most `BATCH_BYTES` at a time, and the session's own
//! replies are bounded by `max_reply_queue`, past which it decodes no more of the client's
//! messages until the queue is written. A play's start frames (headers, GOP) are taken only
//! once the client's input is decoded, so a client that sends many plays at once gets the
//! start of the last one only: a repeated play replaces the previous one, it never stacks.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, info, warn};

use super::hub::{Event, Frame, FrameKind, Player, Publisher, StreamKey};
use super::{lane, tick, Engine};
use crate::auth::{Action, DenyReason};
use crate::budget::{Charge, OverBudget, PeerBudget};
use crate::rtmp::chunk::{self, ChunkDecoder};
use crate::rtmp::handshake;
use crate::rtmp::message::{AUDIO, DATA_AMF0, VIDEO};
use crate::rtmp::session::{
    command, Poll, ServerConfig, ServerError, ServerEvent, ServerSession, StreamRequest,
};
use crate::stream::{ClientStream, Transport};
use crate::throttle::LogThrottle;

/// C0+C1 and C2 sizes of the plain RTMP handshake.
const C0C1_LEN: usize = 1537;
const C2_LEN: usize = 1536;

/// Events a player drains per wake-up, and bytes it queues, before writing them out.
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes copied into one write for streams without vectored writes.
const COALESCE_MAX: usize = 256 * 1024;
/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Read buffer room: small for players (their commands and acks are a few hundred bytes),
/// grown (doubling) for publishers whose reads fill it. At `READ_MIN` the read goes through
/// a buffer on the stack (see [`read_some`]), so an idle connection holds no read buffer.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 64 * 1024;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client did not finish the RTMP handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("RTMP handshake refused: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("bad chunk stream from the client: {0}")]
    Chunk(#[source] chunk::ChunkError),
    #[error("no byte either way for {0:?} (idle timeout)")]
    Idle(Duration),
    #[error("the client did not take what was queued for it within {0:?}; dropped as too slow")]
    WriteStalled(Duration),
    #[error("no publisher came within {0:?}")]
    NoPublisher(Duration),
    #[error("connect refused: {0}")]
    Rejected(String),
    #[error(
        "closed after {count} malformed messages (limits.max_protocol_errors); the last: {last}"
    )]
    ProtocolErrors { count: u32, last: String },
    #[error("closed to keep the process within its memory: {0}")]
    OverBudget(#[from] OverBudget),
    #[error("{action} denied by [auth] ({reason}): {}", reason.description())]
    Denied { action: Action, reason: DenyReason },
    #[error("another publisher took {0} over (engine.publisher_takeover = \"replace\")")]
    Replaced(String),
    #[error("edge mode: {0}")]
    Edge(String),
}

impl From<ServerError> for SessionError {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::Chunk(e) => SessionError::Chunk(e),
            ServerError::Rejected(why) => SessionError::Rejected(why),
            ServerError::ProtocolErrors { count, last } => {
                SessionError::ProtocolErrors { count, last }
            }
            ServerError::NoPublisher(wait) => SessionError::NoPublisher(wait),
        }
    }
}

/// A player's state on one message stream (the protocol side, its name and its wait for
/// a publisher, is the [`ServerSession`]'s).
struct PlayState {
    stream_id: u32,
    player: Player,
    /// Metadata, headers and GOP to send before anything from the ring.
    start: VecDeque<Arc<Frame>>,
    /// A publisher is on the key.
    live: bool,
    saw_unpublish: bool,
    /// Dropping media until a keyframe (lagged, paused, or joined without a GOP).
    skipping: bool,
    skips: u64,
    has_video: bool,
    paused: bool,
    receive_audio: bool,
    receive_video: bool,
    play_at: Instant,
    /// The player waited for a publisher: `play_at` is when it arrived.
    waited: bool,
    first_frame: bool,
    /// A play2 switch brought the play here: TransitionComplete goes out before its first
    /// keyframe (or first audio, for a stream without video).
    transition: bool,
    /// The merge window's next tick ([`next_event`]), made at the first.
    tick: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

struct PublishState {
    stream_id: u32,
    /// Where the media goes: the hub, or (edge mode) the stream's origin.
    sink: Sink,
    /// The pushes of this stream to `[[engine.push]]` destinations; after `sink`, so they
    /// stop once the hub has the publisher's last frame and its Unpublished.
    _restreams: Option<super::restream::Restreams>,
    /// The recording of this publish (`[engine] record`): after `sink` as well, so it ends
    /// once the hub has the publisher's last frame.
    _recording: Option<super::record::Recording>,
    /// Completes when the publish ends from outside ([`publish_ended`]): made once per
    /// publish, owning what it waits on.
    ended: std::pin::Pin<Box<dyn std::future::Future<Output = PublishEnd> + Send>>,
}

enum Sink {
    Hub(Publisher),
    Origin(super::edge::Forward),
}

impl PublishState {
    fn push(
        &self,
        budget: &PeerBudget,
        msg_type: u8,
        timestamp: u32,
        payload: Bytes,
    ) -> Result<(), SessionError> {
        match &self.sink {
            Sink::Hub(p) => Ok(p.push(msg_type, timestamp, payload)?),
            Sink::Origin(f) => f
                .send(budget, msg_type, timestamp, payload)
                .map_err(|e| SessionError::Edge(e.to_string())),
        }
    }
}

/// One client's connection to the engine: the protocol session ([`ServerSession`]), the
/// ordered write queue, and what the client publishes or plays through the hub. (Named apart
/// from the protocol's `ServerSession`, the session table's `OpenSession` and the tunnel's
/// `TunnelSession`.)
struct EngineConnection {
    engine: Arc<Engine>,
    id: u64,
    label: String,
    /// The protocol: chunks, commands, replies, acks, and the per-peer limits on them.
    proto: ServerSession,
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    /// The protocol's output queued since the last flush, charged to the memory budget.
    reply_charge: Charge,
    /// The process's memory budget and this client's address's share: what its partial
    /// messages, replies and published frames are charged to.
    budget: PeerBudget,
    /// The budget refused a reply's bytes: the session ends (checked between messages).
    /// Boxed: rare, and 48 bytes of every connection inline.
    refused: Option<Box<OverBudget>>,
    /// Decoding stopped with input left in the read buffer (the replies were over their bound).
    more_input: bool,
    /// What is queued must be written without waiting for the merge window (replies, a
    /// play's start frames, a ring drained to its bound).
    write_now: bool,
    /// The last drain of the ring stopped at its bound with events left.
    ring_more: bool,
    /// Plays on this connection (the first is logged at info, repeats at debug).
    plays: u64,
    bytes_in: u64,
    bytes_out: u64,
    /// Boxed, like `vod`: an idle connection (or a player) carries only the pointer.
    publishing: Option<Box<PublishState>>,
    /// Boxed (as `publishing` and `vod`): a connection that plays nothing carries only the
    /// pointer.
    playing: Option<Box<PlayState>>,
    /// What the session did, for the close line: "publish live/key".
    role: String,
    /// The lines this peer can cause by repeating itself (malformed messages, play,
    /// refused publish), at most one a second.
    warnings: LogThrottle,
    /// Authorization state ([`authz`]): connect's fields, a decision being waited for.
    /// None when the engine has no `[auth]` (boxed: see [`authz::AuthState`]).
    authz: Option<Box<authz::AuthState>>,
    /// A play of a VOD file ([`vod`]), instead of `playing`.
    vod: Option<Box<vod::VodState>>,
    /// The start position of the play being decided (play's third argument).
    play_start: Option<f64>,
    /// The play being decided is a play2 switch of the current one.
    play_switch: bool,
    /// The player's place in a fan-out lane ([`lane`]), which then holds its ring receiver
    /// and writes its media on the ticks; taken back before the session writes or decides
    /// anything itself.
    seat: Option<lane::Seat>,
}

mod authz;
mod vod;

/// Serve one client stream, then log what happened.
///
/// A plain fn returning an `async move` block, not an `async fn`: an async fn's state keeps
/// its arguments where they were passed and a second copy where the body moves them (the
/// stream is 144 bytes), for the whole session; the block's captures are used in place.
// Not an async fn on purpose (see above): clippy's rewrite would bring the copy back.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run(
    engine: Arc<Engine>,
    mut io: ClientStream,
    id: u64,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let started = Instant::now();
        let budget = PeerBudget::for_peer(io.peer.ip());
        let rtmpe = matches!(io.transport, Transport::Rtmpe | Transport::Rtmpte);
        // One copy of the label, the connection's (kept for the close line below; made in
        // the call, so that no local holds it across the session's awaits).
        let mut s = EngineConnection::new(engine, id, io.label(), budget, rtmpe);
        // The door logs every session's open and close line with its bytes; the engine adds
        // what the session did (its role) and why it ended.
        debug!(session = id, "engine session open: {}", s.label);
        if s.engine.config().auth.is_some() {
            s.authz = Some(Box::new(authz::AuthState::new(io.peer.ip())));
        }
        // How it ended, as the close line says it: a String (24 bytes), not the result
        // (64), because the place an await's output goes is part of the future while it
        // is awaited, here for the whole session.
        let how = match s.serve(&mut io).await {
            Ok(()) => "closed by client".to_owned(),
            // Players such as ffmpeg reset the connection instead of closing it: still a close.
            Err(SessionError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                "closed by client (reset)".to_owned()
            }
            Err(e) => e.to_string(),
        };
        // Out of its lane before anything else is written (what the lane left unwritten first).
        let _ = s.leave_lane();
        s.notify_done(true, true);
        // Players learn at once that their publisher left, before any wait on this socket.
        drop(s.publishing.take());
        let skips = s.playing.take().map_or(0, |p| p.skips);
        // Let a well-behaved client see our last replies (a refusal, Play.Stop); never wait long
        // for a broken one.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = s.flush(&mut io).await;
            let _ = io.shutdown().await;
        })
        .await;
        let secs = started.elapsed().as_secs_f64();
        info!(
            session = id,
            "session close: {} {} in={}B out={}B duration={secs:.1}s skips={skips}: {how}",
            s.label,
            if s.role.is_empty() { "-" } else { &s.role },
            s.bytes_in,
            s.bytes_out,
        );
    }
}

/// The protocol's settings for the engine's sessions, over RTMPE or not: made once per
/// engine generation and shared by its sessions ([`Engine::proto_config`]).
pub(super) fn proto_config(
    limits: &crate::limits::Limits,
    cfg: &super::EngineConfig,
    rtmpe: bool,
) -> Arc<ServerConfig> {
    Arc::new(ServerConfig {
        limits: limits.into(),
        chunk_size: cfg.chunk_size,
        window_ack_size: cfg.window_ack_size,
        peer_bandwidth: cfg.peer_bandwidth,
        max_streams: cfg.max_streams_per_connection,
        // Over RTMPE the large chunk size waits until the client plays (see
        // `ServerConfig::chunk_size_on_connect`).
        chunk_size_on_connect: !rtmpe,
        player_wait: cfg.player_wait,
        stream_length_by_app: cfg.vod_dir.is_some(),
    })
}

/// `now + d`, or far in the future when a configured duration would overflow the clock.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// The clock the protocol is driven with: tokio's, which its timers follow (a paused test
/// clock refills the message-rate bucket and moves the player's wait).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The player's next event, or None at `tick_at` (a player draining its ring on the merge
/// window's ticks is not woken by each frame).
async fn next_event(
    playing: &mut Option<Box<PlayState>>,
    tick_at: Option<Instant>,
) -> Option<Result<Event, RecvError>> {
    match (playing, tick_at) {
        (Some(p), Some(at)) => {
            // The player's own timer, kept with its play and moved to each tick: a Sleep
            // awaited here would be 112 bytes of every session's future, playing or not.
            let at = tokio::time::Instant::from_std(at);
            let tick = p
                .tick
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if tick.deadline() != at {
                tick.as_mut().reset(at);
            }
            tick.await;
            None
        }
        (Some(p), None) => Some(p.player.rx.recv().await),
        (None, _) => std::future::pending().await,
    }
}

/// Completes when the lane hands this session's player back.
async fn lane_returned(
    seat: &mut Option<lane::Seat>,
) -> Result<lane::Returned, tokio::sync::oneshot::error::RecvError> {
    match seat {
        Some(s) => s.returned().await,
        None => std::future::pending().await,
    }
}

/// A lane dropped a player without handing it back (its task died): the session cannot
/// know what was written, so it ends.
fn lane_gone() -> SessionError {
    SessionError::Io(std::io::Error::other("the fan-out lane lost this player"))
}

/// Reads what the client sent into `rbuf`: `(bytes read, whether they filled the room)`.
/// With `room` at [`READ_MIN`] (players, idle connections) the read goes into a buffer on
/// the stack of the poll and only the bytes that came are copied into `rbuf`, so a
/// connection waiting for its client holds no read buffer (most of an idle connection's
/// memory otherwise); past it (a publisher whose reads filled it) `room` bytes are reserved
/// in `rbuf` and read into in place. Cancel-safe: nothing is read unless it is returned.
async fn read_some(
    io: &mut ClientStream,
    rbuf: &mut BytesMut,
    room: usize,
) -> std::io::Result<(usize, bool)> {
    if room > READ_MIN {
        if rbuf.capacity() - rbuf.len() < room / 2 {
            rbuf.reserve(room);
        }
        let spare = rbuf.capacity() - rbuf.len();
        let n = io.read_buf(rbuf).await?;
        return Ok((n, n >= spare));
    }
    std::future::poll_fn(|cx| {
        let mut stack = [0u8; READ_MIN];
        let mut buf = ReadBuf::new(&mut stack);
        std::task::ready!(std::pin::Pin::new(&mut *io).poll_read(cx, &mut buf))?;
        let got = buf.filled();
        rbuf.extend_from_slice(got);
        std::task::Poll::Ready(Ok((got.len(), got.len() >= READ_MIN)))
    })
    .await
}

/// How a publish ended without the client ending it.
enum PublishEnd {
    /// Another publisher took the key over.
    Replaced,
    /// Edge mode: the forward to the origin ended.
    ForwardClosed,
}

/// Completes when this session's publish ends from outside: its publisher replaced by
/// another one, or (edge mode) its forward to the origin closed. A poll of the wait the
/// publish keeps ([`PublishState::ended`]), not an async fn: the session's select holds this
/// future inline for the session's whole life, publishing or not, and the waits themselves
/// (80 and 112 bytes) would be part of every connection.
fn publish_ended(
    publishing: &mut Option<Box<PublishState>>,
) -> impl std::future::Future<Output = PublishEnd> + '_ {
    std::future::poll_fn(move |cx| match publishing.as_mut() {
        Some(p) => p.ended.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
}

impl EngineConnection {
    fn new(
        engine: Arc<Engine>,
        id: u64,
        label: String,
        budget: PeerBudget,
        rtmpe: bool,
    ) -> EngineConnection {
        // Partial messages and replies count against the process's budget and the client
        // address's share of it.
        let decoder = ChunkDecoder::with_charge(engine.limits(), budget.charge());
        let proto = ServerSession::new(engine.proto_config(rtmpe), decoder, now());
        EngineConnection {
            engine,
            id,
            label,
            proto,
            pending: VecDeque::new(),
            pending_bytes: 0,
            reply_charge: budget.charge(),
            budget,
            refused: None,
            more_input: false,
            write_now: false,
            ring_more: false,
            plays: 0,
            bytes_in: 0,
            bytes_out: 0,
            publishing: None,
            playing: None,
            role: String::new(),
            warnings: LogThrottle::new(),
            authz: None,
            vod: None,
            play_start: None,
            play_switch: false,
            seat: None,
        }
    }

    async fn serve(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        {
            // In a block: a local left in scope would be kept in the session's future past
            // the handshake, for the connection's life.
            let hs = self.engine.limits().handshake_timeout();
            // Boxed: once per connection, and inline its reads and timer would stay part of
            // the session's future for the connection's life.
            Box::pin(tokio::time::timeout(hs, self.handshake(io)))
                .await
                .map_err(|_| SessionError::HandshakeTimeout(hs))??;
        }
        let idle = self.engine.limits().idle_timeout();
        let mut rbuf = BytesMut::new();
        // Players read little (commands, acks); publishers a lot: grow the buffer only when
        // reads fill it, so a thousand idle players do not each hold 64 KiB. At READ_MIN
        // nothing is held between reads (`read_some`).
        let mut read_room = READ_MIN;
        let mut last_activity = Instant::now();
        // One timer for the session, moved only when it fires early (a timer per wake-up
        // would cost a timer-wheel insert per media message per player).
        let timer = tokio::time::sleep_until(after(idle).into());
        tokio::pin!(timer);
        let batch = self.engine.config().write_batch;
        // With a merge window (`write_batch`), a player whose media flows drains its ring on
        // the process's shared ticks (`tick`) instead of being woken by every frame.
        let mut ticking = false;
        loop {
            // A play's start frames go out once the input is decoded (a play after it would
            // replace them), a batch at a time.
            if !self.more_input && self.has_start_frames() {
                self.drain_events();
            }
            if !self.pending.is_empty() {
                // Merge window: the first frame after a quiet spell waits for the next tick
                // with whatever comes meanwhile, so the frames of up to one window share one
                // write (one syscall, one wake of the reader). Replies and a play's start
                // frames never wait.
                if !batch.is_zero()
                    && !self.write_now
                    && self.playing.is_some()
                    && self.pending_bytes < BATCH_BYTES
                {
                    let due = tick::next_after(Instant::now(), batch);
                    tokio::time::sleep_until(due.into()).await;
                    self.drain_events();
                    ticking = true;
                }
                self.flush(io).await?;
                last_activity = Instant::now();
            }
            if self.authz.as_ref().is_some_and(|a| a.waiting()) {
                // A callback decides a connect, publish or play: this session waits (at
                // most the callback timeout), the others carry on.
                // Boxed: only with `[auth]`, once per decision.
                let decided = Box::pin(self.await_decision()).await;
                // A denial's reply goes out even though it ends the session.
                self.send_replies();
                decided?;
                continue;
            }
            if self.more_input {
                // The replies are written: decode the rest of what the client sent.
                self.more_input = false;
                let mut paused = self.on_bytes(&mut rbuf)?;
                while let Some(wait) = paused {
                    tokio::time::sleep(wait).await;
                    paused = self.on_bytes(&mut rbuf)?;
                }
                continue;
            }
            if self.has_start_frames() {
                continue;
            }
            let wait_at = self.proto.poll_timeout();
            if let Some(w) = wait_at {
                if w < timer.deadline().into_std() {
                    timer.as_mut().reset(w.into());
                }
            }
            if read_room <= READ_MIN && rbuf.is_empty() {
                // Everything read was decoded: free the buffer while the client is quiet.
                // (Its `capacity()` is no guide: a buffer advanced to its end reports none
                // while it still holds the whole allocation.)
                rbuf = BytesMut::new();
            }
            if self.playing.is_none()
                && self.vod.is_none()
                && self.pending.is_empty()
                && self.pending.capacity() > 0
            {
                // The connect replies are written: a connection that plays nothing writes
                // rarely, so its write queue is not kept between writes (a player's is: it
                // writes every tick).
                self.pending = VecDeque::new();
            }
            // The next tick to drain the ring at; at once when the last drain stopped at its
            // bound (through the select, so the client's input is still read meanwhile).
            if ticking && self.seat.is_none() && !self.ring_more {
                // Steady: the lane writes this player's next ticks, without waking this task.
                self.join_lane(io);
            }
            let tick_at = ticking.then(|| {
                let now = Instant::now();
                if self.ring_more {
                    now
                } else {
                    tick::next_after(now, batch)
                }
            });
            let seated = self.seat.is_some();
            // Set by the select's branches, acted on after it: an await inside a branch
            // keeps the select's output alive across it, which puts that output (88 bytes)
            // in every state of the session's future, idle or not.
            let mut paused = None;
            let mut player_wait_over = false;
            tokio::select! {
                r = read_some(io, &mut rbuf, read_room) => {
                    // What the client sent may need a reply or change the play: after the
                    // media the lane has written, so take the player back first.
                    self.leave_lane()?;
                    let (n, filled) = r?;
                    if n == 0 {
                        return Ok(());
                    }
                    if filled {
                        read_room = (read_room * 2).min(READ_MAX);
                    }
                    self.bytes_in = self.bytes_in.saturating_add(n as u64);
                    self.proto.received(n);
                    last_activity = Instant::now();
                    paused = self.on_bytes(&mut rbuf)?;
                }
                ret = lane_returned(&mut self.seat) => {
                    let ret = ret.map_err(|_| lane_gone())?;
                    if self.on_lane_return(ret) {
                        last_activity = Instant::now();
                    }
                }
                ev = next_event(&mut self.playing, tick_at), if !seated => {
                    match ev {
                        Some(ev) => {
                            self.on_event(ev);
                            self.drain_events();
                        }
                        None => {
                            // A tick: what the ring holds goes out now; an empty ring means
                            // the media stopped, so wait on the ring again.
                            self.drain_events();
                            ticking = !self.pending.is_empty();
                            self.write_now = ticking;
                        }
                    }
                }
                item = vod::next_item(&mut self.vod) => {
                    self.leave_lane()?;
                    self.on_vod_item(item);
                }
                end = publish_ended(&mut self.publishing) => match end {
                    PublishEnd::Replaced => return Err(self.on_replaced()),
                    PublishEnd::ForwardClosed => {
                        let key = self.role.trim_start_matches("publish ").to_owned();
                        return Err(SessionError::Edge(format!(
                            "the origin connection for {key} ended (see the edge forward line)"
                        )));
                    }
                },
                () = &mut timer => {
                    if self.leave_lane()? {
                        last_activity = Instant::now();
                    }
                    let now = now();
                    player_wait_over = wait_at.is_some_and(|w| w <= now);
                    if !player_wait_over {
                        let idle_at =
                            last_activity.checked_add(idle).unwrap_or_else(|| after(idle));
                        if idle_at <= now {
                            return Err(SessionError::Idle(idle));
                        }
                        let next = wait_at.map_or(idle_at, |w| w.min(idle_at));
                        timer.as_mut().reset(next.into());
                    }
                }
            }
            while let Some(wait) = paused {
                // Past limits.max_messages_per_sec: the rest waits in the buffer (and the
                // kernel's) until the bucket has refilled.
                tokio::time::sleep(wait).await;
                paused = self.on_bytes(&mut rbuf)?;
            }
            if player_wait_over {
                // Boxed: once per session at most, and inline its state would be part of
                // every session's future.
                return Box::pin(self.stop_waiting(io)).await;
            }
        }
    }

    async fn handshake(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let mut c0c1 = vec![0u8; C0C1_LEN];
        io.read_exact(&mut c0c1).await?;
        let reply = handshake::server_reply(&c0c1)?;
        io.write_all(&reply.s0s1s2).await?;
        io.flush().await?;
        // C2 should echo S1, but Flash-era clients get it wrong often enough: never reject it.
        let mut c2 = vec![0u8; C2_LEN];
        io.read_exact(&mut c2).await?;
        self.bytes_in = (C0C1_LEN + C2_LEN) as u64;
        self.proto.received(C0C1_LEN + C2_LEN);
        self.bytes_out = reply.s0s1s2.len() as u64;
        Ok(())
    }

    /// A player waited `player_wait` with no publisher: the protocol tells it the play is
    /// over (NetStream.Play.Stop), and the session ends.
    async fn stop_waiting(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let res = self.proto.handle_timeout(now());
        self.send_replies();
        if res.is_err() {
            self.playing = None;
            self.flush(io).await?;
        }
        res.map_err(SessionError::from)
    }

    /// Queue what the protocol has to send, charged to the memory budget, after
    /// everything queued before it.
    fn send_replies(&mut self) {
        let Some(b) = self.proto.take_output() else {
            return;
        };
        if let Err(e) = self.reply_charge.try_grow(b.len()) {
            // Dropped, and the session ends before it decodes another message.
            self.refused.get_or_insert(Box::new(e));
            return;
        }
        self.write_now = true;
        self.push_bytes(b);
    }

    /// Hands the player to the engine's lane when it is in steady state: a plain TCP client,
    /// live, with nothing of its own queued or decided, and nothing that filters or delays
    /// its frames (the lane writes every frame as is).
    fn join_lane(&mut self, io: &ClientStream) {
        if io.transport != Transport::Rtmp
            || !self.pending.is_empty()
            || self.write_now
            || self.more_input
            || self.publishing.is_some()
            || self.vod.is_some()
            || self.authz.as_ref().is_some_and(|a| a.waiting())
            || self.proto.poll_timeout().is_some()
        {
            return;
        }
        let Some(p) = &self.playing else {
            return;
        };
        if !p.live
            || p.skipping
            || p.paused
            || !p.receive_audio
            || !p.receive_video
            || p.transition
            || !p.first_frame
            || !p.start.is_empty()
        {
            return;
        }
        // The lane writes to this socket only while this session holds the seat, which is
        // dropped before `io` (see `lane`).
        let (Some(sock), Some(p)) = (io.socket_fd(), self.playing.as_mut()) else {
            return;
        };
        // The receiver moves to the lane; the session's is a closed stand-in until it is back.
        let (_, idle) = tokio::sync::broadcast::channel(1);
        let rx = std::mem::replace(&mut p.player.rx, idle);
        let join = lane::Join {
            sock,
            rx,
            lag: p.player.lag_probe(),
            stream_id: p.stream_id,
            chunk_size: self.proto.out_chunk_size(),
            shared_chunk_size: self.engine.hub().config().chunk_size,
            max_lag_bytes: self.engine.config().max_lag_bytes,
            has_video: p.has_video,
            sent: io.sent.clone(),
        };
        match self.engine.lanes().join(self.id, join) {
            Ok(seat) => self.seat = Some(seat),
            Err(join) => p.player.rx = join.rx,
        }
    }

    /// Takes the player back from its lane, if it is in one; true when the lane wrote to
    /// the client meanwhile.
    fn leave_lane(&mut self) -> Result<bool, SessionError> {
        let Some(seat) = self.seat.take() else {
            return Ok(false);
        };
        let ret = seat.reclaim().ok_or_else(lane_gone)?;
        Ok(self.on_lane_return(ret))
    }

    /// The lane handed the player back: its receiver, what the socket did not take (written
    /// first), and the event it stopped at, handled here as if drained here. True when the
    /// lane wrote to the client.
    fn on_lane_return(&mut self, ret: lane::Returned) -> bool {
        self.seat = None;
        self.bytes_out = self.bytes_out.saturating_add(ret.written);
        if let Some(p) = &mut self.playing {
            p.player.rx = ret.rx;
            p.has_video = ret.has_video;
        }
        for b in ret.leftover {
            self.write_now = true;
            self.push_bytes(b);
        }
        // Ejected at an event or at the drain's bound: carry on as a tick here would (handle
        // it, drain the rest, write at once).
        let resume = ret.event.is_some() || ret.more;
        if let Some(ev) = ret.event {
            self.on_event(ev);
        }
        if resume {
            self.drain_events();
        }
        if !self.pending.is_empty() {
            self.write_now = true;
        }
        ret.written > 0
    }

    /// A play's start frames are still to be queued.
    fn has_start_frames(&self) -> bool {
        self.playing.as_ref().is_some_and(|p| !p.start.is_empty())
    }

    fn push_bytes(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.pending_bytes = self.pending_bytes.saturating_add(b.len());
        self.pending.push_back(b);
    }

    /// Write everything queued, in order, with vectored writes; a client that has not taken
    /// all of it within `write_timeout` is dropped (one deadline for the whole flush: a client
    /// taking a byte at a time must not hold a frame forever).
    async fn flush(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let limit = self.engine.config().write_timeout;
        let deadline = tokio::time::Instant::from_std(after(limit));
        let vectored = AsyncWrite::is_write_vectored(&*io);
        if !vectored && self.pending.len() > 1 {
            // TLS and tunnel streams take one buffer per call: coalesce small messages so a
            // batch costs one write (and one TLS record or tunnel chunk), not one per message.
            let mut joined = BytesMut::with_capacity(self.pending_bytes.min(COALESCE_MAX));
            while let Some(b) = self.pending.front() {
                if !joined.is_empty() && joined.len().saturating_add(b.len()) > COALESCE_MAX {
                    break;
                }
                joined.extend_from_slice(b);
                self.pending.pop_front();
            }
            self.pending.push_front(joined.freeze());
        }
        while !self.pending.is_empty() {
            let n = if vectored {
                let pending = &self.pending;
                let io = &mut *io;
                // The IoSlice array is built inside each poll, on the stack: held across the
                // await it would be 1 KiB of every session's future, idle or not.
                let write = std::future::poll_fn(|cx| {
                    let mut iov = [IoSlice::new(&[]); IOV_MAX];
                    let mut k = 0;
                    for (slot, b) in iov.iter_mut().zip(pending.iter()) {
                        *slot = IoSlice::new(b);
                        k += 1;
                    }
                    std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &iov[..k])
                });
                tokio::time::timeout_at(deadline, write).await
            } else {
                let Some(front) = self.pending.front() else {
                    break;
                };
                tokio::time::timeout_at(deadline, io.write(front)).await
            }
            .map_err(|_| SessionError::WriteStalled(limit))??;
            if n == 0 {
                return Err(SessionError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.bytes_out = self.bytes_out.saturating_add(n as u64);
            self.pending_bytes = self.pending_bytes.saturating_sub(n);
            let mut left = n;
            while left > 0 {
                let Some(front) = self.pending.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.pending.pop_front();
                } else {
                    let _ = front.split_to(left);
                    left = 0;
                }
            }
        }
        tokio::time::timeout_at(deadline, io.flush())
            .await
            .map_err(|_| SessionError::WriteStalled(limit))??;
        self.reply_charge.shrink(usize::MAX);
        self.proto.flushed();
        self.write_now = false;
        Ok(())
    }

    /// Handles the complete messages in `rbuf`; `Some(wait)` when the message rate limit
    /// stopped it with bytes left, to be called again after `wait`. Stops early, with
    /// `more_input` set, when the replies queued are over `max_reply_queue`.
    fn on_bytes(&mut self, rbuf: &mut BytesMut) -> Result<Option<Duration>, SessionError> {
        let now = now();
        loop {
            if let Some(e) = self.refused.take() {
                return Err(SessionError::OverBudget(*e));
            }
            let polled = self.proto.poll(rbuf, now);
            self.send_replies();
            match polled? {
                Poll::Event(ev) => {
                    let handled = self.on_proto_event(ev);
                    // A refusal's reply goes out even when it ends the session.
                    self.send_replies();
                    handled?;
                }
                Poll::NeedInput => break,
                Poll::AwaitingDecision => {
                    // Decode nothing more of this client until the decision.
                    self.more_input = !rbuf.is_empty();
                    break;
                }
                Poll::RateLimited(wait) => {
                    // Past limits.max_messages_per_sec: the rest waits in the buffer.
                    self.check_refused()?;
                    return Ok(Some(wait));
                }
                Poll::RepliesFull => {
                    // Write the replies before decoding more (and reading more) of this client.
                    self.more_input = !rbuf.is_empty();
                    break;
                }
            }
        }
        self.check_refused()?;
        Ok(None)
    }

    fn check_refused(&mut self) -> Result<(), SessionError> {
        match self.refused.take() {
            Some(e) => Err(SessionError::OverBudget(*e)),
            None => Ok(()),
        }
    }

    /// What the client asked for, against the hub.
    fn on_proto_event(&mut self, ev: ServerEvent) -> Result<(), SessionError> {
        match ev {
            ServerEvent::Media(msg) => {
                if let Some(p) = &self.publishing {
                    p.push(&self.budget, msg.msg_type, msg.timestamp, msg.payload)?;
                }
            }
            ServerEvent::Data { timestamp, payload } => {
                if let Some(p) = &self.publishing {
                    p.push(&self.budget, DATA_AMF0, timestamp, payload)?;
                }
            }
            // Any app name is served (unless [auth] says otherwise); it is half the hub's key.
            ServerEvent::ConnectRequested(c) => self.authorize_connect(&c)?,
            ServerEvent::PublishRequested { request, .. } => {
                self.authorize_stream(Action::Publish, &request)?;
            }
            ServerEvent::PlayRequested {
                request,
                start,
                switch,
            } => {
                self.play_start = start;
                self.play_switch = switch;
                self.authorize_stream(Action::Play, &request)?;
            }
            ServerEvent::Seek { ms, .. } => self.vod_seek(ms),
            ServerEvent::StreamLength { txn, name } => self.vod_stream_length(txn, &name),
            ServerEvent::StreamDeleted { stream_id } => self.close_stream(stream_id),
            ServerEvent::Pause { paused, .. } if self.vod.is_some() => self.vod_pause(paused),
            ServerEvent::Pause { paused, .. } => {
                if let Some(p) = &mut self.playing {
                    p.paused = paused;
                    // Resume on a keyframe, not in the middle of a GOP.
                    p.skipping = true;
                }
            }
            ServerEvent::ReceiveAudio { on, .. } => {
                if let Some(p) = &mut self.playing {
                    p.receive_audio = on;
                }
            }
            ServerEvent::ReceiveVideo { on, .. } => {
                if let Some(p) = &mut self.playing {
                    p.receive_video = on;
                }
            }
            ServerEvent::Malformed(what) => {
                if let Some(also) = self.warnings.should_log("malformed messages") {
                    warn!(session = self.id, "{}: {what}{also}", self.label);
                }
            }
            ServerEvent::Command { name, txn, .. } => {
                debug!(
                    session = self.id,
                    "{}: command {name} txn {txn}", self.label
                );
            }
            ServerEvent::ReleaseStream { .. }
            | ServerEvent::FcPublish { .. }
            | ServerEvent::FcUnpublish { .. } => {
                debug!(session = self.id, "{}: {ev:?}", self.label);
            }
        }
        Ok(())
    }

    /// Another publisher took this one's key over: tell the client (the session's last
    /// bytes, flushed with a bound as it ends) and end the session. The status is chunked
    /// here with a full (fmt 0) header, valid whatever the protocol sent before on its stream.
    fn on_replaced(&mut self) -> SessionError {
        let Some(p) = self.publishing.take() else {
            return SessionError::Replaced(String::new());
        };
        let key = match &p.sink {
            Sink::Hub(publisher) => publisher.key().to_string(),
            Sink::Origin(f) => f.key().to_string(),
        };
        self.send_replies();
        let m = command::on_status(
            p.stream_id,
            "error",
            "NetStream.Publish.BadName",
            &format!("{key} was taken over by another publisher; this connection is closed."),
            None,
        );
        let cs = self.proto.out_chunk_size();
        self.push_bytes(chunk::encode_fmt0_bytes(command::CSID_COMMAND, &m, cs));
        SessionError::Replaced(key)
    }

    fn on_publish(&mut self, request: &StreamRequest) {
        let key = StreamKey::new(&request.app, &request.name);
        if let Some(edge) = self.engine.edge() {
            // Edge mode: the stream lives on its origin; players here pull it from there.
            let forward = edge.forward(&request.app, &request.name, &request.query);
            info!(
                session = self.id,
                "{}: publish {key} (forwarded to its origin)", self.label
            );
            crate::sessions::tag_stream(crate::sessions::Role::Publisher, &key.app, &key.name);
            self.role = format!("publish {key}");
            self.publishing = Some(Box::new(PublishState {
                stream_id: request.stream_id,
                ended: {
                    let closed = forward.closed();
                    Box::pin(async move {
                        closed.await;
                        PublishEnd::ForwardClosed
                    })
                },
                sink: Sink::Origin(forward),
                _restreams: None,
                _recording: None,
            }));
            self.proto.accept(request.request_id);
            return;
        }
        let takeover = self.engine.config().publisher_takeover;
        match self.engine.hub().publish_with(&key, takeover) {
            Ok(mut publisher) => {
                publisher.charge_to(self.budget.clone());
                info!(session = self.id, "{}: publish {key}", self.label);
                crate::sessions::tag_stream(crate::sessions::Role::Publisher, &key.app, &key.name);
                self.role = format!("publish {key}");
                let cfg = self.engine.config();
                let restreams = super::restream::start(
                    &cfg.push,
                    self.engine.api_pushes(),
                    self.engine.hub(),
                    self.engine.limits(),
                    cfg.write_timeout,
                    &key,
                );
                let recording = super::record::start(
                    cfg.record.as_ref(),
                    self.engine.hub(),
                    self.engine.limits(),
                    &key,
                );
                let replaced = publisher.replaced();
                self.publishing = Some(Box::new(PublishState {
                    stream_id: request.stream_id,
                    ended: Box::pin(async move {
                        replaced.await;
                        PublishEnd::Replaced
                    }),
                    sink: Sink::Hub(publisher),
                    _restreams: Some(restreams),
                    _recording: recording,
                }));
                self.proto.accept(request.request_id);
            }
            Err(e) => {
                // A peer can repeat the command: its lines share the session's throttle.
                if let Some(also) = self.warnings.should_log("lines") {
                    info!(
                        session = self.id,
                        "{}: publish {key} refused: {e}{also}", self.label
                    );
                }
                let why = format!("{key} is already being published.");
                self.proto.reject(request.request_id, &why);
            }
        }
    }

    fn on_play(&mut self, request: &StreamRequest) {
        // A second play on the connection replaces the first (and what it had still to send).
        self.playing = None;
        let start = self.play_start.take();
        let switch = std::mem::take(&mut self.play_switch);
        if self.play_vod(request, start, switch) {
            return;
        }
        let key = StreamKey::new(&request.app, &request.name);
        let mut player = self.engine.hub().play(&key);
        if let Some(edge) = self.engine.edge() {
            // After subscribing: a pull ending meanwhile sees this player, or is gone.
            edge.want(&key);
        }
        let how = if player.live {
            "live"
        } else {
            "waiting for a publisher"
        };
        self.plays = self.plays.saturating_add(1);
        if self.plays > 1 {
            // Repeats cost the client one command each: never an info line each.
            debug!(
                session = self.id,
                "{}: play {key} ({how}), play {} on this connection", self.label, self.plays
            );
        } else if let Some(also) = self.warnings.should_log("lines") {
            // The session's lines share one throttle.
            info!(
                session = self.id,
                "{}: play {key} ({how}){also}", self.label
            );
        }
        self.role = format!("play {key}");
        crate::sessions::tag_stream(crate::sessions::Role::Player, &key.app, &key.name);
        self.proto.accept(request.request_id);
        let now = now();
        if !player.live {
            self.proto.wait_for_publisher(now);
        }
        let start = std::mem::take(&mut player.start).into();
        self.playing = Some(Box::new(PlayState {
            stream_id: request.stream_id,
            start,
            live: player.live,
            // A late player without a cached GOP waits for the next keyframe.
            skipping: player.live && player.has_video && !player.has_keyframe,
            has_video: player.has_video,
            player,
            saw_unpublish: false,
            skips: 0,
            paused: false,
            receive_audio: true,
            receive_video: true,
            play_at: Instant::now(),
            waited: false,
            first_frame: false,
            transition: switch,
            tick: None,
        }));
    }

    fn close_stream(&mut self, stream_id: u32) {
        let publish = self.publishing.as_ref().map(|p| p.stream_id) == Some(stream_id);
        let play = self.playing.as_ref().map(|p| p.stream_id) == Some(stream_id)
            || self.vod.as_ref().map(|v| v.stream_id()) == Some(stream_id);
        if publish {
            self.publishing = None;
        }
        if play {
            self.playing = None;
            self.vod = None;
        }
        self.notify_done(publish, play);
    }

    fn drain_events(&mut self) {
        self.ring_more = false;
        // The start frames first, then the ring.
        while self.pending_bytes < BATCH_BYTES {
            let Some(f) = self.playing.as_mut().and_then(|p| p.start.pop_front()) else {
                break;
            };
            self.write_now = true;
            self.send_frame(&f);
        }
        if self.has_start_frames() {
            return;
        }
        for _ in 0..BATCH_EVENTS {
            if self.pending_bytes >= BATCH_BYTES {
                // Behind: write this much now and drain the rest right after.
                self.ring_more = true;
                self.write_now = true;
                return;
            }
            let Some(p) = &mut self.playing else {
                return;
            };
            let ev = match p.player.rx.try_recv() {
                Ok(ev) => Ok(ev),
                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => return,
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            };
            self.on_event(ev);
        }
        // BATCH_EVENTS taken: there may be more.
        self.ring_more = true;
        self.write_now = true;
    }

    fn on_event(&mut self, ev: Result<Event, RecvError>) {
        let Some(p) = &mut self.playing else {
            return;
        };
        match ev {
            Ok(Event::Frame(f)) => self.send_frame(&f),
            Ok(Event::Published) => {
                // A stream nobody had published on: carry on with the full ring.
                p.player.take_handoff();
                if !p.first_frame {
                    // A waiting player's first-frame time counts from the publisher's arrival.
                    p.play_at = Instant::now();
                    p.waited = true;
                }
                p.live = true;
                p.skipping = false;
                p.has_video = false;
                let notify = p.saw_unpublish;
                self.proto.publisher_started(notify);
                self.send_replies();
            }
            Ok(Event::Unpublished) => {
                p.live = false;
                p.saw_unpublish = true;
                self.proto.publisher_stopped(now());
                self.send_replies();
            }
            Err(RecvError::Lagged(n)) => {
                p.skipping = true;
                p.skips = p.skips.saturating_add(1);
                crate::metrics::global().player_skipped();
                debug!(
                    session = self.id,
                    "{}: fell {n} messages behind; skipping to the next keyframe", self.label
                );
            }
            // The wake-up channel closed under a waiting player: move to the full ring.
            Err(RecvError::Closed) => p.player.take_handoff(),
            Ok(Event::Filler) => {}
        }
    }

    fn send_frame(&mut self, f: &Arc<Frame>) {
        let max_lag = self.engine.config().max_lag_bytes;
        let shared_cs = self.engine.hub().config().chunk_size;
        let Some(p) = &mut self.playing else {
            return;
        };
        if f.msg_type == VIDEO {
            p.has_video = true;
        }
        if !f.kind.is_header() {
            if p.paused
                || (f.msg_type == AUDIO && !p.receive_audio)
                || (f.msg_type == VIDEO && !p.receive_video)
            {
                return;
            }
            if !p.skipping && p.player.lag_bytes(f) > max_lag {
                p.skipping = true;
                p.skips = p.skips.saturating_add(1);
                crate::metrics::global().player_skipped();
                debug!(
                    session = self.id,
                    "{}: too far behind; skipping", self.label
                );
            }
            if p.skipping {
                let resume = f.kind == FrameKind::VideoKey || (!p.has_video && f.msg_type == AUDIO);
                if !resume || p.player.lag_bytes(f) > max_lag {
                    return;
                }
                p.skipping = false;
            }
            if !p.first_frame && (f.msg_type == AUDIO || f.msg_type == VIDEO) {
                p.first_frame = true;
                let ms = p.play_at.elapsed().as_millis();
                let after = if p.waited { "publish" } else { "play" };
                if self.plays <= 1 {
                    info!(
                        session = self.id,
                        "{}: first frame of {} after {ms} ms ({after} to first frame)",
                        self.label,
                        p.player.key(),
                    );
                }
            }
        }
        let complete = p.transition
            && (f.kind == FrameKind::VideoKey || (f.msg_type == AUDIO && !p.has_video));
        if complete {
            p.transition = false;
        }
        let (head, body) = f.chunks_for(p.stream_id, self.proto.out_chunk_size(), shared_cs);
        if complete {
            // The new rendition starts with this keyframe: say so just before it.
            self.proto.transition_complete();
            self.send_replies();
        }
        if let Some(h) = head {
            self.push_bytes(h);
        }
        self.push_bytes(body);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every idle connection holds its session's whole future (a state machine as large as
    /// its largest await point, plus everything it keeps across awaits): 5.1 KiB of it
    /// before the rarely used parts were boxed, 2,136 bytes before its arguments stopped
    /// being held twice and the rare awaits (handshake, `[auth]` decision, end of a player's
    /// wait) were boxed, 1,400 bytes since (debug build). This keeps a new field or an inline
    /// await from growing it unnoticed; a larger state belongs in a box that only the
    /// sessions using it allocate.
    #[test]
    fn an_idle_session_future_stays_small() {
        let engine = Engine::new(
            crate::limits::Limits::default(),
            super::super::EngineConfig::default(),
        );
        let (_client, server) = tokio::io::duplex(64);
        let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let stream = ClientStream::new(Box::new(server), Transport::Rtmp, addr, addr);
        let fut = run(engine, stream, 1);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1536, "the engine session's future is {size} bytes");
    }
}
