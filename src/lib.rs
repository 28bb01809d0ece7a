//! rtmpgate: a front door for RTMP. Every transport (RTMP, RTMPS, RTMPT, RTMPTS, RTMPE,
//! RTMPTE) is accepted, identified from its first bytes and turned into one
//! [`stream::ClientStream`], which is handed to the core engine or to a backend server.
//!
//! # Layout
//!
//! Three crates in one workspace: the protocol core `rtmpgate-proto` (`src/rtmp`, layer 0),
//! this one, and above it `rtmpgate-tools` (`src/tools`: the async RTMP client on the
//! protocol crate's `ClientSession`, and the load generator `rtmpgate-bench`). The table is
//! this crate's, from the bottom layer up: a module imports only from layers below it (no
//! import runs upward, no two modules import each other; `CONTRIBUTING.md` keeps it so). A
//! settings type lives with the module it configures; [`config`] only parses and merges
//! into them.
//!
//! | layer | module | role |
//! | --- | --- | --- |
//! | 0 | [`rtmp`] | the protocol crate `rtmpgate-proto` (in `src/rtmp`, re-exported here as `rtmp`): handshake (plain, digest, RTMPE crypto), chunk stream, AMF0/AMF3, messages, and the server and client sessions ([`rtmp::session`]: bytes and `now` in, bytes and events out; connect/publish/play as requests the application accepts or rejects). It imports nothing from this crate and nothing async (no tokio, no sockets): the compiler keeps it so. Fuzzed; its own limit types (built from [`limits`]) and a [`rtmp::budget::BufferCharge`] trait the chunk decoder charges partial messages to ([`budget::Charge`] implements it). |
//! | 1 | [`net`] | what the door and the upstream both need to reach a peer: one URL type and scheme ([`net::url::RtmpUrl`]), address ranges and per-address groups, TLS configuration and the one PEM loader, PROXY protocol v1/v2, socket binding and tuning |
//! | 1 | [`stream`] | [`stream::ClientStream`]: the one byte stream every transport becomes, and [`stream::Transport`] |
//! | 1 | [`throttle`], [`access`] | what a peer can make us do per second ([`throttle::LogThrottle`], [`throttle::RateLimit`]); the access log (one JSON line per session close, bounded queue, writer thread) |
//! | 2 | [`budget`], [`metrics`], [`live`] | the process-wide memory budget peers' buffers are charged to; process-wide counters (relaxed atomics); a setting a reload replaces |
//! | 3 | [`sessions`] | the table of open client sessions: counts bytes, logs open/close, tagged by the engine and the relay (role, stream), listed and kicked by the admin API |
//! | 4 | [`limits`] | every limit with its default (`[limits]`), and the codec's limit types built from it |
//! | 5 | [`door`] | listeners, first-byte sniffing, the RTMPT tunnel (hyper), the RTMPE layer, admission per address; other plain HTTP requests (HTTP-FLV) handed on with their head |
//! | 5 | [`auth`] | authorization of connect, publish and play (addresses, keys, HMAC tokens, nginx-rtmp compatible HTTP callbacks), shared by the engine and the relay |
//! | 6 | [`engine`] | the built-in live server: one session task per client over the codec, and the hub (publish, play, GOP cache, fan-out ring); HTTP-FLV playback ([`engine::httpflv`], FLV tags from [`engine::flv`]); edge mode ([`engine::edge`]: one pull per stream from its origin into the hub, publishers forwarded, origins by rendezvous hashing) |
//! | 6 | [`upstream`] | the relay: backend groups, health checks, one connection to a backend per client and a byte pump (or connect-aware) |
//! | 6 | [`cluster`] | several nodes behind one balancer: node-prefixed tunnel session ids, the signed internal link that forwards another node's session requests, the node directory |
//! | 7 | [`admin`] | the admin listener on its own thread and runtime: `/metrics`, `/healthz`, `/readyz`, the JSON API, the status page |
//! | 8 | [`config`] | TOML file + flags -> one validated `Config` (`cli`, `file`, `merge`) |
//! | 9 | [`reload`] | SIGHUP and `POST /api/v1/reload`: prepare everything that can fail, then switch listeners, certificates, limits, engine settings, upstream, admin token |
//!
//! `main.rs` parses the command line, sets up logging, binds the door and runs until a
//! signal, then drains.
//!
//! # The data path
//!
//! ```text
//! TCP accept -> limits per address -> sniff first bytes
//!     0x16             -> TLS (tokio-rustls) -> sniff again
//!     0x03             -> raw RTMP ------------------------------+
//!     0x06 / 0x08 / 0x09 -> RTMPE (decrypting adapter) ----------+
//!     "POST ..."       -> RTMPT tunnel (hyper): /open /send       |
//!                         /idle /close, one session = one pipe --+
//!     "GET ..." etc.   -> request head read (bounded) -> transport |
//!                         http/https, head attached (HTTP-FLV) ---+
//!                                                                v
//!                     ClientStream (bytes + transport + peer + session label)
//!                                   |
//!              +--------------------+--------------------+
//!              v                                         v
//!     upstream: connect to the backend,        engine: handshake, then rtmp::session
//!     PROXY header, copy both ways; connect    (chunks, commands, requests) + hub glue;
//!     mode reads up to connect first, hash     hub: publisher -> prechunked frames ->
//!     groups answer on rtmp::session first     bounded ring -> players
//!     (http: 501, it needs the engine)         (http: engine::httpflv, the hub as FLV)
//! ```
//!
//! Everything after `ClientStream` is transport-blind, but for plain HTTP requests (transport
//! `http`/`https`, HTTP-FLV), which carry their request head: a new RTMP transport touches
//! only `door`.

pub mod access;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod door;
pub mod engine;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod net;
pub mod reload;
/// The protocol core, its own crate (`src/rtmp`, package `rtmpgate-proto`).
pub use rtmpgate_proto as rtmp;
pub mod sessions;
pub mod stream;
pub mod throttle;
pub mod upstream;
