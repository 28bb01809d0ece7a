//! One engine session per client stream: handshake, chunking, commands, media in and out.
//!
//! A session is a single task. It reads chunks and answers commands; as a publisher it hands
//! media to the hub, as a player it drains its ring from the hub and writes the prechunked
//! frames with vectored writes, in batches. Everything it sends goes through one ordered
//! queue (`pending`), so replies such as Play.Start always precede the media they announce.
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
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, info, warn};

use super::hub::{leading_amf0_string, Event, Frame, FrameKind, Player, Publisher, StreamKey};
use super::{tick, Engine};
use crate::auth::{Action, DenyReason};
use crate::budget::{Charge, OverBudget, PeerBudget};
use crate::rtmp::amf0::{Amf0Value, AmfLimits};
use crate::rtmp::chunk::{ChunkDecoder, ChunkEncoder};
use crate::rtmp::handshake;
use crate::rtmp::message::{
    self, LimitType, Message, UserControl, AUDIO, DATA_AMF0, DATA_AMF3, VIDEO,
};
use crate::rtmp::session::command::{self as cmd, CSID_COMMAND, CSID_CONTROL};
use crate::stream::{ClientStream, Transport};
use crate::throttle::{LogThrottle, RateLimit};

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
/// Read buffer room: small for players (their commands and acks are a few hundred bytes;
/// this is most of an idle connection's memory), grown (doubling) for publishers whose
/// reads fill it.
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
    Handshake(String),
    #[error("bad chunk stream from the client: {0}")]
    Chunk(String),
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
}

/// A player's state on one message stream.
struct PlayState {
    stream_id: u32,
    name: String,
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
    wait_deadline: Option<Instant>,
    play_at: Instant,
    /// The player waited for a publisher: `play_at` is when it arrived.
    waited: bool,
    first_frame: bool,
}

struct PublishState {
    stream_id: u32,
    publisher: Publisher,
}

struct Session {
    engine: Arc<Engine>,
    id: u64,
    label: String,
    decoder: ChunkDecoder,
    amf_limits: AmfLimits,
    encoder: ChunkEncoder,
    scratch: BytesMut,
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
    /// Bytes of the session's own messages (replies, control) queued since the last flush,
    /// and their charge on the memory budget.
    reply_bytes: usize,
    reply_charge: Charge,
    /// The process's memory budget and this client's address's share: what its partial
    /// messages, replies and published frames are charged to.
    budget: PeerBudget,
    /// The budget refused a reply's bytes: the session ends (checked between messages).
    refused: Option<OverBudget>,
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
    ack_window: u64,
    last_ack: u64,
    out_chunk_size: u32,
    app: Option<String>,
    streams_created: u32,
    publishing: Option<PublishState>,
    playing: Option<PlayState>,
    /// What the session did, for the close line: "publish live/key".
    role: String,
    /// The client came over RTMPE/RTMPTE: see [`Session::raise_chunk_size`].
    rtmpe: bool,
    /// Malformed messages so far (limits.max_protocol_errors).
    protocol_errors: u32,
    /// Messages per second (limits.max_messages_per_sec).
    rate: RateLimit,
    /// The lines this peer can cause by repeating itself (malformed messages, play,
    /// refused publish), at most one a second.
    warnings: LogThrottle,
    /// Authorization state ([`authz`]): connect's fields, a decision being waited for.
    authz: authz::AuthState,
}

mod authz;

