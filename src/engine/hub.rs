//! The hub of live streams: one publisher and many players per (app, stream name), the codec
//! headers and GOP cache a late player starts from, and the shared fan-out ring.
//!
//! Each media message is classified and chunked ONCE (fmt 0, absolute timestamp, the player
//! stream id every player gets from its first createStream) into a `Bytes` that every player
//! writes as is. The ring is a `tokio::sync::broadcast` channel: the publisher never waits for
//! a player, memory is bounded by the ring whatever the number of players, and a player that
//! falls behind the ring (or behind a byte bound) skips ahead to the next keyframe.
//!
//! Memory: every frame holds a [`Charge`] on the process's budget and on its publisher's
//! address's share for its bytes (payload and chunks) for as long as anything (ring, GOP
//! cache, headers, a player's start) holds it; a publisher whose frame either refuses is
//! closed. With a log ([`HubConfig::log`], for the fan-out lane), a frame's chunked bytes are
//! in the stream's log as well, and charged twice. The ring is bounded in bytes as well
//! as messages: past `2 x max_lag_bytes` the oldest frames are pushed out (no player may lag
//! that far anyway; one that did skips to the next keyframe, as on any lag).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{broadcast, Notify};

use super::log::{self, Log, LogFds, LogRange};
use crate::budget::{Charge, OverBudget, PeerBudget};
use crate::rtmp::chunk;
use crate::rtmp::message::{Message, AUDIO, VIDEO};

/// How much earlier than a player's start (in ms) cached re-timed headers may be, for a
/// stream without a cached GOP; see [`Hub::play`].
const RETIME_REUSE_MS: u32 = 1000;

/// The message stream id of a player's first createStream: every frame is prechunked for it.
pub const SHARED_STREAM_ID: u32 = 1;

/// Chunk stream ids for media sent to players (commands use 3, protocol control 2).
pub const CSID_DATA: u32 = 5;
pub const CSID_AUDIO: u32 = 6;
pub const CSID_VIDEO: u32 = 7;

/// A stream's key: the application (connect's `app`, without query) and the stream name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub app: String,
    pub name: String,
}

impl StreamKey {
    pub fn new(app: &str, name: &str) -> Self {
        StreamKey {
            app: app.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.name)
    }
}

/// What a media message is, as far as starting and skipping players is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Audio,
    /// AAC AudioSpecificConfig, or an enhanced-RTMP audio sequence start.
    AudioHeader,
    /// An inter frame (or any video message that is neither header nor keyframe).
    Video,
    /// A keyframe: a player can start here.
    VideoKey,
    /// AVC/HEVC decoder configuration, or an enhanced-RTMP sequence start (HEVC, AV1, VP9).
    VideoHeader,
    /// `onMetaData`.
    Meta,
    /// Any other data message (cue points, text), forwarded live only.
    Data,
}

impl FrameKind {
    /// Headers and metadata are never skipped: a player needs them to decode what follows.
    pub fn is_header(self) -> bool {
        matches!(
            self,
            FrameKind::AudioHeader | FrameKind::VideoHeader | FrameKind::Meta
        )
    }
}

/// Classify a media or data message by its first bytes (FLV tag body layout).
pub fn classify(msg_type: u8, payload: &[u8]) -> FrameKind {
    match msg_type {
        VIDEO => classify_video(payload),
        AUDIO => classify_audio(payload),
        _ => {
            if leading_amf0_string(payload).map(|(s, _)| s) == Some("onMetaData") {
                FrameKind::Meta
            } else {
                FrameKind::Data
            }
        }
    }
}

fn classify_video(p: &[u8]) -> FrameKind {
    let Some(&b0) = p.first() else {
        return FrameKind::Video;
    };
    let frame_type = (b0 >> 4) & 0x07;
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: low nibble is the packet type; 0 SequenceStart, 4 MPEG2TSSequenceStart.
        return match b0 & 0x0f {
            0 | 4 => FrameKind::VideoHeader,
            _ if frame_type == 1 => FrameKind::VideoKey,
            _ => FrameKind::Video,
        };
    }
    let codec = b0 & 0x0f;
    // AVC (7), and the legacy HEVC (12) / AV1 (13) ids some encoders use, carry a packet type.
    if matches!(codec, 7 | 12 | 13) && p.get(1) == Some(&0) {
        return FrameKind::VideoHeader;
    }
    if frame_type == 1 {
        FrameKind::VideoKey
    } else {
        FrameKind::Video
    }
}

fn classify_audio(p: &[u8]) -> FrameKind {
    let Some(&b0) = p.first() else {
        return FrameKind::Audio;
    };
    match b0 >> 4 {
        // AAC: packet type 0 is the AudioSpecificConfig.
        10 if p.get(1) == Some(&0) => FrameKind::AudioHeader,
        // Enhanced RTMP audio (ExHeader): packet type 0 is SequenceStart.
        9 if b0 & 0x0f == 0 => FrameKind::AudioHeader,
        _ => FrameKind::Audio,
    }
}

/// The AMF0 string a data or command payload starts with, and the bytes it took.
pub fn leading_amf0_string(p: &[u8]) -> Option<(&str, usize)> {
    if *p.first()? != 0x02 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*p.get(1)?, *p.get(2)?]));
    let end = 3usize.checked_add(len)?;
    let s = std::str::from_utf8(p.get(3..end)?).ok()?;
    Some((s, end))
}

/// One media or data message as every player receives it.
#[derive(Debug)]
pub struct Frame {
    pub kind: FrameKind,
    pub msg_type: u8,
    /// Timestamp on the stream's timeline (continuous across republishes).
    pub timestamp: u32,
    pub payload: Bytes,
    /// The message chunked once (fmt 0) for message stream [`SHARED_STREAM_ID`].
    pub chunked: Bytes,
    /// Publisher bytes up to and including this frame: a player's lag is `total - offset`.
    pub offset: u64,
    /// `chunked` in the stream's [`Log`], when it keeps one (the fan-out lane sends from
    /// there while it holds the frame).
    pub(crate) log: Option<LogRange>,
    /// This frame's bytes on the memory budget, returned when the last holder drops it.
    _charge: Charge,
}

/// Bytes [`chunk::encode_fmt0`] makes of a `len`-byte message at `timestamp`.
fn fmt0_len(len: usize, timestamp: u32, chunk_size: u32) -> usize {
    let cs = (chunk_size as usize).max(1);
    let chunks = len.div_ceil(cs).max(1);
    let cont = if timestamp >= 0xFF_FFFF { 5 } else { 1 };
    fmt0_head_len(timestamp)
        .saturating_add(len)
        .saturating_add((chunks - 1).saturating_mul(cont))
}

/// Bytes of a fmt 0 first-chunk header on chunk streams 2-63 (basic header, message header,
/// extended timestamp): the only part of a chunked message that names the message stream.
fn fmt0_head_len(timestamp: u32) -> usize {
    if timestamp >= 0xFF_FFFF {
        16
    } else {
        12
    }
}

/// Where the message stream id (4 bytes, little-endian) sits in a fmt 0 first-chunk header.
const HEAD_STREAM_ID_AT: usize = 8;

