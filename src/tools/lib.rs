//! rtmpgate-tools: what drives rtmpgate (or any RTMP server) from the outside.
//!
//! | module | role |
//! | --- | --- |
//! | [`client`] | an async RTMP client: the transports (rtmp, rtmps, rtmpt, rtmpts) and [`client::RtmpConnection`], the protocol crate's sans-IO `ClientSession` over one of them, with the publish and play sequences ffmpeg and librtmp send |
//! | `bench/` | the load generator `rtmpgate-bench` (its own binary): publishers and players with per-frame latency, loss and corruption checks; `bench/compare` drives it |
//!
//! Layering: this crate sits above the gateway (`rtmpgate`: its URL type, PEM loader, limits
//! and memory budget) and the protocol crate (`rtmpgate-proto`); neither imports it.

pub mod client;
