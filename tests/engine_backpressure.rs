//! A player that stops reading: bounded memory, dropped after the write timeout, and the
//! other players get every frame as if it were not there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;

#[test]
fn a_stalled_player_is_bounded_and_does_not_delay_others() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(8);
    let want = framemd5(&src);
    let cfg = EngineConfig {
        queue_messages: 64,
        max_lag_bytes: 256 * 1024,
        write_timeout: Duration::from_secs(3),
        ..EngineConfig::default()
    };
    let srv = Server::start_with(cfg, Some(16 * 1024));
    let url = srv.url("stall");
    let out = dir.path().join("ok.flv");
    let mut good = play_ffmpeg(&url, &out);
    let mut stalled = stalled_player(srv.addr, "live", "stall");
    std::thread::sleep(Duration::from_millis(1000));
    let rss_before = rss_kb(std::process::id());
    let t0 = Instant::now();
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    let st = publisher
        .wait_timeout(Duration::from_secs(30))
        .expect("publisher did not finish");
    assert!(st.success(), "publisher failed: {}", publisher.log());
    let published_in = t0.elapsed();
    assert!(good.wait_timeout(Duration::from_secs(15)).is_some());
    let rss_after = rss_kb(std::process::id());
    eprintln!("rss {rss_before} KiB -> {rss_after} KiB; published in {published_in:?}");
    // The whole source is 1 MB; a player queue that grew with it would show here, but the
    // ring and the lag bound keep the stalled player's share to a few hundred KiB.
    assert!(
        rss_after.saturating_sub(rss_before) < 32 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // The publisher ran in real time: nobody waited on the stalled player.
    assert!(
        published_in < Duration::from_secs(12),
        "publishing took {published_in:?}"
    );
    let got = framemd5(&out);
    assert_eq!(contiguous_run(&want, &got).unwrap().start("video"), Some(0));
    let (got_video, want_video) = (count_media(&got, "video"), count_media(&want, "video"));
    assert!(
        got_video * 100 >= want_video * 85,
        "good player got {got_video} of {want_video} video frames"
    );
    let dropped = log_lines(&["play live/stall", "too slow"]);
    assert!(!dropped.is_empty(), "the stalled player was not dropped");
    println!("{}", dropped[0]);
    // Its socket is closed by the server: draining it ends, it does not block for ever.
    let mut sink = vec![0u8; 65536];
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match stalled.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(Instant::now() < end, "stalled socket still open"),
        }
    }
}
