//! Restream (`[[engine.push]]`): every stream published to a matching app is pushed to each
//! configured destination (`rtmp://` or `rtmps://`, with its stream key) as a client of its
//! own: connect, releaseStream, FCPublish, createStream, publish, then metadata, sequence
//! headers and media read from the hub like a player.
//!
//! Each destination has its own task and its own hub subscription, so a slow or dead
//! destination never slows the publisher or the other destinations: what it cannot take
//! piles up only in the hub's bounded ring, and once it falls behind (the ring overtook it,
//! or it lags `max_lag_bytes`) it skips to the next keyframe (counted). A destination that
//! drops or refuses is reconnected with exponential backoff (from [`RECONNECT_MIN`] to
//! [`RECONNECT_MAX`]), starting again from the hub's metadata, headers and GOP cache.
//!
//! Besides the configured tables, destinations for one stream can be added and removed at
//! run time through the admin API ([`ApiPushes`]): such a push starts at once when the
//! stream is live and with each later publish of it, until it is removed.
//!
//! The stream key (the URL's last path segment, or its `?` query) is a secret: logs,
//! errors and metrics show the destination as `scheme://host:port/app/***`, and anything
//! a destination says back is scrubbed of the key before it is logged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tracing::{info, warn};

use super::edge::conn::{ConnError, OriginConn};
use super::hub::{Event, Frame, FrameKind, Hub, Player, StreamKey};
use crate::limits::Limits;
use crate::net::url::{RtmpUrl, Scheme};
use crate::rtmp::amf0::Amf0Value;
use crate::rtmp::message::{Message, AUDIO, DATA_AMF0, VIDEO};
use crate::rtmp::session::ClientEvent;

/// The first wait before a destination is tried again; it doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// The longest wait between two attempts on one destination.
pub const RECONNECT_MAX: Duration = Duration::from_secs(8);
/// Chunk stream for data messages sent to a destination.
const DATA_CSID: u32 = 5;
/// Hub events taken into one write: what is chunked and held for a destination at once is
/// this many frames, not the whole ring of one that fell behind.
const BATCH_EVENTS: usize = 64;
/// How long the last frames may take to go out after the publisher has left.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// `{name}` in a destination URL is replaced by the published stream's name.
pub const NAME_PLACEHOLDER: &str = "{name}";

/// One `[[engine.push]]` table: streams of apps matching `app` go to `url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushTarget {
    /// An app name, or a glob with `*` (any run of characters).
    pub app: String,
    pub dest: Destination,
    /// Extra CA certificates trusted for an rtmps:// destination (besides the system roots).
    pub ca: Option<PathBuf>,
}

/// A destination URL split into where to connect, the app to `connect` to, and the stream
/// key to `publish` (a secret: see [`Destination::redacted`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Destination {
    /// Where to connect: scheme, host and port only (no app, no key), so that an error
    /// naming it never carries the key.
    server: RtmpUrl,
    app: String,
    key: String,
    /// The key came from the URL's `?` query (`rtmp://host/app?key`).
    key_in_query: bool,
}

