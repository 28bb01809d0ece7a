//! Hostile input against a running rtmpgate with its built-in engine: each known bug class
//! of RTMP servers (nginx-rtmp, Red5, SRS, xiu, flvmeta...) sent as raw bytes over TCP, TLS
//! and HTTP while a healthy ffmpeg publish and two players run alongside. For each case the
//! offender is refused or dropped with a log line naming it, nothing panics, the healthy
//! players receive one contiguous run of the source, and the gateway's fds and threads come
//! back to where they were.
//!
//! Every case runs from its own loopback source address (127.0.0.x), so the gateway's
//! session lines can be matched to the attacker by `IP:PORT`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::message::{self, Message};

/// Limits of the gateway under attack: short timeouts, so the waiting cases end quickly.
const LIMITS: &str = "[limits]\n\
    first_bytes_timeout_secs = 3\n\
    handshake_timeout_secs = 2\n\
    idle_timeout_secs = 4\n\
    http_header_timeout_secs = 2\n\
    tunnel_reap_secs = 2\n\
    max_connections_per_ip = 20\n";
const HANDSHAKE_SECS: u64 = 2;
const IDLE_SECS: u64 = 4;
const PER_IP: usize = 20;

/// What one case found: Ok(how the gateway dealt with it) or Err(what went wrong).
type Outcome = Result<String, String>;

struct Target {
    gw: Arc<Gateway>,
    rtmp: SocketAddr,
    rtmps: SocketAddr,
}

