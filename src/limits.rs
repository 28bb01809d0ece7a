//! Every limit rtmpgate enforces, in one place, with its default.
//!
//! A limit is checked before memory is allocated for anything a peer declared. The config
//! file's `[limits]` table maps onto this struct field by field.

use std::time::Duration;

use serde::Deserialize;

/// The longest duration any `*_secs` or `*_ms` setting may have (one year): deadlines are
/// computed as now + duration, which must not overflow the clock.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Seconds a new connection may take to send its first bytes (sniffing, TLS handshake).
    pub first_bytes_timeout_secs: u64,
    /// Seconds a client may take to finish the RTMP (or RTMPE) handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds without any byte from a client before its session is closed.
    pub idle_timeout_secs: u64,
    /// Seconds without a byte either way before a relayed (`--upstream`) session is closed;
    /// 0 turns it off. Longer than nginx-rtmp's 60 s ping, so a player waiting for a stream
    /// on the backend is kept.
    pub relay_idle_timeout_secs: u64,
    /// Connections accepted at once, over every listener.
    pub max_connections: usize,
    /// Connections accepted at once from one IP address (tunnel sessions count too).
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per network of this prefix length (64: one subscriber's
    /// /64 is one address for `max_connections_per_ip`; 128: each address apart).
    pub ipv6_prefix_len: u8,

    /// RTMPE (and RTMPTE) handshakes a second from one address (a token bucket with one
    /// second's worth as burst); each costs about 1 ms of CPU in Diffie-Hellman. 0: no limit.
    pub rtmpe_handshakes_per_ip_per_sec: u32,

    /// Largest chunk size a peer may set (RTMP allows up to 2^31-1; 16 MiB is plenty).
    pub max_chunk_size: u32,
    /// Smallest chunk size a peer may set. 128 (RTMP's initial size, SRS's floor): no real
    /// client goes below it, and smaller chunks multiply the per-chunk work a peer can cause
    /// per byte sent (Red5's chunk-size-1 CPU burn).
    pub min_chunk_size: u32,
    /// Largest RTMP message a peer may declare, in bytes.
    pub max_message_len: u32,
    /// Chunk streams one connection may have open at once.
    pub max_chunk_streams: usize,
    /// Bytes of partially received messages buffered per connection.
    pub max_partial_bytes: usize,
    /// Bytes a client of the connect-aware relay (`relay = "connect"`) may send before its
    /// `connect` is complete; they are held until a backend is chosen.
    pub max_connect_bytes: usize,
    /// AMF nesting depth (objects, arrays) accepted when decoding.
    pub max_amf_depth: usize,
    /// Entries in one AMF object or array.
    pub max_amf_entries: usize,
    /// Bytes in one AMF string.
    pub max_amf_string: usize,
    /// Bytes in an app name, stream name or tcUrl.
    pub max_name_len: usize,
    /// Malformed messages (undecodable commands, bad aggregates) one connection may send
    /// before it is closed; each costs a log line (rate-limited) and decoding work.
    pub max_protocol_errors: u32,
    /// RTMP messages a connection may send per second (burst: one second's worth); a peer
    /// past it is paused, not closed. Zero-length messages count. 0 turns it off. ffmpeg
    /// publishing 3 Mb/s 60 fps video with 48 kHz AAC sends about 110 a second.
    pub max_messages_per_sec: u32,
    /// Bytes of replies (command results, status messages, pongs) queued for one client;
    /// past it the engine decodes no more of the client's messages until they are written.
    pub max_reply_queue: usize,

    /// RTMPT sessions open at once.
    pub max_tunnel_sessions: usize,
    /// Server-to-client bytes buffered per tunnel session before the producer waits.
    pub max_tunnel_pending: usize,
    /// Largest HTTP request body accepted by the tunnel.
    pub max_http_body: usize,
    /// Largest HTTP request head (request line and headers).
    pub max_http_header: usize,
    /// Seconds a client may take to send a whole HTTP request head (slowloris guard).
    pub http_header_timeout_secs: u64,
    /// Seconds without any request before a tunnel session is reaped.
    pub tunnel_reap_secs: u64,
    /// Milliseconds an idle request with nothing to send is held (long-poll).
    pub tunnel_idle_hold_ms: u64,
    /// Tunnel request bodies held per session while an earlier sequence number is missing
    /// (also how far ahead of the next expected number a request may be).
    pub max_tunnel_reorder: usize,
    /// Bytes in those held bodies, per session (the body that fills the gap is always taken).
    pub max_tunnel_reorder_bytes: usize,
    /// Milliseconds a tunnel request waits for its turn in sequence order (or for the
    /// consumer to take its body) before it is answered anyway.
    pub tunnel_order_wait_ms: u64,

    /// Bytes the whole process may hold on behalf of peers (partial messages, tunnel buffers,
    /// fan-out rings, GOP caches); past it new allocations from peers are refused and the
    /// offending connection closed. 0: half of the machine's (or cgroup's) memory.
    pub max_memory: u64,
    /// Bytes of that budget one address group (IPv6 by `ipv6_prefix_len`) may hold through
    /// its connections; past it that address's new allocations are refused while others'
    /// carry on. 0: a quarter of the process's budget.
    pub max_memory_per_ip: u64,

    /// Authorization callbacks (`[auth] on_connect`, `on_publish`, ...) waiting for an
    /// answer at once; a request that finds none free within the callback timeout is denied.
    pub max_auth_callbacks: usize,
    /// Positive callback answers cached (`[auth] callback_cache_secs`); when full of fresh
    /// ones, new answers are not cached.
    pub max_auth_cache_entries: usize,
    /// Messages of one publisher queued for its origin in edge mode; a publisher whose
    /// origin takes them slower is closed (its bytes are charged to the budget meanwhile).
    pub max_edge_forward_queue: usize,
    /// Streams an edge pulls from origins at once (one origin connection each); a play
    /// past it waits for a publisher that never comes (logged). Each player connection
    /// plays one stream at a time, and a pull that never got media ends as soon as its
    /// stream has no player, so a client switching names cannot pile pulls up.
    pub max_edge_pulls: usize,
    /// Keyframes indexed in one recorded file (`[engine] record`); the next keyframe starts
    /// a new file. Bounds the index held per recording (16 bytes each) and the final
    /// onMetaData (18 bytes each; twice this many AMF values must stay under
    /// `max_amf_entries` for the file's metadata to be read back by this gateway).
    pub max_record_keyframes: usize,
    /// Largest FLV tag a VOD file (`[engine] vod_dir`) may declare; a larger one ends that
    /// play (NetStream.Play.Failed) before anything that size is read.
    pub max_vod_tag_bytes: usize,
    /// Entries of a VOD file's `onMetaData` keyframe index used for seeking (the rest are
    /// ignored; a seek past them scans the file's tags instead).
    pub max_vod_index_entries: usize,
    /// Restream destinations the admin API may add (`POST /api/v1/restream`), each one
    /// connection per publish of its stream; past it an add is refused until one is removed.
    pub max_api_pushes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_bytes_timeout_secs: 10,
            handshake_timeout_secs: 10,
            idle_timeout_secs: 60,
            relay_idle_timeout_secs: 180,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            ipv6_prefix_len: 64,
            rtmpe_handshakes_per_ip_per_sec: 20,
            max_chunk_size: 16 * 1024 * 1024,
            min_chunk_size: 128,
            max_message_len: 16 * 1024 * 1024,
            max_chunk_streams: 64,
            max_partial_bytes: 32 * 1024 * 1024,
            max_connect_bytes: 64 * 1024,
            max_amf_depth: 64,
            max_amf_entries: 65_536,
            max_amf_string: 1024 * 1024,
            max_name_len: 1024,
            max_protocol_errors: 10,
            max_messages_per_sec: 2_000,
            max_reply_queue: 64 * 1024,
            max_tunnel_sessions: 10_000,
            max_tunnel_pending: 1024 * 1024,
            max_http_body: 4 * 1024 * 1024,
            max_http_header: 16 * 1024,
            http_header_timeout_secs: 10,
            tunnel_reap_secs: 60,
            tunnel_idle_hold_ms: 150,
            max_tunnel_reorder: 32,
            max_tunnel_reorder_bytes: 256 * 1024,
            tunnel_order_wait_ms: 5_000,
            max_memory: 0,
            max_memory_per_ip: 0,
            max_auth_callbacks: 64,
            max_auth_cache_entries: 4096,
            max_edge_forward_queue: 1024,
            max_edge_pulls: 1000,
            max_record_keyframes: 20_000,
            max_vod_tag_bytes: 8 * 1024 * 1024,
            max_vod_index_entries: 100_000,
            max_api_pushes: 64,
        }
    }
}

