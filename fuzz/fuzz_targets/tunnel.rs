//! Fuzzes the RTMPT tunnel from the wire: up to three client connections' raw bytes into the
//! tunnel's own HTTP/1.1 server (request heads, Content-Length and chunked bodies, trailers,
//! `Expect: 100-continue`, pipelining, keep-alive), whose /open, /send, /idle and /close
//! requests drive real engine sessions, over in-memory pipes on tokio's paused (fake) clock.
//! Checks beyond "no panic": every connection ends once its client's bytes end (no hang),
//! every reply is well-formed HTTP/1.1 with a Content-Length that matches its body, the
//! tunnel's sessions and the engine's streams are gone after shutdown, and every byte charged
//! to the memory budget is returned.
//!
//! Session ids are random, so an input cannot spell one: `@ID` in a connection's bytes is
//! replaced, when the harness reaches it, by the id the newest /open reply gave (or `0`).
//!
//! Input: a first byte choosing the write size ((b + 1) * 16 bytes), then the connections'
//! bytes separated by [`SEP`]; the connections are written one piece each in turn.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "../async_harness.rs"]
mod async_harness;
use async_harness::{paused_runtime, split_on, write_piece};
use libfuzzer_sys::fuzz_target;
use rtmpgate::door::rtmpt::Tunnel;
use rtmpgate::engine::{Engine, EngineConfig};
use rtmpgate::limits::Limits;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Separates the connections' byte streams in an input.
const SEP: &[u8] = b"\xfe\xedNEXT";
/// Stands for the newest session id in a connection's bytes.
const ID: &[u8] = b"@ID";
const MAX_CONNECTIONS: usize = 3;
/// Virtual time a connection gets to end after its client's EOF, a write to go through, and
/// the engine to drop its streams after the tunnel's shutdown, before the run is a hang.
const HANG: Duration = Duration::from_secs(3600);
/// Virtual time given to the server to answer before an `@ID` is filled in.
const ANSWER_WAIT: Duration = Duration::from_millis(50);

/// Reads replies until EOF, checks each is well-formed, and keeps the newest session id an
/// /open reply carried (32 hex digits and a newline).
async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, newest_id: Arc<Mutex<String>>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // A whole reply at the front of `buf`?
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).expect("reply head is not UTF-8");
            assert!(
                head.starts_with("HTTP/1.1 "),
                "reply without a status line: {head:?}"
            );
            let status: u16 = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .expect("reply status is not three digits");
            let length = head
                .lines()
                .filter_map(|l| l.split_once(": "))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| {
                    v.trim()
                        .parse::<usize>()
                        .expect("Content-Length not a number")
                });
            // 100 Continue has no body and no length; every other reply has a length.
            let length = if status == 100 {
                0
            } else {
                length.expect("a reply without Content-Length")
            };
            // A HEAD request's reply has the length and no body: the next reply follows
            // its head at once (no reply body the engine makes starts like a status line).
            let head_only = buf
                .get(end + 4..)
                .is_some_and(|rest| rest.starts_with(b"HTTP/1.1 "));
            let length = if head_only { 0 } else { length };
            let total = end + 4 + length;
            if buf.len() >= total {
                let body = &buf[end + 4..total];
                if status == 200 && body.len() == 33 && body[32] == b'\n' {
                    if let Ok(id) = std::str::from_utf8(&body[..32]) {
                        if id.bytes().all(|b| b.is_ascii_hexdigit()) {
                            *newest_id.lock().expect("id lock") = id.to_owned();
                        }
                    }
                }
                buf.drain(..total);
                continue;
            }
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    // A reply cut short is fine only when the connection was closed on us (a refused
    // request's answer is whole before the close, so a partial head here would be a bug).
    // (A head alone at the end is a HEAD request's reply.)
    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        if buf.len() > end + 4 {
            let head = String::from_utf8_lossy(&buf[..end]);
            panic!("a reply's body was cut short: {head:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&size, data)) = data.split_first() else {
        return;
    };
    let piece = (usize::from(size) + 1) * 16;
    let conns = split_on(data, SEP, MAX_CONNECTIONS);
    let rt = paused_runtime();
    rt.block_on(async {
        let limits = Limits::default();
        let engine = Engine::new(limits.clone(), EngineConfig::default());
        let tunnel = Tunnel::new(Arc::new(limits), engine.handler());
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:80".parse().expect("addr");
        let newest_id = Arc::new(Mutex::new(String::from("0")));
        let mut clients = Vec::new();
        for bytes in &conns {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let t = Arc::clone(&tunnel);
            let server =
                tokio::spawn(async move { t.serve_connection(theirs, peer, local, false).await });
            let (rd, wr) = tokio::io::split(ours);
            let reader = tokio::spawn(read_replies(rd, Arc::clone(&newest_id)));
            // Each connection's bytes as segments between `@ID`s, each written in pieces.
            let segments = split_on(bytes, ID, usize::MAX);
            clients.push((Some(wr), segments, 0usize, 0usize, server, reader));
        }
        loop {
            let mut wrote = false;
            for (wr, segments, seg, at, _, _) in clients.iter_mut() {
                if wr.is_none() {
                    continue;
                }
                let Some(s) = segments.get(*seg) else {
                    continue;
                };
                wrote = true;
                let bytes: Vec<u8> = if *at >= s.len() {
                    // This segment is written: the id that stood between it and the next.
                    *seg += 1;
                    *at = 0;
                    if *seg >= segments.len() {
                        continue;
                    }
                    tokio::time::sleep(ANSWER_WAIT).await;
                    newest_id.lock().expect("id lock").clone().into_bytes()
                } else {
                    let end = (*at + piece).min(s.len());
                    let p = s[*at..end].to_vec();
                    *at = end;
                    p
                };
                write_piece(wr, &bytes, HANG, "a tunnel connection").await;
                tokio::task::yield_now().await;
            }
            if !wrote {
                break;
            }
        }
        for (wr, _, _, _, server, reader) in clients {
            if let Some(mut w) = wr {
                let _ = w.shutdown().await;
            }
            tokio::time::timeout(HANG, server)
                .await
                .expect("a tunnel connection did not end after its client's EOF")
                .expect("connection task");
            tokio::time::timeout(HANG, reader)
                .await
                .expect("the reply reader did not end")
                .expect("reply reader");
        }
        // Sessions outlive their connections (RTMPT clients poll on new ones): shut them.
        tunnel.shutdown();
        let gone = tokio::time::timeout(HANG, async {
            while tunnel.sessions() > 0 || engine.hub().stream_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            gone.is_ok(),
            "after shutdown: {} tunnel sessions, {} engine streams left",
            tunnel.sessions(),
            engine.hub().stream_count()
        );
    });
    drop(rt);
    assert_eq!(
        rtmpgate::budget::global().used(),
        0,
        "bytes still charged to the memory budget after every connection and session ended"
    );
});
