//! The core RTMP engine: one session per client and a hub of live streams.
//!
//! The front door hands every finished client stream to [`Engine::handler`]; each one runs
//! as its own task ([`session`]) and meets the others in the [`hub::Hub`], keyed by app and
//! stream name.

pub mod edge;
pub mod flv;
pub mod flv_read;
pub mod httpflv;
pub mod hub;
pub(crate) mod lane;
pub(crate) mod log;
pub mod record;
pub mod restream;
pub mod session;
pub mod tick;
pub mod vod;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::limits::Limits;
use crate::stream::{ClientStream, StreamHandler};

/// How the engine serves publishers and players (protocol limits live in [`Limits`]).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a player waits for a publisher (before the first one, or after one leaves)
    /// before it is told NetStream.Play.Stop and closed.
    pub player_wait: Duration,
    /// Messages in each stream's fan-out ring; a player further behind skips to a keyframe.
    pub queue_messages: usize,
    /// Bytes a player may fall behind live before it skips to the next keyframe.
    pub max_lag_bytes: u64,
    /// Keep the frames since the last keyframe so a late player starts at once.
    pub gop_cache: bool,
    /// Bytes and messages the GOP cache may hold.
    pub gop_max_bytes: usize,
    pub gop_max_messages: usize,
    /// Chunk size we announce and send with (large: fewer chunk headers per frame).
    pub chunk_size: u32,
    /// Window Acknowledgement Size we announce (the peer acks after this many bytes).
    pub window_ack_size: u32,
    /// Set Peer Bandwidth we announce.
    pub peer_bandwidth: u32,
    /// How long a write to a client may make no progress before the client is dropped.
    pub write_timeout: Duration,
    /// Merge window: a player whose media flows drains its ring and writes on shared ticks
    /// this far apart (see [`tick`]), so the frames of one window go out in one write instead
    /// of one write and one wake-up per frame (SRS's `mw_latency`, 350 ms by default there).
    /// A frame waits at most this long (half of it on average); replies and a play's start
    /// frames never wait. Zero writes each frame as it comes. 80 ms: rtmpdump players at
    /// 1.6 Mb/s cost about 0.4-0.6x nginx-rtmp's CPU (0.9-1.1x without), see bench/RESULTS.md.
    pub write_batch: Duration,
    /// Message streams (createStream) one connection may open.
    pub max_streams_per_connection: u32,
    /// `[auth]`: checked at each connect, publish and play (None: everyone is allowed).
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// A publish on a key that already has a publisher: refused, or replacing it.
    pub publisher_takeover: hub::PublisherTakeover,
    /// Edge mode (`[upstream] mode = "edge"`): players' streams are pulled from these
    /// origins, publishers forwarded to them ([`edge`]).
    pub edge: Option<edge::EdgeSettings>,
    /// `[[engine.push]]`: destinations every stream published to a matching app is pushed
    /// to ([`restream`]).
    pub push: Vec<restream::PushTarget>,
    /// HTTP-FLV ([`httpflv`]): the `Access-Control-Allow-Origin` its answers carry (`*`, one
    /// origin, or None for no CORS header: same-origin pages only).
    pub http_flv_cors: Option<String>,
    /// HTTP-FLV: how long a request for a stream nobody publishes waits for a publisher
    /// before it is answered 404.
    pub http_flv_wait: Duration,
    /// `[engine] record*`: which apps are recorded and where (None: `record = "off"`).
    pub record: Option<Arc<record::RecordSettings>>,
    /// `vod_dir`: a play of a name that is an FLV file in this directory (and not a live
    /// stream) plays the file ([`vod`]). Canonical (symlinks resolved) once the
    /// configuration is loaded, so confinement checks compare like with like.
    pub vod_dir: Option<std::path::PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            player_wait: Duration::from_secs(60),
            queue_messages: 1024,
            max_lag_bytes: 8 * 1024 * 1024,
            gop_cache: true,
            gop_max_bytes: 16 * 1024 * 1024,
            gop_max_messages: 4096,
            chunk_size: 4096,
            window_ack_size: 5_000_000,
            peer_bandwidth: 5_000_000,
            write_timeout: Duration::from_secs(20),
            write_batch: Duration::from_millis(80),
            max_streams_per_connection: 16,
            auth: None,
            publisher_takeover: hub::PublisherTakeover::Deny,
            edge: None,
            push: Vec::new(),
            http_flv_cors: Some("*".to_owned()),
            http_flv_wait: Duration::from_secs(5),
            record: None,
            vod_dir: None,
        }
    }
}

impl EngineConfig {
    fn hub_config(&self) -> hub::HubConfig {
        hub::HubConfig {
            chunk_size: self.chunk_size,
            queue_messages: self.queue_messages,
            gop_cache: self.gop_cache,
            gop_max_bytes: self.gop_max_bytes,
            gop_max_messages: self.gop_max_messages,
            max_lag_bytes: self.max_lag_bytes,
            // Only the lane sends from the log, and there is a lane only with a window.
            log: (!self.write_batch.is_zero()).then(log::LogFds::process),
        }
    }
}

/// The core engine: configuration, limits and the hub every session shares.
pub struct Engine {
    limits: Limits,
    cfg: EngineConfig,
    hub: Arc<hub::Hub>,
    /// Edge mode's pulls and forwards (kept by every generation: the pulls are the hub's).
    edge: Option<Arc<edge::Edge>>,
    /// Shared by every generation (see [`Engine::reconfigured`]): ids stay unique.
    next_session: Arc<AtomicU64>,
    /// Restream destinations added through the admin API (shared by every generation: a
    /// reload keeps them).
    api_pushes: Arc<restream::ApiPushes>,
    /// Where steady players' media is written on the merge window's ticks ([`lane`]).
    lanes: lane::Lanes,
    /// The protocol's settings for this generation's sessions, plain and over RTMPE: shared,
    /// not copied into each session.
    proto: [Arc<crate::rtmp::session::ServerConfig>; 2],
}

