//! HTTP-FLV playback: `GET /APP/STREAM.flv` answered with the live stream as one endless FLV
//! file, for browsers (mpegts.js, flv.js) and any player that reads FLV over HTTP.
//!
//! The door reads the request head (bounded by `limits.max_http_header` and
//! `limits.http_header_timeout_secs`) and hands the connection here as transport `http` or
//! `https`. What happens then, in order:
//!
//! 1. OPTIONS is answered 204 with the CORS headers; methods other than GET and HEAD get 405.
//! 2. The path must be `/APP/STREAM.flv` (APP may hold slashes, STREAM may not; both
//!    percent-decoded, each at most `limits.max_name_len` bytes): else 404.
//! 3. `[auth]` decides as for an RTMP player: the connect rules for APP, then the play rules
//!    for STREAM, with the request's query string as both the connect's and the play's
//!    (`?key=`, `?token=&expires=`), the client's address, and the HTTP callbacks
//!    (`call=connect`, then `call=play`, and `call=done` at the end). A denial is 403 with the
//!    reason as the body.
//! 4. The player subscribes to the hub like an RTMP one. A stream that is not being
//!    published is waited for up to `[engine] http_flv_wait_ms` (5 s by default: a player
//!    started just before its publisher still gets the start), then answered 404. HEAD
//!    answers 200 or 404 the same way, without a body.
//! 5. 200 with `Content-Type: video/x-flv`: HTTP/1.1 gets a chunked body, HTTP/1.0 a body
//!    ended by the close. The FLV header's audio/video flags come from what the stream
//!    carries (metadata and the first frames), then metadata, sequence headers and the
//!    cached GOP, so a player starts at once, then the live frames as tags.
//! 6. A slow reader is handled exactly as a slow RTMP player: frames are shared with the
//!    hub, a player too far behind (the ring's `queue_messages`, `max_lag_bytes`) skips to
//!    the next keyframe (counted in `rtmpgate_player_skips_total` and the close line's
//!    `skips=`), and one that takes nothing for `write_timeout_secs` is dropped.
//! 7. The response ends (the chunked terminator, then the close) when the publisher leaves:
//!    FLV has no way to say "wait", so players reconnect. Timestamps are the stream's own,
//!    as RTMP players get them.
//!
//! Every answer but the stream closes the connection (no keep-alive to bound). Bytes the
//! client sends after its request are read and dropped (a fixed buffer): reading is how its
//! going away is seen.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::{debug, info};

use super::flv::{self, TagKind};
use super::hub::{Event, Frame, FrameKind, Player, StreamKey};
use super::{tick, Engine};
use crate::auth::{Action, AuthRequest, Decision};
use crate::net::http::{self, Method, RequestHead};
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::message::{AUDIO, VIDEO};
use crate::stream::ClientStream;

/// Events drained per wake-up, and bytes queued, before they are written (as RTMP players).
const BATCH_EVENTS: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes copied into one write for streams without vectored writes (TLS).
const COALESCE_MAX: usize = 256 * 1024;
/// Buffers handed to one vectored write.
const IOV_MAX: usize = 64;
/// Frames held before the FLV header is written while the stream's tracks are not known yet
/// (no media frame seen), and how long: then the header says what was seen.
const PRELUDE_FRAMES: usize = 64;
const PRELUDE_WAIT: Duration = Duration::from_secs(3);
/// How long a refusal or a HEAD answer may take to be written.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The methods an HTTP-FLV URL answers.
const ALLOW: &str = "GET, HEAD, OPTIONS";

/// How a request ended, for the close line.
enum Outcome {
    /// Answered with a status and no stream.
    Answered(u16, String),
    /// The stream ended: why.
    Streamed(String),
}