impl Frame {
    fn csid(&self) -> u32 {
        match self.msg_type {
            AUDIO => CSID_AUDIO,
            VIDEO => CSID_VIDEO,
            _ => CSID_DATA,
        }
    }

    /// The chunks of this frame for a player on `stream_id`: an optional first-chunk header of
    /// its own, then shared bytes. Only the first header names the message stream, so a player
    /// on any stream id shares the payload chunks; only a player with another chunk size (none
    /// today: every player gets ours) costs a copy.
    pub fn chunks_for(
        &self,
        stream_id: u32,
        chunk_size: u32,
        shared_chunk_size: u32,
    ) -> (Option<Bytes>, Bytes) {
        if chunk_size == shared_chunk_size {
            if stream_id == SHARED_STREAM_ID {
                return (None, self.chunked.clone());
            }
            let head_len = fmt0_head_len(self.timestamp);
            if let Some(head) = self.chunked.get(..head_len) {
                let mut own = head.to_vec();
                if let Some(sid) = own.get_mut(HEAD_STREAM_ID_AT..HEAD_STREAM_ID_AT + 4) {
                    sid.copy_from_slice(&stream_id.to_le_bytes());
                    return (Some(Bytes::from(own)), self.chunked.slice(head_len..));
                }
            }
        }
        let msg = Message {
            msg_type: self.msg_type,
            timestamp: self.timestamp,
            stream_id,
            payload: self.payload.clone(),
        };
        (
            None,
            chunk::encode_fmt0_bytes(self.csid(), &msg, chunk_size),
        )
    }

    /// This frame moved to `timestamp` (a header sent to a late player at its start time), or
    /// None when the memory budget refuses the copy. The copy is the stream's (cached, shared
    /// by late players), so it is charged where the header is: the publisher's address's share.
    fn retimed(&self, timestamp: u32, chunk_size: u32) -> Option<Frame> {
        let len = fmt0_len(self.payload.len(), timestamp, chunk_size);
        let mut charge = self._charge.sibling();
        charge.try_grow(len).ok()?;
        let msg = Message {
            msg_type: self.msg_type,
            timestamp,
            stream_id: SHARED_STREAM_ID,
            payload: self.payload.clone(),
        };
        Some(Frame {
            kind: self.kind,
            msg_type: self.msg_type,
            timestamp,
            payload: self.payload.clone(),
            chunked: chunk::encode_fmt0_bytes(self.csid(), &msg, chunk_size),
            offset: self.offset,
            // A late player's start frames are written by its session, never by the lane.
            log: None,
            _charge: charge,
        })
    }
}

/// What a player's ring carries.
#[derive(Clone, Debug)]
pub enum Event {
    Frame(Arc<Frame>),
    /// A publisher began on the key (players send StreamBegin; a republish after a gap).
    Published,
    /// The publisher left (players send UnpublishNotify and StreamEOF, then keep waiting).
    Unpublished,
    /// Nothing: sent to push the oldest frames out of a ring over its byte bound.
    Filler,
}

/// How the hub buffers.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Chunk size of the shared, prechunked frames (the chunk size we announce to players).
    pub chunk_size: u32,
    /// Messages in each stream's fan-out ring; a player further behind skips ahead.
    pub queue_messages: usize,
    /// Keep the frames since the last keyframe so a late player starts at once.
    pub gop_cache: bool,
    /// Bytes the GOP cache may hold; a longer GOP is not cached (players wait for a keyframe).
    pub gop_max_bytes: usize,
    /// Messages the GOP cache may hold.
    pub gop_max_messages: usize,
    /// A late player starts from the cached GOP only if its keyframe is at most this many
    /// bytes behind live (else it waits for the next keyframe, as it would skip to it anyway).
    pub max_lag_bytes: u64,
    /// Keep each stream's frames in a [`Log`] as well, for the fan-out lane to send from
    /// (set when the engine has a merge window, hence a lane), the logs counted on these
    /// descriptors ([`LogFds::process`] in the engine).
    pub log: Option<Arc<LogFds>>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            chunk_size: 4096,
            queue_messages: 1024,
            gop_cache: true,
            gop_max_bytes: 16 * 1024 * 1024,
            gop_max_messages: 4096,
            max_lag_bytes: 8 * 1024 * 1024,
            log: None,
        }
    }
}

/// What a publish on a key that already has a publisher does (`[engine] publisher_takeover`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherTakeover {
    /// The newcomer is refused (NetStream.Publish.BadName); the publisher on the key stays.
    #[default]
    Deny,
    /// The newcomer replaces the publisher on the key, which is told and closed; players carry
    /// on with the newcomer's media on the same timeline (an encoder reconnecting while its
    /// old connection is still half-open).
    Replace,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    #[error(
        "stream {0} already has a publisher; pick another stream name or stop the other encoder"
    )]
    BadName(String),
}

struct SlotState {
    publisher: Option<u64>,
    /// Wakes the current publisher's session when another one replaces it.
    ousted: Option<Arc<Notify>>,
    /// Subscriptions: players and pushes ([`Hub::play_push`]) alike.
    players: usize,
    /// Of `players`, the restream pushes (reported apart: they are not audience).
    pushes: usize,
    meta: Option<Arc<Frame>>,
    video_header: Option<Arc<Frame>>,
    audio_header: Option<Arc<Frame>>,
    has_video: bool,
    gop: Vec<Arc<Frame>>,
    gop_bytes: usize,
    /// True while `gop` starts at a keyframe and holds every frame since.
    gop_valid: bool,
    /// Added to the publisher's timestamps so a republish continues the timeline.
    ts_base: u32,
    /// First publisher timestamp of a republish (None: not seen yet, or first publish).
    ts_first: Option<u32>,
    rebase: bool,
    /// The largest timestamp players have been sent on this key.
    last_out: Option<u32>,
    /// Bumped whenever a header changes (or the caches are cleared): tells a cached re-timing
    /// apart from a stale one.
    headers_gen: u64,
    /// The headers re-timed to a late player's start (`headers_gen`, start timestamp, frames):
    /// made once for every player that starts at that timestamp, not once per player.
    retimed: Option<(u64, u32, Vec<Arc<Frame>>)>,
    /// Bytes of each event the ring may still hold, oldest first (at most its capacity).
    ring: VecDeque<usize>,
    ring_bytes: usize,
    /// The ring. Until a publisher first comes it is a one-slot channel that only wakes the
    /// players waiting on it (a full ring is ~40 KiB of slots, for nothing to carry): the
    /// first publisher makes the full ring and hands each waiting player a receiver of it,
    /// subscribed before any frame is sent, so nothing is lost in the swap.
    tx: broadcast::Sender<Event>,
    full_ring: bool,
    /// Players subscribed to the one-slot channel, and the full-ring receivers handed to them.
    waiting: Vec<u64>,
    handoff: Vec<(u64, broadcast::Receiver<Event>)>,
    /// The stream's frames for the fan-out lane ([`HubConfig::log`]); made at a frame once
    /// the stream has [`log::MIN_PLAYERS`] and the process room for one more, and not tried
    /// again once the system refused one.
    log: Option<Arc<Log>>,
    log_refused: bool,
}

