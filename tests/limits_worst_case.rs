//! README's "Worst cases under the default limits" (issue 9): the table's figures recomputed
//! from `Limits::default()` and `EngineConfig::default()` (a changed default makes the README
//! stale and this test fail), and two rows checked against the running gateway: one
//! connection holding the most partial messages it may (the memory budget's count and the
//! process's RSS stay under the per-connection figure), and one address capped at
//! `max_connections_per_ip` places, raw connections and tunnel sessions together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;
use rtmpgate::engine::EngineConfig;
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::message;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// The engine session's read buffer: `READ_MAX` (64 KiB) in src/engine/session.rs, reserved
/// again when half of it is used, so at most twice that.
const READ_BUF: u64 = 2 * 64 * KIB;
/// TLS (rustls: 64 KiB of plaintext and of records to send, 16 KiB received, one record being
/// read) or RTMPE (32 KiB of cipher output) per connection: an estimate from the libraries'
/// defaults, not a limit of ours.
const TRANSPORT: u64 = 192 * KIB;
/// Heap per decoded AMF value, its key and the vectors' doubling (a `(String, Amf0Value)`
/// entry is 104 bytes today; the test checks it stays within half of this).
const AMF_VALUE: u64 = 256;
/// What a player takes from the ring before writing, in chunked bytes (`BATCH_BYTES` in
/// src/engine/session.rs and src/engine/lane.rs), not counting the frame that passes it.
const BATCH: u64 = MIB;

/// The largest message a chunk header can carry under `max_message_len`.
fn msg_max(l: &Limits) -> u64 {
    u64::from(l.max_message_len.min(0xFF_FFFF))
}

/// A message chunked once with a fmt 0 header and extended timestamps (the worst case): a
/// 16-byte first header and 5 bytes before every further chunk.
fn chunked_len(len: u64, chunk_size: u64) -> u64 {
    16 + len + (len.div_ceil(chunk_size).max(1) - 1) * 5
}

/// A frame in the hub: its payload and its chunked copy.
fn frame(len: u64, chunk_size: u64) -> u64 {
    len + chunked_len(len, chunk_size)
}

/// One figure of the README table: its row label and its bytes (or count).
struct Figure {
    row: &'static str,
    value: u64,
    count: bool,
}

