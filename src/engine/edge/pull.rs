//! A stream's pull: one connection to its origin, shared by every player of the stream on
//! this node. It plays the stream on the origin and publishes what comes into the local hub;
//! it ends once the stream has had no player for `idle`, and reconnects with exponential
//! backoff (and to the next origin in the stream's ranking) when the origin fails.
//!
//! Players never see a reconnect as the end of the stream: the hub's publisher is kept
//! across it (for at most the engine's `player_wait` without media; an UnpublishNotify
//! from the origin, its publisher leaving, is passed on at once), and a new connection's
//! first frame takes the key over with `PublisherTakeover::Replace`, so the players get the
//! new headers and continue on one timeline. Video before a connection's first keyframe is
//! dropped: players resume at a keyframe.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::conn::{ConnError, OriginConn};
use super::{metrics, Edge, RECONNECT_MIN};
use crate::engine::hub::{classify, FrameKind, Publisher, PublisherTakeover, StreamKey};
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::message::{Control, UserControl, DATA_AMF0, VIDEO};
use crate::rtmp::session::ClientEvent;
use crate::throttle::LogThrottle;

/// The SetBufferLength a pull sends after play (ffmpeg's default `rtmp_buffer`).
const PLAY_BUFFER_MS: u32 = 3000;

/// How often a pull looks at its stream's player count.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Why one connection of a pull ended.
enum End {
    /// No player for `idle`: the pull is over.
    Unwatched,
    Failed(ConnError),
}

/// What a pull carries from one connection to the next.
struct PullState {
    key: StreamKey,
    id: u64,
    /// The key's publisher in the hub, kept across reconnects.
    held: Option<Publisher>,
    /// When media last came (or the pull started): the held publisher goes after `hold`.
    last_media: Instant,
    /// Since when the key has had no player.
    unwatched_since: Option<Instant>,
    /// The next frame starts a new segment (a new connection, or the origin's publisher
    /// changed): it takes the key over, and video waits for a keyframe.
    new_segment: bool,
    wait_key: bool,
    /// Metadata that came before the segment's first media: pushed with that frame's
    /// timestamp (data messages carry none we keep, and a timestamp of 0 would start a
    /// republished timeline at the wrong place). One at a time: a newer one replaces it.
    pending_meta: Option<bytes::Bytes>,
    /// The origin's timestamp of the last media frame (metadata mid-segment takes it).
    last_ts: u32,
    /// Media came on some connection of this pull.
    ever_media: bool,
}

impl PullState {
    /// True when the pull should end (no player for `idle`; the pull is then unregistered).
    fn check(&mut self, edge: &Edge) -> bool {
        let now = Instant::now();
        if edge.hub.players(&self.key) > 0 {
            self.unwatched_since = None;
        } else {
            let since = *self.unwatched_since.get_or_insert(now);
            // A pull that never carried media is not kept for later players: a client
            // playing name after name must not leave a pull behind for each.
            let linger = if self.ever_media {
                edge.settings.idle
            } else {
                Duration::ZERO
            };
            if now.saturating_duration_since(since) >= linger
                && edge.finish_if_unwatched(&self.key, self.id)
            {
                return true;
            }
        }
        if self.held.is_some() && now.saturating_duration_since(self.last_media) >= edge.hold {
            // The origin has sent nothing for player_wait: players hear the stream stopped
            // (and wait for it as for any publisher).
            info!(
                "edge pull {}: no media from the origin for {} s; players are told the stream stopped",
                self.key,
                edge.hold.as_secs()
            );
            self.held = None;
        }
        false
    }
}

