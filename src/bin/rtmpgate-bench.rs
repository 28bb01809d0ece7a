//! `rtmpgate-bench`: an RTMP load generator. N publishers and M players over rtmp, rtmps,
//! rtmpt or rtmpts; synthetic frames that carry a send time, a sequence number and a
//! checksum (so every player measures end-to-end latency, loss and corruption per frame),
//! or an FLV file played in a loop. Progress every second, a JSON summary line at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use rtmpgate::client::conn::PUBLISH_CHUNK_SIZE;
use rtmpgate::client::{RtmpConnection, RtmpUrl, TlsOptions};
use rtmpgate::rtmp::message::{self, Message};
use rtmpgate::rtmp::session::ClientEvent;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

const ABOUT: &str = "Load-test an RTMP server or gateway: publishers and players over \
rtmp, rtmps, rtmpt or rtmpts, with per-frame latency, loss and corruption checks.";

const AFTER_HELP: &str = "\
EXAMPLES:
  # one 3 Mb/s publisher and 100 players for 30 s against a local server
  rtmpgate-bench --url rtmp://127.0.0.1:1935/live/bench -p 1 -c 100 -d 30

  # publish straight to the backend, play through the gateway's HTTP tunnel
  rtmpgate-bench --url rtmp://127.0.0.1:1935/live/x --play-url rtmpt://127.0.0.1:8080/live/x

  # as fast as the path allows (relay throughput), 64 KB frames
  rtmpgate-bench --url rtmps://localhost:8443/live/t --insecure --bitrate 0 --frame-bytes 65536

  # memory per idle connection: 5000 connections that connect and then sit
  rtmpgate-bench --url rtmp://127.0.0.1:1935/live --idle 5000 -d 20

OUTPUT:
  one progress line a second on stderr; at the end a summary on stderr and one JSON line
  on stdout (the last line) with every figure, for scripts.

SYNTHETIC FRAMES:
  FLV video tags (AVC, keyframe flag every --gop frames, after one sequence header) whose
  payload starts with the magic RGB1, the publisher index, a sequence number, the send
  time (ns since the Unix epoch; publisher and players must share a clock) and a 64-bit
  checksum of the rest. Players report a frame as lost when its sequence number skips,
  corrupted when its checksum or length is wrong. Frames from --flv are counted but carry
  no timing, so latency is only measured with synthetic frames.";