impl SlotState {
    /// A stream's state before anyone published on it, with the one-slot wake-up channel.
    fn new() -> SlotState {
        let (tx, _) = broadcast::channel(1);
        SlotState {
            publisher: None,
            ousted: None,
            players: 0,
            pushes: 0,
            meta: None,
            video_header: None,
            audio_header: None,
            has_video: false,
            gop: Vec::new(),
            gop_bytes: 0,
            gop_valid: false,
            ts_base: 0,
            ts_first: None,
            rebase: false,
            last_out: None,
            headers_gen: 0,
            retimed: None,
            ring: VecDeque::new(),
            ring_bytes: 0,
            tx,
            full_ring: false,
            waiting: Vec::new(),
            handoff: Vec::new(),
            log: None,
            log_refused: false,
        }
    }

    /// Sends `ev` (`bytes` of frame) to the players, keeping the ring within `cap` events and
    /// `max_bytes` bytes: past the bytes, fillers push the oldest frames out (the newest
    /// frame stays whatever its size).
    fn ring_send(&mut self, ev: Event, bytes: usize, cap: usize, max_bytes: usize) {
        let kept = self.tx.send(ev).is_ok();
        self.ring_push(kept, bytes, cap);
        while self.ring_bytes > max_bytes && self.ring_bytes > bytes {
            let kept = self.tx.send(Event::Filler).is_ok();
            self.ring_push(kept, 0, cap);
        }
    }

    /// Records an event the ring took (`kept`: someone was subscribed, so it holds it).
    fn ring_push(&mut self, kept: bool, bytes: usize, cap: usize) {
        if !kept {
            // With no receiver the channel holds nothing (and what it held is gone).
            self.ring.clear();
            self.ring_bytes = 0;
            return;
        }
        if self.ring.len() >= cap {
            if let Some(old) = self.ring.pop_front() {
                self.ring_bytes = self.ring_bytes.saturating_sub(old);
            }
        }
        self.ring.push_back(bytes);
        self.ring_bytes = self.ring_bytes.saturating_add(bytes);
    }

    fn map_ts(&mut self, ts: u32) -> u32 {
        if !self.rebase {
            return ts;
        }
        let first = *self.ts_first.get_or_insert(ts);
        self.ts_base.wrapping_add(ts.saturating_sub(first))
    }

    fn clear_caches(&mut self) {
        self.headers_gen = self.headers_gen.wrapping_add(1);
        self.retimed = None;
        self.meta = None;
        self.video_header = None;
        self.audio_header = None;
        self.has_video = false;
        self.gop.clear();
        self.gop_bytes = 0;
        self.gop_valid = false;
    }
}

struct Slot {
    key: StreamKey,
    total: AtomicU64,
    state: Mutex<SlotState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a hub lock leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stream as [`Hub::snapshot`] saw it.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub key: StreamKey,
    pub publishing: bool,
    /// Players (restream pushes not included).
    pub players: usize,
    /// Restream pushes reading the stream ([`Hub::play_push`]).
    pub pushes: usize,
    /// Media payload bytes published on the key since it was created.
    pub bytes_in: u64,
    /// The sequence headers (codec configuration), as sent.
    pub video_header: Option<Bytes>,
    pub audio_header: Option<Bytes>,
    /// Bytes held by the GOP cache.
    pub gop_bytes: usize,
}