impl Engine {
    /// The engine; in edge mode, an rtmps:// origin whose trusted roots cannot be loaded
    /// leaves it without its edge (logged): use [`Engine::try_new`] to refuse that instead.
    pub fn new(limits: Limits, cfg: EngineConfig) -> Arc<Engine> {
        let (cfg, hub) = Self::prepare(cfg);
        let edge = match &cfg.edge {
            Some(s) => edge::Edge::new(s.clone(), limits.clone(), hub.clone(), cfg.player_wait)
                .map_err(|e| tracing::error!("edge mode off: {e}"))
                .ok(),
            None => None,
        };
        Self::assemble(limits, cfg, hub, edge)
    }

    /// The engine, and in edge mode its edge (which loads the trusted roots for rtmps://).
    pub fn try_new(
        limits: Limits,
        cfg: EngineConfig,
    ) -> Result<Arc<Engine>, crate::net::tls::TlsError> {
        let (cfg, hub) = Self::prepare(cfg);
        let edge = match &cfg.edge {
            Some(s) => Some(edge::Edge::new(
                s.clone(),
                limits.clone(),
                hub.clone(),
                cfg.player_wait,
            )?),
            None => None,
        };
        Ok(Self::assemble(limits, cfg, hub, edge))
    }

    fn prepare(mut cfg: EngineConfig) -> (EngineConfig, Arc<hub::Hub>) {
        // A chunk size the peer would refuse, or that breaks the prechunked frames, is clamped.
        cfg.chunk_size = cfg.chunk_size.clamp(128, 0x7fff_ffff);
        let hub = hub::Hub::new(cfg.hub_config());
        (cfg, hub)
    }

    fn assemble(
        limits: Limits,
        cfg: EngineConfig,
        hub: Arc<hub::Hub>,
        edge: Option<Arc<edge::Edge>>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            api_pushes: restream::ApiPushes::new(limits.max_api_pushes),
            lanes: lane::Lanes::new(cfg.write_batch),
            proto: Self::proto_configs(&limits, &cfg),
            limits,
            cfg,
            hub,
            edge,
            next_session: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The engine with new limits and settings for the sessions that start from now on
    /// (a configuration reload), meeting the running ones in the same hub. The hub's own
    /// settings (chunk size, queue, GOP cache, lag) stay those it was created with: its
    /// streams' rings and caches are built with them.
    pub fn reconfigured(&self, limits: Limits, mut cfg: EngineConfig) -> Arc<Engine> {
        let hub = self.hub.config();
        cfg.chunk_size = hub.chunk_size;
        cfg.queue_messages = hub.queue_messages;
        cfg.gop_cache = hub.gop_cache;
        cfg.gop_max_bytes = hub.gop_max_bytes;
        cfg.gop_max_messages = hub.gop_max_messages;
        cfg.max_lag_bytes = hub.max_lag_bytes;
        self.api_pushes.set_max(limits.max_api_pushes);
        Arc::new(Engine {
            api_pushes: self.api_pushes.clone(),
            // The new window's lanes (the sessions of the old generation keep theirs).
            lanes: lane::Lanes::new(cfg.write_batch),
            proto: Self::proto_configs(&limits, &cfg),
            limits,
            cfg,
            hub: self.hub.clone(),
            edge: self.edge.clone(),
            next_session: self.next_session.clone(),
        })
    }

    fn proto_configs(
        limits: &Limits,
        cfg: &EngineConfig,
    ) -> [Arc<crate::rtmp::session::ServerConfig>; 2] {
        [
            session::proto_config(limits, cfg, false),
            session::proto_config(limits, cfg, true),
        ]
    }

    /// The protocol's settings for a session of this generation, over RTMPE or not.
    pub(crate) fn proto_config(&self, rtmpe: bool) -> Arc<crate::rtmp::session::ServerConfig> {
        self.proto[usize::from(rtmpe)].clone()
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn hub(&self) -> &Arc<hub::Hub> {
        &self.hub
    }

    /// Restream destinations added through the admin API.
    pub fn api_pushes(&self) -> &Arc<restream::ApiPushes> {
        &self.api_pushes
    }

    /// The fan-out lanes steady players are written from.
    pub(crate) fn lanes(&self) -> &lane::Lanes {
        &self.lanes
    }

    /// Edge mode's pulls and forwards, when on.
    pub fn edge(&self) -> Option<&Arc<edge::Edge>> {
        self.edge.as_ref()
    }

    /// Serve one client stream until its session ends (the future, boxed: each kind of
    /// session carries only its own state; a plain fn, because an async fn wrapping the
    /// session's future would keep a second copy of its arguments, the stream included,
    /// for the whole session).
    pub fn serve(
        self: Arc<Self>,
        stream: ClientStream,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        if stream.transport.is_http() {
            return Box::pin(httpflv::serve(self, stream, id));
        }
        Box::pin(session::run(self, stream, id))
    }

    /// The handler the front door calls for each client stream.
    pub fn handler(self: &Arc<Self>) -> StreamHandler {
        let engine = self.clone();
        Arc::new(move |stream| engine.clone().serve(stream))
    }
}