impl Target {
    /// Log lines mentioning this peer (`IP:PORT`).
    fn lines_for(&self, peer: &str) -> Vec<String> {
        self.gw
            .log()
            .lines()
            // The whole address: "127.0.0.5:4321" must not match a line for port 43210.
            .filter(|l| {
                l.match_indices(peer).any(|(i, _)| {
                    !l[i + peer.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit())
                })
            })
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the engine's close line for this peer; returns it.
    fn close_line(&self, peer: &str, limit: Duration) -> Option<String> {
        let found = wait_until(limit, || {
            self.lines_for(peer)
                .iter()
                .any(|l| l.contains("session close"))
        });
        found.then(|| {
            self.lines_for(peer)
                .into_iter()
                .find(|l| l.contains("session close"))
                .unwrap_or_default()
        })
    }

    /// A connection from `src` that has finished the RTMP handshake.
    fn rtmp_client(&self, src: Ipv4Addr) -> Result<(TcpStream, String), String> {
        let mut tcp = connect_from(src, self.rtmp).map_err(|e| format!("connect: {e}"))?;
        handshake(&mut tcp).map_err(|e| format!("handshake: {e}"))?;
        let peer = peer_label(&tcp);
        Ok((tcp, peer))
    }

    /// The peer was dropped: its socket closes within `limit` and the engine logs why.
    fn expect_dropped(&self, tcp: &mut TcpStream, peer: &str, limit: Duration) -> Outcome {
        if !closed_within(tcp, limit) {
            return Err(format!("{peer} still connected after {limit:?}"));
        }
        match self.close_line(peer, Duration::from_secs(3)) {
            Some(l) => Ok(format!("dropped: {}", tail(&l))),
            None => Err(format!(
                "{peer} was closed but no session close line names it; lines: {:?}",
                self.lines_for(peer)
            )),
        }
    }

    /// Either dropped with a log line, or refused (a log line names the peer) and still
    /// answering pings, in which case we hang up and the close line must follow.
    fn expect_refused_or_dropped(&self, tcp: &mut TcpStream, peer: &str, what: &str) -> Outcome {
        let mut inbox = Inbox::default();
        if inbox.pong(tcp, 7, Duration::from_secs(5)) {
            let said = wait_until(Duration::from_secs(2), || {
                self.lines_for(peer)
                    .iter()
                    .any(|l| l.contains(what) || l.contains("WARN"))
            });
            let lines = self.lines_for(peer);
            let _ = tcp.shutdown(std::net::Shutdown::Both);
            if self.close_line(peer, Duration::from_secs(3)).is_none() {
                return Err(format!("no close line for {peer} after we hung up"));
            }
            return if said {
                let l = lines
                    .iter()
                    .find(|l| l.contains(what) || l.contains("WARN"))
                    .cloned()
                    .unwrap_or_default();
                Ok(format!("refused, session kept: {}", tail(&l)))
            } else {
                Err(format!(
                    "accepted without a word (no `{what}` or warning for {peer}): {lines:?}"
                ))
            };
        }
        self.expect_dropped(tcp, peer, Duration::from_secs(3))
    }
}

/// The end of a log line (after the level and target), for the report.
fn tail(line: &str) -> String {
    let s = line.split_once("rtmpgate").map_or(line, |(_, r)| r);
    s.chars().take(220).collect()
}

fn from_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

// ---------------------------------------------------------------------------------------------
// RTMP cases (each needs the engine: the chunk stream and AMF are parsed there)
// ---------------------------------------------------------------------------------------------

/// nginx-rtmp's 2021 overrun: Set Chunk Size arrives while a message is half received on
/// another chunk stream. The rest must be read with the new size, and the connect answered.
fn chunk_size_change_mid_message(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let connect = connect_msg(t.rtmp, "live");
    let wire = chunked(3, &connect, 4096);
    let payload = &connect.payload;
    // First chunk at 128 bytes: the 12-byte fmt 0 header and 128 payload bytes.
    let first = 12 + 128.min(payload.len());
    let mut bytes = wire[..first].to_vec();
    bytes.extend(chunked(2, &message::set_chunk_size(4096), 128));
    if payload.len() > 128 {
        bytes.push(0xC3); // fmt 3, csid 3: the rest in one chunk at the new size
        bytes.extend_from_slice(&payload[128..]);
    }
    tcp.write_all(&bytes).map_err(|e| e.to_string())?;
    let mut inbox = Inbox::default();
    if inbox
        .command(&mut tcp, "_result", Duration::from_secs(5))
        .is_none()
    {
        return Err(format!(
            "no _result to a connect split across a chunk size change ({peer})"
        ));
    }
    if !inbox.pong(&mut tcp, 1, Duration::from_secs(3)) {
        return Err("no ping response afterwards".into());
    }
    Ok(format!(
        "connect answered, session alive (payload {} B)",
        payload.len()
    ))
}

/// nginx-rtmp's truncated-AMF crash: a real connect cut at every byte position, as the last
/// bytes before the client hangs up; and as a whole message whose AMF is cut (declared length
/// = cut length), followed by a good connect that must still be answered.
fn truncated_connect(t: &Target, ip: Ipv4Addr) -> Outcome {
    let connect = connect_msg(t.rtmp, "live");
    let wire = chunked(3, &connect, 128);
    for k in 0..wire.len() {
        let (mut tcp, peer) = t.rtmp_client(ip)?;
        tcp.write_all(&wire[..k]).map_err(|e| e.to_string())?;
        let _ = tcp.shutdown(std::net::Shutdown::Write);
        if !closed_within(&mut tcp, Duration::from_secs(3)) {
            return Err(format!("cut at byte {k}: {peer} not closed after our EOF"));
        }
    }
    let payload = connect.payload.clone();
    let mut refused = 0;
    for k in 1..payload.len() {
        let (mut tcp, peer) = t.rtmp_client(ip)?;
        let cut = Message::new(message::COMMAND_AMF0, 0, 0, payload.slice(..k));
        let mut bytes = chunked(3, &cut, 128);
        bytes.extend(chunked(3, &connect, 128));
        tcp.write_all(&bytes).map_err(|e| e.to_string())?;
        let mut inbox = Inbox::default();
        let answered = inbox
            .command(&mut tcp, "_result", Duration::from_secs(3))
            .is_some();
        if !answered && !inbox.closed {
            return Err(format!(
                "AMF cut at {k}: {peer} neither answered nor closed"
            ));
        }
        if !answered {
            refused += 1;
        }
    }
    Ok(format!(
        "{} transport cuts closed; {} AMF cuts: every later connect answered or the peer closed ({refused} closed)",
        wire.len(),
        payload.len() - 1
    ))
}

/// flvmeta's crash: 70,000 nested strict arrays in an AMF0 command.
fn nested_amf0(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let mut p = message::command_payload("connect", 1.0, &[]).to_vec();
    for _ in 0..70_000 {
        p.extend_from_slice(&[0x0A, 0, 0, 0, 1]);
    }
    p.push(0x05);
    let msg = Message::new(message::COMMAND_AMF0, 0, 0, p);
    tcp.write_all(&chunked(3, &msg, 128))
        .map_err(|e| e.to_string())?;
    t.expect_refused_or_dropped(&mut tcp, &peer, "nest")
}

/// The same in AMF3, inside a type-17 command (0x11 switches the value to AMF3).
fn nested_amf3(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let mut p = vec![0u8];
    p.extend_from_slice(&message::command_payload("connect", 1.0, &[]));
    p.push(0x11);
    for _ in 0..70_000 {
        // Array marker, U29 (1 dense element << 1 | 1), empty associative part.
        p.extend_from_slice(&[0x09, 0x03, 0x01]);
    }
    p.push(0x01);
    let msg = Message::new(message::COMMAND_AMF3, 0, 0, p);
    tcp.write_all(&chunked(3, &msg, 128))
        .map_err(|e| e.to_string())?;
    t.expect_refused_or_dropped(&mut tcp, &peer, "nest")
}

/// AMF3 references (string, object, trait) to indices never defined.
fn amf3_unknown_references(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    for (what, bytes) in [
        ("string ref", &[0x06u8, 0x0A][..]),
        ("object ref", &[0x0A, 0x0A][..]),
        ("trait ref", &[0x0A, 0x0D][..]),
        ("array ref", &[0x09, 0x7E][..]),
    ] {
        let (mut tcp, peer) = t.rtmp_client(ip)?;
        let mut p = vec![0u8];
        p.extend_from_slice(&message::command_payload("connect", 1.0, &[]));
        p.push(0x11);
        p.extend_from_slice(bytes);
        let msg = Message::new(message::COMMAND_AMF3, 0, 0, p);
        tcp.write_all(&chunked(3, &msg, 128))
            .map_err(|e| e.to_string())?;
        found.push(format!(
            "{what}: {}",
            t.expect_refused_or_dropped(&mut tcp, &peer, "command")?
        ));
    }
    Ok(found.join("; "))
}

/// The stack overflow of nginx-rtmp's fork: a 1 MB stream name in publish.
fn huge_stream_name(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let mut inbox = Inbox::default();
    connect_and_create_stream(&mut tcp, &mut inbox, t.rtmp, Duration::from_secs(5))?;
    let name = "n".repeat(1_000_000);
    let publish = command(
        1,
        "publish",
        3.0,
        &[
            Amf0Value::Null,
            Amf0Value::LongString(name),
            Amf0Value::String("live".into()),
        ],
    );
    tcp.write_all(&chunked(8, &publish, 128))
        .map_err(|e| e.to_string())?;
    match inbox.command(&mut tcp, "onStatus", Duration::from_secs(5)) {
        Some(m) => {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let code = ["BadName", "Rejected", "Failed"]
                .into_iter()
                .find(|c| text.contains(c));
            match code {
                Some(c) if !text.contains("Publish.Start") => {
                    let _ = tcp.shutdown(std::net::Shutdown::Both);
                    t.close_line(&peer, Duration::from_secs(3))
                        .ok_or("no close line")?;
                    Ok(format!("refused with onStatus ...{c}"))
                }
                _ => Err(format!("publish with a 1 MB name got {text:.120}")),
            }
        }
        None if inbox.closed => match t.close_line(&peer, Duration::from_secs(3)) {
            Some(l) => Ok(format!("dropped: {}", tail(&l))),
            None => Err("closed without a log line".into()),
        },
        None => Err("publish with a 1 MB name neither answered nor dropped".into()),
    }
}

/// Red5's pre-allocation: 16 MiB messages declared on ten chunk streams and never sent. RSS
/// must not grow by anything like 160 MiB; the idle timeout ends the connection.
fn declared_never_sent(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let before = t.gw.rss_kb();
    for csid in 3..13u8 {
        // fmt 0, length 0xFFFFFF, type 9, stream 1, then the first 128 bytes of the body.
        // One whole first chunk (128 bytes), so the next header is read as a header.
        let mut h = vec![csid, 0, 0, 0, 0xFF, 0xFF, 0xFF, 9, 1, 0, 0, 0];
        h.extend_from_slice(&[0x17; 128]);
        tcp.write_all(&h).map_err(|e| e.to_string())?;
    }
    thread::sleep(Duration::from_millis(700));
    let after = t.gw.rss_kb();
    let grew = after.saturating_sub(before);
    // One such message allocated up front would be 16 MiB; ten, 160 MiB.
    if grew > 16 * 1024 {
        return Err(format!(
            "RSS grew {grew} kB after 10 x 16 MiB declared ({before} -> {after} kB)"
        ));
    }
    let dropped = t.expect_dropped(&mut tcp, &peer, Duration::from_secs(IDLE_SECS + 4))?;
    Ok(format!("RSS +{grew} kB for 160 MiB declared; {dropped}"))
}

/// xiu's asserts: fmt 1, 2 and 3 chunks on a chunk stream never opened with fmt 0.
fn fmt123_never_opened(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    for (fmt, bytes) in [
        (1, vec![0x45u8, 0, 0, 10, 0, 0, 4, 8, 1, 2, 3, 4]),
        (2, vec![0x85, 0, 0, 10, 1, 2, 3, 4]),
        (3, vec![0xC5, 1, 2, 3, 4]),
    ] {
        let (mut tcp, peer) = t.rtmp_client(ip)?;
        tcp.write_all(&bytes).map_err(|e| e.to_string())?;
        let r = t.expect_dropped(&mut tcp, &peer, Duration::from_secs(3))?;
        found.push(format!("fmt {fmt}: {r}"));
    }
    Ok(found.join("; "))
}

/// xiu's integer underflow/overflow: timestamp deltas that wrap u32 many times over, with
/// extended timestamps, on fmt 1, 2 and 3 chunks.
fn overflowing_deltas(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let mut b = Vec::new();
    // fmt 0 on csid 4: timestamp 0xFFFFFF -> extended 0xFFFFFFFF, audio, 2 bytes.
    b.extend_from_slice(&[0x04, 0xFF, 0xFF, 0xFF, 0, 0, 2, 8, 1, 0, 0, 0]);
    b.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xAF, 0x01]);
    for _ in 0..50 {
        // fmt 1: delta 0xFFFFFF -> extended 0xFFFFFFFF.
        b.extend_from_slice(&[0x44, 0xFF, 0xFF, 0xFF, 0, 0, 2, 8]);
        b.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xAF, 0x01]);
        // fmt 2: same delta again.
        b.extend_from_slice(&[0x84, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xAF, 0x01]);
        // fmt 3: a new message reusing the delta (and its extended field).
        b.extend_from_slice(&[0xC4, 0xFF, 0xFF, 0xFF, 0xFF, 0xAF, 0x01]);
    }
    tcp.write_all(&b).map_err(|e| e.to_string())?;
    let mut inbox = Inbox::default();
    if inbox.pong(&mut tcp, 2, Duration::from_secs(5)) {
        return Ok("wrapping deltas accepted (modulo 2^32), session alive".into());
    }
    t.expect_dropped(&mut tcp, &peer, Duration::from_secs(2))
}

