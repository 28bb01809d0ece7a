//! Soak: many concurrent sessions over mixed transports, through the engine and through the
//! gateway to nginx-rtmp. Real players (ffmpeg over rtmps, rtmpt and rtmpts; rtmpdump over
//! rtmp) must each receive one contiguous run of an ffmpeg publisher's source; lightweight
//! raw-socket publishers number every audio message and their raw players must see every
//! number in order; afterwards the gateway's fds return to baseline and its memory near it.
//!
//! The short form runs in the test suite (about a minute). The long form is
//! `scripts/soak.sh` (at least 200 sessions for several minutes), which runs the ignored
//! `soak_long_*` tests with SOAK_* sizes from the environment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod hostile_support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hostile_support::*;
use rtmpgate::rtmp::amf0::Amf0Value;
use rtmpgate::rtmp::message::{self, Message};

const REAP_SECS: u64 = 2;

/// How big a soak is.
#[derive(Clone, Copy, Debug)]
struct Size {
    /// Seconds of media each publisher sends.
    secs: u32,
    /// Raw players on the ffmpeg publisher's stream.
    raw_players_on_ffmpeg: usize,
    /// Raw publishers, each on its own key...
    raw_publishers: usize,
    /// ...with this many raw players each.
    raw_players_each: usize,
}

impl Size {
    fn sessions(&self) -> usize {
        // The ffmpeg publisher and its four real players.
        5 + self.raw_players_on_ffmpeg + self.raw_publishers * (1 + self.raw_players_each)
    }

    fn from_env(default: Size) -> Size {
        let get = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Size {
            secs: get("SOAK_SECS", default.secs as usize) as u32,
            raw_players_on_ffmpeg: get("SOAK_RAW_PLAYERS", default.raw_players_on_ffmpeg),
            raw_publishers: get("SOAK_RAW_PUBLISHERS", default.raw_publishers),
            raw_players_each: get("SOAK_RAW_PLAYERS_EACH", default.raw_players_each),
        }
    }
}

const SHORT: Size = Size {
    secs: 30,
    raw_players_on_ffmpeg: 30,
    raw_publishers: 6,
    raw_players_each: 3,
};

const LONG: Size = Size {
    secs: 300,
    raw_players_on_ffmpeg: 120,
    raw_publishers: 20,
    raw_players_each: 4,
};

/// Audio messages a raw publisher sends per second.
const RATE: u32 = 25;

/// A raw RTMP session up to `connect` and `createStream` answered (stream id 1).
fn raw_session(addr: SocketAddr) -> Result<(TcpStream, Inbox), String> {
    let mut tcp = connect_from(Ipv4Addr::LOCALHOST, addr).map_err(|e| format!("connect: {e}"))?;
    handshake(&mut tcp).map_err(|e| format!("handshake: {e}"))?;
    let mut inbox = Inbox::default();
    connect_and_create_stream(&mut tcp, &mut inbox, addr, Duration::from_secs(15))?;
    Ok((tcp, inbox))
}