/// Never the key: the same text as [`Destination::redacted`].
impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A destination URL that does not parse; the message never repeats the URL (it holds a key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DestinationError(pub String);

impl Destination {
    /// Parses `rtmp[s]://HOST[:PORT]/APP[/...]/KEY` (the last path segment is the key, as
    /// OBS and ffmpeg take it) or `rtmp[s]://HOST[:PORT]/APP?KEY`.
    pub fn parse(url: &str) -> Result<Destination, DestinationError> {
        let usage = "write rtmp://HOST[:PORT]/APP/KEY or rtmps://HOST[:PORT]/APP/KEY";
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| DestinationError(format!("not a URL; {usage}")))?;
        let scheme = match Scheme::from_name(scheme) {
            Some(s @ (Scheme::Rtmp | Scheme::Rtmps)) => s,
            _ => {
                return Err(DestinationError(format!(
                    "scheme '{}' cannot be pushed to; {usage}",
                    scheme.chars().take(16).collect::<String>()
                )))
            }
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| DestinationError(format!("no application and stream key; {usage}")))?;
        // The host and port through the one parser (its messages hold no key: no path here).
        let server =
            crate::net::url::parse_upstream("url", &format!("{}://{authority}", scheme.as_str()))
                .map_err(|e| DestinationError(e.message))?;
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let (app, key, key_in_query) = match (path.rsplit_once('/'), query) {
            (Some((app, key)), None) => (app, key.to_owned(), false),
            (Some((app, key)), Some(q)) => (app, format!("{key}?{q}"), false),
            (None, Some(q)) => (path, q.to_owned(), true),
            (None, None) => (path, String::new(), false),
        };
        if app.is_empty() {
            return Err(DestinationError(format!("no application name; {usage}")));
        }
        if key.is_empty() {
            return Err(DestinationError(format!("no stream key; {usage}")));
        }
        Ok(Destination {
            server,
            app: app.to_owned(),
            key,
            key_in_query,
        })
    }

    /// The URL with the key replaced by `***`: what logs and metrics show.
    pub fn redacted(&self) -> String {
        let sep = if self.key_in_query { '?' } else { '/' };
        format!("{}/{}{sep}***", self.server, self.app)
    }

    /// The app and stream key for a stream published as `name`.
    fn for_name(&self, name: &str) -> (String, String) {
        (
            self.app.replace(NAME_PLACEHOLDER, name),
            self.key.replace(NAME_PLACEHOLDER, name),
        )
    }
}

/// `pattern` (`*` matches any run of characters, nothing else is special) matches `s`.
pub fn app_matches(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return true;
    };
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name.
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(at) => rest = rest.get(at.saturating_add(p.len())..).unwrap_or(""),
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// One destination's counters, kept across publishes and reloads (keyed by the app pattern
/// and the redacted URL).
#[derive(Default)]
struct DestMetrics {
    app: String,
    destination: String,
    /// Streams being pushed to it (connected or waiting to reconnect).
    streams: AtomicU64,
    /// Of those, connected and publishing right now.
    publishing: AtomicU64,
    connects: AtomicU64,
    failures: AtomicU64,
    skips: AtomicU64,
    bytes: AtomicU64,
}

/// Every destination configured since the process started (a reload adds rows, never
/// more than the configuration names).
fn registry() -> &'static Mutex<Vec<Arc<DestMetrics>>> {
    static R: std::sync::OnceLock<Mutex<Vec<Arc<DestMetrics>>>> = std::sync::OnceLock::new();
    R.get_or_init(|| Mutex::new(Vec::new()))
}

fn metrics_for(t: &PushTarget) -> Arc<DestMetrics> {
    let destination = t.dest.redacted();
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = r
        .iter()
        .find(|m| m.app == t.app && m.destination == destination)
    {
        return m.clone();
    }
    let m = Arc::new(DestMetrics {
        app: t.app.clone(),
        destination,
        ..DestMetrics::default()
    });
    r.push(m.clone());
    m
}

/// `rtmpgate_restream_*{app, destination}` for `/metrics` (nothing when no push is set).
pub fn encode_metrics(
    e: &mut prometheus_client::encoding::DescriptorEncoder,
    api: Option<&ApiPushes>,
) -> std::fmt::Result {
    use prometheus_client::metrics::MetricType;
    let rows: Vec<Arc<DestMetrics>> = registry().lock().unwrap_or_else(|e| e.into_inner()).clone();
    // API-added destinations: their rows also name the stream and the id to DELETE.
    let api_rows: Vec<(u64, String, Arc<DestMetrics>)> = api.map_or_else(Vec::new, |a| {
        a.lock()
            .entries
            .iter()
            .map(|p| (p.id, p.key.name.clone(), p.metrics.clone()))
            .collect()
    });
    if rows.is_empty() && api_rows.is_empty() {
        return Ok(());
    }
    type Pick = fn(&DestMetrics) -> &AtomicU64;
    let families: [(&str, &str, MetricType, Pick); 6] = [
        ("rtmpgate_restream_streams", "Streams being pushed to the destination right now (publishing or waiting to reconnect).", MetricType::Gauge, |m| &m.streams),
        ("rtmpgate_restream_publishing", "Streams connected to the destination and publishing right now.", MetricType::Gauge, |m| &m.publishing),
        ("rtmpgate_restream_connects", "Publish sessions the destination accepted (the first and every reconnect).", MetricType::Counter, |m| &m.connects),
        ("rtmpgate_restream_failures", "Connections to the destination that failed, were refused or dropped.", MetricType::Counter, |m| &m.failures),
        ("rtmpgate_restream_skips", "Times a stream to the destination fell behind and skipped to the next keyframe.", MetricType::Counter, |m| &m.skips),
        ("rtmpgate_restream_bytes", "Bytes written to the destination.", MetricType::Counter, |m| &m.bytes),
    ];
    for (name, help, kind, pick) in families {
        let mut d = e.encode_descriptor(name, help, None, kind)?;
        // One series: a counter or a gauge of `n` under `labels`.
        let mut series = |labels: &[(&str, &str)], n: u64| -> std::fmt::Result {
            let mut f = d.encode_family(&labels)?;
            match kind {
                MetricType::Counter => {
                    f.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&n, None)
                }
                _ => f.encode_gauge(&i64::try_from(n).unwrap_or(i64::MAX)),
            }
        };
        for m in &rows {
            let labels = [
                ("app", m.app.as_str()),
                ("destination", m.destination.as_str()),
            ];
            series(&labels, pick(m).load(Ordering::Relaxed))?;
        }
        for (id, stream, m) in &api_rows {
            let id = id.to_string();
            let labels = [
                ("app", m.app.as_str()),
                ("destination", m.destination.as_str()),
                ("stream", stream.as_str()),
                ("id", id.as_str()),
            ];
            series(&labels, pick(m).load(Ordering::Relaxed))?;
        }
    }
    Ok(())
}

