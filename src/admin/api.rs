//! The JSON API under `/api/v1/`: sessions (paged), engine streams, a summary for the
//! status page, and kicking a session. Field names are part of the interface (README).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use hyper::StatusCode;
use serde::Serialize;
use serde_json::{json, Value};

use super::{json as reply_json, Reply, State};
use crate::metrics::{self, Refusal, TRANSPORTS};
use crate::sessions::{Role, SessionEntry};

/// Sessions per page when the request does not say.
pub const DEFAULT_LIMIT: usize = 100;
/// Most sessions one request returns.
pub const MAX_LIMIT: usize = 500;

/// The previous byte totals of a stream, for its bitrates.
#[derive(Clone, Copy, Debug)]
pub struct RateSample {
    at: Instant,
    bytes_in: u64,
    bytes_out: u64,
    bps_in: u64,
    bps_out: u64,
}

/// One session as the API shows it (serialized straight to JSON, no intermediate tree:
/// a page of 1,000 stays cheap).
#[derive(Serialize)]
struct SessionOut {
    id: u64,
    transport: &'static str,
    peer: SocketAddr,
    listener: SocketAddr,
    app: Option<String>,
    name: Option<String>,
    role: Option<&'static str>,
    bytes_received: u64,
    bytes_sent: u64,
    duration_secs: f64,
    started_at: u64,
    upstream: Option<String>,
}

impl SessionOut {
    fn of(s: &SessionEntry) -> SessionOut {
        let tag = s.tag();
        SessionOut {
            id: s.id,
            transport: s.transport.scheme(),
            peer: s.peer,
            listener: s.local,
            app: tag.app,
            name: tag.name,
            role: tag.role.map(Role::as_str),
            bytes_received: s.bytes_received(),
            bytes_sent: s.bytes_sent(),
            duration_secs: round1(s.started.elapsed().as_secs_f64()),
            started_at: s
                .started_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            upstream: tag.upstream,
        }
    }
}

#[derive(Serialize)]
struct SessionPage {
    sessions: Vec<SessionOut>,
    total: usize,
    next_after: Option<u64>,
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A query parameter as a number (absent or malformed: None).
fn param(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// `GET /api/v1/sessions?limit=N&after=ID`: open sessions by id, `limit` (default 100, at
/// most 500) at a time; `next_after` is the cursor for the next page (null on the last).
pub fn sessions(state: &State, query: Option<&str>) -> Reply {
    let limit = param(query, "limit")
        .map_or(DEFAULT_LIMIT, |l| usize::try_from(l).unwrap_or(MAX_LIMIT))
        .clamp(1, MAX_LIMIT);
    let after = param(query, "after").unwrap_or(0);
    let (page, total) = state.sessions.list(after, limit.saturating_add(1));
    let more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    let next = if more {
        page.last().map(|s| s.id)
    } else {
        None
    };
    let out = SessionPage {
        sessions: page.iter().map(|s| SessionOut::of(s)).collect(),
        total,
        next_after: next,
    };
    super::json_bytes(StatusCode::OK, serde_json::to_vec(&out))
}

/// `DELETE /api/v1/sessions/{id}`: closes the session; logged with the asking address.
pub fn kick(state: &State, id: &str, asked_by: SocketAddr) -> Reply {
    let Ok(id) = id.parse::<u64>() else {
        return reply_json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "the session id is a number, as listed by GET /api/v1/sessions"}),
        );
    };
    if state.sessions.kick(id) {
        metrics::global().sessions_kicked.fetch_add(1, Relaxed);
        tracing::warn!("admin API: session {id} kicked at the request of {asked_by}");
        reply_json(StatusCode::OK, &json!({"kicked": id}))
    } else {
        reply_json(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no open session {id}; it may have closed already")}),
        )
    }
}

