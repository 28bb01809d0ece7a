//! Raw-socket attackers for the hostile-input, fault and soak tests: an RTMP client built on
//! the codec (handshake, chunk encoder) that can also send what no real client would, bound
//! to a chosen loopback source address so the gateway's log lines can be matched to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::chunk::{encode_fmt0_bytes, ChunkDecoder};
use rtmpgate::rtmp::handshake::{ClientHandshake, S0S1S2_LEN};
use rtmpgate::rtmp::message::{self, Message, UserControl};

/// A TCP connection from `src` (any 127.x.y.z address works on Linux loopback) to `addr`.
pub fn connect_from(src: Ipv4Addr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((src, 0)).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let tcp: TcpStream = sock.into();
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(tcp)
}

/// `rtmp PEER` as the gateway labels a session from this socket.
pub fn peer_label(tcp: &TcpStream) -> String {
    tcp.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// Completes a plain RTMP handshake as a client.
pub fn handshake(tcp: &mut TcpStream) -> std::io::Result<()> {
    let hs = ClientHandshake::new(false);
    tcp.write_all(&hs.c0c1())?;
    let mut s = vec![0u8; S0S1S2_LEN];
    read_exact_within(tcp, &mut s, Duration::from_secs(5))?;
    let c2 = hs
        .c2(&s)
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e.to_string()))?;
    tcp.write_all(&c2)
}

fn read_exact_within(tcp: &mut TcpStream, buf: &mut [u8], limit: Duration) -> std::io::Result<()> {
    let end = Instant::now() + limit;
    let mut got = 0;
    while got < buf.len() {
        match tcp.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() >= end {
                    return Err(ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One whole message as fmt 0 chunks at `chunk_size`.
pub fn chunked(csid: u32, msg: &Message, chunk_size: u32) -> Vec<u8> {
    encode_fmt0_bytes(csid, msg, chunk_size).to_vec()
}

/// A command message (type 20) on message stream `sid`.
pub fn command(sid: u32, name: &str, txn: f64, values: &[Amf0Value]) -> Message {
    message::command_message(sid, name, txn, values)
}

/// The connect command ffmpeg sends, for `app` at `addr`.
pub fn connect_msg(addr: SocketAddr, app: &str) -> Message {
    let obj = Amf0Value::Object(vec![
        ("app".into(), Amf0Value::String(app.into())),
        ("flashVer".into(), Amf0Value::String("FMLE/3.0".into())),
        (
            "tcUrl".into(),
            Amf0Value::String(format!("rtmp://{addr}/{app}")),
        ),
        ("fpad".into(), Amf0Value::Boolean(false)),
        ("capabilities".into(), Amf0Value::Number(15.0)),
        ("audioCodecs".into(), Amf0Value::Number(4071.0)),
        ("videoCodecs".into(), Amf0Value::Number(252.0)),
        ("videoFunction".into(), Amf0Value::Number(1.0)),
    ]);
    command(0, "connect", 1.0, &[obj])
}

/// Sends connect (app `live`, tcUrl at `addr`) and createStream on a connection past its
/// handshake, waiting up to `limit` for each `_result`: the client then owns stream id 1.
pub fn connect_and_create_stream(
    tcp: &mut TcpStream,
    inbox: &mut Inbox,
    addr: SocketAddr,
    limit: Duration,
) -> Result<(), String> {
    tcp.write_all(&chunked(3, &connect_msg(addr, "live"), 128))
        .map_err(|e| e.to_string())?;
    inbox
        .command(tcp, "_result", limit)
        .ok_or("connect not answered")?;
    tcp.write_all(&chunked(
        3,
        &command(0, "createStream", 2.0, &[Amf0Value::Null]),
        128,
    ))
    .map_err(|e| e.to_string())?;
    inbox
        .command(tcp, "_result", limit)
        .ok_or("createStream not answered")?;
    Ok(())
}

/// A raw client from `src` that handshakes, connects, creates stream 1 and publishes live/`key`,
/// waiting up to 5 s for each answer: the connection and its inbox, ready for media.
pub fn publishing_client(
    src: Ipv4Addr,
    addr: SocketAddr,
    key: &str,
) -> Result<(TcpStream, Inbox), String> {
    let mut tcp = connect_from(src, addr).map_err(|e| e.to_string())?;
    handshake(&mut tcp).map_err(|e| e.to_string())?;
    let mut inbox = Inbox::default();
    connect_and_create_stream(&mut tcp, &mut inbox, addr, Duration::from_secs(5))?;
    let publish = command(
        1,
        "publish",
        3.0,
        &[
            Amf0Value::Null,
            Amf0Value::string(key),
            Amf0Value::string("live"),
        ],
    );
    tcp.write_all(&chunked(3, &publish, 128))
        .map_err(|e| e.to_string())?;
    inbox
        .command(&mut tcp, "onStatus", Duration::from_secs(5))
        .ok_or("publish not answered")?;
    Ok((tcp, inbox))
}

/// A Ping Request (User Control 6) the server must answer with a Ping Response.
pub fn ping(t: u32) -> Vec<u8> {
    chunked(2, &UserControl::PingRequest(t).to_message(), 128)
}

/// Messages the server sent, decoded as they arrive.
pub struct Inbox {
    /// The decoder and the bytes not yet decoded: a caller that goes on reading the
    /// connection itself must carry on with these.
    pub dec: ChunkDecoder,
    pub buf: BytesMut,
    pub closed: bool,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            dec: ChunkDecoder::new(&Limits::default()),
            buf: BytesMut::new(),
            closed: false,
        }
    }
}

impl Inbox {
    /// Reads until `want` matches a message, the connection closes, or `limit` passes.
    pub fn wait_for(
        &mut self,
        tcp: &mut TcpStream,
        limit: Duration,
        mut want: impl FnMut(&Message) -> bool,
    ) -> Option<Message> {
        let end = Instant::now() + limit;
        let mut tmp = vec![0u8; 65536];
        loop {
            while let Ok(Some(m)) = self.dec.decode(&mut self.buf) {
                if want(&m) {
                    return Some(m);
                }
            }
            if self.closed {
                return None;
            }
            // Read at least once, even with no time left (a zero limit drains what is there).
            match tcp.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => self.closed = true,
            }
            if Instant::now() >= end {
                while let Ok(Some(m)) = self.dec.decode(&mut self.buf) {
                    if want(&m) {
                        return Some(m);
                    }
                }
                return None;
            }
        }
    }

    /// True if a Ping Response with `t` arrives within `limit` (the session is alive).
    pub fn pong(&mut self, tcp: &mut TcpStream, t: u32, limit: Duration) -> bool {
        self.pong_at(tcp, t, 128, limit)
    }

    /// Like `pong`, with the ping sent at the chunk size the client has set.
    pub fn pong_at(
        &mut self,
        tcp: &mut TcpStream,
        t: u32,
        chunk_size: u32,
        limit: Duration,
    ) -> bool {
        let ping = chunked(2, &UserControl::PingRequest(t).to_message(), chunk_size);
        if tcp.write_all(&ping).is_err() {
            return false;
        }
        self.wait_for(tcp, limit, |m| {
            m.msg_type == message::USER_CONTROL
                && matches!(UserControl::decode(&m.payload), Ok(UserControl::PingResponse(x)) if x == t)
        })
        .is_some()
    }

    /// The first command named `name` (e.g. "_result", "onStatus").
    pub fn command(&mut self, tcp: &mut TcpStream, name: &str, limit: Duration) -> Option<Message> {
        self.wait_for(tcp, limit, |m| {
            m.msg_type == message::COMMAND_AMF0
                && message::decode_command(m, &Default::default()).is_ok_and(|c| c.name == name)
        })
    }
}

/// Reads and discards until the peer closes (EOF or reset); true if it did within `limit`.
pub fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let step = limit.clamp(Duration::from_millis(1), Duration::from_millis(200));
    let _ = tcp.set_read_timeout(Some(step));
    let mut tmp = vec![0u8; 65536];
    loop {
        match tcp.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
        if Instant::now() >= end {
            return false;
        }
    }
}