/// Serve one client stream, then log what happened.
pub(crate) async fn run(engine: Arc<Engine>, mut io: ClientStream, id: u64) {
    let started = Instant::now();
    let label = io.label();
    // The door logs every session's open and close line with its bytes; the engine adds
    // what the session did (its role) and why it ended.
    debug!(session = id, "engine session open: {label}");
    let budget = PeerBudget::for_peer(io.peer.ip());
    let mut s = Session::new(engine, id, label.clone(), budget);
    s.rtmpe = matches!(io.transport, Transport::Rtmpe | Transport::Rtmpte);
    s.authz.peer = io.peer.ip();
    let res = s.serve(&mut io).await;
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
    let how = match &res {
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
    info!(
        session = id,
        "session close: {label} {} in={}B out={}B duration={secs:.1}s skips={skips}: {how}",
        if s.role.is_empty() { "-" } else { &s.role },
        s.bytes_in,
        s.bytes_out,
    );
}

/// `now + d`, or far in the future when a configured duration would overflow the clock.
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// The player's next event, or None at `tick_at` (a player draining its ring on the merge
/// window's ticks is not woken by each frame).
async fn next_event(
    playing: &mut Option<PlayState>,
    tick_at: Option<Instant>,
) -> Option<Result<Event, RecvError>> {
    match (playing, tick_at) {
        (Some(_), Some(at)) => {
            tokio::time::sleep_until(at.into()).await;
            None
        }
        (Some(p), None) => Some(p.player.rx.recv().await),
        (None, _) => std::future::pending().await,
    }
}

impl Session {
    fn new(engine: Arc<Engine>, id: u64, label: String, budget: PeerBudget) -> Session {
        // Partial messages and replies count against the process's budget and the client
        // address's share of it.
        let decoder = ChunkDecoder::with_charge(engine.limits(), budget.charge());
        let amf_limits = AmfLimits::from(engine.limits());
        let ack_window = u64::from(engine.config().window_ack_size);
        let max_rate = engine.limits().max_messages_per_sec;
        Session {
            engine,
            id,
            label,
            decoder,
            amf_limits,
            encoder: ChunkEncoder::new(),
            scratch: BytesMut::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            reply_bytes: 0,
            reply_charge: budget.charge(),
            budget,
            refused: None,
            more_input: false,
            write_now: false,
            ring_more: false,
            plays: 0,
            bytes_in: 0,
            bytes_out: 0,
            ack_window,
            last_ack: 0,
            out_chunk_size: 128,
            app: None,
            streams_created: 0,
            publishing: None,
            playing: None,
            role: String::new(),
            rtmpe: false,
            protocol_errors: 0,
            rate: RateLimit::per_second(max_rate, tokio::time::Instant::now().into_std()),
            warnings: LogThrottle::new(),
            authz: authz::AuthState::default(),
        }
    }

    async fn serve(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let hs = self.engine.limits().handshake_timeout();
        tokio::time::timeout(hs, self.handshake(io))
            .await
            .map_err(|_| SessionError::HandshakeTimeout(hs))??;
        let idle = self.engine.limits().idle_timeout();
        let mut rbuf = BytesMut::new();
        // Players read little (commands, acks); publishers a lot: grow the buffer only when
        // reads fill it, so a thousand idle players do not each hold 64 KiB.
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
            if self.authz.waiting() {
                // A callback decides a connect, publish or play: this session waits (at
                // most the callback timeout), the others carry on.
                self.await_decision().await?;
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
            let wait_at = self.playing.as_ref().and_then(|p| p.wait_deadline);
            if let Some(w) = wait_at {
                if w < timer.deadline().into_std() {
                    timer.as_mut().reset(w.into());
                }
            }
            if rbuf.capacity() - rbuf.len() < read_room / 2 {
                rbuf.reserve(read_room);
            }
            let room = rbuf.capacity() - rbuf.len();
            // The next tick to drain the ring at; at once when the last drain stopped at its
            // bound (through the select, so the client's input is still read meanwhile).
            let tick_at = ticking.then(|| {
                let now = Instant::now();
                if self.ring_more {
                    now
                } else {
                    tick::next_after(now, batch)
                }
            });
            tokio::select! {
                r = io.read_buf(&mut rbuf) => {
                    let n = r?;
                    if n == 0 {
                        return Ok(());
                    }
                    if n >= room {
                        read_room = (read_room * 2).min(READ_MAX);
                    }
                    self.bytes_in = self.bytes_in.saturating_add(n as u64);
                    last_activity = Instant::now();
                    let mut paused = self.on_bytes(&mut rbuf)?;
                    while let Some(wait) = paused {
                        // Past limits.max_messages_per_sec: the rest waits in the buffer
                        // (and the kernel's) until the bucket has refilled.
                        tokio::time::sleep(wait).await;
                        paused = self.on_bytes(&mut rbuf)?;
                    }
                }
                ev = next_event(&mut self.playing, tick_at) => {
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
                () = &mut timer => {
                    let now = Instant::now();
                    if wait_at.is_some_and(|w| w <= now) {
                        return self.stop_waiting(io).await;
                    }
                    let idle_at = last_activity.checked_add(idle).unwrap_or_else(|| after(idle));
                    if idle_at <= now {
                        return Err(SessionError::Idle(idle));
                    }
                    let next = wait_at.map_or(idle_at, |w| w.min(idle_at));
                    timer.as_mut().reset(next.into());
                }
            }
        }
    }

    async fn handshake(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let mut c0c1 = vec![0u8; C0C1_LEN];
        io.read_exact(&mut c0c1).await?;
        let reply =
            handshake::server_reply(&c0c1).map_err(|e| SessionError::Handshake(e.to_string()))?;
        io.write_all(&reply.s0s1s2).await?;
        io.flush().await?;
        // C2 should echo S1, but Flash-era clients get it wrong often enough: never reject it.
        let mut c2 = vec![0u8; C2_LEN];
        io.read_exact(&mut c2).await?;
        self.bytes_in = (C0C1_LEN + C2_LEN) as u64;
        self.bytes_out = reply.s0s1s2.len() as u64;
        Ok(())
    }

    /// A player waited `player_wait` with no publisher: tell it the play is over.
    async fn stop_waiting(&mut self, io: &mut ClientStream) -> Result<(), SessionError> {
        let wait = self.engine.config().player_wait;
        if let Some(p) = self.playing.take() {
            let m = cmd::on_status(
                p.stream_id,
                "status",
                "NetStream.Play.Stop",
                &format!("No publisher on {} within {wait:?}.", p.player.key()),
                Some(&p.name),
            );
            self.send(CSID_COMMAND, &m);
            self.flush(io).await?;
        }
        Err(SessionError::NoPublisher(wait))
    }

    /// Queue a message for the client, through the session's own chunk encoder.
    fn send(&mut self, csid: u32, msg: &Message) {
        self.encoder.write(csid, msg, &mut self.scratch);
        let b = self.scratch.split().freeze();
        if let Err(e) = self.reply_charge.try_grow(b.len()) {
            // Dropped, and the session ends before it decodes another message.
            self.refused.get_or_insert(e);
            return;
        }
        self.reply_bytes = self.reply_bytes.saturating_add(b.len());
        self.write_now = true;
        self.push_bytes(b);
    }

    /// A play's start frames are still to be queued.
    fn has_start_frames(&self) -> bool {
        self.playing.as_ref().is_some_and(|p| !p.start.is_empty())
    }

    fn send_control(&mut self, msg: &Message) {
        self.send(CSID_CONTROL, msg);
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
                let mut iov = [IoSlice::new(&[]); IOV_MAX];
                let mut k = 0;
                for (slot, b) in iov.iter_mut().zip(self.pending.iter()) {
                    *slot = IoSlice::new(b);
                    k += 1;
                }
                tokio::time::timeout_at(deadline, io.write_vectored(&iov[..k])).await
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
        self.reply_bytes = 0;
        self.reply_charge.shrink(usize::MAX);
        self.write_now = false;
        Ok(())
    }

    /// Handles the complete messages in `rbuf`; `Some(wait)` when the message rate limit
    /// stopped it with bytes left, to be called again after `wait`. Stops early, with
    /// `more_input` set, when the replies queued are over `max_reply_queue`.
    fn on_bytes(&mut self, rbuf: &mut BytesMut) -> Result<Option<Duration>, SessionError> {
        // Tokio's clock, which its sleep follows (a paused test clock refills the bucket).
        let now = tokio::time::Instant::now().into_std();
        let mut paused = None;
        let max_replies = self.engine.limits().max_reply_queue;
        loop {
            if let Some(e) = self.refused.take() {
                return Err(SessionError::OverBudget(e));
            }
            if self.reply_bytes >= max_replies || self.authz.waiting() {
                // Write the replies before decoding more (and reading more) of this client.
                self.more_input = !rbuf.is_empty();
                break;
            }
            if let Err(wait) = self.rate.ready(now) {
                paused = Some(wait);
                break;
            }
            match self.decoder.decode(rbuf) {
                Ok(Some(msg)) => {
                    self.rate.spend();
                    self.on_message(msg)?;
                }
                Ok(None) => break,
                Err(e) => return Err(SessionError::Chunk(e.to_string())),
            }
        }
        if let Some(e) = self.refused.take() {
            return Err(SessionError::OverBudget(e));
        }
        // Acknowledge each window of bytes received, as the peer's Window Ack Size asks.
        if self.ack_window > 0 && self.bytes_in.saturating_sub(self.last_ack) >= self.ack_window {
            self.last_ack = self.bytes_in;
            // The sequence number wraps at 32 bits by definition.
            let seq = (self.bytes_in & 0xffff_ffff) as u32;
            self.send_control(&message::acknowledgement(seq));
        }
        Ok(paused)
    }

    /// A malformed message: logged (at most a line a second), and past
    /// `limits.max_protocol_errors` the end of the session.
    fn protocol_error(&mut self, what: String) -> Result<(), SessionError> {
        self.protocol_errors = self.protocol_errors.saturating_add(1);
        if self.protocol_errors > self.engine.limits().max_protocol_errors {
            return Err(SessionError::ProtocolErrors {
                count: self.protocol_errors,
                last: what,
            });
        }
        if let Some(also) = self.warnings.should_log("malformed messages") {
            warn!(session = self.id, "{}: {what}{also}", self.label);
        }
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg.msg_type {
            AUDIO | VIDEO => {
                if let Some(p) = &self.publishing {
                    p.publisher.push(msg.msg_type, msg.timestamp, msg.payload)?;
                }
            }
            DATA_AMF0 | DATA_AMF3 => self.on_data(msg)?,
            message::COMMAND_AMF0 | message::COMMAND_AMF3 => {
                match message::decode_command(&msg, &self.amf_limits) {
                    Ok(c) => self.on_command(msg.stream_id, &c.name, c.txn, &c.args)?,
                    Err(e) => self.protocol_error(format!("undecodable command: {e}"))?,
                }
            }
            message::AGGREGATE => match message::split_aggregate(&msg) {
                Ok(parts) => {
                    for part in parts {
                        if part.msg_type != message::AGGREGATE {
                            self.on_message(part)?;
                        }
                    }
                }
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

    /// Data from a publisher: `@setDataFrame` metadata is stored as plain `onMetaData`.
    fn on_data(&mut self, msg: Message) -> Result<(), OverBudget> {
        let Some(p) = &self.publishing else {
            return Ok(());
        };
        let mut payload = msg.payload;
        if msg.msg_type == DATA_AMF3 && payload.first() == Some(&0) {
            // AMF3 data messages start with a 0 byte, then AMF0 values.
            let _ = payload.split_to(1);
        }
        if let Some(("@setDataFrame", used)) = leading_amf0_string(&payload) {
            let _ = payload.split_to(used);
        }
        p.publisher.push(DATA_AMF0, msg.timestamp, payload)
    }

    fn on_command(
        &mut self,
        stream_id: u32,
        name: &str,
        txn: f64,
        args: &[Amf0Value],
    ) -> Result<(), SessionError> {
        // args[0] is the command object (null after connect); the call's own arguments follow.
        let arg = |i: usize| args.get(i);
        let arg_str = |i: usize| args.get(i).and_then(Amf0Value::as_str).unwrap_or_default();
        debug!(
            session = self.id,
            "{}: command {name} txn {txn}", self.label
        );
        match name {
            "connect" => self.authorize_connect(txn, arg(0))?,
            "createStream" => {
                if self.streams_created >= self.engine.config().max_streams_per_connection {
                    self.send(CSID_COMMAND, &cmd::call_failed(txn, name));
                } else {
                    self.streams_created += 1;
                    let id = f64::from(self.streams_created);
                    self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Number(id)]));
                }
            }
            "releaseStream" | "_checkbw" => {
                self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Undefined]));
            }
            "FCPublish" => {
                let m = cmd::on_fc("onFCPublish", "NetStream.Publish.Start", arg_str(1));
                self.send(CSID_COMMAND, &m);
                self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Undefined]));
            }
            "FCUnpublish" => {
                let m = cmd::on_fc("onFCUnpublish", "NetStream.Unpublish.Success", arg_str(1));
                self.send(CSID_COMMAND, &m);
                self.send(CSID_COMMAND, &cmd::result(txn, vec![Amf0Value::Undefined]));
            }
            "FCSubscribe" => {
                let m = cmd::on_fc("onFCSubscribe", "NetStream.Play.Start", arg_str(1));
                self.send(CSID_COMMAND, &m);
            }
            "FCUnsubscribe" => {}
            "publish" => self.authorize_stream(Action::Publish, stream_id, arg_str(1))?,
            "play" => self.authorize_stream(Action::Play, stream_id, arg_str(1))?,
            "play2" => {
                // play2 switches renditions; on a live stream with one rendition, starting
                // play when not yet playing is all that makes sense.
                let name = arg(1)
                    .and_then(|o| o.get("streamName"))
                    .and_then(Amf0Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if self.playing.is_none() && !name.is_empty() {
                    self.authorize_stream(Action::Play, stream_id, &name)?;
                }
            }
            "pause" | "pauseRaw" => {
                let pause = arg(1).and_then(Amf0Value::as_bool).unwrap_or(true);
                self.on_pause(pause);
            }
            "seek" => {
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
            "deleteStream" => {
                let sid = arg(1).and_then(Amf0Value::as_f64).unwrap_or(0.0);
                self.close_stream(sid as u32);
            }
            "closeStream" => self.close_stream(stream_id),
            "getStreamLength" => {
                self.send(
                    CSID_COMMAND,
                    &cmd::result(txn, vec![Amf0Value::Number(0.0)]),
                );
            }
            "receiveAudio" | "receiveVideo" => {
                let on = arg(1).and_then(Amf0Value::as_bool).unwrap_or(true);
                if let Some(p) = &mut self.playing {
                    if name == "receiveAudio" {
                        p.receive_audio = on;
                    } else {
                        p.receive_video = on;
                    }
                }
            }
            // Replies to what we sent (onBWDone...), and FMS bandwidth-check chatter.
            "_result" | "_error" | "onStatus" | "onBWDone" | "_onbwcheck" | "_onbwdone" => {}
            _ => {
                debug!(session = self.id, "{}: unknown command {name}", self.label);
                self.send(CSID_COMMAND, &cmd::call_failed(txn, name));
            }
        }
        Ok(())
    }

    fn on_connect(&mut self, txn: f64, object: Option<&Amf0Value>) -> Result<(), SessionError> {
        let max = self.engine.limits().max_name_len;
        let raw_app = object
            .and_then(|o| o.get("app"))
            .and_then(Amf0Value::as_str)
            .unwrap_or_default();
        let object_encoding = object
            .and_then(|o| o.get("objectEncoding"))
            .and_then(Amf0Value::as_f64)
            .unwrap_or(0.0);
        let Some(app) = cmd::clean_name(raw_app, max) else {
            let m = cmd::on_status(
                0,
                "error",
                "NetConnection.Connect.Rejected",
                "connect needs an application name, as in rtmp://host/live/key.",
                None,
            );
            self.send(CSID_COMMAND, &m);
            return Err(SessionError::Rejected(format!("bad app name {raw_app:?}")));
        };
        let cfg = self.engine.config();
        let (was, bw) = (cfg.window_ack_size, cfg.peer_bandwidth);
        self.send_control(&message::window_ack_size(was));
        self.send_control(&message::set_peer_bandwidth(bw, LimitType::Dynamic));
        if !self.rtmpe {
            self.raise_chunk_size();
        }
        self.send(CSID_COMMAND, &cmd::connect_result(txn, object_encoding));
        self.send(CSID_COMMAND, &cmd::on_bw_done());
        self.app = Some(app);
        Ok(())
    }

    /// Announce our large outgoing chunk size. Over RTMPE this waits until the client plays:
    /// ffmpeg's RTMPE writer encrypts its buffer in place, and when publishing it echoes a
    /// Set Chunk Size and then reads the new size from the now-encrypted bytes ("Incorrect
    /// chunk size"), so an RTMPE publisher must never be sent one.
    fn raise_chunk_size(&mut self) {
        let cs = self.engine.config().chunk_size;
        if self.out_chunk_size == cs {
            return;
        }
        self.send_control(&message::set_chunk_size(cs));
        self.encoder.set_chunk_size(cs);
        self.out_chunk_size = cs;
    }

    fn key_for(&self, raw: &str) -> Option<(StreamKey, String)> {
        let app = self.app.as_deref()?;
        let name = cmd::clean_name(raw, self.engine.limits().max_name_len)?;
        Some((StreamKey::new(app, &name), name))
    }

    fn on_publish(&mut self, stream_id: u32, raw: &str) {
        let Some((key, name)) = self.key_for(raw) else {
            let m = cmd::on_status(
                stream_id,
                "error",
                "NetStream.Publish.BadName",
                "publish needs connect first and a stream name, as in rtmp://host/live/key.",
                Some(raw),
            );
            self.send(CSID_COMMAND, &m);
            return;
        };
        if self.publishing.is_some() {
            let m = cmd::on_status(
                stream_id,
                "error",
                "NetStream.Publish.BadName",
                "This connection is already publishing.",
                Some(&name),
            );
            self.send(CSID_COMMAND, &m);
            return;
        }
        match self.engine.hub().publish(&key) {
            Ok(mut publisher) => {
                publisher.charge_to(self.budget.clone());
                info!(session = self.id, "{}: publish {key}", self.label);
                crate::sessions::tag_stream(crate::sessions::Role::Publisher, &key.app, &key.name);
                self.role = format!("publish {key}");
                self.publishing = Some(PublishState {
                    stream_id,
                    publisher,
                });
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
            Err(e) => {
                // A peer can repeat the command: its lines share the session's throttle.
                if let Some(also) = self.warnings.should_log("lines") {
                    info!(
                        session = self.id,
                        "{}: publish {key} refused: {e}{also}", self.label
                    );
                }
                let m = cmd::on_status(
                    stream_id,
                    "error",
                    "NetStream.Publish.BadName",
                    &format!("{key} is already being published."),
                    Some(&name),
                );
                self.send(CSID_COMMAND, &m);
            }
        }
    }

    fn on_play(&mut self, stream_id: u32, raw: &str) {
        let Some((key, name)) = self.key_for(raw) else {
            let m = cmd::on_status(
                stream_id,
                "error",
                "NetStream.Play.StreamNotFound",
                "play needs connect first and a stream name, as in rtmp://host/live/key.",
                Some(raw),
            );
            self.send(CSID_COMMAND, &m);
            return;
        };
        // A second play on the connection replaces the first (and what it had still to send).
        self.playing = None;
        self.raise_chunk_size();
        let mut player = self.engine.hub().play(&key);
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
        self.send_control(&UserControl::StreamBegin(stream_id).to_message());
        let desc = format!("Started playing {name}.");
        for code in ["NetStream.Play.Reset", "NetStream.Play.Start"] {
            let m = cmd::on_status(stream_id, "status", code, &desc, Some(&name));
            self.send(CSID_COMMAND, &m);
        }
        self.send(CSID_COMMAND, &cmd::sample_access(stream_id));
        self.send(CSID_COMMAND, &cmd::data_start(stream_id));
        let now = Instant::now();
        let start = std::mem::take(&mut player.start).into();
        let mut p = PlayState {
            stream_id,
            name,
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
            wait_deadline: None,
            play_at: now,
            waited: false,
            first_frame: false,
        };
        if !p.live {
            p.wait_deadline = Some(after(self.engine.config().player_wait));
        }
        self.playing = Some(p);
    }

    fn on_pause(&mut self, pause: bool) {
        let Some(p) = &mut self.playing else {
            return;
        };
        p.paused = pause;
        // Resume on a keyframe, not in the middle of a GOP.
        p.skipping = true;
        let sid = p.stream_id;
        let (code, desc) = if pause {
            ("NetStream.Pause.Notify", "Paused live stream.")
        } else {
            ("NetStream.Unpause.Notify", "Unpaused live stream.")
        };
        let name = p.name.clone();
        self.send(
            CSID_COMMAND,
            &cmd::on_status(sid, "status", code, desc, Some(&name)),
        );
    }

    fn close_stream(&mut self, stream_id: u32) {
        let publish = self.publishing.as_ref().map(|p| p.stream_id) == Some(stream_id);
        let play = self.playing.as_ref().map(|p| p.stream_id) == Some(stream_id);
        if publish {
            self.publishing = None;
        }
        if play {
            self.playing = None;
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
        let sid = p.stream_id;
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
                p.wait_deadline = None;
                p.skipping = false;
                p.has_video = false;
                let notify = p.saw_unpublish;
                let name = p.name.clone();
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
            Ok(Event::Unpublished) => {
                p.live = false;
                p.saw_unpublish = true;
                p.wait_deadline = Some(after(self.engine.config().player_wait));
                let name = p.name.clone();
                let m = cmd::on_status(
                    sid,
                    "status",
                    "NetStream.Play.UnpublishNotify",
                    &format!("{name} is now unpublished."),
                    Some(&name),
                );
                self.send(CSID_COMMAND, &m);
                self.send_control(&UserControl::StreamEof(sid).to_message());
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
        let (head, body) = f.chunks_for(p.stream_id, self.out_chunk_size, shared_cs);
        if let Some(h) = head {
            self.push_bytes(h);
        }
        self.push_bytes(body);
    }
}