/// The live streams of one engine.
pub struct Hub {
    cfg: HubConfig,
    slots: Mutex<HashMap<StreamKey, Arc<Slot>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Arc<Hub> {
        Arc::new(Hub {
            cfg,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    /// Events a stream's ring holds (the broadcast channel rounds up to a power of two).
    fn ring_cap(&self) -> usize {
        self.cfg.queue_messages.max(16).next_power_of_two()
    }

    /// Frame bytes a stream's ring may hold.
    fn ring_max_bytes(&self) -> usize {
        usize::try_from(self.cfg.max_lag_bytes.saturating_mul(2)).unwrap_or(usize::MAX)
    }

    /// Streams that have a publisher or players.
    pub fn stream_count(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Every stream's state, for the admin API and metrics (a short lock per stream, off
    /// the data path: called on a scrape or an API request).
    pub fn snapshot(&self) -> Vec<StreamInfo> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .map(|slot| {
                let st = lock(&slot.state);
                StreamInfo {
                    key: slot.key.clone(),
                    publishing: st.publisher.is_some(),
                    players: st.players.saturating_sub(st.pushes),
                    pushes: st.pushes,
                    bytes_in: slot.total.load(Ordering::Relaxed),
                    video_header: st.video_header.as_ref().map(|f| f.payload.clone()),
                    audio_header: st.audio_header.as_ref().map(|f| f.payload.clone()),
                    gop_bytes: st.gop_bytes,
                }
            })
            .collect()
    }

    /// `key` has a publisher now (a play of its name goes to the live stream, not a VOD
    /// file of that name).
    pub fn is_published(&self, key: &StreamKey) -> bool {
        let slot = lock(&self.slots).get(key).cloned();
        slot.is_some_and(|s| lock(&s.state).publisher.is_some())
    }

    /// Players subscribed to `key` now (0 when the key is unknown): an edge's pull, an
    /// internal publisher, ends when its stream has had none for a while.
    pub fn players(&self, key: &StreamKey) -> usize {
        let slot = lock(&self.slots).get(key).cloned();
        slot.map_or(0, |s| lock(&s.state).players)
    }

    fn slot(&self, slots: &mut HashMap<StreamKey, Arc<Slot>>, key: &StreamKey) -> Arc<Slot> {
        slots
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    key: key.clone(),
                    total: AtomicU64::new(0),
                    state: Mutex::new(SlotState::new()),
                })
            })
            .clone()
    }

    /// Become the publisher of `key`, or learn it already has one.
    pub fn publish(self: &Arc<Self>, key: &StreamKey) -> Result<Publisher, HubError> {
        self.publish_with(key, PublisherTakeover::Deny)
    }

    /// Become the publisher of `key`; when it already has one, `takeover` says whether the
    /// newcomer is refused or replaces it. A replaced publisher's pushes are ignored from
    /// then on and its [`Publisher::replaced`] completes (its session closes it); players see
    /// `Published` without an `Unpublished` (an UnpublishNotify would end players such as
    /// ffmpeg) and get the newcomer's headers and media, its timestamps continued after what
    /// they already had, as for a republish after a gap.
    pub fn publish_with(
        self: &Arc<Self>,
        key: &StreamKey,
        takeover: PublisherTakeover,
    ) -> Result<Publisher, HubError> {
        let mut slots = lock(&self.slots);
        let slot = self.slot(&mut slots, key);
        let mut st = lock(&slot.state);
        if st.publisher.is_some() {
            if takeover == PublisherTakeover::Deny {
                return Err(HubError::BadName(key.to_string()));
            }
            // notify_one keeps the wake-up until the old session next waits for it.
            if let Some(old) = st.ousted.take() {
                old.notify_one();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ousted = Arc::new(Notify::new());
        st.publisher = Some(id);
        st.ousted = Some(ousted.clone());
        st.clear_caches();
        st.ts_first = None;
        if let Some(last) = st.last_out {
            // Continue after what players already saw, whatever the new encoder starts at.
            st.rebase = true;
            st.ts_base = last.wrapping_add(1);
        }
        if !st.full_ring {
            // The first publisher: the full ring, a receiver of it for each waiting player,
            // then Published on the wake-up channel (which closes when its sender drops).
            let (big, _) = broadcast::channel(self.ring_cap());
            let handed: Vec<_> = st
                .waiting
                .drain(..)
                .map(|id| (id, big.subscribe()))
                .collect();
            st.handoff.extend(handed);
            let _ = st.tx.send(Event::Published);
            st.tx = big;
            st.full_ring = true;
            st.ring.clear();
            st.ring_bytes = 0;
        } else {
            // Nobody listening is fine: players who come later start from the caches.
            st.ring_send(Event::Published, 0, self.ring_cap(), self.ring_max_bytes());
        }
        drop(st);
        drop(slots);
        Ok(Publisher {
            hub: self.clone(),
            slot,
            id,
            budget: PeerBudget::global_only(),
            ousted,
        })
    }

    /// Subscribe to `key`: the player gets the start frames (metadata, headers, GOP) and a
    /// ring receiver that carries everything after them, with nothing lost in between.
    ///
    /// Nothing is copied under a lock: the start frames are shared `Arc`s, and headers that
    /// need a new timestamp are re-chunked once per start timestamp (outside the locks) and
    /// cached for the next players.
    pub fn play(self: &Arc<Self>, key: &StreamKey) -> Player {
        self.subscribe(key, false)
    }

    /// As [`Hub::play`], for a restream push: the same subscription, counted as a push
    /// rather than a player in [`Hub::snapshot`].
    pub fn play_push(self: &Arc<Self>, key: &StreamKey) -> Player {
        self.subscribe(key, true)
    }

    fn subscribe(self: &Arc<Self>, key: &StreamKey, push: bool) -> Player {
        let mut slots = lock(&self.slots);
        let slot = self.slot(&mut slots, key);
        let mut st = lock(&slot.state);
        // Counted while the hub's lock is held, so `release` cannot drop the slot under us.
        st.players = st.players.saturating_add(1);
        if push {
            st.pushes = st.pushes.saturating_add(1);
        }
        drop(slots);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rx = st.tx.subscribe();
        if !st.full_ring {
            st.waiting.push(id);
        }
        let live = st.publisher.is_some();
        let mut start = Vec::new();
        let mut has_keyframe = false;
        let mut retime = None;
        if live {
            // A GOP whose keyframe is further behind live than a player may lag would be
            // skipped at once: the player waits for the next keyframe instead.
            let total = slot.total.load(Ordering::Relaxed);
            let gop_ok = st.gop_valid
                && st
                    .gop
                    .first()
                    .is_some_and(|f| total.saturating_sub(f.offset) <= self.cfg.max_lag_bytes);
            // Headers keep the timestamp they were published at (often 0); a late player
            // gets them at its own start instead, so its timeline does not jump forward.
            let gop_start = st.gop.first().filter(|_| gop_ok).map(|f| f.timestamp);
            let start_ts = gop_start.or(st.last_out).unwrap_or(0);
            let headers: Vec<Arc<Frame>> = [&st.meta, &st.video_header, &st.audio_header]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            if headers.iter().any(|h| h.timestamp < start_ts) {
                // With a GOP the start is its keyframe (one re-timing per GOP). Without one
                // it is the latest frame, new ~50 times a second: headers re-timed up to
                // RETIME_REUSE_MS earlier are reused, so plays cost at most one re-timing (a
                // copy of up to three headers) a second, however many there are.
                let reusable = |ts: u32| {
                    ts == start_ts
                        || (!gop_ok && ts <= start_ts && start_ts - ts <= RETIME_REUSE_MS)
                };
                match &st.retimed {
                    Some((gen, ts, frames)) if *gen == st.headers_gen && reusable(*ts) => {
                        start.extend(frames.iter().cloned());
                    }
                    _ => retime = Some((st.headers_gen, start_ts, headers)),
                }
            } else {
                start.extend(headers);
            }
            if gop_ok {
                start.extend(st.gop.iter().cloned());
                has_keyframe = !st.gop.is_empty();
            }
        }
        let has_video = st.has_video;
        drop(st);
        if let Some((gen, start_ts, headers)) = retime {
            let chunk_size = self.cfg.chunk_size;
            let frames: Vec<Arc<Frame>> = headers
                .into_iter()
                .map(|h| {
                    if h.timestamp < start_ts {
                        // Over budget: the header at its own time (a jump back, still decodable).
                        h.retimed(start_ts, chunk_size).map_or(h, Arc::new)
                    } else {
                        h
                    }
                })
                .collect();
            let mut st = lock(&slot.state);
            if st.headers_gen == gen {
                st.retimed = Some((gen, start_ts, frames.clone()));
            }
            drop(st);
            // The headers go before the GOP frames already collected.
            start.splice(0..0, frames);
        }
        Player {
            hub: self.clone(),
            slot,
            id,
            push,
            rx,
            start,
            live,
            has_video,
            has_keyframe,
        }
    }

    fn release(&self, slot: &Arc<Slot>) {
        let mut slots = lock(&self.slots);
        let st = lock(&slot.state);
        if st.publisher.is_none() && st.players == 0 {
            if let Some(cur) = slots.get(&slot.key) {
                if Arc::ptr_eq(cur, slot) {
                    drop(st);
                    slots.remove(&slot.key);
                }
            }
        }
    }
}

/// The right to publish on a key; dropping it unpublishes.
pub struct Publisher {
    hub: Arc<Hub>,
    slot: Arc<Slot>,
    id: u64,
    /// What its frames are charged to: the process's budget, and the publishing client's
    /// address's share once [`Publisher::charge_to`] says which.
    budget: PeerBudget,
    /// Notified when another publisher replaces this one.
    ousted: Arc<Notify>,
}

impl Publisher {
    /// Charges this publisher's frames (payload and chunks, for as long as the ring, the GOP
    /// cache or a player holds them) to `budget` too: the publishing client's address's share.
    pub fn charge_to(&mut self, budget: PeerBudget) {
        self.budget = budget;
    }

    pub fn key(&self) -> &StreamKey {
        &self.slot.key
    }

    /// Completes once another publisher has replaced this one (`PublisherTakeover::Replace`):
    /// its frames go nowhere from then on, and its session should tell the client and close.
    /// Owns what it waits on, so a session can keep it with the publish (not borrowed from it).
    pub fn replaced(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let ousted = self.ousted.clone();
        async move { ousted.notified().await }
    }

    /// Drops what players joining later would start with (metadata, sequence headers, the
    /// GOP) while keeping the key published. An edge's pull calls it when its origin
    /// connection is lost: those frames lead nowhere (the next connection starts at a new
    /// keyframe, maybe of a new publish), so a player joining meanwhile would be shown a past
    /// picture first. Players already subscribed are not affected.
    pub fn forget_caches(&self) {
        let mut st = lock(&self.slot.state);
        if st.publisher == Some(self.id) {
            st.clear_caches();
        }
    }

    /// Players currently subscribed to this stream.
    pub fn players(&self) -> usize {
        lock(&self.slot.state).players
    }

    /// Hand one audio, video or data message (metadata already as `onMetaData`) to players.
    ///
    /// The message is chunked between two short holds of the stream's lock, never under it
    /// (a 16 MiB frame must not block players joining the stream).
    ///
    /// Refused, with nothing kept, when the memory budget cannot take the frame's bytes: the
    /// caller closes this publisher.
    pub fn push(&self, msg_type: u8, timestamp: u32, payload: Bytes) -> Result<(), OverBudget> {
        let kind = classify(msg_type, &payload);
        let len = u64::try_from(payload.len()).unwrap_or(u64::MAX);
        let cfg = &self.hub.cfg;
        let (ts, offset, log) = {
            let mut st = lock(&self.slot.state);
            if st.publisher != Some(self.id) {
                return Ok(());
            }
            if let Some(fds) = &cfg.log {
                if st.log.is_none()
                    && !st.log_refused
                    && st.players >= log::MIN_PLAYERS
                    && fds.room()
                {
                    st.log = Log::new(fds);
                    // Refused with room left: the system has no memory files for us.
                    st.log_refused = st.log.is_none() && fds.room();
                }
            }
            let log = st.log.clone();
            let ts = st.map_ts(timestamp);
            // Audio and video interleave slightly out of order: continue after the largest.
            st.last_out = Some(st.last_out.map_or(ts, |l| l.max(ts)));
            let offset = self
                .slot
                .total
                .fetch_add(len, Ordering::Relaxed)
                .saturating_add(len);
            (ts, offset, log)
        };
        // The payload is already here (the decoder's charge for it ends with the message); the
        // frame's charge takes over before the chunked copy is made.
        // With a log, the chunked bytes are held twice (memory and the log's pages).
        let chunked_len = fmt0_len(payload.len(), ts, cfg.chunk_size);
        let charge = self.budget.try_charge(
            payload
                .len()
                .saturating_add(chunked_len)
                .saturating_add(if log.is_some() { chunked_len } else { 0 }),
        )?;
        let mut frame = Frame {
            kind,
            msg_type,
            timestamp: ts,
            payload,
            chunked: Bytes::new(),
            offset,
            log: None,
            _charge: charge,
        };
        let msg = Message {
            msg_type,
            timestamp: ts,
            stream_id: SHARED_STREAM_ID,
            payload: frame.payload.clone(),
        };
        frame.chunked = chunk::encode_fmt0_bytes(frame.csid(), &msg, cfg.chunk_size);
        // Appended before the frame is sent: whoever receives it finds its bytes in the log.
        // A frame the log could not take is written from memory, and charged once.
        if let Some(log) = log {
            frame.log = log.append(&frame.chunked);
            if frame.log.is_none() {
                frame._charge.shrink(chunked_len);
            }
        }
        let frame = Arc::new(frame);
        let mut st = lock(&self.slot.state);
        if st.publisher != Some(self.id) {
            return Ok(());
        }
        if kind.is_header() {
            st.headers_gen = st.headers_gen.wrapping_add(1);
            st.retimed = None;
        }
        match kind {
            FrameKind::Meta => st.meta = Some(frame.clone()),
            FrameKind::VideoHeader => {
                st.has_video = true;
                st.video_header = Some(frame.clone());
            }
            FrameKind::AudioHeader => st.audio_header = Some(frame.clone()),
            FrameKind::VideoKey if cfg.gop_cache => {
                st.has_video = true;
                st.gop.clear();
                st.gop.push(frame.clone());
                st.gop_bytes = frame.payload.len();
                st.gop_valid = true;
            }
            _ => {
                if kind == FrameKind::Video || kind == FrameKind::VideoKey {
                    st.has_video = true;
                }
                if st.gop_valid {
                    let bytes = st.gop_bytes.saturating_add(frame.payload.len());
                    if bytes > cfg.gop_max_bytes || st.gop.len() >= cfg.gop_max_messages {
                        // Too long to keep: late players wait for the next keyframe instead.
                        st.gop.clear();
                        st.gop_bytes = 0;
                        st.gop_valid = false;
                    } else {
                        st.gop.push(frame.clone());
                        st.gop_bytes = bytes;
                    }
                }
            }
        }
        let bytes = frame.chunked.len().saturating_add(frame.payload.len());
        st.ring_send(
            Event::Frame(frame),
            bytes,
            self.hub.ring_cap(),
            self.hub.ring_max_bytes(),
        );
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.slot.state);
            if st.publisher == Some(self.id) {
                st.publisher = None;
                st.ousted = None;
                st.clear_caches();
                st.ring_send(
                    Event::Unpublished,
                    0,
                    self.hub.ring_cap(),
                    self.hub.ring_max_bytes(),
                );
            }
        }
        self.hub.release(&self.slot);
    }
}

