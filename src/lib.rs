//! rtmpgate: a front door for RTMP. Every transport (RTMP, RTMPS, RTMPT, RTMPTS, RTMPE,
//! RTMPTE) is accepted, identified from its first bytes and turned into one
//! [`stream::ClientStream`], which is handed to the core engine or to a backend server.
//!
//! # Layout
//!
//! From the bottom layer up. The aim is that a module imports only from layers below it;
//! the imports that still run the other way are listed in `CONTRIBUTING.md` until they are
//! removed.
//!
//! | module | role |
//! | --- | --- |
//! | [`rtmp`] | the sans-IO protocol core: handshake (plain, digest, RTMPE crypto), chunk stream, AMF0/AMF3, messages, and the server and client sessions ([`rtmp::session`]: bytes and `now` in, bytes and events out; connect/publish/play as requests the application accepts or rejects). No tokio, no sockets. Fuzzed; its own limit types, built from [`limits`]. |
//! | [`limits`], [`budget`] | every limit with its default, and the process-wide memory budget that peers' buffers are charged to |
//! | [`throttle`] | what a peer can make us do per second: log lines ([`throttle::LogThrottle`]) and messages ([`throttle::RateLimit`]) |
//! | [`net`] | below door and upstream: listener/upstream URLs, address ranges and per-address groups |
//! | [`stream`] | [`stream::ClientStream`]: the one byte stream every transport becomes, and [`stream::Transport`] |
//! | [`door`] | listeners, first-byte sniffing, TLS, PROXY protocol, the RTMPT tunnel (hyper), the RTMPE layer, session accounting |
//! | [`auth`] | authorization of connect, publish and play (addresses, keys, HMAC tokens, nginx-rtmp compatible HTTP callbacks), shared by the engine and the relay |
//! | [`engine`] | the built-in live server: one session task per client over the codec, and the hub (publish, play, GOP cache, fan-out ring) |
//! | [`upstream`] | the relay: one connection to the backend per client and a byte pump |
//! | [`client`] | a small RTMP client (rtmp, rtmps, rtmpt, rtmpts) for the load generator and tests |
//! | [`cluster`] | several nodes behind one balancer: node-prefixed tunnel session ids, the signed internal link that forwards another node's session requests, the node directory |
//! | [`config`] | TOML file + flags -> one validated `Config` (`cli`, `file`, `merge`); the settings types live with the modules they configure |
//! | [`metrics`] | process-wide counters (relaxed atomics) bumped where events happen, read at scrape time |
//! | [`access`] | the access log: one JSON line per session close, through a bounded queue to a writer thread |
//! | [`live`] | a setting a reload replaces: snapshotted when a connection or session starts |
//! | [`reload`] | SIGHUP and `POST /api/v1/reload`: prepare everything that can fail, then switch listeners, certificates, limits, engine settings, upstream, admin token |
//! | [`admin`] | the admin listener on its own thread and runtime: `/metrics`, `/healthz`, `/readyz`, the JSON API, the status page |
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
//!                                                                v
//!                     ClientStream (bytes + transport + peer + session label)
//!                                   |
//!              +--------------------+--------------------+
//!              v                                         v
//!     upstream: connect to the backend,        engine: handshake, then rtmp::session
//!     PROXY header, copy both ways             (chunks, commands, requests) + hub glue;
//!                                              hub: publisher -> prechunked frames ->
//!                                              bounded ring -> players
//! ```
//!
//! Everything after `ClientStream` is transport-blind: a new transport touches only `door`.

pub mod access;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod client;
pub mod cluster;
pub mod config;
pub mod door;
pub mod engine;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod net;
pub mod reload;
pub mod rtmp;
pub mod sessions;
pub mod stream;
pub mod throttle;
pub mod upstream;