/// Runs the pull of `key` until its players are gone.
pub(super) async fn run(edge: Arc<Edge>, key: StreamKey, id: u64) {
    let m = metrics();
    m.pulls_active.fetch_add(1, Ordering::Relaxed);
    let mut st = PullState {
        key,
        id,
        held: None,
        last_media: Instant::now(),
        unwatched_since: None,
        new_segment: true,
        wait_key: true,
        pending_meta: None,
        last_ts: 0,
        ever_media: false,
    };
    let mut failures: u32 = 0;
    let warnings = LogThrottle::new();
    info!("edge pull {}: started (first player)", st.key);
    'pull: loop {
        let mut got_media = false;
        match connect(&edge, &st.key).await {
            Ok(conn) => {
                m.pull_connects.fetch_add(1, Ordering::Relaxed);
                let url = conn.url.clone();
                info!("edge pull {}: playing from {url}", st.key);
                st.new_segment = true;
                st.wait_key = true;
                let (end, media) = pump(&edge, &mut st, conn).await;
                got_media = media;
                if let Some(p) = &st.held {
                    // Players joining before the next connection's media must not start
                    // on this one's last GOP (a past picture, maybe of an ended publish).
                    p.forget_caches();
                }
                match end {
                    End::Unwatched => break 'pull,
                    End::Failed(e) => {
                        m.pull_failures.fetch_add(1, Ordering::Relaxed);
                        if let Some(also) = warnings.should_log("lines") {
                            warn!("edge pull {}: {e}; reconnecting{also}", st.key);
                        }
                    }
                }
            }
            Err(e) => {
                m.pull_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(also) = warnings.should_log("lines") {
                    warn!("edge pull {}: {e}; retrying with backoff{also}", st.key);
                }
            }
        }
        // A connection that carried media resets the backoff.
        failures = if got_media {
            0
        } else {
            failures.saturating_add(1)
        };
        let wait = backoff(failures, edge.settings.reconnect_max);
        debug!("edge pull {}: next attempt in {wait:?}", st.key);
        let until = tokio::time::Instant::now() + wait;
        loop {
            if st.check(&edge) {
                break 'pull;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep_until(until.min(now + CHECK_EVERY)).await;
        }
    }
    drop(st.held.take());
    m.pulls_active.fetch_sub(1, Ordering::Relaxed);
    info!(
        "edge pull {}: ended (no player for {} s)",
        st.key,
        edge.settings.idle.as_secs()
    );
}

/// The wait before attempt `failures` (1 after the first failure): doubling from
/// [`RECONNECT_MIN`], at most `max`; none after a connection that carried media.
fn backoff(failures: u32, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let shift = failures.saturating_sub(1).min(16);
    RECONNECT_MIN
        .saturating_mul(1u32 << shift)
        .min(max.max(RECONNECT_MIN))
}

/// Connects to the best origin for `key` that answers, and plays the stream on it.
async fn connect(edge: &Edge, key: &StreamKey) -> Result<OriginConn, ConnError> {
    let mut last = None;
    for origin in edge.ranked(key) {
        let opened = OriginConn::open(
            &origin.url,
            edge.tls.as_ref(),
            &key.app,
            crate::rtmp::session::client::player_props(),
            &edge.limits,
            edge.settings.connect_timeout,
        )
        .await;
        match opened {
            Ok(mut c) => {
                origin.mark(true);
                let sid = c.stream_id;
                c.session().play(sid, &key.name);
                // The buffer a player asks for after play, as ffmpeg (rtmp_buffer, 3 s) and
                // librtmp do; some servers send nothing before it.
                let buffer = UserControl::SetBufferLength {
                    stream_id: sid,
                    ms: PLAY_BUFFER_MS,
                };
                c.session().send(
                    crate::rtmp::session::command::CSID_CONTROL,
                    &buffer.to_message(),
                );
                c.flush().await?;
                return Ok(c);
            }
            Err(e) => {
                origin.mark(false);
                debug!("edge pull {key}: {e}; trying the next origin");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnError::Connect {
        url: "-".into(),
        detail: "no origin configured".into(),
    }))
}

/// Carries one connection's messages into the hub until it fails or the key is unwatched.
/// Also says whether any media came.
async fn pump(edge: &Edge, st: &mut PullState, mut conn: OriginConn) -> (End, bool) {
    let m = metrics();
    let mut counted = conn.bytes_in;
    m.bytes_pulled.fetch_add(counted, Ordering::Relaxed);
    let mut media = false;
    // An origin holding a play for a stream nobody publishes sends nothing (nginx-rtmp
    // pings after 60 s): the relay's idle timeout, longer than that, says when it is dead.
    let silent = edge.limits.relay_idle_timeout().unwrap_or(Duration::MAX);
    let mut last_byte = Instant::now();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = conn.next_event() => {
                let fresh = conn.bytes_in.saturating_sub(counted);
                counted = conn.bytes_in;
                m.bytes_pulled.fetch_add(fresh, Ordering::Relaxed);
                last_byte = Instant::now();
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => return (End::Failed(e), media),
                };
                match on_event(edge, st, ev) {
                    Ok(true) => media = true,
                    Ok(false) => {}
                    Err(e) => {
                        conn.close().await;
                        return (End::Failed(e), media);
                    }
                }
                if let Err(e) = conn.flush().await {
                    return (End::Failed(e), media);
                }
            }
            _ = tick.tick() => {
                if st.check(edge) {
                    conn.close().await;
                    return (End::Unwatched, media);
                }
                if last_byte.elapsed() >= silent {
                    let e = ConnError::Silent { url: conn.url.clone(), secs: silent.as_secs() };
                    conn.close().await;
                    return (End::Failed(e), media);
                }
            }
        }
    }
}

