//! Play amplification against the built-in engine (issue 9, item 1): a player connection
//! sends thousands of `play` commands in one write (about 24 bytes each, fmt 3 headers) on a
//! message stream other than the shared one, while a publisher streams a real H.264/AAC source with a 1 MB
//! `onMetaData` (one of the headers every new play starts with). Each play used to copy the
//! headers and the GOP into the session's unbounded outgoing queue: 1,000 plays cost +1 GiB.
//!
//! Asserted: the gateway's RSS growth and CPU time during the attack stay under the bounds
//! stated below, the attacker receives at most a few start-frame sets (a repeated play
//! replaces the previous one), and an ffmpeg player of the same stream gets one contiguous
//! run of the source, from its first frame (rtmpdump 2.4 crashes printing a metadata string
//! this long, so it cannot be the healthy player here).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::amf0::{self, Amf0Value};
use rtmpgate::rtmp::message::{self, Message};

/// Plays in the attacker's single write.
const PLAYS: usize = 2_000;
/// The publisher's `onMetaData`: 20 string values of 50,000 bytes (1 MB in all).
const META_KEYS: usize = 20;
const META_VALUE: usize = 50_000;

/// RSS the attack may add to the gateway. Before the fix (debug build, this test) the reading
/// attacker cost +860 MB and the silent one +31 MB (the session stalled on its first write
/// after about 40 plays, each a 1 MB copy). Fixed, a play copies neither the headers nor the
/// GOP (they are shared), the session stops decoding while its replies are over
/// `max_reply_queue` (64 KiB) and a repeated play replaces the previous one: measured +2 MB.
/// 16 MiB leaves room for allocator noise and a loaded machine.
const MAX_RSS_GROWTH_KB: u64 = 16 * 1024;
/// CPU the attack may cost the gateway, in clock ticks (1/100 s). Before: 2.6 s for the
/// reading attacker; fixed: about 0.15 s (2,000 hub subscriptions and their replies).
const MAX_CPU_TICKS: u64 = 100;
/// Bytes the reading attacker may receive in its 4 s: its replies (about 700 bytes a play),
/// the live stream, and one set of start frames (1 MB of metadata and the GOP) per batch of
/// plays the gateway reads at once. Before: one set per play, 2.1 GB; fixed: about 7 MB.
const MAX_ATTACKER_BYTES: u64 = 24 * 1024 * 1024;

