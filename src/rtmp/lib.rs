//! The sans-IO RTMP protocol core: fed bytes, asked for bytes; no sockets, no tokio.

pub mod amf;
pub mod amf0;
pub mod amf3;
pub mod budget;
pub mod chunk;
pub mod handshake;
pub mod message;
pub mod rtmpe;
pub mod session;