/// Extended timestamp 0xFFFFFF with continuation chunks that do and do not repeat it.
fn extended_timestamp_continuations(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    for repeat in [true, false] {
        let (mut tcp, peer) = t.rtmp_client(ip)?;
        let body = vec![0x5Au8; 300];
        let mut b = vec![0x05, 0xFF, 0xFF, 0xFF, 0, 1, 44, 18, 0, 0, 0, 0];
        b.extend_from_slice(&[0x01, 0x00, 0x00, 0x00]);
        for (i, part) in body.chunks(128).enumerate() {
            if i > 0 {
                b.push(0xC5);
                if repeat {
                    b.extend_from_slice(&[0x01, 0x00, 0x00, 0x00]);
                }
            }
            b.extend_from_slice(part);
        }
        tcp.write_all(&b).map_err(|e| e.to_string())?;
        let mut inbox = Inbox::default();
        let r = if inbox.pong(&mut tcp, 3, Duration::from_secs(5)) {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
            "session alive".to_string()
        } else {
            t.expect_dropped(&mut tcp, &peer, Duration::from_secs(2))?
        };
        found.push(format!(
            "{}: {r}",
            if repeat { "repeated" } else { "omitted" }
        ));
    }
    Ok(found.join("; "))
}

/// csid 65599 (the largest, 3-byte basic header) is legal and must work; 65 distinct chunk
/// streams exceed limits.max_chunk_streams (64) and drop the peer.
fn csid_65599_and_too_many(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    let ping = rtmpgate::rtmp::message::UserControl::PingRequest(99).to_message();
    let on_max = chunked(65599, &ping, 128);
    if on_max.first().map(|b| b & 0x3F) != Some(1) {
        return Err(format!(
            "encoder did not use a 3-byte header: {:02x?}",
            &on_max[..3]
        ));
    }
    tcp.write_all(&on_max).map_err(|e| e.to_string())?;
    let mut inbox = Inbox::default();
    let answered = inbox
        .wait_for(&mut tcp, Duration::from_secs(5), |m| {
            m.msg_type == message::USER_CONTROL
                && matches!(
                    message::UserControl::decode(&m.payload),
                    Ok(message::UserControl::PingResponse(99))
                )
        })
        .is_some();
    if !answered {
        return Err(format!("ping on csid 65599 not answered ({peer})"));
    }
    let mut b = Vec::new();
    for csid in 300..400u32 {
        b.extend(chunked(csid, &ping, 128));
    }
    let _ = tcp.write_all(&b);
    let r = t.expect_dropped(&mut tcp, &peer, Duration::from_secs(3))?;
    if !r.contains("chunk stream") {
        return Err(format!("dropped, but not for the chunk stream limit: {r}"));
    }
    Ok(format!("csid 65599 answered; 100 csids: {r}"))
}