/// Serves one HTTP request (the door attached its head to `io`), then logs the close line.
pub(crate) async fn serve(engine: Arc<Engine>, mut io: ClientStream, id: u64) {
    let started = Instant::now();
    let label = io.label();
    let Some(head) = io.http.take() else {
        return;
    };
    let mut s = HttpPlayer {
        engine,
        id,
        label: label.clone(),
        role: String::new(),
        bytes_out: 0,
        bytes_in: 0,
        skips: 0,
    };
    let outcome = s.serve(&mut io, &head).await;
    let how = match outcome {
        Outcome::Answered(status, why) => format!("answered {status}: {why}"),
        Outcome::Streamed(why) => why,
    };
    let role = if s.role.is_empty() { "-" } else { &s.role };
    info!(
        session = id,
        "session close: {label} {role} in={}B out={}B duration={:.1}s skips={}: {how}",
        s.bytes_in,
        s.bytes_out,
        started.elapsed().as_secs_f64(),
        s.skips,
    );
}

struct HttpPlayer {
    engine: Arc<Engine>,
    id: u64,
    label: String,
    /// "play live/key (http-flv)" once the request named a stream.
    role: String,
    bytes_out: u64,
    bytes_in: u64,
    skips: u64,
}

/// The stream part of `/APP/STREAM.flv`, checked as RTMP names are; None if it is not one.
pub fn parse_path(path: &str, max_len: usize) -> Option<(String, String)> {
    let rest = path.strip_prefix('/')?;
    let (app, file) = rest.rsplit_once('/')?;
    let name = file.strip_suffix(".flv")?;
    // A literal '+' in a path is a plus, not a space (that is a query's convention).
    let decode = |s: &str| crate::auth::percent_decode(&s.replace('+', "%2B"));
    let clean = |s: &str| {
        let s = decode(s);
        // A decoded '?' would be taken for a query by the name checks: not a name.
        if s.contains('?') {
            return None;
        }
        crate::rtmp::session::command::clean_name(&s, max_len)
    };
    Some((clean(app)?, clean(name)?))
}

