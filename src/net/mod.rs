//! The network layer under the door and the upstream: what both sides of the gateway need
//! to name and reach a peer, and nothing that knows RTMP sessions or the configuration file.
//!
//! | module | role |
//! | --- | --- |
//! | [`url`] | listener and upstream URLs (`scheme://host[:port]`) |
//! | [`addr`] | address ranges (`trusted_proxies`) and per-address grouping (IPv6 prefixes) |

pub mod addr;
pub mod url;