/// The codec a video sequence header announces (legacy codec id or enhanced RTMP FourCC).
pub fn video_codec(header: &[u8]) -> Option<String> {
    let first = *header.first()?;
    if first & 0x80 != 0 {
        return fourcc(header.get(1..5)?);
    }
    Some(
        match first & 0x0f {
            2 => "h263",
            3 => "screen",
            4 => "vp6",
            5 => "vp6a",
            6 => "screen2",
            7 => "h264",
            12 => "hevc",
            13 => "av1",
            _ => "unknown",
        }
        .to_string(),
    )
}

/// The codec an audio sequence header announces.
pub fn audio_codec(header: &[u8]) -> Option<String> {
    let first = *header.first()?;
    Some(
        match first >> 4 {
            // Enhanced RTMP: ExHeader, then a FourCC.
            9 => return fourcc(header.get(1..5)?),
            0 | 3 => "pcm",
            1 => "adpcm",
            2 | 14 => "mp3",
            4..=6 => "nellymoser",
            7 => "g711a",
            8 => "g711u",
            10 => "aac",
            11 => "speex",
            _ => "unknown",
        }
        .to_string(),
    )
}

fn fourcc(b: &[u8]) -> Option<String> {
    let name = match b {
        b"avc1" => "h264",
        b"hvc1" => "hevc",
        b"av01" => "av1",
        b"vp09" => "vp9",
        b"vp08" => "vp8",
        b"Opus" => "opus",
        b"fLaC" => "flac",
        b"ac-3" => "ac3",
        b"ec-3" => "eac3",
        b"mp4a" => "aac",
        b".mp3" => "mp3",
        other if other.iter().all(|c| c.is_ascii_alphanumeric()) => {
            return Some(String::from_utf8_lossy(other).into_owned())
        }
        _ => "unknown",
    };
    Some(name.to_string())
}

/// `GET /api/v1/streams`: the engine's streams (empty when relaying to an upstream).
pub fn streams(state: &State) -> Value {
    let Some(engine) = &state.engine else {
        return json!({"streams": []});
    };
    let mut infos = engine.hub().snapshot();
    infos.sort_by(|a, b| (&a.key.app, &a.key.name).cmp(&(&b.key.app, &b.key.name)));
    // One pass over the sessions: each stream's publisher and its players' bytes out.
    let mut publishers: HashMap<(String, String), Arc<SessionEntry>> = HashMap::new();
    let mut out_bytes: HashMap<(String, String), u64> = HashMap::new();
    let mut since: HashMap<(String, String), Instant> = HashMap::new();
    for s in state.sessions.all() {
        let tag = s.tag();
        let (Some(app), Some(name), Some(role)) = (tag.app, tag.name, tag.role) else {
            continue;
        };
        let key = (app, name);
        match role {
            Role::Publisher => {
                if let Some(t) = tag.since {
                    since.insert(key.clone(), t);
                }
                publishers.insert(key, s);
            }
            Role::Player => *out_bytes.entry(key).or_default() += s.bytes_sent(),
            Role::Relay => {}
        }
    }
    let now = Instant::now();
    let mut rates = state.rates.lock().unwrap_or_else(|e| e.into_inner());
    let mut list = Vec::with_capacity(infos.len());
    let mut seen = Vec::with_capacity(infos.len());
    for info in &infos {
        let key = (info.key.app.clone(), info.key.name.clone());
        let bytes_out = out_bytes.get(&key).copied().unwrap_or(0);
        let sample = rates.entry(key.clone()).or_insert(RateSample {
            at: now,
            bytes_in: info.bytes_in,
            bytes_out,
            bps_in: 0,
            bps_out: 0,
        });
        let dt = now.saturating_duration_since(sample.at).as_secs_f64();
        // Under a second since the last sample: keep the last rate (the page polls often).
        if dt >= 1.0 {
            let rate = |now: u64, then: u64| (now.saturating_sub(then) as f64 * 8.0 / dt) as u64;
            *sample = RateSample {
                at: now,
                bytes_in: info.bytes_in,
                bytes_out,
                bps_in: rate(info.bytes_in, sample.bytes_in),
                bps_out: rate(bytes_out, sample.bytes_out),
            };
        }
        let publisher = publishers.get(&key).filter(|_| info.publishing).map(|p| {
            json!({
                "id": p.id,
                "transport": p.transport.scheme(),
                "peer": p.peer.to_string(),
            })
        });
        let uptime = since
            .get(&key)
            .filter(|_| info.publishing)
            .map(|t| round1(now.saturating_duration_since(*t).as_secs_f64()));
        list.push(json!({
            "app": info.key.app,
            "name": info.key.name,
            "publisher": publisher,
            "players": info.players,
            "pushes": info.pushes,
            "bytes_in": info.bytes_in,
            "bytes_out": bytes_out,
            "bitrate_in_bps": sample.bps_in,
            "bitrate_out_bps": sample.bps_out,
            "video_codec": info.video_header.as_deref().and_then(video_codec),
            "audio_codec": info.audio_header.as_deref().and_then(audio_codec),
            "gop_cache_bytes": info.gop_bytes,
            "uptime_secs": uptime,
        }));
        seen.push(key);
    }
    // Forget streams that ended, so the table stays as large as the live set.
    if rates.len() > seen.len() {
        rates.retain(|k, _| seen.contains(k));
    }
    json!({ "streams": list })
}