/// `GET /api/v1/restream`: each destination configured since start, keyed as in /metrics
/// (the key shown as `***`), with its counters; then those added through the API (with
/// their `id`, `stream` and who added them).
pub fn snapshot(api: Option<&ApiPushes>) -> serde_json::Value {
    let rows: Vec<Arc<DestMetrics>> = registry().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let row = |m: &DestMetrics| {
        serde_json::json!({
            "source": "config",
            "app": m.app,
            "destination": m.destination,
            "streams": n(&m.streams),
            "publishing": n(&m.publishing),
            "connects": n(&m.connects),
            "failures": n(&m.failures),
            "skips": n(&m.skips),
            "bytes": n(&m.bytes),
        })
    };
    let mut list: Vec<serde_json::Value> = rows.iter().map(|m| row(m)).collect();
    if let Some(api) = api {
        for p in &api.lock().entries {
            let mut v = row(&p.metrics);
            if let Some(o) = v.as_object_mut() {
                o.insert("source".into(), "api".into());
                o.insert("id".into(), p.id.into());
                o.insert("stream".into(), p.key.name.clone().into());
                o.insert("added_by".into(), p.added_by.clone().into());
            }
            list.push(v);
        }
    }
    serde_json::json!({ "destinations": list })
}

/// Held with a publish: dropping it (the publisher left) ends the pushes of its stream,
/// after the frames already in the hub have gone out (bounded by [`CLOSE_FLUSH`]).
pub struct Restreams {
    /// This publish in the API's table of live streams (taken out on drop, so a
    /// destination added after the publisher left waits for the next publish).
    api: Arc<ApiPushes>,
    key: StreamKey,
    generation: u64,
    _stop: watch::Sender<()>,
}

impl Drop for Restreams {
    fn drop(&mut self) {
        let mut inner = self.api.lock();
        if inner
            .live
            .get(&self.key)
            .is_some_and(|l| l.generation == self.generation)
        {
            inner.live.remove(&self.key);
        }
    }
}

/// What starting one more push of a live publish needs.
#[derive(Clone)]
struct Launch {
    hub: Arc<Hub>,
    limits: Limits,
    write_timeout: Duration,
    /// Ends (its sender dropped) when the publisher leaves.
    stop: watch::Receiver<()>,
    /// The runtime the publish runs on: an API request (served on the admin listener's
    /// own thread) starts pushes there, not on the admin thread.
    rt: tokio::runtime::Handle,
    generation: u64,
}

