//! rtmpgate-bench's roles: a publisher (synthetic frames or an FLV file in a loop), a player
//! (accounts every frame: latency, loss, reordering, corruption) and an idle connection, each
//! one task over one [`RtmpConnection`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtmpgate_proto::message::{self, Message};
use rtmpgate_proto::session::ClientEvent;
use rtmpgate_tools::client::conn::PUBLISH_CHUNK_SIZE;
use rtmpgate_tools::client::{ClientError, RtmpConnection, RtmpUrl};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use crate::frames::{
    check_frame, hex, is_flv_header, synthetic_frame, Check, AVC_SEQUENCE_HEADER, MIN_FRAME,
};
use crate::stats::{now_ns, Stats};
use crate::Args;

pub struct Ctx {
    pub args: Args,
    pub url: RtmpUrl,
    pub play_url: RtmpUrl,
    pub tls: Option<TlsConnector>,
    pub stats: Stats,
    pub flv: Option<Vec<Message>>,
    pub filler: Vec<u8>,
    /// Flips to true when the run is over.
    pub stop: watch::Receiver<bool>,
}

impl Ctx {
    pub fn stream_name(&self, base: &RtmpUrl, i: usize) -> String {
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

pub async fn publisher(ctx: Arc<Ctx>, index: usize, live: tokio::sync::mpsc::Sender<()>) {
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
pub async fn publish_synthetic(
    ctx: &Ctx,
    conn: &mut RtmpConnection,
    sid: u32,
    index: u32,
) -> Result<(), ClientError> {
    let a = &ctx.args;
    let c = &ctx.stats.c;
    let unlimited = a.bitrate == 0;
    let fps = if a.fps > 0.0 { a.fps } else { 30.0 };
    let frame_len = if unlimited {
        a.frame_bytes
    } else {
        ((a.bitrate as f64 / 8.0 / fps) as usize).max(MIN_FRAME)
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
pub async fn drain_incoming(conn: &mut RtmpConnection) -> Result<(), ClientError> {
    conn.drain_available()
}

pub async fn publish_flv(
    ctx: &Ctx,
    conn: &mut RtmpConnection,
    sid: u32,
    tags: &[Message],
) -> Result<(), ClientError> {
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

pub async fn open_and_connect(
    ctx: &Ctx,
    url: &RtmpUrl,
    publisher: bool,
) -> Result<RtmpConnection, ClientError> {
    let mut conn = RtmpConnection::open(url, ctx.tls.as_ref()).await?;
    if publisher {
        conn.set_chunk_size(PUBLISH_CHUNK_SIZE).await?;
    }
    conn.connect(url, publisher).await?;
    Ok(conn)
}

/// Per-player frame accounting.
pub struct Seen {
    pub next: Option<u64>,
}

pub fn account(ctx: &Ctx, seen: &mut Seen, msg: &Message) {
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

pub async fn player(ctx: Arc<Ctx>, index: usize) {
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
    // Bytes read since play started, stored after every message (see `PlayerBytes`).
    let base = conn.bytes_in;
    let bytes_in = ctx.stats.players_bytes_in.get(index);
    let mut result = Ok(());
    loop {
        tokio::select! {
            r = conn.recv() => match r {
                Ok(ev) => {
                    if let ClientEvent::Media(msg) = &ev {
                        on_media(msg, &mut first);
                    }
                    if let Some(b) = bytes_in {
                        b.0.store(conn.bytes_in - base, Ordering::Relaxed);
                    }
                }
                Err(e) => { result = Err(e); break; }
            },
            _ = stop.changed() => break,
        }
    }
    c.players_live.fetch_sub(1, Ordering::Relaxed);
    if let Err(e) = result {
        if !*ctx.stop.borrow() {
            c.disconnects.fetch_add(1, Ordering::Relaxed);
            ctx.stats.error(&format!("player {index}"), &e);
        }
    }
}

pub async fn idle_conn(ctx: Arc<Ctx>, index: usize) {
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

/// Runs tasks from `spawn(i)` for i in 0..n at `rate` per second.
pub async fn ramp<F>(n: usize, rate: f64, stop: &watch::Receiver<bool>, mut spawn: F)
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