/// `GET /api/v1/summary`: totals for the status page (the same figures as /metrics).
pub fn summary(state: &State) -> Value {
    let m = metrics::global();
    let mut transports = serde_json::Map::new();
    let bytes = state.sessions.bytes_by_transport();
    for (t, (rx, tx)) in TRANSPORTS.into_iter().zip(bytes) {
        let p = m.transport(t);
        transports.insert(
            t.scheme().to_string(),
            json!({
                "sessions_open": p.sessions_open.load(Relaxed),
                "sessions_total": p.sessions_total.load(Relaxed),
                "bytes_received": rx,
                "bytes_sent": tx,
            }),
        );
    }
    let mut refused = serde_json::Map::new();
    for r in Refusal::ALL {
        refused.insert(r.as_str().to_string(), json!(m.refused_count(r)));
    }
    let budget = crate::budget::global();
    let process = super::prom::process();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": round1(state.uptime().as_secs_f64()),
        "mode": if state.engine.is_some() { "engine" } else { "upstream" },
        "upstream": state.upstream().map(|u| u.url.to_string()),
        "ready": state.readiness().is_ok(),
        "draining": state.draining(),
        "sessions_open": state.sessions.active(),
        "sessions_total": state.sessions.opened(),
        "connections_accepted": m.connections_accepted.load(Relaxed),
        "transports": transports,
        "refused": refused,
        "memory_budget": {"used_bytes": budget.used(), "limit_bytes": budget.limit()},
        "history": state
            .history()
            .iter()
            .map(|(t, rx, tx)| json!([round1(*t), rx, tx]))
            .collect::<Vec<_>>(),
        "process": {
            "rss_bytes": process.rss_bytes,
            "open_fds": process.open_fds,
            "cpu_seconds": process.cpu_seconds,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn codecs_from_sequence_headers() {
        assert_eq!(video_codec(&[0x17, 0, 0, 0, 0]).as_deref(), Some("h264"));
        assert_eq!(video_codec(b"\x90hvc1").as_deref(), Some("hevc"));
        assert_eq!(video_codec(b"\x90").as_deref(), None);
        assert_eq!(video_codec(&[]), None);
        assert_eq!(audio_codec(&[0xaf, 0x00]).as_deref(), Some("aac"));
        assert_eq!(audio_codec(b"\x90Opus").as_deref(), Some("opus"));
        assert_eq!(
            video_codec(b"\x90\x00\x01\x02\x03").as_deref(),
            Some("unknown")
        );
    }

    #[test]
    fn query_parameters() {
        assert_eq!(param(Some("limit=5&after=9"), "after"), Some(9));
        assert_eq!(param(Some("limit=x"), "limit"), None);
        assert_eq!(param(None, "limit"), None);
    }
}