/// A subscription to a key; dropping it unsubscribes.
pub struct Player {
    hub: Arc<Hub>,
    slot: Arc<Slot>,
    id: u64,
    /// A restream push ([`Hub::play_push`]), counted apart from players.
    push: bool,
    /// Everything published after the start frames, in order.
    pub rx: broadcast::Receiver<Event>,
    /// Metadata, sequence headers and the GOP since the last keyframe, to send first.
    pub start: Vec<Arc<Frame>>,
    /// A publisher was on the key when the player subscribed.
    pub live: bool,
    /// The stream carries video (so skipping ahead means waiting for a keyframe).
    pub has_video: bool,
    /// `start` ends with a GOP beginning at a keyframe (else wait for one).
    pub has_keyframe: bool,
}

impl Player {
    pub fn key(&self) -> &StreamKey {
        &self.slot.key
    }

    /// After `Published` (or a closed channel) on the wake-up channel of a stream nobody had
    /// published on: continue on the full ring, from the receiver subscribed for this player
    /// before the first frame (or, should there be none, a new one).
    pub fn take_handoff(&mut self) {
        let mut st = lock(&self.slot.state);
        if let Some(at) = st.handoff.iter().position(|(id, _)| *id == self.id) {
            let (_, rx) = st.handoff.swap_remove(at);
            self.rx = rx;
        } else if st.full_ring && !st.waiting.contains(&self.id) && self.rx.is_closed() {
            self.rx = st.tx.subscribe();
        }
    }

    /// Bytes published after `frame`: how far behind live a player writing it is.
    pub fn lag_bytes(&self, frame: &Frame) -> u64 {
        self.slot
            .total
            .load(Ordering::Relaxed)
            .saturating_sub(frame.offset)
    }

    /// The same lag reading, for whoever writes this player's frames (the fan-out lane).
    pub fn lag_probe(&self) -> LagProbe {
        LagProbe(self.slot.clone())
    }
}

/// How far behind live a player writing a frame is ([`Player::lag_bytes`]), without the
/// subscription itself.
pub struct LagProbe(Arc<Slot>);

