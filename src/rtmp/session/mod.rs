//! Sans-IO RTMP sessions: what a server and a client say to each other after the handshake.
//!
//! A [`server::ServerSession`] is fed the bytes a client sent and the time (`now`, never
//! read from the OS here), and answers with bytes to send and [`server::ServerEvent`]s:
//! connect, publish and play arrive as requests the application accepts or rejects
//! (`accept(request_id)` / `reject(request_id, why)`), which queue the replies RTMP clients
//! wait for (`NetConnection.Connect.Success`, `NetStream.Publish.Start`...), in the order
//! ffmpeg, librtmp and OBS expect them. Media and data messages come out as events whose
//! payloads are the decoder's buffers (never copied). The application owns what the
//! requests lead to (the engine's hub, a relay's backend) and the IO.
//!
//! A [`client::ClientSession`] is the mirror: it queues connect, createStream, publish and
//! play, answers the server's acknowledgement window and pings, and reports each message
//! it receives. Two sessions exchanging bytes in memory test the server's command
//! behaviour without sockets (`tests.rs`).

pub mod client;
pub mod command;
pub mod server;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use crate::amf::AmfLimits;

pub use client::{ClientConfig, ClientError, ClientEvent, ClientSession};
pub use server::{
    ConnectRequest, Poll, RequestId, ServerConfig, ServerError, ServerEvent, ServerSession,
    StreamRequest,
};

/// What one peer may make a session do: the protocol core's own limits, built from
/// `limits.*` by the caller (`From<&Limits>` in `src/limits.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Limits on each command's and data message's AMF payload.
    pub amf: AmfLimits,
    /// Longest app or stream name (before any `?query`).
    pub max_name_len: usize,
    /// Malformed messages tolerated before the session ends.
    pub max_protocol_errors: u32,
    /// Messages decoded per second (0: no limit); past it, decoding pauses.
    pub max_messages_per_sec: u32,
    /// Bytes of the session's own replies queued and not yet written, past which it
    /// decodes no more of the peer's messages until the application says they are written.
    pub max_reply_queue: usize,
}

impl Default for SessionLimits {
    /// The values `limits.rs` defaults to (a test there keeps the two equal).
    fn default() -> Self {
        SessionLimits {
            amf: AmfLimits::default(),
            max_name_len: 1024,
            max_protocol_errors: 10,
            max_messages_per_sec: 2_000,
            max_reply_queue: 64 * 1024,
        }
    }
}

/// A token bucket on the messages a peer sends: `rate` a second, one second's worth of
/// burst. The clock is the caller's.
#[derive(Debug)]
struct MessageRate {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl MessageRate {
    fn per_second(rate: u32, now: Instant) -> Self {
        MessageRate {
            rate,
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Ok when a message may be decoded now, else how long until one may.
    fn ready(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        let burst = f64::from(self.rate);
        self.tokens = (self.tokens + dt * burst).min(burst);
        if self.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / burst;
        Err(Duration::from_secs_f64(wait.max(0.001)))
    }

    /// One message decoded.
    fn spend(&mut self) {
        if self.rate > 0 {
            self.tokens -= 1.0;
        }
    }
}

/// The string at the front of an AMF0 payload (marker 0x02), and the bytes it takes.
pub fn leading_amf0_string(p: &[u8]) -> Option<(&str, usize)> {
    if *p.first()? != crate::amf0::marker::STRING {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*p.get(1)?, *p.get(2)?]));
    let end = 3usize.checked_add(len)?;
    let s = std::str::from_utf8(p.get(3..end)?).ok()?;
    Some((s, end))
}

/// Splits `raw` (an app or stream name as the client sent it) into the name and the query
/// after `?` (tokens, auth parameters), the name cleaned as [`command::clean_name`] does.
fn name_and_query(raw: &str, max_len: usize) -> Option<(String, String)> {
    let name = command::clean_name(raw, max_len)?;
    let query = raw.split_once('?').map_or("", |(_, q)| q).to_owned();
    Some((name, query))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod unit {
    use super::*;

    #[test]
    fn message_rate_pauses_then_refills() {
        let t0 = Instant::now();
        let mut r = MessageRate::per_second(2, t0);
        for _ in 0..2 {
            assert!(r.ready(t0).is_ok());
            r.spend();
        }
        let wait = r.ready(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(r.ready(t0 + Duration::from_millis(500)).is_ok());
        let mut off = MessageRate::per_second(0, t0);
        for _ in 0..10_000 {
            off.spend();
        }
        assert!(off.ready(t0).is_ok());
    }

    #[test]
    fn names_keep_their_query_apart() {
        assert_eq!(
            name_and_query("key?token=1&x=2", 64),
            Some(("key".into(), "token=1&x=2".into()))
        );
        assert_eq!(
            name_and_query("key", 64),
            Some(("key".into(), String::new()))
        );
        assert_eq!(name_and_query("?token=1", 64), None);
        assert_eq!(leading_amf0_string(&[2, 0, 1, b'a', 9]), Some(("a", 4)));
        assert_eq!(leading_amf0_string(&[2, 0, 5, b'a']), None);
    }
}
