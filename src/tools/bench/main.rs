//! `rtmpgate-bench`: an RTMP load generator. N publishers and M players over rtmp, rtmps,
//! rtmpt or rtmpts; synthetic frames that carry a send time, a sequence number and a
//! checksum (so every player measures end-to-end latency, loss and corruption per frame),
//! or an FLV file played in a loop. Progress every second, a JSON summary line at the end.

mod frames;
mod roles;
mod stats;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rtmpgate_tools::client::{RtmpUrl, TlsOptions};
use tokio::sync::watch;

use roles::{idle_conn, player, publisher, ramp, Ctx};
use stats::{
    fmt_ms, json_num, mbps, percentiles, snap, Counters, Histogram, PlayerBytes, Snap, Stats,
};

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
  FLV video tags (AVC, keyframe flag every --gop frames, after one sequence header), each
  two AVCC NAL units: an access unit delimiter, then a slice (IDR on keyframes) whose data
  starts with the magic RGB1, the publisher index, a sequence number, the send time (ns
  since the Unix epoch; publisher and players must share a clock) and a 64-bit checksum of
  the rest. Servers that demux NAL units (SRS) pass them on; the slice data is not
  decodable H.264. Players report a frame as lost when its sequence number skips,
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

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let (ctx, stop_tx) = prepare(args)?;
    match ctx.args.idle {
        Some(n) => run_idle(&ctx, stop_tx, n).await,
        None => run_stream(&ctx, stop_tx).await,
    }
}

/// Everything a run shares: parsed URLs, the TLS connector, FLV tags, the filler synthetic
/// frames are cut from, the statistics, and the stop signal (its sender is returned).
fn prepare(args: Args) -> Result<(Arc<Ctx>, watch::Sender<bool>)> {
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
        Some(p) => Some(frames::read_flv(p)?),
        None => None,
    };
    let filler = filler(args.frame_bytes.max((args.bitrate / 8) as usize / 2));
    let (stop_tx, stop) = watch::channel(false);
    let players_bytes_in = (0..args.players).map(|_| PlayerBytes::default()).collect();
    let ctx = Arc::new(Ctx {
        args,
        url,
        play_url,
        tls,
        stats: Stats {
            c: Counters::default(),
            players_bytes_in,
            latency: Histogram::new(),
            ttff: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        },
        flv,
        filler,
        stop,
    });
    Ok((ctx, stop_tx))
}

/// Pseudo-random bytes (xorshift) that synthetic frames are cut from: at least `len` (at
/// most 64 MB) plus the 64 bytes a frame's offset may move.
fn filler(len: usize) -> Vec<u8> {
    let mut filler = vec![0u8; len.min(64 << 20) + 64];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for b in filler.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    filler
}