/// The status [`http_raw`] reports when `limit` passed with the connection still open and no
/// reply head: a hang. No case accepts it (0 means the server closed without a reply).
pub const HUNG: u16 = 1;

/// A raw HTTP/1.x exchange: writes `request` and reads the reply head and what follows
/// until the connection closes or `limit` passes. Returns (status code, all bytes): 0 if the
/// server closed without a reply, [`HUNG`] if it neither answered nor closed in time.
pub fn http_raw(tcp: &mut TcpStream, request: &[u8], limit: Duration) -> (u16, Vec<u8>) {
    let _ = tcp.write_all(request);
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut tmp = vec![0u8; 65536];
    loop {
        if let Some(status) = complete_reply(&got) {
            return (status, got);
        }
        match tcp.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if Instant::now() >= end {
            // Still open: a whole reply head is an answer, anything less is a hang.
            if !got.windows(4).any(|w| w == b"\r\n\r\n") {
                return (HUNG, got);
            }
            break;
        }
    }
    (status_of(&got), got)
}

fn status_of(reply: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(reply);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The status once a whole reply (head and Content-Length bytes of body) is in.
fn complete_reply(got: &[u8]) -> Option<u16> {
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    (got.len() >= head_end + len).then(|| status_of(got))
}

/// The body of a complete reply.
pub fn http_body(reply: &[u8]) -> &[u8] {
    match reply.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &reply[i + 4..],
        None => &[],
    }
}

/// Sets a 64 KiB chunk size, then writes `frames` video frames of `frame_len` bytes (an AVC
/// keyframe first, then inter frames, so a GOP cache keeps them all) on message stream 1, 40 ms
/// apart; returns how many were written before the gateway closed the connection.
pub fn write_video_frames(tcp: &mut TcpStream, frames: usize, frame_len: usize) -> usize {
    const CS: u32 = 65_536;
    if tcp
        .write_all(&chunked(2, &message::set_chunk_size(CS), 128))
        .is_err()
    {
        return 0;
    }
    let mut sent = 0;
    for i in 0..frames {
        let mut body = vec![0u8; frame_len.max(2)];
        body[0] = if i == 0 { 0x17 } else { 0x27 };
        body[1] = 1;
        let msg = Message::new(message::VIDEO, i as u32 * 40, 1, body);
        if tcp.write_all(&chunked(6, &msg, CS)).is_err() {
            break;
        }
        sent += 1;
    }
    sent
}

/// A gauge or counter's value from the admin listener's `/metrics` (a line `NAME VALUE`).
pub fn admin_metric(admin: SocketAddr, name: &str) -> u64 {
    let mut tcp = TcpStream::connect(admin).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (status, reply) = http_raw(
        &mut tcp,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(status, 200, "/metrics: {}", String::from_utf8_lossy(&reply));
    let text = String::from_utf8_lossy(http_body(&reply)).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")) as u64
}

/// `POST path` with `body`, HTTP/1.1, as an RTMPT client sends it.
pub fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-fcs\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}
