//! Fan-out load, run by hand: one ffmpeg publisher at about 3 Mb/s, N rtmpdump players, the
//! engine's CPU (this process) measured from /proc while they play.
//!
//! `ENGINE_LOAD_PLAYERS=100 ENGINE_WRITE_BATCH_MS=0 cargo test --release --test engine_load -- --ignored --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;

#[test]
#[ignore = "load test: run by hand in release mode"]
fn fan_out_to_n_players() {
    let n: usize = std::env::var("ENGINE_LOAD_PLAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let secs = 20u32;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src3m.flv");
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=size=1280x720:rate=30")
        .args(["-f", "lavfi", "-i", "sine=frequency=440", "-t"])
        .arg(secs.to_string())
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-b:v", "3M"])
        .args(["-maxrate", "3M", "-bufsize", "3M", "-g", "60"])
        .args(["-c:a", "aac", "-f", "flv"])
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let src_len = std::fs::metadata(&src).unwrap().len();
    let batch_ms: u64 = std::env::var("ENGINE_WRITE_BATCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let srv = Server::start(EngineConfig {
        write_batch: Duration::from_millis(batch_ms),
        ..EngineConfig::default()
    });
    let url = srv.url("load");
    let mut players: Vec<Proc> = (0..n)
        .map(|i| {
            let out = dir.path().join(format!("p{i}.flv"));
            play_rtmpdump(&url, &out)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    std::thread::sleep(Duration::from_secs(5));
    let (t0, c0) = (Instant::now(), cpu_ticks(std::process::id()));
    std::thread::sleep(Duration::from_secs(10));
    let (t1, c1) = (Instant::now(), cpu_ticks(std::process::id()));
    let hz = 100.0;
    let cpu = (c1 - c0) as f64 / hz / (t1 - t0).as_secs_f64() * 100.0;
    assert!(publisher.wait_timeout(Duration::from_secs(30)).is_some());
    let mut complete = 0;
    let mut smallest = u64::MAX;
    for (i, p) in players.iter_mut().enumerate() {
        p.wait_timeout(Duration::from_secs(10));
        p.kill();
        let got = std::fs::metadata(dir.path().join(format!("p{i}.flv")))
            .map(|m| m.len())
            .unwrap_or(0);
        smallest = smallest.min(got);
        if got * 100 >= src_len * 97 {
            complete += 1;
        }
    }
    println!(
        "engine fan-out: {n} players, write batch {batch_ms} ms, source {:.2} Mb/s, engine CPU {cpu:.1}% of a core, \
         {complete}/{n} players got >= 97% of the source bytes (smallest {smallest} of {src_len})",
        src_len as f64 * 8.0 / f64::from(secs) / 1e6
    );
}