impl LagProbe {
    pub fn lag_bytes(&self, frame: &Frame) -> u64 {
        self.0
            .total
            .load(Ordering::Relaxed)
            .saturating_sub(frame.offset)
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        let log = {
            let mut st = lock(&self.slot.state);
            st.players = st.players.saturating_sub(1);
            if self.push {
                st.pushes = st.pushes.saturating_sub(1);
            }
            let id = self.id;
            st.waiting.retain(|w| *w != id);
            st.handoff.retain(|(w, _)| *w != id);
            // Below the players that make a log worth it, the stream stops logging: its
            // place among the process's few (STREAM_LOG_FDS) goes back once its logged frames
            // are gone, for a stream that has the players. It gets a new log if they return.
            if st.players < log::MIN_PLAYERS {
                st.log.take()
            } else {
                None
            }
        };
        // The descriptor may close here: not under the stream's lock.
        drop(log);
        self.hub.release(&self.slot);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::message::DATA_AMF0;
    use bytes::BytesMut;

    const AVC_HEADER: &[u8] = &[0x17, 0, 0, 0, 0, 1, 2];
    const AVC_KEY: &[u8] = &[0x17, 1, 0, 0, 0, 9];
    const AVC_INTER: &[u8] = &[0x27, 1, 0, 0, 0, 8];
    const AAC_HEADER: &[u8] = &[0xaf, 0, 0x12, 0x10];
    const AAC_RAW: &[u8] = &[0xaf, 1, 7, 7];

    fn hub() -> Arc<Hub> {
        Hub::new(HubConfig::default())
    }

    fn key(name: &str) -> StreamKey {
        StreamKey::new("live", name)
    }

    fn frame(ev: Event) -> Arc<Frame> {
        match ev {
            Event::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn classifies_legacy_and_enhanced_rtmp() {
        assert_eq!(classify(VIDEO, AVC_HEADER), FrameKind::VideoHeader);
        assert_eq!(classify(VIDEO, AVC_KEY), FrameKind::VideoKey);
        assert_eq!(classify(VIDEO, AVC_INTER), FrameKind::Video);
        assert_eq!(classify(VIDEO, &[]), FrameKind::Video);
        // Enhanced RTMP: IsExHeader | keyframe | SequenceStart, FourCC hvc1.
        assert_eq!(
            classify(VIDEO, &[0x90, b'h', b'v', b'c', b'1']),
            FrameKind::VideoHeader
        );
        // Keyframe, CodedFrames (1), av01.
        assert_eq!(
            classify(VIDEO, &[0x91, b'a', b'v', b'0', b'1', 0]),
            FrameKind::VideoKey
        );
        assert_eq!(
            classify(VIDEO, &[0xa1, b'a', b'v', b'0', b'1', 0]),
            FrameKind::Video
        );
        assert_eq!(classify(AUDIO, AAC_HEADER), FrameKind::AudioHeader);
        assert_eq!(classify(AUDIO, AAC_RAW), FrameKind::Audio);
        assert_eq!(classify(AUDIO, &[0x2f, 1]), FrameKind::Audio);
        assert_eq!(
            classify(AUDIO, &[0x90, b'O', b'p', b'u', b's']),
            FrameKind::AudioHeader
        );
        let mut meta = vec![2, 0, 10];
        meta.extend_from_slice(b"onMetaData");
        meta.push(5);
        assert_eq!(classify(DATA_AMF0, &meta), FrameKind::Meta);
        assert_eq!(classify(DATA_AMF0, &[2, 0, 1, b'x']), FrameKind::Data);
        assert_eq!(classify(DATA_AMF0, &[2, 0, 9, b'x']), FrameKind::Data);
    }

    #[test]
    fn leading_string_is_bounds_checked() {
        assert_eq!(
            leading_amf0_string(&[2, 0, 2, b'h', b'i', 5]),
            Some(("hi", 5))
        );
        assert_eq!(leading_amf0_string(&[2, 0, 9, b'h']), None);
        assert_eq!(leading_amf0_string(&[2, 0]), None);
        assert_eq!(leading_amf0_string(&[3]), None);
        assert_eq!(leading_amf0_string(&[]), None);
    }

    #[test]
    fn second_publisher_is_refused_until_the_first_leaves() {
        let hub = hub();
        let first = hub.publish(&key("a")).unwrap();
        assert_eq!(
            hub.publish(&key("a")).err(),
            Some(HubError::BadName("live/a".into()))
        );
        assert!(hub.publish(&key("b")).is_ok());
        drop(first);
        assert!(hub.publish(&key("a")).is_ok());
    }

    #[test]
    fn late_player_gets_headers_and_the_gop_from_the_last_keyframe() {
        let hub = hub();
        let p = hub.publish(&key("k")).unwrap();
        p.push(VIDEO, 0, Bytes::from_static(AVC_HEADER)).unwrap();
        p.push(AUDIO, 0, Bytes::from_static(AAC_HEADER)).unwrap();
        p.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        p.push(VIDEO, 33, Bytes::from_static(AVC_INTER)).unwrap();
        p.push(VIDEO, 1000, Bytes::from_static(AVC_KEY)).unwrap();
        p.push(AUDIO, 1010, Bytes::from_static(AAC_RAW)).unwrap();
        p.push(VIDEO, 1033, Bytes::from_static(AVC_INTER)).unwrap();
        let mut pl = hub.play(&key("k"));
        assert!(pl.live && pl.has_video && pl.has_keyframe);
        let kinds: Vec<_> = pl.start.iter().map(|f| (f.kind, f.timestamp)).collect();
        // Headers published at 0 come at the GOP's start, rechunked with that timestamp.
        assert_eq!(
            kinds,
            vec![
                (FrameKind::VideoHeader, 1000),
                (FrameKind::AudioHeader, 1000),
                (FrameKind::VideoKey, 1000),
                (FrameKind::Audio, 1010),
                (FrameKind::Video, 1033),
            ]
        );
        let mut want = BytesMut::new();
        let header = Message::new(
            VIDEO,
            1000,
            SHARED_STREAM_ID,
            Bytes::from_static(AVC_HEADER),
        );
        chunk::encode_fmt0(CSID_VIDEO, &header, 4096, &mut want);
        assert_eq!(pl.start[0].chunked, want.freeze());
        // Nothing is lost or repeated between the start frames and the ring.
        p.push(VIDEO, 1066, Bytes::from_static(AVC_INTER)).unwrap();
        let f = frame(pl.rx.try_recv().unwrap());
        assert_eq!(f.timestamp, 1066);
        assert!(pl.rx.try_recv().is_err());
        assert_eq!(pl.lag_bytes(&f), 0);
    }

    #[test]
    fn forgotten_caches_start_a_late_player_on_the_next_frames_only() {
        let hub = hub();
        let p = hub.publish(&key("f")).unwrap();
        let mut early = hub.play(&key("f"));
        p.push(VIDEO, 0, Bytes::from_static(AVC_HEADER)).unwrap();
        p.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        p.push(VIDEO, 33, Bytes::from_static(AVC_INTER)).unwrap();
        p.forget_caches();
        // Still published (no Unpublished for anyone), nothing to start a newcomer with.
        let mut late = hub.play(&key("f"));
        assert!(late.live && late.start.is_empty() && !late.has_keyframe);
        p.push(VIDEO, 66, Bytes::from_static(AVC_KEY)).unwrap();
        assert_eq!(frame(late.rx.try_recv().unwrap()).timestamp, 66);
        // A player already subscribed keeps everything, in order.
        let mut got = Vec::new();
        while let Ok(ev) = early.rx.try_recv() {
            if let Event::Frame(f) = ev {
                got.push(f.timestamp);
            }
        }
        assert_eq!(got, [0, 0, 33, 66]);
        // A replaced publisher's handle cannot clear its successor's caches.
        let q = hub
            .publish_with(&key("f"), PublisherTakeover::Replace)
            .unwrap();
        q.push(VIDEO, 100, Bytes::from_static(AVC_KEY)).unwrap();
        p.forget_caches();
        assert!(hub.play(&key("f")).has_keyframe);
    }

    #[test]
    fn headers_are_retimed_once_for_many_players() {
        // Audio only: no GOP, so a player starts at the latest frame.
        let hub = hub();
        let p = hub.publish(&key("a")).unwrap();
        p.push(AUDIO, 0, Bytes::from_static(AAC_HEADER)).unwrap();
        for i in 1..=10u32 {
            p.push(AUDIO, i * 23, Bytes::from_static(AAC_RAW)).unwrap();
        }
        let first = hub.play(&key("a"));
        assert_eq!(first.start.len(), 1);
        assert_eq!(first.start[0].timestamp, 230);
        // Later frames, later players: the same re-timed header (shared, not a copy each).
        for i in 11..=40u32 {
            p.push(AUDIO, i * 23, Bytes::from_static(AAC_RAW)).unwrap();
            let pl = hub.play(&key("a"));
            assert!(Arc::ptr_eq(&pl.start[0], &first.start[0]), "frame {i}");
        }
        // Over a second later: re-timed again.
        p.push(AUDIO, 1300, Bytes::from_static(AAC_RAW)).unwrap();
        let pl = hub.play(&key("a"));
        assert_eq!(pl.start[0].timestamp, 1300);
    }

    #[test]
    fn prechunked_frame_is_shared_and_rechunked_for_other_stream_ids() {
        let hub = hub();
        let p = hub.publish(&key("c")).unwrap();
        let mut pl = hub.play(&key("c"));
        assert!(pl.rx.try_recv().is_err());
        let payload = Bytes::from(vec![0x27u8; 10_000]);
        p.push(VIDEO, 40, payload.clone()).unwrap();
        let f = frame(pl.rx.try_recv().unwrap());
        let (head, shared) = f.chunks_for(SHARED_STREAM_ID, 4096, 4096);
        assert!(head.is_none());
        assert_eq!(
            shared.as_ptr(),
            f.chunked.as_ptr(),
            "shared bytes, not a copy"
        );
        let msg = Message {
            msg_type: VIDEO,
            timestamp: 40,
            stream_id: 5,
            payload,
        };
        let mut want = BytesMut::new();
        chunk::encode_fmt0(CSID_VIDEO, &msg, 4096, &mut want);
        // Another stream id: a header of its own, then the shared chunks (no payload copy).
        let (head, rest) = f.chunks_for(5, 4096, 4096);
        let head = head.expect("a header naming stream 5");
        assert_eq!(rest.as_ptr(), f.chunked[head.len()..].as_ptr(), "shared");
        let mut got = BytesMut::from(&head[..]);
        got.extend_from_slice(&rest);
        assert_eq!(got.freeze(), want.freeze());
        // Another chunk size: chunked again.
        let (head, other) = f.chunks_for(5, 128, 4096);
        let mut want = BytesMut::new();
        chunk::encode_fmt0(CSID_VIDEO, &msg, 128, &mut want);
        assert!(head.is_none());
        assert_eq!(other, want.freeze());
    }

    #[test]
    fn waiting_player_sees_publish_unpublish_and_a_continuous_timeline() {
        let hub = hub();
        let mut pl = hub.play(&key("w"));
        assert!(!pl.live && pl.start.is_empty());
        let p = hub.publish(&key("w")).unwrap();
        assert!(matches!(pl.rx.try_recv(), Ok(Event::Published)));
        pl.take_handoff();
        p.push(VIDEO, 500, Bytes::from_static(AVC_KEY)).unwrap();
        assert_eq!(frame(pl.rx.try_recv().unwrap()).timestamp, 500);
        drop(p);
        assert!(matches!(pl.rx.try_recv(), Ok(Event::Unpublished)));
        // The new encoder starts again at 0: players continue after 500.
        let p = hub.publish(&key("w")).unwrap();
        assert!(matches!(pl.rx.try_recv(), Ok(Event::Published)));
        p.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        p.push(VIDEO, 40, Bytes::from_static(AVC_INTER)).unwrap();
        assert_eq!(frame(pl.rx.try_recv().unwrap()).timestamp, 501);
        assert_eq!(frame(pl.rx.try_recv().unwrap()).timestamp, 541);
    }

    #[test]
    fn replace_takes_the_key_over_and_players_continue_the_timeline() {
        let hub = hub();
        let old = hub.publish(&key("t")).unwrap();
        old.push(VIDEO, 0, Bytes::from_static(AVC_HEADER)).unwrap();
        old.push(VIDEO, 900, Bytes::from_static(AVC_KEY)).unwrap();
        let mut pl = hub.play(&key("t"));
        assert!(pl.live);
        let new = hub
            .publish_with(&key("t"), PublisherTakeover::Replace)
            .unwrap();
        // No Unpublished: players keep playing.
        assert!(matches!(pl.rx.try_recv(), Ok(Event::Published)));
        // The old publisher's frames go nowhere, and it learns it was replaced.
        old.push(VIDEO, 940, Bytes::from_static(AVC_INTER)).unwrap();
        assert!(pl.rx.try_recv().is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), old.replaced())
                .await
                .expect("the replaced publisher is told");
        });
        new.push(VIDEO, 0, Bytes::from_static(AVC_HEADER)).unwrap();
        new.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        let h = frame(pl.rx.try_recv().unwrap());
        assert_eq!((h.kind, h.timestamp), (FrameKind::VideoHeader, 901));
        assert_eq!(frame(pl.rx.try_recv().unwrap()).timestamp, 901);
        // Dropping the replaced publisher does not unpublish the new one.
        drop(old);
        assert!(pl.rx.try_recv().is_err());
        assert!(hub.snapshot().iter().any(|s| s.publishing));
        // A third publisher with deny is refused as before.
        assert!(hub.publish(&key("t")).is_err());
    }

