//! rtmpgate: a front door for RTMP. Every transport (RTMP, RTMPS, RTMPT, RTMPTS, RTMPE,
//! RTMPTE) is accepted, identified from its first bytes and turned into one
//! [`stream::ClientStream`], which is handed to the core engine or to a backend server.

pub mod budget;
pub mod client;
pub mod config;
pub mod door;
pub mod engine;
pub mod limits;
pub mod rtmp;
pub mod stream;
pub mod upstream;