/// The table, computed from the defaults with the formulas the README states.
fn figures(l: &Limits, e: &EngineConfig) -> Vec<Figure> {
    let m = msg_max(l);
    let cs = u64::from(e.chunk_size);
    let per_ip = l.max_connections_per_ip as u64;
    let body = l.max_http_body as u64;
    let pending = l.max_tunnel_pending as u64;

    // One RTMP session (any transport).
    let partial = (2 * l.max_partial_bytes as u64).min(l.max_chunk_streams as u64 * m);
    let handled = m
        + (l.max_message_len as u64).max(l.max_amf_string as u64)
        + l.max_amf_entries as u64 * AMF_VALUE;
    let replies = l.max_reply_queue as u64 + l.max_amf_string as u64 * 129 / 128 + KIB;
    let io = READ_BUF + TRANSPORT;
    let connection = partial + handled + replies + io;

    // One stream (key) of the engine, filled by its publisher. With the fan-out lane (a
    // merge window) a stream with two players has a log (src/engine/log.rs), and each frame
    // its publisher sends is charged its chunks once more for the log's copy (hub.rs, push).
    let log = u64::from(!e.write_batch.is_zero());
    let logged = |n: u64| frame(n, cs) + log * chunked_len(n, cs);
    let headers = 3 * logged(m);
    let retimed = 3 * chunked_len(m, cs);
    // The ring is bounded at 2 x max_lag_bytes of frame bytes, or holds one larger frame
    // alone; a frame's chunks (its log copy) are never more than its frame bytes.
    let ring = ((1 + log) * 2 * e.max_lag_bytes).max(logged(m));
    let gop_payload = (e.gop_max_bytes as u64).max(m);
    let gop_chunks = gop_payload + 21 * e.gop_max_messages as u64 + 5 * gop_payload / cs;
    let gop = gop_payload + (1 + log) * gop_chunks;
    let stream = headers + retimed + ring + gop;

    // A player: its own re-timed headers, and frames it keeps alive after the stream let go:
    // a batch is bounded in chunks (each frame's payload and log copy no larger), and the
    // frame that passes the bound.
    let kept = headers + gop + (2 + log) * BATCH + logged(m);
    let player = connection + retimed + kept;

    // The tunnel.
    let tunnel_buffers =
        (pending + body) + ((l.max_tunnel_reorder_bytes as u64).max(body) + body) + pending + 1;
    let tunnel_session = player + tunnel_buffers;
    // The tunnel's HTTP/1.1 server states its own bound (read buffer, body, reply), from
    // the limits and its buffer sizes: read here, not restated, so that a buffer of that
    // server growing makes this table, and the README, stale.
    let http = rtmpgate::door::rtmpt::connection_bound(l);
    assert_eq!(
        http.body as u64, body,
        "the body being read is max_http_body"
    );
    let http_connection = http.total() as u64 + TRANSPORT;

    // Not charged to the budget, per place (connection, HTTP connection or tunnel session).
    let http_uncharged = (http.read_buffer + http.reply) as u64 + TRANSPORT;
    let uncharged_place = (READ_BUF + TRANSPORT).max(http_uncharged);

    vec![
        Figure {
            row: "connection: partial messages",
            value: partial,
            count: false,
        },
        Figure {
            row: "connection: the message being handled",
            value: handled,
            count: false,
        },
        Figure {
            row: "connection: replies",
            value: replies,
            count: false,
        },
        Figure {
            row: "connection: read buffer and transport",
            value: io,
            count: false,
        },
        Figure {
            row: "**per connection**",
            value: connection,
            count: false,
        },
        Figure {
            row: "player: its own re-timed headers",
            value: retimed,
            count: false,
        },
        Figure {
            row: "player: frames it keeps alive",
            value: kept,
            count: false,
        },
        Figure {
            row: "**per player connection**",
            value: player,
            count: false,
        },
        Figure {
            row: "tunnel session: buffers",
            value: tunnel_buffers,
            count: false,
        },
        Figure {
            row: "**per tunnel session**",
            value: tunnel_session,
            count: false,
        },
        Figure {
            row: "**per HTTP connection** of the tunnel",
            value: http_connection,
            count: false,
        },
        Figure {
            row: "**per stream**",
            value: stream,
            count: false,
        },
        Figure {
            row: "**per address**: places",
            value: per_ip,
            count: true,
        },
        Figure {
            row: "per address: charged bytes",
            value: per_ip * (tunnel_session + stream),
            count: false,
        },
        Figure {
            row: "per address: uncharged bytes",
            value: per_ip * uncharged_place,
            count: false,
        },
        Figure {
            row: "**whole process**: uncharged bytes",
            value: l.max_connections as u64 * uncharged_place,
            count: false,
        },
        Figure {
            row: "whole process: file descriptors",
            // 64 for the process, 64 for the streams' logs (`fdlimit::STREAM_LOG_FDS`).
            value: l.max_connections as u64 + 128,
            count: true,
        },
    ]
}

/// Bytes as the README writes them: one decimal, in the largest unit that is at least 1.
fn human(n: u64) -> String {
    let f = n as f64;
    if n >= 1 << 30 {
        format!("{:.1} GiB", f / (1u64 << 30) as f64)
    } else if n >= MIB {
        format!("{:.1} MiB", f / MIB as f64)
    } else {
        format!("{:.1} KiB", f / KIB as f64)
    }
}

fn shown(f: &Figure) -> String {
    if f.count {
        f.value.to_string()
    } else {
        human(f.value)
    }
}