/// The flags for the FLV header: from the metadata's codec ids and the frames seen.
fn tracks(frames: &[Arc<Frame>]) -> (bool, bool) {
    let (mut audio, mut video) = (false, false);
    for f in frames {
        match f.msg_type {
            AUDIO => audio = true,
            VIDEO => video = true,
            _ if f.kind == FrameKind::Meta => {
                let limits = crate::rtmp::amf::AmfLimits::default();
                if let Ok(values) = crate::rtmp::amf0::decode_all(&f.payload, &limits) {
                    if let Some(props) = values.get(1).and_then(Amf0Value::props) {
                        for (k, v) in props {
                            let set = !matches!(v, Amf0Value::Null | Amf0Value::Undefined);
                            match k.as_str() {
                                "audiocodecid" if set => audio = true,
                                "videocodecid" if set => video = true,
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (audio, video)
}

/// What the player still has to do with its frames: skipping after a lag, as an RTMP player.
struct Flow {
    player: Player,
    has_video: bool,
    skipping: bool,
    skips: u64,
    first_frame: bool,
    play_at: Instant,
    /// The publisher left: the response ends once what is queued is written.
    ended: bool,
}

/// The body being written: tag parts waiting, with their byte count.
struct Body {
    parts: VecDeque<Bytes>,
    bytes: usize,
    chunked: bool,
}

impl Body {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.bytes = self.bytes.saturating_add(b.len());
            self.parts.push_back(b);
        }
    }
}

impl HttpPlayer {
    async fn serve(&mut self, io: &mut ClientStream, head: &RequestHead) -> Outcome {
        let cfg = self.engine.config().clone();
        let cors = cfg.http_flv_cors.clone();
        let mut extra: Vec<(&str, &str)> = Vec::new();
        if let Some(origin) = cors.as_deref() {
            extra.push(("Access-Control-Allow-Origin", origin));
            if origin != "*" {
                // The answer depends on the request's Origin only when it names one.
                extra.push(("Vary", "Origin"));
            }
        }
        let head_only = head.method == Method::Head;
        match head.method {
            Method::Get | Method::Head => {}
            Method::Options => {
                let mut h = extra.clone();
                h.push(("Allow", ALLOW));
                if cors.is_some() {
                    h.push(("Access-Control-Allow-Methods", ALLOW));
                    h.push(("Access-Control-Allow-Headers", "Range"));
                    h.push(("Access-Control-Max-Age", "600"));
                }
                return self
                    .answer(io, 204, "No Content", &h, "", true, "OPTIONS".into())
                    .await;
            }
            other => {
                let mut h = extra.clone();
                h.push(("Allow", ALLOW));
                let body = format!(
                    "{} is not served here: HTTP-FLV answers GET, HEAD and OPTIONS\n",
                    other.as_str()
                );
                return self
                    .answer(
                        io,
                        405,
                        "Method Not Allowed",
                        &h,
                        &body,
                        false,
                        body.clone(),
                    )
                    .await;
            }
        }
        let max_name = self.engine.limits().max_name_len;
        let Some((app, name)) = parse_path(&head.path, max_name) else {
            let body = format!(
                "not an HTTP-FLV URL: ask for /APP/STREAM.flv (app and stream names of at most \
                 {max_name} bytes, as for rtmp://HOST/APP/STREAM)\n"
            );
            return self
                .answer(
                    io,
                    404,
                    "Not Found",
                    &extra,
                    &body,
                    head_only,
                    "not an HTTP-FLV path".into(),
                )
                .await;
        };
        let (name, done) = match self
            .authorize((io.transport.scheme(), io.peer.ip()), head, &app, &name)
            .await
        {
            Ok(allowed) => allowed,
            Err(why) => {
                let body = format!("{why}\n");
                return self
                    .answer(io, 403, "Forbidden", &extra, &body, head_only, why)
                    .await;
            }
        };
        let key = StreamKey::new(&app, &name);
        self.role = format!("play {key} (http-flv)");
        let outcome = self.play(io, head, &key, &extra).await;
        if let (Some(auth), Some(req)) = (cfg.auth.as_ref(), done) {
            auth.notify_done(&req);
        }
        outcome
    }

    /// `[auth]`'s connect then play decision; the stream name to play (a callback may rename
    /// it) and the request for the `done` notice, or why it was denied.
    async fn authorize(
        &self,
        (scheme, peer): (&'static str, std::net::IpAddr),
        head: &RequestHead,
        app: &str,
        name: &str,
    ) -> Result<(String, Option<AuthRequest>), String> {
        let Some(auth) = self.engine.config().auth.clone() else {
            return Ok((name.to_owned(), None));
        };
        let max = self.engine.limits().max_name_len;
        let with_query = |s: &str| {
            if head.query.is_empty() {
                s.to_owned()
            } else {
                format!("{s}?{}", head.query)
            }
        };
        let host = head.host.as_deref().unwrap_or("");
        let object = Amf0Value::object([
            ("app", Amf0Value::string(with_query(app))),
            (
                "tcUrl",
                Amf0Value::string(format!("{scheme}://{host}/{app}")),
            ),
        ]);
        let connect = AuthRequest::connect_bounded(peer, self.id, Some(&object), max);
        let decide = |req: AuthRequest| {
            let auth = auth.clone();
            async move {
                let d = if auth.needs_callback(req.action, &req.app) {
                    auth.authorize(&req).await
                } else {
                    auth.decide_local(&req)
                };
                (req, d)
            }
        };
        let (connect, d) = decide(connect).await;
        if let Decision::Deny(r) = d {
            return Err(r.status_description(Action::Connect));
        }
        let (play, d) = decide(connect.for_stream(Action::Play, &with_query(name))).await;
        match d {
            Decision::Allow => Ok((name.to_owned(), Some(play))),
            Decision::Rename(to) => match crate::rtmp::session::command::clean_name(&to, max) {
                Some(to) => Ok((to, Some(play))),
                None => Err(format!(
                    "the authorization server renamed the stream to an invalid name ({:?})",
                    crate::auth::truncate(&to, 64)
                )),
            },
            Decision::Deny(r) => Err(r.status_description(Action::Play)),
        }
    }

    /// A short answer and the outcome it makes.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &mut self,
        io: &mut ClientStream,
        status: u16,
        reason: &str,
        headers: &[(&str, &str)],
        body: &str,
        head_only: bool,
        why: String,
    ) -> Outcome {
        let reply = http::response(status, reason, headers, body, head_only);
        self.bytes_out = self.bytes_out.saturating_add(reply.len() as u64);
        http::answer(io, &reply, ANSWER_WITHIN).await;
        Outcome::Answered(status, why.trim_end().to_owned())
    }

    /// Subscribes, waits for a publisher if there is none yet, then streams.
    async fn play(
        &mut self,
        io: &mut ClientStream,
        head: &RequestHead,
        key: &StreamKey,
        extra: &[(&str, &str)],
    ) -> Outcome {
        let engine = self.engine.clone();
        let cfg = engine.config();
        let mut player = engine.hub().play(key);
        if let Some(edge) = engine.edge() {
            // After subscribing, as an RTMP play does: a pull ending meanwhile sees us.
            edge.want(key);
        }
        crate::sessions::tag_stream(crate::sessions::Role::Player, &key.app, &key.name);
        let head_only = head.method == Method::Head;
        let mut waited = false;
        if !player.live {
            info!(
                session = self.id,
                "{}: play {key} (http-flv, waiting up to {} ms for a publisher)",
                self.label,
                cfg.http_flv_wait.as_millis()
            );
            waited = true;
            if !wait_for_publisher(&mut player, cfg.http_flv_wait).await {
                let body = format!(
                    "{key} is not being published (waited {} ms, [engine] http_flv_wait_ms); \
                     check the URL, or start the publisher first\n",
                    cfg.http_flv_wait.as_millis()
                );
                return self
                    .answer(
                        io,
                        404,
                        "Not Found",
                        extra,
                        &body,
                        head_only,
                        format!("{key} is not being published"),
                    )
                    .await;
            }
        } else {
            info!(
                session = self.id,
                "{}: play {key} (http-flv, live)", self.label
            );
        }
        let chunked = head.is_http11() && !head_only;
        let mut reply = String::from("HTTP/1.1 200 OK\r\n");
        if !head.is_http11() {
            // An HTTP/1.0 client is answered in its own version; its body ends with the close.
            reply = String::from("HTTP/1.0 200 OK\r\n");
        }
        reply.push_str("Content-Type: video/x-flv\r\nCache-Control: no-cache, no-store\r\n");
        for (k, v) in extra {
            reply.push_str(&format!("{k}: {v}\r\n"));
        }
        if chunked {
            reply.push_str("Transfer-Encoding: chunked\r\n");
        }
        reply.push_str("Connection: close\r\n\r\n");
        if head_only {
            return self
                .answer_raw(io, reply.as_bytes(), format!("HEAD of {key}: live"))
                .await;
        }
        let start: Vec<Arc<Frame>> = std::mem::take(&mut player.start);
        let flow = Flow {
            skipping: player.live && player.has_video && !player.has_keyframe,
            has_video: player.has_video,
            player,
            skips: 0,
            first_frame: false,
            play_at: Instant::now(),
            ended: false,
        };
        let why = self
            .stream(io, Bytes::from(reply), start, flow, chunked, waited)
            .await;
        Outcome::Streamed(why)
    }

    async fn answer_raw(&mut self, io: &mut ClientStream, bytes: &[u8], why: String) -> Outcome {
        self.bytes_out = self.bytes_out.saturating_add(bytes.len() as u64);
        http::answer(io, bytes, ANSWER_WITHIN).await;
        Outcome::Answered(200, why)
    }

    /// The response: head, FLV header, start frames, then the ring until the publisher
    /// leaves, the client goes, or it is too slow. Returns why it ended.
    async fn stream(
        &mut self,
        io: &mut ClientStream,
        response_head: Bytes,
        start: Vec<Arc<Frame>>,
        mut flow: Flow,
        chunked: bool,
        waited: bool,
    ) -> String {
        let engine = self.engine.clone();
        let cfg = engine.config();
        let write_timeout = cfg.write_timeout;
        let batch = cfg.write_batch;
        let max_lag = cfg.max_lag_bytes;
        let idle = engine.limits().idle_timeout();
        // The head goes out at once: a player knows the stream exists while the tracks are
        // worked out.
        let mut out = Body {
            parts: VecDeque::new(),
            bytes: 0,
            chunked: false,
        };
        out.push(response_head);
        if let Err(e) = self.write(io, &mut out, write_timeout).await {
            return e;
        }
        out.chunked = chunked;
        // The prelude: hold frames until a media frame says which tracks there are.
        let mut held: Vec<Arc<Frame>> = start;
        let prelude_end = tokio::time::Instant::now() + PRELUDE_WAIT;
        while !held.iter().any(|f| !f.kind.is_header() && f.msg_type != 18)
            && held.len() < PRELUDE_FRAMES
        {
            let ev = tokio::select! {
                ev = flow.player.rx.recv() => ev,
                _ = tokio::time::sleep_until(prelude_end) => break,
            };
            match ev {
                Ok(Event::Frame(f)) => held.push(f),
                Ok(Event::Unpublished) => {
                    flow.ended = true;
                    break;
                }
                Ok(Event::Published) | Err(RecvError::Closed) => flow.player.take_handoff(),
                Ok(Event::Filler) => {}
                Err(RecvError::Lagged(_)) => {
                    // Only possible with a tiny ring: start again from a keyframe.
                    flow.skipping = true;
                }
            }
        }
        let (has_audio, has_video) = tracks(&held);
        flow.has_video = flow.has_video || has_video;
        out.push(Bytes::copy_from_slice(&flv::header(has_audio, has_video)));
        for f in &held {
            self.tag(&mut out, &mut flow, f, max_lag, waited);
        }
        drop(held);
        let mut scratch = [0u8; 512];
        let mut last_frame = Instant::now();
        loop {
            // Drain what the ring holds (bounded), then write it.
            let mut more = false;
            if !flow.ended {
                for _ in 0..BATCH_EVENTS {
                    if out.bytes >= BATCH_BYTES {
                        more = true;
                        break;
                    }
                    match flow.player.rx.try_recv() {
                        Ok(ev) => self.on_event(&mut out, &mut flow, Ok(ev), max_lag, waited),
                        Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                        Err(TryRecvError::Lagged(n)) => self.on_event(
                            &mut out,
                            &mut flow,
                            Err(RecvError::Lagged(n)),
                            max_lag,
                            waited,
                        ),
                    }
                    if flow.ended {
                        break;
                    }
                }
            }
            if out.bytes > 0 {
                if let Err(e) = self.write(io, &mut out, write_timeout).await {
                    return e;
                }
                last_frame = Instant::now();
            }
            if flow.ended {
                return self.finish(io, chunked, write_timeout).await;
            }
            if more {
                continue;
            }
            let idle_at = tokio::time::Instant::from_std(last_frame + idle);
            tokio::select! {
                r = io.read(&mut scratch) => match r {
                    Ok(0) => return "closed by client".into(),
                    Ok(n) => self.bytes_in = self.bytes_in.saturating_add(n as u64),
                    Err(e) => return format!("closed by client ({e})"),
                },
                ev = flow.player.rx.recv() => {
                    self.on_event(&mut out, &mut flow, ev, max_lag, waited);
                    if !batch.is_zero() && !flow.ended {
                        // The merge window: this frame and the next ones until the shared
                        // tick go out in one write, as RTMP players' do.
                        let due = tick::next_after(Instant::now(), batch);
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                _ = tokio::time::sleep_until(idle_at) => {
                    return format!("no frame for {} s (limits.idle_timeout_secs)", idle.as_secs());
                }
            }
        }
    }

    fn on_event(
        &mut self,
        out: &mut Body,
        flow: &mut Flow,
        ev: Result<Event, RecvError>,
        max_lag: u64,
        waited: bool,
    ) {
        match ev {
            Ok(Event::Frame(f)) => self.tag(out, flow, &f, max_lag, waited),
            Ok(Event::Unpublished) => flow.ended = true,
            Ok(Event::Published) | Err(RecvError::Closed) => flow.player.take_handoff(),
            Ok(Event::Filler) => {}
            Err(RecvError::Lagged(n)) => {
                flow.skipping = true;
                self.note_skip(flow);
                debug!(
                    session = self.id,
                    "{}: fell {n} messages behind; skipping to the next keyframe", self.label
                );
            }
        }
    }

    fn note_skip(&mut self, flow: &mut Flow) {
        flow.skips = flow.skips.saturating_add(1);
        self.skips = flow.skips;
        crate::metrics::global().player_skipped();
    }

    /// Queues `f` as an FLV tag, unless the player is skipping to a keyframe.
    fn tag(&mut self, out: &mut Body, flow: &mut Flow, f: &Arc<Frame>, max_lag: u64, waited: bool) {
        let Some(kind) = TagKind::from_msg_type(f.msg_type) else {
            return;
        };
        if f.msg_type == VIDEO {
            flow.has_video = true;
        }
        if !f.kind.is_header() {
            let lag = flow.player.lag_bytes(f);
            if !flow.skipping && lag > max_lag {
                flow.skipping = true;
                self.note_skip(flow);
                debug!(
                    session = self.id,
                    "{}: too far behind; skipping", self.label
                );
            }
            if flow.skipping {
                let resume =
                    f.kind == FrameKind::VideoKey || (!flow.has_video && f.msg_type == AUDIO);
                if !resume || lag > max_lag {
                    return;
                }
                flow.skipping = false;
            }
            if !flow.first_frame && (f.msg_type == AUDIO || f.msg_type == VIDEO) {
                flow.first_frame = true;
                let after = if waited { "publish" } else { "play" };
                info!(
                    session = self.id,
                    "{}: first frame of {} after {} ms ({after} to first frame)",
                    self.label,
                    flow.player.key(),
                    flow.play_at.elapsed().as_millis()
                );
            }
        }
        let body = if kind == TagKind::Script {
            flv::script_body(&f.payload)
        } else {
            f.payload.clone()
        };
        // A frame over FLV's 16 MiB tag limit cannot be written; RTMP's own limit is the
        // same 24 bits, so this does not happen with a frame the codec accepted.
        // onMetaData at time 0: ffmpeg's FLV reader takes metadata at any other time for a
        // data packet (a text stream), and players read it whatever its time.
        let ts = if f.kind == FrameKind::Meta {
            0
        } else {
            f.timestamp
        };
        if let Ok(parts) = flv::tag_parts(kind, ts, &body) {
            for p in parts {
                out.push(p);
            }
        }
    }

    /// Writes what is queued (in one chunk when chunked), within `limit` for the whole of it.
    async fn write(
        &mut self,
        io: &mut ClientStream,
        out: &mut Body,
        limit: Duration,
    ) -> Result<(), String> {
        if out.bytes == 0 {
            return Ok(());
        }
        if out.chunked {
            out.parts
                .push_front(Bytes::from(format!("{:x}\r\n", out.bytes)));
            out.parts.push_back(Bytes::from_static(b"\r\n"));
        }
        let deadline = tokio::time::Instant::now() + limit;
        let r = tokio::time::timeout_at(deadline, write_parts(io, &mut out.parts)).await;
        let written: usize = match r {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                        "closed by client (reset)".into()
                    }
                    _ => format!("connection error: {e}"),
                })
            }
            Err(_) => {
                return Err(format!(
                    "the client did not take what was queued for it within {limit:?}; dropped as too slow"
                ))
            }
        };
        self.bytes_out = self.bytes_out.saturating_add(written as u64);
        out.parts.clear();
        out.bytes = 0;
        Ok(())
    }

    /// The end of the body: the chunked terminator, then the close.
    async fn finish(&mut self, io: &mut ClientStream, chunked: bool, limit: Duration) -> String {
        let _ = tokio::time::timeout(limit.min(ANSWER_WITHIN), async {
            if chunked && io.write_all(b"0\r\n\r\n").await.is_ok() {
                self.bytes_out = self.bytes_out.saturating_add(5);
            }
            let _ = io.flush().await;
            let _ = io.shutdown().await;
        })
        .await;
        "the publisher left (end of the FLV body)".into()
    }
}

/// Waits up to `wait` for a publisher on the player's key; true once one is on.
async fn wait_for_publisher(player: &mut Player, wait: Duration) -> bool {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let ev = tokio::select! {
            ev = player.rx.recv() => ev,
            _ = tokio::time::sleep_until(until) => return false,
        };
        match ev {
            Ok(Event::Published) => {
                player.take_handoff();
                player.live = true;
                return true;
            }
            // The wake-up channel closed: continue on the full ring (a publisher came).
            Err(RecvError::Closed) => {
                player.take_handoff();
                if player.rx.is_closed() {
                    // Nothing to wait on any more: the slot is gone.
                    return false;
                }
            }
            _ => {}
        }
    }
}

/// Writes every buffer of `parts` in order: vectored where the stream supports it, else
/// coalesced (TLS takes one buffer per call: one record per batch, not per tag). Returns
/// the bytes written.
async fn write_parts(io: &mut ClientStream, parts: &mut VecDeque<Bytes>) -> std::io::Result<usize> {
    let mut total = 0usize;
    let vectored = AsyncWrite::is_write_vectored(&*io);
    while !parts.is_empty() {
        if !vectored && parts.len() > 1 {
            let mut joined = BytesMut::new();
            while let Some(b) = parts.front() {
                if !joined.is_empty() && joined.len().saturating_add(b.len()) > COALESCE_MAX {
                    break;
                }
                joined.extend_from_slice(b);
                parts.pop_front();
            }
            parts.push_front(joined.freeze());
        }
        let n = if vectored {
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let mut k = 0;
            for (slot, b) in iov.iter_mut().zip(parts.iter()) {
                *slot = IoSlice::new(b);
                k += 1;
            }
            io.write_vectored(&iov[..k]).await?
        } else {
            match parts.front() {
                Some(front) => io.write(front).await?,
                None => break,
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        total = total.saturating_add(n);
        let mut left = n;
        while left > 0 {
            let Some(front) = parts.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                parts.pop_front();
            } else {
                let _ = front.split_to(left);
                left = 0;
            }
        }
    }
    io.flush().await?;
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        fn p(s: &str) -> Option<(String, String)> {
            parse_path(s, 64)
        }
        assert_eq!(p("/live/cam.flv"), Some(("live".into(), "cam".into())));
        assert_eq!(p("/a/b/cam.flv"), Some(("a/b".into(), "cam".into())));
        assert_eq!(
            p("/live/my%20cam.flv"),
            Some(("live".into(), "my cam".into()))
        );
        assert_eq!(p("/live/a+b.flv"), Some(("live".into(), "a+b".into())));
        assert_eq!(p("/live/cam"), None);
        assert_eq!(p("/cam.flv"), None);
        assert_eq!(p("//cam.flv"), None);
        assert_eq!(p("/live/.flv"), None);
        assert_eq!(p("/live/x%3Fkey.flv"), None);
        assert_eq!(p("/live/x%0A.flv"), None);
        assert_eq!(p(&format!("/live/{}.flv", "n".repeat(65))), None);
        assert_eq!(p("live/cam.flv"), None);
    }
}