/// `--idle N`: open N connections, report READY, hold them for --duration, stop.
async fn run_idle(ctx: &Arc<Ctx>, stop_tx: watch::Sender<bool>, n: usize) -> Result<()> {
    let c = &ctx.stats.c;
    let t0 = Instant::now();
    let mut spawned = Vec::new();
    ramp(n, ctx.args.connect_rate, &ctx.stop, |i| {
        spawned.push(tokio::spawn(idle_conn(ctx.clone(), i)));
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
    let connected_in = t0.elapsed().as_secs_f64();
    eprintln!(
        "READY {} connected, {} errors, in {connected_in:.2} s",
        c.idle_connected.load(Ordering::Relaxed),
        c.connect_errors.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs_f64(ctx.args.duration.max(0.0))).await;
    let _ = stop_tx.send(true);
    for h in spawned {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    println!(
        "{{\"mode\":\"idle\",\"url\":\"{}\",\"requested\":{n},\"idle_connected\":{},\"connect_errors\":{},\"disconnects\":{},\"connect_secs\":{}}}",
        ctx.args.url,
        c.idle_connected.load(Ordering::Relaxed),
        c.connect_errors.load(Ordering::Relaxed),
        c.disconnects.load(Ordering::Relaxed),
        json_num(connected_in)
    );
    Ok(())
}

/// The measurement window: counters and latency histogram at its start and end, and what
/// the end saw of losses and live players.
struct Window {
    start: (Snap, Vec<u64>),
    end: (Snap, Vec<u64>),
    lost_at_end: u64,
    players_live_at_end: u64,
}

/// Publishers, then players; progress every second; a summary at the end.
async fn run_stream(ctx: &Arc<Ctx>, stop_tx: watch::Sender<bool>) -> Result<()> {
    let args = &ctx.args;
    let c = &ctx.stats.c;
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    start_publishers(ctx, &mut tasks).await;
    let run_start = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(args.player_delay)).await;

    let mut player_handles = Vec::new();
    let ramp_players = async {
        ramp(args.players, args.connect_rate, &ctx.stop, |i| {
            player_handles.push(tokio::spawn(player(ctx.clone(), i)));
        })
        .await;
    };
    let ((), start) = tokio::join!(ramp_players, progress(ctx, t0, run_start));
    let window = Window {
        start,
        end: (
            snap(&ctx.stats, t0.elapsed().as_secs_f64()),
            ctx.stats.latency.snapshot(),
        ),
        lost_at_end: c.frames_lost.load(Ordering::Relaxed),
        players_live_at_end: c.players_live.load(Ordering::Relaxed),
    };
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
    summary(ctx, window);
    Ok(())
}

/// Starts every publisher; returns once one is live, all have failed, or after 30 s.
async fn start_publishers(ctx: &Arc<Ctx>, tasks: &mut tokio::task::JoinSet<()>) {
    let (live_tx, mut live_rx) = tokio::sync::mpsc::channel::<()>(1);
    for i in 0..ctx.args.publishers {
        tasks.spawn(publisher(ctx.clone(), i, live_tx.clone()));
    }
    drop(live_tx);
    let _ = tokio::time::timeout(Duration::from_secs(30), live_rx.recv()).await;
    if ctx.args.publishers > 0 && ctx.stats.c.publishers_live.load(Ordering::Relaxed) == 0 {
        eprintln!("no publisher went live; see the errors above");
    }
}

/// Prints a progress line every second (unless --quiet) until --duration is over; returns
/// the counters and histogram when measurement started (after the ramp and --warmup).
async fn progress(ctx: &Ctx, t0: Instant, run_start: f64) -> (Snap, Vec<u64>) {
    let args = &ctx.args;
    let secs = || t0.elapsed().as_secs_f64();
    let end_at = run_start + args.duration.max(0.0);
    let mut last = snap(&ctx.stats, secs());
    let mut last_hist = ctx.stats.latency.snapshot();
    let mut measured: Option<(Snap, Vec<u64>)> = None;
    let ramp_secs = if args.connect_rate > 0.0 {
        args.players as f64 / args.connect_rate
    } else {
        0.0
    };
    let ramp_done_at = run_start + args.player_delay as f64 / 1e3 + ramp_secs;
    let measure_from = (ramp_done_at + args.warmup)
        .min(end_at - 0.5)
        .max(run_start);
    loop {
        let now = secs();
        if now >= end_at {
            break;
        }
        if measured.is_none() && now >= measure_from {
            measured = Some((snap(&ctx.stats, now), ctx.stats.latency.snapshot()));
        }
        let next = (now + 1.0).min(end_at).max(measure_from.min(end_at));
        let wait = if measured.is_none() && measure_from > now && measure_from < now + 1.0 {
            measure_from - now
        } else {
            next - now
        };
        tokio::time::sleep(Duration::from_secs_f64(wait.max(0.001))).await;
        let s = snap(&ctx.stats, secs());
        let hist = ctx.stats.latency.snapshot();
        if !args.quiet && s.at - last.at >= 0.9 {
            progress_line(ctx, &last, &last_hist, &s, &hist, run_start);
            last = s;
            last_hist = hist;
        }
    }
    measured.unwrap_or_else(|| {
        (
            snap(&ctx.stats, run_start),
            vec![0; ctx.stats.latency.buckets.len()],
        )
    })
}

/// One progress line on stderr: rates and latency since the previous line.
fn progress_line(
    ctx: &Ctx,
    last: &Snap,
    last_hist: &[u64],
    s: &Snap,
    hist: &[u64],
    run_start: f64,
) {
    let args = &ctx.args;
    let c = &ctx.stats.c;
    let dt = s.at - last.at;
    let (_, p) = percentiles(hist, Some(last_hist), &[0.5, 0.99]);
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
}

/// The `q` quantile of `v` (sorted here), NaN when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The summary: one line on stderr, one JSON line on stdout (the last line, for scripts).
fn summary(ctx: &Ctx, w: Window) {
    let args = &ctx.args;
    let c = &ctx.stats.c;
    let ((m0, h0), (m1, h1)) = (w.start, w.end);
    let window = (m1.at - m0.at).max(1e-9);
    let (lat_n, lat) = percentiles(&h1, Some(&h0), &[0.5, 0.9, 0.99, 1.0]);
    let (_, lat_all) = percentiles(&h1, None, &[0.5, 0.99]);
    let ttff = ctx.stats.ttff.lock().map(|v| v.clone()).unwrap_or_default();
    let mut from_connect: Vec<f64> = ttff.iter().map(|t| t.0).collect();
    let mut from_play: Vec<f64> = ttff.iter().map(|t| t.1).collect();
    let total_bytes_in = ctx.stats.bytes_in();
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
        w.lost_at_end,
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
        json_num(quantile(&mut from_connect, 0.5)),
        json_num(quantile(&mut from_connect, 0.99)),
        json_num(quantile(&mut from_connect, 1.0)),
        json_num(quantile(&mut from_play, 0.5)),
        json_num(quantile(&mut from_play, 0.99)),
        json_num(quantile(&mut from_play, 1.0)),
        w.players_live_at_end,
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
        w.lost_at_end,
        c.frames_corrupted.load(Ordering::Relaxed),
        fmt_ms(lat[0]),
        fmt_ms(lat[2]),
        fmt_ms(quantile(&mut from_connect, 0.5)),
        fmt_ms(quantile(&mut from_play, 0.5)),
        c.connect_errors.load(Ordering::Relaxed),
        c.disconnects.load(Ordering::Relaxed),
    );
    println!("{summary}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("3M").unwrap(), 3_000_000);
        assert_eq!(parse_rate("800k").unwrap(), 800_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
    }
}