/// Red5's CPU burn: chunk size 1 and a 1 MiB message (2 MiB on the wire). With the default
/// `min_chunk_size` (128) the peer is dropped at its Set Chunk Size; with a lower floor the
/// gateway's CPU time stays bounded (linear in bytes, small constant). Either passes.
fn chunk_size_one(t: &Target, ip: Ipv4Addr) -> Outcome {
    let (mut tcp, peer) = t.rtmp_client(ip)?;
    tcp.write_all(&chunked(2, &message::set_chunk_size(1), 128))
        .map_err(|e| e.to_string())?;
    let data = Message::new(message::DATA_AMF0, 0, 1, vec![0x05u8; 1 << 20]);
    let wire = chunked(6, &data, 1);
    let before = cpu_ticks(t.gw.pid());
    let started = Instant::now();
    if let Err(e) = tcp.write_all(&wire) {
        // Refused at the Set Chunk Size: the gateway closed while we were still sending.
        let how = t.expect_dropped(&mut tcp, &peer, Duration::from_secs(2))?;
        return Ok(format!("chunk size 1 refused ({e} while sending); {how}"));
    }
    let mut inbox = Inbox::default();
    let alive = inbox.pong_at(&mut tcp, 4, 1, Duration::from_secs(30));
    let ticks = cpu_ticks(t.gw.pid()).saturating_sub(before);
    let secs = started.elapsed().as_secs_f64();
    // Includes the healthy session's work meanwhile; a debug build.
    if ticks > 800 {
        return Err(format!(
            "{} B at chunk size 1 cost the gateway {:.2} s of CPU",
            wire.len(),
            ticks as f64 / 100.0
        ));
    }
    let how = if alive {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
        "session alive".to_string()
    } else {
        t.expect_dropped(&mut tcp, &peer, Duration::from_secs(2))?
    };
    Ok(format!(
        "{} B in 1-byte chunks: {:.2} s CPU over {secs:.1} s wall (whole gateway); {how}",
        wire.len(),
        ticks as f64 / 100.0
    ))
}