/// One message from the origin; Ok(true) when it was media handed to the hub.
fn on_event(edge: &Edge, st: &mut PullState, ev: ClientEvent) -> Result<bool, ConnError> {
    match ev {
        ClientEvent::Media(msg) => {
            let kind = classify(msg.msg_type, &msg.payload);
            if msg.msg_type == VIDEO && st.wait_key && !kind.is_header() {
                if kind != FrameKind::VideoKey {
                    return Ok(false);
                }
                st.wait_key = false;
            }
            let meta = if st.new_segment || st.held.is_none() {
                st.pending_meta.take()
            } else {
                None
            };
            st.last_media = Instant::now();
            st.last_ts = msg.timestamp;
            st.ever_media = true;
            let p = publisher(edge, st)?;
            if let Some(meta) = meta {
                p.push(DATA_AMF0, msg.timestamp, meta)
                    .map_err(|e| ConnError::Protocol {
                        url: "-".into(),
                        detail: format!("metadata refused: {e}"),
                    })?;
            }
            p.push(msg.msg_type, msg.timestamp, msg.payload)
                .map_err(|e| ConnError::Protocol {
                    url: "-".into(),
                    detail: format!("frame refused: {e}"),
                })?;
            Ok(true)
        }
        ClientEvent::Data { values, .. } => {
            // nginx-rtmp and SRS pass metadata on as onMetaData; a publisher's
            // @setDataFrame wrapper (some servers forward it) is dropped, and
            // |RtmpSampleAccess is the origin's own business (the engine sends its own).
            let values: Vec<Amf0Value> = match values.first().and_then(Amf0Value::as_str) {
                Some("@setDataFrame") => values.into_iter().skip(1).collect(),
                Some("|RtmpSampleAccess") | None => return Ok(false),
                Some(_) => values,
            };
            let payload = crate::rtmp::session::client::data_payload(&values);
            match (&st.held, st.new_segment) {
                // Mid-segment: at the latest timestamp players were sent.
                (Some(p), false) => {
                    let ts = st.last_ts;
                    p.push(DATA_AMF0, ts, payload)
                        .map_err(|e| ConnError::Protocol {
                            url: "-".into(),
                            detail: format!("metadata refused: {e}"),
                        })?;
                }
                _ => st.pending_meta = Some(payload),
            }
            Ok(false)
        }
        ClientEvent::Status {
            level,
            code,
            description,
            ..
        } => {
            match code.as_str() {
                // The origin's publisher left: so does ours in the hub (players hear it as
                // they would from the origin), and what follows is a new timeline.
                "NetStream.Play.UnpublishNotify" => {
                    debug!("edge pull {}: origin says {code}", st.key);
                    st.held = None;
                    st.new_segment = true;
                    st.wait_key = true;
                }
                "NetStream.Play.PublishNotify" => {
                    st.new_segment = true;
                    st.wait_key = true;
                }
                _ if level == "error" => {
                    return Err(ConnError::Refused {
                        url: "origin".into(),
                        what: format!("play {}", st.key),
                        detail: format!("{code} {description}").chars().take(200).collect(),
                    })
                }
                _ => debug!("edge pull {}: origin says {code}", st.key),
            }
            Ok(false)
        }
        // nginx-rtmp tells its players that the publisher left with StreamEOF alone
        // (UnpublishNotify only with publish_notify on): the same as UnpublishNotify here.
        ClientEvent::Control(Control::UserControl(UserControl::StreamEof(_))) => {
            debug!("edge pull {}: origin says StreamEOF", st.key);
            st.held = None;
            st.new_segment = true;
            st.wait_key = true;
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// The key's publisher for the next frame: the one held, or (at a new segment) a new one
/// that takes the key over, so players continue without hearing the stream stop.
fn publisher<'a>(edge: &Edge, st: &'a mut PullState) -> Result<&'a Publisher, ConnError> {
    if st.new_segment || st.held.is_none() {
        let refused = |e: crate::engine::hub::HubError| ConnError::Protocol {
            url: "-".into(),
            detail: e.to_string(),
        };
        let p = match &st.held {
            // Replacing our own publisher: no UnpublishNotify reaches the players.
            Some(_) => edge.hub.publish_with(&st.key, PublisherTakeover::Replace),
            None => edge.hub.publish(&st.key),
        }
        .map_err(refused)?;
        st.held = Some(p);
        st.new_segment = false;
    }
    st.held.as_ref().ok_or_else(|| ConnError::Protocol {
        url: "-".into(),
        detail: "no publisher".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let max = Duration::from_secs(8);
        assert_eq!(backoff(0, max), Duration::ZERO);
        assert_eq!(backoff(1, max), Duration::from_millis(250));
        assert_eq!(backoff(2, max), Duration::from_millis(500));
        assert_eq!(backoff(6, max), Duration::from_secs(8));
        assert_eq!(backoff(u32::MAX, max), Duration::from_secs(8));
    }
}
