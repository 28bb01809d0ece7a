//! The network layer under the door and the upstream: what both sides of the gateway need
//! to name and reach a peer, and nothing that knows RTMP sessions or the configuration file.
//!
//! | module | role |
//! | --- | --- |
//! | [`url`] | listener and upstream URLs (`scheme://host[:port]`) |
//! | [`addr`] | address ranges (`trusted_proxies`) and per-address grouping (IPv6 prefixes) |
//! | [`tls`] | TLS server and client configuration, the one PEM loader, SNI certificates |
//! | [`tls_stream`] | the server side of TLS (rustls unbuffered): a stream holding no buffer while idle |
//! | [`key_work`] | one budget on the blocking pool for RTMPE key exchanges and RSA signatures |
//! | [`proxy_protocol`] | PROXY protocol v1/v2: encode (to a backend), parse (from a load balancer) |
//! | [`socket`] | binding listening sockets, the options every TCP connection gets |
//! | [`rendezvous`] | rendezvous hashing of a stream over servers (relay `hash` groups, edge origins) |
//! | [`hex`] | a peer's first bytes, short, for log lines |
//! | [`http`] | a plain HTTP request head (HTTP-FLV's GET, HEAD, OPTIONS), bounded, and short answers |

pub mod addr;
pub mod hex;
pub mod http;
pub mod key_work;
pub mod proxy_protocol;
pub mod rendezvous;
pub mod socket;
pub mod tls;
pub mod tls_stream;
pub mod url;

pub use hex::short_hex;