/// Publishes `secs` of numbered audio messages on `key` in real time.
fn raw_publisher(addr: SocketAddr, key: &str, secs: u32) -> Result<u32, String> {
    let (mut tcp, mut inbox) = raw_session(addr)?;
    let publish = command(
        1,
        "publish",
        3.0,
        &[
            Amf0Value::Null,
            Amf0Value::String(key.into()),
            Amf0Value::String("live".into()),
        ],
    );
    tcp.write_all(&chunked(8, &publish, 128))
        .map_err(|e| e.to_string())?;
    inbox
        .wait_for(&mut tcp, Duration::from_secs(15), |m| {
            m.msg_type == message::COMMAND_AMF0
                && String::from_utf8_lossy(&m.payload).contains("Publish.Start")
        })
        .ok_or_else(|| format!("publish {key} not started"))?;
    // Reads below only drain what is there; they must not hold up the sending.
    tcp.set_read_timeout(Some(Duration::from_millis(1)))
        .map_err(|e| e.to_string())?;
    // AAC sequence header, then numbered AAC frames.
    let header = Message::new(message::AUDIO, 0, 1, vec![0xAF, 0x00, 0x12, 0x10]);
    tcp.write_all(&chunked(4, &header, 128))
        .map_err(|e| e.to_string())?;
    let total = secs * RATE;
    let started = Instant::now();
    let step = Duration::from_millis(u64::from(1000 / RATE));
    for n in 0..total {
        let mut p = vec![0xAF, 0x01];
        p.extend_from_slice(&n.to_be_bytes());
        p.resize(200, 0x55);
        let ts = n * (1000 / RATE);
        let m = Message::new(message::AUDIO, ts, 1, p);
        tcp.write_all(&chunked(4, &m, 128))
            .map_err(|e| format!("publishing {key}, message {n}: {e}"))?;
        // Drain what the server sends (acks, pings) so it never blocks on us.
        let _ = inbox.wait_for(&mut tcp, Duration::ZERO, |_| false);
        let due = started + step * (n + 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    let _ = tcp.write_all(&chunked(
        3,
        &command(
            1,
            "deleteStream",
            4.0,
            &[Amf0Value::Null, Amf0Value::Number(1.0)],
        ),
        128,
    ));
    thread::sleep(Duration::from_millis(200));
    Ok(total)
}

/// What a raw player saw.
#[derive(Debug, Default)]
struct Seen {
    media: u64,
    /// Numbered messages (from a raw publisher): first, last, and breaks in the sequence.
    first: Option<u32>,
    last: Option<u32>,
    breaks: u64,
    /// Timestamps going backwards within one media type.
    backwards: u64,
}

/// Plays `key` until no media for 4 s after the first, or `limit`. Acknowledges windows.
fn raw_player(addr: SocketAddr, key: &str, limit: Duration) -> Result<Seen, String> {
    let (mut tcp, inbox) = raw_session(addr)?;
    let play = command(
        1,
        "play",
        3.0,
        &[Amf0Value::Null, Amf0Value::String(key.into())],
    );
    tcp.write_all(&chunked(8, &play, 128))
        .map_err(|e| e.to_string())?;
    // The same decoder: the server's chunk streams are already open in it.
    let Inbox {
        mut dec, mut buf, ..
    } = inbox;
    let mut tmp = vec![0u8; 65536];
    let mut seen = Seen::default();
    let mut last_ts = [None::<u32>; 2];
    let (mut window, mut received, mut acked) = (2_500_000u64, 0u64, 0u64);
    let end = Instant::now() + limit;
    let mut last_media = None::<Instant>;
    loop {
        if Instant::now() >= end || last_media.is_some_and(|t| t.elapsed() > Duration::from_secs(4))
        {
            break;
        }
        match std::io::Read::read(&mut tcp, &mut tmp) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                received += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("play {key}: {e}")),
        }
        loop {
            let m = match dec.decode(&mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Err(format!("play {key}: bad chunk stream from server: {e}")),
            };
            match m.msg_type {
                message::WINDOW_ACK_SIZE => {
                    if let Ok(w) = message::parse_window_ack_size(&m.payload) {
                        window = u64::from(w.max(1));
                    }
                }
                message::AUDIO | message::VIDEO => {
                    seen.media += 1;
                    last_media = Some(Instant::now());
                    let k = usize::from(m.msg_type == message::VIDEO);
                    if last_ts[k].is_some_and(|t| m.timestamp < t) {
                        seen.backwards += 1;
                    }
                    last_ts[k] = Some(m.timestamp);
                    if m.msg_type == message::AUDIO && m.payload.len() == 200 {
                        let n = u32::from_be_bytes([
                            m.payload[2],
                            m.payload[3],
                            m.payload[4],
                            m.payload[5],
                        ]);
                        if seen.last.is_some_and(|l| n != l + 1) {
                            seen.breaks += 1;
                        }
                        seen.first.get_or_insert(n);
                        seen.last = Some(n);
                    }
                }
                _ => {}
            }
        }
        if received - acked >= window {
            acked = received;
            let seq = (received & 0xffff_ffff) as u32;
            let _ = tcp.write_all(&chunked(2, &message::acknowledgement(seq), 128));
        }
    }
    Ok(seen)
}

