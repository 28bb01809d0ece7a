//! Fuzzes the engine's whole message path: up to three clients, each a byte stream played
//! after a valid handshake into a real engine session (chunk decoder, command decoding,
//! connect/createStream/publish/play, the hub between publishers and players), over
//! in-memory pipes instead of sockets, on tokio's paused (fake) clock: timers and the message
//! rate limit's pauses advance virtual time only. Checks beyond "no panic": every session
//! ends once its client's bytes end (no hang), no stream is left in the hub, and every byte
//! charged to the memory budget is returned.
//!
//! Input: a first byte choosing the write size ((b + 1) * 16 bytes, the clients' writes
//! interleaved), then the clients' streams separated by [`SEP`].
#![no_main]

use std::net::SocketAddr;
use std::time::Duration;

#[path = "../async_harness.rs"]
mod async_harness;
use async_harness::{paused_runtime, split_on, write_piece};
use libfuzzer_sys::fuzz_target;
use rtmpgate::engine::{Engine, EngineConfig};
use rtmpgate::limits::Limits;
use rtmpgate::rtmp::handshake::{ClientHandshake, S0S1S2_LEN};
use rtmpgate::stream::{ClientStream, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Separates the clients' byte streams in an input.
const SEP: &[u8] = b"\xfe\xedNEXT";
const MAX_CLIENTS: usize = 3;
/// Virtual time a session gets to end after its client's EOF, and a write to go through,
/// before the run counts as a hang. Virtual time moves only when every task waits on a
/// timer; a session paced by `max_messages_per_sec` (2,000 a second) works through a
/// 64 KiB input of zero-length messages in about 33 s of it.
const HANG: Duration = Duration::from_secs(3600);

fuzz_target!(|data: &[u8]| {
    let Some((&size, data)) = data.split_first() else {
        return;
    };
    let piece = (usize::from(size) + 1) * 16;
    let streams = split_on(data, SEP, MAX_CLIENTS);
    let limits = Limits::default();
    let rt = paused_runtime();
    rt.block_on(async {
        let engine = Engine::new(limits, EngineConfig::default());
        let handler = engine.handler();
        let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:1935".parse().expect("addr");
        let mut clients = Vec::new();
        for bytes in &streams {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let cs = ClientStream::new(Box::new(theirs), Transport::Rtmp, peer, local);
            let session = tokio::spawn(handler(cs));
            let (mut rd, mut wr) = tokio::io::split(ours);
            let hs = ClientHandshake::new(false);
            wr.write_all(&hs.c0c1()).await.expect("C0+C1");
            let mut s = vec![0u8; S0S1S2_LEN];
            rd.read_exact(&mut s).await.expect("S0+S1+S2");
            wr.write_all(&hs.c2(&s).expect("S1 usable"))
                .await
                .expect("C2");
            // Everything the session sends is read (and dropped), so it never waits on us.
            let drain = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            clients.push((Some(wr), bytes.chunks(piece), session, drain));
        }
        // The clients' writes interleaved, so a publisher's media meets a player's commands.
        loop {
            let mut wrote = false;
            for (wr, pieces, _, _) in clients.iter_mut() {
                if wr.is_none() {
                    continue;
                }
                let Some(p) = pieces.next() else { continue };
                wrote = true;
                write_piece(wr, p, HANG, "a session").await;
                tokio::task::yield_now().await;
            }
            if !wrote {
                break;
            }
        }
        for (wr, _, session, drain) in clients {
            if let Some(mut w) = wr {
                let _ = w.shutdown().await;
            }
            tokio::time::timeout(HANG, session)
                .await
                .expect("a session did not end after its client's EOF")
                .expect("session task");
            let _ = tokio::time::timeout(HANG, drain).await;
        }
        assert_eq!(
            engine.hub().stream_count(),
            0,
            "streams left in the hub after every session ended"
        );
    });
    drop(rt);
    assert_eq!(
        rtmpgate::budget::global().used(),
        0,
        "bytes still charged to the memory budget after every session ended"
    );
});