#[derive(Parser, Debug, Clone)]
#[command(name = "rtmpgate-bench", version, about = ABOUT, after_help = AFTER_HELP)]
struct Args {
    /// Where to publish (and play, unless --play-url): SCHEME://HOST[:PORT]/APP[/STREAM]
    /// with SCHEME rtmp, rtmps, rtmpt or rtmpts. The stream name defaults to "bench".
    #[arg(short, long)]
    url: String,
    /// Where players play from, if not --url (e.g. publish direct, play through a gateway).
    #[arg(long)]
    play_url: Option<String>,
    /// Publishers. With more than one, publisher i publishes STREAM + i and players are
    /// spread over them round-robin.
    #[arg(short, long, default_value_t = 1)]
    publishers: usize,
    /// Players.
    #[arg(short = 'c', long, default_value_t = 1)]
    players: usize,
    /// Seconds to run after the publishers are live.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Milliseconds players wait after the publishers are live (late joiners).
    #[arg(long, default_value_t = 500)]
    player_delay: u64,
    /// New connections per second while players (or idle connections) start; 0 = all at once.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Seconds after the last player started before throughput is measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Video bitrate per publisher, bits/s (suffix k or M); 0 = as fast as the path allows.
    #[arg(short, long, default_value = "3M", value_parser = parse_rate)]
    bitrate: u64,
    /// Frames per second (synthetic media).
    #[arg(long, default_value_t = 30.0)]
    fps: f64,
    /// Frames per group of pictures: every GOP-th frame is a keyframe.
    #[arg(long, default_value_t = 30)]
    gop: u64,
    /// Frame size in bytes when --bitrate is 0.
    #[arg(long, default_value_t = 16384)]
    frame_bytes: usize,
    /// Publish this FLV file in a loop (at its own pace) instead of synthetic frames.
    #[arg(long)]
    flv: Option<PathBuf>,
    /// Only open connections (handshake and connect) and hold them: memory per idle
    /// connection. Prints "READY n" on stderr when all are connected.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Do not verify payload checksums in players (saves the load generator's CPU).
    #[arg(long)]
    no_verify: bool,
    /// TLS: accept any server certificate (self-signed test servers).
    #[arg(long)]
    insecure: bool,
    /// TLS: trust the CA certificates in this PEM file instead of the system's.
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('m' | 'M') => (&s[..s.len() - 1], 1e6),
        Some('g' | 'G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 3M, 800k or 0"))?;
    if !(0.0..=1e12).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((v * mul) as u64)
}

// ---------------------------------------------------------------------------------------
// Statistics shared by every task.

/// Latency histogram: 10 us buckets to 100 ms, then 1 ms buckets to 10 s, then overflow.
struct Histogram {
    buckets: Vec<AtomicU64>,
}

const FINE_US: u64 = 10;
const FINE_BUCKETS: u64 = 10_000;
const COARSE_US: u64 = 1_000;
const COARSE_BUCKETS: u64 = 9_900;

impl Histogram {
    fn new() -> Self {
        let n = (FINE_BUCKETS + COARSE_BUCKETS + 1) as usize;
        Histogram {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn index(us: u64) -> usize {
        let fine_end = FINE_US * FINE_BUCKETS;
        let i = if us < fine_end {
            us / FINE_US
        } else {
            (FINE_BUCKETS + (us - fine_end) / COARSE_US).min(FINE_BUCKETS + COARSE_BUCKETS)
        };
        i as usize
    }
    fn upper_us(i: usize) -> u64 {
        let i = i as u64;
        if i < FINE_BUCKETS {
            (i + 1) * FINE_US
        } else {
            FINE_US * FINE_BUCKETS + (i - FINE_BUCKETS + 1) * COARSE_US
        }
    }
    fn record(&self, us: u64) {
        if let Some(b) = self.buckets.get(Self::index(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn snapshot(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// Percentiles (ms) of a histogram snapshot, or of the difference of two.
fn percentiles(now: &[u64], before: Option<&[u64]>, qs: &[f64]) -> (u64, Vec<f64>) {
    let counts: Vec<u64> = match before {
        Some(b) => now
            .iter()
            .zip(b)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
        None => now.to_vec(),
    };
    let total: u64 = counts.iter().sum();
    let mut out = Vec::with_capacity(qs.len());
    for &q in qs {
        if total == 0 {
            out.push(f64::NAN);
            continue;
        }
        let want = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut acc = 0;
        let mut at = counts.len().saturating_sub(1);
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                at = i;
                break;
            }
        }
        out.push(Histogram::upper_us(at) as f64 / 1000.0);
    }
    (total, out)
}

#[derive(Default)]
struct Counters {
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_lost: AtomicU64,
    frames_corrupted: AtomicU64,
    frames_reordered: AtomicU64,
    publishers_live: AtomicU64,
    players_live: AtomicU64,
    players_started: AtomicU64,
    idle_connected: AtomicU64,
    connect_errors: AtomicU64,
    disconnects: AtomicU64,
}

struct Stats {
    c: Counters,
    latency: Histogram,
    /// Per player: connect start to first frame, and play command to first frame (ms).
    ttff: Mutex<Vec<(f64, f64)>>,
    errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        let line = format!("{what}: {e}");
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 8 && !v.contains(&line) {
                eprintln!("error: {line}");
                v.push(line);
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Synthetic frames.

const MAGIC: &[u8; 4] = b"RGB1";
/// FLV video tag header (frame type + codec, AVC packet type, composition time).
const TAG_HEAD: usize = 5;
/// magic, publisher, seq, send time, length, checksum.
const BENCH_HEAD: usize = 4 + 4 + 8 + 8 + 4 + 8;
/// An AVCDecoderConfigurationRecord (x264, 640x360), sent once as the sequence header.
const AVC_SEQUENCE_HEADER: &str = "17000000000164001effe1001a6764001eacd940a02ff970110000030001\
000003003c0f162d9601000668ebe3cb22c0fdf8f800";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// A fast 64-bit checksum (word-wise multiply-rotate); not cryptographic.
fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15 ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(a))
            .wrapping_mul(0x0100_0000_01B3)
            .rotate_left(29);
    }
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    h
}

/// Builds frame `seq` of publisher `publisher`: `len` bytes of video tag body in total.
fn synthetic_frame(publisher: u32, seq: u64, key: bool, len: usize, filler: &[u8]) -> Bytes {
    let len = len.max(TAG_HEAD + BENCH_HEAD);
    let mut b = BytesMut::with_capacity(len);
    b.put_u8(if key { 0x17 } else { 0x27 });
    b.put_slice(&[1, 0, 0, 0]);
    b.put_slice(MAGIC);
    b.put_u32(publisher);
    b.put_u64(seq);
    b.put_u64(now_ns());
    b.put_u32(len as u32);
    let sum_at = b.len();
    b.put_u64(0);
    let rest = len - b.len();
    let off = (seq as usize % 61) % filler.len().max(1);
    let fill = filler.get(off..off + rest).unwrap_or_default();
    b.put_slice(fill);
    b.resize(len, 0xA5);
    let sum = checksum(&b[sum_at + 8..]) ^ seq;
    b[sum_at..sum_at + 8].copy_from_slice(&sum.to_be_bytes());
    b.freeze()
}

enum Check {
    Ok { seq: u64, sent_ns: u64 },
    Corrupt,
    Foreign,
}

fn check_frame(p: &[u8], verify: bool) -> Check {
    let Some(h) = p.get(TAG_HEAD..TAG_HEAD + BENCH_HEAD) else {
        return Check::Foreign;
    };
    if &h[..4] != MAGIC {
        return Check::Foreign;
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[i..i + 8]);
        u64::from_be_bytes(a)
    };
    let seq = u64_at(8);
    let sent_ns = u64_at(16);
    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    if len != p.len() {
        return Check::Corrupt;
    }
    if verify && u64_at(28) != checksum(&p[TAG_HEAD + BENCH_HEAD..]) ^ seq {
        return Check::Corrupt;
    }
    Check::Ok { seq, sent_ns }
}

// ---------------------------------------------------------------------------------------
// FLV input.

/// Audio, video and data tags of an FLV file, with their timestamps.
fn read_flv(path: &PathBuf) -> Result<Vec<Message>> {
    let d = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if d.get(..3) != Some(b"FLV") {
        bail!("{} is not an FLV file (no FLV signature)", path.display());
    }
    let mut at = d
        .get(5..9)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .unwrap_or(9)
        .saturating_add(4);
    let mut out = Vec::new();
    while let Some(h) = d.get(at..at + 11) {
        let ty = h[0];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let Some(body) = d.get(at + 11..at + 11 + size) else {
            break;
        };
        if matches!(ty, message::AUDIO | message::VIDEO | message::DATA_AMF0) {
            out.push(Message::new(ty, ts, 0, Bytes::copy_from_slice(body)));
        }
        at += 11 + size + 4;
    }
    if !out.iter().any(|m| m.msg_type == message::VIDEO) {
        bail!("{} holds no video tags", path.display());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Roles.

struct Ctx {
    args: Args,
    url: RtmpUrl,
    play_url: RtmpUrl,
    tls: Option<TlsConnector>,
    stats: Stats,
    flv: Option<Vec<Message>>,
    filler: Vec<u8>,
    /// Flips to true when the run is over.
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn stream_name(&self, base: &RtmpUrl, i: usize) -> String {
        let base = if base.stream.is_empty() {
            "bench"
        } else {
            &base.stream
        };
        if self.args.publishers > 1 {
            format!("{base}{i}")
        } else {
            base.to_owned()
        }
    }
}

async fn publisher(ctx: Arc<Ctx>, index: usize, live: tokio::sync::mpsc::Sender<()>) {
    let c = &ctx.stats.c;
    let mut conn = match open_and_connect(&ctx, &ctx.url, true).await {
        Ok(conn) => conn,
        Err(e) => {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("publisher {index}"), &e);
            return;
        }
    };
    let name = ctx.stream_name(&ctx.url, index);
    let sid = match conn.publish(&name).await {
        Ok(sid) => sid,
        Err(e) => {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
            ctx.stats
                .error(&format!("publisher {index}: publish {name}"), &e);
            return;
        }
    };
    conn.set_eager_poll(false);
    c.publishers_live.fetch_add(1, Ordering::Relaxed);
    drop(live);
    let r = match &ctx.flv {
        Some(tags) => publish_flv(&ctx, &mut conn, sid, tags).await,
        None => publish_synthetic(&ctx, &mut conn, sid, index as u32).await,
    };
    c.publishers_live.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = r {
        c.disconnects.fetch_add(1, Ordering::Relaxed);
        ctx.stats.error(&format!("publisher {index}"), &e);
    }
}

/// Sends media and, without blocking on it, drains what the server sends back.
async fn publish_synthetic(
    ctx: &Ctx,
    conn: &mut RtmpConnection,
    sid: u32,
    index: u32,
) -> Result<(), rtmpgate::client::ClientError> {
    let a = &ctx.args;
    let c = &ctx.stats.c;
    let unlimited = a.bitrate == 0;
    let fps = if a.fps > 0.0 { a.fps } else { 30.0 };
    let frame_len = if unlimited {
        a.frame_bytes
    } else {
        ((a.bitrate as f64 / 8.0 / fps) as usize).max(TAG_HEAD + BENCH_HEAD)
    };
    let interval = Duration::from_secs_f64(1.0 / fps);
    conn.queue_media(sid, message::VIDEO, 0, hex(AVC_SEQUENCE_HEADER).into());
    conn.flush().await?;
    let start = tokio::time::Instant::now();
    let mut stop = ctx.stop.clone();
    let mut out_counted = conn.bytes_out;
    let gop = a.gop.max(1);
    for seq in 0u64.. {
        if *stop.borrow() {
            break;
        }
        if !unlimited {
            let due = start + interval.mul_f64(seq as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.changed() => break,
            }
        }
        let ts = (seq as f64 * 1000.0 / fps) as u32;
        let payload = synthetic_frame(index, seq, seq % gop == 0, frame_len, &ctx.filler);
        conn.queue_media(sid, message::VIDEO, ts, payload);
        tokio::select! {
            r = conn.flush() => r?,
            _ = stop.changed() => break,
        }
        c.frames_sent.fetch_add(1, Ordering::Relaxed);
        c.bytes_out
            .fetch_add(conn.bytes_out - out_counted, Ordering::Relaxed);
        out_counted = conn.bytes_out;
        drain_incoming(conn).await?;
    }
    Ok(())
}

/// Reads whatever the server sent (acks, pings) without waiting for more.
async fn drain_incoming(conn: &mut RtmpConnection) -> Result<(), rtmpgate::client::ClientError> {
    conn.drain_available()
}

async fn publish_flv(
    ctx: &Ctx,
    conn: &mut RtmpConnection,
    sid: u32,
    tags: &[Message],
) -> Result<(), rtmpgate::client::ClientError> {
    let c = &ctx.stats.c;
    let span = tags
        .last()
        .map(|m| m.timestamp)
        .unwrap_or(0)
        .saturating_add(40);
    let start = tokio::time::Instant::now();
    let mut stop = ctx.stop.clone();
    let mut out_counted = conn.bytes_out;
    for round in 0u32.. {
        for tag in tags {
            // Codec headers and metadata once, at the start.
            if round > 0 && is_flv_header(tag) {
                continue;
            }
            let ts = tag.timestamp.wrapping_add(round.wrapping_mul(span));
            if ctx.args.bitrate != 0 {
                let due = start + Duration::from_millis(u64::from(ts));
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stop.changed() => return Ok(()),
                }
            } else if *stop.borrow() {
                return Ok(());
            }
            conn.queue_media(sid, tag.msg_type, ts, tag.payload.clone());
            tokio::select! {
                r = conn.flush() => r?,
                _ = stop.changed() => return Ok(()),
            }
            if tag.msg_type == message::VIDEO {
                c.frames_sent.fetch_add(1, Ordering::Relaxed);
            }
            c.bytes_out
                .fetch_add(conn.bytes_out - out_counted, Ordering::Relaxed);
            out_counted = conn.bytes_out;
            drain_incoming(conn).await?;
        }
    }
    Ok(())
}

/// Metadata and codec configuration (AVC/HEVC sequence header, AAC config): sent once.
fn is_flv_header(tag: &Message) -> bool {
    let p = &tag.payload;
    match tag.msg_type {
        message::DATA_AMF0 => true,
        message::VIDEO => matches!(p.first(), Some(b) if b & 0x0f >= 7) && p.get(1) == Some(&0),
        message::AUDIO => matches!(p.first(), Some(b) if b >> 4 == 10) && p.get(1) == Some(&0),
        _ => false,
    }
}

async fn open_and_connect(
    ctx: &Ctx,
    url: &RtmpUrl,
    publisher: bool,
) -> Result<RtmpConnection, rtmpgate::client::ClientError> {
    let mut conn = RtmpConnection::open(url, ctx.tls.as_ref()).await?;
    if publisher {
        conn.set_chunk_size(PUBLISH_CHUNK_SIZE).await?;
    }
    conn.connect(url, publisher).await?;
    Ok(conn)
}

/// Per-player frame accounting.
struct Seen {
    next: Option<u64>,
}

fn account(ctx: &Ctx, seen: &mut Seen, msg: &Message) {
    let c = &ctx.stats.c;
    if msg.msg_type != message::VIDEO || msg.payload.get(1) == Some(&0) {
        return;
    }
    c.frames_received.fetch_add(1, Ordering::Relaxed);
    match check_frame(&msg.payload, !ctx.args.no_verify) {
        Check::Ok { seq, sent_ns } => {
            let lat_us = now_ns().saturating_sub(sent_ns) / 1000;
            ctx.stats.latency.record(lat_us);
            match seen.next {
                Some(n) if seq > n => {
                    c.frames_lost.fetch_add(seq - n, Ordering::Relaxed);
                }
                Some(n) if seq < n => {
                    c.frames_reordered.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            seen.next = Some(match seen.next {
                Some(n) if seq < n => n,
                _ => seq.saturating_add(1),
            });
        }
        Check::Corrupt => {
            c.frames_corrupted.fetch_add(1, Ordering::Relaxed);
        }
        Check::Foreign => {}
    }
}

async fn player(ctx: Arc<Ctx>, index: usize) {
    let c = &ctx.stats.c;
    c.players_started.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let name = ctx.stream_name(&ctx.play_url, index % ctx.args.publishers.max(1));
    let mut conn = match open_and_connect(&ctx, &ctx.play_url, false).await {
        Ok(conn) => conn,
        Err(e) => {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("player {index}"), &e);
            return;
        }
    };
    let t_play = Instant::now();
    let early = match conn.play(&name).await {
        Ok((_, early)) => early,
        Err(e) => {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("player {index}: play {name}"), &e);
            return;
        }
    };
    c.players_live.fetch_add(1, Ordering::Relaxed);
    let mut seen = Seen { next: None };
    let mut first = false;
    let mut on_media = |msg: &Message, first: &mut bool| {
        if !*first && msg.msg_type == message::VIDEO && msg.payload.get(1) != Some(&0) {
            *first = true;
            let now = Instant::now();
            if let Ok(mut v) = ctx.stats.ttff.lock() {
                v.push((
                    (now - t0).as_secs_f64() * 1e3,
                    (now - t_play).as_secs_f64() * 1e3,
                ));
            }
        }
        account(&ctx, &mut seen, msg);
    };
    for m in &early {
        on_media(m, &mut first);
    }
    let mut stop = ctx.stop.clone();
    let mut counted = conn.bytes_in;
    let mut result = Ok(());
    loop {
        tokio::select! {
            r = conn.recv() => match r {
                Ok(ev) => {
                    if let ClientEvent::Media(msg) = &ev {
                        on_media(msg, &mut first);
                    }
                    if conn.bytes_in - counted >= 64 * 1024 {
                        c.bytes_in.fetch_add(conn.bytes_in - counted, Ordering::Relaxed);
                        counted = conn.bytes_in;
                    }
                }
                Err(e) => { result = Err(e); break; }
            },
            _ = stop.changed() => break,
        }
    }
    c.bytes_in
        .fetch_add(conn.bytes_in - counted, Ordering::Relaxed);
    c.players_live.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = result {
        if !*ctx.stop.borrow() {
            c.disconnects.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("player {index}"), &e);
        }
    }
}

async fn idle_conn(ctx: Arc<Ctx>, index: usize) {
    let c = &ctx.stats.c;
    let mut conn = match open_and_connect(&ctx, &ctx.url, false).await {
        Ok(conn) => conn,
        Err(e) => {
            c.connect_errors.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("idle connection {index}"), &e);
            return;
        }
    };
    conn.set_eager_poll(false);
    c.idle_connected.fetch_add(1, Ordering::Relaxed);
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            r = conn.recv() => if let Err(e) = r {
                if !*ctx.stop.borrow() {
                    c.disconnects.fetch_add(1, Ordering::Relaxed);
                    ctx.stats.error(&format!("idle connection {index}"), &e);
                }
                break;
            },
            _ = stop.changed() => break,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Driver.

/// Counter values at one instant, for rates.
#[derive(Clone, Copy, Default)]
struct Snap {
    at: f64,
    bytes_out: u64,
    bytes_in: u64,
    frames_sent: u64,
    frames_received: u64,
}

fn snap(c: &Counters, at: f64) -> Snap {
    Snap {
        at,
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
        bytes_in: c.bytes_in.load(Ordering::Relaxed),
        frames_sent: c.frames_sent.load(Ordering::Relaxed),
        frames_received: c.frames_received.load(Ordering::Relaxed),
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

/// Runs tasks from `spawn(i)` for i in 0..n at `rate` per second.
async fn ramp<F>(n: usize, rate: f64, stop: &watch::Receiver<bool>, mut spawn: F)
where
    F: FnMut(usize),
{
    let start = tokio::time::Instant::now();
    for i in 0..n {
        if *stop.borrow() {
            return;
        }
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        spawn(i);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let url = RtmpUrl::parse(&args.url).context("--url")?;
    let play_url = match &args.play_url {
        Some(u) => RtmpUrl::parse(u).context("--play-url")?,
        None => url.clone(),
    };
    let tls = if url.scheme.is_tls() || play_url.scheme.is_tls() {
        let opts = TlsOptions {
            insecure: args.insecure,
            ca: args.ca.clone(),
        };
        Some(opts.connector()?)
    } else {
        None
    };
    let flv = match &args.flv {
        Some(p) => Some(read_flv(p)?),
        None => None,
    };
    let mut filler = vec![
        0u8;
        args.frame_bytes
            .max((args.bitrate / 8) as usize / 2)
            .min(64 << 20)
            + 64
    ];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for b in filler.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let (stop_tx, stop) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        url,
        play_url,
        tls,
        stats: Stats {
            c: Counters::default(),
            latency: Histogram::new(),
            ttff: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        },
        flv,
        filler,
        stop,
    });
    let c = &ctx.stats.c;
    let t0 = Instant::now();
    let secs = || t0.elapsed().as_secs_f64();
    let mut tasks = tokio::task::JoinSet::new();

    // Idle connections: open, report, hold, stop.
    if let Some(n) = args.idle {
        let ctx2 = ctx.clone();
        let stop2 = ctx.stop.clone();
        let mut spawned = Vec::new();
        ramp(n, args.connect_rate, &stop2, |i| {
            spawned.push(tokio::spawn(idle_conn(ctx2.clone(), i)));
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let done =
                c.idle_connected.load(Ordering::Relaxed) + c.connect_errors.load(Ordering::Relaxed);
            if done >= n as u64 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let connected_in = secs();
        eprintln!(
            "READY {} connected, {} errors, in {connected_in:.2} s",
            c.idle_connected.load(Ordering::Relaxed),
            c.connect_errors.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_secs_f64(args.duration.max(0.0))).await;
        let _ = stop_tx.send(true);
        for h in spawned {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        println!(
            "{{\"mode\":\"idle\",\"url\":\"{}\",\"requested\":{n},\"idle_connected\":{},\"connect_errors\":{},\"disconnects\":{},\"connect_secs\":{}}}",
            args.url,
            c.idle_connected.load(Ordering::Relaxed),
            c.connect_errors.load(Ordering::Relaxed),
            c.disconnects.load(Ordering::Relaxed),
            json_num(connected_in)
        );
        return Ok(());
    }

    // Publishers first; players once every publisher is live (or has failed).
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<()>(1);
    for i in 0..args.publishers {
        tasks.spawn(publisher(ctx.clone(), i, live_tx.clone()));
    }
    drop(live_tx);
    let _ = tokio::time::timeout(Duration::from_secs(30), live_rx.recv()).await;
    if args.publishers > 0 && c.publishers_live.load(Ordering::Relaxed) == 0 {
        eprintln!("no publisher went live; see the errors above");
    }
    let run_start = secs();
    let end_at = run_start + args.duration.max(0.0);
    tokio::time::sleep(Duration::from_millis(args.player_delay)).await;

    let ctx2 = ctx.clone();
    let ramp_stop = ctx.stop.clone();
    let players = args.players;
    let rate = args.connect_rate;
    let mut player_handles = Vec::new();
    let ramp_task = async {
        ramp(players, rate, &ramp_stop, |i| {
            player_handles.push(tokio::spawn(player(ctx2.clone(), i)));
        })
        .await;
    };
    // Progress while players ramp up and then run.
    let progress = async {
        let mut last = snap(c, secs());
        let mut last_hist = ctx.stats.latency.snapshot();
        let mut measured: Option<(Snap, Vec<u64>)> = None;
        let ramp_done_at = run_start
            + args.player_delay as f64 / 1e3
            + if rate > 0.0 {
                players as f64 / rate
            } else {
                0.0
            };
        let measure_from = (ramp_done_at + args.warmup)
            .min(end_at - 0.5)
            .max(run_start);
        loop {
            let now = secs();
            if now >= end_at {
                break;
            }
            if measured.is_none() && now >= measure_from {
                measured = Some((snap(c, now), ctx.stats.latency.snapshot()));
            }
            let next = (now + 1.0).min(end_at).max(measure_from.min(end_at));
            let wait = if measured.is_none() && measure_from > now && measure_from < now + 1.0 {
                measure_from - now
            } else {
                next - now
            };
            tokio::time::sleep(Duration::from_secs_f64(wait.max(0.001))).await;
            let s = snap(c, secs());
            let hist = ctx.stats.latency.snapshot();
            if !args.quiet && s.at - last.at >= 0.9 {
                let dt = s.at - last.at;
                let (_, p) = percentiles(&hist, Some(&last_hist), &[0.5, 0.99]);
                eprintln!(
                    "{:6.1}s pub {}/{} play {}/{} | out {:8.2} Mb/s in {:9.2} Mb/s | frames sent {} recv {} lost {} corrupt {} | latency p50 {} p99 {} ms | errors {} drops {}",
                    s.at - run_start,
                    c.publishers_live.load(Ordering::Relaxed),
                    args.publishers,
                    c.players_live.load(Ordering::Relaxed),
                    args.players,
                    mbps(s.bytes_out - last.bytes_out, dt),
                    mbps(s.bytes_in - last.bytes_in, dt),
                    s.frames_sent - last.frames_sent,
                    s.frames_received - last.frames_received,
                    c.frames_lost.load(Ordering::Relaxed),
                    c.frames_corrupted.load(Ordering::Relaxed),
                    fmt_ms(p[0]),
                    fmt_ms(p[1]),
                    c.connect_errors.load(Ordering::Relaxed),
                    c.disconnects.load(Ordering::Relaxed),
                );
                last = s;
                last_hist = hist;
            }
        }
        measured.unwrap_or_else(|| (snap(c, run_start), vec![0; ctx.stats.latency.buckets.len()]))
    };
    let ((), (m0, h0)) = tokio::join!(ramp_task, progress);
    let m1 = snap(c, secs());
    let h1 = ctx.stats.latency.snapshot();
    let lost_at_end = c.frames_lost.load(Ordering::Relaxed);
    let players_live_at_end = c.players_live.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for h in player_handles {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    while tokio::time::timeout(Duration::from_secs(5), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}

    // Summary.
    let window = (m1.at - m0.at).max(1e-9);
    let (lat_n, lat) = percentiles(&h1, Some(&h0), &[0.5, 0.9, 0.99, 1.0]);
    let (_, lat_all) = percentiles(&h1, None, &[0.5, 0.99]);
    let mut ttff = ctx.stats.ttff.lock().map(|v| v.clone()).unwrap_or_default();
    let pct = |v: &mut Vec<f64>, q: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    let mut from_connect: Vec<f64> = ttff.iter().map(|t| t.0).collect();
    let mut from_play: Vec<f64> = ttff.drain(..).map(|t| t.1).collect();
    let total_bytes_in = c.bytes_in.load(Ordering::Relaxed);
    let total_bytes_out = c.bytes_out.load(Ordering::Relaxed);
    let summary = format!(
        "{{\"mode\":\"stream\",\"url\":\"{}\",\"play_url\":\"{}\",\"publishers\":{},\"players\":{},\"bitrate\":{},\"fps\":{},\
\"window_secs\":{},\"mbps_out\":{},\"mbps_in\":{},\"bytes_out\":{},\"bytes_in\":{},\
\"frames_sent\":{},\"frames_received\":{},\"frames_lost\":{},\"frames_corrupted\":{},\"frames_reordered\":{},\
\"latency_ms\":{{\"samples\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{},\"p50_all\":{},\"p99_all\":{}}},\
\"ttff_ms\":{{\"n\":{},\"p50\":{},\"p99\":{},\"max\":{}}},\"play_to_first_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\
\"players_live_at_end\":{},\"connect_errors\":{},\"disconnects\":{}}}",
        args.url,
        args.play_url.as_deref().unwrap_or(&args.url),
        args.publishers,
        args.players,
        args.bitrate,
        args.fps,
        json_num(window),
        json_num(mbps(m1.bytes_out - m0.bytes_out, window)),
        json_num(mbps(m1.bytes_in - m0.bytes_in, window)),
        total_bytes_out,
        total_bytes_in,
        c.frames_sent.load(Ordering::Relaxed),
        c.frames_received.load(Ordering::Relaxed),
        lost_at_end,
        c.frames_corrupted.load(Ordering::Relaxed),
        c.frames_reordered.load(Ordering::Relaxed),
        lat_n,
        json_num(lat[0]),
        json_num(lat[1]),
        json_num(lat[2]),
        json_num(lat[3]),
        json_num(lat_all[0]),
        json_num(lat_all[1]),
        from_connect.len(),
        json_num(pct(&mut from_connect, 0.5)),
        json_num(pct(&mut from_connect, 0.99)),
        json_num(pct(&mut from_connect, 1.0)),
        json_num(pct(&mut from_play, 0.5)),
        json_num(pct(&mut from_play, 0.99)),
        json_num(pct(&mut from_play, 1.0)),
        players_live_at_end,
        c.connect_errors.load(Ordering::Relaxed),
        c.disconnects.load(Ordering::Relaxed),
    );
    eprintln!(
        "summary: {:.1} s measured | out {:.2} Mb/s in {:.2} Mb/s | frames sent {} received {} lost {} corrupted {} | latency p50 {} p99 {} ms | first frame p50 {} ms (play to first {} ms) | connect errors {} disconnects {}",
        window,
        mbps(m1.bytes_out - m0.bytes_out, window),
        mbps(m1.bytes_in - m0.bytes_in, window),
        c.frames_sent.load(Ordering::Relaxed),
        c.frames_received.load(Ordering::Relaxed),
        lost_at_end,
        c.frames_corrupted.load(Ordering::Relaxed),
        fmt_ms(lat[0]),
        fmt_ms(lat[2]),
        fmt_ms(pct(&mut from_connect, 0.5)),
        fmt_ms(pct(&mut from_play, 0.5)),
        c.connect_errors.load(Ordering::Relaxed),
        c.disconnects.load(Ordering::Relaxed),
    );
    println!("{summary}");
    Ok(())
}

fn fmt_ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_verify_and_detect_corruption() {
        let filler: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let f = synthetic_frame(3, 42, true, 12_500, &filler);
        assert_eq!(f.len(), 12_500);
        assert_eq!(f[0], 0x17);
        match check_frame(&f, true) {
            Check::Ok { seq, .. } => assert_eq!(seq, 42),
            _ => panic!("frame did not verify"),
        }
        let mut bad = f.to_vec();
        bad[9000] ^= 1;
        assert!(matches!(check_frame(&bad, true), Check::Corrupt));
        assert!(matches!(check_frame(&bad[..9000], false), Check::Corrupt));
        assert!(matches!(
            check_frame(&[0x17, 1, 0, 0, 0, 1, 2], true),
            Check::Foreign
        ));
    }

    #[test]
    fn histogram_percentiles() {
        let h = Histogram::new();
        for us in 1..=1000 {
            h.record(us * 100);
        }
        let (n, p) = percentiles(&h.snapshot(), None, &[0.5, 0.99]);
        assert_eq!(n, 1000);
        assert!((p[0] - 50.0).abs() < 0.1, "{p:?}");
        assert!((p[1] - 99.0).abs() < 0.1, "{p:?}");
        h.record(1_000_000_000);
        assert_eq!(Histogram::index(1_000_000_000), 19_900);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("3M").unwrap(), 3_000_000);
        assert_eq!(parse_rate("800k").unwrap(), 800_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
    }
}