#[test]
fn readme_worst_cases_match_the_defaults() {
    assert!(
        2 * std::mem::size_of::<(String, Amf0Value)>() as u64 <= AMF_VALUE,
        "an AMF entry grew to {} bytes: raise AMF_VALUE and the README's formula",
        std::mem::size_of::<(String, Amf0Value)>()
    );
    let figs = figures(&Limits::default(), &EngineConfig::default());
    for f in &figs {
        println!("{:<45} {}", f.row, shown(f));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(root.join("README.md")).expect("README.md");
    let section = readme
        .split("### Worst cases under the default limits")
        .nth(1)
        .expect("README.md has no '### Worst cases under the default limits' section")
        .split("\n## ")
        .next()
        .unwrap_or_default();
    let mut wrong = Vec::new();
    for f in &figs {
        let want = format!("**{}**", shown(f));
        let row = section
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", f.row)));
        match row {
            Some(r) if r.trim_end().ends_with(&format!("| {want} |")) => {}
            Some(r) => wrong.push(format!(
                "{}: README says {r:?}, the defaults give {want}",
                f.row
            )),
            None => wrong.push(format!("{}: no row (the defaults give {want})", f.row)),
        }
    }
    assert!(
        wrong.is_empty(),
        "README's worst-case table is stale:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Against the gateway
// ---------------------------------------------------------------------------------------------

/// A gateway with one plain RTMP listener and the admin listener (for /metrics), and the admin
/// address.
fn gateway_with_admin() -> (Gateway, SocketAddr) {
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .listeners(1)
        .start();
    let admin = admin_addr(&gw);
    (gw, admin)
}

/// `rtmpgate_memory_budget_used_bytes` from /metrics: what is charged to the budget now.
fn budget_used(admin: SocketAddr) -> u64 {
    admin_metric(admin, "rtmpgate_memory_budget_used_bytes")
}

/// A chunk's basic header for `csid` (1-byte form below 64, 2-byte form up to 319).
fn basic(fmt: u8, csid: u32) -> Vec<u8> {
    if csid < 64 {
        vec![(fmt << 6) | csid as u8]
    } else {
        vec![fmt << 6, (csid - 64) as u8]
    }
}

/// The first `chunks` chunks (of `chunk_size` bytes) of a video message declaring `len` bytes
/// on `csid`: a message left in progress.
fn partial(csid: u32, len: u32, chunks: usize, chunk_size: usize) -> Vec<u8> {
    let mut out = basic(0, csid);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(message::VIDEO);
    out.extend_from_slice(&1u32.to_le_bytes());
    let payload = vec![0x5a; chunk_size];
    for i in 0..chunks {
        if i > 0 {
            out.extend_from_slice(&basic(3, csid));
        }
        out.extend_from_slice(&payload);
    }
    out
}

/// One connection holds the most partial messages the limits allow, in the pattern that makes
/// their capacity largest (bodies grow by doubling: a message just past half its declared
/// length has its whole length reserved), on every chunk stream it may open. The budget's
/// count and the process's RSS growth must stay under the README's per-connection figures,
/// and one chunk more closes the connection and returns the charge.
#[test]
fn one_connection_at_its_partial_message_limit_stays_under_the_per_connection_figure() {
    let l = Limits::default();
    let figs = figures(&l, &EngineConfig::default());
    let fig = |row: &str| figs.iter().find(|f| f.row == row).unwrap().value;
    let (gw, admin) = gateway_with_admin();
    let addr = gw.addr("rtmp");

    // A first session, so one-time allocations (the runtime's, the session's code paths) are
    // in the baseline.
    let mut warm = connect_from(Ipv4Addr::new(127, 0, 0, 60), addr).unwrap();
    handshake(&mut warm).unwrap();
    assert!(Inbox::default().pong(&mut warm, 1, Duration::from_secs(5)));
    drop(warm);
    std::thread::sleep(Duration::from_millis(300));
    let used0 = budget_used(admin);
    let rss0 = gw.rss_kb() * 1024;

    let mut tcp = connect_from(Ipv4Addr::new(127, 0, 0, 61), addr).unwrap();
    handshake(&mut tcp).unwrap();
    let big: usize = 64 * 1024;
    tcp.write_all(&chunked(2, &message::set_chunk_size(big as u32), 128))
        .unwrap();
    let len = msg_max(&l) as u32;
    // 129 chunks of 64 KiB: 8 MiB and one chunk, so the body's capacity is the whole 16 MiB.
    // Then halves: each stream's capacity is about twice what it received.
    let plan = [129, 129, 129, 65, 33, 17, 9];
    let mut received = 0u64;
    let mut csid = 3;
    for chunks in plan {
        tcp.write_all(&partial(csid, len, chunks, big)).unwrap();
        received += (chunks * big) as u64;
        csid += 1;
    }
    // Every other chunk stream the connection may open (csid 2 is open too), 128 bytes each.
    tcp.write_all(&chunked(2, &message::set_chunk_size(128), 128))
        .unwrap();
    while (csid as usize) < l.max_chunk_streams + 2 {
        tcp.write_all(&partial(csid, len, 1, 128)).unwrap();
        received += 128;
        csid += 1;
    }
    assert!(received <= l.max_partial_bytes as u64);
    let mut inbox = Inbox::default();
    assert!(
        inbox.pong_at(&mut tcp, 7, 128, Duration::from_secs(20)),
        "the connection did not answer a ping after {received} bytes of partial messages; log:\n{}",
        gw.log()
    );

    let charged = budget_used(admin).saturating_sub(used0);
    let rss = (gw.rss_kb() * 1024).saturating_sub(rss0);
    let bound = fig("**per connection**");
    let partial_bound = fig("connection: partial messages");
    println!(
        "partial messages on {} chunk streams: {} received, {} charged (bound {}), RSS +{} \
         (bound {} + 16 MiB allocator slack)",
        csid - 2,
        human(received),
        human(charged),
        human(partial_bound),
        human(rss),
        human(bound)
    );
    assert!(
        charged >= received && charged <= partial_bound,
        "charged {charged} bytes for {received} bytes of partial messages; the README's bound \
         is {partial_bound}"
    );
    assert!(
        rss >= received / 2,
        "RSS grew {rss} bytes for {received} bytes held: the measurement saw nothing"
    );
    assert!(
        rss <= bound + 16 * MIB,
        "RSS grew {rss} bytes for one connection; the README's per-connection figure is {bound}"
    );

    // One chunk stream's worth more than max_partial_bytes: closed, and the charge returned.
    let mut more = Vec::new();
    for _ in 0..(l.max_partial_bytes as u64 - received) / 128 + 1 {
        more.extend_from_slice(&basic(3, 10));
        more.extend_from_slice(&[0x5a; 128]);
    }
    let _ = tcp.write_all(&more);
    assert!(
        closed_within(&mut tcp, Duration::from_secs(10)),
        "a connection past limits.max_partial_bytes was not closed"
    );
    assert!(
        gw.wait_log("limits.max_partial_bytes", Duration::from_secs(5)),
        "no log line names limits.max_partial_bytes; log:\n{}",
        gw.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || budget_used(admin)
            <= used0 + 64 * KIB),
        "the closed connection's charge was not returned: {} bytes charged, {used0} before",
        budget_used(admin)
    );
}

/// Reads `n` pipelined HTTP replies (each with a Content-Length) within `limit`; their
/// status codes, fewer if the connection closed or the time ran out.
fn read_replies(tcp: &mut TcpStream, n: usize, limit: Duration) -> Vec<u16> {
    let end = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 65536];
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < end {
        // Take every whole reply at the front.
        while let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() < head_end + 4 + len {
                break;
            }
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            out.push(status);
            buf.drain(..head_end + 4 + len);
        }
        if out.len() >= n {
            break;
        }
        match tcp.read(&mut tmp) {
            Ok(0) => break,
            Ok(k) => buf.extend_from_slice(&tmp[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    out
}

/// One address holds at most `max_connections_per_ip` places: raw connections (past their
/// handshake), the HTTP connection carrying tunnel requests, and tunnel sessions, counted
/// together. The next connection and the next `/open` from it are refused, another address
/// is served, and the gateway's descriptors and memory grew no more than the table says.
#[test]
fn one_address_is_capped_at_max_connections_per_ip_places() {
    let l = Limits::default();
    let per_ip = l.max_connections_per_ip;
    let nofile = rtmpgate::door::fdlimit::raise().expect("cannot read RLIMIT_NOFILE");
    assert!(
        nofile.soft >= per_ip as u64 + 200,
        "this test needs {} open files and the hard limit is {}; raise it (ulimit -Hn)",
        per_ip + 200,
        nofile.soft
    );
    let figs = figures(&l, &EngineConfig::default());
    let fig = |row: &str| figs.iter().find(|f| f.row == row).unwrap().value;
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "off"])
        .listeners(1)
        .start();
    let addr = gw.addr("rtmp");
    let fds0 = gw.fds();
    let rss0 = gw.rss_kb() * 1024;
    let attacker = Ipv4Addr::new(127, 0, 0, 62);

    // 70% of the places as raw RTMP connections past their handshake.
    let raw = per_ip * 7 / 10;
    let mut held = Vec::with_capacity(per_ip);
    for i in 0..raw {
        let mut tcp = connect_from(attacker, addr).unwrap();
        handshake(&mut tcp).unwrap_or_else(|e| {
            panic!("raw connection {i} of {raw} (under the limit) failed its handshake: {e}")
        });
        held.push(tcp);
    }

    // The rest as tunnel sessions, /open pipelined over one keep-alive connection (itself a
    // place): all but the places left are refused with 503.
    let asked = per_ip - raw + 50;
    let mut http = connect_from(attacker, addr).unwrap();
    let mut opens = Vec::new();
    for _ in 0..asked {
        opens.extend_from_slice(&post("/open/1", &[0]));
    }
    http.write_all(&opens).unwrap();
    let statuses = read_replies(&mut http, asked, Duration::from_secs(20));
    let opened = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    println!(
        "{raw} raw connections, 1 HTTP connection, {opened} tunnel sessions opened, {refused} \
         refused (503) of {asked}"
    );
    assert_eq!(
        (opened, refused),
        (per_ip - raw - 1, asked - (per_ip - raw - 1)),
        "tunnel sessions from an address with {raw} raw connections and 1 HTTP connection open"
    );

    // Full: the next raw connection from the address is closed before its handshake...
    let mut extra = connect_from(attacker, addr).unwrap();
    assert!(
        handshake(&mut extra).is_err() || closed_within(&mut extra, Duration::from_secs(5)),
        "connection {} from one address was served",
        per_ip + 1
    );
    assert!(
        gw.wait_log("(limits.max_connections_per_ip)", Duration::from_secs(5)),
        "no refusal line names limits.max_connections_per_ip; log:\n{}",
        gw.log()
    );
    // ...while another address is served.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 63), addr).unwrap();
    handshake(&mut other).expect("another address's handshake");
    assert!(
        Inbox::default().pong(&mut other, 9, Duration::from_secs(5)),
        "another address was not served while one address held all its places"
    );

    // What the places cost: a descriptor each (tunnel sessions none), and well under the
    // table's uncharged bytes per place (nothing was sent for the budget to charge).
    let fds = gw.fds().saturating_sub(fds0);
    let rss = (gw.rss_kb() * 1024).saturating_sub(rss0);
    let places = raw + 1 + opened;
    let rss_bound = fig("per address: uncharged bytes");
    println!(
        "{places} places: +{fds} descriptors, RSS +{} (bound {})",
        human(rss),
        human(rss_bound)
    );
    assert!(
        fds >= raw && fds <= raw + 1 + 16,
        "{fds} more descriptors for {raw} raw connections and one HTTP connection"
    );
    assert!(
        rss <= rss_bound,
        "RSS grew {rss} bytes for {places} places; bound {rss_bound}"
    );
    drop(held);
}

/// A tunnel session's buffers: a body sent ahead of a missing sequence number is held (one is
/// taken whatever its size while no other is held), a second one waits for room in its own
/// request. What is charged stays within the table's figures: the session's buffers, plus the
/// per-HTTP-connection body of each request still waiting.
#[test]
fn a_tunnel_session_holding_early_bodies_stays_under_its_figures() {
    let l = Limits::default();
    let figs = figures(&l, &EngineConfig::default());
    let fig = |row: &str| figs.iter().find(|f| f.row == row).unwrap().value;
    let (gw, admin) = gateway_with_admin();
    let addr = gw.addr("rtmp");
    let client = Ipv4Addr::new(127, 0, 0, 64);
    let mut http = connect_from(client, addr).unwrap();
    let (status, reply) = http_raw(&mut http, &post("/open/1", &[0]), Duration::from_secs(5));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let id = String::from_utf8_lossy(http_body(&reply))
        .trim()
        .to_string();
    // Number 0 applied: the session now waits for 1, and 2 and 3 come first.
    let (status, _) = http_raw(
        &mut http,
        &post(&format!("/idle/{id}/0"), &[0]),
        Duration::from_secs(5),
    );
    assert_eq!(status, 200);
    let base = budget_used(admin);
    let body = vec![0x5a; l.max_http_body];
    let mut early = Vec::new();
    for seq in [2, 3] {
        let mut tcp = connect_from(client, addr).unwrap();
        tcp.write_all(&post(&format!("/send/{id}/{seq}"), &body))
            .unwrap();
        early.push(tcp);
    }
    std::thread::sleep(Duration::from_millis(500));
    let waiting = budget_used(admin).saturating_sub(base);
    let buffers = fig("tunnel session: buffers");
    let per_http = fig("**per HTTP connection** of the tunnel");
    // Both requests are answered once tunnel_order_wait_ms has passed.
    for tcp in &mut early {
        let (status, _) = http_raw(
            tcp,
            b"",
            Duration::from_millis(l.tunnel_order_wait_ms + 5_000),
        );
        assert!(
            status == 200 || status == 503,
            "an early /send got {status}"
        );
    }
    let held = budget_used(admin).saturating_sub(base);
    println!(
        "two early {} bodies: {} charged while their requests wait (bound {} + 2 x {}), {} once \
         answered (bound {})",
        human(l.max_http_body as u64),
        human(waiting),
        human(buffers),
        human(per_http),
        human(held),
        human(buffers)
    );
    assert!(
        waiting <= buffers + 2 * per_http,
        "{waiting} bytes charged for one tunnel session and two requests"
    );
    assert!(
        held <= buffers,
        "{held} bytes charged for one tunnel session's buffers"
    );
}
