//! The core RTMP engine: one session per client and a hub of live streams.

pub mod command;
pub mod hub;
pub mod session;