    #[test]
    fn a_player_without_a_publisher_holds_no_full_ring() {
        let hub = hub();
        let mut early = hub.play(&key("d"));
        {
            let st = lock(&early.slot.state);
            assert!(!st.full_ring && st.waiting == vec![early.id]);
        }
        let mut gone = hub.play(&key("d"));
        drop(hub.play(&key("d")));
        let p = hub.publish(&key("d")).unwrap();
        // Frames sent before a waiting player takes its receiver reach it all the same.
        p.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        assert!(matches!(early.rx.try_recv(), Ok(Event::Published)));
        early.take_handoff();
        assert_eq!(frame(early.rx.try_recv().unwrap()).timestamp, 0);
        let late = hub.play(&key("d"));
        assert!(late.live && late.has_keyframe);
        drop(gone.rx.try_recv());
        gone.take_handoff();
        drop(gone);
        let st = lock(&p.slot.state);
        assert!(st.full_ring && st.waiting.is_empty() && st.handoff.is_empty());
    }

    #[test]
    fn slots_are_removed_when_nobody_is_left() {
        let hub = hub();
        let p = hub.publish(&key("x")).unwrap();
        let pl = hub.play(&key("x"));
        assert_eq!(hub.stream_count(), 1);
        drop(p);
        assert_eq!(hub.stream_count(), 1, "the player still waits");
        drop(pl);
        assert_eq!(hub.stream_count(), 0);
    }