/// The FLV tags of `file`: (tag type, timestamp, body), script tags left out.
fn flv_tags(file: &Path) -> Vec<(u8, u32, Vec<u8>)> {
    let data = std::fs::read(file).unwrap();
    let mut tags = Vec::new();
    let mut at = 13; // FLV header (9) and the first PreviousTagSize (4)
    while at + 11 <= data.len() {
        let kind = data[at];
        let size = u32::from_be_bytes([0, data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let ts = u32::from_be_bytes([data[at + 7], data[at + 4], data[at + 5], data[at + 6]]);
        let body = at + 11;
        if body + size > data.len() {
            break;
        }
        if kind == message::AUDIO || kind == message::VIDEO {
            tags.push((kind, ts, data[body..body + size].to_vec()));
        }
        at = body + size + 4;
    }
    tags
}

/// Publishes `src` on `key` from a raw RTMP client, in real time, with a 1 MB `onMetaData`
/// first (ffmpeg cannot be made to send one that large). Returns the number of media
/// messages sent, or what failed.
fn publish_raw(addr: SocketAddr, key: &str, src: &Path) -> Result<usize, String> {
    let (mut tcp, mut inbox) = publishing_client(Ipv4Addr::new(127, 0, 0, 76), addr, key)?;
    // From here on, reads only take what is there (acknowledgements).
    tcp.set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    const CS: u32 = 4096;
    tcp.write_all(&chunked(2, &message::set_chunk_size(CS), 128))
        .map_err(|e| e.to_string())?;
    let pad = "x".repeat(META_VALUE);
    let meta = Amf0Value::EcmaArray(
        (0..META_KEYS)
            .map(|i| (format!("pad{i:02}"), Amf0Value::string(pad.clone())))
            .collect(),
    );
    let payload = amf0::encode_all(&[
        Amf0Value::string("@setDataFrame"),
        Amf0Value::string("onMetaData"),
        meta,
    ]);
    let msg = Message::new(message::DATA_AMF0, 0, 1, payload);
    tcp.write_all(&chunked(5, &msg, CS))
        .map_err(|e| e.to_string())?;
    let tags = flv_tags(src);
    let started = Instant::now();
    for (kind, ts, body) in &tags {
        let due = started + Duration::from_millis(u64::from(*ts));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let csid = if *kind == message::AUDIO { 4 } else { 6 };
        let msg = Message::new(*kind, *ts, 1, body.clone());
        tcp.write_all(&chunked(csid, &msg, CS))
            .map_err(|e| e.to_string())?;
        // Take what the gateway sends (acknowledgements) so it never waits on us.
        let _ = inbox.wait_for(&mut tcp, Duration::ZERO, |_| false);
    }
    // Let the last frames reach the players before unpublishing.
    thread::sleep(Duration::from_millis(500));
    Ok(tags.len())
}

/// `n` plays of `name` on message stream `sid`, chunk stream 8: the first with a fmt 0 header,
/// the others with the 1-byte fmt 3 header (same length, type and stream).
fn play_burst(sid: u32, name: &str, n: usize) -> Vec<u8> {
    let msg = command(
        sid,
        "play",
        0.0,
        &[Amf0Value::Null, Amf0Value::string(name)],
    );
    assert!(msg.payload.len() <= 128, "one chunk per play");
    let mut out = chunked(8, &msg, 128);
    for _ in 1..n {
        out.push(0xc0 | 8);
        out.extend_from_slice(&msg.payload);
    }
    out
}

/// What one attack cost the gateway.
struct Cost {
    rss_growth_kb: u64,
    cpu_ticks: u64,
    attacker_bytes: u64,
    secs: f64,
}

/// One attacker from `src`: connect, two createStreams, then `PLAYS` plays of `key` on
/// message stream 2 in one write, then for `HOLD` either reads everything it is sent (`read`:
/// the gateway has to produce it all, and the live stream goes on arriving) or nothing (the
/// gateway has to hold what it queued), and closes.
fn attack(gw: &Gateway, src: Ipv4Addr, key: &str, read: bool) -> Cost {
    const HOLD: Duration = Duration::from_secs(4);
    let addr = gw.addr("rtmp");
    let mut tcp = connect_from(src, addr).unwrap();
    handshake(&mut tcp).unwrap();
    let mut inbox = Inbox::default();
    connect_and_create_stream(&mut tcp, &mut inbox, addr, Duration::from_secs(5)).unwrap();
    tcp.write_all(&chunked(
        3,
        &command(0, "createStream", 3.0, &[Amf0Value::Null]),
        128,
    ))
    .unwrap();
    inbox
        .command(&mut tcp, "_result", Duration::from_secs(5))
        .expect("second createStream not answered");
    let burst = play_burst(2, key, PLAYS);

    let rss_before = gw.rss_kb();
    let hwm_before = proc_status(gw.pid(), "VmHWM").unwrap_or(0);
    let cpu_before = cpu_ticks(gw.pid());
    let started = Instant::now();
    let reader = {
        let mut rx = tcp.try_clone().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        thread::spawn(move || {
            if !read {
                thread::sleep(HOLD);
                return 0;
            }
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            let deadline = Instant::now() + HOLD;
            while Instant::now() < deadline {
                match rx.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n as u64,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
            got
        })
    };
    tcp.write_all(&burst).unwrap();
    let mut peak = rss_before;
    while !reader.is_finished() {
        peak = peak.max(gw.rss_kb());
        thread::sleep(Duration::from_millis(20));
    }
    let attacker_bytes = reader.join().unwrap();
    peak = peak.max(gw.rss_kb());
    let hwm = proc_status(gw.pid(), "VmHWM").unwrap_or(0);
    let cpu = cpu_ticks(gw.pid()).saturating_sub(cpu_before);
    let secs = started.elapsed().as_secs_f64();
    drop(tcp);
    // The high-water mark counts only if the attack raised it (it may date from earlier).
    let hwm_growth = if hwm > hwm_before {
        hwm.saturating_sub(rss_before)
    } else {
        0
    };
    let growth = peak.saturating_sub(rss_before).max(hwm_growth);
    eprintln!(
        "{PLAYS} plays ({} bytes), attacker {}: RSS {rss_before} kB -> peak {peak} kB \
         (VmHWM {hwm} kB): +{growth} kB; CPU {cpu} ticks; attacker received {attacker_bytes} \
         bytes; {secs:.1} s",
        burst.len(),
        if read { "reading" } else { "not reading" },
    );
    Cost {
        rss_growth_kb: growth,
        cpu_ticks: cpu,
        attacker_bytes,
        secs,
    }
}

#[test]
fn thousands_of_plays_in_one_write_cost_bounded_memory_and_cpu() {
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .start();
    let addr = gw.addr("rtmp");
    let url = format!("{}/live/amp", gw.url("rtmp"));
    let dir = temp_dir();
    let src = source_flv(16);
    let want = framemd5(&src);

    // The healthy player starts first and must get the whole stream.
    let out = dir.path().join("player.flv");
    let mut player = PlayerKind::Ffmpeg.start(&url, &out);
    assert!(
        wait_until(START_TIMEOUT, || gw.log_contains("play live/amp")),
        "the player did not get as far as play; its output:\n{}",
        player.log()
    );
    let publ = {
        let src = src.clone();
        thread::spawn(move || publish_raw(addr, "amp", &src))
    };
    assert!(
        wait_until(START_TIMEOUT, || gw.log_contains("publish live/amp")),
        "the publisher did not start"
    );
    // Let the metadata and a GOP or two reach the cache.
    thread::sleep(Duration::from_secs(2));
    let held = attack(&gw, Ipv4Addr::new(127, 0, 0, 77), "amp", false);
    let read = attack(&gw, Ipv4Addr::new(127, 0, 0, 78), "amp", true);

    let sent = publ.join().expect("the publisher panicked");
    assert!(sent.is_ok(), "the publisher failed: {sent:?}");
    assert!(
        player.wait_timeout(PLAYER_TAIL).is_some(),
        "the player did not stop after the publisher left"
    );
    let got = framemd5(&out);
    // Every frame: one run from the source's first packet to within ffmpeg's usual
    // shortfall at the end.
    assert_whole_run(
        "ffmpeg player",
        &want,
        &got,
        PlayerKind::Ffmpeg.max_tail_ms(),
    );
    let log = gw.log();
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");
    for (what, c) in [("not reading", &held), ("reading", &read)] {
        assert!(
            c.rss_growth_kb <= MAX_RSS_GROWTH_KB,
            "attacker {what}: RSS grew by {} kB for {PLAYS} plays; bound {MAX_RSS_GROWTH_KB} kB",
            c.rss_growth_kb
        );
        assert!(
            c.cpu_ticks <= MAX_CPU_TICKS,
            "attacker {what}: the attack cost {} ticks of CPU in {:.1} s; bound \
             {MAX_CPU_TICKS}",
            c.cpu_ticks,
            c.secs
        );
    }
    assert!(
        read.attacker_bytes <= MAX_ATTACKER_BYTES,
        "the attacker received {} bytes for {PLAYS} plays; bound {MAX_ATTACKER_BYTES}",
        read.attacker_bytes
    );
}