impl Launch {
    /// Subscribes to the hub now and runs the push to `dest` until the publisher leaves
    /// (or, for an API destination, until `cancel` ends: its removal).
    fn spawn(
        &self,
        key: &StreamKey,
        dest: &Destination,
        ca: Option<PathBuf>,
        metrics: Arc<DestMetrics>,
        cancel: Option<watch::Receiver<()>>,
    ) {
        let ctx = Ctx {
            hub: self.hub.clone(),
            limits: self.limits.clone(),
            key: key.clone(),
            dest: dest.clone(),
            ca,
            connect_timeout: Duration::from_secs(self.limits.handshake_timeout_secs.max(1)),
            write_timeout: self.write_timeout,
            max_lag: self.hub.config().max_lag_bytes,
            ring: self.hub.config().queue_messages,
            metrics,
            label: format!("{key} -> {}", dest.redacted()),
        };
        let player = self.hub.play_push(key);
        let stop = self.stop.clone();
        self.rt.spawn(async move {
            let Some(mut cancel) = cancel else {
                return run(ctx, player, stop).await;
            };
            let label = ctx.label.clone();
            tokio::select! {
                () = run(ctx, player, stop) => {}
                // Removed through the API: dropping the session closes its connection now.
                _ = cancel.changed() => info!("restream {label}: stopped (removed through the admin API)"),
            }
        });
    }
}

/// What one destination's task needs.
struct Ctx {
    hub: Arc<Hub>,
    limits: Limits,
    key: StreamKey,
    dest: Destination,
    ca: Option<PathBuf>,
    connect_timeout: Duration,
    write_timeout: Duration,
    max_lag: u64,
    ring: usize,
    metrics: Arc<DestMetrics>,
    /// `live/s -> rtmps://host:443/app/***`: what every line about it starts with.
    label: String,
}

/// Starts pushing `key` (just published on `hub`) to every target whose app matches and
/// to the destinations the admin API added for it, and registers the publish so that
/// destinations added later start at once. Call it on the runtime the sessions run on,
/// right after the publish took the key: each destination subscribes to the hub here,
/// before the first frame, so the first connection sends the stream from its start.
pub fn start(
    targets: &[PushTarget],
    api: &Arc<ApiPushes>,
    hub: &Arc<Hub>,
    limits: &Limits,
    write_timeout: Duration,
    key: &StreamKey,
) -> Restreams {
    let (stop_tx, stop_rx) = watch::channel(());
    let mut inner = api.lock();
    inner.generation = inner.generation.wrapping_add(1);
    let launch = Launch {
        hub: hub.clone(),
        limits: limits.clone(),
        write_timeout,
        stop: stop_rx,
        rt: tokio::runtime::Handle::current(),
        generation: inner.generation,
    };
    for t in targets.iter().filter(|t| app_matches(&t.app, &key.app)) {
        launch.spawn(key, &t.dest, t.ca.clone(), metrics_for(t), None);
    }
    // Under the table's lock: an API add or removal happens wholly before or after this.
    for p in inner.entries.iter().filter(|p| &p.key == key) {
        launch.spawn(
            key,
            &p.dest,
            None,
            p.metrics.clone(),
            Some(p.cancel.subscribe()),
        );
    }
    let generation = launch.generation;
    inner.live.insert(key.clone(), launch);
    drop(inner);
    Restreams {
        api: api.clone(),
        key: key.clone(),
        generation,
        _stop: stop_tx,
    }
}

/// Destinations added through the admin API (`POST /api/v1/restream`), each for one stream,
/// and the streams publishing now. Runtime state shared by every engine generation: a
/// configuration reload keeps it, a restart forgets it.
pub struct ApiPushes {
    inner: Mutex<ApiInner>,
    /// `limits.max_api_pushes` (a reload updates it; entries above a lowered limit stay).
    max: AtomicUsize,
}

#[derive(Default)]
struct ApiInner {
    next_id: u64,
    /// Bumped by every publish, so a publish that ended does not remove its successor.
    generation: u64,
    entries: Vec<ApiPush>,
    live: HashMap<StreamKey, Launch>,
}

struct ApiPush {
    id: u64,
    key: StreamKey,
    dest: Destination,
    /// Who added it (the admin client's address), for the list and the logs.
    added_by: String,
    metrics: Arc<DestMetrics>,
    /// Dropped on removal: the push running for it stops at once.
    cancel: watch::Sender<()>,
}

/// Why an API destination was not added; the texts name what to fix and never hold the
/// URL (it carries the stream key).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} destinations were added through the API already (limits.max_api_pushes); remove one with DELETE /api/v1/restream/ID first")]
    Full(usize),
    #[error("this destination is already added for this stream, as id {0}")]
    Duplicate(u64),
}