/// C0 only, then silence: dropped at the handshake timeout with a line saying so.
fn c0_then_silence(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut tcp = connect_from(ip, t.rtmp).map_err(|e| e.to_string())?;
    let peer = peer_label(&tcp);
    tcp.write_all(&[3]).map_err(|e| e.to_string())?;
    let started = Instant::now();
    if !closed_within(&mut tcp, Duration::from_secs(HANDSHAKE_SECS + 5)) {
        return Err("C0-only peer not dropped".into());
    }
    let took = started.elapsed().as_secs_f64();
    let line = wait_until(Duration::from_secs(3), || {
        t.lines_for(&peer)
            .iter()
            .any(|l| l.contains("handshake") || l.contains("first bytes") || l.contains("within"))
    });
    if !line {
        return Err(format!(
            "no log line about {peer}: {:?}",
            t.lines_for(&peer)
        ));
    }
    let l = t
        .lines_for(&peer)
        .into_iter()
        .find(|l| l.contains("handshake") || l.contains("within"))
        .unwrap_or_default();
    Ok(format!("dropped after {took:.1} s: {}", tail(&l)))
}

/// RTMPE (C0 = 0x06): silence after C0, and a C1 of garbage with no digest to find. Each is
/// dropped (at the handshake timeout at the latest) with a line naming the peer.
fn rtmpe_silence_and_garbage(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    for (what, bytes) in [
        ("C0 only", vec![6u8]),
        (
            "C0 + garbage C1",
            std::iter::once(6u8)
                .chain((0..1536u32).map(|i| (i * 31 % 253) as u8))
                .collect(),
        ),
    ] {
        let mut tcp = connect_from(ip, t.rtmp).map_err(|e| e.to_string())?;
        let peer = peer_label(&tcp);
        tcp.write_all(&bytes).map_err(|e| e.to_string())?;
        let started = Instant::now();
        if !closed_within(&mut tcp, Duration::from_secs(HANDSHAKE_SECS + 5)) {
            return Err(format!("RTMPE {what}: {peer} not dropped"));
        }
        let took = started.elapsed().as_secs_f64();
        if !wait_until(Duration::from_secs(3), || !t.lines_for(&peer).is_empty()) {
            return Err(format!("RTMPE {what}: no log line names {peer}"));
        }
        let line = t.lines_for(&peer).pop().unwrap_or_default();
        found.push(format!(
            "{what}: dropped after {took:.1} s: {}",
            tail(&line)
        ));
    }
    Ok(found.join("; "))
}

