//! The sans-IO RTMP protocol core: fed bytes, asked for bytes; no sockets, no tokio.
//!
//! `rtmpgate-proto`, the bottom crate of rtmpgate's workspace (rtmpgate re-exports it as
//! `rtmpgate::rtmp`). It depends on nothing async and on nothing in rtmpgate: what the
//! gateway provides comes in through types defined here (the limit types, which rtmpgate
//! builds from its `Limits`, and [`budget::BufferCharge`], which its memory budget implements).
//!
//! | module | role |
//! | --- | --- |
//! | [`handshake`], [`rtmpe`] | C0/C1/C2 and S0/S1/S2 (plain and digest), RTMPE's Diffie-Hellman and RC4/Blowfish |
//! | [`chunk`] | the chunk stream: [`chunk::ChunkDecoder`] (bounded, charged to a [`budget::BufferCharge`]) and [`chunk::ChunkEncoder`] |
//! | [`message`] | RTMP messages: protocol control, user control, commands and data |
//! | [`amf`], [`amf0`], [`amf3`] | AMF decoding and encoding, bounded by [`amf::AmfLimits`] |
//! | [`budget`] | what the codec asks of a memory budget ([`budget::BufferCharge`], [`budget::OverBudget`]) |
//! | [`session`] | the server and client sessions: bytes and `now` in, bytes and events out |

pub mod amf;
pub mod amf0;
pub mod amf3;
pub mod budget;
pub mod chunk;
pub mod handshake;
pub mod message;
pub mod rtmpe;
pub mod session;