impl ApiPushes {
    pub fn new(max: usize) -> Arc<ApiPushes> {
        Arc::new(ApiPushes {
            inner: Mutex::new(ApiInner::default()),
            max: AtomicUsize::new(max),
        })
    }

    /// A reload's `limits.max_api_pushes`.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a destination for `app`/`stream` (already checked by the caller: exact names
    /// within `limits.max_name_len`) and, when the stream is live, starts pushing to it at
    /// once from the hub's metadata, headers and GOP cache. Returns what the API answers.
    pub fn add(
        &self,
        app: &str,
        stream: &str,
        url: &str,
        added_by: &str,
    ) -> Result<serde_json::Value, AddError> {
        let dest = Destination::parse(url).map_err(|e| AddError::Invalid(format!("url: {e}")))?;
        let key = StreamKey::new(app, stream);
        let mut inner = self.lock();
        if let Some(p) = inner
            .entries
            .iter()
            .find(|p| p.key == key && p.dest == dest)
        {
            return Err(AddError::Duplicate(p.id));
        }
        let max = self.max.load(Ordering::Relaxed);
        if inner.entries.len() >= max {
            return Err(AddError::Full(max));
        }
        inner.next_id = inner.next_id.saturating_add(1);
        let id = inner.next_id;
        let metrics = Arc::new(DestMetrics {
            app: app.to_owned(),
            destination: dest.redacted(),
            ..DestMetrics::default()
        });
        let (cancel, _) = watch::channel(());
        let live = inner.live.get(&key).cloned();
        if let Some(launch) = &live {
            launch.spawn(&key, &dest, None, metrics.clone(), Some(cancel.subscribe()));
        }
        info!(
            "restream {key} -> {}: added through the admin API by {added_by} (id {id}){}",
            dest.redacted(),
            if live.is_some() {
                "; the stream is live, pushing now"
            } else {
                "; pushing from its next publish"
            }
        );
        let answer = serde_json::json!({
            "id": id,
            "app": app,
            "stream": stream,
            "destination": dest.redacted(),
            "live": live.is_some(),
        });
        inner.entries.push(ApiPush {
            id,
            key,
            dest,
            added_by: added_by.to_owned(),
            metrics,
            cancel,
        });
        Ok(answer)
    }

    /// Removes destination `id`: its push stops at once (its connection is closed), the
    /// stream's other destinations and players carry on. None when there is no such id.
    pub fn remove(&self, id: u64, asked_by: &str) -> Option<serde_json::Value> {
        let mut inner = self.lock();
        let at = inner.entries.iter().position(|p| p.id == id)?;
        let p = inner.entries.swap_remove(at);
        // Keep the list in the order the destinations were added.
        inner.entries.sort_by_key(|p| p.id);
        drop(inner);
        info!(
            "restream {} -> {}: removed through the admin API by {asked_by} (id {id})",
            p.key,
            p.dest.redacted()
        );
        Some(serde_json::json!({
            "removed": id,
            "app": p.key.app,
            "stream": p.key.name,
            "destination": p.dest.redacted(),
        }))
    }
}

/// Why one publish session to a destination ended.
enum Ended {
    /// The publisher left: the task is done.
    Stopped,
    /// The destination failed or dropped: try again after the backoff.
    Failed(String),
}