/// More connections from one address than limits.max_connections_per_ip: the extra ones are
/// refused at once with a line naming the limit; another address is still served.
fn too_many_from_one_ip(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut conns = Vec::new();
    for _ in 0..PER_IP + 5 {
        conns.push(connect_from(ip, t.rtmp).map_err(|e| e.to_string())?);
        // Let the gateway count each one before the next (it admits in accept order).
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));
    let refused = conns
        .iter_mut()
        .map(|c| closed_within(c, Duration::from_millis(50)))
        .filter(|closed| *closed)
        .count();
    let line =
        t.gw.log()
            .lines()
            .any(|l| l.contains(&ip.to_string()) && l.contains("max_connections_per_ip"));
    drop(conns);
    if refused != 5 {
        return Err(format!(
            "{refused} of {} connections refused, expected 5",
            PER_IP + 5
        ));
    }
    if !line {
        return Err("no log line naming limits.max_connections_per_ip".into());
    }
    // Slots come back once they close.
    let mut again = Vec::new();
    thread::sleep(Duration::from_millis(300));
    for _ in 0..PER_IP {
        again.push(connect_from(ip, t.rtmp).map_err(|e| e.to_string())?);
    }
    thread::sleep(Duration::from_millis(300));
    let refused_again = again
        .iter_mut()
        .map(|c| closed_within(c, Duration::from_millis(50)))
        .filter(|closed| *closed)
        .count();
    if refused_again != 0 {
        return Err(format!(
            "{refused_again} refused after the first batch closed: slots leaked"
        ));
    }
    Ok(format!(
        "5 of {} refused with a line naming the limit; slots released on close",
        PER_IP + 5
    ))
}

// ---------------------------------------------------------------------------------------------
// TLS and HTTP (the door and the RTMPT tunnel)
// ---------------------------------------------------------------------------------------------

/// A real TLS ClientHello (from rustls), then garbage: the TLS listener drops the peer.
fn garbage_after_client_hello(t: &Target, ip: Ipv4Addr) -> Outcome {
    let roots = rustls::RootCertStore::empty();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).map_err(|e| e.to_string())?;
    let mut tcp = connect_from(ip, t.rtmps).map_err(|e| e.to_string())?;
    let peer = peer_label(&tcp);
    tcp.write_all(&hello).map_err(|e| e.to_string())?;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = tcp.write_all(&garbage);
    if !closed_within(&mut tcp, Duration::from_secs(5)) {
        return Err("TLS peer sending garbage after its ClientHello not dropped".into());
    }
    let ok = wait_until(Duration::from_secs(3), || !t.lines_for(&peer).is_empty());
    if !ok {
        return Err(format!("no log line names {peer}"));
    }
    Ok(format!("dropped: {}", tail(&t.lines_for(&peer)[0])))
}