    #[test]
    fn a_slow_player_lags_in_a_bounded_ring() {
        let hub = Hub::new(HubConfig {
            queue_messages: 16,
            ..HubConfig::default()
        });
        let p = hub.publish(&key("r")).unwrap();
        let mut pl = hub.play(&key("r"));
        for i in 0..100u32 {
            p.push(VIDEO, i * 33, Bytes::from_static(AVC_INTER))
                .unwrap();
        }
        assert!(matches!(
            pl.rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        let f = frame(pl.rx.try_recv().unwrap());
        assert!(pl.lag_bytes(&f) > 0);
    }

    #[test]
    fn the_ring_is_bounded_in_bytes() {
        let hub = Hub::new(HubConfig {
            max_lag_bytes: 10_000,
            ..HubConfig::default()
        });
        let p = hub.publish(&key("b")).unwrap();
        let mut pl = hub.play(&key("b"));
        assert!(pl.rx.try_recv().is_err());
        let frame = Bytes::from(vec![0x27u8; 3_000]);
        for i in 0..100u32 {
            p.push(VIDEO, i * 33, frame.clone()).unwrap();
            let st = lock(&p.slot.state);
            // 2 x max_lag_bytes of frame bytes (payload and chunks), whatever the messages.
            assert!(st.ring_bytes <= 20_000, "{} bytes held", st.ring_bytes);
        }
        // The player that read nothing lags and skips, as on a message-count lag.
        assert!(matches!(
            pl.rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
        // A frame bigger than the bound is still sent, alone (its payload and its chunks).
        p.push(VIDEO, 9_000, Bytes::from(vec![0x27u8; 30_000]))
            .unwrap();
        let ring_bytes = lock(&p.slot.state).ring_bytes;
        assert!((60_000..70_000).contains(&ring_bytes), "{ring_bytes}");
    }

    /// The frame a player gets next, or why not.
    fn next_frame(pl: &mut Player) -> Arc<Frame> {
        frame(pl.rx.try_recv().expect("a frame in the ring"))
    }

    #[test]
    fn past_the_bound_on_open_logs_a_stream_is_played_from_memory() {
        use crate::door::fdlimit::STREAM_LOG_FDS;
        // A count of its own: other tests open logs meanwhile.
        let fds: Arc<LogFds> = Arc::default();
        let hub = Hub::new(HubConfig {
            log: Some(fds.clone()),
            ..HubConfig::default()
        });
        let bound = usize::try_from(STREAM_LOG_FDS).unwrap();
        // One stream more than the bound, each with the players that give it a log.
        let mut streams: Vec<(Publisher, [Player; 2])> = (0..=bound)
            .map(|i| {
                let k = key(&format!("s{i}"));
                let p = hub.publish(&k).unwrap();
                (p, [hub.play(&k), hub.play(&k)])
            })
            .collect();
        let chunked = |ts: u32, payload: &Bytes| {
            let msg = Message::new(VIDEO, ts, SHARED_STREAM_ID, payload.clone());
            chunk::encode_fmt0_bytes(CSID_VIDEO, &msg, 4096)
        };
        let mut logged = 0;
        for (i, (p, players)) in streams.iter_mut().enumerate() {
            let payload = Bytes::from(vec![0x27, 1, 0, 0, 0, (i % 256) as u8]);
            p.push(VIDEO, 40, payload.clone()).unwrap();
            let want = chunked(40, &payload);
            let f = next_frame(&mut players[0]);
            assert!(Arc::ptr_eq(&f, &next_frame(&mut players[1])));
            assert_eq!((&f.payload, &f.chunked), (&payload, &want), "stream {i}");
            if let Some(range) = &f.log {
                assert_eq!(range.read(), want.to_vec(), "stream {i}'s log");
                logged += 1;
            } else {
                assert_eq!(i, bound, "stream {i} has no log, with {logged} open");
            }
        }
        assert_eq!(logged, bound);
        assert_eq!(fds.open(), STREAM_LOG_FDS);
        // A logged stream that ends gives its descriptor back; the stream that had none gets
        // one at its next frame.
        drop(streams.swap_remove(0));
        assert_eq!(fds.open(), STREAM_LOG_FDS - 1);
        let (p, players) = &mut streams[0];
        let payload = Bytes::from_static(AVC_INTER);
        p.push(VIDEO, 80, payload.clone()).unwrap();
        let f = next_frame(&mut players[0]);
        let want = chunked(80, &payload).to_vec();
        assert_eq!(f.log.as_ref().map(LogRange::read), Some(want));
        assert_eq!(fds.open(), STREAM_LOG_FDS);
    }

    #[test]
    fn a_stream_below_two_players_stops_logging_and_logs_again_with_two() {
        let fds: Arc<LogFds> = Arc::default();
        let hub = Hub::new(HubConfig {
            log: Some(fds.clone()),
            ..HubConfig::default()
        });
        let k = key("s");
        let p = hub.publish(&k).unwrap();
        let mut a = hub.play(&k);
        let b = hub.play(&k);
        p.push(VIDEO, 40, Bytes::from_static(AVC_KEY)).unwrap();
        let first = next_frame(&mut a).log.as_ref().map(|r| r.log().clone());
        let first = first.expect("two players: the frame is logged");
        drop(b);
        p.push(VIDEO, 80, Bytes::from_static(AVC_INTER)).unwrap();
        assert!(next_frame(&mut a).log.is_none(), "one player: no log");
        let _c = hub.play(&k);
        p.push(VIDEO, 120, Bytes::from_static(AVC_INTER)).unwrap();
        let again = next_frame(&mut a);
        let again = again.log.as_ref().expect("two players again: logged again");
        assert!(
            !Arc::ptr_eq(again.log(), &first),
            "a new log, not the first one"
        );
        // The first stays open while anything holds it (the ring, the GOP cache, this test):
        // two places.
        assert_eq!(fds.open(), 2);
    }

    #[test]
    fn gop_cache_is_bounded() {
        let hub = Hub::new(HubConfig {
            gop_max_messages: 4,
            ..HubConfig::default()
        });
        let p = hub.publish(&key("g")).unwrap();
        p.push(VIDEO, 0, Bytes::from_static(AVC_KEY)).unwrap();
        for i in 1..10u32 {
            p.push(VIDEO, i * 33, Bytes::from_static(AVC_INTER))
                .unwrap();
        }
        let pl = hub.play(&key("g"));
        assert!(pl.start.is_empty() && !pl.has_keyframe && pl.has_video);
    }
}
