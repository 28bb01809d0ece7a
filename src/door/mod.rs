//! The front door: listeners, first-byte sniffing, TLS, the RTMPT tunnel and the RTMPE layer.

pub mod rtmpe;
pub mod rtmpt;
pub mod sniff;
pub mod tls;
