//! The engine session's side of on-demand playback: a play whose name is a file in
//! `[engine] vod_dir` (see [`crate::engine::vod`] for names, confinement and the reader),
//! its seek, pause and end, and getStreamLength.
//!
//! Precedence: a name written as a file (`NAME.flv`, `flv:NAME`) is always the file; a
//! bare `NAME` is the live stream when `APP/NAME` has a publisher at the moment of the
//! play, else `vod_dir/NAME.flv` when that file exists, else a live play that waits for a
//! publisher as before.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{EngineConnection, StreamKey};
use crate::engine::hub::{CSID_AUDIO, CSID_DATA, CSID_VIDEO};
use crate::engine::vod::{self, Item, Reader, Resolved, Start, VodLimits};
use crate::rtmp::chunk;
use crate::rtmp::message::{Message, AUDIO, VIDEO};
use crate::rtmp::session::{command, StreamRequest};

/// A play of a file on this connection.
pub(super) struct VodState {
    stream_id: u32,
    path: PathBuf,
    key: StreamKey,
    /// None while paused, after the end, or after a failure.
    reader: Option<Reader>,
    paused: bool,
    done: bool,
    /// A seek is under way: its Seek.Notify goes out once the reader says where it starts.
    seeking: bool,
    /// Where the play started (ms), for a resume before any tag went out.
    start_ms: u32,
    /// The offset after the last tag queued and its timestamp: where a resume continues.
    resume: Option<(u64, u32)>,
    bytes: u64,
    /// A play2 switch brought the play here: TransitionComplete before the first keyframe.
    transition: bool,
    saw_video: bool,
}

impl VodState {
    pub(super) fn stream_id(&self) -> u32 {
        self.stream_id
    }
}

/// The connection's file reader's next item; pending when there is none.
pub(super) fn next_item(
    vod: &mut Option<Box<VodState>>,
) -> impl std::future::Future<Output = Item> + '_ {
    // A poll, not an async fn: the session's select holds this future inline for its whole
    // life, and a channel receive awaited in an async fn would be part of it even when the
    // connection plays no file.
    std::future::poll_fn(
        move |cx| match vod.as_mut().and_then(|v| v.reader.as_mut()) {
            Some(r) => r.poll_next(cx),
            None => std::task::Poll::Pending,
        },
    )
}

/// A play's start position (ms) from play's third argument: -2/-1 (live, or any) and
/// anything not a finite positive number mean the start of the file.
fn start_ms(start: Option<f64>) -> u32 {
    match start {
        Some(s) if s.is_finite() && s > 0.0 => s.min(f64::from(u32::MAX)) as u32,
        _ => 0,
    }
}

impl EngineConnection {
    fn vod_limits(&self) -> VodLimits {
        self.engine.limits().into()
    }

    /// Serves `request` from a VOD file when its name means one; false when it is a live
    /// play (no VOD directory, no such file, or a bare name with a live publisher).
    pub(super) fn play_vod(
        &mut self,
        request: &StreamRequest,
        start: Option<f64>,
        switch: bool,
    ) -> bool {
        // A switch from one file to another continues at the same position.
        let was_at = self.vod.take().and_then(|v| v.resume).map(|r| r.1);
        let Some(dir) = self.engine.config().vod_dir.clone() else {
            return false;
        };
        let key = StreamKey::new(&request.app, &request.name);
        let (path, explicit) = match vod::resolve(&dir, &request.name) {
            Resolved::File { path, explicit } => (path, explicit),
            Resolved::NotFile { explicit: false } => return false,
            Resolved::NotFile { explicit: true } => {
                if let Some(also) = self.warnings.should_log("lines") {
                    info!(
                        session = self.id,
                        "{}: play {key} refused: no such file in the VOD directory{also}",
                        self.label
                    );
                }
                let why = format!("No file {} in the VOD directory.", request.name);
                self.proto
                    .reject_with(request.request_id, "NetStream.Play.StreamNotFound", &why);
                return true;
            }
            Resolved::Refused(why) => {
                if let Some(also) = self.warnings.should_log("lines") {
                    warn!(
                        session = self.id,
                        "{}: play {key} refused: {why}; only files inside the VOD directory \
                         are served{also}",
                        self.label
                    );
                }
                self.proto.reject_with(
                    request.request_id,
                    "NetStream.Play.StreamNotFound",
                    "No such stream.",
                );
                return true;
            }
        };
        if !explicit && self.engine.hub().is_published(&key) {
            // A bare name that is live right now is the live stream.
            return false;
        }
        let from = match (switch, was_at) {
            (true, Some(ts)) => ts,
            _ => start_ms(start),
        };
        self.plays = self.plays.saturating_add(1);
        if let Some(also) = self.warnings.should_log("lines") {
            info!(
                session = self.id,
                "{}: play {key} (file {}, from {from} ms){also}",
                self.label,
                path.display()
            );
        }
        self.role = format!("play {key} (file)");
        crate::sessions::tag_stream(crate::sessions::Role::Player, &key.app, &key.name);
        self.proto.accept_recorded(request.request_id);
        self.send_replies();
        let reader = vod::spawn(
            path.clone(),
            Start::At(from),
            self.vod_limits(),
            &self.budget,
        );
        self.vod = Some(Box::new(VodState {
            stream_id: request.stream_id,
            path,
            key,
            reader: Some(reader),
            paused: false,
            done: false,
            seeking: false,
            start_ms: from,
            resume: None,
            bytes: 0,
            transition: switch,
            saw_video: false,
        }));
        true
    }