async fn run(ctx: Ctx, first: Player, mut stop: watch::Receiver<()>) {
    let m = ctx.metrics.clone();
    // Guards, not pairs of calls: a removal through the API drops this future anywhere.
    let _streaming = Up::new(&m.streams);
    let mut first = Some(first);
    let mut wait = RECONNECT_MIN;
    info!("restream {}: connecting", ctx.label);
    loop {
        let opened = tokio::select! {
            r = open(&ctx) => r,
            _ = stop.changed() => break,
        };
        match opened {
            Ok(conn) => {
                m.connects.fetch_add(1, Ordering::Relaxed);
                let publishing = Up::new(&m.publishing);
                info!("restream {}: publishing", ctx.label);
                // The subscription taken at publish time, unless it fell behind meanwhile
                // (then its headers are gone: a new one starts from the hub's caches).
                let player = match first.take() {
                    Some(p) if p.rx.len() < ctx.ring / 2 => p,
                    _ => ctx.hub.play_push(&ctx.key),
                };
                let ended = pump(&ctx, conn, player, &mut stop).await;
                drop(publishing);
                match ended {
                    Ended::Stopped => break,
                    Ended::Failed(why) => {
                        m.failures.fetch_add(1, Ordering::Relaxed);
                        // A session that ran is a fresh start for the backoff.
                        wait = RECONNECT_MIN;
                        warn!(
                            "restream {}: dropped: {}; reconnecting in {} ms",
                            ctx.label,
                            scrub(&why, &ctx),
                            wait.as_millis()
                        );
                    }
                }
            }
            Err(e) => {
                m.failures.fetch_add(1, Ordering::Relaxed);
                // Nothing to keep for a connection that is not there.
                first = None;
                warn!(
                    "restream {}: {}; retrying in {} ms",
                    ctx.label,
                    scrub(&e.to_string(), &ctx),
                    wait.as_millis()
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
        wait = wait.saturating_mul(2).min(RECONNECT_MAX);
    }
    info!("restream {}: stopped (the publisher left)", ctx.label);
}

/// One more in a gauge for as long as it lives.
struct Up<'a>(&'a AtomicU64);

impl<'a> Up<'a> {
    fn new(gauge: &'a AtomicU64) -> Up<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Up(gauge)
    }
}

impl Drop for Up<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Anything a destination or the network said, without the stream key in it.
fn scrub(text: &str, ctx: &Ctx) -> String {
    let (_, key) = ctx.dest.for_name(&ctx.key.name);
    let mut out = text.replace(&key, "***");
    // The key alone, when it was sent with a query the server may have cut off.
    if let Some((bare, _)) = key.split_once('?') {
        if !bare.is_empty() {
            out = out.replace(bare, "***");
        }
    }
    out
}

/// Connects, publishes, and waits for NetStream.Publish.Start.
async fn open(ctx: &Ctx) -> Result<OriginConn, ConnError> {
    let tls = if ctx.dest.server.scheme.is_tls() {
        // Loaded per attempt: a CA file fixed on disk is picked up at the next retry.
        Some(
            crate::net::tls::client_config(ctx.ca.as_deref()).map_err(|e| ConnError::Tls {
                url: ctx.dest.server.to_string(),
                detail: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let (app, key) = ctx.dest.for_name(&ctx.key.name);
    let timeout = ctx.connect_timeout;
    let mut c = OriginConn::open_publisher(
        &ctx.dest.server,
        tls.as_ref(),
        &app,
        &key,
        &ctx.limits,
        timeout,
    )
    .await?;
    c.publish(&key, &format!("publish of {}", ctx.label), timeout)
        .await?;
    Ok(c)
}

/// Where one destination is in the stream.
struct Pos {
    has_video: bool,
    /// Fell behind: waiting for a keyframe (audio only: the next audio frame).
    skipping: bool,
    /// The chunked copies queued for the next write, on the process's memory budget
    /// (`try_set` to the bytes queued; back to zero after each write).
    charge: crate::budget::Charge,
    /// The budget refused a frame: the session ends (and reconnects later).
    over_budget: bool,
}

/// Writes the player's frames to the connection until the publisher leaves (Stopped) or
/// the destination fails.
async fn pump(
    ctx: &Ctx,
    mut conn: OriginConn,
    mut player: Player,
    stop: &mut watch::Receiver<()>,
) -> Ended {
    let sid = conn.stream_id;
    let mut pos = Pos {
        has_video: player.has_video,
        skipping: player.live && player.has_video && !player.has_keyframe,
        charge: crate::budget::Charge::global(),
        over_budget: false,
    };
    for f in std::mem::take(&mut player.start) {
        send_frame(ctx, &mut conn, sid, &player, &mut pos, &f);
    }
    let mut counted = conn.bytes_out;
    loop {
        if pos.over_budget {
            return Ended::Failed(
                "the memory budget (limits.max_memory) refused the frames queued for it".into(),
            );
        }
        if let Err(e) = flush(ctx, &mut conn, stop).await {
            return e;
        }
        pos.charge.shrink(pos.charge.bytes());
        ctx.metrics
            .bytes
            .fetch_add(conn.bytes_out.saturating_sub(counted), Ordering::Relaxed);
        counted = conn.bytes_out;
        tokio::select! {
            ev = player.rx.recv() => {
                if on_event(ctx, &mut conn, sid, &mut player, &mut pos, ev) {
                    // The publisher left: what was sent so far is all there is.
                    return finish(ctx, conn, stop).await;
                }
                // Take more of what is there into the same write (a bounded batch).
                for _ in 1..BATCH_EVENTS {
                    let ev = match player.rx.try_recv() {
                        Ok(ev) => Ok(ev),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                        Err(_) => break,
                    };
                    if on_event(ctx, &mut conn, sid, &mut player, &mut pos, ev) {
                        return finish(ctx, conn, stop).await;
                    }
                }
            }
            ev = conn.next_event() => match ev {
                Ok(ClientEvent::Status { level, code, description, .. }) if level == "error" => {
                    let why = format!("it ended the publish: {code} {description}");
                    return Ended::Failed(why.chars().take(300).collect());
                }
                Ok(_) => {}
                Err(e) => return Ended::Failed(e.to_string()),
            },
            _ = stop.changed() => {
                // The publisher left: send what the hub still holds for us (batch by batch,
                // within CLOSE_FLUSH), then close.
                return drain(ctx, conn, &mut player, &mut pos).await;
            }
        }
    }
}

/// Writes what is queued, giving up on a destination that takes nothing for
/// `write_timeout`, or when the publisher leaves meanwhile.
async fn flush(
    ctx: &Ctx,
    conn: &mut OriginConn,
    stop: &mut watch::Receiver<()>,
) -> Result<(), Ended> {
    tokio::select! {
        r = tokio::time::timeout(ctx.write_timeout, conn.flush()) => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Ended::Failed(e.to_string())),
            Err(_) => Err(Ended::Failed(format!(
                "it took nothing for {} s (engine.write_timeout_secs)",
                ctx.write_timeout.as_secs()
            ))),
        },
        _ = stop.changed() => Err(Ended::Stopped),
    }
}

/// After the publisher left: what the hub still holds for this destination, a batch per
/// write, all within [`CLOSE_FLUSH`]; then deleteStream and close.
async fn drain(ctx: &Ctx, mut conn: OriginConn, player: &mut Player, pos: &mut Pos) -> Ended {
    let sid = conn.stream_id;
    let before = conn.bytes_out;
    let sent = tokio::time::timeout(CLOSE_FLUSH, async {
        loop {
            let mut more = false;
            for _ in 0..BATCH_EVENTS {
                match player.rx.try_recv() {
                    Ok(ev) => {
                        if on_event(ctx, &mut conn, sid, player, pos, Ok(ev)) {
                            return conn.flush().await;
                        }
                        more = true;
                    }
                    Err(_) => break,
                }
            }
            conn.flush().await?;
            pos.charge.shrink(pos.charge.bytes());
            if !more || pos.over_budget {
                return Ok(());
            }
        }
    })
    .await;
    ctx.metrics
        .bytes
        .fetch_add(conn.bytes_out.saturating_sub(before), Ordering::Relaxed);
    if matches!(sent, Ok(Ok(()))) {
        conn.close().await;
    }
    Ended::Stopped
}

/// The last frames out (bounded by [`CLOSE_FLUSH`]), deleteStream, close.
async fn finish(ctx: &Ctx, mut conn: OriginConn, _stop: &mut watch::Receiver<()>) -> Ended {
    let before = conn.bytes_out;
    if tokio::time::timeout(CLOSE_FLUSH, conn.flush())
        .await
        .is_ok()
    {
        ctx.metrics
            .bytes
            .fetch_add(conn.bytes_out.saturating_sub(before), Ordering::Relaxed);
        conn.close().await;
    }
    Ended::Stopped
}

/// Handles one hub event; true when the publisher has left.
fn on_event(
    ctx: &Ctx,
    conn: &mut OriginConn,
    sid: u32,
    player: &mut Player,
    pos: &mut Pos,
    ev: Result<Event, RecvError>,
) -> bool {
    match ev {
        Ok(Event::Frame(f)) => {
            send_frame(ctx, conn, sid, player, pos, &f);
            false
        }
        Ok(Event::Unpublished) | Err(RecvError::Closed) => true,
        Ok(Event::Published) | Ok(Event::Filler) => false,
        Err(RecvError::Lagged(n)) => {
            if !pos.skipping {
                ctx.metrics.skips.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "restream {}: fell {n} messages behind; skipping to the next keyframe",
                    ctx.label
                );
            }
            pos.skipping = true;
            false
        }
    }
}

fn send_frame(
    ctx: &Ctx,
    conn: &mut OriginConn,
    sid: u32,
    player: &Player,
    pos: &mut Pos,
    f: &Frame,
) {
    if f.msg_type == VIDEO {
        pos.has_video = true;
    }
    if !f.kind.is_header() {
        let lag = player.lag_bytes(f);
        if !pos.skipping && lag > ctx.max_lag {
            pos.skipping = true;
            ctx.metrics.skips.fetch_add(1, Ordering::Relaxed);
            warn!(
                "restream {}: {lag} bytes behind live; skipping to the next keyframe",
                ctx.label
            );
        }
        if pos.skipping {
            let resume = f.kind == FrameKind::VideoKey || (!pos.has_video && f.msg_type == AUDIO);
            if !resume || lag > ctx.max_lag {
                return;
            }
            pos.skipping = false;
        }
    }
    // Charged before the copy is made; a refusal ends this destination's session only.
    if pos.over_budget || pos.charge.try_grow(f.payload.len()).is_err() {
        pos.over_budget = true;
        return;
    }
    match f.msg_type {
        AUDIO | VIDEO => conn
            .session()
            .send_media(sid, f.msg_type, f.timestamp, f.payload.clone()),
        _ => {
            // The hub keeps onMetaData without the @setDataFrame a publisher wraps it in.
            let payload = if f.kind == FrameKind::Meta {
                let mut body =
                    crate::rtmp::amf0::encode_all(&[Amf0Value::string("@setDataFrame")]).to_vec();
                body.extend_from_slice(&f.payload);
                Bytes::from(body)
            } else {
                f.payload.clone()
            };
            let msg = Message::new(DATA_AMF0, f.timestamp, sid, payload);
            conn.session().send(DATA_CSID, &msg);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_last_segment_or_the_query_and_never_shown() {
        let d = Destination::parse("rtmps://live.example.com/app/sk_SECRET").unwrap();
        assert_eq!(d.for_name("s"), ("app".into(), "sk_SECRET".into()));
        assert_eq!(d.redacted(), "rtmps://live.example.com:443/app/***");
        assert!(!format!("{d:?}").contains("SECRET"));
        let d = Destination::parse("rtmp://h:1936/a/b/k?token=SECRET").unwrap();
        assert_eq!(d.for_name("s"), ("a/b".into(), "k?token=SECRET".into()));
        assert_eq!(d.redacted(), "rtmp://h:1936/a/b/***");
        let d = Destination::parse("rtmp://h/app?SECRET").unwrap();
        assert_eq!(d.for_name("s"), ("app".into(), "SECRET".into()));
        assert_eq!(d.redacted(), "rtmp://h:1935/app?***");
        let d = Destination::parse("rtmp://h/app/{name}_x").unwrap();
        assert_eq!(d.for_name("cam1"), ("app".into(), "cam1_x".into()));
        for bad in [
            "rtmp://h/app",
            "rtmp://h/app/",
            "rtmpt://h/app/SECRET",
            "http://h/app/SECRET",
            "rtmp://h:99999/app/SECRET",
            "rtmp:///SECRET",
            "SECRET",
        ] {
            let e = Destination::parse(bad).expect_err(bad).to_string();
            assert!(!e.contains("SECRET"), "{bad}: {e}");
        }
    }

    #[test]
    fn app_globs() {
        assert!(app_matches("live", "live"));
        assert!(!app_matches("live", "live2"));
        assert!(app_matches("*", "anything"));
        assert!(app_matches("live*", "live2"));
        assert!(app_matches("*-out", "cam-out"));
        assert!(!app_matches("*-out", "cam-in"));
        assert!(app_matches("a*b*c", "aXbYc"));
        assert!(!app_matches("a*b*c", "aXcYb"));
        assert!(!app_matches("ab*ba", "aba"));
    }
}