impl Limits {
    pub fn first_bytes_timeout(&self) -> Duration {
        Duration::from_secs(self.first_bytes_timeout_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// None when the relay idle timeout is off.
    pub fn relay_idle_timeout(&self) -> Option<Duration> {
        (self.relay_idle_timeout_secs > 0)
            .then(|| Duration::from_secs(self.relay_idle_timeout_secs))
    }
    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_secs(self.http_header_timeout_secs)
    }
    pub fn tunnel_reap(&self) -> Duration {
        Duration::from_secs(self.tunnel_reap_secs)
    }
    pub fn tunnel_idle_hold(&self) -> Duration {
        Duration::from_millis(self.tunnel_idle_hold_ms)
    }
    pub fn tunnel_order_wait(&self) -> Duration {
        Duration::from_millis(self.tunnel_order_wait_ms)
    }
    /// The process-wide memory budget in bytes (`max_memory`, or the machine's default).
    pub fn memory_budget(&self) -> usize {
        match self.max_memory {
            0 => crate::budget::default_limit(),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        }
    }
    /// One address group's share of the budget (`max_memory_per_ip`, or a quarter of
    /// `process_budget`), never more than the process's budget itself.
    pub fn memory_budget_per_ip(&self, process_budget: usize) -> usize {
        match self.max_memory_per_ip {
            0 => crate::budget::default_per_address_limit(process_budget),
            n => usize::try_from(n).unwrap_or(usize::MAX).min(process_budget),
        }
    }
}

/// The protocol core's own limit types (`src/rtmp` does not see this file), built here.
impl From<&Limits> for crate::rtmp::amf::AmfLimits {
    fn from(l: &Limits) -> Self {
        crate::rtmp::amf::AmfLimits {
            max_depth: l.max_amf_depth.min(crate::rtmp::amf::HARD_MAX_DEPTH),
            max_entries: l.max_amf_entries,
            max_string: l.max_amf_string,
            max_total: (l.max_message_len as usize).max(l.max_amf_string),
        }
    }
}

impl From<&Limits> for crate::rtmp::chunk::ChunkLimits {
    fn from(l: &Limits) -> Self {
        crate::rtmp::chunk::ChunkLimits {
            min_chunk_size: l.min_chunk_size,
            max_chunk_size: l.max_chunk_size,
            max_message_len: l.max_message_len,
            max_chunk_streams: l.max_chunk_streams,
            max_partial_bytes: l.max_partial_bytes,
        }
    }
}

impl From<&Limits> for crate::rtmp::session::SessionLimits {
    fn from(l: &Limits) -> Self {
        crate::rtmp::session::SessionLimits {
            amf: l.into(),
            max_name_len: l.max_name_len,
            max_protocol_errors: l.max_protocol_errors,
            max_messages_per_sec: l.max_messages_per_sec,
            max_reply_queue: l.max_reply_queue,
        }
    }
}

#[cfg(test)]
mod protocol_limit_tests {
    use super::Limits;

    #[test]
    fn the_protocol_cores_defaults_match_the_limits_defaults() {
        let l = Limits::default();
        assert_eq!(
            crate::rtmp::amf::AmfLimits::default(),
            crate::rtmp::amf::AmfLimits::from(&l)
        );
        assert_eq!(
            crate::rtmp::chunk::ChunkLimits::default(),
            crate::rtmp::chunk::ChunkLimits::from(&l)
        );
        assert_eq!(
            crate::rtmp::session::SessionLimits::default(),
            crate::rtmp::session::SessionLimits::from(&l)
        );
    }
}