fn soak(gw: &Gateway, size: Size, label: &str) {
    let p = peers();
    eprintln!("{label}: {size:?}, {} sessions", size.sessions());
    let baseline = gw.usage();
    let dir = temp_dir();
    let src_file = source_flv(size.secs);
    let src = framemd5(&src_file);
    let addr = gw.addr("rtmp");
    let peak_fds = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let limit = Duration::from_secs(u64::from(size.secs) + 40);
    let started = Instant::now();

    thread::scope(|s| {
        // Raw players first: they wait for their publishers.
        let ffmpeg_key = "soak-ffmpeg";
        let on_ffmpeg: Vec<_> = (0..size.raw_players_on_ffmpeg)
            .map(|_| s.spawn(move || raw_player(addr, ffmpeg_key, limit)))
            .collect();
        let mut on_raw = Vec::new();
        for i in 0..size.raw_publishers {
            for _ in 0..size.raw_players_each {
                on_raw.push((
                    i,
                    s.spawn(move || raw_player(addr, &format!("soak-raw-{i}"), limit)),
                ));
            }
        }
        thread::sleep(Duration::from_secs(1));
        let publishers: Vec<_> = (0..size.raw_publishers)
            .map(|i| s.spawn(move || raw_publisher(addr, &format!("soak-raw-{i}"), size.secs)))
            .collect();
        let sampler = {
            let (peak_fds, peak_rss) = (peak_fds.clone(), peak_rss.clone());
            let pid = gw.pid();
            s.spawn(move || {
                let end = Instant::now() + limit;
                while Instant::now() < end && peak_fds.load(Ordering::Relaxed) != u64::MAX {
                    peak_fds.fetch_max(fd_count(pid) as u64, Ordering::Relaxed);
                    peak_rss.fetch_max(rss_kb(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(250));
                }
            })
        };
        let key = format!("live/{ffmpeg_key}");
        let real = publish_and_play(
            dir.path(),
            &p.ffmpeg,
            &format!("{}/{key}", gw.url("rtmp")),
            &src_file,
            &[
                (PlayerKind::Ffmpeg, format!("{}/{key}", gw.url("rtmps"))),
                (PlayerKind::Ffmpeg, format!("{}/{key}", gw.url("rtmpt"))),
                (PlayerKind::Ffmpeg, format!("{}/{key}", gw.url("rtmpts"))),
                (PlayerKind::Rtmpdump, format!("{}/{key}", gw.url("rtmp"))),
            ],
        );
        for r in &real {
            r.assert_run_of(&src);
        }
        let sent: Vec<u32> = publishers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{label}: raw publisher: {e}"))
            })
            .collect();
        let mut short = 0;
        for (i, h) in on_raw {
            let seen = h
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{label}: raw player of soak-raw-{i}: {e}"));
            assert_eq!(seen.breaks, 0, "{label}: soak-raw-{i}: gaps in {seen:?}");
            assert_eq!(seen.backwards, 0, "{label}: soak-raw-{i}: {seen:?}");
            let got = seen.last.map_or(0, |l| l + 1 - seen.first.unwrap_or(0));
            // Players start a second before their publisher: every number, from the first.
            if seen.first != Some(0) || got != sent[i] {
                short += 1;
                eprintln!(
                    "{label}: soak-raw-{i} player got {got} of {}: {seen:?}",
                    sent[i]
                );
            }
        }
        assert_eq!(short, 0, "{label}: {short} raw player(s) missed messages");
        let mut media = Vec::new();
        for h in on_ffmpeg {
            let seen = h
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{label}: raw player of the ffmpeg stream: {e}"));
            assert_eq!(seen.backwards, 0, "{label}: {seen:?}");
            media.push(seen.media);
        }
        // They also start before their publisher and read to the end: every packet. They
        // count FLV media messages, which also carry the AVC and AAC sequence headers and
        // the AVC end of sequence (3, which framemd5 does not list as packets).
        let want = src.len() as u64;
        let low = media
            .iter()
            .filter(|&&m| !(want..=want + 3).contains(&m))
            .count();
        eprintln!(
            "{label}: raw players of the ffmpeg stream got {:?}..{:?} of {want} packets",
            media.iter().min(),
            media.iter().max()
        );
        assert_eq!(
            low, 0,
            "{label}: {low} raw player(s) did not get every one of the source's {want} packets"
        );
        peak_fds.store(u64::MAX, Ordering::Relaxed);
        sampler.join().unwrap();
    });

    let log = gw.log();
    assert!(!log.contains("panicked"), "{label}: the gateway panicked");
    gw.assert_fds_back_to(baseline.fds, Duration::from_secs(REAP_SECS + 15));
    thread::sleep(Duration::from_secs(1));
    let end = gw.usage();
    eprintln!(
        "{label}: {} sessions in {:.0} s; rtmpgate before {baseline:?}, peak rss {} kB, after {end:?}",
        size.sessions(),
        started.elapsed().as_secs_f64(),
        peak_rss.load(Ordering::Relaxed)
    );
    // Memory the allocator keeps for reuse is fine; memory that grows with sessions is not.
    let grown = end.rss_kb.saturating_sub(baseline.rss_kb);
    assert!(
        grown < 64 * 1024,
        "{label}: rtmpgate's RSS is {grown} kB above its baseline after every session ended"
    );
}

fn gateway(extra: &[&str]) -> Gateway {
    Gateway::builder()
        .config(&format!("[limits]\ntunnel_reap_secs = {REAP_SECS}\n"))
        .rtmp_and_rtmps()
        .args(extra)
        .start()
}

#[test]
fn soak_short_engine() {
    let gw = gateway(&[]);
    soak(&gw, Size::from_env(SHORT), "engine");
}

#[test]
fn soak_short_relay_to_nginx() {
    let nginx = Nginx::start();
    let gw = gateway(&["--upstream", &nginx.upstream()]);
    soak(&gw, Size::from_env(SHORT), "relay to nginx-rtmp");
    assert!(
        wait_until(Duration::from_secs(10), || nginx.clients() == 0),
        "nginx still has {} connections from the gateway",
        nginx.clients()
    );
}

#[test]
#[ignore = "long soak: run scripts/soak.sh"]
fn soak_long_engine() {
    let gw = gateway(&[]);
    soak(&gw, Size::from_env(LONG), "engine (long)");
}

#[test]
#[ignore = "long soak: run scripts/soak.sh"]
fn soak_long_relay_to_nginx() {
    let nginx = Nginx::start();
    let gw = gateway(&["--upstream", &nginx.upstream()]);
    soak(&gw, Size::from_env(LONG), "relay to nginx-rtmp (long)");
    assert!(
        wait_until(Duration::from_secs(10), || nginx.clients() == 0),
        "nginx still has {} connections from the gateway",
        nginx.clients()
    );
}
