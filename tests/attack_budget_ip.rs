//! One address's share of the memory budget (issue 9: "no single address can make the gateway
//! spend more than a configured budget"): from 127.0.0.2, many connections each hold a large
//! partial message, more than the whole process's budget in total. The address's charges
//! stop at `limits.max_memory_per_ip` (its connections past it are closed with a line naming
//! that limit), the process's budget keeps room, and a publisher and two players from
//! 127.0.0.1 started after the share is full are served every frame. Without shares the
//! attacker spent the whole budget and the newcomers were refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::message;

const MIB: u64 = 1024 * 1024;
/// The process's budget: 128 MiB.
const MAX_MEMORY: u64 = 128 * MIB;
/// One address's share: 32 MiB.
const MAX_MEMORY_PER_IP: u64 = 32 * MIB;
/// What each attacking connection holds: 4 MiB of a message declaring 16 MiB - 1 (64 chunks of
/// 64 KiB; the body's capacity doubles to exactly 4 MiB).
const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 64;
/// Attacking connections: 40 x 4 MiB = 160 MiB, more than the whole budget.
const CONNECTIONS: usize = 40;

/// The admin address the gateway logged (`admin listener on http://ADDR: ...`).
fn admin_addr(gw: &Gateway) -> SocketAddr {
    assert!(
        gw.wait_log("admin listener on ", Duration::from_secs(10)),
        "no admin listener line; log:\n{}",
        gw.log()
    );
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("admin listener on "))
        .unwrap();
    let rest = &line[line.find("://").unwrap() + 3..];
    rest.split(": ").next().unwrap().parse().unwrap()
}

/// `rtmpgate_memory_budget_used_bytes` from /metrics: what is charged to the budget now.
fn budget_used(admin: SocketAddr) -> u64 {
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
        .find_map(|l| l.strip_prefix("rtmpgate_memory_budget_used_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no rtmpgate_memory_budget_used_bytes in /metrics:\n{text}"))
        as u64
}

/// The first `CHUNKS` chunks of a video message declaring 16 MiB - 1 bytes on chunk stream 3.
fn partial() -> Vec<u8> {
    let len: u32 = (1 << 24) - 1;
    let mut out = vec![3u8, 0, 0, 0];
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(message::VIDEO);
    out.extend_from_slice(&1u32.to_le_bytes());
    let payload = vec![0x5a; CHUNK];
    for i in 0..CHUNKS {
        if i > 0 {
            out.push(0xc3);
        }
        out.extend_from_slice(&payload);
    }
    out
}

/// Opens `CONNECTIONS` connections from 127.0.0.2, each holding 4 MiB of a partial message;
/// returns them (the ones the gateway took stay open, holding their charge).
fn attack(addr: SocketAddr) -> Vec<TcpStream> {
    let bytes = partial();
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let Ok(mut tcp) = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr) else {
            continue;
        };
        tcp.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        if handshake(&mut tcp).is_err() {
            continue;
        }
        let set = chunked(2, &message::set_chunk_size(CHUNK as u32), 128);
        // A refused connection is closed mid-write: its errors are expected.
        let _ = tcp.write_all(&set).and_then(|()| tcp.write_all(&bytes));
        held.push(tcp);
    }
    held
}

/// "N of M in use" from a refusal line.
fn in_use(line: &str) -> (u64, u64) {
    let rest = &line[line.find("more bytes wanted, ").unwrap() + "more bytes wanted, ".len()..];
    let mut words = rest.split_whitespace();
    let used = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("of"));
    let limit = words.next().unwrap().parse().unwrap();
    (used, limit)
}

#[test]
fn one_address_stops_at_its_share_and_others_are_served() {
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[limits]\nmax_memory = {MAX_MEMORY}\nmax_memory_per_ip = {MAX_MEMORY_PER_IP}\n"
        ))
        .start();
    let admin = admin_addr(&gw);
    let addr = gw.addr("rtmp");

    let held = attack(addr);
    assert!(
        gw.wait_log(
            "memory budget of this address spent",
            Duration::from_secs(20)
        ),
        "no connection from 127.0.0.2 was refused for its address's share; log:\n{}",
        gw.log()
    );
    // The refused connections are closed and their charges returned; what stays is what the
    // accepted ones hold.
    thread::sleep(Duration::from_millis(500));
    let used = budget_used(admin);
    let log = gw.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("memory budget of this address spent"))
        .collect();
    println!(
        "{CONNECTIONS} connections from 127.0.0.2 sent {} MiB each: {} bytes charged \
         (share {MAX_MEMORY_PER_IP}, budget {MAX_MEMORY}); {} refusal lines, e.g.\n{}",
        CHUNK * CHUNKS / (1 << 20),
        used,
        refusals.len(),
        refusals[0]
    );
    for line in &refusals {
        assert!(
            line.contains("127.0.0.2"),
            "a refusal for another address: {line}"
        );
        let (u, limit) = in_use(line);
        assert_eq!(limit, MAX_MEMORY_PER_IP, "{line}");
        assert!(u <= MAX_MEMORY_PER_IP, "{line}");
    }
    // Nothing else charges now: the budget's count is the attacker's. It stops at the share,
    // and the share was reached (all but less than one connection's 4 MiB of it).
    assert!(
        used <= MAX_MEMORY_PER_IP,
        "127.0.0.2 has {used} bytes charged; its share is {MAX_MEMORY_PER_IP}"
    );
    assert!(
        used + (CHUNK * CHUNKS) as u64 > MAX_MEMORY_PER_IP,
        "127.0.0.2 has only {used} bytes charged: the attack did not fill its share"
    );
    assert!(
        !log.contains("memory budget spent:"),
        "the process's budget was spent:\n{log}"
    );

    // A publisher and two players from 127.0.0.1, while the attacker holds its share.
    let dir = temp_dir();
    let src_file = source_flv(6);
    let src = framemd5(&src_file);
    let url = format!("{}/live/healthy", gw.url("rtmp"));
    let players = vec![
        (PlayerKind::Rtmpdump, url.clone()),
        (PlayerKind::Ffmpeg, url.clone()),
    ];
    let received = publish_and_play(dir.path(), &peers().ffmpeg, &url, &src_file, &players);
    for r in &received {
        r.assert_run_of(&src);
    }
    // The attacker's connections were held open throughout.
    assert!(
        budget_used(admin) >= used,
        "the attacker's charges were returned before the healthy clients ended"
    );
    drop(held);
    let log = gw.log();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    assert!(
        !log.contains("memory budget spent:"),
        "the process's budget was spent:\n{log}"
    );
}
