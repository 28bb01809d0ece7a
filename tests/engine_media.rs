//! End-to-end: ffmpeg and rtmpdump publish and play through the engine; frames compared with
//! the source's, late joiners, key conflicts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod engine_support;

use std::time::{Duration, Instant};

use common::*;
use engine_support::*;
use rtmpgate::engine::EngineConfig;

#[test]
fn three_players_get_one_contiguous_run_of_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(6);
    let want = framemd5(&src);
    let srv = Server::start(EngineConfig::default());
    let url = srv.url("three");
    // Players first: they wait for the publisher and must start with its first frames.
    let outs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("p{i}.flv")))
        .collect();
    let mut players = vec![
        play_ffmpeg(&url, &outs[0]),
        play_ffmpeg(&url, &outs[1]),
        play_rtmpdump(&url, &outs[2]),
    ];
    std::thread::sleep(Duration::from_millis(1500));
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    let st = publisher
        .wait_timeout(Duration::from_secs(30))
        .expect("publisher did not finish in 30 s");
    assert!(st.success(), "publisher failed: {}", publisher.log());
    for p in &mut players {
        if p.wait_timeout(Duration::from_secs(15)).is_none() {
            panic!("{} did not stop after the publisher left", p.name());
        }
    }
    for (p, out) in players.iter().zip(&outs) {
        let got = framemd5(out);
        let (got_video, want_video) = (count_media(&got, "video"), count_media(&want, "video"));
        let run = contiguous_run(&want, &got).unwrap_or_else(|e| panic!("{}: {e}", p.name()));
        eprintln!("{}: {run}", p.name());
        let v = run.start("video").unwrap_or_default();
        let a = run.start("audio").unwrap_or_default();
        assert_eq!(
            v,
            0,
            "{} joined before the publisher but missed video",
            p.name()
        );
        assert!(a <= 2, "{} missed the first {a} audio frames", p.name());
        // ffmpeg stops at UnpublishNotify and drops what it buffered (~93% on nginx-rtmp).
        assert!(
            got_video * 100 >= want_video * 85,
            "{} got only {got_video} of {want_video} video frames",
            p.name()
        );
    }
}

#[test]
fn late_player_starts_on_a_keyframe_and_decodes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(8);
    let want = framemd5(&src);
    let srv = Server::start(EngineConfig::default());
    let url = srv.url("late");
    let mut publisher = publish(&peers().ffmpeg, &url, &src);
    std::thread::sleep(Duration::from_millis(3500));
    let out = dir.path().join("late.flv");
    let started = Instant::now();
    let mut player = play_ffmpeg(&url, &out);
    assert!(publisher.wait_timeout(Duration::from_secs(30)).is_some());
    assert!(
        player.wait_timeout(Duration::from_secs(15)).is_some(),
        "late player did not stop"
    );
    eprintln!("late player ran {:?}", started.elapsed());
    let got = framemd5(&out);
    let v = contiguous_run(&want, &got)
        .unwrap()
        .start("video")
        .unwrap_or_default();
    assert!(v > 0, "late player should start mid-stream");
    // The cache starts on a keyframe: the source has one every 30 frames.
    assert_eq!(
        v % 30,
        0,
        "late player started on frame {v}, not a keyframe"
    );
    // `-vsync vfr`: with the default constant-rate output, ffmpeg 5.1's null muxer complains
    // about equal dts on any file that starts mid-stream with B-frames (its own `-ss 3 -c copy`
    // cut does the same); that is the muxer's frame-rate logic, not a decoding error.
    let dec = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&out)
        .args(["-vsync", "vfr", "-f", "null", "-"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&dec.stderr);
    if !(dec.status.success() && errors.trim().is_empty()) {
        let kept = dir.keep();
        panic!(
            "decoding errors in {}: {errors}",
            kept.join("late.flv").display()
        );
    }
    let lines = log_lines(&["first frame of live/late"]);
    assert!(!lines.is_empty(), "no play-to-first-frame log line");
    for l in lines {
        println!("{l}");
    }
}

#[test]
fn second_publisher_on_a_key_gets_badname_and_the_first_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = source_flv(6);
    let want = framemd5(&src);
    let srv = Server::start(EngineConfig::default());
    let url = srv.url("twice");
    let out = dir.path().join("p.flv");
    let mut player = play_rtmpdump(&url, &out);
    std::thread::sleep(Duration::from_millis(1000));
    let mut first = publish(&peers().ffmpeg, &url, &src);
    std::thread::sleep(Duration::from_millis(2000));
    let mut second = publish(&peers().ffmpeg, &url, &src);
    let st = second
        .wait_timeout(Duration::from_secs(15))
        .expect("second publisher was not refused");
    assert!(!st.success(), "second publisher should fail");
    let err = second.log();
    assert!(
        err.contains("already being published"),
        "second publisher stderr: {err}"
    );
    let st = first.wait_timeout(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "first publisher failed: {}", first.log());
    assert!(player.wait_timeout(Duration::from_secs(15)).is_some());
    let got = framemd5(&out);
    let run = contiguous_run(&want, &got).unwrap();
    assert_eq!(run.start("video"), Some(0));
    assert!(count_media(&got, "video") * 100 >= count_media(&want, "video") * 85);
}