/// TLS 1.0 and 1.1 are refused; 1.2 and 1.3 are accepted (openssl s_client, with the
/// security level lowered so it offers the old versions at all).
fn old_tls_versions_refused(t: &Target, _ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    for (flag, want_ok) in [
        ("-tls1", false),
        ("-tls1_1", false),
        ("-tls1_2", true),
        ("-tls1_3", true),
    ] {
        let mut cmd = std::process::Command::new(&peers().openssl);
        cmd.args(["s_client", "-connect", &t.rtmps.to_string(), flag])
            .args(["-cipher", "DEFAULT:@SECLEVEL=0"]);
        let (_, out, err) = run_capture(&mut cmd, Duration::from_secs(10));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        let negotiated = text.contains("New, TLSv1.");
        if negotiated != want_ok {
            return Err(format!(
                "openssl s_client {flag}: negotiated={negotiated}, expected {want_ok}: {}",
                text.lines()
                    .filter(|l| l.contains("New,") || l.contains("error"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        found.push(format!(
            "{flag}: {}",
            if negotiated { "accepted" } else { "refused" }
        ));
    }
    Ok(found.join("; "))
}

/// RTMPT requests no client should send. Each gets an HTTP error (or the connection is
/// closed) promptly; none hangs.
fn rtmpt_cases(t: &Target, ip: Ipv4Addr) -> Outcome {
    let mut found = Vec::new();
    let fresh = || connect_from(ip, t.rtmp).map_err(|e| e.to_string());
    let expect = |found: &mut Vec<String>,
                  what: &str,
                  (status, reply): (u16, Vec<u8>),
                  ok: &[u16]|
     -> Result<(), String> {
        if ok.contains(&status) {
            found.push(format!("{what}: {status}"));
            Ok(())
        } else {
            Err(format!(
                "{what}: got {status} ({:?}), expected one of {ok:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(200)])
            ))
        }
    };
    let limit = Duration::from_secs(8);

    let mut c = fresh()?;
    let r = http_raw(
        &mut c,
        &post("/send/0123456789abcdef0123456789abcdef/1", b"x"),
        limit,
    );
    expect(&mut found, "unknown session", r, &[404])?;

    // A real session: open, then sequence numbers repeated and far ahead.
    let mut c = fresh()?;
    let (status, reply) = http_raw(&mut c, &post("/open/1", b"\0"), limit);
    if status != 200 {
        return Err(format!("/open/1 answered {status}"));
    }
    let id = String::from_utf8_lossy(http_body(&reply))
        .trim()
        .to_string();
    let hs = rtmpgate::rtmp::handshake::ClientHandshake::new(false);
    let r = http_raw(&mut c, &post(&format!("/send/{id}/1"), &hs.c0c1()), limit);
    expect(&mut found, "send seq 1", r, &[200])?;
    let r = http_raw(&mut c, &post(&format!("/send/{id}/1"), &hs.c0c1()), limit);
    expect(&mut found, "seq 1 repeated", r, &[200, 400, 409])?;
    let r = http_raw(&mut c, &post(&format!("/send/{id}/1000"), b"junk"), limit);
    expect(&mut found, "seq 1000 (skipped ahead)", r, &[400, 404])?;
    let r = http_raw(&mut c, &post(&format!("/idle/{id}/2"), b""), limit);
    expect(&mut found, "idle after the bad ones", r, &[200, 400, 404])?;
    let _ = http_raw(&mut c, &post(&format!("/close/{id}/3"), b""), limit);
    // Tunnel ids are bearer tokens: never logged in full at info level.
    if id.len() < 32 || t.gw.log().contains(&id) {
        return Err(format!("session id {id:?} is short or logged in full"));
    }
    found.push("session id not in the log".into());

    // A huge body, declared: refused before it is read.
    let mut c = fresh()?;
    let head = "POST /open/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n";
    let r = http_raw(&mut c, head.as_bytes(), limit);
    expect(&mut found, "1 GB Content-Length", r, &[413])?;
    // A huge body, chunked (no length up front): cut off at the limit.
    let mut c = fresh()?;
    let head = "POST /open/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let _ = c.write_all(head.as_bytes());
    let piece = format!("{:x}\r\n{}\r\n", 1 << 20, "a".repeat(1 << 20));
    let started = Instant::now();
    let mut status = 0;
    for _ in 0..8 {
        if c.write_all(piece.as_bytes()).is_err() {
            break;
        }
    }
    let (s, reply) = http_raw(&mut c, b"", limit);
    if s != 0 {
        status = s;
    }
    expect(&mut found, "8 MiB chunked body", (status, reply), &[413, 0])?;
    if started.elapsed() > limit {
        return Err("chunked huge body took too long to be refused".into());
    }

    // HTTP/1.0: answered (or refused), never a hang.
    let mut c = fresh()?;
    let r = http_raw(
        &mut c,
        b"POST /open/1 HTTP/1.0\r\nContent-Length: 1\r\n\r\n\0",
        limit,
    );
    expect(&mut found, "HTTP/1.0 open", r.clone(), &[200, 400, 505])?;
    if r.0 == 200 {
        let id = String::from_utf8_lossy(http_body(&r.1)).trim().to_string();
        let mut c = fresh()?;
        let _ = http_raw(&mut c, &post(&format!("/close/{id}/1"), b""), limit);
    }
    // No Content-Length and no body framing: an empty body.
    let mut c = fresh()?;
    let r = http_raw(
        &mut c,
        b"POST /fcs/ident2 HTTP/1.1\r\nHost: x\r\n\r\n",
        limit,
    );
    expect(&mut found, "no Content-Length", r, &[404, 200, 411])?;
    // GET instead of POST.
    let mut c = fresh()?;
    let r = http_raw(&mut c, b"GET /open/1 HTTP/1.1\r\nHost: x\r\n\r\n", limit);
    expect(&mut found, "GET /open/1", r, &[405])?;
    // A 64 KiB header.
    let mut c = fresh()?;
    let big = format!(
        "POST /open/1 HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(64 * 1024)
    );
    let r = http_raw(&mut c, big.as_bytes(), limit);
    expect(&mut found, "64 KiB header", r, &[431, 400, 0])?;

    // Slowloris: one header byte every 300 ms; dropped at http_header_timeout_secs (2 s).
    let mut c = fresh()?;
    let _ = c.write_all(b"POST /open/1 HTTP/1.1\r\nHost: x\r\n");
    let started = Instant::now();
    let mut dropped = false;
    while started.elapsed() < Duration::from_secs(10) {
        if c.write_all(b"X").is_err() || closed_within(&mut c, Duration::from_millis(300)) {
            dropped = true;
            break;
        }
    }
    if !dropped {
        return Err("slowloris header still open after 10 s".into());
    }
    found.push(format!(
        "slowloris: closed after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(found.join("; "))
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

type Case = fn(&Target, Ipv4Addr) -> Outcome;

#[test]
fn hostile_peers_are_dropped_and_a_healthy_session_carries_on() {
    let p = peers();
    let gw = Gateway::builder().config(LIMITS).rtmp_and_rtmps().start();
    let gw = Arc::new(gw);
    let t = Target {
        rtmp: gw.addr("rtmp"),
        rtmps: gw.addr("rtmps"),
        gw: gw.clone(),
    };
    let baseline = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(20);
    let src = framemd5(&src_file);

    // Groups run side by side (each from its own address); cases in a group run in turn.
    let groups: Vec<Vec<(&str, Case)>> = vec![
        vec![
            (
                "chunk size change mid-message",
                chunk_size_change_mid_message,
            ),
            ("70,000 nested AMF0 arrays", nested_amf0),
            ("70,000 nested AMF3 arrays (type 17)", nested_amf3),
            ("AMF3 unknown references", amf3_unknown_references),
            ("1 MB stream name", huge_stream_name),
            ("fmt 1-3 on a never-opened csid", fmt123_never_opened),
            ("overflowing timestamp deltas", overflowing_deltas),
            (
                "extended timestamp on continuations",
                extended_timestamp_continuations,
            ),
            (
                "csid 65599, then 100 chunk streams",
                csid_65599_and_too_many,
            ),
            ("chunk size 1, 1 MiB message", chunk_size_one),
        ],
        vec![("truncated connect at every byte", truncated_connect)],
        vec![
            ("16 MiB declared, never sent", declared_never_sent),
            ("C0 only, then silence", c0_then_silence),
            ("RTMPE: C0 only; garbage C1", rtmpe_silence_and_garbage),
        ],
        vec![
            (
                "garbage after the TLS ClientHello",
                garbage_after_client_hello,
            ),
            (
                "TLS 1.0/1.1 refused, 1.2/1.3 accepted",
                old_tls_versions_refused,
            ),
            ("RTMPT abuse", rtmpt_cases),
        ],
        vec![("too many connections from one IP", too_many_from_one_ip)],
    ];

    let healthy_key = "live/healthy";
    let players = vec![
        (
            PlayerKind::Ffmpeg,
            format!("{}/{healthy_key}", gw.url("rtmpt")),
        ),
        (
            PlayerKind::Rtmpdump,
            format!("{}/{healthy_key}", gw.url("rtmp")),
        ),
    ];
    let publish_url = format!("{}/{healthy_key}", gw.url("rtmp"));

    let (received, results) = thread::scope(|s| {
        let healthy =
            s.spawn(|| publish_and_play(dir.path(), &p.ffmpeg, &publish_url, &src_file, &players));
        // Let the healthy session get going before the attacks start.
        wait_until(Duration::from_secs(20), || {
            gw.log_contains("publish live/healthy")
        });
        thread::sleep(Duration::from_secs(2));
        let handles: Vec<_> = groups
            .iter()
            .enumerate()
            .map(|(g, cases)| {
                let t = &t;
                s.spawn(move || {
                    cases
                        .iter()
                        .map(|(name, case)| {
                            let started = Instant::now();
                            let r = case(t, from_ip(10 + g as u8));
                            (*name, r, started.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("a case panicked"))
            .collect();
        (
            healthy.join().expect("the healthy session panicked"),
            results,
        )
    });

    eprintln!("---- hostile cases ----");
    let mut failed = Vec::new();
    for (name, r, took) in &results {
        match r {
            Ok(how) => eprintln!("PASS {name} ({:.1} s): {how}", took.as_secs_f64()),
            Err(e) => {
                eprintln!("FAIL {name} ({:.1} s): {e}", took.as_secs_f64());
                failed.push(format!("{name}: {e}"));
            }
        }
    }
    let log = gw.log();
    assert!(
        !log.contains("panicked"),
        "the gateway panicked; its log:\n{log}"
    );
    for r in &received {
        r.assert_run_of(&src);
    }
    gw.assert_fds_back_to(baseline.fds, Duration::from_secs(15));
    let end = gw.usage();
    eprintln!("rtmpgate before: {baseline:?}, after: {end:?}");
    assert!(
        end.threads <= baseline.threads + 2,
        "threads {} -> {}",
        baseline.threads,
        end.threads
    );
    assert!(
        failed.is_empty(),
        "{} case(s) failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