    /// What the file's reader handed over.
    pub(super) fn on_vod_item(&mut self, item: Item) {
        let cs = self.proto.out_chunk_size();
        let Some(v) = &mut self.vod else {
            return;
        };
        match item {
            Item::Started { ts, how } => {
                if v.start_ms > 0 {
                    // A seek (or a play from a position): where it landed and how.
                    info!(
                        session = self.id,
                        "{}: play {} (file) at {} ms: keyframe at {ts} ms, found by {how}",
                        self.label,
                        v.key,
                        v.start_ms
                    );
                }
                if std::mem::take(&mut v.seeking) {
                    self.proto.seeked(ts);
                    self.send_replies();
                }
            }
            Item::Tag(tag, _charge) => {
                let csid = match tag.tag_type {
                    AUDIO => CSID_AUDIO,
                    VIDEO => CSID_VIDEO,
                    _ => CSID_DATA,
                };
                v.resume = Some((tag.end(), tag.timestamp));
                let complete =
                    v.transition && (tag.is_keyframe() || (tag.tag_type == AUDIO && !v.saw_video));
                v.saw_video |= tag.tag_type == VIDEO;
                if complete {
                    // The new rendition starts with this keyframe: say so just before it.
                    v.transition = false;
                    self.proto.transition_complete();
                    self.send_replies();
                }
                let Some(v) = &mut self.vod else {
                    return;
                };
                v.bytes = v.bytes.saturating_add(tag.body.len() as u64);
                let msg = Message::new(tag.tag_type, tag.timestamp, v.stream_id, tag.body);
                self.write_now = true;
                self.push_bytes(chunk::encode_fmt0_bytes(csid, &msg, cs));
            }
            Item::End => {
                v.done = true;
                v.reader = None;
                let (ms, bytes) = (v.resume.map_or(0, |r| u64::from(r.1)), v.bytes);
                info!(
                    session = self.id,
                    "{}: play {} (file) reached the end: {bytes} bytes of media", self.label, v.key
                );
                self.proto.play_complete(ms, bytes);
                self.send_replies();
            }
            Item::Failed(e) => {
                warn!(
                    session = self.id,
                    "{}: play {} of {} ended: {e}",
                    self.label,
                    v.key,
                    v.path.display()
                );
                self.vod = None;
                let why = format!("The file cannot be played on: {e}");
                self.proto.play_failed(&why);
                self.send_replies();
            }
        }
    }

    /// seek on the file's play: the reader restarts at the keyframe at or before `ms`.
    pub(super) fn vod_seek(&mut self, ms: f64) {
        let limits = self.vod_limits();
        let Some(v) = &mut self.vod else {
            return;
        };
        let ms = start_ms(Some(ms));
        v.reader = None;
        v.done = false;
        v.seeking = true;
        v.start_ms = ms;
        v.resume = None;
        if !v.paused {
            v.reader = Some(vod::spawn(
                v.path.clone(),
                Start::At(ms),
                limits,
                &self.budget,
            ));
        } else {
            // Paused: Seek.Notify now; the media follows the unpause.
            v.seeking = false;
            self.proto.seeked(ms);
            self.send_replies();
        }
    }

    /// pause / unpause on the file's play (the notice is already queued): stop reading, or
    /// continue right after the last tag sent, on a clock restarted now.
    pub(super) fn vod_pause(&mut self, paused: bool) {
        let limits = self.vod_limits();
        let Some(v) = &mut self.vod else {
            return;
        };
        if paused {
            v.paused = true;
            v.reader = None;
            return;
        }
        if !v.paused || v.done {
            return;
        }
        v.paused = false;
        let start = match v.resume {
            Some((from, ts)) => Start::Resume { from, ts },
            None => Start::At(v.start_ms),
        };
        v.reader = Some(vod::spawn(v.path.clone(), start, limits, &self.budget));
    }

    /// getStreamLength: a VOD file's duration in seconds, 0 for anything else.
    pub(super) fn vod_stream_length(&mut self, txn: f64, raw: &str) {
        let max = self.engine.limits().max_name_len;
        let secs = match (&self.engine.config().vod_dir, command::clean_name(raw, max)) {
            (Some(dir), Some(name)) => match vod::resolve(dir, &name) {
                // A few small reads at the file's start and end (its metadata or last tag).
                Resolved::File { path, .. } => {
                    vod::duration_ms(&path, &self.vod_limits()).map_or(0.0, |ms| ms as f64 / 1000.0)
                }
                _ => 0.0,
            },
            _ => 0.0,
        };
        self.proto.stream_length(txn, secs);
    }
}
